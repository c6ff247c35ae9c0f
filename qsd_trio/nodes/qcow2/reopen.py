"""blockdev-reopen of a qcow2 node: the options qcow2_reopen_prepare takes
through qcow2_update_options_prepare (QEMU 7.2 block/qcow2.c) and applies in
qcow2_update_options_commit: the L2 and refcount cache sizes, the L2 cache
entry size, cache-clean-interval, overlap-check, lazy-refcounts and
pass-discard-*.

An option left out of the reopen goes back to its default, as QEMU's
blockdev-reopen does not keep old options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...qapi.errors import GenericError
from ...qapi.ghash import qdict_order
from . import overlap
from .crypt import _NAMES
from .header import COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY
from .l2 import L2Cache, read_cache_sizes

if TYPE_CHECKING:
    from .driver import Qcow2Node

# the qcow2 options blockdev-reopen may change (qcow2_runtime_opts); encrypt.*
# is only checked against the header, as QEMU parses it on reopen and
# keeps using the cipher it opened with
REOPENABLE = frozenset({
    "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size", "cache-size",
    "cache-clean-interval", "overlap-check", "lazy-refcounts",
    "pass-discard-request", "pass-discard-snapshot", "pass-discard-other", "encrypt",
})


def check(node: Qcow2Node, options: dict[str, Any]) -> dict[str, Any]:
    """The settings ``options`` ask for, checked as
    qcow2_update_options_prepare does; raises GenericError with QEMU's
    texts.  blockdev-reopen calls it for every node before it changes any."""
    old_enc = node.options.get("encrypt")
    if isinstance(old_enc, dict) and options.get("encrypt") is None:
        # bdrv_reset_options_allowed, checked first: encrypt.* is not
        # among qcow2's mutable_opts
        keys = qdict_order(f"encrypt.{k}" for k in old_enc)
        raise GenericError(f"Option '{keys[0]}' cannot be reset to its default value")
    slices, slice_bytes, rc_blocks = read_cache_sizes(
        options, node.cs, node.size, 16 if node.extl2 else 8)
    lazy = bool(options.get("lazy-refcounts",
                            bool(node.h.compatible_features & COMPAT_LAZY_REFCOUNTS)))
    if lazy and node.version < 3:
        raise GenericError("Lazy refcounts require a qcow2 image with at least "
                           "qemu 1.1 compatibility level")
    new_fmt = (options.get("encrypt") or {}).get("format")
    header_fmt = _NAMES.get(node.h.crypt_method)
    if new_fmt is not None and header_fmt is None:
        raise GenericError(f"No encryption in image header, but options specified "
                           f"format '{new_fmt}'")
    if new_fmt is not None and new_fmt != header_fmt:
        raise GenericError(f"Header reported '{header_fmt}' encryption format but options "
                           f"specify '{new_fmt}'")
    return {
        "slices": slices, "slice_bytes": slice_bytes, "rc_blocks": rc_blocks,
        "mask": overlap.parse_option(options.get("overlap-check")),
        "interval": options.get("cache-clean-interval", 600),
        "lazy": lazy,
        "pass_discard": {
            "request": options.get("pass-discard-request",
                                   options.get("discard", "ignore") == "unmap"),
            "snapshot": options.get("pass-discard-snapshot", True),
            "other": options.get("pass-discard-other", False),
        },
    }


async def prepare(node: Qcow2Node, options: dict[str, Any]) -> Callable[[], None]:
    """Check ``options`` (:func:`check`; nothing has changed when it
    raises), write the dirty L2 slices and refcount blocks back (QEMU
    flushes both caches before it replaces them), and return the commit
    that puts the new caches and settings in place.  The caller holds the
    node drained."""
    new = check(node, options)
    slices, slice_bytes, rc_blocks = new["slices"], new["slice_bytes"], new["rc_blocks"]
    lazy = new["lazy"]
    if not node._corrupt:
        async with node._lock:
            await node._writeback()
        if node.lazy_refcounts and not lazy and node._dirty_set:
            # qcow2_mark_clean: the refcounts are written, the dirty bit goes
            await node.file.flush()
            node.h.incompatible_features &= ~INCOMPAT_DIRTY
            await node._write_v3_features()
            node._dirty_set = False

    def commit() -> None:
        # QEMU builds new caches every time; a cache whose geometry does not
        # change is kept here (a job's read-write reopen keeps what it read)
        old = node.l2cache
        if (old.capacity, old.slice_bytes) != (max(slices, 2), slice_bytes):
            node.l2cache = L2Cache(slices, table_bytes=node.cs, slice_bytes=slice_bytes)
        refs = node.refs
        refs.capacity = rc_blocks
        for b in list(refs.blocks):  # least recently used first
            if len(refs.blocks) <= rc_blocks:
                break
            if b not in refs.dirty:  # written back above: none should be dirty
                del refs.blocks[b]
        node.cache_clean_interval = new["interval"]
        node._next_clean = None
        node.overlap_mask = new["mask"]
        node._ol_index = None
        node._ol_layout = None
        node.pass_discard = new["pass_discard"]
        node.lazy_refcounts = lazy

    return commit
