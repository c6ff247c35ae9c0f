"""Image creation, laid out as ``qemu-img create -f qcow2`` lays it out.

The first three clusters are written by hand (header, a one-cluster refcount
table, one refcount block describing those three clusters); then the image is
opened with our own driver and grown to its size, which places the L1 table
in cluster 3 exactly as QEMU does, and the backing file / data file names
are written into the header.  Used by blockdev-create and
blockdev-snapshot-sync.
"""

from __future__ import annotations

import struct
from typing import Any

from ...qapi.cstr import c_bytes
from ...qapi.errors import GenericError
from ..node import BlockNode
from .crypt import setup_encryption
from .driver import Qcow2Node
from .header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    Extension,
    Header,
    feature_table,
)
from .refcount import set_entry


def _check(size: int, version: int, cluster_size: int, refcount_bits: int,
           lazy_refcounts: bool, extended_l2: bool, data_file_raw: bool, has_data_file: bool,
           backing_file: str | None, compression_type: str, preallocation: str) -> None:
    """QEMU's qcow2_co_create validation, with its messages."""
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise GenericError("Cluster size must be a power of two between 512 and 2048k")
    if size % 512:
        raise GenericError("Image size must be a multiple of 512 bytes")
    if refcount_bits > 64 or refcount_bits & (refcount_bits - 1) or refcount_bits < 1:
        raise GenericError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3:
        if refcount_bits != 16:
            raise GenericError("Different refcount widths than 16 bits require compatibility "
                               "level 1.1 or above (use version=v3 or greater)")
        if lazy_refcounts:
            raise GenericError("Lazy refcounts only supported with compatibility level 1.1 "
                               "and above (use version=v3 or greater)")
        if has_data_file:
            raise GenericError("External data files are only supported with compatibility "
                               "level 1.1 and above (use version=v3 or greater)")
        if extended_l2:
            raise GenericError("Extended L2 entries are only supported with compatibility "
                               "level 1.1 and above (use version=v3 or greater)")
        if compression_type != "zlib":
            raise GenericError("Non-zlib compression type is only supported with "
                               "compatibility level 1.1 and above (use version=v3 or greater)")
    if data_file_raw and not has_data_file:
        raise GenericError("data-file-raw requires data-file")
    if data_file_raw and backing_file:
        raise GenericError("Backing file and data-file-raw cannot be used at the same time")
    if extended_l2 and cluster_size < 16384:
        raise GenericError("Extended L2 entries are only supported with cluster sizes "
                           "of at least 16 KB")
    if backing_file and preallocation != "off" and not extended_l2:
        raise GenericError("Backing file and preallocation can only be used at the same "
                           "time if extended_l2 is on")
    if compression_type not in ("zlib", "zstd"):
        raise GenericError(f"Unknown compression type '{compression_type}'")


async def create_qcow2(file: BlockNode, size: int, *, version: int = 3,
                       cluster_size: int = 65536, refcount_bits: int = 16,
                       lazy_refcounts: bool = False, extended_l2: bool = False,
                       compression_type: str = "zlib", backing_file: str | None = None,
                       backing_fmt: str | None = None, data_file: BlockNode | None = None,
                       data_file_name: str | None = None, data_file_raw: bool = False,
                       preallocation: str = "off", encrypt: Any = None) -> None:
    """Format ``file`` (a writable node, any protocol) as a qcow2 image of ``size`` bytes.

    ``data_file`` is the node holding the guest data (external data file) and
    ``data_file_name`` the name recorded in the header for it.  ``encrypt``
    (QCryptoBlockCreateOptions) gives the image a LUKS header after the L1
    table, as QEMU lays it out (:mod:`.crypt`).  Errors are
    ``GenericError`` with QEMU's text; I/O errors are ``OSError``.
    """
    _check(size, version, cluster_size, refcount_bits, lazy_refcounts, extended_l2,
           data_file_raw, data_file is not None, backing_file, compression_type, preallocation)
    if size >= 2**63:
        size -= 2**64  # the QAPI uint64 reaches blk_truncate() as an int64_t
    cs = cluster_size
    cbits = cs.bit_length() - 1
    order = refcount_bits.bit_length() - 1
    h = Header(version=version, cluster_bits=cbits, size=0, refcount_table_offset=cs,
               refcount_table_clusters=1, refcount_order=order,
               header_length=112 if version >= 3 else 72)
    if version >= 3:
        if lazy_refcounts:
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS
        if extended_l2:
            h.incompatible_features |= INCOMPAT_EXTL2
        if data_file is not None:
            h.incompatible_features |= INCOMPAT_DATA_FILE
            if data_file_raw:
                h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
        if compression_type == "zstd":
            h.incompatible_features |= INCOMPAT_COMPRESSION
            h.compression_type = COMPRESSION_ZSTD
        else:
            h.compression_type = COMPRESSION_ZLIB
        if data_file is not None and data_file_name:
            h.extensions.append(Extension(EXT_DATA_FILE, c_bytes(data_file_name)))
        if cs >= 8192:  # qemu-img leaves the feature table out of smaller clusters
            h.extensions.append(Extension(EXT_FEATURE_TABLE, feature_table()))
    head = h.pack()
    if len(head) > cs:
        raise GenericError("Header too large for the cluster size")
    reftable = bytearray(cs)
    struct.pack_into(">Q", reftable, 0, 2 * cs)
    refblock = bytearray(cs)
    for c in range(3):
        set_entry(refblock, c, order, 1)
    if file.length:
        await file.truncate(0, exact=True)
    await file.write(0, head.ljust(cs, b"\0") + bytes(reftable) + bytes(refblock))
    await file.flush()

    # grow it with our own driver (L1 table, preallocation, header names)
    graph = file.graph
    node = Qcow2Node(graph, graph.auto_name(), read_only=False)
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": node.node_name, "file": file.node_name,
                  "backing": None}
    if data_file is not None:
        opts["data-file"] = data_file.node_name
    node.options = opts
    node.configure(opts)
    try:
        await node.open(opts)
        try:
            await node.truncate(size, prealloc=preallocation)
        except GenericError as e:
            raise e.prefixed("Could not resize image: ") from None
        if encrypt is not None:
            await setup_encryption(node, encrypt)
        if backing_file or (data_file is not None and data_file_name is None):
            await node.set_header_names(backing_file=backing_file, backing_fmt=backing_fmt)
        await node.close()
    finally:
        for edge in list(node.children.values()):
            edge.detach()


__all__ = ["create_qcow2", "EXT_BACKING_FORMAT"]
