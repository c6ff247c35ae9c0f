"""The vduse-blk export: a virtio-blk device on the kernel's vDPA bus.

VDUSE (vDPA Device in Userspace) lets a process be a virtio device: the
export creates the device through ``/dev/vduse/control`` (VDUSE_CREATE_DEV
with its features and config space), opens ``/dev/vduse/<name>``, and
answers the kernel's messages on it (GET_VQ_STATE, SET_STATUS,
UPDATE_IOTLB); ``vdpa dev add name <name> mgmtdev vduse`` then attaches it,
and a driver (virtio_vdpa: a /dev/vdX) uses it. Options are QEMU 7.2's
BlockExportOptionsVduseBlk: ``name``, ``num-queues``, ``queue-size``,
``logical-block-size``, ``serial``, plus the common ``writable`` and
``writethrough``; the config space and features are those of QEMU's
block/export/vduse-blk.c (no CONFIG_WCE, seg_max = queue-size - 2).

Guest memory is what the driver mapped for DMA, in I/O virtual addresses
(IOVA). :class:`IotlbMemory` maps a range the first time a ring or buffer
touches it (VDUSE_IOTLB_GET_FD gives a descriptor, its offset and the
range's permissions) and forgets ranges an UPDATE_IOTLB message removes,
as libvduse does. The rings themselves are the shared split virtqueues of
exports/virtio/, and the requests the shared virtio-blk handler.

Tasks: :meth:`VduseBlkExport.serve` creates the device; its message loop
(:class:`VduseDevice`) runs in a task of its own, the export's
client-connection in the task tree (exports/virtio/export.py), waiting on
the device's descriptor. SET_STATUS with DRIVER_OK starts a worker task per
ready virtqueue (exports/virtio/dataplane.py) on its kick eventfd
(VDUSE_VQ_SETUP_KICKFD); completions are signalled with
VDUSE_VQ_INJECT_IRQ. A reset (status 0) stops the rings after their
requests in flight and drops every mapping.

Resources: the device is destroyed (VDUSE_DESTROY_DEV) and every
descriptor and mapping closed when the export ends; the kernel refuses
the destruction while the device is still on the vDPA bus, as it does
qemu-storage-daemon's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ..nodes.node import BdrvChild, BlockNode
from ..proto import vduse as V
from ..proto.vduse import (
    VDUSE_ACCESS_WO,
    VDUSE_API_VERSION,
    VDUSE_CREATE_DEV,
    VDUSE_DESTROY_DEV,
    VDUSE_DEV_GET_FEATURES,
    VDUSE_DEV_INJECT_CONFIG_IRQ,
    VDUSE_DEV_SET_CONFIG,
    VDUSE_EVENTFD_DEASSIGN,
    VDUSE_GET_VQ_STATE,
    VDUSE_IOTLB_GET_FD,
    VDUSE_NAME_MAX,
    VDUSE_REQ_RESULT_FAILED,
    VDUSE_REQ_RESULT_OK,
    VDUSE_SET_API_VERSION,
    VDUSE_SET_STATUS,
    VDUSE_UPDATE_IOTLB,
    VDUSE_VQ_GET_INFO,
    VDUSE_VQ_INJECT_IRQ,
    VDUSE_VQ_SETUP,
    VDUSE_VQ_SETUP_KICKFD,
)
from ..proto.vhost_user import MemRegion
from ..qapi.cstr import c_bytes
from ..qapi.errors import GenericError
from .base import register_export
from .virtio import memory as vmem
from .virtio.blk import (
    CONFIG,
    MAX_DISCARD_SECTORS,
    MAX_WRITE_ZEROES_SECTORS,
    SECTOR_BITS,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
)
from .virtio.dataplane import Device
from .virtio.export import VirtioBlkExport, check_block_size, check_num_queues
from .virtio.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_VERSION_1,
    InflightSplit,
    SplitQueue,
    VirtqueueError,
)

if TYPE_CHECKING:
    from ..daemon import Daemon

VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_ID_BLOCK = 2
VDUSE_VQ_ALIGN = 4096
DEFAULT_QUEUE_SIZE = 256
VIRTQUEUE_MAX_SIZE = 1024
MAX_IOVA_REGIONS = 256
# libvduse's reconnect log: per queue, the inflight region of
# VIRTQUEUE_MAX_SIZE descriptors (vhost-user's layout), 64-byte aligned
LOG_QUEUE_SIZE = (16 + 16 * VIRTQUEUE_MAX_SIZE + 63) & ~63
_DESC_NUM = struct.Struct("<H")
_ONE = (1).to_bytes(8, "little")


def virtio_features() -> int:
    """The transport features libvduse offers (vduse_get_virtio_features)."""
    return (1 << VIRTIO_F_ACCESS_PLATFORM | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_NOTIFY_ON_EMPTY | 1 << VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_F_INDIRECT_DESC)


def device_features(*, num_queues: int, writable: bool) -> int:
    """The feature bits QEMU 7.2's vduse-blk export creates its device with."""
    bits = (virtio_features() | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_BLK_SIZE | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES)
    if num_queues > 1:
        bits |= 1 << VIRTIO_BLK_F_MQ
    if not writable:
        bits |= 1 << VIRTIO_BLK_F_RO
    return bits


