"""QEMU's image locking: byte-range OFD locks on the image file.

For each permission bit ``i`` (consistent-read, write, write-unchanged,
resize) a process holding the permission keeps a shared lock on byte
``100 + i``; a process that does *not share* it keeps a shared lock on byte
``200 + i``.  Before taking a permission one tests that nobody else locks its
"unshared" byte, and before unsharing one tests that nobody else locks its
"perm" byte.  Because both sides use open-file-description locks, a lock held
through our own file descriptor never conflicts with itself, and the real
qemu-img / qemu-io / qemu-storage-daemon see ours (file-posix.c,
raw_apply_lock_bytes / raw_check_lock_bytes).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..qapi.errors import GenericError
from .node import Perm
from .perms import BITS, PERM_TEXT

LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock on Linux/x86-64 and arm64: short type, short whence, off_t start,
# off_t len, pid_t pid (+ padding)
_FLOCK = struct.Struct("hhqqi4x")


class LockError(GenericError):
    """A lock another process holds; ``hint`` is what QEMU prints on stderr."""

    def __init__(self, desc: str, filename: str = ""):
        super().__init__(desc)
        self.hint = f"Is another process using the image [{filename}]?"


def _setlk(fd: int, start: int, ltype: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))


def _locked_by_other(fd: int, start: int) -> bool:
    res = fcntl.fcntl(fd, F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0))
    return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)


def ofd_supported(fd: int) -> bool:
    try:
        _locked_by_other(fd, LOCK_BASE_PERM)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP):
            return False
        raise
    return True


def apply_lock_bytes(fd: int, perm: Perm, shared: Perm) -> None:
    """Hold exactly the locks for ``perm`` taken and ``~shared`` unshared."""
    for bit in BITS:
        idx = bit.bit_length() - 1
        _setlk(fd, LOCK_BASE_PERM + idx, fcntl.F_RDLCK if perm & bit else fcntl.F_UNLCK)
        _setlk(fd, LOCK_BASE_SHARED + idx,
               fcntl.F_UNLCK if shared & bit else fcntl.F_RDLCK)


def check_lock_bytes(fd: int, perm: Perm, shared: Perm, filename: str) -> None:
    """Raise QEMU's error if another process's locks forbid perm/shared."""
    for bit in BITS:
        idx = bit.bit_length() - 1
        if perm & bit and _locked_by_other(fd, LOCK_BASE_SHARED + idx):
            raise LockError(f'Failed to get "{PERM_TEXT[bit]}" lock', filename)
    for bit in BITS:
        idx = bit.bit_length() - 1
        if not shared & bit and _locked_by_other(fd, LOCK_BASE_PERM + idx):
            raise LockError(f'Failed to get shared "{PERM_TEXT[bit]}" lock', filename)


def set_perm_locks(fd: int, old: tuple[Perm, Perm], new: tuple[Perm, Perm],
                   filename: str) -> None:
    """Move from ``old`` to ``new`` locks, or stay at ``old`` and raise.

    Like raw_handle_perm_lock: first hold the union of both states, then check
    the new one against others, then drop what only the old one needed.
    """
    union_perm = old[0] | new[0]
    union_shared = old[1] & new[1]
    try:
        apply_lock_bytes(fd, union_perm, union_shared)
        check_lock_bytes(fd, new[0], new[1], filename)
    except OSError as e:
        apply_lock_bytes(fd, *old)
        raise GenericError(f"Failed to lock byte: {os.strerror(e.errno or 0)}") from e
    except GenericError:
        apply_lock_bytes(fd, *old)
        raise
    apply_lock_bytes(fd, *new)
