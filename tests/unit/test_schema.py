"""The typed schema layer: QMP (strict) and keyval input, QEMU's messages,
back to JSON.  Message texts come from the real qemu-storage-daemon 7.2;
test_qapi_differential.py re-checks them against it."""

from __future__ import annotations

import pytest

from qsd_trio.qapi import keyval, schema
from qsd_trio.qapi import qapi_types as T
from qsd_trio.qapi.base import NULL
from qsd_trio.qapi.errors import CommandNotFound, GenericError


def err(fn, *args) -> str:
    with pytest.raises(GenericError) as ei:
        fn(*args)
    return ei.value.desc


# -- strict (QMP) ------------------------------------------------------------------


def test_blockdev_add_nested_definition_and_reference():
    a = schema.parse_command("blockdev-add", {
        "driver": "raw", "node-name": "r",
        "file": {"driver": "file", "filename": "/x", "aio": "threads"},
        "cache": {"direct": True},
    })
    assert isinstance(a, T.BlockdevOptions_raw)
    assert isinstance(a, T.BlockdevOptions)
    assert a.driver == "raw" and a.driver is T.BlockdevDriver.RAW
    assert a.node_name == "r" and a.read_only is None
    assert isinstance(a.file, T.BlockdevOptions_file)
    assert a.file.filename == "/x" and a.file.aio == "threads"
    assert a.cache == T.BlockdevCacheOptions(direct=True)
    b = schema.parse_command("blockdev-add", {"driver": "raw", "file": "node0"})
    assert b.file == "node0"


def test_ref_or_null():
    a = schema.parse_command("blockdev-add", {"driver": "qcow2", "file": "f", "backing": None})
    assert a.backing is NULL
    assert schema.to_qmp(a) == {"driver": "qcow2", "file": "f", "backing": None}
    b = schema.parse_command("blockdev-add", {"driver": "qcow2", "file": "f"})
    assert b.backing is None
    assert "backing" not in schema.to_qmp(b)


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("blockdev-add", {}, "Parameter 'driver' is missing"),
        ("blockdev-add", {"driver": "foo"}, "Parameter 'driver' does not accept value 'foo'"),
        ("blockdev-add", {"driver": 5}, "Invalid parameter type for 'driver', expected: string"),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "foo"}},
         "Parameter 'driver' does not accept value 'foo'"),
        ("blockdev-add", {"driver": "raw", "file": 5},
         "Invalid parameter type for 'file', expected: BlockdevRef"),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file"}},
         "Parameter 'file.filename' is missing"),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "x", "bogus": 1}},
         "Parameter 'file.bogus' is unexpected"),
        ("blockdev-add", {"driver": "raw", "file": {"driver": "file", "filename": "x", "aio": "bad"}},
         "Parameter 'aio' does not accept value 'bad'"),
        ("blockdev-add", {"driver": "null-co", "size": "1"},
         "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "size": 1.5},
         "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "size": 2**64},
         "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "read-zeroes": "on"},
         "Invalid parameter type for 'read-zeroes', expected: boolean"),
        ("blockdev-add", {"driver": "null-co", "node-name": None},
         "Invalid parameter type for 'node-name', expected: string"),
        ("blockdev-add", {"driver": "null-co", "cache": 5},
         "Invalid parameter type for 'cache', expected: object"),
        ("blockdev-add", {"driver": "null-co", "cache": {"direct": 1}},
         "Invalid parameter type for 'cache.direct', expected: boolean"),
        ("blockdev-add", {"driver": "qcow2", "file": "x", "backing": 5},
         "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
        ("blockdev-reopen", {"options": [{"driver": "raw", "file": "x"}, {"driver": "raw"}]},
         "Parameter 'options[1].file' is missing"),
        ("blockdev-reopen", {"options": [{"driver": "raw", "file": "x"}, 5]},
         "Invalid parameter type for 'options[1]', expected: object"),
        ("blockdev-reopen", {"options": 5}, "Invalid parameter type for 'options', expected: array"),
        ("blockdev-add", {"driver": "quorum", "children": ["a", 7], "vote-threshold": 1},
         "Invalid parameter type for 'null', expected: BlockdevRef"),
        ("blockdev-add", {"driver": "blkdebug", "image": "a", "inject-error": [{"event": "bogus"}]},
         "Parameter 'event' does not accept value 'bogus'"),
        ("blockdev-add", {"driver": "blkdebug", "image": "a",
                          "inject-error": [{"event": "l1_update", "errno": "x"}]},
         "Invalid parameter type for 'inject-error[0].errno', expected: integer"),
        ("query-version", {"x": 1}, "Parameter 'x' is unexpected"),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": 5}}},
         "Invalid parameter type for 'addr.data.path', expected: string"),
        ("nbd-server-start", {"addr": {"type": "unix"}}, "Parameter 'addr.data' is missing"),
        ("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": "a"},
         "Invalid parameter type for 'poll-max-ns', expected: integer"),
        # uint32: too big and negative (wraps to 2^64-1) name the bare member
        ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1"},
                          "reconnect-delay": 2**32},
         "Parameter 'reconnect-delay' expects uint32_t"),
        ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1"},
                          "reconnect-delay": -1},
         "Parameter 'reconnect-delay' expects uint32_t"),
        ("blockdev-add", {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1"},
                          "reconnect-delay": 1e3},
         "Parameter 'reconnect-delay' expects uint64"),
    ],
)
def test_command_errors(command, args, message):
    assert err(schema.parse_command, command, args) == message


