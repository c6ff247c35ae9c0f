"""virtio-blk requests on rings in a memfd, against a bytearray disk model:
each request type, its status byte and used length as QEMU 7.2's handler
gives them, the config space layout, and random requests fuzzed."""

import errno
import os
import struct
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsd_trio.exports.virtio import blk as B
from qsd_trio.exports.virtio import virtqueue as Q
from tests.unit.test_virtqueue import Driver, GuestRam

DISK = 1 << 20


class ModelDisk:
    """A BlkBackend over a bytearray; records calls, fails on demand."""

    def __init__(self, size=DISK):
        self.data = bytearray(size)
        self.calls = []
        self.fail = None

    @property
    def length(self):
        return len(self.data)

    def _check(self, op, offset, length):
        self.calls.append((op, offset, length))
        if self.fail == op:
            raise OSError(errno.EIO, "injected")
        if offset + length > len(self.data):
            raise OSError(errno.EIO, "beyond the end")

    async def read(self, offset, length):
        self._check("read", offset, length)
        return bytes(self.data[offset:offset + length])

    async def read_into(self, offset, views):
        data = await self.read(offset, sum(len(v) for v in views))
        pos = 0
        for v in views:
            v[:] = data[pos:pos + len(v)]
            pos += len(v)

    async def writev(self, offset, views, *, fua=False):
        await self.write(offset, b"".join(views), fua=fua)

    async def write(self, offset, data, *, fua=False):
        self._check("write", offset, len(data))
        self.calls[-1] = ("write", offset, len(data), fua)
        self.data[offset:offset + len(data)] = data

    async def flush(self):
        self._check("flush", 0, 0)
        if self.fail == "bug":
            raise RuntimeError("a bug in the block layer")

    async def discard(self, offset, length):
        self._check("discard", offset, length)

    def read_into_now(self, offset, views):
        return False  # no fast path: every request takes read_into()/write()

    def write_now(self, offset, mv):
        return False

    def writev_submit(self, offset, views, done):
        return False

    def readv_submit(self, offset, length, views, done):
        return False

    async def write_zeroes(self, offset, length, *, may_unmap=False):
        self._check("write_zeroes", offset, length)
        self.calls[-1] = ("write_zeroes", offset, length, may_unmap)
        self.data[offset:offset + length] = bytes(length)


def outhdr(rtype, sector=0):
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.fixture
def env():
    ram = GuestRam(size=0x40000, pad=4096)
    mem = ram.memory()
    drv = Driver(ram, size=16)
    q = drv.queue(mem)
    disk = ModelDisk()
    yield ram, drv, q, disk
    mem.close()
    ram.close()


async def run(q, handler):
    chain = q.pop()
    used = await handler.process(chain)
    q.push(chain.head, used)
    return used


async def test_write_then_read_back(env):
    ram, drv, q, disk = env
    h = B.BlkHandler(disk, writable=True)
    payload = bytes(range(256)) * 4
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 8), False), (payload[:512], False),
                       (payload[512:], False), (1, True)])
    assert await run(q, h) == 1
    assert ram.get(offs[3], 1) == bytes([B.VIRTIO_BLK_S_OK])
    assert disk.data[4096:4096 + 1024] == payload
    assert disk.calls == [("write", 4096, 1024, False)]
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (1000, True), (24, True), (1, True)])
    assert await run(q, h) == 1025
    assert ram.get(offs[1], 1000) + ram.get(offs[2], 24) == payload
    assert ram.get(offs[3], 1) == b"\0"
    assert drv.used_elem(1)[1] == 1025
    # the status may share the last buffer with data
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (513, True)], indirect=True)
    assert await run(q, h) == 513
    assert ram.get(offs[1], 513) == payload[:512] + b"\0"
    # what the export's metrics read: the bytes of the requests
    assert (h.read_bytes, h.written_bytes) == (1024 + 512, 1024)


