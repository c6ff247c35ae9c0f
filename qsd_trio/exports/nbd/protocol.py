"""The NBD transmission phase: requests in, replies out, for one connection.

Per connection: one reader task parses requests (at most
:data:`MAX_REQUESTS` in flight, which bounds the memory a client can make
us hold).  A READ or WRITE the node can serve without waiting (a cached
read, a write into allocated space: BlockNode.read_now/write_now) is served
by the reader itself; one the node can hand to its I/O engine as it is (a
raw file, a mapped qcow2 cluster: BlockNode.read_submit/write_submit) is
started by the reader and replied to from the engine's completion, with no
task of its own; the rest go to a fixed pool of request tasks.
Replies are queued and sent in batches, header and data together with one
``sendmsg`` (a 1 MiB read is never copied into a bigger buffer): by the
reader before it waits for the client, by the engine's reaper after a batch
of completions, or by a writer task.  The I/O requests the reader starts
go to the kernel in one system call just before it would wait
(hold_submissions/submit_held in nodes/engine/base.py), and while nothing
else can run the reader waits for its socket, or for the completions that
give its slots back, without the scheduler (nodes/engine/inline_wait.py).

Errors: a client that breaks the protocol or vanishes ends its own
connection only; I/O errors become NBD error replies with QEMU's messages.
nbdkit's protocol.c has the same role.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio

from ... import tasks
from ...nodes.engine import buffers
from ...nodes.engine.base import after_completions, hold_submissions, submit_held
from ...nodes.node import Status
from ...proto import nbd as P
from ...qapi.errors import QapiError
from ..read_now import NowGuess
from .wire import Wire, _Disconnect

if TYPE_CHECKING:
    from ...nodes.bitmaps import DirtyBitmap
    from .connection import Connection
    from .export import NbdExport

# what the reader hands a request task: the request, a WRITE's payload, and
# the export's size when it was read
Work = tuple[P.Request, "memoryview | None", int]

log = logging.getLogger(__name__)

MAX_REQUESTS = 16  # in flight per connection, as QEMU's NBD_MAX_REQUESTS
MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8  # per reply chunk, QEMU's limit
# sparse reads ask for the status of this much ahead, so one answer covers
# the reads that follow (the extent is remembered, see NbdExport.known_data)
_STATUS_LOOKAHEAD = 64 * 1024 * 1024


# the message of an error reply when a command fails (QEMU's nbd_handle_request)
_FAILED = {
    P.CMD_READ: "reading from file failed",
    P.CMD_WRITE: "writing to file failed",
    P.CMD_WRITE_ZEROES: "writing to file failed",
    P.CMD_FLUSH: "flush failed",
    P.CMD_TRIM: "discard failed",
    P.CMD_CACHE: "caching data failed",
    P.CMD_BLOCK_STATUS: "can't get block status",
}


# The header of a READ's one OFFSET_DATA chunk (structured replies, not
# extended) in one pack: P.chunk_offset_data_header builds the same bytes
# from two, and this runs once per request.
_pack_offset_data = struct.Struct(">IHHQIQ").pack
_STRUCTURED_REPLY_MAGIC = P.STRUCTURED_REPLY_MAGIC
_REPLY_FLAG_DONE = P.REPLY_FLAG_DONE
_REPLY_TYPE_OFFSET_DATA = P.REPLY_TYPE_OFFSET_DATA


def _offset_data_header(handle: int, offset: int, length: int, extended: bool) -> bytes:
    """P.chunk_offset_data_header(handle, offset, length, True, ...) of a READ."""
    if extended:
        return P.chunk_offset_data_header(handle, offset, length, True, offset)
    return _pack_offset_data(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                             P.REPLY_TYPE_OFFSET_DATA, handle, 8 + length, offset)


class _Slots:
    """The requests a connection may have in flight: a count the reader
    takes one from per request and the reply path gives back, a batch of
    replies at a time, once they are on the wire.  As trio.Semaphore, but a
    batch is one call and the reader's fast path no method call at all:
    this runs once per request."""

    __slots__ = ("value", "_freed")

    def __init__(self, n: int) -> None:
        self.value = n
        self._freed: trio.Event | None = None

    def release(self, n: int = 1) -> None:
        self.value += n
        freed = self._freed
        if freed is not None:
            self._freed = None
            freed.set()

    async def acquire(self) -> None:
        """Take one, waiting until one is free; a checkpoint either way."""
        await trio.lowlevel.checkpoint()
        while not self.value:
            if self._freed is None:
                self._freed = trio.Event()
            await self._freed.wait()
        self.value -= 1


class Transmission:
    """The transmission phase of one connection (the base of Connection).

    The negotiation (connection.py) sets the attributes declared here
    before :meth:`serve` runs; ``_close`` closes the connection's stream.
    """

    wire: Wire
    structured: bool
    extended: bool
    meta_export: str | None
    meta_ids: list[tuple[int, str]]
    export: NbdExport | None
    _closed: bool

    def __init__(self) -> None:
        self._slots = _Slots(MAX_REQUESTS)
        self._out: list[Any] = []  # buffers of the replies queued, in order
        self._out_done = 0
        self._out_ready = trio.Event()
        self._sending = False  # the writer is part way through a send
        self._flush_deferred = False  # a reaper will send the queued replies
        # the reader's wait without the scheduler (inline_wait.py), if any
        self._wait_inline: Callable[[int], bool] | None = None
        # the flags a READ/WRITE served by the reader may carry (_read_requests)
        self._read_flags = self._write_flags = P.CMD_FLAG_FUA
        self.moved = 0  # bytes of this client's READ and WRITE requests
        # ask read_now/write_now while they serve (read_now.py)
        self._read_now = NowGuess().read_now
        self._write_now = NowGuess().write_now
        self._hangup = ""
        self._broken = False
        self._reader_scope = trio.CancelScope()
        # it has sent DISC (or hung up): no longer a user of its export
        self.ending = False
        self._drained = 0  # slots serve() has taken back once reading stopped

    async def _close(self) -> None:
        raise NotImplementedError

    @property
    def _live_export(self) -> NbdExport:
        """The export, in the transmission phase (serve() sets it)."""
        export = self.export
        assert export is not None
        return export

    async def serve(self, export: NbdExport, last_reply: bytes = b"") -> None:
        """Transmission phase, after sending ``last_reply`` (the option phase's end)."""
        self.export = export
        conn = cast("Connection", self)  # the only kind of Transmission
        export.clients.add(conn)
        if self.meta_export != export.name:
            self.meta_ids = []  # contexts were negotiated for another export
        try:
            with tasks.serving("client-connection", f"nbd client of {export.id}",
                               cancel_scope=export.cancel_scope,
                               draining=lambda: self.ending,
                               # the reader holds one slot while it reads the
                               # next request; once it has stopped, serve()
                               # takes the slots back one by one (_drained)
                               in_flight=lambda: max(0, MAX_REQUESTS - self._slots.value
                                                     - self._drained - (not self.ending)),
                               moved=lambda: self.moved,
                               export_id=export.id, client=tasks.peer_name(self.wire.stream),
                               node_names=lambda: [export.node.node_name]):
                async with trio.open_nursery() as nursery:
                    await self.wire.send(last_reply)
                    nursery.start_soon(self._writer)
                    # a fixed pool of request tasks: handing a request to a parked
                    # task is cheaper than spawning one per request
                    send, receive = trio.open_memory_channel(MAX_REQUESTS)
                    self._requests = send
                    for _ in range(MAX_REQUESTS):
                        nursery.start_soon(self._worker, receive)
                    await self._read_requests(nursery)
                    self.ending = True
                    # DISC or a fatal request: let what was read finish and its
                    # replies go out, then stop the writer
                    for _ in range(MAX_REQUESTS):
                        await self._slots.acquire()
                        self._drained += 1
                    nursery.cancel_scope.cancel()
                    if self._hangup:
                        raise _Disconnect(self._hangup)
        except* (_Disconnect, P.NbdProtocolError, trio.BrokenResourceError,
                 trio.ClosedResourceError, OSError) as eg:
            log.debug("nbd client of %s ended: %r", export.id, eg)
        except* Exception:
            # a bug serving one client must not take the daemon down
            log.exception("nbd client of %s failed", export.id)
        finally:
            export.client_left(conn)
            with trio.CancelScope(shield=True):
                await self._close()

    # Replies: request tasks queue their parts; one writer task sends all that
    # is queued with one sendmsg, so under load many replies share a syscall.
    # A request's slot is released only once its reply is on the wire, which
    # bounds what a client that does not read its replies can make us hold.
    def _queue(self, parts: tuple[Any, ...], done: bool = True) -> None:
        self._out.extend(parts)
        if done:
            self._out_done += 1
        self._out_ready.set()

    def _queue_quiet(self, parts: tuple[Any, ...]) -> None:
        """Queue a reply from the reader task, without waking the writer:
        the reader sends it itself before it next waits (_flush_now)."""
        self._out.extend(parts)
        self._out_done += 1

    def _flush_now(self) -> None:
        """Send the queued replies if the socket takes them now; whatever
        it does not take is left to the writer task."""
        if not self._out:
            return
        if self._sending or self._broken or self.wire.raw is None:
            self._out_ready.set()
            return
        parts, self._out = self._out, []
        try:
            rest = self.wire.send_now(parts)
        except trio.BrokenResourceError:
            self._broken = True
            rest = []
        if rest:
            self._out[:0] = rest  # ahead of anything queued later
            self._out_ready.set()
            return
        done, self._out_done = self._out_done, 0
        self._slots.release(done)

    async def _writer(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            while self._out:
                parts, self._out = self._out, []
                done, self._out_done = self._out_done, 0
                if not self._broken:
                    self._sending = True  # _flush_now must not interleave
                    try:
                        await self.wire.send(*parts)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # the client is gone: requests in flight still finish
                        # (a write is not cut in half), their replies are dropped
                        self._broken = True
                    finally:
                        self._sending = False
                self._slots.release(done)

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        """Read requests until DISC, EOF, a fatal request or stop_reading().

        Holds at most one slot of its own at a time and gives it back on
        every way out, so serve() can count the requests still in flight.
        """
        wire = self.wire
        export = self._live_export
        size_fn = export.node._length
        slots = self._slots
        extended = self.extended
        # Requests the node can serve without waiting are served right here
        # (_serve_now), their replies sent in a batch when the reader would
        # otherwise wait; only the rest go to the worker tasks.  Over TLS the
        # writer task sends them.
        quiet = wire.raw is not None
        # the flags _validate lets through for a READ or WRITE served by the
        # reader (_serve_now); anything else goes to a worker, which words the error
        self._read_flags = P.CMD_FLAG_FUA | (P.CMD_FLAG_DF if self.structured else 0)
        self._write_flags = P.CMD_FLAG_FUA | (P.CMD_FLAG_PAYLOAD_LEN if extended else 0)
        if quiet:
            # The reader submits the I/O requests it starts itself, all of
            # them with one system call, just before it would park (the
            # engine's flusher task is not woken: hold_submissions), and
            # sends the replies queued meanwhile; then, while nothing else
            # can run, it waits for its socket and the completions without
            # the scheduler (inline_wait.py).
            wire.before_wait = self._before_wait
            wire.after_wait = hold_submissions
            self._wait_inline = wire.wait_inline = export.node.graph.io.inline_waiter()
            hold_submissions()
        try:
            await self._read_loop(wire, export, size_fn, slots, extended, quiet)
        finally:
            if quiet:
                submit_held()
            wire.before_wait = wire.after_wait = wire.wait_inline = None
            self._wait_inline = None
            self._flush_now()  # serve() waits for these replies' slots

    def _before_wait(self) -> None:
        """The reader is about to wait: the requests it started go to the
        kernel, the replies it queued to the client."""
        submit_held()
        if self._out:  # at queue depth 1 the reply went out from the reaping
            self._flush_now()

    async def _wait_for_slot(self, quiet: bool) -> None:
        """No slot is free: wait until a reply gives one back.  A checkpoint
        even when the flush just gave some back, so that a busy client
        cannot hold the loop.  Without the scheduler while nothing else can
        run: the completions of this client's requests are reaped right here
        (their replies give the slots back)."""
        if not quiet:
            self._flush_now()
            await self._slots.acquire()
            return
        self._before_wait()
        slots = self._slots
        wait = self._wait_inline
        if wait is not None:
            while not slots.value and wait(-1):
                pass
        await slots.acquire()
        hold_submissions()

    async def _read_loop(self, wire: Wire, export: NbdExport, size_fn: Callable[[], int],
                         slots: _Slots, extended: bool, quiet: bool) -> None:
        head_size = P.EXT_REQUEST_SIZE if extended else P.REQUEST_SIZE
        parse = P.parse_ext_request if extended else P.parse_request
        with self._reader_scope:
            while True:
                if slots.value:
                    slots.value -= 1
                else:
                    # Replies served inline hold their slots until sent, so
                    # this is reached at least every MAX_REQUESTS requests
                    await self._wait_for_slot(quiet)
                handed_off = False
                try:
                    # at queue depth 32 most headers are buffered already:
                    # taken without a coroutine
                    head = wire.take_now(head_size)
                    if head is None and wire.receive_now(head_size):
                        head = wire.take_now(head_size)
                    if head is None:
                        head = await wire.recv_exactly(head_size)
                    req = parse(head)
                    t = req.type
                    if t == P.CMD_DISC:
                        return
                    data = None
                    if extended and req.flags & P.CMD_FLAG_PAYLOAD_LEN and t != P.CMD_WRITE:
                        # a payload no command of ours takes: consumed, then refused
                        # (beyond the maximum payload the spec says hang up)
                        if req.length > P.MAX_BUFFER_SIZE:
                            self._hangup = "oversized payload"
                            return
                        await wire.skip(req.length)
                        self._error_reply(req, P.EINVAL, "unexpected payload")
                        handed_off = True  # the writer releases it with the reply
                        continue
                    if t == P.CMD_WRITE and extended and not req.flags & P.CMD_FLAG_PAYLOAD_LEN:
                        # no payload follows: refused without reading any
                        self._error_reply(req, P.EINVAL,
                                          "extended header write without payload length")
                        handed_off = True
                        continue
                    if t == P.CMD_WRITE:
                        if req.length > P.MAX_BUFFER_SIZE:
                            # the payload cannot be skipped safely: answer, then hang up
                            self._error_reply(req, P.EINVAL,
                                              f"len ({req.length} ) is larger than max len "
                                              f"({P.MAX_BUFFER_SIZE})")
                            handed_off = True  # the writer releases it with the reply
                            self._hangup = "oversized write"
                            return
                        # page-aligned and not zero-filled: the file driver
                        # writes it as it is, even with O_DIRECT (no bounce)
                        data = buffers.alloc_at(req.length)[0]  # alloc() is this, a call more
                        # a partial write (client gone, or stop_reading) is never applied
                        view = memoryview(data)
                        if not wire.take_into_now(view):
                            await wire.recv_into(view)
                    if t == P.CMD_READ:
                        self.moved += req.length
                        export.read_bytes += req.length
                    elif t == P.CMD_WRITE:
                        self.moved += req.length
                        export.written_bytes += req.length
                    size = size_fn()
                    if not ((t == P.CMD_READ or t == P.CMD_WRITE) and req.length
                            and self._serve_now(req, data, size, export, quiet)):
                        self._requests.send_nowait((req, data, size))
                    handed_off = True
                    # nothing else in flight: a client at queue depth 1 now
                    # waits for this reply before it sends again
                    wire.expect_empty = slots.value == MAX_REQUESTS - 1
                except (_Disconnect, P.NbdProtocolError, trio.BrokenResourceError) as e:
                    # stop reading; serve() lets what was already read finish
                    self._hangup = str(e) or type(e).__name__
                    return
                finally:
                    if not handed_off:
                        slots.release()

    def _serve_now(self, req: P.Request, data: memoryview | None, size: int,
                   export: NbdExport, quiet: bool) -> bool:
        """Serve a READ or WRITE synchronously if the node can
        (BlockNode.read_now/write_now); False hands it to a worker."""
        # what _validate checks of a READ or WRITE, written out (a WRITE
        # above the maximum was refused before its payload was read); a
        # request that fails any of it goes to a worker, which words the error
        off, ln, flags = req.offset, req.length, req.flags
        if off > size or ln > size - off:
            return False
        node = export.node
        h = req.handle
        reply: tuple[Any, ...]
        if req.type == P.CMD_WRITE:
            if (flags & (P.CMD_FLAG_FUA | ~self._write_flags) or export.writethrough
                    or not export.writable):
                return False
            assert data is not None  # a WRITE's payload, read with it
            if not self._write_now(node, req.offset, data):
                return node.write_submit(req.offset, data, partial(self._finished, req))
            reply = (P.chunk_none(h, req.offset) if self.extended else P.simple_reply(h),)
        else:
            if ln > P.MAX_BUFFER_SIZE or flags & ~self._read_flags:
                return False
            if self.structured and not (flags & P.CMD_FLAG_DF or export.known_data(off, ln)):
                return False  # a sparse read asks the block status first
            buf = self._read_now(node, off, ln)
            if buf is None:
                return node.read_submit(off, ln, partial(self._finished, req))
            if self.structured:
                reply = (_offset_data_header(h, off, ln, self.extended), buf)
            else:
                reply = (P.simple_reply(h), buf)
        if quiet:
            self._queue_quiet(reply)
        else:
            self._queue(reply)
        return True

    def _finished(self, req: P.Request, buf: Any, err: OSError | None) -> None:
        """The reply to a READ or WRITE started with read_submit/write_submit
        (``partial(self._finished, req)``), queued by the engine's reaper
        when it completes.  The
        reaper sends the replies of its whole batch of completions with one
        sendmsg once it has handled them all (after_completions); what the
        socket does not take goes to the writer task.  Runs once per
        request: _offset_data_header and _queue_quiet are written out."""
        if self._closed:
            return  # the connection ended (export deleted): no one to answer
        h = req.handle
        if err is not None:
            if self._sparse_read(req):
                # the worker reads again, and answers as QEMU would
                # (an error chunk if the block status fails, else a hangup)
                self._requests.send_nowait((req, None, self._live_export.size))
                return
            self._error_reply(req, P.errno_to_nbd(err.errno), _FAILED[req.type])
            return
        out = self._out
        if req.type == P.CMD_WRITE:
            out.append(P.chunk_none(h, req.offset) if self.extended else P.simple_reply(h))
        elif not self.structured:
            out += (P.simple_reply(h), buf)
        elif self.extended:
            out += (_offset_data_header(h, req.offset, req.length, True), buf)
        else:
            out += (_pack_offset_data(_STRUCTURED_REPLY_MAGIC, _REPLY_FLAG_DONE,
                                      _REPLY_TYPE_OFFSET_DATA, h, 8 + req.length, req.offset),
                    buf)
        self._out_done += 1
        if not self._flush_deferred:
            if after_completions(self._deferred_flush):
                self._flush_deferred = True
            else:
                self._out_ready.set()

    def _sparse_read(self, req: P.Request) -> bool:
        """A READ QEMU serves as a sparse read (structured replies, no DF)."""
        return req.type == P.CMD_READ and self.structured and not req.flags & P.CMD_FLAG_DF

    def _hang_up_on_read_error(self) -> None:
        # QEMU 7.2's nbd_co_send_sparse_read reports a failed read as a
        # failed send ("Failed to send reply: reading from file failed") and
        # drops the client; with DF, or simple replies, it sends an error
        self._hangup = "Failed to send reply: reading from file failed"
        self.stop_reading()
        self._slots.release()  # no reply will release the request's slot

    def _deferred_flush(self) -> None:
        self._flush_deferred = False
        self._flush_now()

    def stop_reading(self) -> None:
        """Take no new request; those in flight finish and reply, then the connection ends."""
        self._reader_scope.cancel()
        self._hangup = self._hangup or "export shutting down"

    async def _worker(self, receive: trio.MemoryReceiveChannel[Work]) -> None:
        # the slot semaphore guarantees a free buffer place for send_nowait
        async for req, data, size in receive:
            await self._handle(req, data, size)

    def _error_reply(self, req: P.Request, err: int, message: str) -> None:
        if self.extended:
            self._queue((P.chunk_error(req.handle, err, message, ext_offset=req.offset),))
        elif self.structured:
            self._queue((P.chunk_error(req.handle, err, message),))
        else:
            self._queue((P.simple_reply(req.handle, err),))

    def _validate(self, req: P.Request, size: int) -> tuple[int, str] | None:
        t = req.type
        export = self._live_export
        if t in (P.CMD_READ, P.CMD_CACHE) and req.length > P.MAX_BUFFER_SIZE:
            # (sic) QEMU's text has the stray space
            return P.EINVAL, f"len ({req.length} ) is larger than max len ({P.MAX_BUFFER_SIZE})"
        if t not in P.CMD_NAMES or t in (P.CMD_RESIZE,):
            return P.EINVAL, f"invalid request type ({t}) received"
        if not export.writable and t in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM):
            # QEMU answers EINVAL here, not EPERM
            return P.EINVAL, "Export is read-only"
        if req.offset > size or req.length > size - req.offset:
            # QEMU 7.2 answers EINVAL even for writes (the spec suggests ENOSPC)
            return P.EINVAL, (f"operation past EOF; From: {req.offset}, Len: {req.length}, "
                         f"Size: {size}")
        valid = P.CMD_FLAG_FUA
        if t == P.CMD_READ and self.structured:
            valid |= P.CMD_FLAG_DF
        elif t == P.CMD_WRITE_ZEROES:
            valid |= P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO
        elif t == P.CMD_BLOCK_STATUS:
            valid |= P.CMD_FLAG_REQ_ONE
        if t == P.CMD_WRITE and self.extended:
            valid |= P.CMD_FLAG_PAYLOAD_LEN
        if req.flags & ~valid:
            return P.EINVAL, f"unsupported flags for command {P.CMD_NAMES[t]} (got 0x{req.flags:x})"
        return None

    async def _handle(self, req: P.Request, data: memoryview | None, size: int) -> None:
        bad = self._validate(req, size)
        if bad is not None:
            self._error_reply(req, *bad)
            return
        export = self._live_export
        node = export.node
        t = req.type
        try:
            if t == P.CMD_READ:
                await self._read(req)
                return
            if t == P.CMD_WRITE:
                assert data is not None  # a WRITE's payload, read with it
                await node.write(req.offset, data,
                                 fua=bool(req.flags & P.CMD_FLAG_FUA) or export.writethrough)
            elif t == P.CMD_FLUSH:
                await node.flush()
            elif t == P.CMD_TRIM:
                export.forget_data(req.offset, req.length)
                if req.length:
                    await node.discard(req.offset, req.length)
                if req.flags & P.CMD_FLAG_FUA:
                    await node.flush()
            elif t == P.CMD_WRITE_ZEROES:
                export.forget_data(req.offset, req.length)
                if req.length:
                    await node.write_zeroes(
                        req.offset, req.length,
                        may_unmap=not req.flags & P.CMD_FLAG_NO_HOLE,
                        fua=bool(req.flags & P.CMD_FLAG_FUA) or export.writethrough,
                        no_fallback=bool(req.flags & P.CMD_FLAG_FAST_ZERO))
            elif t == P.CMD_CACHE:
                pass  # a hint; the page cache already holds what we read
            elif t == P.CMD_BLOCK_STATUS:
                await self._block_status(req)
                return
            if self.extended:  # no simple replies with extended headers
                self._queue((P.chunk_none(req.handle, req.offset),))
            else:
                self._queue((P.simple_reply(req.handle),))
        except OSError as e:
            if self._sparse_read(req) and req.length:
                self._hang_up_on_read_error()
                return
            self._error_reply(req, P.errno_to_nbd(e.errno), _FAILED[t])
        except QapiError:
            # e.g. a corrupt image refusing I/O: the client sees EIO
            self._error_reply(req, P.EIO, _FAILED[t])

    async def _read(self, req: P.Request) -> None:
        export = self._live_export
        node = export.node
        h = req.handle
        off, ln = req.offset, req.length
        if not self.structured:
            buf = await node.read(off, ln) if ln else b""
            self._queue((P.simple_reply(h), buf))
            return
        xo = off if self.extended else None  # extended chunks echo the request's offset
        if not ln:
            self._queue((P.chunk_none(h, xo),))
            return
        if req.flags & P.CMD_FLAG_DF or export.known_data(off, ln):
            try:
                buf = await node.read(off, ln)
            except OSError:
                # QEMU asks for the block status of every read without DF
                # (it is known here): if that fails too, its error is what
                # QEMU would have answered
                if not req.flags & P.CMD_FLAG_DF and await self._holes_unknown(req, off, ln):
                    return
                raise
            self._queue((P.chunk_offset_data_header(h, off, ln, True, xo), buf))
            return
        # sparse read: holes as OFFSET_HOLE chunks, data as OFFSET_DATA chunks
        pos, end = off, off + ln
        while pos < end:
            try:
                st = await node.block_status(pos, max(end - pos, min(_STATUS_LOOKAHEAD,
                                                                      export.size - pos)))
            except OSError as e:
                self._holes_error(req, e)
                return
            n = max(1, min(st.length, end - pos))
            last = pos + n >= end
            if st.flags & Status.ZERO:
                self._queue((P.chunk_offset_hole(h, pos, n, last, xo),), done=last)
            else:
                export.note_data(pos, st.length)
                buf = await node.read(pos, n)
                self._queue((P.chunk_offset_data_header(h, pos, n, last, xo), buf),
                            done=last)
            pos += n

    def _holes_error(self, req: P.Request, e: OSError) -> None:
        # nbd_co_send_sparse_read answers a failed block status with an
        # error chunk (a failed read of the data drops the client instead)
        self._error_reply(req, P.errno_to_nbd(e.errno),
                          f"unable to check for holes: {os.strerror(e.errno or errno.EIO)}")

    async def _holes_unknown(self, req: P.Request, off: int, ln: int) -> bool:
        """Whether the block status of a read's range fails (and was answered)."""
        try:
            await self._live_export.node.block_status(off, ln)
        except OSError as e:
            self._holes_error(req, e)
            return True
        return False

    async def _block_status(self, req: P.Request) -> None:
        if not self.meta_ids:
            self._error_reply(req, P.EINVAL, "CMD_BLOCK_STATUS not negotiated")
            return
        if not req.length:
            self._error_reply(req, P.EINVAL, "need non-zero length")
            return
        one = bool(req.flags & P.CMD_FLAG_REQ_ONE)
        # extents of extended replies have 64-bit lengths
        limit = 1 << 64 if self.extended else 1 << 32
        chunks: list[tuple[int, Sequence[tuple[int, int]]]] = []
        for cid, ctx in self.meta_ids:
            ext: Sequence[tuple[int, int]]
            if ctx == P.META_BASE_ALLOCATION:
                ext = await self._alloc_extents(req.offset, req.length, one, False, limit)
            elif ctx == P.META_ALLOCATION_DEPTH:
                ext = await self._alloc_extents(req.offset, req.length, one, True, limit)
            else:
                bm = self._live_export.bitmap_for_context(ctx)
                ext = _bitmap_extents(bm, req.offset, req.length, one, limit)
            chunks.append((cid, ext))
        last = len(chunks) - 1
        if self.extended:
            self._queue(tuple(P.chunk_block_status_ext(req.handle, req.offset, cid, ext, i == last)
                              for i, (cid, ext) in enumerate(chunks)))
        else:
            self._queue(tuple(P.chunk_block_status(req.handle, cid, ext, i == last)
                              for i, (cid, ext) in enumerate(chunks)))

    async def _alloc_extents(self, offset: int, length: int, one: bool, depth: bool,
                             limit: int = 1 << 32) -> list[tuple[int, int]]:
        node = self._live_export.node
        out: list[list[int]] = []
        pos, end = offset, offset + length
        while pos < end and len(out) < MAX_BLOCK_STATUS_EXTENTS:
            st = await node.block_status(pos, end - pos)
            n = max(1, min(st.length, end - pos))
            if depth:
                flags = st.depth
            else:
                flags = (0 if st.flags & Status.DATA else P.STATE_HOLE) | \
                        (P.STATE_ZERO if st.flags & Status.ZERO else 0)
            if one and out and out[-1][1] != flags:
                break  # REQ_ONE: the first run of equal status, however many calls it took
            _add_extent(out, n, flags, limit)
            pos += n
        return [(e[0], e[1]) for e in out]



def _add_extent(out: list[list[int]], n: int, flags: int, limit: int = 1 << 32) -> None:
    # merge runs with equal flags, as QEMU does, while the length fits the
    # reply's field (32 bits, or 64 with extended headers)
    if out and out[-1][1] == flags and out[-1][0] + n < limit:
        out[-1][0] += n
    else:
        out.append([n, flags])


def _bitmap_extents(bm: DirtyBitmap, offset: int, length: int, one: bool,
                    limit: int = 1 << 32) -> Sequence[tuple[int, int]]:
    out: list[list[int]] = []
    for _off, n, dirty in bm.dirty_extents(offset, length):
        _add_extent(out, n, P.STATE_DIRTY if dirty else 0, limit)
        if one or len(out) >= MAX_BLOCK_STATUS_EXTENTS:
            break
    if not out:  # past the bitmap's end: report clean
        out.append([length, 0])
    return [(e[0], e[1]) for e in out]
