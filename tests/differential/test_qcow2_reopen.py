"""blockdev-reopen of a qcow2 node with new cache, overlap-check,
lazy-refcounts and pass-discard options (qcow2_reopen_prepare), on both
daemons: the replies to good and bad values match (lazy refcounts on a v2
image, a bad node among two, force-share), guest writes between
the reopens land (the dirty caches are written before they are replaced),
and both images end up clean and equal."""

from __future__ import annotations

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img, run

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

BASE = {"driver": "qcow2", "node-name": "d0", "file": "f0"}

# (options added to BASE, a guest write done through NBD after the reopen)
STEPS = [
    ({"l2-cache-size": 1 << 20, "refcount-cache-size": 1 << 16}, "write -P 0x11 0 1M"),
    ({"cache-size": 2 << 20, "lazy-refcounts": True}, "write -P 0x22 8M 300k"),
    ({"l2-cache-entry-size": 4096, "l2-cache-size": 8192}, "write -P 0x33 40M 2M"),
    ({"cache-clean-interval": 5, "overlap-check": "all"}, "write -P 0x44 100k 4k"),
    ({"overlap-check": {"template": "none", "active-l1": True},
      "pass-discard-other": True}, "discard 8M 64k"),  # discard=ignore: kept
    ({"l2-cache-size": 3 << 20, "cache-size": 2 << 20}, None),
    ({"l2-cache-size": 1 << 20, "refcount-cache-size": 1 << 16, "cache-size": 2 << 20},
     None),
    ({"l2-cache-entry-size": 1000}, None),
    ({"l2-cache-entry-size": 1 << 17}, None),
    ({"refcount-cache-size": 1 << 50}, None),
    ({"l2-cache-size": 1 << 50}, None),
    ({"cache-clean-interval": 1 << 33}, None),
    ({"overlap-check": "bogus"}, None),
    ({"overlap-check": {"template": "bogus"}}, None),
    ({"lazy-refcounts": "yes"}, None),
    # the qcow2 checks come before the changed-option and detect-zeroes ones
    ({"l2-cache-entry-size": 1000, "force-share": False}, None),
    ({"detect-zeroes": "unmap", "l2-cache-entry-size": 1000}, None),
    ({"discard": "unmap", "detect-zeroes": "unmap"}, None),
    # discard left out stays unmap: detect-zeroes=unmap is accepted
    ({"detect-zeroes": "unmap", "l2-cache-entry-size": 1000}, None),
    ({"detect-zeroes": "unmap"}, None),
    ({"discard": "ignore"}, None),
    ({}, "write -P 0x55 63M 1M"),
]


def _run(kind, tmp_path, img, v2_img):
    sock = tmp_path / f"nbd-{kind}.sock"
    replies = []
    with Daemon(kind, tmp_path) as d:
        q = d.qmp()
        assert q.cmd_raw("blockdev-add", {"driver": "file", "node-name": "f0",
                                          "filename": str(img)}) == {"return": {}}
        assert q.cmd_raw("blockdev-add", BASE) == {"return": {}}
        q.cmd_raw("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        assert q.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "d0",
                                              "writable": True}) == {"return": {}}
        for opts, io in STEPS:
            replies.append(q.cmd_raw("blockdev-reopen", {"options": [{**BASE, **opts}]}))
            if io is not None:
                run("qemu-io", "-f", "raw", "-c", io, f"nbd+unix:///d0?socket={sock}")
        # a v2 image: no lazy refcounts, on open or on reopen
        v2 = {"driver": "qcow2", "node-name": "v2", "read-only": True,
              "file": {"driver": "file", "filename": str(v2_img), "read-only": True}}
        replies.append(q.cmd_raw("blockdev-add", {**v2, "lazy-refcounts": True}))
        replies.append(q.cmd_raw("blockdev-add", v2))
        replies.append(q.cmd_raw("blockdev-reopen", {"options": [{**v2, "lazy-refcounts": True}]}))
        # two nodes, the second refused: nothing is reopened
        replies.append(q.cmd_raw("blockdev-reopen", {"options": [
            {**BASE, "l2-cache-size": 1 << 20}, {**v2, "l2-cache-entry-size": 1000}]}))
        # force-share is refused whatever its value
        replies.append(q.cmd_raw("blockdev-reopen", {"options": [{**BASE, "force-share": False}]}))
        replies.append(q.cmd_raw("blockdev-reopen", {"options": [{**v2, "force-share": True}]}))
        replies.append(q.cmd_raw("blockdev-del", {"node-name": "v2"}))
        replies.append(q.cmd_raw("query-named-block-nodes", {"flat": True}))
    return replies


