#!/usr/bin/env python3
"""Generate qsd_trio/qapi/qapi_types.py from QEMU's QAPI declarations.

Usage: ``python tools/qapi_gen.py [QAPI_DIR [OUTPUT]]``

QAPI_DIR defaults to ``tools/qapi-7.2``, the declarations of QEMU 7.2 kept in
this repository (see its README.md for origin and licence).

Reads ``storage-daemon-qapi-schema.json`` and the files it includes (QAPI's
JSON dialect: ``#`` comments, single-quoted strings), evaluates each ``'if'``
for the Linux build of qemu-storage-daemon 7.2 (see ``CONFIG``), and writes a
Python module holding

* ``SCHEMA``: every entity, normalised (implicit argument/base types made
  explicit, member types resolved, conditions already applied), keyed by
  name, in definition order;
* ``VISIT_ORDER``: commands and events in the order QEMU's introspection
  visits them (module by module, in the order modules are first included);
* one attrs class per object type, one ``QapiEnum`` per enum, and for each
  union one class per discriminator value holding base + branch members.

Doc comments are not copied.  The runtime never reads the declarations.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import sys

# What a Linux build of qemu-storage-daemon 7.2 (Debian 12) has; checked
# against tests/data/qsd-7.2-qmp-schema.json (qemu-storage-daemon 7.2's own
# query-qmp-schema reply): everything but libblkio is built in.
CONFIG = {
    "CONFIG_BLKIO": False,
}

BUILTINS = {
    # name -> JSON type as introspection reports it
    "str": "string",
    "number": "number",
    "int": "int",
    "int8": "int",
    "int16": "int",
    "int32": "int",
    "int64": "int",
    "uint8": "int",
    "uint16": "int",
    "uint32": "int",
    "uint64": "int",
    "size": "int",
    "bool": "boolean",
    "null": "null",
    "any": "value",
    "QType": "string",
}


def eval_if(cond) -> bool:
    if cond is None:
        return True
    if isinstance(cond, str):
        return CONFIG.get(cond, True)
    if "all" in cond:
        return all(eval_if(c) for c in cond["all"])
    if "any" in cond:
        return any(eval_if(c) for c in cond["any"])
    if "not" in cond:
        return not eval_if(cond["not"])
    raise ValueError(f"bad condition {cond!r}")


# -- reading the QAPI dialect ------------------------------------------------


def _to_json(text: str) -> str:
    """Strip comments and turn single-quoted strings into JSON strings."""
    out = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "'":
            j = text.index("'", i + 1)
            out.append(json.dumps(text[i + 1 : j]))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_exprs(path: str):
    """Yield (module_path, expr) in QEMU's parse order, expanding includes."""
    seen: set[str] = set()

    def walk(p):
        p = os.path.normpath(p)
        if p in seen:
            return
        seen.add(p)
        text = _to_json(open(p, encoding="utf-8").read())
        dec = json.JSONDecoder()
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            expr, pos = dec.raw_decode(text, pos)
            if "include" in expr:
                # QEMU resolves includes relative to the including file;
                # the storage daemon schema names them as ../../qapi/X.
                inc = os.path.join(os.path.dirname(p), os.path.basename(expr["include"]))
                yield p, {"include": os.path.normpath(inc)}
                yield from walk(inc)
            else:
                yield p, expr

    yield from walk(path)


# -- normalising --------------------------------------------------------------


def _features(feats):
    out = []
    for f in feats or []:
        if isinstance(f, str):
            out.append(f)
        elif eval_if(f.get("if")):
            out.append(f["name"])
    return out


# Disabled parts (an 'if' that is false for this build) are kept, marked
# "off": QEMU's introspection numbers types before the C preprocessor drops
# them, so they still take up masked names.  Everything else skips them.
def _off(cond) -> dict:
    return {} if eval_if(cond) else {"off": True}


def _typeref(t) -> str:
    if isinstance(t, list):
        return "[" + t[0] + "]"
    return t


def _members(data) -> list[dict]:
    out = []
    for key, val in data.items():
        opt = key.startswith("*")
        name = key[1:] if opt else key
        feats: list = []
        off: dict = {}
        if isinstance(val, dict):
            off = _off(val.get("if"))
            feats = _features(val.get("features"))
            val = val["type"]
        out.append({"name": name, "type": _typeref(val), "optional": opt, "features": feats,
                    **off})
    return out


