"""The vhost-user-blk export against a small front-end written here: the
vhost-user messages packed with struct, descriptors sent with SCM_RIGHTS,
guest RAM a memfd, rings laid out as a driver would (tests/unit's Driver),
eventfds for kick and call.  The same scenario runs against
qemu-storage-daemon as a differential (config space, status bytes, data)."""

import array
import contextlib
import errno
import os
import random
import signal
import socket
import struct
import subprocess

import pytest
import trio

from tests.helpers import HAVE_QEMU, QSD_TRIO, qemu_img, qemu_io
from tests.unit.test_virtqueue import GUEST_BASE, Driver, GuestRam

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
F_VERSION_1, F_INDIRECT, F_EVENT_IDX, F_PROTOCOL = 32, 28, 29, 30
PF_MQ, PF_REPLY_ACK, PF_CONFIG = 0, 3, 9
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
NEED_REPLY = 8
IMAGE_SIZE = 4 << 20

kinds = ["trio"] + (["qemu"] if HAVE_QEMU else [])


class FrontEnd:
    """A vhost-user front-end over a trio unix socket."""

    def __init__(self, sock):
        self.sock = sock
        self.fds = []

    @classmethod
    async def connect(cls, path):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(sock)

    async def send(self, request, payload=b"", fds=(), flags=1):
        data = struct.pack("<III", request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await self.sock.sendmsg([data], anc)

    async def recv_exactly(self, n):
        data = b""
        while len(data) < n:
            more = await self.sock.recv(n - len(data))
            if not more:
                raise EOFError
            data += more
        return data

    async def reply(self, request):
        req, flags, size = struct.unpack("<III", await self.recv_exactly(12))
        assert req == request and flags == 5
        return await self.recv_exactly(size) if size else b""

    async def get_u64(self, request):
        await self.send(request)
        return struct.unpack("<Q", await self.reply(request))[0]

    async def ack(self, request, payload=b"", fds=()):
        await self.send(request, payload, fds, flags=1 | NEED_REPLY)
        return struct.unpack("<Q", await self.reply(request))[0]

    async def negotiate(self):
        features = await self.get_u64(GET_FEATURES)
        want = features & (1 << F_VERSION_1 | 1 << F_INDIRECT | 1 << F_EVENT_IDX | 1 << F_PROTOCOL
                           | 0x7E66)
        await self.send(SET_FEATURES, struct.pack("<Q", want))
        protocol = await self.get_u64(GET_PROTOCOL_FEATURES)
        await self.send(SET_PROTOCOL_FEATURES,
                        struct.pack("<Q", protocol & (1 << PF_MQ | 1 << PF_REPLY_ACK | 1 << PF_CONFIG)))
        assert await self.ack(SET_OWNER) == 0
        return features, protocol

    async def config(self, size=60):
        await self.send(GET_CONFIG, struct.pack("<III", 0, size, 0) + bytes(size))
        body = await self.reply(GET_CONFIG)
        return body[12:]

    async def set_mem_table(self, ram):
        r = ram.region
        await self.send(SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
            "<QQQQ", r.guest_addr, r.size, r.user_addr, r.mmap_offset), [ram.fd])

    async def start_queue(self, drv, index=0, base=0):
        """Ring setup as QEMU does it; returns (kick, call) eventfds."""
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds += [kick, call]
        ram = drv.ram
        await self.send(SET_VRING_NUM, struct.pack("<II", index, drv.size))
        await self.send(SET_VRING_BASE, struct.pack("<II", index, base))
        await self.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, ram.uva(drv.desc),
                                                    ram.uva(drv.used), ram.uva(drv.avail), 0))
        await self.send(SET_VRING_KICK, struct.pack("<Q", index), [kick])
        await self.send(SET_VRING_CALL, struct.pack("<Q", index), [call])
        assert await self.ack(SET_VRING_ENABLE, struct.pack("<II", index, 1)) == 0
        return kick, call

    async def stop_queue(self, index=0):
        await self.send(GET_VRING_BASE, struct.pack("<II", index, 0))
        return struct.unpack("<II", await self.reply(GET_VRING_BASE))

    def close(self):
        self.sock.close()
        for fd in self.fds:
            os.close(fd)


