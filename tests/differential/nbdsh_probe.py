"""What libnbd sees of an NBD server, as JSON on stdout.

Run by nbdsh (Debian's python3-libnbd, with the system Python, not the
project's venv): ``NBD_SOCK=... nbdsh -n -c "exec(open(PATH).read())"``.
The server must export ``x`` (read-only, allocation-depth, a bitmap ``b0``)
and ``w`` (writable qcow2 with data in its first MiB).  Every call's result
or libnbd error (errno name and text) is recorded, so two servers can be
compared entry by entry.
"""

import json
import os

import nbd

SOCK = os.environ["NBD_SOCK"]
CONTEXTS = ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0")


def call(fn):
    try:
        r = fn()
    except nbd.Error as e:
        return ["error", e.errno, e.string]
    return ["ok", r if isinstance(r, (int, str, bool, list, type(None))) else repr(r)]


def options() -> dict:
    """Option haggling in libnbd's opt mode: NBD_OPT_LIST, INFO, LIST_META_CONTEXT."""
    out = {}
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(SOCK)
    out["structured"] = h.get_structured_replies_negotiated()
    names = []
    h.opt_list(lambda name, desc: names.append([name, desc]))
    out["list"] = sorted(names)
    info = {}
    for name in sorted(n for n, _ in names) + ["nope"]:
        h.set_export_name(name)
        r = call(h.opt_info)
        d = {"opt_info": r}
        if r[0] == "ok":
            d.update(
                size=h.get_size(), ro=h.is_read_only(), flush=h.can_flush(), fua=h.can_fua(),
                trim=h.can_trim(), zero=h.can_zero(), fast_zero=h.can_fast_zero(),
                df=h.can_df(), multi_conn=h.can_multi_conn(), cache=h.can_cache(),
                rotational=h.is_rotational(),
                block=[h.get_block_size(k)
                       for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)],
                canonical=call(h.get_canonical_export_name),
                description=call(h.get_export_description))
        info[name] = d
    out["info"] = info
    listed = {}
    for queries in ([], ["base:"], ["qemu:"], ["qemu:dirty-bitmap:"],
                    ["base:allocation", "nope:x", "qemu:dirty-bitmap:b0"]):
        h.set_export_name("x")
        h.clear_meta_contexts()
        for q in queries:
            h.add_meta_context(q)
        got = []
        n = call(lambda got=got: h.opt_list_meta_context(lambda c: got.append(c) or 0))
        listed[" ".join(queries) or "(all)"] = [n, sorted(got)]
    out["list_meta_context"] = listed
    h.opt_abort()
    return out


def connect(name: str, structured: bool = True, contexts=CONTEXTS):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(name)
    h.set_strict_mode(0)  # let the server, not libnbd, judge bad requests
    h.connect_unix(SOCK)
    return h


def read_only(structured: bool) -> dict:
    h = connect("x", structured)
    size = h.get_size()
    extents = {}

    def extent(metacontext, offset, entries, err):
        extents.setdefault(metacontext, []).append([offset, list(entries)])
        return 0

    d = {
        "structured": h.get_structured_replies_negotiated(),
        "meta": {c: call(lambda c=c: h.can_meta_context(c)) for c in CONTEXTS},
        "block_status": call(lambda: h.block_status(24 << 20, 0, extent)),
        "block_status_req_one": call(lambda: h.block_status(8 << 20, 1 << 20, lambda *a: 0,
                                                            nbd.CMD_FLAG_REQ_ONE)),
        "read": call(lambda: h.pread(4096, 1 << 20)[:4].hex()),
        "read_hole": call(lambda: h.pread(4096, 40 << 20).hex().strip("0")),
        "read_past_eof": call(lambda: h.pread(4096, size - 2048)),
        "read_offset_past_eof": call(lambda: h.pread(512, size + 4096)),
        "read_df": call(lambda: len(h.pread(65536, 0, nbd.CMD_FLAG_DF))),
        "read_bad_flags": call(lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE)),
        "write_ro": call(lambda: h.pwrite(b"x" * 512, 0)),
        "zero_ro": call(lambda: h.zero(4096, 0)),
        "trim_ro": call(lambda: h.trim(4096, 0)),
        "flush": call(h.flush),
        "cache": call(lambda: h.cache(65536, 0)),
    }
    d["extents"] = extents
    h.shutdown()
    return d


def writable() -> dict:
    h = connect("w", True, ("base:allocation",))
    size = h.get_size()
    d = {
        "write_fua": call(lambda: h.pwrite(b"a" * 4096, 0, nbd.CMD_FLAG_FUA)),
        "write_past_eof": call(lambda: h.pwrite(b"a" * 4096, size - 2048)),
        "zero_past_eof": call(lambda: h.zero(8192, size - 4096)),
        "trim_past_eof": call(lambda: h.trim(8192, size - 4096)),
        "fast_zero_cluster": call(lambda: h.zero(65536, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)),
        "fast_zero_in_data": call(lambda: h.zero(512, 1024, nbd.CMD_FLAG_FAST_ZERO)),
        "zero_in_data": call(lambda: h.zero(512, 1024)),
        "zero_no_hole": call(lambda: h.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE)),
        "trim": call(lambda: h.trim(65536, 3 << 20)),
        "read_back": call(lambda: [bytes(set(h.pread(512, o))).hex() for o in (0, 1024, 1536)]),
        "flush": call(h.flush),
    }
    h.shutdown()
    return d


print(json.dumps({"options": options(), "x": read_only(True), "x-simple": read_only(False),
                  "w": writable()}, indent=1, sort_keys=True))
