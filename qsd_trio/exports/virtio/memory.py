"""Guest memory as the front-end shares it: regions mapped from descriptors.

A vhost-user front-end (or VDUSE) describes guest RAM as regions, each a
file descriptor (a memfd, a hugetlbfs file) with a guest-physical base, a
base in the front-end's own address space (the "user address" rings are
given in) and an offset into the descriptor.  :class:`GuestMemory` maps
them (``MAP_SHARED``) and translates both kinds of address.

Every access is bounds-checked.  A guest address (or user address) with a
length that does not lie inside the mapped regions raises
:class:`GuestMemoryError`; no read or write ever lands outside a mapping.
A region is mapped only when its descriptor is a regular file at least as
long as the region, so touching it cannot fault (SIGBUS) at once; a
front-end that shrinks the file afterwards is not defended against (nor
does libvhost-user defend against it).

Resources: each region owns an ``mmap``; :meth:`GuestMemory.close` (and
replacing or removing a region) closes it.  A mapping that a request still
holds a ``memoryview`` of cannot be closed at that moment; it is dropped
instead and unmapped when the last view is released.  The descriptors
passed in stay the caller's (``mmap`` keeps its own duplicate).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import struct
from array import array
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import add
from typing import Any

from ...nodes.file import IovecList
from ...proto.vhost_user import MemRegion

# what QEMU 7.2's libvhost-user answers to GET_MAX_MEM_SLOTS
MAX_MEM_SLOTS = 32


class GuestMemoryError(Exception):
    """An address range outside the guest memory regions, or a region that
    cannot be mapped."""


def host_address(mm: mmap.mmap, offset: int) -> int:
    """The address of byte ``offset`` of a writable mapping (the ctypes
    object would pin the mapping: it is dropped at once)."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor) + offset
    finally:
        del anchor


