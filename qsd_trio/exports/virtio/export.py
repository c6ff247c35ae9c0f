"""What the vhost-user-blk and vduse-blk exports share.

Both are a virtio-blk device (:class:`~.blk.BlkHandler`) on the export's
node, served to one driver at a time (:class:`~.dataplane.Device`: a
vhost-user front-end, the kernel's VDUSE device).  :class:`VirtioBlkExport`
holds what does not depend on the transport: the options both have, the
node edge, the device's counters as the export's, stopping (requests in
flight finish first) and the task tree.  A subclass implements
:meth:`VirtioBlkExport.serve`: set up its transport, report started, and
run its devices with :meth:`VirtioBlkExport.serve_device`.

Tasks: the export's task (``run``) holds the transport; a device runs in
a task of its own under it, registered in the task tree as the export's
``client-connection`` (as an NBD client is), with its queue workers'
tasks under that.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import trio

from ... import tasks
from ...nodes.node import BdrvChild, BlockNode, Perm
from ...nodes.perms import refresh
from ...qapi.errors import GenericError
from ..base import BlockExport
from .blk import BlkHandler
from .dataplane import Device

if TYPE_CHECKING:
    from ...daemon import Daemon

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 2 * 1024 * 1024
DRAIN_DEADLINE = 5.0  # seconds in-flight requests get when the export stops


def check_block_size(export_id: str, value: int | None) -> int:
    """``logical-block-size`` as QEMU's check_block_size takes it (512 when
    not given).

    Raises:
        GenericError: QEMU's message for a size out of range or not a power of 2.
    """
    if value is None:
        return MIN_BLOCK_SIZE
    if value and not MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE:
        raise GenericError(
            f"Property {export_id}.logical-block-size doesn't take value {value} "
            f"(minimum: {MIN_BLOCK_SIZE}, maximum: {MAX_BLOCK_SIZE})")
    if value & (value - 1):
        raise GenericError(
            f"Property {export_id}.logical-block-size doesn't take value '{value}', "
            f"it's not a power of 2")
    return value or MIN_BLOCK_SIZE


def check_num_queues(value: int | None) -> int:
    """``num-queues`` (1 when not given).

    Raises:
        GenericError: QEMU's message for 0.
    """
    if value is None:
        return 1
    if value == 0:
        raise GenericError("num-queues must be greater than 0")
    return value


class VirtioBlkExport(BlockExport):
    """A virtio-blk export; ``args`` has the common options and
    ``writethrough``."""

    device: Device | None

    def __init__(self, daemon: Daemon, args: Any, node: BlockNode, *, num_queues: int,
                 logical_block_size: int, serial: str) -> None:
        super().__init__(daemon, args, node)
        self.num_queues = num_queues
        self.logical_block_size = logical_block_size
        self.handler = BlkHandler(node, writable=self.writable,
                                  logical_block_size=logical_block_size,
                                  num_queues=num_queues, serial=serial,
                                  writethrough=bool(args.writethrough))
        self.edge: BdrvChild | None = None
        self.device = None
        self.stopping = False

    def connected_clients(self) -> int:
        return int(self.device is not None)

    # the handler counts them (one per export, whoever is connected)
    @property
    def read_bytes(self) -> int:  # type: ignore[override]
        return self.handler.read_bytes

    @property
    def written_bytes(self) -> int:  # type: ignore[override]
        return self.handler.written_bytes

    def child_attached(self, edge: BdrvChild) -> None:
        super().child_attached(edge)
        self.handler.backend = edge.node

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["shutting-down"] = d["shutting-down"] or self.stopping
        return d

    async def stop(self) -> None:
        """Stop taking requests, let those in flight finish (a few seconds
        at most), then end the device and the export."""
        if not self.stopping:
            self.stopping = True
            if self.device is not None:
                with trio.move_on_after(DRAIN_DEADLINE):
                    await self.device.quiesce()
        self.cancel_scope.cancel()
        await self.finished.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Attach to the node, then :meth:`serve` until cancelled
        (block-export-del, quit); the edge goes when it returns."""
        perm = Perm.CONSISTENT_READ | (Perm.WRITE if self.writable else Perm(0))
        self.edge = self.node.attach("root", self, perm)
        try:
            with self.cancel_scope:
                await self.serve(task_status)
        finally:
            self.edge.detach()
            with contextlib.suppress(Exception):
                refresh(self.node)
            self.finished.set()

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        """The transport: set up, ``task_status.started()``, serve devices
        until cancelled; its own resources are released when it returns."""
        raise NotImplementedError

    async def serve_device(self, device: Device, client: str) -> None:
        """Run ``device.serve()`` as the export's one client, in a task of
        its own (``client`` names the driver in the task tree), until it
        returns.  An exception out of it is a bug serving one driver, not
        the daemon's: it is reported on stderr."""
        self.device = device
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._client_task, device, client,
                                   name=f"{self.type} {self.id}: {client}")
        finally:
            self.device = None

    async def _client_task(self, device: Device, client: str) -> None:
        handler = self.handler
        base = handler.read_bytes + handler.written_bytes
        with tasks.serving("client-connection", f"{self.type} client of {self.id}",
                           cancel_scope=self.cancel_scope,
                           draining=lambda: self.stopping,
                           in_flight=device.in_flight,
                           moved=lambda: handler.read_bytes + handler.written_bytes - base,
                           export_id=self.id, client=client,
                           node_names=lambda: [self.node.node_name]):
            try:
                await device.serve()
            except Exception as e:  # noqa: BLE001 - one driver fails, the daemon lives
                print(f"qsd-trio: {self.type} export '{self.id}' {client} failed: {e!r}",
                      file=sys.stderr, flush=True)
