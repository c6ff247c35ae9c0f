"""The hypothesis workload the format drivers' tests share: writes, zero
writes, discards and flushes, run in pairs concurrently when their ranges do
not overlap, against a model of what the image must then hold.  Discards
leave the model unchanged (a format may keep or drop the data)."""

from __future__ import annotations

import trio


async def run_workload(node, workload, size: int, initial: bytes | None = None) -> bytearray:
    """Run ``workload`` (op, offset, length, arg) on ``node`` of ``size``
    bytes, whose data is ``initial`` (zeroes if None); check the node reads
    back as the model and return the model."""
    model = bytearray(initial if initial is not None else size)

    def clip(off: int, n: int) -> tuple[int, int]:
        off = min(off, size)
        return off, min(n, size - off)

    async def one(op, off, n, arg):
        off, n = clip(off, n)
        if not n:
            return
        if op == "write":
            await node.write(off, bytes([arg]) * n)
        elif op == "zero":
            await node.write_zeroes(off, n, may_unmap=arg)
        elif op == "discard":
            await node.discard(off, n)
        elif op == "flush":
            await node.flush()

    def apply(op, off, n, arg):
        off, n = clip(off, n)
        if op == "write":
            model[off:off + n] = bytes([arg]) * n
        elif op == "zero":
            model[off:off + n] = bytes(n)

    def disjoint(a, b) -> bool:
        return min(a[1], size) + a[2] <= min(b[1], size) or \
            min(b[1], size) + b[2] <= min(a[1], size)

    i = 0
    while i < len(workload):
        a = workload[i]
        b = workload[i + 1] if i + 1 < len(workload) else None
        if b and disjoint(a, b):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, *a)
                nursery.start_soon(one, *b)
            apply(*a)
            apply(*b)
            i += 2
        else:
            await one(*a)
            apply(*a)
            i += 1
    assert bytes(await node.read(0, size)) == bytes(model)
    return model
