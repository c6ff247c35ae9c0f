"""Crash consistency: qsd-trio killed with SIGKILL in the middle of a qcow2 workload.

Each round starts the daemon with the image exported over NBD, runs batches
of writes (each batch ends with a flush, in its own qemu-io process) and
kills the daemon at a random moment.  Then ``qemu-img check`` must report no
corruption (leaks are allowed) and every batch whose flush was acknowledged
must read back.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading

import pytest

from tests.helpers import Daemon

from .qcow2_helpers import create, qemu_img, qemu_io

SIZE = 64 << 20
SLOT = 256 << 10  # each batch writes a few slots; slot = unit of verification


@pytest.mark.soak
def test_sigkill_during_writes(tmp_path):
    img = tmp_path / "crash.qcow2"
    create(img, SIZE, "cluster_size=4096")
    rnd = random.Random(1234)
    expected: dict[int, tuple[int, int, int]] = {}  # slot -> (offset, length, pattern)
    for round_ in range(12):
        sock = tmp_path / f"nbd{round_}.sock"
        d = Daemon("trio", tmp_path, [
            "--blockdev", f"driver=qcow2,node-name=q,file.driver=file,file.filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=q,writable=on"], qmp=False)
        d.start()
        timer = threading.Timer(rnd.uniform(0.3, 2.0), d.proc.send_signal, [signal.SIGKILL])
        timer.start()
        uri = f"nbd+unix:///q?socket={sock}"
        try:
            while d.proc.poll() is None:
                slots = rnd.sample(range(SIZE // SLOT), 4)
                batch = []
                for s in slots:
                    off = s * SLOT + rnd.randrange(0, SLOT // 2)
                    n = rnd.randrange(1, SLOT // 2)
                    batch.append((s, off, n, rnd.randrange(1, 255)))
                cmds = []
                for _s, off, n, p in batch:
                    cmds += ["-c", f"write -P {p} {off} {n}"]
                cmds += ["-c", "flush"]
                r = subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], capture_output=True,
                                   text=True, timeout=60)
                ok = r.returncode == 0 and "failed" not in r.stdout + r.stderr
                for s, off, n, p in batch:
                    if ok:
                        expected[s] = (off, n, p)
                    else:
                        expected.pop(s, None)  # either old or new data is fine
        finally:
            timer.cancel()
            d.proc.kill()
            d.proc.wait()
            d.stop()
        r = qemu_img("check", "--output=json", str(img), check=False)
        info = json.loads(r.stdout)
        assert info.get("corruptions", 0) == 0, r.stdout + r.stderr
        assert info.get("check-errors", 0) == 0, r.stdout + r.stderr
        cmds = [f"read -P {p} {off} {n}" for off, n, p in expected.values()]
        for i in range(0, len(cmds), 50):
            qemu_io(img, *cmds[i:i + 50])
        if round_ % 4 == 3:
            qemu_img("check", "-r", "leaks", str(img), check=False)
