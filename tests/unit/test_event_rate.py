"""The event bus's rate limit (QEMU's monitor_qapi_event_conf): QUORUM_FAILURE
and QUORUM_REPORT_BAD (per node) at most once a second, the last one held
back sent when the second is up.  Driven by trio's autojump clock, so the
seconds pass without waiting."""

from __future__ import annotations

import trio

from qsd_trio import events


def _recorder():
    seen: list[tuple[float, str, dict | None]] = []
    unsubscribe = events.subscribe(
        lambda ev: seen.append((trio.current_time(), ev.name, ev.data)))
    return seen, unsubscribe


def _bad(node: str, sector: int) -> dict:
    return {"type": "read", "node-name": node, "sector-num": sector, "sectors-count": 1}


async def test_first_goes_at_once_last_held_back_goes_after_a_second(autojump_clock):
    seen, unsubscribe = _recorder()
    try:
        t0 = trio.current_time()
        events.emit("QUORUM_REPORT_BAD", _bad("a", 1))
        assert [s[2]["sector-num"] for s in seen] == [1]
        await trio.sleep(0.3)
        events.emit("QUORUM_REPORT_BAD", _bad("a", 2))
        await trio.sleep(0.3)
        events.emit("QUORUM_REPORT_BAD", _bad("a", 3))  # replaces sector 2
        assert len(seen) == 1
        await trio.sleep(0.5)  # the second is up: the last held back goes
        assert [s[2]["sector-num"] for s in seen] == [1, 3]
        assert seen[1][0] - t0 == 1.0
        # that started another second: one more is held back for its end
        events.emit("QUORUM_REPORT_BAD", _bad("a", 4))
        await trio.sleep(1.1)
        assert [s[2]["sector-num"] for s in seen] == [1, 3, 4]
        assert seen[2][0] - t0 == 2.0
        # a second with nothing held back closes the window: the next goes at once
        await trio.sleep(1.5)
        events.emit("QUORUM_REPORT_BAD", _bad("a", 5))
        assert [s[2]["sector-num"] for s in seen] == [1, 3, 4, 5]
    finally:
        unsubscribe()


async def test_report_bad_is_limited_per_node_failure_per_name(autojump_clock):
    seen, unsubscribe = _recorder()
    try:
        events.emit("QUORUM_REPORT_BAD", _bad("a", 1))
        events.emit("QUORUM_REPORT_BAD", _bad("b", 1))  # another node: not held
        events.emit("QUORUM_FAILURE", {"reference": "q", "sector-num": 0, "sectors-count": 1})
        events.emit("QUORUM_FAILURE", {"reference": "r", "sector-num": 0, "sectors-count": 1})
        assert [(s[1], (s[2] or {}).get("node-name", (s[2] or {}).get("reference")))
                for s in seen] == [("QUORUM_REPORT_BAD", "a"), ("QUORUM_REPORT_BAD", "b"),
                                   ("QUORUM_FAILURE", "q")]
        await trio.sleep(1.01)
        assert seen[-1][1:] == ("QUORUM_FAILURE", {"reference": "r", "sector-num": 0,
                                                   "sectors-count": 1})
    finally:
        unsubscribe()


async def test_other_events_are_not_limited(autojump_clock):
    seen, unsubscribe = _recorder()
    try:
        for i in range(3):
            events.emit("BLOCK_WRITE_THRESHOLD", {"node-name": "n", "amount-exceeded": i,
                                                  "write-threshold": 1})
        assert len(seen) == 3
    finally:
        unsubscribe()
