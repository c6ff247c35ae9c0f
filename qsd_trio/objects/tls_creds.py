"""TLS credentials objects checked when they are created, as QEMU loads them.

``tls-creds-psk``: a directory holding ``keys.psk`` (gnutls' format, lines
of ``identity:hexkey``); ``username`` names the client's identity and is
refused on a server endpoint.  The NBD server reads the keys at each
handshake (exports/tls_psk.py), as gnutls does.
"""

from __future__ import annotations

import os
from typing import Any

from ..qapi.errors import GenericError

PSK_FILE = "keys.psk"


def psk_key_file(props: dict[str, Any]) -> str:
    """The keys file of a tls-creds-psk object; QEMU's errors when unusable."""
    d = props.get("dir")
    if d is None:
        raise GenericError("Missing 'dir' property value")
    path = os.path.join(d, PSK_FILE)
    try:
        os.stat(path)
    except OSError as e:
        raise GenericError(f"Unable to access credentials {path}: {e.strerror}") from None
    return path


def check(qom_type: str, props: dict[str, Any]) -> None:
    """Refuse credentials QEMU would refuse at object-add."""
    if qom_type == "tls-creds-psk":
        if props.get("endpoint", "client") == "server" and props.get("username") is not None:
            raise GenericError("username should not be set when endpoint=server")
        psk_key_file(props)
