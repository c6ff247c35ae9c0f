"""The session's Ceph cluster (one for every rbd test: starting one takes a
few seconds) and a fresh image per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.ceph import HAVE_CEPH, Cluster, start

_names = itertools.count()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Cluster]:
    if not HAVE_CEPH:
        pytest.skip("Ceph (ceph-mon, ceph-osd, ceph-common) not installed")
    yield from start()


@pytest.fixture
def rbd_image(ceph_cluster: Cluster) -> Iterator[str]:
    """A new 64 MiB image in pool rbd; its name."""
    name = f"img{next(_names)}"
    ceph_cluster.rbd("create", f"rbd/{name}", "--size", "64M")
    yield name
