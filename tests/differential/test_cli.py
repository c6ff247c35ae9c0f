"""Command-line errors: the same text and exit status as qemu-storage-daemon.

Normalised: the program name prefix (each daemon names itself)."""

from __future__ import annotations

import pytest

from tests.helpers import HAVE_QEMU, normalise_prog, run_cli

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

CASES = [
    ["--bogus"],
    ["foo"],
    ["--blockdev"],
    ["-x"],
    ["--blockdev", "driver=foo"],
    ["--blockdev", "null-co"],
    ["--blockdev", "driver=null-co,node-name=n,size=abc"],
    ["--blockdev", "driver=null-co,node-name=n,bogus=1"],
    ["--blockdev", "driver=null-co,node-name=n", "--blockdev", "driver=null-co,node-name=n"],
    ["--blockdev", '{"driver": "null-co", "node-name": "n", "size": "x"}'],
    ["--blockdev", "driver=null-co,node-name=n,read-only=maybe"],
    ["--chardev", "socket,id=c"],
    ["--chardev", "bogus,id=c"],
    ["--monitor", "chardev=nope"],
    ["--chardev", "null,id=c", "--monitor", "c,mode=readline"],
    ["--object", "iothread,id=bad id"],
    ["--object", "bogus,id=x"],
    ["--object", "iothread,id=io0", "--object", "iothread,id=io0"],
    ["--export", "nbd,id=e,node-name=n"],
    ["--pidfile", "/nonexistent-dir/x.pid"],
    # the NBD server's TLS object, looked up as QEMU's users do, after the
    # socket is bound: a bad address is reported first
    ["--nbd-server", "addr.type=unix,addr.path=/nonexistent-dir/s.sock,tls-creds=t"],
    ["--nbd-server", "addr.type=unix,addr.path=/tmp/qsd-test-cli-tls.sock,tls-creds=t"],
    ["--object", "iothread,id=t", "--nbd-server",
     "addr.type=unix,addr.path=/tmp/qsd-test-cli-tls.sock,tls-creds=t"],
    ["--object", "tls-cipher-suites,id=t,priority=NORMAL", "--nbd-server",
     "addr.type=unix,addr.path=/tmp/qsd-test-cli-tls.sock,tls-creds=t"],
    ["--object", "tls-creds-anon,id=t,endpoint=client", "--nbd-server",
     "addr.type=unix,addr.path=/tmp/qsd-test-cli-tls.sock,tls-creds=t"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_cli_errors_match(args):
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))
    assert "Traceback" not in ours.stderr


def test_object_help_lists_creatable_types():
    ours = run_cli("trio", ["--object", "help"])
    assert ours.returncode == 0
    assert ours.stdout.startswith("List of user creatable objects:\n")
    theirs = run_cli("qemu", ["--object", "help"])
    # we list every type qemu-storage-daemon lists
    assert set(theirs.stdout.split()) <= set(ours.stdout.split())


def test_object_type_help_lists_properties():
    ours = run_cli("trio", ["--object", "iothread,help"])
    theirs = run_cli("qemu", ["--object", "iothread,help"])
    assert ours.returncode == theirs.returncode == 0
    names = {line.split("=")[0].strip() for line in ours.stdout.splitlines()[1:]}
    want = {line.split("=")[0].strip() for line in theirs.stdout.splitlines()[1:]}
    assert names == want


def test_help_and_version():
    h = run_cli("trio", ["--help"])
    assert h.returncode == 0 and h.stdout.startswith("Usage: qsd-trio [options]")
    for opt in ("--blockdev", "--chardev", "--daemonize", "--export", "--monitor",
                "--nbd-server", "--object", "--pidfile", "--trace", "--version"):
        assert opt in h.stdout
    v = run_cli("trio", ["-V"])
    assert v.returncode == 0 and v.stdout.startswith("qsd-trio version 7.2.0")


@pytest.mark.parametrize("export", ["nbd,id=e,node-name=n,writable=on",
                                    "fuse,id=e,node-name=n,writable=on,mountpoint=MP"])
def test_writable_export_of_read_only_node(tmp_path, export):
    mp = tmp_path / "mp"
    mp.write_bytes(b"")
    args = ["--blockdev", "null-co,node-name=n,read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd.sock",
            "--export", export.replace("MP", str(mp))]
    theirs, ours = run_cli("qemu", args), run_cli("trio", args)
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))
    assert "Cannot export read-only node as writable" in ours.stderr
