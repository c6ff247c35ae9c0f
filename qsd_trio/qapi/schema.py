"""The typed schema layer: QMP/JSON or keyval input -> attrs instances.

Input is checked the way QEMU's QObject input visitor checks it (members in
declaration order, base before branch, unexpected members reported when a
struct is finished) so that every error carries QEMU's exact text.  Two input
flavours, as in QEMU:

* strict (QMP, and ``--blockdev '{...}'``): JSON types must match;
* keyval (``--blockdev driver=file,...``): every leaf is a string, converted
  per the target type (``on/off``, integers with C ``strtoll`` base 0, sizes
  with suffixes, numbers).

QEMU quirks kept on purpose, because clients see them: enum and fixed-width
integer errors name the bare member (``'driver'``, not ``'file.driver'``;
``'null'`` inside a list), while missing/unexpected/type errors use the full
dotted path; negative integers wrap for unsigned members.

Values: QAPI enums are :class:`QapiEnum` (a ``StrEnum``), ``any`` stays raw
JSON, an explicit ``null`` is :data:`~qsd_trio.qapi.base.NULL`, absent
optional members are ``None``.  :func:`to_qmp` turns instances back into
QAPI JSON.
"""

from __future__ import annotations

import errno
import math
import re
from collections.abc import Iterable
from typing import Any

import attrs

from . import qapi_types as T
from .base import NULL, QapiEnum, QNull, c_name, py_field
from .errors import CommandNotFound, GenericError, warn_report
from .ghash import first_unexpected
from .introspect import introspect as _introspect