def test_reopen_cache_options_as_qemu(tmp_path):
    imgs = {}
    for kind in ("qemu", "trio"):
        imgs[kind] = tmp_path / f"{kind}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(imgs[kind]), "64M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 16M 1M", str(imgs[kind]))
    v2_img = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(v2_img), "1M")
    theirs = _run("qemu", tmp_path, imgs["qemu"], v2_img)
    ours = _run("trio", tmp_path, imgs["trio"], v2_img)
    names = [str(opts) for opts, _ in STEPS] + ["v2 lazy", "v2", "v2 reopen lazy",
                                                 "two nodes", "force-share off",
                                                 "force-share on", "del", "query"]
    for step, a, b in zip(names, ours, theirs, strict=True):
        if step == "query":
            for n in a["return"] + b["return"]:
                n["image"].pop("actual-size", None)
                n["file"] = n["image"]["filename"] = "IMG"
        assert a == b, step
    for img in imgs.values():
        assert "No errors were found" in qemu_img("check", str(img)).stdout
    qemu_img("compare", str(imgs["qemu"]), str(imgs["trio"]))
    p = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 40M 2M",
            "-c", "read -P 0x44 100k 4k", "-c", "read -P 0x55 63M 1M",
            "-c", "read -P 0x77 16M 1M", "-c", "read -P 0x22 8M 300k", str(imgs["trio"]))
    assert "Pattern verification failed" not in p.stdout, p.stdout


def test_reopen_encrypt_options_as_qemu(tmp_path):
    """encrypt.* on reopen: QEMU parses it and checks the format against the
    header (any key-secret is taken, the open cipher stays), and refuses to
    drop it."""
    enc, plain = tmp_path / "e.qcow2", tmp_path / "p.qcow2"
    secrets = ["--object", "secret,id=sec0,data=pw0", "--object", "secret,id=sec1,data=pw1"]
    qemu_img("create", "-q", "-f", "qcow2", *secrets, "-o",
             "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", str(enc), "1M")
    qemu_img("create", "-q", "-f", "qcow2", str(plain), "1M")
    e = {"driver": "qcow2", "node-name": "e", "encrypt": {"format": "luks", "key-secret": "sec0"},
         "file": {"driver": "file", "filename": str(enc)}}
    p = {"driver": "qcow2", "node-name": "p", "file": {"driver": "file", "filename": str(plain)}}
    no_encrypt = {k: v for k, v in e.items() if k != "encrypt"}
    cases = [e, {**e, "encrypt": {"format": "luks", "key-secret": "sec1"}},
             {**e, "encrypt": {"format": "luks", "key-secret": "nope"}},
             {**e, "encrypt": {"format": "aes", "key-secret": "sec0"}}, no_encrypt,
             {**p, "encrypt": {"format": "luks", "key-secret": "sec0"}}, e]
    out = {}
    for kind in ("qemu", "trio"):
        with Daemon(kind, tmp_path, secrets) as d:
            q = d.qmp()
            assert q.cmd_raw("blockdev-add", e) == {"return": {}}
            assert q.cmd_raw("blockdev-add", p) == {"return": {}}
            out[kind] = [q.cmd_raw("blockdev-reopen", {"options": [o]}) for o in cases]
    assert out["trio"] == out["qemu"]
    assert out["trio"][1] == {"return": {}} and "error" in out["trio"][4]
