"""driver=rbd: a node whose data is a Ceph RBD image (QEMU 7.2's block/rbd.c).

Options are QEMU's ``BlockdevOptionsRbd``: ``pool``, ``namespace``,
``image``, ``conf``, ``snapshot``, ``user``, ``auth-client-required``,
``key-secret`` and ``server``.  ``encrypt`` (librbd's LUKS encryption) is
refused with QEMU's wording for a librbd without encryption support.  The
legacy ``rbd:pool[/namespace]/image[@snap][:opt=val...]`` file name is
parsed by :func:`parse_filename`, as qemu_rbd_parse_filename does (``conf``
and ``id`` are options, other pairs are handed to rados_conf_set).

Connecting follows qemu_rbd_connect step by step (rados_create, the conf
file, the key/value pairs, ``rbd_cache`` from cache.direct, the auth
settings, rados_connect, the pool and namespace), and its errors are
QEMU's.  Those blocking steps and rbd_open run on a worker thread, once per
open, so the event loop keeps serving other nodes meanwhile.

I/O: reads, writes, discard, write-zeroes and flush are librbd's
asynchronous calls through the ctypes layer in :mod:`.rbd_lib` (why ctypes
and how completions reach trio is said there).  Block status is
rbd_diff_iterate2 over whole objects when the image has a valid fast-diff
map, as QEMU 7.2 does, else "all data"; the call is synchronous in librbd
and in QEMU alike (it reads the object map, which librbd keeps in memory).
Resize is rbd_resize.  A snapshot is opened read-only, as in QEMU.

Resources: the rados handle, the pool context, the image and its completion
reaper belong to the node and are released by ``_close``.  I/O errors are
``OSError`` with librbd's errno.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..crypto import secrets
from ..qapi.errors import GenericError
from . import rbd_lib
from .graph import register_driver
from .node import BlockNode, BlockStatus, Buffer, ReadDone, Status, WriteDone, json_filename

if TYPE_CHECKING:
    from .graph import BlockGraph

# qemu_rbd_diff_iterate_cb's "stop here" return value
_EXIT_DIFF_ITERATE2 = -9000


def _next_tok(s: str, delim: str) -> tuple[str, str | None]:
    """qemu_rbd_next_tok: the token before an unescaped ``delim`` and the rest
    (None when there is no delimiter); a backslash escapes the next char."""
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 2
            continue
        if s[i] == delim:
            return s[:i], s[i + 1:]
        i += 1
    return s, None


def _unescape(s: str) -> str:
    """qemu_rbd_unescape: drop each backslash, keeping the char it escapes."""
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 1
        out.append(s[i])
        i += 1
    return "".join(out)


def parse_filename(filename: str) -> dict[str, Any]:
    """qemu_rbd_parse_filename: ``rbd:pool/[namespace/]image[@snap][:k=v...]``.

    Returns QAPI options; key/value pairs other than ``conf`` and ``id`` go
    to ``=keyvalue-pairs`` as a JSON list, as in QEMU."""
    if not filename.startswith("rbd:"):
        raise GenericError("File name must start with 'rbd:'")
    opts: dict[str, Any] = {}
    found, p = _next_tok(filename[4:], "/")
    if p is None:
        raise GenericError("Pool name is required")
    opts["pool"] = _unescape(found)
    if "@" in p:
        image, p = _next_tok(p, "@")
        if p is not None:
            snap, p = _next_tok(p, ":")
            opts["snapshot"] = _unescape(snap)
    else:
        image, p = _next_tok(p, ":")
    if "/" in image:
        ns, rest = _next_tok(image, "/")
        opts["namespace"] = _unescape(ns)
        image = rest or ""
    else:
        opts["namespace"] = ""
    opts["image"] = _unescape(image)
    pairs: list[str] = []
    while p is not None:
        name, p = _next_tok(p, "=")
        if p is None:
            raise GenericError(f"conf option {name} has no value")
        name = _unescape(name)
        value, p = _next_tok(p, ":")
        value = _unescape(value)
        if name == "conf":
            opts["conf"] = value
        elif name == "id":
            opts["user"] = value
        else:
            pairs += [name, value]
    if pairs:
        opts["=keyvalue-pairs"] = json.dumps(pairs)
    return opts


def _mon_host(servers: list[dict[str, Any]]) -> str:
    """qemu_rbd_mon_host: ``host:port`` entries joined by ';' (IPv6 bracketed)."""
    out = []
    for s in servers:
        host, port = s["host"], s["port"]
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return ";".join(out)


def _err(exc: OSError, text: str) -> GenericError:
    """error_setg_errno's wording: ``text: strerror``."""
    return GenericError(f"{text}: {exc.strerror}")


