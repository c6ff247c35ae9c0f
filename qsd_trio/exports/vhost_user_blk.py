"""The vhost-user-blk export: a virtio-blk device served to a VM's front-end.

QEMU (the front-end) connects to a unix socket, shares guest memory and the
virtqueues over the vhost-user protocol (proto/vhost_user.py), and kicks
eventfds when the guest adds requests; this back-end runs the requests
(exports/virtio/) on the export's node and signals the call eventfds.
Options are QEMU 7.2's BlockExportOptionsVhostUserBlk: ``addr`` (``unix``
or ``fd``), ``logical-block-size``, ``num-queues``, plus the common
``writable`` and ``writethrough``.

Tasks: :meth:`VhostUserBlkExport.serve` owns the listener and serves one
front-end at a time, as QEMU does (others wait in the listen backlog).
A connection (:class:`FrontEnd`) is a task of its own, the export's
client-connection in the task tree (exports/virtio/export.py): the message
loop, and a nursery with one task per started virtqueue
(exports/virtio/dataplane.py).  A front-end that breaks the protocol or a
ring is answered as libvhost-user's ``vu_panic`` answers it: a
``vu_panic:`` line on stderr and the connection dropped; the export
listens on for the next front-end.

Resources: every descriptor a message brings is closed when the
connection ends (or earlier, when replaced); guest memory is unmapped once
the ring tasks are gone; the socket file is removed when the export ends.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import mmap
import os
import socket as _stdsocket
import stat
import struct
import sys
from typing import Any

import trio

from .. import activation
from ..nodes.node import BdrvChild, BlockNode
from ..proto import vhost_user as vu
from ..qapi.errors import GenericError
from .base import register_export
from .virtio import memory as vmem
from .virtio.dataplane import Device
from .virtio.export import VirtioBlkExport, check_block_size, check_num_queues
from .virtio.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    Chain,
    InflightSplit,
    SplitQueue,
    VirtqueueError,
    inflight_queue_size,
)

PF = vu.ProtocolFeature
# what this back-end implements of QEMU 7.2's offer (which also has
# LOG_SHMFD, PAGEFAULT, HOST_NOTIFIER and BACKEND_SEND_FD), and
# INFLIGHT_SHMFD, which QEMU 7.2's export does not offer
PROTOCOL_FEATURES = (1 << PF.MQ | 1 << PF.REPLY_ACK | 1 << PF.BACKEND_REQ
                     | 1 << PF.CONFIG | 1 << PF.CONFIGURE_MEM_SLOTS | 1 << PF.INFLIGHT_SHMFD)
_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = _stdsocket.CMSG_SPACE(vu.MAX_FDS * _FD_SIZE)
_ONE = (1).to_bytes(8, "little")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class VuPanic(Exception):
    """The front-end broke the protocol: the device is broken."""


def _close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Vring:
    """One virtqueue's vhost-user state: what the front-end set (the
    device's worker serves it once started)."""

    def __init__(self, index: int):
        self.index = index
        self.size = 0
        self.base = 0
        self.addr: vu.VringAddr | None = None
        self.kick_fd = -1
        self.call_fd = -1
        self.enabled = False

    def signal(self) -> None:
        """Write the call eventfd (a full counter is still a pending call)."""
        if self.call_fd >= 0:
            try:  # (not contextlib.suppress: three calls more, once a batch)
                os.write(self.call_fd, _ONE)
            except OSError:
                pass

    def set_call(self, fd: int) -> None:
        old, self.call_fd = self.call_fd, fd
        if old >= 0:
            _close_fds([old])

    def close_kick(self) -> None:
        fd, self.kick_fd = self.kick_fd, -1
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)
            _close_fds([fd])


