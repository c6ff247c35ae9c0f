"""Dirty bitmaps as QEMU itself exports them: qemu-nbd -B serves the
image's bitmap, nbdinfo --map reads its dirty ranges."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def qemu_dirty_extents(path: Path, fmt: str, name: str, tmp_path: Path) -> list[tuple[int, int]]:
    """The dirty ranges of bitmap ``name`` of image ``path`` (format ``fmt``)."""
    sock = tmp_path / "nbd.sock"
    p = subprocess.Popen(["qemu-nbd", "-r", "-f", fmt, "-B", name, "-k", str(sock), str(path)])
    try:
        for _ in range(200):
            if sock.exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        out = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}",
                              f"nbd+unix:///?socket={sock}"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    finally:
        p.terminate()
        p.wait(timeout=10)
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]
