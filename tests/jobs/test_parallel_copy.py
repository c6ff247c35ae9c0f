"""The copy jobs keep many large requests in flight and skip holes.

Real images (qcow2 or raw files), with a counting node (conftest.CountingRaw)
between a format and its file, or as the raw node a job copies from or to:
it sees how many requests are in flight at once, how big they are, and how
many block status queries there are.  After each job the images are checked
with ``qemu-img check`` and compared with a model of what they must hold: a
raw copy of what the chain read before the job, made by qemu-img.
"""

from __future__ import annotations

import json
import random

import pytest
import trio

from qsd_trio.jobs import commit, stream
from tests.helpers import qemu_img, qemu_io

MiB = 1 << 20
SIZE = 32 * MiB


def _qcow2(path, *cmds, backing=None):
    opts = ["-b", backing.name, "-F", "qcow2"] if backing else []
    qemu_img("create", "-q", "-f", "qcow2", *opts, str(path), str(SIZE))
    for c in cmds:
        qemu_io("-f", "qcow2", "-c", c, str(path))


def _raw(path, *cmds):
    qemu_img("create", "-q", "-f", "raw", str(path), str(SIZE))
    for c in cmds:
        qemu_io("-f", "raw", "-c", c, str(path))


def _model(image, tmp_path, name="model.raw"):
    """What ``image`` (and its backing chain) reads now, as a raw file."""
    out = tmp_path / name
    qemu_img("convert", "-O", "raw", str(image), str(out))
    return out


def _map(image):
    return json.loads(qemu_img("map", "--output=json", str(image)).stdout)


def _data_in(image, start, end):
    """Does ``image`` itself (depth 0) hold data anywhere in [start, end)?"""
    return any(e["data"] and e["depth"] == 0 and e["start"] < end
               and start < e["start"] + e["length"] for e in _map(image))


async def _add_qcow2(env, name, path, counting=None, **opts):
    file = {"driver": "file", "filename": str(path)}
    if counting is not None:
        file = {"driver": "x-test-counting", "node-name": counting, "file": file}
    await env.graph.add({"driver": "qcow2", "node-name": name, **opts, "file": file})


async def _add_raw(env, name, path, **opts):
    await env.graph.add({"driver": "x-test-counting", "node-name": name, **opts,
                         "file": {"driver": "file", "filename": str(path)}})


def _node(env, name):
    return env.graph.nodes[name]


async def _done(env, job_id="j"):
    ev = await env.wait_event("BLOCK_JOB_COMPLETED", device=job_id)
    assert "error" not in ev, ev.get("error")
    assert ev["offset"] == ev["len"]
    await _settled(env)
    return ev


async def _settled(env):
    """The job's last tasks (closing its filter) are over: the graph is ours."""
    with trio.fail_after(10):
        while env.job_nursery.child_tasks:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.01)


