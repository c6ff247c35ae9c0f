"""vduse-blk exports, inside a guest whose kernel has VDUSE.

The host has no /dev/vduse, so the daemon runs inside the QEMU guest of
tests/guest (Debian's 6.12 kernel with vduse, vdpa and virtio_vdpa loaded;
the host's / as its root, so it is the host's own qemu-storage-daemon or
qsd-trio with the venv's Python). The test's script there creates the
image on the guest's tmpfs, starts the daemon with
``--export type=vduse-blk``, attaches the device with
``vdpa dev add name <name> mgmtdev vduse``, runs the workload of
tests/guest/workload.py on the virtio-blk disk that appears under
``/sys/bus/vdpa/devices/<name>/``, detaches it, stops the daemon (SIGTERM)
and copies the image to the share; the host then compares what the guest
read back and the image with the model, and runs ``qemu-img check``.

Python is about 20 times slower under TCG than on the host, so the bounds
for qsd-trio are wide. ``test_vduse_io`` runs in ``make test``; the others
are marked ``guest`` (``make guest``).
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys
from pathlib import Path

import pytest

from tests.guest.daemons import daemon_params, require_export
from tests.guest.machine import Guest, shared_guest
from tests.guest.workload import (
    MiB,
    Workload,
    assert_same,
    config_script,
    find_disk,
    image_bytes,
    qemu_img_check,
    read_config,
)
from tests.helpers import QSD_QEMU

# qsd-trio in the guest: warnings are errors as everywhere (-W error, which
# covers ResourceWarning too), but without -X dev, whose debug allocator
# doubles the daemon's start under TCG (54 s against 23 s to its pidfile
# here, see docs/guest-tests.md)
QSD_TRIO_GUEST = [sys.executable, "-W", "error", "-m", "qsd_trio"]

pytestmark = pytest.mark.timeout(400)

SIZE = 16 * MiB
_names = itertools.count()


def vduse_script(daemon: str, work: Path, fmt: str, size: int, export_opts: str,
                 body: str) -> tuple[str, str]:
    """Bash for the guest: image, daemon, vdpa device, ``body`` (which finds
    $DEV itself), teardown, the image copied to ``work``. Returns the
    script and the device's name. Every wait is bounded; on any exit the
    trap removes the vdpa device and stops the daemon, so a failing test
    leaves the guest usable."""
    name = f"vduse{next(_names)}"
    argv = QSD_TRIO_GUEST if daemon == "qsd-trio" else QSD_QEMU
    cmd = " ".join(shlex.quote(a) for a in argv)
    img = f"/run/{name}/disk.{fmt}"
    script = f"""
W={shlex.quote(str(work))}
mkdir -p /run/{name}
qemu-img create -q -f {fmt} {img} {size} || exit 80
{cmd} --blockdev driver=file,node-name=file0,filename={img},discard=unmap \\
  --blockdev driver={fmt},node-name=disk0,file=file0,discard=unmap \\
  --export type=vduse-blk,id=vd0,node-name=disk0,name={name},{export_opts} \\
  --pidfile /run/{name}/pid 2> $W/stderr &