class FrontEnd(Device):
    """One connected front-end: the message loop and the virtqueues.

    :meth:`serve` returns when the front-end hangs up or is dropped for a
    protocol error (after printing ``vu_panic: ...``); every descriptor it
    sent is closed and guest memory unmapped by then.
    """

    def __init__(self, export: VhostUserBlkExport, sock: trio.socket.SocketType):
        super().__init__(export.handler, export.num_queues)
        self.export = export
        self.sock = sock
        self.features = 0
        self.protocol_features = 0
        self.mem = vmem.GuestMemory()
        self.vrings = [Vring(i) for i in range(export.num_queues)]
        self.backend_fd = -1
        # the inflight buffer (SET_INFLIGHT_FD): mapping, where the queue
        # regions start, how many and of what queue size
        self.inflight: mmap.mmap | None = None
        self.inflight_offset = 0
        self.inflight_queues = 0
        self.inflight_queue_size = 0
        self.broken = False

    # -- lifecycle ----------------------------------------------------------------------
    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    await self._message_loop()
                except VuPanic as e:
                    self.panic(str(e))
                nursery.cancel_scope.cancel()
        finally:
            for vring in self.vrings:
                vring.close_kick()
                vring.set_call(-1)
            if self.backend_fd >= 0:
                _close_fds([self.backend_fd])
                self.backend_fd = -1
            if self.inflight is not None:
                self.inflight.close()
                self.inflight = None
            self.mem.close()
            self.sock.close()

    def panic(self, text: str) -> None:
        """libvhost-user's vu_panic: report, mark broken, drop the front-end."""
        if not self.broken:
            self.broken = True
            print(f"qsd-trio: vu_panic: {text}", file=sys.stderr, flush=True)
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    # -- the socket -----------------------------------------------------------------------
    async def _recv_exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            more = await self.sock.recv(n - len(data))
            if not more:
                return None
            data += more
        return data

    async def _recv_message(self) -> vu.Message | None:
        """The next message with its descriptors, None at EOF.

        Raises:
            VuPanic: a malformed message (its descriptors are closed).
        """
        data, ancdata, msg_flags, _ = await self.sock.recvmsg(
            vu.HEADER_SIZE, _ANC_SIZE, _stdsocket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == _stdsocket.SOL_SOCKET and kind == _stdsocket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[:len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(arr)
        try:
            if not data:
                _close_fds(fds)
                return None
            if msg_flags & _stdsocket.MSG_CTRUNC:
                raise VuPanic("too many file descriptors with a message")
            if len(data) < vu.HEADER_SIZE:
                rest = await self._recv_exactly(vu.HEADER_SIZE - len(data))
                if rest is None:
                    _close_fds(fds)
                    return None
                data += rest
            header = vu.decode_header(data)
            payload = await self._recv_exactly(header.size) if header.size else b""
            if payload is None:
                _close_fds(fds)
                return None
            message = vu.decode_message(header, payload, fds)
        except vu.MessageError as e:
            _close_fds(fds)
            raise VuPanic(str(e)) from None
        except BaseException:
            _close_fds(fds)
            raise
        _close_fds(message.unused_fds)
        return message

    async def _send(self, data: bytes, fd: int = -1) -> None:
        view = memoryview(data)
        if fd >= 0:
            # the descriptor goes with the first byte of the message
            anc = [(_stdsocket.SOL_SOCKET, _stdsocket.SCM_RIGHTS, array.array("i", [fd]))]
            n = await self.sock.sendmsg([view], anc)
            view = view[n:]
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    # -- messages -------------------------------------------------------------------------
    async def _message_loop(self) -> None:
        while True:
            message = await self._recv_message()
            if message is None:
                return
            try:
                reply = await self._handle(message)
            except BaseException:
                _close_fds(message.fds)
                raise
            if reply is None and message.need_reply:
                # REPLY_ACK: libvhost-user acknowledges any message that
                # asks, whether or not the feature was negotiated
                reply = vu.reply_u64(message.request, 0)
            if reply is not None:
                await self._send(reply)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise VuPanic(f"Invalid queue index: {index}")
        return self.vrings[index]

    async def _handle(self, m: vu.Message) -> bytes | None:
        R = vu.Request
        req = m.request
        p = m.payload
        handler = self.export.handler
        if req == R.GET_FEATURES:
            features = (handler.features() | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
                        | 1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            return vu.reply_u64(req, features)
        if req == R.SET_FEATURES:
            assert isinstance(p, int)
            self.features = p
            if not p & 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES:
                for vring in self.vrings:
                    vring.enabled = True
            return None
        if req == R.GET_PROTOCOL_FEATURES:
            return vu.reply_u64(req, PROTOCOL_FEATURES)
        if req == R.SET_PROTOCOL_FEATURES:
            assert isinstance(p, int)
            self.protocol_features = p & PROTOCOL_FEATURES
            return None
        if req == R.SET_OWNER:
            return None
        if req == R.RESET_OWNER:
            for vring in self.vrings:
                await self._stop_ring(vring)
            return None
        if req == R.GET_QUEUE_NUM:
            return vu.reply_u64(req, len(self.vrings))
        if req == R.GET_MAX_MEM_SLOTS:
            return vu.reply_u64(req, vmem.MAX_MEM_SLOTS)
        if req == R.SET_MEM_TABLE:
            assert isinstance(p, vu.MemTable)
            try:
                self.mem.set_table(p.regions, m.fds)
            except vmem.GuestMemoryError as e:
                raise VuPanic(f"SET_MEM_TABLE: {e}") from None
            finally:
                _close_fds(m.fds)
            self._remap()
            return None
        if req == R.ADD_MEM_REG:
            assert isinstance(p, vu.MemRegion)
            try:
                self.mem.add_region(p, m.fds[0])
            except vmem.GuestMemoryError as e:
                raise VuPanic(f"ADD_MEM_REG: {e}") from None
            finally:
                _close_fds(m.fds)
            return None
        if req == R.REM_MEM_REG:
            assert isinstance(p, vu.MemRegion)
            try:
                self.mem.remove_region(p)
            except vmem.GuestMemoryError as e:
                raise VuPanic(f"REM_MEM_REG: {e}") from None
            self._remap()
            return None
        if req == R.SET_VRING_NUM:
            assert isinstance(p, vu.VringState)
            self._vring(p.index).size = p.num
            return None
        if req == R.SET_VRING_ADDR:
            assert isinstance(p, vu.VringAddr)
            self._vring(p.index).addr = p
            return None
        if req == R.SET_VRING_BASE:
            assert isinstance(p, vu.VringState)
            self._vring(p.index).base = p.num & 0xFFFF
            return None
        if req == R.GET_VRING_BASE:
            assert isinstance(p, vu.VringState)
            vring = self._vring(p.index)
            await self._stop_ring(vring)
            vring.set_call(-1)
            return vu.reply_vring_state(req, vring.index, vring.base)
        if req == R.SET_VRING_KICK:
            assert isinstance(p, vu.VringFile)
            vring = self._vring(p.index)
            if p.nofd:
                raise VuPanic(f"queue {p.index}: polling (no kick descriptor) is not supported")
            await self._stop_ring(vring)
            vring.kick_fd = m.fds[0]
            await self._start_ring(vring)
            return None
        if req == R.SET_VRING_CALL:
            assert isinstance(p, vu.VringFile)
            vring = self._vring(p.index)
            vring.set_call(-1 if p.nofd else m.fds[0])
            return None
        if req == R.SET_VRING_ERR:
            assert isinstance(p, vu.VringFile)
            self._vring(p.index)
            # errors are never signalled: the descriptor is not kept
            _close_fds(m.fds)
            return None
        if req == R.SET_VRING_ENABLE:
            assert isinstance(p, vu.VringState)
            # tracked; a started ring is processed either way, as
            # libvhost-user's block device does
            self._vring(p.index).enabled = bool(p.num)
            return None
        if req == R.GET_CONFIG:
            assert isinstance(p, vu.ConfigSpace)
            return vu.reply_config(p, handler.read_config(p.offset, p.size))
        if req == R.SET_CONFIG:
            assert isinstance(p, vu.ConfigSpace)
            ok = handler.write_config(p.offset, p.data, p.flags)
            if m.need_reply:
                return vu.reply_u64(req, 0 if ok else 1)
            return None
        if req == R.GET_INFLIGHT_FD:
            assert isinstance(p, vu.Inflight)
            await self._get_inflight_fd(p)
            return None
        if req == R.SET_INFLIGHT_FD:
            assert isinstance(p, vu.Inflight)
            try:
                self._set_inflight_fd(p, m.fds[0])
            finally:
                _close_fds(m.fds)
            return None
        if req == R.SET_BACKEND_REQ_FD:
            if self.backend_fd >= 0:
                _close_fds([self.backend_fd])
            self.backend_fd = m.fds[0]
            try:
                os.set_blocking(self.backend_fd, False)
            except OSError as e:
                raise VuPanic(f"SET_BACKEND_REQ_FD: {e}") from None
            return None
        _close_fds(m.fds)
        raise VuPanic(f"Unhandled request: {req}")

    # -- the back-end channel -----------------------------------------------------------
    def config_changed(self) -> None:
        """Tell the front-end the config space changed (libvhost-user's
        vu_config_change_msg): CONFIG_CHANGE_MSG on the back-end channel
        (SET_BACKEND_REQ_FD), without asking for a reply; nothing without
        that channel."""
        if self.backend_fd < 0 or self.nursery is None:
            return
        msg = vu.encode_backend_request(vu.BackendRequest.CONFIG_CHANGE_MSG)
        self.nursery.start_soon(self._send_backend, self.backend_fd, msg)

    async def _send_backend(self, fd: int, msg: bytes) -> None:
        view = memoryview(msg)
        while view:
            if fd != self.backend_fd:
                return  # replaced or closed meanwhile
            try:
                n = os.write(fd, view)
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as e:
                # the front-end closed its end: it learns of the new size
                # from GET_CONFIG when it asks again
                print(f"qsd-trio: vhost-user-blk: CONFIG_CHANGE_MSG not sent: {e.strerror}",
                      file=sys.stderr, flush=True)
                return
            view = view[n:]

    # -- inflight I/O tracking ---------------------------------------------------------
    def _check_inflight_shape(self, p: vu.Inflight) -> int:
        qs = p.queue_size
        if not 1 <= p.num_queues <= len(self.vrings) or not 0 < qs <= 32768 or qs & (qs - 1):
            raise VuPanic(f"invalid inflight buffer: {p.num_queues} queues of size {qs}")
        return inflight_queue_size(qs) * p.num_queues

    async def _get_inflight_fd(self, p: vu.Inflight) -> None:
        """GET_INFLIGHT_FD: a zeroed memfd for the front-end to keep and
        give back (SET_INFLIGHT_FD), sealed against resizing."""
        size = self._check_inflight_shape(p)
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            reply = vu.reply_inflight(vu.Inflight(size, 0, p.num_queues, p.queue_size))
            await self._send(reply, fd)
        finally:
            os.close(fd)

    def _set_inflight_fd(self, p: vu.Inflight, fd: int) -> None:
        if any(w is not None for w in self.workers):
            # the running rings write to the buffer being replaced
            raise VuPanic("SET_INFLIGHT_FD while a ring is running")
        need = self._check_inflight_shape(p)
        if p.mmap_size < need:
            raise VuPanic(f"inflight buffer of {p.mmap_size} bytes, {need} needed")
        st = os.fstat(fd)
        end = p.mmap_offset + p.mmap_size
        if not stat.S_ISREG(st.st_mode) or st.st_size < end:
            raise VuPanic("inflight buffer descriptor is not a file of its size")
        try:
            mapping = mmap.mmap(fd, end, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise VuPanic(f"cannot map the inflight buffer: {e}") from None
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = mapping
        self.inflight_offset = p.mmap_offset
        self.inflight_queues = p.num_queues
        self.inflight_queue_size = p.queue_size

    # -- virtqueues --------------------------------------------------------------------
    def _remap(self) -> None:
        for worker in self.workers:
            if worker is not None:
                try:
                    worker.queue.remap()
                except VirtqueueError as e:
                    raise VuPanic(f"queue {worker.index}: {e}") from None

    async def _start_ring(self, vring: Vring) -> None:
        if vring.addr is None:
            raise VuPanic(f"queue {vring.index} kicked before its addresses were set")
        try:
            queue = SplitQueue(
                self.mem, size=vring.size, desc_addr=vring.addr.desc,
                avail_addr=vring.addr.avail, used_addr=vring.addr.used,
                last_avail_idx=vring.base,
                event_idx=bool(self.features & 1 << VIRTIO_F_EVENT_IDX),
                indirect=bool(self.features & 1 << VIRTIO_F_INDIRECT_DESC),
                notify_on_empty=bool(self.features & 1 << VIRTIO_F_NOTIFY_ON_EMPTY))
            resubmit: list[Chain] = []
            if self.inflight is not None and vring.index < self.inflight_queues:
                qs = self.inflight_queue_size
                region = InflightSplit(
                    self.inflight, self.inflight_offset + vring.index * inflight_queue_size(qs), qs)
                resubmit = queue.attach_inflight(region)
        except VirtqueueError as e:
            raise VuPanic(f"queue {vring.index}: {e}") from None
        await self.start_queue(vring.index, queue, vring.kick_fd, signal=vring.signal,
                               resubmit=resubmit)

    async def _stop_ring(self, vring: Vring) -> None:
        """Stop taking requests from the ring, let those in flight finish,
        and keep where it stopped as the ring's base."""
        base = await self.stop_queue(vring.index)
        if base is not None:
            vring.base = base
        vring.close_kick()


@register_export
class VhostUserBlkExport(VirtioBlkExport):
    type = "vhost-user-blk"
    device: FrontEnd | None

    def __init__(self, daemon: Any, args: Any, node: BlockNode):
        addr = args.addr
        kind: str = addr.type.value
        if kind not in ("unix", "fd"):
            raise GenericError("Only socket address types 'unix' and 'fd' are supported")
        block_size = check_block_size(args.id, args.logical_block_size)
        super().__init__(daemon, args, node, num_queues=check_num_queues(args.num_queues),
                         logical_block_size=block_size, serial="vhost_user_blk")
        self.addr_type = kind
        self.path: str | None = addr.path if kind == "unix" else None
        self.fd_str: str | None = addr.str if kind == "fd" else None

    def child_resized(self, edge: BdrvChild) -> None:
        """block_resize (vu_blk_exp_resize): GET_CONFIG answers the new
        capacity from the node's length; the front-end is told to ask."""
        if self.device is not None:
            self.device.config_changed()

    def _listen(self) -> trio.socket.SocketType:
        if self.path is not None:
            sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                sock.bind(self.path)
                sock.listen(1)
            except OSError as e:
                sock.close()
                raise GenericError(f"Failed to bind socket to {self.path}: {e.strerror}") from None
        else:
            assert self.fd_str is not None
            # a number, or the name of a socket-activated descriptor
            fd = activation.socket_fd(self.fd_str, f"Unable to parse FD number {self.fd_str}")
            try:
                is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
            except OSError:
                is_socket = False
            if not is_socket:
                raise GenericError(f"File descriptor '{fd}' is not a socket")
            sock = _stdsocket.socket(fileno=fd)
        sock.setblocking(False)
        return trio.socket.from_stdlib_socket(sock)

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        """Listen, report started, serve front-ends one at a time until
        cancelled (block-export-del, quit)."""
        listener = self._listen()
        try:
            task_status.started()
            await self.daemon.accepting.wait()
            while True:
                sock, _ = await listener.accept()
                await self.serve_device(FrontEnd(self, sock), _peer(sock))
        finally:
            listener.close()
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


def _peer(sock: trio.socket.SocketType) -> str:
    """The front-end, for the task tree: its process (SO_PEERCRED), as a
    unix socket's peer has no address."""
    try:
        pid, _, _ = _UCRED.unpack(sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_PEERCRED,
                                                  _UCRED.size))
    except OSError:
        return "unix"
    return f"pid {pid}"