# -- stream --------------------------------------------------------------------------
@pytest.fixture
def stream_chain(tmp_path):
    """base: data, a zero cluster (8M+2M) and all-zero data (12M+1M), a hole
    from 24M; top: a little data of its own."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    _qcow2(base, "write -P 0x11 0 24M", "write -z 8M 2M", "write -P 0 12M 1M")
    _qcow2(top, "write -P 0x22 1M 64k", backing=base)
    return base, top, _model(top, tmp_path)


async def test_stream_keeps_chunks_in_flight_and_writes_zeroes(env, stream_chain):
    base, top, model = stream_chain
    await _add_qcow2(env, "base", base, counting="basef")
    await _add_qcow2(env, "top", top, counting="topf", backing="base")
    _node(env, "basef").biggest = 0  # opening read up to 2 MiB of header
    await env.qmp("block-stream", job_id="j", device="top")
    ev = await _done(env)
    assert ev["len"] == SIZE
    topf, basef = _node(env, "topf"), _node(env, "basef")
    # several chunks at once (one at a time before), none larger than a chunk
    assert topf.most > 1 and basef.most > 1
    assert basef.biggest <= stream.CHUNK
    assert env.jobs == {}
    await env.graph.close_all()
    qemu_img("check", "-q", str(top))
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(model), str(top))
    assert "backing-filename" not in json.loads(
        qemu_img("info", "--output=json", str(top)).stdout)
    # zeroes stay zeroes (as QEMU's copy-on-read writes them), data is data,
    # the hole stays a hole
    assert not _data_in(top, 8 * MiB, 10 * MiB)
    assert not _data_in(top, 12 * MiB, 13 * MiB)
    assert not _data_in(top, 24 * MiB, SIZE)
    assert _data_in(top, 0, 8 * MiB) and _data_in(top, 13 * MiB, 24 * MiB)


@pytest.mark.parametrize("policy", ["stop", "ignore", "report"])
async def test_stream_read_error_policies(env, stream_chain, policy):
    base, top, model = stream_chain
    await env.graph.add({"driver": "qcow2", "node-name": "base", "file": {
        "driver": "x-test-counting", "node-name": "basef", "fail-at": 5 * MiB,
        "fail-reads": 1, "file": {"driver": "file", "filename": str(base)}}})
    await _add_qcow2(env, "top", top, backing="base")
    await env.qmp("block-stream", job_id="j", device="top", on_error=policy)
    if policy == "stop":
        await env.wait_event("JOB_STATUS_CHANGE", status="paused")
        [bj] = await env.qmp("query-block-jobs")
        assert bj["io-status"] == "failed" and bj["paused"]
        await env.qmp("job-resume", id="j")
        await _done(env)
    else:
        ev = await env.wait_event("BLOCK_JOB_COMPLETED")
        await _settled(env)
        assert ev["error"] == "Input/output error"
        # report: the job ends there; ignore (QEMU's stream_run): the chunk
        # is left behind, the rest copied, and the job fails at the end
        assert (ev["offset"] == SIZE) == (policy == "ignore")
    errors = [d for n, d in env.log if n == "BLOCK_JOB_ERROR"]
    action = {"stop": "stop", "ignore": "ignore", "report": "report"}[policy]
    assert errors == [{"device": "j", "operation": "read", "action": action}]
    await env.graph.close_all()
    qemu_img("check", "-q", str(top))
    # streamed or not, the chain reads what it read before
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(model), str(top))
    backing = json.loads(qemu_img("info", "--output=json", str(top)).stdout)
    # the backing file goes only when everything was copied
    assert ("backing-filename" in backing) == (policy != "stop")


async def test_stream_with_guest_writes(env, stream_chain, tmp_path, monkeypatch):
    """Writes to the top between the windows (each a drained section with
    chunks in flight): none is lost or overwritten by the copy."""
    monkeypatch.setattr(stream, "CHUNK", 256 << 10)
    monkeypatch.setattr(stream, "WINDOW", 1 << 20)
    base, top, model = stream_chain
    await _add_qcow2(env, "base", base, counting="basef")
    await _add_qcow2(env, "top", top, counting="topf", backing="base")
    _node(env, "basef").delay = 0.003
    expected = bytearray(model.read_bytes())
    rnd = random.Random(7)
    node = _node(env, "top")
    await env.qmp("block-stream", job_id="j", device="top")
    writes = 0
    while not any(n == "BLOCK_JOB_COMPLETED" for n, _ in env.log):
        off = rnd.randrange(0, SIZE - 256 * 1024) // 512 * 512
        n = rnd.choice([512, 4096, 65536, 200 * 1024])
        data = bytes([rnd.randrange(1, 256)]) * n
        await node.write(off, data)
        expected[off:off + n] = data
        writes += 1
        await trio.sleep(0.001)
    await _done(env)
    assert writes > 4  # between windows, not after the job (one window each at least)
    await env.graph.close_all()
    qemu_img("check", "-q", str(top))
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(want), str(top))


async def test_stream_plan_outlives_its_window_only_without_other_writes(env, tmp_path,
                                                                          monkeypatch):
    """A plan (zeroes from the backing for 0..16M) is kept for the next
    windows while nobody else writes the top: a write into the planned range
    during a pause is seen, and the copy does not zero it."""
    monkeypatch.setattr(stream, "CHUNK", 256 << 10)
    monkeypatch.setattr(stream, "WINDOW", 1 << 20)
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    _qcow2(base, "write -P 0x11 0 32M", "write -z 0 16M")
    _qcow2(top, backing=base)
    await _add_qcow2(env, "base", base)
    await _add_qcow2(env, "top", top, counting="topf", backing="base")
    _node(env, "topf").delay = 0.02  # each metadata write of the zeroing waits
    # 4 MiB/s: the pause lands a chunk or two past the first progress, not
    # (as it did now and then without a limit, once the zeroing ran faster
    # than the polling) after the plan's whole 16 MiB; lifted after the resume
    await env.qmp("block-stream", job_id="j", device="top", speed=4 * MiB)
    with trio.fail_after(10):
        while not (await env.qmp("query-block-jobs"))[0]["offset"]:  # noqa: ASYNC110 - polled
            await trio.sleep(0.005)
    await env.qmp("job-pause", id="j")
    await env.wait_event("JOB_STATUS_CHANGE", status="paused")
    [bj] = await env.qmp("query-block-jobs")
    # the write lands ahead of the copy, inside the planned zeroes (where
    # the pause found the job depends on the machine's load)
    at = -(-bj["offset"] // 65536) * 65536 + MiB
    assert 0 < bj["offset"] and at + 65536 <= 16 * MiB
    await _node(env, "top").write(at, b"\x5a" * 65536)
    await env.qmp("block-job-set-speed", device="j", speed=0)
    await env.qmp("job-resume", id="j")
    await _done(env)
    await env.graph.close_all()
    qemu_img("check", "-q", str(top))
    want = bytearray(SIZE)
    want[16 * MiB:] = b"\x11" * (16 * MiB)
    want[at:at + 65536] = b"\x5a" * 65536
    (tmp_path / "want.raw").write_bytes(want)
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(tmp_path / "want.raw"), str(top))


async def test_stream_pause_waits_for_chunks_in_flight_then_cancel(env, stream_chain):
    base, top, model = stream_chain
    await _add_qcow2(env, "base", base, counting="basef")
    await _add_qcow2(env, "top", top, counting="topf", backing="base")
    _node(env, "basef").delay = _node(env, "topf").delay = 0.02
    await env.qmp("block-stream", job_id="j", device="top")
    await trio.sleep(0.05)
    await env.qmp("job-pause", id="j")
    await env.wait_event("JOB_STATUS_CHANGE", status="paused")
    # paused: none of the job's requests is in flight
    assert _node(env, "topf").now == 0 and _node(env, "basef").now == 0
    [bj] = await env.qmp("query-block-jobs")
    assert 0 < bj["offset"] < SIZE
    await env.qmp("job-cancel", id="j")
    ev = await env.wait_event("BLOCK_JOB_CANCELLED")
    assert ev["offset"] < SIZE
    await _settled(env)
    await env.graph.close_all()
    qemu_img("check", "-q", str(top))
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(model), str(top))


# -- commit (an intermediate layer) ----------------------------------------------------------
@pytest.fixture
def commit_chain(tmp_path):
    """base: a little data; mid: data 4M..28M with a zero cluster at 10M;
    top: data of its own."""
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    _qcow2(base, "write -P 0x01 0 4M")
    _qcow2(mid, "write -P 0x02 4M 24M", "write -z 10M 1M", backing=base)
    _qcow2(top, "write -P 0x03 0 1M", backing=mid)
    return base, mid, top, _model(top, tmp_path), _model(mid, tmp_path, "mid.raw")


async def _commit_nodes(env, base, mid, top, **base_file):
    await env.graph.add({"driver": "qcow2", "node-name": "base", "file": {
        "driver": "x-test-counting", "node-name": "basef", **base_file,
        "file": {"driver": "file", "filename": str(base)}}})
    await _add_qcow2(env, "mid", mid, counting="midf", backing="base")
    await _add_qcow2(env, "top", top, backing="mid")


async def test_commit_keeps_chunks_in_flight_and_skips_holes(env, commit_chain):
    base, mid, top, model, mid_model = commit_chain
    await _commit_nodes(env, base, mid, top)
    _node(env, "midf").biggest = 0  # opening read up to 2 MiB of header
    await env.qmp("block-commit", job_id="j", device="top", top_node="mid", base_node="base")
    await _done(env)
    basef, midf = _node(env, "basef"), _node(env, "midf")
    assert basef.most > 1 and midf.most > 1
    assert midf.biggest <= commit.CHUNK
    # what mid allocates, no more: 23 MiB of data (the zero cluster is a
    # zero write), plus a little metadata
    assert 23 * MiB <= basef.data_written < 24 * MiB
    await env.graph.close_all()
    for img in (base, top):
        qemu_img("check", "-q", str(img))
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(model), str(top))
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(mid_model), str(base))
    assert not _data_in(base, 28 * MiB, SIZE)


@pytest.mark.parametrize("case", ["enospc-stop", "enospc-report", "ignore"])
async def test_commit_error_policies(env, commit_chain, case):
    base, mid, top, model, mid_model = commit_chain
    enospc = case.startswith("enospc")
    policy = "enospc" if enospc else "ignore"
    await _commit_nodes(env, base, mid, top, **{
        "fail-at": 9 * MiB, "fail-writes": 1, "enospc": case == "enospc-stop"})
    await env.qmp("block-commit", job_id="j", device="top", top_node="mid", base_node="base",
                  on_error=policy)
    if case == "enospc-report":
        ev = await env.wait_event("BLOCK_JOB_COMPLETED")
        assert ev["error"] == "Input/output error"
        await _settled(env)
        action = "report"
    else:
        if case == "enospc-stop":
            await env.wait_event("JOB_STATUS_CHANGE", status="paused")
            [bj] = await env.qmp("query-block-jobs")
            assert bj["io-status"] == "nospace"
            await env.qmp("job-resume", id="j")
            action = "stop"
        else:
            action = "ignore"
        await _done(env)
    errors = [d for n, d in env.log if n == "BLOCK_JOB_ERROR"]
    # a write failed: the target's policy side (QEMU's error_in_source false)
    assert errors == [{"device": "j", "operation": "write", "action": action}]
    await env.graph.close_all()
    qemu_img("check", "-q", str(base))
    qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(model), str(top))
    if case != "enospc-report":
        qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", str(mid_model), str(base))


# -- mirror --------------------------------------------------------------------------
@pytest.fixture
def raw_pair(tmp_path):
    """A raw source with 20 MiB of data, then a hole; an empty raw target."""
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    _raw(src, "write -P 0x5a 0 20M")
    _raw(dst)
    return src, dst


@pytest.mark.parametrize("buf_size, biggest", [(0, MiB), (2 * MiB, MiB), (64 * MiB, 4 * MiB)])
async def test_mirror_requests_in_flight_size_and_status(env, raw_pair, buf_size, biggest):
    src, dst = raw_pair
    await _add_raw(env, "src", src)
    await _add_raw(env, "dst", dst)
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full",
                  granularity=64 << 10, buf_size=buf_size)
    await env.wait_event("BLOCK_JOB_READY")
    [job] = env.jobs.values()
    await env.qmp("job-complete", id="j")
    await _done(env)
    s, d = _node(env, "src"), _node(env, "dst")
    # contiguous dirty chunks merged into requests of max(buf-size/16, 1 MiB)
    assert d.biggest == biggest
    # at most 16 operations, at most buf-size of copies, in flight
    assert 1 < job.max_in_flight <= 16 and d.most <= 16
    assert d.most_write_bytes <= (buf_size or 16 * MiB)
    # the hole is a zero write, not data
    assert d.data_written == 20 * MiB and d.zeroes_written == 12 * MiB
    # one block status answer serves the whole data extent; the hole is
    # asked about once per operation, as QEMU does (20 queries before)
    assert s.status_calls <= 1 + -(-12 * MiB // (buf_size or 16 * MiB))
    await env.graph.close_all()
    qemu_img("compare", "-q", "-f", "raw", "-F", "raw", str(src), str(dst))


async def test_mirror_status_answer_forgotten_after_a_source_write(env, raw_pair):
    """A known data extent is asked about again once the source is written
    there (a discard may have made a hole of it)."""
    src, dst = raw_pair
    await _add_raw(env, "src", src)
    await _add_raw(env, "dst", dst)
    await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full")
    await env.wait_event("BLOCK_JOB_READY")
    [job] = env.jobs.values()
    s = _node(env, "src")
    calls = s.status_calls
    filt = job.filter
    # the guest goes through the filter: punch a hole where data was
    await filt.discard(2 * MiB, MiB)
    await filt.write_zeroes(4 * MiB, MiB, may_unmap=True)
    await filt.write(6 * MiB, b"\x77" * 4096)
    for _ in range(50):
        if job.bitmap.count() == 0 and job.in_flight == 0:
            break
        await trio.sleep(0.11)
    assert s.status_calls > calls
    await env.qmp("job-complete", id="j")
    await _done(env)
    await env.graph.close_all()
    qemu_img("compare", "-q", "-f", "raw", "-F", "raw", str(src), str(dst))


# -- backup --------------------------------------------------------------------------
@pytest.mark.parametrize("workers, chunk", [(None, None), (4, None), (8, 256 << 10)])
async def test_backup_workers_chunk_and_holes(env, raw_pair, workers, chunk):
    src, dst = raw_pair
    await _add_raw(env, "src", src)
    await _add_raw(env, "dst", dst)
    perf = {k: v for k, v in (("max-workers", workers), ("max-chunk", chunk)) if v is not None}
    await env.qmp("blockdev-backup", job_id="j", device="src", target="dst", sync="full",
                  x_perf=perf)
    await _done(env)
    s, d = _node(env, "src"), _node(env, "dst")
    assert 1 < d.most <= (workers or 64) and 1 < s.most <= (workers or 64)
    if workers is None:
        # many tasks at once (20 read data); how many overlap depends on
        # how fast the file answers: 7 on a loaded machine, up to 20 idle
        assert s.most > 4
    assert d.biggest == (chunk or MiB)
    assert d.data_written == 20 * MiB and d.zeroes_written == 12 * MiB
    await env.graph.close_all()
    qemu_img("compare", "-q", "-f", "raw", "-F", "raw", str(src), str(dst))


# -- every copy job --------------------------------------------------------------------
@pytest.mark.parametrize("job", ["mirror", "backup", "stream", "commit"])
async def test_job_reads_are_bulk_requests(env, raw_pair, stream_chain, commit_chain, job):
    """A job's reads reach the nodes below as bulk requests (the file
    driver reads their large runs of cached data on its workers); a read
    from outside any job, as an export's, does not."""
    if job in ("mirror", "backup"):
        src, dst = raw_pair
        await _add_raw(env, "src", src)
        await _add_raw(env, "dst", dst)
        counted = _node(env, "src")
    elif job == "stream":
        base, top, _ = stream_chain
        await _add_qcow2(env, "base", base, counting="basef")
        await _add_qcow2(env, "top", top, backing="base")
        counted = _node(env, "basef")
    else:
        base, mid, top, _, _ = commit_chain
        await _commit_nodes(env, base, mid, top)
        counted = _node(env, "midf")
    # opening a qcow2 reads its header: not a bulk request
    plain = counted.plain_reads
    if job == "mirror":
        await env.qmp("blockdev-mirror", job_id="j", device="src", target="dst", sync="full")
        await env.wait_event("BLOCK_JOB_READY")
        await env.qmp("job-complete", id="j")
    elif job == "backup":
        await env.qmp("blockdev-backup", job_id="j", device="src", target="dst", sync="full")
    elif job == "stream":
        await env.qmp("block-stream", job_id="j", device="top")
    else:
        await env.qmp("block-commit", job_id="j", device="top", top_node="mid",
                      base_node="base")
    await _done(env)
    assert counted.bulk_reads > 0 and counted.plain_reads == plain
    await counted.read(0, 65536)
    assert counted.plain_reads == plain + 1
    await env.graph.close_all()
