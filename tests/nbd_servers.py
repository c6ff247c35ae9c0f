"""A qemu-nbd server for the tests of the NBD client driver."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def start_qemu_nbd(image: Path, sock: Path, *, export: str, shared: int = 8,
                   fmt: str = "raw") -> subprocess.Popen:
    """qemu-nbd serving ``image`` as ``export`` on the unix socket ``sock``
    to up to ``shared`` clients at once, until killed (-t); returns once the
    socket exists.  The caller kills and waits for the process."""
    proc = subprocess.Popen(["qemu-nbd", "-t", "-e", str(shared), "-f", fmt, "-x", export,
                             "-k", str(sock), str(image)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("qemu-nbd did not start")
        time.sleep(0.02)
    return proc