def _enabled(schema: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The declarations without the parts this build leaves out ('off')."""
    out = {}
    for name, ent in schema.items():
        if ent.get("off"):
            continue
        ent = dict(ent)
        for key in ("members", "variants", "alternatives", "values"):
            if key in ent:
                ent[key] = [x for x in ent[key] if not x.get("off")]
        out[name] = ent
    return out


SCHEMA = _enabled(T.SCHEMA)

_INT_RANGES = {
    "int": (-(2**63), 2**63 - 1, None),
    "int64": (-(2**63), 2**63 - 1, None),
    "int8": (-(2**7), 2**7 - 1, "int8_t"),
    "int16": (-(2**15), 2**15 - 1, "int16_t"),
    "int32": (-(2**31), 2**31 - 1, "int32_t"),
}
_UINT_RANGES = {
    "uint64": (2**64 - 1, None),
    "size": (2**64 - 1, None),
    "uint8": (2**8 - 1, "uint8_t"),
    "uint16": (2**16 - 1, "uint16_t"),
    "uint32": (2**32 - 1, "uint32_t"),
}
_SCALARS = {"str", "number", "bool", "null", "any", *_INT_RANGES, *_UINT_RANGES}


# -- C library number parsing, as QEMU's keyval visitor uses it ----------------

_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def strtoi64(s: str) -> int | None:
    """qemu_strtoi64(s, NULL, 0): whole string, base 0, range checked."""
    m = _STRTOL.match(s)
    if not m:
        return None
    v = int(m.group(2), 0) if not re.fullmatch(r"0[0-7]+", m.group(2)) else int(m.group(2), 8)
    if m.group(1) == "-":
        v = -v
    if not -(2**63) <= v < 2**63:
        return None
    return v


def strtou64(s: str) -> int | None:
    """qemu_strtou64(s, NULL, 0): like strtoull, a leading '-' wraps."""
    m = _STRTOL.match(s)
    if not m:
        return None
    v = int(m.group(2), 0) if not re.fullmatch(r"0[0-7]+", m.group(2)) else int(m.group(2), 8)
    if v >= 2**64:
        return None
    if m.group(1) == "-":
        v = (-v) % 2**64
    return v


_STRTOD = re.compile(
    r"[ \t\n\v\f\r]*[+-]?(?:0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
)


def _strtod_prefix(s: str, pos: int = 0) -> tuple[float, int] | None:
    """strtod on s[pos:]: (value, end) of the longest number, None if none."""
    m = _STRTOD.match(s, pos)
    if not m:
        return None
    text = m.group(0).strip()
    if "x" in text.lower():
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if "p" not in body.lower():
            body += "p0"
        return sign * float.fromhex(body), m.end()
    return float(text), m.end()


def strtod_finite(s: str) -> float | None:
    """qemu_strtod_finite(s, NULL): whole string, finite values only."""
    r = _strtod_prefix(s)
    if r is None or r[1] != len(s):
        return None
    try:
        v = r[0]
    except OverflowError:  # pragma: no cover - float() saturates to inf instead
        return None
    if not math.isfinite(v):
        return None
    return v


def _suffix_mul(c: str, unit: int = 1024) -> int:
    i = "BKMGTPE".find(c.upper()) if c else -1
    return unit**i if i >= 0 else -1


def strtosz(s: str) -> int | None:
    """qemu_strtosz(s, NULL): byte counts with B/K/M/G/T/P/E suffixes,
    fractions with a suffix ('1.5k'), hex without a fraction."""
    val, err = strtosz_errno(s)
    return None if err else val


def strtosz_warn(s: str) -> tuple[int, int]:
    """strtosz_errno, and QEMU 7.2's deprecation warning for a hex number
    with a suffix ('0x10k'), which it still takes."""
    val, err = strtosz_errno(s)
    if not err and re.match(r"[ \t\n\v\f\r]*\+?0[xX][0-9a-fA-F]+[bBkKmMgGtTpPeE]", s):
        warn_report(f"Using a multiplier suffix on hex numbers is deprecated: {s}")
    return val, err


def strtosz_errno(s: str) -> tuple[int, int]:
    """qemu_strtosz with its return code: (value, 0), or (0, EINVAL) for
    text that is no size, or (0, ERANGE) for one of 2^64 or more -- which
    QemuOpts reports differently ("Value '16E' is out of range ...")."""
    m = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)").match(s)
    if not m:
        return 0, errno.EINVAL
    val = int(m.group(2))
    if val >= 2**64:
        return 0, errno.ERANGE  # strtoull fails before the sign is looked at
    if m.group(1) == "-":
        return 0, errno.EINVAL
    end = m.end()
    valf = 0
    if val == 0 and s[end : end + 1] in ("x", "X"):
        hm = re.compile(r"[ \t\n\v\f\r]*\+?0[xX]([0-9a-fA-F]+)").match(s)
        if not hm:
            return 0, errno.EINVAL
        val = int(hm.group(1), 16)
        if val >= 2**64:
            return 0, errno.ERANGE
        end = hm.end()
        # 7.2 still takes a suffix after hex (it warns that this is
        # deprecated); only a fraction is refused
        if s[end : end + 1] == ".":
            return 0, errno.EINVAL
    elif s[end : end + 1] == ".":
        r = _strtod_prefix(s, end)
        if r is None:
            end += 1
        else:
            frac, fend = r
            if "e" in s[end:fend].lower():
                return 0, errno.EINVAL
            valf = int(frac * 2**64)
            end = fend
    mul = _suffix_mul(s[end : end + 1])
    if mul > 0:
        end += 1
    else:
        mul = 1
    if mul == 1:
        if valf:
            return 0, errno.EINVAL
    else:
        low = valf * mul
        val = val * mul + (low >> 64) + ((low >> 63) & 1)
        if val >= 2**64:
            return 0, errno.ERANGE
    if end != len(s):
        return 0, errno.EINVAL
    return val, 0


_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


# -- the visitor ---------------------------------------------------------------


def _member_path(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


class _Visitor:
    """One walk over one input value (QEMU's QObjectInputVisitor)."""

    def __init__(self, keyval: bool):
        self.keyval = keyval

    # Errors: ``path`` is QEMU's full_name(), ``name`` the bare member name
    # (None for list elements and the root, which QEMU prints as 'null').
    def type_error(self, path: str, expected: str) -> GenericError:
        return GenericError(f"Invalid parameter type for '{path or '<anonymous>'}', expected: {expected}")

    def visit(self, typ: str, value: Any, path: str, name: str | None) -> Any:
        if typ.startswith("["):
            return self.visit_list(typ[1:-1], value, path)
        if typ in _SCALARS:
            if self.keyval:
                return self.keyval_scalar(typ, value, path, name)
            return self.strict_scalar(typ, value, path, name)
        ent = SCHEMA[typ]
        meta = ent["meta"]
        if meta == "enum":
            return self.visit_enum(ent, value, path, name)
        if meta == "alternate":
            return self.visit_alternate(ent, value, path, name)
        if meta in ("struct", "union"):
            return self.visit_object(typ, value, path)
        raise AssertionError(f"cannot visit {typ}")

    def visit_list(self, elem: str, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.type_error(path, "array")
        fmt = "{}.{}" if self.keyval else "{}[{}]"
        return [self.visit(elem, v, fmt.format(path, i), None) for i, v in enumerate(value)]

    def visit_object(self, typ: str, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise self.type_error(path, "object")
        ent = SCHEMA[typ]
        remaining = dict(value)
        consumed: list[str] = []
        members = ent["members"]
        kwargs = self.visit_members(members, remaining, consumed, path)
        cls: Any
        if ent["meta"] == "union":
            tag = ent["tag"]
            case = value[tag]
            cls = getattr(T, getattr(T, c_name(typ)).__qapi_variants__[case])
            kwargs.pop(py_field(tag), None)
            branch = SCHEMA.get(cls.__qapi_branch__)
            if branch is not None:
                kwargs.update(self.visit_members(branch["members"], remaining, consumed, path))
        else:
            cls = getattr(T, c_name(typ))
        if remaining:
            raise _unexpected(value, consumed, path)
        return cls(**kwargs)

    def visit_members(self, members: list[dict[str, Any]], remaining: dict[str, Any],
                      consumed: list[str], path: str) -> dict[str, Any]:
        out = {}
        for m in members:
            mname = m["name"]
            if mname not in remaining:
                if not m["optional"]:
                    raise GenericError(f"Parameter '{_member_path(path, mname)}' is missing")
                continue
            consumed.append(mname)
            out[py_field(mname)] = self.visit(
                m["type"], remaining.pop(mname), _member_path(path, mname), mname
            )
        return out

    def visit_enum(self, ent: dict[str, Any], value: Any, path: str, name: str | None) -> QapiEnum:
        s = self.get_string(value, path)
        cls: type[QapiEnum] = getattr(T, c_name(ent["name"]))
        try:
            return cls(s)
        except ValueError:
            raise GenericError(
                f"Parameter '{name or 'null'}' does not accept value '{s}'"
            ) from None

    def visit_alternate(self, ent: dict[str, Any], value: Any, path: str, name: str | None) -> Any:
        want = _json_kind(value)
        for alt in ent["alternatives"]:
            if want in _accepts(alt["type"]):
                return self.visit(alt["type"], value, path, name)
        raise GenericError(
            f"Invalid parameter type for '{name or 'null'}', expected: {ent['name']}"
        )

    def get_string(self, value: Any, path: str) -> str:
        if isinstance(value, str):
            return value
        if self.keyval and isinstance(value, (dict, list)):
            raise GenericError(f"Parameters '{path}.*' are unexpected")
        raise self.type_error(path, "string")

    def strict_scalar(self, typ: str, value: Any, path: str, name: str | None) -> Any:
        if typ == "any":
            return value
        if typ == "str":
            return self.get_string(value, path)
        if typ == "bool":
            if not isinstance(value, bool):
                raise self.type_error(path, "boolean")
            return value
        if typ == "null":
            if value is not None:
                raise self.type_error(path, "null")
            return NULL
        isnum = isinstance(value, (int, float)) and not isinstance(value, bool)
        if typ == "number":
            if not isnum:
                raise self.type_error(path, "number")
            return float(value)
        if typ in _INT_RANGES:
            lo, hi, cname = _INT_RANGES[typ]
            if not isnum or isinstance(value, float) or not -(2**63) <= value < 2**63:
                raise self.type_error(path, "integer")
            if not lo <= value <= hi:
                raise GenericError(f"Parameter '{name or 'null'}' expects {cname}")
            return value
        # unsigned (size too): QEMU reads a uint64, accepting a negative int64
        # by wrapping; anything else, even a string, "expects uint64"
        hi, cname = _UINT_RANGES[typ]
        if not isnum or isinstance(value, float) or not -(2**63) <= value < 2**64:
            raise GenericError(f"Parameter '{path}' expects uint64")
        value %= 2**64
        if value > hi:
            raise GenericError(f"Parameter '{name or 'null'}' expects {cname}")
        return value

    def keyval_scalar(self, typ: str, value: Any, path: str, name: str | None) -> Any:
        if typ == "any":
            return value
        if typ == "null":
            raise self.type_error(path, "null")
        s = self.get_string(value, path)
        if typ == "str":
            return s
        if typ == "bool":
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise GenericError(f"Parameter '{path}' expects 'on' or 'off'")
        if typ == "number":
            v = strtod_finite(s)
            if v is None:
                raise GenericError(f"Parameter '{path}' expects number")
            return v
        if typ in _INT_RANGES:
            lo, hi, cname = _INT_RANGES[typ]
            v = strtoi64(s)
            if v is None:
                raise GenericError(f"Parameter '{path}' expects integer")
            if not lo <= v <= hi:
                raise GenericError(f"Parameter '{name or 'null'}' expects {cname}")
            return v
        hi, cname = _UINT_RANGES[typ]
        if typ == "size":
            v, err = strtosz_warn(s)
            if err:
                raise GenericError(f"Parameter '{path}' expects size")
            return v
        v = strtou64(s)
        if v is None:
            raise GenericError(f"Parameter '{path}' expects integer")
        if v > hi:
            raise GenericError(f"Parameter '{name or 'null'}' expects {cname}")
        return v


def _unexpected(value: dict[str, Any], consumed: list[str], path: str) -> GenericError:
    # with several extra keys QEMU names the first in its hash table's order
    key = first_unexpected(value, consumed)
    assert key is not None
    return GenericError(f"Parameter '{_member_path(path, key)}' is unexpected")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "?"


def _accepts(typ: str) -> tuple[str, ...]:
    """Which JSON kinds select this alternative (QEMU dispatches on QType)."""
    if typ.startswith("["):
        return ("array",)
    if typ in ("str",):
        return ("string",)
    if typ in ("bool",):
        return ("bool",)
    if typ == "null":
        return ("null",)
    if typ == "any":
        return ("null", "bool", "number", "string", "object", "array")
    if typ in _SCALARS:
        return ("number",)
    meta = SCHEMA[typ]["meta"]
    if meta == "enum":
        return ("string",)
    return ("object",)


# -- public API ----------------------------------------------------------------


@attrs.frozen
class CommandInfo:
    name: str
    arg_type: str | None
    ret_type: str | None
    allow_oob: bool
    boxed: bool
    features: tuple[str, ...]


def command_names() -> list[str]:
    """All commands in QEMU's definition order (module by module, as its
    introspection visits them).  ``query-commands`` lists them in reverse."""
    return [n for n in T.VISIT_ORDER if n in SCHEMA and SCHEMA[n]["meta"] == "command"]


def event_names() -> list[str]:
    return [n for n, e in SCHEMA.items() if e["meta"] == "event"]


def command_info(name: str) -> CommandInfo:
    ent = SCHEMA.get(name)
    if ent is None or ent["meta"] != "command":
        raise CommandNotFound(f"The command {name} has not been found")
    return CommandInfo(name, ent["arg"], ent["ret"], ent["allow-oob"], ent["boxed"],
                       tuple(ent["features"]))


def parse_command(name: str, arguments: dict[str, Any] | None) -> Any:
    """QMP ``arguments`` of command ``name`` -> its typed argument instance.

    Returns None for commands that take no arguments.  Raises GenericError
    with QEMU's text; CommandNotFound for a name not in the schema.
    """
    info = command_info(name)
    args = {} if arguments is None else arguments
    v = _Visitor(keyval=False)
    if info.arg_type is None:
        if not isinstance(args, dict):
            raise v.type_error("", "object")
        if args:
            raise _unexpected(args, [], "")
        return None
    return v.visit(info.arg_type, args, "", None)


def parse_json(type_name: str, data: Any) -> Any:
    """Strict (JSON) input for any schema type, e.g. ``--blockdev '{...}'``."""
    return _Visitor(keyval=False).visit(type_name, data, "", None)


def parse_keyval(type_name: str, data: dict[str, Any], path: str = "") -> Any:
    """Keyval input (all leaves strings) for a schema type, e.g. the dict
    :func:`qsd_trio.qapi.keyval.parse` made of ``--blockdev driver=...``;
    ``path`` names where ``data`` sits in the option (errors name
    ``addr.port``)."""
    return _Visitor(keyval=True).visit(type_name, data, path, None)


def lookup_type(type_name: str) -> Any:
    """The Python class (or enum) for a QAPI type name."""
    return getattr(T, c_name(type_name))


# -- back to JSON ----------------------------------------------------------------

def _unstructure_qapi(obj: Any, members: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cls = type(obj)
    tag = cls.__qapi_tag__
    for qname, attr, _typ, optional in members:
        if qname == tag:
            out[qname] = to_qmp(getattr(cls, attr))
            continue
        val = getattr(obj, attr)
        if val is None and optional:
            continue
        out[qname] = to_qmp(val)
    return out


def to_qmp(value: Any) -> Any:
    """Attrs instances / enums / lists / dicts -> QAPI JSON (hyphenated names,
    absent optional members omitted, explicit NULL as null).

    Written out rather than through cattrs' unstructure: these five cases
    are all it did, and importing cattrs and building its converter was
    about 10 ms of a start to the pidfile of 170 ms."""
    if isinstance(value, QapiEnum):  # before str: a QapiEnum is a StrEnum
        return str(value.value)
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, QNull):
        return None
    if isinstance(value, (list, tuple)):
        return [to_qmp(v) for v in value]
    if isinstance(value, dict):
        return {k: to_qmp(v) for k, v in value.items()}
    # a generated QAPI class (qapi_types.py) declares its members
    members = getattr(type(value), "__qapi_members__", None)
    if members is None:
        raise TypeError(f"not a QAPI value: {value!r}")
    return _unstructure_qapi(value, members)


def _object_members(typ: str, value: dict[str, Any]) -> list[dict[str, Any]] | None:
    ent = SCHEMA.get(typ)
    if ent is None:
        return None
    members: list[dict[str, Any]]
    if ent["meta"] == "struct":
        members = ent["members"]
        return members
    if ent["meta"] == "union":
        members = list(SCHEMA[ent["base"]]["members"])
        for v in ent["variants"]:
            if v["case"] == value.get(ent["tag"]):
                # an empty branch (q_empty, e.g. encrypt format 'aes') adds nothing
                members += SCHEMA.get(v["type"], {}).get("members", [])
        return members
    if ent["meta"] == "alternate":
        for alt in ent["alternatives"]:
            if SCHEMA.get(alt["type"], {}).get("meta") in ("struct", "union"):
                return _object_members(alt["type"], value)
    return None


def declared_order(value: Any, typ: str | None) -> Any:
    """``value`` (QMP JSON of type ``typ``) with every object's members in
    the schema's declaration order, base members first.

    QEMU's output visitor puts members into a QDict in that order, and a
    QDict prints in bucket order with the newest key first inside a bucket;
    handlers that build plain dicts get the insertion order right here, so
    the printer (monitor/qmp_json.py) can replay QEMU's order exactly."""
    if typ is None:
        return value
    if typ.startswith("["):
        if isinstance(value, list):
            return [declared_order(v, typ[1:-1]) for v in value]
        return value
    if not isinstance(value, dict):
        return value
    members = _object_members(typ, value)
    if members is None:
        return value  # 'any' and unknown types keep their order
    out = {}
    for m in members:
        name = m["name"]
        if name in value:
            out[name] = declared_order(value[name], m["type"])
    if len(out) != len(value):
        out.update((k, v) for k, v in value.items() if k not in out)
    return out


def introspect(commands: Iterable[str]) -> list[dict[str, Any]]:
    return _introspect(commands)
