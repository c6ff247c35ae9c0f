"""The two daemons the guest tests run, and whether qsd-trio has an export.

Guest tests are parametrised over ``daemon_params(export_type)``:
qemu-storage-daemon 7.2, and qsd-trio as a strict xfail while qsd-trio
answers ``--export type=<export_type>`` with "No driver found for the
requested export type". The test calls ``require_export`` first, which fails
at once in that case (before any guest boots); when the export lands, the
test runs for real and a pass is an XPASS, which ``xfail_strict`` turns into
a failure until the mark is removed from ``MISSING_EXPORTS``.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import QSD_TRIO

# export types qsd-trio does not have yet; remove a line when its export lands
MISSING_EXPORTS: set[str] = set()
NO_DRIVER = "No driver found for the requested export type"

# parameter id -> tests.helpers.Daemon kind
KINDS = {"qemu-storage-daemon": "qemu", "qsd-trio": "trio"}


def daemon_params(export_type: str) -> list:
    """pytest.param for each daemon, qsd-trio an xfail while it lacks
    ``export_type``."""
    marks = []
    if export_type in MISSING_EXPORTS:
        marks.append(pytest.mark.xfail(
            strict=True,
            reason=f"qsd-trio has no {export_type} export yet: --export type={export_type} "
                   f"fails with '{NO_DRIVER}'"))
    return [pytest.param("qemu-storage-daemon"), pytest.param("qsd-trio", marks=marks)]


def require_export(daemon: str, export_type: str) -> None:
    """Fail at once (before booting a guest) if ``daemon`` has no
    ``export_type`` export; qemu-storage-daemon has both."""
    if daemon == "qsd-trio":
        missing = _qsd_trio_missing(export_type)
        if missing:
            pytest.fail(f"qsd-trio lacks the {export_type} export: {missing}")


@functools.cache
def _qsd_trio_missing(export_type: str) -> str:
    """qsd-trio's error if it has no driver for ``export_type``, else "".

    qsd-trio is started on the host with a null-co node and the export; a
    daemon that stays up, or fails for another reason (no /dev/vduse here),
    has the driver.
    """
    with tempfile.TemporaryDirectory(prefix="qsd-export-probe-") as tmp:
        if export_type == "vhost-user-blk":
            opts = f"addr.type=unix,addr.path={Path(tmp) / 'probe.sock'}"
        else:
            opts = "name=probe"
        pidfile = Path(tmp) / "pid"
        argv = QSD_TRIO + ["--blockdev", "driver=null-co,node-name=n0",
                           "--export", f"type={export_type},id=e0,node-name=n0,{opts}",
                           "--pidfile", str(pidfile)]
        with open(Path(tmp) / "stderr", "w+") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
            deadline = time.monotonic() + 30
            while proc.poll() is None and not pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:  # up: it has the driver
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return ""
            err.seek(0)
            text = err.read().strip()
    return text if NO_DRIVER in text else ""
