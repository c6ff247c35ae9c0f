"""The ``host_device`` and ``host_cdrom`` protocols: a block or character
device as the image.

``host_device`` is a ``file`` node with the device rules of QEMU's
file-posix host_device: the path must be a device, the size is the
device's and cannot grow, block status reports no holes (FileNode's fallback
when SEEK_HOLE fails), the allocated file size is reported as 0, and zeroing
or discarding goes to the device through fallocate (BLKZEROOUT/BLKDISCARD in
the kernel).  CSI drivers and KubeVirt-style setups hand qemu-storage-daemon
raw block volumes this way.

``host_cdrom`` is the same device opened for removable media, as QEMU's
cdrom_open: opened with O_NONBLOCK, so that a drive without a disc opens;
the medium is asked for with CDROM_DRIVE_STATUS on every request, and a
device that does not answer "disc present" (a drive without one, or any
device that is not a CD drive, such as a loop device) has no medium: reads,
writes, zero writes and discards fail with ENOMEDIUM, resizing with "No
medium inserted", and a flush does nothing.  With a disc in, it is
host_device without the extras QEMU's host_cdrom lacks: zero writes are
written as zeroes, discards do nothing, block status says "data" for all,
and the query shows no dirty-flag.  Eject and tray locking need a guest
device, which a storage daemon does not have.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Any

from ..qapi.errors import GenericError
from .file import FileNode
from .graph import register_driver
from .node import BlockNode, BlockStatus, ReadDone, Status, WriteDone

# linux/cdrom.h
CDROM_DRIVE_STATUS = 0x5326
CDSL_CURRENT = (1 << 31) - 1
CDS_DISC_OK = 4


@register_driver
class HostDeviceNode(FileNode):
    driver = "host_device"
    grows = False

    async def open(self, options: dict[str, Any]) -> None:
        path = options["filename"]
        if self.read_only and await self.graph.io.threads.call(os.path.isdir, path):
            # a directory opens read-only; raw_open_common's device check
            # then refuses it (read-write, the open itself fails)
            raise self._not_a_device(path)
        await super().open(options)
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            await self._close()
            raise self._not_a_device(path)

    def _not_a_device(self, path: str) -> GenericError:
        return GenericError(f"'{self.driver}' driver requires '{path}' to be either "
                            "a character or block device")

    def actual_size(self) -> int | None:
        return 0  # a device has no allocated file size (QEMU reports 0)

    def driver_stats(self) -> dict[str, Any] | None:
        # hdev_get_specific_stats: the file driver's counters, under its name
        stats = super().driver_stats()
        return None if stats is None else {**stats, "driver": self.driver}

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        # raw_co_truncate for a non-regular file
        if prealloc != "off":
            raise GenericError(f"Preallocation mode '{prealloc}' unsupported for this "
                               "non-regular file")
        if size != self._size and exact:
            raise GenericError("Cannot resize device files")
        if size > self._size:
            raise GenericError("Cannot grow device files")


def _no_medium() -> OSError:
    return OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))


@register_driver
class HostCdromNode(HostDeviceNode):
    driver = "host_cdrom"
    # cdrom_open: "open will not fail even if no CD is inserted"
    extra_open_flags = os.O_NONBLOCK

    def inserted(self) -> bool:
        """cdrom_co_is_inserted: the drive says a disc is in."""
        if self.fd < 0:
            return False
        try:
            return fcntl.ioctl(self.fd, CDROM_DRIVE_STATUS, CDSL_CURRENT) == CDS_DISC_OK
        except OSError:
            return False  # not a CD drive: no medium QEMU could use

    @property
    def has_info(self) -> bool:
        return False  # host_cdrom has no bdrv_get_info: no dirty-flag

    # the fast paths are not taken without a medium, so that the request
    # reaches the checks below
    def _preadv_now(self, offset: int, length: int) -> memoryview | None:
        return super()._preadv_now(offset, length) if self.inserted() else None

    def _preadv_into_now(self, offset: int, length: int, views: list[memoryview]) -> bool:
        return self.inserted() and super()._preadv_into_now(offset, length, views)

    def _pwritev_now(self, offset: int, mv: memoryview) -> bool:
        return self.inserted() and super()._pwritev_now(offset, mv)

    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        return self.inserted() and super()._preadv_submit(offset, length, done)

    def _preadv_into_submit(self, offset: int, length: int, views: list[memoryview],
                            done: WriteDone) -> bool:
        return self.inserted() and super()._preadv_into_submit(offset, length, views, done)

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        return self.inserted() and super()._pwritev_submit(offset, mv, done)

    def _pwritev_submit_vec(self, offset: int, length: int, views: list[memoryview],
                            done: WriteDone) -> bool:
        return self.inserted() and super()._pwritev_submit_vec(offset, length, views, done)

    # bdrv_co_preadv_part, bdrv_co_pwritev_part and bdrv_co_pdiscard fail
    # with ENOMEDIUM on a node without a medium
    async def _co_preadv(self, offset: int, length: int) -> bytes | memoryview:
        if not self.inserted():
            raise _no_medium()
        return await super()._co_preadv(offset, length)

    async def _co_preadv_into(self, offset: int, length: int, views: list[memoryview]) -> None:
        if not self.inserted():
            raise _no_medium()
        await super()._co_preadv_into(offset, length, views)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        if not self.inserted():
            raise _no_medium()
        await super()._co_pwritev(offset, data, fua)

    async def _co_pwritev_vec(self, offset: int, length: int, views: list[memoryview],
                              fua: bool) -> None:
        if not self.inserted():
            raise _no_medium()
        await super()._co_pwritev_vec(offset, length, views, fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        if not self.inserted():
            raise _no_medium()
        # no pwrite_zeroes in QEMU's host_cdrom: the generic layer writes zeroes
        await BlockNode._co_pwrite_zeroes(self, offset, length, may_unmap, fua, no_fallback)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        if not self.inserted():
            raise _no_medium()
        # and no pdiscard: a discard does nothing

    async def _co_flush(self) -> None:
        if self.inserted():  # bdrv_co_flush skips a node without a medium
            await super()._co_flush()

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        # no block status of its own: all data, at its own offset
        return BlockStatus(Status.DATA | Status.ALLOCATED | Status.OFFSET_VALID, length,
                           offset=offset)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        if not self.inserted():
            raise GenericError("No medium inserted")  # blk_truncate
        await super()._co_truncate(size, exact, prealloc)

    def driver_stats(self) -> dict[str, Any] | None:
        return None

