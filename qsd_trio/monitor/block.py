"""QMP commands: block (blockdev.c, block/qapi.c, block/monitor/*, dirty bitmaps).

Replies follow qemu-storage-daemon 7.2 field for field.  qsd has no guest
devices, so there are no named BlockBackends: ``query-block`` is always
empty, ``query-blockstats`` lists nodes only with ``query-nodes``, and node
level statistics are zero except ``wr_highest_offset``, as QEMU keeps the
counters on BlockBackends.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..jobs.blockjob import BlockJob
from ..nodes import bitmaps, child_change, latency
from ..nodes.bitmaps import DirtyBitmap
from ..nodes.node import BdrvChild, BlockNode, BlockParent, Perm
from ..nodes.perms import perm_list, refresh
from ..qapi.errors import GenericError
from ..qapi.schema import to_qmp
from .registry import command

if TYPE_CHECKING:
    from ..daemon import Daemon

# -- blockdev-add / -del / -reopen ------------------------------------------------


@command("blockdev-add")
async def blockdev_add(daemon: Daemon, args: Any) -> Any:
    await daemon.graph.add(to_qmp(args))


@command("blockdev-del")
async def blockdev_del(daemon: Daemon, args: Any) -> Any:
    await daemon.graph.delete(args.node_name)


@command("x-blockdev-change")
async def x_blockdev_change(daemon: Daemon, args: Any) -> Any:
    """qmp_x_blockdev_change: remove the parent's child named ``child``,
    or add the node ``node`` as a new child (only quorum takes either)."""
    parent = daemon.graph.lookup_bs(args.parent)
    if (args.child is None) == (args.node is None):
        raise GenericError("The parameters child and node are in conflict" if args.child
                           else "Either child or node must be specified")
    if args.child is not None:
        edge = parent.children.get(args.child)
        if edge is None:
            raise GenericError(f"Node '{args.parent}' does not have child '{args.child}'")
        await child_change.del_child(parent, edge)
    else:
        node = daemon.graph.nodes.get(args.node)
        if node is None:
            raise GenericError(f"Node '{args.node}' not found")
        await child_change.add_child(parent, node)


_REOPENABLE = {"driver", "node-name", "read-only", "auto-read-only", "detect-zeroes",
               "discard", "cache"}


@command("blockdev-reopen")
async def blockdev_reopen(daemon: Daemon, args: Any) -> Any:
    graph = daemon.graph
    plans = []
    for opts in args.options:
        o = to_qmp(opts)
        name = o.get("node-name")
        if name is None:
            raise GenericError("node-name not specified")
        node = graph.find_node(name)
        if o.get("driver") != node.driver:
            raise GenericError("Cannot change the option 'driver'")
        # discard left out keeps the node's setting (QEMU starts from the
        # node's open flags); detect-zeroes is checked against it, then the
        # driver's own options (drv->bdrv_reopen_prepare), then changed
        # options, for every node before any node changes
        eff = _kept_discard(node, o)
        if eff.get("detect-zeroes") == "unmap" and eff.get("discard") != "unmap":
            raise GenericError("setting detect-zeroes to unmap is not allowed without "
                               "setting discard operation to unmap")
        node.reopen_check(eff)
        for key, val in o.items():
            if key in _REOPENABLE or key in node.reopenable:
                continue
            if key == "force-share":
                # QEMU 7.2 answers this to any force-share in blockdev-reopen,
                # whatever the node's own value (differential test)
                raise GenericError("Cannot change the option 'force-share'")
            old = node.options.get(key)
            if isinstance(val, str) and isinstance(old, dict):
                continue  # a child given by name where it was defined inline
            if old != val:
                raise GenericError(f"Cannot change the option '{key}'")
        plans.append((node, o))
    for node, o in plans:
        await _reopen_one(node, o)


def _data_nodes(node: BlockNode) -> list[BlockNode]:
    """The node and, below it, the nodes that store its data (not backing)."""
    out = [node]
    for role, edge in node.children.items():
        if role in ("file", "data-file"):
            out += _data_nodes(edge.node)
    return out


async def set_read_only(node: BlockNode, ro: bool) -> None:
    """QEMU's bdrv_reopen_set_read_only, as jobs use it: stream and commit
    reopen the image they write read-write, and back afterwards.  The nodes
    below become writable before the node above, and read-only after it."""
    nodes = _data_nodes(node)
    for n in (nodes if ro else reversed(nodes)):
        if n.read_only != ro:
            await _reopen_one(n, {**n.options, "read-only": ro})


async def prepare_read_only_again(node: BlockNode) -> None:
    """The I/O half of a job's read-write reopen ending, when its work ends:
    the node and the nodes that store its data write out what only a
    writable node can and are flushed (BlockGraph.prepare_read_only)."""
    graph = node.graph
    for n in _data_nodes(node):
        if graph.nodes.get(n.node_name) is n and not n.read_only:
            await graph.prepare_read_only(n, keep_going=True)


def read_only_again(node: BlockNode) -> None:
    """The synchronous end of a job's read-write reopen, for its clean step:
    the job flushed the nodes when its work ended and has let go of them, so
    no I/O is left to do, only the graph half (BlockGraph.commit_read_only:
    the flag, the options and the permissions, which drop the write lock)."""
    for n in _data_nodes(node):
        if not n.read_only:
            node.graph.commit_read_only(n)


def _kept_discard(node: BlockNode, o: dict[str, Any]) -> dict[str, Any]:
    """``o`` as the node applies it: discard left out keeps the node's
    setting, as QEMU's reopen starts from the node's open flags."""
    return o if "discard" in o or not node.discard_unmap else {**o, "discard": "unmap"}


async def _reopen_one(node: BlockNode, given: dict[str, Any]) -> None:
    """Reopen ``node`` with the options ``given``, which it keeps as its own."""
    o = _kept_discard(node, given)
    async with node.drained():
        # the driver's own options (qcow2: caches, overlap-check): checked
        # and the caches flushed first, applied once the rest succeeded
        commit = await node.reopen_prepare(o)
        old = (node.read_only, node.detect_zeroes, node.discard_unmap)
        ro = bool(o.get("read-only", False))
        if ro and not node.read_only:
            await node.graph.prepare_read_only(node)
        if not ro and node.read_only:
            await node.reopen_rw()
        was_read_only = node.read_only
        node.read_only = ro
        try:
            node.configure(o)
            refresh(node)
        except BaseException:
            node.read_only, node.detect_zeroes, node.discard_unmap = old
            with contextlib.suppress(Exception):
                refresh(node)
            raise
        if commit is not None:
            commit()
        node.options = given
        if was_read_only and not ro:
            await node.became_writable()


# -- queries -----------------------------------------------------------------------


def _backing(node: BlockNode) -> BlockNode | None:
    e = node.children.get("backing")
    return e.node if e else None


def _filter_or_cow(node: BlockNode) -> BlockNode | None:
    """bdrv_filter_or_cow_bs: the backing node, else a filter's filtered child."""
    below = _backing(node)
    if below is None and node.shows_filtered_child:
        prim = node.primary_child()
        below = prim.node if prim else None
    return below


