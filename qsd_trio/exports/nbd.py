"""The NBD server and NBD block exports.

:class:`NbdServer` is a service (``run(task_status)``) listening on one
address.  Each accepted connection is negotiated in the server's nursery;
once the client picks an export (``NBD_OPT_GO`` / ``NBD_OPT_EXPORT_NAME``)
the connection moves into that export's nursery, so deleting an export ends
exactly its clients and stopping the server ends everything.

Per connection in transmission: one reader task parses requests (at most
:data:`MAX_REQUESTS` in flight, which bounds the memory a client can make
us hold).  A READ or WRITE the node can serve without waiting (a cached
read, a write into allocated space: BlockNode.read_now/write_now) is served
by the reader itself; one the node can hand to its I/O engine as it is (a
raw file, a mapped qcow2 cluster: BlockNode.read_submit/write_submit) is
started by the reader and replied to from the engine's completion, with no
task of its own; the rest go to a fixed pool of request tasks.
Replies are queued and sent in batches, header and data together with one
``sendmsg`` (a 1 MiB read is never copied into a bigger buffer): by the
reader before it waits for the client, or by a writer task.

Errors: a client that breaks the protocol or vanishes ends its own
connection only; I/O errors become NBD error replies.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fnmatch
import json
import logging
import os
import socket as _stdsocket
import ssl
from collections.abc import Sequence
from typing import Any

import trio

from ..nodes.engine import buffers
from ..nodes.engine.base import after_completions
from ..nodes.node import Perm, Status
from ..proto import nbd as P
from ..qapi.errors import GenericError, QapiError
from .base import BlockExport, register_export

log = logging.getLogger(__name__)

MAX_REQUESTS = 16  # in flight per connection, as QEMU's NBD_MAX_REQUESTS
MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8  # per reply chunk, QEMU's limit
_RECV_CHUNK = 256 * 1024
_PREFERRED_BLOCK = 4096
_IOV_BATCH = 512  # buffers per sendmsg, under the kernel's IOV_MAX
# sparse reads ask for the status of this much ahead, so one answer covers
# the reads that follow (the extent is remembered, see NbdExport.known_data)
_STATUS_LOOKAHEAD = 64 * 1024 * 1024
_MAX_DATA_EXTENTS = 4096
_DRAIN_DEADLINE = 5.0  # seconds in-flight requests get when an export stops


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


class _Disconnect(Exception):
    """End this connection now (the peer misbehaved or asked to)."""


class Wire:
    """Buffered exact reads and gathered writes over a trio stream.

    For a plain socket stream it works on the socket directly: non-blocking
    ``recv_into``/``sendmsg`` first, waiting for readiness only when the
    kernel has nothing (the hot path takes no trip through the scheduler),
    and payloads go straight into their own buffers.  Any other stream (TLS)
    goes through ``receive_some``/``send_all``.  Closed by :meth:`aclose`;
    the peer vanishing shows as :class:`_Disconnect` or
    ``trio.BrokenResourceError``.
    """

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.raw: _stdsocket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            # a second socket object over the same fd, detached before close
            self.raw = _stdsocket.socket(fileno=stream.socket.fileno())
            self.raw.setblocking(False)
        self._buf = bytearray(_RECV_CHUNK)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        # called when a raw receive would block, just before waiting: the
        # connection sends the replies it queued meanwhile (see _flush_now)
        self.before_wait = None

    async def _recv_into(self, view) -> int:
        raw = self.raw
        if raw is None:
            data = await self.stream.receive_some(len(view))
            view[:len(data)] = data
            return len(data)
        while True:
            try:
                return raw.recv_into(view)
            except BlockingIOError:
                if self.before_wait is not None:
                    self.before_wait()
                await trio.lowlevel.wait_readable(raw)
            except OSError as e:
                raise trio.BrokenResourceError(e) from e

    async def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available at ``_start``."""
        if self._start and len(self._buf) - self._start < need:
            n = self._end - self._start
            self._buf[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        while self._end - self._start < need:
            n = await self._recv_into(self._view[self._end:])
            if n == 0:
                raise _Disconnect("client closed the connection")
            self._end += n

    async def recv_exactly(self, n: int) -> bytes:
        if self._end - self._start < n:
            if n > len(self._buf):
                out = bytearray(n)
                await self.recv_into(memoryview(out))
                return bytes(out)
            await self._fill(n)
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return out

    async def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, straight from the socket past what is buffered."""
        have = min(self._end - self._start, len(view))
        view[:have] = self._view[self._start:self._start + have]
        self._start += have
        if self._start == self._end:
            self._start = self._end = 0
        filled = have
        while filled < len(view):
            n = await self._recv_into(view[filled:])
            if n == 0:
                raise _Disconnect("client closed the connection mid-request")
            filled += n

    async def skip(self, n: int) -> None:
        """Consume and drop ``n`` bytes without holding them."""
        while n:
            if self._end == self._start:
                self._start = self._end = 0
                await self._fill(1)
            take = min(n, self._end - self._start)
            self._start += take
            n -= take

    def send_now(self, parts: list) -> list:
        """Send what the socket takes now, without waiting (raw sockets
        only); returns the rest, as memoryviews, for :meth:`send`."""
        raw = self.raw
        assert raw is not None
        bufs = [p if isinstance(p, memoryview) else memoryview(p) for p in parts if len(p)]
        i = 0  # bufs[:i] are sent
        while i < len(bufs):
            batch = bufs[i:i + _IOV_BATCH]
            try:
                n = raw.sendmsg(batch)
            except BlockingIOError:
                break
            except OSError as e:
                raise trio.BrokenResourceError(e) from e
            for b in batch:
                if n < len(b):
                    bufs[i] = b[n:]
                    return bufs[i:]
                n -= len(b)
                i += 1
        return bufs[i:]

    async def send(self, *parts) -> None:
        raw = self.raw
        if raw is None:
            await self.stream.send_all(b"".join(parts))
            return
        bufs = list(parts)
        while True:
            bufs = self.send_now(bufs)
            if not bufs:
                return
            await trio.lowlevel.wait_writable(raw)

    def detach_raw(self) -> None:
        """Stop using the socket directly (the stream is about to be wrapped)."""
        if self.raw is not None:
            self.raw.detach()
            self.raw = None

    async def aclose(self) -> None:
        if self.raw is not None:
            self.raw.detach()  # the trio stream owns the fd and closes it
            self.raw = None
        with trio.move_on_after(1, shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


# ---------------------------------------------------------------------------
# exports
# ---------------------------------------------------------------------------


def _find_bitmap(node, spec) -> Any:
    """The dirty bitmap named by a BlockDirtyBitmapOrStr (name, or {node, name})."""
    if isinstance(spec, str):
        # a bare name is looked for down the chain of filters and backing
        # files, as QEMU does (bdrv_filter_or_cow_bs)
        name, holder = spec, node
        while holder is not None:
            bm = getattr(holder, "bitmaps", {}).get(name)
            if bm is not None:
                return bm
            edge = holder.children.get("backing")
            if edge is None and getattr(holder, "is_filter", False):
                edge = holder.children.get("file")
            holder = edge.node if edge is not None else None
        raise GenericError(f"Bitmap '{name}' is not found")
    name = getattr(spec, "name", None) or spec["name"]
    node_name = getattr(spec, "node", None) or spec["node"]
    holder = node.graph.lookup(node_name)
    bm = getattr(holder, "bitmaps", {}).get(name)
    if bm is None:
        raise GenericError(f"Bitmap '{name}' is not found")
    return bm


@register_export
class NbdExport(BlockExport):
    """One NBD export: a name on the server and a nursery for its clients."""

    type = "nbd"

    def __init__(self, daemon, args, node):
        super().__init__(daemon, args, node)
        server: NbdServer | None = daemon.nbd_server
        if server is None:
            raise GenericError("NBD server not running")
        self.server = server
        self.name: str = args.name if getattr(args, "name", None) is not None else args.node_name
        self.description: str | None = getattr(args, "description", None)
        if len(self.name.encode()) > P.MAX_STRING_SIZE:
            raise GenericError(f"export name '{self.name}' too long")
        if self.description is not None and len(self.description.encode()) > P.MAX_STRING_SIZE:
            raise GenericError(f"description '{self.description}' too long")
        if self.name in server.exports:
            raise GenericError(f"NBD server already has export named '{self.name}'")
        # writethrough: every write is made stable before it is acknowledged
        self.writethrough = bool(getattr(args, "writethrough", False))
        self.allocation_depth = bool(getattr(args, "allocation_depth", False))
        self.bitmaps = []
        for spec in getattr(args, "bitmaps", None) or []:
            bm = _find_bitmap(node, spec)
            if hasattr(bm, "check"):
                bm.check(allow_ro=True)
            if not self.writable and not node.read_only and getattr(bm, "enabled", False):
                raise GenericError(f"Enabled bitmap '{bm.name}' incompatible with readonly export")
            self.bitmaps.append(bm)
        self.clients: set[Connection] = set()
        self.stopping = False
        self._clients_changed = trio.Event()
        self._data_starts: list[int] = []
        self._data_ends: list[int] = []
        self.nursery: trio.Nursery | None = None
        self.edge = None

    # transmission flags this export announces (QEMU 7.2 sets multi-conn and
    # cache always: every connection goes through the same node, so a flush
    # on one covers writes acknowledged on another)
    @property
    def flags(self) -> int:
        f = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_DF
             | P.FLAG_CAN_MULTI_CONN | P.FLAG_SEND_CACHE)
        if self.writable:
            f |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        else:
            f |= P.FLAG_READ_ONLY
        return f

    @property
    def size(self) -> int:
        return self.node.length

    def meta_contexts(self) -> list[str]:
        ctx = [P.META_BASE_ALLOCATION]
        if self.allocation_depth:
            ctx.append(P.META_ALLOCATION_DEPTH)
        ctx += [P.META_DIRTY_BITMAP + bm.name for bm in self.bitmaps]
        return ctx

    # Ranges known to hold data, so a sparse READ can skip asking the block
    # layer.  Being wrong in the "data" direction is harmless (zeroes are sent
    # as data instead of as a hole), so other writers need not invalidate it;
    # our own TRIM/WRITE_ZEROES do, to keep replies as sparse as QEMU's.
    def known_data(self, offset: int, length: int) -> bool:
        i = bisect.bisect_right(self._data_starts, offset) - 1
        return i >= 0 and self._data_ends[i] >= offset + length

    def note_data(self, offset: int, length: int) -> None:
        starts, ends = self._data_starts, self._data_ends
        end = offset + length
        lo = bisect.bisect_left(ends, offset)      # first extent ending at/after offset
        hi = bisect.bisect_right(starts, end)      # extents starting at/before end
        if lo < hi:  # overlapping or touching extents merge into one
            offset = min(offset, starts[lo])
            end = max(end, ends[hi - 1])
        if len(starts) > _MAX_DATA_EXTENTS:
            starts.clear()
            ends.clear()
            lo = hi = 0
        starts[lo:hi] = [offset]
        ends[lo:hi] = [end]

    def forget_data(self, offset: int, length: int) -> None:
        i = bisect.bisect_right(self._data_starts, offset + length) - 1
        if i >= 0 and self._data_ends[i] > offset:
            self._data_starts.clear()
            self._data_ends.clear()

    def bitmap_for_context(self, ctx: str):
        name = ctx[len(P.META_DIRTY_BITMAP):]
        return next(bm for bm in self.bitmaps if bm.name == name)

    def client_count(self) -> int:
        # clients that have said goodbye are only finishing their replies
        return sum(not c.ending for c in self.clients)

    async def stop(self) -> None:
        """Stop taking requests, let those in flight finish (a few seconds at
        most, as QEMU drains them), then end the clients and the export."""
        if not self.stopping:
            self.stopping = True
            for conn in list(self.clients):
                conn.stop_reading()
            with trio.move_on_after(_DRAIN_DEADLINE):
                while self.clients:
                    self._clients_changed = trio.Event()
                    await self._clients_changed.wait()
        self.cancel_scope.cancel()
        await self.finished.wait()

    def client_left(self, conn) -> None:
        self.clients.discard(conn)
        self._clients_changed.set()

    def info(self) -> dict:
        d = super().info()
        d["shutting-down"] = d["shutting-down"] or self.stopping
        return d

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else 0)
        # QEMU's NBD export does not let anyone resize the node under its
        # clients (they were told the size at negotiation)
        self.edge = self.node.attach("root", self, Perm(perm),
                                     Perm.ALL & ~Perm.RESIZE)
        # exported bitmaps are busy: no job or QMP command may change them
        for bm in self.bitmaps:
            bm.busy = True
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self.server.exports[self.name] = self
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            if self.server.exports.get(self.name) is self:
                del self.server.exports[self.name]
            for bm in self.bitmaps:
                bm.busy = False
            self.edge.detach()
            self.finished.set()


# ---------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------


def _addr_dict(addr) -> dict:
    """SocketAddress or SocketAddressLegacy (attrs instance or dict) -> flat dict."""
    if not isinstance(addr, dict):
        # schema.to_qmp keeps union tags, which are class variables of the
        # variant classes and so invisible to attrs.asdict
        from ..qapi import schema

        addr = schema.to_qmp(addr)
    addr = {k.replace("_", "-"): v for k, v in addr.items() if v is not None}
    data = addr.get("data")
    if isinstance(data, dict):  # legacy form: {"type": ..., "data": {...}}
        flat = {k.replace("_", "-"): v for k, v in data.items() if v is not None}
        flat["type"] = addr["type"]
        addr = flat
    return addr


async def _open_listeners(addr: dict) -> list[trio.SocketListener]:
    kind = addr["type"]
    if kind == "unix":
        path = addr["path"]
        sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
        try:
            # QEMU replaces a stale socket file
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            await sock.bind(path)
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise GenericError(f"Failed to bind socket to {path}: {e.strerror}") from None
        return [trio.SocketListener(sock)]
    if kind == "inet":
        host = addr.get("host") or None
        port = str(addr["port"])
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_STREAM,
                                                  flags=_stdsocket.AI_PASSIVE)
        except _stdsocket.gaierror as e:
            raise GenericError(f"address resolution failed for {host or ''}:{port}: "
                               f"{e.strerror}") from None
        port_n = infos[0][4][1]
        try:
            return await trio.open_tcp_listeners(port_n, host=host)
        except OSError as e:
            raise GenericError(f"Failed to bind socket: {e.strerror}") from None
    if kind == "fd":
        fd_str = addr["str"]
        if not fd_str.isdigit():
            # there is no fd passing over QMP in qemu-storage-daemon
            raise GenericError("only QEMU supports file descriptor passing")
        try:
            sock = trio.socket.from_stdlib_socket(_stdsocket.socket(fileno=int(fd_str)))
        except OSError as e:
            raise GenericError(f"Failed to use socket fd {fd_str}: {e.strerror}") from None
        return [trio.SocketListener(sock)]
    raise GenericError(f"Unsupported socket address type '{kind}'")


def _prop(obj, name: str, default=None):
    props = getattr(obj, "props", None)
    if isinstance(props, dict):
        return props.get(name, default)
    return getattr(obj, name.replace("-", "_"), default)


def _tls_server_context(creds) -> ssl.SSLContext | str:
    """How to serve TLS with a credentials object: an SSLContext from a
    tls-creds-x509 object's directory (QEMU's file names), or for
    tls-creds-psk the path of its keys file (see tls_psk.py)."""
    d = _prop(creds, "dir", ".")
    if creds.qom_type == "tls-creds-psk":
        from ..objects.tls_creds import psk_key_file
        from . import tls_psk  # noqa: F401 - pyOpenSSL loaded now, not by the first client

        return psk_key_file({"dir": d})
    if creds.qom_type == "tls-creds-anon":
        from ..objects.tls_creds import anon_server_context

        ctx = anon_server_context()
        params = os.path.join(d, "dh-params.pem")
        if _prop(creds, "dir") is not None and os.path.exists(params):
            try:
                ctx.load_dh_params(params)
            except (OSError, ssl.SSLError) as e:
                raise GenericError(f"Unable to load DH parameters from {params}: {e}") from None
        return ctx
    if creds.qom_type != "tls-creds-x509":
        raise GenericError(f"TLS credentials of type '{creds.qom_type}' are not supported")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(os.path.join(d, "server-cert.pem"), os.path.join(d, "server-key.pem"))
        if _prop(creds, "verify-peer", True):
            ctx.load_verify_locations(os.path.join(d, "ca-cert.pem"))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise GenericError(f"Unable to load TLS credentials from '{d}': {e}") from None
    return ctx


# gnutls' short names for the DN attributes QEMU's authz identities use
_DN_NAMES = {"countryName": "C", "organizationName": "O", "organizationalUnitName": "OU",
             "commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
             "emailAddress": "EMAIL", "domainComponent": "DC"}


def _peer_dn(cert: dict | None) -> str | None:
    """The client certificate's DN as QEMU prints it (C=GB,O=Example,CN=name)."""
    if not cert or "subject" not in cert:
        return None
    return ",".join(f"{_DN_NAMES.get(k, k)}={v}" for rdn in cert["subject"] for k, v in rdn)


