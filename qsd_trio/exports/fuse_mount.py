"""Mounting and unmounting a FUSE file system over ``/dev/fuse``.

As root the mount is one ``mount(2)`` call with the open ``/dev/fuse`` fd in
the options (what libfuse does for root).  Otherwise the setuid helper
``fusermount3`` mounts and hands the fd back over a unix socket named by the
``_FUSE_COMMFD`` environment variable (SCM_RIGHTS), libfuse's protocol with
its helper.  Both are blocking calls that resolve the mountpoint path, which
may itself live on a FUSE mount this process serves, so callers run them in
a worker thread.

Errors: :class:`OSError` with the errno of the failed call.
"""

from __future__ import annotations

import array
import ctypes
import os
import socket
import stat
import subprocess

from ..libc import LIBC

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

# QEMU asks libfuse for these; max_read lifts the kernel's default read cap
BASE_OPTIONS = "max_read=67108864,default_permissions"

_libc = LIBC
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _options(allow_other: bool) -> str:
    return BASE_OPTIONS + (",allow_other" if allow_other else "")


def mount(mountpoint: str, *, allow_other: bool, use_helper: bool | None = None) -> int:
    """Mount a FUSE file system whose root is a regular file over ``mountpoint``.

    Returns the ``/dev/fuse`` fd (blocking mode, close-on-exec); the caller
    owns it and must unmount before closing it.  ``use_helper`` forces the
    fusermount3 path (default: only when not root).
    """
    if use_helper is None:
        use_helper = os.geteuid() != 0
    if use_helper:
        return _mount_with_helper(mountpoint, allow_other)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        opts = (f"fd={fd},rootmode={stat.S_IFREG:o},user_id={os.getuid()},"
                f"group_id={os.getgid()},{_options(allow_other)}")
        if _libc.mount(b"/dev/fuse", os.fsencode(mountpoint), b"fuse",
                       MS_NOSUID | MS_NODEV, opts.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), mountpoint)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_with_helper(mountpoint: str, allow_other: bool) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.run(
            ["fusermount3", "-o", _options(allow_other) + ",fsname=/dev/fuse", "--",
             mountpoint],
            env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        theirs.close()
        if proc.returncode != 0:
            raise OSError(1, proc.stderr.decode(errors="replace").strip() or "fusermount3 failed")
        fds = array.array("i")
        _msg, ancdata, _flags, _addr = ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: fds.itemsize])
        if not fds:
            raise OSError(5, "fusermount3 did not pass the /dev/fuse descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]


def mount_device(target: str) -> str | None:
    """The ``major:minor`` of the topmost mount on ``target``, or None.

    ``target`` is the mountpoint's realpath, resolved before mounting: once
    mounted, resolving it asks the FUSE server, which may be our caller.

    Lets unmount() make sure it detaches our mount and not one that someone
    stacked on top, or that replaced ours after an external unmount.
    """
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            path = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            if path == target:
                found = fields[2]
    return found


def unmount(mountpoint: str, *, target: str | None = None, device: str | None = None,
            use_helper: bool | None = None) -> None:
    """Detach the mount lazily (open files keep it alive until closed).

    With ``device``, only if the topmost mount on ``target`` (the resolved
    mountpoint) is still that one.
    """
    if device is not None and mount_device(target or mountpoint) != device:
        return
    if use_helper is None:
        use_helper = os.geteuid() != 0
    if use_helper:
        subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), mountpoint)
