"""The README's feature table against qemu-storage-daemon 7.2.

What exists is read from the code (the command registry, the driver and
export registries, the schema's enums), so the table cannot claim a command
that is not registered; NOTES adds what a user must know about the limits.
``python tools/feature_table.py --write`` rewrites the README section;
tests/unit/test_readme.py fails when the README is out of date.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BEGIN = "<!-- feature-table:begin -->"
END = "<!-- feature-table:end -->"

OPTIONS = ["-h, --help", "-V, --version", "-T, --trace", "--blockdev", "--chardev",
           "--daemonize", "--export", "--monitor", "--nbd-server", "--object", "--pidfile"]

# what a user must know beyond "registered"; keys are command, driver,
# export type, chardev backend or object type names
NOTES: dict[str, str] = {
    "-T, --trace": "patterns, events=, file=; our own trace events (-T help lists them)",
    "--export": "nbd, fuse, vhost-user-blk and vduse-blk",
    "blockdev-reopen": "read-only, detect-zeroes, discard and the other reopenable "
                       "options; a file node made writable reopens its descriptor; "
                       "qcow2 cache sizes, l2-cache-entry-size, cache-clean-interval, "
                       "overlap-check, lazy-refcounts and pass-discard-* (caches "
                       "written back first, as QEMU); encrypt.* checked against the "
                       "header, the open cipher kept, as QEMU; raw offset and size (an NBD "
                       "export that exists already advertises the new size; QEMU's keeps "
                       "the old one)",
    "query-blockstats": "node counters are zero as in qemu-storage-daemon, "
                        "except wr_highest_offset",
    "vhost-user-blk": "addr unix or fd; one front-end at a time, as QEMU",
    "vduse-blk": "every option of QEMU 7.2; needs the vduse kernel module (tested in a guest); "
                 "the reconnect log as 7.2 keeps it (docs/vduse.md)",
    "chardev-change": "refused for chardevs with a monitor, as QEMU does",
    "chardev:pty": "path announced on stdout at startup and in chardev-add's reply; "
                   "one QMP greeting on the first open (QEMU may send two)",
    "chardev:socket": "unix, inet and fd; server and client; telnet, tn3270, websocket, "
                      "reconnect, tls-creds and tls-authz as QEMU (docs/chardev.md)",
    "chardev:udp": "QMP works over it (qemu-storage-daemon 7.2 crashes on the first command)",
    "chardev:parallel": "Linux ppdev (PPCLAIM); no data flows, as in QEMU",
    "chardev:mux": "up to 4 monitors; C-a h, c, t, x and C-a C-a as QEMU; C-a s does nothing "
                   "(no -snapshot)",
    "x-blockdev-change": "quorum only, as QEMU: children.N names, never below vote-threshold",
    "quorum": "vote by content (SHA-256 groups), fifo, rewrite-corrupted, blkverify=on "
              "(a mismatch exits 1, as QEMU); QUORUM_FAILURE and QUORUM_REPORT_BAD "
              "rate-limited to one a second, as QEMU's monitor",
    "blklogwrites": "dm-log-writes log byte for byte as QEMU writes it (FUA as a flush, "
                    "padding to log sectors), log-append; a discard not in whole log "
                    "sectors is narrowed (QEMU 7.2 aborts)",
    "host_cdrom": "a drive without a disc (or a device that is not a CD drive) opens and "
                  "fails I/O with ENOMEDIUM, and an NBD export of it is refused, as QEMU; "
                  "no eject or tray locking (no guest device)",
    "x-blockdev-set-iothread": "not implemented: one trio event loop, iothread objects "
                               "are accepted but have no thread",
    "iothread": "accepted and listed; requests run on the one trio loop",
    "main-loop": "accepted and listed; properties stored",
    "thread-context": "accepted and listed; properties stored",
    "pr-manager-helper": "accepted and listed; no persistent-reservation helper is run",
    "secret_keyring": "accepted; the kernel keyring is not read",
    "qcow2": "encryption: encrypt.format=luks and legacy aes (open, read, write, "
             "blockdev-create, x-blockdev-amend of LUKS key slots); overlap-check, "
             "l2-cache-entry-size (L2 slices), refcount-cache-size and cache-size as QEMU",
    "luks": "LUKS1 (7.2 has no detached header); AES-128/192/256 in xts, cbc-plain, "
            "cbc-plain64 and cbc-essiv; hashes md5, sha1, sha224, sha256, sha384, sha512; serpent, twofish, cast5 and des "
            "volumes are refused; blockdev-create and x-blockdev-amend of key slots",
    "secret": "data or file, format raw or base64, keyid/iv decryption; loaded at creation",
    "blockdev-create": "drivers file, qcow2 (encryption included), luks, rbd, vpc, vdi, qed, "
                       "qcow, parallels, vmdk and vhdx",
    "vmdk": "monolithicSparse/Flat, twoGbMaxExtentSparse/Flat, streamOptimized, vmfs, "
            "vmfsSparse; seSparse read-only; descriptor files (docs/vmdk.md)",
    "vhdx": "dynamic and fixed; log replay at open and metadata written through the log; "
            "differencing images refused, as QEMU 7.2 (docs/vhdx.md)",
    "preallocate": "prealloc-align, prealloc-size; the preallocation is cut at close "
                   "(QEMU also when the filter loses write/resize permission)",
    "compress": "over qcow2; partial clusters padded, no overwrite of a cluster, as QEMU",
    "blkverify": "a mismatch prints QEMU's message and exits 1, as qemu-storage-daemon",
    "driver:file": "aio=threads (a pool of worker threads, the default), io_uring and "
                   "native (Linux AIO, with cache.direct=on), as QEMU; cache.direct=on "
                   "with QEMU's alignment probe and padded (read-modify-write) requests",
    "throttle": "queued requests go at once when the node is drained (blockdev-del of a "
                "parent, graph changes, shutdown), as QEMU; a group serves its members in "
                "FIFO order rather than round-robin",
    "blockdev-mirror": "a mirror_top filter above the source while the job runs "
                       "(filter-node-name, else #blockNNN), as QEMU 7.2 shows it in "
                       "x-debug-query-block-graph and query-named-block-nodes; "
                       "copy-mode=write-blocking writes each guest write to the target "
                       "before completing it (the aligned part; a dirty unaligned edge "
                       "is left to the background copy, as QEMU); sync=full zeroes a "
                       "discard=unmap qcow2 target first and copies what the source "
                       "allocates, else everything, as QEMU",
    "drive-mirror": "as blockdev-mirror",
    "blockdev-backup": "a copy-before-write filter above the source while the job runs "
                       "(filter-node-name, else #blockNNN), as QEMU 7.2 shows it in "
                       "x-debug-query-block-graph and query-named-block-nodes; up to "
                       "x-perf.max-workers (64) copies of up to 1 MiB (max-chunk) at once, "
                       "zero runs written as zeroes; x-perf.use-copy-range is accepted and "
                       "ignored (no copy offload; QEMU's default is off too)",
    "drive-backup": "as blockdev-backup",
    "block-commit": "an implicitly read-only base is reopened read-write for the job; "
                    "filters while it runs as QEMU 7.2: commit_top above an "
                    "intermediate top, mirror_top above the active layer "
                    "(filter-node-name)",
    "block-stream": "a copy-on-read filter (with bottom) above the top while the job runs "
                    "(filter-node-name), as QEMU 7.2",
    "transaction": "every action type, completion-mode grouped; snapshot actions are "
                   "undone when a later action fails (the overlay leaves the chain, the "
                   "internal snapshot is deleted; a file blockdev-snapshot-sync created "
                   "stays on disk, as QEMU)",
    "change-backing-file": "the header names the new file; the node is then spelled out as "
                           "json: (its backing node is no longer the one the header names), as QEMU",
    "mirror": "mirror_top filter, background and write-blocking copy modes; see "
              "blockdev-mirror",
    "backup": "copy-before-write filter, sync full/top/bitmap/incremental/none; see "
              "blockdev-backup",
    "copy-before-write": "file, target, bitmap, on-cbw-error, cbw-timeout; a copy that "
                         "times out is cancelled (QEMU lets it finish in the background); "
                         "serves snapshot-access (fleecing)",
    "snapshot-access": "over copy-before-write: reads, block status and discard of the "
                       "point-in-time image (fleecing over NBD); the block status of a "
                       "range running past what may be read answers for its readable "
                       "start, where QEMU fails the query",
    "commit": "intermediate (commit_top filter) and active commit (mirror_top filter)",
    "stream": "copy-on-read filter while it runs",
    "nbd-server-start": "unix, inet and fd addresses; TLS with tls-creds-x509 (tls-authz: "
                        "authz-simple/authz-list), tls-creds-psk and tls-creds-anon",
    "nbd": "export: all options and meta contexts, FAST_ZERO refused where QEMU refuses it; "
           "extended headers (NBD_OPT_EXTENDED_HEADERS, from QEMU 8.2) are offered too",
    "host_device": "block and character devices (a file node with QEMU's device rules: "
                   "cannot grow, no holes reported, actual-size 0)",
    "driver:nbd": "server unix, inet or fd; export, x-dirty-bitmap, reconnect-delay, "
                  "open-timeout; structured replies and base:allocation; TLS with "
                  "tls-creds (x509, psk, anon; endpoint=client) and tls-hostname, "
                  "STARTTLS first and on every reconnect, QEMU's errors; extended headers "
                  "when the server offers them (QEMU 8.2's client; 7.2's has none); "
                  "backing files named by nbd:// URLs or json: names; multi-conn with "
                  "`x-multi-conn` (qsd-trio's member, 1-16, default 1 as QEMU: several "
                  "connections only when the server sets CAN_MULTI_CONN, each reconnected "
                  "on its own; docs/nbd-client.md)",
    "fuse": "export: /dev/fuse spoken directly in trio, any number of mounts per daemon",
    "tls-creds-psk": "NBD server: keys.psk read per handshake, TLS 1.3/1.2 PSK via pyOpenSSL "
                     "(Python's ssl has no PSK before 3.13); tls-authz not applied, as QEMU 7.2",
    "tls-creds-anon": "NBD server: anonymous DH, TLS 1.2 (as gnutls' ANON-DH)",
    "tls-cipher-suites": "accepted and listed; properties stored",
    "authz-list-file": "accepted; the rules file is read",
    "bochs": "read-only, as QEMU (growing images, v1 and v2)",
    "cloop": "read-only, as QEMU (V2.0)",
    "dmg": "read-only, as QEMU: zlib, bzip2, raw, zero and ignore chunks; lzfse as QEMU "
           "without its dmg-lzfse module (warning, EIO on read)",
}


def _registry():
    from qsd_trio.exports.base import EXPORT_TYPES
    from qsd_trio.monitor.registry import load_all
    from qsd_trio.nodes.graph import load_drivers

    # importing the command modules registers drivers and export types too
    commands = load_all()
    import qsd_trio.exports.nbd  # noqa: F401
    try:
        import qsd_trio.exports.fuse  # noqa: F401
    except ImportError:
        pass
    return commands, load_drivers(), EXPORT_TYPES


def _additions() -> set[str]:
    """The commands qsd-trio declares beside QEMU's."""
    text = (ROOT / "tools" / "qapi-qsd" / "qsd-trio.json").read_text()
    return set(re.findall(r"'command':\s*'([^']+)'", text))


