"""Per-node request latency: a histogram and a total per operation.

Timing costs two clock reads and a bisect per request on every node a
request passes through, so it is off until something will read it: the
``--metrics`` endpoint turns it on for the whole graph (``enable``).  While
it is off, ``BlockNode.latency`` is None and the request paths skip it
with one test.

The histogram's buckets are fixed (what one scrape compares with the next
must not move) and wide enough for a page-cache hit and a stalled network
disk alike.  A request is counted when it succeeds, as QEMU's
block_acct_done does; failures are counted in the node's failed_*
counters only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import BlockNode

# upper bounds of the buckets, in nanoseconds (the last bucket is unbounded)
BOUNDS_NS = (5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
             1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
             100_000_000, 250_000_000, 1_000_000_000)

OPS = ("read", "write", "flush", "discard")

# whether nodes opened from now on time their requests
_enabled = False


class Latency:
    """One operation's histogram: ``counts[i]`` requests took at most
    ``BOUNDS_NS[i]`` (and more than the bound before); the last count is
    everything slower than the last bound."""

    __slots__ = ("counts", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_NS) + 1)
        self.total_ns = 0

    def add(self, ns: int) -> None:
        self.counts[bisect_left(BOUNDS_NS, ns)] += 1
        self.total_ns += ns


def new() -> dict[str, Latency] | None:
    """What a node opened now keeps: None while timing is off."""
    return {op: Latency() for op in OPS} if _enabled else None


def enable(nodes: Iterable[BlockNode]) -> None:
    """Time every request from now on, on these nodes and on those opened
    later."""
    global _enabled
    _enabled = True
    for node in nodes:
        if node.latency is None:
            node.latency = {op: Latency() for op in OPS}