class Schema:
    def __init__(self) -> None:
        self.entities: dict[str, dict] = {}
        self.modules: dict[str, list[str]] = {}

    def add(self, module: str, ent: dict) -> None:
        name = ent["name"]
        if name in self.entities:
            raise ValueError(f"duplicate {name}")
        self.entities[name] = ent
        self.modules.setdefault(module, []).append(name)

    def implicit(self, module: str, name: str, data: dict, off: dict) -> str | None:
        members = _members(data)
        if not members:
            return None
        self.add(
            module,
            {"meta": "struct", "name": name, "members": members, "base": None,
             "features": [], "implicit": True, **off},
        )
        return name


def load(path: str, extra: tuple[str, ...] = ()) -> Schema:
    """QEMU's declarations from ``path``, then qsd-trio's own from ``extra``.

    Besides QAPI's expressions, ``extra`` may hold ``{'extend': STRUCT,
    'data': {...}}``: members qsd-trio adds to a struct of QEMU's."""
    schema = Schema()
    main = os.path.normpath(path)
    schema.modules[main] = []
    exprs = [e for p in (path, *extra) for e in read_exprs(p)]
    for module, expr in exprs:
        if "include" in expr:
            schema.modules.setdefault(expr["include"], [])
            continue
        if "pragma" in expr:
            continue
        off = _off(expr.get("if"))
        feats = _features(expr.get("features"))
        if "enum" in expr:
            values = []
            for v in expr["data"]:
                if isinstance(v, str):
                    values.append({"name": v, "features": []})
                else:
                    values.append({"name": v["name"], "features": _features(v.get("features")),
                                   **_off(v.get("if"))})
            schema.add(module, {"meta": "enum", "name": expr["enum"], "values": values,
                                "features": feats, **off})
        elif "struct" in expr:
            schema.add(module, {"meta": "struct", "name": expr["struct"],
                                "members": _members(expr["data"]),
                                "base": expr.get("base"), "features": feats, **off})
        elif "union" in expr:
            name = expr["union"]
            base = expr["base"]
            if isinstance(base, dict):
                base = schema.implicit(module, f"q_obj_{name}-base", base, off)
            variants = []
            for case, val in expr["data"].items():
                voff: dict = {}
                if isinstance(val, dict):
                    voff = _off(val.get("if"))
                    val = val["type"]
                variants.append({"case": case, "type": val, **voff})
            schema.add(module, {"meta": "union", "name": name, "base": base,
                                "tag": expr["discriminator"], "variants": variants,
                                "features": feats, **off})
        elif "alternate" in expr:
            alts = []
            for case, val in expr["data"].items():
                aoff: dict = {}
                if isinstance(val, dict):
                    aoff = _off(val.get("if"))
                    val = val["type"]
                alts.append({"case": case, "type": val, **aoff})
            schema.add(module, {"meta": "alternate", "name": expr["alternate"],
                                "alternatives": alts, "features": feats, **off})
        elif "command" in expr:
            name = expr["command"]
            data = expr.get("data")
            if isinstance(data, dict):
                data = schema.implicit(module, f"q_obj_{name}-arg", data, off)
            ret = expr.get("returns")
            schema.add(module, {"meta": "command", "name": name, "arg": data,
                                "ret": _typeref(ret) if ret is not None else None,
                                "boxed": bool(expr.get("boxed")),
                                "allow-oob": bool(expr.get("allow-oob")),
                                "features": feats, **off})
        elif "extend" in expr:
            # qsd-trio's own members of one of QEMU's structs (QAPI has no
            # way to add members to a type another file declares): appended
            # after QEMU's, marked so that introspection can tell them apart
            # (qsd_trio/qapi/introspect.py, tests/unit/test_qapi_introspect.py)
            target = schema.entities.get(expr["extend"])
            if target is None or target["meta"] != "struct":
                raise ValueError(f"'extend' names no struct: {expr['extend']!r}")
            have = {m["name"] for m in target["members"]}
            for m in _members(expr["data"]):
                if m["name"] in have:
                    raise ValueError(f"{expr['extend']} already has {m['name']!r}")
                target["members"].append({**m, "qsd": True})
        elif "event" in expr:
            name = expr["event"]
            data = expr.get("data")
            if isinstance(data, dict):
                data = schema.implicit(module, f"q_obj_{name}-arg", data, off)
            schema.add(module, {"meta": "event", "name": name, "arg": data,
                                "boxed": bool(expr.get("boxed")), "features": feats, **off})
        else:
            raise ValueError(f"unknown expression {expr!r}")
    resolve(schema)
    return schema


