"""The ``copy-before-write`` filter (QEMU's block/copy-before-write.c).

Writes, zero writes and discards through the filter first copy the
clusters they touch from ``file`` to ``target`` (once each, through a
:class:`~.block_copy.BlockCopyState`), then go on to ``file``.  So
``target`` ends up holding ``file`` as it was when the filter was opened,
for the clusters still dirty in the copy bitmap (all of them, or those of
the ``bitmap`` option).  Reads, flushes and block status go to ``file``.

Two users: the backup job inserts one above its source (and copies the
rest in the background through the same state), and fleecing stacks a
``snapshot-access`` node on one whose target is a temporary overlay over
``file``: the snapshot API here (:meth:`CopyBeforeWriteNode.preadv_snapshot`,
``snapshot_block_status``, ``pdiscard_snapshot``) reads the point-in-time
image from ``target`` where the old data was copied and from ``file``
elsewhere.  A guest write waits until snapshot reads of its range from
``file`` have finished ("frozen" reads) before it changes ``file``.

Failures of a copy: ``on-cbw-error=break-guest-write`` (default) fails the
guest write; ``break-snapshot`` lets it through, and from then on the
filter copies nothing and snapshot reads fail with EACCES.  ``cbw-timeout``
bounds one copy: when it runs out the copy is cancelled (its clusters stay
dirty) and counts as failed with ETIMEDOUT.

Resources: the copy bitmap on ``file`` and the bitmaps here are dropped on
close.
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from . import bitmaps
from .bitmaps import DirtyBitmap
from .block_copy import BlockCopyState
from .filter import FileFilter
from .graph import register_driver
from .node import BdrvChild, BlockNode, BlockStatus, Buffer, Perm, Status
from .perms import filter_perms

# a range a snapshot read holds against copy-before-write: offset, bytes, released
_Frozen = tuple[int, int, trio.Event]


@register_driver
class CopyBeforeWriteNode(FileFilter):
    driver = "copy-before-write"
    # shows_filtered_child (FileFilter): image info lists the source as backing-image
    supports_snapshot_access = True
    has_info = False  # no bdrv_get_info: QEMU shows no dirty-flag

    async def open(self, options: dict[str, Any]) -> None:
        self.file = await self.open_child(options, "file")
        self.target = await self.open_child(options, "target")
        bitmap = self._find_bitmap(options.get("bitmap"))
        self.on_cbw_error = options.get("on-cbw-error") or "break-guest-write"
        timeout = options.get("cbw-timeout") or 0
        self.cbw_timeout = float(timeout) if timeout else None
        self.request_alignment = self.file.node.request_alignment
        self.bcs = BlockCopyState(self.file.node, self.target.node, bitmap=bitmap)
        cs = self.bcs.cluster_size
        length = self.file.node.length
        # done: copied by a guest write's copy-before-write (snapshot reads
        # go to the target there); access: what snapshot reads may read
        self.done_bitmap = DirtyBitmap(None, length, cs, enabled=False)
        self.access_bitmap = DirtyBitmap(None, length, cs, enabled=False)
        self.access_bitmap.merge_from(self.bcs.copy_bitmap)
        self.bitmaps["\x00cbw-done"] = self.done_bitmap
        self.bitmaps["\x00cbw-access"] = self.access_bitmap
        self.snapshot_error = 0
        self.dropped = False
        self._frozen: list[_Frozen] = []

    def _find_bitmap(self, spec: dict[str, Any] | None) -> DirtyBitmap | None:
        """cbw_parse_bitmap_option."""
        if spec is None:
            return None
        return bitmaps.lookup(self.graph, spec["node"], spec["name"])[1]

    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """cbw_child_perm."""
        if edge.name == "target":
            # share write: the guest's own disk may be in the target's
            # backing chain (fleecing); no resize, sizes were fixed at open
            return Perm.WRITE, Perm.ALL & ~Perm.RESIZE
        nperm, nshared = filter_perms(perm, shared)
        if self.parents:
            if perm & Perm.WRITE:
                nperm |= Perm.CONSISTENT_READ
            nshared &= ~(Perm.WRITE | Perm.RESIZE)
        return Perm(nperm), Perm(nshared)

    # -- I/O -------------------------------------------------------------------------------
    async def _copy_before_write(self, offset: int, length: int) -> None:
        """cbw_do_copy_before_write."""
        if self.snapshot_error or self.dropped or length <= 0:
            return
        c = self.bcs.cluster_size
        off = offset // c * c
        end = min(-(-(offset + length) // c) * c, -(-self.bcs.len // c) * c)
        err: OSError | None = None
        try:
            if self.cbw_timeout is None:
                await self.bcs.copy(off, end - off)
            else:
                with trio.fail_after(self.cbw_timeout):
                    await self.bcs.copy(off, end - off)
        except OSError as e:
            err = e
        except trio.TooSlowError:
            err = OSError(errno.ETIMEDOUT, "Connection timed out")
        if err is not None:
            if self.on_cbw_error == "break-guest-write":
                raise err
            self.snapshot_error = self.snapshot_error or err.errno or errno.EIO
        else:
            self.done_bitmap.set_dirty(off, end - off)
        # snapshot reads of the old data from ``file`` finish first
        while True:
            ev = next((e for o, n, e in self._frozen if o < end and off < o + n), None)
            if ev is None:
                break
            await ev.wait()

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._copy_before_write(offset, len(data))
        await self.file.node.write(offset, data, fua=fua)

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        await self._copy_before_write(offset, length)
        await self.file.node.write_zeroes(offset, length, may_unmap=may_unmap, fua=fua,
                                          no_fallback=no_fallback)

    async def _co_pdiscard(self, offset: int, length: int) -> None:
        await self._copy_before_write(offset, length)
        await self.file.node.discard(offset, length)

    # -- the snapshot API (snapshot-access reads through it) ---------------------------------
    def _snapshot_lock(self, offset: int, length: int) -> tuple[BlockNode, int, _Frozen | None]:
        """cbw_snapshot_read_lock: (node to read, bytes, frozen entry or None)."""
        if self.snapshot_error:
            raise OSError(errno.EACCES, "Permission denied")
        if self.access_bitmap.next_clean(offset, length) is not None:
            raise OSError(errno.EACCES, "Permission denied")
        done = self.done_bitmap.get(offset)
        stop = (self.done_bitmap.next_clean if done else self.done_bitmap.next_dirty)(
            offset, length)
        n = (offset + length if stop is None else stop) - offset
        if done:
            return self.target.node, n, None
        entry = (offset, n, trio.Event())
        self._frozen.append(entry)
        return self.file.node, n, entry

    def _snapshot_unlock(self, entry: _Frozen | None) -> None:
        if entry is not None:
            self._frozen.remove(entry)
            entry[2].set()

    async def preadv_snapshot(self, offset: int, length: int) -> Buffer:
        """cbw_co_preadv_snapshot: the image as it was when the filter opened."""
        parts: list[Buffer] = []
        pos, end = offset, offset + length
        while pos < end:
            node, n, entry = self._snapshot_lock(pos, end - pos)
            try:
                parts.append(await node.read(pos, n))
            finally:
                self._snapshot_unlock(entry)
            pos += n
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def snapshot_block_status(self, offset: int, length: int) -> BlockStatus:
        """cbw_co_snapshot_block_status, for the accessible run at ``offset``.

        QEMU fails the whole query when part of the range may not be read;
        here the answer covers the accessible start, so that a look-ahead
        past the end of a read (our NBD server's sparse reads look ahead)
        does not fail the read.  A range that starts inaccessible fails.
        """
        if self.access_bitmap.get(offset):
            stop = self.access_bitmap.next_clean(offset, length)
            if stop is not None:
                length = stop - offset
        node, n, entry = self._snapshot_lock(offset, length)
        try:
            st = await node.block_status(offset, n)
        finally:
            self._snapshot_unlock(entry)
        if node is self.target.node:
            # copied clusters are allocated in the target, never "see below"
            return BlockStatus(st.flags | Status.ALLOCATED, st.length, 1, st.offset)
        return st

    async def pdiscard_snapshot(self, offset: int, length: int) -> None:
        """cbw_co_pdiscard_snapshot: the reader is done with these clusters."""
        c = self.bcs.cluster_size
        a = -(-offset // c) * c
        b = (offset + length) // c * c
        if b <= a:
            return
        self.access_bitmap.reset_dirty(a, b - a)
        self.bcs.reset(a, b - a)
        await self.target.node.discard(a, b - a)

    # -- teardown --------------------------------------------------------------------------
    def stop_copying(self) -> None:
        """Before the filter is dropped: copy nothing more (the target may be
        closed next); requests still inside finish without copying.  The
        copy bitmap leaves the source now, as bdrv_cbw_drop frees the block
        copy state before the job's BLOCK_JOB_COMPLETED: a query right after
        the event must not list it."""
        self.dropped = True
        self.bcs.release()

    async def _close(self) -> None:
        self.dropped = True
        self.bcs.release()
