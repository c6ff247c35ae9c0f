"""aio=native reaps its completions from the ring the kernel maps into the
process (nodes/engine/linux_aio.py), as QEMU's linux-aio.c does, not with
io_getevents.

qsd-trio runs under a seccomp filter (tests/seccomp_exec.py) that makes
io_getevents fail with ENOSYS: an export over Linux AIO still serves real
clients, at queue depth 1 and 32, and the image holds what they wrote.
With io_getevents on the reaping path the first completion fails the
engine's reaper instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import seccomp_exec
from tests.engines import stop_clean
from tests.helpers import Daemon, qemu_img, qemu_io

from .nbd_helpers import fio_verify

pytestmark = pytest.mark.skipif(not seccomp_exec.available(), reason="needs x86_64 seccomp")

SECCOMP = [sys.executable, str(Path(seccomp_exec.__file__).resolve())]


class FilteredDaemon(Daemon):
    """qsd-trio with io_getevents failing."""

    def argv(self) -> list[str]:
        return [*SECCOMP, "io_getevents=ENOSYS", "--", *super().argv()]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_native_serves_without_io_getevents(tmp_path, fmt):
    img = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, str(img), "64M")
    sock = tmp_path / "nbd.sock"
    file_opts = "driver=file,cache.direct=on,aio=native"
    node = (f"node-name=disk,{file_opts},filename={img}" if fmt == "raw" else
            f"driver=qcow2,node-name=disk,file.{file_opts.replace(',', ',file.')},"
            f"file.filename={img}")
    d = FilteredDaemon("trio", tmp_path, [
        "--blockdev", node,
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"])
    try:
        d.start()  # inside: a daemon that does not start is stopped too
        uri = f"nbd+unix:///disk?socket={sock}"
        # queue depth 1: a pattern written and read back, request by request
        model = bytearray(64 << 20)
        cmds = []
        for i in range(64):
            off = (i * 37 % 1024) * 4096
            cmds += ["-c", f"write -P {i + 1} {off} 4096", "-c", f"read -P {i + 1} {off} 4096"]
            model[off:off + 4096] = bytes([i + 1]) * 4096
        r = qemu_io("--image-opts",
                    f"driver=nbd,server.type=unix,server.path={sock},export=disk", *cmds)
        assert "Pattern verification failed" not in r.stdout, r.stdout
        # queue depth 32, every block checked by fio
        fio_verify(uri, tmp_path, offset=32 << 20, size=16 << 20, iodepth=32)
        out = tmp_path / "out.raw"
        subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
        assert out.read_bytes()[:32 << 20] == bytes(model[:32 << 20])
    finally:
        stop_clean(d)
    if fmt == "qcow2":
        qemu_img("check", str(img))
