"""Throttle groups: shared I/O limits, metered by leaky buckets.

A :class:`ThrottleGroup` holds one :class:`ThrottleConfig` (six buckets:
bps and iops, each total/read/write, plus ``iops-size``) and is shared by
every ``throttle`` filter node that names it.  The algorithm is QEMU's
"leaky bucket as a meter" (ref/qemu-docs/throttle.txt, "The Leaky Bucket
algorithm"): a request waits until every bucket of its direction has room,
is then accounted (bytes into the bps buckets, units into the iops buckets)
and goes on; buckets leak at ``avg`` per second, and burst buckets at
``max`` per second when a burst length above one is configured.

Time is trio's clock (``trio.current_time()``), so tests can drive it with
``autojump_clock``.  Requests of one direction are served in FIFO order
across the whole group (a fair ``trio.Lock``); QEMU serves group members
round-robin, which for one requester per member amounts to the same thing.

The groups of a daemon live on its block graph (:func:`groups`), keyed by
name, so nodes find them without knowing about QOM objects.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..qapi.errors import GenericError

if TYPE_CHECKING:
    from .graph import BlockGraph
    from .throttle import ThrottleNode

# throttle.h: THROTTLE_VALUE_MAX
VALUE_MAX = 1_000_000_000_000_000
UINT_MAX = 0xFFFFFFFF
U64 = (1 << 64) - 1

# QEMU's BucketType order (THROTTLE_BPS_TOTAL ... THROTTLE_OPS_WRITE): the
# validation loop reports the first bad bucket in this order
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")

# which buckets a request of each direction fills (and waits for)
_DIRECTION = {
    False: ("bps-total", "bps-read", "iops-total", "iops-read"),
    True: ("bps-total", "bps-write", "iops-total", "iops-write"),
}


@attrs.define
class LeakyBucket:
    avg: int = 0            # leak rate: the long-term limit per second
    max: int = 0            # burst rate (0: no bursts beyond avg / 10)
    burst_length: int = 1   # seconds a burst at ``max`` may last
    level: float = 0.0
    burst_level: float = 0.0

    def leak(self, delta: float) -> None:
        self.level = max(self.level - self.avg * delta, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta, 0.0)

    def compute_wait(self) -> float:
        """Seconds until this bucket lets the next request through (throttle.c)."""
        if not self.avg:
            return 0.0
        if not self.max:
            # a small allowance so that a lone request is not delayed
            bucket_size = self.avg / 10
            burst_bucket_size = 0.0
        else:
            bucket_size = self.max * self.burst_length
            burst_bucket_size = self.max / 10
        extra = self.level - bucket_size
        if extra > 0:
            return extra / self.avg
        if self.burst_length > 1:
            extra = self.burst_level - burst_bucket_size
            if extra > 0:
                return extra / self.max
        return 0.0


@attrs.define
class ThrottleConfig:
    buckets: dict[str, LeakyBucket] = attrs.field(
        factory=lambda: {b: LeakyBucket() for b in BUCKETS})
    op_size: int = 0

    def copy(self) -> ThrottleConfig:
        return copy.deepcopy(self)

    def enabled(self) -> bool:
        return any(b.avg for b in self.buckets.values())

    def validate(self) -> None:
        """throttle_is_valid, with its messages, in its order."""
        bk = self.buckets

        def mixed(field: str, kind: str) -> bool:
            return bool(getattr(bk[f"{kind}-total"], field)) and bool(
                getattr(bk[f"{kind}-read"], field) or getattr(bk[f"{kind}-write"], field))

        if any(mixed(f, k) for f in ("avg", "max") for k in ("bps", "iops")):
            raise GenericError("bps/iops/max total values and read/write values "
                               "cannot be used at the same time")
        if self.op_size and not any(bk[b].avg for b in ("iops-total", "iops-read",
                                                          "iops-write")):
            raise GenericError("iops size requires an iops value to be set")
        for name in BUCKETS:
            b = bk[name]
            if b.avg > VALUE_MAX or b.max > VALUE_MAX:
                raise GenericError(f"bps/iops/max values must be within [0, {VALUE_MAX}]")
            if not b.burst_length:
                raise GenericError("the burst length cannot be 0")
            if b.burst_length > 1 and not b.max:
                raise GenericError("burst length set without burst rate")
            if b.max and b.burst_length > VALUE_MAX // b.max:
                raise GenericError("burst length too high for this burst rate")
            if b.max and not b.avg:
                raise GenericError("bps_max/iops_max require corresponding bps/iops values")
            if b.max and b.max < b.avg:
                raise GenericError("bps_max/iops_max cannot be lower than bps/iops")

    # -- ThrottleLimits (block-core.json) <-> config -------------------------------
    def apply_limits(self, limits: dict[str, Any]) -> None:
        """throttle_limits_to_config: members given in ``limits`` (QAPI names)
        replace the current values; then the whole config is validated.

        The integers are stored as QEMU stores them (uint64 rates, unsigned
        burst lengths), so a negative rate fails the range check as there.
        """
        for name in BUCKETS:
            if limits.get(name) is not None:
                self.buckets[name].avg = limits[name] & U64
        for name in BUCKETS:
            if limits.get(f"{name}-max") is not None:
                self.buckets[name].max = limits[f"{name}-max"] & U64
        for name in BUCKETS:
            v = limits.get(f"{name}-max-length")
            if v is not None:
                if v > UINT_MAX:
                    raise GenericError(f"{name}-max-length value must be in the range "
                                       f"[0, {UINT_MAX}]")
                self.buckets[name].burst_length = v & U64  # a uint64_t in QEMU
        if limits.get("iops-size") is not None:
            self.op_size = limits["iops-size"] & U64
        self.validate()

    def to_limits(self) -> dict[str, Any]:
        """throttle_config_to_limits: every ThrottleLimits member."""
        out: dict[str, Any] = {}
        for name in BUCKETS:
            b = self.buckets[name]
            out[name] = b.avg
            out[f"{name}-max"] = b.max
            out[f"{name}-max-length"] = b.burst_length
        out["iops-size"] = self.op_size
        return out


class ThrottleGroup:
    """One group's limits and bucket levels, shared by its throttle nodes."""

    def __init__(self, name: str, config: ThrottleConfig):
        self.name = name
        self.config = config
        self._previous_leak = trio.current_time()
        self._locks = {False: trio.Lock(), True: trio.Lock()}
        self._changed = trio.Event()
        self.members: list[ThrottleNode] = []  # throttle nodes using the group

    def configure(self, config: ThrottleConfig) -> None:
        """Install new limits (throttle_config): levels restart from zero and
        requests already waiting re-evaluate against the new limits."""
        self.config = config
        for b in config.buckets.values():
            b.level = b.burst_level = 0.0
        self._previous_leak = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()

    def _leak(self) -> None:
        now = trio.current_time()
        delta = now - self._previous_leak
        if delta > 0:
            self._previous_leak = now
            for b in self.config.buckets.values():
                b.leak(delta)

    def _wait_time(self, write: bool) -> float:
        return max(self.config.buckets[n].compute_wait() for n in _DIRECTION[write])

    def _account(self, write: bool, nbytes: int) -> None:
        cfg = self.config
        units = 1.0
        if cfg.op_size and nbytes > cfg.op_size:
            units = nbytes / cfg.op_size
        for name in _DIRECTION[write]:
            b = cfg.buckets[name]
            amount = nbytes if name.startswith("bps") else units
            b.level += amount
            if b.burst_length > 1:
                b.burst_level += amount

    async def intercept(self, write: bool, nbytes: int, member: ThrottleNode | None = None) -> None:
        """Wait until the group's limits admit a request, then account it.

        ``member`` is the throttle node the request comes through: while it
        is drained (``member.io_limits_disabled``) requests are not held
        back, and :meth:`restart` lets the ones it queued go at once, still
        accounted (throttle_group_co_io_limits_intercept with
        io_limits_disabled, throttle_group_restart_tgm).  Cancellation while
        waiting leaves the buckets untouched.
        """
        if not self.config.enabled():
            return
        if member is not None and member.io_limits_disabled:
            self._leak()
            self._account(write, nbytes)
            return
        with trio.CancelScope() as released:
            if member is not None:
                member.throttled.add(released)
            try:
                async with self._locks[write]:
                    while True:
                        self._leak()
                        wait = self._wait_time(write)
                        deadline = trio.current_time() + wait
                        # QEMU counts in whole nanoseconds; a float remainder
                        # below that (or below the clock's resolution) must not spin
                        if wait < 1e-9 or deadline <= trio.current_time():
                            break
                        changed = self._changed
                        with trio.move_on_at(deadline):
                            await changed.wait()
                    self._account(write, nbytes)
                    return
            finally:
                if member is not None:
                    member.throttled.discard(released)
        # released by a drain of ``member``: go now
        self._leak()
        self._account(write, nbytes)

    @staticmethod
    def restart(member: ThrottleNode) -> None:
        """throttle_group_restart_tgm: every request ``member`` holds back goes."""
        for scope in list(member.throttled):
            scope.cancel()


def groups(graph: BlockGraph) -> dict[str, ThrottleGroup]:
    """The throttle groups of ``graph``'s daemon, by name."""
    return graph.throttle_groups
