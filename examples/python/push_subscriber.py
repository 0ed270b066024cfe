#!/usr/bin/env python3
"""A push subscriber for tidegate (Python standard library only).

The gateway POSTs each event of a push subscription here, through the
upstream's breaker, bulkhead and timeout. Binary mode: the attributes are
ce-* headers, the data is the body. The answer decides: 2xx acks; 503 with
Retry-After (or any 5xx, or no answer) has the event delivered again
later; another 4xx sends it to the dead-letter topic. tidegate-delivery
says which delivery this is, so a handler can tell a redelivery.

    python3 examples/python/push_subscriber.py --port 8090

with, in the gateway's config:

    [[upstreams]]
    name = "analytics"
    endpoints = ["http://127.0.0.1:8090"]
    [[events.subscriptions]]
    name = "analytics"
    topic = "orders"
    push = { upstream = "analytics", path = "/events/orders" }
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen = set()
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    busy_every = 0
    calls = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        event_id = self.headers.get("ce-id")
        Handler.calls += 1
        if Handler.busy_every and Handler.calls % Handler.busy_every == 0:
            # Busy now: the gateway delivers this event again after 1 s.
            self.send_response(503)
            self.send_header("retry-after", "1")
            self.end_headers()
            return
        try:
            data = json.loads(body) if body else None
        except ValueError:
            # Never readable: straight to the dead-letter topic.
            self.send_response(400)
            self.end_headers()
            return
        # At-least-once: an event may come again; handle it once.
        with lock:
            first = event_id not in seen
            seen.add(event_id)
        line = json.dumps({
            "id": event_id,
            "type": self.headers.get("ce-type"),
            "topic": self.headers.get("ce-topic"),
            "position": self.headers.get("ce-position"),
            "delivery": self.headers.get("tidegate-delivery"),
            "first_time": first,
            "data": data,
        })
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8090, help="0: any free port (printed)")
    parser.add_argument("--busy-every", type=int, default=0, help="answer 503 to every Nth call")
    args = parser.parse_args()
    Handler.busy_every = args.busy_every
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