def _connector(graph: BlockGraph, options: dict[str, Any], *,
               cache_direct: bool) -> Callable[[], rbd_lib.Cluster]:
    """qemu_rbd_connect for ``options`` (BlockdevOptionsRbd): what can be
    checked here is (librbd loaded, the key secret); the returned function
    does the blocking steps (for a worker thread) and returns the connected
    cluster with its pool open, or raises GenericError with QEMU's text."""
    try:
        rbd_lib.load()
    except rbd_lib.RbdUnavailable as e:
        raise GenericError(f"Unknown driver 'rbd' ({e})") from None
    pool: str = options["pool"]
    namespace: str = options.get("namespace", "")
    conf = options.get("conf")
    user = options.get("user")
    pairs: list[str] = json.loads(options.get("=keyvalue-pairs", "[]"))
    settings: list[tuple[str, str]] = []
    for i in range(0, len(pairs), 2):
        settings.append((pairs[i], pairs[i + 1]))
    settings.append(("rbd_cache", "false" if cache_direct else "true"))
    auth: list[tuple[str, str]] = []
    if "key-secret" in options:
        key = secrets.lookup(graph, options["key-secret"])
        auth.append(("key", base64.b64encode(key).decode()))
    if "auth-client-required" in options:
        auth.append(("auth_client_required", ";".join(options["auth-client-required"])))
    mon_host = _mon_host(options["server"]) if options.get("server") else None

    def connect() -> rbd_lib.Cluster:
        try:
            cluster = rbd_lib.Cluster(user)
        except OSError as e:
            raise _err(e, "error initializing") from None
        try:
            r = cluster.read_conf(conf)
            if conf is not None and r < 0:
                raise _err(OSError(-r, os.strerror(-r)), f"error reading conf file {conf}")
            if mon_host is not None:
                try:
                    cluster.conf_set("mon_host", mon_host)
                except OSError as e:
                    raise _err(e, "Could not set 'mon_host'") from None
            for k, v in settings:
                try:
                    cluster.conf_set(k, v)
                except OSError as e:
                    if k == "rbd_cache":
                        continue
                    raise _err(e, f"invalid conf option {k}") from None
            for k, v in auth:
                try:
                    cluster.conf_set(k, v)
                except OSError as e:
                    raise _err(e, f"Could not set '{k}'") from None
            try:
                cluster.connect()
            except OSError as e:
                raise _err(e, "error connecting") from None
            try:
                cluster.open_pool(pool, namespace)
            except OSError as e:
                raise _err(e, f"error opening pool {pool}") from None
            if namespace:
                try:
                    exists = cluster.namespace_exists(namespace)
                except OSError as e:
                    raise _err(e, "error checking namespace") from None
                if not exists:
                    raise GenericError(f"namespace '{namespace}' does not exist")
        except BaseException:
            cluster.close()
            raise
        return cluster

    return connect


async def create(graph: BlockGraph, location: dict[str, Any], size: int,
                 cluster_size: int | None = None, encrypt: dict[str, Any] | None = None) -> None:
    """blockdev-create for rbd (qemu_rbd_co_create / qemu_rbd_do_create):
    a new image of ``size`` bytes and object size ``cluster_size`` at
    ``location`` (BlockdevOptionsRbd as a dict)."""
    if "snapshot" in location:
        raise GenericError("Can't use snapshot name for image creation")
    order = 0  # librbd's default object size
    if cluster_size is not None:
        if (cluster_size - 1) & cluster_size:
            raise GenericError("obj size needs to be power of 2")
        if cluster_size < 4096:
            raise GenericError("obj size too small")
        order = cluster_size.bit_length() - 1
    if encrypt is not None:
        # QEMU looks the secret up (after creating the image, which it
        # removes again on failure); librbd encryption is not implemented
        if "key-secret" in encrypt:
            secrets.lookup(graph, encrypt["key-secret"])
        raise GenericError("RBD library does not support image encryption")
    connect = _connector(graph, location, cache_direct=False)
    image = location["image"]

    def run() -> None:
        cluster = connect()
        try:
            cluster.create_image(image, size, order)
        except OSError as e:
            raise _err(e, "error rbd create") from None
        finally:
            cluster.close()

    await trio.to_thread.run_sync(run)


