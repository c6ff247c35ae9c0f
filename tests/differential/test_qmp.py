"""QMP on the wire: one transcript, both daemons, the same replies.

Normalised: the version numbers and package string of query-version and the
greeting (we report the 7.2 schema we implement, and name ourselves)."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.helpers import BACKUP_BLOCK_SIZE_WARNING, HAVE_QEMU

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

TRANSCRIPT = [
    b'{"execute":"query-version"}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
    b'{"execute":"qmp_capabilities"}',
    b"[1,2]",
    b"123",
    b'{"foo":1}',
    b'{"execute":1}',
    b'{"execute":"nope","id":{"a":[1]}}',
    b'{"execute":"query-version","id":5,"extra":1}',
    b'{"execute":"query-version","arguments":[]}',
    b'{"execute":"query-version","arguments":{"a":1}}',
    b'{"exec-oob":"query-version"}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co"}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","size":"x"}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n","bogus":1}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n"}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n"}}',
    b'{"execute":"blockdev-del","arguments":{"node-name":"x"}}',
    b'{"execute":"blockdev-del","arguments":{"node-name":"n"}}',
    (b'{"execute" : "query-version" , "id":1} {"execute":"query-version","id":2}', 2),
    b'{"execute": "query-ver',  # the newline sent after it ends the string
    b'sion"}',
    b'{"execute": foo}',
    b"}",
    b"{'execute':'query-version','id':'single'}",
    b'{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io0"}}',
    b'{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io0"}}',
    b'{"execute":"object-add","arguments":{"qom-type":"iothread","id":"bad id"}}',
    b'{"execute":"object-add","arguments":{"qom-type":"bogus","id":"x"}}',
    b'{"execute":"qom-list","arguments":{"path":"/objects"}}',
    b'{"execute":"qom-get","arguments":{"path":"/objects/io0","property":"poll-max-ns"}}',
    b'{"execute":"qom-set","arguments":{"path":"/objects/io0","property":"poll-max-ns","value":7}}',
    b'{"execute":"qom-get","arguments":{"path":"/objects/io0","property":"poll-max-ns"}}',
    b'{"execute":"qom-get","arguments":{"path":"/objects/io0","property":"nope"}}',
    b'{"execute":"qom-list","arguments":{"path":"/nope"}}',
    b'{"execute":"qom-list-properties","arguments":{"typename":"nope"}}',
    b'{"execute":"object-del","arguments":{"id":"io0"}}',
    b'{"execute":"object-del","arguments":{"id":"io0"}}',
    b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"null"}}}',
    b'{"execute":"chardev-add","arguments":{"id":"r","backend":{"type":"ringbuf","data":{"size":1024}}}}',
    b'{"execute":"chardev-add","arguments":{"id":"r2","backend":{"type":"ringbuf","data":{"size":1000}}}}',
    b'{"execute":"ringbuf-write","arguments":{"device":"r","data":"aGVsbG8=","format":"base64"}}',
    b'{"execute":"ringbuf-write","arguments":{"device":"r","data":"a/\\u00e9\\t\\u20ac"}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"r","size":100}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"qmp0","size":100}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"zz","size":100}}',
    b'{"execute":"chardev-send-break","arguments":{"id":"r"}}',
    b'{"execute":"chardev-send-break","arguments":{"id":"zz"}}',
    b'{"execute":"chardev-remove","arguments":{"id":"qmp0"}}',
    b'{"execute":"chardev-remove","arguments":{"id":"zz"}}',
    b'{"execute":"chardev-remove","arguments":{"id":"r"}}',
    # bytes that are not UTF-8: 0xFE/0xFF are lexical errors even in a
    # string, a non-ASCII byte outside one is a stray, and inside one only
    # modified UTF-8's NUL (C0 80) passes
    (b'{"execute": "query-version\xfe"}', 2),
    b'"\xff"',
    (b'\xc3\xa9{"execute":"query-version","id":"e"}', 2),
    b'{"execute": "a\x80b"}',
    b'{"execute": "a\xc0\x80b"}',
    b'{"execute": "a\xe0\x80\x80b"}',
    b'{"execute": "a\xed\xa0\x80b"}',
    b'{"execute": "a\xef\xbf\xbeb"}',
    b'{"execute": "a\xf4\x90\x80\x80b"}',
    b'{"execute": "a\xf0\x9f\x98\x80b"}',
    b'{"execute": "x", "arguments": {"a\xe2\x82": 1}}',
    # escapes: \u0000 is taken, lone surrogates and noncharacters are not
    b'{"execute": "a\\u0000b"}',
    b'{"execute": "a\\uD800b"}',
    b'{"execute": "a\\udc00b"}',
    b'{"execute": "a\\uD83Dxb"}',
    b'{"execute": "a\\uD83F\\uDFFEb"}',
    b'{"execute": "a\\uFDD0b"}',
    b'{"execute": "a\\uD83D\\uDE00b"}',
    # a NUL is kept as C0 80 (modified UTF-8) and printed back as \u0000
    b'{"execute":"chardev-add","arguments":{"id":"n","backend":{"type":"ringbuf","data":{}}}}',
    b'{"execute":"ringbuf-write","arguments":{"device":"n","data":"a\\u0000b\xc0\x80c"}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"n","size":100,"format":"base64"}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"n","size":100}}',
    b'{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"a\\u0000"}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f0",'
    b'"filename":"/nonexistent/a\\u0000b"}}',
]


def transcript(d) -> list:
    """Send each message and read the replies it must produce (one, unless
    the entry says otherwise), then check nothing else arrives.  Replies are
    kept as the bytes on the wire: key order and spacing must match too."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.qmp_path))
        s.settimeout(30)
        with s.makefile("rb") as f:
            out = [f.readline().decode()]
            for entry in TRANSCRIPT:
                msg, count = entry if isinstance(entry, tuple) else (entry, 1)
                s.sendall(msg + b"\n")
                out.append((msg.decode(errors="backslashreplace"),
                            [f.readline().decode() for _ in range(count)]))
            # nothing unexpected is pending: the next reply answers the next command
            s.sendall(b'{"execute": "query-version", "id": "end"}\n')
            last = json.loads(f.readline())
            assert last.get("id") == "end", (out, last)
    return out


