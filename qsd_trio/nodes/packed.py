"""Fixed-layout on-disk structures read into named fields.

The image formats describe a header (vdi), a footer (vpc) and the like as
one C struct; a subclass names its ``struct.Struct`` and the fields in
order, as QEMU's struct has them, and is read, changed and packed back by
those names.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar


class Packed:
    """A structure's fields by name, packed back by :meth:`pack`."""

    STRUCT: ClassVar[struct.Struct]
    FIELDS: ClassVar[tuple[str, ...]]

    def __init__(self, raw: bytes) -> None:
        self.fields: dict[str, Any] = dict(zip(self.FIELDS, self.STRUCT.unpack(raw), strict=True))

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.fields[name] = value

    def pack(self) -> bytes:
        return self.STRUCT.pack(*(self.fields[f] for f in self.FIELDS))
