"""I/O buffers: page-aligned, never zero-filled, from a pool of mmap'd arenas.

``alloc(n)`` returns a writable ``memoryview`` of ``n`` bytes whose address
is aligned to 4 KiB, as O_DIRECT wants it (QEMU's qemu_blockalign).  Its
contents are whatever the previous user left: a read fills it, and a read
that ends at EOF zeroes only the tail it did not fill (``zero_tail``).

When the memory goes back to the pool is decided by CPython's reference
counting, not by a caller remembering to release it.  Each buffer is an
instance of a ctypes array class with ``__del__``; every memoryview of it,
and every slice of those views, keeps that instance alive.  So a slot is
handed out again only when nobody holds a view any more: not the engine,
which keeps the buffer of every request in flight until its completion
arrives (so the kernel never writes into memory someone else was given),
not a reply queued for ``sendmsg`` on a client that went away, not a job's
chunk.  Nobody calls ``free``; there is nothing to forget.

Sizes are rounded up to a power of two from 4 KiB; each size class carves
its slots from arenas of at least 4 MiB that are mapped once and kept for
the life of the process, so the pool grows to the peak of bytes in flight
and stays there.  The arenas of slots from :data:`POPULATE_MIN` up are
asked for transparent huge pages (MADV_HUGEPAGE) and mapped with their
pages at once (MADV_POPULATE_WRITE): the read that takes such a slot
writes all of it anyway, and with 2 MiB pages copying a 1 MiB buffer in
and out (the page cache into it, it into a socket) and pinning it for
O_DIRECT walk one page table entry where they walked 256
(docs/formats.md, "Large sequential reads").  Smaller slots fault in as
they are used, so a single 4 KiB buffer does not make its whole arena
resident.  Requests above ``POOL_MAX`` get a mapping of their own
(rare: NBD caps a request at 32 MiB, the copy jobs use at most 16 MiB).
"""

from __future__ import annotations

import ctypes
import mmap

PAGE = 4096
ARENA = 4 << 20
POOL_MAX = 16 << 20
POPULATE_MIN = 256 << 10
# private anonymous memory: what huge pages are for (and cheaper to fault
# in than MAP_SHARED's shmem)
_MAP = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MADV_POPULATE_WRITE = 23  # Linux 5.14; Python 3.11's mmap does not name it

_addressof = ctypes.addressof


class _SizeClass:
    __slots__ = ("size", "free", "arenas", "buffer_type")

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[int] = []   # addresses of slots nobody holds
        self.arenas: list[mmap.mmap] = []
        give_back = self.free.append

        # a class per size (ctypes arrays have their length in the type)
        class Buffer(ctypes.c_char * size):  # type: ignore[misc]
            __slots__ = ()

            def __del__(self) -> None:
                give_back(_addressof(self))

        self.buffer_type = Buffer

    def grow(self) -> None:
        n = max(ARENA, self.size * 2)
        arena = mmap.mmap(-1, n, _MAP)
        if self.size >= POPULATE_MIN:
            _populate(arena)
        self.arenas.append(arena)
        base = _addressof(ctypes.c_char.from_buffer(arena))
        self.free.extend(range(base + n - self.size, base - 1, -self.size))


def _populate(arena: mmap.mmap) -> None:
    """Back ``arena`` with huge pages where the kernel has them, and map
    its pages now; where it cannot, they fault in on first use."""
    for advice in (getattr(mmap, "MADV_HUGEPAGE", None), _MADV_POPULATE_WRITE):
        if advice is None:
            continue
        try:
            arena.madvise(advice)
        except OSError:
            pass  # an older kernel, or THP built out: plain pages


_classes = [_SizeClass(PAGE << i) for i in range((POOL_MAX // PAGE).bit_length())]


def alloc(n: int) -> memoryview:
    """A writable, page-aligned, uninitialised buffer of ``n`` bytes."""
    return alloc_at(n)[0]


def alloc_at(n: int) -> tuple[memoryview, int]:
    """``alloc(n)`` and the buffer's address (for an engine's SQE/iocb)."""
    if n <= PAGE:
        cls = _classes[0]
    elif n > POOL_MAX:
        # one mapping of its own, unmapped when the last view goes
        mv = memoryview(mmap.mmap(-1, n))
        return mv, address(mv)
    else:
        cls = _classes[((n - 1) // PAGE).bit_length()]
    free = cls.free
    if not free:
        cls.grow()
    addr = free.pop()
    mv = memoryview(cls.buffer_type.from_address(addr)).cast("B")
    return (mv if n == cls.size else mv[:n]), addr


def address(buf: memoryview | bytearray | mmap.mmap) -> int:
    """The address of a writable buffer's first byte."""
    return _addressof(ctypes.c_char.from_buffer(buf))


def zero_tail(buf: memoryview, start: int) -> None:
    """Zero ``buf[start:]`` (what a read past EOF did not fill)."""
    n = len(buf) - start
    if n > 0:
        ctypes.memset(address(buf) + start, 0, n)