VERSION = re.compile(r'\{"micro": \d+, "minor": \d+, "major": \d+\}, "package": "[^"]*"')


def normalise(replies: list) -> list:
    # every reply is valid JSON; the version numbers and the package string
    # of the greeting and query-version are the only bytes that may differ
    for line in [replies[0]] + [r for _, rs in replies[1:] for r in rs]:
        json.loads(line)
    greeting = VERSION.sub("VERSION", replies[0])
    return [greeting] + [(m, [VERSION.sub("VERSION", r) for r in rs]) for m, rs in replies[1:]]


def test_same_transcript(daemon_factory):
    theirs = normalise(transcript(daemon_factory("qemu", qmp=True)))
    ours = normalise(transcript(daemon_factory("trio", qmp=True)))
    assert "VERSION" in ours[0]
    assert ours[0] == theirs[0]
    for (msg, o), (_, t) in zip(ours[1:], theirs[1:], strict=True):
        assert o == t, msg


def test_query_commands_is_a_subset_in_qemu_order(daemon_factory):
    theirs = [c["name"] for c in daemon_factory("qemu").qmp().cmd_raw("query-commands")["return"]]
    ours = [c["name"] for c in daemon_factory("trio").qmp().cmd_raw("query-commands")["return"]]
    # qsd-trio's own commands (tools/qapi-qsd) come first, in reverse order
    # of declaration as QEMU's do
    assert ours[:2] == ["x-query-node-stats", "x-query-tasks"]
    ours = ours[2:]
    assert set(ours) <= set(theirs)
    assert ours == [n for n in theirs if n in ours]
    # everything issue 2 promises is there
    for name in ("qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
                 "quit", "object-add", "object-del", "qom-list-types", "qom-list", "qom-get",
                 "qom-set", "qom-list-properties", "chardev-add", "chardev-remove",
                 "chardev-change", "chardev-send-break", "query-chardev",
                 "query-chardev-backends", "ringbuf-read", "ringbuf-write", "blockdev-add",
                 "blockdev-del", "query-named-block-nodes"):
        assert name in ours