async def test_writethrough_and_the_config_writeback_byte(env):
    ram, drv, q, disk = env
    # the writeback byte says what the cache mode is, so the driver flushes
    assert B.BlkHandler(disk, writable=True, writethrough=True).config()[B.CONFIG_WCE_OFFSET] == 0
    h = B.BlkHandler(disk, writable=True)
    assert h.config()[B.CONFIG_WCE_OFFSET] == 1
    drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 0), False), (b"x" * 512, False), (1, True)])
    await run(q, h)
    assert disk.calls[-1] == ("write", 0, 512, False)
    assert not h.write_config(B.CONFIG_WCE_OFFSET, b"\0", 1)  # migration flag: refused
    assert not h.write_config(0, b"\0" * 8, 0)  # capacity is read-only
    assert h.write_config(B.CONFIG_WCE_OFFSET, b"\0", 0)
    drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 0), False), (b"x" * 512, False), (1, True)])
    await run(q, h)
    assert disk.calls[-1] == ("write", 0, 512, True)
    assert h.write_config(B.CONFIG_WCE_OFFSET, b"\1", 0)
    assert h.config()[B.CONFIG_WCE_OFFSET] == 1
    drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 0), False), (b"x" * 512, False), (1, True)])
    await run(q, h)
    assert disk.calls[-1] == ("write", 0, 512, False)


@pytest.mark.parametrize(("rtype", "sector", "nbytes", "status"), [
    (B.VIRTIO_BLK_T_IN, DISK // 512, 512, B.VIRTIO_BLK_S_IOERR),  # beyond the end
    (B.VIRTIO_BLK_T_IN, DISK // 512 - 1, 1024, B.VIRTIO_BLK_S_IOERR),  # crosses the end
    (B.VIRTIO_BLK_T_IN, 0, 100, B.VIRTIO_BLK_S_IOERR),  # not a multiple of a sector
    (B.VIRTIO_BLK_T_IN, 2**63, 512, B.VIRTIO_BLK_S_IOERR),
    (B.VIRTIO_BLK_T_IN, DISK // 512 - 1, 512, B.VIRTIO_BLK_S_OK),  # the last sector
    (B.VIRTIO_BLK_T_IN, DISK // 512, 0, B.VIRTIO_BLK_S_OK),  # empty, at the end
    (B.VIRTIO_BLK_T_IN | B.VIRTIO_BLK_T_BARRIER, 0, 512, B.VIRTIO_BLK_S_OK),
    (B.VIRTIO_BLK_T_GET_LIFETIME, 0, 0, B.VIRTIO_BLK_S_UNSUPP),
    (B.VIRTIO_BLK_T_SECURE_ERASE, 0, 0, B.VIRTIO_BLK_S_UNSUPP),
    (2, 0, 0, B.VIRTIO_BLK_S_UNSUPP),
    (0x7FFF, 0, 0, B.VIRTIO_BLK_S_UNSUPP),
])
async def test_read_statuses(env, rtype, sector, nbytes, status):
    ram, drv, q, disk = env
    h = B.BlkHandler(disk, writable=True)
    bufs = [(outhdr(rtype, sector), False)] + ([(nbytes, True)] if nbytes else []) + [(1, True)]
    _, offs = drv.add(bufs)
    assert await run(q, h) == nbytes + 1
    assert ram.get(offs[-1], 1) == bytes([status])
    # a zero-length read still reaches the block layer, as in QEMU
    assert bool(disk.calls) == (status == B.VIRTIO_BLK_S_OK)


async def test_alignment_to_the_logical_block_size(env):
    ram, drv, q, disk = env
    h = B.BlkHandler(disk, writable=True, logical_block_size=4096)
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 1), False), (512, True), (1, True)])
    await run(q, h)
    assert ram.get(offs[-1], 1) == bytes([B.VIRTIO_BLK_S_IOERR])
    # the start must be aligned, the length only a multiple of 512 (as QEMU)
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (512, True), (1, True)])
    await run(q, h)
    assert ram.get(offs[-1], 1) == bytes([B.VIRTIO_BLK_S_OK])


