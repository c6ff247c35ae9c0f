"""qcow2 cache and overlap-check options: the same replies from both daemons
(what each combination is refused with, and that the others open)."""

from __future__ import annotations

import pytest

from tests.helpers import HAVE_QEMU, Daemon, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

CASES = [
    {"l2-cache-size": 1 << 20, "refcount-cache-size": 1 << 16, "cache-size": 2 << 20},
    {"l2-cache-size": 3 << 20, "cache-size": 2 << 20},
    {"refcount-cache-size": 3 << 20, "cache-size": 2 << 20},
    {"l2-cache-size": 1 << 20, "refcount-cache-size": 1 << 16},
    {"cache-size": 2 << 20, "l2-cache-size": 2 << 20},
    {"cache-size": 1 << 20}, {"cache-size": 0}, {"l2-cache-size": 0},
    {"l2-cache-entry-size": 256}, {"l2-cache-entry-size": 1000},
    {"l2-cache-entry-size": 1 << 17}, {"l2-cache-entry-size": 0},
    {"l2-cache-entry-size": 4096}, {"l2-cache-entry-size": 512, "l2-cache-size": 1},
    {"refcount-cache-size": 1 << 50}, {"l2-cache-size": 1 << 50},
    {"cache-clean-interval": 1 << 33}, {"cache-clean-interval": (1 << 32) - 1},
    {"overlap-check": "bogus"}, {"overlap-check": "none"}, {"overlap-check": "all"},
    {"overlap-check": {"template": "all", "main-header": False}},
    {"overlap-check": {"template": "bogus"}},
    {"overlap-check": {"active-l2": "yes"}},
]


def _replies(kind, tmp_path, img):
    with Daemon(kind, tmp_path) as d:
        q = d.qmp()
        out = []
        for i, opts in enumerate(CASES):
            out.append(q.cmd_raw("blockdev-add", {
                "driver": "qcow2", "node-name": f"n{i}", "read-only": True, **opts,
                "file": {"driver": "file", "filename": str(img), "read-only": True}}))
        return out


def test_cache_option_errors_as_qemu(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "64M")
    ours, theirs = _replies("trio", tmp_path, img), _replies("qemu", tmp_path, img)
    for opts, a, b in zip(CASES, ours, theirs, strict=True):
        assert a == b, opts
