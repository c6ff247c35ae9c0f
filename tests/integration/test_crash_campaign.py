"""Crash safety at scale: qsd-trio killed with SIGKILL in the middle of a workload.

For each image type (raw, qcow2, qcow2 with subclusters, encrypted qcow2) and
each workload (random writes; writes, zero writes and discards; writes while
an external snapshot is taken; writes while a mirror job copies the image),
a trial starts the daemon with the image exported over NBD, runs batches of
requests that each end with a flush (one qemu-io process per batch), and
kills the daemon at a random moment.  After every trial ``qemu-img check``
must find no corruption in any image involved (leaks are allowed) and every
batch whose flush was acknowledged must read back, through qemu-io and the
image's whole chain.  Trials on one image follow each other, so each also
starts from the previous crash's leftovers.

``make soak`` runs 25 trials per image type and workload (100 per image
type); the ordinary suite runs 10 per image type.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading

import pytest
from qemu.qmp import ExecInterruptedError

from tests.helpers import Daemon, qemu_img

SIZE = 32 << 20
SLOT = 128 << 10  # a slot is the unit of verification: its last acknowledged write
SECRET = "secret,id=sec0,data=crash-pass"
IMAGE_TYPES = ["raw", "qcow2", "qcow2-subclusters", "qcow2-encrypted"]
# trials per workload in the ordinary suite (10 per image type) and in make soak
WORKLOADS = {"writes": 3, "discards": 3, "snapshot": 2, "mirror": 2}
SOAK_TRIALS = 25


def create(path, image_type: str) -> None:
    if image_type == "raw":
        path.write_bytes(b"")
        path.touch()
        with open(path, "r+b") as f:
            f.truncate(SIZE)
        return
    opts = {"qcow2": "cluster_size=4096",
            "qcow2-subclusters": "cluster_size=65536,extended_l2=on",
            "qcow2-encrypted": "encrypt.format=luks,encrypt.key-secret=sec0,"
                               "encrypt.iter-time=10"}[image_type]
    qemu_img("create", "-q", "--object", SECRET, "-f", "qcow2", "-o", opts, str(path),
             str(SIZE))


def chain_options(layers: list, image_type: str) -> dict:
    """Block options opening ``layers`` (base first) as one chain."""
    base = {"driver": "raw" if image_type == "raw" else "qcow2",
            "file": {"driver": "file", "filename": str(layers[0])}}
    if image_type == "qcow2-encrypted":
        base["encrypt"] = {"format": "luks", "key-secret": "sec0"}
    opts = base
    for p in layers[1:]:
        opts = {"driver": "qcow2", "file": {"driver": "file", "filename": str(p)},
                "backing": opts}
    return opts


def json_name(opts: dict) -> str:
    return "json:" + json.dumps(opts)


class Model:
    """What must read back: per slot, the last write acknowledged by a flush."""

    def __init__(self) -> None:
        self.expected: dict[int, tuple[int, int, int]] = {}

    def batch(self, rnd: random.Random, workload: str) -> tuple[list[str], list]:
        cmds, effects = [], []
        for s in rnd.sample(range(SIZE // SLOT), 4):
            off = s * SLOT + rnd.randrange(0, SLOT // 2) // 512 * 512
            n = rnd.randrange(1, SLOT // 2 // 512) * 512
            kind = rnd.choice(["write", "write", "zero", "discard"]) \
                if workload == "discards" else "write"
            if kind == "write":
                p = rnd.randrange(1, 255)
                cmds += ["-c", f"write -P {p} {off} {n}"]
                effects.append((s, (off, n, p)))
            elif kind == "zero":
                cmds += ["-c", f"write -z -u {off} {n}"]
                effects.append((s, (off, n, 0)))
            else:
                # discarded data may read as anything: nothing to expect there
                cmds += ["-c", f"discard {off} {n}"]
                effects.append((s, None))
        return cmds + ["-c", "flush"], effects

    def acknowledged(self, effects: list, ok: bool) -> None:
        for s, what in effects:
            if ok and what is not None:
                self.expected[s] = what
            else:
                self.expected.pop(s, None)  # the old data or the new is fine

    def verify(self, name: str) -> None:
        cmds = [f"read -P {p} {off} {n}" for off, n, p in self.expected.values()]
        for i in range(0, len(cmds), 40):
            args = []
            for c in cmds[i:i + 40]:
                args += ["-c", c]
            r = subprocess.run(["qemu-io", "--object", SECRET, "-r", *args, name],
                               capture_output=True, text=True, timeout=120)
            out = r.stdout + r.stderr
            assert r.returncode == 0 and "Pattern verification failed" not in out \
                and "failed" not in out, out


def check(name: str) -> None:
    r = qemu_img("check", "--object", SECRET, "--output=json", name, check=False)
    try:
        info = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(r.stdout + r.stderr) from None
    assert info.get("corruptions", 0) == 0, r.stdout + r.stderr
    assert info.get("check-errors", 0) == 0, r.stdout + r.stderr


def trial(tmp_path, rnd: random.Random, n: int, image_type: str, workload: str,
          layers: list, model: Model) -> None:
    sock = tmp_path / f"nbd{n}.sock"
    top_opts = {**chain_options(layers, image_type), "node-name": "q"}
    d = Daemon("trio", tmp_path, [
        "--object", SECRET,
        "--blockdev", json.dumps(top_opts),
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=q,writable=on"])
    d.start()
    qmp = d.qmp()
    timer = threading.Timer(rnd.uniform(0.2, 1.2), d.proc.send_signal, [signal.SIGKILL])
    timer.start()
    uri = f"nbd+unix:///q?socket={sock}"
    extra = []  # images the trial made besides the chain (a mirror target)
    batches = 0
    try:
        while d.proc.poll() is None:
            if batches == 1 and workload == "snapshot":
                overlay = tmp_path / f"snap{n}.qcow2"
                r = qmp.cmd_raw("blockdev-snapshot-sync", {
                    "node-name": "q", "snapshot-file": str(overlay), "format": "qcow2",
                    "snapshot-node-name": f"s{n}"})
                if r == {"return": {}}:
                    layers.append(overlay)  # acknowledged: the chain has a new top
            if batches == 1 and workload == "mirror":
                target = tmp_path / f"mirror{n}.qcow2"
                r = qmp.cmd_raw("drive-mirror", {"job-id": "m", "device": "q",
                                                 "target": str(target), "format": "qcow2",
                                                 "sync": "full"})
                if r == {"return": {}}:
                    extra.append(target)
            cmds, effects = model.batch(rnd, workload)
            r = subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], capture_output=True,
                               text=True, timeout=60)
            model.acknowledged(effects, r.returncode == 0
                               and "failed" not in r.stdout + r.stderr)
            batches += 1
    except (OSError, EOFError, ConnectionError, ExecInterruptedError):
        # the monitor went with the daemon (ExecInterruptedError: killed
        # while a command, such as drive-mirror, waited for its reply)
        pass
    finally:
        timer.cancel()
        d.proc.kill()
        d.proc.wait()
        d.stop(check=False)
    for i in range(1, len(layers) + 1):
        if i > 1 or image_type != "raw":  # qemu-img checks no raw image
            check(json_name(chain_options(layers[:i], image_type)))
    for target in extra:
        if target.exists() and target.stat().st_size:
            check(str(target))
    model.verify(json_name(chain_options(layers, image_type)))


def campaign(tmp_path, image_type: str, workload: str, trials: int, seed: int) -> None:
    rnd = random.Random(seed)
    base = tmp_path / f"base.{image_type}"
    create(base, image_type)
    layers = [base]
    model = Model()
    for n in range(trials):
        trial(tmp_path, rnd, n, image_type, workload, layers, model)


CASES = [(i, w) for i in IMAGE_TYPES for w in WORKLOADS]


@pytest.mark.parametrize("image_type,workload", CASES)
def test_sigkill(tmp_path, image_type, workload):
    # a new seed each run, so that CI runs cover more schedules; a failure
    # names it, and QSD_CRASH_SEED=<seed> replays that run
    seed = int(os.environ.get("QSD_CRASH_SEED", random.randrange(1 << 32)))
    try:
        campaign(tmp_path, image_type, workload, WORKLOADS[workload], seed=seed)
    except BaseException as e:
        e.add_note(f"replay: QSD_CRASH_SEED={seed}")
        raise


@pytest.mark.soak
@pytest.mark.parametrize("image_type,workload", CASES)
def test_sigkill_soak(tmp_path, image_type, workload):
    campaign(tmp_path, image_type, workload, SOAK_TRIALS, seed=1234)