def config_space(*, capacity_bytes: int, queue_size: int, num_queues: int,
                 logical_block_size: int) -> bytes:
    """struct virtio_blk_config as QEMU 7.2's vduse-blk export fills it."""
    bs = logical_block_size
    return CONFIG.pack(
        capacity_bytes >> SECTOR_BITS, 0, queue_size - 2,
        0, 0, 0,  # geometry
        bs, 0, 0, 1, 1,  # blk_size, physical_block_exp, alignment_offset, min/opt io size
        0, 0, num_queues,  # writeback, unused0, num_queues
        MAX_DISCARD_SECTORS, 1, bs >> SECTOR_BITS,
        MAX_WRITE_ZEROES_SECTORS, 1, 0)


def _name_invalid(name: str) -> bool:
    # libvduse's vduse_name_is_invalid
    return len(c_bytes(name)) >= VDUSE_NAME_MAX or ".." in name


class IotlbRegion(vmem.MappedRegion):
    """One IOTLB range, mapped with the permissions the kernel gave it; a
    write to a range the device may only read is refused."""

    __slots__ = ("writable",)

    def __init__(self, fd: int, offset: int, start: int, last: int, perm: int):
        self.guest_addr = self.user_addr = start
        self.size = last - start + 1
        self.mmap_offset = offset
        self.writable = bool(perm & VDUSE_ACCESS_WO)
        # readable either way: x86 has no write-only pages
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        try:
            self._map = mmap.mmap(fd, offset + self.size, flags=mmap.MAP_SHARED, prot=prot)
        except (OSError, ValueError, OverflowError) as e:
            raise vmem.GuestMemoryError(f"cannot map IOVA range {start:#x}-{last:#x}: {e}") from None
        # MappedRegion.view slices this one (read-only where the range is)
        self._mv = memoryview(self._map)
        # (a range the device may only read has no address here, so no
        # GuestIovec: a READ into it fails through views, as it must)
        self.host = vmem.host_address(self._map, offset) if self.writable else 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise vmem.GuestMemoryError("write to an IOVA range the device may only read")
        super().write(offset, data)

    def pack_into(self, fmt: struct.Struct, offset: int, *values: Any) -> None:
        if not self.writable:
            raise vmem.GuestMemoryError("write to an IOVA range the device may only read")
        super().pack_into(fmt, offset, *values)


class IotlbMemory(vmem.GuestMemory):
    """The device's view of DMA memory: IOVA ranges mapped on first use
    (VDUSE_IOTLB_GET_FD). IOVAs stand for both kinds of address the
    virtqueue code translates (guest-physical and front-end)."""

    def __init__(self, dev_fd: int):
        super().__init__(max_regions=MAX_IOVA_REGIONS)
        self.dev_fd = dev_fd

    def _fault(self, iova: int) -> bool:
        """Map the IOTLB range holding ``iova``; False if there is none."""
        buf = V.iotlb_query(iova)
        try:
            fd = fcntl.ioctl(self.dev_fd, VDUSE_IOTLB_GET_FD, buf, True)
        except OSError:
            return False
        try:
            offset, start, last, perm = V.iotlb_entry(buf)
            if not start <= iova <= last or len(self.regions) >= self.max_regions:
                return False
            for r in self.regions:
                if start < r.guest_addr + r.size and r.guest_addr <= last:
                    return False
            self.regions.append(IotlbRegion(fd, offset, start, last, perm))
            return True
        finally:
            os.close(fd)

    def _covered(self, addr: int) -> bool:
        return any(0 <= addr - r.guest_addr < r.size for r in self.regions)

    def gpa_segments(self, addr: int, length: int) -> list[vmem.Segment]:
        pos, end = addr, addr + length
        while pos < end:
            if not self._covered(pos) and not self._fault(pos):
                raise vmem.GuestMemoryError(f"IOVA {pos:#x} is not mapped")
            r = next(r for r in self.regions if 0 <= pos - r.guest_addr < r.size)
            pos = r.guest_addr + r.size
        return super().gpa_segments(addr, length)

    def gpa_region(self, addr: int, length: int) -> tuple[vmem.MappedRegion, int]:
        if not self._covered(addr):
            self._fault(addr)
        return super().gpa_region(addr, length)

    def uva_region(self, addr: int, length: int) -> tuple[vmem.MappedRegion, int]:
        return self.gpa_region(addr, length)

    def forget(self, start: int, last: int) -> None:
        """UPDATE_IOTLB: unmap the ranges inside [start, last]; they are
        looked up again on their next use."""
        if start == last:
            return
        keep = []
        for r in self.regions:
            if start <= r.guest_addr and r.guest_addr + r.size - 1 <= last:
                r.close()
            else:
                keep.append(r)
        self.regions = keep

    def add_region(self, desc: MemRegion, fd: int) -> None:
        raise vmem.GuestMemoryError("VDUSE memory comes from the IOTLB only")


