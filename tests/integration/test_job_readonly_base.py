"""block-commit and block-stream reopen a read-only image read-write for the
job and read-only again after it, as QEMU does; the same scenario on both
daemons gives the same replies, the same ro flags and the same data."""

import pytest

from tests.helpers import qemu_img, qemu_io


def chain(tmp_path, kind):
    base, mid, top = (tmp_path / f"{kind}-{n}.qcow2" for n in ("base", "mid", "top"))
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", str(base))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 1M 1M", str(mid))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 2M 1M", str(top))
    return base, mid, top


def ro_flags(qmp):
    return {n["node-name"]: n["ro"] for n in qmp.cmd_raw("query-named-block-nodes")["return"]
            if not n["node-name"].startswith("#")}


def wait_concluded(qmp, job) -> list:
    events = []
    while True:
        ev = qmp.pull_event(wait=30.0)
        assert ev is not None, events
        events.append((ev["event"], ev.get("data")))
        if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"id": job,
                                                                  "status": "concluded"}:
            return events


def ro_by_file(qmp) -> dict:
    return {n["file"].rsplit("/", 1)[-1].split("-", 1)[-1]: n["ro"]
            for n in qmp.cmd_raw("query-named-block-nodes")["return"] if n["drv"] == "qcow2"}


def qcow2_node(qmp, path) -> str:
    return next(n["node-name"] for n in qmp.cmd_raw("query-named-block-nodes")["return"]
                if n["drv"] == "qcow2" and n["file"] == str(path))


@pytest.mark.parametrize("command", ["block-commit", "block-stream"])
def test_job_reopens_implicit_backing_read_write(daemon_factory, tmp_path, command):
    """Backing files opened from the image header are read-only; a job that
    writes one reopens it read-write, and read-only again afterwards."""
    seen = {}
    for kind in ("qemu", "trio"):
        base, mid, top = chain(tmp_path, kind)
        d = daemon_factory(kind, ["--blockdev", f"driver=file,node-name=ft,filename={top}",
                                  "--blockdev", "driver=qcow2,node-name=top,file=ft"])
        qmp = d.qmp()
        before = ro_by_file(qmp)
        if command == "block-commit":
            args = {"job-id": "j", "device": "top", "top": str(mid), "base": str(base)}
        else:
            args = {"job-id": "j", "device": qcow2_node(qmp, mid), "base": str(base)}
        reply = qmp.cmd_raw(command, args)
        assert reply == {"return": {}}, (kind, reply)
        events = [e for e in wait_concluded(qmp, "j") if e[0] == "JOB_STATUS_CHANGE"]
        after = ro_by_file(qmp)
        d.stop()
        seen[kind] = (before, events, after)
        for img in (base, mid, top):
            assert qemu_img("check", str(img)).returncode == 0
        # the guest view of the top image is unchanged by either job
        r = qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
                    "-c", "read -P 0x33 2M 1M", "-c", "read -P 0 3M 1M", str(top))
        assert "Pattern verification failed" not in r.stdout
    assert seen["trio"] == seen["qemu"]
    before, _, after = seen["trio"]
    assert before["base.qcow2"] is True and after["base.qcow2"] is True


def test_user_read_only_node_is_not_reopened(daemon_factory, tmp_path):
    """A node the user opened with read-only=on stays so: the job is refused."""
    replies = {}
    for kind in ("qemu", "trio"):
        base, mid, top = chain(tmp_path, kind)
        d = daemon_factory(kind, [
            "--blockdev", f"driver=file,node-name=fb,filename={base},read-only=on",
            "--blockdev", "driver=qcow2,node-name=base,file=fb,read-only=on",
            "--blockdev", f"driver=file,node-name=fm,filename={mid},read-only=on",
            "--blockdev", "driver=qcow2,node-name=mid,file=fm,backing=base,read-only=on",
            "--blockdev", f"driver=file,node-name=ft,filename={top}",
            "--blockdev", "driver=qcow2,node-name=top,file=ft,backing=mid"])
        qmp = d.qmp()
        replies[kind] = [
            qmp.cmd_raw("block-commit", {"job-id": "j", "device": "top", "top-node": "mid",
                                         "base-node": "base"}),
            qmp.cmd_raw("block-stream", {"job-id": "j", "device": "mid", "base-node": "base"}),
            ro_flags(qmp)]
    assert replies["trio"] == replies["qemu"]
    assert replies["trio"][0] == {"error": {"class": "GenericError",
                                            "desc": "Block node is read-only"}}


@pytest.mark.parametrize("command", ["block-commit", "block-stream"])
def test_users_read_only_node_over_inheriting_children_is_reopened(daemon_factory, tmp_path,
                                                                   command):
    """A node the user opened read-only=on is reopened read-write for the job
    when the nodes below it inherit that (no read-only=on of their own):
    QEMU's reopen sets read-only=off on the node itself, and only a child's
    own read-only=on refuses."""
    seen = {}
    for kind in ("qemu", "trio"):
        base, mid, top = chain(tmp_path, kind)
        d = daemon_factory(kind, [
            "--blockdev", f"driver=qcow2,node-name=base,file.driver=file,"
                          f"file.filename={base},read-only=on",
            "--blockdev", f"driver=qcow2,node-name=mid,file.driver=file,"
                          f"file.filename={mid},backing=base,read-only=on",
            "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,"
                          f"file.filename={top},backing=mid"])
        qmp = d.qmp()
        if command == "block-commit":
            args = {"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base"}
        else:
            args = {"job-id": "j", "device": "mid", "base-node": "base"}
        reply = qmp.cmd_raw(command, args)
        events = ([e for e in wait_concluded(qmp, "j") if e[0] == "JOB_STATUS_CHANGE"]
                  if reply == {"return": {}} else [])
        seen[kind] = (reply, events, ro_flags(qmp))
        d.stop()
        for img in (base, mid, top):
            assert qemu_img("check", str(img)).returncode == 0
        r = qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M",
                    "-c", "read -P 0x33 2M 1M", str(top))
        assert "Pattern verification failed" not in r.stdout
    assert seen["qemu"][0] == {"return": {}}
    assert seen["trio"] == seen["qemu"]