def _authz_allows(authz, identity: str) -> bool:
    kind = getattr(authz, "qom_type", "")
    if kind == "authz-simple":
        return _prop(authz, "identity") == identity
    if kind in ("authz-list", "authz-list-file"):
        rules = _prop(authz, "rules", []) or []
        policy = _prop(authz, "policy", "deny")
        if kind == "authz-list-file":
            try:
                with open(_prop(authz, "filename")) as f:
                    data = json.load(f)
                rules, policy = data.get("rules", []), data.get("policy", "deny")
            except (OSError, ValueError):
                return False
        for rule in rules:
            rule = rule if isinstance(rule, dict) else attrs_to_dict(rule)
            pattern = rule.get("match", "")
            if (fnmatch.fnmatchcase(identity, pattern) if rule.get("format") == "glob"
                    else identity == pattern):
                return rule.get("policy") == "allow"
        return policy == "allow"
    return False


def attrs_to_dict(obj) -> dict:
    import attrs

    return {k.replace("_", "-"): v for k, v in attrs.asdict(obj).items()}


class NbdServer:
    """The daemon's one NBD server (nbd-server-start / --nbd-server).

    Resources: the listening sockets and the negotiating connections live in
    :meth:`run`'s nursery and are closed when its cancel scope is cancelled
    (:meth:`stop`); exports (and their clients) are separate tasks that
    nbd-server-stop deletes first.
    """

    def __init__(self, daemon, addr, *, tls_creds: str | None = None,
                 tls_authz: str | None = None, max_connections: int | None = None):
        self.daemon = daemon
        self.addr = _addr_dict(addr)
        # ids, as daemon.object_users() looks them up; the objects are read
        # when a client asks for TLS, so they always reflect what is defined
        self.tls_creds = tls_creds
        self.tls_x509 = False
        if tls_creds is not None:
            creds = getattr(daemon, "objects", {}).get(tls_creds)
            if creds is None:
                raise GenericError(f"No TLS credentials with id '{tls_creds}'")
            if not str(getattr(creds, "qom_type", "")).startswith("tls-creds"):
                raise GenericError(f"Object with id '{tls_creds}' is not TLS credentials")
            if _prop(creds, "endpoint", "client") != "server":
                raise GenericError("Expected TLS credentials for a server endpoint")
            self.tls_context = _tls_server_context(creds)
            self.tls_x509 = creds.qom_type == "tls-creds-x509"
        # looked up per client, as QEMU does: a missing object denies access
        self.tls_authz = tls_authz
        self.max_connections = max_connections or 0
        self.exports: dict[str, NbdExport] = {}
        self.connections = 0
        self.cancel_scope = trio.CancelScope()
        self.finished = trio.Event()
        self._slots = trio.Semaphore(self.max_connections) if self.max_connections else None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.cancel_scope:
                listeners = await _open_listeners(self.addr)
                try:
                    async with trio.open_nursery() as nursery:
                        for lst in listeners:
                            nursery.start_soon(self._accept_loop, lst, nursery)
                        task_status.started()
                finally:
                    for lst in listeners:
                        with trio.CancelScope(shield=True):
                            await lst.aclose()
                    if self.addr["type"] == "unix":
                        # QEMU removes its socket file when the server stops
                        with contextlib.suppress(OSError):
                            os.unlink(self.addr["path"])
        finally:
            self.finished.set()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # the socket listens from the start, but clients are served only once
        # startup is complete and the pidfile written (the man page's promise)
        accepting = getattr(self.daemon, "accepting", None)
        if accepting is not None:
            await accepting.wait()
        while True:
            # at max-connections QEMU stops accepting: new clients wait in
            # the listen backlog until someone leaves
            if self._slots is not None:
                await self._slots.acquire()
            try:
                stream = await listener.accept()
            except BaseException:
                if self._slots is not None:
                    self._slots.release()
                raise
            self.connections += 1
            conn = Connection(self, stream)
            nursery.start_soon(conn.negotiate)

    def _connection_closed(self) -> None:
        self.connections -= 1
        if self._slots is not None:
            self._slots.release()

    async def stop(self) -> None:
        self.cancel_scope.cancel()
        await self.finished.wait()