async def test_read_only_export(env):
    ram, drv, q, disk = env
    h = B.BlkHandler(disk, writable=False)
    assert h.features() & 1 << B.VIRTIO_BLK_F_RO
    for bufs in ([(outhdr(B.VIRTIO_BLK_T_OUT), False), (b"y" * 512, False), (1, True)],
                 [(outhdr(B.VIRTIO_BLK_T_DISCARD), False), (struct.pack("<QII", 0, 1, 0), False), (1, True)],
                 [(outhdr(B.VIRTIO_BLK_T_WRITE_ZEROES), False), (struct.pack("<QII", 0, 1, 0), False),
                  (1, True)]):
        _, offs = drv.add(bufs)
        await run(q, h)
        assert ram.get(offs[-1], 1) == bytes([B.VIRTIO_BLK_S_IOERR])
    assert disk.calls == []
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_FLUSH), False), (1, True)])
    await run(q, h)
    assert ram.get(offs[-1], 1) == b"\0" and disk.calls == [("flush", 0, 0)]


async def test_backend_errors_are_ioerr(env):
    ram, drv, q, disk = env
    h = B.BlkHandler(disk, writable=True)
    for op, bufs in (("read", [(outhdr(B.VIRTIO_BLK_T_IN), False), (512, True), (1, True)]),
                     ("write", [(outhdr(B.VIRTIO_BLK_T_OUT), False), (b"z" * 512, False), (1, True)]),
                     ("flush", [(outhdr(B.VIRTIO_BLK_T_FLUSH), False), (1, True)]),
                     ("bug", [(outhdr(B.VIRTIO_BLK_T_FLUSH), False), (1, True)])):
        disk.fail = op
        _, offs = drv.add(bufs)
        await run(q, h)
        assert ram.get(offs[-1], 1) == bytes([B.VIRTIO_BLK_S_IOERR])


async def test_get_id(env):
    ram, drv, q, disk = env
    h = B.BlkHandler(disk, writable=True)
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_GET_ID), False), (20, True), (1, True)])
    assert await run(q, h) == 21
    assert ram.get(offs[1], 20) == b"vhost_user_blk\0" + bytes(5)
    h = B.BlkHandler(disk, writable=True, serial="a-serial-longer-than-twenty")
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_GET_ID), False), (20, True), (1, True)])
    await run(q, h)
    assert ram.get(offs[1], 20) == b"a-serial-longer-than"
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_GET_ID), False), (4, True), (1, True)])
    await run(q, h)
    assert ram.get(offs[1], 4) == b"a-se" and ram.get(offs[2], 1) == b"\0"


@pytest.mark.parametrize(("rtype", "body", "status", "call"), [
    (B.VIRTIO_BLK_T_DISCARD, struct.pack("<QII", 8, 16, 0), B.VIRTIO_BLK_S_OK, ("discard", 4096, 8192)),
    (B.VIRTIO_BLK_T_DISCARD, struct.pack("<QII", 8, 16, 1), B.VIRTIO_BLK_S_UNSUPP, None),
    (B.VIRTIO_BLK_T_DISCARD, struct.pack("<QII", 8, 16, 2), B.VIRTIO_BLK_S_UNSUPP, None),
    (B.VIRTIO_BLK_T_DISCARD, struct.pack("<QII", 8, 32769, 0), B.VIRTIO_BLK_S_IOERR, None),
    (B.VIRTIO_BLK_T_DISCARD, struct.pack("<QII", DISK // 512, 1, 0), B.VIRTIO_BLK_S_IOERR, None),
    (B.VIRTIO_BLK_T_DISCARD, struct.pack("<QII", 8, 16, 0) * 2, B.VIRTIO_BLK_S_UNSUPP, None),
    (B.VIRTIO_BLK_T_DISCARD, struct.pack("<QI", 8, 16), B.VIRTIO_BLK_S_IOERR, None),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, struct.pack("<QII", 8, 16, 0), B.VIRTIO_BLK_S_OK,
     ("write_zeroes", 4096, 8192, False)),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, struct.pack("<QII", 8, 16, 1), B.VIRTIO_BLK_S_OK,
     ("write_zeroes", 4096, 8192, True)),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, struct.pack("<QII", 8, 16, 3), B.VIRTIO_BLK_S_UNSUPP, None),
    (B.VIRTIO_BLK_T_WRITE_ZEROES, struct.pack("<QII", 0, 32768, 0), B.VIRTIO_BLK_S_IOERR, None),
])
async def test_discard_and_write_zeroes(env, rtype, body, status, call):
    ram, drv, q, disk = env
    disk.data[:] = b"\xff" * DISK
    h = B.BlkHandler(disk, writable=True)
    _, offs = drv.add([(outhdr(rtype), False), (body, False), (1, True)])
    await run(q, h)
    assert ram.get(offs[-1], 1) == bytes([status])
    assert disk.calls == ([call] if call else [])
    if call and call[0] == "write_zeroes":
        assert disk.data[4096:4096 + 8192] == bytes(8192) and disk.data[4095] == 0xFF


