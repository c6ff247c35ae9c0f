"""QEMU's id_wellformed (util/id.c): the one rule for the ids users choose.

Node names, job ids, export ids, object and chardev ids all follow it: an
ASCII letter, then ASCII letters, digits, ``-``, ``.`` and ``_``.  Each
caller raises its own error text, as QEMU's callers do.
"""

from __future__ import annotations

import re

_WELLFORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def id_wellformed(id: str) -> bool:
    return _WELLFORMED.match(id) is not None