def resolve(schema: Schema) -> None:
    """Flatten struct bases and fill in union branches QEMU makes implicit."""
    ents = schema.entities

    def all_members(name: str) -> list[dict]:
        ent = ents[name]
        own = ent["members"]
        if ent.get("base"):
            return all_members(ent["base"]) + own
        return own

    for ent in ents.values():
        if ent["meta"] == "struct":
            ent["all_members"] = all_members(ent["name"])
    for ent in ents.values():
        if ent["meta"] == "union":
            base = all_members(ent["base"])
            ent["all_members"] = base
            tag = next(m for m in base if m["name"] == ent["tag"])
            enum = ents[tag["type"]]
            have = {v["case"] for v in ent["variants"]}
            # a discriminator value without a branch gets the empty type,
            # appended after the declared branches (as QEMU does)
            for v in enum["values"]:
                if v["name"] not in have:
                    ent["variants"].append({"case": v["name"], "type": "q_empty",
                                            **({"off": True} if v.get("off") else {})})


# -- emitting Python ----------------------------------------------------------


def c_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def py_field(name: str) -> str:
    n = c_name(name)
    if keyword.iskeyword(n) or n in ("mro",):
        n += "_"
    return n


def enum_member(value: str) -> str:
    n = c_name(value).upper()
    if n[0].isdigit():
        n = "_" + n
    return n


def variant_class(union: str, case: str) -> str:
    return f"{c_name(union)}_{c_name(case)}"


def py_type(t: str, ents: dict) -> str:
    if t.startswith("["):
        return f"list[{py_type(t[1:-1], ents)}]"
    if t in BUILTINS:
        return {"str": "str", "number": "float", "bool": "bool", "null": "QNull",
                "any": "Any", "QType": "str"}.get(t, "int")
    ent = ents[t]
    if ent["meta"] == "alternate":
        return " | ".join(py_type(a["type"], ents) for a in ent["alternatives"]
                          if not a.get("off"))
    return c_name(t)