async def test_malformed_requests(env):
    ram, drv, q, disk = env
    h = B.BlkHandler(disk, writable=True)
    # a request header that is too short: failed with IOERR
    _, offs = drv.add([(b"\0" * 15, False), (1, True)])
    assert await run(q, h) == 1
    assert ram.get(offs[-1], 1) == bytes([B.VIRTIO_BLK_S_IOERR])
    # no device-writable byte for the status (the status "in read-only
    # memory"): returned with nothing done and used length 0
    drv.add([(outhdr(B.VIRTIO_BLK_T_OUT), False), (b"w" * 512, False), (b"\7", False)])
    assert await run(q, h) == 0
    assert disk.calls == []
    # the header split over several buffers is fine
    hdr = outhdr(B.VIRTIO_BLK_T_IN, 1)
    _, offs = drv.add([(hdr[:3], False), (hdr[3:11], False), (hdr[11:], False), (512, True), (1, True)])
    assert await run(q, h) == 513
    assert ram.get(offs[-1], 1) == b"\0" and disk.calls == [("read", 512, 512)]


def test_config_space_layout():
    disk = ModelDisk(size=64 << 20)
    h = B.BlkHandler(disk, writable=False, logical_block_size=4096, num_queues=2)
    cfg = h.config()
    assert len(cfg) == 60
    # what QEMU 7.2's qemu-storage-daemon answers for a 64 MiB image with
    # num-queues=2 and logical-block-size=4096, but for the writeback byte
    # (offset 32): 1 here, the write cache being on; QEMU answers 0
    assert cfg.hex() == (
        "0000020000000000" "00000000" "7e000000" "00000000" "00100000" "00" "00" "0100" "01000000"
        "01" "00" "0200" "00800000" "01000000" "08000000" "00800000" "01000000" "00" "000000")
    assert h.read_config(0, 8) == cfg[:8]
    assert h.read_config(0, 61) == b""
    assert h.features() == 0x100007e66 | 1 << B.VIRTIO_BLK_F_RO | 1 << 28 | 1 << 29
    assert B.BlkHandler(disk, writable=True).features() & 1 << B.VIRTIO_BLK_F_RO == 0


