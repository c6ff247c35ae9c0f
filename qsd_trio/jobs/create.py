"""blockdev-create (a job of type "create") and image creation for drive-*.

QEMU runs blockdev-create as a plain job (no BLOCK_JOB_* events) that the
client must dismiss: created, running, waiting, pending, concluded -- or
aborting, concluded with the driver's error in query-jobs.  Its progress is
0/1 until the driver returns, then 1/1 either way.

Drivers: ``file`` (created, emptied, then sized with the preallocation
asked for), ``qcow2`` (on an existing node, through the qcow2 driver's
``create_qcow2``, which lays images out byte for byte as qemu-img does,
LUKS encryption included), ``luks`` (a LUKS1 volume on an existing node),
``vpc`` (``create_vpc``, on an existing node), ``vhdx`` (``create_vhdx``,
on an existing node), ``qed`` (``create_qed``,
on an existing node), ``parallels`` (``create_parallels``, on an
existing node), ``qcow`` (``create_qcow``, on an existing node) and
``vmdk`` (``create_vmdk_on``: the image or descriptor on an existing node,
the extents on the nodes ``extents`` names).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..nodes import rbd
from ..nodes.luks import create_luks_on
from ..nodes.parallels import create_parallels
from ..nodes.qcow import create_qcow
from ..nodes.qcow2.create import create_qcow2
from ..nodes.qed import create_qed
from ..nodes.vhdx_create import create_vhdx
from ..nodes.vmdk_create import create_vmdk_on
from ..nodes.vpc import create_vpc
from ..qapi.errors import GenericError
from ..qapi.schema import to_qmp
from .job import Job

if TYPE_CHECKING:
    from ..daemon import Daemon
    from ..nodes.node import BlockNode


_V = TypeVar("_V")


def _or(value: _V | None, default: _V) -> _V:
    """An optional member's value, ``default`` when it is absent."""
    return default if value is None else value


def _str(value: str | None, default: str | None = None) -> str | None:
    """An optional enum (a QapiEnum, a str) member as a plain str."""
    return default if value is None else str(value)


def _create_file_sync(filename: str, size: int, prealloc: str) -> None:
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise GenericError(f"Could not create '{filename}': {e.strerror}") from None
    try:
        os.ftruncate(fd, 0)  # QEMU empties an existing file first
        os.ftruncate(fd, size)
        if size and prealloc == "falloc":
            os.posix_fallocate(fd, 0, size)
        elif size and prealloc == "full":
            chunk = bytes(min(size, 1 << 20))
            pos = 0
            while pos < size:
                pos += os.pwrite(fd, chunk[:min(len(chunk), size - pos)], pos)
    except OSError as e:
        raise GenericError(f"Could not resize file: {e.strerror}") from None
    finally:
        os.close(fd)


async def create_file(filename: str, size: int, prealloc: str = "off") -> None:
    if prealloc not in ("off", "falloc", "full"):
        raise GenericError(f"Unsupported preallocation mode '{prealloc}'")
    # the QAPI size is a uint64 that QEMU's file driver keeps in an int64_t
    # (off_t): 2^63 and above reach ftruncate() negative, which says EINVAL
    if size >= 2**63:
        size -= 2**64
    await trio.to_thread.run_sync(_create_file_sync, filename, size, prealloc)


async def create_qcow2_on(daemon: Daemon, o: Any) -> None:
    file = _node(daemon, o.file)
    data_file = None
    if o.data_file is not None:
        data_file = _node(daemon, o.data_file)
    version = {"v2": 2, "v3": 3}[str(_or(o.version, "v3"))]
    await create_qcow2(
        file, o.size, version=version,
        cluster_size=_or(o.cluster_size, 65536),
        refcount_bits=_or(o.refcount_bits, 16),
        lazy_refcounts=bool(o.lazy_refcounts),
        extended_l2=bool(o.extended_l2),
        compression_type=str(_or(o.compression_type, "zlib")),
        backing_file=o.backing_file, backing_fmt=_str(o.backing_fmt),
        data_file=data_file,
        data_file_name=data_file.filename if data_file is not None else None,
        data_file_raw=bool(o.data_file_raw),
        preallocation=str(_or(o.preallocation, "off")),
        encrypt=o.encrypt)


def _node(daemon: Daemon, ref: Any) -> BlockNode:
    if isinstance(ref, str):
        return daemon.graph.lookup_bs(ref)
    raise GenericError("qsd-trio: blockdev-create needs an existing node name for 'file'")


class CreateJob(Job):
    job_type = "create"
    is_block_job = False

    def __init__(self, daemon: Daemon, job_id: str, options: Any) -> None:
        # blockdev-create jobs must be dismissed by the client (JOB_MANUAL_DISMISS)
        super().__init__(daemon, job_id, auto_finalize=True, auto_dismiss=False)
        self.options = options

    async def run(self) -> None:
        o = self.options
        driver = str(o.driver)
        self.progress_total = 1
        try:
            if driver == "file":
                await create_file(o.filename, o.size, str(_or(o.preallocation, "off")))
            elif driver == "qcow2":
                await create_qcow2_on(self.daemon, o)
            elif driver == "luks":
                await create_luks_on(self.daemon.graph, _node(self.daemon, o.file), o)
            elif driver == "vpc":
                await create_vpc(_node(self.daemon, o.file), o.size, str(_or(o.subformat, "dynamic")),
                                 bool(o.force_size))
            elif driver == "vhdx":
                await create_vhdx(_node(self.daemon, o.file), o.size, log_size=o.log_size,
                                  block_size=o.block_size, subformat=_or(_str(o.subformat), "dynamic"),
                                  block_state_zero=_or(o.block_state_zero, True))
            elif driver == "qed":
                await create_qed(_node(self.daemon, o.file), o.size, backing_file=o.backing_file,
                                 backing_fmt=_str(o.backing_fmt), cluster_size=o.cluster_size,
                                 table_size=o.table_size)
            elif driver == "parallels":
                await create_parallels(_node(self.daemon, o.file), o.size, o.cluster_size)
            elif driver == "qcow":
                await create_qcow(_node(self.daemon, o.file), o.size, o.backing_file,
                                  None if o.encrypt is None else to_qmp(o.encrypt))
            elif driver == "vmdk":
                await create_vmdk_on(self.daemon.graph, o, lambda ref: _node(self.daemon, ref))
            elif driver == "rbd":
                await rbd.create(self.daemon.graph, to_qmp(o.location), o.size,
                                 o.cluster_size, None if o.encrypt is None else to_qmp(o.encrypt))
            else:
                raise GenericError(f"Driver '{driver}' does not support blockdev-create")
        finally:
            self.progress_current = 1


async def create_image(daemon: Daemon, filename: str, fmt: str, size: int,
                       backing_file: str | None = None, backing_fmt: str | None = None) -> None:
    """drive-backup/drive-mirror mode=absolute-paths: make the target image."""
    if fmt not in ("raw", "qcow2"):
        raise GenericError(f"qsd-trio cannot create '{fmt}' images")
    await create_file(filename, size if fmt == "raw" else 0)
    if fmt == "qcow2":
        node = await daemon.graph.open_node({"driver": "file", "filename": filename})
        try:
            await create_qcow2(node, size, backing_file=backing_file, backing_fmt=backing_fmt)
        finally:
            del daemon.graph.nodes[node.node_name]
            await node.close()
