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

from typing import Any

import attrs

from ..qapi.errors import DeviceNotFound, GenericError

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


@attrs.define
class UserObject:
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


def check_id(id: str) -> None:
    # QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'
    if not id or not id[0].isascii() or not id[0].isalpha() or not all(
            c.isascii() and (c.isalnum() or c in "-._") for c in id):
        raise GenericError("Parameter 'id' expects an identifier", hint=(
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."))


def resolve(daemon: Any, path: str) -> tuple[str, Any]:
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
