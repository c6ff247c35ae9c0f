"""The C library, for the few calls the os module lacks (mount, umount2,
fallocate, sync_file_range, mallopt).

It is looked up as dlopen(NULL), the symbols the process already has:
ctypes.util.find_library("c") runs ldconfig in a subprocess, some 7 ms of
every start for each module that asked.
"""

from __future__ import annotations

import ctypes

LIBC = ctypes.CDLL(None, use_errno=True)
