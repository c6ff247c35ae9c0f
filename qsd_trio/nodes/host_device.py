"""The ``host_device`` protocol: a block or character device as the image.

This is a ``file`` node with the device rules of QEMU's file-posix
host_device: the path must be a device, the size is the device's and cannot
grow, block status reports no holes (FileNode's fallback when SEEK_HOLE
fails), the allocated file size is reported as 0, and zeroing or
discarding goes to the device through fallocate (BLKZEROOUT/BLKDISCARD in
the kernel).
CSI drivers and KubeVirt-style setups hand qemu-storage-daemon raw block
volumes this way.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import trio

from ..qapi.errors import GenericError
from .file import FileNode
from .graph import register_driver


@register_driver
class HostDeviceNode(FileNode):
    driver = "host_device"
    grows = False

    async def open(self, options: dict[str, Any]) -> None:
        path = options["filename"]
        try:
            st = await trio.to_thread.run_sync(os.stat, path)
        except OSError as e:
            raise GenericError(f"Could not open '{path}': {e.strerror}") from None
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise GenericError(f"'host_device' driver requires '{path}' to be either "
                               "a character or block device")
        await super().open(options)

    def actual_size(self) -> int | None:
        return 0  # a device has no allocated file size (QEMU reports 0)

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        # raw_co_truncate for a non-regular file
        if prealloc != "off":
            raise GenericError(f"Preallocation mode '{prealloc}' unsupported for this "
                               "non-regular file")
        if size != self._size and exact:
            raise GenericError("Cannot resize device files")
        if size > self._size:
            raise GenericError("Cannot grow device files")
