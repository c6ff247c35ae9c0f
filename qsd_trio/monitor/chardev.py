"""QMP commands: chardev."""

from .registry import command  # noqa: F401
