"""The I/O buffer pool (nodes/engine/buffers.py): how the arenas of large
slots are mapped."""

import json
import subprocess
import sys

# a fresh pool's first 1 MiB buffer, then its first 4 KiB one, neither
# written: how many KiB each made resident, and the huge pages under the
# 1 MiB buffer's arena (its mapping's AnonHugePages in /proc/self/smaps)
FIRST_USE = """
import json
from qsd_trio.nodes.engine import buffers

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

def huge_kib(addr):
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(x, 16) for x in first.split("-"))
                inside = lo <= addr < hi
            elif inside and first == "AnonHugePages:":
                return int(line.split()[1])
    return -1

before = resident()
big = buffers.alloc(1 << 20)
middle = resident()
small = buffers.alloc(4096)
print(json.dumps([middle - before, resident() - middle, huge_kib(buffers.address(big))]))
"""


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def test_large_slots_are_mapped_at_once_on_huge_pages():
    out = subprocess.run([sys.executable, "-c", FIRST_USE], capture_output=True, text=True,
                         check=True)
    big, small, huge = json.loads(out.stdout)
    # the 1 MiB class's first arena (4 MiB) is resident before any read
    # writes into it: no page faults on the slots' first use
    assert big >= 4096, big
    # a 4 KiB class's arena is not: its pages come as they are used
    assert small < 1024, small
    if thp_mode() != "never":
        # asked for huge pages (madvise or always): at least one 2 MiB page
        # of the arena is one (all of it where the kernel aligned the mapping)
        assert huge >= 2048, huge