qsd=$!
# exited: no such process, or a zombie until the wait below
gone() {{ local s; read -r _ _ s _ 2>/dev/null < /proc/$1/stat || return 0; [ "$s" = Z ]; }}
stop_daemon() {{
  kill $qsd 2>/dev/null
  wait_for 120 gone $qsd || {{ echo "the daemon ignored SIGTERM"; return 1; }}
  wait $qsd; echo $? > $W/status
}}
trap 'vdpa dev del {name} 2>/dev/null; stop_daemon' EXIT
# the pidfile is written once every export is set up (the man page's contract)
up() {{ test -s /run/{name}/pid || gone $qsd; }}
wait_for 180 up && ! gone $qsd || {{ echo "the daemon did not start"; cat $W/stderr; exit 81; }}
test -c /dev/vduse/{name} || {{ echo "no /dev/vduse/{name}"; exit 81; }}
vdpa dev add name {name} mgmtdev vduse || exit 82
{find_disk(f"/sys/bus/vdpa/devices/{name}/virtio*/block/*")}
{body}
vdpa dev del {name} || exit 83
trap - EXIT
stop_daemon || exit 84
cp {img} $W/disk.{fmt} || exit 85
"""
    return script, name


def run_in_guest(guest: Guest, daemon: str, work: Path, script: str) -> str:
    """Run the script; the daemon's stderr, which for qsd-trio must be
    empty unless the test asked for output there (SIGUSR1)."""
    r = guest.run(script, timeout=360)
    stderr = (work / "stderr").read_text() if (work / "stderr").exists() else ""
    assert r.rc == 0, f"guest script failed ({r.rc}):\n{r.output}\ndaemon stderr:\n{stderr}"
    assert (work / "status").read_text().strip() == "0", f"daemon exit status, stderr: {stderr}"
    if daemon == "qsd-trio" and "kill -USR1" not in script:
        assert stderr == ""  # as tests.helpers.Daemon: qsd-trio prints nothing there
    return stderr


@pytest.mark.parametrize("daemon", daemon_params("vduse-blk"))
def test_vduse_io(daemon, pytestconfig, record_property):
    """A qcow2 image over vduse-blk: the guest's I/O, read back, and the
    image afterwards, all equal the model; qemu-img check finds nothing."""
    require_export(daemon, "vduse-blk")
    guest = shared_guest(pytestconfig)
    with guest.scratch() as work:
        w = Workload(work, SIZE, seed=3).standard()
        script, _ = vduse_script(daemon, work, "qcow2", SIZE, "writable=on", w.script())
        run_in_guest(guest, daemon, work, script)
        config = w.check()
        print(f"{daemon} vduse-blk as the guest sees it:", json.dumps(config, indent=1))
        record_property("guest_config", json.dumps(config))
        assert config["size"] == str(SIZE // 512)
        assert config["queue/logical_block_size"] == "512"
        assert config["ro"] == "0"
        assert config["cache_type after the toggle"] == "write back"
        assert int(config["queue/discard_max_hw_bytes"]) > 0
        assert int(config["queue/write_zeroes_max_bytes"]) > 0
        qemu_img_check(work / "disk.qcow2", "qcow2")
        assert_same(image_bytes(work / "disk.qcow2", "qcow2"), w.model, "the image")


@pytest.mark.guest
@pytest.mark.parametrize("daemon", daemon_params("vduse-blk"))
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_vduse_options(daemon, fmt, pytestconfig, record_property):
    """logical-block-size, num-queues, queue-size and serial reach the
    guest; the I/O, spread over both queues, equals the model."""
    require_export(daemon, "vduse-blk")
    guest = shared_guest(pytestconfig)
    size = 13 * MiB
    opts = "writable=on,logical-block-size=4096,num-queues=2,queue-size=128,serial=qsd-guest-1"
    with guest.scratch() as work:
        w = Workload(work, size, lbs=4096, seed=5, cpus=2).standard()
        script, _ = vduse_script(daemon, work, fmt, size, opts, w.script())
        run_in_guest(guest, daemon, work, script)
        config = w.check()
        record_property("guest_config", json.dumps(config))
        assert config["size"] == str(size // 512)
        assert config["queue/logical_block_size"] == "4096"
        assert config["queues"] == "2"
        assert config["serial"] == "qsd-guest-1"
        if fmt == "qcow2":
            qemu_img_check(work / "disk.qcow2", fmt)
        assert_same(image_bytes(work / f"disk.{fmt}", fmt), w.model, "the image")


@pytest.mark.guest
@pytest.mark.parametrize("daemon", daemon_params("vduse-blk"))
def test_vduse_readonly(daemon, pytestconfig):
    """writable=off: the guest sees a read-only disk and a write fails."""
    require_export(daemon, "vduse-blk")
    guest = shared_guest(pytestconfig)
    with guest.scratch() as work:
        body = config_script(work / "config") + """