class VduseDevice(Device):
    """The kernel's side: ``/dev/vduse/<name>``, its messages and rings."""

    def __init__(self, export: VduseBlkExport, fd: int, log: mmap.mmap):
        super().__init__(export.handler, export.num_queues)
        self.export = export
        self.fd = fd
        self.log = log
        self.mem = IotlbMemory(fd)
        self.kick_fds = [-1] * export.num_queues
        # where each stopped ring is (GET_VQ_STATE)
        self.last_avail_idx = [0] * export.num_queues
        self.features = 0

    # -- messages ----------------------------------------------------------------------
    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                # a device a previous daemon left running (reconnect): its
                # ready rings go on from where the reconnect log says
                await self._start()
                while True:
                    await trio.lowlevel.wait_readable(self.fd)
                    try:
                        msg = os.read(self.fd, V.MSG_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        # the device is unusable; it stays until the export ends
                        print(f"Read request error: {e.strerror}", file=sys.stderr, flush=True)
                        await trio.sleep_forever()
                    if len(msg) != V.MSG_SIZE:
                        print(f"Read request error [{len(msg)}]", file=sys.stderr, flush=True)
                        continue
                    try:
                        reply = await self._handle(msg)
                    except OSError as e:
                        # an ioctl the kernel refused: the request fails
                        print(f"vduse request failed: {e.strerror}", file=sys.stderr, flush=True)
                        reply = V.response(V.decode_request(msg).request_id,
                                           VDUSE_REQ_RESULT_FAILED)
                    try:
                        os.write(self.fd, reply)
                    except OSError as e:
                        print(f"Write request error: {e.strerror}", file=sys.stderr, flush=True)
        finally:
            for index in range(len(self.kick_fds)):
                self._close_kick(index)
            self.mem.close()

    async def _handle(self, msg: bytes) -> bytes:
        kind, request_id, body = V.decode_request(msg)
        result = VDUSE_REQ_RESULT_OK
        state = b""
        if kind == VDUSE_GET_VQ_STATE:
            index = V.vq_state_index(body)
            if index < len(self.workers):
                worker = self.workers[index]
                idx = (worker.queue.last_avail_idx if worker is not None
                       else self.last_avail_idx[index])
                state = V.vq_state(index, idx)
            else:
                result = VDUSE_REQ_RESULT_FAILED
        elif kind == VDUSE_SET_STATUS:
            status = V.status(body)
            if status & VIRTIO_CONFIG_S_DRIVER_OK:
                await self._start()
            elif status == 0:
                await self._stop()
        elif kind == VDUSE_UPDATE_IOTLB:
            start, last = V.iova_range(body)
            self.mem.forget(start, last)
            for worker in self.workers:
                if worker is not None:
                    try:
                        worker.queue.remap()
                    except VirtqueueError as e:
                        print(f"Failed to update vring for vq[{worker.index}]: {e}",
                              file=sys.stderr, flush=True)
        else:
            result = VDUSE_REQ_RESULT_FAILED
        return V.response(request_id, result, state)

    # -- the dataplane -------------------------------------------------------------------
    async def _start(self) -> None:
        buf = bytearray(8)
        fcntl.ioctl(self.fd, VDUSE_DEV_GET_FEATURES, buf, True)
        self.features = V.features(buf)
        for index, worker in enumerate(self.workers):
            if worker is None:
                await self._enable(index)

    async def _enable(self, index: int) -> None:
        info = V.vq_info_query(index)
        try:
            fcntl.ioctl(self.fd, VDUSE_VQ_GET_INFO, info, True)
        except OSError as e:
            print(f"Failed to get vq[{index}] info: {e.strerror}", file=sys.stderr, flush=True)
            return
        num, desc, driver, device, avail_idx, ready = V.vq_info(info)
        if not ready:
            return
        f = self.features
        try:
            queue = SplitQueue(self.mem, size=num, desc_addr=desc, avail_addr=driver,
                               used_addr=device, last_avail_idx=avail_idx,
                               event_idx=bool(f & 1 << VIRTIO_F_EVENT_IDX),
                               indirect=bool(f & 1 << VIRTIO_F_INDIRECT_DESC),
                               notify_on_empty=bool(f & 1 << VIRTIO_F_NOTIFY_ON_EMPTY))
            # chains a previous daemon took and never answered (libvduse's
            # vduse_queue_check_inflights), and the tracking of those taken now
            resubmit = queue.attach_inflight(InflightSplit(
                self.log, index * LOG_QUEUE_SIZE, VIRTQUEUE_MAX_SIZE, versioned=False))
        except VirtqueueError as e:
            print(f"Failed to update vring for vq[{index}]: {e}", file=sys.stderr, flush=True)
            return
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            fcntl.ioctl(self.fd, VDUSE_VQ_SETUP_KICKFD, V.vq_eventfd(index, kick))
        except OSError as e:
            os.close(kick)
            print(f"Failed to setup kick fd for vq[{index}]: {e.strerror}",
                  file=sys.stderr, flush=True)
            return
        self.kick_fds[index] = kick
        # a kick that came before the descriptor was set up is not lost
        os.write(kick, _ONE)
        await self.start_queue(index, queue, kick, signal=partial(self._inject, index),
                               resubmit=resubmit)

    async def _stop(self) -> None:
        """A reset: stop every ring after its requests in flight, forget
        every mapping."""
        await self.quiesce()
        for index in range(len(self.workers)):
            base = await self.stop_queue(index)
            if base is not None:
                self.last_avail_idx[index] = base
            self._close_kick(index, deassign=True)
        self.features = 0
        self.mem.close()

    def _close_kick(self, index: int, deassign: bool = False) -> None:
        fd, self.kick_fds[index] = self.kick_fds[index], -1
        if fd < 0:
            return
        if deassign:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, VDUSE_VQ_SETUP_KICKFD,
                            V.vq_eventfd(index, VDUSE_EVENTFD_DEASSIGN))
        trio.lowlevel.notify_closing(fd)
        os.close(fd)

    def panic(self, text: str) -> None:
        # libvduse prints and stops using the element; the ring stops here
        print(f"qsd-trio: vduse-blk export '{self.export.id}': {text}",
              file=sys.stderr, flush=True)

    def _inject(self, index: int) -> None:
        """The used-buffer interrupt (the worker asks when the driver wants one)."""
        try:
            fcntl.ioctl(self.fd, VDUSE_VQ_INJECT_IRQ, V.u32(index))
        except OSError as e:
            print(f"Error inject irq for vq {index}: {e.strerror}", file=sys.stderr, flush=True)


