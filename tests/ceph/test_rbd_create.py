"""blockdev-create for rbd (BlockdevCreateOptionsRbd) through QMP, in
qsd-trio and in qemu-storage-daemon on the same cluster: the same images
(size, object size, features) and the same job errors."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers import HAVE_QEMU

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20


def qemu_create(q, options):
    """Run blockdev-create in a daemon; None or the job's error."""
    q.cmd("blockdev-create", **{"job-id": "c", "options": options})
    deadline = time.monotonic() + 60
    while True:
        (job,) = q.cmd("query-jobs")
        if job["status"] == "concluded":
            q.cmd("job-dismiss", id="c")
            return job.get("error")
        assert time.monotonic() < deadline
        time.sleep(0.05)


CASES = [
    ({}, {"size": 16 * MiB}),
    ({}, {"size": 16 * MiB, "cluster-size": 1 * MiB}),
    ({}, {"size": 16 * MiB, "cluster-size": 3 * MiB}),
    ({}, {"size": 16 * MiB, "cluster-size": 2048}),
    ({"snapshot": "s"}, {"size": 16 * MiB}),
    ({"pool": "nopool"}, {"size": 16 * MiB}),
    ({"image": "EXISTING"}, {"size": 16 * MiB}),
    ({"encrypt": {"format": "luks", "key-secret": "x"}}, {"size": 16 * MiB}),
]


def test_create_matches_qemu(daemon_factory, ceph_cluster, rbd_image):
    qmp = {kind: daemon_factory(kind).qmp() for kind in ("qemu", "trio")}
    for i, (loc_extra, args) in enumerate(CASES):
        results = {}
        for kind in ("qemu", "trio"):
            loc = {"pool": "rbd", "image": f"created-{kind}-{i}", "conf": str(ceph_cluster.conf),
                   **loc_extra}
            if loc["image"] == "EXISTING":
                loc["image"] = rbd_image
            if "encrypt" in loc:
                args = {**args, "encrypt": loc.pop("encrypt")}
            err = qemu_create(qmp[kind], {"driver": "rbd", "location": loc, **args})
            info = None
            if err is None:
                info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"rbd/{loc['image']}"))
                info = {k: info[k] for k in ("size", "order", "object_size", "features")}
            results[kind] = (err, info)
        assert results["trio"] == results["qemu"], (loc_extra, args)
        if i < 2:
            assert results["qemu"][0] is None
