"""Nothing on stderr but what QEMU prints.

QEMU's own test harness runs Python with ``PYTHONWARNINGS=default``; a
client that leaves a socket monitor, or a quit, must not make qsd-trio
print a ResourceWarning (an async generator left to the garbage
collector).  And the test suite's own rule: a qsd-trio daemon that writes
anything undeclared to stderr fails its test (tests/helpers.Daemon).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.helpers import Daemon


def _wait_for(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("warnings", ["default", "error"])
def test_monitor_clients_come_and_go_quietly(tmp_path, warnings):
    sock = tmp_path / "qmp.sock"
    env = {**os.environ, "PYTHONWARNINGS": warnings, "PYTHONDEVMODE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsd_trio",
         "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m",
         "--chardev", f"socket,id=m2,path={sock}2,server=on,wait=off", "--monitor", "chardev=m2"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        _wait_for(f"{sock}2", proc)
        for _ in range(3):  # a client comes, asks, leaves
            q = QEMUMonitorProtocol(str(sock))
            q.connect()
            q.cmd("query-version")
            q.close()
        silent = QEMUMonitorProtocol(f"{sock}2")  # one that never says goodbye
        silent.connect()
        q = QEMUMonitorProtocol(str(sock))
        q.connect()
        q.cmd("quit")
        _, err = proc.communicate(timeout=30)
        for c in (q, silent):
            with contextlib.suppress(Exception):
                c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert err == ""


def test_undeclared_stderr_fails_the_test(tmp_path):
    # -T writes trace lines to stderr: undeclared, stop() fails
    d = Daemon("trio", tmp_path, ["-T", "bdrv_open", "--blockdev", "null-co,node-name=n"])
    d.start()
    with pytest.raises(AssertionError, match="qsd-trio wrote to stderr:\n.*bdrv_open"):
        d.stop()
    # declared, it passes
    d = Daemon("trio", tmp_path, ["-T", "bdrv_open", "--blockdev", "null-co,node-name=n"],
               allow_stderr=r"bdrv_open")
    d.start()
    d.stop()
