"""Chardevs over file descriptors: pipe, serial, parallel (QEMU's
char-pipe.c, char-serial.c, char-parallel.c, char-fd.c) and pty (char-pty.c).

pipe, serial and parallel are open from the start (QEMU's be_opened): a
frontend gets one stream at once, until the descriptor reports end of file
or an error (QEMU's CHR_EVENT_CLOSED; it does not read again).  A pty is
"connected" while a process holds its slave side open, which QEMU (and we)
learn by polling the master for POLLHUP; every (re)connection is a new
stream, so a QMP monitor greets each one.

Resources: the descriptors are the chardev's and are closed by
:meth:`aclose` (``chardev-remove``, shutdown); a stream handed to a frontend
holds duplicates of them, closed with the stream.  Errors are QEMU's
messages (GenericError).
"""

from __future__ import annotations

import fcntl
import os
import select
import sys
import termios
from collections.abc import AsyncGenerator

import trio

from ..qapi.errors import GenericError
from .chardev import Chardev

# linux/ppdev.h: _IO('p', 0x8b), _IO('p', 0x8c)
PPCLAIM = 0x708B
PPRELEASE = 0x708C


def _open_file_source(path: str, flags: int) -> int:
    """qmp_chardev_open_file_source."""
    try:
        return os.open(path, flags, 0o666)
    except OSError as e:
        raise GenericError(f"Could not open '{path}': {e.strerror}") from None


def _fd_stream(fd_in: int, fd_out: int) -> trio.abc.Stream:
    """qemu_chr_open_fd's channels as one stream, over duplicates (the
    stream closes them; the chardev keeps its own)."""
    if fd_in == fd_out:
        return trio.lowlevel.FdStream(os.dup(fd_in))
    return trio.StapledStream(trio.lowlevel.FdStream(os.dup(fd_out)),
                              trio.lowlevel.FdStream(os.dup(fd_in)))


class FdChardev(Chardev):
    """QEMU's TYPE_CHARDEV_FD: an input and an output descriptor, open from
    the start."""

    def __init__(self, id: str):
        super().__init__(id)
        self.fd_in = -1
        self.fd_out = -1

    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        if self.fd_in < 0:
            return
        yield _fd_stream(self.fd_in, self.fd_out)
        # end of file or an error: QEMU stops reading (CHR_EVENT_CLOSED)

    async def aclose(self) -> None:
        for fd in {self.fd_in, self.fd_out} - {-1}:
            os.close(fd)
        self.fd_in = self.fd_out = -1
        await super().aclose()


class PipeChardev(FdChardev):
    """``pipe``: PATH.in and PATH.out (FIFOs, say), else PATH both ways;
    opened read-write, as QEMU, so a FIFO never reports end of file."""

    backend = "pipe"

    def __init__(self, id: str, device: str):
        super().__init__(id)
        self.device = device

    async def open(self) -> None:
        # qemu_chr_open_pipe
        fds = []
        for suffix in (".in", ".out"):
            try:
                fds.append(os.open(self.device + suffix, os.O_RDWR))
            except OSError:
                fds.append(-1)
        if -1 in fds:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            fd = _open_file_source(self.device, os.O_RDWR)
            fds = [fd, fd]
        self.fd_in, self.fd_out = fds
        os.set_blocking(self.fd_out, False)


def tty_serial_init(fd: int, speed: int = termios.B115200) -> None:
    """QEMU's tty_serial_init(fd, 115200, 'N', 8, 1): raw input, 8N1 at
    115200 baud, no output processing; a descriptor that is no tty is
    left alone (tcgetattr and tcsetattr fail quietly, as in QEMU)."""
    try:
        iflag, oflag, cflag, lflag, _ispeed, _ospeed, cc = termios.tcgetattr(fd)
    except termios.error:
        iflag = oflag = cflag = lflag = 0
        cc = [b"\0"] * termios.NCCS
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN | termios.ISIG)
    cflag &= ~(termios.CSIZE | termios.PARENB | termios.PARODD | termios.CRTSCTS
               | termios.CSTOPB)
    cflag |= termios.CS8
    # cfsetispeed/cfsetospeed: the speed lives in c_cflag's CBAUD bits
    cflag = (cflag & ~termios.CBAUD) | speed
    try:
        termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, speed, speed, cc])
    except termios.error:
        pass


