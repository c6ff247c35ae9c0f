"""Block nodes: the one I/O layer every export, job and format driver calls.

A driver subclasses :class:`BlockNode` and implements the small ``_co_*``
hooks (nbdkit style).  The public methods here (``read``, ``write``,
``write_zeroes``, ``discard``, ``flush``, ``block_status``, ``truncate``) do
what is common, once: bounds checks, request tracking and drain, dirty
bitmaps, before-write hooks, the write threshold, ``detect-zeroes``,
``discard=unmap``, ``cache.no-flush``, fallbacks (zero-write falls back to
write) and statistics.

Offsets and lengths are bytes.  Data passed to ``write`` is any buffer
(bytes, bytearray, memoryview); ``read`` returns a buffer the caller may keep.

Bounds: requests must lie inside ``length``, except on nodes whose class sets
``grows = True`` (the ``file`` driver): as in QEMU, a format driver may write
past the end of its protocol child (the file grows) and reads past the end
return zeroes.  Exports check their own bounds against the export size.

Permissions: users take them with :meth:`BlockNode.attach` (exports, jobs) or
:meth:`BlockNode.open_child` (format drivers and filters); conflicts raise
``GenericError`` with QEMU's text.  Releasing an edge is ``edge.detach()``.

Errors: I/O failures are raised as ``OSError`` with an errno (exports turn it
into the protocol's error code); misuse that a QMP client can cause is a
``QapiError``.

A request's origin (from outside: an export or a job; or from a parent node
serving a request) is ambient, the ``_in_request`` contextvar, not an
argument: a drained section lets through what a driver asks of its children
and what the draining task does, and ``write_zeroes`` drops ``may_unmap`` for
a parent's request to a node without discard=unmap.  An explicit argument
would have to be passed on every driver's every child call, and one missed
would hang a drained section; the pass belongs to a task (the drainer), and
tasks a request spawns inherit it.  The fast paths never read it: they refuse
on a quiesced node.  docs/block-layer.md has the reasoning.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import errno
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast, overload

import attrs
import trio

from .. import events
from ..qapi.errors import GenericError
from ..qapi.ghash import qdict_order
from . import latency as _latency
from .bitmaps import DirtyBitmap
from .engine import buffers

if TYPE_CHECKING:
    from .graph import BlockGraph


class Perm(enum.IntFlag):
    """QEMU's BlockPermission (block-core.json: consistent-read, write, ...)."""

    CONSISTENT_READ = 1
    WRITE = 2
    WRITE_UNCHANGED = 4
    RESIZE = 8
    ALL = 15


class Status(enum.IntFlag):
    """Block status of a range (QEMU's BDRV_BLOCK_*)."""

    DATA = 1          # reads come from stored data
    ZERO = 2          # reads return zeroes
    ALLOCATED = 4     # allocated in this layer (not from a backing file)
    OFFSET_VALID = 8  # ``offset`` is the host offset in ``file``


@attrs.frozen
class BlockStatus:
    """Status of ``length`` bytes at the start of the queried range."""

    flags: Status
    length: int
    # how many layers down the data is (1 = this node); 0 = unallocated anywhere
    depth: int = 1
    offset: int | None = None  # host offset when OFFSET_VALID


def parent_desc(parent: BlockNode | BlockParent) -> str:
    """How QEMU names a parent in permission errors (bdrv_child_user_desc)."""
    if isinstance(parent, BlockNode):
        return f"node '{parent.node_name}'"
    return parent.perm_desc


class BlockParent:
    """A user of a node that is not a node: an export, a block job, a job's
    BlockBackend (QEMU's BdrvChildClass for child_root and child_job).

    Every edge's parent is a :class:`BlockNode` or one of these; subclasses
    override what differs from a plain BlockBackend.
    """

    # bdrv_replace_node leaves this user's edges where they are (child_job)
    stay_at_node: ClassVar[bool] = False

    @property
    def perm_desc(self) -> str:
        """How permission errors name it (bdrv_child_user_desc): "mirror job
        'j0'"; a BlockBackend without a device is "an unnamed block device"."""
        return "an unnamed block device"

    @property
    def block_job_type(self) -> str | None:
        """The job type if this user is a block job, whose op blocker refuses
        blockdev-del ("block device is in use by block job: mirror")."""
        return None

    def child_attached(self, edge: BdrvChild) -> None:
        """``edge`` now points at ``edge.node`` (attached, or moved there by
        :meth:`BlockGraph.replace_node`): a user that keeps its node beside
        the edge updates it here (BdrvChildClass.attach)."""

    def child_detached(self, edge: BdrvChild) -> None:
        """``edge`` was dropped (BdrvChildClass.detach)."""

    def child_resized(self, edge: BdrvChild) -> None:
        """``edge.node`` changed its length (a successful truncate:
        BdrvChildClass.resize); an export tells its client here."""


_EDGE_SEQ = itertools.count()


@attrs.define(eq=False)
class BdrvChild:
    """An edge: ``parent`` uses ``node`` in role ``name`` with permissions.

    ``parent`` is a BlockNode or a :class:`BlockParent` (export, job); the
    parent's ``child_attached``/``child_detached`` hooks run when the edge
    points at a new node and when it is dropped, so a parent that keeps the
    node beside the edge (qcow2's ``backing``) stays right.
    """

    name: str
    node: BlockNode
    parent: BlockNode | BlockParent
    perm: Perm
    shared: Perm
    # creation order: x-debug-query-block-graph lists BlockBackends (users
    # that are neither nodes nor jobs) in the order they were created
    seq: int = attrs.field(init=False, factory=lambda: next(_EDGE_SEQ))

    def attach(self) -> None:
        """Put this new edge in the graph: first among the node's parents
        (newest first, as QEMU lists them) and, from a node, its child in
        this role, with the permissions the edge takes (all of them shared
        on a force-share node); then the parent hears of it.  On a
        permission conflict (GenericError, QEMU's text) the graph is left
        as it was.  BlockNode.attach and BlockGraph.link make edges."""
        from .perms import refresh  # perms imports this module
        node, parent = self.node, self.parent
        if node.force_share:
            self.shared = Perm.ALL
        if isinstance(parent, BlockNode):
            parent.children[self.name] = self
        node.parents.insert(0, self)
        try:
            refresh(node)
        except BaseException:
            if isinstance(parent, BlockNode):
                del parent.children[self.name]
            node.parents.remove(self)
            with contextlib.suppress(Exception):
                refresh(node)
            raise
        parent.child_attached(self)

    def detach(self) -> None:
        """Drop this edge; the node's permissions (and file locks) shrink."""
        if self in self.node.parents:
            self.node.parents.remove(self)
            parent = self.parent
            if isinstance(parent, BlockNode) and parent.children.get(self.name) is self:
                del parent.children[self.name]
            parent.child_detached(self)
            from .perms import refresh  # perms imports this module
            with contextlib.suppress(Exception):  # shrinking cannot conflict
                refresh(self.node)

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Change this edge's permissions (bdrv_child_try_set_perm); may raise."""
        from .perms import refresh  # perms imports this module
        old = (self.perm, self.shared)
        self.perm, self.shared = Perm(perm), Perm(shared)
        try:
            refresh(self.node)
        except BaseException:
            self.perm, self.shared = old
            with contextlib.suppress(Exception):
                refresh(self.node)
            raise