def image_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"virtual-size": node.length, "filename": node.filename,
                  "format": node.driver}
    size = node.actual_size()
    if size is not None:
        info["actual-size"] = size
    if node.has_info:
        info["dirty-flag"] = False
    info.update(node.info_extra())
    if not flat:
        below = _filter_or_cow(node)
        if below is not None:
            info["backing-image"] = image_info(below, flat)
    return info


def block_device_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    if node.ejected:
        raise GenericError(f"Block device {node.node_name} is ejected")
    # bdrv_block_device_info counts the levels of "backing-image" it nests,
    # filters included, and nothing with flat=true
    depth = 0
    if not flat:
        b = _filter_or_cow(node)
        while b is not None:
            depth += 1
            b = _filter_or_cow(b)
    d = {
        "file": node.filename,
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver,
        "backing_file_depth": depth,
        "encrypted": node.encrypted,
        "detect_zeroes": node.detect_zeroes,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image_info(node, flat),
        "cache": {"writeback": True, "direct": node.cache_direct,
                  "no-flush": node.cache_no_flush},
        "write_threshold": node.write_threshold,
    }
    backing = _backing(node)
    if backing is not None and not node.is_filter:
        # a filter's "backing" child (mirror_top, commit_top) names no
        # backing file in an image header
        d["backing_file"] = backing.filename
    if node.bitmaps:
        d["dirty-bitmaps"] = [bm.info() for bm in reversed(node.bitmaps.values())]
    return d


@command("query-named-block-nodes")
async def query_named_block_nodes(daemon: Daemon, args: Any) -> Any:
    flat = bool(args and args.flat)
    return [block_device_info(n, flat) for n in daemon.graph.newest_first()]


