"""Helpers for FUSE export tests: mount bookkeeping and what a client observes.

Every test that mounts uses :func:`no_stale_mounts` (through the
``fuse_tmp`` fixture) so that a failing test, or a daemon that dies without
unmounting (qemu-storage-daemon does when a later --export fails), never
leaves a mount behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import Daemon


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return found


def is_mounted(path) -> bool:
    # resolve only the directory: resolving the mountpoint itself would ask the
    # FUSE server, which in in-process tests is the caller's own event loop
    path = os.fspath(path)
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


@contextlib.contextmanager
def no_stale_mounts(path: Path):
    try:
        yield
    finally:
        for _ in range(10):
            left = mounts_under(path)
            if not left:
                break
            for mp in reversed(left):
                subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


@pytest.fixture
def fuse_tmp(tmp_path):
    """tmp_path, with any mount left under it removed at teardown."""
    with no_stale_mounts(tmp_path):
        yield tmp_path


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def make_mountpoint(tmp_path: Path, name: str = "mp") -> str:
    p = tmp_path / name
    p.write_bytes(b"")
    return str(p)


def fuse_daemon(factory, kind: str, image: str, mountpoint: str, *, fmt: str | None = None,
                export_opts: str = "writable=on", file_opts: str = "") -> Daemon:
    """A daemon with node ``f`` (file) [and ``fmt`` (format) on top], exported at mountpoint."""
    args = ["--blockdev", f"driver=file,node-name=f,filename={image}" + file_opts]
    node = "f"
    if fmt:
        args += ["--blockdev", f"driver={fmt},node-name=fmt,file=f"]
        node = "fmt"
    opts = f"type=fuse,id=e,node-name={node},mountpoint={mountpoint}"
    if export_opts:
        opts += "," + export_opts
    return factory(kind, args + ["--export", opts])


def stat_fields(path) -> dict:
    """What a client sees from stat() that both daemons should agree on."""
    st = os.stat(path)
    return {"mode": oct(st.st_mode), "size": st.st_size, "blocks": st.st_blocks,
            "blksize": st.st_blksize, "nlink": st.st_nlink, "ino": st.st_ino,
            "uid": st.st_uid, "gid": st.st_gid,
            "times_equal": st.st_atime == st.st_mtime == st.st_ctime,
            "ns": st.st_mtime_ns % 1_000_000_000}


def errno_of(fn, *args) -> str:
    """Run fn(*args): 'ok' or the errno name it failed with."""
    try:
        fn(*args)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def seek_map(path) -> list:
    """(whence, offset) -> result of lseek for a few probe offsets."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for off in sorted({0, 4096, 65536, 65536 + 512, 1 << 20, size - 1, size, size + 1}):
            if off < 0:
                continue
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    out.append((whence, off, os.lseek(fd, off, whence)))
                except OSError as e:
                    out.append((whence, off, errno.errorcode[e.errno]))
    finally:
        os.close(fd)
    return out


def mode_bits(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)
