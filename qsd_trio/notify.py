"""Readiness and status for the service manager: sd_notify(3), in a few lines.

When ``NOTIFY_SOCKET`` is set, messages go as datagrams to that unix socket
(a path, or an abstract name written with a leading ``@``): ``READY=1``
once startup is complete, ``STATUS=...`` when what the daemon serves
changes, ``STOPPING=1`` when shutdown begins, and ``WATCHDOG=1`` every half
``WATCHDOG_USEC`` when the manager asks for a watchdog (``WATCHDOG_PID``,
when set, must name this process).  Without ``NOTIFY_SOCKET`` every call is
a no-op.  Sending never blocks and never fails the daemon: a manager that
is gone or slow loses a message, as with libsystemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import trio


class Notifier:
    """One datagram socket to ``NOTIFY_SOCKET``; inactive when it is unset."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        where = env.get("NOTIFY_SOCKET") or ""
        self.address: str | None = None
        self.sock: socket.socket | None = None
        if where.startswith("@"):
            self.address = "\0" + where[1:]
        elif where.startswith("/"):
            self.address = where
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX,
                                      socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
        self.watchdog_usec = 0
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self.last_status: str | None = None

    @property
    def active(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` lines in one datagram (best effort)."""
        if self.sock is None or self.address is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            pass

    def ready(self) -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        """``STATUS=text``, only when it differs from the last one sent."""
        if text != self.last_status:
            self.last_status = text
            self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=Shutting down")

    async def run_watchdog(self) -> None:
        """Ping at half the manager's interval until cancelled; returns at
        once when no watchdog was asked for."""
        if not self.active or self.watchdog_usec <= 0:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_usec / 2e6)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
