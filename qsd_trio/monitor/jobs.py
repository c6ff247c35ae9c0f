"""QMP commands: jobs (job-*, block-job-*, query-*) and the commands that start them."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import trio

from ..jobs import chain, manager
from ..jobs import create as create_mod
from ..jobs.amend import AmendJob
from ..jobs.backup import BackupJob
from ..jobs.blockjob import BlockJob, check_not_busy
from ..jobs.commit import CommitJob
from ..jobs.create import CreateJob
from ..jobs.job import Job, JobTxn
from ..jobs.mirror import MirrorJob, check_granularity
from ..jobs.stream import StreamJob
from ..nodes.block_copy import MAX_WORKERS
from ..nodes.node import BlockNode
from ..qapi import qapi_types as T
from ..qapi.errors import DeviceNotFound, GenericError
from . import snapshot
from .block import _data_nodes, prepare_read_only_again, read_only_again, set_read_only
from .registry import COMMANDS, command

if TYPE_CHECKING:
    from ..daemon import Daemon

_V = TypeVar("_V")


def _or(value: _V | None, default: _V) -> _V:
    """An optional argument's value, ``default`` when it is absent."""
    return default if value is None else value


async def _entered(job: Job, verb: Callable[..., None], *args: Any) -> None:
    """Apply a verb that enters the job (job_enter): an idle job takes its
    step before the reply, as QEMU's coroutine does (Job.settle)."""
    mark = job.idle_mark()
    verb(*args)
    await job.settle(mark)


async def _start(daemon: Daemon, job: Job) -> None:
    """job_start: the coroutine runs up to its first wait before the reply."""
    manager.start(daemon, job)
    await job.settle(0)


async def _attach_and_start(daemon: Daemon, job: MirrorJob | StreamJob | CommitJob,
                            writable: BlockNode | None = None) -> None:
    """The job takes its nodes, then starts (_start).  If it cannot take
    them it fails before it ran, and ``writable``, the node made read-write
    for it (_make_writable), is read-only again: nothing was written yet."""
    try:
        await job.attach_nodes()
    except BaseException:
        job.early_fail()
        if writable is not None:
            read_only_again(writable)
        raise
    await _start(daemon, job)


# -- job-* (job-qmp.c) ---------------------------------------------------------------
@command("job-pause")
async def job_pause(daemon: Daemon, args: Any) -> None:
    job = manager.find_job(daemon, args.id)
    await _entered(job, job.user_pause)


@command("job-resume")
async def job_resume(daemon: Daemon, args: Any) -> None:
    job = manager.find_job(daemon, args.id)
    await _entered(job, job.user_resume)


@command("job-cancel")
async def job_cancel(daemon: Daemon, args: Any) -> None:
    job = manager.find_job(daemon, args.id)
    await _entered(job, job.user_cancel, True)


@command("job-complete")
async def job_complete(daemon: Daemon, args: Any) -> None:
    # not waited for: mirror's completion drains its source first, and
    # QEMU's coroutine yields there, after the reply
    manager.find_job(daemon, args.id).complete()


@command("job-finalize")
async def job_finalize(daemon: Daemon, args: Any) -> None:
    manager.find_job(daemon, args.id).finalize()


@command("job-dismiss")
async def job_dismiss(daemon: Daemon, args: Any) -> None:
    manager.find_job(daemon, args.id).dismiss()


@command("query-jobs")
async def query_jobs(daemon: Daemon, args: None) -> list[dict[str, Any]]:
    # QEMU keeps jobs in a list it inserts at the head: newest first
    return [job.job_info() for job in reversed(daemon.jobs.values())]


# -- block-job-* (blockdev.c) ------------------------------------------------------------
@command("block-job-set-speed")
async def block_job_set_speed(daemon: Daemon, args: Any) -> None:
    manager.find_block_job(daemon, args.device).set_speed(args.speed)


@command("block-job-cancel")
async def block_job_cancel(daemon: Daemon, args: Any) -> None:
    job = manager.find_block_job(daemon, args.device)
    force = bool(args.force)
    if job.user_paused and not force:
        raise_paused(args.device)
    await _entered(job, job.user_cancel, force)


