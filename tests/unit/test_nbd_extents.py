"""The export's remembered data extents against a brute-force model."""

from hypothesis import given
from hypothesis import strategies as st

from qsd_trio.exports.nbd import NbdExport

ops = st.lists(st.tuples(st.sampled_from(["note", "forget"]), st.integers(0, 200),
                         st.integers(0, 50)), max_size=40)


def blank() -> NbdExport:
    e = NbdExport.__new__(NbdExport)  # only the extent list is exercised
    e._data_starts, e._data_ends = [], []
    return e


@given(ops, st.integers(0, 250), st.integers(1, 60))
def test_known_data_never_claims_more_than_noted(seq, off, ln):
    e = blank()
    known = set()
    for op, o, n in seq:
        if op == "note":
            e.note_data(o, n)
            known |= set(range(o, o + n))
        else:
            e.forget_data(o, n)
            if known & set(range(o, o + n)):
                known.clear()  # the export forgets everything on overlap
    # sorted, disjoint, non-touching
    pairs = list(zip(e._data_starts, e._data_ends, strict=True))
    assert all(s <= t for s, t in pairs)
    assert all(a[1] < b[0] for a, b in zip(pairs, pairs[1:], strict=False))
    if e.known_data(off, ln):
        assert set(range(off, off + ln)) <= known


def test_merge_and_lookup():
    e = blank()
    e.note_data(100, 50)
    e.note_data(300, 50)
    e.note_data(150, 150)  # bridges both
    assert (e._data_starts, e._data_ends) == ([100], [350])
    assert e.known_data(120, 200) and not e.known_data(90, 20)
    e.forget_data(0, 10)  # no overlap: kept
    assert e.known_data(100, 250)
    e.forget_data(340, 20)
    assert not e.known_data(100, 1)