async def complete(drv, kick, call, bufs, *, indirect=False):
    """Make one request available, kick, wait for its used entry; returns
    (used length, [buffer offsets])."""
    before = drv.used_idx()
    # with event index: a call once the entry at the current used index is used
    drv.set_used_event(before)
    _, offs = drv.add(bufs, indirect=indirect)
    os.eventfd_write(kick, 1)
    with trio.fail_after(20):
        while drv.used_idx() == before:
            await trio.lowlevel.wait_readable(call)
            try:
                os.eventfd_read(call)
            except BlockingIOError:
                pass
    return drv.used_elem(before)[1], offs


@contextlib.asynccontextmanager
async def front_end(path, ram_size=0x40000):
    """A front-end connected to ``path`` that negotiated and shared its
    guest RAM (a GuestRam of ``ram_size``); both closed afterwards."""
    ram = GuestRam(size=ram_size)
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        yield fe, ram
    finally:
        fe.close()
        ram.close()


def outhdr(rtype, sector=0):
    return struct.pack("<IIQ", rtype, 0, sector)


def start(daemon_factory, kind, tmp_path, image, extra="", **kw):
    sock = tmp_path / f"vu-{kind}.sock"
    d = daemon_factory(kind, [
        "--blockdev", f"file,node-name=file0,filename={image}",
        "--export", f"vhost-user-blk,id=vu0,node-name=file0,addr.type=unix,addr.path={sock}{extra}",
    ], **kw)
    return d, sock


def start_throttled(daemon_factory, path, image, bps, **kw):
    """qsd-trio exporting ``image`` writable at ``path`` through a throttle
    of ``bps`` bytes of writes a second: it lets a first write through and
    holds the next ones."""
    return daemon_factory("trio", [
        "--object", f"throttle-group,id=tg0,x-bps-write={bps}",
        "--blockdev", f"file,node-name=file0,filename={image}",
        "--blockdev", "throttle,node-name=t0,throttle-group=tg0,file=file0",
        "--export", f"vhost-user-blk,id=vu0,node-name=t0,addr.type=unix,addr.path={path},writable=on",
    ], **kw)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    qemu_img("create", "-f", "raw", str(path), str(IMAGE_SIZE))
    with open(path, "r+b") as f:
        f.write(b"\x11" * 8192)
    return path


