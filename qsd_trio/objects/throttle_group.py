"""The ``throttle-group`` user-creatable object (ThrottleGroupProperties).

At creation its properties are applied the way QEMU's QOM setters apply
them: ``limits`` (a ThrottleLimits) first, then the unstable ``x-*``
properties one by one; then the whole configuration is validated and the
live :class:`~qsd_trio.nodes.throttle_group.ThrottleGroup` is registered
with the block graph under the object's id.  Afterwards only ``limits`` can
be changed (``qom-set``), which takes effect at once for every throttle node
of the group.  Deleting the object unregisters the group; ``object-del``
refuses while a throttle node uses it (:meth:`ThrottleGroupObject.qom_users`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..nodes.throttle_group import BUCKETS, UINT_MAX, ThrottleConfig, ThrottleGroup, groups
from ..qapi import schema
from ..qapi.errors import GenericError
from .qom import UserObject

if TYPE_CHECKING:
    from ..nodes.graph import BlockGraph

# x-<bucket>, x-<bucket>-max, x-<bucket>-max-length and x-iops-size
X_PROPS: dict[str, tuple[str, str]] = {}
for _b in BUCKETS:
    X_PROPS[f"x-{_b}"] = (_b, "avg")
    X_PROPS[f"x-{_b}-max"] = (_b, "max")
    X_PROPS[f"x-{_b}-max-length"] = (_b, "burst_length")
X_PROPS["x-iops-size"] = ("", "op_size")


def _set_x(cfg: ThrottleConfig, prop: str, value: int) -> None:
    """throttle_group_set: one x-* property before the group is complete."""
    if value < 0:
        raise GenericError("Property values cannot be negative")
    bucket, field = X_PROPS[prop]
    if field == "op_size":
        cfg.op_size = value
    elif field == "burst_length":
        if value > UINT_MAX:
            # sic: QEMU's message lacks a space here
            raise GenericError(f"{prop} value must be in therange [0, {UINT_MAX}]")
        cfg.buckets[bucket].burst_length = value
    else:
        setattr(cfg.buckets[bucket], field, value)


def _get_x(cfg: ThrottleConfig, prop: str) -> int:
    bucket, field = X_PROPS[prop]
    if field == "op_size":
        return cfg.op_size
    return int(getattr(cfg.buckets[bucket], field))


class ThrottleGroupObject(UserObject):
    """A throttle-group object; ``group`` is the live, shared limiter."""

    group: ThrottleGroup
    graph: BlockGraph

    def qom_users(self) -> list[str]:
        return [n.node_name for n in self.group.members]

    def get(self, prop: str) -> Any:
        if prop == "limits":
            return self.group.config.to_limits()
        if prop in X_PROPS:
            return _get_x(self.group.config, prop)
        return super().get(prop)

    def qom_set(self, prop: str, value: Any) -> None:
        """qom-set after creation: only ``limits`` may change."""
        if prop in X_PROPS:
            raise GenericError("Property cannot be set after initialization")
        if prop != "limits":
            raise GenericError(f"Property '{self.qom_type}.{prop}' not found")
        # the QObject input visitor, rooted at the property name, gives
        # QEMU's texts ("Parameter 'limits.bogus' is unexpected")
        limits = schema.to_qmp(schema._Visitor(keyval=False).visit(
            "ThrottleLimits", value, "limits", "limits"))
        cfg = self.group.config.copy()
        cfg.apply_limits(limits)
        self.group.configure(cfg)
        self.props["limits"] = limits

    def on_delete(self) -> None:
        """object-del: forget the group (callers checked users() first)."""
        reg = groups(self.graph)
        if reg.get(self.id) is self.group:
            del reg[self.id]


def create(graph: BlockGraph, id: str, props: dict[str, Any]) -> ThrottleGroupObject:
    """object-add of a throttle-group: configure, validate, register."""
    if id in groups(graph):
        raise GenericError("A group with this name already exists")
    cfg = ThrottleConfig()
    if props.get("limits") is not None:
        cfg.apply_limits(props["limits"])
    for prop, value in props.items():
        if prop in X_PROPS and value is not None:
            _set_x(cfg, prop, value)
    cfg.validate()
    obj = ThrottleGroupObject(id, "throttle-group", props)
    obj.graph = graph
    obj.group = ThrottleGroup(id, cfg)
    groups(graph)[id] = obj.group
    return obj
