"""The one error tree for everything a QMP client or the command line sees.

A :class:`QapiError` carries QEMU's error class and text.  It is raised where
the fact is known (a driver that finds a missing file, the schema layer that
finds a missing parameter) and turned into a QMP error reply, or into
``qsd-trio: --option value: message`` on the command line, at one boundary
each.  Code never formats QMP error dicts itself.
"""

from __future__ import annotations


class QapiError(Exception):
    """An error a QMP client sees: ``{"class": ..., "desc": ...}``."""

    error_class = "GenericError"

    def __init__(self, desc: str, *, error_class: str | None = None, hint: str | None = None):
        super().__init__(desc)
        self.desc = desc
        # QEMU's error_append_hint: printed on the command line, never sent over QMP
        self.hint = hint
        if error_class is not None:
            self.error_class = error_class

    def to_qmp(self) -> dict:
        return {"class": self.error_class, "desc": self.desc}

    def prefixed(self, prefix: str) -> QapiError:
        """The same error with ``prefix`` in front of its text (QEMU's error_prepend)."""
        return type(self)(prefix + self.desc, error_class=self.error_class, hint=self.hint)


class GenericError(QapiError):
    error_class = "GenericError"


class CommandNotFound(QapiError):
    error_class = "CommandNotFound"


class DeviceNotFound(QapiError):
    error_class = "DeviceNotFound"


class DeviceNotActive(QapiError):
    error_class = "DeviceNotActive"