_buf = st.tuples(st.one_of(st.binary(min_size=1, max_size=600), st.integers(1, 1100)), st.booleans())


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rtype=st.sampled_from([0, 1, 4, 8, 11, 13, 2, 0x80000001, 99]),
       sector=st.one_of(st.integers(0, DISK // 512 + 2), st.integers(0, 2**64 - 1)),
       body=st.lists(_buf, max_size=5), indirect=st.booleans(), writable=st.booleans(),
       via_start=st.booleans())
async def test_fuzz_requests_keep_the_model(rtype, sector, body, indirect, writable, via_start):
    ram = GuestRam(size=0x40000, pad=4096)
    mem = ram.memory()
    try:
        drv = Driver(ram, size=16)
        q = drv.queue(mem)
        disk = ModelDisk()
        model = bytearray(disk.data)
        h = B.BlkHandler(disk, writable=writable)
        try:
            drv.add([(outhdr(rtype, sector), False)] + body, indirect=indirect)
        except struct.error:
            return
        try:
            chain = q.pop()
        except Q.VirtqueueError:
            return
        # (via_start: as the data plane does it, start() first, which
        # parses what it cannot serve and hands that to process())
        got = h.start(chain) if via_start else None
        assert got is None or type(got) is B.Prepared
        used = await h.process(chain, got)
        q.push(chain.head, used)
        assert used in (0, chain.writable_len)
        for op in disk.calls:
            if op[0] == "write":
                _, off, n, _ = op
                model[off:off + n] = disk.data[off:off + n]
            elif op[0] == "write_zeroes":
                model[op[1]:op[1] + op[2]] = bytes(op[2])
        # only what was asked for changed; nothing outside the region was touched
        assert disk.data == model
        assert ram.outside_untouched()
    finally:
        mem.close()
        ram.close()


class CachedDisk(ModelDisk):
    """A model whose fast paths serve everything (the page cache)."""

    def read_into_now(self, offset, views):
        self.calls.append(("read_into_now", offset, sum(len(v) for v in views)))
        pos = offset
        for v in views:
            v[:] = self.data[pos:pos + len(v)]
            pos += len(v)
        return True

    def write_now(self, offset, mv):
        self.calls.append(("write_now", offset, len(mv)))
        self.data[offset:offset + len(mv)] = mv
        return True


async def test_start_serves_cached_reads_and_writes(env):
    ram, drv, q, _ = env
    disk = CachedDisk()
    h = B.BlkHandler(disk, writable=True)
    payload = bytes(range(256)) * 8
    # a write in one buffer after the header, and one sharing the header's
    for bufs in ([(outhdr(B.VIRTIO_BLK_T_OUT, 8), False), (payload, False), (1, True)],
                 [(outhdr(B.VIRTIO_BLK_T_OUT, 8) + payload, False), (1, True)]):
        _, offs = drv.add(bufs)
        chain = q.pop()
        assert h.start(chain) == 1
        q.push(chain.head, 1)
        assert ram.get(offs[-1], 1) == b"\0"
        assert disk.data[4096:4096 + len(payload)] == payload
    assert [c[0] for c in disk.calls] == ["write_now", "write_now"]
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (1000, True), (1048, True),
                       (1, True)])
    chain = q.pop()
    assert h.start(chain) == 2049
    assert ram.get(offs[1], 1000) + ram.get(offs[2], 1048) == payload
    assert ram.get(offs[3], 1) == b"\0"
    q.push(chain.head, 2049)
    # the same apart in memory, the status byte in a buffer of its own (as
    # Linux sends a request): the data buffers read, then the status
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (1000, True), (1048, True),
                       (1, True)], gap=64)
    ram.put(offs[3], b"\x55")
    chain = q.pop()
    assert len(chain.writable) == 3
    assert h.start(chain) == 2049
    assert ram.get(offs[1], 1000) + ram.get(offs[2], 1048) == payload
    assert ram.get(offs[3], 1) == b"\0"
    q.push(chain.head, 2049)
    # what it leaves to process(): errors, other types, writethrough,
    # read-only (None); a write in pieces without an engine to take it,
    # parsed (a Prepared: process() does it without parsing it again)
    cases = [
        ([(outhdr(B.VIRTIO_BLK_T_IN, DISK // 512), False), (512, True), (1, True)], {}, None),
        ([(outhdr(B.VIRTIO_BLK_T_FLUSH), False), (1, True)], {}, None),
        ([(outhdr(B.VIRTIO_BLK_T_OUT), False), (b"x" * 512, False), (1, True)],
         {"writethrough": True}, None),
        ([(outhdr(B.VIRTIO_BLK_T_OUT), False), (b"x" * 512, False), (1, True)],
         {"writable": False}, None),
        ([(outhdr(B.VIRTIO_BLK_T_OUT, 2), False), (b"x" * 512, False), (b"y" * 512, False),
          (1, True)], {}, B.Prepared),
        ([(outhdr(B.VIRTIO_BLK_T_IN)[:8], False), (outhdr(B.VIRTIO_BLK_T_IN)[8:], False),
          (512, True), (1, True)], {}, None),
    ]
    for bufs, kw, kind in cases:
        hk = B.BlkHandler(disk, **{"writable": True, **kw})
        # buffers apart in memory (one right after another is one segment)
        _, offs = drv.add(bufs, gap=16)
        chain = q.pop()
        n = len(disk.calls)
        got = hk.start(chain)
        assert (got is None) if kind is None else type(got) is kind, bufs
        assert len(disk.calls) == n
        used = await hk.process(chain, got)
        q.push(chain.head, used)
        if kind is B.Prepared:
            # process() did the write it was handed, and answered it
            assert used == 1 and ram.get(offs[-1], 1) == b"\0"
            assert disk.data[1024:2048] == b"x" * 512 + b"y" * 512


class EngineDisk(ModelDisk):
    """A model whose reads and writes go to an I/O engine: writev_submit
    and readv_submit keep them until the test completes them, as the
    engine's reaper would."""

    def __init__(self):
        super().__init__()
        self.pending = []

    def writev_submit(self, offset, views, done):
        self.calls.append(("writev_submit", offset, [len(v) for v in views]))
        self.pending.append((True, offset, views, done))
        return True

    def readv_submit(self, offset, length, views, done):
        assert length == sum(len(v) for v in views)
        self.calls.append(("readv_submit", offset, [len(v) for v in views]))
        self.pending.append((False, offset, views, done))
        return True

    def complete(self, error=None):
        is_write, offset, views, done = self.pending.pop(0)
        if error is None:
            if is_write:
                data = b"".join(views)
                self.data[offset:offset + len(data)] = data
            else:
                for v in views:
                    v[:] = self.data[offset:offset + len(v)]
                    offset += len(v)
        done(None, error)


async def test_start_hands_writes_to_the_engine(env):
    ram, drv, q, _ = env
    disk = EngineDisk()
    h = B.BlkHandler(disk, writable=True)
    finished = []

    def done(head, used):
        finished.append((head, used))

    payload = bytes(range(256)) * 32
    # one buffer cut into two descriptors: one view of guest memory
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 8), False), (payload[:4096], False),
                       (payload[4096:], False), (1, True)])
    ram.put(offs[-1], b"\x55")
    chain = q.pop()
    assert h.start(chain, done) == B.STARTED
    assert disk.calls == [("writev_submit", 4096, [8192])] and h.written_bytes == 8192
    assert finished == [] and ram.get(offs[-1], 1) == b"\x55"
    disk.complete()
    assert finished == [(chain.head, 1)] and ram.get(offs[-1], 1) == b"\0"
    assert disk.data[4096:4096 + 8192] == payload
    # buffers apart in guest memory, the first one holding the header too:
    # one request of three views, in their order
    data = bytes(range(255, -1, -1)) * 48
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 16) + data[:4096], False),
                       (data[4096:8192], False), (data[8192:], False), (1, True)], gap=64)
    chain = q.pop()
    assert h.start(chain, done) == B.STARTED
    assert disk.calls[-1] == ("writev_submit", 8192, [4096, 4096, 4096])
    assert h.written_bytes == 8192 + 12288
    disk.complete()
    assert finished[-1] == (chain.head, 1) and ram.get(offs[-1], 1) == b"\0"
    assert disk.data[8192:8192 + 12288] == data
    # the engine's error is the request's
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 8), False), (payload, False), (1, True)])
    chain = q.pop()
    assert h.start(chain, done) == B.STARTED
    disk.complete(OSError(errno.EIO, "injected"))
    assert finished[-1] == (chain.head, 1) and ram.get(offs[-1], 1) == bytes([B.VIRTIO_BLK_S_IOERR])
    # nothing started: no callback to give, writethrough (FUA: not even
    # parsed), a node that cannot take it (ModelDisk), reads
    for handler, with_done, kind in (
            (h, False, B.Prepared),
            (B.BlkHandler(disk, writable=True, writethrough=True), True, None),
            (B.BlkHandler(ModelDisk(), writable=True), True, B.Prepared)):
        drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 8), False), (payload, False), (1, True)])
        chain = q.pop()
        n = len(disk.calls)
        got = handler.start(chain, done if with_done else None)
        assert (got is None) if kind is None else type(got) is kind
        assert len(disk.calls) == n and not disk.pending
        q.push(chain.head, await handler.process(chain, got))
    # a read the node cannot take so (ModelDisk) is Prepared
    drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (512, True), (1, True)])
    chain = q.pop()
    got = B.BlkHandler(ModelDisk(), writable=True).start(chain, done)
    assert type(got) is B.Prepared and not disk.pending
    q.push(chain.head, await h.process(chain, got))


