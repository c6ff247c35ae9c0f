"""The ``compress`` filter (BlockdevOptionsGenericFormat, QEMU 7.2's
block/filter-compress.c): every write becomes a compressed write on its
``file`` child, which must be a format that writes compressed clusters
(qcow2 here); any other child is refused at open with QEMU's
"Compression is not supported for underlying format: <driver>".

The node's request alignment is the child's cluster size
(compress_refresh_limits), so a write that covers part of a cluster is
padded as QEMU's generic layer pads it: the rest of the cluster is read,
and the whole cluster is written compressed.  A zero write covers its whole
clusters with a zero write on the child and its partial ones with such
padded compressed writes (bdrv_co_do_zero_pwritev).  As in QEMU, the child
refuses a compressed write to a cluster that is allocated already (EIO),
and stores a cluster that does not compress as it is.  Reads, discards,
flushes, block status and truncation pass through.
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from ..qapi.errors import GenericError
from .filter import FileFilter
from .graph import register_driver
from .node import json_filename


@register_driver
class CompressNode(FileFilter):
    driver = "compress"

    async def open(self, options: dict[str, Any]) -> None:
        self.file = await self.open_child(options, "file")
        child = self.file.node
        if not child.supports_compressed_writes:
            raise GenericError("Compression is not supported for underlying format: "
                               f"{child.driver}")
        cs = child.info_extra().get("cluster-size")
        self.cluster_size = int(cs) if cs else max(1, child.request_alignment)
        self.request_alignment = self.cluster_size
        # a padded write reads and then writes its clusters: one at a time
        # (QEMU serialises such requests)
        self._lock = trio.Lock()

    @property
    def filename(self) -> str:
        # a filter: QEMU spells it out (bdrv_refresh_filename)
        return json_filename(self._open_options_from_children())

    def info_extra(self) -> dict[str, Any]:
        # bdrv_get_info of a filter without one is its child's (cluster size)
        cs = self.file.node.info_extra().get("cluster-size")
        return {"cluster-size": cs} if cs else {}

    async def _write_clusters(self, offset: int, data: memoryview) -> None:
        """Compressed writes of the whole clusters ``data`` covers from the
        cluster-aligned ``offset`` (the last one may end at the image end)."""
        c = self.cluster_size
        child = self.file.node
        for i in range(0, len(data), c):
            await child.write_compressed(offset + i, data[i:i + c])

    async def _padded(self, offset: int, data: memoryview | None, length: int) -> None:
        """Write ``data`` (zeroes when None) at ``offset`` as compressed
        clusters, reading what the request does not cover (bdrv_pad_request)."""
        c = self.cluster_size
        size = self.length
        start = offset // c * c
        end = min(-(-(offset + length) // c) * c, size)
        if start == offset and end == offset + length and data is not None:
            await self._write_clusters(offset, data)
            return
        buf = bytearray(await self.file.node.read(start, end - start))
        if data is None:
            buf[offset - start:offset - start + length] = bytes(length)
        else:
            buf[offset - start:offset - start + length] = data
        await self._write_clusters(start, memoryview(buf))

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        async with self._lock:
            await self._padded(offset, data, len(data))
        if fua:
            await self.file.node.flush()

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        c = self.cluster_size
        end = offset + length
        a = -(-offset // c) * c  # the aligned middle [a, b)
        b = end // c * c
        if end == self.length:
            b = end  # a request up to the image end covers its last cluster
        async with self._lock:
            if a >= b:
                if no_fallback:
                    raise OSError(errno.ENOTSUP, "Operation not supported")
                await self._padded(offset, None, length)
                return
            if no_fallback and (offset < a or b < end):
                raise OSError(errno.ENOTSUP, "Operation not supported")
            if offset < a:
                await self._padded(offset, None, a - offset)
            await self.file.node.write_zeroes(a, b - a, may_unmap=may_unmap, fua=fua)
            if b < end:
                await self._padded(b, None, end - b)

