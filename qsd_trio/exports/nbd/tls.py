"""TLS for the NBD server: server contexts from tls-creds objects, and authz.

A tls-creds-x509 or tls-creds-anon object becomes an ``ssl.SSLContext``; a
tls-creds-psk object becomes the path of its keys file, served by
exports/tls_psk.py.  After the TLS handshake an x509 client's certificate DN
is checked against the server's tls-authz object (authz-simple, authz-list,
authz-list-file), as QEMU's qcrypto_tls_session_check_credentials does.
nbdkit's crypto.c has the same role.
"""

from __future__ import annotations

import fnmatch
import json
import os
import ssl
from typing import Any

import attrs

from ...objects.qom import UserObject
from ...objects.tls_creds import anon_server_context, psk_key_file
from ...qapi.errors import GenericError


def prop(obj: UserObject, name: str, default: Any = None) -> Any:
    """A property of a user-created object as it was given, else ``default``."""
    return obj.props.get(name, default)


def server_context(creds: UserObject) -> ssl.SSLContext | str:
    """How to serve TLS with a credentials object: an SSLContext from a
    tls-creds-x509 object's directory (QEMU's file names), or for
    tls-creds-psk the path of its keys file (see tls_psk.py).

    Raises:
        GenericError: with QEMU's message, when the files do not load.
    """
    d = prop(creds, "dir", ".")
    if creds.qom_type == "tls-creds-psk":
        from .. import tls_psk  # noqa: F401 - pyOpenSSL loaded now, not by the first client

        return psk_key_file({"dir": d})
    if creds.qom_type == "tls-creds-anon":
        ctx = anon_server_context()
        params = os.path.join(d, "dh-params.pem")
        if prop(creds, "dir") is not None and os.path.exists(params):
            try:
                ctx.load_dh_params(params)
            except (OSError, ssl.SSLError) as e:
                raise GenericError(f"Unable to load DH parameters from {params}: {e}") from None
        return ctx
    if creds.qom_type != "tls-creds-x509":
        raise GenericError(f"TLS credentials of type '{creds.qom_type}' are not supported")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(os.path.join(d, "server-cert.pem"), os.path.join(d, "server-key.pem"))
        if prop(creds, "verify-peer", True):
            ctx.load_verify_locations(os.path.join(d, "ca-cert.pem"))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise GenericError(f"Unable to load TLS credentials from '{d}': {e}") from None
    return ctx


# gnutls' short names for the DN attributes QEMU's authz identities use
_DN_NAMES = {"countryName": "C", "organizationName": "O", "organizationalUnitName": "OU",
             "commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
             "emailAddress": "EMAIL", "domainComponent": "DC"}


def peer_dn(cert: dict[str, Any] | None) -> str | None:
    """The client certificate's DN as QEMU prints it (C=GB,O=Example,CN=name)."""
    if not cert or "subject" not in cert:
        return None
    return ",".join(f"{_DN_NAMES.get(k, k)}={v}" for rdn in cert["subject"] for k, v in rdn)


def authz_allows(authz: object, identity: str) -> bool:
    """Whether an authz-simple/-list/-list-file object lets ``identity`` in;
    any other object denies, as does an authz-list-file that cannot be read."""
    if not isinstance(authz, UserObject):
        return False
    kind = authz.qom_type
    if kind == "authz-simple":
        return bool(prop(authz, "identity") == identity)
    if kind in ("authz-list", "authz-list-file"):
        rules = prop(authz, "rules", []) or []
        policy = prop(authz, "policy", "deny")
        if kind == "authz-list-file":
            try:
                with open(prop(authz, "filename")) as f:
                    data = json.load(f)
                rules, policy = data.get("rules", []), data.get("policy", "deny")
            except (OSError, ValueError):
                return False
        for rule in rules:
            rule = rule if isinstance(rule, dict) else _attrs_to_dict(rule)
            pattern = rule.get("match", "")
            if (fnmatch.fnmatchcase(identity, pattern) if rule.get("format") == "glob"
                    else identity == pattern):
                return bool(rule.get("policy") == "allow")
        return bool(policy == "allow")
    return False


def _attrs_to_dict(obj: Any) -> dict[str, Any]:
    """A typed QAPI rule (QAuthZListRule) with QEMU's member names."""
    return {k.replace("_", "-"): v for k, v in attrs.asdict(obj).items()}