async def test_start_hands_reads_to_the_engine(env):
    """A read the fast path declines goes to the engine without a task
    (O_DIRECT: BlockNode.readv_submit), into the guest's buffers."""
    ram, drv, q, _ = env
    disk = EngineDisk()
    disk.data[4096:4096 + 12288] = bytes(range(256)) * 48
    h = B.BlkHandler(disk, writable=True)
    finished = []

    def done(head, used):
        finished.append((head, used))

    # buffers apart in guest memory, the status byte in its own
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (4096, True), (8192, True),
                       (1, True)], gap=64)
    ram.put(offs[-1], b"\x55")
    chain = q.pop()
    assert h.start(chain, done) == B.STARTED
    assert disk.calls == [("readv_submit", 4096, [4096, 8192])] and h.read_bytes == 12288
    assert finished == [] and ram.get(offs[-1], 1) == b"\x55"
    disk.complete()
    assert finished == [(chain.head, 12289)] and ram.get(offs[-1], 1) == b"\0"
    assert ram.get(offs[1], 4096) + ram.get(offs[2], 8192) == bytes(disk.data[4096:16384])
    # the engine's error is the request's
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (512, True), (1, True)])
    chain = q.pop()
    assert h.start(chain, done) == B.STARTED
    disk.complete(OSError(errno.EIO, "injected"))
    assert finished[-1] == (chain.head, 513)
    assert ram.get(offs[-1], 1) == bytes([B.VIRTIO_BLK_S_IOERR])
    # without a callback to give: Prepared, and process() reads it
    _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 8), False), (512, True), (1, True)])
    chain = q.pop()
    got = h.start(chain)
    assert type(got) is B.Prepared and not disk.pending
    assert await h.process(chain, got) == 513
    assert ram.get(offs[1], 512) == bytes(disk.data[4096:4608])


