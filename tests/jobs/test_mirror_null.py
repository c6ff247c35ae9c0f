"""Job state machine and verbs, driven through the QMP handlers on null-co nodes."""

from __future__ import annotations

import pytest
import trio

from qsd_trio.qapi.errors import DeviceNotActive, GenericError

SIZE = 64 << 20


async def nulls(env, latency=100_000):
    for name in ("src", "dst"):
        await env.graph.add({"driver": "x-test-data-null", "node-name": name, "size": SIZE,
                             "latency-ns": latency})


async def test_mirror_ready_complete(env):
    await nulls(env, latency=0)
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full")
    ready = await env.wait_event("BLOCK_JOB_READY")
    assert ready == {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0, "type": "mirror"}
    [info] = await env.qmp("query-jobs")
    assert info == {"current-progress": SIZE, "status": "ready", "total-progress": SIZE,
                    "type": "mirror", "id": "j"}
    await env.qmp("job-complete", id="j")
    await env.wait_event("JOB_STATUS_CHANGE", status="null")
    assert env.names() == [
        "JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running", "JOB_STATUS_CHANGE:ready",
        "BLOCK_JOB_READY", "JOB_STATUS_CHANGE:waiting", "JOB_STATUS_CHANGE:pending",
        "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE:concluded", "JOB_STATUS_CHANGE:null"]
    assert env.jobs == {}
    assert not env.graph.nodes["src"].parents and not env.graph.nodes["dst"].parents


async def test_pause_resume_cancel_and_errors(env):
    await nulls(env)
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full",
                  speed=1 << 20)
    await trio.sleep(0.2)
    await env.qmp("job-pause", id="j")
    await env.wait_event("JOB_STATUS_CHANGE", status="paused")
    with pytest.raises(GenericError, match="^Job is already paused$"):
        await env.qmp("job-pause", id="j")
    with pytest.raises(GenericError, match="^Job 'j' in state 'paused' cannot accept command verb 'complete'$"):
        await env.qmp("job-complete", id="j")
    with pytest.raises(GenericError, match="^The block job for device 'j' is currently paused$"):
        await env.qmp("block-job-cancel", device="j")
    [bj] = await env.qmp("query-block-jobs")
    assert bj["paused"] is True and bj["status"] == "paused" and bj["speed"] == 1 << 20
    assert 0 < bj["offset"] < SIZE
    await env.qmp("job-resume", id="j")
    with pytest.raises(GenericError, match="^Can't resume a job that was not paused$"):
        await env.qmp("job-resume", id="j")
    with pytest.raises(GenericError, match="^Parameter 'speed' expects a non-negative value$"):
        await env.qmp("block-job-set-speed", device="j", speed=-1)
    await env.qmp("job-cancel", id="j")
    data = await env.wait_event("BLOCK_JOB_CANCELLED")
    assert data["offset"] < SIZE
    await env.wait_event("JOB_STATUS_CHANGE", status="null")
    assert env.statuses("j") == ["created", "running", "paused", "running", "aborting",
                                 "concluded", "null"]
    with pytest.raises(GenericError, match="^Job not found$"):
        await env.qmp("job-cancel", id="j")
    with pytest.raises(DeviceNotActive, match="^Block job 'x' not found$"):
        await env.qmp("block-job-cancel", device="x")


async def test_soft_cancel_after_ready_manual_finalize(env):
    await nulls(env, latency=0)
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full",
                  auto_finalize=False, auto_dismiss=False)
    await env.wait_event("BLOCK_JOB_READY")
    await env.qmp("block-job-cancel", device="j")
    await env.wait_event("BLOCK_JOB_PENDING")
    [info] = await env.qmp("query-jobs")
    assert info["status"] == "pending"
    with pytest.raises(GenericError, match="cannot accept command verb 'dismiss'"):
        await env.qmp("job-dismiss", id="j")
    await env.qmp("job-finalize", id="j")
    assert (await env.qmp("query-jobs"))[0]["status"] == "concluded"
    await env.qmp("job-dismiss", id="j")
    assert env.names()[3:] == [
        "BLOCK_JOB_READY", "JOB_STATUS_CHANGE:waiting", "JOB_STATUS_CHANGE:pending",
        "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE:concluded",
        "JOB_STATUS_CHANGE:null"]
    assert env.log[6][1] == {"type": "mirror", "id": "j"}


async def test_force_cancel_paused_and_bad_args(env):
    await nulls(env)
    with pytest.raises(GenericError, match="^Invalid job ID ''$"):
        await env.qmp("blockdev-mirror", device="src", target="dst", sync="full")
    with pytest.raises(GenericError, match="^Parameter 'speed' expects a non-negative value$"):
        await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full",
                      speed=-5)
    assert env.statuses("j") == ["created", "null"]
    env.log.clear()
    with pytest.raises(GenericError, match="^Cannot find device='nope' nor node-name='nope'$"):
        await env.qmp("blockdev-mirror", job_id="j", device="src", target="nope", sync="full")
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full",
                  speed=1)
    # the mirror_top filter now sits above src, as in qemu-storage-daemon
    with pytest.raises(GenericError, match="^Need a root block node$"):
        await env.qmp("blockdev-mirror", job_id="k", device="src", target="dst", sync="full")
    with pytest.raises(GenericError, match="^Need a root block node$"):
        await env.qmp("blockdev-mirror", job_id="k", device="dst", target="src", sync="full")
    await env.qmp("job-pause", id="j")
    await env.wait_event("JOB_STATUS_CHANGE", status="paused")
    await env.qmp("block-job-cancel", device="j", force=True)
    await env.wait_event("JOB_STATUS_CHANGE", status="null")
    assert env.statuses("j") == ["created", "running", "paused", "running", "aborting",
                                 "concluded", "null"]


async def test_cancel_all_at_shutdown(env):
    from qsd_trio.jobs.manager import cancel_all

    await nulls(env, latency=0)
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full")
    await env.wait_event("BLOCK_JOB_READY")
    with trio.fail_after(5):
        await cancel_all(env)
    assert env.statuses("j")[2:] == ["ready", "standby", "ready", "aborting", "concluded",
                                     "null"]
    assert "BLOCK_JOB_CANCELLED" in env.names()


async def test_mirror_flushes_target_before_ready_and_pivot(env):
    # mirror_flush: READY, and the pivot, come after what was copied is stable
    await nulls(env, latency=0)
    dst = env.graph.nodes["dst"]
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full")
    await env.wait_event("BLOCK_JOB_READY")
    assert dst.stats["flush_operations"] == 1
    await env.qmp("job-complete", id="j")
    await env.wait_event("JOB_STATUS_CHANGE", status="null")
    assert dst.stats["flush_operations"] == 2
