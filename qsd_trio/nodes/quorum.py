"""The ``quorum`` driver (BlockdevOptionsQuorum, QEMU 7.2's block/quorum.c):
N children holding the same data, read by vote.

Reads (``read-pattern=quorum``, the default) go to every child at once.
When the children that answered agree, that is the data.  Otherwise the
answers are grouped by content (a SHA-256 of the data, as QEMU compares
them), the biggest group wins (a tie goes to the group seen last, as QEMU's
vote list is newest first) and must have ``vote-threshold`` members, else
the read fails with EIO and ``QUORUM_FAILURE``; every child outside the
winning group is reported with ``QUORUM_REPORT_BAD`` and, with
``rewrite-corrupted=on``, gets the winning data written back.  A child whose
read fails is reported at once (with the error); fewer than
``vote-threshold`` answers fail the read with the error most children
returned.  With ``blkverify=on`` (two children, threshold 2) a difference
is fatal: QEMU prints where and exits, and so does qsd-trio.

``read-pattern=fifo`` reads the first child, and the next when that fails,
and so on; each failure is reported, no vote is taken.

Writes and zero writes go to every child at once and succeed when
``vote-threshold`` children succeed; flushes go to each child in turn and
succeed on the same terms; each failing child is reported.  Discard does
nothing (QEMU's quorum has none).  Block status asks every child: zero only
where all say zero.  The length is the children's, which must agree at
open, and stays what it was then (QEMU caches it).

Children are named ``children.N``; x-blockdev-change adds one as
``children.<next>`` and removes one by name, as quorum_add_child and
quorum_del_child.  Events are rate-limited by the event bus, as QEMU's
monitor limits them.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import attrs
import trio

from .. import events
from ..qapi.errors import GenericError
from .child_change import ChildChange
from .graph import register_driver
from .node import BdrvChild, BlockNode, BlockStatus, Buffer, Perm, Status, json_filename

SECTOR = 512
# the options bdrv_refresh_filename keeps in a json: file name
# (quorum_strong_runtime_opts), in QEMU's order
STRONG_OPTIONS = ("vote-threshold", "blkverify", "rewrite-corrupted", "read-pattern")


def _as_c_int(value: int) -> int:
    """QemuOpts reads vote-threshold as a uint64 and quorum keeps it in an
    int: what is left of ``value`` after both (4294967298 is 2)."""
    v = value & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _sectors(offset: int, length: int) -> tuple[int, int]:
    """The events' sector-num and sectors-count for a byte range."""
    start = offset // SECTOR
    return start, -(-(offset + length) // SECTOR) - start


def report_bad(op: str, node_name: str, offset: int, length: int,
               error: OSError | None = None) -> None:
    """quorum_report_bad: QUORUM_REPORT_BAD for one child; ``error`` names
    what failed, None for a child outvoted on a read."""
    num, count = _sectors(offset, length)
    data: dict[str, Any] = {"type": op, "node-name": node_name, "sector-num": num,
                            "sectors-count": count}
    if error is not None:
        data["error"] = os.strerror(error.errno or errno.EIO)
    events.emit("QUORUM_REPORT_BAD", data)


def _voted_error(errors: list[OSError | None]) -> OSError:
    """quorum_vote_error: the errno most children failed with (``errors``
    in child order, None for a child that succeeded); on a tie, the one a
    child first returned last (the vote list is newest first)."""
    counts: dict[int, int] = {}
    for e in errors:
        if e is not None:
            counts[e.errno or errno.EIO] = counts.get(e.errno or errno.EIO, 0) + 1
    best = max(reversed(list(counts)), key=lambda k: counts[k])
    return OSError(best, os.strerror(best))


@attrs.define
class _Version:
    """One content the children returned, and who returned it (newest first)."""

    digest: bytes
    index: int  # the first child that returned it: the winner is copied from there
    items: list[int] = attrs.field(factory=list)


def _exit_fatal(message: str) -> NoReturn:
    """QEMU's fprintf and exit(1) for blkverify=on: the message, the exit
    handlers (the pidfile goes), status 1; nothing is flushed or closed."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(1)


@register_driver
class QuorumNode(ChildChange):
    driver = "quorum"

    async def open(self, options: dict[str, Any]) -> None:
        given = options["children"]
        if len(given) < 1:
            raise GenericError("Number of provided children must be 1 or more")
        self.threshold = _as_c_int(options["vote-threshold"])
        if self.threshold < 1:
            raise GenericError("Parameter 'vote-threshold' expects a value >= 1")
        if self.threshold > len(given):
            raise GenericError("threshold may not exceed children count")
        self.fifo = options.get("read-pattern", "quorum") == "fifo"
        self.blkverify = self.rewrite = False
        if not self.fifo:
            # QEMU reads these two for read-pattern=quorum only
            self.blkverify = bool(options.get("blkverify", False))
            if self.blkverify and (len(given) != 2 or self.threshold != 2):
                raise GenericError("blkverify=on can only be set if there are exactly two "
                                   "files and vote-threshold is 2")
            self.rewrite = bool(options.get("rewrite-corrupted", False))
            if self.rewrite and self.blkverify:
                raise GenericError("rewrite-corrupted=on cannot be used with blkverify=on")
        self.kids: list[BdrvChild] = []
        for i, child in enumerate(given):
            role = f"children.{i}"
            self.kids.append(await self.open_child({**options, role: child}, role))
        self.next_index = len(given)
        lengths = {k.node.length for k in self.kids}
        if len(lengths) != 1:
            # quorum_getlength fails, and so does bdrv_open's size refresh
            raise GenericError("Could not refresh total sector count: Input/output error")
        self._size = lengths.pop()

    # -- graph -------------------------------------------------------------------------
    def child_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # quorum_child_perm: what the parents take, plus write to repair;
        # never share write or resize, which would let the children differ
        nperm = Perm(perm & Perm.ALL)
        if self.rewrite:
            nperm |= Perm.WRITE
        return nperm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED

    def primary_child(self) -> BdrvChild | None:
        return None  # no child stands for the node (no file name, no dirname)

    @property
    def has_info(self) -> bool:
        return False  # no bdrv_get_info: query shows no dirty-flag

    def actual_size(self) -> int | None:
        # bdrv_sum_allocated_file_size: unknown when one child's is
        total = 0
        for k in self.kids:
            size = k.node.actual_size()
            if size is None:
                return None
            total += size
        return total

    def full_open_options(self) -> dict[str, Any]:
        # quorum_gather_child_options: the children as a list, in order
        # (their names may have gaps after x-blockdev-change)
        opts: dict[str, Any] = {"driver": self.driver}
        for key in STRONG_OPTIONS:
            if key in self.options:
                opts[key] = self.options[key]
        opts["children"] = [k.node.full_open_options() for k in self.kids]
        return opts

    @property
    def filename(self) -> str:
        return json_filename(self.full_open_options())

    def _length(self) -> int:
        return self._size

    # -- x-blockdev-change --------------------------------------------------------------
    async def add_child(self, child: BlockNode) -> None:
        """quorum_add_child: ``child`` becomes ``children.<next>``."""
        if self.blkverify:
            raise GenericError("Cannot add a child to a quorum in blkverify mode")
        role = f"children.{self.next_index}"
        async with self.drained():
            edge = self.graph.link(self, child, role)
        self.next_index += 1
        self.kids.append(edge)

    async def del_child(self, edge: BdrvChild) -> None:
        """quorum_del_child: never below the vote threshold; the next name
        is reused only when the newest child goes."""
        if len(self.kids) <= self.threshold:
            raise GenericError("The number of children cannot be lower than the vote "
                               f"threshold {self.threshold}")
        if edge.name == f"children.{self.next_index - 1}":
            self.next_index -= 1
        async with self.drained():
            self.kids.remove(edge)
            edge.detach()
        await self.graph.unref(edge.node)

    # -- reads -------------------------------------------------------------------------
    async def _co_preadv(self, offset: int, length: int) -> Buffer:
        if self.fifo:
            return await self._read_fifo(offset, length)
        kids = list(self.kids)
        results, failed = await self._on_every_child(
            kids, "read", offset, length, lambda node: node.read(offset, length))
        got = [None if r is None else memoryview(r).cast("B") for r in results]
        answered = [i for i, data in enumerate(got) if data is not None]
        if len(answered) < self.threshold:
            # quorum_has_too_much_io_failed
            self._report_failure(offset, length)
            raise _voted_error(failed)
        return await self._vote(kids, got, answered, offset, length)

    async def _vote(self, kids: list[BdrvChild], got: list[memoryview | None],
                    answered: list[int], offset: int, length: int) -> Buffer:
        """quorum_vote over the children in ``answered``."""
        first = got[answered[0]]
        assert first is not None
        agree = True
        for j in answered[1:]:
            other = got[j]
            assert other is not None
            if other != first:
                if self.blkverify:
                    at = next(i for i in range(length) if first[i] != other[i])
                    _exit_fatal(f"quorum: offset={offset} bytes={length} contents "
                                f"mismatch at offset {offset + at}")
                agree = False
                break
        if agree:
            return first
        versions: list[_Version] = []  # newest first, as QLIST_INSERT_HEAD
        for i in answered:
            data = got[i]
            assert data is not None
            digest = hashlib.sha256(data).digest()
            version = next((v for v in versions if v.digest == digest), None)
            if version is None:
                version = _Version(digest, i)
                versions.insert(0, version)
            version.items.insert(0, i)
        winner = versions[0]
        for v in versions[1:]:
            if len(v.items) > len(winner.items):
                winner = v
        if len(winner.items) < self.threshold:
            self._report_failure(offset, length)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data = got[winner.index]
        assert data is not None
        bad = [i for v in versions if v is not winner for i in v.items]
        for i in bad:
            report_bad("read", kids[i].node.node_name, offset, length)
        if self.rewrite and bad:
            await self._rewrite(kids, bad, offset, data)
        return data

    async def _rewrite(self, kids: list[BdrvChild], bad: list[int], offset: int,
                       data: memoryview) -> None:
        """quorum_rewrite_bad_versions: the winning data written back to
        the outvoted children, all at once; a failure is ignored (it is a
        repair attempt on data already known to be bad)."""
        async def rewrite_one(i: int) -> None:
            try:
                await kids[i].node.write(offset, data)
            except OSError:
                pass

        async with trio.open_nursery() as nursery:
            for i in bad:
                nursery.start_soon(rewrite_one, i)

    async def _read_fifo(self, offset: int, length: int) -> Buffer:
        """read_fifo_child: the first child that reads, in order."""
        kids = list(self.kids)
        for n, kid in enumerate(kids):
            try:
                return await kid.node.read(offset, length)
            except OSError as e:
                report_bad("read", kid.node.node_name, offset, length, e)
                if n == len(kids) - 1:
                    raise
        raise AssertionError("quorum has children")

    @staticmethod
    async def _on_every_child(kids: list[BdrvChild], op_name: str, offset: int, length: int,
                              op: Callable[[BlockNode], Awaitable[Any]],
                              ) -> tuple[list[Any], list[OSError | None]]:
        """``op`` on every child at once (QEMU's coroutine a child): what
        each returned and how each failed, in child order; a child that
        fails is reported as it fails."""
        results: list[Any] = [None] * len(kids)
        failed: list[OSError | None] = [None] * len(kids)

        async def one(i: int) -> None:
            try:
                results[i] = await op(kids[i].node)
            except OSError as e:
                failed[i] = e
                report_bad(op_name, kids[i].node.node_name, offset, length, e)

        async with trio.open_nursery() as nursery:
            for i in range(len(kids)):
                nursery.start_soon(one, i)
        return results, failed

    def _report_failure(self, offset: int, length: int) -> None:
        num, count = _sectors(offset, length)
        events.emit("QUORUM_FAILURE", {"reference": self.node_name, "sector-num": num,
                                       "sectors-count": count})

    # -- writes ------------------------------------------------------------------------
    async def _write_all(self, offset: int, length: int,
                         op: Callable[[BlockNode], Awaitable[None]]) -> None:
        """quorum_co_pwritev: ``op`` on every child; enough of them must
        succeed."""
        _, failed = await self._on_every_child(list(self.kids), "write", offset, length, op)
        if failed.count(None) < self.threshold:
            self._report_failure(offset, length)
            raise _voted_error(failed)

    async def _co_pwritev(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._write_all(offset, len(data),
                              lambda node: node.write(offset, data, fua=fua))

    async def _co_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                                no_fallback: bool = False) -> None:
        await self._write_all(offset, length, lambda node: node.write_zeroes(
            offset, length, may_unmap=may_unmap, fua=fua, no_fallback=no_fallback))

    async def _co_flush(self) -> None:
        """quorum_co_flush: each child in turn; enough must succeed."""
        failed: list[OSError | None] = []
        for kid in list(self.kids):
            try:
                await kid.node.flush()
                failed.append(None)
            except OSError as e:
                failed.append(e)
                report_bad("flush", kid.node.node_name, 0, 0, e)
        if failed.count(None) < self.threshold:
            raise _voted_error(failed)

    async def _co_block_status(self, offset: int, length: int) -> BlockStatus:
        """quorum_co_block_status: data as far as any child has data, else
        zero as far as every child reads zeroes; a child that fails makes
        the whole range data."""
        zero_len, data_len = length, 0
        for kid in list(self.kids):
            try:
                st = await kid.node.block_status(offset, length)
            except OSError as e:
                report_bad("read", kid.node.node_name, offset, length, e)
                data_len = length
                break
            if st.flags & Status.ZERO:
                zero_len = min(zero_len, st.length)
            else:
                data_len = max(data_len, st.length)
        if data_len:
            return BlockStatus(Status.DATA | Status.ALLOCATED, data_len)
        return BlockStatus(Status.ZERO | Status.ALLOCATED, zero_len)

