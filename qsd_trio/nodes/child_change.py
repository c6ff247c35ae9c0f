"""Children added and removed at run time: ``x-blockdev-change``.

QEMU lets a driver take new children and let go of some while it runs
(BlockDriver's bdrv_add_child and bdrv_del_child); in 7.2 only quorum does.
A driver says it can by subclassing :class:`ChildChange`; the checks every
driver shares (block.c's bdrv_add_child and bdrv_del_child) are the
functions :func:`add_child` and :func:`del_child`, which the QMP command
calls.
"""

from __future__ import annotations

from ..qapi.errors import GenericError
from .node import BdrvChild, BlockNode


class ChildChange(BlockNode):
    """A driver whose children x-blockdev-change may add and remove."""

    async def add_child(self, child: BlockNode) -> None:
        """Take ``child`` (which has no parent) as a new child, or raise
        GenericError with the driver's refusal."""
        raise NotImplementedError

    async def del_child(self, edge: BdrvChild) -> None:
        """Let go of child ``edge``, or raise GenericError with the
        driver's refusal."""
        raise NotImplementedError


async def add_child(parent: BlockNode, child: BlockNode) -> None:
    """bdrv_add_child: ``child`` becomes a child of ``parent``."""
    if not isinstance(parent, ChildChange):
        raise GenericError(f"The node {parent.node_name} does not support adding a child")
    if child.parents:
        raise GenericError(f"The node {child.node_name} already has a parent")
    await parent.add_child(child)


async def del_child(parent: BlockNode, edge: BdrvChild) -> None:
    """bdrv_del_child: ``parent`` lets go of its child ``edge`` (which the
    caller found among its children by name)."""
    if not isinstance(parent, ChildChange):
        raise GenericError(f"The node {parent.node_name} does not support removing a child")
    await parent.del_child(edge)