# ---------------------------------------------------------------------------
# one client connection
# ---------------------------------------------------------------------------


class Connection:
    """A client: negotiation, then transmission inside its export's nursery.

    The connection owns its stream; whichever task runs it last closes it
    (``_close``) and gives the server's connection slot back.
    """

    def __init__(self, server: NbdServer, stream: trio.abc.Stream):
        self.server = server
        self.wire = Wire(stream)
        self.structured = False
        # NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths and
        # only extended reply chunks (structured is then set too)
        self.extended = False
        self.no_zeroes = False
        self.tls_done = False
        self.meta_export: str | None = None
        self.meta_ids: list[tuple[int, str]] = []  # (context id, name) after SET
        self.export: NbdExport | None = None
        self._slots = trio.Semaphore(MAX_REQUESTS)
        self._out: list = []
        self._out_done = 0
        self._out_ready = trio.Event()
        self._sending = False  # the writer is part way through a send
        self._flush_deferred = False  # a reaper will send the queued replies
        self._hangup = ""
        self._broken = False
        self._reader_scope = trio.CancelScope()
        self._closed = False
        self._handed_over = False
        # it has sent DISC (or hung up): no longer a user of its export
        self.ending = False

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.wire.aclose()
        self.server._connection_closed()

    # -- negotiation (runs in the server's nursery) ---------------------------
    async def negotiate(self) -> None:
        try:
            export, last_reply = await self._negotiate()
            if export is not None and export.nursery is not None:
                # count the client before it can send a request, so that
                # block-export-del mode=safe sees it; then hand the connection
                # to the export's nursery: from now on the export (not the
                # server) decides when it ends
                export.clients.add(self)
                self._handed_over = True
                export.nursery.start_soon(self.serve, export, last_reply)
        except (_Disconnect, P.NbdProtocolError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError) as e:
            log.debug("nbd client negotiation ended: %s", e)
        finally:
            if not self._handed_over:
                with trio.CancelScope(shield=True):
                    await self._close()

    async def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        await self.wire.send(P.option_reply(option, reply, data))

    async def _error(self, option: int, reply: int, message: str) -> None:
        await self._reply(option, reply, message.encode())

    async def _negotiate(self) -> tuple[NbdExport | None, bytes]:
        """Run the option phase; returns the export chosen and the reply that ends it."""
        await self.wire.send(P.server_greeting())
        flags = int.from_bytes(await self.wire.recv_exactly(4), "big")
        fixed = bool(flags & P.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & P.FLAG_C_NO_ZEROES)
        if flags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise _Disconnect(f"Unknown client flags 0x{flags:x} received")
        while True:
            option, length = P.parse_option_header(await self.wire.recv_exactly(P.OPTION_HEADER_SIZE))
            if length > P.MAX_BUFFER_SIZE:
                raise _Disconnect(f"len ({length}) is larger than max len ({P.MAX_BUFFER_SIZE})")
            if self.server.tls_creds is not None and not self.tls_done:
                if option == P.OPT_STARTTLS:
                    await self.wire.skip(length)
                    if length:
                        await self._error(option, P.REP_ERR_INVALID, "option 'starttls' has unexpected length")
                        continue
                    await self._starttls()
                    continue
                # read the payload first: closing on unread data would reset
                # the connection before the client sees the close
                await self.wire.skip(length)
                if option in (P.OPT_EXPORT_NAME, P.OPT_ABORT):
                    raise _Disconnect(f"Option 0x{option:x} not permitted before TLS")
                await self._error(option, P.REP_ERR_TLS_REQD,
                                  f"Option 0x{option:x} not permitted before TLS")
                continue
            known = option in (P.OPT_EXPORT_NAME, P.OPT_INFO, P.OPT_GO,
                               P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT)
            if known and length > P.MAX_OPTION_SIZE:
                if option == P.OPT_EXPORT_NAME:
                    raise _Disconnect("export name too long")
                await self.wire.skip(length)
                await self._error(option, P.REP_ERR_INVALID, "option too long")
                continue
            payload = await self.wire.recv_exactly(length) if known else b""
            if option == P.OPT_EXPORT_NAME:
                if self.extended:
                    # the spec forbids it; QEMU hangs up
                    raise _Disconnect("Extended headers already negotiated, "
                                      "no more NBD_OPT_EXPORT_NAME")
                name = payload.decode(errors="replace")
                export = self.server.exports.get(name)
                if export is None:
                    raise _Disconnect(f"export '{name}' not present")
                return export, P.export_name_reply(export.size, export.flags, self.no_zeroes)
            if option in (P.OPT_INFO, P.OPT_GO):
                try:
                    export = await self._info(option, payload)
                except P.OptionError as e:
                    await self.wire.send(P.option_error(option, e))
                    continue
                if option == P.OPT_GO:
                    return export, P.option_reply(option, P.REP_ACK)
                await self._reply(option, P.REP_ACK)
                continue
            if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                try:
                    await self._meta(option, payload)
                except P.OptionError as e:
                    await self.wire.send(P.option_error(option, e))
                continue
            # options without a payload we care about: drop it unread
            await self.wire.skip(length)
            if option == P.OPT_ABORT:
                try:
                    await self._reply(option, P.REP_ACK)
                finally:
                    raise _Disconnect("client aborted")  # noqa: B012 - abort ends negotiation
            if not fixed:
                raise _Disconnect(f"Unsupported option {option} without fixed newstyle")
            if option == P.OPT_LIST:
                if length:
                    await self._error(option, P.REP_ERR_INVALID, "option 'list' has unexpected length")
                    continue
                for exp in list(self.server.exports.values()):
                    await self._reply(option, P.REP_SERVER, P.rep_server(exp.name, exp.description or ""))
                await self._reply(option, P.REP_ACK)
            elif option == P.OPT_STRUCTURED_REPLY:
                if length:
                    await self._error(option, P.REP_ERR_INVALID,
                                      "option 'structured reply' has unexpected length")
                elif self.extended:
                    await self._error(option, P.REP_ERR_EXT_HEADER_REQD,
                                      "extended headers already negotiated")
                elif self.structured:
                    await self._error(option, P.REP_ERR_INVALID, "structured reply already negotiated")
                else:
                    self.structured = True
                    await self._reply(option, P.REP_ACK)
            elif option == P.OPT_EXTENDED_HEADERS:
                if length:
                    await self._error(option, P.REP_ERR_INVALID,
                                      "option 'extended headers' has unexpected length")
                elif self.extended:
                    await self._error(option, P.REP_ERR_INVALID,
                                      "extended headers already negotiated")
                else:
                    self.extended = self.structured = True
                    await self._reply(option, P.REP_ACK)
            elif option == P.OPT_STARTTLS:
                if self.tls_done:
                    await self._error(option, P.REP_ERR_INVALID, "TLS already enabled")
                else:
                    await self._error(option, P.REP_ERR_POLICY, "TLS not configured")
            else:
                await self._error(option, P.REP_ERR_UNSUP,
                                  f"Unsupported option {option} ({P.OPT_NAMES.get(option, '<unknown>')})")

    async def _starttls(self) -> None:
        """NBD_OPT_STARTTLS: ACK, TLS handshake, then the authz identity check."""
        await self._reply(P.OPT_STARTTLS, P.REP_ACK)
        self.wire.detach_raw()
        context = self.server.tls_context
        if isinstance(context, str):
            from .tls_psk import PskTlsStream

            tls = PskTlsStream(self.wire.stream, context)
        else:
            tls = trio.SSLStream(self.wire.stream, context, server_side=True)
        self.wire = Wire(tls)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            raise _Disconnect(f"TLS handshake failed: {e}") from None
        self.tls_done = True
        authz_id = self.server.tls_authz
        # QEMU 7.2 checks tls-authz against x509 client certificates only: a
        # PSK session (whose identity was checked by knowing the key) or an
        # anonymous one passes whatever the authz object says
        if authz_id is not None and self.server.tls_x509:
            dn = _peer_dn(tls.getpeercert())
            authz = self.server.daemon.objects.get(authz_id)
            if dn is None or authz is None or not _authz_allows(authz, dn):
                raise _Disconnect(f"TLS x509 authz check for {dn} is denied")

    async def _info(self, option: int, payload: bytes) -> NbdExport:
        """Send the NBD_REP_INFO replies; the caller sends the final ACK."""
        name, infos = P.parse_info_request(payload, P.OPT_NAMES[option])
        export = self.server.exports.get(name)
        if export is None:
            raise P.OptionError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        if P.INFO_NAME in infos:
            await self._reply(option, P.REP_INFO, P.info_name(export.name))
        if export.description:
            await self._reply(option, P.REP_INFO, P.info_description(export.description))
        align = max(getattr(export.node, "request_alignment", 1), 1)
        minimum = align if P.INFO_BLOCK_SIZE in infos else 1
        maximum = P.MAX_BUFFER_SIZE
        node_max = getattr(export.node, "max_transfer", None)
        if node_max:
            maximum = min(maximum, node_max)
        await self._reply(option, P.REP_INFO,
                          P.info_block_size(minimum, max(_PREFERRED_BLOCK, minimum), maximum))
        await self._reply(option, P.REP_INFO, P.info_export(export.size, export.flags))
        if option == P.OPT_INFO and P.INFO_BLOCK_SIZE not in infos and align > 1:
            raise P.OptionError(P.REP_ERR_BLOCK_SIZE_REQD,
                                "request NBD_INFO_BLOCK_SIZE to use this export")
        return export

    async def _meta(self, option: int, payload: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if not self.structured:
            raise P.OptionError(P.REP_ERR_INVALID,
                                f"request option '{P.OPT_NAMES[option]}' when structured reply "
                                "is not negotiated")
        name, queries = P.parse_meta_request(payload, P.OPT_NAMES[option])
        export = self.server.exports.get(name)
        if export is None:
            raise P.OptionError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        available = export.meta_contexts()
        chosen = P.match_meta_contexts(queries, available, listing=not setting)
        ids = [(available.index(c), c) for c in chosen]
        for cid, ctx in ids:
            # ids only mean something once set; QEMU lists every context as 0
            await self._reply(option, P.REP_META_CONTEXT,
                              P.meta_context_reply(cid if setting else 0, ctx))
        if setting:
            self.meta_export = name
            self.meta_ids = ids
        await self._reply(option, P.REP_ACK)

    # -- transmission (runs in the export's nursery) ------------------------------
    async def serve(self, export: NbdExport, last_reply: bytes = b"") -> None:
        """Transmission phase, after sending ``last_reply`` (the option phase's end)."""
        self.export = export
        export.clients.add(self)
        if self.meta_export != export.name:
            self.meta_ids = []  # contexts were negotiated for another export
        try:
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
            export.client_left(self)
            with trio.CancelScope(shield=True):
                await self._close()

    # Replies: request tasks queue their parts; one writer task sends all that
    # is queued with one sendmsg, so under load many replies share a syscall.
    # A request's slot is released only once its reply is on the wire, which
    # bounds what a client that does not read its replies can make us hold.
    def _queue(self, parts: tuple, done: bool = True) -> None:
        self._out.extend(parts)
        if done:
            self._out_done += 1
        self._out_ready.set()

    def _queue_quiet(self, parts: tuple) -> None:
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
        for _ in range(done):
            self._slots.release()

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
                for _ in range(done):
                    self._slots.release()

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        """Read requests until DISC, EOF, a fatal request or stop_reading().

        Holds at most one slot of its own at a time and gives it back on
        every way out, so serve() can count the requests still in flight.
        """
        wire = self.wire
        export = self.export
        size_fn = export.node._length
        slots = self._slots
        extended = self.extended
        # Requests the node can serve without waiting are served right here
        # (_serve_now), their replies sent in a batch when the reader would
        # otherwise wait; only the rest go to the worker tasks.  Over TLS the
        # writer task sends them.
        quiet = wire.raw is not None
        if quiet:
            wire.before_wait = self._flush_now
        try:
            await self._read_loop(wire, export, size_fn, slots, extended, quiet)
        finally:
            wire.before_wait = None
            self._flush_now()  # serve() waits for these replies' slots

    async def _read_loop(self, wire, export, size_fn, slots, extended, quiet) -> None:
        with self._reader_scope:
            while True:
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    # Replies served inline hold their slots until sent, so
                    # this is reached at least every MAX_REQUESTS requests;
                    # acquire() is a checkpoint even when the flush just gave
                    # the slots back: a busy client cannot hold the loop.
                    self._flush_now()
                    await slots.acquire()
                handed_off = False
                try:
                    if extended:
                        req = P.parse_ext_request(await wire.recv_exactly(P.EXT_REQUEST_SIZE))
                    else:
                        req = P.parse_request(await wire.recv_exactly(P.REQUEST_SIZE))
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
                        data = buffers.alloc(req.length)
                        # a partial write (client gone, or stop_reading) is never applied
                        await wire.recv_into(memoryview(data))
                    size = size_fn()
                    if not ((t == P.CMD_READ or t == P.CMD_WRITE) and req.length
                            and self._serve_now(req, data, size, export, quiet)):
                        self._requests.send_nowait((req, data, size))
                    handed_off = True
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
        if self._validate(req, size) is not None:
            return False  # the worker words the error
        node = export.node
        h = req.handle
        if req.type == P.CMD_WRITE:
            if req.flags & P.CMD_FLAG_FUA or export.writethrough:
                return False
            if not node.write_now(req.offset, data):
                return node.write_submit(req.offset, data, self._completion(req))
            reply = (P.chunk_none(h, req.offset) if self.extended else P.simple_reply(h),)
        else:
            off, ln = req.offset, req.length
            if not self.structured:
                buf = node.read_now(off, ln)
                if buf is None:
                    return node.read_submit(off, ln, self._completion(req))
                reply = (P.simple_reply(h), buf)
            else:
                if not (req.flags & P.CMD_FLAG_DF or export.known_data(off, ln)):
                    return False  # a sparse read asks the block status first
                buf = node.read_now(off, ln)
                if buf is None:
                    return node.read_submit(off, ln, self._completion(req))
                reply = (P.chunk_offset_data_header(h, off, ln, True,
                                                    off if self.extended else None), buf)
        if quiet:
            self._queue_quiet(reply)
        else:
            self._queue(reply)
        return True

    def _completion(self, req: P.Request):
        """The reply to a READ or WRITE started with read_submit/write_submit,
        queued by the engine's reaper when it completes.  The reaper sends
        the replies of its whole batch of completions with one sendmsg once
        it has handled them all (after_completions); what the socket does
        not take goes to the writer task."""
        def done(buf, err) -> None:
            if self._closed:
                return  # the connection ended (export deleted): no one to answer
            h = req.handle
            if err is not None:
                if self._sparse_read(req):
                    # the worker reads again, and answers as QEMU would
                    # (an error chunk if the block status fails, else a hangup)
                    self._requests.send_nowait((req, None, self.export.size))
                    return
                self._error_reply(req, P.errno_to_nbd(err.errno), _FAILED[req.type])
                return
            if req.type == P.CMD_WRITE:
                parts = (P.chunk_none(h, req.offset) if self.extended else P.simple_reply(h),)
            elif not self.structured:
                parts = (P.simple_reply(h), buf)
            else:
                parts = (P.chunk_offset_data_header(
                    h, req.offset, req.length, True, req.offset if self.extended else None),
                    buf)
            self._queue_quiet(parts)
            if not self._flush_deferred:
                if after_completions(self._deferred_flush):
                    self._flush_deferred = True
                else:
                    self._out_ready.set()
        return done

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

    async def _worker(self, receive: trio.MemoryReceiveChannel) -> None:
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
        export = self.export
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
        export = self.export
        node = export.node
        t = req.type
        try:
            if t == P.CMD_READ:
                await self._read(req)
                return
            if t == P.CMD_WRITE:
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
        export = self.export
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
            await self.export.node.block_status(off, ln)
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
        chunks = []
        for cid, ctx in self.meta_ids:
            if ctx == P.META_BASE_ALLOCATION:
                ext = await self._alloc_extents(req.offset, req.length, one, False, limit)
            elif ctx == P.META_ALLOCATION_DEPTH:
                ext = await self._alloc_extents(req.offset, req.length, one, True, limit)
            else:
                bm = self.export.bitmap_for_context(ctx)
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
                             limit: int = 1 << 32) -> list:
        node = self.export.node
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
        return [tuple(e) for e in out]


def _add_extent(out: list[list[int]], n: int, flags: int, limit: int = 1 << 32) -> None:
    # merge runs with equal flags, as QEMU does, while the length fits the
    # reply's field (32 bits, or 64 with extended headers)
    if out and out[-1][1] == flags and out[-1][0] + n < limit:
        out[-1][0] += n
    else:
        out.append([n, flags])


def _bitmap_extents(bm, offset: int, length: int, one: bool,
                    limit: int = 1 << 32) -> Sequence[tuple[int, int]]:
    out: list[list[int]] = []
    for _off, n, dirty in bm.dirty_extents(offset, length):
        _add_extent(out, n, P.STATE_DIRTY if dirty else 0, limit)
        if one or len(out) >= MAX_BLOCK_STATUS_EXTENTS:
            break
    if not out:  # past the bitmap's end: report clean
        out.append([length, 0])
    return [tuple(e) for e in out]
