"""Transactions: grouped jobs fail together; an abort action undoes everything."""

from __future__ import annotations

import pytest

from qsd_trio.qapi.errors import GenericError

SIZE = 8 << 20


def action(kind, **data):
    """A TransactionAction as QMP has it (``job_id=`` is ``job-id``)."""
    return {"type": kind, "data": {k.replace("_", "-"): v for k, v in data.items()}}


async def add(env, name, driver="x-test-data-null", **extra):
    await env.graph.add({"driver": driver, "node-name": name, "size": SIZE, **extra})


async def test_grouped_failure_cancels_partner(env):
    for n in ("a", "b", "ta"):
        await add(env, n)
    await add(env, "tb", "x-test-failing-null", **{"fail-after": 1 << 20})
    await env.qmp("transaction", actions=[
        action("blockdev-backup", job_id="ja", device="a", target="ta", sync="full",
               speed=1 << 20),
        action("blockdev-backup", job_id="jb", device="b", target="tb", sync="full")],
        properties={"completion-mode": "grouped"})
    await env.wait_event("JOB_STATUS_CHANGE", id="ja", status="null")
    await env.wait_event("JOB_STATUS_CHANGE", id="jb", status="null")
    cancelled = [d for n, d in env.log if n == "BLOCK_JOB_CANCELLED"]
    completed = [d for n, d in env.log if n == "BLOCK_JOB_COMPLETED"]
    assert [d["device"] for d in cancelled] == ["ja"]
    assert [(d["device"], d["error"]) for d in completed] == [("jb", "Input/output error")]
    assert env.statuses("ja")[-3:] == ["aborting", "concluded", "null"]
    assert "BLOCK_JOB_ERROR" in env.names()
    assert env.jobs == {}
    for n in ("a", "b", "ta", "tb"):
        assert env.graph.nodes[n].parents == [] and env.graph.nodes[n].before_write == []


async def test_individual_failure_leaves_partner_running(env):
    for n in ("a", "b", "ta"):
        await add(env, n)
    await add(env, "tb", "x-test-failing-null", **{"fail-after": 1 << 20})
    await env.qmp("transaction", actions=[
        action("blockdev-backup", job_id="ja", device="a", target="ta", sync="full"),
        action("blockdev-backup", job_id="jb", device="b", target="tb", sync="full")],
        properties=None)
    await env.wait_event("JOB_STATUS_CHANGE", id="ja", status="null")
    await env.wait_event("JOB_STATUS_CHANGE", id="jb", status="null")
    assert [d["device"] for n, d in env.log if n == "BLOCK_JOB_CANCELLED"] == []
    done = {d["device"]: d.get("error") for n, d in env.log if n == "BLOCK_JOB_COMPLETED"}
    assert done == {"ja": None, "jb": "Input/output error"}


async def test_abort_action_undoes_bitmap_and_job(env):
    for n in ("a", "ta"):
        await add(env, n)
    with pytest.raises(GenericError, match="^Transaction aborted using Abort action$"):
        await env.qmp("transaction", actions=[
            action("block-dirty-bitmap-add", node="a", name="bm"),
            action("blockdev-backup", job_id="j", device="a", target="ta", sync="full"),
            action("abort")], properties=None)
    assert env.statuses("j") == ["created", "aborting", "concluded", "null"]
    assert env.graph.nodes["a"].bitmaps == {}
    assert env.jobs == {} and env.graph.nodes["a"].before_write == []
