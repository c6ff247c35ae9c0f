"""The jobs' bitmaps (block_copy.CountedBitmap, the mirror's) keep their
count as bits change: always what counting the whole bitmap says."""

from __future__ import annotations

import random

from qsd_trio.jobs.mirror import _WatchedBitmap
from qsd_trio.nodes.bitmaps import DirtyBitmap


def test_count_follows_every_change():
    rnd = random.Random(1)
    size = 10_000_000 + 1234
    kept, plain = _WatchedBitmap(None, size, 4096), DirtyBitmap(None, size, 4096)
    seen: list = []
    kept.on_dirty = lambda off, n: seen.append((off, n))
    assert kept.count() == 0
    for i in range(5000):
        off, n = rnd.randrange(size), rnd.randrange(1, 300_000)
        for bm in (kept, plain):
            (bm.set_dirty if i % 2 else bm.reset_dirty)(off, n)
        if i == 2500:
            size *= 2
            kept.resize(size)
            plain.resize(size)
        if i % 101 == 0:
            assert kept.count() == plain.count()
    assert kept.bits == plain.bits and kept.count() == plain.count()
    kept.clear()
    assert kept.count() == 0
    kept.merge_from(plain)
    assert kept.count() == plain.count()
    assert len(seen) == 2500  # every set_dirty told the job
