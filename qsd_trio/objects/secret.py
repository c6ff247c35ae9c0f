"""The ``secret`` user-creatable object (SecretProperties).

QEMU loads a secret once, when the object is created: ``data`` inline or
the whole content of ``file`` (read as it is, a trailing newline included),
decoded from base64 when ``format=base64``; with ``keyid`` that data is
the ciphertext (AES-256-CBC under another secret, ``iv`` in base64, PKCS#7
padding) and the plaintext is the secret.  The
value is registered with the block graph under the object's id
(:func:`qsd_trio.crypto.secrets.register`), where the drivers that take a
``key-secret`` find it; ``object-del`` removes it (drivers that already
unlocked their image keep working, as in QEMU, which holds no reference).
"""

from __future__ import annotations

import base64
import binascii
import string
from typing import TYPE_CHECKING, Any

from ..crypto import secrets
from ..qapi.errors import GenericError
from .qom import UserObject

if TYPE_CHECKING:
    from ..nodes.graph import BlockGraph

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
    graph: BlockGraph

    def on_delete(self) -> None:
        secrets.unregister(self.graph, self.id)


def _load(props: dict[str, Any], graph: Any) -> bytes:
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
        assert data is not None
        raw = data.encode(errors="surrogateescape")  # QMP keeps NUL as C0 80
    fmt = props.get("format", "raw")
    keyid = props.get("keyid")
    if keyid is not None:
        # ``format`` says how the ciphertext is written; the plaintext is used as it is
        key = secrets.lookup(graph, keyid)
        if len(key) != 32:
            raise GenericError("Key should be 32 bytes in length")
        if props.get("iv") is None:
            raise GenericError("IV is required to decrypt secret")
        iv = b64decode(props["iv"])
        if len(iv) != 16:
            raise GenericError(f"IV should be 16 bytes in length not {len(iv)}")
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        ct = b64decode(raw.decode("ascii", "replace")) if fmt == "base64" else raw
        if len(ct) % 16:
            raise GenericError(f"Length {len(ct)} must be a multiple of block size 16")
        pt = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor().update(ct)
        pad = pt[-1] if pt else 0
        if not 1 <= pad <= min(16, len(pt)):
            raise GenericError(f"Incorrect number of padding bytes ({pad}) "
                               "found on decrypted data")
        raw = pt[:-pad]
    elif fmt == "base64":
        raw = b64decode(raw.decode("ascii", "replace"))
    return raw


def create(graph: Any, id: str, props: dict[str, Any]) -> SecretObject:
    obj = SecretObject(id, "secret", props)
    obj.value = _load(props, graph)
    obj.graph = graph
    secrets.register(graph, id, obj.value)
    return obj