class MappedRegion:
    """One region and its mapping.  Offsets given to the accessors are
    relative to the region's first byte; they are checked against its size."""

    __slots__ = ("guest_addr", "size", "user_addr", "mmap_offset", "_map", "_mv", "host")

    def __init__(self, desc: MemRegion, fd: int):
        self.guest_addr = desc.guest_addr
        self.size = desc.size
        self.user_addr = desc.user_addr
        self.mmap_offset = desc.mmap_offset
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"memory region descriptor: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise GuestMemoryError("memory region descriptor is not a regular file or memfd")
        end = desc.mmap_offset + desc.size
        if st.st_size < end:
            raise GuestMemoryError(
                f"memory region of {desc.size} bytes at offset {desc.mmap_offset} "
                f"is beyond its file ({st.st_size} bytes)")
        try:
            # the whole file prefix: mmap's own offset must be page aligned,
            # the region's need not be (libvhost-user maps the same way)
            self._map: mmap.mmap | None = mmap.mmap(
                fd, end, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map memory region: {e}") from None
        # views of requests are slices of this one (a slice costs one object)
        self._mv: memoryview | None = memoryview(self._map)
        # the address of the region's first byte in this process, for
        # GuestIovec (0: none, no GuestIovec of this region)
        self.host = host_address(self._map, desc.mmap_offset)

    def __repr__(self) -> str:
        return (f"MappedRegion(guest={self.guest_addr:#x}, size={self.size:#x}, "
                f"user={self.user_addr:#x})")

    def matches(self, desc: MemRegion) -> bool:
        return (self.guest_addr, self.size, self.user_addr) == (
            desc.guest_addr, desc.size, desc.user_addr)

    def _mm(self, offset: int, length: int) -> mmap.mmap:
        mm = self._map
        if mm is None:
            raise GuestMemoryError("memory region was unmapped")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GuestMemoryError(
                f"access of {length} bytes at {offset:#x} outside a region of {self.size:#x}")
        return mm

    def read(self, offset: int, length: int) -> bytes:
        mm = self._mm(offset, length)
        start = self.mmap_offset + offset
        return mm[start:start + length]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        mm = self._mm(offset, n)
        start = self.mmap_offset + offset
        mm[start:start + n] = data

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of the range; the caller releases it
        (``with`` or ``.release()``) so the region can be unmapped."""
        mv = self._mv
        if mv is None or offset < 0 or length < 0 or offset + length > self.size:
            self._mm(offset, length)  # raises
        assert mv is not None
        start = self.mmap_offset + offset
        return mv[start:start + length]

    def unpack_from(self, fmt: struct.Struct, offset: int) -> tuple[Any, ...]:
        mm = self._mm(offset, fmt.size)
        return fmt.unpack_from(mm, self.mmap_offset + offset)

    def pack_into(self, fmt: struct.Struct, offset: int, *values: Any) -> None:
        mm = self._mm(offset, fmt.size)
        fmt.pack_into(mm, self.mmap_offset + offset, *values)

    def close(self) -> None:
        mm, self._map = self._map, None
        mv, self._mv = self._mv, None
        if mv is not None:
            mv.release()  # slices a request still holds keep the mapping
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # a request still holds a view: the mapping goes with it
                pass


# a guest buffer after translation: (region, offset in the region, length)
Segment = tuple[MappedRegion, int, int]


def views_of(segments: Sequence[Segment]) -> tuple[list[memoryview], int]:
    """Writable views of translated segments (what a request hands its node
    as the data of one preadv or pwritev), and their bytes in all.

    A segment is only ever made by translation (the ring walk,
    ``gpa_segments``) or cut from one, so it lies inside its region: the
    bounds were checked then, and only a region closed since (an unmapped
    memory table) is checked here.  One loop without a method call per
    segment: a guest's 1 MiB request has up to 126.

    Raises:
        GuestMemoryError: a segment's region was unmapped.
    """
    out: list[memoryview] = []
    append = out.append
    size = 0
    for r, off, n in segments:
        mv = r._mv
        if mv is None:
            raise GuestMemoryError("memory region was unmapped")
        start = r.mmap_offset + off
        append(mv[start:start + n])
        size += n
    return out, size


class GuestIovec(IovecList):
    """A request's data as a ``struct iovec`` array (nodes/file.IovecList):
    guest buffers for one preadv2/pwritev2 without a memoryview per
    buffer.  Only a FileNode takes it (the virtio-blk handler hands it over
    only when the request's node is one, as raw over file is; the list
    itself is empty, so it must never reach anything else).

    A guest's 1 MiB request whose pages lie apart comes as 126 pieces: a
    view of each (views_of) took 21.5 us and the node layer's loop over
    their lengths 4.5 us, this array 6.8 (timeit, 126 pieces, load 4).

    ``iov`` is the array (``pieces`` entries of address and length, ``size``
    bytes in all, at ``address``); ``keep`` is an empty view of the region
    that keeps its mapping while the request holds the array (a memory
    table replaced meanwhile: MappedRegion.close leaves a mapping with a
    view to its last user).  ``region`` and ``offsets`` make views of the
    same pieces, for a path that needs them (a short write's rest).
    """

    __slots__ = ("iov", "keep", "region", "offsets", "lengths")

    def __init__(self, region: MappedRegion, offsets: Sequence[int], lengths: Sequence[int],
                 size: int):
        super().__init__()
        mv = region._mv
        if mv is None or not region.host:
            raise GuestMemoryError("memory region was unmapped or has no address")
        self.keep = mv[0:0]
        self.region = region
        self.offsets = offsets
        self.lengths = lengths
        self.pieces = n = len(lengths)
        self.size = size
        iov = self.iov = array("Q", bytes(16 * n))
        iov[0::2] = array("Q", map(add, offsets, repeat(region.host)))
        iov[1::2] = array("Q", lengths)
        self.address: int = iov.buffer_info()[0]

    def views(self) -> list[memoryview]:
        """A view of each piece (views_of).

        Raises:
            GuestMemoryError: the region was unmapped since.
        """
        r = self.region
        return views_of([(r, off, n) for off, n in zip(self.offsets, self.lengths, strict=True)])[0]


class GuestMemory:
    """The mapped regions of one front-end's memory table."""

    def __init__(self, max_regions: int = MAX_MEM_SLOTS):
        self.max_regions = max_regions
        self.regions: list[MappedRegion] = []

    # -- the table ----------------------------------------------------------------
    def set_table(self, descs: Sequence[MemRegion], fds: Sequence[int]) -> None:
        """Replace every region (SET_MEM_TABLE).  The new regions are mapped
        first: on an error the old table stays as it was.

        Raises:
            GuestMemoryError: a region that cannot be mapped, overlapping
                regions, or more than ``max_regions``.
        """
        if len(descs) != len(fds):
            raise GuestMemoryError(f"{len(fds)} descriptors for {len(descs)} regions")
        if len(descs) > self.max_regions:
            raise GuestMemoryError(f"{len(descs)} regions, at most {self.max_regions}")
        new: list[MappedRegion] = []
        try:
            for desc, fd in zip(descs, fds, strict=True):
                _check_overlap(new, desc)
                new.append(MappedRegion(desc, fd))
        except GuestMemoryError:
            for r in new:
                r.close()
            raise
        old, self.regions = self.regions, new
        for r in old:
            r.close()

    def add_region(self, desc: MemRegion, fd: int) -> None:
        """Map one more region (ADD_MEM_REG).

        Raises:
            GuestMemoryError: no free slot, an overlap, or a mapping error.
        """
        if len(self.regions) >= self.max_regions:
            raise GuestMemoryError(f"no free memory slot (at most {self.max_regions})")
        _check_overlap(self.regions, desc)
        self.regions.append(MappedRegion(desc, fd))

    def remove_region(self, desc: MemRegion) -> None:
        """Unmap the region with this guest address, user address and size
        (REM_MEM_REG; the mmap offset is ignored, as the specification says).

        Raises:
            GuestMemoryError: no such region.
        """
        for i, r in enumerate(self.regions):
            if r.matches(desc):
                del self.regions[i]
                r.close()
                return
        raise GuestMemoryError(
            f"no memory region at guest address {desc.guest_addr:#x} of size {desc.size:#x}")

    def close(self) -> None:
        regions, self.regions = self.regions, []
        for r in regions:
            r.close()

    # -- translation --------------------------------------------------------------
    def gpa_segments(self, addr: int, length: int) -> list[Segment]:
        """Translate the guest-physical range [addr, addr+length) to
        segments of mapped regions (several when it crosses from one
        region into an adjacent one).  An empty range translates to [].

        Raises:
            GuestMemoryError: any byte of the range is outside every region.
        """
        for r in self.regions:
            # the common case: all of it in one region
            off = addr - r.guest_addr
            if 0 <= off and off + length <= r.size:
                return [(r, off, length)] if length > 0 else []
        out: list[Segment] = []
        while length > 0:
            for r in self.regions:
                off = addr - r.guest_addr
                if 0 <= off < r.size:
                    n = min(length, r.size - off)
                    out.append((r, off, n))
                    addr += n
                    length -= n
                    break
            else:
                raise GuestMemoryError(f"guest address {addr:#x} is outside guest memory")
        return out

    def gpa_region(self, addr: int, length: int) -> tuple[MappedRegion, int]:
        """The one region holding the whole guest-physical range, and the
        range's offset in it (descriptor tables must not cross regions).

        Raises:
            GuestMemoryError: the range is not inside a single region.
        """
        return self._region(addr, length, "guest_addr", "guest")

    def uva_region(self, addr: int, length: int) -> tuple[MappedRegion, int]:
        """Like :meth:`gpa_region` for a front-end (user) address, the kind
        SET_VRING_ADDR gives rings in.

        Raises:
            GuestMemoryError: the range is not inside a single region.
        """
        return self._region(addr, length, "user_addr", "front-end")

    def _region(self, addr: int, length: int, base: str,
                what: str) -> tuple[MappedRegion, int]:
        for r in self.regions:
            off = addr - (r.guest_addr if base == "guest_addr" else r.user_addr)
            if 0 <= off and off + length <= r.size:
                return r, off
        raise GuestMemoryError(
            f"{what} range {addr:#x}+{length:#x} is not inside one memory region")

    def read_gpa(self, addr: int, length: int) -> bytes:
        """Copy a guest-physical range out.

        Raises:
            GuestMemoryError: the range is outside guest memory.
        """
        return b"".join(r.read(off, n) for r, off, n in self.gpa_segments(addr, length))

    def write_gpa(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at a guest-physical address.

        Raises:
            GuestMemoryError: the range is outside guest memory (nothing is
                written then).
        """
        mv = memoryview(data).cast("B")
        pos = 0
        for r, off, n in self.gpa_segments(addr, len(mv)):
            r.write(off, mv[pos:pos + n])
            pos += n


def _check_overlap(regions: Iterable[MappedRegion], desc: MemRegion) -> None:
    for r in regions:
        if desc.guest_addr < r.guest_addr + r.size and r.guest_addr < desc.guest_addr + desc.size:
            raise GuestMemoryError(
                f"memory region at guest address {desc.guest_addr:#x} overlaps {r!r}")