def test_commands_without_arguments():
    assert schema.parse_command("query-version", None) is None
    assert schema.parse_command("query-version", {}) is None
    info = schema.command_info("query-version")
    assert info.arg_type is None and info.ret_type == "VersionInfo" and not info.allow_oob


def test_unknown_command():
    with pytest.raises(CommandNotFound) as ei:
        schema.parse_command("bogus", {})
    assert ei.value.desc == "The command bogus has not been found"


def test_command_names():
    names = schema.command_names()
    # qemu-storage-daemon 7.2's, x-query-tasks and x-query-node-stats
    assert len(names) == 74 + 2
    for n in ("blockdev-add", "object-add", "chardev-add", "nbd-server-start",
              "block-export-add", "query-version", "qmp_capabilities", "transaction"):
        assert n in names
    assert schema.command_info("blockdev-add").boxed


def test_boxed_union_commands():
    o = schema.parse_command("object-add", {"qom-type": "iothread", "id": "i", "poll-max-ns": 5})
    assert isinstance(o, T.ObjectOptions_iothread)
    assert (o.qom_type, o.id, o.poll_max_ns) == ("iothread", "i", 5)
    e = schema.parse_command("block-export-add",
                             {"type": "nbd", "id": "e", "node-name": "n", "writable": True})
    assert isinstance(e, T.BlockExportOptions_nbd) and e.writable is True
    c = schema.parse_command("chardev-add", {"id": "c", "backend": {
        "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/s"}},
                                   "server": True}}})
    assert c.id == "c" and c.backend.type == "socket"
    assert c.backend.data.addr.data.path == "/s"


def test_any_stays_raw():
    a = schema.parse_command("qom-set", {"path": "/x", "property": "p", "value": {"a": [1, None]}})
    assert a.value == {"a": [1, None]}


def test_unsigned_negative_wraps_like_qemu():
    # QEMU accepts a negative int64 for uint64 members "for backward compatibility"
    a = schema.parse_json("BlockdevCreateOptions",
                          {"driver": "file", "filename": "x", "size": -1})
    assert a.size == 2**64 - 1


@pytest.mark.parametrize(
    "value",
    [
        {"driver": "null-co", "node-name": "n", "size": 1024, "read-zeroes": True},
        {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "/x",
                                                     "aio": "native", "locking": "off"},
         "cache": {"direct": True, "no-flush": False}, "discard": "unmap"},
        {"driver": "qcow2", "file": "f", "backing": None, "node-name": "q",
         "cache-size": 1 << 20, "overlap-check": "none"},
        {"driver": "qcow2", "file": "f", "overlap-check": {"template": "all", "main-header": False}},
        {"driver": "quorum", "children": ["a", {"driver": "null-co"}], "vote-threshold": 1},
    ],
)
def test_roundtrip(value):
    typed = schema.parse_json("BlockdevOptions", value)
    assert schema.to_qmp(typed) == value
    assert schema.parse_json("BlockdevOptions", schema.to_qmp(typed)) == typed