def raise_paused(device: str) -> None:
    raise GenericError(f"The block job for device '{device}' is currently paused")


@command("block-job-pause")
async def block_job_pause(daemon: Daemon, args: Any) -> None:
    job = manager.find_block_job(daemon, args.device)
    await _entered(job, job.user_pause)


@command("block-job-resume")
async def block_job_resume(daemon: Daemon, args: Any) -> None:
    job = manager.find_block_job(daemon, args.device)
    await _entered(job, job.user_resume)


@command("block-job-complete")
async def block_job_complete(daemon: Daemon, args: Any) -> None:
    manager.find_block_job(daemon, args.device).complete()


@command("block-job-finalize")
async def block_job_finalize(daemon: Daemon, args: Any) -> None:
    manager.find_block_job(daemon, args.id).finalize()


@command("block-job-dismiss")
async def block_job_dismiss(daemon: Daemon, args: Any) -> None:
    manager.find_block_job(daemon, args.id).dismiss()


@command("query-block-jobs")
async def query_block_jobs(daemon: Daemon, args: None) -> list[dict[str, Any]]:
    return [job.block_job_info() for job in reversed(daemon.jobs.values())
            if job.is_block_job]


# -- starting jobs -----------------------------------------------------------------------
class _Common(TypedDict):
    auto_finalize: bool
    auto_dismiss: bool


def _common(args: Any) -> _Common:
    return {"auto_finalize": _or(args.auto_finalize, True),
            "auto_dismiss": _or(args.auto_dismiss, True)}


def _root_node(daemon: Daemon, name: str) -> BlockNode:
    """qmp_get_root_bs: the node, which only BlockBackends (exports, a job's
    own) may use: not another node, not a block job (bdrv_is_root_node)."""
    node = daemon.graph.lookup_bs(name)
    if any(isinstance(e.parent, (BlockNode, BlockJob)) for e in node.parents):
        raise GenericError("Need a root block node")
    return node


def _lookup(daemon: Daemon, name: str) -> BlockNode:
    """bdrv_lookup_bs(name, name)."""
    node = daemon.graph.nodes.get(name)
    if node is None:
        raise GenericError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _job_id(args: Any) -> str:
    """The job id; without one block_job_create takes the device name, which
    no node of a storage daemon has, so job_create checks ""."""
    job_id: str | None = args.job_id
    return "" if job_id is None else job_id


def _filtered(node: BlockNode) -> BlockNode | None:
    """The child a filter passes everything to, None for other nodes."""
    if not (node.is_filter or node.driver == "throttle"):
        return None
    child = node.primary_child()
    return None if child is None else child.node


def _skip_filters(node: BlockNode) -> BlockNode:
    """bdrv_skip_filters: down through filters' filtered children."""
    while (below := _filtered(node)) is not None:
        node = below
    return node


def _check_to_replace(daemon: Daemon, source: BlockNode, name: str) -> BlockNode:
    """check_to_replace_node and the size check after it: only the source
    or a node below it through filters may be replaced, so that completing
    the mirror cannot change what that node's users see."""
    node = daemon.graph.find_node(name)
    check_not_busy(daemon, node)
    n: BlockNode | None = source
    while n is not None and n is not node:
        n = _filtered(n)
    if n is not node:
        raise GenericError(f"Cannot replace '{name}' by a node mirrored from "
                           f"'{source.node_name}', because it cannot be guaranteed that doing "
                           "so would not lead to an abrupt change of visible data")
    if node.length != source.length:
        raise GenericError("cannot replace image with a mirror image of different size")
    return node