def test_blockdev_del_refusals_match(daemon_factory, tmp_path):
    """A backing node, a file child and an exported node each refuse
    blockdev-del in QEMU's words."""
    from tests.helpers import qemu_img

    base, top = tmp_path / "b.qcow2", tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    steps = [
        ("blockdev-add", {"driver": "qcow2", "node-name": "base",
                          "file": {"driver": "file", "filename": str(base)}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "base",
                          "file": {"driver": "file", "filename": str(top)}}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(base),
                          "read-only": True}),
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f", "read-only": True}),
        ("blockdev-del", {"node-name": "f"}),
        ("blockdev-del", {"node-name": "ov"}),
        ("blockdev-del", {"node-name": "base"}),
    ]
    replies = {}
    for kind in ("qemu", "trio"):
        qmp = daemon_factory(kind).qmp()
        replies[kind] = [qmp.cmd_raw(name, args) for name, args in steps]
    assert replies["trio"] == replies["qemu"]
    assert replies["trio"][2] == {"error": {"class": "GenericError", "desc":
                                            "Node 'base' is busy: node is used as backing hd of 'ov'"}}


# replies and events built from many members: QEMU prints each object in
# QDict bucket order, which the bytes must reproduce (not just equal JSON)
STRUCTURED = [
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1048576}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":"n0"}}',
    b'{"execute":"block-dirty-bitmap-add","arguments":{"node":"r0","name":"b0"}}',
    # a filter shows its child's file name, a parent above spells it all out
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1","size":65536}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"t1","size":65536}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"copy-before-write","node-name":"f1",'
    b'"file":"n1","target":"t1"}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r1","file":"f1"}}',
    b'{"execute":"query-named-block-nodes"}',
    b'{"execute":"query-named-block-nodes","arguments":{"flat":true}}',
    b'{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":"r0"}}',
    b'{"execute":"query-block-exports"}',
    b'{"execute":"query-block"}',
    b'{"execute":"x-debug-query-block-graph"}',
    b'{"execute":"block-export-del","arguments":{"id":"e0"}}',
    b'{"execute":"query-version"}',
]


def structured_transcript(d) -> list[str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.qmp_path))
        s.settimeout(30)
        with s.makefile("rb") as f:
            f.readline()
            s.sendall(b'{"execute":"qmp_capabilities"}\n')
            f.readline()
            lines = []
            for msg in STRUCTURED:
                s.sendall(msg + b"\n")
                # the reply; block-export-del also an event, which both daemons
                # send after the reply (the export ends once it has no clients)
                want = 2 if b"block-export-del" in msg else 1
                lines += [f.readline().decode() for _ in range(want)]
    # the export's deletion event carries a timestamp, the only other difference
    return [VERSION.sub("VERSION", re.sub(r'"seconds": \d+, "microseconds": \d+',
                                          "TIME", line)) for line in lines]


def test_structured_replies_are_byte_identical(daemon_factory, tmp_path):
    nbd = ["--nbd-server", f"addr.type=unix,addr.path={tmp_path}/nbd-%s.sock"]
    theirs = structured_transcript(daemon_factory(
        "qemu", nbd[:1] + [nbd[1] % "qemu"], qmp=True))
    ours = structured_transcript(daemon_factory("trio", nbd[:1] + [nbd[1] % "trio"], qmp=True,
                                                allow_stderr=BACKUP_BLOCK_SIZE_WARNING))
    assert any('"event": "BLOCK_EXPORT_DELETED"' in line for line in ours)
    assert len(ours) == len(theirs), (ours, theirs)
    for o, t in zip(ours, theirs, strict=True):
        assert o == t


def chardev_history(d) -> list[str]:
    q = d.qmp()
    for i in range(12):
        q.cmd("chardev-add", id=f"c{i}", backend={"type": "null", "data": {}})
    for i in (3, 5, 7):
        q.cmd("chardev-remove", id=f"c{i}")
    q.cmd("chardev-add", id="late", backend={"type": "null", "data": {}})
    q.cmd("chardev-change", id="c1", backend={"type": "ringbuf", "data": {}})
    return [c["label"] for c in q.cmd("query-chardev")]


def test_query_chardev_lists_in_qemu_order(daemon_factory):
    # QEMU's order comes from the /chardevs container's hash table, removals
    # and all; a client listing chardevs sees it
    args = ["--chardev", "null,id=zz0", "--chardev", "ringbuf,id=abc"]
    theirs = chardev_history(daemon_factory("qemu", args))
    ours = chardev_history(daemon_factory("trio", args))
    assert sorted(ours) == sorted(["zz0", "abc", "qmp0", "late"] + [
        f"c{i}" for i in range(12) if i not in (3, 5, 7)])
    assert ours == theirs
