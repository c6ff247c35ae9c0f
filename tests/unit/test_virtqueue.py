"""Split virtqueues and guest memory: rings built in a memfd as a driver
would (the layout written here with struct from the virtio specification),
walked by the device side; and fuzzed with random descriptor tables."""

import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.exports.virtio import memory as M
from qsd_trio.exports.virtio import virtqueue as Q
from qsd_trio.proto.vhost_user import MemRegion

GUEST_BASE = 0x100000
USER_BASE = 0x7F0000000000
NEXT, WRITE, INDIRECT = 1, 2, 4


class GuestRam:
    """A memfd standing for guest RAM, mapped here as the front-end maps it.
    ``pad`` bytes before and after the region stay in the file but outside
    the region the device is given."""

    def __init__(self, size=256 * 1024, pad=0):
        self.size = size
        self.pad = pad
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, size + 2 * pad)
        self.mm = mmap.mmap(self.fd, size + 2 * pad)
        self.mm[:] = b"\xa5" * len(self.mm)
        self.mm[pad:pad + size] = bytes(size)
        self.region = MemRegion(GUEST_BASE, size, USER_BASE, pad)

    def memory(self):
        mem = M.GuestMemory()
        mem.set_table([self.region], [self.fd])
        return mem

    def gpa(self, off):
        return GUEST_BASE + off

    def uva(self, off):
        return USER_BASE + off

    def put(self, off, data):
        self.mm[self.pad + off:self.pad + off + len(data)] = data

    def get(self, off, n):
        return bytes(self.mm[self.pad + off:self.pad + off + n])

    def outside_untouched(self):
        p = self.pad
        return self.mm[:p] == b"\xa5" * p and self.mm[p + self.size:] == b"\xa5" * p

    def close(self):
        self.mm.close()
        os.close(self.fd)


