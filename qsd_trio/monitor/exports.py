"""QMP commands: the NBD server and block exports (block-export.json).

``block-export-add`` is generic: it dispatches on ``args.type`` to the class
registered in ``exports.base.EXPORT_TYPES`` (nbd here, fuse elsewhere).
Each export runs as a task in ``daemon.export_nursery``; when that task ends
for any reason (block-export-del, nbd-server-stop, shutdown) the export
leaves ``daemon.exports`` and ``BLOCK_EXPORT_DELETED`` is emitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from .. import events, tasks
from ..exports import fuse as _fuse  # noqa: F401 - registers the fuse export type
from ..exports import nbd as _nbd  # noqa: F401 - registers the nbd export type
from ..exports import vduse_blk as _vduse_blk  # noqa: F401 - registers vduse-blk
from ..exports import vhost_user_blk as _vhost_user_blk  # noqa: F401 - registers vhost-user-blk
from ..exports.base import EXPORT_TYPES, BlockExport
from ..exports.nbd import NbdExport, NbdServer
from ..ids import id_wellformed
from ..nodes.node import BlockNode
from ..qapi import qapi_types as T
from ..qapi.errors import GenericError
from .registry import command

if TYPE_CHECKING:
    from ..daemon import Daemon

_SETTLE_ROUNDS = 5


def _lookup_node(daemon: Daemon, name: str) -> BlockNode:
    node = daemon.graph.nodes.get(name)
    if node is None:
        raise GenericError(f"Cannot find device='' nor node-name='{name}'")
    return node


async def _serve_export(daemon: Daemon, export: BlockExport, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        with tasks.serving("export", f"{export.type} export {export.id}",
                           cancel_scope=export.cancel_scope,
                           export_id=export.id,
                           node_names=lambda: [export.node.node_name]):
            await export.run(task_status=task_status)
    finally:
        # only an export that was listed (it started) is announced as deleted
        if daemon.exports.get(export.id) is export:
            del daemon.exports[export.id]
            events.emit("BLOCK_EXPORT_DELETED", {"id": export.id})
        export.deleted.set()


async def add_export(daemon: Daemon, args: Any) -> BlockExport:
    """block-export-add: the checks in QEMU's order, then start the export.

    ``args``: a BlockExportOptions variant."""
    if not id_wellformed(args.id):
        raise GenericError("Invalid block export id")
    if args.id in daemon.exports:
        raise GenericError(f"Block export id '{args.id}' is already in use")
    cls = EXPORT_TYPES.get(args.type)
    if cls is None:
        raise GenericError("No driver found for the requested export type")
    node = _lookup_node(daemon, args.node_name)
    iothread: str | None = args.iothread
    if iothread is not None:
        obj = daemon.objects.get(iothread)
        if obj is None or obj.qom_type != "iothread":
            raise GenericError(f'iothread "{iothread}" not found')
    if args.writable and node.read_only:
        raise GenericError("Cannot export read-only node as writable")
    export = cls(daemon, args, node)
    await daemon.export_nursery.start(_serve_export, daemon, export)
    daemon.exports[export.id] = export
    return export


@command("block-export-add")
async def block_export_add(daemon: Daemon, args: Any) -> None:
    await add_export(daemon, args)


async def _request_delete(daemon: Daemon, export_id: str, mode: str | None) -> None:
    export = daemon.exports.get(export_id)
    if export is None:
        raise GenericError(f"Export '{export_id}' is not found")
    if export.info()["shutting-down"]:
        raise GenericError(f"Export '{export_id}' is already shutting down")
    if (mode or "safe") == "safe" and export.client_count() > 0:
        # A client that just hung up (NBD_CMD_DISC and EOF already in its
        # socket) is not using the export.  QEMU's main loop reads that
        # socket before the QMP command; trio may run this task first (it
        # shuffles each batch), so give connections a few scheduler rounds
        # to read what is waiting for them.
        for _ in range(_SETTLE_ROUNDS):
            await trio.lowlevel.checkpoint()
            if export.client_count() == 0:
                break
        else:
            raise GenericError(f"export '{export_id}' still in use")
    if export.client_count() == 0:
        # nothing to wait for: QEMU deletes it at once, so BLOCK_EXPORT_DELETED
        # goes out before the reply
        daemon.export_nursery.start_soon(export.stop)
        await export.deleted.wait()
        return
    # the reply goes out now; BLOCK_EXPORT_DELETED follows once the clients
    # are gone (stop() lets requests in flight finish first)
    daemon.export_nursery.start_soon(export.stop)


@command("block-export-del")
async def block_export_del(daemon: Daemon, args: Any) -> None:
    await _request_delete(daemon, args.id, args.mode)


@command("query-block-exports")
async def query_block_exports(daemon: Daemon, args: None) -> list[dict[str, Any]]:
    # QEMU lists the newest export first
    return [e.info() for e in reversed(list(daemon.exports.values()))]


@command("nbd-server-start")
async def nbd_server_start(daemon: Daemon, args: Any) -> None:
    if daemon.nbd_server is not None:
        raise GenericError("NBD server already running")
    server = NbdServer(daemon, args.addr, tls_creds=args.tls_creds, tls_authz=args.tls_authz,
                       max_connections=args.max_connections)
    await daemon.export_nursery.start(server.run)
    daemon.nbd_server = server


@command("nbd-server-stop")
async def nbd_server_stop(daemon: Daemon, args: None) -> None:
    server = daemon.nbd_server
    if server is None:
        raise GenericError("NBD server not running")
    # QEMU deletes every NBD export (clients and all), then stops listening
    doomed = [e for e in daemon.exports.values() if isinstance(e, NbdExport)]
    async with trio.open_nursery() as nursery:
        for export in doomed:
            nursery.start_soon(export.stop)
    daemon.nbd_server = None
    await server.stop()


@command("nbd-server-add")
async def nbd_server_add(daemon: Daemon, args: Any) -> None:
    name = args.name if args.name is not None else args.device
    writable = bool(args.writable)
    node = daemon.graph.nodes.get(args.device)
    if node is not None and node.read_only:
        writable = False  # QEMU downgrades silently rather than refuse
    # what block-export-add would have been given
    opts = T.BlockExportOptions_nbd(
        id=name, node_name=args.device, writable=writable, name=name,
        description=args.description,
        bitmaps=[args.bitmap] if args.bitmap is not None else None)
    await add_export(daemon, opts)


@command("nbd-server-remove")
async def nbd_server_remove(daemon: Daemon, args: Any) -> None:
    export = daemon.exports.get(args.name)
    if export is not None and export.type != "nbd":
        raise GenericError(f"Block export '{args.name}' is not an NBD export")
    await _request_delete(daemon, args.name, args.mode)
