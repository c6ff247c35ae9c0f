"""The guest's kernel and initramfs, built once per machine and cached.

The kernel is Debian's ``linux-image-6.12.*+deb12-amd64-unsigned`` (Debian
12's own 6.1 kernel has no VDPA; 6.12, in bookworm-security, has
``CONFIG_VDPA_USER=m`` and ``CONFIG_VIRTIO_VDPA=m``). Its .deb is fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x``, never installed; only
``vmlinuz`` and the modules the guest loads are kept. busybox comes the same
way from ``busybox-static``. The initramfs holds busybox, those modules
(decompressed, in load order from the package's ``modules.dep``) and
``init.sh`` from this directory.

Layout of the cache (``$QSD_GUEST_CACHE``, default
``~/.cache/qsd-trio-guest``), about 15 MiB:

- ``kernel/``: ``vmlinuz``, ``kver``, ``config``, ``modules/*.ko`` and
  ``modules/order``; downloaded once, kept while the module list is the same.
- ``busybox``.
- ``initrd-<hash>.gz``: ``<hash>`` covers ``init.sh``, the module list and
  this file's format version, so editing ``init.sh`` rebuilds only the
  initramfs, without a download.

Concurrent first uses (several pytest processes, several users of one
cache) are serialised with ``flock`` on ``<cache>/.lock``.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What the guest loads; dependencies (netfs, 9pnet, vdpa, vhost_iotlb, ...)
# are added from the package's modules.dep, loaded before what needs them.
# 9p and overlay make the host's / the guest's root; vduse and virtio_vdpa
# give /dev/vduse/control and vdpa block devices; virtio_blk is the disk
# driver for both; virtio_console carries the control channel; virtio-rng
# feeds the guest's entropy pool so Python does not wait for it.
MODULES = ("9pnet_virtio", "9p", "overlay", "vduse", "virtio_vdpa", "virtio_blk",
           "virtio_console", "virtio-rng")
# The kernel must have these (y or m) for the tests to mean anything.
REQUIRED_CONFIG = ("CONFIG_VDPA_USER", "CONFIG_VIRTIO_VDPA", "CONFIG_VIRTIO_BLK",
                   "CONFIG_9P_FS", "CONFIG_OVERLAY_FS", "CONFIG_VIRTIO_PCI",
                   "CONFIG_HOTPLUG_PCI_ACPI")
KERNEL_PACKAGE = re.compile(r"^linux-image-6\.12\.([0-9]+)\+deb12-amd64-unsigned$")
FORMAT = 1  # bump when the cache layout changes
INIT = Path(__file__).with_name("init.sh")


class GuestImageError(RuntimeError):
    """The kernel or initramfs could not be built (apt, dpkg-deb, cpio)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kver: str


