"""Loaded ``secret`` objects of a daemon, kept on its block graph by id so
drivers find a ``key-secret`` without knowing about QOM objects."""

from __future__ import annotations

from typing import Any

from ..qapi.errors import GenericError


def _registry(graph: Any) -> dict[str, bytes]:
    reg = getattr(graph, "secrets", None)
    if reg is None:
        reg = graph.secrets = {}
    return reg


def register(graph: Any, id: str, value: bytes) -> None:
    _registry(graph)[id] = value


def unregister(graph: Any, id: str) -> None:
    _registry(graph).pop(id, None)


def lookup(graph: Any, id: str) -> bytes:
    """The bytes of secret ``id`` (QEMU's qcrypto_secret_lookup)."""
    try:
        return _registry(graph)[id]
    except KeyError:
        raise GenericError(f"No secret with id '{id}'") from None


def lookup_utf8(graph: Any, id: str) -> bytes:
    """qcrypto_secret_lookup_as_utf8: the secret, which must be UTF-8 text."""
    value = lookup(graph, id)
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise GenericError(f"Data from secret {id} is not valid UTF-8") from None
    return value
