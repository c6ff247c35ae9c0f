"""Telnet and TN3270 for a listening socket chardev (``telnet=on``,
``tn3270=on``), sans-I/O: the bytes QEMU 7.2 sends when a client connects,
and the filter it runs over what the client sends (char-socket.c's
``tcp_chr_telnet_init`` and ``tcp_chr_process_IAC_bytes``).

QEMU does no real negotiation: it announces its options once and strips
telnet commands from the input by a small state machine, whatever the
client answers.  The machine's quirks are kept, because a client sees them:

- after IAC, any command but IAC and BREAK (and, for TN3270, EOR, SB, SE,
  IP and NOP) swallows the byte after it as its option, so ``IAC NOP x``
  drops ``x``;
- ``IAC IAC`` is one literal 0xff;
- for TN3270, ``IAC EOR``, ``IAC SB`` and ``IAC SE`` are meant to be passed
  on (to mark 3270 record boundaries), but what a monitor receives is
  ``IAC IAC``: QEMU reads a monitor's input one byte at a time (its
  can_read is 1) and rewrites the buffer in place, writing the IAC over
  the command byte before it copies that;
- the state belongs to the chardev, not to the connection: a client that
  leaves in the middle of a command leaves it for the next one.
"""

from __future__ import annotations

IAC = 0xFF
DONT, DO, WONT, WILL, SB = 0xFE, 0xFD, 0xFC, 0xFB, 0xFA
BREAK, IP, NOP, SE, EOR = 0xF3, 0xF4, 0xF1, 0xF0, 0xEF
OPT_BINARY, OPT_ECHO, OPT_SGA, OPT_TTYPE, OPT_EOR = 0x00, 0x01, 0x03, 0x18, 0x19
TTYPE_SEND = 0x01

# character mode, no local echo, binary both ways
TELNET_INIT = bytes([IAC, WILL, OPT_ECHO, IAC, WILL, OPT_SGA,
                     IAC, WILL, OPT_BINARY, IAC, DO, OPT_BINARY])
# RFC 1576: end of record and binary both ways, then ask the terminal type
TN3270_INIT = bytes([IAC, DO, OPT_EOR, IAC, WILL, OPT_EOR,
                     IAC, DO, OPT_BINARY, IAC, WILL, OPT_BINARY,
                     IAC, DO, OPT_TTYPE, IAC, SB, OPT_TTYPE, TTYPE_SEND, IAC, SE])

# QEMU's do_telnetopt: 1 plain data, 2 after IAC, 3 waiting for an option byte
_DATA, _COMMAND, _OPTION = 1, 2, 3


def init_bytes(tn3270: bool) -> bytes:
    """What QEMU sends a client before anything else."""
    return TN3270_INIT if tn3270 else TELNET_INIT


class IacFilter:
    """QEMU's ``tcp_chr_process_IAC_bytes``: telnet commands out of the
    input, fed in pieces of any size.

    Attributes:
        breaks: how many ``IAC BREAK`` were seen (QEMU's CHR_EVENT_BREAK,
            which a QMP monitor ignores).
    """

    def __init__(self, tn3270: bool = False):
        self.tn3270 = tn3270
        self.state = _DATA
        self.breaks = 0

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """The data bytes of ``data`` (with what TN3270 keeps of commands)."""
        raw = bytes(data)
        if self.state == _DATA and IAC not in raw:
            return raw
        out = bytearray()
        for b in raw:
            if self.state == _DATA:
                if b == IAC:
                    self.state = _COMMAND
                else:
                    out.append(b)
            elif self.state == _COMMAND:
                if b == IAC:
                    out.append(IAC)
                    self.state = _DATA
                elif b == BREAK:
                    self.breaks += 1
                    self.state = _DATA
                elif self.tn3270 and b in (EOR, SB, SE):
                    out += bytes([IAC, IAC])
                    self.state = _DATA
                elif self.tn3270 and b in (IP, NOP):
                    self.state = _DATA  # QEMU: "to be implemented later"
                else:
                    self.state = _OPTION
            else:
                self.state = _DATA  # the option byte (even an IAC) goes
        return bytes(out)
