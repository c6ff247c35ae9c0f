"""The VDUSE kernel interface, sans-I/O (include/uapi/linux/vduse.h).

The ioctl numbers, and the structures that go through them or are read
from and written to ``/dev/vduse/NAME``, packed and unpacked here; the
vduse-blk export (exports/vduse_blk.py) makes the calls.
tests/unit/test_vduse_uapi.py checks every number and layout against the
kernel's own header, compiled with the C compiler: a wrong size in an
ioctl number makes the kernel answer ENOTTY, a wrong offset garbles the
device.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_VDUSE_BASE = 0x81
_W, _R = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | _VDUSE_BASE << 8 | nr


VDUSE_API_VERSION = 0
VDUSE_SET_API_VERSION = _ioc(_W, 0x01, 8)
VDUSE_CREATE_DEV = _ioc(_W, 0x02, 336)
VDUSE_DESTROY_DEV = _ioc(_W, 0x03, 256)
VDUSE_IOTLB_GET_FD = _ioc(_W | _R, 0x10, 32)
VDUSE_DEV_GET_FEATURES = _ioc(_R, 0x11, 8)
VDUSE_DEV_SET_CONFIG = _ioc(_W, 0x12, 8)
VDUSE_DEV_INJECT_CONFIG_IRQ = _ioc(0, 0x13, 0)
VDUSE_VQ_SETUP = _ioc(_W, 0x14, 32)
VDUSE_VQ_GET_INFO = _ioc(_W | _R, 0x15, 48)
VDUSE_VQ_SETUP_KICKFD = _ioc(_W, 0x16, 8)
VDUSE_VQ_INJECT_IRQ = _ioc(_W, 0x17, 4)
VDUSE_NAME_MAX = 256
VDUSE_EVENTFD_DEASSIGN = -1
VDUSE_ACCESS_WO = 2
# message types (enum vduse_req_type) and results
VDUSE_GET_VQ_STATE, VDUSE_SET_STATUS, VDUSE_UPDATE_IOTLB = 0, 1, 2
VDUSE_REQ_RESULT_OK, VDUSE_REQ_RESULT_FAILED = 0, 1

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def u32(value: int) -> bytes:
    """A __u32 argument (VDUSE_VQ_INJECT_IRQ's queue index)."""
    return _U32.pack(value)


def u64(value: int) -> bytes:
    """A __u64 argument (VDUSE_SET_API_VERSION's version)."""
    return _U64.pack(value)


def features(buf: bytes | bytearray) -> int:
    """VDUSE_DEV_GET_FEATURES's answer: the driver's features."""
    return int(_U64.unpack_from(buf)[0])


# struct vduse_dev_config without its config[]: name, vendor_id,
# device_id, features, vq_num, vq_align, reserved[13], config_size
_DEV_CONFIG = struct.Struct("<256sIIQII52xI")


def dev_config(name: str, device_id: int, device_features: int, vq_num: int, vq_align: int,
               config: bytes) -> bytes:
    """VDUSE_CREATE_DEV's argument: the device and its config space."""
    return _DEV_CONFIG.pack(name.encode(), 0, device_id, device_features, vq_num, vq_align,
                            len(config)) + config


def dev_name(name: str) -> bytes:
    """VDUSE_DESTROY_DEV's argument."""
    return name.encode().ljust(VDUSE_NAME_MAX, b"\0")


# struct vduse_config_data without its buffer[]: offset, length
_CONFIG_DATA = struct.Struct("<II")


def config_data(offset: int, data: bytes) -> bytes:
    """VDUSE_DEV_SET_CONFIG's argument: bytes of the config space."""
    return _CONFIG_DATA.pack(offset, len(data)) + data


# struct vduse_iotlb_entry: offset, start, last, perm
_IOTLB_ENTRY = struct.Struct("<QQQB7x")


class IotlbEntry(NamedTuple):
    """An IOVA range [start, last] at ``offset`` of the descriptor
    VDUSE_IOTLB_GET_FD returned, with its permissions."""

    offset: int
    start: int
    last: int
    perm: int


def iotlb_query(iova: int) -> bytearray:
    """VDUSE_IOTLB_GET_FD's argument: the range holding ``iova``."""
    return bytearray(_IOTLB_ENTRY.pack(0, iova, iova + 1, 0))


def iotlb_entry(buf: bytearray) -> IotlbEntry:
    """VDUSE_IOTLB_GET_FD's answer."""
    return IotlbEntry(*_IOTLB_ENTRY.unpack(buf))


# struct vduse_vq_config: index, max_size, reserved[13]
_VQ_CONFIG = struct.Struct("<IH26x")


def vq_config(index: int, max_size: int) -> bytes:
    """VDUSE_VQ_SETUP's argument."""
    return _VQ_CONFIG.pack(index, max_size)


# struct vduse_vq_info: index, num, desc_addr, driver_addr, device_addr,
# split.avail_index (a union of 8 bytes), ready
_VQ_INFO = struct.Struct("<IIQQQH6xB7x")


class VqInfo(NamedTuple):
    """A virtqueue as the driver set it up (addresses are IOVAs)."""

    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    avail_index: int
    ready: bool


def vq_info_query(index: int) -> bytearray:
    """VDUSE_VQ_GET_INFO's argument."""
    buf = bytearray(_VQ_INFO.size)
    _U32.pack_into(buf, 0, index)
    return buf


def vq_info(buf: bytearray) -> VqInfo:
    """VDUSE_VQ_GET_INFO's answer."""
    _, num, desc, driver, device, avail_index, ready = _VQ_INFO.unpack(buf)
    return VqInfo(num, desc, driver, device, avail_index, bool(ready))


# struct vduse_vq_eventfd: index, fd
_VQ_EVENTFD = struct.Struct("<Ii")


def vq_eventfd(index: int, fd: int) -> bytes:
    """VDUSE_VQ_SETUP_KICKFD's argument (VDUSE_EVENTFD_DEASSIGN removes it)."""
    return _VQ_EVENTFD.pack(index, fd)


# struct vduse_dev_request / vduse_dev_response: 152 bytes each, a head
# (type or request_id, request_id or result, reserved[4]) and a union
MSG_SIZE = 152
_REQ_HEAD = struct.Struct("<II16x")
_RESP_HEAD = struct.Struct("<II16x")
# the union's members this device uses
_VQ_STATE = struct.Struct("<IH")  # struct vduse_vq_state: index, split.avail_index
_IOVA_RANGE = struct.Struct("<QQ")  # struct vduse_iova_range: start, last


class Request(NamedTuple):
    """A message the kernel sent; ``body`` is the union, unparsed."""

    type: int
    request_id: int
    body: bytes


def decode_request(msg: bytes) -> Request:
    """A struct vduse_dev_request read from the device (MSG_SIZE bytes)."""
    kind, request_id = _REQ_HEAD.unpack_from(msg)
    return Request(kind, request_id, msg[_REQ_HEAD.size:])


def response(request_id: int, result: int, body: bytes = b"") -> bytes:
    """A struct vduse_dev_response to write back."""
    return (_RESP_HEAD.pack(request_id, result) + body).ljust(MSG_SIZE, b"\0")


def vq_state_index(body: bytes) -> int:
    """GET_VQ_STATE: the queue asked about."""
    return int(_U32.unpack_from(body)[0])


def vq_state(index: int, avail_index: int) -> bytes:
    """GET_VQ_STATE's answer: where the queue is."""
    return _VQ_STATE.pack(index, avail_index)


def status(body: bytes) -> int:
    """SET_STATUS: the device status byte."""
    return body[0]


def iova_range(body: bytes) -> tuple[int, int]:
    """UPDATE_IOTLB: the range [start, last] whose mappings changed."""
    start, last = _IOVA_RANGE.unpack_from(body)
    return int(start), int(last)