# Set while a request is being served, so that the requests a driver issues
# to its children (and the drainer's own requests) pass a drained section's
# gate; only new requests from outside wait.
_in_request: contextvars.ContextVar[bool] = contextvars.ContextVar("_in_request", default=False)

# Set in a block job's task (and so in the tasks it starts): its requests
# are bulk copies, which want throughput more than latency, where an
# exporter's request wants its reply soon.  A driver may serve them
# differently: the file driver reads large runs of page-cache data on the
# engine's workers for a job (several copies at once on the other cores)
# and on the event loop for an export (no hop).  Ambient for the same
# reason as _in_request: a job's read reaches the file node through any
# format or filter, and none of them has to pass it on.
bulk_requests: contextvars.ContextVar[bool] = contextvars.ContextVar("bulk_requests",
                                                                     default=False)

# what requests carry and return: any buffer (bytes, bytearray, memoryview)
Buffer = bytes | bytearray | memoryview
# the completion of a request started without a task (read_submit,
# write_submit): done(result, error), exactly one of them None; a write's
# result is always None
ReadDone = Callable[[Any, OSError | None], None]
WriteDone = ReadDone

# before-write hook: await hook(node, offset, length) before data changes
BeforeWrite = Callable[["BlockNode", int, int], Awaitable[None]]

STAT_KEYS = ("rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
             "unmap_operations", "flush_operations", "failed_rd_operations",
             "failed_wr_operations", "failed_unmap_operations", "failed_flush_operations",
             "zone_append_bytes")


def _qdict_ordered(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _qdict_ordered(value[k]) for k in qdict_order(value)}
    return value


def json_filename(options: dict[str, Any]) -> str:
    """A ``json:{...}`` file name as QEMU prints it: its QDict of options in
    bucket order at every level (insert keys in QEMU's order: ``driver`` first)."""
    return "json:" + json.dumps(_qdict_ordered(options))


