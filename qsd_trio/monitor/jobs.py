"""QMP commands: jobs (job-*, block-job-*, query-*) and the commands that start them."""

from __future__ import annotations

from ..jobs import manager
from .registry import command


def _arg(args, name, default=None):
    value = getattr(args, name, None) if args is not None else None
    if value is None:
        return default
    return getattr(value, "value", value)  # enums from the schema layer


# -- job-* (job-qmp.c) ---------------------------------------------------------------
@command("job-pause")
async def job_pause(daemon, args):
    manager.find_job(daemon, args.id).user_pause()


@command("job-resume")
async def job_resume(daemon, args):
    manager.find_job(daemon, args.id).user_resume()


@command("job-cancel")
async def job_cancel(daemon, args):
    manager.find_job(daemon, args.id).user_cancel(True)


@command("job-complete")
async def job_complete(daemon, args):
    manager.find_job(daemon, args.id).complete()


@command("job-finalize")
async def job_finalize(daemon, args):
    manager.find_job(daemon, args.id).finalize()


@command("job-dismiss")
async def job_dismiss(daemon, args):
    manager.find_job(daemon, args.id).dismiss()


@command("query-jobs")
async def query_jobs(daemon, args):
    return [job.job_info() for job in daemon.jobs.values()]


# -- block-job-* (blockdev.c) ------------------------------------------------------------
@command("block-job-set-speed")
async def block_job_set_speed(daemon, args):
    manager.find_block_job(daemon, args.device).set_speed(args.speed)


@command("block-job-cancel")
async def block_job_cancel(daemon, args):
    job = manager.find_block_job(daemon, args.device)
    force = bool(_arg(args, "force", False))
    if job.user_paused and not force:
        raise_paused(args.device)
    job.user_cancel(force)


def raise_paused(device: str) -> None:
    from ..qapi.errors import GenericError

    raise GenericError(f"The block job for device '{device}' is currently paused")


@command("block-job-pause")
async def block_job_pause(daemon, args):
    manager.find_block_job(daemon, args.device).user_pause()


@command("block-job-resume")
async def block_job_resume(daemon, args):
    manager.find_block_job(daemon, args.device).user_resume()


@command("block-job-complete")
async def block_job_complete(daemon, args):
    manager.find_block_job(daemon, args.device).complete()


@command("block-job-finalize")
async def block_job_finalize(daemon, args):
    manager.find_block_job(daemon, args.id).finalize()


@command("block-job-dismiss")
async def block_job_dismiss(daemon, args):
    manager.find_block_job(daemon, args.id).dismiss()


@command("query-block-jobs")
async def query_block_jobs(daemon, args):
    return [job.block_job_info() for job in daemon.jobs.values() if job.is_block_job]


# -- starting jobs -----------------------------------------------------------------------
def _common(args) -> dict:
    return {"auto_finalize": _arg(args, "auto_finalize", True),
            "auto_dismiss": _arg(args, "auto_dismiss", True)}


def _root_node(daemon, name):
    """qmp_get_root_bs: the node, which no other node may use as a child."""
    from ..nodes.node import BlockNode
    from ..qapi.errors import GenericError

    node = daemon.graph.lookup_bs(name) if hasattr(daemon.graph, "lookup_bs") else _lookup(daemon, name)
    if any(isinstance(e.parent, BlockNode) for e in node.parents):
        raise GenericError("Need a root block node")
    return node


def _lookup(daemon, name):
    """bdrv_lookup_bs(name, name)."""
    from ..qapi.errors import GenericError

    node = daemon.graph.nodes.get(name)
    if node is None:
        raise GenericError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _launch(daemon, job, speed):
    manager.register(daemon, job, speed)
    manager.start(daemon, job)


async def start_mirror(daemon, args, source, target, *, drive: bool = False):
    from ..jobs.blockjob import check_not_busy
    from ..jobs.mirror import MirrorJob, check_granularity

    sync = _arg(args, "sync")
    check_not_busy(daemon, source)
    check_not_busy(daemon, target)
    if sync == "top" and "backing" not in source.children:
        sync = "full"
    replaces = None
    if _arg(args, "replaces") is not None:
        replaces = _lookup(daemon, args.replaces)
    check_granularity(_arg(args, "granularity"))
    job_id = manager.check_new_id(daemon, _arg(args, "job_id"))
    job = MirrorJob(daemon, job_id, source, target, sync=sync,
                    granularity=_arg(args, "granularity", 0),
                    buf_size=_arg(args, "buf_size", 0),
                    copy_mode=_arg(args, "copy_mode", "background"),
                    unmap=_arg(args, "unmap", True),
                    on_source_error=_arg(args, "on_source_error", "report"),
                    on_target_error=_arg(args, "on_target_error", "report"),
                    replaces=replaces, **_common(args))
    manager.register(daemon, job, _arg(args, "speed", 0))
    try:
        job.attach_nodes()
    except BaseException:
        job.early_fail()
        raise
    manager.start(daemon, job)


@command("blockdev-mirror")
async def blockdev_mirror(daemon, args):
    source = _root_node(daemon, args.device)
    target = _lookup(daemon, args.target)
    await start_mirror(daemon, args, source, target)
