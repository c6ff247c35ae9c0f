"""A throwaway one-node Ceph cluster for the rbd tests.

``start.sh DIR`` starts one ceph-mon and one ceph-osd (memstore: data in the
OSD's RAM) with cephx and a pool ``rbd`` of size 1, everything under DIR;
``stop.sh DIR`` stops them (OSD first) and removes DIR.  The fixture
``ceph_cluster`` (tests/conftest.py) starts one cluster per test session.
Tests are skipped when the Ceph daemons or librbd are not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs

HERE = Path(__file__).parent
HAVE_CEPH = all(shutil.which(p) for p in ("ceph-mon", "ceph-osd", "ceph", "rbd"))


@attrs.frozen
class Cluster:
    dir: Path
    conf: Path

    def osd_pid(self) -> int:
        return int((self.dir / "run" / "osd.0.pid").read_text())

    def restart_osd(self) -> None:
        """Start osd.0 again (after it was killed); returns once it has
        daemonized."""
        subprocess.run(["ceph-osd", "-c", str(self.conf), "-i", "0"], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)

    def rbd(self, *args: str) -> str:
        """Run the rbd command line tool on this cluster; its stdout."""
        out = subprocess.run(["rbd", "-c", str(self.conf), *args], check=True,
                             capture_output=True, text=True, timeout=60)
        return out.stdout


def start(objectstore: str = "memstore") -> Iterator[Cluster]:
    """Start a cluster in a short temporary directory (admin sockets must
    fit the 107-byte unix socket limit); stop it when the generator ends.
    ``bluestore`` keeps the data across an OSD restart (a sparse file in
    the directory), ``memstore`` only in the OSD's memory."""
    d = Path(tempfile.mkdtemp(prefix="qsd-ceph-"))
    try:
        subprocess.run([str(HERE / "start.sh"), str(d / "c")], check=True,
                       stdout=subprocess.DEVNULL, timeout=180,
                       env={**os.environ, "CEPH_OBJECTSTORE": objectstore})
        yield Cluster(d / "c", d / "c" / "ceph.conf")
    finally:
        subprocess.run([str(HERE / "stop.sh"), str(d / "c")], check=False, timeout=60)
        shutil.rmtree(d, ignore_errors=True)
