"""eventfd writes and reads that keep the GIL.

``os.write``, ``os.read`` and ``os.eventfd_write`` release the GIL around
their system call.  For an eventfd the call never blocks (the descriptors
here are non-blocking, and a write only fails when the counter would
overflow) and takes a microsecond or two, but releasing the GIL hands it
to any thread waiting for it (an I/O engine's worker back from its
``pwritev``), and the caller must then wait for it back: two futex calls
and two context switches, several times per request on a 1 MiB write.
These go through ``ctypes.PyDLL``, which calls without releasing it.
The descriptors must be non-blocking: a read that blocked would hold the
GIL, stopping every thread.
"""

from __future__ import annotations

import ctypes
import errno
import os

_LIBC = ctypes.PyDLL(None, use_errno=True)
_write = _LIBC.write
_write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_write.restype = ctypes.c_ssize_t
_read = _LIBC.read
_read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_read.restype = ctypes.c_ssize_t

# the 8-byte value written (1), and where reads put theirs (never looked
# at, so threads reading at once may share it)
_ONE = ctypes.c_uint64(1)
_ONE_ADDR = ctypes.addressof(_ONE)
_SINK = ctypes.c_uint64(0)
_SINK_ADDR = ctypes.addressof(_SINK)


def signal(fd: int) -> bool:
    """Add 1 to the eventfd's counter; False if the write failed (a full
    counter still wakes the reader; a closed descriptor, EBADF)."""
    return bool(_write(fd, _ONE_ADDR, 8) == 8)


def drain(fd: int) -> None:
    """Read and reset a non-blocking eventfd's counter (nothing if it was
    zero).

    Raises:
        OSError: the read failed otherwise (EBADF, EINVAL: not an eventfd's
            8 bytes)."""
    if _read(fd, _SINK_ADDR, 8) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err))
