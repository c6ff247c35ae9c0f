"""The command line: argv -> ordered startup actions.

Every option that creates something is carried out through the handler of
its QMP command (``blockdev-add``, ``chardev-add``, ``object-add``,
``nbd-server-start``, ``block-export-add``), in command-line order, so the
command line and QMP give the same errors.  Errors end the process with
``qsd-trio: --option value: message`` and status 1, never a traceback.

``--daemonize`` forks before trio starts: the parent waits on a pipe for the
child's verdict (startup complete, or failed) and exits with its status.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import trio

from . import QEMU_VERSION, __version__, activation, trace
from .chardev import options as chardev_options
from .daemon import Action, Daemon, StartupError
from .memory import tune_gc, tune_malloc
from .metrics import opt_metrics
from .monitor import dispatch, registry
from .monitor.chardev import add_chardev, remove_chardev
from .monitor.session import Monitor
from .objects.qom import USER_CREATABLE, check_id, object_properties
from .qapi import keyval, qemuopts, schema
from .qapi.errors import GenericError, QapiError, collect_warnings

PROG = "qsd-trio"

HELP = f"""\
Usage: {PROG} [options]
QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export the specified block node over FUSE

  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over UNIX domain socket
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=fd,addr.str=<fd>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over file descriptor

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --metrics addr.type=inet,addr.host=<host>,addr.port=<port>
  --metrics addr.type=unix,addr.path=<path>
                         serve OpenMetrics/Prometheus text at /metrics
                         over HTTP (qsd-trio only)

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         See the qemu(1) man page for documentation of the
                         objects that can be added.

  --pidfile <path>       write process ID to a file after startup

qsd-trio is qemu-storage-daemon rebuilt in Python on trio.
"""

# long option -> takes an argument
LONG_OPTS = {
    "help": False, "version": False, "trace": True, "blockdev": True, "chardev": True,
    "daemonize": False, "export": True, "metrics": True, "monitor": True, "nbd-server": True,
    "object": True, "pidfile": True,
}
SHORT_OPTS = {"h": "help", "V": "version", "T": "trace"}


class UsageError(Exception):
    pass


class EarlyExit(Exception):
    """--help, --version, --object help, --chardev help: print and exit
    (0, unless QEMU exits 1 there)."""

    def __init__(self, text: str, status: int = 0):
        self.text = text
        self.status = status


def split_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """getopt_long with argument permutation off, as QEMU's "-hT:V" with a
    leading '-': returns ('--name', value) pairs and ('', arg) for operands."""
    out: list[tuple[str, str | None]] = []
    rest = iter(argv)
    for arg in rest:
        if arg == "--":
            out += [("", a) for a in rest]
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            matches = [o for o in LONG_OPTS if o == name] or [o for o in LONG_OPTS
                                                               if o.startswith(name)]
            if len(matches) != 1:
                if matches:
                    raise UsageError(f"option '{arg}' is ambiguous")
                raise UsageError(f"unrecognized option '--{name}'")
            opt = matches[0]
            if LONG_OPTS[opt]:
                if not eq:
                    value = _next_arg(rest, f"option '--{opt}' requires an argument")
                out.append((f"--{opt}", value))
            else:
                if eq:
                    raise UsageError(f"option '--{opt}' doesn't allow an argument")
                out.append((f"--{opt}", None))
        elif arg.startswith("-") and len(arg) > 1:
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                if ch not in SHORT_OPTS:
                    raise UsageError(f"invalid option -- '{ch}'")
                opt = SHORT_OPTS[ch]
                if LONG_OPTS[opt]:
                    value = arg[j:] or _next_arg(
                        rest, f"option requires an argument -- '{ch}'")
                    out.append((f"--{opt}", value))
                    break
                out.append((f"--{opt}", None))
        else:
            out.append(("", arg))
    return out


def _next_arg(rest: Iterator[str], missing: str) -> str:
    """The argument after an option that takes one, as its value."""
    value = next(rest, None)
    if value is None:
        raise UsageError(missing)
    return value


def _typed(type_name: str, value: str, implied: str | None) -> Any:
    """keyval or JSON option text -> typed schema value."""
    if keyval.is_json(value):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise GenericError(f"JSON parse error, {e.msg}") from None
        return schema.parse_json(type_name, data)
    return schema.parse_keyval(type_name, keyval.parse(value, implied))


def _command(name: str) -> registry.Command:
    """The command ``name``, importing the command groups in their order
    only until one has registered it.

    A command line that adds nodes and a monitor then never imports the
    export, job and snapshot groups (and through them NBD, FUSE, vhost-user,
    TLS, crypto and every job): they cost a third of the startup.  The first
    command a QMP client sends loads them all (``dispatch.lookup``).
    """
    for group in registry.GROUPS:
        if name in registry.COMMANDS:
            return registry.COMMANDS[name]
        importlib.import_module(f"{registry.__package__}.{group}")
    return dispatch.lookup(name)


def _call(name: str, args: Any) -> Action:
    async def action(daemon: Daemon) -> None:
        await _command(name).handler(daemon, args)
    return action


# -- the options -----------------------------------------------------------------

def opt_blockdev(value: str) -> Action:
    return _call("blockdev-add", _typed("BlockdevOptions", value, "driver"))


def opt_export(value: str) -> Action:
    return _call("block-export-add", _typed("BlockExportOptions", value, "type"))


def opt_nbd_server(value: str) -> Action:
    opts = schema.to_qmp(_typed("NbdServerOptions", value, None))
    # the command line takes a flat SocketAddress; nbd-server-start the
    # legacy form with a 'data' wrapper
    addr = dict(opts["addr"])
    kind = addr.pop("type")
    opts["addr"] = {"type": kind, "data": addr}

    async def action(daemon: Daemon) -> None:
        await dispatch.call(daemon, _command("nbd-server-start"), opts)
    return action


def opt_object(value: str) -> Action:
    if value == "help":
        raise EarlyExit("List of user creatable objects:\n"
                        + "".join(f"  {t}\n" for t in sorted(USER_CREATABLE)))
    kv = qemuopts.parse_flat(value, "qom-type") if not keyval.is_json(value) else None
    if kv is not None and ("help" in kv or "?" in kv) and "qom-type" in kv:
        t = kv["qom-type"]
        if t not in USER_CREATABLE:
            raise GenericError(f"invalid object type: {t}")
        props = [n for n, _ in object_properties(t) if n != "type"]
        raise EarlyExit(f"{t} options:\n" + "".join(f"  {p}=<{dict(object_properties(t))[p]}>\n"
                                                   for p in sorted(props)))
    return _call("object-add", _typed("ObjectOptions", value, "qom-type"))


def chardev_backend(value: str) -> tuple[str, dict[str, Any]]:
    """QEMU's legacy -chardev syntax -> (id, ChardevBackend in QMP form)."""
    id, backend, _mux = chardev_options.parse(value)
    return id, backend


