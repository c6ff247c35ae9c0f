"""query-qmp-schema from the generated declarations."""

from __future__ import annotations

import json
from pathlib import Path

from qsd_trio.qapi import introspect, qapi_types, schema

# what qemu-storage-daemon 7.2 answers to query-qmp-schema (tests/data/README.md)
REF = Path(__file__).resolve().parents[1] / "data" / "qsd-7.2-qmp-schema.json"


def _check_closed(entries: list[dict]) -> None:
    """Every type an entry names is itself listed, exactly once."""
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names))
    defined = set(names)

    def used(e):
        for k in ("arg-type", "ret-type", "element-type"):
            if k in e:
                yield e[k]
        for m in e.get("members", []):
            if "type" in m:
                yield m["type"]
        for v in e.get("variants", []):
            yield v["type"]

    for e in entries:
        for t in used(e):
            assert t in defined, (e["name"], t)


def test_matches_qemu_storage_daemon_7_2():
    ref = json.loads(REF.read_text())
    commands = [e["name"] for e in ref if e["meta-type"] == "command"]
    mine = introspect.introspect(commands, extensions=False)
    # same entries, same order, same masked numbers
    assert [json.dumps(e, sort_keys=True) for e in mine] == [
        json.dumps(e, sort_keys=True) for e in ref
    ]


# qsd-trio's members of QEMU's structs ('extend' in tools/qapi-qsd/qsd-trio.json),
# by the struct's (unmasked) name: what query-qmp-schema adds to 7.2's reply
EXTENSIONS = {
    "BlockdevOptionsNbd": [{"name": "x-multi-conn", "type": "int", "default": None,
                            "features": ["unstable"]}],
}


def test_extensions_are_the_only_difference():
    """With qsd-trio's members, the reply is 7.2's but for those members,
    appended to their structs' entries; no entry moves, no number changes."""
    ref = json.loads(REF.read_text())
    commands = [e["name"] for e in ref if e["meta-type"] == "command"]
    mine = schema.introspect(commands)
    assert len(mine) == len(ref)
    # the masked name of each extended struct: the entry whose members are
    # the struct's QEMU members, in order
    names = {}
    for struct in EXTENSIONS:
        qemu = [m["name"] for m in qapi_types.SCHEMA[struct]["members"] if not m.get("qsd")]
        names[struct] = next(e["name"] for e in ref if e["meta-type"] == "object"
                             and [m["name"] for m in e.get("members", [])] == qemu)
    by_mask = {names[s]: extra for s, extra in EXTENSIONS.items()}
    for theirs, ours in zip(ref, mine, strict=True):
        if theirs["name"] in by_mask:
            theirs = {**theirs, "members": theirs["members"] + by_mask.pop(theirs["name"])}
        assert ours == theirs
    assert not by_mask


def test_subset_is_closed_and_lists_all_events():
    out = schema.introspect(["query-version", "blockdev-add", "qmp_capabilities"])
    _check_closed(out)
    cmds = [e["name"] for e in out if e["meta-type"] == "command"]
    assert cmds == ["blockdev-add", "qmp_capabilities", "query-version"]
    events = {e["name"] for e in out if e["meta-type"] == "event"}
    assert events == set(schema.event_names())
    assert "JOB_STATUS_CHANGE" in events and "BLOCK_EXPORT_DELETED" in events
    by_name = {e["name"]: e for e in out}
    ba = by_name["blockdev-add"]
    arg = by_name[ba["arg-type"]]
    assert arg["meta-type"] == "object" and arg["tag"] == "driver"
    assert {"name": "node-name", "type": "str", "default": None} in arg["members"]
    # what this build leaves out (libblkio) is not offered
    assert "virtio-blk-vfio-pci" not in {v["case"] for v in arg["variants"]}
    assert by_name["int"] == {"name": "int", "meta-type": "builtin", "json-type": "int"}
    assert by_name[ba["ret-type"]] == {"name": ba["ret-type"], "meta-type": "object",
                                       "members": []}


def test_full_schema_is_closed():
    out = schema.introspect(schema.command_names())
    _check_closed(out)
    assert sum(e["meta-type"] == "command" for e in out) == len(schema.command_names())
