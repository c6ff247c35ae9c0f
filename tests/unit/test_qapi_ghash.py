"""The GLib/QDict hash-order replay that picks QEMU's 'unexpected' key.
(Checked against the real daemon in test_qapi_differential.py.)"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qsd_trio.qapi.ghash import first_unexpected, qdict_order


def test_known_answers():
    # from qemu-storage-daemon 7.2: blockdev-add {driver, filename, x, y}
    assert first_unexpected(["driver", "filename", "x", "y"], ["driver", "filename"]) == "y"
    assert first_unexpected(["x"], []) == "x"
    assert first_unexpected(["a", "b"], ["a", "b"]) is None


@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=60), st.data())
def test_reports_a_remaining_key(keys, data):
    consumed = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
    got = first_unexpected(keys, consumed)
    left = set(keys) - set(consumed)
    assert (got in left) if left else got is None
    assert sorted(qdict_order(keys)) == sorted(keys)