def opt_chardev(value: str) -> Action:
    try:
        id, backend, mux = chardev_options.parse(value)
    except chardev_options.Help as e:
        raise EarlyExit(e.text, e.status) from None

    async def action(daemon: Daemon) -> None:
        check_id(id)  # QemuOpts' check; chardev-add takes any id
        if not mux:
            await add_chardev(daemon, id, backend, announce=True)
            return
        # mux=on: the backend as ID-base, a mux named ID over it
        # (qemu_chr_new_from_opts); the base goes again if the mux fails
        await add_chardev(daemon, f"{id}-base", backend, announce=True)
        try:
            await add_chardev(daemon, id, {"type": "mux", "data": {"chardev": f"{id}-base"}})
        except BaseException:
            await remove_chardev(daemon, f"{id}-base")
            raise
    return action


def opt_monitor(value: str) -> Action:
    opts = qemuopts.parse_flat(value, "chardev")
    mode = opts.pop("mode", "control")
    pretty_s = opts.pop("pretty", None)
    chardev_id = opts.pop("chardev", None)
    opts.pop("id", None)
    if opts:
        raise GenericError(f"Invalid parameter '{next(iter(opts))}'")
    if mode != "control":
        raise GenericError("Only QMP is supported")
    pretty = chardev_options.on_off("pretty", pretty_s, False)
    if chardev_id is None:
        raise GenericError("Parameter 'chardev' is missing")

    async def action(daemon: Daemon) -> None:
        chardev = daemon.chardevs.get(chardev_id)
        if chardev is None:
            raise GenericError(f'chardev "{chardev_id}" not found')
        mon = Monitor(daemon, chardev, pretty)
        chardev.attach(mon)
        daemon.monitors.append(mon)
        await daemon.monitor_nursery.start(mon.run)
    return action


BUILDERS: dict[str, Callable[[str], Action]] = {
    "--blockdev": opt_blockdev,
    "--chardev": opt_chardev,
    "--export": opt_export,
    "--metrics": opt_metrics,
    "--monitor": opt_monitor,
    "--nbd-server": opt_nbd_server,
    "--object": opt_object,
}


