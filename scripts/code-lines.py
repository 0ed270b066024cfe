#!/usr/bin/env python3
"""Code lines a request touches, from a callgrind dump made with
--dump-instr=yes: the 64-byte lines of machine code in which some
instruction ran at least once every other request, in all, and per
function (the function that holds the line's first such instruction).

    scripts/code-lines.py DUMP REQUESTS [TOP]

On this machine each such line costs about 1.3 ns a request (the kernel's
work between two requests leaves little of the proxy's code in the
first-level caches; see README, "Code lines"), so it is the figure to cut
once the instructions are at nginx's count.
"""

import collections
import re
import sys

LINE = 64


def executed(path):
    """Instructions run at each address, and the function of each."""
    counts = collections.Counter()
    owner = {}
    names = {}
    positions = []
    last = []
    function = None
    call_cost = False
    compressed = re.compile(r"\((\d+)\)(?: (.*))?")

    def name(text):
        match = compressed.match(text)
        if not match:
            return text
        if match.group(2) is not None:
            names[match.group(1)] = match.group(2)
        return names[match.group(1)]

    with open(path) as dump:
        for line in dump:
            line = line.rstrip("\n")
            if line.startswith("positions:"):
                positions = line.split()[1:]
                last = [0] * len(positions)
            elif line.startswith("fn="):
                function = name(line[3:])
            elif line.startswith("cfn="):
                name(line[4:])
            elif line.startswith("calls="):
                # The next cost line is the call's inclusive cost.
                call_cost = True
            elif line[:1] and line[0] in "0123456789+-*":
                fields = line.split()
                for i in range(len(positions)):
                    token = fields[i]
                    if token == "*":
                        continue
                    if token[0] in "+-":
                        last[i] += int(token, 0)
                    else:
                        last[i] = int(token, 0)
                if call_cost:
                    call_cost = False
                    continue
                if len(fields) > len(positions):
                    address = last[0]
                    counts[address] += int(fields[len(positions)])
                    owner.setdefault(address, function)
    return counts, owner


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    counts, owner = executed(path)
    if not owner or max(owner) < LINE:
        sys.exit(f"{path}: no instruction addresses (record with --dump-instr=yes)")
    lines = {}
    for address in sorted(counts):
        if counts[address] * 2 >= requests:
            lines.setdefault(address // LINE, owner[address])
    print(f"{len(lines)} code lines touched per request ({len(lines) * LINE // 1024} KiB)")
    if top:
        per_function = collections.Counter(lines.values())
        for function, n in per_function.most_common(top):
            print(f"  {n:5d}  {function}")


if __name__ == "__main__":
    main()
