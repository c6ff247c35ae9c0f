"""A QEMU guest (TCG) that runs shell scripts for the tests.

``Guest.boot()`` starts ``qemu-system-x86_64`` with the cached kernel and
initramfs (image.py). The guest's root is the host's ``/`` (virtio-9p,
read-only) under an overlay with a tmpfs on top, so scripts run the host's
own tools (dd, blkdiscard, qemu-storage-daemon, the venv's Python); writes
land in the guest's memory. ``Guest.share``, a host directory, is shared
read-write (9p, ``cache=none``) at the same path: scripts read their input
and write their results there.

Scripts travel over a control channel: the host writes ``<share>/cmd/<n>.sh``
and sends ``RUN <n>`` on a virtio-serial port (chardev ``ctl``, a unix socket
QEMU listens on); the guest's init runs it with bash in the background and
answers ``DONE <n> <rc>``; the output is ``<share>/cmd/<n>.out``. So one boot
serves many scripts, and a script may run while the host does something else
(``start`` and ``wait``).

Guest memory is a shared memfd (``memory-backend-memfd,share=on`` as the
NUMA node's memory), which a vhost-user back-end needs to map it; vhost-user
disks are hot-plugged on the PCI root bus through QEMU's QMP monitor
(``attach_vhost_user_blk``, ``detach``), or given at boot (``boot_args``).

Every wait is bounded. A guest that misses a deadline, dies or oopses
(``oops=panic``) is killed and marked broken: ``GuestError`` carries the
tail of its console, and ``shared_guest`` boots a new one for the next test.
``close()`` ends QEMU (``quit``, then SIGKILL) and removes the run
directory; it never raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest.image import guest_image

# What every script starts with: bash, unset variables are errors, and
# wait_for for the bounded waits a script needs.
PRELUDE = r"""set -u
# wait_for SECONDS COMMAND...: run COMMAND every 0.1 s until it succeeds
wait_for() {
  local end=$((EPOCHSECONDS + $1)); shift
  until "$@"; do
    [ "$EPOCHSECONDS" -lt "$end" ] || return 1
    sleep 0.1
  done
}
"""
REPO = Path(__file__).resolve().parents[2]


class GuestError(RuntimeError):
    """The guest did not boot, died, or missed a deadline; it is now killed."""


@dataclass(frozen=True)
class Result:
    rc: int
    output: str

    def check(self) -> Result:
        """The result itself; AssertionError with the output if rc != 0."""
        if self.rc != 0:
            raise AssertionError(f"guest script failed ({self.rc}):\n{self.output}")
        return self


@dataclass(frozen=True)
class VhostUserDisk:
    """A vhost-user-blk-pci device plugged into the guest."""

    device_id: str
    chardev_id: str
    slot: int

    @property
    def sysfs(self) -> str:
        """The glob of its block device's sysfs directory in the guest."""
        return f"/sys/bus/pci/devices/0000:00:{self.slot:02x}.0/virtio*/block/*"


@dataclass
class _Qmp:
    """A minimal QMP client: commands answered in order, events kept."""

    sock: socket.socket
    buf: bytes = b""
    events: list[dict] = field(default_factory=list)

    @classmethod
    def connect(cls, path: Path, deadline: float) -> _Qmp:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        qmp = cls(sock)
        qmp._read(deadline)  # greeting
        qmp.command("qmp_capabilities", deadline=deadline)
        return qmp

    def _read(self, deadline: float) -> dict:
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise GuestError("QEMU's QMP monitor did not answer in time") from None
            if not data:
                raise GuestError("QEMU closed its QMP monitor")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def command(self, name: str, *, deadline: float, **args: object) -> object:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._read(deadline)
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise GuestError(f"QMP {name} {args}: {msg['error']['desc']}")
            else:
                return msg["return"]

    def wait_event(self, name: str, deadline: float, **data: object) -> dict:
        while True:
            for ev in self.events:
                if ev["event"] == name and all(ev.get("data", {}).get(k) == v
                                               for k, v in data.items()):
                    self.events.remove(ev)
                    return ev
            self.events.append(self._read(deadline))

    def close(self) -> None:
        self.sock.close()