@pytest.mark.parametrize("place", ["disk", "tmpfs"])
async def test_scattered_requests_on_a_file_take_an_iovec(tmp_path, place):
    """A read or write whose buffers lie apart in guest memory (an indirect
    table of them, as Linux sends a request of scattered pages) on raw
    over file is one preadv2/pwritev2 on an iovec array (Chain.scattered,
    memory.GuestIovec), with the data of views: the read's bytes land in
    each buffer in order, the write's in the file in order, the status
    byte and used length are those of the views' path, and a node that is
    not a file gets views."""
    from qsd_trio.nodes import inline_io
    from qsd_trio.nodes.graph import BlockGraph

    d = tmp_path if place == "disk" else Path(tempfile.mkdtemp(dir="/dev/shm"))
    path = d / "disk.raw"
    image = bytearray(os.urandom(1 << 20))
    path.write_bytes(image)
    graph = BlockGraph()
    node = await graph.add({"driver": "raw", "node-name": "disk",
                            "file": {"driver": "file", "filename": str(path), "aio": "threads"}})
    ram = GuestRam(size=0x100000)
    mem = ram.memory()
    drv = Driver(ram, size=16)
    q = drv.queue(mem)
    finished = []
    answered = trio.Event()

    def done(head, used):
        finished.append((head, used))
        answered.set()

    try:
        h = B.BlkHandler(node, writable=True)
        sizes = [4096, 512, 8192, 1024, 4096, 3584, 3072]  # 7 data buffers, 6 pages
        total = sum(sizes)
        # a read of sector 24 into the buffers, each 64 bytes after the last
        _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_IN, 24), False)]
                          + [(n, True) for n in sizes] + [(1, True)], indirect=True, gap=64)
        ram.put(offs[-1], b"\x55")
        chain = q.pop()
        assert chain.scattered is not None
        assert h.start(chain, done) == total + 1 and ram.get(offs[-1], 1) == b"\0"
        got = b"".join(ram.get(off, n) for off, n in zip(offs[1:-1], sizes, strict=True))
        assert got == image[24 * 512:24 * 512 + total]
        q.push(chain.head, total + 1)
        # a write of the same layout at sector 40
        data = os.urandom(total)
        pieces, pos = [], 0
        for n in sizes:
            pieces.append((data[pos:pos + n], False))
            pos += n
        _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 40), False)] + pieces + [(1, True)],
                          indirect=True, gap=64)
        ram.put(offs[-1], b"\x55")
        chain = q.pop()
        assert chain.scattered is not None
        inline = inline_io.dirty_memory_ok()
        assert h.start(chain, done) == B.STARTED
        if not inline:
            # dirty memory near throttling (after other tests' writes): the
            # views' path, to a worker
            await answered.wait()
        assert finished == [(chain.head, 1)] and ram.get(offs[-1], 1) == b"\0"
        q.push(chain.head, 1)
        assert h.read_bytes == total and h.written_bytes == total
        image[40 * 512:40 * 512 + total] = data
        await graph.close_all()
        graph = None
        assert path.read_bytes() == image
        # another node than a file (a model) gets the views
        disk = EngineDisk()
        _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, 8), False)] + pieces + [(1, True)],
                          indirect=True, gap=64)
        chain = q.pop()
        assert B.BlkHandler(disk, writable=True).start(chain, done) == B.STARTED
        assert disk.calls == [("writev_submit", 4096, sizes)]
        disk.complete()
        assert disk.data[4096:4096 + total] == data
    finally:
        if graph is not None:
            await graph.close_all()
        mem.close()
        ram.close()
        if place == "tmpfs":
            path.unlink()
            d.rmdir()


