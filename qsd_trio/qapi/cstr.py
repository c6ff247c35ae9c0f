"""QMP strings as the bytes QEMU holds for them.

A QMP string reaches qsd-trio as a Python str in which the bytes QEMU
would keep but that are not UTF-8 (a NUL, kept as modified UTF-8's C0 80,
see :mod:`qsd_trio.monitor.qmp_json`) are surrogate-escaped.  Where such a
string becomes bytes (a name written into an image, a hash key, a length
limit counted in bytes), :func:`c_bytes` gives QEMU's bytes instead of the
UnicodeEncodeError a plain ``str.encode()`` raises.
"""

from __future__ import annotations


def c_bytes(s: str) -> bytes:
    """The bytes of a QMP string as QEMU's char * holds them."""
    return s.encode("utf-8", "surrogateescape")
