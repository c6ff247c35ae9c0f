"""QemuOpts: the older flat option syntax that --chardev and --monitor use.

Unlike keyval there is no nesting; ``,,`` escapes a comma; the first item
may be a bare value for the implied key; a later bare ``key`` means
``key=on`` (and ``nokey`` would mean off, which no option here uses).
"""

from __future__ import annotations

from .errors import GenericError

_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


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


def parse_size(name: str, text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("bkmgtpe")
    suffix = t[len(num):]
    if suffix not in _SUFFIXES:
        raise GenericError(f"Parameter '{name}' expects a non-negative number below 2^64")
    try:
        value = float(num) if "." in num else int(num, 0)
    except ValueError:
        raise GenericError(f"Parameter '{name}' expects a non-negative number below 2^64") from None
    result = int(value * (1 << _SUFFIXES[suffix]))
    if result < 0 or result >= 1 << 64:
        raise GenericError(f"Parameter '{name}' expects a non-negative number below 2^64")
    return result
