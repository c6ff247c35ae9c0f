"""Sizes on the command line and over QMP, against qemu-storage-daemon.

Three ways a size reaches QEMU, each with its own errors:

* a QAPI ``size`` member: keyval text goes through qemu_strtosz (suffixes,
  hex, fractions with a suffix; "expects size"), JSON through the uint64
  visitor (a negative int64 wraps; "expects uint64");
* a QAPI ``int`` member that the block driver reads again through QemuOpts
  as QEMU_OPT_SIZE (null-co ``size``, raw ``offset``/``size``, the qcow2
  cache sizes, blkdebug's limits): a negative number is refused with
  "Parameter 'size' expects a non-negative number below 2^64";
* a QemuOpts size (``--chardev ringbuf,size=``), with its out-of-range text.

Text sizes in hex with a suffix are still taken, with a deprecation warning.

Normalised: the program name only.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import HAVE_QEMU, Daemon, normalise_prog, qemu_img, run_cli

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

DUP = ["--blockdev", "driver=null-co,node-name=a"]  # ends a run that got this far


def _vub(extra: str) -> list[str]:
    return ["--blockdev", "driver=null-co,node-name=n", "--export",
            "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/nonexistent/vu,"
            + extra + ",num-queues=-1"]


def _vub_json(lbs) -> list[str]:
    return ["--blockdev", "driver=null-co,node-name=n", "--export", json.dumps(
        {"type": "vhost-user-blk", "id": "e", "node-name": "n",
         "addr": {"type": "unix", "path": "/nonexistent/vu"},
         "logical-block-size": lbs, "num-queues": -1})]


def cases(tmp) -> list[list[str]]:
    raw, qcow2 = f"{tmp}/r.img", f"{tmp}/q.qcow2"
    f_raw = f"file.driver=file,file.filename={raw}"
    f_q = f"file.driver=file,file.filename={qcow2}"
    out = []
    # int members read again as QEMU_OPT_SIZE by the driver
    for opt in (f"driver=raw,node-name=a,{f_raw},offset=-1",
                f"driver=raw,node-name=a,{f_raw},size=-1",
                f"driver=raw,node-name=a,{f_raw},offset=-1,size=-1",
                f"driver=raw,node-name=a,file.driver=file,file.filename={tmp}/none,offset=-1",
                json.dumps({"driver": "raw", "node-name": "a", "size": -512,
                            "file": {"driver": "file", "filename": raw}}),
                f"driver=qcow2,node-name=a,{f_q},l2-cache-size=-1",
                f"driver=qcow2,node-name=a,{f_q},refcount-cache-size=-1",
                f"driver=qcow2,node-name=a,{f_q},cache-size=-1",
                f"driver=qcow2,node-name=a,{f_q},l2-cache-entry-size=-1",
                f"driver=qcow2,node-name=a,{f_raw},l2-cache-size=-1",  # not qcow2: that first
                "driver=blkdebug,node-name=a,image.driver=null-co,align=-1",
                "driver=blkdebug,node-name=a,image.driver=null-co,max-transfer=-1",
                "driver=blkdebug,node-name=a,image.driver=null-co,opt-write-zero=-1",
                "driver=blkdebug,node-name=a,image.driver=null-co,max-write-zero=-1",
                "driver=blkdebug,node-name=a,image.driver=null-co,opt-discard=-1",
                "driver=blkdebug,node-name=a,image.driver=null-co,max-discard=-1",
                f"driver=blkdebug,node-name=a,image.driver=file,image.filename={tmp}/none,align=-1",
                "driver=null-co,node-name=a,latency-ns=-1"):
        out.append(["--blockdev", opt] + DUP)
    # the int itself: what keyval's strtoll takes, and the largest image
    for v in ("18446744073709551615", "18446744073709551616", "-9223372036854775809",
              "1k", "1.5", "", "0x200", " 512", "+512", "-0", "010", "08", "1e3",
              "9223372035781033984", "9223372035781033985", "9223372036854775807"):
        out.append(["--blockdev", f"driver=null-co,node-name=a,size={v}"] + DUP)
    for v in (1.5, 2**64, "1k"):
        out.append(["--blockdev", json.dumps({"driver": "null-co", "node-name": "a",
                                              "size": v})] + DUP)
    # a QAPI 'size' member, keyval and JSON
    for v in ("-1", "1k", "0x200", "1.5", "1.5k", "16E", "", "512", "1e3", "0x1.8", "0x1k"):
        out.append(_vub(f"logical-block-size={v}"))
    for v in (-1, 1.5, 2**64, 2**64 - 1, "512"):
        out.append(_vub_json(v))
    # a QemuOpts size
    for v in ("-1", "16E", "1x", "", "18446744073709551616", "1.5k", "64k", "0x10k", "0x1M"):
        out.append(["--chardev", f"ringbuf,id=r,size={v}", "--chardev", "null,id=r"])
    # a hex number with a suffix is taken with a warning, printed when the
    # option takes effect: not for an option after the one that fails
    out.append(["--chardev", "ringbuf,id=r,size=0x10k", "--chardev", "null,id=r",
                "--chardev", "ringbuf,id=r2,size=0x1M"])
    out.append(["--chardev", "ringbuf,id=r,size=0x10k", "--chardev", "ringbuf,id=r2,size=0x1.5M"])
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sizes")
    qemu_img("create", "-f", "raw", str(tmp / "r.img"), "1M")
    qemu_img("create", "-f", "qcow2", str(tmp / "q.qcow2"), "1M")
    return tmp


N_CASES = len(cases("T"))


@pytest.mark.parametrize("n", range(N_CASES), ids=[" ".join(c) for c in cases("T")])
def test_size_errors_match(images, n):
    args = cases(images)[n]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))


@pytest.mark.parametrize("opt", ["driver=null-co,node-name=a,size=-1",
                                 '{"driver": "null-co", "node-name": "a", "size": -1}',
                                 "driver=null-aio,node-name=a,size=-9223372036854775808"])
def test_negative_null_size_is_refused(opt):
    """QEMU 7.2 reads null-co's options with &error_abort: it prints the
    error and aborts.  We print the same error and exit 1."""
    theirs = run_cli("qemu", ["--blockdev", opt])
    ours = run_cli("trio", ["--blockdev", opt])
    assert theirs.returncode == -6  # SIGABRT
    want = normalise_prog(theirs.stderr).splitlines()
    assert want[0].startswith("Unexpected error in parse_option_size()")
    got = normalise_prog(ours.stderr).splitlines()
    assert ours.returncode == 1
    assert got[0] == want[1]
    assert "expects a non-negative number below 2^64" in got[0]


def _create_errors(kind: str, tmp, creates: list[dict]) -> list:
    d = Daemon(kind, tmp, ["--blockdev", f"driver=file,node-name=f,filename={tmp}/img-{kind}"])
    with d:
        q = d.qmp()
        out = []
        for n, opts in enumerate(creates):
            r = q.cmd_raw("blockdev-create", {"job-id": f"j{n}", "options": opts})
            if "error" in r:
                out.append(("refused", r["error"]))
                continue
            while True:
                ev = q.pull_event(wait=30)
                if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["status"] == "concluded":
                    break
            job = q.cmd("query-jobs")[0]
            assert job["id"] == f"j{n}"
            out.append(("job", job.get("error")))
            q.cmd("job-dismiss", id=f"j{n}")
        q.cmd("quit")
    return out


def test_blockdev_create_sizes(tmp_path):
    """A QAPI size over QMP: a negative int64 wraps to a uint64 that the
    driver then keeps as an int64 -- and must answer, not crash or hang."""
    big = 2**63 - 2**30  # BDRV_MAX_LENGTH
    creates = [{"driver": "file", "filename": str(tmp_path / "c.img"), "size": s}
               for s in (-1, 2**63, 2**64, "1k", 1.5)]
    creates += [{"driver": "qcow2", "file": "f", "size": s}
                for s in (-1, -512, 2**64 - 512, 2**62, 2**56, big, 1 << 20)]
    creates.append({"driver": "qcow2", "file": "f", "size": 1 << 20, "cluster-size": -1})
    (tmp_path / "img-qemu").touch()
    (tmp_path / "img-trio").touch()
    theirs = _create_errors("qemu", tmp_path, creates)
    ours = _create_errors("trio", tmp_path, creates)
    assert ours == theirs


def test_blockdev_add_sizes_over_qmp(daemon_factory, tmp_path):
    """The same checks for blockdev-add over QMP (no hint there).  Not
    null-co: qemu-storage-daemon 7.2 aborts on its negative size."""
    qemu_img("create", "-f", "raw", str(tmp_path / "r.img"), "1M")
    f = {"driver": "file", "filename": str(tmp_path / "r.img")}
    adds = [{"driver": "raw", "node-name": "a", "file": f, "offset": -1},
            {"driver": "raw", "node-name": "a", "file": f, "size": -512, "offset": -1},
            {"driver": "blkdebug", "node-name": "a", "image": {"driver": "null-co"},
             "max-discard": -1},
            {"driver": "null-co", "node-name": "a", "size": 2**63 - 1},
            {"driver": "null-co", "node-name": "a", "latency-ns": 2**63},
            {"driver": "null-co", "node-name": "a", "size": "1k"}]
    out = {}
    for kind in ("qemu", "trio"):
        q = daemon_factory(kind).qmp()
        out[kind] = [q.cmd_raw("blockdev-add", a).get("error") for a in adds]
        out[kind].append(q.cmd("query-named-block-nodes"))
    assert out["trio"] == out["qemu"]
    assert all(e is not None for e in out["trio"][:-1])
