"""QMP commands: chardev-*, query-chardev*, ringbuf-*."""

from __future__ import annotations

import base64

from ..chardev.chardev import BACKENDS, RingbufChardev, make_chardev
from ..objects.qom import check_id
from ..qapi import schema
from ..qapi.errors import GenericError
from .registry import command


def _find(daemon, id: str):
    try:
        return daemon.chardevs[id]
    except KeyError:
        raise GenericError(f"Chardev '{id}' not found") from None


async def add_chardev(daemon, id: str, backend: dict):
    check_id(id)
    if id in daemon.chardevs:
        raise GenericError(f"attempt to add duplicate property '{id}' to object (type 'container')")
    chr = make_chardev(id, backend)
    await chr.setup()
    daemon.chardevs[id] = chr
    daemon.chardev_slots.insert(id)
    return chr


@command("chardev-add")
async def chardev_add(daemon, args):
    try:
        await add_chardev(daemon, args.id, schema.to_qmp(args.backend))
    except GenericError as e:
        if e.desc.startswith("attempt to add duplicate"):
            raise
        raise e.prefixed(f"Failed to add chardev '{args.id}': ") from None
    return {}


@command("chardev-remove")
async def chardev_remove(daemon, args):
    chr = _find(daemon, args.id)
    if chr.frontend is not None:
        raise GenericError(f"Chardev '{args.id}' is busy")
    del daemon.chardevs[args.id]
    daemon.chardev_slots.remove(args.id)
    await chr.aclose()


@command("chardev-change")
async def chardev_change(daemon, args):
    old = _find(daemon, args.id)
    if old.frontend is not None:
        # QEMU lets only frontends that support hotswap change; a QMP monitor doesn't
        raise GenericError("Chardev user does not support chardev hotswap")
    new = make_chardev(args.id, schema.to_qmp(args.backend))
    await new.setup()
    daemon.chardevs[args.id] = new
    # QEMU unparents the old chardev and adds the new one as a child anew
    daemon.chardev_slots.remove(args.id)
    daemon.chardev_slots.insert(args.id)
    await old.aclose()
    return {}


@command("chardev-send-break")
async def chardev_send_break(daemon, args):
    _find(daemon, args.id)


@command("query-chardev")
async def query_chardev(daemon, args):
    # object_child_foreach over the container's table, each one prepended
    return [daemon.chardevs[id].info() for id in reversed(list(daemon.chardev_slots))]


@command("query-chardev-backends")
async def query_chardev_backends(daemon, args):
    return [{"name": b} for b in BACKENDS]


def _ringbuf(daemon, device: str) -> RingbufChardev:
    try:
        chr = daemon.chardevs[device]
    except KeyError:
        raise GenericError(f"Device '{device}' not found") from None
    if not isinstance(chr, RingbufChardev):
        raise GenericError(f"{device} is not a ringbuf device")
    return chr


@command("ringbuf-write")
async def ringbuf_write(daemon, args):
    chr = _ringbuf(daemon, args.device)
    fmt = getattr(args.format, "value", args.format) or "utf8"
    if fmt == "base64":
        try:
            data = base64.b64decode(args.data, validate=True)
        except ValueError:
            raise GenericError("base64 input is invalid") from None
    else:
        data = args.data.encode()
    await chr.write(data)


@command("ringbuf-read")
async def ringbuf_read(daemon, args):
    chr = _ringbuf(daemon, args.device)
    if args.size < 0:
        raise GenericError("size must be greater than zero")
    fmt = getattr(args.format, "value", args.format) or "utf8"
    return chr.read(args.size, fmt)