class BlockNode:
    """A node in the block graph.  Subclasses set ``driver`` and the hooks."""

    driver: ClassVar[str] = ""
    # opened read-only by inheritance (a backing file), not by the user
    implicit_read_only = False
    # protocol nodes that grow when written past the end (file)
    grows: ClassVar[bool] = False
    # filters (copy-on-read, blkdebug, raw without offset/size) pass perms through
    is_filter: ClassVar[bool] = False
    # filters whose child query-named-block-nodes shows as "backing-image"
    shows_filtered_child: ClassVar[bool] = False
    # What a driver can do beyond the I/O hooks, declared here with QEMU's
    # defaults (its BlockDriver table; nbdkit's can_* queries), so that the
    # graph, the jobs and the monitor ask the node instead of probing it.
    # Each has its hook below, under "optional driver operations".
    supports_persistent_bitmaps: ClassVar[bool] = False  # check/remove_persistent_bitmap
    supports_compressed_writes: ClassVar[bool] = False  # write_compressed
    supports_snapshot_access: ClassVar[bool] = False  # preadv_snapshot & co (copy-before-write)
    # blockdev-reopen options the driver takes beyond the common ones
    reopenable: ClassVar[Collection[str]] = frozenset()
    # query-block's "encrypted"
    encrypted: bool = False

    # whether debug_event does anything (only blkdebug's does): the request
    # path skips the calls otherwise
    _debug_events: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._debug_events = cls.debug_event is not BlockNode.debug_event

    def __init__(self, graph: BlockGraph, node_name: str, *, read_only: bool = False):
        self.graph = graph
        self.node_name = node_name
        self.read_only = read_only
        self.children: dict[str, BdrvChild] = {}  # role -> edge
        self.parents: list[BdrvChild] = []  # newest first, as QEMU lists them
        self.options: dict[str, Any] = {}  # the validated options it was opened with
        self._in_flight = 0
        self._drained: trio.Event | None = None  # set by the request that ends the last
        self._quiesce = 0
        self._resume = trio.Event()
        self._resume.set()
        # allocation granularity for callers that care (mirror, NBD min block)
        self.request_alignment = 1
        # common options (configure())
        self.auto_read_only = False
        self.force_share = False
        self.discard_unmap = False
        self.detect_zeroes = "off"
        self.cache_direct = False
        self.cache_no_flush = False
        self.monitor_owned = False  # added by blockdev-add as a root
        # what the parents take and share, summed up (perms.refresh keeps it)
        self.cum_perm = Perm(0)
        self.cum_shared = Perm.ALL
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self.before_write: list[BeforeWrite] = []
        self.write_threshold = 0
        self.wr_highest_offset = 0
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        # per-operation latency while --metrics asks for it (nodes/latency.py)
        self.latency = _latency.new()
        # the node below that serves this node's requests as they are (the
        # same offset, length and data: raw without an offset or size),
        # set by the driver when the graph is built or the child changes;
        # read(), write() and the paths without a task then hand a request
        # straight to that node's driver, with both nodes' checks and books
        # done in one pass (_plain_read, _write_node)
        self._through: BlockNode | None = None

    # -- what drivers implement ------------------------------------------
    async def open(self, options: dict[str, Any]) -> None:
        """Open with validated options (QAPI names, hyphenated keys)."""

    def _length(self) -> int:
        raise NotImplementedError

    async def _co_preadv(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    async def _co_preadv_into(self, offset: int, length: int, views: list[memoryview]) -> None:
        # a scatter read (read_into): by default read, then copy; drivers
        # that can read straight into the views (file, raw) override it
        data = memoryview(await self._co_preadv(offset, length)).cast("B")
        if len(data) != length:
            raise OSError(errno.EIO, "Input/output error")
        pos = 0
        for v in views:
            n = len(v)
            v[:] = data[pos:pos + n]
            pos += n

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        raise OSError(95, "Operation not supported")

    async def _co_pwritev_vec(self, offset: int, length: int, views: list[memoryview],
                              fua: bool) -> None:
        # a gather write (writev): by default gathered into one buffer and
        # written; drivers that take the views as they are (file, raw) override it
        await self._co_pwritev(offset, gather(views, length), fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        # fallback: write explicit zeroes, in bounded chunks; a caller that
        # asked for no fallback (NBD's FAST_ZERO) is told it would be slow
        if no_fallback:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        chunk = bytes(min(length, 1 << 20))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            await self._co_pwritev(pos, memoryview(chunk)[:n], fua)
            pos += n

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        return None  # discard is advisory

    async def _co_flush(self) -> None:
        for child in self.children.values():
            await child.node.flush()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(Status.DATA | Status.ALLOCATED, length)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        # a driver without bdrv_co_truncate: bdrv_co_truncate's refusal
        raise GenericError("Image format driver does not support resize")

    async def _close(self) -> None:
        return None

    async def prepare_read_only(self) -> None:
        """The node is about to become read-only (blockdev-reopen, the old
        top of a snapshot, a job's base going back): write out what the
        driver keeps only while writable, as QEMU's reopen_prepare does
        (qcow2 stores its persistent bitmaps).  The caller then flushes."""

    async def became_writable(self) -> None:
        """The node was reopened read-write (qcow2 marks its persistent
        bitmaps in use again, as qcow2_reopen_bitmaps_rw)."""

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """What this node takes on child ``edge`` given its parents' needs."""
        from . import perms  # perms imports this module
        if self.is_filter:
            return perms.filter_perms(perm, shared)
        if edge.name == "backing":
            return perms.cow_perms(perm, shared)
        if edge.name == "data-file":
            return perms.storage_perms(perm, shared, writable=not self.read_only,
                                       metadata=False)
        if edge.name == "file":
            # a format whose data lives in a data-file keeps only metadata here
            return perms.storage_perms(perm, shared, writable=not self.read_only,
                                       data="data-file" not in self.children)
        return perms.filter_perms(perm, shared)

    def child_attached(self, edge: BdrvChild) -> None:
        """Child ``edge`` now points at ``edge.node``: linked, or moved there
        by :meth:`BlockGraph.replace_node` (BdrvChildClass.attach).  A driver
        that keeps a child's node beside the edge for its request path (qcow2's
        ``file``, ``data``, ``backing``) updates it here; one that keeps only
        the edge has nothing to do."""

    def child_detached(self, edge: BdrvChild) -> None:
        """Child ``edge`` was dropped (BdrvChildClass.detach): the backing
        child of a commit, stream or snapshot, or any child once the node is
        closed."""

    def child_resized(self, edge: BdrvChild) -> None:
        """Child ``edge``'s node changed its length (BdrvChildClass.resize);
        nodes have nothing to do."""

    # -- optional driver operations, with their defaults ----------------------
    @property
    def has_info(self) -> bool:
        """Whether the driver answers bdrv_get_info (query shows a dirty-flag)."""
        return True

    @property
    def ejected(self) -> bool:
        """QEMU drops the driver of a fatally corrupt node (bs->drv = NULL):
        queries then refuse it."""
        return False

    def can_write_zeroes_with_unmap(self) -> bool:
        """bdrv_can_write_zeroes_with_unmap: opened with discard=unmap and
        zeroing by unmapping reads back zeroes (mirror zeroes such a target
        first instead of copying every zero)."""
        return False

    def reopen_check(self, options: dict[str, Any]) -> None:
        """blockdev-reopen: check the driver's own options (``reopenable``)
        before any node changes; raise GenericError to refuse."""

    async def reopen_prepare(self, options: dict[str, Any]) -> Callable[[], None] | None:
        """blockdev-reopen, inside the drained section: prepare the driver's
        own options (qcow2 flushes its caches) and return what applies them
        once the common options succeeded, or None."""
        return None

    async def reopen_rw(self) -> None:
        """blockdev-reopen from read-only to read-write: what the driver must
        redo to write (file opens a read-write descriptor)."""

    def check_persistent_bitmap(self, name: str, granularity: int) -> None:
        """block-dirty-bitmap-add persistent=on: whether the image can store
        it (only called when ``supports_persistent_bitmaps``)."""

    async def remove_persistent_bitmap(self, name: str) -> None:
        """block-dirty-bitmap-remove of a persistent bitmap."""

    async def set_header_names(self, *, backing_file: str | None,
                               backing_fmt: str | None) -> None:
        """bdrv_change_backing_file: record the backing file name (and
        format) in the image; drivers whose images name none ignore it."""

    async def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write one whole cluster compressed (BDRV_REQ_WRITE_COMPRESSED);
        only called when ``supports_compressed_writes``."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def write_back(self) -> None:
        """Write the node's dirty page-cache data to disk now (write-behind:
        jobs call it on the nodes below what they write, so the flush that
        ends them finds little left).  Not a flush request; raises nothing.
        Only the file driver keeps such data."""

    async def preadv_snapshot(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """snapshot-access: read the point-in-time view (copy-before-write);
        only called when ``supports_snapshot_access``."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def snapshot_block_status(self, offset: int, length: int) -> BlockStatus:
        """snapshot-access: block status of the point-in-time view."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    async def pdiscard_snapshot(self, offset: int, length: int) -> None:
        """snapshot-access: the view no longer needs this range."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    def debug_event(self, event: str) -> None:
        """A BLKDBG_EVENT ("read_aio", "l2_update", ...) aimed at this node.

        Format drivers call it on their file child before the matching I/O;
        only blkdebug acts on it.
        """

    def _set_perm(self, perm: Perm, shared: Perm) -> None:
        """Apply new cumulative permissions (file locks); raise to refuse."""

    # -- information (query-named-block-nodes); drivers refine ----------------
    @property
    def filename(self) -> str:
        f = self.primary_child()
        if f is None:
            return ""
        below = f.node.filename
        if (below.startswith("json:") or self.backing_overridden()) and not self.is_filter:
            # a child without a plain file name, or a backing node other than
            # the header names, makes QEMU spell this node out
            # (bdrv_refresh_filename without an exact_filename); a filter
            # shows its child's name but still spells itself out to parents
            return json_filename(self._open_options_from_children())
        return below

    # the backing file name as the node was opened or last told (QEMU's
    # auto_backing_file); None for drivers whose images name no backing file
    auto_backing_file: str | None = None

    def backing_overridden(self) -> bool:
        """bdrv_backing_overridden: the backing node is not the one the
        image header names (given explicitly, null, or renamed since)."""
        if self.auto_backing_file is None:
            return False
        edge = self.children.get("backing")
        if edge is not None:
            return self.auto_backing_file != edge.node.filename
        return self.auto_backing_file != ""

    def dirname(self) -> str | None:
        """bdrv_dirname: the directory relative backing names resolve in,
        None when the node has no plain file name to take it from."""
        f = self.primary_child()
        if f is not None:
            return f.node.dirname()
        name = self.filename
        if not name or name.startswith("json:"):
            return None
        return name[:name.rfind("/") + 1]

    def full_backing_filename(self, name: str) -> str | None:
        """bdrv_make_absolute_filename for a backing file name: absolute
        names and protocol names ("nbd:...", a ':' before any '/') stay."""
        stop = next((c for c in name if c in ":/\\"), "")
        if not name or name.startswith("/") or stop == ":":
            return name
        d = self.dirname()
        return None if d is None else d + name

    def full_open_options(self) -> dict[str, Any]:
        """What a ``json:`` file name of a parent says about this node: its
        own name when that is ``json:`` or plain, else its driver and its
        children (QEMU's full_open_options)."""
        if not (self.is_filter and type(self).filename is BlockNode.filename):
            name = self.filename
            if name.startswith("json:"):
                return cast("dict[str, Any]", json.loads(name[5:]))
            if self.primary_child() is None:
                return {"driver": self.driver, "filename": name}
        return self._open_options_from_children()

    def _open_options_from_children(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": self.driver}
        for role, edge in self.children.items():
            if role != "backing":
                opts[role] = edge.node.full_open_options()
        if self.backing_overridden():
            back = self.children.get("backing")
            opts["backing"] = back.node.full_open_options() if back else None
        return opts

    def primary_child(self) -> BdrvChild | None:
        return self.children.get("file") or self.children.get("image")

    def actual_size(self) -> int | None:
        """Bytes allocated on the host (image actual-size), None when unknown."""
        f = self.primary_child()
        return f.node.actual_size() if f else None

    def periodic(self, now: float) -> None:
        """Timer work (cache cleaning); the graph calls it about once a second
        from one task, so nodes stay plain objects."""

    def info_extra(self) -> dict[str, Any]:
        """Extra ImageInfo members (cluster-size, format-specific, ...)."""
        return {}

    def driver_stats(self) -> dict[str, Any] | None:
        """query-blockstats driver-specific member."""
        return None

    # -- common options ----------------------------------------------------
    def configure(self, options: dict[str, Any]) -> None:
        """Apply the options every driver shares (BlockdevOptions base)."""
        self.auto_read_only = bool(options.get("auto-read-only", False))
        self.force_share = bool(options.get("force-share", False))
        if self.force_share and not self.read_only:
            raise GenericError("force-share=on can only be used with read-only images")
        self.discard_unmap = options.get("discard", "ignore") == "unmap"
        dz = options.get("detect-zeroes", "off")
        if dz == "unmap" and not self.discard_unmap:
            raise GenericError("setting detect-zeroes to unmap is not allowed without "
                               "setting discard operation to unmap")
        self.detect_zeroes = dz
        cache = options.get("cache") or {}
        self.cache_direct = bool(cache.get("direct", False))
        self.cache_no_flush = bool(cache.get("no-flush", False))

    @overload
    async def open_child(self, options: dict[str, Any], role: str, *,
                         required: Literal[True] = True, inherit: bool = True) -> BdrvChild: ...

    @overload
    async def open_child(self, options: dict[str, Any], role: str, *, required: bool,
                         inherit: bool = True) -> BdrvChild | None: ...

    async def open_child(self, options: dict[str, Any], role: str, *, required: bool = True,
                         inherit: bool = True) -> BdrvChild | None:
        """Open or look up child ``role`` (nested dict or node name) and attach
        it; None only for a child that is not ``required`` and not given."""
        return await self.graph.open_child(self, options, role, required=required,
                                           inherit=inherit)

    # -- the public I/O layer ----------------------------------------------
    @property
    def length(self) -> int:
        return self._length()

    def inserted(self) -> bool:
        """QEMU's bdrv_is_inserted: the node and everything under it has a
        medium (host_cdrom is the one driver that can lack it)."""
        return all(edge.node.inserted() for edge in self.children.values())

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or (offset + length > self._length() and not self.grows):
            raise OSError(errno.EIO, "Input/output error")

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "Operation not permitted")

    def _begin(self) -> None:
        self._in_flight += 1

    def _end(self) -> None:
        self._in_flight -= 1
        if not self._in_flight and self._drained is not None:
            # someone is in drain(): the count reached zero
            self._drained.set()
            self._drained = None

    async def _gate(self) -> None:
        # a drained section holds new outside requests back (bdrv_drained_begin)
        while self._quiesce and not _in_request.get():
            await self._resume.wait()

    def _mark_write(self, offset: int, length: int, *, discard: bool = False) -> None:
        if not discard:
            self.wr_highest_offset = max(self.wr_highest_offset, offset + length)
        for bm in self.bitmaps.values():
            if bm.enabled:
                bm.set_dirty(offset, length)

    def _check_threshold(self, offset: int, length: int) -> None:
        wt = self.write_threshold
        if wt and offset + length > wt:
            self.write_threshold = 0
            events.emit("BLOCK_WRITE_THRESHOLD", {
                "node-name": self.node_name,
                "amount-exceeded": offset + length - wt,
                "write-threshold": wt,
            })

    async def _before_write(self, offset: int, length: int) -> None:
        for hook in list(self.before_write):
            await hook(self, offset, length)

    # The request paths.  read() and write() are every request's path (an
    # NBD request through qcow2 runs them twice), and read_now(),
    # write_now(), read_submit() and write_submit() serve most NBD and FUSE
    # requests.  Their checks and bookkeeping live in one place each:
    # _plain_read/_plain_write decide whether the paths without a task may
    # take a request, _count_read/_count_write count a success (statistics,
    # latency), _written records what a write leaves (highest offset, dirty
    # bitmaps), _settle_read/_settle_write close the books of a request
    # started without a task.  On a pass-through node (_through) each of
    # them runs once per node, as if the request had gone through both.
    # A call each costs 3-12% of these functions' own
    # instructions (cachegrind, in process), well under 1% of an NBD
    # request's ~35k instructions: one place for the books is worth it.
    # tests/nodes/test_write_paths.py holds every path to the same books.
    #
    # Scatter/gather requests (a virtio-blk request's segments of guest
    # memory, QEMU's QEMUIOVector) are no paths of their own: read() and
    # read_now() read into the caller's views when given ``into``, and
    # write() writes a list of views without gathering them; read_into(),
    # read_into_now() and writev() only add up the views' lengths.  That
    # costs read(), read_now() and write() one test each (0.5-0.7%, about
    # the measurement's noise).  ``into`` is positional: a keyword-only
    # argument's default is a dict lookup on every call (1.6% of read()).
    @overload
    async def read(self, offset: int, length: int) -> Buffer: ...

    @overload
    async def read(self, offset: int, length: int, into: list[memoryview]) -> None: ...

    async def read(self, offset: int, length: int,
                   into: list[memoryview] | None = None) -> Buffer | None:
        """``length`` bytes at ``offset``: a buffer the caller may keep, or
        with ``into`` (writable views of format "B", ``length`` bytes in
        all) read into those views, in order, returning None; all of them or
        OSError (the views' contents are then undefined).

        On a pass-through node (``_through``) the node below's driver
        serves it, with both nodes' books kept here: what the node below's
        read() would add is its gate, which a request in flight passes."""
        node = self._through or self
        if offset < 0 or length < 0 or (not self.grows and offset + length > node._length()):
            raise OSError(errno.EIO, "Input/output error")
        if self._quiesce:
            await self._gate()
            node = self._through or self  # the drained section may have moved the child
        t0 = perf_counter_ns() if self.latency is not None or node.latency is not None else 0
        token = _in_request.set(True)
        self._in_flight += 1
        if node is not self:
            node._in_flight += 1
        try:
            if into is None:
                data = await node._co_preadv(offset, length)
            else:
                data = None
                await node._co_preadv_into(offset, length, into)
        except OSError:
            self.stats["failed_rd_operations"] += 1
            if node is not self:
                node.stats["failed_rd_operations"] += 1
            raise
        finally:
            if node is not self:
                node._end()
            self._end()
            _in_request.reset(token)
        if node is not self:
            node._count_read(length, t0)
        self._count_read(length, t0)
        return data

    # Not a coroutine function: the coroutine it returns is read()'s, so a
    # scatter read runs in one coroutine frame, as read() does.
    def read_into(self, offset: int, views: list[memoryview]) -> Coroutine[Any, Any, None]:
        """Read ``sum(len(v) for v in views)`` bytes at ``offset`` into
        ``views`` (writable, format "B"), in order: ``await
        node.read_into(offset, views)``, which is read(into=views)."""
        length = 0
        for v in views:
            length += len(v)
        return self.read(offset, length, views)

    def read_into_now(self, offset: int, views: list[memoryview]) -> bool:
        """read_now() into ``views``: True if the driver read all of it
        without waiting; False leaves the views' contents undefined and
        nothing counted (read_into() then does it in full)."""
        length = 0
        for v in views:
            length += len(v)
        return self.read_now(offset, length, views) is not None

    # The synchronous fast path.  A request that can be served without
    # waiting (a cached read, a page-cache write into an allocated cluster)
    # is done here in one plain call chain: no coroutine frames, no task to
    # hand it to.  An exporter tries it first and falls back to read()/write()
    # on None/False, which redo the request in full (and report its error).
    # Nothing here awaits, so no drain can start or end in between: the
    # in-flight count and the drain gate need no updating, only checking.
    @overload
    def read_now(self, offset: int, length: int) -> Buffer | None: ...

    @overload
    def read_now(self, offset: int, length: int,
                 into: list[memoryview]) -> list[memoryview] | None: ...

    def read_now(self, offset: int, length: int, into: list[memoryview] | None = None
                 ) -> Buffer | list[memoryview] | None:
        """The data, if the driver could read it without waiting; else None.
        With ``into`` (as read()'s), the views once they hold it."""
        node = self._through or self
        if not self._plain_read(node, offset, length):
            return None
        t0 = perf_counter_ns() if self.latency is not None or node.latency is not None else 0
        data: Buffer | list[memoryview] | None
        try:
            if into is None:
                data = node._preadv_now(offset, length)
            else:
                data = into if node._preadv_into_now(offset, length, into) else None
        except OSError:
            return None  # read() tries again, counts and reports the failure
        if data is not None:
            self._count_read(length, t0)
            if node is not self:
                node._count_read(length, t0)
        return data

    # The paths without a task take ``node = self._through or self``: the
    # node whose driver serves the request.  When it is the node below
    # (raw over file), these checks are that node's too, and the request's
    # books are kept on both nodes, as if it had gone through both.  The
    # length is the node's below (a pass-through has that length).
    def _plain_write(self, node: BlockNode, offset: int, n: int) -> bool:
        """Whether a write may skip write()'s general path (write_now,
        write_submit) on this node and on ``node``: nothing to hold it
        back, check or do before it."""
        return not (self._quiesce or self.read_only or self.before_write or self._debug_events
                    or self.detect_zeroes != "off" or offset < 0 or n <= 0
                    or (not self.grows and offset + n > node._length())
                    or (node is not self and (node._quiesce or node.read_only
                                              or node.before_write
                                              or node.detect_zeroes != "off")))

    def _plain_read(self, node: BlockNode, offset: int, length: int) -> bool:
        """Whether a read may take read_now/read_submit's path on this
        node and on ``node``: nothing to hold it back, and inside the node."""
        return not (self._quiesce or node._quiesce or offset < 0 or length <= 0
                    or (not self.grows and offset + length > node._length()))

    def _count_read(self, length: int, t0: int) -> None:
        """What every read path records once a read has succeeded (``t0``:
        its start, from perf_counter_ns when latency is timed)."""
        stats = self.stats
        stats["rd_operations"] += 1
        stats["rd_bytes"] += length
        lat = self.latency
        if lat is not None:
            lat["read"].add(perf_counter_ns() - t0)

    def _count_write(self, n: int, t0: int) -> None:
        """The same for a write (and a write of zeroes)."""
        stats = self.stats
        stats["wr_operations"] += 1
        stats["wr_bytes"] += n
        lat = self.latency
        if lat is not None:
            lat["write"].add(perf_counter_ns() - t0)

    def _written(self, offset: int, n: int) -> None:
        """What every write path records once the driver has had a write:
        the highest offset written and the dirty bitmaps."""
        if offset + n > self.wr_highest_offset:
            self.wr_highest_offset = offset + n
        if self.bitmaps:
            self._mark_write(offset, n)

    def write_now(self, offset: int, mv: memoryview) -> bool:
        """Write ``mv`` (bytes, not FUA) if the driver can do it without
        waiting; False leaves nothing changed that write() would not redo."""
        n = len(mv)
        node = self._through or self
        if not self._plain_write(node, offset, n):
            return False
        t0 = perf_counter_ns() if self.latency is not None or node.latency is not None else 0
        try:
            if not node._pwritev_now(offset, mv):
                return False
        except OSError:
            return False  # write() does it again, and reports what fails
        if node is not self:
            node._write_over(offset, n, t0)
        self._write_over(offset, n, t0)
        return True

    def _write_over(self, offset: int, n: int, t0: int) -> None:
        """The books of a write the paths without a task served: the
        threshold, what _written records, the statistics."""
        if self.write_threshold:
            self._check_threshold(offset, n)
        self._written(offset, n)
        self._count_write(n, t0)

    # Requests started without a task.  Where the fast path cannot serve a
    # request but the driver can hand it to the I/O engine as it is (a raw
    # file, one mapped qcow2 cluster), an exporter starts it here and gets
    # ``done(result, error)`` from the engine's reaper; the request counts
    # as in flight (drains wait for it) until then.  False: nothing was
    # started, and the caller uses read()/write().  Exactly one of result
    # and error is None.
    def read_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        """Start a read; ``done(buffer, None)`` or ``done(None, OSError)``."""
        node = self._through or self
        if not self._plain_read(node, offset, length):
            return False
        t0 = perf_counter_ns() if self.latency is not None or node.latency is not None else 0
        if node is self:
            def finished(buf: Buffer | None, err: OSError | None) -> None:
                self._settle_read(length, t0, err)
                done(buf, err)
        else:
            def finished(buf: Buffer | None, err: OSError | None) -> None:
                node._settle_read(length, t0, err)
                self._settle_read(length, t0, err)
                done(buf, err)
            node._in_flight += 1

        self._in_flight += 1
        if node._preadv_submit(offset, length, finished):
            return True
        self._in_flight -= 1  # nothing awaited: no drain can have seen it
        if node is not self:
            node._in_flight -= 1
        return False

    def readv_submit(self, offset: int, length: int, views: list[memoryview],
                     done: WriteDone) -> bool:
        """Start a read of ``length`` bytes into ``views`` (format "B",
        ``length`` bytes in all; a virtio-blk read into guest memory), where
        the driver reads into them as they are; ``done(None, None)`` or
        ``done(None, OSError)``, the views pinned until then."""
        node = self._through or self
        if not self._plain_read(node, offset, length):
            return False
        t0 = perf_counter_ns() if self.latency is not None or node.latency is not None else 0
        if node is self:
            def finished(_res: object, err: OSError | None) -> None:
                self._settle_read(length, t0, err)
                done(None, err)
        else:
            def finished(_res: object, err: OSError | None) -> None:
                node._settle_read(length, t0, err)
                self._settle_read(length, t0, err)
                done(None, err)
            node._in_flight += 1

        self._in_flight += 1
        if node._preadv_into_submit(offset, length, views, finished):
            return True
        self._in_flight -= 1
        if node is not self:
            node._in_flight -= 1
        return False

    def write_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        """Start a write (not FUA) of ``mv``, which must stay unchanged until
        ``done(None, None)`` or ``done(None, OSError)``; the same checks and
        bookkeeping as write(), for the requests write_now() takes."""
        return self._write_submit(offset, len(mv), mv, done)

    def writev_submit(self, offset: int, views: list[memoryview], done: WriteDone) -> bool:
        """write_submit() of the concatenation of ``views`` (format "B"),
        handed to the driver as they are (one pwritev: a virtio-blk write
        whose guest memory is in pieces), where it takes them so."""
        if len(views) == 1:
            return self._write_submit(offset, len(views[0]), views[0], done)
        n = 0
        for v in views:
            n += len(v)
        return self._write_submit(offset, n, views, done)

    def _write_submit(self, offset: int, n: int, data: memoryview | list[memoryview],
                      done: WriteDone) -> bool:
        node = self._through or self
        if not self._plain_write(node, offset, n):
            return False

        t0 = perf_counter_ns() if self.latency is not None or node.latency is not None else 0
        if node is self:
            def finished(_res: object, err: OSError | None) -> None:
                self._settle_write(offset, n, t0, err)
                done(None, err)
        else:
            def finished(_res: object, err: OSError | None) -> None:
                node._settle_write(offset, n, t0, err)
                self._settle_write(offset, n, t0, err)
                done(None, err)
            node._in_flight += 1

        self._in_flight += 1
        if (node._pwritev_submit(offset, data, finished) if isinstance(data, memoryview)
                else node._pwritev_submit_vec(offset, n, data, finished)):
            if node.write_threshold:
                node._check_threshold(offset, n)
            if self.write_threshold:
                self._check_threshold(offset, n)
            return True
        self._in_flight -= 1
        if node is not self:
            node._in_flight -= 1
        return False

    def _settle_read(self, length: int, t0: int, err: OSError | None) -> None:
        """The books of a read started without a task, once it is over."""
        self._end()
        if err is None:
            self._count_read(length, t0)
        else:
            self.stats["failed_rd_operations"] += 1

    def _settle_write(self, offset: int, n: int, t0: int, err: OSError | None) -> None:
        """The books of a write started without a task, once it is over."""
        self._written(offset, n)
        self._end()
        if err is None:
            self._count_write(n, t0)
        else:
            self.stats["failed_wr_operations"] += 1

    # driver hooks for the fast path: by default nothing is done synchronously
    def _preadv_now(self, offset: int, length: int) -> Buffer | None:
        return None

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        return False

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        return False

    # driver hooks for requests without a task: by default none are taken
    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        return False

    def _preadv_into_submit(self, offset: int, length: int, views: list[memoryview],
                            done: WriteDone) -> bool:
        return False

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        return False

    def _pwritev_submit_vec(self, offset: int, length: int, views: list[memoryview],
                            done: WriteDone) -> bool:
        return False

    async def write(self, offset: int, data: Buffer | list[memoryview], *,
                    fua: bool = False) -> None:
        """Write ``data``: a buffer, or (writev()) a list of views of format
        "B" written one after another, which reach the driver as they are
        (_co_pwritev_vec) instead of gathered into one buffer."""
        # type(), not isinstance(): a third of the cost here (CPython
        # specialises the call); mypy narrows only the list branch with it
        views: list[memoryview] | None = None
        if type(data) is list:
            views = data
            n = 0
            for v in views:
                n += len(v)
        else:
            mv = memoryview(data)  # type: ignore[arg-type]
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
            n = len(mv)
        if self.read_only:
            raise OSError(errno.EPERM, "Operation not permitted")
        node = self if self._through is None else self._write_node()
        if offset < 0 or (not self.grows and offset + n > node._length()):
            raise OSError(errno.EIO, "Input/output error")
        if self._quiesce:
            await self._gate()
            node = self if self._through is None else self._write_node()
        t0 = perf_counter_ns() if self.latency is not None or node.latency is not None else 0
        token = _in_request.set(True)
        self._in_flight += 1
        below = False  # the write reached the node below (its books then)
        debug = self._debug_events
        try:
            if self.write_threshold:
                self._check_threshold(offset, n)
            if self.before_write:
                await self._before_write(offset, n)
            if node is not self:
                # what the node below's write() would do first
                below = True
                node._in_flight += 1
                if node.write_threshold:
                    node._check_threshold(offset, n)
                if node.before_write:
                    await node._before_write(offset, n)
                if views is None:
                    await node._co_pwritev(offset, mv, fua)
                else:
                    await node._co_pwritev_vec(offset, n, views, fua)
            elif self.detect_zeroes != "off" and n and (
                    _is_zero(mv) if views is None else all(_is_zero(v) for v in views)):
                if debug:
                    self.debug_event("pwritev_zero")
                await self._co_pwrite_zeroes(offset, n, self.detect_zeroes == "unmap", fua)
            else:
                if debug:
                    self.debug_event("pwritev")
                if views is None:
                    await self._co_pwritev(offset, mv, fua)
                else:
                    await self._co_pwritev_vec(offset, n, views, fua)
            if debug:
                self.debug_event("pwritev_done")
        except OSError:
            if below:
                node.stats["failed_wr_operations"] += 1
            self.stats["failed_wr_operations"] += 1
            raise
        finally:
            if below:
                node._written(offset, n)
                node._end()
            self._written(offset, n)
            self._end()
            _in_request.reset(token)
        if below:
            node._count_write(n, t0)
        self._count_write(n, t0)

    def _write_node(self) -> BlockNode:
        """Whose driver write() hands a write to on a pass-through node:
        the node below, unless zero detection (here or there) would make
        it another request, or the node below refuses it (read-only),
        which this node's driver then has its write() do."""
        node = self._through
        if (node is None or node.read_only or node.detect_zeroes != "off"
                or self.detect_zeroes != "off"):
            return self
        return node

    # Not a coroutine function, as read_into(): the coroutine is write()'s.
    def writev(self, offset: int, views: list[memoryview], *,
               fua: bool = False) -> Coroutine[Any, Any, None]:
        """write() of the concatenation of ``views`` (format "B"), without
        gathering them where the driver takes them as they are (a
        virtio-blk request's segments of guest memory): ``await
        node.writev(offset, views)``."""
        return self.write(offset, views[0] if len(views) == 1 else views, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                           fua: bool = False, no_fallback: bool = False) -> None:
        """Make the range read as zeroes.

        With ``no_fallback`` (QEMU's BDRV_REQ_NO_FALLBACK, NBD's FAST_ZERO)
        the request fails with ENOTSUP where the driver would have to write
        zeroes as data; it may then have zeroed part of the range already.

        ``may_unmap`` from outside the graph (an export, a job: QEMU's
        BlockBackend) reaches the driver as it is; from a parent node only
        when this node was opened with discard=unmap (bdrv_co_pwrite_zeroes
        drops BDRV_REQ_MAY_UNMAP on a child without BDRV_O_UNMAP).
        """
        if may_unmap and not self.discard_unmap and _in_request.get():
            may_unmap = False
        self._check_writable()
        self._check(offset, length)
        a = self.request_alignment
        if no_fallback and a > 1 and (offset % a or length % a):
            # a misaligned request cannot be made efficient (bdrv_co_pwritev_part)
            raise OSError(errno.ENOTSUP, "Operation not supported")
        if self._quiesce:
            await self._gate()
        t0 = perf_counter_ns()
        token = _in_request.set(True)
        self._begin()
        try:
            self._check_threshold(offset, length)
            if self.before_write:
                await self._before_write(offset, length)
            self.debug_event("pwritev_zero")
            await self._co_pwrite_zeroes(offset, length, may_unmap, fua, no_fallback)
            self.debug_event("pwritev_done")
        except OSError:
            self.stats["failed_wr_operations"] += 1
            raise
        finally:
            self._mark_write(offset, length)
            self._end()
            _in_request.reset(token)
        self._count_write(length, t0)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check(offset, length)
        if not self.discard_unmap:
            return  # discard=ignore (QEMU drops the request before tracking it)
        if self._quiesce:
            await self._gate()
        t0 = perf_counter_ns()
        token = _in_request.set(True)
        self._begin()
        try:
            if self.before_write:
                await self._before_write(offset, length)
            await self._co_pdiscard(offset, length)
        except OSError:
            self.stats["failed_unmap_operations"] += 1
            raise
        finally:
            self._mark_write(offset, length, discard=True)
            self._end()
            _in_request.reset(token)
        self.stats["unmap_operations"] += 1
        self.stats["unmap_bytes"] += length
        if self.latency is not None:
            self.latency["discard"].add(perf_counter_ns() - t0)

    async def flush(self) -> None:
        if self._quiesce:
            await self._gate()
        t0 = perf_counter_ns()
        token = _in_request.set(True)
        self._begin()
        try:
            if self.cache_no_flush:
                # cache.no-flush skips this node's own sync, not its children's
                for child in list(self.children.values()):
                    await child.node.flush()
            else:
                await self._co_flush()
        except OSError:
            self.stats["failed_flush_operations"] += 1
            raise
        finally:
            self._end()
            _in_request.reset(token)
        self.stats["flush_operations"] += 1
        if self.latency is not None:
            self.latency["flush"].add(perf_counter_ns() - t0)

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        self._check(offset, length)
        token = _in_request.set(True)
        try:
            return await self._co_block_status(offset, length)
        finally:
            _in_request.reset(token)

    async def truncate(self, size: int, *, exact: bool = True, prealloc: str = "off") -> None:
        self._check_writable()
        if size < 0:
            raise GenericError("Image size cannot be negative")
        token = _in_request.set(True)
        self._begin()
        try:
            await self._co_truncate(size, exact, prealloc)
        finally:
            self._end()
            _in_request.reset(token)
        for bm in self.bitmaps.values():
            bm.resize(self._length())
        # bdrv_parent_cb_resize: the parents learn of the new length
        for edge in list(self.parents):
            edge.parent.child_resized(edge)

    async def drain(self) -> None:
        """Wait until no request is in flight on this node (the count reaches
        zero at least once; requests that start after that are not waited for)."""
        if not self._in_flight:
            await trio.lowlevel.checkpoint()
            return
        if self._drained is None:
            self._drained = trio.Event()  # made only when someone waits
        await self._drained.wait()

    def subtree(self, *, backing: bool = True) -> list[BlockNode]:
        """This node and all below it; without ``backing``, not through
        backing edges (the nodes a write to this one can reach)."""
        seen: dict[int, BlockNode] = {}
        todo = [self]
        while todo:
            n = todo.pop()
            if id(n) not in seen:
                seen[id(n)] = n
                todo.extend(c.node for role, c in n.children.items()
                            if backing or role != "backing")
        return list(seen.values())

    def _ancestors(self) -> list[BlockNode]:
        seen: dict[int, BlockNode] = {}
        todo = [self]
        while todo:
            n = todo.pop()
            if id(n) not in seen:
                seen[id(n)] = n
                todo.extend(p.parent for p in n.parents if isinstance(p.parent, BlockNode))
        return list(seen.values())

    @contextlib.asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """A drained section (bdrv_drained_begin/end) for graph changes.

        New requests from outside to this node and its ancestors wait until the
        section ends; requests already in flight here, above or below finish
        first.  The task that holds the section may still issue requests.
        """
        gated = self._ancestors()
        involved = gated + [n for n in self.subtree() if n is not self]
        for n in gated:
            if n._quiesce == 0:
                n._resume = trio.Event()
            n._quiesce += 1
        for n in involved:
            n.drain_begin()
        token = _in_request.set(True)
        try:
            for n in involved:
                await n.drain()
            yield
        finally:
            _in_request.reset(token)
            for n in involved:
                n.drain_end()
            for n in gated:
                n._quiesce -= 1
                if n._quiesce == 0:
                    n._resume.set()

    def drain_begin(self) -> None:
        """The driver's bdrv_drain_begin: a drained section or a close starts
        on this node, its parents or its children (the throttle filter stops
        holding requests back).  Paired with :meth:`drain_end`."""

    def drain_end(self) -> None:
        """The driver's bdrv_drain_end."""

    async def close(self) -> None:
        """Drain, flush (if writable), close; children are closed by the graph.

        The nodes below are drained too (their requests may be this node's),
        so a throttle filter under a closing node lets its queue through."""
        below = self.subtree()
        for n in below:
            n.drain_begin()
        try:
            await self.drain()
            if not self.read_only:
                await self.flush()
            await self._close()
        finally:
            for n in below:
                n.drain_end()

    # -- graph edges -----------------------------------------------------------
    def attach(self, name: str, parent: BlockParent, perm: Perm,
               shared: Perm = Perm.ALL) -> BdrvChild:
        """Add ``parent`` as a user of this node.  Callers detach() when done.

        Raises GenericError with QEMU's text on a permission conflict (with
        another parent, or with another process holding the image's locks).
        """
        edge = BdrvChild(name, self, parent, Perm(perm), Perm(shared))
        edge.attach()
        return edge

    # -- dirty bitmaps (QMP checks are in monitor/block.py) --------------------
    def add_bitmap(self, name: str, granularity: int, *, persistent: bool = False,
                   enabled: bool = True) -> DirtyBitmap:
        bm = DirtyBitmap(name, self._length(), granularity, persistent=persistent,
                         enabled=enabled)
        self.bitmaps[name] = bm
        return bm

    def default_bitmap_granularity(self) -> int:
        # bdrv_get_default_bitmap_granularity: the cluster size within [4k, 64k]
        cs = self.info_extra().get("cluster-size")
        if cs:
            return min(65536, max(4096, int(cs)))
        return 65536


def gather(views: list[memoryview], length: int) -> memoryview:
    """The views' bytes in one pooled (page-aligned, writable) buffer."""
    buf = buffers.alloc(length)
    pos = 0
    for v in views:
        n = len(v)
        buf[pos:pos + n] = v
        pos += n
    return buf


def _is_zero(mv: memoryview) -> bool:
    # bytes.count on a memoryview is not available; compare against a zero buffer
    return mv.nbytes == 0 or (mv[0] == 0 and mv == bytes(mv.nbytes))
