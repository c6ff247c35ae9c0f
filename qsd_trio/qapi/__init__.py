"""QAPI: QEMU's option syntax (keyval), the typed schema, QMP errors."""
