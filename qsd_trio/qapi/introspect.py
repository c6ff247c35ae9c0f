"""``query-qmp-schema``, computed from the generated declarations.

Follows QEMU's introspection generator (docs/devel/qapi-code-gen.rst,
"Client JSON Protocol introspection"): commands and events are listed in
definition order; every type they reach is appended to a work queue as it is
first used and listed after them, in queue order.  Type names other than
builtins are masked as numbers handed out on first use; arrays are
``[element]``; every integer type is reported as ``int``.

Members qsd-trio adds to QEMU's structs (``'extend'`` in
tools/qapi-qsd/qsd-trio.json, marked ``qsd`` in the declarations) are listed
after QEMU's; ``extensions=False`` leaves them out, which gives exactly
qemu-storage-daemon 7.2's reply (tests/unit/test_qapi_introspect.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .qapi_types import SCHEMA, VISIT_ORDER

_BUILTIN_JSON = {
    "str": "string",
    "number": "number",
    "bool": "boolean",
    "null": "null",
    "any": "value",
    "int": "int",
}
_INTS = {"int", "int8", "int16", "int32", "int64",
         "uint8", "uint16", "uint32", "uint64", "size"}


class _Introspector:
    def __init__(self, extensions: bool = True) -> None:
        self.extensions = extensions
        self.names: dict[str, str] = {}
        self.queue: list[str] = []
        self.queued: set[str] = set()

    def name(self, typ: str) -> str:
        if typ not in self.names:
            self.names[typ] = str(len(self.names))
        return self.names[typ]

    def use(self, typ: str) -> str:
        if typ in _INTS:
            typ = "int"
        elif typ.startswith("[") and typ[1:-1] in _INTS:
            typ = "[int]"
        if typ not in self.queued:
            self.queued.add(typ)
            self.queue.append(typ)
        if typ in _BUILTIN_JSON:
            return typ
        if typ.startswith("["):
            return "[" + self.use(typ[1:-1]) + "]"
        return self.name(typ)

    def member(self, m: dict[str, Any]) -> dict[str, Any] | None:
        if m.get("qsd") and not self.extensions:
            return None
        out: dict[str, Any] = {"name": m["name"], "type": self.use(m["type"])}
        if m["optional"]:
            out["default"] = None
        if m.get("features"):
            out["features"] = list(m["features"])
        return None if m.get("off") else out

    def tree(self, obj: dict[str, Any], name: str, meta: str,
             features: list[str]) -> dict[str, Any]:
        obj["name"] = name
        obj["meta-type"] = meta
        if features:
            obj["features"] = list(features)
        return obj

    def entity(self, name: str) -> dict[str, Any]:
        ent = SCHEMA[name]
        meta = ent["meta"]
        feats = ent.get("features", [])
        if meta == "command":
            obj: dict[str, Any] = {"arg-type": self.use(ent["arg"] or "q_empty"),
                                   "ret-type": self.use(ent["ret"] or "q_empty")}
            if ent["allow-oob"]:
                obj["allow-oob"] = True
            return self.tree(obj, name, "command", feats)
        if meta == "event":
            obj = {"arg-type": self.use(ent["arg"] or "q_empty")}
            return self.tree(obj, name, "event", feats)
        raise AssertionError(meta)

    def type_entry(self, typ: str) -> dict[str, Any]:
        if typ in _BUILTIN_JSON:
            return self.tree({"json-type": _BUILTIN_JSON[typ]}, typ, "builtin", [])
        if typ.startswith("["):
            element = self.use(typ[1:-1])
            return self.tree({"element-type": element}, f"[{element}]", "array", [])
        if typ == "q_empty":
            return self.tree({"members": []}, self.name(typ), "object", [])
        ent = SCHEMA[typ]
        meta = ent["meta"]
        feats = ent.get("features", [])
        if meta == "enum":
            members = []
            values = [v for v in ent["values"] if not v.get("off")]
            for v in values:
                m: dict[str, Any] = {"name": v["name"]}
                if v["features"]:
                    m["features"] = list(v["features"])
                members.append(m)
            obj = {"members": members, "values": [v["name"] for v in values]}
            return self.tree(obj, self.name(typ), "enum", feats)
        if meta == "alternate":
            alts = [({"type": self.use(a["type"])}, a) for a in ent["alternatives"]]
            obj = {"members": [m for m, a in alts if not a.get("off")]}
            return self.tree(obj, self.name(typ), "alternate", feats)
        declared = [self.member(m) for m in ent["members"]]
        obj = {"members": [m for m in declared if m is not None]}
        if meta == "union":
            obj["tag"] = ent["tag"]
            variants = [({"case": v["case"], "type": self.use(v["type"])}, v)
                        for v in ent["variants"]]
            obj["variants"] = [x for x, v in variants if not v.get("off")]
        return self.tree(obj, self.name(typ), "object", feats)


def introspect(commands: Iterable[str], *, extensions: bool = True) -> list[dict[str, Any]]:
    """The ``query-qmp-schema`` reply for a daemon implementing ``commands``.

    Lists those commands and all events, then every type reachable from them;
    with ``extensions`` False, without qsd-trio's members of QEMU's structs.
    """
    wanted = set(commands)
    it = _Introspector(extensions)
    out = []
    for n in VISIT_ORDER:
        ent = SCHEMA[n]
        # parts this build leaves out still take up masked names (QEMU
        # numbers them before the preprocessor drops them), so visit them
        if ent["meta"] == "event" or n in wanted or ent.get("off"):
            tree = it.entity(n)
            if not ent.get("off"):
                out.append(tree)
    i = 0
    while i < len(it.queue):
        typ = it.queue[i]
        tree = it.type_entry(typ)
        if not SCHEMA.get(typ, {}).get("off"):
            out.append(tree)
        i += 1
    return out