async def start_mirror(daemon: Daemon, args: Any, source: BlockNode, target: BlockNode, *,
                       zero_target: bool = False, unmap: bool = True,
                       filter_node_name: str | None = None) -> None:
    """blockdev_mirror_common, mirror_start and mirror_start_job up to the
    job's creation, each check where QEMU makes it.  ``args`` are
    blockdev-mirror's or drive-mirror's; what only one of them has
    (``unmap``, ``filter-node-name``) comes as a keyword."""
    sync: str = args.sync
    check_granularity(args.granularity)
    check_not_busy(daemon, source)
    check_not_busy(daemon, target)
    if sync == "top" and "backing" not in source.children:
        sync = "full"
    replaces = None
    if args.replaces is not None:
        replaces = _check_to_replace(daemon, source, args.replaces)
    # mirror_start
    if sync in ("incremental", "bitmap"):
        raise GenericError(f"Sync mode '{sync}' not supported")
    # mirror_start_job: then the filter node, then job_create
    if _or(args.buf_size, 0) < 0:
        raise GenericError("Invalid parameter 'buf-size'")
    if _skip_filters(source) is _skip_filters(target):
        raise GenericError("Can't mirror node into itself")
    if filter_node_name is not None:
        daemon.graph.check_new_node_name(filter_node_name)
    job = MirrorJob(daemon, _job_id(args), source, target, sync=sync,
                    granularity=_or(args.granularity, 0),
                    buf_size=_or(args.buf_size, 0),
                    copy_mode=_or(args.copy_mode, "background"),
                    unmap=unmap,
                    on_source_error=_or(args.on_source_error, "report"),
                    on_target_error=_or(args.on_target_error, "report"),
                    replaces=replaces, filter_node_name=filter_node_name,
                    zero_target=zero_target, **_common(args))
    manager.register(daemon, job, _or(args.speed, 0))
    await _attach_and_start(daemon, job)


@command("blockdev-mirror")
async def blockdev_mirror(daemon: Daemon, args: Any) -> None:
    source = _root_node(daemon, args.device)
    target = _lookup(daemon, args.target)
    # qmp_blockdev_mirror: the target may hold anything
    await start_mirror(daemon, args, source, target,
                       zero_target=args.sync == "full",
                       filter_node_name=args.filter_node_name)


# -- backup and transaction (blockdev.c: the backup actions are transactions) -----------
async def _prepare_backup(daemon: Daemon, args: Any, source: BlockNode, target: BlockNode,
                          txn: JobTxn | None) -> BackupJob:
    """backup action prepare: checks, then a CREATED job (started at commit)
    with its copy-before-write filter in place above the source."""
    # do_backup_common
    sync: str = args.sync
    mode: str | None = args.bitmap_mode
    bitmap = None
    bname: str | None = args.bitmap
    if sync in ("bitmap", "incremental") and bname is None:
        raise GenericError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise GenericError(f"Bitmap sync mode must be 'on-success' when using sync "
                               f"mode '{sync}'")
        sync, mode = "bitmap", "on-success"
    if bname is not None:
        bitmap = source.bitmaps.get(bname)
        if bitmap is None:
            raise GenericError(f"Bitmap '{bname}' could not be found")
        if mode is None:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        if bitmap.busy:
            raise GenericError(f"Bitmap '{bname}' is currently in use by another operation "
                               "and cannot be used")
        if sync == "none":
            raise GenericError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise GenericError(f"Bitmap sync mode 'never' has no meaningful effect when "
                               f"combined with sync mode '{sync}'")
    elif mode is not None:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")
    # backup_job_create
    if source is target:
        raise GenericError("Source and target cannot be the same")
    compress = bool(args.compress)
    if compress and not target.supports_compressed_writes:
        # bdrv_get_device_name(target): nodes of a storage daemon have none
        raise GenericError("Compression is not supported for this drive ")
    check_not_busy(daemon, source)
    check_not_busy(daemon, target)
    perf = args.x_perf
    workers: int = MAX_WORKERS if perf is None else _or(perf.max_workers, MAX_WORKERS)
    chunk: int = 0 if perf is None else _or(perf.max_chunk, 0)
    if not 1 <= workers <= 0x7FFFFFFF:
        raise GenericError(f"max-workers must be between 1 and {0x7FFFFFFF}")
    if chunk < 0:
        raise GenericError("max-chunk must be zero (which means no limit) or positive")
    if target.length != source.length:
        raise GenericError("Source and target image have different sizes")
    job = BackupJob(daemon, _job_id(args), source, target, sync=sync, bitmap=bitmap,
                    bitmap_mode=mode or "on-success", compress=compress,
                    on_source_error=_or(args.on_source_error, "report"),
                    on_target_error=_or(args.on_target_error, "report"),
                    filter_node_name=args.filter_node_name,
                    max_workers=workers, max_chunk=chunk,
                    txn=txn, **_common(args))
    await job.insert_filter()
    try:
        manager.register(daemon, job, _or(args.speed, 0))
    except BaseException:
        job.clean()  # the filter goes again
        raise
    job.attach_nodes()
    return job