class Driver:
    """The driver's side of one split ring in GuestRam: descriptor table at
    0, available ring after it, used ring 4-aligned after that, and a bump
    allocator for buffers from ``data_start``."""

    def __init__(self, ram, size=8, data_start=0x4000):
        self.ram = ram
        self.size = size
        self.desc = 0
        self.avail = 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        assert self.used + 6 + 8 * size <= data_start
        self.next_data = data_start
        self.next_desc = 0
        self.avail_idx = 0

    def queue(self, mem, **kw):
        return Q.SplitQueue(mem, size=self.size, desc_addr=self.ram.uva(self.desc),
                            avail_addr=self.ram.uva(self.avail),
                            used_addr=self.ram.uva(self.used), **kw)

    def alloc(self, n, gap=0):
        off = self.next_data
        self.next_data += ((n + 15) & ~15) + gap
        return off

    def write_desc(self, table_off, i, addr, length, flags, nxt):
        self.ram.put(table_off + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def buffers(self, bufs, gap=0):
        """(data bytes, writable) or (length, writable) -> [(gpa, len, flags, off)],
        each buffer 16-aligned right after the previous one, or ``gap``
        bytes further."""
        out = []
        for data, writable in bufs:
            n = data if isinstance(data, int) else len(data)
            off = self.alloc(n, gap)
            if not isinstance(data, int):
                self.ram.put(off, data)
            out.append((self.ram.gpa(off), n, WRITE if writable else 0, off))
        return out

    def add(self, bufs, *, indirect=False, gap=0):
        """Make a chain available; returns (head, [buffer offsets])."""
        descs = self.buffers(bufs, gap)
        head = self.next_desc
        if indirect:
            table = self.alloc(16 * len(descs))
            for i, (addr, n, flags, _) in enumerate(descs):
                last = i == len(descs) - 1
                self.write_desc(table, i, addr, n, flags | (0 if last else NEXT), 0 if last else i + 1)
            self.write_desc(self.desc, head, self.ram.gpa(table), 16 * len(descs), INDIRECT, 0)
            self.next_desc = (self.next_desc + 1) % self.size
        else:
            for i, (addr, n, flags, _) in enumerate(descs):
                idx = (head + i) % self.size
                last = i == len(descs) - 1
                self.write_desc(self.desc, idx, addr, n, flags | (0 if last else NEXT),
                                0 if last else (idx + 1) % self.size)
            self.next_desc = (self.next_desc + len(descs)) % self.size
        self.publish(head)
        return head, [d[3] for d in descs]

    def publish(self, head):
        self.ram.put(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.put(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self):
        return struct.unpack("<H", self.ram.get(self.used + 2, 2))[0]

    def used_elem(self, i):
        return struct.unpack("<II", self.ram.get(self.used + 4 + 8 * (i % self.size), 8))

    def avail_event(self):
        return struct.unpack("<H", self.ram.get(self.used + 4 + 8 * self.size, 2))[0]

    def set_used_event(self, v):
        self.ram.put(self.avail + 4 + 2 * self.size, struct.pack("<H", v))

    def set_avail_flags(self, v):
        self.ram.put(self.avail, struct.pack("<H", v))


@pytest.fixture
def ram():
    r = GuestRam(pad=4096)
    yield r
    r.close()


def data_of(chain, which):
    return b"".join(r.read(off, n) for r, off, n in getattr(chain, which))


def test_pop_direct_chain_and_push(ram):
    mem = ram.memory()
    drv = Driver(ram)
    q = drv.queue(mem)
    assert q.pop() is None
    head, offs = drv.add([(b"request!", False), (b"more", False), (512, True), (1, True)])
    chain = q.pop()
    assert chain.head == head
    assert data_of(chain, "readable") == b"request!more"
    assert chain.writable_len == 513
    # write into the device-writable buffers: they are the driver's buffers
    r, off, n = chain.writable[0]
    r.write(off, b"x" * n)
    assert ram.get(offs[2], 512) == b"x" * 512
    assert q.pop() is None
    q.push(chain.head, 513)
    assert drv.used_idx() == 1 and drv.used_elem(0) == (head, 513)
    assert ram.outside_untouched()
    mem.close()


def test_indirect_chain(ram):
    mem = ram.memory()
    drv = Driver(ram)
    q = drv.queue(mem)
    head, _ = drv.add([(b"hdr", False), (b"data", False), (16, True)], indirect=True)
    chain = q.pop()
    assert chain.head == head
    assert data_of(chain, "readable") == b"hdrdata" and chain.writable_len == 16
    q2 = drv.queue(mem, indirect=False, last_avail_idx=0)
    with pytest.raises(Q.VirtqueueError, match="INDIRECT_DESC"):
        q2.pop()
    mem.close()


@pytest.mark.parametrize("indirect", [False, True])
def test_buffers_that_continue_one_another_are_one_segment(ram, indirect):
    """A guest's large buffer comes cut into descriptors (of at most its
    max_segment_size); the walk gives it back as one segment, while the
    device-readable and device-writable sides stay apart."""
    mem = ram.memory()
    drv = Driver(ram, size=16)
    q = drv.queue(mem)
    _, offs = drv.add([(b"h" * 16, False), (b"a" * 64, False), (b"b" * 64, False),
                       (64, True), (64, True)], indirect=indirect)
    chain = q.pop()
    assert [(off, n) for _, off, n in chain.readable] == [(offs[0], 16 + 128)]
    assert [(off, n) for _, off, n in chain.writable] == [(offs[3], 128)]
    assert data_of(chain, "readable") == b"h" * 16 + b"a" * 64 + b"b" * 64
    _, offs = drv.add([(b"h" * 16, False), (b"a" * 64, False), (64, True), (64, True)],
                      indirect=indirect, gap=16)
    chain = q.pop()
    assert [(off, n) for _, off, n in chain.readable] == [(offs[0], 16), (offs[1], 64)]
    assert [(off, n) for _, off, n in chain.writable] == [(offs[2], 64), (offs[3], 64)]
    mem.close()


def test_used_index_and_base_come_from_the_ring(ram):
    mem = ram.memory()
    drv = Driver(ram)
    for _ in range(3):
        drv.add([(b"a", False), (1, True)])
    ram.put(drv.used + 2, struct.pack("<H", 2))
    q = drv.queue(mem, last_avail_idx=2)
    assert q.used_idx == 2
    chain = q.pop()
    assert chain is not None and q.pop() is None
    q.push(chain.head, 1)
    assert drv.used_idx() == 3 and drv.used_elem(2)[0] == chain.head
    mem.close()


def test_used_index_is_never_seen_half_written(ram):
    # A driver on another CPU reads the used index while the device
    # publishes it.  Written with struct.pack_into (which zero-fills the
    # field, then stores the value), it read 0 for a moment: the guest's kernel
    # took the entries after its last one for new ones, pushed a ring's
    # length earlier ("virtio_blk: id 1 is not a head!").  A child process
    # reads the index as a driver does (one 16-bit load) while this one
    # pushes.
    mem = ram.memory()
    drv = Driver(ram)
    q = drv.queue(mem)
    ram.mm[0] = 0  # in the pad before the region: 1 once the pushes are done
    at = ram.pad + drv.used + 2
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            idx = memoryview(ram.mm)[at:at + 2].cast("H")
            flag = ram.mm
            torn = 0
            prev = idx[0]
            os.write(w, b"r")
            while not flag[0]:
                for _ in range(1000):
                    v = idx[0]
                    # backwards, to 0 or to the high byte alone: a store
                    # seen half done (the child was not merely descheduled
                    # for half the index space)
                    if (v - prev) & 0xFFFF >= 0x8000 and v in (0, prev & 0xFF00):
                        torn += 1
                    prev = v
            os.write(w, str(torn).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"r"
        for _ in range(200):
            for _ in range(1024):
                q.push(0, 1)
        ram.mm[0] = 1
        report = os.read(r, 32)
    finally:
        os.waitpid(pid, 0)
        os.close(r)
    assert report == b"0", f"the child saw a half-written used index {report.decode()} times"
    assert drv.used_idx() == 200 * 1024 % 0x10000
    mem.close()


def test_wraparound_of_free_running_indices(ram):
    mem = ram.memory()
    drv = Driver(ram, size=4)
    drv.avail_idx = 0xFFFE
    ram.put(drv.avail + 2, struct.pack("<H", 0xFFFE))
    ram.put(drv.used + 2, struct.pack("<H", 0xFFFE))
    q = drv.queue(mem, last_avail_idx=0xFFFE)
    heads = [drv.add([(b"r", False), (1, True)])[0] for _ in range(4)]
    got = []
    while (c := q.pop()) is not None:
        got.append(c.head)
        q.push(c.head, 1)
    assert got == heads and drv.used_idx() == 2
    mem.close()


def test_event_idx_publishes_avail_event_and_decides_calls(ram):
    mem = ram.memory()
    drv = Driver(ram)
    q = drv.queue(mem, event_idx=True)
    assert q.pop() is None and drv.avail_event() == 0
    drv.add([(b"a", False), (1, True)])
    drv.add([(b"b", False), (1, True)])
    c1 = q.pop()
    assert drv.avail_event() == 1
    c2 = q.pop()
    assert drv.avail_event() == 2
    drv.set_used_event(0)
    q.push(c1.head, 1)
    assert q.notify_needed()  # first notification always goes out
    q.push(c2.head, 1)
    # the driver asked to be told once entry 0 is used: used went 1 -> 2
    assert not q.notify_needed()
    drv.add([(b"c", False), (1, True)])
    c3 = q.pop()
    drv.set_used_event(2)
    q.push(c3.head, 1)
    assert q.notify_needed()
    mem.close()


def test_no_interrupt_flag_without_event_idx(ram):
    mem = ram.memory()
    drv = Driver(ram)
    q = drv.queue(mem)
    drv.add([(b"a", False), (1, True)])
    c = q.pop()
    q.push(c.head, 1)
    assert q.notify_needed()
    drv.set_avail_flags(Q.VRING_AVAIL_F_NO_INTERRUPT)
    assert not q.notify_needed()
    q.set_notification(False)
    assert struct.unpack("<H", ram.get(drv.used, 2))[0] == Q.VRING_USED_F_NO_NOTIFY
    q.set_notification(True)
    assert struct.unpack("<H", ram.get(drv.used, 2))[0] == 0
    mem.close()


def test_vring_need_event():
    assert Q.vring_need_event(0, 1, 0)
    assert not Q.vring_need_event(5, 3, 2)
    assert Q.vring_need_event(0xFFFF, 0, 0xFFFE)
    assert Q.vring_need_event(4, 10, 2)


@pytest.mark.parametrize(("case", "match"), [
    ("loop", "looped"), ("next-beyond", "next index 8 beyond 8"),
    ("head-beyond", "index 9 is available"), ("avail-jump", "from 0 to 9"),
    ("outside", "invalid address for buffers"), ("indirect-size", "invalid size 24"),
    ("nested-indirect", "indirect descriptor inside"), ("indirect-next", "NEXT flag"),
    ("order", "readable descriptor after a device-writable"),
    ("indirect-outside", "indirect table: guest range"),
    ("partly-outside", "invalid address for buffers"),
])
def test_broken_rings_are_virtqueue_errors(ram, case, match):
    mem = ram.memory()
    drv = Driver(ram, size=8)
    q = drv.queue(mem)
    gpa = ram.gpa(0x8000)
    w = drv.write_desc
    if case == "loop":
        w(0, 0, gpa, 4, NEXT, 1)
        w(0, 1, gpa, 4, NEXT, 0)
        drv.publish(0)
    elif case == "next-beyond":
        w(0, 0, gpa, 4, NEXT, 8)
        drv.publish(0)
    elif case == "head-beyond":
        drv.publish(9)
    elif case == "avail-jump":
        ram.put(drv.avail + 2, struct.pack("<H", 9))
    elif case == "outside":
        w(0, 0, GUEST_BASE + ram.size, 1, 0, 0)
        drv.publish(0)
    elif case == "partly-outside":
        w(0, 0, GUEST_BASE + ram.size - 10, 11, WRITE, 0)
        drv.publish(0)
    elif case == "indirect-size":
        w(0, 0, gpa, 24, INDIRECT, 0)
        drv.publish(0)
    elif case == "nested-indirect":
        table = 0x9000
        w(table, 0, gpa, 16, INDIRECT, 0)
        w(0, 0, ram.gpa(table), 16, INDIRECT, 0)
        drv.publish(0)
    elif case == "indirect-next":
        w(0, 0, ram.gpa(0x9000), 16, INDIRECT | NEXT, 1)
        drv.publish(0)
    elif case == "order":
        w(0, 0, gpa, 4, WRITE | NEXT, 1)
        w(0, 1, gpa, 4, 0, 0)
        drv.publish(0)
    elif case == "indirect-outside":
        w(0, 0, GUEST_BASE + ram.size - 16, 32, INDIRECT, 0)
        drv.publish(0)
    with pytest.raises(Q.VirtqueueError, match=match):
        q.pop()
    assert ram.outside_untouched()
    mem.close()


def test_bad_ring_addresses_and_sizes(ram):
    mem = ram.memory()
    with pytest.raises(Q.VirtqueueError, match="queue size"):
        Q.SplitQueue(mem, size=6, desc_addr=USER_BASE, avail_addr=USER_BASE, used_addr=USER_BASE)
    with pytest.raises(Q.VirtqueueError, match="vring address"):
        Q.SplitQueue(mem, size=8, desc_addr=USER_BASE + ram.size - 64, avail_addr=USER_BASE,
                     used_addr=USER_BASE)
    with pytest.raises(Q.VirtqueueError, match="vring address"):
        Q.SplitQueue(mem, size=8, desc_addr=GUEST_BASE, avail_addr=USER_BASE, used_addr=USER_BASE)
    with pytest.raises(Q.VirtqueueError, match="head 8"):
        Driver(ram).queue(mem).push(8, 0)
    mem.close()


def test_used_ring_in_read_only_memory_is_refused(ram):
    # a VDUSE IOTLB range the device may only read: the rings are written
    # through views of the mapping, which such a range gives read-only; the
    # queue is refused as a broken ring at setup, not a TypeError at a push
    from qsd_trio.exports.vduse_blk import IotlbRegion

    mem = M.GuestMemory()
    mem.regions.append(IotlbRegion(ram.fd, ram.pad, GUEST_BASE, GUEST_BASE + ram.size - 1, 1))
    drv = Driver(ram)
    with pytest.raises(Q.VirtqueueError, match="read-only"):
        Q.SplitQueue(mem, size=drv.size, desc_addr=GUEST_BASE + drv.desc,
                     avail_addr=GUEST_BASE + drv.avail, used_addr=GUEST_BASE + drv.used)
    mem.close()


def test_buffer_across_adjacent_regions():
    a, b = GuestRam(size=0x10000), GuestRam(size=0x10000)
    mem = M.GuestMemory()
    mem.set_table([MemRegion(GUEST_BASE, 0x10000, USER_BASE, 0),
                   MemRegion(GUEST_BASE + 0x10000, 0x10000, USER_BASE + 0x10000, 0)], [a.fd, b.fd])
    a.put(0x10000 - 3, b"abc")
    b.put(0, b"def")
    segs = mem.gpa_segments(GUEST_BASE + 0x10000 - 3, 6)
    assert len(segs) == 2
    assert mem.read_gpa(GUEST_BASE + 0x10000 - 3, 6) == b"abcdef"
    mem.write_gpa(GUEST_BASE + 0x10000 - 1, b"XY")
    assert a.get(0x10000 - 1, 1) == b"X" and b.get(0, 1) == b"Y"
    with pytest.raises(M.GuestMemoryError):
        mem.read_gpa(GUEST_BASE + 0x20000 - 1, 2)
    # a ring may not cross regions
    with pytest.raises(M.GuestMemoryError):
        mem.uva_region(USER_BASE + 0x10000 - 8, 16)
    mem.close()
    a.close()
    b.close()


def test_memory_table_checks():
    ram = GuestRam(size=0x10000)
    mem = M.GuestMemory(max_regions=2)
    # a region beyond the end of its file is refused (touching it would fault)
    with pytest.raises(M.GuestMemoryError, match="beyond its file"):
        mem.set_table([MemRegion(0, 0x20000, USER_BASE, 0)], [ram.fd])
    with pytest.raises(M.GuestMemoryError, match="beyond its file"):
        mem.add_region(MemRegion(0, 0x10000, USER_BASE, 4096), ram.fd)
    r, w = os.pipe()
    with pytest.raises(M.GuestMemoryError, match="regular file"):
        mem.add_region(MemRegion(0, 0x1000, USER_BASE, 0), r)
    os.close(r)
    os.close(w)
    with pytest.raises(M.GuestMemoryError, match="overlaps"):
        mem.set_table([MemRegion(0, 0x8000, USER_BASE, 0), MemRegion(0x4000, 0x1000, USER_BASE, 0)],
                      [ram.fd, ram.fd])
    mem.add_region(MemRegion(0, 0x8000, USER_BASE, 0), ram.fd)
    mem.add_region(MemRegion(0x8000, 0x8000, USER_BASE + 0x8000, 0x8000), ram.fd)
    with pytest.raises(M.GuestMemoryError, match="no free memory slot"):
        mem.add_region(MemRegion(0x10000, 0x1000, USER_BASE, 0), ram.fd)
    region, off = mem.gpa_region(0x8010, 4)
    mem.remove_region(MemRegion(0x8000, 0x8000, USER_BASE + 0x8000, 0))
    with pytest.raises(M.GuestMemoryError, match="unmapped"):
        region.read(off, 4)
    with pytest.raises(M.GuestMemoryError):
        mem.read_gpa(0x8010, 4)
    with pytest.raises(M.GuestMemoryError, match="no memory region"):
        mem.remove_region(MemRegion(0x8000, 0x8000, USER_BASE + 0x8000, 0))
    # a view held while the region goes away: unmapped once released
    region, off = mem.gpa_region(0, 16)
    view = region.view(off, 16)
    mem.close()
    view[:4] = b"live"
    view.release()
    assert ram.get(0, 4) == b"live"
    ram.close()


# -- fuzzing ------------------------------------------------------------------------
_desc = st.tuples(
    st.one_of(st.integers(0, 2**64 - 1), st.integers(GUEST_BASE - 64, GUEST_BASE + 0x20000)),
    st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 4096), st.sampled_from([16, 32, 48, 160])),
    st.integers(0, 7),
    st.integers(0, 20),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(_desc, min_size=8, max_size=8),
       indirect_table=st.lists(_desc, min_size=0, max_size=10),
       heads=st.lists(st.integers(0, 10), min_size=1, max_size=8),
       avail_idx=st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),
       event_idx=st.booleans())
