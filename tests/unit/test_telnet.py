"""qsd_trio/chardev/telnet.py alone: the bytes announced, and the IAC filter
as QEMU 7.2's tcp_chr_process_IAC_bytes runs (the expectations below were
measured against qemu-storage-daemon 7.2 through a QMP monitor, whose
CommandNotFound error echoes the filtered command name; the differential
test tests/differential/test_chardev_socket_diff.py repeats them)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsd_trio.chardev.telnet import IacFilter, init_bytes


def test_init_bytes():
    assert init_bytes(False) == bytes.fromhex("fffb01 fffb03 fffb00 fffd00")
    assert init_bytes(True) == bytes.fromhex(
        "fffd19 fffb19 fffd00 fffb00 fffd18 fffa1801fff0")


# (sent between "abc" and "defg", telnet / tn3270: what is left)
CASES = [
    (b"\xff\xf1", b"abcefg", b"abcdefg"),          # NOP: takes an option byte in telnet
    (b"\xff\xf3", b"abcdefg", b"abcdefg"),         # BREAK: two bytes
    (b"\xff\xfb", b"abcefg", b"abcefg"),           # WILL <d>
    (b"\xff\xff", b"abc\xffdefg", b"abc\xffdefg"),  # a literal 0xff
    (b"\xff\xef", b"abcefg", b"abc\xff\xffdefg"),  # EOR: IAC IAC for tn3270, see telnet.py
    (b"\xff\xfa", b"abcefg", b"abc\xff\xffdefg"),  # SB
    (b"\xff\xf0", b"abcefg", b"abc\xff\xffdefg"),  # SE
    (b"\xff\xf4", b"abcefg", b"abcdefg"),          # IP
    (b"\xff\xfd\xff", b"abcdefg", b"abcdefg"),     # DO IAC: the IAC is the option
    (b"\xff", b"abcfg", b"abcfg"),                 # IAC d e
]


@pytest.mark.parametrize(("cmd", "telnet", "tn3270"), CASES)
def test_filter_as_qemu(cmd, telnet, tn3270):
    assert IacFilter().feed(b"abc" + cmd + b"defg") == telnet
    assert IacFilter(tn3270=True).feed(b"abc" + cmd + b"defg") == tn3270


def test_break_counted():
    f = IacFilter()
    assert f.feed(b"a\xff\xf3b\xff\xf3") == b"ab"
    assert f.breaks == 2


def test_state_carries_over():
    # the chardev keeps one filter: a command cut by the end of a read (or
    # of a connection) goes on with the next bytes
    f = IacFilter()
    assert f.feed(b"ab\xff") == b"ab"
    assert f.feed(b"xy{") == b"{"


def test_plain_data_passes_unchanged():
    data = bytes(range(255))
    assert IacFilter().feed(data) == data


@given(st.lists(st.binary(max_size=12), max_size=12), st.booleans())
def test_any_split_gives_the_same_data(pieces, tn3270):
    whole = b"".join(pieces)
    one = IacFilter(tn3270)
    expected = one.feed(whole)
    split = IacFilter(tn3270)
    assert b"".join(split.feed(p) for p in pieces) == expected
    assert split.breaks == one.breaks
    assert split.state == one.state


@given(st.binary(max_size=64))
def test_escaped_data_comes_back(data):
    # a client that doubles every 0xff gets its data through untouched
    assert IacFilter().feed(data.replace(b"\xff", b"\xff\xff")) == data
