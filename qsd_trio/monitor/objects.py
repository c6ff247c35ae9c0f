"""QMP commands: objects."""

from .registry import command  # noqa: F401
