"""Throttling through a running daemon, and the same QMP dialogue with both.

The timing check is a lower bound implied by the limit (the bucket admits
bps/10 before it throttles, and the last request is admitted as soon as the
level falls back to that): a workload can never finish faster than that,
whatever the machine.  It is run against qemu-storage-daemon too, which
shows the bound is the one QEMU's algorithm gives.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_io

KiB = 1024
MiB = 1 << 20
KINDS = ["trio"] + (["qemu"] if HAVE_QEMU else [])


@pytest.mark.parametrize("kind", KINDS)
def test_bps_limit_through_nbd(daemon_factory, tmp_path, kind):
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    sock = tmp_path / "nbd.sock"
    bps, req = 512 * KiB, 64 * KiB
    d = daemon_factory(kind, [
        "--object", f"throttle-group,id=tg0,x-bps-total={bps}",
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=t0,name=disk,writable=on",
    ])
    uri = f"nbd+unix:///disk?socket={sock}"
    start = time.monotonic()
    cmds = [a for off in range(0, MiB, req) for a in ("-c", f"write -P 0x6b {off} {req}")]
    qemu_io("-f", "raw", *cmds, uri)
    elapsed = time.monotonic() - start
    assert elapsed >= (MiB - bps / 10 - req) / bps
    # the data went through the filter to the file
    assert img.read_bytes() == b"\x6b" * MiB

    # lifting the limit applies at once (qom-set on the group's limits)
    qmp = d.qmp()
    assert qmp.cmd_raw("qom-set", {"path": "/objects/tg0", "property": "limits",
                                   "value": {"bps-total": 0}}) == {"return": {}}
    assert qmp.cmd_raw("qom-get", {"path": "/objects/tg0", "property": "x-bps-total"}) \
        == {"return": 0}
    r = qemu_io("-f", "raw", "-c", f"read -P 0x6b 0 {MiB}", uri)
    assert "read 1048576/1048576 bytes" in r.stdout


def _dialogue(kind, tmp_path):
    sub = tmp_path / kind
    sub.mkdir()
    img = sub / "a.raw"
    img.write_bytes(bytes(MiB))
    d = Daemon(kind, sub, ["--object", "throttle-group,id=cli0,x-bps-total=1000,"
                                       "x-iops-total=5"]).start()
    try:
        q = d.qmp()
        log = []

        def x(cmd, **args):
            r = q.cmd_raw(cmd, args)
            if cmd == "qom-list":  # QEMU lists properties in hash order
                r = sorted((p["name"], p["type"]) for p in r["return"])
            text = json.dumps(r, sort_keys=True).replace(str(sub), "T")
            log.append((cmd, json.dumps(args, sort_keys=True).replace(str(sub), "T"), re.sub(r"#block\d+", "#B", text)))

        tg = "throttle-group"
        x("qom-get", path="/objects/cli0", property="limits")
        x("qom-get", path="/objects/cli0", property="x-bps-total")
        x("qom-list", path="/objects/cli0")
        for limits in ({"bps-total": 1000, "bps-read": 5}, {"bps-total-max": 1000},
                       {"bps-total": 10, "bps-total-max": 5}, {"bps-total-max-length": 5},
                       {"bps-total-max-length": 0}, {"bps-total": -1}, {"iops-size": 4096},
                       {"bps-total": 10 ** 16},
                       {"bps-total": 10, "bps-total-max": 20, "bps-total-max-length": 2 ** 32},
                       {"bps-total": 10, "bps-total-max": 10 ** 14,
                        "bps-total-max-length": 100},
                       {"iops-read": 1, "iops-read-max": 10, "iops-read-max-length": -1},
                       {"bogus": 1}, 7):
            x("object-add", **{"qom-type": tg, "id": "tg0", "limits": limits})
        x("object-add", **{"qom-type": tg, "id": "tg0", "x-bps-total": -5})
        x("object-add", **{"qom-type": tg, "id": "tg0", "x-bps-write-max-length": 2 ** 32})
        x("object-add", **{"qom-type": tg, "id": "tg0", "x-iops-write-max": 3})
        x("object-add", **{"qom-type": tg, "id": "tg0", "limits": {"bps-total": 100},
                           "x-bps-total": 7})
        x("qom-get", path="/objects/tg0", property="limits")
        x("object-del", id="tg0")
        x("object-add", **{"qom-type": tg, "id": "tg0",
                           "limits": {"bps-total": 1000000, "iops-read": 100}})
        x("qom-get", path="/objects/tg0", property="x-iops-read")
        x("qom-set", path="/objects/tg0", property="x-iops-read", value=5)
        x("qom-set", path="/objects/tg0", property="limits", value={"iops-write": 7})
        x("qom-get", path="/objects/tg0", property="limits")
        x("qom-set", path="/objects/tg0", property="limits", value={"iops-total": 7})
        x("qom-set", path="/objects/tg0", property="limits", value={"bogus": 1})
        x("qom-set", path="/objects/tg0", property="limits", value=5)
        x("qom-set", path="/objects/tg0", property="nope", value=5)
        x("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"})
        x("blockdev-add", driver="throttle", **{"node-name": "t0", "throttle-group": "nope",
                                                "file": "f0"})
        x("blockdev-add", driver="throttle", **{"node-name": "t0", "file": "f0"})
        x("blockdev-add", driver="throttle", **{"node-name": "t0", "throttle-group": "tg0",
                                                "file": "f0"})
        x("blockdev-add", driver="throttle", **{"node-name": "t1", "throttle-group": "tg0",
                                                "file": {"driver": "file",
                                                         "filename": str(img),
                                                         "read-only": True},
                                                "read-only": True})
        x("object-del", id="tg0")
        nodes = q.cmd_raw("query-named-block-nodes")["return"]
        log.append(sorted(json.dumps([n["node-name"], n["drv"], n["file"], n["image"]],
                                     sort_keys=True).replace(str(sub), "T")
                          for n in nodes if n["drv"] == "throttle"))
        x("x-debug-query-block-graph")
        x("blockdev-del", **{"node-name": "t0"})
        x("object-del", id="tg0")
        x("blockdev-del", **{"node-name": "t1"})
        x("object-del", id="tg0")
        x("qom-list", path="/objects")
        return log
    finally:
        d.stop()


@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")
def test_same_dialogue_as_qemu(tmp_path):
    want = _dialogue("qemu", tmp_path)
    got = _dialogue("trio", tmp_path)
    for a, b in zip(want, got, strict=True):
        assert b == a


@pytest.mark.parametrize("opt", [
    "throttle-group,id=g,x-iops-total-max=5",
    "throttle-group,id=g,x-bps-read=5,x-bps-total=6",
    "throttle-group,id=g,x-bps-total=-1",
    "throttle-group,id=g,x-bps-total=abc",
])
@pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")
def test_cli_errors_as_qemu(opt):
    from tests.helpers import normalise_prog, run_cli
    want = run_cli("qemu", ["--object", opt])
    got = run_cli("trio", ["--object", opt])
    assert (got.returncode, normalise_prog(got.stderr)) == \
        (want.returncode, normalise_prog(want.stderr))


async def test_shutdown_lets_throttled_writes_land(daemon_factory, tmp_path):
    """quit while an NBD client has writes queued in a throttle group that
    would hold them for minutes: shutdown drains the filter first (as
    bdrv_drain_all_begin does), so every write is answered, lands, and the
    daemon exits long before the limit would have let them through."""
    import trio

    from qsd_trio.proto import nbd as P

    from .nbd_raw import RawClient

    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    sock = tmp_path / "nbd.sock"
    req, count = 64 * KiB, 8
    d = daemon_factory("trio", [
        "--object", "throttle-group,id=tg0,x-bps-write=4096",
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=t0,name=disk,writable=on",
    ])
    q = d.qmp()
    c = await RawClient.connect(str(sock))
    try:
        with trio.fail_after(20):
            await c.go("disk")
            for i in range(count):
                await c.request(P.CMD_WRITE, handle=i + 1, offset=i * req, length=req,
                                data=bytes([i + 1]) * req)
            # the first write fits the bucket; the others (2 min at 4 KiB/s) queue
            first = (await c.reply())[0]
            assert first.error == 0
            await trio.sleep(0.5)
            q.cmd_raw("quit")
            handles = {first.handle}
            for _ in range(count - 1):
                rep, _payload = await c.reply()
                assert rep.error == 0
                handles.add(rep.handle)
            assert handles == set(range(1, count + 1))
        assert d.wait(30) == 0
    finally:
        await c.s.aclose()
    data = img.read_bytes()
    assert data[:count * req] == b"".join(bytes([i + 1]) * req for i in range(count))
    assert data[count * req:] == bytes(MiB - count * req)
