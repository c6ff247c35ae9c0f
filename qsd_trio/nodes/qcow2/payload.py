"""A request's data as the qcow2 driver passes it along: one buffer, or a
list of views (BlockNode.writev and read_into: a virtio-blk request's
pieces of guest memory).

A list goes to the file as it is, cut where the guest range changes runs
of clusters (one preadv or pwritev per run of clusters contiguous on the
host), never gathered into one buffer; only what the driver builds itself
(a copy-on-write cluster, an encrypted sector) is copied.
"""

from __future__ import annotations

from ..node import Buffer

# what a qcow2 write carries: a buffer, or views of format "B" one after another
Payload = Buffer | list[memoryview]


def size(data: Payload) -> int:
    """The bytes ``data`` holds."""
    if type(data) is not list:
        return len(memoryview(data))  # type: ignore[arg-type]
    n = 0
    for v in data:
        n += len(v)
    return n


def part(data: Payload, start: int, n: int) -> Payload:
    """Bytes ``start``..``start+n`` of ``data``: a slice of a buffer, or the
    views (sliced at the edges) that hold them; no copy."""
    if type(data) is not list:
        return memoryview(data)[start:start + n]  # type: ignore[arg-type]
    out: list[memoryview] = []
    if n <= 0:
        return out
    end = start + n
    pos = 0
    for v in data:
        k = len(v)
        if pos + k > start:
            a = start - pos if start > pos else 0
            b = end - pos if end < pos + k else k
            out.append(v if a == 0 and b == k else v[a:b])
            if pos + k >= end:
                break
        pos += k
    return out


def copy_into(buf: bytearray | memoryview, at: int, data: Payload) -> None:
    """``data``'s bytes into ``buf`` from ``at`` (a cluster built around them)."""
    if type(data) is not list:
        mv = memoryview(data)  # type: ignore[arg-type]
        buf[at:at + len(mv)] = mv
        return
    for v in data:
        k = len(v)
        buf[at:at + k] = v
        at += k


def scatter(views: list[memoryview], src: Buffer) -> None:
    """``src``'s bytes into ``views``, one after another (a read the driver
    had to put together in a buffer first)."""
    mv = memoryview(src)
    pos = 0
    for v in views:
        k = len(v)
        v[:] = mv[pos:pos + k]
        pos += k
