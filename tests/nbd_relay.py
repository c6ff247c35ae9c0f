"""A unix socket relay between an NBD client and a real server, for the
tests of the NBD client driver.

One accept loop serves every use: ``test_nbd_driver_ext`` reads what each
connection carried (``record=True``), ``test_nbd_driver_multiconn`` cuts
one connection of several (a network that drops it).  Threads, not trio:
the client and the server are other processes, and the relay only copies
bytes between them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


class Link:
    """One relayed connection: its two sockets, what it carried (``up``:
    client to server, ``down``: server to client; kept only when the relay
    records), how many bytes went up, and whether it has ended (the peer
    closed, or a cut)."""

    def __init__(self, client: socket.socket, server: socket.socket, record: bool):
        self.client, self.server = client, server
        self.up: bytearray | None = bytearray() if record else None
        self.down: bytearray | None = bytearray() if record else None
        self.sent = 0
        self.ended = False

    def cut(self) -> None:
        """Drop the connection at both ends."""
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class Relay:
    """Listens on ``listen`` and relays each connection to ``target``.

    A connection the target refuses is closed (the client sees it close).
    ``close`` stops accepting, ends every connection and waits for the
    relay threads; ``links`` then holds all that was carried."""

    def __init__(self, listen: Path, target: Path, *, record: bool = False):
        self.target = target
        self.record = record
        self.links: list[Link] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(listen))
        self.sock.listen(16)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(str(self.target))
            except OSError:
                client.close()
                server.close()
                continue
            link = Link(client, server, self.record)
            self.links.append(link)
            for up in (True, False):
                t = threading.Thread(target=self._relay, args=(link, up), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _relay(link: Link, up: bool) -> None:
        src, dst = (link.client, link.server) if up else (link.server, link.client)
        log = link.up if up else link.down
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if up:
                    link.sent += len(data)
                if log is not None:
                    log += data
                dst.sendall(data)
        link.ended = True
        if log is not None:
            # a recording passes the end on and lets the other direction
            # finish, so that it holds both directions whole
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        else:
            link.cut()  # a connection that ends ends both ways, as a network's

    def cut(self, i: int) -> None:
        self.links[i].cut()

    def live(self) -> int:
        """Connections still open."""
        return sum(1 for link in self.links if not link.ended)

    @property
    def conns(self) -> list[tuple[bytearray, bytearray]]:
        """What each connection carried, (up, down), with ``record``."""
        return [(link.up, link.down) for link in self.links
                if link.up is not None and link.down is not None]

    def close(self) -> None:
        """Stop accepting, end the connections, wait for the threads."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (close does not)
        self.sock.close()
        self.threads[0].join(10)
        if not self.record:
            for link in self.links:
                link.cut()
        # a recording's connections end as their client and server end them
        for t in self.threads[1:]:
            t.join(10)
        for link in self.links:
            link.cut()
            link.client.close()
            link.server.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """relay(target, record=False) -> a started Relay to ``target``, listening
    on tmp_path/proxy0.sock (then proxy1.sock, ...); all closed at the end."""
    made: list[Relay] = []

    def start(target: Path, *, record: bool = False) -> Relay:
        made.append(Relay(tmp_path / f"proxy{len(made)}.sock", target, record=record))
        return made[-1]
    yield start
    for r in made:
        r.close()