def test_fuzz_ring_walker(descs, indirect_table, heads, avail_idx, event_idx):
    ram = GuestRam(size=0x20000, pad=4096)
    try:
        mem = ram.memory()
        drv = Driver(ram, size=8)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            drv.write_desc(0, i, addr, length, flags, nxt)
        # an indirect table the descriptors may point at (GUEST_BASE + 0x8000)
        for i, (addr, length, flags, nxt) in enumerate(indirect_table):
            drv.write_desc(0x8000, i, addr, length, flags, nxt)
        for i, h in enumerate(heads):
            ram.put(drv.avail + 4 + 2 * i, struct.pack("<H", h))
        ram.put(drv.avail + 2, struct.pack("<H", avail_idx))
        q = drv.queue(mem, event_idx=event_idx)
        for _ in range(10):
            try:
                chain = q.pop()
            except Q.VirtqueueError:
                break
            if chain is None:
                break
            for r, off, n in chain.readable + chain.writable:
                assert 0 <= off and n > 0 and off + n <= r.size
            # the device writes all it may, then returns the chain
            for r, off, n in chain.writable:
                r.write(off, b"\xee" * n)
            q.push(chain.head, chain.writable_len)
            q.notify_needed()
        assert ram.outside_untouched()
        mem.close()
    finally:
        ram.close()


