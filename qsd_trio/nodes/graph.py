"""The block graph: named nodes, the driver registry, blockdev-add/-del.

Drivers register with :func:`register_driver`; ``BlockGraph.add`` opens a
node from validated options (a dict in QAPI form: hyphenated keys, optional
members absent when not given, nested definitions as dicts, references to
existing nodes as strings).  Nested children are opened first, get
``#blockNNN`` names when they have none, and inherit the options QEMU lets a
child inherit.  A failed open leaves nothing behind: every node it created is
closed and forgotten and every edge it made is dropped.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import re
from collections.abc import Iterable
from typing import Any

import trio

from .. import trace
from ..qapi.errors import DeviceNotFound, GenericError, QapiError
from .engine import Engines
from .node import BdrvChild, BlockNode, BlockParent, Perm
from .perms import refresh
from .throttle_group import ThrottleGroup

DRIVERS: dict[str, type[BlockNode]] = {}
TIMER_TICK = 1.0  # seconds between calls of BlockNode.periodic

# the largest image QEMU opens: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT
BDRV_MAX_LENGTH = (2**63 - 1) & ~((1 << 30) - 1)

_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")

# options a nested file/data-file child takes from its parent unless given
# options a nested child takes from its parent unless it sets them
# (bdrv_inherited_options); a backing child defaults to read-only instead
_INHERITED = ("read-only", "auto-read-only")


def register_driver(cls: type[BlockNode]) -> type[BlockNode]:
    DRIVERS[cls.driver] = cls
    return cls


# driver name -> the module that registers it.  A module is imported when
# a node of one of its drivers is first opened, so that a daemon loads only
# the drivers it uses (qcow2 brings crypto and zstandard, nbd the protocol
# codec, rbd the ctypes bindings): about 15 ms less to the pidfile.
DRIVER_MODULES = {
    "null-co": "null", "null-aio": "null", "file": "file", "host_device": "host_device",
    "raw": "raw", "blkdebug": "blkdebug", "copy-on-read": "copy_on_read", "throttle": "throttle",
    "qcow2": "qcow2", "copy-before-write": "copy_before_write",
    "snapshot-access": "snapshot_access", "luks": "luks", "nbd": "nbd", "rbd": "rbd",
    "vdi": "vdi", "vpc": "vpc", "vhdx": "vhdx",
    "qed": "qed",
    "parallels": "parallels",
    "qcow": "qcow",
    "vmdk": "vmdk",
    "bochs": "bochs",
    "cloop": "cloop",
    "dmg": "dmg",
    "preallocate": "preallocate", "compress": "compress", "blkverify": "blkverify",
    "quorum": "quorum",
    "blklogwrites": "blklogwrites",
    "host_cdrom": "host_device",
}


def driver_class(name: str) -> type[BlockNode] | None:
    """The class of driver ``name``, importing its module on first use;
    None for a driver qsd-trio does not have."""
    cls = DRIVERS.get(name)
    if cls is None and name in DRIVER_MODULES:
        importlib.import_module(f"{__package__}.{DRIVER_MODULES[name]}")
        cls = DRIVERS.get(name)
    return cls


def load_drivers() -> dict[str, type[BlockNode]]:
    """Import every driver module so that it registers itself (for the
    feature table and the tests that list drivers)."""
    for mod in dict.fromkeys(DRIVER_MODULES.values()):
        importlib.import_module(f"{__package__}.{mod}")
    return DRIVERS


class BlockGraph:
    """All nodes of one daemon.  Released by :meth:`close_all`."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}  # insertion order = creation order
        self._auto_names = itertools.count(0)
        self._tx: list[list[BlockNode]] = []  # nodes created by the add() in progress
        self.io = Engines()  # the I/O engines file nodes submit to, made on first use
        # the daemon's services that drivers use, by id, so that they need
        # not know about QOM objects: ``secret`` objects' bytes (key-secret)
        # and throttle groups (the throttle filter's throttle-group)
        self.secrets: dict[str, bytes] = {}
        self.throttle_groups: dict[str, ThrottleGroup] = {}
        # the daemon's QOM objects by id (the same dict as Daemon.objects):
        # driver=nbd reads its tls-creds object
        self.objects: dict[str, Any] = {}

    def auto_name(self) -> str:
        # QEMU names implicitly created nodes "#blockNNN"
        return f"#block{next(self._auto_names):03d}"

    def lookup(self, name: str) -> BlockNode:
        """The node called ``name``, with QEMU's error for a missing one."""
        try:
            return self.nodes[name]
        except KeyError:
            raise DeviceNotFound(f"Cannot find device={name} nor node-name={name}") from None

    def lookup_bs(self, device: str | None, node_name: str | None = "\0same") -> BlockNode:
        """bdrv_lookup_bs(device, node_name); with one argument, (name, name).

        ``device`` names a BlockBackend, and a storage daemon has none, so
        only ``node_name`` can match: ``block_resize device=NODE`` fails as in
        qemu-storage-daemon, while commands that pass one name for both
        (bitmaps, internal snapshots, jobs) find the node.
        """
        if node_name == "\0same":
            node_name = device
        if node_name is not None and node_name in self.nodes:
            return self.nodes[node_name]
        raise GenericError(f"Cannot find device='{device or ''}' nor "
                           f"node-name='{node_name or ''}'")

    def find_node(self, name: str) -> BlockNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise GenericError(f"Failed to find node with node-name='{name}'") from None

    def newest_first(self) -> list[BlockNode]:
        """Nodes in the order QEMU's query commands list them."""
        return list(reversed(self.nodes.values()))

    # -- opening -----------------------------------------------------------------
    async def add(self, options: dict[str, Any]) -> BlockNode:
        """blockdev-add: open a node (and nested children) from ``options``."""
        if options.get("node-name") is None:
            raise GenericError("'node-name' must be specified for the root node")
        created: list[BlockNode] = []
        self._tx.append(created)
        try:
            node = await self.open_node(options)
        except BaseException:
            await self._rollback(created)
            raise
        finally:
            self._tx.pop()
        node.monitor_owned = True
        trace.event("bdrv_open", node_name=node.node_name, driver=node.driver)
        return node

    def check_new_node_name(self, name: str) -> None:
        """bdrv_assign_node_name's checks for a node about to be created."""
        if not _NODE_NAME.match(name):
            raise GenericError(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise GenericError(f"Duplicate nodes with node-name='{name}'")
        if len(name) >= 32:
            raise GenericError("Node name too long")

    async def open_node(self, options: dict[str, Any]) -> BlockNode:
        """Open a node (and its nested children) from ``options`` without
        making it monitor-owned: an implicit node (``#blockNNN`` unless named)
        that lives as long as its users; inside :meth:`add` a failure closes
        every node it made.  Raises GenericError with QEMU's text."""
        name = options.get("node-name")
        if name is not None:
            self.check_new_node_name(name)
        drv = options.get("driver")
        cls = driver_class(drv) if isinstance(drv, str) else None
        if cls is None:
            raise GenericError(f"Unknown driver '{drv}'")
        node = cls(self, name or self.auto_name(), read_only=bool(options.get("read-only", False)))
        node.options = options
        if self._tx:
            self._tx[-1].append(node)
        node.configure(options)
        await node.open(options)
        # bdrv_open_driver -> bdrv_refresh_total_sectors, for every driver
        if -(-node.length // 512) * 512 > BDRV_MAX_LENGTH:
            raise GenericError("Could not refresh total sector count: File too large")
        self.nodes[node.node_name] = node
        return node

    async def _rollback(self, created: list[BlockNode]) -> None:
        with trio.CancelScope(shield=True):
            for node in reversed(created):
                for edge in list(node.children.values()):
                    edge.detach()
                for edge in list(node.parents):
                    edge.detach()
                if self.nodes.get(node.node_name) is node:
                    del self.nodes[node.node_name]
                with contextlib.suppress(Exception):
                    await node._close()

    async def open_child(self, parent: BlockNode, options: dict[str, Any], role: str, *,
                         required: bool = True, inherit: bool = True) -> BdrvChild | None:
        """Open (nested dict) or find (node name) child ``role`` and attach it."""
        val = options.get(role)
        if val is None:
            if required:
                raise GenericError(f'A block device must be specified for "{role}"')
            return None
        if isinstance(val, str):
            child = self.nodes.get(val)
            if child is None:
                raise GenericError(f"Cannot find device='{val}' nor node-name='{val}'")
        else:
            copts = dict(val)
            if inherit:
                if "force-share" in options:
                    copts.setdefault("force-share", options["force-share"])
                if role == "backing":
                    copts.setdefault("read-only", True)
                    copts.setdefault("auto-read-only", False)
                else:
                    for k in _INHERITED:
                        if k in options and k not in copts:
                            copts[k] = options[k]
                    if parent.read_only:
                        copts.setdefault("read-only", True)
                # the parent applies its own discard policy; what it passes
                # down (qcow2 freeing clusters, say) reaches the file
                copts.setdefault("discard", "unmap")
                if "cache" in options:
                    copts["cache"] = {**options["cache"], **copts.get("cache", {})}
            child = await self.open_node(copts)
            # read-only because it was inherited, not asked for: jobs may
            # reopen it read-write (QEMU refuses for a user's read-only=on)
            child.implicit_read_only = child.read_only and "read-only" not in val
        return self.link(parent, child, role)

    def link(self, parent: BlockNode, child: BlockNode, role: str) -> BdrvChild:
        """Make ``child`` parent's ``role`` child with the permissions it needs."""
        if child is parent or parent in child.subtree():
            raise GenericError("Making '%s' a %s child of '%s' would create a cycle"
                               % (child.node_name, role, parent.node_name))
        edge = BdrvChild(role, child, parent, Perm(0), Perm.ALL)
        edge.perm, edge.shared = parent.child_perm(edge, parent.cum_perm, parent.cum_shared)
        edge.attach()
        return edge

    # -- filters inserted and dropped by jobs ------------------------------------------
    async def insert_filter(self, below: BlockNode, options: dict[str, Any]) -> BlockNode:
        """bdrv_insert_node: open a filter from ``options`` (whose filtered
        child names ``below``) and move every parent of ``below`` to it.

        ``below`` is drained meanwhile, so no request is in flight across the
        switch.  Parents that stay are the filter itself and users with
        ``stay_at_node`` set (block jobs, as QEMU's child_job).  A node name
        is optional (``#blockNNN`` otherwise); the filter is not monitor-owned.
        On any failure (open, permissions) nothing has changed and the error
        is raised.  Undone by :meth:`drop_filter`.
        """
        created: list[BlockNode] = []
        self._tx.append(created)
        try:
            filt = await self.open_node(options)
        except GenericError as e:
            await self._rollback(created)
            raise GenericError(f"Could not create node: {e.desc}") from None
        except BaseException:
            await self._rollback(created)
            raise
        finally:
            self._tx.pop()
        try:
            async with below.drained():
                self.replace_node(below, filt)
        except BaseException as e:
            await self._rollback(created)
            if isinstance(e, GenericError):
                raise GenericError(f"Could not replace node: {e.desc}") from None
            raise
        trace.event("bdrv_open", node_name=filt.node_name, driver=filt.driver)
        return filt

    def drop_filter(self, filt: BlockNode) -> None:
        """bdrv_drop_filter and the unref after it, for the graph: the
        parents of ``filt`` go back to its filtered (file) child, ``filt``
        leaves the graph and lets go of its children now, so that they can be
        deleted at once.  No new request reaches ``filt`` afterwards; the
        caller releases it with ``await filt.close()`` (requests already
        inside finish first).  Users with ``stay_at_node`` must have detached
        before.  Shrinking permissions cannot conflict, so this never fails.
        """
        # the filtered child: ``file`` (copy-on-read, copy-before-write) or
        # ``backing`` (mirror_top, commit_top)
        below = (filt.children.get("file") or filt.children["backing"]).node
        if self.nodes.get(filt.node_name) is filt:
            del self.nodes[filt.node_name]
        for edge in list(filt.children.values()):
            edge.detach()
        with contextlib.suppress(GenericError):
            self.replace_node(filt, below)

    def replace_node(self, old: BlockNode, new: BlockNode, *,
                     keep: Iterable[BdrvChild] = ()) -> None:
        """bdrv_replace_node: every parent of ``old`` uses ``new`` instead,
        except ``new`` itself, users with ``stay_at_node`` (block jobs) and
        the edges in ``keep``.

        Each moved edge becomes the newest parent of ``new`` and its parent's
        ``child_attached`` hook runs (an export's ``node``, qcow2's cached
        child nodes follow).  Then the permissions of both nodes are worked
        out again; on a conflict every edge goes back, and GenericError is
        raised with nothing changed.  Callers drain ``old`` first.
        """
        skip = set(map(id, keep))
        moved = [e for e in old.parents
                 if e.parent is not new and id(e) not in skip
                 and not (isinstance(e.parent, BlockParent) and e.parent.stay_at_node)]
        _move_edges(moved, old, new)
        try:
            refresh(new)
            refresh(old)
        except BaseException:
            _move_edges(moved[::-1], new, old)
            for n in (new, old):
                with contextlib.suppress(Exception):
                    refresh(n)
            raise

    # -- read-only transitions ----------------------------------------------------------
    # bdrv_reopen_set_read_only(bs, true) in two halves, because a job's
    # clean step (synchronous) can only do the second: blockdev-reopen does
    # the first inside its own reopen, a snapshot both for the old top and
    # the children it opened, a job the first when its work ends and the
    # second when it lets go of its nodes.
    async def prepare_read_only(self, node: BlockNode, *, keep_going: bool = False) -> None:
        """The I/O half: what the driver keeps only while writable is
        written out (qcow2 stores its persistent bitmaps and marks the image
        clean, as qcow2_reopen_prepare), then the node is flushed.

        Raises what the driver or the flush raise; with ``keep_going`` a
        driver that cannot store its state does not stop the flush (QEMU's
        snapshot and job paths ignore the reopen's errors).
        """
        try:
            await node.prepare_read_only()
        except (OSError, QapiError):
            if not keep_going:
                raise
        await node.flush()

    def commit_read_only(self, node: BlockNode) -> None:
        """The graph half: the node is read-only, says so in its options, and
        takes (and locks) no more than a reader; shrinking never conflicts."""
        node.read_only = True
        node.options = {**node.options, "read-only": True}
        with contextlib.suppress(Exception):
            refresh(node)

    async def reopen_read_only(self, node: BlockNode, *, keep_going: bool = False) -> None:
        """Both halves for ``node`` (nothing if it is read-only already)."""
        if node.read_only:
            return
        await self.prepare_read_only(node, keep_going=keep_going)
        self.commit_read_only(node)

    # -- deleting ------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        """blockdev-del, with QEMU's refusals."""
        node = self.find_node(name)
        # QEMU's order: a BlockBackend (export) on it, op blockers, monitor
        # ownership, other references
        users = [e.parent for e in node.parents if isinstance(e.parent, BlockParent)]
        if any(u.block_job_type is None for u in users):
            raise GenericError(f"Node {name} is in use")
        if users:
            # the op blocker of a block job on each of its nodes
            raise GenericError(f"Node '{name}' is busy: block device is in use by "
                               f"block job: {users[0].block_job_type}")
        for e in node.parents:
            # QEMU's op blocker on backing files names the overlay
            if isinstance(e.parent, BlockNode) and e.name == "backing":
                raise GenericError(f"Node '{name}' is busy: node is used as backing hd of "
                                   f"'{e.parent.node_name}'")
        if not node.monitor_owned:
            raise GenericError(f"Node {name} is not owned by the monitor")
        if node.parents:
            raise GenericError(f"Block device {name} is in use")
        node.monitor_owned = False
        await self.unref(node)

    async def unref(self, node: BlockNode) -> None:
        """bdrv_unref: close ``node`` if nobody uses it any more (no parent,
        not monitor-owned), and then the children nobody else uses."""
        if node.parents or node.monitor_owned or self.nodes.get(node.node_name) is not node:
            return
        del self.nodes[node.node_name]
        try:
            await node.close()
        finally:
            children = [e.node for e in node.children.values()]
            for edge in list(node.children.values()):
                edge.detach()
            for child in children:
                await self.unref(child)

    async def run_timers(self, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The graph's one timer task: about once a second, each node's
        ``periodic`` (qcow2's cache-clean-interval).  Runs until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(TIMER_TICK)
            now = trio.current_time()
            for node in list(self.nodes.values()):
                node.periodic(now)

    def drain_all_begin(self) -> None:
        """bdrv_drain_all_begin, at shutdown: filters stop holding requests
        back (a throttle filter lets its queue through), so the requests in
        flight end promptly and land before exports and nodes close.  Never
        ended: the nodes are about to close."""
        for node in list(self.nodes.values()):
            node.drain_begin()

    async def close_all(self) -> None:
        """Drain, flush and close every node, parents before children."""
        with trio.CancelScope(shield=True):
            while self.nodes:
                # a node no other node uses; users that are not nodes are gone by now
                top = [n for n in reversed(self.nodes.values())
                       if not any(isinstance(e.parent, BlockNode) for e in n.parents)]
                node = top[0] if top else next(reversed(self.nodes.values()))
                for edge in list(node.parents):
                    edge.detach()
                del self.nodes[node.node_name]
                try:
                    await node.close()
                except Exception:  # noqa: BLE001 - shutdown closes the rest regardless
                    pass
                for edge in list(node.children.values()):
                    edge.detach()
            await self.io.aclose()


def _move_edges(edges: list[BdrvChild], a: BlockNode, b: BlockNode) -> None:
    """Point ``edges`` (parents of ``a``) at ``b``; each becomes b's newest
    parent and, for a node parent, that parent's newest child, as
    bdrv_replace_child_noperm's detach and attach leave them."""
    for e in edges:
        a.parents.remove(e)
        e.node = b
        b.parents.insert(0, e)
        parent = e.parent
        if isinstance(parent, BlockNode):
            parent.children[e.name] = parent.children.pop(e.name)
        parent.child_attached(e)
