"""Whether an export's READ or WRITE is worth trying on the node's fast
path first.

An exporter serves a READ with ``BlockNode.read_now`` (a WRITE with
``write_now``) when the node can do it without waiting (the page cache, a
tmpfs file), and otherwise starts it on the I/O engine (``read_submit``,
``write_submit``).  A node whose requests never complete without the
engine (a file opened with O_DIRECT) declines every one after checking it
on the way down: a few Python calls per request for nothing.
:class:`NowGuess` stops asking after ``READ_NOW_MISSES`` misses in a row,
starts the next ``READ_NOW_SKIP`` requests without asking, then asks
again; a node that serves again is asked from then on.  The request is
the same either way.  One guess per kind of request (reads and writes
miss for different reasons).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..nodes.node import BlockNode


class ReadsIntoNow(Protocol):
    """What read_into_now asks: a BlockNode, or a virtio-blk backend."""

    def read_into_now(self, offset: int, views: list[memoryview]) -> bool: ...

# requests in a row the fast path did not serve before it is no longer asked ...
READ_NOW_MISSES = 16
# ... for this many requests
READ_NOW_SKIP = 256


class NowGuess:
    """One client's (or export's) recent luck with read_now or write_now."""

    __slots__ = ("_misses", "_skip")

    def __init__(self) -> None:
        self._misses = 0  # requests in a row the fast path did not serve
        self._skip = 0    # requests still to start without asking it

    def read_now(self, node: BlockNode, offset: int, length: int) -> Any:
        """``node.read_now(offset, length)``, unless recent READs say it
        will not serve this one either; None then."""
        if self._skip:
            self._skip -= 1
            return None
        buf = node.read_now(offset, length)
        if buf is not None:
            self._misses = 0
            return buf
        self._missed()
        return None

    def read_into_now(self, node: ReadsIntoNow, offset: int, views: list[memoryview]) -> bool:
        """``node.read_into_now(offset, views)`` (a virtio-blk READ into the
        guest's buffers), unless recent READs say it will not serve this
        one either; False then."""
        if self._skip:
            self._skip -= 1
            return False
        if node.read_into_now(offset, views):
            self._misses = 0
            return True
        self._missed()
        return False

    def write_now(self, node: BlockNode, offset: int, data: memoryview) -> bool:
        """``node.write_now(offset, data)``, unless recent WRITEs say it
        will not take this one either; False then."""
        if self._skip:
            self._skip -= 1
            return False
        if node.write_now(offset, data):
            self._misses = 0
            return True
        self._missed()
        return False

    def _missed(self) -> None:
        self._misses += 1
        if self._misses >= READ_NOW_MISSES:
            self._misses = 0
            self._skip = READ_NOW_SKIP
