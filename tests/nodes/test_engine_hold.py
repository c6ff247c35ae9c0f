"""Submissions held by the task that starts them (base.hold_submissions /
submit_held), and inline_wait's wait for completions alone (fd < 0): what
the NBD reader does with a batch of requests.

What is checked, for io_uring and Linux AIO: a request queued while held
is not handed to the kernel and does not wake the engine's flusher (the
first one of an idle engine still goes at once, the QD1 rule); submit_held
enters everything held, on every engine; a waiter with no descriptor
reaps the completions (from the CQ ring without a system call when they
are there already) and says so, and says False with nothing in flight.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from qsd_trio.nodes.engine import Engines, base, buffers, inline_wait

BS = 4096
KERNEL_AIOS = ["io_uring", "native"]
FOREVER = 60.0  # a limit no passing test reaches


def _open_direct(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("the test directory's file system has no O_DIRECT")


def _pending(eng: base.Engine) -> int:
    """Requests queued and not yet handed to the kernel."""
    p = eng._pending  # type: ignore[attr-defined]
    return p if isinstance(p, int) else len(p)


@pytest.mark.parametrize("aio", KERNEL_AIOS)
async def test_held_until_submit_held(tmp_path, monkeypatch, aio):
    monkeypatch.setattr(inline_wait, "MAX_WAIT", FOREVER)
    path = tmp_path / "img"
    data = os.urandom(4 * BS)
    path.write_bytes(data)
    engines = Engines()
    eng = engines.get(aio)
    fd = _open_direct(str(path))
    wait = engines.inline_waiter()
    assert wait is not None
    seen: dict[int, bytes] = {}
    bufs = []

    def reader(i: int, buf: memoryview):
        def done(res: int) -> None:
            assert res == BS
            seen[i] = bytes(buf)
        return done

    with trio.fail_after(30):
        await trio.testing.wait_all_tasks_blocked()  # reaper and flusher park
        base.hold_submissions()
        try:
            for i in range(4):
                buf, addr = buffers.alloc_at(BS)
                bufs.append(buf)
                eng.submit_read(fd, buf, i * BS, reader(i, buf), addr)
            # the first went at once (nothing to batch with); the rest wait
            # for submit_held, and the flusher was not woken
            assert _pending(eng) == 3
            assert eng in base._held
            assert not eng._flush_wanted  # type: ignore[attr-defined]
        finally:
            base.submit_held()
        assert _pending(eng) == 0
        assert not base._held
        while eng.in_flight:
            assert wait(-1) is True  # reaped right here
        assert seen == {i: data[i * BS:(i + 1) * BS] for i in range(4)}
        assert wait(-1) is False  # nothing in flight: nothing to wait for
        await engines.aclose()
    os.close(fd)


async def test_completions_in_the_ring_need_no_select(tmp_path, monkeypatch):
    monkeypatch.setattr(inline_wait, "MAX_WAIT", FOREVER)
    path = tmp_path / "img"
    path.write_bytes(os.urandom(BS))
    engines = Engines()
    eng = engines.get("io_uring")
    fd = _open_direct(str(path))
    got: list[int] = []
    buf, addr = buffers.alloc_at(BS)
    with trio.fail_after(30):
        await trio.testing.wait_all_tasks_blocked()
        eng.submit_read(fd, buf, 0, got.append, addr)
        # no checkpoint: the reaper cannot take it first
        deadline = time.monotonic() + 10
        while not eng.completions_ready():
            assert time.monotonic() < deadline
        calls: list[object] = []
        monkeypatch.setattr(inline_wait, "_select",
                            lambda *a: calls.append(a) or ([], [], []))
        wait = engines.inline_waiter()  # binds the patched select
        assert wait is not None
        assert wait(-1) is True
        assert calls == []
        assert got == [BS]
        assert not eng.completions_ready()
        await engines.aclose()
    os.close(fd)
