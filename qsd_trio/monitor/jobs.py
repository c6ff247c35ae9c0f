"""QMP commands: jobs."""

from .registry import command  # noqa: F401