def version_text() -> str:
    major, minor, micro = QEMU_VERSION
    return (f"{PROG} version {major}.{minor}.{micro} (qsd-trio {__version__})\n"
            "qemu-storage-daemon rebuilt in Python on trio\n")


def parse(argv: list[str]) -> tuple[list[tuple[str, str | None, Action]], str | None, bool]:
    """argv -> (actions, pidfile, daemonize); raises UsageError/EarlyExit/
    StartupError.  Like QEMU, --help/--version/--trace act in a first pass,
    everything else in order in a second."""
    pairs = split_argv(argv)
    pidfile = None
    daemonize = False
    for opt, value in pairs:
        if opt == "--help":
            raise EarlyExit(HELP)
        if opt == "--version":
            raise EarlyExit(version_text())
        if opt == "--trace":
            assert value is not None  # split_argv gives it the argument it takes
            try:
                trace.configure(value)
            except trace.HelpRequested:
                raise EarlyExit(trace.help_text()) from None
            except QapiError as e:
                raise StartupError("--trace", value, e.desc, e.hint) from None
        if opt == "--daemonize":
            daemonize = True
        if opt == "--pidfile":
            pidfile = value
        if opt == "":
            raise UsageError(f"{value}: Unexpected argument")
    actions: list[tuple[str, str | None, Action]] = []
    warned_before: list[str] = []  # printed if a later option fails to parse
    for opt, value in pairs:
        build = BUILDERS.get(opt)
        if build is None:
            continue
        assert value is not None  # every option of BUILDERS takes an argument
        with collect_warnings() as warned:
            try:
                action = build(value)
            except QapiError as e:
                _print_warnings(warned_before + [f"{opt} {value}: warning: {w}" for w in warned])
                raise StartupError(opt, value, e.desc, e.hint) from None
            except EarlyExit:
                # --chardev ...,help: QEMU has printed the warnings as it parsed
                _print_warnings(warned_before + [f"{opt} {value}: warning: {w}" for w in warned])
                raise
        if warned:
            lines = [f"{opt} {value}: warning: {w}" for w in warned]
            warned_before += lines
            action = _warn_first(lines, action)
        actions.append((opt, value, action))
    return actions, pidfile, daemonize


def _print_warnings(lines: list[str]) -> None:
    for line in lines:
        print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _warn_first(lines: list[str], action: Action) -> Action:
    """The option's parse warnings come out when it takes effect (QEMU
    parses and applies each option in turn)."""
    async def run(daemon: Daemon) -> None:
        _print_warnings(lines)
        await action(daemon)
    return run


def _daemonize() -> Callable[[bool], None]:
    """Fork; the parent waits for the child's verdict and exits with it.

    Returns the child's ``report(ok)`` callback: it tells the parent, then
    detaches stdio so the terminal is free."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        verdict = os.read(rfd, 1)  # b"" if the daemon died before reporting
        os._exit(0 if verdict == b"\0" else 1)
    os.close(rfd)
    # like QEMU: a new session, then a second fork so the daemon is not a
    # session leader and can never regain a controlling terminal
    os.setsid()
    if os.fork() > 0:
        os._exit(0)

    def report(ok: bool) -> None:
        try:
            os.write(wfd, b"\0" if ok else b"\1")
            os.close(wfd)
        except OSError:
            pass
        if ok:
            os.chdir("/")  # as QEMU's os_setup_post: don't pin the start directory
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
    return report


def _first(eg: BaseExceptionGroup[StartupError]) -> StartupError:
    exc = eg.exceptions[0]
    return exc if isinstance(exc, StartupError) else _first(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    activation.claim()  # before --daemonize forks: LISTEN_PID names this process
    try:
        actions, pidfile, daemonize = parse(argv)
    except EarlyExit as e:
        sys.stdout.write(e.text)
        return e.status
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except StartupError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1

    report = _daemonize() if daemonize else None
    tune_malloc()
    tune_gc()
    daemon = Daemon()
    failure: list[StartupError] = []
    try:
        trio.run(daemon.run, actions, pidfile,
                 (lambda: report(True)) if report else None)
    except* StartupError as eg:
        failure.append(_first(eg))
    except* KeyboardInterrupt:
        pass
    if failure:
        print(f"{PROG}: {failure[0]}", file=sys.stderr)
        if report:
            report(False)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
