"""TLS credentials objects checked when they are created, as QEMU loads them.

``tls-creds-psk``: a directory holding ``keys.psk`` (gnutls' format, lines
of ``identity:hexkey``); ``username`` names the client's identity and is
refused on a server endpoint.  The NBD server reads the keys at each
handshake (exports/tls_psk.py), as gnutls does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..qapi.errors import GenericError
from .qom import UserObject

if TYPE_CHECKING:
    import ssl

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


def find_creds(objects: dict[str, Any], id: str, endpoint: str) -> UserObject:
    """The TLS credentials object ``id`` for a user on ``endpoint``
    ("server" or "client"), as QEMU's users look it up (QOM's
    TYPE_QCRYPTO_TLS_CREDS covers tls-cipher-suites too), with QEMU's
    errors in QEMU's order."""
    obj = objects.get(id)
    if obj is None:
        raise GenericError(f"No TLS credentials with id '{id}'")
    if not (isinstance(obj, UserObject) and (obj.qom_type.startswith("tls-creds")
                                             or obj.qom_type == "tls-cipher-suites")):
        raise GenericError(f"Object with id '{id}' is not TLS credentials")
    if obj.props.get("endpoint", "client") != endpoint:
        raise GenericError(f"Expected TLS credentials for a {endpoint} endpoint")
    return obj


def check(qom_type: str, props: dict[str, Any]) -> None:
    """Refuse credentials QEMU would refuse at object-add."""
    if qom_type == "tls-creds-psk":
        if props.get("endpoint", "client") == "server" and props.get("username") is not None:
            raise GenericError("username should not be set when endpoint=server")
        psk_key_file(props)


# RFC 7919's ffdhe2048 group, for anonymous DH when the credentials directory
# has no dh-params.pem (gnutls would generate parameters instead)
FFDHE2048_PEM = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def anon_server_context() -> ssl.SSLContext:
    """An ssl.SSLContext for tls-creds-anon: anonymous Diffie-Hellman, as
    QEMU's gnutls priority "NORMAL:+ANON-DH" offers it (TLS 1.2, no
    certificates; OpenSSL allows aNULL suites at security level 0 only)."""
    import ssl
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("aNULL:!eNULL:@SECLEVEL=0")
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write(FFDHE2048_PEM)
        f.flush()
        ctx.load_dh_params(f.name)
    return ctx
