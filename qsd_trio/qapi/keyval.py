"""QEMU's keyval option syntax (util/keyval.c semantics), as used by
``--blockdev``, ``--export``, ``--nbd-server``, ``--object``, ``--monitor``.

Grammar, as QEMU documents it::

    key-vals     = [ key-val { ',' key-val } [ ',' ] ]
    key-val      = key '=' val | help
    key          = key-fragment { '.' key-fragment }
    key-fragment = qapi-name | index
    val          = { val-char | ',,' }*

* ``a.b=1`` builds nested dicts: ``{'a': {'b': '1'}}``; every leaf is a str.
* ``,,`` in a value stands for one comma.
* the first parameter may omit ``key=`` when an implied key is given
  (``null-co,node-name=x`` with ``implied_key='driver'``); that value ends at
  the first ``,`` or ``=`` and knows no ``,,`` escape (as in QEMU 7.2).
* ``key.0=a,key.1=b`` becomes a list; indices must be contiguous from 0.
* a later duplicate key replaces the earlier value (QEMU does the same).
* ``help`` / ``?`` asks for help; see :func:`parse_with_help`.

Errors are :class:`~qsd_trio.qapi.errors.GenericError` with QEMU's texts.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import GenericError

# util/keyval.c keeps key fragments in a 128-byte buffer
_FRAGMENT_MAX = 127

_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")
_INDEX = re.compile(r"[0-9]+")


def is_json(value: str) -> bool:
    """True when an option value is JSON rather than keyval (starts with '{')."""
    return value.startswith("{")


def _index(key: str) -> int | None:
    """key_to_index(): a whole-string decimal index, or None."""
    if not key or not key[0].isdigit() or not key.isascii() or not key.isdigit():
        return None
    return min(int(key), 2**31 - 1)


def _put(cur: dict[str, Any], key_in_cur: str, value: str | None, key: str, key_end: int) -> Any:
    """keyval_parse_put(): value None means "descend into a dict"."""
    old = cur.get(key_in_cur)
    if old is not None:
        if isinstance(old, str) != (value is not None):
            raise GenericError(f"Parameters '{key[:key_end]}.*' used inconsistently")
        if value is None:
            return old
    new: Any = value if value is not None else {}
    cur[key_in_cur] = new
    return new


def _parse_one(out: dict[str, Any], params: str, pos: int,
               implied_key: str | None) -> tuple[int, bool]:
    """Parse one key=value at ``params[pos:]``; return (next pos, was help)."""
    rest = params[pos:]
    m = re.match(r"[^=,]*", rest)
    assert m is not None
    length = m.end()
    implied_val = None
    key = rest
    if length and rest[length : length + 1] != "=":
        if rest[:length] in ("help", "?"):
            nxt = pos + length
            if params[nxt : nxt + 1] == ",":
                nxt += 1
            return nxt, True
        if implied_key:
            implied_val = rest[:length]
            key = implied_key
            length = len(implied_key)
    key_end = length

    # walk the key fragments
    cur = out
    s = 0
    key_in_cur = ""
    while True:
        if s != 0 and (im := _INDEX.match(key, s)) is not None:
            flen = im.end() - s
        else:
            qm = _QAPI_NAME.match(key, s)
            flen = qm.end() - s if qm else 0
        flen = min(flen, key_end - s)
        if not flen or (s + flen < key_end and key[s + flen] != "."):
            raise GenericError(f"Invalid parameter '{key[:key_end]}'")
        if flen > _FRAGMENT_MAX:
            frag = " fragment" if s != 0 or s + flen != key_end else ""
            raise GenericError(f"Parameter{frag} '{key[s:s + flen]}' is too long")
        if s != 0:
            cur = _put(cur, key_in_cur, None, key, s - 1)
        key_in_cur = key[s : s + flen]
        s += flen
        if s >= key_end or key[s] != ".":
            break
        s += 1

    if implied_val is not None:
        value = implied_val
        nxt = pos + len(implied_val)
        if params[nxt : nxt + 1] == ",":
            nxt += 1
    else:
        if key[s : s + 1] != "=":
            raise GenericError(f"Expected '=' after parameter '{key[:s]}'")
        i = pos + s + 1
        buf = []
        while i < len(params):
            c = params[i]
            if c == ",":
                i += 1
                if params[i : i + 1] != ",":
                    break
            buf.append(params[i])
            i += 1
        value = "".join(buf)
        nxt = i
    _put(cur, key_in_cur, value, key, key_end)
    return nxt, False


def _listify(cur: dict[str, Any], key_of_cur: list[str]) -> Any:
    """keyval_listify(): dicts whose keys are all indices become lists."""
    has_index = has_member = False
    for k, v in list(cur.items()):
        if _index(k) is not None:
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            cur[k] = _listify(v, key_of_cur + [k])
    prefix = "".join(k + "." for k in key_of_cur)
    if has_index and has_member:
        raise GenericError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return cur
    # QEMU lets a later duplicate index ('0' and '00') win silently and
    # reports the first gap below the highest index
    elts: dict[int, Any] = {}
    for k, v in cur.items():
        elts[_index(k)] = v  # type: ignore[index]
    out = []
    for i in range(max(elts) + 1):
        if i not in elts:
            raise GenericError(f"Parameter '{prefix}{i}' missing")
        out.append(elts[i])
    return out


def parse_with_help(params: str, implied_key: str | None = None) -> tuple[dict[str, Any], bool]:
    """Parse ``params``; return (options, whether 'help' or '?' was given)."""
    out: dict[str, Any] = {}
    pos = 0
    want_help = False
    while pos < len(params):
        pos, is_help = _parse_one(out, params, pos, implied_key)
        want_help = want_help or is_help
        implied_key = None
    return _listify(out, []), want_help


def parse(params: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse keyval ``params`` into nested dicts/lists of strings.

    Raises GenericError (QEMU's text), including for ``help``, which only
    :func:`parse_with_help` accepts.
    """
    out, want_help = parse_with_help(params, implied_key)
    if want_help:
        raise GenericError("Help is not available for this option")
    return out
