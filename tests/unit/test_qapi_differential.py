"""Our keyval parser and schema visitors against the real qemu-storage-daemon.

Every case is bad input that QEMU rejects while parsing (keyval syntax or
the QAPI visitor), before any driver runs, so the message is the schema
layer's alone.  The real daemon prints ``qemu-storage-daemon: --opt VALUE:
MESSAGE``; we compare MESSAGE with what our parse functions raise.
"""

from __future__ import annotations

import json
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from qsd_trio.qapi import keyval, schema
from qsd_trio.qapi.errors import GenericError
from tests.helpers import HAVE_QEMU, Daemon

pytestmark = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-storage-daemon not installed")

# option -> (implied key, QAPI type), as qemu-storage-daemon 7.2 parses them
OPTIONS = {
    "--blockdev": ("driver", "BlockdevOptions"),
    "--export": ("type", "BlockExportOptions"),
    "--nbd-server": (None, "NbdServerOptions"),
    "--object": ("qom-type", "ObjectOptions"),
    "--monitor": ("chardev", "MonitorOptions"),
}

CLI_CASES = [
    # keyval syntax
    ("--blockdev", "null,,co,node-name=x"),
    ("--blockdev", ",node-name=a"),
    ("--blockdev", "null-co,=a"),
    ("--blockdev", "null-co,a"),
    ("--blockdev", "null-co,a.b"),
    ("--blockdev", "null-co,a.b=1,a=2"),
    ("--blockdev", "null-co,a=1,a.b=2"),
    ("--blockdev", "null-co,x.a.b=1,x.a=2"),
    ("--blockdev", "null-co,1a=2"),
    ("--blockdev", "null-co,a..b=2"),
    ("--blockdev", "null-co,a.0x=2"),
    ("--blockdev", "null-co,a.=2"),
    ("--blockdev", "null-co,a b=2"),
    ("--blockdev", "0=a"),
    ("--blockdev", "a" * 128 + "=1"),
    ("--blockdev", "null-co,x." + "a" * 128 + "=1"),
    ("--blockdev", "help"),
    ("--blockdev", "null-co,help"),
    ("--blockdev", "null-co,?"),
    ("--nbd-server", "foo"),
    ("--nbd-server", "0=a"),
    ("--blockdev", "quorum,children.0=a,children.2=b,vote-threshold=1"),
    ("--blockdev", "quorum,children.1=a,vote-threshold=1"),
    ("--blockdev", "quorum,children.0=a,children.x=b,vote-threshold=1"),
    ("--blockdev", "quorum,x.l.1=a,vote-threshold=1"),
    # the visitor
    ("--blockdev", ""),
    ("--blockdev", "foo"),
    ("--blockdev", "driver=null-co,driver=foo"),
    ("--blockdev", "null-co,node-name=n,size=abc"),
    ("--blockdev", "null-co,node-name=n,size=1.5"),
    ("--blockdev", "null-co,node-name=n,size=99999999999999999999"),
    ("--blockdev", "null-co,node-name=n,size=08"),
    ("--blockdev", "null-co,node-name=n,size=5 "),
    ("--blockdev", "null-co,node-name=n,read-zeroes=maybe"),
    ("--blockdev", "null-co,node-name=n,read-zeroes=ON"),
    ("--blockdev", "null-co,node-name=n,read-zeroes="),
    ("--blockdev", "null-co,node-name=n,bogus=1"),
    ("--blockdev", "null-co,node-name=n,size.x=1"),
    ("--blockdev", "null-co,node-name=n,node-name.x=1"),
    ("--blockdev", "null-co,node-name=n,cache=1"),
    ("--blockdev", "null-co,node-name=n,cache.direct=x"),
    ("--blockdev", "null-co,node-name=n,detect-zeroes=x"),
    ("--blockdev", "null-co,node-name=n,discard=x"),
    ("--blockdev", "quorum,children.0.driver=foo,vote-threshold=1"),
    ("--blockdev", "quorum,children.0=a,children.1.x=b,vote-threshold=1"),
    ("--blockdev", "quorum,children=a,vote-threshold=1"),
    ("--blockdev", "quorum,children.0=a,vote-threshold=x"),
    ("--blockdev", "blkdebug,image=a,inject-error.0.event=bogus"),
    ("--blockdev", "blkdebug,image=a,inject-error.0.event=l1_update,inject-error.0.errno=x"),
    ("--blockdev", "raw,file.driver=foo"),
    ("--blockdev", "raw,file.driver=file"),
    ("--blockdev", "raw,file.driver=null-co,file.size=x"),
    ("--blockdev", "qcow2,file=f,backing.driver=foo,node-name=q"),
    ("--blockdev", "file,filename=x,aio-max-batch=abc"),
    ("--blockdev", "nbd,server.type=inet,server.host=h,server.port=1,reconnect-delay=4294967296"),
    ("--blockdev", "nbd,server.type=inet,server.host=h,server.port=1,reconnect-delay=-1"),
    ("--blockdev", "nbd,server.type=inet,server.host=h,server.port=1,"
                   "reconnect-delay=99999999999999999999"),
    ("--blockdev", '{"driver":"foo"}'),
    ("--blockdev", '{"driver":"null-co","size":"1"}'),
    ("--blockdev", '{"driver":"raw","file":{"driver":"file","filename":"x","bogus":1}}'),
    ("--nbd-server", "addr.type=inet,addr.host=a,addr.port=x,max-connections=x"),
    ("--nbd-server", "addr.type=unix"),
    ("--nbd-server", "addr.type=foo"),
    ("--nbd-server", "addr.type=inet,addr.host=::1,addr.port=1,addr.ipv4=maybe"),
    ("--nbd-server", "addr.type=unix,addr.path=/tmp/x.sock,max-connections=-1"),
    ("--export", "foo"),
    ("--export", "nbd,id=e"),
    ("--export", "nbd,id=e,node-name=n,writable=x"),
    ("--export", "fuse,id=e,node-name=n,mountpoint=/x,allow-other=x"),
    ("--export", "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,"
                 "logical-block-size=x"),
    ("--object", "iothread,id=i,poll-max-ns=abc"),
    ("--object", "foo,id=x"),
    ("--object", "throttle-group,id=t,x-iops-total=abc"),
    ("--object", "throttle-group,id=t,limits.iops-total=1.5"),
    ("--object", "throttle-group,id=t,limits=x"),
    ("--monitor", "chardev=x,mode=foo"),
    # several unexpected keys: QEMU names the first in GLib hash order
    ("--blockdev", "file,filename=x,x=1,node-name=n,y=2"),
    ("--blockdev", "null-co,foo=1,bar=2,baz=3,node-name=n,qux=4,a-b=5"),
    ("--nbd-server", "addr.type=unix,addr.path=/s,addr.p=1,addr.q=2,tls-x=1"),
] + [("--object", f"memory-backend-ram,id=m,size={v}")
     for v in ("abc", "1.5", "-1", "1e3", "16E", "1kk", "0x1.5", ".5k", "5 ", "0x")]


