"""``--chardev``: QEMU's legacy chardev options (qemu_chardev_opts, then
each backend's ``parse`` hook in chardev/char-*.c) to a ChardevBackend in
QMP form.

The option names and types are checked first, for every backend, as
QemuOpts does; then the backend's own parser picks the options it knows
and ignores the rest (``pty,id=c,path=x`` is accepted, as in QEMU).
"""

from __future__ import annotations

from typing import Any

from .. import activation
from ..qapi import qemuopts
from ..qapi.errors import GenericError, warn_report
from ..qapi.schema import strtosz
from .chardev import BACKENDS

# qemu_chardev_opts (chardev/char.c, 7.2): name -> type
OPTS: dict[str, str] = {
    "backend": "string", "path": "string", "host": "string",
    "port": "string", "fd": "string", "localaddr": "string", "localport": "string",
    "to": "number", "ipv4": "bool", "ipv6": "bool", "wait": "bool", "server": "bool",
    "delay": "bool", "nodelay": "bool", "reconnect": "number", "telnet": "bool",
    "tn3270": "bool", "tls-creds": "string", "tls-authz": "string", "websocket": "bool",
    "width": "number", "height": "number", "cols": "number", "rows": "number",
    "mux": "bool", "signal": "bool", "name": "string", "debug": "number", "size": "size",
    "chardev": "string", "append": "bool", "logfile": "string", "logappend": "bool",
    "mouse": "bool", "clipboard": "bool", "tight": "bool", "abstract": "bool",
}

# deprecated aliases (char_get_class)
ALIASES = {"tty": "serial", "parport": "parallel"}

BACKENDS_PARSED = ("socket", "ringbuf", "memory", "file", "stdio", "null", "pipe", "serial",
                   "parallel", "pty", "udp", "mux")


def on_off(key: str, value: str | None, default: bool) -> bool:
    """A QemuOpts boolean: on/yes/true or the bare key, off/no/false (also
    what cli.py's --monitor pretty= takes)."""
    if value is None:
        return default
    if value in ("on", "yes", "true", ""):
        return True
    if value in ("off", "no", "false"):
        return False
    raise GenericError(f"Parameter '{key}' expects 'on' or 'off'")


def _validate(key: str, value: str) -> None:
    """opt_validate: the name is in the list, the value parses as its type."""
    kind = OPTS.get(key)
    if kind is None:
        raise GenericError(f"Invalid parameter '{key}'")
    if kind == "bool":
        on_off(key, value, False)
    elif kind == "number":
        try:
            int(value, 0)
        except ValueError:
            raise GenericError(f"Parameter '{key}' expects a number") from None
    elif kind == "size":
        qemuopts.parse_size(key, value)