@register_driver
class RbdNode(BlockNode):
    driver = "rbd"
    image: rbd_lib.Image
    cluster: rbd_lib.Cluster
    # open() connected and opened the image: _close has both to close
    _connected = False

    async def open(self, options: dict[str, Any]) -> None:
        self.pool: str = options["pool"]
        self.namespace: str = options.get("namespace", "")
        self.image_name: str = options["image"]
        self.snap: str | None = options.get("snapshot")
        connect = _connector(self.graph, options, cache_direct=self.cache_direct)

        def connect_and_open() -> tuple[rbd_lib.Cluster, rbd_lib.Image]:
            cluster = connect()
            try:
                # as QEMU: opened read-write, at the snapshot if one is named
                image = rbd_lib.Image(cluster, self.image_name, self.snap)
            except OSError as e:
                cluster.close()
                raise _err(e, f"error reading header from {self.image_name}") from None
            except BaseException:
                cluster.close()
                raise
            return cluster, image

        self.cluster, self.image = await trio.to_thread.run_sync(connect_and_open)
        self.image.engines = self.graph.io
        self._connected = True
        try:
            try:
                self.image_size, self.object_size = self.image.stat()
            except OSError as e:
                raise _err(e, f"error getting image info from {self.image_name}") from None
            if "encrypt" in options:
                # qemu_rbd_encryption_load looks the secret up first
                enc = options["encrypt"]
                if "key-secret" in enc:
                    secrets.lookup(self.graph, enc["key-secret"])
                raise GenericError("RBD library does not support image encryption")
            if self.snap is not None:
                # bdrv_apply_auto_read_only: a snapshot is never writable
                if not self.read_only:
                    if not self.auto_read_only:
                        raise GenericError("rbd snapshots are read-only")
                    self.read_only = True
        except BaseException:
            self._connected = False
            self.image.close()
            self.cluster.close()
            raise

    def _length(self) -> int:
        return self.image_size

    def actual_size(self) -> int | None:
        return None

    @property
    def has_info(self) -> bool:
        return True

    def info_extra(self) -> dict[str, Any]:
        # qemu_rbd_get_specific_info: type rbd, no encryption format
        extra: dict[str, Any] = {"cluster-size": self.object_size,
                                 "format-specific": {"type": "rbd", "data": {}}}
        try:
            snaps = self.image.snap_list()
        except OSError:
            snaps = []
        if snaps:
            # qemu_rbd_snap_list: the name is also the id; no dates or clocks
            extra["snapshots"] = [
                {"id": name, "name": name, "vm-state-size": size, "date-sec": 0,
                 "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0}
                for name, size in snaps]
        return extra

    @property
    def filename(self) -> str:
        """QEMU's generic refresh for a driver without exact_filename: the
        options as json:{...}."""
        opts = {k: v for k, v in self.options.items()
                if k in ("pool", "namespace", "image", "conf", "snapshot", "user",
                         "auth-client-required", "key-secret", "server", "encrypt",
                         "=keyvalue-pairs")}
        return json_filename({"driver": "rbd", **opts})

    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        return await self.image.read(offset, length)

    # requests an exporter starts without a task (BlockNode.read_submit and
    # write_submit): librbd's completion calls ``done`` from the reaper, so
    # an NBD request to an rbd node needs no request task of its own
    def _preadv_submit(self, offset: int, length: int, done: ReadDone) -> bool:
        try:
            self.image.submit_read(offset, length, done)
        except OSError:
            return False  # read() submits it again and reports the error
        return True

    def _pwritev_submit(self, offset: int, mv: memoryview, done: WriteDone) -> bool:
        try:
            self.image.submit_write(offset, mv, done)
        except OSError:
            return False
        return True

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self.image.write(offset, data)
        if fua:
            await self.image.flush()

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        # qemu_rbd_start_co: without MAY_UNMAP the zeroes are thick-provisioned
        flags = 0 if may_unmap else rbd_lib.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        await self.image.write_zeroes(offset, length, flags)
        if fua:
            await self.image.flush()

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self.image.discard(offset, length)

    async def _co_flush(self) -> None:
        await self.image.flush()

    async def _co_truncate(self, size: int, exact: bool, prealloc: str) -> None:
        if prealloc != "off":
            raise GenericError(f"Unsupported preallocation mode '{prealloc}'")
        try:
            self.image.resize(size)
        except OSError as e:
            raise _err(e, "Failed to resize file") from None
        self.image_size = size

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        """qemu_rbd_co_block_status: one run of allocated or unallocated data
        from ``offset``, found with rbd_diff_iterate2 over whole objects."""
        data = BlockStatus(Status.DATA | Status.OFFSET_VALID, length, offset=offset)
        try:
            if not self.image.features() & rbd_lib.RBD_FEATURE_FAST_DIFF:
                return data
            if self.image.flags() & rbd_lib.RBD_FLAG_FAST_DIFF_INVALID:
                return data
        except OSError:
            return data
        # librbd before 1.17 reports wrong offsets for a start inside an
        # object: start at the object's boundary (fine with whole objects)
        head = offset & (self.object_size - 1)
        start = offset - head
        total = length + head
        state = {"offs": start, "bytes": 0, "exists": False}

        def cb(offs: int, ln: int, exists: int) -> int:
            if not exists:
                return 0
            if not state["exists"] and offs > state["offs"]:
                state["bytes"] = offs - state["offs"]
                return _EXIT_DIFF_ITERATE2
            if state["exists"] and offs > state["offs"] + state["bytes"]:
                return _EXIT_DIFF_ITERATE2
            state["bytes"] += ln
            state["exists"] = True
            return 0

        r = self.image.diff_iterate(start, total, cb)
        if r < 0 and r != _EXIT_DIFF_ITERATE2:
            return data
        got = int(state["bytes"])
        if not state["exists"]:
            if r == 0:
                got = total
            st = Status.ZERO | Status.OFFSET_VALID
        else:
            st = Status.DATA | Status.OFFSET_VALID
        # runs start and end at object boundaries, so one covers the head
        return BlockStatus(st, min(got, total) - head, offset=offset)

    async def _close(self) -> None:
        if self._connected:
            self.image.close()
            self.cluster.close()


__all__ = ["RbdNode", "create", "parse_filename"]
