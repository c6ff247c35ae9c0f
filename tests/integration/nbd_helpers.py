"""In-process fixtures for NBD tests: a memory node and a minimal daemon.

The memory node is a real BlockNode driver (bytes in a bytearray, zero
detection per 64 KiB cluster for block status) so tests can compare what
clients wrote with an independent model without needing the file driver.
"""

from __future__ import annotations

import json
import subprocess
import types

import trio

from qsd_trio.daemon import Daemon
from qsd_trio.nodes.node import BlockNode, BlockStatus, Status

CLUSTER = 64 * 1024


class MemoryNode(BlockNode):
    driver = "test-memory"

    async def open(self, options: dict) -> None:
        self.data = bytearray(options["size"])
        # clusters ever written (allocated); unwritten ones read as holes
        self.allocated: set[int] = set()

    def _length(self) -> int:
        return len(self.data)

    async def _co_preadv(self, offset, length):
        return bytes(self.data[offset:offset + length])

    async def _co_pwritev(self, offset, data, fua):
        self.data[offset:offset + len(data)] = data
        self._mark(offset, len(data), True)

    async def _co_pwrite_zeroes(self, offset, length, may_unmap, fua, no_fallback=False):
        self.data[offset:offset + length] = bytes(length)
        self._mark(offset, length, True)

    async def _co_pdiscard(self, offset, length):
        self.data[offset:offset + length] = bytes(length)
        # only whole clusters become unallocated
        first = -(-offset // CLUSTER)
        last = (offset + length) // CLUSTER
        for c in range(first, last):
            self.allocated.discard(c)

    def _mark(self, offset, length, on):
        for c in range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1):
            self.allocated.add(c)

    async def _co_block_status(self, offset, length):
        c = offset // CLUSTER
        alloc = c in self.allocated
        end = min(offset + length, len(self.data))
        pos = (c + 1) * CLUSTER
        while pos < end and ((pos // CLUSTER) in self.allocated) == alloc:
            pos += CLUSTER
        n = min(pos, end) - offset
        if alloc:
            return BlockStatus(Status.DATA | Status.ALLOCATED, n, depth=1)
        return BlockStatus(Status.ZERO, n, depth=0)


async def make_daemon(nursery: trio.Nursery, size: int = 64 << 20) -> Daemon:
    """A daemon with a memory node "mem", accepting clients, whose exports
    run in ``nursery``."""
    daemon = Daemon()
    node = MemoryNode(daemon.graph, "mem")
    await node.open({"size": size})
    daemon.graph.nodes["mem"] = node
    daemon.export_nursery = nursery
    daemon.accepting.set()
    return daemon


def ns(**kw):
    """Typed-args stand-in: every optional member absent unless given."""
    defaults = dict(type="nbd", writable=None, writethrough=None, iothread=None,
                    fixed_iothread=None, name=None, description=None, bitmaps=None,
                    allocation_depth=None, mode=None, tls_creds=None, tls_authz=None,
                    max_connections=None)
    defaults.update(kw)
    return types.SimpleNamespace(**defaults)


def make_pki(d) -> None:
    """A CA, a server and a client certificate in QEMU's/libnbd's file names."""
    import subprocess

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
         "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=Test CA")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    for who in ("server", "client"):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem", "-out",
             f"{who}.csr", "-subj", f"/C=GB/O=Example/CN={who}.example.com")
        ossl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
             "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile", "ext.cnf")


def fio_verify(uri: str, cwd, *, seed: str = "1", offset: int = 0, size: int = 16 << 20,
               iodepth: int = 32, bs: str = "4k") -> None:
    """fio's nbd engine: random writes at ``iodepth``, every block read back
    and checksummed (crc32c); fails on any error or short run."""
    r = subprocess.run(["fio", "--name=v", "--ioengine=nbd", f"--uri={uri}",
                        f"--randseed={seed}", "--rw=randwrite", f"--bs={bs}",
                        f"--iodepth={iodepth}", f"--offset={offset}", f"--size={size}",
                        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                        "--output-format=json"], capture_output=True, text=True,
                       timeout=120, cwd=cwd)  # fio leaves a verify state file in its cwd
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == size, job