@pytest.mark.parametrize("kind", kinds)
async def test_requests_through_a_front_end(daemon_factory, tmp_path, image, kind):
    d, path = start(daemon_factory, kind, tmp_path, image,
                    ",writable=on,num-queues=2,logical-block-size=4096")
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(path)
    try:
        features, protocol = await fe.negotiate()
        assert features & 0x1_7000_7E66 == 0x1_7000_7E46  # no RO bit: writable
        assert protocol & (1 << PF_MQ | 1 << PF_REPLY_ACK | 1 << PF_CONFIG) == 0x209
        assert await fe.get_u64(GET_QUEUE_NUM) == 2
        cfg = await fe.config()
        capacity, blk_size, num_queues = struct.unpack_from("<Q", cfg)[0], cfg[20:24], cfg[34:36]
        assert capacity == IMAGE_SIZE // 512
        assert struct.unpack("<I", blk_size)[0] == 4096 and struct.unpack("<H", num_queues)[0] == 2
        await fe.set_mem_table(ram)
        drv = Driver(ram, size=16)
        kick, call = await fe.start_queue(drv)

        payload = os.urandom(8192)
        used, offs = await complete(drv, kick, call, [
            (outhdr(T_OUT, 16), False), (payload[:4096], False), (payload[4096:], False), (1, True)])
        assert used == 1 and ram.get(offs[-1], 1) == b"\0"
        used, offs = await complete(drv, kick, call, [
            (outhdr(T_IN, 16), False), (8192, True), (1, True)], indirect=True)
        assert used == 8193 and ram.get(offs[1], 8192) == payload and ram.get(offs[2], 1) == b"\0"
        used, offs = await complete(drv, kick, call, [(outhdr(T_FLUSH), False), (1, True)])
        assert ram.get(offs[-1], 1) == b"\0"
        used, offs = await complete(drv, kick, call, [(outhdr(T_GET_ID), False), (20, True), (1, True)])
        assert ram.get(offs[1], 20).rstrip(b"\0") == b"vhost_user_blk"
        # misaligned for a 4096-byte block, beyond the end, unknown type
        for bufs, status in (
                ([(outhdr(T_IN, 1), False), (512, True), (1, True)], 1),
                ([(outhdr(T_IN, IMAGE_SIZE // 512), False), (4096, True), (1, True)], 1),
                ([(outhdr(T_WRITE_ZEROES), False), (struct.pack("<QII", 0, 16, 4), False), (1, True)], 2),
                ([(outhdr(99), False), (1, True)], 2)):
            _, offs = await complete(drv, kick, call, bufs)
            assert ram.get(offs[-1], 1) == bytes([status])
        _, offs = await complete(drv, kick, call, [
            (outhdr(T_WRITE_ZEROES), False), (struct.pack("<QII", 0, 8, 1), False), (1, True)])
        assert ram.get(offs[-1], 1) == b"\0"
        _, offs = await complete(drv, kick, call, [
            (outhdr(T_DISCARD), False), (struct.pack("<QII", 8, 8, 0), False), (1, True)])
        assert ram.get(offs[-1], 1) == b"\0"
        assert await fe.stop_queue() == (0, drv.avail_idx)
    finally:
        fe.close()
        ram.close()
    d.stop()
    data = image.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[8192:16384] == payload


async def test_read_only_export_and_reconnect(daemon_factory, tmp_path, image):
    d, path = start(daemon_factory, "trio", tmp_path, image)
    for _ in range(2):
        # a front-end that leaves and the next one that takes the disk
        ram = GuestRam(size=0x40000)
        fe = await FrontEnd.connect(path)
        try:
            features, _ = await fe.negotiate()
            assert features & 1 << 5  # VIRTIO_BLK_F_RO
            await fe.set_mem_table(ram)
            drv = Driver(ram, size=8)
            kick, call = await fe.start_queue(drv)
            _, offs = await complete(drv, kick, call, [
                (outhdr(T_OUT, 0), False), (b"w" * 512, False), (1, True)])
            assert ram.get(offs[-1], 1) == b"\1"
            _, offs = await complete(drv, kick, call, [(outhdr(T_IN, 0), False), (512, True), (1, True)])
            assert ram.get(offs[1], 512) == b"\x11" * 512 and ram.get(offs[2], 1) == b"\0"
        finally:
            fe.close()
            ram.close()
    assert image.read_bytes()[:512] == b"\x11" * 512


@pytest.mark.parametrize("bad", ["version", "size", "missing-fd", "unknown", "ring", "loop"])
async def test_broken_front_end_is_dropped_and_the_next_one_served(daemon_factory, tmp_path, image, bad):
    d, path = start(daemon_factory, "trio", tmp_path, image, allow_stderr=r"^qsd-trio: vu_panic: ")
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        if bad == "version":
            await fe.send(GET_FEATURES, flags=2)
        elif bad == "size":
            await fe.send(SET_VRING_NUM, b"\0" * 7)
        elif bad == "missing-fd":
            await fe.send(SET_VRING_KICK, struct.pack("<Q", 0))
        elif bad == "unknown":
            await fe.send(99)
        else:
            await fe.set_mem_table(ram)
            drv = Driver(ram, size=8)
            kick, call = await fe.start_queue(drv)
            if bad == "ring":
                drv.write_desc(0, 0, 0x10, 512, 0, 0)  # outside guest memory
            else:
                drv.write_desc(0, 0, ram.gpa(0x8000), 16, 1, 1)
                drv.write_desc(0, 1, ram.gpa(0x8000), 16, 1, 0)
            drv.publish(0)
            os.eventfd_write(kick, 1)
        with trio.fail_after(20):
            while await fe.sock.recv(4096):
                pass
    except OSError as e:
        assert e.errno == errno.ECONNRESET
    finally:
        fe.close()
        ram.close()
    assert "vu_panic" in d.stderr()
    # the daemon lives and serves the next front-end
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(path)
    try:
        with trio.fail_after(20):
            await fe.negotiate()
            await fe.set_mem_table(ram)
            drv = Driver(ram, size=8)
            kick, call = await fe.start_queue(drv)
            _, offs = await complete(drv, kick, call, [(outhdr(T_IN, 0), False), (512, True), (1, True)])
        assert ram.get(offs[1], 512) == b"\x11" * 512
    finally:
        fe.close()
        ram.close()


async def test_options_and_errors(daemon_factory, tmp_path, image):
    d = daemon_factory("trio", ["--blockdev", f"file,node-name=file0,filename={image}"])
    qmp = d.qmp()
    sock = tmp_path / "vu.sock"

    def add(**kw):
        args = {"type": "vhost-user-blk", "id": "vu0", "node-name": "file0",
                "addr": {"type": "unix", "path": str(sock)}}
        args.update(kw)
        return qmp.cmd_raw("block-export-add", args)

    for kw, text in (
            ({"logical-block-size": 256},
             "Property vu0.logical-block-size doesn't take value 256 (minimum: 512, maximum: 2097152)"),
            ({"logical-block-size": 1000},
             "Property vu0.logical-block-size doesn't take value '1000', it's not a power of 2"),
            ({"num-queues": 0}, "num-queues must be greater than 0"),
            ({"addr": {"type": "inet", "host": "127.0.0.1", "port": "0"}},
             "Only socket address types 'unix' and 'fd' are supported"),
            ({"addr": {"type": "unix", "path": str(tmp_path / "no" / "x.sock")}},
             f"Failed to bind socket to {tmp_path}/no/x.sock: No such file or directory")):
        r = add(**kw)
        assert r["error"]["desc"] == text, kw
    assert add()["return"] == {}
    assert sock.exists()
    # a connected but idle front-end does not keep block-export-del (safe) waiting
    fe = await FrontEnd.connect(sock)
    try:
        await fe.negotiate()
        assert qmp.cmd_raw("block-export-del", {"id": "vu0"})["return"] == {}
        ev = qmp.pull_event(wait=10)
        assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "vu0"}
        with trio.fail_after(20):
            while await fe.sock.recv(4096):
                pass
    except OSError as e:
        assert e.errno == errno.ECONNRESET
    finally:
        fe.close()
    assert not sock.exists()
    assert qmp.cmd_raw("query-block-exports", {})["return"] == []


async def test_quit_with_a_front_end_connected(daemon_factory, tmp_path, image):
    d, path = start(daemon_factory, "trio", tmp_path, image, ",writable=on")
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        drv = Driver(ram, size=8)
        kick, call = await fe.start_queue(drv)
        _, offs = await complete(drv, kick, call, [(outhdr(T_IN, 0), False), (512, True), (1, True)])
        qmp = d.qmp()
        qmp.cmd_raw("quit", {})
        assert d.wait(20) == 0
    finally:
        fe.close()
        ram.close()
    assert not path.exists()


async def test_random_front_ends_leave_the_daemon_serving(daemon_factory, tmp_path, image):
    """Random messages and random rings from many front-ends; afterwards an
    NBD client of the same node and a well-behaved front-end are served."""
    nbd = tmp_path / "nbd.sock"
    path = tmp_path / "vu.sock"
    daemon_factory("trio", [
        "--blockdev", f"file,node-name=file0,filename={image}",
        "--export", f"vhost-user-blk,id=vu0,node-name=file0,addr.type=unix,addr.path={path}",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "nbd,id=n0,node-name=file0",
    ], allow_stderr=r"^qsd-trio: vu_panic: ")
    rng = random.Random(14)
    for _ in range(60):
        ram = GuestRam(size=0x40000)
        fe = await FrontEnd.connect(path)
        extra = []
        try:
            with trio.fail_after(20):
                if rng.random() < 0.5:
                    await fe.negotiate()
                    await fe.set_mem_table(ram)
                    drv = Driver(ram, size=8)
                    kick, _call = await fe.start_queue(drv)
                    ram.put(0, rng.randbytes(0x4000))  # descriptors, avail and used rings
                    if rng.random() < 0.8:
                        ram.put(drv.avail + 2, struct.pack("<H", rng.randrange(9)))
                    if rng.random() < 0.5:
                        # plausible descriptors: inside guest memory or just outside
                        for i in range(8):
                            drv.write_desc(0, i, GUEST_BASE + rng.randrange(-64, 0x40040),
                                           rng.choice([1, 16, 512, 4096, rng.randrange(1 << 32)]),
                                           rng.randrange(8), rng.randrange(10))
                    os.eventfd_write(kick, 1)
                for _ in range(rng.randrange(1, 6)):
                    request = rng.choice([rng.randrange(45), 5, 8, 9, 10, 11, 12, 24, 25, 37, 38])
                    flags = rng.choice([1, 1, 9, rng.randrange(1 << 32)])
                    payload = rng.randbytes(rng.choice([0, 8, 12, 20, 40, 72, rng.randrange(300)]))
                    fds = [os.eventfd(0) if rng.random() < 0.5 else os.dup(ram.fd)
                           for _ in range(rng.choice([0, 0, 1, 2]))]
                    extra += fds
                    await fe.send(request, payload, fds, flags)
                await trio.sleep(0.01)
        except OSError:
            pass  # dropped by the daemon while we were still sending
        finally:
            fe.close()
            ram.close()
            for fd in extra:
                os.close(fd)
    # the daemon is alive and serves an NBD client of the same node ...
    out = qemu_io("-f", "raw", "-r", "-c", "read -P 0x11 0 8k", f"nbd+unix:///file0?socket={nbd}")
    assert "read 8192/8192" in out.stdout
    # ... and a well-behaved front-end
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(path)
    try:
        with trio.fail_after(20):
            await fe.negotiate()
            await fe.set_mem_table(ram)
            drv = Driver(ram, size=8)
            kick, call = await fe.start_queue(drv)
            _, offs = await complete(drv, kick, call, [(outhdr(T_IN, 0), False), (512, True), (1, True)])
        assert ram.get(offs[1], 512) == b"\x11" * 512
    finally:
        fe.close()
        ram.close()


GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
PF_INFLIGHT_SHMFD = 12


async def get_inflight_fd(fe, num_queues, queue_size):
    await fe.send(GET_INFLIGHT_FD, struct.pack("<QQHH", 0, 0, num_queues, queue_size) + bytes(4))
    data, anc, _, _ = await fe.sock.recvmsg(12, socket.CMSG_SPACE(4))
    fds = [array.array("i", c[2][:4])[0] for c in anc if c[1] == socket.SCM_RIGHTS]
    assert struct.unpack("<III", data) == (GET_INFLIGHT_FD, 5, 24) and len(fds) == 1
    size, offset, nq, qs = struct.unpack("<QQHH", (await fe.recv_exactly(24))[:20])
    assert (offset, nq, qs) == (0, num_queues, queue_size)
    return fds[0], size


async def set_inflight_fd(fe, fd, size, num_queues, queue_size):
    await fe.send(SET_INFLIGHT_FD, struct.pack("<QQHH", size, 0, num_queues, queue_size) + bytes(4), [fd])


async def test_inflight_buffer_tracks_requests(daemon_factory, tmp_path, image):
    d, path = start(daemon_factory, "trio", tmp_path, image, ",writable=on")
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(path)
    try:
        _, protocol = await fe.negotiate()
        assert protocol & 1 << PF_INFLIGHT_SHMFD
        fd, size = await get_inflight_fd(fe, 1, 16)
        fe.fds.append(fd)
        assert size == 320 == os.fstat(fd).st_size  # libvhost-user's layout: 16 * 16 + 2, 64-aligned
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)  # sealed
        await set_inflight_fd(fe, fd, size, 1, 16)
        await fe.set_mem_table(ram)
        drv = Driver(ram, size=16)
        kick, call = await fe.start_queue(drv)
        for i in range(3):
            _, offs = await complete(drv, kick, call, [(outhdr(T_IN, i), False), (512, True), (1, True)])
        region = os.pread(fd, size, 0)
        features, version, desc_num, last_batch_head, used_idx = struct.unpack_from("<QHHHH", region)
        assert (version, desc_num, used_idx) == (1, 16, 3)
        assert not any(region[16 + 16 * i] for i in range(16))
        counters = [struct.unpack_from("<Q", region, 16 + 16 * h + 8)[0] for h in (0, 3, 6)]  # 3 descriptors a chain
        assert counters == [0, 1, 2]
    finally:
        fe.close()
        ram.close()


async def test_restart_resubmits_requests_in_flight(daemon_factory, tmp_path, image):
    """SIGKILL with a write in flight; a new daemon on the same socket, given
    the front-end's inflight buffer, carries the write out."""
    path = tmp_path / "vu.sock"
    # the throttle lets the first write through and holds the second
    slow = start_throttled(daemon_factory, path, image, 4096)
    ram = GuestRam(size=0x60000)
    drv = Driver(ram, size=16)
    payload = os.urandom(128 * 1024)
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        fd, size = await get_inflight_fd(fe, 1, 16)
        await set_inflight_fd(fe, fd, size, 1, 16)
        await fe.set_mem_table(ram)
        kick, call = await fe.start_queue(drv)
        drv.set_used_event(0)
        first, offs1 = drv.add([(outhdr(T_OUT, 64), False), (payload[:65536], False), (1, True)])
        second, offs2 = drv.add([(outhdr(T_OUT, 192), False), (payload[65536:], False), (1, True)])
        os.eventfd_write(kick, 1)
        # the daemon answered one write and holds the other (the inflight
        # buffer says so); which one goes first is up to the throttle

        def held():
            if drv.used_idx() < 1:
                return None
            other = second if drv.used_elem(0)[0] == first else first
            return other if os.pread(fd, 1, 16 + 16 * other)[0] else None

        # both were taken before either ran: the call for the first one
        # finds the other one marked in flight
        with trio.fail_after(20):
            await trio.lowlevel.wait_readable(call)
        assert held() is not None
        slow.proc.kill()
        slow.proc.wait()
    finally:
        fe.close()
    assert drv.used_idx() == 1
    pending = held()
    daemon_factory("trio", [
        "--blockdev", f"file,node-name=file0,filename={image}",
        "--export", f"vhost-user-blk,id=vu0,node-name=file0,addr.type=unix,addr.path={path},writable=on",
    ])
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        await set_inflight_fd(fe, fd, size, 1, 16)
        await fe.set_mem_table(ram)
        # a front-end that lost its back-end restarts the ring at the used index
        kick, call = await fe.start_queue(drv, base=drv.used_idx())
        with trio.fail_after(20):
            while drv.used_idx() < 2:
                await trio.lowlevel.wait_readable(call)
                os.eventfd_read(call)
        assert drv.used_elem(1) == (pending, 1)
        assert ram.get(offs1[-1], 1) == ram.get(offs2[-1], 1) == b"\0"
        assert not os.pread(fd, 1, 16 + 16 * pending)[0]
    finally:
        fe.close()
        os.close(fd)
        ram.close()
    data = image.read_bytes()
    assert data[64 * 512:64 * 512 + 65536] == payload[:65536]
    assert data[192 * 512:192 * 512 + 65536] == payload[65536:]


@pytest.mark.parametrize("how", ["quit", "block-export-del"])
async def test_stop_lets_requests_in_flight_finish(daemon_factory, tmp_path, image, how):
    path = tmp_path / "vu.sock"
    # the throttle lets the first write through and holds the second for
    # about a second
    d = start_throttled(daemon_factory, path, image, 32768)
    qmp = d.qmp()
    ram = GuestRam(size=0x60000)
    drv = Driver(ram, size=16)
    payload = os.urandom(128 * 1024)
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        kick, call = await fe.start_queue(drv)
        drv.set_used_event(0)
        drv.add([(outhdr(T_OUT, 64), False), (payload[:65536], False), (1, True)])
        drv.add([(outhdr(T_OUT, 192), False), (payload[65536:], False), (1, True)])
        os.eventfd_write(kick, 1)
        with trio.fail_after(20):
            await trio.lowlevel.wait_readable(call)
        assert drv.used_idx() == 1
        if how == "quit":
            qmp.cmd_raw("quit", {})
            assert d.wait(20) == 0
        else:
            assert qmp.cmd_raw("block-export-del", {"id": "vu0"})["return"] == {}
            assert qmp.pull_event(wait=20)["event"] == "BLOCK_EXPORT_DELETED"
        # the held write was carried out before the front-end was dropped
        assert drv.used_idx() == 2
    finally:
        fe.close()
        ram.close()
    data = image.read_bytes()
    assert data[192 * 512:192 * 512 + 65536] == payload[65536:]


def spawn_with_fd(argv, fd):
    # the Daemon helper passes no descriptors: the daemon inherits this one
    return subprocess.Popen(argv, pass_fds=[fd], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_listening_socket_passed_as_fd(tmp_path, image):
    path = tmp_path / "passed.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    fd = listener.fileno()
    proc = spawn_with_fd(QSD_TRIO + [
        "--blockdev", f"file,node-name=file0,filename={image}",
        "--export", f"vhost-user-blk,id=vu0,node-name=file0,addr.type=fd,addr.str={fd}"], fd)
    listener.close()
    ram = GuestRam(size=0x40000)
    fe = None
    try:
        fe = await FrontEnd.connect(path)
        with trio.fail_after(20):
            await fe.negotiate()
            await fe.set_mem_table(ram)
            drv = Driver(ram, size=8)
            kick, call = await fe.start_queue(drv)
            _, offs = await complete(drv, kick, call, [(outhdr(T_IN, 0), False), (512, True), (1, True)])
        assert ram.get(offs[1], 512) == b"\x11" * 512
    finally:
        if fe is not None:
            fe.close()
        ram.close()
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert err == b""


async def test_fd_address_errors(daemon_factory, tmp_path, image):
    d = daemon_factory("trio", ["--blockdev", f"file,node-name=file0,filename={image}"])
    qmp = d.qmp()
    for fd, text in (("nosuch", "Unable to parse FD number nosuch"),
                     ("99", "File descriptor '99' is not a socket"),
                     ("0", "File descriptor '0' is not a socket")):
        r = qmp.cmd_raw("block-export-add", {"type": "vhost-user-blk", "id": "vu0", "node-name": "file0",
                                             "addr": {"type": "fd", "str": fd}})
        assert r["error"]["desc"] == text


async def test_kick_descriptor_that_cannot_be_polled(daemon_factory, tmp_path, image):
    d, path = start(daemon_factory, "trio", tmp_path, image, allow_stderr=r"^qsd-trio: vu_panic: ")
    ram = GuestRam(size=0x40000)
    drv = Driver(ram, size=8)
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        await fe.send(SET_VRING_NUM, struct.pack("<II", 0, drv.size))
        await fe.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, ram.uva(drv.desc),
                                                  ram.uva(drv.used), ram.uva(drv.avail), 0))
        # a regular file as the kick "eventfd": epoll refuses it
        await fe.send(SET_VRING_KICK, struct.pack("<Q", 0), [ram.fd])
        with trio.fail_after(20):
            while await fe.sock.recv(4096):
                pass
    except OSError as e:
        assert e.errno == errno.ECONNRESET
    finally:
        fe.close()
        ram.close()
    assert "vu_panic: queue 0: kick descriptor" in d.stderr()


async def test_inflight_buffer_replaced_under_a_running_ring(daemon_factory, tmp_path, image):
    d, path = start(daemon_factory, "trio", tmp_path, image, allow_stderr=r"^qsd-trio: vu_panic: ")
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(path)
    try:
        await fe.negotiate()
        fd, size = await get_inflight_fd(fe, 1, 8)
        fe.fds.append(fd)
        await set_inflight_fd(fe, fd, size, 1, 8)
        await fe.set_mem_table(ram)
        drv = Driver(ram, size=8)
        kick, call = await fe.start_queue(drv)
        await set_inflight_fd(fe, fd, size, 1, 8)
        with trio.fail_after(20):
            while await fe.sock.recv(4096):
                pass
    except OSError as e:
        assert e.errno == errno.ECONNRESET
    finally:
        fe.close()
        ram.close()
    assert "vu_panic: SET_INFLIGHT_FD while a ring is running" in d.stderr()


SET_BACKEND_REQ_FD, BACKEND_CONFIG_CHANGE_MSG, PF_BACKEND_REQ = 21, 2, 5


async def test_resize_notifies_the_front_end(daemon_factory, tmp_path, image):
    """block_resize sends CONFIG_CHANGE_MSG on the back-end channel and
    GET_CONFIG then answers the new capacity, as QEMU's vu_blk_exp_resize
    does.  Not a differential: qemu-storage-daemon 7.2 keeps answering the
    old capacity and sends nothing (checked by hand with this front-end)."""
    d, path = start(daemon_factory, "trio", tmp_path, image, ",writable=on")
    fe = await FrontEnd.connect(path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = trio.socket.from_stdlib_socket(ours)
    try:
        await fe.negotiate()
        protocol = await fe.get_u64(GET_PROTOCOL_FEATURES)
        assert protocol & 1 << PF_BACKEND_REQ
        await fe.send(SET_PROTOCOL_FEATURES, struct.pack(
            "<Q", protocol & (1 << PF_MQ | 1 << PF_REPLY_ACK | 1 << PF_CONFIG | 1 << PF_BACKEND_REQ)))
        assert await fe.ack(SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
        theirs.close()
        assert struct.unpack_from("<Q", await fe.config())[0] == IMAGE_SIZE // 512
        qmp = d.qmp()
        new_size = IMAGE_SIZE + (1 << 20)
        assert qmp.cmd_raw("block_resize", {"node-name": "file0", "size": new_size})["return"] == {}
        with trio.fail_after(20):
            header = b""
            while len(header) < 12:
                more = await backend.recv(12 - len(header))
                assert more
                header += more
        # no reply asked for (flags: version 1 only), no payload
        assert struct.unpack("<III", header) == (BACKEND_CONFIG_CHANGE_MSG, 1, 0)
        assert struct.unpack_from("<Q", await fe.config())[0] == new_size // 512
    finally:
        fe.close()
        backend.close()
    d.stop()
    assert image.stat().st_size == IMAGE_SIZE + (1 << 20)


def _tree_nodes(node, path=()):
    yield node, path
    for child in node["children"]:
        yield from _tree_nodes(child, (*path, node))


async def test_front_end_in_the_task_tree(daemon_factory, tmp_path, image):
    """A connected front-end is the export's client-connection in
    x-query-tasks and the SIGUSR1 dump, as an NBD client is: under the
    export's task, with its process, its requests in flight and bytes
    moved, and a task per started virtqueue under it; gone once it leaves."""
    path = tmp_path / "vu.sock"
    # the throttle lets the first write through and holds the second
    d = start_throttled(daemon_factory, path, image, 4096, allow_stderr=(
        r"^ *(task|nursery|monitor-session|export|client-connection) '.*' .*up [0-9.]+s$"))
    qmp = d.qmp()

    def connections():
        tree = qmp.cmd_raw("x-query-tasks")["return"]
        return [(n, p) for n, p in _tree_nodes(tree) if n["kind"] == "client-connection"]

    assert connections() == []
    async with front_end(path, 0x60000) as (fe, ram):
        drv = Driver(ram, size=16)
        kick, call = await fe.start_queue(drv)
        _, offs = await complete(drv, kick, call, [(outhdr(T_IN, 0), False), (4096, True), (1, True)])
        drv.set_used_event(1)
        drv.add([(outhdr(T_OUT, 128), False), (b"w" * 65536, False), (1, True)])
        drv.add([(outhdr(T_OUT, 256), False), (b"v" * 65536, False), (1, True)])
        os.eventfd_write(kick, 1)
        with trio.fail_after(20):
            while drv.used_idx() < 2:
                await trio.lowlevel.wait_readable(call)
                os.eventfd_read(call)
        [(conn, above)] = connections()
        assert conn["export-id"] == "vu0" and conn["node-names"] == ["t0"]
        assert conn["client"] == f"pid {os.getpid()}"
        assert conn["state"] == "running"
        # one write held by the throttle; a read and a write done (the
        # bytes count from a request's start)
        assert conn["in-flight"] == 1 and conn["bytes"] == 4096 + 2 * 65536
        assert any(n["kind"] == "export" and n["export-id"] == "vu0" for n in above)
        rings = [n["name"] for child in conn["children"] for n in child["children"]]
        assert rings == ["virtqueue 0"]
        d.proc.send_signal(signal.SIGUSR1)
        with trio.fail_after(20):
            while "client-connection" not in d.stderr():  # noqa: ASYNC110 - another process
                await trio.sleep(0.05)
        assert (f"client-connection 'vhost-user-blk client of vu0' export-id=vu0 "
                f"client=pid {os.getpid()} node-names=t0 running in-flight=1 bytes=135168"
                in d.stderr())
    with trio.fail_after(20):
        while connections():  # noqa: ASYNC110 - polling the daemon is the test
            await trio.sleep(0.05)
