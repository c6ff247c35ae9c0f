"""The VMDK text descriptor, read and written as QEMU 7.2's block/vmdk.c does.

A descriptor is a few lines of text, either a file of its own (the
``file`` child of a monolithicFlat or twoGbMaxExtent* image) or embedded in
a sparse extent (sectors 1 to 20 of a monolithicSparse or streamOptimized
file)::

    # Disk DescriptorFile
    version=1
    CID=163db4f8
    parentCID=ffffffff
    createType="monolithicFlat"
    RW 6291456 FLAT "disk-flat.vmdk" 0
    ddb.adapterType = "ide"

QEMU reads it as a C string (it ends at the first NUL) with ``strstr`` and
``sscanf``, not line by line: a key is found anywhere in the text (``CID``
inside ``parentCID`` too), and an extent line is scanned from its start to
wherever the scan ends, so a blank line before an extent line scans that
extent line.  The functions here keep those semantics, because they decide
which images open and what they contain.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..qapi.errors import GenericError

DESC_SIZE = 20 * 512  # what vmdk_read_cid/vmdk_write_cid/vmdk_parent_open read
PATH_MAX = 4096  # sizeof(bs->auto_backing_file)
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
U64 = (1 << 64) - 1
_SPACE = b" \t\n\v\f\r"  # C isspace
EXTENT_TYPES = (b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE")
# the create types vmdk_open_desc_file accepts in a descriptor file
DESC_FILE_TYPES = ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse",
                   "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")


def cstr(buf: bytes | bytearray | memoryview) -> bytes:
    """``buf`` as a C string: up to its first NUL."""
    b = bytes(buf)
    end = b.find(b"\0")
    return b if end < 0 else b[:end]


def text(b: bytes) -> str:
    """Descriptor bytes in a message."""
    return b.decode("utf-8", "replace")


# -- sscanf ------------------------------------------------------------------
class _Scan:
    """Just enough of glibc's sscanf for the conversions vmdk.c uses."""

    def __init__(self, s: bytes, pos: int = 0) -> None:
        self.s = s
        self.pos = pos

    def skip_space(self) -> None:
        s, n = self.s, len(self.s)
        while self.pos < n and s[self.pos] in _SPACE:
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.s)

    def word(self, width: int) -> bytes | None:
        """``%Ns``: leading space skipped, then up to N non-space bytes."""
        self.skip_space()
        start = self.pos
        s, n = self.s, len(self.s)
        while self.pos < n and self.pos - start < width and s[self.pos] not in _SPACE:
            self.pos += 1
        return s[start:self.pos] if self.pos > start else None

    def integer(self, base: int, bits: int, signed: bool) -> int | None:
        """``%d``/``%x`` as strtol/strtoul do them: sign, a 0x prefix for
        hex, saturation on overflow; the value as the C type keeps it."""
        self.skip_space()
        s, n = self.s, len(self.s)
        p = self.pos
        neg = False
        if p < n and s[p] in b"+-":
            neg = s[p] == ord("-")
            p += 1
        if base == 16 and s[p:p + 2].lower() == b"0x" and p + 2 < n and \
                chr(s[p + 2]) in "0123456789abcdefABCDEF":
            p += 2
        digits = "0123456789abcdef"[:base]
        start = p
        while p < n and chr(s[p]).lower() in digits:
            p += 1
        if p == start:
            return None
        self.pos = p
        v = int(s[start:p], base)
        if signed:
            v = -v if neg else v
            return max(INT64_MIN, min(INT64_MAX, v))
        v = min(v, U64)
        if neg:
            v = -v & U64
        return v & ((1 << bits) - 1)

    def literal(self, c: int) -> bool:
        if self.pos < len(self.s) and self.s[self.pos] == c:
            self.pos += 1
            return True
        return False

    def charset_not(self, width: int, stop: bytes) -> bytes | None:
        """``%N[^...]``: 1 to N bytes not in ``stop``."""
        s, n = self.s, len(self.s)
        start = self.pos
        while self.pos < n and self.pos - start < width and s[self.pos] not in stop:
            self.pos += 1
        return s[start:self.pos] if self.pos > start else None


