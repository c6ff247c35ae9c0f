"""QMP commands: external and internal snapshots, change-backing-file (blockdev.c).

External snapshots (``blockdev-snapshot``, ``blockdev-snapshot-sync``) put
an overlay on top of a node: the node becomes the overlay's backing child,
every other user of the node (exports, jobs, parent nodes) moves to the
overlay, and the node is reopened read-only.  As in qemu-storage-daemon, the
overlay's header is not touched by ``blockdev-snapshot`` (the client created
it with the right backing file name, or uses ``change-backing-file``), and
an overlay made by ``blockdev-snapshot-sync`` that ends up with no user is
dropped again at once, leaving the image file on disk.

Internal snapshots are qcow2's snapshot table (nodes/qcow2/snapshots.py);
nodes that are not qcow2 fall back to their primary child the way QEMU's
bdrv_snapshot_fallback does.

In a ``transaction`` each snapshot action is prepared in turn (the overlay
is appended, the internal snapshot taken) and, as in QEMU's transaction
actions, only the commit reopens the old node read-only and lets an unused
new overlay go.  When a later action fails, the prepared ones are aborted:
the overlay leaves the chain again (its users go back to the old node; an
overlay blockdev-snapshot-sync opened is closed, its file stays on disk)
and the internal snapshot is deleted.

Errors are QEMU's, checked in QEMU's order.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from typing import TYPE_CHECKING, Any

import trio

from ..jobs.blockjob import BlockJob, check_not_busy
from ..nodes.file import FileNode
from ..nodes.graph import DRIVER_MODULES, BlockGraph
from ..nodes.node import BdrvChild, BlockNode, Perm
from ..nodes.qcow2 import snapshots
from ..nodes.qcow2.create import create_qcow2
from ..nodes.qcow2.driver import Qcow2Node
from ..nodes.qcow2.header import EXT_BACKING_FORMAT
from ..qapi.cstr import c_bytes
from ..qapi.errors import GenericError
from .registry import command

if TYPE_CHECKING:
    from ..daemon import Daemon

# -- shared checks -----------------------------------------------------------------


def _is_job(parent: object) -> bool:
    return isinstance(parent, BlockJob)


def root_bs(daemon: Daemon, name: str) -> BlockNode:
    """qmp_get_root_bs: a node no other node (or job) uses."""
    node: BlockNode = daemon.graph.lookup_bs(name, name)
    if any(isinstance(e.parent, BlockNode) or _is_job(e.parent) for e in node.parents):
        raise GenericError("Need a root block node")
    return node


def check_op_blockers(daemon: Daemon, node: BlockNode) -> None:
    """bdrv_op_is_blocked for snapshot and change operations: a block job on
    the node, or the node being some other node's backing file."""
    for e in reversed(node.parents):  # the oldest blocker is reported
        if e.name == "backing" and isinstance(e.parent, BlockNode):
            raise GenericError(f"Node '{node.node_name}' is busy: node is used as "
                               f"backing hd of '{e.parent.node_name}'")
    check_not_busy(daemon, node)


def _backing_edge(node: BlockNode) -> BdrvChild | None:
    return node.children.get("backing")


def _skip_filters(node: BlockNode) -> BlockNode:
    while node.is_filter or node.driver == "throttle":
        prim = node.primary_child()
        if prim is None:
            break
        node = prim.node
    return node


def _chain(top: BlockNode) -> list[BlockNode]:
    """``top`` and everything below it through filtered and backing children."""
    out: list[BlockNode] = []
    n: BlockNode | None = top
    while n is not None and n not in out:
        out.append(n)
        b = _backing_edge(n) or (n.primary_child() if n.is_filter else None)
        n = b.node if b is not None else None
    return out


# -- external snapshots ---------------------------------------------------------------


def append(graph: BlockGraph, overlay: BlockNode, old: BlockNode) -> None:
    """bdrv_append: ``old`` becomes overlay's backing; old's users move up.

    Raises GenericError (a cycle, a permission conflict) with nothing changed.
    """
    edge = graph.link(overlay, old, "backing")
    try:
        graph.replace_node(old, overlay, keep=[edge])
    except BaseException:
        edge.detach()
        raise


def _inheriting_subtree(node: BlockNode) -> list[BlockNode]:
    """The node and the children it opened itself (they follow its reopen)."""
    out = [node]
    for e in node.children.values():
        if e.name != "backing" and e.node.node_name.startswith("#block"):
            out += _inheriting_subtree(e.node)
    return out


