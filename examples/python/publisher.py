#!/usr/bin/env python3
"""Publish events to a tidegate topic over HTTP (Python standard library only).

Each order is a CloudEvent in binary mode: the attributes as ce-* headers,
the data as the JSON body. Events of one order share a key, and each is
published at the version the publisher expects, so a concurrent writer's
event makes the publish fail with 409 instead of being lost.

Run a gateway with an [events] table (or `tidegate demo`), then:

    python3 examples/python/publisher.py --events http://127.0.0.1:9902 --topic orders --count 5
"""

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid


def publish(events, topic, event_type, data, key=None, expected=None, event_id=None):
    """POSTs one event; returns the gateway's answer (id, position, version, duplicate)."""
    headers = {
        "content-type": "application/json",
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-source": "/examples/python/publisher",
        # The same id sent again (a retry) is answered as a duplicate, not stored twice.
        "ce-id": event_id or str(uuid.uuid4()),
    }
    if key is not None:
        headers["tidegate-key"] = key
    if expected is not None:
        headers["tidegate-expected-version"] = str(expected)
    request = urllib.request.Request(
        f"{events}/v1/topics/{topic}/events",
        data=json.dumps(data).encode(),
        headers=headers,
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", default="http://127.0.0.1:9902", help="the events API")
    parser.add_argument("--topic", default="orders")
    parser.add_argument("--count", type=int, default=5, help="orders to place")
    args = parser.parse_args()
    for n in range(args.count):
        key = f"order-{n}"
        try:
            placed = publish(args.events, args.topic, "OrderPlaced", {"order": key, "total": 10 + n},
                             key=key, expected="no_stream")
        except urllib.error.HTTPError as e:
            # 409: the stream moved on; 400: what is wrong; 503: try again later.
            print(f"{key}: {e.code} {e.read().decode()}", file=sys.stderr)
            return 1
        paid = publish(args.events, args.topic, "OrderPaid", {"order": key},
                       key=key, expected=placed["version"])
        print(f"{key}: placed at position {placed['position']}, paid at {paid['position']} (version {paid['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