def _enum_values(name: str) -> list[str]:
    from qsd_trio.qapi import qapi_types as T

    return [m.value for m in getattr(T, name)]


def _row(name: str, have: bool, table: str = "") -> str:
    # "driver:nbd" notes the nbd block driver, "nbd" the export type
    note = NOTES.get(f"{table}:{name}", NOTES.get(name, ""))
    if have:
        status = "partial" if note.startswith("partial") else "yes"
        note = note.removeprefix("partial: ")
    else:
        status = "no"
        note = note.removeprefix("not implemented: ").removeprefix("not implemented")
    return f"| `{name}` | {status} | {note} |"


def table() -> str:
    from qsd_trio.chardev.chardev import BACKENDS, implemented_backends
    from qsd_trio.monitor.control import implemented
    from qsd_trio.objects.qom import USER_CREATABLE
    from qsd_trio.qapi import schema

    commands, drivers, exports = _registry()
    ours = _additions()
    have_cmds = set(implemented()) - ours
    qemu_cmds = sorted(set(schema.command_names()) - ours)
    out = ["### Command-line options", "", "| option | status | notes |", "|---|---|---|"]
    out += [_row(o, True) for o in OPTIONS]
    out += ["", "qsd-trio's own option: `--metrics` (an OpenMetrics endpoint, see "
            "Watching it)."]
    out += ["", "### QMP commands", "",
            f"{len(have_cmds)} of the {len(qemu_cmds)} commands of "
            "qemu-storage-daemon 7.2.", "",
            "| command | status | notes |", "|---|---|---|"]
    out += [_row(c, c in have_cmds) for c in qemu_cmds]
    out += ["", "qsd-trio's own commands (tools/qapi-qsd/qsd-trio.json), also in "
            "`query-qmp-schema`: " + ", ".join(f"`{c}`" for c in sorted(ours)) + "; "
            "and one member of a QEMU type, BlockdevOptionsNbd's `x-multi-conn` "
            "(feature `unstable`)."]
    out += ["", "### Block drivers", "", "| driver | status | notes |", "|---|---|---|"]
    out += [_row(d, d in drivers, "driver") for d in sorted(_enum_values("BlockdevDriver"))]
    out += ["", "### Export types", "", "| type | status | notes |", "|---|---|---|"]
    out += [_row(t, t in exports) for t in sorted(_enum_values("BlockExportType"))]
    out += ["", "### Block jobs", "", "| job | status | notes |", "|---|---|---|"]
    job_cmds = {"mirror": "blockdev-mirror", "stream": "block-stream", "commit": "block-commit",
                "backup": "blockdev-backup", "create": "blockdev-create",
                "amend": "x-blockdev-amend"}
    out += [_row(j, c in have_cmds) for j, c in job_cmds.items()]
    out += ["", "### Character device backends", "", "| backend | status | notes |",
            "|---|---|---|"]
    made = set(implemented_backends())
    out += [_row(b, b in made, "chardev") for b in BACKENDS]
    out += ["", "### Object types (`--object`, `object-add`)", "",
            "| type | status | notes |", "|---|---|---|"]
    out += [_row(t, True) for t in sorted(USER_CREATABLE)]
    return "\n".join(out) + "\n"


def render(readme: str) -> str:
    block = f"{BEGIN}\n{table()}{END}"
    if BEGIN in readme:
        return re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, readme,
                      flags=re.S)
    return readme.replace("FEATURE_TABLE", block)


def main() -> int:
    path = ROOT / "README.md"
    text = path.read_text()
    new = render(text)
    if "--write" in sys.argv:
        path.write_text(new)
        return 0
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