async def reopen_read_only(graph: BlockGraph, node: BlockNode) -> None:
    """bdrv_reopen_set_read_only(bs, true) for the old top of a snapshot and
    the children it opened: best effort, as QEMU ignores the errors.  A child
    another user still writes through stays writable."""
    if node.read_only:
        return
    for n in _inheriting_subtree(node):
        if n.read_only or n.cum_perm & (Perm.WRITE | Perm.WRITE_UNCHANGED):
            continue
        with contextlib.suppress(OSError):
            await graph.prepare_read_only(n, keep_going=True)
        graph.commit_read_only(n)


def _check_overlay(overlay: BlockNode) -> None:
    if overlay.cum_perm & Perm.CONSISTENT_READ:
        raise GenericError("The overlay is already in use")
    if overlay.is_filter or overlay.driver == "throttle":
        raise GenericError("Filters cannot be used as overlays")
    if _backing_edge(overlay) is not None:
        raise GenericError("The overlay already has a backing image")
    if overlay.driver != "qcow2":
        raise GenericError("The overlay does not support backing images")


# formats QEMU knows that cannot hold a backing file / cannot be created at all
_NO_BACKING = {"raw", "file", "host_device", "nbd", "luks", "vpc", "vhdx", "vdi", "dmg",
               "parallels", "bochs", "cloop", "nfs", "ssh", "gluster"}
_NO_CREATE = {"throttle", "copy-on-read", "blkdebug", "blkverify", "null-co", "null-aio",
              "copy-before-write", "preallocate", "compress", "snapshot-access", "quorum",
              "replication", "blklogwrites", "host_cdrom", "http", "https", "ftp", "ftps",
              "iscsi", "rbd", "nvme"}


async def _create_overlay_file(graph: BlockGraph, path: str, fmt: str, size: int, backing_file: str,
                               backing_fmt: str) -> None:
    """bdrv_img_create for blockdev-snapshot-sync: a qcow2 file naming its backing."""
    if fmt not in DRIVER_MODULES and fmt not in _NO_BACKING and fmt not in _NO_CREATE:
        raise GenericError(f"Unknown file format '{fmt}'")
    if fmt in _NO_CREATE or (fmt in DRIVER_MODULES and fmt != "qcow2" and fmt not in _NO_BACKING):
        raise GenericError(f"Format driver '{fmt}' does not support image creation")
    if fmt != "qcow2":
        raise GenericError(f"Backing file not supported for file format '{fmt}'")

    def make() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.close(fd)

    try:
        await trio.to_thread.run_sync(make)
    except OSError as e:
        raise GenericError(f"Could not create '{path}': {e.strerror}") from None
    file = await graph.open_node({"driver": "file", "filename": path})
    try:
        await create_qcow2(file, size, backing_file=backing_file, backing_fmt=backing_fmt)
    except OSError as e:
        raise GenericError(f"Could not create image: {e.strerror}") from None
    finally:
        with trio.CancelScope(shield=True):
            graph.nodes.pop(file.node_name, None)
            for edge in list(file.parents):
                edge.detach()
            with contextlib.suppress(Exception):
                await file.close()


class ExternalSnapshot:
    """A prepared external snapshot: ``overlay`` is appended above ``old``.
    Exactly one of :meth:`commit` and :meth:`abort` finishes it."""

    def __init__(self, graph: BlockGraph, old: BlockNode, overlay: BlockNode,
                 created: bool) -> None:
        self.graph, self.old, self.overlay, self.created = graph, old, overlay, created

    async def commit(self) -> None:
        """external_snapshot_commit + clean: the node below is only read from
        now on; a new overlay nobody uses is dropped (QEMU's last unref)."""
        await reopen_read_only(self.graph, self.old)
        overlay = self.overlay
        if self.created and not overlay.parents:
            backing = _backing_edge(overlay)
            if backing is not None:
                backing.detach()
            await self.graph.unref(overlay)

    async def abort(self) -> None:
        """external_snapshot_abort + clean: the overlay's users go back to
        the old node and the overlay loses its backing child again."""
        with trio.CancelScope(shield=True):
            overlay, old = self.overlay, self.old
            async with overlay.drained():
                with contextlib.suppress(GenericError):  # shrinking back: no conflict
                    self.graph.replace_node(overlay, old)
                backing = _backing_edge(overlay)
                if backing is not None:
                    backing.detach()
            if self.created:
                await self.graph.unref(overlay)  # the image file stays


