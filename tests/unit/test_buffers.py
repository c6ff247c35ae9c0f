"""The I/O buffer pool (nodes/engine/buffers.py): which arenas are mapped
with their pages."""

import subprocess
import sys

# a fresh pool's first 1 MiB buffer, then its first 4 KiB one, neither
# written; prints how many KiB each made resident
FIRST_USE = """
from qsd_trio.nodes.engine import buffers

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

before = resident()
big = buffers.alloc(1 << 20)
middle = resident()
small = buffers.alloc(4096)
print(middle - before, resident() - middle)
"""


def test_large_slots_are_mapped_with_their_pages():
    out = subprocess.run([sys.executable, "-c", FIRST_USE], capture_output=True, text=True,
                         check=True)
    big, small = map(int, out.stdout.split())
    # the 1 MiB class's first arena (4 MiB) is resident before any read
    # writes into it: no page faults on the slots' first use
    assert big >= 4096, big
    # a 4 KiB class's arena is not: its pages come as they are used
    assert small < 1024, small