Undo = Callable[[], object]  # may return an awaitable, which is awaited


async def _action_prepare(daemon: Daemon, kind: str, data: Any, txn: JobTxn | None,
                          undo: list[Undo],
                          commits: list[Callable[[], Awaitable[None]]]) -> BackupJob | None:
    """Run one transaction action's prepare; push its undo (a function, maybe
    async) and its commit (async); return a job or None."""
    if kind == "abort":
        raise GenericError("Transaction aborted using Abort action")
    if kind in ("blockdev-snapshot", "blockdev-snapshot-sync"):
        if kind == "blockdev-snapshot":
            state = await snapshot.external_snapshot_prepare(
                daemon, device=data.node, node_name=data.node, overlay_ref=data.overlay)
        else:
            state = await snapshot.external_snapshot_prepare(
                daemon, device=data.device, node_name=data.node_name, sync=data)
        undo.append(state.abort)
        commits.append(state.commit)
        return None
    if kind == "blockdev-snapshot-internal-sync":
        undo.append((await snapshot.internal_snapshot_prepare(daemon, data)).abort)
        return None
    if kind == "blockdev-backup":
        source = daemon.graph.lookup_bs(data.device)
        target = daemon.graph.lookup_bs(data.target)
        await manager.drain_bounce(_jobs_on(daemon, source))
        return await _prepare_backup(daemon, data, source, target, txn)
    if kind == "drive-backup":
        source = daemon.graph.lookup_bs(data.device)
        await manager.drain_bounce(_jobs_on(daemon, source))
        check_not_busy(daemon, source)  # early, to avoid creating the target
        target = await _open_drive_target(daemon, data, source)
        undo.append(lambda: daemon.root_nursery.start_soon(_drop_node, daemon, target))
        return await _prepare_backup(daemon, data, source, target, txn)
    if kind.startswith("block-dirty-bitmap-"):
        node = daemon.graph.lookup_bs(data.node)
        saved = {k: (bm, bytes(bm.bits), bm.enabled) for k, bm in node.bitmaps.items()}

        def restore(node: BlockNode = node, saved: dict[str, Any] = saved) -> None:
            node.bitmaps.clear()
            for k, (bm, bits, enabled) in saved.items():
                bm.bits[:] = bits
                bm.enabled = enabled
                node.bitmaps[k] = bm

        await COMMANDS[kind].handler(daemon, data)
        undo.append(restore)
        return None
    handler = COMMANDS.get(kind)
    if handler is None:
        raise GenericError(f"Action '{kind}' is not supported by qsd-trio")
    await handler.handler(daemon, data)
    return None


def _jobs_on(daemon: Daemon, node: BlockNode) -> list[Job]:
    """The jobs a drained section of ``node`` pauses: those on it or on a node
    above it (a backup's copy-before-write filter)."""
    above = node._ancestors()
    return [j for j in daemon.jobs.values()
            if isinstance(j, BlockJob) and any(e.node in above for e in j.edges)]


async def _drop_node(daemon: Daemon, node: BlockNode) -> None:
    if not node.parents and daemon.graph.nodes.get(node.node_name) is node:
        del daemon.graph.nodes[node.node_name]
        await node.close()


