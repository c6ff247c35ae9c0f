"""blockdev-create and image creation for drive-backup/drive-mirror (filled in below)."""

from __future__ import annotations

from typing import Any

from ..qapi.errors import GenericError


async def create_image(daemon: Any, filename: str, fmt: str, size: int) -> None:
    raise GenericError(f"Creating a '{fmt}' image is not supported by qsd-trio yet; "
                       "use mode=existing")
