"""I/O on a guest's virtio-blk disk, checked against a model of its bytes.

A ``Workload`` is a list of operations the guest runs with the host's tools
on ``$DEV`` (O_DIRECT and buffered ``dd``, ``blkdiscard``, ``blkdiscard -z``,
``fallocate --punch-hole``, ``sync``) and a ``bytearray`` of what the disk
must then hold. The data written comes from files the host writes into the
guest's share. ``script()`` returns the bash that runs them and reads the
whole disk back with O_DIRECT into the share, with the block device's sysfs
counters before and after and its configuration as the guest sees it;
``check()`` compares the read-back bytes and the counters with the model.
After the export is gone the test compares the image itself
(``image_bytes``).

Discards are cluster-aligned and the images have ``discard=unmap`` on every
node and no backing file, so a discarded range reads as zeroes on both
daemons (QEMU drops the unaligned head and tail of a qcow2 discard).
"""

from __future__ import annotations

import random
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB

# /sys/block/<dev>/stat fields (Documentation/block/stat.rst), 0-based
STAT_READS, STAT_WRITES, STAT_DISCARDS, STAT_FLUSHES = 0, 4, 11, 15

# What the guest's sysfs says of the disk: the virtio-blk config space and
# features as its driver read them. queue/* are relative to /sys/block/<dev>.
CONFIG_FILES = (
    "size", "queue/logical_block_size", "queue/physical_block_size",
    "queue/minimum_io_size", "queue/optimal_io_size", "queue/max_segments",
    "queue/max_hw_sectors_kb", "queue/max_segment_size",
    "queue/discard_granularity", "queue/discard_max_hw_bytes",
    "queue/max_discard_segments", "queue/write_zeroes_max_bytes",
    "queue/write_cache", "queue/fua", "ro", "cache_type", "serial", "device/features",
)


def find_disk(sysfs_glob: str, timeout: int = 60) -> str:
    """Bash that waits (bounded) for a block device under ``sysfs_glob`` and
    sets D (its name) and DEV (its node)."""
    g = shlex.quote(sysfs_glob)
    return f"""
wait_for {timeout} compgen -G {g} >/dev/null || {{ echo "no block device at "{g}; exit 90; }}
p=$(compgen -G {g} | head -1); D=${{p##*/}}; DEV=/dev/$D
wait_for 10 test -b "$DEV" || {{ echo "no node $DEV"; exit 91; }}
"""


def config_script(out: Path) -> str:
    """Bash that writes ``name<TAB>value`` lines of CONFIG_FILES for $D, and
    the number of request queues, into ``out`` (with shell builtins only:
    each process costs a tenth of a second in the guest)."""
    files = " ".join(CONFIG_FILES)
    return f"""
for f in {files}; do
  v='?'; read -r v < /sys/block/$D/$f
  printf '%s\\t%s\\n' "$f" "$v"
done > {shlex.quote(str(out))} 2>/dev/null
q=(/sys/block/$D/mq/*); printf 'queues\\t%s\\n' ${{#q[@]}} >> {shlex.quote(str(out))}
"""


def read_config(path: Path) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in path.read_text().splitlines())


