"""inline_wait.py, in process: a connection's wait for its socket that
reaps I/O completions itself while nothing else in trio can run.

What is checked: the installed trio has what the waiter reads (an upgrade
that moves it fails here, not as a silent slowdown); a readable socket
returns True; a completion is reaped inline (its callback runs, on every
engine) before the socket it made readable returns True; a runnable task,
or anything else trio waits for becoming ready, sends the caller back to
trio at once (the limit is raised so far that waiting it out would time
the test out); with nothing at all, the wait gives up and says so.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from qsd_trio.nodes.engine import Engines, buffers, inline_wait

BS = 4096
AIOS = ["threads", "io_uring", "native"]
FOREVER = 60.0  # a limit no passing test reaches


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def test_supported_by_this_trio():
    assert inline_wait.supported()
    assert Engines().inline_waiter() is not None


async def test_readable_socket(pair):
    a, b = pair
    wait = inline_wait.make_waiter(list)
    assert wait is not None
    b.send(b"x")
    assert wait(a.fileno()) is True
    assert a.recv(1) == b"x"


async def test_nothing_happens(pair):
    a, _ = pair
    wait = inline_wait.make_waiter(list)
    assert wait is not None
    assert wait(a.fileno()) is False  # after MAX_WAIT


@pytest.mark.parametrize("aio", AIOS)
async def test_completion_reaped_inline(pair, tmp_path, monkeypatch, aio):
    monkeypatch.setattr(inline_wait, "MAX_WAIT", FOREVER)
    a, b = pair
    path = tmp_path / "img"
    data = os.urandom(BS)
    path.write_bytes(data)
    engines = Engines()
    eng = engines.get(aio)
    flags = os.O_RDONLY | (os.O_DIRECT if aio == "native" else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        pytest.skip("the test directory's file system has no O_DIRECT")
    wait = engines.inline_waiter()
    assert wait is not None
    seen: list[tuple[int, bytes]] = []

    def done(res: int) -> None:
        seen.append((res, bytes(buf)))
        b.send(b"r")  # the reply the client then answers

    buf, addr = buffers.alloc_at(BS)
    with trio.fail_after(30):
        await trio.testing.wait_all_tasks_blocked()  # the reaper parks first
        eng.submit_read(fd, buf, 0, done, addr)
        assert eng.in_flight == 1
        # the completion arrives while waiting: reaped right here, and the
        # socket its callback made readable ends the wait
        assert wait(a.fileno()) is True
        assert seen == [(BS, data)]
        assert eng.in_flight == 0
        await engines.aclose()
    os.close(fd)


async def test_runnable_task_goes_first(pair, monkeypatch):
    monkeypatch.setattr(inline_wait, "MAX_WAIT", FOREVER)
    a, _ = pair
    wait = inline_wait.make_waiter(list)
    assert wait is not None
    ran = []

    async def task() -> None:
        ran.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)
        assert wait(a.fileno()) is False  # the new task is runnable
        assert ran == []
    assert ran == [1]


async def test_another_ready_descriptor_goes_first(pair, monkeypatch):
    monkeypatch.setattr(inline_wait, "MAX_WAIT", FOREVER)
    a, _ = pair
    c, d = socket.socketpair()
    c.setblocking(False)
    wait = inline_wait.make_waiter(list)
    assert wait is not None
    woke = trio.Event()

    async def other_client() -> None:
        await trio.lowlevel.wait_readable(c)
        woke.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_client)
            await trio.testing.wait_all_tasks_blocked()
            d.send(b"y")  # the other client's request
            assert wait(a.fileno()) is False  # trio's epoll is readable
            await woke.wait()
    c.close()
    d.close()
