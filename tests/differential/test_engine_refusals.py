"""When io_uring or Linux AIO cannot be set up, the node is refused with
qemu-storage-daemon's message (issue 11).

Both daemons run under the same seccomp filter (tests/seccomp_exec.py) that
makes io_uring_setup or io_setup fail with ENOSYS (a kernel without it) or
EPERM (a container profile that forbids it); the stderr text, the program
name prefix aside, and the exit status must be the same, and so must the
QMP error of a blockdev-add asking for the engine at run time.

The one thing normalised: qemu-storage-daemon 7.2's io_uring message ends
with the text of a stale errno, not io_uring_setup's (its luring_init hands
the global errno to error_setg_errno, while liburing returns -errno and
leaves errno alone).  On the command line here that is ENOENT ("No such file
or directory", left by a failed stat of /etc/gnutls/config at startup), over
QMP usually EINVAL, or none at all when errno happens to be 0 (a second
blockdev-add: QEMU then prints no ": ..." part), under strace ENOTCONN: it
depends on the machine and on what ran before, so
qsd-trio prints the errno io_uring_setup returned and the tests compare the
message up to it.  Linux AIO's message carries io_setup's real errno, on
both sides, and is compared whole.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import seccomp_exec
from tests.helpers import HAVE_QEMU, Daemon, command, normalise_prog

pytestmark = pytest.mark.skipif(not HAVE_QEMU or not seccomp_exec.available(),
                                reason="needs qemu-storage-daemon and x86_64 seccomp")

SECCOMP = [sys.executable, str(Path(seccomp_exec.__file__).resolve())]
_STALE = re.compile(r"(failed to init linux io_uring ring)(: [^\n]*)?")


def errno_dropped(value):
    """``value`` (text, or a QMP reply) with the io_uring message's errno
    text cut off (see the module docstring)."""
    if isinstance(value, str):
        return _STALE.sub(r"\1<: errno>", value)
    if isinstance(value, dict):
        return {k: errno_dropped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [errno_dropped(v) for v in value]
    return value

CASES = [  # the system call that fails, the node's options
    ("io_uring_setup", "aio=io_uring"),
    ("io_uring_setup", "aio=io_uring,cache.direct=on"),
    ("io_setup", "aio=native,cache.direct=on"),
]


def denied(syscall: str, err: str) -> list[str]:
    """The command prefix that runs a program with ``syscall`` failing."""
    return [*SECCOMP, f"{syscall}={err}", "--"]


@pytest.mark.parametrize("err", ["ENOSYS", "EPERM"])
@pytest.mark.parametrize("syscall,opts", CASES)
def test_engine_refused_on_command_line_same(tmp_path, syscall, opts, err):
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(1 << 20))
    seen = {}
    for kind in ("qemu", "trio"):
        p = subprocess.run(denied(syscall, err) + command(kind) + [
            "--blockdev", f"driver=file,filename={img},node-name=n,{opts}"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        seen[kind] = (p.returncode, errno_dropped(normalise_prog(p.stderr)))
    assert seen["qemu"][0] != 0  # the filter works: QEMU refuses
    assert seen["trio"] == seen["qemu"]


@pytest.mark.parametrize("syscall,opts", CASES[::2])
def test_missing_file_reported_first_same(tmp_path, syscall, opts):
    """A file that cannot be opened is reported before the engine."""
    seen = {}
    for kind in ("qemu", "trio"):
        p = subprocess.run(denied(syscall, "EPERM") + command(kind) + [
            "--blockdev", f"driver=file,filename={tmp_path}/missing,node-name=n,{opts}"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        seen[kind] = (p.returncode, normalise_prog(p.stderr))
    assert seen["trio"] == seen["qemu"]


class FilteredDaemon(Daemon):
    """A daemon started under a seccomp filter."""

    def __init__(self, prefix: list[str], *args, **kw):
        super().__init__(*args, **kw)
        self.prefix = prefix

    def argv(self) -> list[str]:
        return self.prefix + super().argv()


@pytest.mark.parametrize("err", ["ENOSYS", "EPERM"])
def test_engine_refused_by_blockdev_add_same(tmp_path, err):
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(1 << 20))
    f = {"driver": "file", "filename": str(img)}
    seen = {}
    for kind in ("qemu", "trio"):
        d = FilteredDaemon([*SECCOMP, f"io_uring_setup={err}", f"io_setup={err}", "--"],
                           kind, tmp_path)
        d.start()
        try:
            q = d.qmp()
            seen[kind] = [
                q.cmd_raw("blockdev-add", {**f, "node-name": "a", "aio": "io_uring"}),
                q.cmd_raw("blockdev-add", {"driver": "raw", "node-name": "b",
                                           "file": {**f, "aio": "io_uring",
                                                    "cache": {"direct": True}}}),
                q.cmd_raw("blockdev-add", {**f, "node-name": "c", "aio": "native",
                                           "cache": {"direct": True}}),
                # the engine that needs no setup still works, and nothing is left behind
                q.cmd_raw("blockdev-add", {**f, "node-name": "d", "aio": "threads"}),
                sorted(n["node-name"] for n in q.cmd_raw("query-named-block-nodes")["return"]),
            ]
        finally:
            d.stop()
        seen[kind] = errno_dropped(seen[kind])
    assert "error" in seen["qemu"][0]  # the filter works: QEMU refuses
    assert seen["trio"] == seen["qemu"]