@dataclass
class Workload:
    """Operations on a disk of ``size`` bytes, block size ``lbs``, and the
    model of its contents (zeroes at first: a fresh image). ``dir`` is in
    the guest's share: the data files and what the guest reads back.
    With ``cpus`` > 1 the operations run on the guest's CPUs in turn
    (taskset), so that each of the driver's request queues carries some:
    blk-mq maps each CPU to its own queue when there are as many."""

    dir: Path
    size: int
    lbs: int = 512
    seed: int = 0
    cpus: int = 1
    model: bytearray = field(init=False)
    lines: list[str] = field(default_factory=list)
    expected: dict[int, int] = field(default_factory=dict)  # stat field -> minimum increase

    def __post_init__(self) -> None:
        self.model = bytearray(self.size)
        self.rng = random.Random(self.seed)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.readback = self.dir / "readback"
        self.buffered = self.dir / "buffered"
        self.config = self.dir / "config"
        self.stats = self.dir / "stats"

    def _add(self, command: str) -> None:
        if self.cpus > 1:
            command = f"taskset -c {len(self.lines) % self.cpus} {command}"
        self.lines.append(command)

    def _range(self, offset: int, length: int) -> None:
        assert offset % self.lbs == 0 and length % self.lbs == 0, (offset, length)
        assert 0 <= offset and offset + length <= self.size, (offset, length)

    def write(self, offset: int, length: int, *, direct: bool) -> None:
        """dd random bytes to ``offset``: O_DIRECT, or buffered and then
        fsync'd (which sends a flush when the write cache is on)."""
        self._range(offset, length)
        data = self.rng.randbytes(length)
        src = self.dir / f"data-{len(self.lines)}"
        src.write_bytes(data)
        self.model[offset:offset + length] = data
        flags = "oflag=direct,seek_bytes conv=notrunc" if direct else \
            "oflag=seek_bytes conv=notrunc,fsync"
        self._add(f"dd if={src} of=$DEV bs=64k seek={offset} {flags} status=none")
        self.expected[STAT_WRITES] = 1

    def discard(self, offset: int, length: int) -> None:
        self._range(offset, length)
        self.model[offset:offset + length] = bytes(length)
        self._add(f"blkdiscard -o {offset} -l {length} $DEV")
        self.expected[STAT_DISCARDS] = 1

    def write_zeroes(self, offset: int, length: int) -> None:
        """BLKZEROOUT: a WRITE_ZEROES request without the unmap flag."""
        self._range(offset, length)
        self.model[offset:offset + length] = bytes(length)
        self._add(f"blkdiscard -z -o {offset} -l {length} $DEV")

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate PUNCH_HOLE on the block device: WRITE_ZEROES with the
        unmap flag."""
        self._range(offset, length)
        self.model[offset:offset + length] = bytes(length)
        self._add(f"fallocate --punch-hole --keep-size -o {offset} -l {length} $DEV")

    def flush(self) -> None:
        """fsync the block device: a FLUSH request (write cache on)."""
        self._add("sync $DEV")
        self.expected[STAT_FLUSHES] = 1

    def random_reads(self, *, depth: int, seconds: int, bs: str = "4k") -> None:
        """fio's random O_DIRECT reads over the whole disk, ``depth`` in
        flight for ``seconds``: any error fails the workload (fio exits
        non-zero); the data is checked by the read-back after."""
        self._add(f"fio --name=reads --filename=$DEV --rw=randread --bs={bs} "
                  f"--iodepth={depth} --ioengine=libaio --direct=1 --time_based "
                  f"--runtime={seconds} --output=/dev/null")

    def standard(self) -> Workload:
        """The tests' usual mix over a disk of at least 12 MiB: O_DIRECT and
        buffered writes, an overwrite inside an earlier write, sub-4 KiB
        O_DIRECT writes when the block size allows, discard, both kinds of
        write-zeroes, the last block of the disk, flushes."""
        assert self.size >= 12 * MiB
        self.write(1 * MiB, 1 * MiB, direct=True)
        if self.lbs < 4096:
            self.write(3 * MiB + 5 * self.lbs, 3 * self.lbs, direct=True)
        self.write(8 * MiB, 2 * MiB, direct=False)
        self.write(1 * MiB + 200 * KiB, 96 * KiB, direct=True)
        self.discard(1 * MiB + 512 * KiB, 256 * KiB)
        self.write_zeroes(9 * MiB, 512 * KiB)
        self.punch_hole(8 * MiB + 256 * KiB, 128 * KiB)
        self.write(self.size - 64 * KiB, 64 * KiB, direct=True)
        self.flush()
        return self

    def script(self) -> str:
        """Bash (after find_disk) that records the configuration, turns the
        write cache on if it is off (the virtio-blk writeback toggle:
        SET_CONFIG, read back with GET_CONFIG; so that flushes reach the
        device), runs the operations and reads everything back."""
        stats = shlex.quote(str(self.stats))
        body = "\n".join(f"{ln} || {{ echo 'failed: {ln}'; exit 92; }}" for ln in self.lines)
        return f"""
{config_script(self.config)}
read -r c < /sys/block/$D/cache_type
if [ "$c" != 'write back' ]; then
  echo 'write back' > /sys/block/$D/cache_type || {{ echo 'cannot set the write cache'; exit 93; }}
fi
printf 'cache_type after the toggle\t%s\n' "$(cat /sys/block/$D/cache_type)" >> {self.config}
cat /sys/block/$D/stat > {stats}
{body}
cat /sys/block/$D/stat >> {stats}
dd if=$DEV of={self.readback} bs=1M iflag=direct status=none || exit 94
echo 3 > /proc/sys/vm/drop_caches
dd if=$DEV of={self.buffered} bs=1M iflag=skip_bytes,count_bytes skip={8 * MiB} \
  count={2 * MiB} status=none || exit 95
"""

    def check(self) -> dict[str, str]:
        """Compare what the guest read back and its counters with the model;
        returns the configuration the guest saw."""
        back = self.readback.read_bytes()
        assert len(back) == self.size, f"read {len(back)} bytes of {self.size}"
        assert_same(back, self.model, "the guest's O_DIRECT read-back")
        buffered = self.buffered.read_bytes()
        assert_same(buffered, self.model[8 * MiB:10 * MiB], "the guest's buffered read",
                    base=8 * MiB)
        before, after = ([int(x) for x in ln.split()]
                         for ln in self.stats.read_text().splitlines())
        for fieldno, minimum in self.expected.items():
            assert after[fieldno] - before[fieldno] >= minimum, (
                f"/sys/block/*/stat field {fieldno + 1} did not grow: {before} -> {after}")
        return read_config(self.config)


def assert_same(got: bytes, want: bytes | bytearray, what: str, base: int = 0) -> None:
    """AssertionError naming the first differing 4 KiB block."""
    if got == want:
        return
    assert len(got) == len(want), f"{what}: {len(got)} bytes, expected {len(want)}"
    first = next(i for i in range(0, len(got), 4096) if got[i:i + 4096] != want[i:i + 4096])
    nblocks = sum(1 for i in range(0, len(got), 4096) if got[i:i + 4096] != want[i:i + 4096])
    raise AssertionError(f"{what}: {nblocks} 4 KiB blocks differ from the model, the first at "
                         f"offset {base + first:#x}")


def image_bytes(path: Path, fmt: str) -> bytes:
    """The guest-visible bytes of an image (qemu-img convert to raw)."""
    if fmt == "raw":
        return path.read_bytes()
    raw = path.with_name(path.name + ".flat")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)],
                   check=True, capture_output=True, timeout=120)
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()


def qemu_img_check(path: Path, fmt: str) -> str:
    """qemu-img check's output; AssertionError if it found anything."""
    p = subprocess.run(["qemu-img", "check", "-f", fmt, str(path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, f"qemu-img check {path}: {p.returncode}\n{p.stdout}{p.stderr}"
    return p.stdout
