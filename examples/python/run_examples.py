#!/usr/bin/env python3
"""End to end: the three examples against a real `tidegate serve`.

Starts the push subscriber (busy one call in three), a gateway whose
events push to it and serve a pull subscription, publishes 5 orders (10
events) with publisher.py, pulls all 10 with pull_worker.py, and waits
until the subscriber has taken all 10 despite its 503s. Run by
./scripts/test.sh:

    python3 examples/python/run_examples.py target/debug/tidegate
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def lines_of(process, sink):
    for line in process.stdout:
        sink.append(line)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/tidegate"
    work = tempfile.mkdtemp(prefix="tidegate-python-")
    subscriber = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "push_subscriber.py"), "--port", "0", "--busy-every", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = subscriber.stderr.readline().split()[-1]
    pushed = []
    threading.Thread(target=lines_of, args=(subscriber, pushed), daemon=True).start()
    config = os.path.join(work, "gateway.toml")
    with open(config, "w") as f:
        f.write(f"""
[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[[upstreams]]
name = "analytics"
endpoints = ["{address}"]
[events]
path = "{os.path.join(work, 'events.db')}"
listen = "127.0.0.1:0"
[[events.subscriptions]]
name = "analytics"
topic = "orders"
push = {{ upstream = "analytics", path = "/events/orders" }}
backoff = {{ base_delay = "100ms", max_delay = "1s" }}
[[events.subscriptions]]
name = "fulfilment"
topic = "orders"
""")
    gateway = subprocess.Popen([binary, "serve", "--config", config, "--log-format", "json"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TIDEGATE_LOG": "info"})
    try:
        events = None
        for line in gateway.stderr:
            fields = json.loads(line).get("fields", {})
            if fields.get("message") == "tidegate is serving":
                events = "http://" + fields["events_addr"]
                break
        assert events, "the gateway never served"
        threading.Thread(target=lambda: [None for _ in gateway.stderr], daemon=True).start()

        published = subprocess.run(
            [sys.executable, os.path.join(HERE, "publisher.py"), "--events", events, "--count", "5"],
            capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        print(published.stdout, end="")
        assert published.stdout.count("placed at position") == 5, published.stdout

        pulled = subprocess.run(
            [sys.executable, os.path.join(HERE, "pull_worker.py"), "--events", events,
             "--subscription", "fulfilment", "--max-events", "10"],
            capture_output=True, text=True, timeout=60)
        assert pulled.returncode == 0, pulled.stderr
        ids = [json.loads(line)["id"] for line in pulled.stdout.splitlines()]
        assert len(set(ids)) == 10, pulled.stdout
        print(f"pull worker: {len(ids)} events acked")

        deadline = time.monotonic() + 60
        while True:
            taken = {json.loads(line)["id"] for line in list(pushed)}
            if taken >= set(ids):
                break
            assert time.monotonic() < deadline, f"the subscriber took {len(taken)} of 10: {pushed}"
            time.sleep(0.05)
        redelivered = [json.loads(line) for line in pushed if json.loads(line)["delivery"] != "1"]
        print(f"push subscriber: all 10 events taken, {len(redelivered)} after a 503")
        assert redelivered, "the subscriber's 503s were never redelivered"
        print("python examples passed")
        return 0
    finally:
        gateway.terminate()
        subscriber.terminate()
        gateway.wait(timeout=30)
        subscriber.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