def probe(head: bytes) -> bool:
    """vmdk_probe: a sparse extent's magic, or text whose first line that is
    neither a comment nor blank (spaces only) is ``version=1``, 2 or 3."""
    if head[:4] in (b"KDMV", b"COWD"):
        return True
    p, end = 0, len(head)
    while p < end:
        if head[p] == ord("#"):
            nl = head.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if head[p] == ord(" "):
            while p < end and head[p] == ord(" "):
                p += 1
            if p < end and head[p] == ord("\r"):
                p += 1
            if p == end or head[p] != ord("\n"):
                return False
            p += 1
            continue
        return any(head.startswith(b"version=%d%s" % (v, eol), p)
                   for v in (1, 2, 3) for eol in (b"\n", b"\r\n"))
    return False


# -- keys -----------------------------------------------------------------------
def parse_description(desc: bytes, name: bytes) -> bytes | None:
    """vmdk_parse_description: the value after the first ``name`` in the
    text, skipping the two bytes after it (``="``) up to the next double
    quote; None if there is none or it would not fit in 128 bytes."""
    at = desc.find(name)
    if at < 0:
        return None
    start = at + len(name) + 2
    if start >= len(desc):
        return None
    end = desc.find(b'"', start)
    if end < 0 or end - start + 1 > 128:
        return None
    return desc[start:end]


def read_cid(desc: bytes, parent: bool) -> int | None:
    """vmdk_read_cid on the DESC_SIZE bytes at the descriptor's offset: the
    hex number after the first ``CID`` (``parentCID``) and the byte after
    it; None when there is none (QEMU's -EINVAL)."""
    s = cstr(desc[:DESC_SIZE - 1])
    key = b"parentCID" if parent else b"CID"
    at = s.find(key)
    if at < 0:
        return None
    scan = _Scan(s, at + len(key) + 1)
    return scan.integer(16, 32, signed=False)


def write_cid(desc: bytes, cid: int, size: int = DESC_SIZE) -> bytes | None:
    """vmdk_write_cid on the ``size`` bytes read at the descriptor's offset
    (DESC_SIZE in a sparse file, a descriptor file's whole length): the same
    buffer with ``CID=<cid>\\n`` written after the first ``CID`` and the text
    from ``parentCID`` on appended, as snprintf and pstrcat leave it (bytes
    past the new end keep what they held); None without a ``parentCID``
    (QEMU's -EINVAL)."""
    buf = bytearray(desc[:size].ljust(size, b"\0"))
    buf[size - 1] = 0
    s = cstr(buf)
    at_parent = s.find(b"parentCID")
    if at_parent < 0:
        return None
    tail = s[at_parent:]  # pstrcpy(tmp_desc, size, tmp_str)
    at = s.find(b"CID")
    p = at + len(b"CID") + 1
    # snprintf(p_name, size - (p_name - desc), "%x\\n", cid)
    room = size - p
    if room > 0:
        new = (b"%x\n" % cid)[:room - 1]
        buf[p:p + len(new)] = new
        buf[p + len(new)] = 0
    # pstrcat(desc, size, tmp_desc)
    end = buf.index(0)
    room = size - end
    if room > 0:
        add = tail[:room - 1]
        buf[end:end + len(add)] = add
        buf[end + len(add)] = 0
    return bytes(buf)


def parent_file_name_hint(desc: bytes) -> str | None:
    """vmdk_parent_open on the DESC_SIZE bytes at the descriptor's offset:
    the quoted ``parentFileNameHint``, None without one; when it has no closing
    quote or is longer than PATH_MAX - 1: ValueError (QEMU's bare -EINVAL,
    which the caller words)."""
    s = cstr(desc[:DESC_SIZE])
    at = s.find(b"parentFileNameHint")
    if at < 0:
        return None
    start = at + len(b"parentFileNameHint") + 2
    end = s.find(b'"', start) if start <= len(s) else -1
    if end < 0 or end - start > PATH_MAX - 1:
        raise ValueError("bad parentFileNameHint")
    return os.fsdecode(s[start:end])


# -- extent lines -----------------------------------------------------------------
@dataclass(frozen=True)
class ExtentLine:
    """One ``RW <sectors> <TYPE> "<file>" [<offset>]`` line that opens."""

    sectors: int
    type: str
    fname: str
    flat_offset: int  # in sectors; 0 for VMFS, -1 for the sparse types


def _next_line(desc: bytes, p: int) -> int:
    nl = desc.find(b"\n", p)
    return len(desc) if nl < 0 else nl + 1