def emit(schema: Schema) -> str:
    ents = schema.entities
    out: list[str] = []
    w = out.append
    w('"""QEMU 7.2 qemu-storage-daemon QAPI schema as Python.')
    w("")
    w("GENERATED by tools/qapi_gen.py from QEMU's QAPI declarations; do not edit.")
    w("Regenerate with ``python tools/qapi_gen.py`` (declarations in tools/qapi-7.2).")
    w('"""')
    w("")
    # F821: annotations name classes that exist once made (see _FACTORIES)
    w("# ruff: noqa: E501, N801, F821")
    w("from __future__ import annotations")
    w("")
    w("import json")
    w("from typing import Any, ClassVar")
    w("")
    w("import attrs")
    w("")
    w("from .base import QapiEnum, QNull, make_class")
    w("")
    w("")
    # enums first: class variables of union variants refer to them
    for ent in ents.values():
        if ent["meta"] != "enum" or ent.get("off"):
            continue
        w(f"class {c_name(ent['name'])}(QapiEnum):")
        values = [v for v in ent["values"] if not v.get("off")]
        for v in values:
            w(f"    {enum_member(v['name'])} = {v['name']!r}")
        if not values:
            w("    pass")
        w("")
        w("")
    # Classes are made on first use (module __getattr__, PEP 562): attrs
    # compiles methods for each class, and building all of them would cost
    # a second at every start.  Each factory is ordinary code; a base class
    # is fetched with _get() so it is made first.
    factories: list[tuple[str, str, str | None]] = []

    def factory(pyname: str, qapi_name: str, case: str | None, parent: str | None,
                body: list[str]) -> None:
        w(f"def _make_{pyname}() -> type:")
        w("    @attrs.define(kw_only=True)")
        w(f"    class {pyname}{f'(_get({parent!r}))' if parent else ''}:")
        for line in body:
            w("    " + line if line else "")
        w(f"    return {pyname}")
        w("")
        w("")
        factories.append((pyname, qapi_name, case))

    def fields(members: list[dict], tag: str | None = None) -> list[str]:
        body = []
        if tag is not None:
            body.append(f"    {tag}")
        members = [m for m in members if not m.get("off")]
        if not members and tag is None:
            body.append("    pass")
        for m in members:
            t = py_type(m["type"], ents)
            if m["optional"]:
                body.append(f"    {py_field(m['name'])}: {t} | None = None")
            else:
                body.append(f"    {py_field(m['name'])}: {t}")
        return body

    # the empty object every command without arguments or return type uses
    factory("q_empty", "q_empty", None, None, ["    pass"])
    for ent in ents.values():
        if ent["meta"] == "struct" and not ent.get("off"):
            base = c_name(ent["base"]) if ent.get("base") else None
            factory(c_name(ent["name"]), ent["name"], None, base, fields(ent["members"]))
    for ent in ents.values():
        if ent["meta"] != "union" or ent.get("off"):
            continue
        name = ent["name"]
        tagm = next(m for m in ent["all_members"] if m["name"] == ent["tag"])
        tag_py = py_field(tagm["name"])
        tag_enum = c_name(tagm["type"])
        base_members = [m for m in ent["all_members"] if m["name"] != ent["tag"]]
        doc = [f'    """Union on {ent["tag"]!r}; instances are always one of its variant classes."""',
               ""]
        factory(c_name(name), name, None, None,
                doc + fields(base_members, f"{tag_py}: ClassVar[{tag_enum}]"))
        for v in ent["variants"]:
            if v.get("off"):
                continue
            vt = ents[v["type"]] if v["type"] != "q_empty" else {"all_members": []}
            factory(variant_class(name, v["case"]), name, v["case"], c_name(name),
                    fields(vt["all_members"],
                           f"{tag_py}: ClassVar[{tag_enum}] = {tag_enum}.{enum_member(v['case'])}"))
    w("# python name -> (factory, QAPI type name, union discriminator value)")
    w("_FACTORIES: dict[str, tuple[Any, str, str | None]] = {")
    for pyname, qapi_name, case in factories:
        w(f"    {pyname!r}: (_make_{pyname}, {qapi_name!r}, {case!r}),")
    w("}")
    w("")
    w("")
    w("def _get(name: str) -> type:")
    w("    return make_class(globals(), name)")
    w("")
    w("")
    w("def __getattr__(name: str) -> type:")
    w("    if name in _FACTORIES:")
    w("        return _get(name)")
    w('    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")')
    w("")
    w("")
    w("def __dir__() -> list[str]:")
    w("    return sorted(set(globals()) | set(_FACTORIES))")
    w("")
    w("")
    # the declarations themselves, for the visitor and for introspection
    schema_out = {}
    for name, ent in ents.items():
        e = {k: v for k, v in ent.items() if k != "implicit"}
        if ent["meta"] in ("struct", "union"):
            e["members"] = e.pop("all_members")
            if ent["meta"] == "struct":
                e.pop("base", None)
        schema_out[name] = e
    order = []
    for names in schema.modules.values():
        for n in names:
            if ents[n]["meta"] in ("command", "event"):
                order.append(n)
    # one JSON string literal: compiling a dict display this size costs
    # ~0.1 s at every start when no bytecode cache is written
    w("SCHEMA: dict[str, dict] = json.loads(r\"\"\"{")
    items = list(schema_out.items())
    for i, (name, e) in enumerate(items):
        sep = "," if i < len(items) - 1 else ""
        w(f"{json.dumps(name)}: {json.dumps(e)}{sep}")
    w('}""")')
    w("")
    w("VISIT_ORDER: list[str] = [")
    for n in order:
        w(f"    {n!r},")
    w("]")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ref = argv[1] if len(argv) > 1 else os.path.join(here, "qapi-7.2")
    target = argv[2] if len(argv) > 2 else os.path.join(
        here, "..", "qsd_trio", "qapi", "qapi_types.py")
    # qsd-trio's own commands come last, so QEMU's masked type names keep
    # their numbers in query-qmp-schema
    schema = load(os.path.join(ref, "storage-daemon-qapi-schema.json"),
                  (os.path.join(here, "qapi-qsd", "qsd-trio.json"),))
    text = emit(schema)
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
