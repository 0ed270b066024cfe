#!/usr/bin/env python3
"""A pull worker for tidegate (Python standard library only).

Workers of one subscription share its events (a work queue). Each fetch
leases events for the subscription's ack_wait; a worker acks what it
finished, nacks what it could not do now (delivered again after a delay),
and dead-letters what it can never do. A worker that dies loses nothing:
its leased events go to another worker when their lease runs out.

    python3 examples/python/pull_worker.py --events http://127.0.0.1:9902 --subscription fulfilment
"""

import argparse
import json
import sys
import urllib.request


def call(events, subscription, action, body):
    request = urllib.request.Request(
        f"{events}/v1/subscriptions/{subscription}/{action}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=75) as response:
        return json.load(response)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", default="http://127.0.0.1:9902", help="the events API")
    parser.add_argument("--subscription", default="fulfilment")
    parser.add_argument("--max-events", type=int, default=0, help="stop after this many (0: never)")
    args = parser.parse_args()
    done = 0
    while args.max_events == 0 or done < args.max_events:
        # A long poll: answered as soon as events come, or empty after 20 s.
        messages = call(args.events, args.subscription, "fetch", {"max": 10, "wait": "20s"})["messages"]
        finished, poison = [], []
        for message in messages:
            event = message["event"]
            if event.get("data") is None and "data_base64" not in event:
                poison.append(message["ack_id"])
                continue
            print(json.dumps({"id": event["id"], "type": event["type"], "position": event["position"],
                              "key": event.get("key"), "delivery": message["delivery"]}), flush=True)
            finished.append(message["ack_id"])
        if finished:
            acked = call(args.events, args.subscription, "ack", {"ack_ids": finished})
            if acked["expired"]:
                # Leases that ran out: another worker has these now.
                print(f"lost leases: {acked['expired']}", file=sys.stderr)
            done += acked["settled"]
        if poison:
            call(args.events, args.subscription, "dead-letter", {"ack_ids": poison, "reason": "no data"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