dd if=/dev/zero of=$DEV bs=4k count=1 oflag=direct status=none && exit 95
dd if=$DEV of=/dev/null bs=1M iflag=direct status=none || exit 94
"""
        script, _ = vduse_script(daemon, work, "raw", SIZE, "writable=off", body)
        run_in_guest(guest, daemon, work, script)
        assert read_config(work / "config")["ro"] == "1"
        assert image_bytes(work / "disk.raw", "raw") == bytes(SIZE)


@pytest.mark.guest
@pytest.mark.parametrize("daemon", [p for p in daemon_params("vduse-blk")
                                    if p.values[0] == "qsd-trio"])
def test_vduse_device_in_the_task_tree(daemon, pytestconfig):
    """The VDUSE device is the export's client-connection in the task tree
    (SIGUSR1's dump), with the bytes its requests moved and a task per
    started virtqueue under it, as an NBD client is shown."""
    require_export(daemon, "vduse-blk")
    guest = shared_guest(pytestconfig)
    with guest.scratch() as work:
        body = """
dd if=$DEV of=/dev/null bs=64k count=4 iflag=direct status=none || exit 94
kill -USR1 $qsd
dumped() { grep -q "virtqueue 1" $W/stderr; }
wait_for 120 dumped || exit 93
"""
        script, name = vduse_script(daemon, work, "raw", SIZE, "writable=on,num-queues=2", body)
        stderr = run_in_guest(guest, daemon, work, script)
    lines = stderr.splitlines()
    [conn] = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("client-connection")]
    assert (f"client-connection 'vduse-blk client of vd0' export-id=vd0 "
            f"client=/dev/vduse/{name} node-names=disk0 running in-flight=0 ") in lines[conn]
    moved = int(lines[conn].split(" bytes=")[1].split()[0])
    assert moved >= 4 * 65536  # the reads above, and what the kernel read at attach
    depth = len(lines[conn]) - len(lines[conn].lstrip())
    export = max(i for i in range(conn) if lines[i].lstrip().startswith("export 'vduse-blk"))
    assert len(lines[export]) - len(lines[export].lstrip()) < depth
    under = []
    for ln in lines[conn + 1:]:
        if len(ln) - len(ln.lstrip()) <= depth:
            break
        under.append(ln.strip())
    assert [ln.split("'")[1] for ln in under if ln.startswith("task 'virtqueue")] == \
        ["virtqueue 0", "virtqueue 1"]


@pytest.mark.guest
@pytest.mark.parametrize("daemon", [p for p in daemon_params("vduse-blk")
                                    if p.values[0] == "qsd-trio"])
def test_vduse_config_same_as_qemu(daemon, pytestconfig):
    """The differential: qsd-trio's vduse-blk disk looks the same to the
    guest's driver as qemu-storage-daemon's (config space and features)."""
    require_export(daemon, "vduse-blk")
    guest = shared_guest(pytestconfig)
    for opts in ["writable=on", "writable=on,logical-block-size=4096,num-queues=2,serial=s1",
                 "writable=off"]:
        seen = {}
        for kind in ("qemu-storage-daemon", daemon):
            with guest.scratch() as work:
                body = config_script(work / "config")
                script, _ = vduse_script(kind, work, "raw", SIZE, opts, body)
                run_in_guest(guest, kind, work, script)
                seen[kind] = read_config(work / "config")
        assert seen[daemon] == seen["qemu-storage-daemon"], opts


def _argv(daemon: str) -> str:
    return " ".join(shlex.quote(a) for a in (QSD_TRIO_GUEST if daemon == "qsd-trio" else QSD_QEMU))


@pytest.mark.guest
@pytest.mark.parametrize(("first", "second"), [
    ("qsd-trio", "qsd-trio"),
    ("qemu-storage-daemon", "qsd-trio"),
    ("qsd-trio", "qemu-storage-daemon"),
    ("qemu-storage-daemon", "qemu-storage-daemon"),
])
def test_vduse_reconnect(first, second, pytestconfig):
    """A daemon SIGKILLed with a write in flight (a throttle holds it) and
    another started on the same device: the device stays on the vDPA bus,
    the second daemon takes it over and the reconnect log QEMU 7.2 keeps in
    $TMPDIR/vduse-blk-NAME (libvduse's inflight regions), runs again the
    write the first one took and never answered, and the guest's writes all
    land. Either daemon reads the other's log."""
    for daemon in (first, second):
        require_export(daemon, "vduse-blk")
    guest = shared_guest(pytestconfig)
    name = f"vduse{next(_names)}"
    run = f"/run/{name}"
    with guest.scratch() as work:
        script = f"""
W={shlex.quote(str(work))}
mkdir -p {run}; img={run}/disk.raw; log=/tmp/vduse-blk-{name}
rm -f $log
qemu-img create -q -f raw $img 16M || exit 80
dd if=/dev/urandom of={run}/data bs=64k count=16 status=none
gone() {{ local s; read -r _ _ s _ 2>/dev/null < /proc/$1/stat || return 0; [ "$s" = Z ]; }}
# start DAEMON... with $n (1 or 2), $node (what the export serves), $extra
start() {{
  rm -f {run}/pid
  "$@" --blockdev driver=file,node-name=file0,filename=$img $extra \\
    --export type=vduse-blk,id=vd0,node-name=$node,name={name},writable=on \\
    --pidfile {run}/pid 2>> $W/stderr-$n &
  qsd=$!
  up() {{ test -s {run}/pid || gone $qsd; }}
  wait_for 180 up && ! gone $qsd || {{ echo "daemon $n did not start"; cat $W/stderr-$n; exit 81; }}
}}
n=1 node=t0 extra="--object throttle-group,id=tg0,x-bps-write=16384 \\
  --blockdev throttle,node-name=t0,throttle-group=tg0,file=file0" start {_argv(first)}
trap 'vdpa dev del {name} 2>/dev/null; kill $qsd 2>/dev/null' EXIT
vdpa dev add name {name} mgmtdev vduse || exit 82
{find_disk(f"/sys/bus/vdpa/devices/{name}/virtio*/block/*")}
( dd if={run}/data of=$DEV bs=64k count=16 oflag=direct status=none; echo $? > $W/dd ) &
# a write the first daemon took and the throttle holds: marked in the log
held() {{ od -A n -t u1 -w16 -j16 -v $log | awk '$1 == 1 {{ f = 1 }} END {{ exit !f }}'; }}
wait_for 120 held || {{ echo "no write in flight"; exit 86; }}
kill -9 $qsd; wait $qsd 2>/dev/null
cp $log $W/log-at-kill
test -c /dev/vduse/{name} || {{ echo "the device went with the daemon"; exit 87; }}
n=2 node=file0 extra= start {_argv(second)}
wait_for 300 test -s $W/dd || {{ echo "the writes did not finish"; exit 88; }}
cmp -n $((16 * 65536)) {run}/data $DEV || exit 89
vdpa dev del {name} || exit 83
trap - EXIT
kill $qsd; wait_for 120 gone $qsd || exit 84
wait $qsd; echo $? > $W/status
test -e $log && echo "log left behind" && exit 90
cp {run}/data $W/data; cp $img $W/disk.raw
"""
        r = guest.run(script, timeout=600)
        assert r.rc == 0, (f"guest script failed ({r.rc}):\n{r.output}\n"
                           + "".join(f"daemon {i} stderr:\n{p.read_text()}\n"
                                     for i, p in ((1, work / "stderr-1"), (2, work / "stderr-2"))
                                     if p.exists()))
        assert (work / "dd").read_text().strip() == "0"
        assert (work / "status").read_text().strip() == "0"
        # one write held in the log: its descriptor marked in flight
        log = (work / "log-at-kill").read_bytes()
        assert len(log) == 16448  # one queue: 16 + 16 * 1024 bytes, 64-aligned
        flags = [log[16 + 16 * i] for i in range(1024)]
        assert sum(flags) == 1
        data = (work / "data").read_bytes()
        assert (work / "disk.raw").read_bytes()[:len(data)] == data
        for i, daemon in ((1, first), (2, second)):
            stderr = work / f"stderr-{i}"
            if daemon == "qsd-trio" and stderr.exists():
                assert stderr.read_text() == ""
