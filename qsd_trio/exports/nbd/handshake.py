"""NBD option negotiation as a sans-I/O state machine (the server's side).

:class:`Handshake` takes the client's bytes (:meth:`Handshake.receive_data`)
and gives back the bytes to send (:meth:`Handshake.data_to_send`) and
events (:meth:`Handshake.next_event`), in the manner of h11: no sockets, no
trio, so every option and every refusal is tested on bytes alone
(tests/unit/test_nbd_handshake.py).  The connection (connection.py) drives
it: it sends what is queued after every event, reads at most
:attr:`Handshake.bytes_wanted` bytes when told :data:`NEED_DATA` (so no byte
of the transmission phase or of a TLS handshake is ever read here), performs
the TLS handshake on :class:`StartTls`, and hands the connection to the
export on :class:`ExportChosen`.

What it implements is "Fixed newstyle negotiation" of the NBD protocol and
QEMU 7.2's server side of it (nbd/server.c, nbd_negotiate_options): the
reply types and messages are QEMU's, including where QEMU hangs up instead
of replying.  nbdkit's protocol-handshake-newstyle.c has the same role.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, Protocol, TypeVar

import attrs

from ...proto import nbd as P
from ...qapi.cstr import c_bytes

PREFERRED_BLOCK = 4096  # the preferred block size NBD_INFO_BLOCK_SIZE announces

# options whose payload is read and parsed; any other payload is dropped
# as it arrives, never held
_WITH_PAYLOAD = frozenset((P.OPT_EXPORT_NAME, P.OPT_INFO, P.OPT_GO,
                           P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT))
_CLIENT_FLAGS = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES


class ExportView(Protocol):
    """What negotiation needs to know of an export (NbdExport has it)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str | None: ...
    @property
    def size(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def block_alignment(self) -> int: ...  # the minimum block size, >= 1
    def meta_contexts(self) -> list[str]: ...


E = TypeVar("E", bound=ExportView)


class NeedData:
    """Feed :meth:`Handshake.receive_data` (at most ``bytes_wanted`` bytes)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@attrs.frozen
class StartTls:
    """The client asked for TLS and its ACK is queued: send it, run the TLS
    handshake, then call :meth:`Handshake.tls_established`."""


@attrs.frozen
class ExportChosen(Generic[E]):
    """Negotiation is over: ``reply`` (which ends it) goes out first thing
    in the transmission phase, on ``export``."""

    export: E
    reply: bytes


@attrs.frozen
class Closed:
    """Negotiation failed; send what is queued, then hang up (``reason`` is
    QEMU's message for it, logged only)."""

    reason: str


Event = NeedData | StartTls | ExportChosen[E] | Closed


class Handshake(Generic[E]):
    """One connection's option phase.

    Args:
        exports: the server's exports by name, looked up when an option
            names one (so it sees exports added or removed meanwhile).
        tls_required: the server has TLS credentials: every option but
            NBD_OPT_STARTTLS is refused until TLS is established.

    Raises:
        NbdProtocolError: from :meth:`next_event`, when an option header has
            the wrong magic (the connection must end).

    After the chosen export, the negotiated state is read from
    :attr:`structured`, :attr:`extended`, :attr:`no_zeroes`,
    :attr:`meta_export` and :attr:`meta_ids`.
    """

    def __init__(self, exports: Mapping[str, E], *, tls_required: bool = False):
        self.exports = exports
        self.tls_required = tls_required
        self.tls_done = False
        self.fixed = False
        self.no_zeroes = False
        self.structured = False
        # NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths and
        # only extended reply chunks (structured is then set too)
        self.extended = False
        self.meta_export: str | None = None
        self.meta_ids: list[tuple[int, str]] = []  # (context id, name) after SET
        self._in = bytearray()
        self._out: list[bytes] = [P.server_greeting()]
        self._want = 4  # the client's flags come first
        self._discard = False  # the wanted bytes are dropped, not handed to _then
        self._then: Callable[[bytes], Event[E] | None] = self._on_client_flags
        self._paused = False  # waiting for tls_established()
        self._over = False

    # -- the driver's interface ----------------------------------------------------
    @property
    def bytes_wanted(self) -> int:
        """How many more bytes the next step needs (read at most this many);
        0 once negotiation is over or while TLS is being set up."""
        if self._over or self._paused:
            return 0
        return max(self._want - (0 if self._discard else len(self._in)), 0)

    def receive_data(self, data: bytes) -> None:
        self._in += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The TLS handshake after :class:`StartTls` succeeded."""
        if not self._paused:
            raise RuntimeError("no STARTTLS is pending")
        self._paused = False
        self.tls_done = True

    def next_event(self) -> Event[E]:
        if self._over:
            raise RuntimeError("negotiation is over")
        if self._paused:
            raise RuntimeError("waiting for tls_established()")
        while True:
            if self._discard:
                k = min(self._want, len(self._in))
                del self._in[:k]
                self._want -= k
                if self._want:
                    return NEED_DATA
                self._discard = False
                data = b""
            else:
                if len(self._in) < self._want:
                    return NEED_DATA
                data = bytes(self._in[:self._want])
                del self._in[:self._want]
            then = self._then
            self._expect(P.OPTION_HEADER_SIZE, self._on_option_header)
            event = then(data)
            if event is not None:
                if isinstance(event, StartTls):
                    self._paused = True
                else:
                    self._over = True
                return event

    # -- steps -------------------------------------------------------------------
    def _expect(self, n: int, then: Callable[[bytes], Event[E] | None]) -> None:
        self._want, self._discard, self._then = n, False, then

    def _drop(self, n: int, then: Callable[[bytes], Event[E] | None]) -> None:
        """Drop the next ``n`` bytes as they arrive, then call ``then(b"")``."""
        self._want, self._discard, self._then = n, True, then

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out.append(P.option_reply(option, reply, data))

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, c_bytes(message))

    def _on_client_flags(self, data: bytes) -> Event[E] | None:
        flags = int.from_bytes(data, "big")
        self.fixed = bool(flags & P.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & P.FLAG_C_NO_ZEROES)
        if flags & ~_CLIENT_FLAGS:
            return Closed(f"Unknown client flags 0x{flags:x} received")
        return None

    def _on_option_header(self, data: bytes) -> Event[E] | None:
        option, length = P.parse_option_header(data)
        if length > P.MAX_BUFFER_SIZE:
            return Closed(f"len ({length}) is larger than max len ({P.MAX_BUFFER_SIZE})")
        if self.tls_required and not self.tls_done:
            # the payload is read first even when the answer is to hang up:
            # closing on unread data would reset the connection before the
            # client sees the close
            self._drop(length, lambda _: self._before_tls(option, length))
        elif option in _WITH_PAYLOAD:
            if length > P.MAX_OPTION_SIZE:
                if option == P.OPT_EXPORT_NAME:
                    return Closed("export name too long")
                self._drop(length, lambda _: self._error(option, P.REP_ERR_INVALID,
                                                         "option too long"))
            else:
                self._expect(length, lambda payload: self._with_payload(option, payload))
        else:
            self._drop(length, lambda _: self._without_payload(option, length))
        return None

    def _before_tls(self, option: int, length: int) -> Event[E] | None:
        if option == P.OPT_STARTTLS:
            if length:
                # QEMU answers, then hangs up: a client that cannot start
                # TLS correctly gets no second try (nbd_reject_length, fatal)
                self._error(option, P.REP_ERR_INVALID, "option 'starttls' has unexpected length")
                return Closed("option 'starttls' has unexpected length")
            self._reply(option, P.REP_ACK)
            return StartTls()
        if option in (P.OPT_EXPORT_NAME, P.OPT_ABORT):
            return Closed(f"Option 0x{option:x} not permitted before TLS")
        self._error(option, P.REP_ERR_TLS_REQD, f"Option 0x{option:x} not permitted before TLS")
        return None

    def _with_payload(self, option: int, payload: bytes) -> Event[E] | None:
        if option == P.OPT_EXPORT_NAME:
            return self._export_name(payload)
        try:
            if option in (P.OPT_INFO, P.OPT_GO):
                return self._info(option, payload)
            self._meta(option, payload)
        except P.OptionError as e:
            self._out.append(P.option_error(option, e))
        return None

    def _without_payload(self, option: int, length: int) -> Event[E] | None:
        if option == P.OPT_ABORT:
            self._reply(option, P.REP_ACK)
            return Closed("client aborted")
        if not self.fixed:
            return Closed(f"Unsupported option {option} without fixed newstyle")
        handler = self._PLAIN.get(option)
        if handler is None:
            self._error(option, P.REP_ERR_UNSUP,
                        f"Unsupported option {option} ({P.OPT_NAMES.get(option, '<unknown>')})")
        else:
            handler(self, length)
        return None

    def _refuse_length(self, option: int, length: int) -> bool:
        """Refuse a payload on an option that takes none; True if refused."""
        if length:
            self._error(option, P.REP_ERR_INVALID,
                        f"option '{P.OPT_NAMES[option]}' has unexpected length")
        return bool(length)

    # -- options -------------------------------------------------------------------
    def _export_name(self, payload: bytes) -> Event[E]:
        if self.extended:
            # the spec forbids it; QEMU hangs up
            return Closed("Extended headers already negotiated, no more NBD_OPT_EXPORT_NAME")
        name = payload.decode(errors="surrogateescape")  # as _take_string
        export = self.exports.get(name)
        if export is None:
            return Closed(f"export '{name}' not present")
        return ExportChosen(export, P.export_name_reply(export.size, export.flags,
                                                        self.no_zeroes))

    def _info(self, option: int, payload: bytes) -> Event[E] | None:
        """NBD_OPT_INFO / NBD_OPT_GO: the NBD_REP_INFO replies, then the ACK
        (for GO, the ACK is the chosen export's first reply)."""
        name, infos = P.parse_info_request(payload, P.OPT_NAMES[option])
        export = self.exports.get(name)
        if export is None:
            raise P.OptionError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        if P.INFO_NAME in infos:
            self._reply(option, P.REP_INFO, P.info_name(export.name))
        if export.description:
            self._reply(option, P.REP_INFO, P.info_description(export.description))
        align = export.block_alignment
        minimum = align if P.INFO_BLOCK_SIZE in infos else 1
        self._reply(option, P.REP_INFO,
                    P.info_block_size(minimum, max(PREFERRED_BLOCK, minimum), P.MAX_BUFFER_SIZE))
        self._reply(option, P.REP_INFO, P.info_export(export.size, export.flags))
        if option == P.OPT_INFO and P.INFO_BLOCK_SIZE not in infos and align > 1:
            raise P.OptionError(P.REP_ERR_BLOCK_SIZE_REQD,
                                "request NBD_INFO_BLOCK_SIZE to use this export")
        if option == P.OPT_GO:
            return ExportChosen(export, P.option_reply(option, P.REP_ACK))
        self._reply(option, P.REP_ACK)
        return None

    def _meta(self, option: int, payload: bytes) -> None:
        """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
        setting = option == P.OPT_SET_META_CONTEXT
        if not self.structured:
            raise P.OptionError(P.REP_ERR_INVALID,
                                f"request option '{P.OPT_NAMES[option]}' when structured reply "
                                "is not negotiated")
        name, queries = P.parse_meta_request(payload, P.OPT_NAMES[option])
        export = self.exports.get(name)
        if export is None:
            raise P.OptionError(P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        available = export.meta_contexts()
        chosen = P.match_meta_contexts(queries, available, listing=not setting)
        ids = [(available.index(c), c) for c in chosen]
        for cid, ctx in ids:
            # ids only mean something once set; QEMU lists every context as 0
            self._reply(option, P.REP_META_CONTEXT, P.meta_context_reply(cid if setting else 0, ctx))
        if setting:
            self.meta_export = name
            self.meta_ids = ids
        self._reply(option, P.REP_ACK)

    def _list(self, length: int) -> None:
        if self._refuse_length(P.OPT_LIST, length):
            return
        for exp in list(self.exports.values()):
            self._reply(P.OPT_LIST, P.REP_SERVER, P.rep_server(exp.name, exp.description or ""))
        self._reply(P.OPT_LIST, P.REP_ACK)

    def _structured_reply(self, length: int) -> None:
        option = P.OPT_STRUCTURED_REPLY
        if self._refuse_length(option, length):
            return
        if self.extended:
            self._error(option, P.REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
        elif self.structured:
            self._error(option, P.REP_ERR_INVALID, "structured reply already negotiated")
        else:
            self.structured = True
            self._reply(option, P.REP_ACK)

    def _extended_headers(self, length: int) -> None:
        option = P.OPT_EXTENDED_HEADERS
        if self._refuse_length(option, length):
            return
        if self.extended:
            self._error(option, P.REP_ERR_INVALID, "extended headers already negotiated")
        else:
            self.extended = self.structured = True
            self._reply(option, P.REP_ACK)

    def _starttls(self, length: int) -> None:
        # with TLS configured, STARTTLS is handled by _before_tls until it
        # succeeds; here, as in QEMU, a payload is refused before anything else
        if self._refuse_length(P.OPT_STARTTLS, length):
            return
        if self.tls_done:
            self._error(P.OPT_STARTTLS, P.REP_ERR_INVALID, "TLS already enabled")
        else:
            self._error(P.OPT_STARTTLS, P.REP_ERR_POLICY, "TLS not configured")

    # options without a payload (theirs is dropped), for fixed newstyle clients
    _PLAIN: dict[int, Callable[[Handshake[E], int], None]] = {
        P.OPT_LIST: _list,
        P.OPT_STRUCTURED_REPLY: _structured_reply,
        P.OPT_EXTENDED_HEADERS: _extended_headers,
        P.OPT_STARTTLS: _starttls,
    }
