"""``blockdev-create`` with ``driver=vmdk``, as QEMU 7.2's vmdk_co_create,
vmdk_co_do_create and vmdk_init_extent lay images out.

The ``file`` node gets the image (monolithicSparse, streamOptimized) or the
descriptor (the flat and split subformats, whose extents are the nodes of
``extents``, in order: one for monolithicFlat, one per 2 GiB for the
twoGbMaxExtent* ones).  A sparse extent is a VMDK4 header (grains of 64
KiB, 512 entries per grain table), the redundant grain directory at sector
21, its grain tables, the grain directory and its tables after them, all
tables preallocated (as zeroes), grains from the next 64 KiB boundary; a
flat extent is its file sized to the extent.  The descriptor names each
extent by its file's base name, a random CID and, with ``backing-file``,
the parent's CID and name (the parent must be a vmdk image).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from ..qapi.errors import GenericError
from .backing import probe_format
from .graph import BlockGraph
from .node import BlockNode
from .vmdk import VmdkNode
from .vmdk_descriptor import extent_line, make_descriptor, probe
from .vmdk_extent import (
    SECTOR,
    U32,
    VMDK4_COMPRESSION_DEFLATE,
    VMDK4_FLAG_COMPRESS,
    VMDK4_FLAG_MARKER,
    VMDK4_FLAG_NL_DETECT,
    VMDK4_FLAG_RGD,
    VMDK4_FLAG_ZERO_GRAIN,
    VMDK4_MAGIC,
    Vmdk4Header,
    round_up,
)

SPLIT_SIZE = 0x80000000  # twoGbMaxExtent*: 2 GiB per extent
GRANULARITY = 128  # sectors per grain
GTES_PER_GT = 512
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")

# resolve(ref): the node a BlockdevRef names (QEMU's bdrv_open_blockdev_ref)
Resolve = Callable[[Any], BlockNode]
# parent_cid(filename): the CID of the vmdk image there, or GenericError
ParentCid = Callable[[str], Awaitable[int]]


def _div_round_up(n: int, d: int) -> int:
    return -(-n // d)


async def init_extent(node: BlockNode, size: int, *, flat: bool, compress: bool,
                      zeroed_grain: bool) -> None:
    """vmdk_init_extent: a flat extent sized, or a sparse one's header and
    grain directories written (the tables are the zeroes of the file grown
    to the first grain).  QEMU's uint32_t arithmetic is kept."""
    if flat:
        await node.truncate(size, exact=False)
        return
    h = Vmdk4Header(bytes(Vmdk4Header.STRUCT.size))
    h["version"] = 3 if compress else 2 if zeroed_grain else 1
    h["flags"] = (VMDK4_FLAG_RGD | VMDK4_FLAG_NL_DETECT
                  | (VMDK4_FLAG_COMPRESS | VMDK4_FLAG_MARKER if compress else 0)
                  | (VMDK4_FLAG_ZERO_GRAIN if zeroed_grain else 0))
    h["compressAlgorithm"] = VMDK4_COMPRESSION_DEFLATE if compress else 0
    h["capacity"] = size // SECTOR
    h["granularity"] = GRANULARITY
    h["num_gtes_per_gt"] = GTES_PER_GT
    grains = _div_round_up(size // SECTOR, GRANULARITY) & U32
    gt_size = _div_round_up(GTES_PER_GT * 4, SECTOR)
    gt_count = _div_round_up(grains, GTES_PER_GT) & U32
    gd_sectors = _div_round_up(gt_count * 4, SECTOR) & U32
    tables = (gt_size * gt_count) & U32
    h["desc_offset"] = 1
    h["desc_size"] = 20
    h["rgd_offset"] = h["desc_offset"] + h["desc_size"]
    h["gd_offset"] = h["rgd_offset"] + gd_sectors + tables
    h["grain_offset"] = round_up(h["gd_offset"] + gd_sectors + tables, GRANULARITY)
    h["check_bytes"] = b"\n \r\n"
    try:
        await node.write(0, VMDK4_MAGIC)
        await node.write(4, h.pack())
    except OSError:
        raise GenericError("An IO error has occurred") from None
    await node.truncate(h["grain_offset"] << 9, exact=False)
    for at in (h["rgd_offset"], h["gd_offset"]):
        # each directory points at the tables that follow it
        gd = bytearray(gd_sectors * SECTOR)
        first = at + gd_sectors
        for i in range(gt_count):
            struct.pack_into("<I", gd, i * 4, (first + i * gt_size) & U32)
        try:
            await node.write(at * SECTOR, gd)
        except OSError:
            raise GenericError("An IO error has occurred") from None


async def create_vmdk(resolve: Resolve, parent_cid: ParentCid, *, file: Any, size: int,
                      extents: list[Any] | None = None, subformat: str | None = None,
                      backing_file: str | None = None, adapter_type: str | None = None,
                      hwversion: str | None = None, toolsversion: str | None = None,
                      zeroed_grain: bool = False) -> None:
    """vmdk_co_create (blockdev-create driver=vmdk): QEMU's checks and
    messages, in its order."""
    if size % SECTOR:
        raise GenericError("Image size must be a multiple of 512 bytes")
    subformat = subformat or "monolithicSparse"
    adapter_type = adapter_type or "ide"
    hw_version = hwversion or "4"
    tools_version = toolsversion or "2147483647"
    # VMware's heads for adapters other than IDE
    heads = 16 if adapter_type == "ide" else 255
    split = subformat in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
    flat = subformat in ("monolithicFlat", "twoGbMaxExtentFlat")
    compress = subformat == "streamOptimized"
    if flat and backing_file is not None:
        raise GenericError("Flat image can't have backing file")
    if flat and zeroed_grain:
        raise GenericError("Flat image can't enable zeroed grain")

    def ref(idx: int) -> Any:
        """vmdk_co_create_cb's choice: ``file`` for 0, else extent idx - 1."""
        if idx == 0:
            return file
        lst = extents or []
        for i in range(1, idx):
            if len(lst) < i + 1:
                raise GenericError(f"Extent [{i}] not specified")
        if len(lst) < idx:
            raise GenericError(f"Extent [{idx - 1}] not specified")
        return lst[idx - 1]

    async def extent(idx: int, extent_size: int) -> BlockNode:
        node = resolve(ref(idx))
        if extent_size >= 0:
            await init_extent(node, extent_size, flat=flat, compress=compress,
                              zeroed_grain=zeroed_grain)
        return node

    extent_size = SPLIT_SIZE if split else size
    created = extent_size if not split and not flat else 0
    top = await extent(0, created)
    lines = []
    if not split and not flat:
        lines.append(extent_line(flat, created, top.filename))
    pcid = 0xFFFFFFFF
    hint = None
    if backing_file is not None:
        pcid = await parent_cid(_full_backing(top, backing_file))
        hint = backing_file
    idx = 1
    while created < size:
        cur = min(size - created, extent_size)
        lines.append(extent_line(flat, cur, (await extent(idx, cur)).filename))
        created += cur
        idx += 1
    try:
        resolve(ref(idx))
    except GenericError:
        pass
    else:
        raise GenericError("List of extents contains unused extents")
    desc = make_descriptor(cid=random.getrandbits(32), parent_cid=pcid, create_type=subformat,
                           parent_hint=hint, extents=lines, hw_version=hw_version, size=size,
                           heads=heads, adapter_type=adapter_type, tools_version=tools_version)
    desc_offset = 0x200 if not split and not flat else 0
    try:
        await top.write(desc_offset, desc)
    except OSError as e:
        raise GenericError(f"Could not write description: {e.strerror}") from None
    if desc_offset == 0:
        # the descriptor file ends with its text
        await top.truncate(len(desc), exact=False)


def _full_backing(top: BlockNode, backing_file: str) -> str:
    """bdrv_get_full_backing_filename_from_filename: the name relative to
    the image's directory."""
    name = top.filename
    if backing_file.startswith("/") or not name:
        return backing_file
    if name.startswith("json:"):
        raise GenericError(f"Cannot use relative backing file names for '{name}'")
    return name[:name.rfind("/") + 1] + backing_file


async def parent_cid(graph: BlockGraph, filename: str) -> int:
    """The CID of the parent image at ``filename``, opened as QEMU's
    blk_new_open does for the check (read-only, its format probed, no
    backing file); GenericError if it does not open or is not vmdk."""
    file = await graph.open_node({"driver": "file", "filename": filename, "read-only": True})
    try:
        head = bytes(await file.read(0, min(file.length, 2048)))
        if not probe(head):
            fmt = await probe_format(filename)
            raise GenericError(f"Invalid backing file format: {fmt}. Must be vmdk")
        node = await graph.open_node({"driver": "vmdk", "read-only": True, "backing": None,
                                      "file": file.node_name})
        try:
            assert isinstance(node, VmdkNode)
            return node.cid
        finally:
            await graph.unref(node)
    finally:
        await graph.unref(file)


async def create_vmdk_on(graph: BlockGraph, o: Any, resolve: Resolve) -> None:
    """blockdev-create's BlockdevCreateOptionsVmdk ``o`` (QAPI enums as
    their names)."""
    def name(v: Any) -> str | None:
        return None if v is None else str(v)

    await create_vmdk(resolve, lambda f: parent_cid(graph, f), file=o.file, size=o.size,
                      extents=o.extents, subformat=name(o.subformat),
                      backing_file=o.backing_file, adapter_type=name(o.adapter_type),
                      hwversion=o.hwversion, toolsversion=o.toolsversion,
                      zeroed_grain=bool(o.zeroed_grain))