def parse_extents(desc: bytes) -> Iterator[ExtentLine]:
    """vmdk_parse_extents' scan of every line: the extents to open, in
    order, one at a time (QEMU opens each before it scans the next line, so
    a file that does not open fails before a bad line after it).  Lines
    whose access is not ``RW``, whose size is not positive or whose type is
    unknown are skipped; a FLAT line without its offset (or with a negative
    one), a VMFS line with one and a sparse line with one are refused:
    GenericError("Invalid extent line: ...")."""
    p = 0
    sectors = 0
    while p < len(desc):
        scan = _Scan(desc, p)
        matches = 0
        flat_offset = -1
        access = scan.word(10)
        type_ = fname = None
        if access is not None:
            matches = 1
            n = scan.integer(10, 64, signed=True)
            if n is not None:
                sectors = n
                matches = 2
                type_ = scan.word(10)
                if type_ is not None:
                    matches = 3
                    scan.skip_space()
                    if scan.literal(ord('"')):
                        fname = scan.charset_not(511, b'\n\r"')
                        if fname is not None:
                            matches = 4
                            if scan.literal(ord('"')):
                                off = scan.integer(10, 64, signed=True)
                                if off is not None:
                                    flat_offset = off
                                    matches = 5
        if matches < 4 or access != b"RW":
            p = _next_line(desc, p)
            continue
        assert type_ is not None and fname is not None
        invalid = False
        if type_ == b"FLAT":
            invalid = matches != 5 or flat_offset < 0
        elif type_ == b"VMFS":
            if matches == 4:
                flat_offset = 0
            else:
                invalid = True
        elif matches != 4:
            invalid = True
        if invalid:
            end = _next_line(desc, p)
            if desc[end - 1:end] == b"\n":
                end -= 1
            raise GenericError(f"Invalid extent line: {text(desc[p:end])}")
        if sectors > 0 and type_ in EXTENT_TYPES:
            yield ExtentLine(sectors, type_.decode(), os.fsdecode(fname), flat_offset)
        p = _next_line(desc, p)


def create_type(desc: bytes) -> str:
    """vmdk_open_desc_file's check of ``createType``: the type, or
    GenericError with QEMU's message."""
    ct = parse_description(desc, b"createType")
    if ct is None:
        raise GenericError("invalid VMDK image descriptor")
    name = text(ct)
    if name not in DESC_FILE_TYPES:
        raise GenericError(f"Unsupported image type '{name}'")
    return name


# -- writing ------------------------------------------------------------------------
_TEMPLATE = (
    "# Disk DescriptorFile\n"
    "version=1\n"
    "CID={cid:x}\n"
    "parentCID={parent_cid:x}\n"
    'createType="{create_type}"\n'
    "{parent}"
    "\n"
    "# Extent description\n"
    "{extents}"
    "\n"
    "# The Disk Data Base\n"
    "#DDB\n"
    "\n"
    'ddb.virtualHWVersion = "{hw_version}"\n'
    'ddb.geometry.cylinders = "{cylinders}"\n'
    'ddb.geometry.heads = "{heads}"\n'
    'ddb.geometry.sectors = "63"\n'
    'ddb.adapterType = "{adapter_type}"\n'
    'ddb.toolsVersion = "{tools_version}"\n')


def extent_line(flat: bool, size: int, filename: str) -> str:
    """vmdk_desc_add_extent: the line for an extent of ``size`` bytes in
    ``filename`` (its base name)."""
    sectors = -(-size // 512)
    base = os.path.basename(filename.rstrip("/")) or filename
    if flat:
        return f'RW {sectors} FLAT "{base}" 0\n'
    return f'RW {sectors} SPARSE "{base}"\n'


def make_descriptor(*, cid: int, parent_cid: int, create_type: str, parent_hint: str | None,
                    extents: list[str], hw_version: str, size: int, heads: int,
                    adapter_type: str, tools_version: str) -> bytes:
    """vmdk_co_do_create's descriptor text."""
    parent = f'parentFileNameHint="{parent_hint}"' if parent_hint is not None else ""
    return _TEMPLATE.format(cid=cid, parent_cid=parent_cid, create_type=create_type,
                            parent=parent, extents="".join(extents), hw_version=hw_version,
                            cylinders=size // (63 * heads * 512), heads=heads,
                            adapter_type=adapter_type, tools_version=tools_version).encode()
