"""The threads engine runs the buffered writes to one descriptor one after
another, on one worker at a time (ThreadPool._put_write): the kernel
serialises them on the inode's lock anyway, and workers waiting there
only spin and take the GIL in turn.

Checked: many writes submitted at once to one file and to a second file
all land and report their byte counts; each file's writes complete in the
order they were submitted, and the pool needs one worker per file for
them; writes to a descriptor the file driver opened with O_DIRECT (which
the kernel runs in parallel) still go to any worker.
"""

from __future__ import annotations

import os
import threading

from qsd_trio.nodes.engine import Engines, buffers
from tests.engines import settled

CHUNK = 64 << 10
N = 32


def _workers() -> int:
    return sum(t.name == "qsd-io" for t in threading.enumerate())


async def test_writes_to_one_descriptor_run_in_turn(tmp_path):
    engines = Engines()
    eng = engines.threads
    paths = [tmp_path / "a", tmp_path / "b"]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in paths]
    models = [bytearray(N * CHUNK), bytearray(N * CHUNK)]
    done: list[list[tuple[int, int]]] = [[], []]
    before = _workers()
    try:
        for i in range(N):
            for f in (0, 1):
                data = os.urandom(CHUNK)
                # backwards through the file: the order is the submission's
                offset = (N - 1 - i) * CHUNK
                models[f][offset:offset + CHUNK] = data
                buf = buffers.alloc(CHUNK)
                buf[:] = data
                eng.submit_write(fds[f], buf, offset,
                                 lambda res, f=f, i=i: done[f].append((i, res)))
        await settled(eng)
        # one lane per file, each drained by one worker
        assert _workers() - before == 2
    finally:
        for fd in fds:
            os.close(fd)
    for f in (0, 1):
        assert done[f] == [(i, CHUNK) for i in range(N)]
        assert paths[f].read_bytes() == models[f]

    # O_DIRECT (as the file driver reports it): no lane, a worker per request
    path = tmp_path / "direct"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    eng.run_here.direct_fd(fd, True)
    results: list[int] = []
    try:
        for i in range(8):
            buf = buffers.alloc(CHUNK)
            buf[:] = bytes([i]) * CHUNK
            eng.submit_write(fd, buf, i * CHUNK, results.append)
        await settled(eng)
        assert _workers() - before > 2
    finally:
        eng.run_here.direct_fd(fd, False)
        os.close(fd)
        await engines.aclose()
    assert results == [CHUNK] * 8
    assert path.read_bytes() == b"".join(bytes([i]) * CHUNK for i in range(8))
