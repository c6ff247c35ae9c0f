"""A format node's backing file, as QEMU's generic block layer handles it
for the formats that name one in their header (qcow2, qcow, qed, vmdk).

QEMU opens it in bdrv_open_backing_file (the ``backing`` option, else the
header's name with its recorded format, probed when there is none).  The
name is a file next to the image, a ``json:{...}`` file name, or a
protocol's (``nbd://``, ``nbd+unix://``, ``nbd:unix:``, ``file:``,
``rbd:``, ``null-co://``: bdrv_find_protocol picks the driver by the
prefix, and the header's format goes above it).  QEMU reads a format's
unallocated clusters from it (zeroes past its end), asks it for their block
status (bdrv_co_block_status_above) and shows the header's name in
query-named-block-nodes (bdrv_query_image_info).
"""

from __future__ import annotations

import json
import struct
import sys
from typing import TYPE_CHECKING, Any

import trio

from ..qapi.errors import GenericError, QapiError
from ..qapi.schema import SCHEMA
from .node import BlockStatus, Status

if TYPE_CHECKING:
    from .node import BdrvChild, BlockNode


# bdrv_find_protocol: the protocol prefixes (what comes before the first
# ':' of a name with no '/' before it) of QEMU 7.2's drivers that qsd-trio
# has, and the driver each names
PROTOCOLS = {"nbd": "nbd", "nbd+tcp": "nbd", "nbd+unix": "nbd", "file": "file",
             "host_device": "host_device", "host_cdrom": "host_cdrom",
             "null-co": "null-co", "null-aio": "null-aio", "rbd": "rbd"}

PROBE_BYTES = 512  # what probe_head looks at


def probe_head(head: bytes) -> str:
    """The format QEMU's probing finds for an image that starts with
    ``head``, among the formats qsd-trio has (raw when nothing matches)."""
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


async def probe_format(filename: str) -> str:
    """The format QEMU's probing finds for the file ``filename`` (raw when
    it cannot be read)."""
    try:
        async with await trio.open_file(filename, "rb") as f:
            head = await f.read(PROBE_BYTES)
    except OSError:
        return "raw"
    return probe_head(head)


def has_protocol(name: str) -> bool:
    """path_has_protocol: a ':' before any '/' (``nbd://``, ``nbd:unix:``,
    ``file:x``, ``json:``)."""
    stop = next((c for c in name if c in ":/"), "")
    return stop == ":"


def protocol_options(driver: str, name: str) -> dict[str, Any]:
    """The options protocol driver ``driver`` makes of the file name
    ``name`` (its bdrv_parse_filename).  Raises GenericError with QEMU's
    text for a name the driver cannot take."""
    if driver == "nbd":
        return {"driver": "nbd", "filename": name}  # parsed by NbdNode.open
    if driver == "rbd":
        from .rbd import parse_filename  # librbd is optional: loaded for an rbd name only
        return {"driver": "rbd", **parse_filename(name)}
    if driver in ("null-co", "null-aio"):
        if name != f"{driver}://":
            raise GenericError(f"The only allowed filename for this driver is '{driver}://'")
        return {"driver": driver}
    return {"driver": driver, "filename": name.removeprefix(f"{driver}:")}


def json_filename_options(name: str) -> dict[str, Any]:
    """The options of a ``json:{...}`` file name (parse_json_filename),
    dotted keys nested as QEMU's qdict_crumple does."""
    try:
        opts = json.loads(name[5:])
    except json.JSONDecodeError as e:
        # QEMU's parser words a text that ends too soon as below; for other
        # faults Python's wording stands in for its own
        why = "premature EOI" if e.pos >= len(e.doc.rstrip()) else e.msg
        raise GenericError(f"Could not parse the JSON options: JSON parse error, {why}") \
            from None
    if not isinstance(opts, dict):
        raise GenericError("Invalid JSON object given")
    out: dict[str, Any] = {}
    for key, value in opts.items():
        *path, last = key.split(".")
        cur = out
        for part in path:
            cur = cur.setdefault(part, {})
        cur[last] = value
    return out