@register_export
class VduseBlkExport(VirtioBlkExport):
    type = "vduse-blk"
    device: VduseDevice | None

    def __init__(self, daemon: Daemon, args: Any, node: BlockNode) -> None:
        # the option checks in QEMU's order
        num_queues = check_num_queues(args.num_queues)
        queue_size = DEFAULT_QUEUE_SIZE
        if args.queue_size is not None:
            queue_size = args.queue_size
            if queue_size <= 2 or queue_size & (queue_size - 1) or queue_size > VIRTQUEUE_MAX_SIZE:
                raise GenericError("queue-size is invalid")
        block_size = check_block_size(args.id, args.logical_block_size)
        super().__init__(daemon, args, node, num_queues=num_queues, logical_block_size=block_size,
                         serial=args.serial if args.serial is not None else "")
        self.name: str = args.name
        self.queue_size = queue_size

    def child_resized(self, edge: BdrvChild) -> None:
        """block_resize (vduse_blk_resize): the config space's capacity is
        rewritten with VDUSE_DEV_SET_CONFIG and the driver told with
        VDUSE_DEV_INJECT_CONFIG_IRQ (libvduse's vduse_dev_update_config);
        a refused ioctl is reported on stderr, the resize stands."""
        device = self.device
        if device is None:
            return
        capacity = V.u64(edge.node.length >> SECTOR_BITS)
        try:
            fcntl.ioctl(device.fd, VDUSE_DEV_SET_CONFIG, V.config_data(0, capacity))
            fcntl.ioctl(device.fd, VDUSE_DEV_INJECT_CONFIG_IRQ)
        except OSError as e:
            print(f"Failed to update vduse device {self.name} config: {e.strerror}",
                  file=sys.stderr, flush=True)

    def _create(self) -> tuple[int, int, mmap.mmap]:
        """VDUSE_CREATE_DEV and open the device, as libvduse's
        vduse_dev_create, then map the reconnect log; its messages go to
        stderr as libvduse prints them, and the error is QEMU's.  A device
        that exists already (a daemon before this one died) is taken over.

        Returns the control and device descriptors and the log.
        """
        failed = GenericError("failed to create vduse device")
        name = self.name
        if _name_invalid(name):
            print("Invalid parameter for vduse", file=sys.stderr, flush=True)
            raise failed
        try:
            ctrl = os.open("/dev/vduse/control", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            print(f"Failed to open /dev/vduse/control: {e.strerror}", file=sys.stderr, flush=True)
            raise failed from None
        dev = -1
        try:
            try:
                fcntl.ioctl(ctrl, VDUSE_SET_API_VERSION, V.u64(VDUSE_API_VERSION))
            except OSError as e:
                print(f"Failed to set api version {VDUSE_API_VERSION}: {e.strerror}",
                      file=sys.stderr, flush=True)
                raise failed from None
            config = config_space(capacity_bytes=self.node.length, queue_size=self.queue_size,
                                  num_queues=self.num_queues,
                                  logical_block_size=self.logical_block_size)
            features = device_features(num_queues=self.num_queues, writable=self.writable)
            try:
                fcntl.ioctl(ctrl, VDUSE_CREATE_DEV,
                            V.dev_config(name, VIRTIO_ID_BLOCK, features, self.num_queues,
                                         VDUSE_VQ_ALIGN, config))
            except OSError as e:
                if e.errno != errno.EEXIST:
                    print(f"Failed to create vduse device {name}: {e.strerror}",
                          file=sys.stderr, flush=True)
                    raise failed from None
            try:
                dev = os.open(f"/dev/vduse/{name}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                fcntl.ioctl(dev, VDUSE_DEV_GET_FEATURES, bytearray(8), True)
                for i in range(self.num_queues):
                    fcntl.ioctl(dev, VDUSE_VQ_SETUP, V.vq_config(i, self.queue_size))
            except OSError as e:
                print(f"Failed to init vduse device {name}: {e.strerror}",
                      file=sys.stderr, flush=True)
                if dev >= 0:
                    os.close(dev)
                self._destroy(ctrl)
                raise failed from None
            try:
                log = self._open_log()
            except OSError:
                print("Failed to get vduse log", file=sys.stderr, flush=True)
                os.close(dev)
                self._destroy(ctrl)
                raise GenericError("failed to set reconnect log file") from None
        except BaseException:
            os.close(ctrl)
            raise
        return ctrl, dev, log

    @property
    def log_path(self) -> str:
        """Where QEMU 7.2 keeps the device's reconnect log (g_get_tmp_dir)."""
        return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"vduse-blk-{self.name}")

    def _open_log(self) -> mmap.mmap:
        """The reconnect log, as libvduse's vduse_set_reconnect_log_file:
        the file created, or kept as a previous daemon left it, at its size
        (every queue's region), mapped shared; each region's desc_num set.
        qemu-storage-daemon and qsd-trio read each other's."""
        fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = LOG_QUEUE_SIZE * self.num_queues
            os.ftruncate(fd, size)
            log = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        for i in range(self.num_queues):
            _DESC_NUM.pack_into(log, i * LOG_QUEUE_SIZE + 10, VIRTQUEUE_MAX_SIZE)
        return log

    def _destroy(self, ctrl: int) -> bool:
        """VDUSE_DESTROY_DEV; False when the kernel refused: EBUSY while
        the device is still on the vDPA bus (it stays for the next daemon)."""
        try:
            fcntl.ioctl(ctrl, VDUSE_DESTROY_DEV, V.dev_name(self.name))
        except OSError as e:
            return e.errno != errno.EBUSY
        return True

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        """Create the device, report started, answer its messages until
        cancelled (block-export-del, quit); a device whose descriptor
        failed stays, unused, until then."""
        ctrl, dev, log = self._create()
        try:
            device = VduseDevice(self, dev, log)
            task_status.started()
            await self.serve_device(device, f"/dev/vduse/{self.name}")
            await trio.sleep_forever()
        finally:
            trio.lowlevel.notify_closing(dev)
            os.close(dev)
            if self._destroy(ctrl):
                # the device is gone: nothing left to reconnect to (as QEMU)
                with contextlib.suppress(OSError):
                    os.unlink(self.log_path)
            with contextlib.suppress(BufferError):
                log.close()
            os.close(ctrl)
