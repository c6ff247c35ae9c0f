"""QMP commands: chardev-*, query-chardev*, ringbuf-*."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from ..chardev.chardev import BACKENDS, Chardev, RingbufChardev, make_chardev
from ..chardev.fd import PtyChardev
from ..chardev.mux import MuxChardev
from ..qapi import schema
from ..qapi.errors import GenericError
from .registry import command

if TYPE_CHECKING:
    from ..daemon import Daemon


def _find(daemon: Daemon, id: str) -> Chardev:
    try:
        chr: Chardev = daemon.chardevs[id]
    except KeyError:
        raise GenericError(f"Chardev '{id}' not found") from None
    return chr


async def add_chardev(daemon: Daemon, id: str, backend: dict[str, Any],
                      announce: bool = False) -> Chardev:
    """Create, open and register a chardev.  ``announce``: print what QEMU
    prints at startup (a pty's path), which a QMP command does not.  The id
    is not checked: QEMU's chardev-add takes any string (``--chardev``
    checks it as QemuOpts do)."""
    if id in daemon.chardevs:
        raise GenericError(f"attempt to add duplicate property '{id}' to object (type 'container')")
    chr = _new(daemon, id, backend, announce)
    await chr.setup()
    daemon.chardevs[id] = chr
    daemon.chardev_slots.insert(id)
    return chr


def _new(daemon: Daemon, id: str, backend: dict[str, Any], announce: bool = False) -> Chardev:
    chr = make_chardev(id, backend)
    chr.bind(daemon)
    if isinstance(chr, PtyChardev):
        chr.announce = announce
    return chr


async def remove_chardev(daemon: Daemon, id: str) -> None:
    chr = _find(daemon, id)
    if chr.busy():
        raise GenericError(f"Chardev '{id}' is busy")
    del daemon.chardevs[id]
    daemon.chardev_slots.remove(id)
    await chr.aclose()


@command("chardev-add")
async def chardev_add(daemon: Daemon, args: Any) -> dict[str, Any]:
    try:
        chr = await add_chardev(daemon, args.id, schema.to_qmp(args.backend))
    except GenericError as e:
        if e.desc.startswith("attempt to add duplicate"):
            raise
        raise e.prefixed(f"Failed to add chardev '{args.id}': ") from None
    if isinstance(chr, PtyChardev):
        return {"pty": chr.pty_name}
    return {}


@command("chardev-remove")
async def chardev_remove(daemon: Daemon, args: Any) -> None:
    await remove_chardev(daemon, args.id)


@command("chardev-change")
async def chardev_change(daemon: Daemon, args: Any) -> dict[str, Any]:
    # qmp_chardev_change
    old = daemon.chardevs.get(args.id)
    if old is None:
        raise GenericError(f"Chardev '{args.id}' does not exist")
    if isinstance(old, MuxChardev):
        raise GenericError("Mux device hotswap not supported yet")
    if old.frontend is not None:
        # QEMU lets only frontends that support hotswap change; a QMP
        # monitor or a mux doesn't
        raise GenericError("Chardev user does not support chardev hotswap")
    # the easy case: the old one goes, then chardev-add (which, failing,
    # leaves no chardev under that id, as in QEMU)
    del daemon.chardevs[args.id]
    daemon.chardev_slots.remove(args.id)
    await old.aclose()
    reply: dict[str, Any] = await chardev_add(daemon, args)
    return reply


@command("chardev-send-break")
async def chardev_send_break(daemon: Daemon, args: Any) -> None:
    _find(daemon, args.id)


@command("query-chardev")
async def query_chardev(daemon: Daemon, args: None) -> list[dict[str, Any]]:
    # object_child_foreach over the container's table, each one prepended
    return [daemon.chardevs[id].info() for id in reversed(list(daemon.chardev_slots))]


@command("query-chardev-backends")
async def query_chardev_backends(daemon: Daemon, args: None) -> list[dict[str, str]]:
    return [{"name": b} for b in BACKENDS]


def _ringbuf(daemon: Daemon, device: str) -> RingbufChardev:
    try:
        chr = daemon.chardevs[device]
    except KeyError:
        raise GenericError(f"Device '{device}' not found") from None
    if not isinstance(chr, RingbufChardev):
        raise GenericError(f"{device} is not a ringbuf device")
    return chr


@command("ringbuf-write")
async def ringbuf_write(daemon: Daemon, args: Any) -> None:
    chr = _ringbuf(daemon, args.device)
    fmt: str = args.format or "utf8"
    if fmt == "base64":
        try:
            data = base64.b64decode(args.data, validate=True)
        except ValueError:
            raise GenericError("base64 input is invalid") from None
    else:
        data = args.data.encode(errors="surrogateescape")  # NUL as C0 80, as QEMU
    await chr.write(data)


@command("ringbuf-read")
async def ringbuf_read(daemon: Daemon, args: Any) -> str:
    chr = _ringbuf(daemon, args.device)
    if args.size < 0:
        raise GenericError("size must be greater than zero")
    fmt: str = args.format or "utf8"
    return chr.read(args.size, fmt)
