"""A thin ctypes layer over librados/librbd's stable C API, for driver=rbd.

Why ctypes and not the Ceph project's Python bindings (python3-rbd,
python3-rados): those are Debian extension modules in Debian's
dist-packages, built for Debian's CPython 3.11 ABI.  The project's venv is
made from a CPython that is not Debian's, so they are not on its path, and
``--system-site-packages`` does not add them (it adds the base
interpreter's site-packages, not Debian's).  They do import once that
folder is put on the path (checked with the venv's 3.11), but that needs a
link step in the venv that breaks as soon as the venv's Python is not 3.11,
and recreating the venv from /usr/bin/python3 would tie every driver to
Debian's interpreter for one optional driver.  The C API of librbd.so.1 /
librados.so.2 is stable (the symbols used here exist since Luminous), needs
nothing but the shared libraries (Debian's librbd1, which qemu-block-extra
already pulls in), and gives what the driver wants: asynchronous requests
(``rbd_aio_*``) whose completion callback runs on a librbd thread.  The
bindings' own aio calls complete the same way, so they would save nothing.

Completions: each image hands its finished requests to an eventfd
(librbd's ``rbd_set_image_notification``), and a trio system task, the
image's :class:`Reaper` (an I/O engine of engine/base.py), waits on it and
collects them with ``rbd_poll_io_events``, many per wakeup, waking the
tasks that wait for them or calling the callbacks of requests started
without a task; those run inside the engine's batch, so an exporter
answers a whole batch with one sendmsg.  A submission first handles the
completions that have arrived meanwhile (Reaper.reap_pending), saving the
reaper task a wakeup of the event loop.  Writes an NBD reader starts while
it holds submissions (engine/base.py's hold_submissions) go to librbd
together when it submits them, before it waits (Image._submit_pending).  The completions have no callback
and no argument (the reaper knows a request by its completion's address):
no Python runs on librbd's threads, which would have to take the GIL from
the event loop for every request.  No thread per request, no polling, and
no ctypes object made per request.  Write data is handed to librbd where
it lies (a ``bytes`` object, or a writable buffer by its address, kept
alive until the request completes), and reads land straight in pool
buffers (engine/buffers.py), the ones an NBD export sends from.

If librbd is not installed, :func:`load` raises :class:`RbdUnavailable`
with a clear message; nothing is loaded before a node of driver=rbd opens,
so the daemon and every other driver work without Ceph.

Resources: a :class:`Cluster` owns a rados handle and an I/O context, an
:class:`Image` an rbd image handle; both have ``close()``.  Errors are
raised as ``OSError(errno, strerror)`` from the negative return codes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
from collections.abc import Callable
from typing import Any, cast

import outcome
import trio

from ..qapi.cstr import c_bytes
from .engine import Engines, buffers
from .engine import base as engine_base
from .engine.base import Engine

_c_void_p = ctypes.c_void_p
_u64 = ctypes.c_uint64
_size_t = ctypes.c_size_t
_current_task = trio.lowlevel.current_task
_addressof = ctypes.addressof
_from_buffer = ctypes.c_char.from_buffer
_reschedule = trio.lowlevel.reschedule
_wait = trio.lowlevel.wait_task_rescheduled

RBD_FEATURE_FAST_DIFF = 1 << 4
RBD_FLAG_FAST_DIFF_INVALID = 1 << 1
# rbd_aio_write_zeroes' zero_flags: allocate the zeroes instead of a hole
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1 << 0
# rbd_set_image_notification's type: the fd is an eventfd
EVENT_TYPE_EVENTFD = 2
# completions collected by one rbd_poll_io_events call
POLL_BATCH = 64


class RbdUnavailable(Exception):
    """librbd/librados could not be loaded."""


class _Lib:
    rados: Any = None
    rbd: Any = None


_lib = _Lib()
log = logging.getLogger(__name__)

DIFF_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, _u64, _size_t, ctypes.c_int, _c_void_p)


class _ImageInfo(ctypes.Structure):
    _fields_ = [("size", _u64), ("obj_size", _u64), ("num_objs", _u64), ("order", ctypes.c_int),
                ("block_name_prefix", ctypes.c_char * 24), ("parent_pool", ctypes.c_int64),
                ("parent_name", ctypes.c_char * 96)]


class _SnapInfo(ctypes.Structure):
    _fields_ = [("id", _u64), ("size", _u64), ("name", ctypes.c_char_p)]


def _open_lib(name: str, soname: str) -> Any:
    try:
        return ctypes.CDLL(soname)
    except OSError:
        found = ctypes.util.find_library(name)
        if not found:
            raise RbdUnavailable(
                f"Ceph's {soname} is not installed (driver=rbd needs the packages librbd1 and librados2)"
            ) from None
        return ctypes.CDLL(found)


def load() -> None:
    """Load librados and librbd and declare the functions used."""
    if _lib.rbd is not None:
        return
    rados = _open_lib("rados", "librados.so.2")
    rbd = _open_lib("rbd", "librbd.so.1")
    P = ctypes.POINTER
    sigs: list[tuple[Any, str, Any, list[Any]]] = [
        (rados, "rados_create", ctypes.c_int, [P(_c_void_p), ctypes.c_char_p]),
        (rados, "rados_conf_read_file", ctypes.c_int, [_c_void_p, ctypes.c_char_p]),
        (rados, "rados_conf_set", ctypes.c_int, [_c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
        (rados, "rados_connect", ctypes.c_int, [_c_void_p]),
        (rados, "rados_shutdown", None, [_c_void_p]),
        (rados, "rados_ioctx_create", ctypes.c_int, [_c_void_p, ctypes.c_char_p, P(_c_void_p)]),
        (rados, "rados_ioctx_destroy", None, [_c_void_p]),
        (rados, "rados_ioctx_set_namespace", None, [_c_void_p, ctypes.c_char_p]),
        (rbd, "rbd_namespace_exists", ctypes.c_int, [_c_void_p, ctypes.c_char_p, P(ctypes.c_bool)]),
        (rbd, "rbd_open", ctypes.c_int, [_c_void_p, ctypes.c_char_p, P(_c_void_p), ctypes.c_char_p]),
        (rbd, "rbd_open_read_only", ctypes.c_int,
         [_c_void_p, ctypes.c_char_p, P(_c_void_p), ctypes.c_char_p]),
        (rbd, "rbd_close", ctypes.c_int, [_c_void_p]),
        (rbd, "rbd_stat", ctypes.c_int, [_c_void_p, P(_ImageInfo), _size_t]),
        (rbd, "rbd_get_size", ctypes.c_int, [_c_void_p, P(_u64)]),
        (rbd, "rbd_get_features", ctypes.c_int, [_c_void_p, P(_u64)]),
        (rbd, "rbd_get_flags", ctypes.c_int, [_c_void_p, P(_u64)]),
        (rbd, "rbd_snap_list", ctypes.c_int, [_c_void_p, P(_SnapInfo), P(ctypes.c_int)]),
        (rbd, "rbd_snap_list_end", None, [P(_SnapInfo)]),
        (rbd, "rbd_snap_set", ctypes.c_int, [_c_void_p, ctypes.c_char_p]),
        (rbd, "rbd_resize", ctypes.c_int, [_c_void_p, _u64]),
        (rbd, "rbd_create", ctypes.c_int, [_c_void_p, ctypes.c_char_p, _u64, P(ctypes.c_int)]),
        # the callback is always NULL: completions are polled (see Reaper)
        (rbd, "rbd_aio_create_completion", ctypes.c_int, [_c_void_p, _c_void_p, P(_c_void_p)]),
        (rbd, "rbd_aio_get_return_value", ctypes.c_ssize_t, [_c_void_p]),
        (rbd, "rbd_aio_get_arg", _c_void_p, [_c_void_p]),
        (rbd, "rbd_aio_release", None, [_c_void_p]),
        (rbd, "rbd_set_image_notification", ctypes.c_int, [_c_void_p, ctypes.c_int, ctypes.c_int]),
        (rbd, "rbd_poll_io_events", ctypes.c_int, [_c_void_p, P(_c_void_p), ctypes.c_int]),
        (rbd, "rbd_aio_read", ctypes.c_int, [_c_void_p, _u64, _size_t, _c_void_p, _c_void_p]),
        (rbd, "rbd_aio_write", ctypes.c_int, [_c_void_p, _u64, _size_t, _c_void_p, _c_void_p]),
        (rbd, "rbd_aio_discard", ctypes.c_int, [_c_void_p, _u64, _u64, _c_void_p]),
        (rbd, "rbd_aio_write_zeroes", ctypes.c_int,
         [_c_void_p, _u64, _size_t, _c_void_p, ctypes.c_int, ctypes.c_int]),
        (rbd, "rbd_aio_flush", ctypes.c_int, [_c_void_p, _c_void_p]),
        (rbd, "rbd_diff_iterate2", ctypes.c_int,
         [_c_void_p, ctypes.c_char_p, _u64, _u64, ctypes.c_uint8, ctypes.c_uint8, DIFF_CALLBACK,
          _c_void_p]),
    ]
    for lib, fname, res, args in sigs:
        try:
            fn = getattr(lib, fname)
        except AttributeError:
            raise RbdUnavailable(f"librbd/librados lack {fname}: too old") from None
        fn.restype = res
        fn.argtypes = args
    _lib.rados, _lib.rbd = rados, rbd


def _check(r: int) -> int:
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return r


def _b(s: str | None) -> bytes | None:
    return None if s is None else c_bytes(s)


class Cluster:
    """A connected rados handle and an I/O context on one pool.

    Each step is a separate method, so that the caller can word each
    failure as QEMU does; ``close()`` releases what was made."""

    def __init__(self, user: str | None) -> None:
        load()
        self.handle = _c_void_p()
        self.ioctx = _c_void_p()
        _check(_lib.rados.rados_create(ctypes.byref(self.handle), _b(user)))

    def read_conf(self, path: str | None) -> int:
        return int(_lib.rados.rados_conf_read_file(self.handle, _b(path)))

    def conf_set(self, key: str, value: str) -> None:
        _check(_lib.rados.rados_conf_set(self.handle, c_bytes(key), c_bytes(value)))

    def connect(self) -> None:
        _check(_lib.rados.rados_connect(self.handle))

    def open_pool(self, pool: str, namespace: str) -> None:
        _check(_lib.rados.rados_ioctx_create(self.handle, c_bytes(pool), ctypes.byref(self.ioctx)))
        _lib.rados.rados_ioctx_set_namespace(self.ioctx, c_bytes(namespace))

    def namespace_exists(self, namespace: str) -> bool:
        v = ctypes.c_bool()
        _check(_lib.rbd.rbd_namespace_exists(self.ioctx, c_bytes(namespace), ctypes.byref(v)))
        return bool(v.value)

    def create_image(self, name: str, size: int, order: int) -> None:
        o = ctypes.c_int(order)
        _check(_lib.rbd.rbd_create(self.ioctx, c_bytes(name), size, ctypes.byref(o)))

    def close(self) -> None:
        if self.ioctx:
            _lib.rados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = _c_void_p()
        if self.handle:
            _lib.rados.rados_shutdown(self.handle)
            self.handle = _c_void_p()


def _cannot_abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


# what a request started without a task calls when it completes
# (BlockNode.read_submit/write_submit): ``done(result, None)`` or
# ``done(None, OSError)``
Done = Callable[[Any, OSError | None], None]

# a request in flight, by its completion's address: the parked task or the
# callback (one of them is None), the callback's result (a read's buffer,
# None for a write), and what librbd reads or writes (held until the
# completion arrives)
_Request = tuple["trio.lowlevel.Task | None", "Done | None", Any, Any]


class Reaper(Engine):
    """An image's completions: librbd writes the engine's eventfd when a
    request of the image completes (rbd_set_image_notification), and the
    engine's reaper task collects them with rbd_poll_io_events and wakes
    the tasks or calls the callbacks waiting for them.

    It is an I/O engine (engine/base.py) for what that gives the callbacks:
    they run inside the engine's batch, so an exporter's replies to the
    whole batch go out with one sendmsg (``after_completions``) instead of
    a writer task woken per request.  It is the image's own, not one of the
    graph's engines: its requests are librbd's, not a file descriptor's.

    ``close()`` stops it; call it only once no request is in flight (before
    rbd_close, which flushes)."""

    name = "rbd"

    def __init__(self, image: Any) -> None:
        super().__init__()
        try:
            _check(_lib.rbd.rbd_set_image_notification(image, self.efd, EVENT_TYPE_EVENTFD))
        except OSError:
            self.close()
            raise
        self.image = image
        self.waiting: dict[int, _Request] = {}
        self._comps: Any = (_c_void_p * POLL_BATCH)()
        self._reaping = False
        look = select.poll()
        look.register(self.efd, select.POLLIN)
        self._look = look.poll

    def reap_pending(self) -> None:
        """Handle the completions that have arrived, if any, from a caller
        that is running anyway (a submission): each batch handled here is
        one wakeup fewer of the reaper task (the eventfd is read, so epoll
        no longer reports it), and a trio wakeup costs far more CPU here
        than the failed eventfd read that finds nothing.  Not from inside
        this image's batch (a callback that submits); from inside another
        engine's batch the deferred calls run at the end of this one, which
        only sends that batch's replies in two goes instead of one."""
        if self._reaping:
            return
        # most submissions find nothing (fio at QD16: 88%): a poll of the
        # eventfd says so without the failed read's exception (0.4 against
        # 1.4 µs); the read comes only when it is readable, and reap_now
        # does not read it again
        if not self._look(0):
            return  # nothing has completed since the last batch
        try:
            os.eventfd_read(self.efd)  # first: what completes after it signals again
        except BlockingIOError:
            return  # not after a poll that found it readable
        self.reap_now(signalled=True)

    def _reap(self) -> None:
        rbd = _lib.rbd
        poll, value_of, release = (rbd.rbd_poll_io_events, rbd.rbd_aio_get_return_value,
                                   rbd.rbd_aio_release)
        image, comps, pop = self.image, self._comps, self.waiting.pop
        # the eventfd was read before this: what completes from here on
        # writes it again
        self._reaping = True
        try:
            while True:
                n = poll(image, comps, POLL_BATCH)
                for i in range(max(n, 0)):
                    comp = comps[i]
                    value = value_of(comp)
                    release(comp)
                    task, done, result, _hold = pop(comp)
                    self.in_flight -= 1
                    if done is None:
                        assert task is not None
                        _reschedule(task, outcome.Value(value))
                        continue
                    try:
                        if value < 0:
                            done(None, OSError(-value, os.strerror(-value)))
                            continue
                        if result is not None and value < len(result):
                            buffers.zero_tail(result, value)  # a read that ended early
                        done(result, None)
                    except Exception:  # one request's bug, not the image's
                        log.exception("rbd completion callback failed")
                if n < POLL_BATCH:
                    return
        finally:
            self._reaping = False

    def close(self) -> None:
        self._reaper_scope.cancel()  # its task closes the eventfd