class SerialChardev(FdChardev):
    """``serial`` (alias ``tty``): a tty device in raw mode, 115200 8N1."""

    backend = "serial"

    def __init__(self, id: str, device: str):
        super().__init__(id)
        self.device = device

    async def open(self) -> None:
        # qmp_chardev_open_serial
        fd = _open_file_source(self.device, os.O_RDWR | os.O_NONBLOCK)
        tty_serial_init(fd)
        self.fd_in = self.fd_out = fd


class ParallelChardev(Chardev):
    """``parallel`` (alias ``parport``): a Linux ppdev device, claimed with
    PPCLAIM.  QEMU's parallel chardev serves its frontend only through
    ioctls (a guest's parallel port): it reads nothing and drops what is
    written, so a monitor on it stays silent, as in QEMU."""

    backend = "parallel"

    def __init__(self, id: str, device: str):
        super().__init__(id)
        self.device = device
        self.fd = -1

    async def open(self) -> None:
        # qmp_chardev_open_parallel, qemu_chr_open_pp_fd
        fd = _open_file_source(self.device, os.O_RDWR)
        try:
            fcntl.ioctl(fd, PPCLAIM)
        except OSError as e:
            os.close(fd)
            raise GenericError(f"not a parallel port: {e.strerror}") from None
        self.fd = fd

    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        await trio.sleep_forever()
        yield  # pragma: no cover

    async def aclose(self) -> None:
        if self.fd >= 0:
            try:
                fcntl.ioctl(self.fd, PPRELEASE)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
        await super().aclose()


def cfmakeraw(fd: int) -> None:
    """glibc's cfmakeraw, then tcsetattr(TCSAFLUSH), as qemu_openpty_raw."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSAFLUSH, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


class PtyChardev(Chardev):
    """``pty``: a new pseudo-terminal; its slave's path is announced
    ("char device redirected to ..."), in chardev-add's reply and in
    query-chardev ("pty:PATH").

    Attributes:
        announce: print the announcement on stdout (true at startup; QEMU's
            qemu_printf goes nowhere while a QMP command runs).
    """

    backend = "pty"
    # QEMU polls a disconnected pty once a second; a tenth keeps a client
    # that opens the slave from waiting for its greeting
    POLL_INTERVAL = 0.1

    def __init__(self, id: str):
        super().__init__(id)
        self.master = -1
        self.pty_name = ""
        self.announce = False

    @property
    def filename(self) -> str:
        return f"pty:{self.pty_name}"

    async def open(self) -> None:
        # char_pty_open, qemu_openpty_raw
        try:
            master, slave = os.openpty()
        except OSError as e:
            raise GenericError(f"Failed to create PTY: {e.strerror}") from None
        try:
            self.pty_name = os.ttyname(slave)
            cfmakeraw(slave)
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        if self.announce:
            print(f"char device redirected to {self.pty_name} (label {self.id})",
                  file=sys.stdout, flush=True)

    def _hung_up(self) -> bool:
        p = select.poll()
        p.register(self.master, select.POLLOUT)
        return any(ev & select.POLLHUP for _, ev in p.poll(0))

    async def connections(self) -> AsyncGenerator[trio.abc.Stream, None]:
        # a process holds the slave open while the master reports no POLLHUP
        # (after openpty the slave is closed: hung up until one opens it).
        # QEMU may also write a monitor's greeting into the pty at startup
        # (when its first read of the master came before any hang-up), so
        # the first process to open it can read two; here it reads one.
        while self.master >= 0:
            # no event says a process opened the slave: poll, as QEMU
            while self._hung_up():  # noqa: ASYNC110
                await trio.sleep(self.POLL_INTERVAL)
            # reading the master fails with EIO once the slave is closed:
            # the stream ends there (QEMU's pty_chr_state(chr, 0))
            yield trio.lowlevel.FdStream(os.dup(self.master))

    async def aclose(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        await super().aclose()
