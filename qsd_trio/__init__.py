"""qsd-trio: qemu-storage-daemon rebuilt in Python on trio."""

__version__ = "0.1.0"

# The QEMU version whose QMP schema we implement; query-version and the QMP
# greeting report it so that clients gating features on the QEMU version
# behave as they do with qemu-storage-daemon 7.2.
QEMU_VERSION = (7, 2, 0)
PACKAGE = f"qsd-trio {__version__}"
