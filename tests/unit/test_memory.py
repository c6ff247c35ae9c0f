"""The allocator setting that keeps request buffers off fresh mmaps."""

import subprocess
import sys

# the pattern of a FUSE/NBD read burst: several 1 MiB payloads in flight at
# once, all freed before the next burst; prints the minor page faults
BURSTS = """
import resource, sys
import qsd_trio.memory as m
if sys.argv[1] == "tuned":
    assert m.tune_malloc()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    bufs = [bytearray(1 << 20) for _ in range(4)]
    del bufs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", BURSTS, mode], capture_output=True,
                         text=True, check=True)
    return int(out.stdout)


def test_tuned_allocator_reuses_freed_buffers():
    untuned, tuned = faults("plain"), faults("tuned")
    # untuned glibc trims the heap after each burst and faults the pages
    # back in (about 400 x 256 faults); tuned, the pages stay mapped
    assert untuned > 20_000, untuned
    assert tuned < 5_000, tuned
