"""Backing-chain surgery for stream and commit (bdrv_change_backing_file,
bdrv_set_backing_hd) and allocation queries over a chain.

Only called while the nodes concerned are drained, from a job's completion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..nodes.node import BlockNode

if TYPE_CHECKING:
    from ..nodes.graph import BlockGraph


def backing_of(node: BlockNode) -> BlockNode | None:
    edge = node.children.get("backing")
    return edge.node if edge else None


def chain(top: BlockNode) -> list[BlockNode]:
    """top, its backing, its backing's backing, ..."""
    out: list[BlockNode] = []
    n: BlockNode | None = top
    while n is not None:
        out.append(n)
        n = backing_of(n)
    return out


def depth_of(top: BlockNode, node: BlockNode | None) -> int:
    """1 for top itself, 2 for its backing, ...; one past the end for None."""
    c = chain(top)
    if node is None:
        return len(c) + 1
    return c.index(node) + 1


def find_backing_image(top: BlockNode, filename: str) -> BlockNode | None:
    """bdrv_find_backing_image: a node below ``top`` whose file name is ``filename``."""
    for n in chain(top)[1:]:
        if filename in (n.filename, n.node_name):
            return n
    return None


def overlay_of(top: BlockNode, node: BlockNode) -> BlockNode | None:
    """The node whose backing child is ``node`` in top's chain."""
    for n in chain(top):
        if backing_of(n) is node:
            return n
    return None


async def set_backing(graph: BlockGraph, node: BlockNode, new: BlockNode | None,
                      backing_file: str | None) -> None:
    """Make ``new`` the backing node of ``node`` and record it in the image.

    The image header is rewritten first (so a crash leaves the old, still
    complete, chain); then the graph edge moves and nodes nobody uses any
    more are closed.
    """
    await change_backing_file(node, backing_file, new.driver if new is not None else None)
    old_edge = node.children.get("backing")
    old = old_edge.node if old_edge else None
    # the driver's child hooks keep its cached backing node right
    if old_edge is not None:
        old_edge.detach()
    if new is not None:
        graph.link(node, new, "backing")
    if old is not None:
        await graph.unref(old)


async def change_backing_file(node: BlockNode, backing_file: str | None,
                              backing_fmt: str | None) -> None:
    """bdrv_change_backing_file: the name (and format) in the image header
    (qcow2; raw & co. record no backing file)."""
    await node.set_header_names(backing_file=backing_file, backing_fmt=backing_fmt)