def ours(option: str, value: str) -> str:
    implied, type_name = OPTIONS[option]
    try:
        if keyval.is_json(value):
            schema.parse_json(type_name, json.loads(value))
        else:
            schema.parse_keyval(type_name, keyval.parse(value, implied))
    except GenericError as e:
        return e.desc
    return "<accepted>"


def theirs(option: str, value: str) -> str:
    p = subprocess.run(["qemu-storage-daemon", option, value], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1, p
    last = p.stderr.rstrip("\n").split("\n")[-1]
    prefix = f"qemu-storage-daemon: {option} {value}: "
    assert last.startswith(prefix), last
    return last[len(prefix):]


@pytest.fixture(scope="module")
def reference_cli():
    # two cores: run the short-lived reference processes two at a time
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CLI_CASES, pool.map(lambda c: theirs(*c), CLI_CASES), strict=True))


@pytest.mark.parametrize("case", CLI_CASES, ids=[f"{o} {v[:60]}" for o, v in CLI_CASES])
def test_cli_message(case, reference_cli):
    assert ours(*case) == reference_cli[case]


_NBD = {"type": "inet", "host": "h", "port": "1"}

QMP_CASES = [
    ("blockdev-add", {}),
    ("blockdev-add", {"driver": "foo"}),
    ("blockdev-add", {"driver": 5}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "foo"}}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": 5}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "file"}}),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "x", "bogus": 1}}),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "x", "aio": "bad"}}),
    ("blockdev-add", {"driver": "null-co", "size": "1"}),
    ("blockdev-add", {"driver": "null-co", "size": 1.5}),
    ("blockdev-add", {"driver": "null-co", "size": 18446744073709551616}),
    ("blockdev-add", {"driver": "null-co", "size": 9223372036854775808}),
    ("blockdev-add", {"driver": "null-co", "read-zeroes": "on"}),
    ("blockdev-add", {"driver": "null-co", "node-name": 5}),
    ("blockdev-add", {"driver": "null-co", "node-name": None}),
    ("blockdev-add", {"driver": "null-co", "cache": 5}),
    ("blockdev-add", {"driver": "null-co", "cache": {"direct": 1}}),
    ("blockdev-add", {"driver": "null-co", "cache": {"direct": True, "x": 1}}),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "backing": 5}),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "backing": {"driver": "foo"}}),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": 5}),
    ("blockdev-add", {"driver": "qcow2", "file": "x", "overlap-check": "bogus"}),
    ("blockdev-add", {"driver": "quorum", "children": [{"driver": "foo"}], "vote-threshold": 1}),
    ("blockdev-add", {"driver": "quorum", "children": ["a", 7], "vote-threshold": 1}),
    ("blockdev-add", {"driver": "quorum", "children": "a", "vote-threshold": 1}),
    ("blockdev-add", {"driver": "blkdebug", "image": "a", "inject-error": [{"event": "bogus"}]}),
    ("blockdev-add", {"driver": "blkdebug", "image": "a",
                      "inject-error": [{"event": "l1_update", "errno": "x"}]}),
    ("blockdev-add", {"driver": "nbd", "server": _NBD, "reconnect-delay": 4294967296}),
    ("blockdev-add", {"driver": "nbd", "server": _NBD, "reconnect-delay": -1}),
    ("blockdev-add", {"driver": "nbd", "server": _NBD, "reconnect-delay": 1e3}),
    ("blockdev-add", {"driver": "nbd", "server": _NBD, "reconnect-delay": True}),
    ("blockdev-reopen", {"options": [{"driver": "foo"}]}),
    ("blockdev-reopen", {"options": [{"driver": "raw", "file": "x"}, {"driver": "raw"}]}),
    ("blockdev-reopen", {"options": [{"driver": "raw", "file": "x"}, 5]}),
    ("blockdev-reopen", {"options": 5}),
    ("query-version", {"x": 1}),
    ("query-named-block-nodes", {"flat": "yes"}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": 5}}}),
    ("nbd-server-start", {"addr": {"type": "unix"}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/x"}}, "max-connections": -1}),
    ("nbd-server-start", {}),
    ("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": "a"}),
    ("object-add", {"qom-type": "nope", "id": "x"}),
    ("object-add", {"qom-type": "iothread"}),
    ("block-export-add", {"type": "nbd", "id": "e"}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["a", 1]}),
    ("chardev-add", {"id": "c", "backend": {"type": "socket", "data": {}}}),
    ("chardev-add", {"id": "c", "backend": {"type": "bogus", "data": {}}}),
    ("chardev-add", {"id": "c", "backend": {"type": "file", "data": {"out": 1}}}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [5]}),
    ("block-dirty-bitmap-merge", {"node": "n", "target": "t", "bitmaps": [{"node": "n"}]}),
    ("transaction", {"actions": [{"type": "bogus"}]}),
    ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]}),
    ("qom-set", {"path": "/x", "property": "y"}),
    ("blockdev-add", {"driver": "nbd", "server": _NBD, "reconnect-delay": "1"}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x",
                                                    "size": "1"}}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x",
                                                    "size": 1.5}}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "file", "filename": "x",
                                                    "size": 18446744073709551616}}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "x",
                                                    "size": 1, "cluster-size": "1"}}),
    ("blockdev-add", {"driver": "raw", "file": "x", "offset": 1.0}),
    ("blockdev-add", {"driver": "null-co", "discard": "x", "bogus": 1}),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "n",
                          "addr": {"type": "unix", "path": "/x"}, "logical-block-size": "x"}),
]



