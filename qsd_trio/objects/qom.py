"""User-creatable objects (``object-add``/``--object``) and the QOM tree.

qemu-storage-daemon's QOM tree holds ``/objects`` (created when the first
object is added) and ``/chardevs``.  An object here is its validated
properties plus a type; objects with behaviour (secrets, throttle groups,
TLS credentials, authz) are read by the code that uses them through
``daemon.objects[id]``.

The user-creatable types and their QOM parents are those qemu-storage-daemon
7.2 reports in ``qom-list-types``; their properties are the members of the
matching ``ObjectOptions`` variant in the schema.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import attrs

from ..ids import id_wellformed
from ..qapi import schema
from ..qapi.errors import DeviceNotFound, GenericError

if TYPE_CHECKING:
    from ..daemon import Daemon

# qom-type -> QOM parent type, as qemu-storage-daemon 7.2 lists them
USER_CREATABLE = {
    "authz-list": "authz",
    "authz-list-file": "authz",
    "authz-simple": "authz",
    "iothread": "event-loop-base",
    "main-loop": "event-loop-base",
    "pr-manager-helper": "pr-manager",
    "secret": "secret_common",
    "secret_keyring": "secret_common",
    "thread-context": "object",
    "throttle-group": "object",
    "tls-cipher-suites": "tls-creds",
    "tls-creds-anon": "tls-creds",
    "tls-creds-psk": "tls-creds",
    "tls-creds-x509": "tls-creds",
}

# Defaults QEMU reports for properties not given at creation (qom-get)
DEFAULTS: dict[str, dict[str, Any]] = {
    "iothread": {"poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0,
                 "aio-max-batch": 0, "thread-pool-min": 0, "thread-pool-max": 64},
    "main-loop": {"aio-max-batch": 0, "thread-pool-min": 0, "thread-pool-max": 64},
    "secret": {"format": "raw", "loaded": True},
    "secret_keyring": {"format": "raw", "loaded": True},
}


_BUILTIN_QOM = {"str": "string", "int": "int", "uint64": "uint64", "size": "size",
                "bool": "bool", "number": "number", "int64": "int", "uint32": "uint32",
                "uint16": "uint16", "uint8": "uint8", "int32": "int32"}


@functools.cache
def object_properties(qom_type: str) -> tuple[tuple[str, str], ...]:
    """(name, QOM type) of a user-creatable type, from the schema's
    ObjectOptions variant for it (the one declaration of its properties)."""
    info = {e["name"]: e for e in schema.introspect(["object-add"])}
    arg = info[info["object-add"]["arg-type"]]
    variant = next((v for v in arg.get("variants", []) if v["case"] == qom_type), None)
    members = [m for m in arg["members"] if m["name"] not in ("qom-type", "id")]
    if variant is not None:
        members += info[variant["type"]]["members"]
    out = [("type", "string")]
    for m in members:
        t = m["type"]
        tinfo = info.get(t, {})
        if t in _BUILTIN_QOM:
            qt = _BUILTIN_QOM[t]
        elif tinfo.get("meta-type") == "enum":
            qt = "string"
        elif tinfo.get("meta-type") == "array":
            qt = "list"
        elif (qom_type, m["name"]) == ("throttle-group", "limits"):
            qt = "ThrottleLimits"  # introspection hides struct names; QOM shows it
        else:
            qt = "string"
        out.append((m["name"], qt))
    return tuple(out)


@attrs.define
class UserObject:
    """An object's properties.  Objects with behaviour subclass it and
    override the hooks: ``qom_set``, ``qom_users``, ``on_delete``."""

    id: str
    qom_type: str
    props: dict[str, Any]

    def get(self, prop: str) -> Any:
        if prop == "type":
            return self.qom_type
        if prop in self.props:
            return self.props[prop]
        if prop in DEFAULTS.get(self.qom_type, {}):
            return DEFAULTS[self.qom_type][prop]
        raise GenericError(f"Property '{self.qom_type}.{prop}' not found")

    def qom_set(self, prop: str, value: Any) -> None:
        """qom-set: a plain object takes any of its type's properties."""
        if prop not in dict(object_properties(self.qom_type)) or prop == "type":
            raise GenericError(f"Property '{self.qom_type}.{prop}' not found")
        self.props[prop] = value

    def qom_users(self) -> list[str]:
        """Who uses the object besides the NBD server (object-del refuses then)."""
        return []

    def on_delete(self) -> None:
        """object-del, once no one uses it."""


def check_id(id: str) -> None:
    if not id_wellformed(id):
        raise GenericError("Parameter 'id' expects an identifier", hint=(
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."))


def resolve(daemon: Daemon, path: str) -> tuple[str, Any]:
    """Find a QOM path: ('root'|'container'|'object'|'chardev', thing)."""
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/"):
        # a partial path: QEMU matches a unique object of that name anywhere
        if len(parts) == 1 and parts[0] in daemon.objects:
            return "object", daemon.objects[parts[0]]
        if len(parts) == 1 and parts[0] in daemon.chardevs:
            return "chardev", daemon.chardevs[parts[0]]
        raise DeviceNotFound(f"Device '{path}' not found")
    if not parts:
        return "root", None
    if parts == ["objects"] and daemon.objects_root:
        return "container", "objects"
    if parts == ["chardevs"]:
        return "container", "chardevs"
    if len(parts) == 2 and parts[0] == "objects" and parts[1] in daemon.objects:
        return "object", daemon.objects[parts[1]]
    if len(parts) == 2 and parts[0] == "chardevs" and parts[1] in daemon.chardevs:
        return "chardev", daemon.chardevs[parts[1]]
    raise DeviceNotFound(f"Device '{path}' not found")
