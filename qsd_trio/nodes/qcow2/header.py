"""The qcow2 header and header extensions (qcow2.rst, "Header", "Header extensions").

Pure code over bytes: :func:`parse_header` turns the first cluster into a
:class:`Header`; :meth:`Header.pack` turns it back.  Extensions we do not
interpret are kept as raw bytes so that rewriting the header preserves them.
"""

from __future__ import annotations

import struct

import attrs

from ...qapi.cstr import c_bytes

MAGIC = b"QFI\xfb"

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
# compatible_features bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes, up to header_length at 100

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1


class HeaderError(Exception):
    """The header is not one we can open; the text is QEMU's."""


@attrs.define
class Extension:
    type: int
    data: bytes


@attrs.define
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 112
    compression_type: int = COMPRESSION_ZLIB
    extensions: list[Extension] = attrs.Factory(list)
    backing_file: str | None = None
    # bumped by set_ext (the driver's overlap index depends on the extensions)
    generation: int = attrs.field(default=0, eq=False)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    # -- extension helpers ------------------------------------------------
    def ext(self, type_: int) -> bytes | None:
        for e in self.extensions:
            if e.type == type_:
                return e.data
        return None

    def set_ext(self, type_: int, data: bytes | None) -> None:
        """Replace (or with ``None`` remove) extension ``type_``, keeping the order."""
        self.generation += 1
        for i, e in enumerate(self.extensions):
            if e.type == type_:
                if data is None:
                    del self.extensions[i]
                else:
                    e.data = data
                return
        if data is not None:
            # QEMU writes the backing format first, then the others; order is not
            # significant to readers but keep new ones before the feature table
            pos = len(self.extensions)
            for i, e in enumerate(self.extensions):
                if e.type == EXT_FEATURE_TABLE:
                    pos = i
                    break
            self.extensions.insert(pos, Extension(type_, data))

    @property
    def backing_format(self) -> str | None:
        d = self.ext(EXT_BACKING_FORMAT)
        return None if d is None else d.decode("utf-8", "surrogateescape")

    @property
    def data_file(self) -> str | None:
        d = self.ext(EXT_DATA_FILE)
        return None if d is None else d.decode("utf-8", "surrogateescape")

    # -- serialising --------------------------------------------------------
    def pack(self) -> bytes:
        """The header, its extensions and the backing file name as one blob.

        The backing file name follows the extensions (as QEMU lays it out);
        ``backing_file_offset``/``size`` are set accordingly.
        """
        head = bytearray(V2_HEADER.pack(
            MAGIC, self.version, 0, 0, self.cluster_bits, self.size, self.crypt_method,
            self.l1_size, self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            head += V3_EXTRA.pack(self.incompatible_features, self.compatible_features,
                                  self.autoclear_features, self.refcount_order,
                                  self.header_length)
            head += bytes([self.compression_type]) + bytes(7)
            head = head[:self.header_length].ljust(self.header_length, b"\0")
        for e in self.extensions:
            head += struct.pack(">II", e.type, len(e.data)) + e.data
            head += bytes(-len(e.data) % 8)
        head += bytes(8)  # end-of-extensions marker
        if self.backing_file is not None:
            name = c_bytes(self.backing_file)
            self.backing_file_offset = len(head)
            self.backing_file_size = len(name)
            head += name
        else:
            self.backing_file_offset = self.backing_file_size = 0
        struct.pack_into(">QI", head, 8, self.backing_file_offset, self.backing_file_size)
        return bytes(head)


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Parse the first cluster (or more) of an image.  Raises HeaderError."""
    buf = bytes(buf)
    if len(buf) < V2_HEADER.size or buf[:4] != MAGIC:
        raise HeaderError("Image is not in qcow2 format")
    f = V2_HEADER.unpack_from(buf)
    h = Header(version=f[1], backing_file_offset=f[2], backing_file_size=f[3],
               cluster_bits=f[4], size=f[5], crypt_method=f[6], l1_size=f[7],
               l1_table_offset=f[8], refcount_table_offset=f[9],
               refcount_table_clusters=f[10], nb_snapshots=f[11], snapshots_offset=f[12])
    if h.version < 2 or h.version > 3:
        raise HeaderError(f"Unsupported qcow2 version {h.version}")
    if h.cluster_bits < 9 or h.cluster_bits > 21:
        raise HeaderError(f"Unsupported cluster size: 2^{h.cluster_bits}")
    if h.version == 2:
        h.incompatible_features = h.compatible_features = h.autoclear_features = 0
        h.refcount_order = 4
        h.header_length = 72
    else:
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = V3_EXTRA.unpack_from(buf, 72)
        if h.header_length < 104:
            raise HeaderError("qcow2 header too short")
        if h.header_length > h.cluster_size:
            raise HeaderError("qcow2 header exceeds cluster size")
        h.compression_type = buf[104] if h.header_length > 104 else 0
    if h.refcount_order > 6:
        raise HeaderError("Refcount width must be a power of two and may not exceed 64 bits")
    # extensions start after the header, aligned to 8 (v2: directly at 72)
    pos = h.header_length
    pos += -pos % 8
    end = h.backing_file_offset if h.backing_file_offset else min(len(buf), h.cluster_size)
    while pos + 8 <= min(end, len(buf)):
        etype, elen = struct.unpack_from(">II", buf, pos)
        pos += 8
        if etype == EXT_END:
            break
        if pos + elen > len(buf):
            raise HeaderError("Invalid extension length")
        h.extensions.append(Extension(etype, buf[pos:pos + elen]))
        pos += elen + (-elen % 8)
    if h.backing_file_offset:
        if h.backing_file_size > 1023:
            raise HeaderError("Backing file name too long")
        name = buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size]
        h.backing_file = name.decode("utf-8", "surrogateescape")
    return h


def feature_table() -> bytes:
    """The feature name table QEMU 7.2 writes (type u8, bit u8, name 46 bytes)."""
    entries = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ]
    return b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in entries)
