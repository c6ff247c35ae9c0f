"""The NBD export's option negotiation on bytes alone (exports/nbd/handshake.py).

Every option, every refusal with QEMU 7.2's reply type and message, the
TLS-required refusals and the option length limits; the same exchanges
against qemu-storage-daemon are in tests/differential/test_nbd_diff.py.
"""

from __future__ import annotations

import struct

import attrs
import pytest

from qsd_trio.exports.nbd.handshake import (
    NEED_DATA,
    PREFERRED_BLOCK,
    Closed,
    ExportChosen,
    Handshake,
    StartTls,
)
from qsd_trio.proto import nbd as P
from tests import nbd_client as C

FLAGS = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH


@attrs.frozen
class Export:
    """What the handshake reads of an export (NbdExport's ExportView)."""

    name: str
    size: int = 1 << 20
    flags: int = FLAGS
    description: str | None = None
    block_alignment: int = 1
    contexts: tuple[str, ...] = (P.META_BASE_ALLOCATION, P.META_ALLOCATION_DEPTH)

    def meta_contexts(self) -> list[str]:
        return list(self.contexts)


DISK = Export("disk")


def start(exports: dict[str, Export] | None = None, *, tls: bool = False,
          flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> Handshake[Export]:
    hs = Handshake({"disk": DISK} if exports is None else exports, tls_required=tls)
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == P.server_greeting()
    assert hs.bytes_wanted == 4
    hs.receive_data(C.client_flags(flags))
    return hs


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of each option reply in ``data``."""
    out = []
    while data:
        option, reply, n = C.parse_option_reply_header(data[:P.OPTION_REPLY_HEADER_SIZE])
        body = data[P.OPTION_REPLY_HEADER_SIZE:P.OPTION_REPLY_HEADER_SIZE + n]
        out.append((option, reply, body))
        data = data[P.OPTION_REPLY_HEADER_SIZE + n:]
    return out


def option(hs: Handshake[Export], opt: int, payload: bytes = b""):
    hs.receive_data(C.encode_option(opt, payload))
    event = hs.next_event()
    return event, replies(hs.data_to_send())


def error(opt: int, reply: int, message: str) -> tuple[int, int, bytes]:
    return (opt, reply, message.encode())


def info_request(name: str, *infos: int) -> bytes:
    return C.encode_info_request(name, infos)


# -- the start ------------------------------------------------------------------


def test_greeting_then_options():
    hs = start()
    assert hs.next_event() is NEED_DATA
    assert hs.bytes_wanted == P.OPTION_HEADER_SIZE
    assert hs.no_zeroes and hs.fixed


def test_unknown_client_flags_hang_up():
    hs = Handshake({"disk": DISK})
    hs.next_event()
    hs.receive_data(C.client_flags(P.FLAG_C_FIXED_NEWSTYLE | 4))
    assert hs.next_event() == Closed("Unknown client flags 0x5 received")
    with pytest.raises(RuntimeError):
        hs.next_event()


def test_bad_option_magic_is_a_protocol_error():
    hs = start()
    hs.receive_data(struct.pack(">QII", 0x1234, P.OPT_LIST, 0))
    with pytest.raises(P.NbdProtocolError, match="Bad magic received 0x1234"):
        hs.next_event()


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_any_split_of_the_bytes_gives_the_same_exchange(step):
    hs = Handshake({"disk": DISK})
    data = (C.client_flags() + C.encode_option(P.OPT_STRUCTURED_REPLY)
            + C.encode_option(P.OPT_GO, info_request("disk")))
    out, events = b"", []
    for i in range(0, len(data), step):
        hs.receive_data(data[i:i + step])
        while not events:
            event = hs.next_event()
            out += hs.data_to_send()
            if event is NEED_DATA:
                break
            events.append(event)
    assert [type(e) for e in events] == [ExportChosen]
    assert events[0].reply == P.option_reply(P.OPT_GO, P.REP_ACK)
    got = replies(out[P.GREETING_SIZE:])
    assert got[0] == (P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"")
    assert [r[1] for r in got[1:]] == [P.REP_INFO, P.REP_INFO]
    assert hs.structured


# -- NBD_OPT_EXPORT_NAME ------------------------------------------------------------


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_chooses_the_export(no_zeroes):
    flags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0)
    hs = start(flags=flags)
    event, sent = option(hs, P.OPT_EXPORT_NAME, b"disk")
    assert sent == []
    assert event == ExportChosen(DISK, P.export_name_reply(DISK.size, FLAGS, no_zeroes))
    assert len(event.reply) == (10 if no_zeroes else 134)


def test_export_name_of_a_missing_export_hangs_up():
    event, sent = option(start(), P.OPT_EXPORT_NAME, b"nope")
    assert (event, sent) == (Closed("export 'nope' not present"), [])


def test_export_name_too_long_hangs_up_without_reading_it():
    hs = start()
    hs.receive_data(struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, P.MAX_OPTION_SIZE + 1))
    assert hs.next_event() == Closed("export name too long")


def test_export_name_after_extended_headers_hangs_up():
    hs = start()
    option(hs, P.OPT_EXTENDED_HEADERS)
    event, _ = option(hs, P.OPT_EXPORT_NAME, b"disk")
    assert event == Closed("Extended headers already negotiated, no more NBD_OPT_EXPORT_NAME")


# -- NBD_OPT_INFO / NBD_OPT_GO ----------------------------------------------------------


def test_go_sends_infos_and_leaves_the_ack_to_the_transmission_phase():
    exp = Export("disk", description="the disk")
    hs = start({"disk": exp})
    event, sent = option(hs, P.OPT_GO, info_request("disk", P.INFO_NAME))
    assert sent == [
        (P.OPT_GO, P.REP_INFO, P.info_name("disk")),
        (P.OPT_GO, P.REP_INFO, P.info_description("the disk")),
        (P.OPT_GO, P.REP_INFO, P.info_block_size(1, PREFERRED_BLOCK, P.MAX_BUFFER_SIZE)),
        (P.OPT_GO, P.REP_INFO, P.info_export(exp.size, FLAGS)),
    ]
    assert event == ExportChosen(exp, P.option_reply(P.OPT_GO, P.REP_ACK))


def test_info_answers_and_negotiation_goes_on():
    hs = start()
    event, sent = option(hs, P.OPT_INFO, info_request("disk"))
    assert event is NEED_DATA
    assert sent[-1] == (P.OPT_INFO, P.REP_ACK, b"")
    assert [r[1] for r in sent[:-1]] == [P.REP_INFO, P.REP_INFO]


@pytest.mark.parametrize("opt", [P.OPT_INFO, P.OPT_GO])
def test_info_of_a_missing_export(opt):
    event, sent = option(start(), opt, info_request("nope"))
    assert event is NEED_DATA
    assert sent == [error(opt, P.REP_ERR_UNKNOWN, "export 'nope' not present")]


def test_info_of_an_aligned_export_requires_block_size():
    exp = Export("disk", block_alignment=512)
    hs = start({"disk": exp})
    event, sent = option(hs, P.OPT_INFO, info_request("disk"))
    assert event is NEED_DATA
    assert sent[-1] == error(P.OPT_INFO, P.REP_ERR_BLOCK_SIZE_REQD,
                             "request NBD_INFO_BLOCK_SIZE to use this export")
    event, sent = option(hs, P.OPT_INFO, info_request("disk", P.INFO_BLOCK_SIZE))
    assert (P.OPT_INFO, P.REP_INFO,
            P.info_block_size(512, PREFERRED_BLOCK, P.MAX_BUFFER_SIZE)) in sent
    assert sent[-1] == (P.OPT_INFO, P.REP_ACK, b"")
    # GO without the request is served with a minimum of 1
    event, sent = option(hs, P.OPT_GO, info_request("disk"))
    assert isinstance(event, ExportChosen)


def test_info_with_a_malformed_payload():
    event, sent = option(start(), P.OPT_INFO, b"\0\0\0\x09ab")
    assert event is NEED_DATA
    assert sent[0][:2] == (P.OPT_INFO, P.REP_ERR_INVALID)


# -- NBD_OPT_LIST ---------------------------------------------------------------------


def test_list_names_every_export():
    exports = {"a": Export("a", description="first"), "b": Export("b")}
    event, sent = option(start(exports), P.OPT_LIST)
    assert event is NEED_DATA
    assert sent == [(P.OPT_LIST, P.REP_SERVER, P.rep_server("a", "first")),
                    (P.OPT_LIST, P.REP_SERVER, P.rep_server("b", "")),
                    (P.OPT_LIST, P.REP_ACK, b"")]


def test_list_sees_exports_added_meanwhile():
    exports = {"a": Export("a")}
    hs = start(exports)
    exports["b"] = Export("b")
    _, sent = option(hs, P.OPT_LIST)
    assert len(sent) == 3


@pytest.mark.parametrize("opt, name", [(P.OPT_LIST, "list"),
                                       (P.OPT_STRUCTURED_REPLY, "structured reply"),
                                       (P.OPT_EXTENDED_HEADERS, "extended headers")])
def test_options_without_payload_refuse_one(opt, name):
    hs = start()
    event, sent = option(hs, opt, b"xyz")
    assert event is NEED_DATA
    assert sent == [error(opt, P.REP_ERR_INVALID, f"option '{name}' has unexpected length")]
    assert not hs.structured


# -- NBD_OPT_STRUCTURED_REPLY / NBD_OPT_EXTENDED_HEADERS --------------------------------


def test_structured_reply_once():
    hs = start()
    assert option(hs, P.OPT_STRUCTURED_REPLY)[1] == [(P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"")]
    assert hs.structured and not hs.extended
    assert option(hs, P.OPT_STRUCTURED_REPLY)[1] == [
        error(P.OPT_STRUCTURED_REPLY, P.REP_ERR_INVALID, "structured reply already negotiated")]


def test_extended_headers_imply_structured_replies():
    hs = start()
    assert option(hs, P.OPT_EXTENDED_HEADERS)[1] == [(P.OPT_EXTENDED_HEADERS, P.REP_ACK, b"")]
    assert hs.extended and hs.structured
    assert option(hs, P.OPT_EXTENDED_HEADERS)[1] == [
        error(P.OPT_EXTENDED_HEADERS, P.REP_ERR_INVALID, "extended headers already negotiated")]
    assert option(hs, P.OPT_STRUCTURED_REPLY)[1] == [
        error(P.OPT_STRUCTURED_REPLY, P.REP_ERR_EXT_HEADER_REQD,
              "extended headers already negotiated")]


# -- NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT ------------------------------


@pytest.mark.parametrize("opt", [P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT])
def test_meta_contexts_need_structured_replies(opt):
    event, sent = option(start(), opt, C.encode_meta_request("disk", []))
    assert event is NEED_DATA
    assert sent == [error(opt, P.REP_ERR_INVALID,
                          f"request option '{P.OPT_NAMES[opt]}' when structured reply "
                          "is not negotiated")]


def test_list_meta_context_lists_with_id_0():
    hs = start()
    option(hs, P.OPT_STRUCTURED_REPLY)
    _, sent = option(hs, P.OPT_LIST_META_CONTEXT, C.encode_meta_request("disk", []))
    assert sent == [(P.OPT_LIST_META_CONTEXT, P.REP_META_CONTEXT,
                     P.meta_context_reply(0, P.META_BASE_ALLOCATION)),
                    (P.OPT_LIST_META_CONTEXT, P.REP_META_CONTEXT,
                     P.meta_context_reply(0, P.META_ALLOCATION_DEPTH)),
                    (P.OPT_LIST_META_CONTEXT, P.REP_ACK, b"")]
    assert hs.meta_ids == []


def test_set_meta_context_numbers_the_contexts():
    hs = start()
    option(hs, P.OPT_STRUCTURED_REPLY)
    _, sent = option(hs, P.OPT_SET_META_CONTEXT,
                     C.encode_meta_request("disk", [P.META_ALLOCATION_DEPTH]))
    assert sent == [(P.OPT_SET_META_CONTEXT, P.REP_META_CONTEXT,
                     P.meta_context_reply(1, P.META_ALLOCATION_DEPTH)),
                    (P.OPT_SET_META_CONTEXT, P.REP_ACK, b"")]
    assert (hs.meta_export, hs.meta_ids) == ("disk", [(1, P.META_ALLOCATION_DEPTH)])


def test_meta_context_of_a_missing_export():
    hs = start()
    option(hs, P.OPT_STRUCTURED_REPLY)
    _, sent = option(hs, P.OPT_SET_META_CONTEXT, C.encode_meta_request("nope", []))
    assert sent == [error(P.OPT_SET_META_CONTEXT, P.REP_ERR_UNKNOWN, "export 'nope' not present")]


# -- NBD_OPT_ABORT, unknown options, old-style clients ---------------------------------


def test_abort_is_acknowledged_then_ends():
    event, sent = option(start(), P.OPT_ABORT)
    assert event == Closed("client aborted")
    assert sent == [(P.OPT_ABORT, P.REP_ACK, b"")]


@pytest.mark.parametrize("opt", [P.OPT_PEEK_EXPORT, 42])
def test_unknown_options_are_unsupported(opt):
    event, sent = option(start(), opt, b"some payload")
    assert event is NEED_DATA
    assert sent == [error(opt, P.REP_ERR_UNSUP, f"Unsupported option {opt} (<unknown>)")]


def test_a_client_without_fixed_newstyle_is_dropped_on_other_options():
    hs = start(flags=P.FLAG_C_NO_ZEROES)
    assert option(hs, P.OPT_LIST) == (Closed("Unsupported option 3 without fixed newstyle"), [])


def test_starttls_without_tls_configured():
    assert option(start(), P.OPT_STARTTLS)[1] == [
        error(P.OPT_STARTTLS, P.REP_ERR_POLICY, "TLS not configured")]


def test_starttls_with_a_payload_without_tls_configured():
    hs = start()
    assert option(hs, P.OPT_STARTTLS, b"x") == (NEED_DATA, [
        error(P.OPT_STARTTLS, P.REP_ERR_INVALID, "option 'starttls' has unexpected length")])
    assert option(hs, P.OPT_LIST)[0] is NEED_DATA  # not fatal there


# -- TLS required ---------------------------------------------------------------------


@pytest.mark.parametrize("opt", [P.OPT_INFO, P.OPT_GO, P.OPT_LIST, P.OPT_STRUCTURED_REPLY, 42])
def test_options_before_tls_are_refused(opt):
    event, sent = option(start(tls=True), opt, info_request("disk"))
    assert event is NEED_DATA
    assert sent == [error(opt, P.REP_ERR_TLS_REQD, f"Option 0x{opt:x} not permitted before TLS")]


@pytest.mark.parametrize("opt", [P.OPT_EXPORT_NAME, P.OPT_ABORT])
def test_export_name_and_abort_before_tls_hang_up(opt):
    event, sent = option(start(tls=True), opt, b"disk")
    assert (event, sent) == (Closed(f"Option 0x{opt:x} not permitted before TLS"), [])


def test_starttls_then_negotiation_goes_on():
    hs = start(tls=True)
    event, sent = option(hs, P.OPT_STARTTLS)
    assert event == StartTls()
    assert sent == [(P.OPT_STARTTLS, P.REP_ACK, b"")]
    assert hs.bytes_wanted == 0  # nothing may be read until TLS is up
    with pytest.raises(RuntimeError):
        hs.next_event()
    hs.tls_established()
    assert option(hs, P.OPT_STARTTLS)[1] == [
        error(P.OPT_STARTTLS, P.REP_ERR_INVALID, "TLS already enabled")]
    event, _ = option(hs, P.OPT_GO, info_request("disk"))
    assert isinstance(event, ExportChosen)


def test_starttls_with_a_payload_is_refused():
    hs = start(tls=True)
    # answered, then the connection is dropped, as QEMU does
    assert option(hs, P.OPT_STARTTLS, b"x") == (
        Closed("option 'starttls' has unexpected length"),
        [error(P.OPT_STARTTLS, P.REP_ERR_INVALID, "option 'starttls' has unexpected length")])


# -- length limits ---------------------------------------------------------------------


def test_an_option_longer_than_the_maximum_buffer_hangs_up():
    hs = start()
    hs.receive_data(struct.pack(">QII", P.IHAVEOPT, P.OPT_LIST, P.MAX_BUFFER_SIZE + 1))
    assert hs.next_event() == Closed(
        f"len ({P.MAX_BUFFER_SIZE + 1}) is larger than max len ({P.MAX_BUFFER_SIZE})")


@pytest.mark.parametrize("opt", [P.OPT_INFO, P.OPT_GO, P.OPT_SET_META_CONTEXT])
def test_an_overlong_option_is_dropped_as_it_arrives_then_refused(opt):
    hs = start()
    length = P.MAX_OPTION_SIZE + 1
    hs.receive_data(struct.pack(">QII", P.IHAVEOPT, opt, length))
    chunk = 4096
    left = length
    while left:
        assert hs.next_event() is NEED_DATA
        assert hs.data_to_send() == b""
        assert hs.bytes_wanted == left
        hs.receive_data(bytes(min(chunk, left)))
        left -= min(chunk, left)
    assert hs.next_event() is NEED_DATA
    assert replies(hs.data_to_send()) == [error(opt, P.REP_ERR_INVALID, "option too long")]
    assert hs.bytes_wanted == P.OPTION_HEADER_SIZE


def test_the_handshake_never_wants_the_first_request():
    hs = start()
    hs.receive_data(C.encode_option(P.OPT_GO, info_request("disk")))
    assert isinstance(hs.next_event(), ExportChosen)
    assert hs.bytes_wanted == 0
    with pytest.raises(RuntimeError):
        hs.next_event()
