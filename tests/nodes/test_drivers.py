"""The conformance suite against file, raw, blkdebug and copy-on-read nodes,
each checked afterwards with the real qemu-img against the model."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from qsd_trio.nodes.graph import BlockGraph

from .conformance import check_block_node


def qemu_img_compare(path, model: bytes, tmp_path, offset: int = 0) -> None:
    ref = tmp_path / "model.raw"
    data = path.read_bytes()
    ref.write_bytes(data[:offset] + bytes(model) + data[offset + len(model):])
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _make_factory(tmp_path, layers, *, pad: int = 0, window: int = 0):
    img = tmp_path / "img.raw"

    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        img.write_bytes(b"")
        os.truncate(img, size + pad)
        graph = BlockGraph()
        opts = {"driver": "file", "filename": str(img), "discard": "unmap",
                "read-only": read_only}
        for wrap in layers:
            opts = wrap(opts, size)
        opts = {**opts, "node-name": "top", "read-only": read_only, "discard": "unmap"}
        node = await graph.add(opts)
        try:
            yield node
        finally:
            await graph.close_all()

    async def after_close(model):
        qemu_img_compare(img, model, tmp_path, offset=window)

    return factory, after_close


LAYERS = {
    "file": ([], 0),
    "raw": ([lambda o, s: {"driver": "raw", "file": o}], 0),
    "raw-window": ([lambda o, s: {"driver": "raw", "file": o, "offset": 8192, "size": s}],
                   8192 + 4096),
    "blkdebug": ([lambda o, s: {"driver": "blkdebug", "image": o}], 0),
    "copy-on-read": ([lambda o, s: {"driver": "copy-on-read", "file": o}], 0),
    "raw-cor-raw": ([lambda o, s: {"driver": "raw", "file": o},
                     lambda o, s: {"driver": "copy-on-read", "file": o},
                     lambda o, s: {"driver": "raw", "file": o}], 0),
}


@pytest.mark.parametrize("kind", list(LAYERS))
async def test_conformance(tmp_path, kind):
    layers, pad = LAYERS[kind]
    factory, after_close = _make_factory(tmp_path, layers, pad=pad,
                                         window=8192 if kind == "raw-window" else 0)
    await check_block_node(factory, after_close=after_close,
                           can_resize=kind != "raw-window",
                           # copy-on-read needs write-unchanged, like QEMU's
                           can_read_only="cor" not in kind and "copy" not in kind)


async def test_conformance_direct(tmp_path):
    """cache.direct=on (O_DIRECT) where the file system allows it."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    layers = [lambda o, s: {**o, "cache": {"direct": True}}]
    factory, after_close = _make_factory(tmp_path, layers)
    await check_block_node(factory, after_close=after_close)
