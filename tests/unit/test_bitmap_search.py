"""DirtyBitmap's searches (next_dirty / next_clean / next_dirty_area /
dirty_extents / count) against a naive per-granule model."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from qsd_trio.nodes.bitmaps import DirtyBitmap

GRAN = 512


@st.composite
def bitmaps(draw):
    size = draw(st.integers(1, 300 * GRAN))
    bm = DirtyBitmap("b", size, GRAN)
    model = [False] * ((size + GRAN - 1) // GRAN)
    # whole runs (to hit long 0x00 / 0xff stretches) and single granules
    for _ in range(draw(st.integers(0, 8))):
        off = draw(st.integers(0, size - 1))
        ln = draw(st.integers(1, size))
        dirty = draw(st.booleans())
        (bm.set_dirty if dirty else bm.reset_dirty)(off, ln)
        for g in range(off // GRAN, (min(off + ln, size) - 1) // GRAN + 1):
            model[g] = dirty
    return bm, model


def window(data, size):
    offset = data.draw(st.integers(0, size + GRAN))
    length = data.draw(st.none() | st.integers(0, size + GRAN))
    end = size if length is None else min(size, offset + length)
    return offset, length, end


@settings(max_examples=300, deadline=None)
@given(bitmaps(), st.data())
def test_next_dirty_and_clean(bm_model, data):
    bm, model = bm_model
    offset, length, end = window(data, bm.size)
    # the model checks granule by granule but each answer is a granule start or offset
    for value, fn in ((True, bm.next_dirty), (False, bm.next_clean)):
        want = None
        g = offset
        while g < end:
            if model[g // GRAN] == value:
                want = g
                break
            g = (g // GRAN + 1) * GRAN
        assert fn(offset, length) == want


@settings(max_examples=300, deadline=None)
@given(bitmaps(), st.data())
def test_next_dirty_area(bm_model, data):
    bm, model = bm_model
    offset, length, end = window(data, bm.size)
    max_len = data.draw(st.none() | st.integers(1, bm.size + GRAN))
    area = bm.next_dirty_area(offset, length, max_len)
    start = bm.next_dirty(offset, length)
    if start is None:
        assert area is None
        return
    stop = end if max_len is None else min(end, start + max_len)
    g = start
    while g < stop and model[g // GRAN]:
        g = (g // GRAN + 1) * GRAN
    assert area == (start, min(g, stop) - start)


@settings(max_examples=300, deadline=None)
@given(bitmaps(), st.data())
def test_dirty_extents_and_count(bm_model, data):
    bm, model = bm_model
    offset, length, end = window(data, bm.size)
    runs = list(bm.dirty_extents(offset, length))
    # contiguous, alternating, cover the window, each run uniform in the model
    pos = offset
    for i, (off, n, dirty) in enumerate(runs):
        assert off == pos and n > 0
        if i:
            assert dirty != runs[i - 1][2]
        assert all(model[g] == dirty for g in range(off // GRAN, (off + n - 1) // GRAN + 1))
        pos += n
    assert pos == max(end, offset) if runs else offset >= end
    assert bm.count() == sum(model) * GRAN  # the last granule whole, as hbitmap_count


def test_sha256_layout_unchanged():
    # bits little-endian in 64-bit words, as QEMU's last HBitmap level
    bm = DirtyBitmap("b", 100 * GRAN, GRAN)
    bm.set_dirty(0, GRAN)
    bm.set_dirty(65 * GRAN, 2 * GRAN)
    words = (1).to_bytes(8, "little") + (0b11 << 1).to_bytes(8, "little")
    assert bm.sha256() == hashlib.sha256(words).hexdigest()
    assert bm.next_dirty(GRAN) == 65 * GRAN
    assert bm.next_dirty_area(GRAN) == (65 * GRAN, 2 * GRAN)
