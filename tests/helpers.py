"""Start daemons the way users do and talk to them with real clients.

``Daemon(kind, tmp_path, args)`` runs ``qsd-trio`` (kind "trio") or the real
``qemu-storage-daemon`` (kind "qemu") as a subprocess with a QMP monitor on
a unix socket and a pidfile; startup is complete when the pidfile exists
(the man page's contract), or has failed when the process exits first.
``qmp()`` returns a connected, negotiated ``qemu.qmp`` legacy client.
Every daemon is stopped (quit, then SIGTERM, then SIGKILL) by ``stop()``,
which fixtures call in their teardown.

qsd-trio always runs in Python's development mode with every warning an
error (``-X dev -W error``: unclosed files and sockets, un-awaited
coroutines, async generators left to the garbage collector, ...), and a
qsd-trio daemon may write nothing to stderr but what its test declares
(``allow_stderr``, a regex each line must match): ``stop()`` fails the test
otherwise, as QEMU prints nothing there either.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio
from qemu.qmp.legacy import QEMUMonitorProtocol

# development mode, warnings are errors: for every qsd-trio the tests start
QSD_TRIO = [sys.executable, "-X", "dev", "-W", "error", "-m", "qsd_trio"]
QSD_QEMU = ["qemu-storage-daemon"]
HAVE_QEMU = shutil.which("qemu-storage-daemon") is not None

_counter = itertools.count()

# What qemu-storage-daemon itself prints on stderr in the same situations,
# for tests to declare (Daemon(allow_stderr=...)):
# a backup whose target has no cluster size (null-co, raw) and no backing
BACKUP_BLOCK_SIZE_WARNING = (r"^warning: The target block device doesn't provide information "
                             r"about the block size")


def command(kind: str) -> list[str]:
    return list(QSD_TRIO if kind == "trio" else QSD_QEMU)


def run_cli(kind: str, args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a daemon command line to completion (for errors, --help, ...)."""
    return subprocess.run(command(kind) + args, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def normalise_prog(text: str) -> str:
    """Both daemons prefix errors with their program name; drop it."""
    for prog in ("qemu-storage-daemon: ", "qsd-trio: "):
        text = text.replace(prog, "")
    return text


class Daemon:
    def __init__(self, kind: str, tmp_path: Path, args: list[str] | None = None,
                 *, qmp: bool = True, pidfile: bool = True, allow_stderr: str | None = None):
        self.kind = kind
        self.allow_stderr = allow_stderr
        self._stderr_checked = False
        n = next(_counter)
        self.dir = Path(tmp_path)
        self.qmp_path = self.dir / f"qmp-{kind}-{n}.sock"
        self.pidfile = self.dir / f"qsd-{kind}-{n}.pid" if pidfile else None
        self.args = list(args or [])
        self.use_qmp = qmp
        self.proc: subprocess.Popen | None = None
        self._clients: list[QEMUMonitorProtocol] = []
        self.stderr_path = self.dir / f"stderr-{kind}-{n}.txt"

    def argv(self) -> list[str]:
        argv = command(self.kind)
        if self.use_qmp:
            argv += ["--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                     "--monitor", "chardev=qmp0"]
        argv += self.args
        if self.pidfile is not None:
            argv += ["--pidfile", str(self.pidfile)]
        return argv

    def start(self, timeout: float = 30) -> Daemon:
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + timeout
        while True:
            if self.pidfile is not None and self.pidfile.exists() and self.pidfile.stat().st_size:
                return self
            if self.pidfile is None and self.qmp_path.exists():
                return self
            if self.proc.poll() is not None:
                self._stderr_checked = True  # the error below carries it
                raise RuntimeError(f"{self.kind} daemon exited {self.proc.returncode}: "
                                   f"{self.stderr()}")
            if time.monotonic() > deadline:
                self._stderr_checked = True
                raise TimeoutError(f"{self.kind} daemon did not start: {self.stderr()}")
            time.sleep(0.02)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def qmp(self, negotiate: bool = True) -> QEMUMonitorProtocol:
        client = QEMUMonitorProtocol(str(self.qmp_path))
        client.connect(negotiate=negotiate)
        client.settimeout(30)
        self._clients.append(client)
        return client

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def unexpected_stderr(self) -> list[str]:
        """The lines qsd-trio wrote to stderr that its test did not declare."""
        if self.kind != "trio":
            return []
        return [ln for ln in self.stderr().splitlines()
                if ln.strip() and not (self.allow_stderr and re.search(self.allow_stderr, ln))]

    def check_stderr(self) -> None:
        if self._stderr_checked or self.proc is None:
            return
        self._stderr_checked = True
        bad = self.unexpected_stderr()
        if bad:
            raise AssertionError("qsd-trio wrote to stderr:\n" + "\n".join(bad))

    def stop(self, check: bool = True) -> None:
        """Stop the daemon; then (``check``) fail on unexpected stderr."""
        self._stop()
        if check:
            self.check_stderr()

    def _stop(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - teardown goes on regardless
                pass
        self._clients.clear()
        if self.proc is None or self._stderr.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(check=exc[0] is None)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a real tool; with ``check`` a failure shows its whole output."""
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # qemu-img 7.2 times PBKDF2 to choose a LUKS iteration count and fails
    # with "Unable to get accurate CPU usage" when its first round measures
    # 0 ms of thread CPU time, which on a fast machine with tick-based CPU
    # accounting happens often (QEMU's bug, fixed by "crypto: fix bogus
    # error benchmarking pbkdf on fast machines" in 9.2.1): that failure,
    # and only that, is tried again
    for _ in range(20):
        p = run("qemu-img", *args, check=False)
        if "Unable to get accurate CPU usage" not in p.stderr:
            break
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def qemu_io(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-io", *args, check=check)


def first_difference(a: bytes, b: bytes) -> str:
    """Where two byte strings first differ, for an assertion message."""
    i = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    return f"first difference at {i}" if i is not None else "lengths differ"


def unused_path(tmp_path: Path, name: str) -> str:
    p = tmp_path / f"{name}-{os.getpid()}-{next(_counter)}"
    return str(p)


class _Turns:
    n = 0


@contextlib.asynccontextmanager
async def other_task_turns():
    """Another task that counts its turns (``.n``) while the body runs: a
    loop that never lets other tasks run shows as a count that stays put."""
    turns = _Turns()

    async def other():
        while True:
            turns.n += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # other() has its first turn
        yield turns
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def loop_device(backing: Path, sector_size: int = 512):
    """``backing`` as a loop block device with ``sector_size``-byte logical
    sectors (root only); yields its path and detaches it on the way out."""
    dev = run("losetup", "--find", "--show", "--sector-size", str(sector_size),
              str(backing)).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(where: Path, *mount_args: str):
    """``mount *mount_args where`` for the body (root only); unmounted after,
    lazily if something still holds it."""
    where.mkdir(parents=True, exist_ok=True)
    run("mount", *mount_args, str(where))
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