async def run_transaction(daemon: Daemon, actions: list[Any],
                          completion_mode: str = "individual") -> None:
    """``actions``: TransactionAction variants, as the schema builds them."""
    await manager.drain_bounce(list(daemon.jobs.values()))
    txn = JobTxn() if completion_mode == "grouped" else None
    jobs: list[Job] = []
    undo: list[Undo] = []
    commits: list[Callable[[], Awaitable[None]]] = []
    try:
        for action in actions:
            job = await _action_prepare(daemon, action.type, action.data, txn, undo, commits)
            if job is not None:
                jobs.append(job)
    except BaseException:
        for created in reversed(jobs):
            created.cancel(True)  # not started: created -> aborting -> concluded -> null
        with trio.CancelScope(shield=True):
            # the last action prepared is undone first
            for fn in reversed(undo):
                result = fn()
                if inspect.isawaitable(result):
                    await result
        raise
    for commit in commits:
        await commit()
    for created in jobs:
        manager.start(daemon, created)
    # the actions' drained sections end after the jobs started
    await manager.drain_bounce(jobs)


@command("transaction")
async def transaction(daemon: Daemon, args: Any) -> None:
    props = args.properties
    mode = "individual" if props is None else _or(props.completion_mode, "individual")
    await run_transaction(daemon, args.actions, mode)


@command("blockdev-backup")
async def blockdev_backup(daemon: Daemon, args: Any) -> None:
    await run_transaction(daemon, [T.TransactionAction_blockdev_backup(data=args)])


@command("drive-backup")
async def drive_backup(daemon: Daemon, args: Any) -> None:
    await run_transaction(daemon, [T.TransactionAction_drive_backup(data=args)])


async def _open_drive_target(daemon: Daemon, args: Any, source: BlockNode) -> BlockNode:
    """drive-backup/drive-mirror: open ``target`` (a file name) as a new node.

    mode=existing opens the image as it is; absolute-paths creates it first
    (format of ``format``, else the source's), as qemu-img create would.
    """
    fmt: str = args.format or source.driver
    mode: str = _or(args.mode, "absolute-paths")
    if mode != "existing":
        await create_mod.create_image(daemon, args.target, fmt, source.length)
    return await _open_implicit(daemon, {"driver": fmt, "file": {"driver": "file",
                                                                 "filename": args.target}})


async def _open_implicit(daemon: Daemon, options: dict[str, Any]) -> BlockNode:
    """An implicit node ("#blockNNN", not monitor-owned) as drive-* targets are.

    It goes away when the job that uses it lets go (BlockJob.clean)."""
    return await daemon.graph.open_node(dict(options))


# -- stream and commit -----------------------------------------------------------------
async def _make_writable(daemon: Daemon, node: BlockNode) -> BlockNode | None:
    """Reopen ``node`` read-write for a job that writes it, as QEMU's
    bdrv_reopen_set_read_only(base, false): the node itself is reopened
    whatever it was opened with (a user's read-only=on too, or the old top a
    snapshot made read-only), and the nodes below it that store its data
    follow unless the user opened one of them read-only=on itself, which
    keeps it so and refuses the job ("Block node is read-only", from the
    permission the node then cannot grant).  Returns the node to make
    read-only again when the job's work is done."""
    if not node.read_only:
        return None
    for n in _data_nodes(node)[1:]:
        if n.read_only and not n.implicit_read_only and n.options.get("read-only"):
            raise GenericError("Block node is read-only")
    await set_read_only(node, False)
    return node


def _read_only_after_run(daemon: Daemon, job: Job, node: BlockNode | None) -> None:
    """``node`` goes back to read-only when the job is cleaned up, as in
    QEMU.  Its data is flushed when the job's work ends (an async step), so
    the clean step (synchronous, after the job let go of its nodes) has no
    I/O left to do."""
    if node is None:
        return

    async def flush() -> None:
        with trio.CancelScope(shield=True):
            await prepare_read_only_again(node)

    def read_only() -> None:
        if daemon.graph.nodes.get(node.node_name) is node:
            read_only_again(node)

    job.after_run.append(flush)
    job.after_clean.append(read_only)


