"""QMP commands: block."""

from .registry import command  # noqa: F401