def test_to_qmp_values_are_plain_json():
    out = schema.to_qmp(schema.parse_json("BlockdevOptions", {"driver": "null-co"}))
    assert type(out["driver"]) is str
    assert schema.to_qmp([T.BlockdevDriver.FILE, None, NULL]) == ["file", None, None]


# -- keyval ---------------------------------------------------------------------


def kv(type_name: str, text: str, implied: str | None):
    return schema.parse_keyval(type_name, keyval.parse(text, implied))


def test_keyval_conversion():
    a = kv("BlockdevOptions", "null-co,node-name=n,size=0x10,latency-ns=010,read-zeroes=y", "driver")
    assert (a.size, a.latency_ns, a.read_zeroes) == (16, 8, True)
    b = kv("BlockdevOptions", "raw,file.driver=file,file.filename=/x,cache.direct=off", "driver")
    assert b.file.filename == "/x" and b.cache.direct is False
    c = kv("BlockdevOptions", "quorum,children.0=a,children.1.driver=null-co,vote-threshold=2",
           "driver")
    assert c.children[0] == "a" and c.children[1].driver == "null-co"
    assert c.vote_threshold == 2
    n = kv("NbdServerOptions", "addr.type=unix,addr.path=/s,max-connections=4", None)
    assert n.addr.path == "/s" and n.max_connections == 4
    o = kv("ObjectOptions", "throttle-group,id=t,limits.iops-total=100", "qom-type")
    assert o.limits.iops_total == 100


@pytest.mark.parametrize(
    "type_name, text, implied, message",
    [
        ("BlockdevOptions", "null-co,size=abc", "driver", "Parameter 'size' expects integer"),
        ("BlockdevOptions", "null-co,size=1.5", "driver", "Parameter 'size' expects integer"),
        ("BlockdevOptions", "null-co,size=99999999999999999999", "driver",
         "Parameter 'size' expects integer"),
        ("BlockdevOptions", "null-co,read-zeroes=maybe", "driver",
         "Parameter 'read-zeroes' expects 'on' or 'off'"),
        ("BlockdevOptions", "null-co,read-zeroes=ON", "driver",
         "Parameter 'read-zeroes' expects 'on' or 'off'"),
        ("BlockdevOptions", "null-co,bogus=1", "driver", "Parameter 'bogus' is unexpected"),
        ("BlockdevOptions", "null-co,size.x=1", "driver", "Parameters 'size.*' are unexpected"),
        ("BlockdevOptions", "null-co,cache=1", "driver",
         "Invalid parameter type for 'cache', expected: object"),
        ("BlockdevOptions", "foo", "driver", "Parameter 'driver' does not accept value 'foo'"),
        ("BlockdevOptions", "", "driver", "Parameter 'driver' is missing"),
        ("BlockdevOptions", "quorum,children=a,vote-threshold=1", "driver",
         "Invalid parameter type for 'children', expected: array"),
        ("BlockdevOptions", "quorum,children.0.driver=foo,vote-threshold=1", "driver",
         "Parameter 'driver' does not accept value 'foo'"),
        ("BlockdevOptions", "raw,file.driver=file", "driver", "Parameter 'file.filename' is missing"),
        ("BlockdevOptions", "nbd,server.type=inet,server.host=h,server.port=1,reconnect-delay=-1",
         "driver", "Parameter 'reconnect-delay' expects uint32_t"),
        ("NbdServerOptions", "addr.type=unix", None, "Parameter 'addr.path' is missing"),
        ("NbdServerOptions", "addr.type=foo", None, "Parameter 'type' does not accept value 'foo'"),
        ("NbdServerOptions", "addr.type=unix,addr.path=/s,max-connections=-1", None,
         "Parameter 'max-connections' expects uint32_t"),
        ("BlockExportOptions", "nbd,id=e", "type", "Parameter 'node-name' is missing"),
        ("ObjectOptions", "memory-backend-ram,id=m,size=1.5", "qom-type",
         "Parameter 'size' expects size"),
        ("ObjectOptions", "throttle-group,id=t,limits=x", "qom-type",
         "Invalid parameter type for 'limits', expected: object"),
        ("ObjectOptions", "throttle-group,id=t,limits.iops-total=1.5", "qom-type",
         "Parameter 'limits.iops-total' expects integer"),
        ("MonitorOptions", "chardev=x,mode=foo", "chardev",
         "Parameter 'mode' does not accept value 'foo'"),
    ],
)
def test_keyval_errors(type_name, text, implied, message):
    assert err(kv, type_name, text, implied) == message


