"""How the io_uring engine sets up its ring (nodes/engine/uring.py).

It asks for IORING_SETUP_COOP_TASKRUN: the kernel then posts completions
(task work) at the thread's next system call instead of interrupting it
with an IPI while it runs Python.  What the engine relies on is that a
thread asleep in select() on the ring's descriptor, as trio's loop and the
NBD reader's inline wait are, is still woken by a completion.  A pipe read
completes through the same task work as a file read (io_uring polls the
pipe, and completes the read when a writer fills it), at a moment the
test chooses: after the thread has gone to sleep.
"""

from __future__ import annotations

import os
import select
import threading
import time

import pytest
import trio

from qsd_trio.nodes.engine import buffers

uring = pytest.importorskip("qsd_trio.nodes.engine.uring")


def _engine() -> uring.Uring:
    try:
        return uring.Uring()
    except OSError as e:
        pytest.skip(f"no io_uring here: {e}")


async def test_ring_is_set_up_cooperative():
    engine = _engine()
    try:
        assert engine.setup_flags & uring.SETUP_COOP_TASKRUN
    finally:
        await engine.aclose()


async def test_completion_wakes_a_thread_asleep_on_the_ring():
    engine = _engine()
    r, w = os.pipe()
    got = []
    try:
        buf = buffers.alloc(4096)
        engine.submit_read(r, buf, 0, got.append)
        assert not got
        # the writer fills the pipe once this thread is asleep in select()
        writer = threading.Thread(target=lambda: (time.sleep(0.2), os.write(w, b"hello")))
        writer.start()
        ready = select.select([engine.ring_fd], [], [], 60)[0]
        writer.join()
        assert ready == [engine.ring_fd]  # woken by the completion, not the timeout
        engine.reap_now()
        assert got == [5] and bytes(buf[:5]) == b"hello"
        await trio.lowlevel.checkpoint()
    finally:
        await engine.aclose()
        os.close(r)
        os.close(w)