@command("query-block")
async def query_block(daemon: Daemon, args: Any) -> Any:
    return []  # no BlockBackends with a name or device in a storage daemon


_COUNTERS = ("rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
             "unmap_operations", "flush_operations", "rd_total_time_ns", "wr_total_time_ns",
             "unmap_total_time_ns", "flush_total_time_ns", "rd_merged", "wr_merged",
             "unmap_merged", "failed_rd_operations", "failed_wr_operations",
             "failed_unmap_operations", "failed_flush_operations", "invalid_rd_operations",
             "invalid_wr_operations", "invalid_unmap_operations", "invalid_flush_operations")
# BlockDeviceStats's total-time counter and histogram per latency operation
_TIMED = {"read": ("rd_total_time_ns", "rd_latency_histogram"),
          "write": ("wr_total_time_ns", "wr_latency_histogram"),
          "discard": ("unmap_total_time_ns", None),
          "flush": ("flush_total_time_ns", "flush_latency_histogram")}


def _stats(node: BlockNode, counted: bool) -> dict[str, Any]:
    """BlockDeviceStats; zeros but for wr_highest_offset unless ``counted``
    (QEMU counts requests in BlockBackends, never in nodes)."""
    s: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
    if counted:
        for k in _COUNTERS:
            s[k] = node.stats.get(k, 0)
        if node.latency is not None:
            for op, (total, hist) in _TIMED.items():
                lat = node.latency[op]
                s[total] = lat.total_ns
                if hist is not None:
                    s[hist] = {"boundaries": list(latency.BOUNDS_NS), "bins": list(lat.counts)}
    s.update({"wr_highest_offset": node.wr_highest_offset, "timed_stats": [],
              "account_invalid": False, "account_failed": False})
    return s


def _node_stats(node: BlockNode, counted: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"node-name": node.node_name, "stats": _stats(node, counted)}
    ds = node.driver_stats()
    if ds is not None:
        d["driver-specific"] = ds
    f = node.children.get("file")
    if f is not None:
        d["parent"] = _node_stats(f.node, counted)
    b = node.children.get("backing")
    if b is not None:
        d["backing"] = _node_stats(b.node, counted)
    return d


@command("query-blockstats")
async def query_blockstats(daemon: Daemon, args: Any) -> Any:
    if not (args and args.query_nodes):
        return []
    return [_node_stats(n) for n in daemon.graph.nodes.values()]


@command("x-query-node-stats")
async def x_query_node_stats(daemon: Daemon, args: None) -> Any:
    """query-blockstats's node entries with the counters kept (qsd-trio)."""
    return [_node_stats(n, counted=True) for n in daemon.graph.nodes.values()]


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(daemon: Daemon, args: Any) -> Any:
    """bdrv_get_xdbg_block_graph: BlockBackends, then block jobs (newest
    first), then nodes in creation order, each followed by its edges (newest
    first); an object is numbered when first seen, as a node or as an edge's
    child; both lists are built by prepending."""
    ids: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    graph_nodes = {id(n) for n in daemon.graph.nodes.values()}
    backends: list[object] = []
    for n in daemon.graph.nodes.values():
        for e in reversed(n.parents):
            if not isinstance(e.parent, (BlockNode, BlockJob)) and \
                    all(u is not e.parent for u in backends):
                backends.append(e.parent)
    # in the order they were created (a job's target BlockBackend comes after
    # the export whose node the job's filter now holds)
    created: dict[int, int] = {}
    for n in daemon.graph.nodes.values():
        for e in n.parents:
            created[id(e.parent)] = min(created.get(id(e.parent), e.seq), e.seq)
    backends.sort(key=lambda u: created[id(u)])
    jobs = [j for j in reversed(daemon.jobs.values()) if isinstance(j, BlockJob)]

    def num(obj: object) -> int:
        if id(obj) not in ids:
            ids[id(obj)] = len(ids) + 1
        return ids[id(obj)]

    def add(obj: object, typ: str, name: str) -> None:
        nodes.insert(0, {"id": num(obj), "type": typ, "name": name})

    def edge(parent: object, e: BdrvChild) -> None:
        if id(e.node) in graph_nodes:
            edges.insert(0, {"parent": num(parent), "child": num(e.node),
                             "name": e.name, "perm": perm_list(e.perm),
                             "shared-perm": perm_list(e.shared)})

    for u in backends:
        add(u, "block-backend", "")
        for n in daemon.graph.nodes.values():
            for e in n.parents:
                if e.parent is u:
                    edge(u, e)
    for j in jobs:
        add(j, "block-job", j.id)
        for e in reversed(j.edges):
            edge(j, e)
    for n in daemon.graph.nodes.values():
        add(n, "block-driver", n.node_name)
        for e in reversed(list(n.children.values())):
            edge(n, e)
    return {"nodes": nodes, "edges": edges}


