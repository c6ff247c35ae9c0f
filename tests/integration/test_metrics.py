"""--metrics: /metrics over HTTP, scraped with urllib and parsed with
prometheus_client's parser, checked against a known workload."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import run_cli

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.headers["Content-Type"], r.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _node(samples, name, node, op):
    return samples[(name, (("node", node), ("op", op)))]


@pytest.fixture
def metrics_daemon(daemon_factory, tmp_path):
    img, dst = tmp_path / "img.raw", tmp_path / "dst.raw"
    for p in (img, dst):
        p.write_bytes(b"")
        os.truncate(p, 8 * MiB)
    sock, port = tmp_path / "nbd.sock", _free_port()
    d = daemon_factory("trio", [
        "--blockdev", f"driver=file,node-name=disk,filename={img}",
        "--blockdev", f"driver=file,node-name=dst,filename={dst}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
        "--metrics", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"])
    return d, port, f"nbd+unix:///disk?socket={sock}"


def test_write_bytes_follow_a_known_workload(metrics_daemon):
    d, port, uri = metrics_daemon
    ctype, text = _scrape(port)
    assert ctype.startswith("text/plain")
    before = _samples(text)
    assert _node(before, "qsd_node_bytes_total", "disk", "write") == 0

    # 3 writes of 64 KiB and one read of 128 KiB through NBD; the read
    # covers written data only (a structured read of a hole reads nothing
    # from the node, in QEMU's server as in ours)
    cmds = ["-c", "write -P 1 0 64k", "-c", "write -P 2 64k 64k", "-c", "write -P 3 2M 64k",
            "-c", "read 0 128k", "-c", "flush"]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], check=True, capture_output=True)

    after = _samples(_scrape(port)[1])
    assert _node(after, "qsd_node_bytes_total", "disk", "write") == 3 * 65536
    assert _node(after, "qsd_node_operations_total", "disk", "write") == 3
    assert _node(after, "qsd_node_bytes_total", "disk", "read") == 131072
    assert _node(after, "qsd_node_operations_total", "disk", "read") == 1
    assert _node(after, "qsd_node_operations_total", "disk", "flush") >= 1
    assert _node(after, "qsd_node_errors_total", "disk", "write") == 0
    assert _node(after, "qsd_node_bytes_total", "dst", "write") == 0
    # every request timed: one histogram count per operation
    for op, n in (("read", 1), ("write", 3)):
        key = ("qsd_node_latency_seconds_count", (("node", "disk"), ("op", op)))
        assert after[key] == n
        assert after[("qsd_node_latency_seconds_sum", (("node", "disk"), ("op", op)))] > 0
    inf = ("qsd_node_latency_seconds_bucket", (("le", "+Inf"), ("node", "disk"), ("op", "write")))
    assert after[inf] == 3
    # the same counters as x-query-node-stats; query-blockstats keeps
    # QEMU's zeros for nodes (QEMU counts in BlockBackends only)
    q = d.qmp()
    stats = {s["node-name"]: s["stats"] for s in q.cmd_raw("x-query-node-stats")["return"]}
    assert stats["disk"]["wr_bytes"] == 3 * 65536
    assert stats["disk"]["rd_operations"] == 1
    assert sum(stats["disk"]["wr_latency_histogram"]["bins"]) == 3
    assert stats["disk"]["wr_total_time_ns"] > 0
    stats = {s["node-name"]: s["stats"] for s in
             q.cmd_raw("query-blockstats", {"query-nodes": True})["return"]}
    assert stats["disk"]["wr_bytes"] == 0 and stats["disk"]["wr_highest_offset"] == 2 * MiB + 65536
    q.close()

    ops = {op: after[("qsd_export_bytes_total", (("export", "e0"), ("op", op), ("type", "nbd")))]
           for op in ("read", "write")}
    assert ops == {"read": 131072, "write": 3 * 65536}
    labels = (("export", "e0"), ("node", "disk"), ("type", "nbd"))
    assert after[("qsd_export_clients", labels)] == 0
    assert after[("qsd_export_requests_in_flight", labels)] == 0
    assert after[("process_resident_memory_bytes", ())] > 0
    assert after[("process_open_fds", ())] > 0
    assert after[("qsd_tasks", ())] > 0


def test_clients_and_jobs(metrics_daemon):
    d, port, uri = metrics_daemon
    q = d.qmp()
    assert q.cmd_raw("blockdev-mirror", {"job-id": "m1", "device": "disk", "target": "dst",
                                         "sync": "full", "speed": 1}) == {"return": {}}
    client = subprocess.Popen(["qemu-io", "-r", "-f", "raw", uri], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            s = _samples(_scrape(port)[1])
            # the export's node label is the mirror's filter node now, the
            # node query-block-exports names while the job runs
            clients = [v for (name, labels), v in s.items()
                       if name == "qsd_export_clients" and ("export", "e0") in labels]
            assert len(clients) == 1
            if clients == [1]:
                break
        else:
            raise AssertionError("the client never showed")
        job = (("job", "m1"), ("type", "mirror"))
        assert s[("qsd_job_total_bytes", job)] == 8 * MiB
        assert s[("qsd_job_speed_bytes", job)] == 1
        # an all-zero source is mirrored at once (the rate limit delays
        # what comes after a chunk): the job may already be ready
        states = {dict(labels)["state"]: v for (name, labels), v in s.items()
                  if name == "qsd_job_state"}
        assert len(states) == 1 and set(states.values()) == {1}
        assert next(iter(states)) in ("running", "ready")
        assert s[("qsd_job_progress_bytes", job)] <= 8 * MiB
    finally:
        client.stdin.close()
        client.wait(timeout=30)
        q.cmd_raw("block-job-cancel", {"device": "m1", "force": True})


def test_openmetrics_http_errors_and_keepalive(metrics_daemon):
    _, port, _ = metrics_daemon
    ctype, text = _scrape(port, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=30)
    assert ei.value.code == 404
    ei.value.close()
    # two requests on one connection
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.count(b"HTTP/1.1 200") == 2 and data.endswith(b"\n"):
                break
        assert data.count(b"HTTP/1.1 200") == 2


def test_bad_option():
    r = run_cli("trio", ["--metrics", "addr.type=inet,addr.host=127.0.0.1"])
    assert r.returncode == 1
    assert "Parameter 'addr.port' is missing" in r.stderr
    r = run_cli("trio", ["--metrics", "port=9"])
    assert r.returncode == 1 and "Parameter 'port' is unexpected" in r.stderr


async def test_vhost_user_front_end_counts_as_a_client(daemon_factory, tmp_path):
    """A vhost-user-blk front-end is the export's client while it is
    connected, and its requests' bytes count (an in-test front-end, as
    tests/integration/test_vhost_user_export.py drives it)."""
    import trio

    from tests.integration.test_vhost_user_export import (
        T_IN,
        Driver,
        FrontEnd,
        GuestRam,
        complete,
        outhdr,
    )

    img, sock, port = tmp_path / "vu.raw", tmp_path / "vu.sock", _free_port()
    img.write_bytes(b"")
    os.truncate(img, 8 * MiB)
    daemon_factory("trio", [
        "--blockdev", f"file,node-name=f0,filename={img}",
        "--export", f"vhost-user-blk,id=vu0,node-name=f0,addr.type=unix,addr.path={sock}",
        "--metrics", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"])

    async def scrape() -> dict:
        s = _samples((await trio.to_thread.run_sync(_scrape, port))[1])
        labels = (("export", "vu0"), ("node", "f0"), ("type", "vhost-user-blk"))
        reads = ("qsd_export_bytes_total",
                 (("export", "vu0"), ("op", "read"), ("type", "vhost-user-blk")))
        return {"clients": s[("qsd_export_clients", labels)], "read": s[reads]}

    assert await scrape() == {"clients": 0, "read": 0}
    ram = GuestRam(size=0x40000)
    fe = await FrontEnd.connect(sock)
    try:
        await fe.negotiate()
        await fe.set_mem_table(ram)
        drv = Driver(ram, size=8)
        kick, call = await fe.start_queue(drv)
        await complete(drv, kick, call, [(outhdr(T_IN, 0), False), (4096, True), (1, True)])
        assert await scrape() == {"clients": 1, "read": 4096}
    finally:
        fe.close()
        ram.close()
    with trio.fail_after(10):
        while (await scrape())["clients"]:  # noqa: ASYNC110 - polling the endpoint is the test
            await trio.sleep(0.05)
