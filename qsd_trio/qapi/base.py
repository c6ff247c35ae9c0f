"""Building blocks the generated schema module (qapi_types.py) stands on.

The generated module defines attrs classes and enums, then calls
:func:`bind` so every class knows its QAPI declaration:

* ``cls.__qapi_name__``: the QAPI type name (``'BlockdevOptionsFile'``);
* ``cls.__qapi_members__``: ``(qapi_name, attr_name, type, optional)`` for
  every member, base members first, in declaration order (the order QEMU's
  visitors walk them, so errors come out in the same order);
* unions: ``cls.__qapi_tag__`` (the discriminator's QAPI name) and
  ``cls.__qapi_variants__`` (discriminator value -> variant class).  A variant
  class subclasses its union and carries the discriminator value as a class
  variable, so ``args.driver == 'file'`` works on every instance.
"""

from __future__ import annotations

import enum
import keyword
import re
from typing import Any


class QapiEnum(enum.StrEnum):
    """A QAPI enum; members compare equal to their QAPI strings."""


class QNull:
    """JSON ``null`` where QAPI allows it explicitly (``StrOrNull``,
    ``BlockdevRefOrNull``).  An *absent* optional member is ``None``; an
    explicit ``null`` is :data:`NULL`, so the two stay distinguishable."""

    _instance: QNull | None = None

    def __new__(cls) -> QNull:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"

    def __bool__(self) -> bool:
        return False


NULL = QNull()


def c_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def py_field(name: str) -> str:
    """Attribute name for a QAPI member: '-' -> '_', keywords get a '_'."""
    n = c_name(name)
    if keyword.iskeyword(n) or n == "mro":
        n += "_"
    return n


def variant_class_name(union: str, case: str) -> str:
    return f"{c_name(union)}_{c_name(case)}"


def _members(ent: list[dict]) -> tuple[tuple[str, str, str, bool], ...]:
    return tuple((m["name"], py_field(m["name"]), m["type"], m["optional"])
                 for m in ent if not m.get("off"))


def bind(ns: dict[str, Any]) -> None:
    """Attach the declarations in ``ns['SCHEMA']`` to the generated classes."""
    schema: dict[str, dict] = ns["SCHEMA"]
    empty = ns["q_empty"]
    empty.__qapi_name__ = "q_empty"
    empty.__qapi_members__ = ()
    for name, ent in schema.items():
        if ent.get("off"):
            continue
        meta = ent["meta"]
        if meta == "enum":
            ns[c_name(name)].__qapi_name__ = name
        elif meta == "struct":
            cls = ns[c_name(name)]
            cls.__qapi_name__ = name
            cls.__qapi_members__ = _members(ent["members"])
        elif meta == "union":
            cls = ns[c_name(name)]
            cls.__qapi_name__ = name
            cls.__qapi_members__ = _members(ent["members"])
            cls.__qapi_tag__ = ent["tag"]
            variants = {}
            for v in ent["variants"]:
                if v.get("off"):
                    continue
                vcls = ns[variant_class_name(name, v["case"])]
                vcls.__qapi_name__ = name
                branch = schema.get(v["type"])
                extra = _members(branch["members"]) if branch else ()
                vcls.__qapi_members__ = cls.__qapi_members__ + extra
                vcls.__qapi_branch__ = v["type"]
                variants[v["case"]] = vcls
            cls.__qapi_variants__ = variants
