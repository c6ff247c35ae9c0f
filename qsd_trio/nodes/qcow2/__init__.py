"""The qcow2 format driver (see driver.py); importing registers it."""

from .driver import Qcow2Node

__all__ = ["Qcow2Node"]
