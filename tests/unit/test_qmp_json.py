"""QMP's JSON dialect: framing, QEMU's error texts and recovery."""

import pytest

from qsd_trio.monitor.qmp_json import JsonError, JsonStreamer, encode_message, to_json


def feed_all(*chunks: bytes) -> list:
    s = JsonStreamer()
    out = []
    for c in chunks:
        out += s.feed(c)
    return out


def test_messages_are_framed_by_balance_not_lines():
    assert feed_all(b'{"execute" : "a" , "id":1} {"execute":"b"}\n') == [
        {"execute": "a", "id": 1}, {"execute": "b"}]
    # one message split anywhere, even inside a string or a number
    msg = b'{"execute": "query-version", "id": 12345}'
    for cut in range(1, len(msg)):
        assert feed_all(msg[:cut], msg[cut:], b"\n") == [{"execute": "query-version", "id": 12345}]


def test_single_quotes_and_escapes():
    assert feed_all(b"{'a': 'it\\'s', \"b\": \"\\u00e9\\ud83d\\ude00\\n\"}") == [
        {"a": "it's", "b": "\u00e9\U0001F600\n"}]


@pytest.mark.parametrize("data, desc", [
    (b'{"execute": "query-ver\n', "JSON parse error, stray '\"query-ver\n'"),
    (b'{"execute": foo}\n', "JSON parse error, invalid keyword 'foo'"),
    (b"}\n", "JSON parse error, expecting value"),
    (b"{1: 2}\n", "JSON parse error, key is not a string in object"),
    (b'{"a" 2}\n', "JSON parse error, missing : in object pair"),
    (b"%\n", "JSON parse error, stray '%'"),
])
def test_errors_use_qemu_text(data, desc):
    assert feed_all(data) == [JsonError(desc)]


def test_recovery_after_error_keeps_the_stream_usable():
    # QEMU skips to a structural or control character after a lexical error:
    # the rest of the bad string costs one more error, then all is well
    out = feed_all(b'{"execute": "query-ver\n', b'sion"}\n', b'{"execute":"x"}\n')
    assert out == [JsonError("JSON parse error, stray '\"query-ver\n'"),
                   JsonError("JSON parse error, expecting value"), {"execute": "x"}]


def test_scalars_at_top_level_are_messages():
    assert feed_all(b"123\n[1, 2]\ntrue ") == [123, [1, 2], True]


def test_utf8_split_across_reads():
    data = '{"a": "\u20ac"}'.encode()
    cut = data.index(b"\xe2") + 1
    assert feed_all(data[:cut], data[cut:]) == [{"a": "\u20ac"}]


def test_output_matches_qemu_escaping():
    assert to_json({"return": "a/\u00e9\t\x01\u20ac\U0001F600"}) == \
        '{"return": "a/\\u00E9\\t\\u0001\\u20AC\\uD83D\\uDE00"}'


def test_pretty_output_matches_qemu():
    assert encode_message({"return": {}}, pretty=True) == b'{\r\n    "return": {\r\n    }\r\n}\r\n'
    assert encode_message({"return": [{"a": 1}]}, pretty=True) == (
        b'{\r\n    "return": [\r\n        {\r\n            "a": 1\r\n        }\r\n    ]\r\n}\r\n')
    assert encode_message({"return": {}}) == b'{"return": {}}\r\n'
