"""QMP commands: exports."""

from .registry import command  # noqa: F401
