"""The kernel FUSE protocol (``/dev/fuse``), sans-I/O: framing and structs.

Only what a one-inode file system needs: the request header, the bodies of
the requests a regular-file mount receives, and the reply bodies.  Layouts
follow the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.31 replies,
older kernels accept them since they read only what they know).

Every request is one ``read()`` of the device: a 40-byte header, then the
opcode's body.  Every reply is one ``write()``: a 16-byte header carrying the
request's ``unique`` and a negative errno (or 0), then the reply body.
"""

from __future__ import annotations

import struct

import attrs

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 31

# opcodes (enum fuse_opcode)
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
GETXATTR = 22
LISTXATTR = 23
FLUSH = 25
INIT = 26
OPENDIR = 27
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
LSEEK = 46

# requests the kernel sends without waiting for a reply
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# FUSE_INIT flags
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22

# fuse_setattr_in.valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11
# the bits that name attributes to change; FH and LOCKOWNER only say which
# open file asked, so they are never "unsupported" (libfuse drops them too)
FATTR_ATTRIBUTES = (FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE | FATTR_ATIME
                    | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_CTIME
                    | FATTR_KILL_SUIDGID)

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

ROOT_ID = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid extlen pad
IN_HEADER_PREFIX = struct.Struct("<IIQ")     # what the hot path needs: len opcode unique
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
INIT_IN = struct.Struct("<IIII")             # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_write time_gran max_pages align flags2
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # fuse_attr (88 bytes)
ATTR_OUT_PREFIX = struct.Struct("<QII")      # attr_valid attr_valid_nsec dummy
ENTRY_OUT_PREFIX = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQII")             # fh offset size read_flags (rest ignored)
# what the export's loop unpacks from every request, with one call: the
# header's len opcode unique, and what would be a READ's offset and size
# (fuse_read_in after the header; meaningless for any other opcode, whose
# body is shorter, but the receive buffer is always long enough to unpack)
READ_REQUEST = struct.Struct("<IIQ32xQI")
WRITE_IN = struct.Struct("<QQIIQII")         # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
WRITE_REPLY = struct.Struct("<IiQII")        # a WRITE's whole reply: out header, write_out
FSYNC_IN = struct.Struct("<QII")
FALLOCATE_IN = struct.Struct("<QQQII")       # fh offset length mode pad
LSEEK_IN = struct.Struct("<QQII")            # fh offset whence pad
LSEEK_OUT = struct.Struct("<Q")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize pad

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16
assert INIT_OUT.size == 64 and ATTR.size == 88 and SETATTR_IN.size == 88
assert WRITE_IN.size == 40 and STATFS_OUT.size == 80
assert WRITE_REPLY.size == OUT_HEADER.size + WRITE_OUT.size
assert READ_REQUEST.size == IN_HEADER.size + READ_IN.size - 4


@attrs.frozen
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    length, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(buf)
    return Header(length, opcode, unique, nodeid, uid, gid, pid)


@attrs.frozen
class Attr:
    """fuse_attr; times are (seconds, nanoseconds)."""

    ino: int
    size: int
    blocks: int
    mode: int
    uid: int
    gid: int
    time: tuple[int, int] = (0, 0)
    nlink: int = 1
    blksize: int = 0

    def pack(self) -> bytes:
        sec, nsec = self.time
        return ATTR.pack(self.ino, self.size, self.blocks, sec, sec, sec, nsec, nsec, nsec,
                         self.mode, self.nlink, self.uid, self.gid, 0, self.blksize, 0)


@attrs.frozen
class SetattrIn:
    valid: int
    fh: int
    size: int
    mode: int
    uid: int
    gid: int


def parse_setattr(body: bytes | bytearray | memoryview) -> SetattrIn:
    (valid, _pad, fh, size, _lock, _at, _mt, _ct, _atn, _mtn, _ctn, mode, _u4, uid, gid,
     _u5) = SETATTR_IN.unpack_from(body)
    return SetattrIn(valid, fh, size, mode, uid, gid)


def split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def reply(unique: int, body: bytes = b"") -> bytes:
    """A successful reply (header + body) as one buffer."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def reply_header(unique: int, body_len: int) -> bytes:
    """Just the header, for writing it and a large body with one writev()."""
    return OUT_HEADER.pack(OUT_HEADER.size + body_len, 0, unique)


def reply_error(unique: int, errno: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -errno, unique)


def attr_out(attr: Attr, valid: float) -> bytes:
    sec, nsec = split_timeout(valid)
    return ATTR_OUT_PREFIX.pack(sec, nsec, 0) + attr.pack()


def entry_out(nodeid: int, attr: Attr, valid: float) -> bytes:
    sec, nsec = split_timeout(valid)
    return ENTRY_OUT_PREFIX.pack(nodeid, 0, sec, sec, nsec, nsec) + attr.pack()


def init_out(*, max_readahead: int, flags: int, max_write: int, max_pages: int,
             max_background: int = 16, congestion_threshold: int = 12) -> bytes:
    return INIT_OUT.pack(KERNEL_VERSION, KERNEL_MINOR_VERSION, max_readahead, flags,
                         max_background, congestion_threshold, max_write, 1, max_pages, 0, 0)


def statfs_out(*, bsize: int = 512, namelen: int = 255) -> bytes:
    # an export has no free space to report; QEMU's (libfuse default) is all zero
    return STATFS_OUT.pack(0, 0, 0, 0, 0, bsize, namelen, bsize, 0)