def test_keyval_null_is_a_reference():
    # 'backing=' is the empty reference; the block layer reads it as "none"
    a = kv("BlockdevOptions", "qcow2,file=f,backing=", "driver")
    assert a.backing == ""


# -- C number parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("0", 0), ("1", 1), ("1b", 1), ("1k", 1024), ("1K", 1024), ("1M", 1 << 20),
        ("2G", 2 << 30), ("1T", 1 << 40), ("1P", 1 << 50), ("1E", 1 << 60),
        ("1.5k", 1536), ("1.k", 1024), ("1.", 1), (" 1k", 1024), ("+5", 5),
        ("0x10", 16), ("0x10k", 16 << 10), ("0.5M", 1 << 19), ("15E", 15 << 60),
        ("08", 8), ("010", 10), ("1e", 1 << 60),
        ("18446744073709551615", 2**64 - 1),
    ],
)
def test_strtosz(text, value):
    assert schema.strtosz(text) == value


@pytest.mark.parametrize(
    "text", ["", "abc", "-1", "1.5", "1e3", "16E", "1x", "1kk", "0x1.5", "1.5e3k",
             "18446744073709551616", "k", ".5k", "5 ", "0x"],
)
def test_strtosz_rejects(text):
    assert schema.strtosz(text) is None


def test_strtoi64_and_strtou64():
    assert schema.strtoi64("010") == 8
    assert schema.strtoi64("-0x10") == -16
    assert schema.strtoi64("+5") == 5
    assert schema.strtoi64(" 5") == 5
    assert schema.strtoi64("08") is None
    assert schema.strtoi64("5 ") is None
    assert schema.strtoi64("9223372036854775808") is None
    assert schema.strtou64("-1") == 2**64 - 1
    assert schema.strtou64("18446744073709551616") is None


def test_strtod_finite():
    assert schema.strtod_finite("1.5") == 1.5
    assert schema.strtod_finite("1e3") == 1000.0
    assert schema.strtod_finite("0x1p3") == 8.0
    assert schema.strtod_finite("inf") is None
    assert schema.strtod_finite("nan") is None
    assert schema.strtod_finite("1e999") is None
    assert schema.strtod_finite("") is None


# -- the generated classes -----------------------------------------------------------


def test_every_generated_class_builds():
    for pyname in T._FACTORIES:
        cls = getattr(T, pyname)
        assert cls.__name__ == cls.__qualname__ == pyname
        assert isinstance(cls.__qapi_members__, tuple)
    assert T.__getattr__("BlockdevOptions_file") is T.BlockdevOptions_file
    assert issubclass(T.BlockdevOptions_file, T.BlockdevOptions)
    assert T.BlockdevOptions_file.driver == "file"
    with pytest.raises(AttributeError):
        T.NoSuchType  # noqa: B018


def test_constructing_by_hand_and_to_qmp():
    opts = T.BlockdevOptions_null_co(node_name="n", size=512)
    assert schema.to_qmp(opts) == {"driver": "null-co", "node-name": "n", "size": 512}
    with pytest.raises(TypeError):
        T.BlockdevOptions_file()  # filename is required


def test_command_names_in_definition_order():
    # qemu-storage-daemon 7.2's query-commands is exactly this, reversed
    names = schema.command_names()
    assert names[:3] == ["query-block", "query-blockstats", "query-block-jobs"]
    # qsd-trio's own commands come after QEMU's
    assert names[-5:] == ["object-add", "object-del", "transaction", "x-query-tasks",
                          "x-query-node-stats"]
    assert names.index("job-pause") > names.index("blockdev-add")
