"""blockdev-create's vmdk part (:func:`create_vmdk`): every subformat laid
out as qemu-img create lays it out (but the random CID), the images clean in
``qemu-img check``; QEMU's refusals with its messages."""

from __future__ import annotations

import pytest

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.nodes.vmdk_create import create_vmdk
from qsd_trio.qapi.errors import GenericError

from .test_vmdk import MiB, make_image, norm_image, opened, qemu_img

CREATES = [
    ("monolithicSparse", 10 * MiB, {}),
    ("monolithicSparse", 10 * MiB, {"zeroed_grain": True}),
    ("streamOptimized", 10 * MiB, {}),
    ("monolithicSparse", 5 << 30, {"adapter_type": "lsilogic", "hwversion": "7"}),
    ("monolithicFlat", 10 * MiB, {"toolsversion": "10240"}),
    ("twoGbMaxExtentSparse", (5 << 30) + 512, {}),
    ("twoGbMaxExtentFlat", 10 * MiB, {"adapter_type": "buslogic"}),
]


def _qemu_opts(o: dict) -> list[str]:
    names = {"zeroed_grain": "zeroed_grain", "adapter_type": "adapter_type",
             "hwversion": "hwversion", "toolsversion": "toolsversion"}
    return [f"{names[k]}={'on' if v is True else v}" for k, v in o.items()]


@pytest.mark.parametrize("sub,size,opts", CREATES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CREATES)])
async def test_create_like_qemu_img(tmp_path, sub, size, opts):
    """create_vmdk lays every file out as qemu-img create does (but the
    random CID), extents named as qemu-img names them."""
    theirs = tmp_path / "theirs"
    ours = tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    make_image(theirs / "img.vmdk", size, sub, *_qemu_opts(opts))
    names = sorted(p.name for p in theirs.iterdir())
    graph = BlockGraph()
    nodes = {}
    for n in names:
        (ours / n).touch()
        nodes[n] = await graph.add({"driver": "file", "node-name": f"n{len(nodes)}",
                                    "filename": str(ours / n)})
    extents = [nodes[n] for n in names if n != "img.vmdk"]

    async def no_parent(_name):
        raise AssertionError("no backing file here")

    try:
        await create_vmdk(lambda ref: ref, no_parent, file=nodes["img.vmdk"], size=size,
                          extents=extents, subformat=sub,
                          adapter_type=opts.get("adapter_type"), hwversion=opts.get("hwversion"),
                          toolsversion=opts.get("toolsversion"),
                          zeroed_grain=opts.get("zeroed_grain", False))
    finally:
        await graph.close_all()
    for n in names:
        assert norm_image((ours / n).read_bytes()) == norm_image((theirs / n).read_bytes()), n
    r = qemu_img("check", "-f", "vmdk", str(ours / "img.vmdk"))
    assert r.returncode == 0, r.stdout + r.stderr
    async with opened(ours / "img.vmdk", read_only=True) as node:
        assert node.length == size


async def test_create_errors(tmp_path):
    img = tmp_path / "e.vmdk"
    img.touch()
    graph = BlockGraph()
    f = await graph.add({"driver": "file", "node-name": "f", "filename": str(img)})

    async def parent(_name):
        raise GenericError("never asked")

    try:
        for kw, msg in [
            ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
            ({"size": MiB, "subformat": "monolithicFlat", "backing_file": "b.vmdk"},
             "Flat image can't have backing file"),
            ({"size": MiB, "subformat": "twoGbMaxExtentFlat", "zeroed_grain": True},
             "Flat image can't enable zeroed grain"),
            ({"size": MiB, "subformat": "monolithicFlat"}, "Extent [0] not specified"),
            ({"size": 5 << 30, "subformat": "twoGbMaxExtentFlat", "extents": [f]},
             "Extent [1] not specified"),
            ({"size": MiB, "extents": [f]}, "List of extents contains unused extents"),
        ]:
            with pytest.raises(GenericError) as e:
                await create_vmdk(lambda ref: ref, parent, file=f, **kw)
            assert e.value.desc == msg, kw
    finally:
        await graph.close_all()