class Image:
    """An open rbd image and its asynchronous requests."""

    def __init__(self, cluster: Cluster, name: str, snap: str | None) -> None:
        self.handle = _c_void_p()
        _check(_lib.rbd.rbd_open(cluster.ioctx, c_bytes(name), ctypes.byref(self.handle), _b(snap)))
        self.reaper: Reaper | None = None
        # the graph's engines (set by the node): the reaper is listed there
        # while it lives, so that a connection's inline wait (an NBD
        # export's, engine/inline_wait.py) reaps its completions itself
        # instead of the event loop waking the reaper task
        self.engines: Engines | None = None
        # where rbd_aio_create_completion puts each new completion (trio's
        # thread only), made once instead of per request
        self._comp: Any = _c_void_p()
        self._comp_ref = ctypes.byref(self._comp)
        # writes started without a task while a caller holds submissions
        # (engine/base.py's hold_submissions: an NBD reader with a batch of
        # requests): (offset, length, pointer, done, what to hold), handed
        # to librbd one after another by _submit_pending when the holder
        # calls submit_held.  The first rbd_aio_write of a batch wakes
        # librbd's worker thread (a futex wake, and on a busy machine the
        # worker often takes the CPU from the event loop there); the ones
        # right after it find the worker awake, where one per request, each
        # after the next request's parsing, woke it every time.
        self._queued: list[tuple[int, int, Any, Done, Any]] = []
        self._held_now = False  # listed in engine_base._held

    def stat(self) -> tuple[int, int]:
        """(size, object size)."""
        info = _ImageInfo()
        _check(_lib.rbd.rbd_stat(self.handle, ctypes.byref(info), ctypes.sizeof(info)))
        return int(info.size), int(info.obj_size)

    def size(self) -> int:
        v = _u64()
        _check(_lib.rbd.rbd_get_size(self.handle, ctypes.byref(v)))
        return int(v.value)

    def features(self) -> int:
        v = _u64()
        _check(_lib.rbd.rbd_get_features(self.handle, ctypes.byref(v)))
        return int(v.value)

    def flags(self) -> int:
        v = _u64()
        _check(_lib.rbd.rbd_get_flags(self.handle, ctypes.byref(v)))
        return int(v.value)

    def snap_list(self) -> list[tuple[str, int]]:
        """The image's snapshots: (name, size), as rbd_snap_list gives them."""
        n = 16
        while True:
            arr = (_SnapInfo * n)()
            count = ctypes.c_int(n)
            r = int(_lib.rbd.rbd_snap_list(self.handle, arr, ctypes.byref(count)))
            if r == -34:  # ERANGE: count holds the number needed
                n = max(count.value, n * 2)
                continue
            _check(r)
            out = [((arr[i].name or b"").decode(errors="replace"), int(arr[i].size))
                   for i in range(r)]
            if r > 0:
                _lib.rbd.rbd_snap_list_end(arr)
            return out

    def snap_set(self, name: str) -> None:
        _check(_lib.rbd.rbd_snap_set(self.handle, c_bytes(name)))

    def resize(self, size: int) -> None:
        _check(_lib.rbd.rbd_resize(self.handle, size))

    def diff_iterate(self, offset: int, length: int, cb: Any) -> int:
        """rbd_diff_iterate2 from the image's start, whole objects, with the
        parent; ``cb(offset, length, exists) -> int`` (non-zero stops)."""
        def c_cb(off: int, ln: int, exists: int, _arg: int | None) -> int:
            return int(cb(off, ln, exists))
        fn = DIFF_CALLBACK(c_cb)
        return int(_lib.rbd.rbd_diff_iterate2(self.handle, None, offset, length, 1, 1, fn, None))

    def _reaper(self) -> Reaper:
        """The image's reaper, made (and listed with the graph's engines) at
        the first request; completions that have arrived are handled first
        (Reaper.reap_pending), before the new request is in the table: its
        own completion is never handled here (a task is parked only after
        the submission returns)."""
        reaper = self.reaper
        if reaper is None:
            reaper = self.reaper = Reaper(self.handle)
            if self.engines is not None:
                self.engines.attach(reaper)
        elif reaper.in_flight:
            reaper.reap_pending()
        return reaper

    def _start(self, task: trio.lowlevel.Task | None, done: Done | None, result: Any,
               hold: Any, start: Any, *args: Any) -> None:
        """Submit a request (``start(image, *args, completion)``) whose
        completion wakes ``task`` or calls ``done`` (with ``result``);
        ``hold`` is kept until then.  OSError if librbd refuses it."""
        reaper = self._reaper()
        rbd = _lib.rbd
        # the completion carries no callback and no argument: the reaper
        # finds the request by the completion's address
        _check(rbd.rbd_aio_create_completion(None, None, self._comp_ref))
        comp = self._comp.value
        r = start(self.handle, *args, comp)
        if r < 0:
            rbd.rbd_aio_release(comp)
            raise OSError(-r, os.strerror(-r))
        reaper.waiting[comp] = (task, done, result, hold)
        reaper.in_flight += 1

    async def _submit(self, hold: Any, start: Any, *args: Any) -> int:
        """Submit a request and park until it completes: its return value.
        Not cancellable (a cancellation is delivered at the caller's next
        checkpoint): librbd uses the request's buffers until it completes."""
        self._start(_current_task(), None, None, hold, start, *args)
        return _check(await _wait(_cannot_abort))

    def submit_read(self, offset: int, length: int, done: Done) -> None:
        """Start a read without a task: ``done(buffer, None)`` or
        ``done(None, OSError)`` from the reaper."""
        buf, addr = buffers.alloc_at(length)
        self._start(None, done, buf, buf, _lib.rbd.rbd_aio_read,
                    offset, length, addr)

    def submit_write(self, offset: int, data: bytes | bytearray | memoryview,
                     done: Done) -> None:
        """Start a write without a task: ``done(None, None)`` or
        ``done(None, OSError)`` from the reaper; ``data`` must stay unchanged
        until then.

        _start and _pointer written out for what an NBD export's WRITE
        hands over (a pool buffer: a writable memoryview of bytes): this
        runs once per request, and each call it saves is about a tenth of
        a microsecond of the event loop's thread."""
        if type(data) is memoryview and not data.readonly and data.format == "B" \
                and data.c_contiguous:
            hold: Any = data
            ptr: Any = _addressof(_from_buffer(data))
            n = data.nbytes
        else:
            hold, ptr, n = _pointer(data)
        if engine_base._holding:
            if not self._held_now:
                self._held_now = True
                # submit_held() asks only for these two attributes
                cast(list[Any], engine_base._held).append(self)
            self._queued.append((offset, n, ptr, done, hold))
            return
        reaper = self.reaper
        if reaper is None:
            reaper = self._reaper()
        elif reaper.in_flight:
            reaper.reap_pending()  # as _reaper()
        rbd = _lib.rbd
        r = rbd.rbd_aio_create_completion(None, None, self._comp_ref)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        comp = self._comp.value
        r = rbd.rbd_aio_write(self.handle, offset, n, ptr, comp)
        if r < 0:
            rbd.rbd_aio_release(comp)
            raise OSError(-r, os.strerror(-r))
        reaper.waiting[comp] = (None, done, None, hold)
        reaper.in_flight += 1

    def _submit_pending(self) -> None:
        """Hand librbd the writes queued while submissions were held
        (engine_base.submit_held calls it), in the order they came.  One
        that librbd refuses is answered at once, with its errno, as the
        reaper would answer its failure."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        if not self.handle:  # closed meanwhile (not after a drain): none can go
            for _offset, _n, _ptr, done, _hold in queued:
                done(None, OSError(errno.EIO, os.strerror(errno.EIO)))
            return
        reaper = self._reaper()
        rbd = _lib.rbd
        create, write, release = (rbd.rbd_aio_create_completion, rbd.rbd_aio_write,
                                  rbd.rbd_aio_release)
        handle, comp_ref, comp_box, waiting = (self.handle, self._comp_ref, self._comp,
                                               reaper.waiting)
        for offset, n, ptr, done, hold in queued:
            r = create(None, None, comp_ref)
            if r >= 0:
                comp = comp_box.value
                r = write(handle, offset, n, ptr, comp)
                if r >= 0:
                    waiting[comp] = (None, done, None, hold)
                    reaper.in_flight += 1
                    continue
                release(comp)
            try:
                done(None, OSError(-r, os.strerror(-r)))
            except Exception:  # one request's bug, not the image's
                log.exception("rbd completion callback failed")

    async def read(self, offset: int, length: int) -> memoryview:
        buf, addr = buffers.alloc_at(length)
        r = await self._submit(buf, _lib.rbd.rbd_aio_read, offset, length, addr)
        if r < length:
            buffers.zero_tail(buf, r)
        return buf

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data, ptr, n = _pointer(data)
        await self._submit(data, _lib.rbd.rbd_aio_write, offset, n, ptr)

    async def discard(self, offset: int, length: int) -> None:
        await self._submit(None, _lib.rbd.rbd_aio_discard, offset, length)

    async def write_zeroes(self, offset: int, length: int, zero_flags: int) -> None:
        def start(h: Any, off: int, ln: int, comp: Any) -> int:
            return int(_lib.rbd.rbd_aio_write_zeroes(h, off, ln, comp, zero_flags, 0))
        await self._submit(None, start, offset, length)

    async def flush(self) -> None:
        await self._submit(None, _lib.rbd.rbd_aio_flush)

    def close(self) -> None:
        if self.reaper is not None:
            if self.engines is not None:
                self.engines.detach(self.reaper)
            self.reaper.close()
            self.reaper = None
        if self.handle:
            _lib.rbd.rbd_close(self.handle)
            self.handle = _c_void_p()


def _pointer(data: bytes | bytearray | memoryview) -> tuple[Any, Any, int]:
    """What to hand librbd as a write's buffer: (what to keep alive until the
    request completes, the pointer, the byte count).  ``bytes`` go as they
    are (ctypes passes their address), a writable buffer by its address,
    and only a read-only view of something else as a copy."""
    if isinstance(data, bytes):
        return data, data, len(data)
    mv = memoryview(data)
    if mv.readonly or not mv.c_contiguous:
        b = mv.tobytes()
        return b, b, len(b)
    if mv.format != "B":
        mv = mv.cast("B")
    # the view keeps the memory alive; the address is taken through a
    # ctypes object dropped at once (no ctypes array type per length)
    return mv, buffers.address(mv), mv.nbytes
