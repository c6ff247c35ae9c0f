"""Loaded ``secret`` objects of a daemon, kept on its block graph by id so
drivers find a ``key-secret`` without knowing about QOM objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..qapi.errors import GenericError

if TYPE_CHECKING:
    from ..nodes.graph import BlockGraph


def register(graph: BlockGraph, id: str, value: bytes) -> None:
    graph.secrets[id] = value


def unregister(graph: BlockGraph, id: str) -> None:
    graph.secrets.pop(id, None)


def lookup(graph: BlockGraph, id: str) -> bytes:
    """The bytes of secret ``id`` (QEMU's qcrypto_secret_lookup)."""
    try:
        return graph.secrets[id]
    except KeyError:
        raise GenericError(f"No secret with id '{id}'") from None


def lookup_utf8(graph: BlockGraph, id: str) -> bytes:
    """qcrypto_secret_lookup_as_utf8: the secret, which must be UTF-8 text."""
    value = lookup(graph, id)
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise GenericError(f"Data from secret {id} is not valid UTF-8") from None
    return value
