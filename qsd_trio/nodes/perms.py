"""Permission arithmetic for graph edges (QEMU's bdrv_*_perms helpers).

A node's *cumulative* permissions are the union of what its parents take and
the intersection of what they share.  What a node then takes on each child
follows from the child's role: a filter passes everything through, a format
driver's ``file`` child is "storage" (metadata and data), a ``backing`` child
is only ever read.  The rules mirror block.c so that the same graphs give the
same conflicts (and the same file locks, hence the same interop with qemu-img).
"""

from __future__ import annotations

from typing import Any

from ..qapi.errors import GenericError
from .node import BdrvChild, BlockNode, Perm, parent_desc

# what refresh() changed, to undo on a conflict: ("node", node, old cumulative
# permissions) or ("edge", edge, old permissions)
_Tx = list[tuple[str, Any, tuple[Perm, Perm]]]

# BLK_PERM_* names as bdrv_perm_names() prints them in conflict messages
PERM_TEXT = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
# ... and as BlockPermission (QAPI) names them in x-debug-query-block-graph
PERM_QAPI = {
    Perm.CONSISTENT_READ: "consistent-read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write-unchanged",
    Perm.RESIZE: "resize",
}
BITS = (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)


def perm_names(perm: Perm) -> str:
    return ", ".join(PERM_TEXT[b] for b in BITS if perm & b)


def perm_list(perm: Perm) -> list[str]:
    # QEMU builds the list by prepending, so the highest bit comes first
    return [PERM_QAPI[b] for b in reversed(BITS) if perm & b]


def filter_perms(perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """bdrv_filter_default_perms: pass the parents' needs straight through."""
    return Perm(perm & Perm.ALL), Perm(shared & Perm.ALL)


def storage_perms(perm: Perm, shared: Perm, *, writable: bool, metadata: bool = True,
                  data: bool = True) -> tuple[Perm, Perm]:
    """bdrv_default_perms_for_storage: a format driver's file/data-file child."""
    perm, shared = filter_perms(perm, shared)
    if metadata:
        # the driver updates metadata even when no parent writes
        if writable:
            perm |= Perm.WRITE | Perm.RESIZE
        perm |= Perm.CONSISTENT_READ
        shared &= ~(Perm.WRITE | Perm.RESIZE)
    if data:
        shared &= ~Perm.RESIZE
        if perm & Perm.WRITE_UNCHANGED:
            perm |= Perm.WRITE
        if perm & Perm.WRITE:
            perm |= Perm.RESIZE
    return Perm(perm), Perm(shared)


def cow_perms(perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """bdrv_default_perms_for_cow: a backing child is only read."""
    perm = Perm(perm & Perm.CONSISTENT_READ)
    if shared & Perm.WRITE:
        new_shared = Perm.WRITE | Perm.RESIZE
    else:
        new_shared = Perm(0)
    new_shared |= Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    return perm, Perm(new_shared)


def _conflict(node: BlockNode, a: BdrvChild, b: BdrvChild) -> str | None:
    """bdrv_a_allow_b: does edge ``a`` share what edge ``b`` takes?"""
    missing = b.perm & ~a.shared
    if not missing:
        return None
    n = node.node_name
    return (f"Permission conflict on node '{n}': permissions '{perm_names(Perm(missing))}' "
            f"are both required by {parent_desc(b.parent)} (uses node '{n}' as "
            f"'{b.name}' child) and unshared by {parent_desc(a.parent)} (uses node "
            f"'{n}' as '{a.name}' child).")


def _update(node: BlockNode, tx: _Tx) -> None:
    for a in node.parents:
        for b in node.parents:
            if a is not b:
                msg = _conflict(node, a, b)
                if msg:
                    raise GenericError(msg)
    perm, shared = Perm(0), Perm.ALL
    for e in node.parents:
        perm |= e.perm
        shared &= e.shared
    if perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) and node.read_only:
        raise GenericError("Block node is read-only")
    if (perm, shared) != (node.cum_perm, node.cum_shared):
        old = (node.cum_perm, node.cum_shared)
        node._set_perm(perm, shared)
        tx.append(("node", node, old))
        node.cum_perm, node.cum_shared = perm, shared
    for edge in list(node.children.values()):
        np, ns = node.child_perm(edge, perm, shared)
        if edge.node.force_share:
            ns = Perm.ALL
        if (np, ns) != (edge.perm, edge.shared):
            tx.append(("edge", edge, (edge.perm, edge.shared)))
            edge.perm, edge.shared = np, ns
            _update(edge.node, tx)


def refresh(node: BlockNode) -> None:
    """Recompute permissions from ``node`` down; on a conflict undo and raise."""
    tx: _Tx = []
    try:
        _update(node, tx)
    except BaseException:
        for kind, obj, old in reversed(tx):
            if kind == "edge":
                obj.perm, obj.shared = old
            else:
                obj.cum_perm, obj.cum_shared = old
                try:
                    obj._set_perm(*old)
                except Exception:  # noqa: BLE001 - going back to what held before
                    pass
        raise