@command("block-stream")
async def block_stream(daemon: Daemon, args: Any) -> None:
    # qmp_block_stream: exclusive arguments, the nodes, op blockers, then stream_start
    base_name: str | None = args.base
    base_node: str | None = args.base_node
    bottom: str | None = args.bottom
    if base_name is not None and base_node is not None:
        raise GenericError("'base' and 'base-node' cannot be specified at the same time")
    if base_name is not None and bottom is not None:
        raise GenericError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise GenericError("'bottom' and 'base-node' cannot be specified at the same time")
    top = daemon.graph.lookup_bs(args.device)
    base: BlockNode | None = None
    if base_name is not None:
        base = chain.find_backing_image(top, base_name)
        if base is None:
            raise GenericError(f"Can't find '{base_name}' in the backing chain")
    if base_node is not None:
        base = daemon.graph.lookup_bs(None, base_node)
        if base not in chain.chain(top)[1:]:
            raise GenericError(f"Node '{base_node}' is not a backing image of '{args.device}'")
    c = chain.chain(top)
    end = base
    if bottom is not None:
        b = daemon.graph.lookup_bs(None, bottom)
        if b.is_filter:
            raise GenericError(f"Node '{bottom}' is a filter, use a non-filter node as "
                               "'bottom'")
        if b not in c:
            raise GenericError(f"Node '{bottom}' is not in a chain starting from "
                               f"'{args.device}'")
        i = c.index(b)
        base = end = c[i + 1] if i + 1 < len(c) else None
    for node in c[:c.index(end) if end in c else len(c)]:
        check_not_busy(daemon, node)
    backing_file: str | None = args.backing_file
    if base is None and backing_file is not None:
        raise GenericError("backing file specified, but streaming the entire chain")
    # stream_start: read-write, the copy-on-read filter, then job_create
    writable = await _make_writable(daemon, top)
    if args.filter_node_name is not None:
        try:
            daemon.graph.check_new_node_name(args.filter_node_name)
        except GenericError as e:
            if writable is not None:
                read_only_again(writable)
            raise e.prefixed("Could not create node: ") from None
    job = StreamJob(daemon, _job_id(args), top, base, backing_file,
                    on_error=_or(args.on_error, "report"),
                    filter_node_name=args.filter_node_name, **_common(args))
    _read_only_after_run(daemon, job, writable)
    manager.register(daemon, job, _or(args.speed, 0))
    await _attach_and_start(daemon, job, writable)


@command("block-commit")
async def block_commit(daemon: Daemon, args: Any) -> None:
    # qmp_block_commit.  libvirt probes for the command with DeviceNotFound,
    # so the device comes first
    if daemon.graph.nodes.get(args.device) is None:
        raise DeviceNotFound(f"Device '{args.device}' not found")
    device = _root_node(daemon, args.device)
    check_not_busy(daemon, device)
    c = chain.chain(device)
    top: BlockNode | None = device
    if args.top is not None and args.top_node is not None:
        raise GenericError("'top-node' and 'top' are mutually exclusive")
    if args.top_node is not None:
        top = daemon.graph.lookup_bs(None, args.top_node)
        if top not in c:
            raise GenericError(f"'{args.top_node}' is not in this backing file chain")
    elif args.top is not None:
        top = next((n for n in c if args.top in (n.filename, n.node_name)), None)
        if top is None:
            raise GenericError(f"Top image file {args.top} not found")
    if args.base is not None and args.base_node is not None:
        raise GenericError("'base-node' and 'base' are mutually exclusive")
    assert top is not None
    below_top = c[c.index(top):]
    base: BlockNode | None
    if args.base_node is not None:
        base = daemon.graph.lookup_bs(None, args.base_node)
        if base not in below_top:
            raise GenericError(f"'{args.base_node}' is not in this backing file chain")
    elif args.base is not None:
        base = chain.find_backing_image(top, args.base)
        if base is None:
            raise GenericError(f"Can't find '{args.base}' to use as base")
    else:
        base = c[-1]
    for node in below_top[:below_top.index(base) + 1]:
        check_not_busy(daemon, node)
    if top is base:
        raise GenericError("cannot commit an image into itself")
    backing_file: str | None = args.backing_file
    if top is device and backing_file is not None:
        raise GenericError("'backing-file' specified, but 'top' is the active layer")
    if top is not device:
        overlay = chain.overlay_of(device, top)
        assert overlay is not None  # top is in the device's chain, below it
        check_not_busy(daemon, overlay)
    fnn: str | None = args.filter_node_name
    job: BlockJob
    if top is device:
        # commit_active_start: the base read-write, then mirror_start_job's
        # filter node, then job_create
        writable = await _make_writable(daemon, base)
        if fnn is not None:
            try:
                daemon.graph.check_new_node_name(fnn)
            except GenericError:
                if writable is not None:
                    read_only_again(writable)
                raise
        # active commit: the base becomes the active layer and stays writable
        job = MirrorJob(daemon, _job_id(args), device, base, sync="top", base=base,
                        on_source_error=_or(args.on_error, "report"),
                        on_target_error=_or(args.on_error, "report"),
                        job_type="commit", filter_node_name=fnn, **_common(args))
        manager.register(daemon, job, _or(args.speed, 0))
    else:
        # commit_start: job_create, then the base read-write and the filter
        job = CommitJob(daemon, _job_id(args), device, top, base, backing_file,
                        on_error=_or(args.on_error, "report"),
                        filter_node_name=fnn, **_common(args))
        manager.register(daemon, job, _or(args.speed, 0))
        try:
            writable = await _make_writable(daemon, base)
        except BaseException:
            job.early_fail()
            raise
        _read_only_after_run(daemon, job, writable)
    await _attach_and_start(daemon, job, writable)


