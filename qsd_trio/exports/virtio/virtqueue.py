"""Split virtqueues, the device's side, over :class:`GuestMemory`.

Layout and rules from the virtio specification, "Split Virtqueues"
(split-ring.tex): a descriptor table of 16-byte entries, the driver's
available ring and the device's used ring, indirect descriptor tables
(VIRTIO_F_INDIRECT_DESC) and event index notification suppression
(VIRTIO_F_EVENT_IDX).  No I/O here: the transport (vhost-user, VDUSE)
waits for kicks and signals calls; this module reads what the driver made
available and writes what the device used.

The driver is not trusted.  Whatever it puts in the rings, :meth:`pop`
either returns a chain whose every buffer lies inside guest memory or
raises :class:`VirtqueueError`: a head or ``next`` index beyond the table,
a chain that loops or is longer than its table, an indirect table of a
size that is not a multiple of 16 or one inside another, a device-readable
buffer after a device-writable one, a buffer outside guest memory, an
available index that moved by more than the ring size.  Those are the
conditions under which libvhost-user calls ``vu_panic``: the transport
marks the device broken and stops processing it.  Guest memory is only
touched through bounds-checked region accessors.
"""

from __future__ import annotations

import struct
import sys
import threading
from itertools import compress, pairwise, repeat
from operator import add, ne, sub
from typing import Any

import attrs

from .memory import GuestMemory, GuestMemoryError, MappedRegion, Segment

# descriptor flags (split-ring.tex "The Virtqueue Descriptor Table")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
# ring flags
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

# feature bits (content.tex "Reserved Feature Bits")
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# the largest split queue the specification allows
MAX_QUEUE_SIZE = 32768
# the most buffers one chain may have, direct and indirect together
# (VIRTQUEUE_MAX_SIZE in libvhost-user)
MAX_CHAIN_BUFFERS = 1024

_DESC = struct.Struct("<QIHH")
_unpack_desc = _DESC.unpack_from
# SplitQueue._walk_in_order's fixed cost is a few descriptors' worth of the
# descriptor-by-descriptor walk (measured): smaller tables (a 4 KiB request
# has three descriptors) are walked that way
IN_ORDER_MIN = 6
# a whole indirect table of n descriptors, and the next fields of one
# chained in order (0 -> 1 -> ... -> n-1), by n (SplitQueue._walk_in_order)
_TABLES: dict[int, tuple[struct.Struct, tuple[int, ...]]] = {}
_U16 = struct.Struct("<H")
_pack_u16 = _U16.pack_into
_USED_ELEM = struct.Struct("<II")
_pack_used = _USED_ELEM.pack_into
# Ring indices and flags are read and written through views cast to "H"
# (SplitQueue._avail16, _used16), never with struct: struct.pack_into
# zero-fills the bytes it packs before it stores the value (CPython's
# s_pack_internal), so a driver on another CPU saw the used index at 0
# for a moment, took the entries
# after its last one for new ones (pushed a ring's length earlier) and
# broke the ring ("virtio_blk: id 1 is not a head!", then EIO for every
# request in flight: about one benchmark run in two).  A memoryview item
# of "H" is one 16-bit load or store, as the driver's own are.  Those
# views are in the host's byte order, which is the ring's (little-endian,
# VIRTIO_F_VERSION_1) only on a little-endian host: SplitQueue refuses
# any other.


_FENCE = threading.Lock()


def _fence() -> None:
    """A full memory barrier between a store to a ring and a load from the
    other side's ring (the specification's "memory barrier" where both
    parties suppress notifications).  Taking a lock is a locked
    read-modify-write, which orders stores before later loads on x86-64
    and is a full barrier on other architectures' pthread mutexes."""
    _FENCE.acquire()
    _FENCE.release()


class VirtqueueError(Exception):
    """The driver broke the ring; the device should stop using it."""


