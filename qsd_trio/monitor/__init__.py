"""The QMP monitor: protocol, sessions, and one module per command group."""