# -- resize and write threshold ------------------------------------------------------


class _ResizeUser(BlockParent):
    """The temporary BlockBackend block_resize opens (shown as QEMU shows it)."""


@command("block_resize")
async def block_resize(daemon: Daemon, args: Any) -> Any:
    node = daemon.graph.lookup_bs(args.device, args.node_name)
    if args.size < 0:
        raise GenericError("Parameter 'size' expects a >0 size")
    if node.read_only:
        raise GenericError("Image is read-only")
    edge = node.attach("root", _ResizeUser(), Perm.RESIZE, Perm.ALL)
    try:
        async with node.drained():
            await node.truncate(args.size, exact=False)
    finally:
        edge.detach()


@command("block-set-write-threshold")
async def block_set_write_threshold(daemon: Daemon, args: Any) -> Any:
    node = daemon.graph.nodes.get(args.node_name)
    if node is None:
        raise GenericError(f"Device '{args.node_name}' not found")
    node.write_threshold = args.write_threshold


# -- dirty bitmaps -------------------------------------------------------------------

MAX_BITMAP_NAME = 1023


def _bitmap(daemon: Daemon, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    return bitmaps.lookup(daemon.graph, node_name, name)


@command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(daemon: Daemon, args: Any) -> Any:
    node = daemon.graph.lookup_bs(args.node)
    name = args.name
    if not name:
        raise GenericError("Bitmap name cannot be empty")
    if len(name) > MAX_BITMAP_NAME:
        raise GenericError(f"Bitmap name too long: {name}")
    gran = args.granularity
    if gran is None:
        gran = node.default_bitmap_granularity()
    elif gran < 512 or gran & (gran - 1):
        raise GenericError("Granularity must be power of 2 and at least 512")
    if name in node.bitmaps:
        raise GenericError(f"Bitmap already exists: {name}")
    persistent = bool(args.persistent)
    if persistent:
        if not node.supports_persistent_bitmaps:
            raise GenericError(f"Can't store persistent bitmaps to {node.node_name}: "
                               "Operation not supported")
        node.check_persistent_bitmap(name, gran)
    node.add_bitmap(name, gran, persistent=persistent, enabled=not args.disabled)


@command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(daemon: Daemon, args: Any) -> Any:
    node, bm = _bitmap(daemon, args.node, args.name)
    bm.check()
    if bm.persistent:
        await node.remove_persistent_bitmap(args.name)
    del node.bitmaps[args.name]


@command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(daemon: Daemon, args: Any) -> Any:
    _node, bm = _bitmap(daemon, args.node, args.name)
    bm.check()
    bm.clear()


@command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(daemon: Daemon, args: Any) -> Any:
    _node, bm = _bitmap(daemon, args.node, args.name)
    bm.check(allow_ro=True)
    bm.enabled = True


@command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(daemon: Daemon, args: Any) -> Any:
    _node, bm = _bitmap(daemon, args.node, args.name)
    bm.check(allow_ro=True)
    bm.enabled = False


@command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(daemon: Daemon, args: Any) -> Any:
    _node, target = _bitmap(daemon, args.node, args.target)
    target.check()
    sources = []
    for src in args.bitmaps:
        if isinstance(src, str):
            sources.append(_bitmap(daemon, args.node, src)[1])
        else:
            s = to_qmp(src)
            sources.append(_bitmap(daemon, s["node"], s["name"])[1])
    for s in sources:
        s.check(allow_ro=True)
        if s.size != target.size:
            raise GenericError(f"Bitmaps are of different sizes ({s.size} and "
                               f"{target.size}) and cannot be merged")
    for s in sources:
        target.merge_from(s)


@command("x-debug-block-dirty-bitmap-sha256")
async def x_debug_block_dirty_bitmap_sha256(daemon: Daemon, args: Any) -> Any:
    _node, bm = _bitmap(daemon, args.node, args.name)
    return {"sha256": bm.sha256()}
