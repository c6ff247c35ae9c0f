"""What a job verb emits before its reply, against qemu-storage-daemon.

QEMU's job_enter runs an idle job's coroutine at once, up to its next
wait, so the events of the step a verb causes (paused, running, aborting,
BLOCK_JOB_CANCELLED, concluded, null, ...) reach the client before the
command's reply.  A client that reads events between replies sees exactly
where each one came from; a transition that comes late shows up as an
extra or a missing event at the next command.  The ``qemu.qmp`` client
separates events from replies, so this test reads the socket itself and
keeps the interleaving.

The jobs are rate limited (speed 1): after the first chunk they sleep, so
each verb finds them idle, in both daemons, and the transcript is
deterministic.  Only timestamps differ (dropped).
"""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from tests.helpers import BACKUP_BLOCK_SIZE_WARNING, HAVE_QEMU, qemu_img

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

MiB = 1 << 20
SETTLE = 0.3  # long enough for the first chunk, far shorter than a speed-1 sleep


class RawQMP:
    """QMP over a plain socket, recording events and replies in arrival order."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb", buffering=0)
        self.log: list = []
        self.file.readline()  # greeting
        self.cmd("qmp_capabilities")
        self.log.clear()

    def _read(self):
        msg = json.loads(self.file.readline())
        if "event" in msg:
            data = msg.get("data", {})
            self.log.append(("event", msg["event"], data.get("status", data.get("type"))))
        return msg

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        self.log.append(("cmd", name))
        while True:
            m = self._read()
            if "event" not in m:
                self.log.append(("reply", m.get("error", {}).get("desc", "ok")))
                return m

    def events_for(self, seconds):
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if select.select([self.sock], [], [], left)[0]:
                self._read()

    def close(self):
        self.file.close()
        self.sock.close()


def _transcript(daemon_factory, kind, tmp, scenario) -> list:
    img = tmp / f"src-{kind}.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), str(64 * MiB))
    d = daemon_factory(kind, ["--blockdev", f"driver=file,node-name=src,filename={img}",
                              "--blockdev", f"null-co,node-name=dst,size={64 * MiB}"],
                       allow_stderr=BACKUP_BLOCK_SIZE_WARNING)
    q = RawQMP(d.qmp_path)
    try:
        scenario(q)
        q.events_for(SETTLE)
    finally:
        q.close()
    return q.log


def _compare(daemon_factory, tmp_path, scenario):
    theirs = _transcript(daemon_factory, "qemu", tmp_path, scenario)
    ours = _transcript(daemon_factory, "trio", tmp_path, scenario)
    assert ours == theirs


def test_backup_pause_resume_cancel(daemon_factory, tmp_path):
    """The issue's case: pause, resume, then cancel a running backup.  Each
    verb's transition comes before its reply; nothing is left over for the
    next command (no late 'paused' at resume, no 'running' at cancel)."""
    def s(q):
        q.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full", "speed": 1})
        q.events_for(SETTLE)
        q.cmd("job-pause", {"id": "j"})
        q.cmd("job-resume", {"id": "j"})
        q.events_for(SETTLE)
        q.cmd("job-cancel", {"id": "j"})
    _compare(daemon_factory, tmp_path, s)


def test_backup_block_job_verbs(daemon_factory, tmp_path):
    def s(q):
        q.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "dst",
                                  "sync": "full", "speed": 1, "auto-dismiss": False})
        q.events_for(SETTLE)
        q.cmd("block-job-pause", {"device": "j"})
        q.cmd("block-job-pause", {"device": "j"})
        q.cmd("block-job-cancel", {"device": "j"})
        q.cmd("block-job-resume", {"device": "j"})
        q.events_for(SETTLE)
        q.cmd("block-job-cancel", {"device": "j", "force": True})
        q.cmd("job-dismiss", {"id": "j"})
    _compare(daemon_factory, tmp_path, s)


def test_mirror_ready_verbs(daemon_factory, tmp_path):
    """A READY mirror waits for work: standby and ready come with the
    pause and resume replies, the completion with job-complete's."""
    def s(q):
        q.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "dst",
                                  "sync": "none"})
        q.events_for(SETTLE)
        q.cmd("job-pause", {"id": "m"})
        q.cmd("job-resume", {"id": "m"})
        q.events_for(SETTLE)
        q.cmd("job-complete", {"id": "m"})
    _compare(daemon_factory, tmp_path, s)