async def external_snapshot(daemon: Daemon, *, device: str | None, node_name: str | None,
                            overlay_ref: str | None = None, sync: Any = None) -> None:
    """external_snapshot_prepare + commit + clean for one action."""
    state = await external_snapshot_prepare(daemon, device=device, node_name=node_name,
                                            overlay_ref=overlay_ref, sync=sync)
    await state.commit()


async def external_snapshot_prepare(daemon: Daemon, *, device: str | None,
                                    node_name: str | None, overlay_ref: str | None = None,
                                    sync: Any = None) -> ExternalSnapshot:
    """external_snapshot_prepare: checks, the new overlay, the append.

    Raises (QEMU's errors) with nothing changed but a created image file."""
    graph = daemon.graph
    old = graph.nodes.get(node_name) if node_name is not None else None
    if old is None:
        # bdrv_lookup_bs: ``device`` names a BlockBackend, and a storage
        # daemon has none, so only the node name can match
        raise GenericError(f"Cannot find device='{device or ''}' nor "
                           f"node-name='{node_name or ''}'")
    async with old.drained():
        check_op_blockers(daemon, old)
        if not old.read_only:
            try:
                await old.flush()
            except OSError:
                raise GenericError("An IO error has occurred") from None
        created = False
        if sync is not None:
            fmt = sync.format or "qcow2"
            snap_name = sync.snapshot_node_name
            if node_name is not None and snap_name is None:
                raise GenericError("New overlay node-name missing")
            if snap_name is not None and snap_name in graph.nodes:
                raise GenericError("New overlay node-name already in use")
            path = sync.snapshot_file
            if (sync.mode or "absolute-paths") != "existing":
                await _create_overlay_file(graph, path, fmt, old.length, old.filename,
                                           old.driver)
            opts = {"driver": fmt, "file": {"driver": "file", "filename": path},
                    "read-only": old.read_only}
            if fmt == "qcow2":
                opts["backing"] = None  # BDRV_O_NO_BACKING: attached below
            if snap_name is not None:
                opts["node-name"] = snap_name
                overlay = await graph.add(opts)
            else:
                overlay = await graph.open_node(opts)
            overlay.monitor_owned = False  # owned by its users, not the monitor
            created = True
        else:
            overlay = graph.lookup_bs(overlay_ref, overlay_ref)
        try:
            _check_overlay(overlay)
            append(graph, overlay, old)
        except BaseException:
            if created:
                with trio.CancelScope(shield=True):
                    await graph.unref(overlay)
            raise
    return ExternalSnapshot(graph, old, overlay, created)


@command("blockdev-snapshot")
async def blockdev_snapshot(daemon: Daemon, args: Any) -> Any:
    await external_snapshot(daemon, device=args.node, node_name=args.node,
                            overlay_ref=args.overlay)


@command("blockdev-snapshot-sync")
async def blockdev_snapshot_sync(daemon: Daemon, args: Any) -> Any:
    await external_snapshot(daemon, device=args.device, node_name=args.node_name, sync=args)


# -- change-backing-file --------------------------------------------------------------


