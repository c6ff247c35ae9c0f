"""QMP commands: control."""

from .registry import command  # noqa: F401