def _several_unexpected(seed: int, n: int) -> list[tuple[str, dict]]:
    """blockdev-add with 2..12 unknown keys among known ones, in random order."""
    rnd = random.Random(seed)
    words = ["x", "y", "z", "foo", "bar", "a-b", "node", "size2", "q", "zz", "abc", "k9",
             "long-name-here", "m", "n", "o", "p", "cache2", "w1", "w2"]
    valid = [("node-name", "n"), ("read-only", True), ("auto-read-only", False),
             ("force-share", False), ("size", 5), ("latency-ns", 1), ("read-zeroes", True)]
    out = []
    for _ in range(n):
        items = [(w, 1) for w in rnd.sample(words, rnd.randint(2, 12))]
        items += rnd.sample(valid, rnd.randint(0, len(valid)))
        rnd.shuffle(items)
        items.insert(rnd.randint(0, len(items)), ("driver", "null-co"))
        out.append(("blockdev-add", dict(items)))
    return out


QMP_CASES += _several_unexpected(7, 60)


@pytest.fixture(scope="module")
def reference_qmp(tmp_path_factory):
    d = Daemon("qemu", tmp_path_factory.mktemp("qapi-diff"))
    d.start()
    try:
        client = d.qmp()
        out = {}
        for name, args in QMP_CASES:
            r = client.cmd_obj({"execute": name, "arguments": args})
            out[json.dumps([name, args])] = r
        return out
    finally:
        d.stop()


@pytest.mark.parametrize("case", QMP_CASES, ids=[json.dumps(c)[:80] for c in QMP_CASES])
def test_qmp_message(case, reference_qmp):
    name, args = case
    reply = reference_qmp[json.dumps([name, args])]
    assert "error" in reply, reply
    with pytest.raises(GenericError) as ei:
        schema.parse_command(name, args)
    assert ei.value.desc == reply["error"]["desc"]
