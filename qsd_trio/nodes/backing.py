"""A format node's backing file, as QEMU's generic block layer handles it
for the formats that name one in their header (qcow, qed; qcow2 shares the
reads, the block status and the information).

QEMU opens it in bdrv_open_backing_file (the ``backing`` option, else the
header's name next to the image with a probed format), reads a format's
unallocated clusters from it (zeroes past its end), asks it for their block
status (bdrv_co_block_status_above) and shows the header's name in
query-named-block-nodes (bdrv_query_image_info).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import TYPE_CHECKING, Any

import trio

from ..qapi.errors import GenericError, QapiError
from .node import BlockStatus, Status

if TYPE_CHECKING:
    from .node import BdrvChild, BlockNode


async def probe_format(filename: str) -> str:
    """The format QEMU's probing finds for a backing file named in a header
    without a format, among the formats qsd-trio has (raw when nothing else
    matches, or the file cannot be read)."""
    try:
        async with await trio.open_file(filename, "rb") as f:
            head = await f.read(512)
    except OSError:
        return "raw"
    if head[:4] == b"QFI\xfb" and len(head) >= 8 and struct.unpack_from(">I", head, 4)[0] >= 2:
        return "qcow2"
    if head[:4] == b"QFI\xfb" and len(head) >= 8 and struct.unpack_from(">I", head, 4)[0] == 1:
        return "qcow"
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and \
            len(head) >= 20 and struct.unpack_from("<I", head, 16)[0] == 2:
        return "parallels"
    if head[:4] == b"QED\0":
        return "qed"
    if head[:8] == b"conectix":
        return "vpc"
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == 0xBEDA107F:
        return "vdi"
    return "raw"


async def open_backing(node: BlockNode, options: dict[str, Any], name: str | None,
                       fmt: str | None) -> None:
    """bdrv_open_backing_file for ``node`` (whose ``file`` child is open):
    the ``backing`` option (a node, a definition, null, or the deprecated
    ""), else the header's ``name`` with format ``fmt`` (probed when None),
    attached as its ``backing`` child; sets ``node.auto_backing_file``.

    QEMU names the node (bdrv_open_common) before it opens the backing file,
    so query-named-block-nodes lists the backing nodes as newer; a failure
    takes the name back.  Raises GenericError with QEMU's prefix."""
    graph = node.graph
    graph.nodes.setdefault(node.node_name, node)
    try:
        edge = None
        if "backing" in options:
            edge = await open_backing_option(node, options)
        elif name:
            path = name
            base = node.children["file"].node.filename
            if not os.path.isabs(path) and base and "://" not in path:
                path = os.path.join(os.path.dirname(base), path)
            fmt = fmt or await probe_format(path)
            inherited: dict[str, Any] = {k: node.options[k] for k in ("force-share", "cache")
                         if k in node.options}
            try:
                edge = await graph.open_child(node, {**inherited, "backing": {
                    "driver": fmt, "file": {"driver": "file", "filename": path}}}, "backing")
            except GenericError as e:
                raise GenericError(f"Could not open backing file: {e.desc}") from None
    except BaseException:
        if graph.nodes.get(node.node_name) is node:
            del graph.nodes[node.node_name]
        raise
    # QEMU's auto_backing_file: the opened node's name when the header chose
    # it, else the header's own string (so a backing given explicitly or as
    # null counts as overridden in file names)
    if edge is not None and "backing" not in options:
        node.auto_backing_file = edge.node.filename
    else:
        node.auto_backing_file = name or ""


async def open_backing_option(node: BlockNode, options: dict[str, Any]) -> BdrvChild | None:
    """The ``backing`` option of ``node`` opened as its backing child: a
    node name or a definition; None for null or the deprecated "" (QEMU
    still takes an empty reference for null, with a warning).  Raises
    GenericError prefixed as bdrv_open_backing_file's."""
    if options["backing"] == "":
        print('qsd-trio: warning: Use of "backing": "" is deprecated; '
              'use "backing": null instead', file=sys.stderr)
        return None
    if options["backing"] is None:
        return None
    try:
        return await node.open_child(options, "backing")
    except QapiError as e:
        raise e.prefixed("Could not open backing file: ") from None


async def read_backing(backing: BlockNode | None, pos: int, n: int, out: bytearray,
                       at: int) -> None:
    """The backing file's bytes ``pos``..``pos+n`` into ``out[at:]``; what
    lies past its end (or all of it, without a backing file) stays as
    ``out`` holds it: zeroes."""
    if backing is None:
        return
    blen = backing.length
    if pos >= blen:
        return
    m = min(n, blen - pos)
    out[at:at + m] = await backing.read(pos, m)


async def backing_status(backing: BlockNode | None, offset: int, n: int) -> BlockStatus:
    """The block status of ``n`` unallocated bytes at ``offset``: zero and
    unallocated without a backing file; past the end of a shorter one, zero
    and allocated in it (bdrv_co_common_block_status_above: "zeroes that we
    synthesize beyond EOF behave as if they were allocated at this layer",
    so qemu:allocation-depth says 2); else what the backing file says, one
    level deeper."""
    if backing is None:
        return BlockStatus(Status.ZERO, n, 0)
    blen = backing.length
    if offset >= blen:
        return BlockStatus(Status.ZERO | Status.ALLOCATED, n, 2)
    st = await backing.block_status(offset, min(n, blen - offset))
    depth = st.depth + 1 if st.depth else 0
    return BlockStatus(st.flags & (Status.DATA | Status.ZERO | Status.ALLOCATED), st.length, depth)


def backing_info(node: BlockNode, name: str | None, fmt: str | None) -> dict[str, Any]:
    """query-named-block-nodes' backing file fields for the header's ``name``
    and format ``fmt`` (bdrv_query_image_info): none without a name."""
    if not name:
        return {}
    info: dict[str, Any] = {"backing-filename": name}
    full = node.full_backing_filename(name)
    if full is not None:
        info["full-backing-filename"] = full
    if fmt:
        info["backing-filename-format"] = fmt
    return info
