"""The NBD transmission phase's per-request shortcuts (exports/nbd/protocol.py),
against the general code they stand in for: the one-pack OFFSET_DATA
header, and the request slots a connection counts its requests in flight
with.  The requests themselves are covered end to end, against
qemu-storage-daemon, by tests/differential/test_nbd_fast_path.py.
"""

from __future__ import annotations

import trio
import trio.testing

from qsd_trio.exports.nbd import protocol
from qsd_trio.proto import nbd as P


def test_offset_data_header_is_the_codecs():
    for handle, offset, length in [(0, 0, 0), (1, 4096, 4096), ((1 << 64) - 1, (1 << 63) + 512,
                                                                  (1 << 32) - 9)]:
        for extended in (False, True):
            assert protocol._offset_data_header(handle, offset, length, extended) == \
                P.chunk_offset_data_header(handle, offset, length, True,
                                           offset if extended else None)


async def test_slots_count_and_wait():
    slots = protocol._Slots(2)
    await slots.acquire()
    await slots.acquire()
    assert slots.value == 0
    got = []

    async def taker(i):
        await slots.acquire()
        got.append(i)

    async with trio.open_nursery() as n:
        n.start_soon(taker, 1)
        n.start_soon(taker, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []          # none free: both wait
        slots.release()
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 1      # one freed, one taken
        slots.release(3)          # a batch of replies sent
    assert sorted(got) == [1, 2]
    assert slots.value == 2


async def test_slots_acquire_is_a_checkpoint():
    slots = protocol._Slots(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await slots.acquire()     # cancelled even though one is free
    assert scope.cancelled_caught
    assert slots.value == 1       # and nothing was taken
