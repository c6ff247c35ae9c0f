"""NBD servers for the tests of the NBD client driver: qemu-nbd and
nbdkit, and waiting for a server's unix socket to appear."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def start_qemu_nbd(image: Path, sock: Path, *, export: str, shared: int = 8,
                   fmt: str = "raw") -> subprocess.Popen:
    """qemu-nbd serving ``image`` as ``export`` on the unix socket ``sock``
    to up to ``shared`` clients at once, until killed (-t); returns once the
    socket exists.  The caller kills and waits for the process."""
    proc = subprocess.Popen(["qemu-nbd", "-t", "-e", str(shared), "-f", fmt, "-x", export,
                             "-k", str(sock), str(image)], stdin=subprocess.DEVNULL)
    return _started(proc, sock.exists, "qemu-nbd")


def _started(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> subprocess.Popen:
    """``proc`` once ``ready()``; killed, and RuntimeError, if it exits
    first or 30 s pass."""
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)
    return proc


def wait_socket(path: Path, timeout: float = 30) -> None:
    """Until the server has made its unix socket (TimeoutError after
    ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(str(path))
        time.sleep(0.01)


def start_nbdkit(sock: Path, *args: str) -> subprocess.Popen:
    """nbdkit in the foreground serving on the unix socket ``sock``
    (``args``: filters, plugin and its parameters); returns once it
    accepts connections (its pidfile is written then: it binds before it
    listens, so the socket existing is not enough).  The caller kills and
    waits for the process."""
    pidfile = sock.with_suffix(".pid")
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(["nbdkit", "-f", "-P", str(pidfile), "-U", str(sock), *args],
                            stdin=subprocess.DEVNULL)
    return _started(proc, lambda: pidfile.exists() and pidfile.stat().st_size > 0, "nbdkit")
