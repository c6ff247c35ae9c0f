"""The NBD server and NBD block exports, split as nbdkit's server/ is.

- :mod:`.sockets`: listening sockets from a SocketAddress (sockets.c).
- :mod:`.wire`: buffered reads and gathered writes on a client's stream.
- :mod:`.tls`: TLS contexts from tls-creds objects, authz checks (crypto.c).
- :mod:`.connection`: one client's lifecycle and its option negotiation
  (connections.c, protocol-handshake*.c).
- :mod:`.protocol`: the transmission phase, requests and replies (protocol.c).
- :mod:`.export`: the ``nbd`` block export type.
- :mod:`.server`: the NBD server service (nbd-server-start, --nbd-server).

Importing the package registers the ``nbd`` export type.
"""

from .connection import Connection
from .export import NbdExport
from .protocol import MAX_REQUESTS
from .server import NbdServer

__all__ = ["MAX_REQUESTS", "Connection", "NbdExport", "NbdServer"]
