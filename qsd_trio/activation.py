"""Socket activation: listening sockets passed by an init system, by name.

systemd (and ``systemd-socket-activate``, and any supervisor following
sd_listen_fds(3)) passes descriptors 3, 4, ... with ``LISTEN_FDS`` (their
count), ``LISTEN_PID`` (the process they are meant for) and optionally
``LISTEN_FDNAMES`` (colon-separated names, from ``FileDescriptorName=``).
:func:`claim` reads them once, before ``--daemonize`` forks; afterwards an
``fd=`` address (``--chardev socket,fd=NAME``, ``--nbd-server
addr.type=fd,addr.str=NAME``, a vhost-user-blk export's ``addr.str``) names
one of them, as QEMU's ``getfd``/``add-fd`` names would.

Like QEMU's ``monitor_get_fd``, taking a named descriptor removes it from
the table: each passed socket serves one user, so nothing listens twice,
and a second use of the name reads "has not been found".  Numeric
descriptors keep QEMU's meaning (an fd number inherited by the process).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import MutableMapping

from .qapi.errors import GenericError

SD_LISTEN_FDS_START = 3

# name -> descriptor, for the names passed and not yet taken; None when the
# process was not socket-activated
_passed: dict[str, int] | None = None


def claim(env: MutableMapping[str, str] | None = None) -> dict[str, int]:
    """Read ``LISTEN_*`` (if meant for this process), remember the names.

    The variables are removed from the environment, as sd_listen_fds(1)
    does, so helpers the daemon runs do not take them for their own; the
    descriptors are made close-on-exec for the same reason.  Descriptors
    without a name are named "unknown", as systemd names them.
    """
    global _passed
    env = os.environ if env is None else env
    count, pid = env.get("LISTEN_FDS"), env.get("LISTEN_PID")
    names = env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if count is None or not count.isdigit():
        return {}
    if pid is not None and pid != str(os.getpid()):
        return {}
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    name_list = names.split(":") if names else []
    table: dict[str, int] = {}
    for i, fd in enumerate(fds):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # not open after all: nothing to name
        name = name_list[i] if i < len(name_list) and name_list[i] else "unknown"
        # the first of two descriptors with one name wins; the other stays
        # reachable by its number
        table.setdefault(name, fd)
    _passed = table
    return dict(table)


def known(name: str) -> bool:
    """Whether ``name`` is a passed descriptor not yet taken."""
    return _passed is not None and name in _passed


def socket_fd(text: str, not_a_number: str) -> int:
    """The descriptor an ``fd`` socket address names: a passed name (taken
    from the table), else a number.

    ``not_a_number`` is the caller's QEMU error for text that is neither,
    used when the process was not socket-activated (QEMU's wording for that
    case differs between the chardev, the NBD server and vhost-user).

    Raises:
        GenericError: "File descriptor named 'x' has not been found" for a
            name that was not passed (or was taken already), as QEMU's
            monitor_get_fd says it; else ``not_a_number``.
    """
    if _passed is not None and text in _passed:
        return _passed.pop(text)
    try:
        return int(text)
    except ValueError:
        pass
    if _passed is not None:
        raise GenericError(f"File descriptor named '{text}' has not been found")
    raise GenericError(not_a_number)
