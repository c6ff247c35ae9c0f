"""The NBD server and NBD block exports, split as nbdkit's server/ is (see docs/nbd.md).

- :mod:`.wire`: buffered reads and gathered writes on a client's stream.
- :mod:`.tls`: TLS contexts from tls-creds objects, authz checks (crypto.c).
- :mod:`.handshake`: option negotiation, a sans-I/O state machine
  (protocol-handshake*.c).
- :mod:`.connection`: one client's lifecycle; drives the handshake over its
  wire, runs TLS, hands itself to the chosen export (connections.c).
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