def unsupported_option(opts: dict[str, Any]) -> str | None:
    """QEMU's error for the first member of a ``json:`` file name's options
    that the driver's BlockdevOptions do not have (bdrv_open_inherit's
    leftover options), None when it has them all."""
    union = SCHEMA["BlockdevOptions"]
    variant = next((v["type"] for v in union["variants"] if v["case"] == opts.get("driver")),
                   None)
    if variant is None:
        return None
    members = {m["name"] for m in union["members"] + SCHEMA[variant]["members"]}
    for key in opts:
        if key not in members:
            if opts["driver"] in PROTOCOLS.values():
                return f"Block protocol '{opts['driver']}' doesn't support the option '{key}'"
            return f"Block format '{opts['driver']}' does not support the option '{key}'"
    return None


def backing_definition(node: BlockNode, name: str, fmt: str | None) -> dict[str, Any]:
    """What bdrv_open_backing_file opens for the header's backing file name
    ``name`` with format ``fmt`` (None: to be probed): a ``json:`` name's
    options (``fmt`` overrides their driver); a protocol driver's options
    when ``fmt`` is one; else a node of format ``fmt`` over the protocol
    the name's prefix chooses (bdrv_find_protocol: a plain name is a file,
    relative to the image).  Raises GenericError ("Unknown protocol 'X'")."""
    if name.startswith("json:"):
        opts = json_filename_options(name)
        return {**opts, "driver": fmt} if fmt else opts
    path = name
    if not has_protocol(name):
        path = node.full_backing_filename(name) or name
    if fmt in set(PROTOCOLS.values()):
        return protocol_options(fmt, path)
    proto = "file"
    if has_protocol(path):
        prefix = path[:path.index(":")]
        if prefix not in PROTOCOLS:
            raise GenericError(f"Unknown protocol '{prefix}'")
        proto = PROTOCOLS[prefix]
    return {"driver": fmt, "file": protocol_options(proto, path)}


async def open_header_backing(node: BlockNode, name: str, fmt: str | None) -> BdrvChild:
    """Open the backing file an image header names (``name``, format
    ``fmt``, probed when None) as ``node``'s ``backing`` child, inheriting
    force-share and cache as a nested definition does.  Raises GenericError
    prefixed "Could not open backing file: "."""
    graph = node.graph
    inherited: dict[str, Any] = {k: node.options[k] for k in ("force-share", "cache")
                                 if k in node.options}
    try:
        spec = backing_definition(node, name, fmt)
        if spec.get("driver") is None:
            file = spec.get("file")
            if file is None:  # a json: name with neither (bdrv_fill_options)
                raise GenericError("Must specify either driver or file")
            if isinstance(file, dict) and file.get("driver") == "file" and "filename" in file:
                spec["driver"] = await probe_format(file["filename"])
        if spec.get("driver") is not None:
            edge = await node.open_child({**inherited, "backing": spec}, "backing")
            unsupported = unsupported_option(spec) if name.startswith("json:") else None
            if unsupported:
                # QEMU looks for options nobody took once the node is open
                child = edge.node
                edge.detach()
                with trio.CancelScope(shield=True):
                    await graph.unref(child)
                raise GenericError(unsupported)
            return edge
        # a protocol other than a file: probed through the protocol node,
        # which then becomes the file of the format node (one connection)
        edge = await node.open_child({**inherited, "backing": spec["file"]}, "backing")
        proto = edge.node
        try:
            head = bytes(await proto.read(0, min(PROBE_BYTES, proto.length)))
        except OSError:
            head = b""
        finally:
            edge.detach()
        try:
            return await node.open_child({**inherited, "backing": {
                "driver": probe_head(head), "file": proto.node_name}}, "backing")
        except BaseException:
            with trio.CancelScope(shield=True):
                await graph.unref(proto)
            raise
    except GenericError as e:
        raise GenericError(f"Could not open backing file: {e.desc}") from None


async def open_backing(node: BlockNode, options: dict[str, Any], name: str | None,
                       fmt: str | None) -> BdrvChild | None:
    """bdrv_open_backing_file for ``node`` (whose ``file`` child is open):
    the ``backing`` option (a node, a definition, null, or the deprecated
    ""), else the header's ``name`` with format ``fmt`` (probed when None),
    attached as its ``backing`` child (returned; None for no backing file);
    sets ``node.auto_backing_file``.

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
            edge = await open_header_backing(node, name, fmt)
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
    return edge


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