def _common(opts: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    """qemu_chr_parse_common."""
    if "logfile" in opts:
        data["logfile"] = opts["logfile"]
    if "logappend" in opts:
        data["logappend"] = on_off("logappend", opts["logappend"], False)
    return data


def _hostdev(opts: dict[str, str], what: str) -> dict[str, Any]:
    device = opts.get("path")
    if device is None:
        raise GenericError(f"chardev: {what}: no device path given")
    return _common(opts, {"device": device})


class Help(Exception):
    """``--chardev help`` (status 0) or an option ``help`` (status 1, as
    QEMU's qemu_opts_parse_noisily failing after it printed the list)."""

    def __init__(self, text: str, status: int):
        self.text = text
        self.status = status


TYPE_NAMES = {"string": "str", "bool": "bool (on/off)", "number": "num", "size": "size"}


def _flat(value: str) -> tuple[dict[str, str], bool]:
    """opts_do_parse: item by item (get_opt_name_value, then opt_validate,
    so the first bad item fails and warnings stop there).  The first bare
    item is the backend; a later bare ``key`` is key=on and ``nokey``
    key=off, each with QEMU's deprecation warning; ``help``/``?`` stops the
    parse and asks for the option list."""
    opts: dict[str, str] = {}
    help_wanted = False
    for n, item in enumerate(qemuopts._split(value)):
        if not item and n > 0:
            continue
        key, eq, val = item.partition("=")
        if eq:
            opts[key] = val
        elif n == 0:
            key, val = "backend", key
            opts[key] = val
        elif key in ("help", "?"):
            help_wanted = True
            break
        else:
            prefix = ""
            if key.startswith("no"):
                key, val, prefix = key[2:], "off", "no"
            else:
                val = "on"
            if key == "delay":
                hint = f"nodelay={'on' if prefix else 'off'}"
            else:
                hint = f"{key}={val}"
            warn_report(f"short-form boolean option '{prefix}{key}' deprecated\n"
                        f"Please use {hint} instead")
            opts[key] = val
        if key != "id":
            _validate(key, opts[key])
    return opts, help_wanted


def options_help() -> str:
    return "chardev options:\n" + "".join(f"  {name}=<{TYPE_NAMES[kind]}>\n"
                                           for name, kind in sorted(OPTS.items()))


def parse(value: str) -> tuple[str, dict[str, Any], bool]:
    """``--chardev VALUE`` -> (id, ChardevBackend in QMP form, mux=on).

    Raises:
        GenericError: QEMU's message for a bad option.
        Help: help was asked for; its text goes to stdout.
    """
    opts, help_wanted = _flat(value)
    if help_wanted:
        raise Help(options_help(), 1)
    backend = opts.get("backend")
    id = opts.get("id")
    if backend in ("help", "?"):
        # char.c's help_string_append over the registered types
        raise Help("Available chardev backend types: \n"
                   + "".join(f"  {b}\n" for b in reversed(BACKENDS)), 0)
    if backend is None:
        raise GenericError("chardev: \"{}\" missing backend".format(id or ""))
    if id is None:
        raise GenericError("Parameter 'id' is missing")
    if backend in ALIASES:
        warn_report(f"The alias '{backend}' is deprecated, use '{ALIASES[backend]}' instead")
        backend = ALIASES[backend]

    def flag(key: str, default: bool) -> bool:
        return on_off(key, opts.get(key), default)

    data: dict[str, Any] = {}
    if backend == "socket":
        path, host, port, fd = (opts.get(k) for k in ("path", "host", "port", "fd"))
        server = flag("server", False)
        wait = flag("wait", True)
        # 'nodelay' or 'delay=off' (the short form 'nodelay' is delay=off)
        nodelay = flag("nodelay", False) or not flag("delay", True)
        if path is not None:
            addr = {"type": "unix", "data": {"path": path}}
        elif host is not None or port is not None:
            if port is None:
                raise GenericError("chardev: socket: no port given")
            addr = {"type": "inet", "data": {"host": host or "", "port": port}}
        else:
            if fd is None:
                fd = ""
            # a number, or the name of a socket-activated descriptor; an
            # unknown name fails now, before any option takes effect
            if not activation.known(fd):
                try:
                    int(fd)
                except ValueError:
                    activation.socket_fd(fd, f"Unable to parse FD number {fd}")
            addr = {"type": "fd", "data": {"str": fd}}
        data = {"addr": addr, "server": server, "nodelay": nodelay}
        # qemu_chr_parse_socket: 'wait' counts as given for a server (its
        # default differs from QMP's), the other options when they are there
        if server or "wait" in opts:
            data["wait"] = wait
        for key in ("telnet", "tn3270", "websocket"):
            if key in opts:
                data[key] = flag(key, False)
        if "reconnect" in opts:
            data["reconnect"] = int(opts["reconnect"], 0)
        for key in ("tls-creds", "tls-authz"):
            if key in opts:
                data[key] = opts[key]
        _common(opts, data)
    elif backend in ("ringbuf", "memory"):
        if "size" in opts:
            # validated (and warned about) by _validate: QEMU parses an
            # option once, qemu_opt_get_size reads the value it kept
            size = strtosz(opts["size"])
            assert size is not None
            data["size"] = size
        _common(opts, data)
    elif backend == "file":
        path = opts.get("path")
        if path is None:
            raise GenericError("chardev: file: no filename given")
        # 7.2's option list has no input-path: ChardevFile's "in" is QMP-only
        data = _common(opts, {"out": path, "append": flag("append", False)})
    elif backend == "stdio":
        flag("signal", True)
        _common(opts, data)
    elif backend in ("null", "pty"):
        _common(opts, data)
    elif backend == "pipe":
        data = _hostdev(opts, "pipe")
    elif backend == "serial":
        data = _hostdev(opts, "serial/tty")
    elif backend == "parallel":
        data = _hostdev(opts, "parallel")
    elif backend == "udp":
        data = _udp(opts)
    elif backend == "mux":
        chardev = opts.get("chardev")
        if chardev is None:
            raise GenericError("chardev: mux: no chardev given")
        data = _common(opts, {"chardev": chardev})
    else:
        raise GenericError(f"'{backend}' is not a valid char driver name")
    return id, {"type": backend, "data": data}, flag("mux", False)


def _udp(opts: dict[str, str]) -> dict[str, Any]:
    """qemu_chr_parse_udp."""
    host = opts.get("host") or "localhost"
    port = opts.get("port")
    if not port:
        raise GenericError("chardev: udp: remote port not specified")
    localport = opts.get("localport") or ""
    localaddr = opts.get("localaddr") or ""
    has_local = bool(localport or localaddr)
    remote: dict[str, Any] = {"host": host, "port": port}
    for k in ("ipv4", "ipv6"):
        if k in opts:
            remote[k] = on_off(k, opts[k], False)
    data = _common(opts, {"remote": {"type": "inet", "data": remote}})
    if has_local:
        data["local"] = {"type": "inet", "data": {"host": localaddr, "port": localport or "0"}}
    return data
