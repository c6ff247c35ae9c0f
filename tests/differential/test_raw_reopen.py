"""blockdev-reopen of a raw node with a new window (offset, size), on both
daemons (raw_reopen_prepare): the replies to good and bad values match, the
node's size and file name match, a fresh NBD export of the node reads the
file's bytes at the new window (nbdcopy) and a write through it lands at the
window's offset in the file (qemu-io), and the files end up equal to a
model.

The node starts without a window, so qsd-trio passes its requests straight
to the file child (BlockNode._through); a reopen that adds a window must end
that, or reads would come from the file's start.

Not compared: an NBD export that already exists when the window changes.
qemu-storage-daemon keeps advertising the size it had when it was added
(and asserts on a read past the new end); qsd-trio's follows the node.
"""

from __future__ import annotations

import random

import pytest

from tests.helpers import HAVE_QEMU, Daemon, run

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
SIZE = 2 * MiB
BASE = {"driver": "raw", "node-name": "r0", "file": "f0"}

# (options added to BASE, a write through the node after the reopen: its
# offset in the node and its length, or None)
STEPS: list[tuple[dict, tuple[int, int] | None]] = [
    ({"offset": 64 << 10}, (4096, 8192)),           # a window over a pass-through node
    ({"offset": 1 << 20, "size": 256 << 10}, (0, 4096)),
    ({}, (1 << 20, 512)),                           # the window dropped: the whole file
    ({"size": 512 << 10}, None),
    ({"offset": 512, "size": 4096}, (512, 1024)),
    ({"offset": SIZE}, None),                       # an empty window at the end
    # refused: the window stays what it was
    ({"offset": SIZE + 512}, None),
    ({"offset": 512, "size": SIZE}, None),
    ({"offset": 64 << 10, "size": SIZE}, None),
    ({"size": 1000}, None),
    ({"offset": 4096, "size": 1000}, None),
    ({"offset": -1}, None),
    ({"size": -512}, None),
    ({"size": "x"}, None),
    ({"offset": SIZE + 512, "size": 1000}, None),
    ({"offset": 1 << 20, "bogus": 1}, None),
    ({"offset": 1 << 20, "force-share": False}, None),
    ({"offset": 3 << 19, "size": 64 << 10}, (60 << 10, 4096)),
    ({"offset": 0}, None),                          # given, though the default
    # not a multiple of 512: the size is whole sectors (bdrv_getlength)
    ({"offset": 1000}, None),
    ({"offset": SIZE - 100}, None),
]


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _run(kind: str, tmp_path, img) -> list:
    out: list = []
    model = bytearray(img.read_bytes())
    sock = tmp_path / f"nbd-{kind}.sock"
    window = (0, SIZE)
    with Daemon(kind, tmp_path) as d:
        q = d.qmp()
        assert q.cmd_raw("blockdev-add", {"driver": "file", "node-name": "f0",
                                          "filename": str(img)}) == {"return": {}}
        assert q.cmd_raw("blockdev-add", BASE) == {"return": {}}
        assert q.cmd_raw("nbd-server-start",
                         {"addr": {"type": "unix", "data": {"path": str(sock)}}}) == {"return": {}}
        for i, (opts, write) in enumerate(STEPS):
            r = q.cmd_raw("blockdev-reopen", {"options": [{**BASE, **opts}]})
            out.append(r)
            if "return" in r:
                off = opts.get("offset", 0)
                window = (off, opts.get("size", -(-(SIZE - off) // 512) * 512))
            node = next(n for n in q.cmd_raw("query-named-block-nodes", {"flat": True})["return"]
                        if n["node-name"] == "r0")
            out.append((node["image"]["virtual-size"], node["file"].replace(str(img), "IMG")))
            if window[0] % 512:
                # the tail past the file's end: qemu-storage-daemon 7.2 fails
                # a read there (EIO) and aborts on its block status (an
                # assertion in nbd/server.c); qsd-trio reads zeroes
                continue
            # a fresh export sees the node's size now; its bytes are the window's
            name = f"e{i}"
            assert q.cmd_raw("block-export-add", {"type": "nbd", "id": name, "node-name": "r0",
                                                  "name": name, "writable": True}) \
                == {"return": {}}
            uri = f"nbd+unix:///{name}?socket={sock}"
            if write is not None:
                woff, wlen = write
                data = _pattern(i, wlen)
                (tmp_path / "w.bin").write_bytes(data)
                run("qemu-io", "-f", "raw", "-c",
                    f"write -s {tmp_path / 'w.bin'} {woff} {wlen}", uri)
                model[window[0] + woff:window[0] + woff + wlen] = data
            got = tmp_path / f"got-{kind}.bin"
            run("nbdcopy", "--", uri, str(got))
            assert got.read_bytes() == bytes(model[window[0]:window[0] + window[1]]), \
                (kind, opts)
            assert q.cmd_raw("block-export-del", {"id": name}) == {"return": {}}
    assert img.read_bytes() == bytes(model), kind
    return out


def test_reopen_raw_window_as_qemu(tmp_path):
    data = _pattern(0, SIZE)
    imgs = {}
    for kind in ("qemu", "trio"):
        imgs[kind] = tmp_path / f"{kind}.raw"
        imgs[kind].write_bytes(data)
    theirs = _run("qemu", tmp_path, imgs["qemu"])
    ours = _run("trio", tmp_path, imgs["trio"])
    steps = [str(opts) for opts, _ in STEPS for _ in (0, 1)]
    for step, a, b in zip(steps, ours, theirs, strict=True):
        assert a == b, step
    assert imgs["qemu"].read_bytes() == imgs["trio"].read_bytes()
