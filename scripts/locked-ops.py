#!/usr/bin/env python3
"""Locked operations a request runs, from a callgrind dump made with
--dump-instr=yes: the instructions with a `lock` prefix, and `xchg` with
memory (locked without one), that the binary ran at least once every
other request, counted each time they ran; and the calls into glibc's
cancellation bookkeeping, one locked operation each, which wraps every
blocking system call (`recv`, `send`) of a process with more than one
thread.

    scripts/locked-ops.py DUMP REQUESTS BINARY [TOP]

Each such operation waits for the core's pending stores, about 5 ns on
this machine alone and more in code that has just moved a struct (see
README, "Locked operations"); nginx, one thread a process, runs none.
"""

import collections
import importlib.util
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("code_lines", os.path.join(HERE, "code-lines.py"))
code_lines = importlib.util.module_from_spec(spec)
spec.loader.exec_module(code_lines)

CANCELLATION = re.compile(r"__pthread_(enable|disable)_asynccancel")
LOCKED = re.compile(r"^lock\s|^xchg\s.*\(")


def locked_addresses(binary):
    """The addresses of the binary's locked instructions."""
    disassembly = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", binary],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = set()
    for line in disassembly.splitlines():
        match = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
        if match and LOCKED.search(match.group(2)):
            found.add(int(match.group(1), 16))
    return found


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    path, requests, binary = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    counts, owner = code_lines.executed(path)
    locked = locked_addresses(binary)
    per_function = collections.Counter()
    for address, count in counts.items():
        if address in locked and count * 2 >= requests:
            per_function[owner[address]] += count / requests
    # glibc's bookkeeping: one locked operation a call, counted at each
    # function's first instruction run.
    entries = {}
    for address, count in counts.items():
        name = owner[address]
        if CANCELLATION.search(name) and (name not in entries or address < entries[name][0]):
            entries[name] = (address, count)
    cancellation = sum(count for _, count in entries.values()) / requests
    binary_total = sum(per_function.values())
    print(
        f"{binary_total + cancellation:.0f} locked operations per request "
        f"({binary_total:.0f} in the binary, {cancellation:.0f} in glibc's cancellation points)"
    )
    for function, n in per_function.most_common(top):
        print(f"  {n:5.1f}  {function}")


if __name__ == "__main__":
    main()
