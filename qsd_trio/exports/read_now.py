"""Whether an export's READ is worth trying on the node's fast path first.

An exporter serves a READ with ``BlockNode.read_now`` when the node can
answer it without waiting (the page cache, a tmpfs file), and otherwise
starts it on the I/O engine (``read_submit``).  A node whose reads never
complete without the engine (a file opened with O_DIRECT) answers every
``read_now`` with None after checking the request twice on the way down:
a few Python calls per request for nothing.  :class:`ReadNowGuess` stops
asking after ``READ_NOW_MISSES`` misses in a row, starts the next
``READ_NOW_SKIP`` READs without asking, then asks again; a node that
serves again is asked from then on.  The request is the same either way.
"""

from __future__ import annotations

from typing import Any

from ..nodes.node import BlockNode

# READs in a row read_now did not serve before it is no longer asked ...
READ_NOW_MISSES = 16
# ... for this many READs
READ_NOW_SKIP = 256


class ReadNowGuess:
    """One client's (or export's) recent luck with read_now."""

    __slots__ = ("_misses", "_skip")

    def __init__(self) -> None:
        self._misses = 0  # READs in a row read_now did not serve
        self._skip = 0    # READs still to start without asking read_now

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
        self._misses += 1
        if self._misses >= READ_NOW_MISSES:
            self._misses = 0
            self._skip = READ_NOW_SKIP
        return None
