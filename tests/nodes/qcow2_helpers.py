"""Helpers for the qcow2 tests: real qemu tools and opening images in a graph."""

from __future__ import annotations

import contextlib
import json

import qsd_trio.nodes.file  # noqa: F401 - registers the drivers
import qsd_trio.nodes.qcow2  # noqa: F401
import qsd_trio.nodes.raw  # noqa: F401
from qsd_trio.nodes.graph import BlockGraph
from tests.helpers import qemu_img, run  # noqa: F401 - re-exported for the qcow2 tests


def qemu_io(path, *cmds: str, fmt: str = "qcow2", extra: tuple = ()) -> str:
    args = ["qemu-io", "-f", fmt, *extra]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, str(path))
    out = p.stdout + p.stderr
    assert "Pattern verification failed" not in out, out
    assert "error" not in out.lower() or "errors" in out.lower(), out
    return out


def check_clean(path, *, allow_leaks: bool = False) -> dict:
    """``qemu-img check`` finds no corruption (and no leaks unless allowed)."""
    p = qemu_img("check", "--output=json", str(path), check=False)
    info = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    assert info.get("corruptions", 0) == 0 and info.get("check-errors", 0) == 0, p.stdout + p.stderr
    if not allow_leaks:
        assert p.returncode == 0, p.stdout + p.stderr
    return info


def create(path, size, *opts: str, fmt: str = "qcow2", backing: str | None = None,
           backing_fmt: str | None = None) -> None:
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    qemu_img(*args, str(path), str(size))


@contextlib.asynccontextmanager
async def open_qcow2(path, *, read_only: bool = False, **extra):
    graph = BlockGraph()
    opts = {"driver": "qcow2", "node-name": "q",
            "file": {"driver": "file", "filename": str(path)},
            "read-only": read_only, "discard": "unmap", **extra}
    node = await graph.add(opts)
    try:
        yield node
    finally:
        await graph.close_all()
