"""The block graph: named nodes, the driver registry, blockdev-add/-del.

Drivers register with :func:`register_driver`; ``BlockGraph.add`` opens a
node from validated options (a dict in QAPI form: hyphenated keys, optional
members absent when not given, nested definitions as dicts, references to
existing nodes as strings).  A failed open leaves nothing behind.
"""

from __future__ import annotations

import itertools

from ..qapi.errors import DeviceNotFound, GenericError
from .node import BlockNode

DRIVERS: dict[str, type[BlockNode]] = {}


def register_driver(cls: type[BlockNode]) -> type[BlockNode]:
    DRIVERS[cls.driver] = cls
    return cls


class BlockGraph:
    """All nodes of one daemon.  Released by :meth:`close_all`."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}  # insertion order = creation order
        self._auto_names = itertools.count(0)

    def auto_name(self) -> str:
        # QEMU names implicitly created nodes "#blockNNN"
        return f"#block{next(self._auto_names):03d}"

    def lookup(self, name: str) -> BlockNode:
        """The node called ``name``, with QEMU's error for a missing one."""
        try:
            return self.nodes[name]
        except KeyError:
            raise DeviceNotFound(f"Cannot find device={name} nor node-name={name}") from None

    def find_node(self, name: str) -> BlockNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise GenericError(f"Failed to find node with node-name='{name}'") from None

    async def add(self, options: dict) -> BlockNode:
        """blockdev-add: open a node (and nested children) from ``options``."""
        name = options.get("node-name")
        if name is not None and name in self.nodes:
            raise GenericError(f"Duplicate nodes with node-name='{name}'")
        cls = DRIVERS[options["driver"]]
        node = cls(self, name or self.auto_name(), read_only=options.get("read-only", False))
        node.options = options
        await node.open(options)
        self.nodes[node.node_name] = node
        return node

    async def delete(self, name: str) -> None:
        node = self.find_node(name)
        if node.parents:
            raise GenericError(f"Node '{name}' is busy: block device is in use by {node.parents[0].name}")
        del self.nodes[name]
        await node.close()

    async def close_all(self) -> None:
        """Drain, flush and close every node, parents before children."""
        # creation order puts children first; close in reverse
        for name in reversed(list(self.nodes)):
            node = self.nodes.pop(name)
            try:
                await node.close()
            except Exception:  # noqa: BLE001 - shutdown closes the rest regardless
                pass
