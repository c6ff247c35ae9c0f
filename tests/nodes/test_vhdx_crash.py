"""qsd-trio killed (SIGKILL) while a client writes new blocks of a vhdx image
over NBD: whatever the moment, qemu-img check -r all (which replays the log
when the kill left one) makes the image clean, every write the client saw
acknowledged is there, and nothing else but the bytes of the writes in
flight."""

from __future__ import annotations

import random
import re
import subprocess
import time

import pytest

from tests.helpers import Daemon, qemu_img

from .vhdx_images import make_image

MiB = 1 << 20
WRITES = 160
CHUNK = 65536


@pytest.mark.parametrize("seed", range(6))
def test_kill_during_allocating_writes(tmp_path, seed):
    img = tmp_path / "crash.vhdx"
    make_image(img, WRITES * MiB, "block_size=1M")
    sock = tmp_path / "nbd.sock"
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", "driver=vhdx,node-name=v,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=v,writable=on"]
    daemon = Daemon("trio", tmp_path, args).start()
    cmds = [a for i in range(WRITES)
            for a in ("-c", f"write -P {i + 1} {i * MiB + 4096} {CHUNK}")]
    client = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///v?socket={sock}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(random.Random(seed).uniform(0.1, 1.0))
        daemon.proc.kill()
        daemon.proc.wait()
        out, _ = client.communicate(timeout=60)
    finally:
        daemon.stop(check=False)
        if client.poll() is None:
            client.kill()
    acked = {int(m) // MiB for m in re.findall(r"wrote 65536/65536 bytes at offset (\d+)", out)}
    r = qemu_img("check", "-r", "all", "-f", "vhdx", str(img), check=False)
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, \
        r.stdout + r.stderr
    raw = tmp_path / "after.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", str(img), str(raw))
    data = raw.read_bytes()
    for i in range(WRITES):
        block = data[i * MiB:(i + 1) * MiB]
        written = block[4096:4096 + CHUNK]
        assert block[:4096] == bytes(4096) and block[4096 + CHUNK:] == bytes(MiB - 4096 - CHUNK)
        if i in acked:
            assert written == bytes([i + 1]) * CHUNK, i
        else:
            assert set(written) <= {0, i + 1}, i
