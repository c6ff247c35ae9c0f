"""TLS for driver=nbd: the client's side of NBD_OPT_STARTTLS.

QEMU 7.2's NBD client (nbd/client.c ``nbd_receive_starttls``) takes a
tls-creds object with endpoint=client and runs a GnuTLS session over the
connection before any other option; after the handshake its
``qcrypto_tls_session_check_credentials`` checks the server's certificate:
trusted by the CA (``ca-cert.pem``, with ``ca-crl.pem`` if present), then
valid now, then matching the host name (``tls-hostname``, else the inet
address's host; an x509 session without one is refused).

Here an x509 or anon object becomes an ``ssl.SSLContext`` (trio.SSLStream
runs the session), a tls-creds-psk object an identity and key for
exports/tls_psk.py's pyOpenSSL session (Python's ``ssl`` has no TLS-PSK
before 3.13).  OpenSSL checks the chain during the handshake; the host
name is checked afterwards, with gnutls_x509_crt_check_hostname's rules.
Failures are reported with QEMU's texts (GnuTLS's for a failed handshake,
where the cause can be told apart).

Everything is read when the node opens (QEMU reads the files when the
object is created) and kept for reconnects.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import ssl
from typing import Any

import attrs
import trio

from ..objects.tls_creds import find_creds
from ..qapi.errors import GenericError

# OpenSSL verify results that GnuTLS reports as GNUTLS_CERT_SIGNER_NOT_FOUND
_NO_ISSUER = {2, 18, 19, 20, 21}
_REVOKED = 23


@attrs.frozen
class ClientTls:
    """How to run TLS on a connection: one of ``context`` (x509, anon) or
    ``psk`` (identity, key); ``verify`` and ``hostname`` for x509."""

    kind: str
    context: ssl.SSLContext | None = None
    psk: tuple[str, bytes] | None = None
    key_file: str = ""
    verify: bool = False
    hostname: str | None = None


def _missing(path: str) -> GenericError | None:
    try:
        os.stat(path)
    except OSError as e:
        return GenericError(f"Unable to access credentials {path}: {e.strerror}")
    return None


def client_tls(objects: dict[str, Any], creds_id: str, hostname: str | None) -> ClientTls:
    """The TLS setup of a tls-creds object for a client (nbd_get_tls_creds
    and the object's loading).  Raises GenericError with QEMU's text."""
    obj = find_creds(objects, creds_id, "client")
    props = obj.props
    kind = obj.qom_type
    d = props.get("dir")
    if kind == "tls-creds-anon":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # GnuTLS' "NORMAL:+ANON-DH": anonymous DH, TLS 1.2 (OpenSSL allows
        # aNULL suites at security level 0 only)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("aNULL:!eNULL:@SECLEVEL=0")
        return ClientTls("anon", context=ctx)
    if kind not in ("tls-creds-x509", "tls-creds-psk"):
        raise GenericError(f"Unsupported TLS credentials type {kind}")
    if d is None:
        raise GenericError("Missing 'dir' property value")
    if kind == "tls-creds-psk":
        path = os.path.join(d, "keys.psk")
        if (err := _missing(path)) is not None:
            raise err
        username = props.get("username") or "qemu"
        # pyOpenSSL, loaded with PSK credentials (and the server's PSK file reader)
        from ..exports.tls_psk import lookup_key

        key = lookup_key(path, username)
        if key is None:
            raise GenericError(f"Username {username} not found in PSK file {path}")
        return ClientTls("psk", psk=(username, key), key_file=path)
    ca = os.path.join(d, "ca-cert.pem")
    if (err := _missing(ca)) is not None:
        raise err
    verify = bool(props.get("verify-peer", True))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # checked after the handshake, as QEMU does
    try:
        ctx.load_verify_locations(ca)
        crl = os.path.join(d, "ca-crl.pem")
        if os.path.exists(crl):
            ctx.load_verify_locations(crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        cert, key_pem = os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem")
        if os.path.exists(cert) and os.path.exists(key_pem):
            ctx.load_cert_chain(cert, key_pem)
    except (OSError, ssl.SSLError) as e:
        raise GenericError(f"Cannot load TLS credentials from '{d}': {e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return ClientTls("x509", context=ctx, verify=verify, hostname=hostname)


class TlsError(Exception):
    """The TLS session could not be set up; ``args[0]`` is QEMU's text."""


async def start_client(tls: ClientTls, transport: trio.abc.Stream) -> trio.abc.Stream:
    """Run the TLS handshake over ``transport`` (after NBD_OPT_STARTTLS's
    ACK) and check the server's certificate.  Returns the TLS stream, which
    closes ``transport`` when closed; raises TlsError with QEMU's text (the
    caller closes ``transport``)."""
    if tls.psk is not None:
        from ..exports.tls_psk import PskTlsStream  # pyOpenSSL, loaded with PSK credentials

        psk = PskTlsStream(transport, tls.key_file, client=tls.psk)
        try:
            await psk.do_handshake()
        except trio.BrokenResourceError as e:
            raise TlsError("TLS handshake failed: " + _gnutls_text(e)) from None
        return psk
    assert tls.context is not None
    # https_compatible: no close_notify on close, as QEMU (which never calls
    # gnutls_bye); it also lets the reader and a closing task both close it
    stream = trio.SSLStream(transport, tls.context, https_compatible=True)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise TlsError(_verify_text(cause.verify_code)) from None
        raise TlsError("TLS handshake failed: " + _gnutls_text(e)) from None
    if tls.verify:
        der = stream.getpeercert(binary_form=True)
        if not der:
            raise TlsError("No certificate peers")
        if tls.hostname is None:
            raise TlsError("No hostname for certificate validation")
        if not hostname_matches(der, tls.hostname):
            raise TlsError(f"Certificate does not match the hostname {tls.hostname}")
    return stream


def _verify_text(code: int) -> str:
    """QEMU's reason for gnutls_certificate_verify_peers2's status."""
    if code in _NO_ISSUER:
        return "The certificate hasn't got a known issuer"
    if code == _REVOKED:
        return "The certificate has been revoked"
    return "The certificate is not trusted"


def _gnutls_text(e: BaseException) -> str:
    """GnuTLS' gnutls_strerror for what broke a handshake, as far as OpenSSL's
    error tells it."""
    cause = e.__cause__
    text = str(e) + " " + str(cause or "")
    if isinstance(cause, ssl.SSLEOFError) or "EOF" in text or "peer closed" in text:
        return "The TLS connection was non-properly terminated."
    if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError):
        if cause.errno == errno.EPIPE:
            return "Error in the push function."
        return "Error in the pull function."
    if "alert" in text.lower():
        return "A TLS fatal alert has been received."
    if "no shared cipher" in text or "NO_SHARED_CIPHER" in text:
        return "No supported cipher suites have been found."
    return "An unexpected TLS packet was received."


def _dns_match(pattern: str, host: str) -> bool:
    """One name of a certificate against the host name: case-insensitive, a
    ``*`` only as the whole first label, matching one label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern == host:
        return True
    first, dot, rest = pattern.partition(".")
    if first != "*" or not dot or rest.count(".") < 1:
        return False
    hfirst, hdot, hrest = host.partition(".")
    return bool(hdot and hfirst and hrest == rest)


def hostname_matches(der: bytes, hostname: str) -> bool:
    """gnutls_x509_crt_check_hostname: an IP address against the iPAddress
    names, a DNS name against the dNSName names, or the CN when there are
    none."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    try:
        ip = ipaddress.ip_address(hostname)
    except ValueError:
        ip = None
    if ip is not None:
        return san is not None and ip in san.get_values_for_type(x509.IPAddress)
    if not hostname:
        return False
    names = san.get_values_for_type(x509.DNSName) if san is not None else []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return any(_dns_match(n, hostname) for n in names)
