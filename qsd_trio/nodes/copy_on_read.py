"""The ``copy-on-read`` filter: data read from a backing file is written
into the top image, so later reads find it there (QEMU's cor driver).

With ``bottom`` (as block-stream inserts it) only data that comes from the
layers down to ``bottom`` is copied; what lies below it, or nowhere, is not.
"""

from __future__ import annotations

from typing import Any

from .filter import FileFilter
from .graph import register_driver
from .node import BdrvChild, BlockNode, Buffer, Perm, Status


@register_driver
class CopyOnReadNode(FileFilter):
    driver = "copy-on-read"

    async def open(self, options: dict[str, Any]) -> None:
        self.file = await self.open_child(options, "file")
        self.bottom = options.get("bottom")
        self.request_alignment = self.file.node.request_alignment

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # the filter writes back unchanged data, hence write-unchanged
        return Perm(perm | Perm.WRITE_UNCHANGED), Perm(shared)

    def _bottom_depth(self) -> int | None:
        """How many layers down ``bottom`` is (1: the child itself)."""
        if self.bottom is None:
            return None
        node: BlockNode | None = self.file.node
        depth = 1
        while node is not None:
            if node.node_name == self.bottom:
                return depth
            edge = node.children.get("backing")
            node, depth = (edge.node if edge else None), depth + 1
        return None

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        child = self.file.node
        bottom = self._bottom_depth()
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            st = await child.block_status(pos, end - pos)
            n = max(1, min(st.length, end - pos))
            data = await child.read(pos, n)
            # depth 1: the child's own layer; ALLOCATED alone also flags data
            # its backing chain holds
            own = st.depth == 1 and bool(st.flags & Status.ALLOCATED)
            above_bottom = bottom is None or 0 < st.depth <= bottom
            if not own and above_bottom and not child.read_only:
                # from the backing chain: copy it up (write-unchanged)
                child.debug_event("cor_write")
                await child.write(pos, data)
            out += data
            pos += n
        return out

