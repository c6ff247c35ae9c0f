"""Building blocks the generated schema module (qapi_types.py) stands on.

The generated module defines enums, and one factory per attrs class that
:func:`make_class` calls on first use; it gives each class its QAPI
declaration:

* ``cls.__qapi_name__``: the QAPI type name (``'BlockdevOptionsFile'``);
* ``cls.__qapi_members__``: ``(qapi_name, attr_name, type, optional)`` for
  every member, base members first, in declaration order (the order QEMU's
  visitors walk them, so errors come out in the same order);
* ``cls.__qapi_tag__``: a union's discriminator (its QAPI name), None for
  other classes;
* unions: ``cls.__qapi_variants__`` (discriminator value -> variant class name).  A variant
  class subclasses its union and carries the discriminator value as a class
  variable, so ``args.driver == 'file'`` works on every instance.
"""

from __future__ import annotations

import enum
import keyword
import re
from typing import Any, cast


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


def _members(ent: list[dict[str, Any]]) -> tuple[tuple[str, str, str, bool], ...]:
    return tuple((m["name"], py_field(m["name"]), m["type"], m["optional"])
                 for m in ent if not m.get("off"))


def make_class(ns: dict[str, Any], pyname: str) -> type:
    """Build generated class ``pyname`` in module namespace ``ns`` (once) and
    attach its QAPI declaration (see the module docstring)."""
    made = ns.get(pyname)
    if made is not None:
        return cast(type, made)
    factory, qapi_name, case = ns["_FACTORIES"][pyname]
    cls: Any = factory()
    cls.__qualname__ = pyname
    schema: dict[str, dict[str, Any]] = ns["SCHEMA"]
    cls.__qapi_name__ = qapi_name
    ent = schema.get(qapi_name)
    if ent is None:  # q_empty
        cls.__qapi_members__ = ()
        cls.__qapi_tag__ = None
    elif case is None:
        cls.__qapi_members__ = _members(ent["members"])
        cls.__qapi_tag__ = None
        if ent["meta"] == "union":
            cls.__qapi_tag__ = ent["tag"]
            # discriminator value -> variant class name (made on first use)
            cls.__qapi_variants__ = {
                v["case"]: variant_class_name(qapi_name, v["case"])
                for v in ent["variants"] if not v.get("off")
            }
    else:
        branch_type = next(v["type"] for v in ent["variants"] if v["case"] == case)
        branch = schema.get(branch_type)
        extra = _members(branch["members"]) if branch else ()
        cls.__qapi_members__ = _members(ent["members"]) + extra
        cls.__qapi_branch__ = branch_type
    ns[pyname] = cls
    return cast(type, cls)