async def test_large_write_of_one_buffer_runs_on_trios_thread(tmp_path):
    """A page-cache write of one buffer larger than write_now takes
    (inline_io.INLINE_MAX) goes where a write of several buffers goes: run
    on trio's thread by the threads engine when it cannot block, answered
    before start() returns, instead of a hop to a worker and back (a 1 MiB
    write of a guest whose buffer is in huge pages; issue 14)."""
    from qsd_trio.nodes import inline_io
    from qsd_trio.nodes.graph import BlockGraph

    if not inline_io.dirty_memory_ok():
        pytest.skip("dirty memory near the kernel's throttling: writes go to workers")
    size = 2 * inline_io.INLINE_MAX
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4 * size))
    graph: BlockGraph | None = BlockGraph()
    node = await graph.add({"driver": "raw", "node-name": "disk",
                            "file": {"driver": "file", "filename": str(path), "aio": "threads"}})
    ram = GuestRam(size=4 * size)
    mem = ram.memory()
    drv = Driver(ram, size=16, data_start=0x10000)
    q = drv.queue(mem)
    try:
        h = B.BlkHandler(node, writable=True)
        finished = []
        payload = bytes(range(256)) * (size // 256)
        # (header and payload one run of guest memory: one view after the header)
        _, offs = drv.add([(outhdr(B.VIRTIO_BLK_T_OUT, size >> 9), False), (payload, False),
                           (1, True)])
        chain = q.pop()
        assert h.start(chain, lambda head, used: finished.append((head, used))) == B.STARTED
        assert finished == [(chain.head, 1)] and ram.get(offs[-1], 1) == b"\0"
        await graph.close_all()
        graph = None
        data = path.read_bytes()
        assert data[size:2 * size] == payload
        assert data[:size] == bytes(size) and data[2 * size:] == bytes(2 * size)
    finally:
        if graph is not None:
            await graph.close_all()
        mem.close()
        ram.close()