class Guest:
    """One QEMU guest. See the module docstring.

    Args:
        memory_mib: guest RAM, a shared memfd.
        cpus: vCPUs; Linux's virtio-blk driver uses at most one request
            queue per CPU, so two show a multi-queue export's second queue.
        boot_args: more QEMU arguments (e.g. a ``-chardev`` and a
            ``-device vhost-user-blk-pci`` present from boot).
    """

    def __init__(self, *, memory_mib: int = 2048, cpus: int = 2,
                 boot_args: list[str] | None = None):
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.boot_args = list(boot_args or [])
        self.dir = Path(tempfile.mkdtemp(prefix="qsd-guest-"))
        self.share = self.dir / "share"
        (self.share / "cmd").mkdir(parents=True)
        self.console = self.dir / "console.log"
        self.kernel = ""
        self.boot_seconds = 0.0
        self.broken: str | None = None
        self._proc: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._ctl_buf = b""
        self._qmp: _Qmp | None = None
        self._jobs = itertools.count()
        self._done: dict[int, int] = {}
        self._slots = itertools.cycle(range(0x10, 0x20))
        self._ids = itertools.count()

    # -- lifetime --------------------------------------------------------

    def boot(self, timeout: float = 180) -> Guest:
        """Start QEMU and wait for the guest's init to serve the control port.

        Raises:
            GuestError: QEMU exited or the guest was not ready in ``timeout``.
            image.GuestImageError: the kernel or initramfs could not be built.
        """
        image = guest_image()
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            raise GuestError("qemu-system-x86_64 is missing: make deps installs qemu-system-x86")
        mem = f"{self.memory_mib}M"
        ctl, qmp = self.dir / "ctl.sock", self.dir / "qmp.sock"
        argv = [
            qemu, "-accel", "tcg", "-cpu", "max", "-smp", str(self.cpus), "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-no-reboot", "-serial", f"file:{self.console}", "-monitor", "none",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", ("console=ttyS0 loglevel=4 panic=-1 oops=panic random.trust_cpu=on "
                        f"mitigations=off qsd.share={self.share}"),
            "-device", "virtio-rng-pci",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=share,path={self.share},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=share,mount_tag=share",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=qsd.ctl",
            *self.boot_args,
        ]
        start = time.monotonic()
        deadline = start + timeout
        log = open(self.dir / "qemu.log", "w")
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      preexec_fn=_die_with_parent)
        log.close()
        try:
            while self._ctl is None or self._qmp is None:
                self._check_running()
                if time.monotonic() > deadline:
                    raise GuestError("QEMU did not open its sockets")
                with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                    if self._ctl is None:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        try:
                            s.connect(str(ctl))
                        except OSError:
                            s.close()
                            raise
                        self._ctl = s
                    if self._qmp is None:
                        self._qmp = _Qmp.connect(qmp, deadline)
                time.sleep(0.02)
            verb, _, kernel = self._read_ctl(deadline).partition(" ")
            if verb != "READY":
                raise GuestError(f"unexpected first message from the guest: {verb} {kernel}")
        except BaseException as e:
            self._break(str(e))
            raise GuestError(self._explain(str(e))) from e
        self.kernel = kernel
        self.boot_seconds = time.monotonic() - start
        return self

    @property
    def alive(self) -> bool:
        return self.broken is None and self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Power the guest off (QMP quit, then SIGKILL) and remove its files."""
        if self._qmp is not None and self.alive:
            with contextlib.suppress(GuestError, OSError):
                self._qmp.command("quit", deadline=time.monotonic() + 10)
        self._kill(grace=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill(self, grace: float) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.send_signal(signal.SIGKILL)
                self._proc.wait()
        for s in (self._ctl, self._qmp):
            if s is not None:
                s.close()
        self._ctl = self._qmp = None

    def _break(self, why: str) -> None:
        self.broken = why
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._kill(grace=10)

    def _check_running(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise GuestError(f"QEMU exited ({self._proc.returncode})")

    def _explain(self, what: str) -> str:
        def tail(p: Path, n: int) -> str:
            try:
                return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
            except OSError:
                return ""
        return (f"{what}\n--- qemu ---\n{tail(self.dir / 'qemu.log', 20)}"
                f"\n--- guest console ---\n{tail(self.console, 40)}")

    def _fail(self, what: str) -> GuestError:
        self._break(what)
        return GuestError(self._explain(what))

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A new directory in the share, removed afterwards."""
        d = Path(tempfile.mkdtemp(dir=self.share, prefix="t-"))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    # -- control channel -------------------------------------------------

    def _read_ctl(self, deadline: float) -> str:
        assert self._ctl is not None
        while b"\n" not in self._ctl_buf:
            self._ctl.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self._ctl.recv(4096)
            except TimeoutError:
                raise GuestError("the guest did not answer in time") from None
            if not data:
                raise GuestError("the guest closed its control port (powered off?)")
            self._ctl_buf += data
        line, _, self._ctl_buf = self._ctl_buf.partition(b"\n")
        return line.decode().strip()

    def start(self, script: str, *, cwd: Path | str = REPO,
              env: dict[str, str] | None = None) -> int:
        """Start ``script`` (bash, after PRELUDE, in ``cwd``) in the guest;
        returns its job number for ``wait``."""
        if not self.alive:
            raise GuestError(f"the guest is not running: {self.broken}")
        n = next(self._jobs)
        lines = [PRELUDE]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
        lines += [f"cd {shlex.quote(str(cwd))} || exit 125", script]
        (self.share / "cmd" / f"{n}.sh").write_text("\n".join(lines) + "\n")
        assert self._ctl is not None
        try:
            self._ctl.sendall(f"RUN {n}\n".encode())
        except OSError as e:
            raise self._fail(f"cannot send to the guest: {e}") from e
        return n

    def wait(self, job: int, timeout: float = 120) -> Result:
        """Wait for job ``job`` to end; its exit status and output.

        Raises:
            GuestError: not ended in ``timeout`` (the guest is then killed,
                since a script stuck on a disk cannot be stopped otherwise),
                or the guest died.
        """
        deadline = time.monotonic() + timeout
        try:
            while job not in self._done:
                verb, n, rc = self._read_ctl(deadline).split()
                if verb == "DONE":
                    self._done[int(n)] = int(rc)
        except GuestError as e:
            out = self.output(job)
            raise self._fail(f"script {job}: {e}\n--- its output so far ---\n{out}") from e
        return Result(self._done.pop(job), self.output(job))

    def output(self, job: int) -> str:
        try:
            return (self.share / "cmd" / f"{job}.out").read_text(errors="replace")
        except OSError:
            return ""

    def run(self, script: str, *, timeout: float = 120, cwd: Path | str = REPO,
            env: dict[str, str] | None = None) -> Result:
        """Run ``script`` in the guest and wait for it (see start, wait)."""
        return self.wait(self.start(script, cwd=cwd, env=env), timeout)

    # -- vhost-user disks ----------------------------------------------

    def qmp(self, name: str, *, timeout: float = 60, **args: object) -> object:
        """A command to QEMU's monitor (GuestError on an error reply)."""
        if self._qmp is None or not self.alive:
            raise GuestError(f"the guest is not running: {self.broken}")
        return self._qmp.command(name, deadline=time.monotonic() + timeout, **args)

    def attach_vhost_user_blk(self, path: Path | str, *, reconnect: int | None = None,
                              num_queues: int = 1,
                              timeout: float = 60) -> VhostUserDisk:
        """Hot-plug a vhost-user-blk-pci device whose back-end listens on
        ``path`` (a ``socket`` chardev, ``reconnect`` seconds as QEMU's
        option) and ``num_queues`` queues (QEMU's default would be one per
        vCPU, more than a back-end may offer). QEMU talks to the back-end
        before device_add returns; the guest's block device appears a moment
        later (workload.find_disk waits for it).

        Raises:
            GuestError: QEMU refused (its message), or did not answer.
        """
        n = next(self._ids)
        disk = VhostUserDisk(f"vu{n}", f"vuchr{n}", next(self._slots))
        sock: dict[str, object] = {"addr": {"type": "unix", "data": {"path": str(path)}},
                                   "server": False}
        if reconnect is not None:
            sock["reconnect"] = reconnect
        self.qmp("chardev-add", timeout=timeout, id=disk.chardev_id,
                 backend={"type": "socket", "data": sock})
        dev: dict[str, object] = {"driver": "vhost-user-blk-pci", "id": disk.device_id,
                                  "chardev": disk.chardev_id, "bus": "pci.0",
                                  "addr": f"0x{disk.slot:x}", "num-queues": num_queues}
        try:
            self.qmp("device_add", timeout=timeout, **dev)
        except GuestError:
            with contextlib.suppress(GuestError):
                self.qmp("chardev-remove", id=disk.chardev_id)
            raise
        return disk

    def detach(self, disk: VhostUserDisk, *, timeout: float = 60) -> None:
        """Unplug ``disk`` (device_del, then the guest ejects it: wait for
        DEVICE_DELETED) and remove its chardev, which closes the back-end's
        connection."""
        assert self._qmp is not None
        deadline = time.monotonic() + timeout
        self.qmp("device_del", timeout=timeout, id=disk.device_id)
        try:
            self._qmp.wait_event("DEVICE_DELETED", deadline, device=disk.device_id)
        except GuestError as e:
            raise self._fail(f"{disk.device_id} not unplugged: {e}") from e
        self.qmp("chardev-remove", timeout=timeout, id=disk.chardev_id)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU when the test process dies,
    however it dies, so no guest outlives its pytest."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_shared: dict[str, Guest] = {}


def shared_guest(config: object) -> Guest:
    """The test session's guest, booted on first use (and again if a test
    broke it); powered off when pytest ends (``config.add_cleanup``)."""
    guest = _shared.get("guest")
    if guest is not None and guest.alive:
        return guest
    if guest is not None:
        guest.close()
    else:
        config.add_cleanup(_close_shared)  # type: ignore[attr-defined]
    guest = _shared["guest"] = Guest()
    try:
        guest.boot()
    except BaseException:
        del _shared["guest"]
        guest.close()
        raise
    return guest


def _close_shared() -> None:
    guest = _shared.pop("guest", None)
    if guest is not None:
        guest.close()