def cache_dir() -> Path:
    env = os.environ.get("QSD_GUEST_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "qsd-trio-guest"


def guest_image() -> GuestImage:
    """The cached kernel and initramfs, built first if missing.

    Raises:
        GuestImageError: apt cannot download a package, a tool failed, or
            the kernel lacks a required option.
    """
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    init_text = INIT.read_bytes()
    digest = hashlib.sha256(init_text + repr((FORMAT, MODULES)).encode()).hexdigest()[:16]
    initrd = cache / f"initrd-{digest}.gz"
    kdir = cache / "kernel"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _kernel_ready(kdir):
            _build_kernel(cache, kdir)
        if not (cache / "busybox").exists():
            _fetch_busybox(cache)
        if not initrd.exists():
            _build_initrd(cache, kdir, init_text, initrd)
    return GuestImage(kernel=kdir / "vmlinuz", initrd=initrd, kver=(kdir / "kver").read_text().strip())


def _kernel_ready(kdir: Path) -> bool:
    stamp = kdir / "ready"
    return stamp.exists() and stamp.read_text() == repr((FORMAT, MODULES))


def _run(*argv: str, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestImageError(f"{' '.join(argv)}: {e}") from e
    if p.returncode != 0:
        raise GuestImageError(f"{' '.join(argv)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p.stdout


def _newest_kernel_package() -> str | None:
    out = _run("apt-cache", "search", "--names-only", KERNEL_PACKAGE.pattern)
    names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    names = [n for n in names if KERNEL_PACKAGE.match(n)]
    if not names:
        return None
    return max(names, key=lambda n: int(KERNEL_PACKAGE.match(n).group(1)))  # type: ignore[union-attr]


def _download(package: str, where: Path) -> Path:
    """apt-get download ``package`` into ``where``; an apt-get update first
    when the lists do not know it (a fresh machine) and we are root."""
    try:
        _run("apt-get", "download", package, cwd=where)
    except GuestImageError:
        if os.geteuid() != 0:
            raise
        _run("apt-get", "update", "-q")
        _run("apt-get", "download", package, cwd=where)
    debs = sorted(where.glob(f"{package.split('=')[0]}_*.deb"))
    if not debs:
        raise GuestImageError(f"apt-get download {package} left no .deb in {where}")
    return debs[-1]


def _build_kernel(cache: Path, kdir: Path) -> None:
    package = os.environ.get("QSD_GUEST_KERNEL_PKG") or _newest_kernel_package()
    if package is None and os.geteuid() == 0:
        _run("apt-get", "update", "-q")
        package = _newest_kernel_package()
    if package is None:
        raise GuestImageError("apt knows no linux-image-6.12.*+deb12-amd64-unsigned package "
                              "(bookworm-security); run apt-get update")
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        work = Path(tmp)
        deb = _download(package, work)
        root = work / "x"
        _run("dpkg-deb", "-x", str(deb), str(root))
        kvers = sorted(p.name for p in (root / "lib/modules").iterdir())
        if len(kvers) != 1:
            raise GuestImageError(f"{deb.name}: expected one kernel, found {kvers}")
        kver = kvers[0]
        config = (root / "boot" / f"config-{kver}").read_text()
        for option in REQUIRED_CONFIG:
            if not re.search(rf"^{option}=[ym]$", config, re.M):
                raise GuestImageError(f"kernel {kver} lacks {option}")
        mods = root / "lib/modules" / kver
        order = _load_order(mods)
        new = work / "kernel"
        (new / "modules").mkdir(parents=True)
        for name, data in order:
            (new / "modules" / f"{name}.ko").write_bytes(data)
        (new / "modules" / "order").write_text("".join(f"{name}\n" for name, _ in order))
        shutil.copyfile(root / "boot" / f"vmlinuz-{kver}", new / "vmlinuz")
        (new / "config").write_text(config)
        (new / "kver").write_text(kver + "\n")
        (new / "package").write_text(deb.name + "\n")
        (new / "ready").write_text(repr((FORMAT, MODULES)))
        if kdir.exists():
            shutil.rmtree(kdir)
        new.rename(kdir)


def _load_order(mods: Path) -> list[tuple[str, bytes]]:
    """MODULES and what they need, dependencies first: (file name without
    .ko, the decompressed module). The package ships no modules.dep (depmod
    writes it at install), so dependencies come from each module's own
    ``.modinfo`` section (``depends=a,b``). Built-in ones (modules.builtin,
    e.g. virtio_console) are left out."""
    builtin = {_module_name(line.rsplit("/", 1)[-1]).replace("-", "_")
               for line in (mods / "modules.builtin").read_text().split()}
    files = {}
    for path in mods.rglob("*.ko*"):
        files[_module_name(path.name).replace("-", "_")] = path
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen or key in builtin:
            return
        if key not in files:
            raise GuestImageError(f"module {name} is not in the kernel package")
        seen.add(key)
        data = files[key].read_bytes()
        if files[key].name.endswith(".xz"):
            data = lzma.decompress(data)
        m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            visit(dep)
        order.append((_module_name(files[key].name), data))

    for name in MODULES:
        visit(name)
    return order


def _module_name(path: str) -> str:
    return path.split(".ko", 1)[0]


def _fetch_busybox(cache: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        work = Path(tmp)
        deb = _download("busybox-static", work)
        _run("dpkg-deb", "-x", str(deb), str(work / "x"))
        shutil.copyfile(work / "x/bin/busybox", work / "busybox")
        (work / "busybox").chmod(0o755)
        (work / "busybox").rename(cache / "busybox")


def _build_initrd(cache: Path, kdir: Path, init_text: bytes, initrd: Path) -> None:
    """A newc cpio archive, gzip'd: /init, /bin/busybox, /mods/*.ko, /kver,
    and the empty directories init mounts on."""
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "host", "share", "ovl", "newroot", "mods"):
            (root / d).mkdir(parents=True)
        shutil.copyfile(cache / "busybox", root / "bin/busybox")
        (root / "bin/busybox").chmod(0o755)
        for ko in (kdir / "modules").iterdir():
            shutil.copyfile(ko, root / "mods" / ko.name)
        shutil.copyfile(kdir / "kver", root / "kver")
        (root / "init").write_bytes(init_text)
        (root / "init").chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        cpio = _cpio(cache / "busybox", root, names)
        tmp_out = initrd.with_suffix(".tmp")
        with gzip.open(tmp_out, "wb", compresslevel=1) as f:
            f.write(cpio)
        tmp_out.rename(initrd)
    for old in cache.glob("initrd-*.gz"):
        if old != initrd:
            old.unlink()


def _cpio(busybox: Path, root: Path, names: list[str]) -> bytes:
    p = subprocess.run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=root,
                       input=("\n".join(names) + "\n").encode(), capture_output=True, timeout=120)
    if p.returncode != 0:
        raise GuestImageError(f"cpio failed: {p.stderr.decode(errors='replace')}")
    return p.stdout
