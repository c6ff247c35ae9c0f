"""QMP's JSON dialect, sans-I/O: a lexer, a streamer that finds message
boundaries, and a parser, with QEMU's error texts and error recovery.

QEMU's monitor does not read lines: it lexes the byte stream, counts braces
and brackets, and parses a message as soon as they balance.  It also accepts
single-quoted strings.  After a lexical error it skips input until a
structural character or a control character (newline), so one bad message
costs one error reply and the session goes on (qmp-spec, "Forcing the JSON
parser into known-good state").  Clients see these texts, so we keep them.

Feed bytes with :meth:`JsonStreamer.feed`; it returns a list of results, each
either a parsed value or a :class:`JsonError`.
"""

from __future__ import annotations

import codecs
import enum
import functools
from typing import Any

import attrs

from ..qapi.ghash import qdict_order

MAX_TOKEN_SIZE = 64 << 20
MAX_NESTING = 1024


class Tok(enum.Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    INTEGER = "int"
    FLOAT = "float"
    KEYWORD = "keyword"
    STRING = "string"
    ERROR = "error"


@attrs.frozen
class Token:
    kind: Tok
    text: str


@attrs.frozen
class JsonError:
    """A message that could not be parsed; ``desc`` is QEMU's text."""

    desc: str


_STRUCTURAL = {"{": Tok.LCURLY, "}": Tok.RCURLY, "[": Tok.LSQUARE, "]": Tok.RSQUARE,
               ":": Tok.COLON, ",": Tok.COMMA}
_WS = " \t\r\n"
_ESCAPES = set("\"'\\/bfnrt")

# QEMU lexes bytes, not characters.  The streamer decodes with
# 'surrogateescape', so a byte that is not valid UTF-8 reaches the lexer
# as a lone surrogate U+DC80-U+DCFF and stays distinguishable: 0xFE and
# 0xFF are a lexical error even inside a string, any other byte passes the
# lexer and is judged when the string is parsed (_unquote).
_RAW_FE, _RAW_FF = "\udcfe", "\udcff"


def _is_raw(ch: str) -> bool:
    return "\udc80" <= ch <= "\udcff"


def _valid_codepoint(cp: int) -> bool:
    """QEMU's is_valid_codepoint: no surrogates, no noncharacters."""
    return (cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            and not 0xFDD0 <= cp <= 0xFDEF and cp & 0xFFFE != 0xFFFE)


# A NUL in a string (\u0000, or the bytes C0 80) is kept as QEMU keeps it,
# as modified UTF-8's bytes C0 80, here surrogate-escaped: a file name
# with one names the same file as in QEMU (os functions encode str paths
# with surrogateescape), and replies print it as \u0000 again.
_NUL = "\udcc0\udc80"


def _shown(text: str) -> str:
    """Token text as QEMU prints it: each invalid byte as U+FFFD."""
    return "".join("\ufffd" if _is_raw(ch) else ch for ch in text)


class JsonLexer:
    """Splits characters into tokens; on a bad character emits an ERROR token
    holding the text so far and skips to a resynchronisation point."""

    def __init__(self) -> None:
        self.state = "start"
        self.buf: list[str] = []
        self.quote = ""
        self.hex_left = 0

    def _error(self, out: list[Token], ch: str) -> None:
        self.buf.append(ch)
        out.append(Token(Tok.ERROR, _shown("".join(self.buf))))
        self.buf = []
        self.state = "recovery"

    def feed(self, text: str) -> list[Token]:
        out: list[Token] = []
        i = 0
        n = len(text)
        while i < n:
            ch = text[i]
            st = self.state
            if st == "recovery":
                if ch in _STRUCTURAL or (ord(ch) < 0x20 and ch != "\t"):
                    self.state = "start"
                    continue  # look at it again in start state
                i += 1
                continue
            if st == "start":
                if ch in _WS:
                    i += 1
                    continue
                if ch in _STRUCTURAL:
                    out.append(Token(_STRUCTURAL[ch], ch))
                    i += 1
                    continue
                if ch in "\"'":
                    self.state, self.quote, self.buf = "string", ch, [ch]
                    i += 1
                    continue
                if ch == "-" or ch.isdigit() and ch.isascii():
                    self.state, self.buf = ("num_zero" if ch == "0" else
                                            "num_sign" if ch == "-" else "num_int"), [ch]
                    i += 1
                    continue
                if "a" <= ch <= "z":
                    self.state, self.buf = "keyword", [ch]
                    i += 1
                    continue
                self.buf = []
                # QEMU stops at the first byte of a multi-byte character,
                # which alone is not UTF-8
                self._error(out, ch if ch.isascii() else "\ufffd")
                i += 1
                continue
            if st == "string":
                if ch == "\\":
                    self.buf.append(ch)
                    self.state = "escape"
                elif ch == self.quote:
                    self.buf.append(ch)
                    out.append(Token(Tok.STRING, "".join(self.buf)))
                    self.buf, self.state = [], "start"
                elif ord(ch) < 0x20 or ch == _RAW_FE or ch == _RAW_FF:
                    self._error(out, ch)
                else:
                    self.buf.append(ch)
                i += 1
                continue
            if st == "escape":
                if ch in _ESCAPES:
                    self.buf.append(ch)
                    self.state = "string"
                elif ch == "u":
                    self.buf.append(ch)
                    self.state, self.hex_left = "hex", 4
                else:
                    self._error(out, ch)
                i += 1
                continue
            if st == "hex":
                if ch in "0123456789abcdefABCDEF":
                    self.buf.append(ch)
                    self.hex_left -= 1
                    if not self.hex_left:
                        self.state = "string"
                else:
                    self._error(out, ch)
                i += 1
                continue
            if st == "keyword":
                if "a" <= ch <= "z":
                    self.buf.append(ch)
                    i += 1
                    continue
                out.append(Token(Tok.KEYWORD, "".join(self.buf)))
                self.buf, self.state = [], "start"
                continue
            # numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?
            if st == "num_sign":
                if ch == "0":
                    self.state = "num_zero"
                elif ch.isdigit() and ch.isascii():
                    self.state = "num_int"
                else:
                    self._error(out, ch)
                    i += 1
                    continue
                self.buf.append(ch)
                i += 1
                continue
            if st in ("num_int", "num_zero"):
                if st == "num_int" and ch.isdigit() and ch.isascii():
                    self.buf.append(ch)
                    i += 1
                    continue
                if ch == ".":
                    self.buf.append(ch)
                    self.state = "num_dot"
                    i += 1
                    continue
                if ch in "eE":
                    self.buf.append(ch)
                    self.state = "num_e"
                    i += 1
                    continue
                if st == "num_zero" and ch.isdigit() and ch.isascii():
                    self._error(out, ch)
                    i += 1
                    continue
                out.append(Token(Tok.INTEGER, "".join(self.buf)))
                self.buf, self.state = [], "start"
                continue
            if st in ("num_dot", "num_e", "num_esign"):
                if ch.isdigit() and ch.isascii():
                    self.buf.append(ch)
                    self.state = "num_frac" if st == "num_dot" else "num_exp"
                elif st == "num_e" and ch in "+-":
                    self.buf.append(ch)
                    self.state = "num_esign"
                else:
                    self._error(out, ch)
                i += 1
                continue
            if st in ("num_frac", "num_exp"):
                if ch.isdigit() and ch.isascii():
                    self.buf.append(ch)
                    i += 1
                    continue
                if st == "num_frac" and ch in "eE":
                    self.buf.append(ch)
                    self.state = "num_e"
                    i += 1
                    continue
                out.append(Token(Tok.FLOAT, "".join(self.buf)))
                self.buf, self.state = [], "start"
                continue
            raise AssertionError(st)  # pragma: no cover
        return out

    def flush(self) -> list[Token]:
        """End of input: a number or keyword in progress is complete."""
        return self.feed(" ") if self.state in ("keyword", "num_int", "num_zero",
                                                "num_frac", "num_exp") else []


class _ParseError(Exception):
    pass


def _unquote(text: str) -> str:
    """A string token's value, checked as QEMU's parse_string checks it."""
    out = []
    i = 1
    end = len(text) - 1
    while i < end:
        ch = text[i]
        if ch != "\\":
            if _is_raw(ch):
                # bytes that are not UTF-8: QEMU takes only modified
                # UTF-8's two-byte NUL
                if text[i:i + 2] != _NUL:
                    raise _ParseError("invalid UTF-8 sequence in string")
                ch = _NUL
                i += 1
            elif not _valid_codepoint(ord(ch)):
                raise _ParseError("invalid UTF-8 sequence in string")
            out.append(ch)
            i += 1
            continue
        e = text[i + 1]
        if e == "u":
            start = i
            cp = int(text[i + 2:i + 6], 16)
            i += 6
            if 0xD800 <= cp < 0xDC00 and text[i:i + 2] == "\\u":
                lo = int(text[i + 2:i + 6], 16)
                if 0xDC00 <= lo < 0xE000:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    i += 6
            if not _valid_codepoint(cp):
                raise _ParseError(f"{text[start:i]} is not a valid Unicode character")
            out.append(chr(cp) if cp else _NUL)
            continue
        out.append({"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}.get(e, e))
        i += 2
    return "".join(out)


def parse_tokens(tokens: list[Token]) -> Any:
    """Parse one complete message; raises _ParseError with QEMU's wording."""
    pos = 0

    def peek() -> Token | None:
        return tokens[pos] if pos < len(tokens) else None

    def at_close(close: Tok) -> bool:
        """An empty object or array: its closing token comes first."""
        nonlocal pos
        if (nxt := peek()) is not None and nxt.kind is close:
            pos += 1
            return True
        return False

    def closed(close: Tok, what: str) -> bool:
        """After an object's member or an array's element: True at the
        closing token, False at a comma."""
        nonlocal pos
        sep = peek()
        if sep is None:
            raise _ParseError("premature EOI")
        pos += 1
        if sep.kind is close:
            return True
        if sep.kind is not Tok.COMMA:
            raise _ParseError(f"expected separator in {what}")
        return False

    def value(depth: int) -> Any:
        nonlocal pos
        if depth > MAX_NESTING:
            raise _ParseError("nesting too deep")
        tok = peek()
        if tok is None:
            raise _ParseError("premature EOI")
        pos += 1
        if tok.kind is Tok.LCURLY:
            obj: dict[str, Any] = {}
            if at_close(Tok.RCURLY):
                return obj
            while True:
                key = peek()
                if key is None:
                    raise _ParseError("premature EOI")
                if key.kind is not Tok.STRING:
                    raise _ParseError("key is not a string in object")
                pos += 1
                colon = peek()
                if colon is None or colon.kind is not Tok.COLON:
                    raise _ParseError("missing : in object pair")
                pos += 1
                obj[_unquote(key.text)] = value(depth + 1)
                if closed(Tok.RCURLY, "dict"):
                    return obj
        if tok.kind is Tok.LSQUARE:
            arr: list[Any] = []
            if at_close(Tok.RSQUARE):
                return arr
            while True:
                arr.append(value(depth + 1))
                if closed(Tok.RSQUARE, "list"):
                    return arr
        if tok.kind is Tok.STRING:
            return _unquote(tok.text)
        if tok.kind is Tok.INTEGER:
            n = int(tok.text)
            # QEMU keeps int64, then uint64, else falls back to a double
            if -(1 << 63) <= n < (1 << 64):
                return n
            return float(tok.text)
        if tok.kind is Tok.FLOAT:
            return float(tok.text)
        if tok.kind is Tok.KEYWORD:
            kw = {"true": True, "false": False, "null": None}
            if tok.text in kw:
                return kw[tok.text]
            raise _ParseError(f"invalid keyword '{tok.text}'")
        raise _ParseError("expecting value")

    result = value(0)
    if pos != len(tokens):
        raise _ParseError("expecting value")
    return result


class JsonStreamer:
    """Bytes in, complete messages (or errors) out, as QEMU's json-streamer."""

    def __init__(self) -> None:
        self.lexer = JsonLexer()
        self.tokens: list[Token] = []
        self.size = 0
        self.brace = 0
        self.bracket = 0
        # keeps a UTF-8 sequence split between two reads for the next one
        self._decode = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode

    def feed(self, data: bytes) -> list[Any]:
        return self._process(self.lexer.feed(self._decode(data)))

    def _process(self, toks: list[Token]) -> list[Any]:
        results: list[Any] = []
        for tok in toks:
            if tok.kind is Tok.ERROR:
                results.append(JsonError(f"JSON parse error, stray '{tok.text}'"))
                self._reset()
                continue
            self.tokens.append(tok)
            self.size += len(tok.text)
            if tok.kind is Tok.LCURLY:
                self.brace += 1
            elif tok.kind is Tok.RCURLY:
                self.brace -= 1
            elif tok.kind is Tok.LSQUARE:
                self.bracket += 1
            elif tok.kind is Tok.RSQUARE:
                self.bracket -= 1
            if self.size > MAX_TOKEN_SIZE:
                results.append(JsonError("JSON parse error, message too long"))
                self._reset()
                continue
            if self.brace > 0 or self.bracket > 0:
                if self.brace + self.bracket > MAX_NESTING:
                    results.append(JsonError("JSON parse error, nesting too deep"))
                    self._reset()
                continue
            try:
                results.append(parse_tokens(self.tokens))
            except _ParseError as e:
                results.append(JsonError(f"JSON parse error, {e}"))
            self._reset()
        return results

    def _reset(self) -> None:
        self.tokens = []
        self.size = self.brace = self.bracket = 0


# -- output -------------------------------------------------------------------

def _quote(s: str) -> str:
    # QEMU escapes control characters and everything outside printable ASCII
    # as \uXXXX (upper-case hex, UTF-16 surrogate pairs), and leaves '/' alone.
    out = ['"']
    if not s.isascii():
        # surrogate-escaped bytes (QMP's NUL, names from the OS): C0 80 is
        # NUL, any other invalid byte U+FFFD, as QEMU prints them
        s = "".join("\ufffd" if _is_raw(ch) else ch for ch in s.replace(_NUL, "\0"))
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif 0x20 <= cp < 0x7F:
            out.append(ch)
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04X}")
    out.append('"')
    return "".join(out)


def _number(x: float) -> str:
    if x != x or x in (float("inf"), float("-inf")):
        return "0"  # not representable in JSON; never produced by our commands
    r = repr(x)
    return r


@functools.lru_cache(maxsize=4096)
def _key_order(keys: tuple[str, ...]) -> list[str]:
    # QEMU builds every reply, event and greeting as a QDict and prints it
    # in the QDict's bucket order ({"micro": 22, "minor": 2, "major": 7});
    # replaying it makes our output byte-identical, not just equal as JSON
    return qdict_order(keys)


def to_json(obj: Any, pretty: bool = False, level: int = 0) -> str:
    """Serialise as QEMU does (compact: ', ' and ': '; pretty: 4-space
    indent, where an empty object or array still spans two lines)."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return _quote(obj)
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, float):
        return _number(obj)
    if isinstance(obj, dict):
        items = [f"{_quote(k)}: {to_json(obj[k], pretty, level + 1)}"
                 for k in _key_order(tuple(obj))]
        return _container("{", "}", items, pretty, level)
    if isinstance(obj, (list, tuple)):
        items = [to_json(v, pretty, level + 1) for v in obj]
        return _container("[", "]", items, pretty, level)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _container(op: str, cl: str, items: list[str], pretty: bool, level: int) -> str:
    if not pretty:
        return op + ", ".join(items) + cl
    ind = "    "
    inner = ",".join("\n" + ind * (level + 1) + it for it in items)
    return op + inner + "\n" + ind * level + cl


def encode_message(obj: Any, pretty: bool = False) -> bytes:
    """One QMP message on the wire (QEMU's monitor turns '\\n' into '\\r\\n')."""
    return (to_json(obj, pretty) + "\n").replace("\n", "\r\n").encode()
