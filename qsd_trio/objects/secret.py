"""The ``secret`` user-creatable object (SecretProperties).

QEMU loads a secret once, when the object is created: ``data`` inline or
the whole content of ``file`` (read as it is, a trailing newline included),
decoded from base64 when ``format=base64``, and with ``keyid`` decrypted
with another secret (AES-256-CBC, ``iv`` in base64, PKCS#7 padding).  The
value is registered with the block graph under the object's id
(:func:`qsd_trio.crypto.secrets.register`), where the drivers that take a
``key-secret`` find it; ``object-del`` removes it (drivers that already
unlocked their image keep working, as in QEMU, which holds no reference).
"""

from __future__ import annotations

import base64
import binascii
import string
from typing import Any

from ..crypto import secrets
from ..qapi.errors import GenericError
from .qom import UserObject

_B64 = set(string.ascii_letters + string.digits + "+/=")


def b64decode(text: str) -> bytes:
    """QEMU's qbase64_decode: only base64 characters, decoded leniently (glib)."""
    if any(c not in _B64 for c in text):
        raise GenericError("Base64 data contains invalid characters")
    body = text.split("=", 1)[0]
    body = body[:len(body) - len(body) % 4] if len(body) % 4 == 1 else body
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4))
    except binascii.Error:
        raise GenericError("Base64 data contains invalid characters") from None


class SecretObject(UserObject):
    """A loaded secret; ``value`` is its bytes."""

    value: bytes

    def on_delete(self) -> None:
        secrets.unregister(self.graph, self.id)


def _load(props: dict, graph: Any) -> bytes:
    data, file = props.get("data"), props.get("file")
    if data is not None and file is not None:
        raise GenericError("'file' and 'data' are mutually exclusive")
    if data is None and file is None:
        raise GenericError("Either 'file' or 'data' must be provided")
    if file is not None:
        try:
            with open(file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise GenericError(f"Unable to read {file}: Failed to open file \u201c{file}\u201d: "
                               f"{e.strerror}") from None
    else:
        raw = data.encode()
    fmt = props.get("format", "raw")
    keyid = props.get("keyid")
    if keyid is not None:
        # the payload is base64 ciphertext whatever the format says
        key = secrets.lookup(graph, keyid)
        if len(key) != 32:
            raise GenericError(f"Master key '{keyid}' must be 32 bytes in length")
        if props.get("iv") is None:
            raise GenericError(f"IV is required to decrypt secret '{keyid}'")
        iv = b64decode(props["iv"])
        if len(iv) != 16:
            raise GenericError(f"IV is {len(iv)} bytes but should be 16")
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        ct = b64decode(raw.decode("ascii", "replace"))
        if not ct or len(ct) % 16:
            raise GenericError("Incorrect number of padding bytes (0) found on decrypted data")
        pt = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor().update(ct)
        pad = pt[-1]
        if not 1 <= pad <= 16:
            raise GenericError(f"Incorrect number of padding bytes ({pad}) "
                               "found on decrypted data")
        raw = pt[:-pad]
        if fmt == "base64":
            raw = b64decode(raw.decode("ascii", "replace"))
    elif fmt == "base64":
        raw = b64decode(raw.decode("ascii", "replace"))
    return raw


def create(graph: Any, id: str, props: dict) -> SecretObject:
    obj = SecretObject(id, "secret", props)
    obj.value = _load(props, graph)
    obj.graph = graph
    secrets.register(graph, id, obj.value)
    return obj
