"""QemuOpts: the older flat option syntax that --chardev and --monitor use.

Unlike keyval there is no nesting; ``,,`` escapes a comma; the first item
may be a bare value for the implied key; a later bare ``key`` means
``key=on`` (and ``nokey`` would mean off, which no option here uses).

Its size parser also serves the block drivers that QEMU lets read some
options through QemuOpts (:func:`absorb_sizes`).
"""

from __future__ import annotations

import errno
from typing import Any

from .errors import GenericError
from .ghash import qdict_order
from .schema import strtosz_warn


def _split(text: str) -> list[str]:
    items, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    return items


def parse_flat(text: str, implied: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, item in enumerate(_split(text)):
        if not item and n > 0:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            if n == 0 and implied is not None:
                out[implied] = key
                continue
            out[key] = "on"
            continue
        out[key] = value
    return out


def size_error(name: str) -> GenericError:
    """parse_option_size's error for text that is no size (a sign, a bad
    suffix, a fraction without a suffix); the hint reaches the command line
    only, as QEMU's error_append_hint."""
    return GenericError(f"Parameter '{name}' expects a non-negative number below 2^64",
                        hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                             "tera-, peta-\nand exabytes, respectively.")


def parse_size(name: str, text: str) -> int:
    """QEMU's parse_option_size: a QEMU_OPT_SIZE option's text to bytes."""
    value, err = strtosz_warn(text)
    if err == errno.ERANGE:
        raise GenericError(f"Value '{text}' is out of range for parameter '{name}'")
    if err:
        raise size_error(name)
    return value


# Block driver options that the QAPI schema declares 'int' while the driver
# reads them through QemuOpts as QEMU_OPT_SIZE (its runtime_opts): QEMU
# prints the typed value back to text and parses it again with
# parse_option_size, so a negative number fails there, with that function's
# error, at the moment the driver absorbs its options.
DRIVER_SIZE_OPTIONS: dict[str, tuple[str, ...]] = {
    "null-co": ("size",),
    "null-aio": ("size",),
    "raw": ("offset", "size"),
    "qcow2": ("l2-cache-size", "l2-cache-entry-size", "refcount-cache-size", "cache-size"),
    "blkdebug": ("align", "max-transfer", "opt-write-zero", "max-write-zero",
                 "opt-discard", "max-discard"),
}


def absorb_sizes(driver: str, options: dict[str, Any]) -> None:
    """qemu_opts_absorb_qdict for ``driver``'s size options: the first
    (in QDict order, as QEMU walks it) that is no size raises its error."""
    names = DRIVER_SIZE_OPTIONS.get(driver, ())
    for key in qdict_order(options):
        value = options[key]
        if key in names and isinstance(value, int) and not isinstance(value, bool):
            parse_size(key, str(value))
