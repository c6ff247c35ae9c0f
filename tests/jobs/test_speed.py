"""speed: the job copies at the rate asked (virtual clock, so no wall-time flakiness)."""

from __future__ import annotations

import trio

SIZE = 8 << 20


async def test_speed_limits_and_set_speed(env, autojump_clock):
    for name in ("src", "dst"):
        await env.graph.add({"driver": "x-test-data-null", "node-name": name, "size": SIZE})
    t0 = trio.current_time()
    await env.qmp("blockdev-backup", job_id="b", device="src", target="dst", sync="full",
                  speed=4 << 20)
    await trio.sleep(1)
    [info] = await env.qmp("query-jobs")
    # about 4 MiB after one second: the first 100 ms slice, then the quota
    assert 3 << 20 <= info["current-progress"] <= 6 << 20
    await env.qmp("block-job-set-speed", device="b", speed=0)
    await env.wait_event("BLOCK_JOB_COMPLETED")
    assert trio.current_time() - t0 < 1.5
    [job_ev] = [d for n, d in env.log if n == "BLOCK_JOB_COMPLETED"]
    assert job_ev["offset"] == job_ev["len"] == SIZE and job_ev["speed"] == 0
