"""VMDK images qemu-img cannot make, written here from the formats' layouts
(not from qsd-trio's driver) for the vmdk tests: an ESXi seSparse extent
under a descriptor, a VMware-style stream whose grain directory is in the
footer, and a COWD (vmfsSparse) extent.  Each builder takes the guest data
and returns what the image must read as; the differential tests check that
qemu-storage-daemon reads them so too."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SECTOR = 512


def descriptor(create_type: str, extents: list[str], cid: int = 0x1234abcd,
               parent_cid: int = 0xFFFFFFFF, extra: str = "") -> bytes:
    lines = [f'RW {line}\n' for line in extents]
    return (f"# Disk DescriptorFile\nversion=1\nCID={cid:x}\nparentCID={parent_cid:x}\n"
            f'createType="{create_type}"\n{extra}\n# Extent description\n{"".join(lines)}\n'
            f'# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n').encode()


def sesparse(stem: Path, sectors: int, grains: dict[int, bytes | str]) -> tuple[Path, bytes]:
    """``stem``.vmdk naming ``stem``-sesparse.vmdk, an seSparse extent of
    ``sectors`` sectors whose 4 KiB grains are ``grains`` (index -> data, or
    "zero" / "unmapped" for the entries that read as zeroes); the rest
    unallocated.  Returns the descriptor's path and the guest data."""
    grain = 8 * SECTOR
    per_gt = 4096
    n_grains = -(-sectors * SECTOR // grain)
    n_gts = -(-n_grains // per_gt)
    gd_sectors = max(1, -(-n_gts * 8 // SECTOR))
    gt_sectors = per_gt * 8 // SECTOR  # 64
    gd_at = 2
    gts_at = gd_at + gd_sectors
    data_at = gts_at + n_gts * gt_sectors
    used = sorted(i for i, g in grains.items() if isinstance(g, bytes))
    const = struct.pack("<26Q", 0xCAFEBABE, 0x0000000200000001, sectors, 8, 64, 0, 0, 0, 0, 0,
                        1, 1, 0, 0, 0, 0, gd_at, gd_sectors, gts_at, n_gts * gt_sectors,
                        0, 0, 0, 0, data_at, len(used) * 8).ljust(SECTOR, b"\0")
    volatile = struct.pack("<4Q", 0xCAFECAFE, n_gts, 1, 0).ljust(SECTOR, b"\0")
    gd = bytearray(gd_sectors * SECTOR)
    gts = bytearray(n_gts * gt_sectors * SECTOR)
    out = bytearray(sectors * SECTOR)
    body = bytearray()
    for t in range(n_gts):
        struct.pack_into("<Q", gd, t * 8, 0x1000000000000000 | t)
    for i, g in grains.items():
        if g == "zero":
            e = 0x2000000000000000
        elif g == "unmapped":
            e = 0x1000000000000000
        else:
            assert isinstance(g, bytes) and len(g) == grain
            k = used.index(i)  # the grain's index in the grains area
            e = 0x3000000000000000 | ((k & 0xFFF) << 48) | (k >> 12)
            out[i * grain:(i + 1) * grain] = g[:max(0, len(out) - i * grain)]
        struct.pack_into("<Q", gts, i * 8, e)
    for i in used:
        body += grains[i]  # type: ignore[operator]
    ext = stem.with_name(stem.name + "-sesparse.vmdk")
    ext.write_bytes(const + volatile + bytes(gd) + bytes(gts) + bytes(body))
    desc = stem.with_name(stem.name + ".vmdk")
    desc.write_bytes(descriptor("seSparse", [f'{sectors} SESPARSE "{ext.name}"']))
    return desc, bytes(out)


def _marker(val: int, size: int, kind: int) -> bytes:
    return struct.pack("<QII", val, size, kind).ljust(SECTOR, b"\0")


def _vmdk4(capacity: int, gd_offset: int, grain_offset: int, *, desc_size: int) -> bytes:
    h = struct.pack("<IIQQQQIQQQc4sH", 3, 0x30001, capacity, 128, 1, desc_size, 512, 0,
                    gd_offset, grain_offset, b"\0", b"\n \r\n", 1)
    return (b"KDMV" + h).ljust(SECTOR, b"\0")


def vmware_stream(path: Path, data: bytes) -> bytes:
    """A streamOptimized image as VMware writes one: the header's grain
    directory "at the end", the real one in the footer; each non-zero grain
    compressed behind its marker, each grain table behind a table marker
    (tables without grains left out: their directory entry is 0), the
    directory behind its marker, then the footer and the end-of-stream
    marker.  Returns the guest data (``data`` in whole sectors)."""
    data = data + bytes(-len(data) % SECTOR)
    capacity = len(data) // SECTOR
    cluster = 128 * SECTOR
    n_grains = -(-len(data) // cluster)
    n_gts = -(-n_grains // 512)
    desc = descriptor("streamOptimized", [f'{capacity} SPARSE "{path.name}"'])
    desc_sectors = -(-len(desc) // SECTOR)
    body = bytearray(_vmdk4(capacity, 0xFFFFFFFFFFFFFFFF, 0, desc_size=desc_sectors))
    body += desc.ljust(desc_sectors * SECTOR, b"\0")
    tables = [[0] * 512 for _ in range(n_gts)]
    for g in range(n_grains):
        chunk = data[g * cluster:(g + 1) * cluster]
        if not any(chunk):
            continue
        z = zlib.compress(chunk)
        tables[g // 512][g % 512] = len(body) // SECTOR
        rec = struct.pack("<QI", g * 128, len(z)) + z
        body += rec.ljust(-(-len(rec) // SECTOR) * SECTOR, b"\0")
    gd = [0] * n_gts
    for t, table in enumerate(tables):
        if any(table):
            body += _marker(4, 0, 1)
            gd[t] = len(body) // SECTOR
            body += struct.pack(f"<{512}I", *table)
    gd_sectors = max(1, -(-n_gts * 4 // SECTOR))
    body += _marker(gd_sectors, 0, 2)
    gd_at = len(body) // SECTOR
    body += struct.pack(f"<{n_gts}I", *gd).ljust(gd_sectors * SECTOR, b"\0")
    body += _marker(1, 0, 3)
    body += _vmdk4(capacity, gd_at, 0, desc_size=desc_sectors)
    body += _marker(0, 0, 0)
    path.write_bytes(bytes(body))
    return data


def cowd(path: Path, sectors: int, grains: dict[int, bytes], granularity: int = 16) -> bytes:
    """A COWD (VMDK3, vmfsSparse) extent of ``sectors`` sectors with grains
    of ``granularity`` sectors, 4096 entries per grain table, every table
    present; the descriptor text a standalone open reads at sector 1.
    Returns the guest data."""
    gsize = granularity * SECTOR
    n_grains = -(-sectors // granularity)
    n_gts = -(-n_grains // 4096)
    gd_at = 21
    gd_sectors = max(1, -(-n_gts * 4 // SECTOR))
    gts_at = gd_at + gd_sectors
    grains_at = gts_at + n_gts * 32
    header = b"COWD" + struct.pack("<10I", 1, 3, sectors, granularity, gd_at, n_gts, 0, 0, 0, 0)
    img = bytearray(header.ljust(SECTOR, b"\0"))
    img += descriptor("vmfsSparse", [f'{sectors} VMFSSPARSE "{path.name}"']).ljust(20 * SECTOR,
                                                                                    b"\0")
    img += struct.pack(f"<{n_gts}I", *[gts_at + 32 * t for t in range(n_gts)]).ljust(
        gd_sectors * SECTOR, b"\0")
    gts = bytearray(n_gts * 32 * SECTOR)
    out = bytearray(sectors * SECTOR)
    body = bytearray()
    for k, (i, g) in enumerate(sorted(grains.items())):
        assert len(g) == gsize
        struct.pack_into("<I", gts, i * 4, grains_at + k * granularity)
        body += g
        out[i * gsize:(i + 1) * gsize] = g[:max(0, len(out) - i * gsize)]
    img += gts + body
    path.write_bytes(bytes(img))
    return bytes(out)