async def _write_header_names(image: Qcow2Node, backing_file: str, backing_fmt: str) -> None:
    """qcow2_change_backing_file: the name and format in the image header.

    A read-only image (a backing file) is written through a short-lived
    descriptor of its own, as QEMU reopens it read-write for the update.
    """
    if not image.read_only and not image.file.read_only:
        await image.set_header_names(backing_file=backing_file, backing_fmt=backing_fmt)
        return
    h = image.h
    old = (h.backing_file, h.ext(EXT_BACKING_FORMAT), list(h.extensions))
    h.backing_file = backing_file or None
    image.auto_backing_file = backing_file or ""
    h.set_ext(EXT_BACKING_FORMAT, c_bytes(backing_fmt) if backing_file else None)
    h.extensions.sort(key=lambda e: 0 if e.type == EXT_BACKING_FORMAT else 1)
    blob = h.pack()
    # written through a descriptor of its own: only a file has a path
    path = image.file.path if isinstance(image.file, FileNode) else None
    if len(blob) > image.cs or path is None:
        h.backing_file, h.extensions = old[0], old[2]
        raise OSError(errno.EINVAL if path else errno.ENOTSUP, os.strerror(
            errno.EINVAL if path else errno.ENOTSUP))

    def write() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(fd, blob.ljust(image.cs, b"\0"), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        await trio.to_thread.run_sync(write)
    except OSError:
        h.backing_file, h.extensions = old[0], old[2]
        image.auto_backing_file = old[0] or ""
        raise


@command("change-backing-file")
async def change_backing_file(daemon: Daemon, args: Any) -> Any:
    graph = daemon.graph
    bs = root_bs(daemon, args.device)
    image = graph.lookup_bs(None, args.image_node_name)
    if _backing_edge(_skip_filters(image)) is None:
        raise GenericError("not allowing backing file change on an image without a "
                           "backing file")
    check_op_blockers(daemon, bs)
    if image not in _chain(bs):
        raise GenericError(f"'{args.device}' and image file are not in the same chain")
    name = args.backing_file
    try:
        if not isinstance(image, Qcow2Node):
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        if name and (len(c_bytes(name)) > 1023 or image.data_file_raw):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        # QEMU 7.2 records the image's own format as the backing format
        await _write_header_names(image, name, image.driver)
    except OSError as e:
        raise GenericError(f"Could not change backing file to '{name}': "
                           f"{os.strerror(e.errno or 0)}") from None


# -- internal snapshots -------------------------------------------------------------


def _snapshot_target(node: BlockNode) -> Qcow2Node | None:
    """The qcow2 node that holds ``node``'s snapshots (bdrv_snapshot_fallback)."""
    while not isinstance(node, Qcow2Node):
        prim = node.primary_child()
        if prim is None:
            return None
        others = [e for e in node.children.values()
                  if e is not prim and e.name in ("file", "data-file", "image", "backing")]
        if others:
            return None
        node = prim.node
    return node


@command("blockdev-snapshot-internal-sync")
async def blockdev_snapshot_internal_sync(daemon: Daemon, args: Any) -> Any:
    await internal_snapshot_prepare(daemon, args)


class InternalSnapshot:
    """A snapshot taken by a transaction's action, deleted again on abort."""

    def __init__(self, bs: BlockNode, target: Qcow2Node, snap: Any) -> None:
        self.bs, self.target, self.snap = bs, target, snap

    async def abort(self) -> None:
        """internal_snapshot_abort: delete it (errors are only reported)."""
        with trio.CancelScope(shield=True):
            async with self.bs.drained():
                with contextlib.suppress(OSError):
                    await snapshots.delete(self.target, self.snap)


async def internal_snapshot_prepare(daemon: Daemon, args: Any) -> InternalSnapshot:
    """internal_snapshot_prepare: QEMU's checks, then the snapshot."""
    device, name = args.device, args.name
    bs = root_bs(daemon, device)
    async with bs.drained():
        check_op_blockers(daemon, bs)
        if bs.read_only:
            raise GenericError(f"Device '{device}' is read only")
        target = _snapshot_target(bs)
        if target is None or target.read_only:
            raise GenericError(f"Block format '{bs.driver}' used by device '{device}' does "
                               "not support internal snapshots")
        if not name:
            raise GenericError("Name is empty")
        if snapshots.find(target, None, name) is not None:
            raise GenericError(f"Snapshot with name '{name}' already exists on device "
                               f"'{device}'")
        # QEMU takes the date from gettimeofday (microseconds); a storage
        # daemon's virtual clock is that same host clock
        now_us = time.time_ns() // 1000
        date_ns = now_us * 1000
        try:
            if target.has_data_file:
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
            snap = await snapshots.create(target, name, vm_clock_nsec=date_ns, date_ns=date_ns)
        except OSError as e:
            raise GenericError(f"Failed to create snapshot '{name}' on device '{device}': "
                               f"{os.strerror(e.errno or 0)}") from None
    return InternalSnapshot(bs, target, snap)


@command("blockdev-snapshot-delete-internal-sync")
async def blockdev_snapshot_delete_internal_sync(daemon: Daemon, args: Any) -> Any:
    device, sid, name = args.device, args.id, args.name
    bs = root_bs(daemon, device)
    if sid is None and name is None:
        raise GenericError("Name or id must be provided")
    check_op_blockers(daemon, bs)
    target = _snapshot_target(bs)
    if target is None:
        raise GenericError("Failed to get a snapshot list: Operation not supported")
    snap = snapshots.find(target, sid, name)
    if snap is None:
        raise GenericError(f"Snapshot with id '{sid if sid is not None else 'null'}' and "
                           f"name '{name if name is not None else 'null'}' does not exist "
                           f"on device '{device}'")
    info = snap.info()
    async with bs.drained():
        if target.read_only:
            raise GenericError("Failed to remove snapshot from snapshot list: "
                               "Operation not permitted")
        try:
            await snapshots.delete(target, snap)
        except OSError as e:
            raise GenericError(f"Failed to remove snapshot from snapshot list: "
                               f"{os.strerror(e.errno or 0)}") from None
    return info