# one descriptor of an indirect table: where its buffer is (right after the
# previous one, anywhere, across the two regions' border, outside guest
# memory), its length, whether it is device-writable, and flags to add
_in_order_desc = st.tuples(
    st.one_of(st.just("after"), st.just("border"), st.just(-1),
              st.integers(0x9000, 0x1F000)),
    st.one_of(st.sampled_from([0, 1, 16, 512, 4096]), st.integers(0, 0x2000)),
    st.booleans(),
    st.sampled_from([0, 0, 0, 0, 0, NEXT, INDIRECT]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(_in_order_desc, min_size=1, max_size=Q.IN_ORDER_MIN + 8),
       sort=st.booleans())
def test_indirect_table_at_once_equals_descriptor_by_descriptor(descs, sort):
    """The walk takes an indirect table laid out as Linux lays it out (in
    order, device-readable first, none empty, all in one region) at once
    (SplitQueue._walk_in_order); the result must be what the walk gives
    for the same descriptors one by one (here: the same chain made direct),
    and every table of that layout must be taken at once."""
    ram = GuestRam(size=0x20000, pad=4096)
    mem = M.GuestMemory()
    # two regions, adjacent in guest memory, over the one file
    mem.set_table([MemRegion(GUEST_BASE, 0x10000, USER_BASE, 4096),
                   MemRegion(GUEST_BASE + 0x10000, 0x10000, USER_BASE + 0x10000, 4096 + 0x10000)],
                  [ram.fd, ram.fd])
    try:
        if sort:  # device-readable first, as a driver must
            descs = sorted(descs, key=lambda d: d[2])
        drv = Driver(ram, size=64)
        table, n, end = 0x8000, len(descs), 0xA000
        shaped = True
        regions = set()
        for i, (where, length, writable, extra) in enumerate(descs):
            off = {"after": end, "border": 0x10000 - 8}.get(where, where)
            addr = 0x300000 if off == -1 else ram.gpa(off)
            end = off + length if off != -1 else 0xA000
            flags = (WRITE if writable else 0) | (NEXT if i < n - 1 else 0) | extra
            drv.write_desc(table, i, addr, length, flags, i + 1 if i < n - 1 else 0)
            # the chain made direct: descriptors 1..n of the ring's table
            drv.write_desc(0, 1 + i, addr, length, flags, 2 + i if i < n - 1 else 0)
            inside = off != -1 and off + length <= (0x10000 if off < 0x10000 else 0x20000)
            shaped &= length > 0 and extra == 0 and inside
            regions.add(off >= 0x10000)
        shaped &= len(regions) == 1 and [d[2] for d in descs] == sorted(d[2] for d in descs)
        drv.write_desc(0, 0, ram.gpa(table), 16 * n, INDIRECT, 0)
        drv.publish(0)
        drv.publish(1)
        q = drv.queue(mem)
        region, offset = mem.gpa_region(ram.gpa(table), 16 * n)
        raw = region.view(offset, 16 * n)
        fast = q._walk_in_order(0, raw, n)
        try:
            indirect: Q.Chain | str = q.pop()
        except Q.VirtqueueError as e:
            indirect = str(e)
        try:
            direct: Q.Chain | str = q.pop()
        except Q.VirtqueueError as e:
            direct = str(e)
        if isinstance(direct, Q.Chain):
            assert isinstance(indirect, Q.Chain), (indirect, descs)
            assert (indirect.readable, indirect.writable) == (direct.readable, direct.writable)
        else:
            assert isinstance(indirect, str) and fast is None, (direct, indirect, descs)
        if shaped:
            assert fast is not None and isinstance(direct, Q.Chain), descs
        if fast is not None:
            assert (fast.readable, fast.writable) == (direct.readable, direct.writable)
        mem.close()
    finally:
        ram.close()


def test_entry_published_while_the_ring_looks_empty_is_not_lost(ram):
    # the driver makes a chain available after the device saw the ring
    # empty but before it published avail_event: the device must look again
    # (the driver, seeing the old avail_event, may not kick)
    mem = ram.memory()
    drv = Driver(ram)
    q = drv.queue(mem, event_idx=True)
    publish_event = q._set_avail_event
    added = []

    def racing_driver(value):
        if not added:
            added.append(drv.add([(b"late", False), (1, True)])[0])
        publish_event(value)

    q._set_avail_event = racing_driver
    chain = q.pop()
    assert chain is not None and chain.head == added[0]
    assert drv.avail_event() == 1
    mem.close()


def inflight_desc(buf, head):
    inflight, nxt, counter = struct.unpack_from("<B5xHQ", buf, 16 + 16 * head)
    return inflight, counter


def test_inflight_tracking_and_resubmission(ram):
    mem = ram.memory()
    drv = Driver(ram, size=8)
    buf = bytearray(Q.inflight_queue_size(8))
    q = drv.queue(mem)
    # a fresh region (version 0) is initialised and has nothing to resubmit
    assert q.attach_inflight(Q.InflightSplit(buf, 0, 8)) == []
    assert struct.unpack_from("<QHHHH", buf) == (0, 1, 8, 0, 0)
    heads = [drv.add([(b"r%d" % i, False), (1, True)])[0] for i in range(3)]
    chains = [q.pop() for _ in range(3)]
    assert [inflight_desc(buf, h) for h in heads] == [(1, 0), (1, 1), (1, 2)]
    q.push(chains[1].head, 1)
    assert inflight_desc(buf, heads[1])[0] == 0
    assert struct.unpack_from("<HH", buf, 12) == (heads[1], 1)  # last_batch_head, used_idx
    # the back-end dies with chains 0 and 2 in flight; the next one
    # starts from the used index (what a front-end sets as the base)
    q2 = drv.queue(mem, last_avail_idx=1)
    again = q2.attach_inflight(Q.InflightSplit(buf, 0, 8))
    assert [c.head for c in again] == [heads[0], heads[2]]
    assert data_of(again[0], "readable") == b"r0" and data_of(again[1], "readable") == b"r2"
    assert q2.last_avail_idx == 3 and q2.counter == 3
    for c in again:
        q2.push(c.head, 1)
    assert drv.used_idx() == 3 and q2.pop() is None
    assert all(inflight_desc(buf, h)[0] == 0 for h in heads)
    mem.close()


def test_inflight_put_cut_short_is_completed(ram):
    # the back-end died between publishing the used index and clearing the
    # entry: the region's used_idx is behind the ring's, and the last
    # batch's head is not resubmitted
    mem = ram.memory()
    drv = Driver(ram, size=8)
    buf = bytearray(Q.inflight_queue_size(8))
    q = drv.queue(mem)
    q.attach_inflight(Q.InflightSplit(buf, 0, 8))
    h0 = drv.add([(b"a", False), (1, True)])[0]
    h1 = drv.add([(b"b", False), (1, True)])[0]
    c0, _c1 = q.pop(), q.pop()
    inflight = q.inflight
    q.inflight = None  # the put below leaves the region as a crash would
    inflight.pre_put(c0.head)
    q.push(c0.head, 1)
    q2 = drv.queue(mem, last_avail_idx=1)
    again = q2.attach_inflight(Q.InflightSplit(buf, 0, 8))
    assert [c.head for c in again] == [h1]
    assert inflight_desc(buf, h0)[0] == 0 and struct.unpack_from("<H", buf, 14)[0] == 1
    mem.close()


def test_unversioned_region_is_recovered_whatever_its_version(ram):
    """libvduse's reconnect log leaves the version at 0: a region read with
    versioned=False is never taken for a fresh one, so what a dead daemon
    took is run again (with versioned=True the same bytes read as fresh)."""
    mem = ram.memory()
    drv = Driver(ram, size=8)
    buf = bytearray(16 + 16 * 1024)
    q = drv.queue(mem)
    assert q.attach_inflight(Q.InflightSplit(buf, 0, 1024, versioned=False)) == []
    assert struct.unpack_from("<H", buf, 8)[0] == 0  # the version stays 0
    h0 = drv.add([(b"a", False), (1, True)])[0]
    h1 = drv.add([(b"b", False), (1, True)])[0]
    c0, _ = q.pop(), q.pop()
    q.push(c0.head, 1)
    fresh_copy = bytearray(buf)
    again = drv.queue(mem, last_avail_idx=0).attach_inflight(
        Q.InflightSplit(buf, 0, 1024, versioned=False))
    assert [c.head for c in again] == [h1] and h0 != h1
    assert drv.queue(mem).attach_inflight(Q.InflightSplit(fresh_copy, 0, 1024)) == []
    # a last batch head beyond the region is the log's fault, not a write
    # out of it
    struct.pack_into("<HH", buf, 12, 1024, 0)
    with pytest.raises(Q.VirtqueueError, match="last batch head 1024"):
        drv.queue(mem).attach_inflight(Q.InflightSplit(buf, 0, 1024, versioned=False))
    mem.close()


def test_inflight_bad_regions(ram):
    with pytest.raises(Q.VirtqueueError, match="beyond the buffer"):
        Q.InflightSplit(bytearray(100), 0, 8)
    mem = ram.memory()
    drv = Driver(ram, size=8)
    buf = bytearray(Q.inflight_queue_size(16))
    struct.pack_into("<QHHHH", buf, 0, 0, 1, 16, 0, 0)
    buf[16 + 16 * 12] = 1  # a head beyond this queue's 8 entries
    with pytest.raises(Q.VirtqueueError, match="inflight head 12"):
        drv.queue(mem).attach_inflight(Q.InflightSplit(buf, 0, 16))
    mem.close()


def test_inflight_queue_size_is_libvhost_users():
    assert Q.inflight_queue_size(128) == 2112
    assert Q.inflight_queue_size(256) == 4160
    assert all(Q.inflight_queue_size(n) >= 16 + 16 * n for n in (1, 2, 4, 1024, 32768))