@attrs.define
class Chain:
    """One available descriptor chain, translated.  (Not frozen: a frozen
    attrs instance costs twice as much to make, and one is made per
    request.)

    ``head`` is the index to return in the used ring; ``readable`` are the
    device-readable buffers (the driver's request), ``writable`` the
    device-writable ones (where the answer goes), in order, as segments of
    mapped guest memory.
    """

    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    # an indirect table of buffers none of which continues another, all in
    # one region (_walk_in_order): the region, and each buffer's offset in
    # it and length, readable ones first; what a request makes its
    # GuestIovec of without going through the segments
    scattered: tuple[MappedRegion, tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def readable_len(self) -> int:
        return sum(n for _, _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, _, n in self.writable)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` crosses
    ``event_idx`` (split-ring.tex, "Used Buffer Notification Suppression")."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's region in an inflight buffer, as libvhost-user
    lays them out (its vu_inflight_queue_size), so a buffer a front-end
    kept from another back-end reads the same."""
    return (16 * queue_size + 2 + 63) & ~63


class InflightSplit:
    """One split queue's region of the inflight buffer (vhost-user.rst
    "Inflight I/O tracking"): a 16-byte header (features, version,
    desc_num, last_batch_head, used_idx) and a 16-byte DescStateSplit
    (inflight, next, counter) per descriptor, in a shared mapping that
    outlives the back-end.  Batches are of one entry, as libvhost-user's.

    libvduse's reconnect log (a VDUSE device's, in a file) has the same
    layout but leaves the version at 0: with ``versioned=False`` a region
    is never taken for a fresh one, whatever its version says.

    Raises (constructor):
        VirtqueueError: the region does not fit in the buffer.
    """

    HEADER = struct.Struct("<QHHHH")
    _VERSION = 8
    _LAST_BATCH_HEAD = 12
    _USED_IDX = 14
    _FLAG = struct.Struct("<B")
    _COUNTER = struct.Struct("<Q")

    def __init__(self, buf: Any, offset: int, desc_num: int, *, versioned: bool = True):
        if offset < 0 or offset + 16 + 16 * desc_num > len(buf):
            raise VirtqueueError(f"inflight region of {desc_num} descriptors beyond the buffer")
        self.buf = buf
        self.offset = offset
        self.desc_num = desc_num
        self.versioned = versioned

    def _u16(self, pos: int) -> int:
        return int(_U16.unpack_from(self.buf, self.offset + pos)[0])

    def _set_u16(self, pos: int, value: int) -> None:
        _U16.pack_into(self.buf, self.offset + pos, value)

    @property
    def version(self) -> int:
        return self._u16(self._VERSION)

    @property
    def used_idx(self) -> int:
        return self._u16(self._USED_IDX)

    def fresh(self) -> bool:
        """A region no back-end has used yet (vhost-user: version 0)."""
        return self.versioned and self.version == 0

    def is_inflight(self, head: int) -> bool:
        return bool(self.buf[self.offset + 16 + 16 * head])

    def counter(self, head: int) -> int:
        return int(self._COUNTER.unpack_from(self.buf, self.offset + 16 + 16 * head + 8)[0])

    def get(self, head: int, counter: int) -> None:
        """A chain was taken from the available ring."""
        base = self.offset + 16 + 16 * head
        self._COUNTER.pack_into(self.buf, base + 8, counter)
        self.buf[base] = 1

    def pre_put(self, head: int) -> None:
        """Chain ``head`` is about to be put in the used ring."""
        _pack_u16(self.buf, self.offset + self._LAST_BATCH_HEAD, head)

    def post_put(self, head: int, used_idx: int) -> None:
        """Chain ``head`` is in the used ring, published at ``used_idx``."""
        self.buf[self.offset + 16 + 16 * head] = 0
        _fence()
        _pack_u16(self.buf, self.offset + self._USED_IDX, used_idx)

    def recover(self, used_idx: int) -> list[int]:
        """At start: the heads still in flight, oldest first.  A fresh
        region (version 0) is initialised and has none; a put that was cut
        short (the region's used_idx behind the ring's) is completed.

        Raises:
            VirtqueueError: a last batch head beyond the region.
        """
        if self.fresh():
            self._set_u16(self._VERSION, 1)
            self._set_u16(2 + 8, self.desc_num)  # desc_num
            return []
        if self.used_idx != used_idx:
            last = self._u16(self._LAST_BATCH_HEAD)
            if last >= self.desc_num:
                raise VirtqueueError(f"inflight last batch head {last} beyond {self.desc_num}")
            self.buf[self.offset + 16 + 16 * last] = 0
            _fence()
            self._set_u16(self._USED_IDX, used_idx)
        heads = [i for i in range(self.desc_num) if self.is_inflight(i)]
        heads.sort(key=self.counter)
        return heads


class SplitQueue:
    """The device's view of one split virtqueue.

    ``desc_addr``, ``avail_addr`` and ``used_addr`` are front-end (user)
    addresses as SET_VRING_ADDR gives them; ``last_avail_idx`` is
    SET_VRING_BASE's.  The next used index is read from the used ring, as
    the specification of SET_VRING_BASE says.

    Raises (constructor and :meth:`remap`):
        VirtqueueError: a size that is not a power of two up to 32768, or
            a ring that does not lie inside one memory region.
    """

    def __init__(self, mem: GuestMemory, *, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, last_avail_idx: int = 0, event_idx: bool = False,
                 indirect: bool = True, notify_on_empty: bool = False):
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"invalid queue size {size}")
        if sys.byteorder != "little":
            raise VirtqueueError("split virtqueues need a little-endian host")
        self.mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.notify_on_empty = notify_on_empty
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # chains popped and not yet pushed
        self.inuse = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.inflight: InflightSplit | None = None
        # order of chains taken, kept in the inflight region
        self.counter = 0
        self.remap()
        self.used_idx: int = self._used16[1]

    def remap(self) -> None:
        """Translate the ring addresses again (after the memory table
        changed)."""
        n = self.size
        mem = self.mem
        try:
            desc, desc_off = mem.uva_region(self.desc_addr, 16 * n)
            avail, avail_off = mem.uva_region(self.avail_addr, 6 + 2 * n)
            used, used_off = mem.uva_region(self.used_addr, 6 + 8 * n)
            # the rings are read and written through views of exactly their
            # size, checked here once (a struct call each, not a bounds
            # check and two method calls per field); a mapping replaced
            # meanwhile stays mapped (the views hold it) until remap()
            self._desc_table = desc.view(desc_off, 16 * n)
            self._avail_ring = avail.view(avail_off, 6 + 2 * n)
            self._used_ring = used.view(used_off, 6 + 8 * n)
        except GuestMemoryError as e:
            raise VirtqueueError(f"invalid vring address: {e}") from None
        if self._used_ring.readonly:
            # (a VDUSE IOTLB range the device may only read)
            raise VirtqueueError("invalid vring address: the used ring is read-only")
        # the 16-bit fields, each one load or store (the note on ring
        # indices at the top): flags [0], idx
        # [1], then the available ring's entries [2:2 + n] and used_event
        # [2 + n]; the used ring's avail_event [2 + 4 * n]
        self._avail16 = self._avail_ring.cast("H")
        self._used16 = self._used_ring.cast("H")
        self._used_event_at = 2 + n
        self._avail_event_at = 2 + 4 * n
        # where _walk_in_order found the last indirect table's buffers
        self._region = mem.regions[0] if mem.regions else None

    # -- ring fields -----------------------------------------------------------------
    def avail_idx(self) -> int:
        return int(self._avail16[1])

    def avail_flags(self) -> int:
        return int(self._avail16[0])

    def used_event(self) -> int:
        return int(self._avail16[self._used_event_at])

    def _set_avail_event(self, value: int) -> None:
        self._used16[self._avail_event_at] = value

    def is_empty(self) -> bool:
        return self.avail_idx() == self.last_avail_idx

    def set_notification(self, enable: bool) -> None:
        """Ask the driver to kick (or not) when it adds buffers: with event
        index, by publishing the next index we will read; without, with the
        used ring's NO_NOTIFY flag."""
        if self.event_idx:
            if enable:
                self._set_avail_event(self.avail_idx())
        else:
            flags = self._used16[0]
            flags = flags & ~VRING_USED_F_NO_NOTIFY if enable else flags | VRING_USED_F_NO_NOTIFY
            self._used16[0] = flags

    # -- popping ---------------------------------------------------------------------------
    def pop(self) -> Chain | None:
        """The next available chain, or None when the ring is empty.

        Raises:
            VirtqueueError: the driver broke the ring (see the module's
                docstring); the queue's state is then unspecified.
        """
        ring = self._avail16
        last = self.last_avail_idx
        size = self.size
        avail = ring[1]
        pending = (avail - last) & 0xFFFF
        if pending > size:
            raise VirtqueueError(f"guest moved the available index from {last} to {avail}")
        if pending == 0:
            if not self.event_idx:
                return None
            # ask for a kick at the next entry, then look again: an
            # entry made available before the driver could see our
            # request would otherwise wait for a kick that never comes
            self._set_avail_event(last)
            _fence()
            avail = ring[1]
            pending = (avail - last) & 0xFFFF
            if pending == 0:
                return None
            if pending > size:
                raise VirtqueueError(f"guest moved the available index from {last} to {avail}")
        head = ring[2 + last % size]
        if head >= size:
            raise VirtqueueError(f"guest says index {head} is available (queue size {size})")
        try:
            chain = self._walk(head)
        except GuestMemoryError as e:
            raise VirtqueueError(str(e)) from None
        if self.inflight is not None:
            self.inflight.get(head, self.counter)
            self.counter += 1
        self.last_avail_idx = last = (last + 1) & 0xFFFF
        if self.event_idx:
            self._used16[self._avail_event_at] = last
        self.inuse += 1
        return chain

    def _walk(self, head: int) -> Chain:
        """The chain starting at descriptor ``head`` of the ring's table,
        or of the indirect table that descriptor points at.  Each
        descriptor is read once, straight from guest memory (an indirect
        table all at once: a Linux guest's 1 MiB fio request came as 18 or
        19, its buffer cut at the block layer's 64 KiB max_segment_size;
        the table's bounds were checked when it was mapped); buffers that
        continue one another in the same region are one segment (those 19
        made 2 to 4)."""
        table = self._desc_table
        limit = self.size
        addr, length, flags, nxt = _unpack_desc(table, 16 * head)
        descs: list[tuple[int, int, int, int]] | None = None
        if flags & VRING_DESC_F_INDIRECT:
            if not self.indirect:
                raise VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            if flags & VRING_DESC_F_NEXT:
                raise VirtqueueError("indirect descriptor with the NEXT flag")
            if length == 0 or length % 16:
                raise VirtqueueError(f"invalid size {length} for an indirect table")
            limit = length // 16
            if limit > 0xFFFF + 1:
                raise VirtqueueError(f"indirect table of {limit} descriptors")
            region = self._region
            try:
                if region is None or not (
                        0 <= (offset := addr - region.guest_addr) <= region.size - length):
                    region, offset = self.mem.gpa_region(addr, length)
                raw = region.view(offset, length)
            except GuestMemoryError as e:
                raise VirtqueueError(f"indirect table: {e}") from None
            if IN_ORDER_MIN <= limit <= MAX_CHAIN_BUFFERS:
                chain = self._walk_in_order(head, raw, limit)
                if chain is not None:
                    return chain
            descs = list(_DESC.iter_unpack(raw))
            addr, length, flags, nxt = descs[0]
        readable: list[Segment] = []
        writable: list[Segment] = []
        gpa_segments = self.mem.gpa_segments
        # the region of the last buffer: a chain's buffers are nearly always
        # in one, found here without asking gpa_segments (regions never
        # overlap, so it is the region gpa_segments would give)
        last: Any = None
        last_gpa = last_size = 0
        seen = buffers = 0
        while True:
            seen += 1
            if seen > limit:
                raise VirtqueueError("looped descriptor chain")
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtqueueError("indirect descriptor inside a chain or an indirect table")
            if length:
                if flags & VRING_DESC_F_WRITE:
                    out = writable
                else:
                    if writable:
                        raise VirtqueueError("device-readable descriptor after a device-writable one")
                    out = readable
                pos = addr - last_gpa
                if last is not None and 0 <= pos and pos + length <= last_size:
                    segs: list[Segment] | tuple[Segment] = ((last, pos, length),)
                else:
                    try:
                        segs = gpa_segments(addr, length)
                    except GuestMemoryError as e:
                        raise VirtqueueError(f"invalid address for buffers: {e}") from None
                    last = segs[-1][0]
                    last_gpa, last_size = last.guest_addr, last.size
                buffers += len(segs)
                if buffers > MAX_CHAIN_BUFFERS:
                    raise VirtqueueError(f"more than {MAX_CHAIN_BUFFERS} buffers in a chain")
                for seg in segs:
                    if out:
                        r, off, n = out[-1]
                        if r is seg[0] and off + n == seg[1]:
                            # a guest's large buffer, cut into descriptors of
                            # at most max_segment_size: one view, one iovec
                            out[-1] = (r, off, n + seg[2])
                            continue
                    out.append(seg)
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= limit:
                raise VirtqueueError(f"descriptor next index {nxt} beyond {limit}")
            if descs is None:
                addr, length, flags, nxt = _unpack_desc(table, 16 * nxt)
            else:
                addr, length, flags, nxt = descs[nxt]
        return Chain(head, tuple(readable), tuple(writable))

    def _walk_in_order(self, head: int, raw: memoryview, limit: int) -> Chain | None:
        """_walk of an indirect table laid out as Linux's virtio driver
        lays it out, checked and translated a table at a time instead of a
        descriptor at a time: every descriptor chained to the next one,
        device-readable ones first, none empty, all in one region.  None
        when the table is not so (_walk then takes it descriptor by
        descriptor, and words what is wrong with it)."""
        table = _TABLES.get(limit)
        if table is None:
            table = _TABLES[limit] = (struct.Struct("<" + "QIHH" * limit),
                                      tuple(range(1, limit)))
        layout, in_order = table
        flat = layout.unpack_from(raw)
        if flat[3:-4:4] != in_order:
            return None
        flags = flat[2::4]
        n_read = flags.count(VRING_DESC_F_NEXT)
        last = flags[-1]
        if last == VRING_DESC_F_WRITE:
            # NEXT n_read times, then NEXT|WRITE up to the last one
            if (flags[:n_read].count(VRING_DESC_F_NEXT) != n_read
                    or flags.count(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) != limit - 1 - n_read):
                return None
        elif last or n_read != limit - 1:
            return None  # a device-readable descriptor after device-writable ones, or else
        else:
            n_read = limit
        addrs = flat[0::4]
        lens = flat[1::4]
        if 0 in lens:
            return None
        ends = list(map(add, addrs, lens))
        # the region of the last table's buffers first: guest RAM is nearly
        # always one region (regions never overlap: it is the one
        # gpa_region would give)
        region = self._region
        lo = min(addrs)
        hi = max(ends)
        if region is None or lo < region.guest_addr or hi > region.guest_addr + region.size:
            try:
                region, _ = self.mem.gpa_region(lo, hi - lo)
            except GuestMemoryError:
                return None
            self._region = region
        base = region.guest_addr
        # where a buffer does not continue the one before it, a segment starts
        starts = list(compress(range(1, limit), map(ne, ends, addrs[1:])))
        if len(starts) == limit - 1:
            # none continues another (a guest's scattered pages): as they are
            offsets = tuple(map(sub, addrs, repeat(base)))
            segs = tuple(zip(repeat(region), offsets, lens))
            return Chain(head, segs[:n_read], segs[n_read:], (region, offsets, lens))
        # a guest's large buffer, cut into descriptors of at most
        # max_segment_size: one segment, one iovec
        if 0 < n_read < limit and n_read not in starts:
            starts.append(n_read)  # the device-writable part starts a segment
            starts.sort()
        starts.insert(0, 0)
        starts.append(limit)
        segs = tuple([(region, addrs[a] - base, ends[b - 1] - addrs[a])
                      for a, b in pairwise(starts)])
        if n_read == limit:
            return Chain(head, segs, ())
        split = starts.index(n_read)
        return Chain(head, segs[:split], segs[split:])

    # -- pushing ---------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written
        into its device-writable buffers, and publish the new used index.

        Raises:
            VirtqueueError: a head outside the table.
        """
        if not 0 <= head < self.size:
            raise VirtqueueError(f"used head {head} beyond queue size {self.size}")
        inflight = self.inflight
        if inflight is not None:
            inflight.pre_put(head)
        idx = self.used_idx
        _pack_used(self._used_ring, 4 + 8 * (idx % self.size), head, written)
        # the element is in memory before the index that publishes it
        # (stores are not reordered with other stores on x86-64; the
        # index store is a separate later write, one 16-bit store)
        self.used_idx = idx = (idx + 1) & 0xFFFF
        self._used16[1] = idx
        if inflight is not None:
            inflight.post_put(head, idx)
        if self.inuse:
            self.inuse -= 1

    def attach_inflight(self, inflight: InflightSplit) -> list[Chain]:
        """Track chains in ``inflight`` from now on, and return the chains
        a previous back-end took and never used, oldest first, to be
        processed again.  The next chain to take is then the one after
        them (the used index plus their number), whatever SET_VRING_BASE
        said: a front-end that lost its back-end sets the base to the used
        index.

        Raises:
            VirtqueueError: a recorded head beyond the queue, or a chain
                that no longer walks.
        """
        self.used_idx = self._used16[1]
        fresh = inflight.fresh()
        heads = inflight.recover(self.used_idx)
        self.inflight = inflight
        if fresh:
            return []
        chains = []
        for head in heads:
            if head >= self.size:
                raise VirtqueueError(f"inflight head {head} beyond queue size {self.size}")
            try:
                chains.append(self._walk(head))
            except GuestMemoryError as e:
                raise VirtqueueError(str(e)) from None
        if heads:
            self.counter = inflight.counter(heads[-1]) + 1
        self.last_avail_idx = (self.used_idx + len(heads)) & 0xFFFF
        self.inuse = len(heads)
        return chains

    def notify_needed(self) -> bool:
        """Whether the driver wants a used-buffer notification (the call
        eventfd) now, given what was pushed since the last one.  Call it
        after a batch of :meth:`push`; it records that the driver was
        notified up to the current used index.  (The rings are views
        that hold their mapping: nothing here raises.)
        """
        _fence()  # the used index is out before the driver's flags are read
        if self.notify_on_empty and self.inuse == 0 and self.is_empty():
            return True
        if not self.event_idx:
            return not self.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT
        valid = self.signalled_used_valid
        old = self.signalled_used
        new = self.signalled_used = self.used_idx
        self.signalled_used_valid = True
        if not valid:
            return True
        event = self._avail16[self._used_event_at]
        # vring_need_event
        return bool((new - event - 1) & 0xFFFF < (new - old) & 0xFFFF)