# -- blockdev-create, x-blockdev-amend, drive-mirror ------------------------------------
@command("blockdev-create")
async def blockdev_create(daemon: Daemon, args: Any) -> None:
    driver: str = args.options.driver
    if driver not in ("file", "qcow2", "luks", "rbd", "vpc", "qed", "parallels", "qcow",
                      "vhdx", "vmdk"):
        raise GenericError(f"Driver '{driver}' does not support blockdev-create in qsd-trio")
    job_id = manager.check_new_id(daemon, args.job_id)
    job = CreateJob(daemon, job_id, args.options)
    manager.register(daemon, job)
    manager.start(daemon, job)


@command("x-blockdev-amend")
async def x_blockdev_amend(daemon: Daemon, args: Any) -> None:
    node = daemon.graph.lookup_bs(None, args.node_name)
    if node.driver != args.options.driver:
        raise GenericError("x-blockdev-amend doesn't support changing the block driver")
    if node.driver not in ("qcow2", "luks"):
        raise GenericError(f"Driver {node.driver} does not support x-blockdev-amend")
    job_id = manager.check_new_id(daemon, args.job_id)
    job = AmendJob(daemon, job_id, node, args.options, force=bool(args.force))
    manager.register(daemon, job)
    manager.start(daemon, job)


@command("drive-mirror")
async def drive_mirror(daemon: Daemon, args: Any) -> None:
    source = _root_node(daemon, args.device)
    check_not_busy(daemon, source)  # early, to avoid creating the target
    fmt: str = args.format or source.driver
    mode: str = _or(args.mode, "absolute-paths")
    sync: str = args.sync
    if args.replaces is not None and args.node_name is None:
        raise GenericError("a node-name must be provided when replacing a named node "
                           "of the graph")
    if mode != "existing":
        backing = chain.backing_of(source) if sync == "top" else None
        await create_mod.create_image(daemon, args.target, fmt, source.length,
                                      backing_file=backing.filename if backing else None,
                                      backing_fmt=backing.driver if backing else None)
    opts: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": args.target}}
    if sync == "top" and fmt == "qcow2":
        backing = chain.backing_of(source)
        if backing is not None:
            opts["backing"] = backing.node_name
    elif fmt == "qcow2":
        opts["backing"] = None
    target = await _open_implicit(daemon, opts)
    try:
        # a new image reads as zeroes already (bdrv_has_zero_init)
        await start_mirror(daemon, args, source, target,
                           zero_target=sync == "full" and mode == "existing",
                           unmap=_or(args.unmap, True))
    except BaseException:
        if not target.parents:
            await _drop_node(daemon, target)
        raise
