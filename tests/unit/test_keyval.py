"""keyval syntax (util/keyval.c).  Error texts were taken from the real
qemu-storage-daemon 7.2 command line; test_qapi_differential.py re-checks
them against it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsd_trio.qapi import keyval
from qsd_trio.qapi.errors import GenericError


@pytest.mark.parametrize(
    "text, implied, expected",
    [
        ("", None, {}),
        ("a=1", None, {"a": "1"}),
        ("a=1,b=2,", None, {"a": "1", "b": "2"}),
        ("a.b=1,a.c=2", None, {"a": {"b": "1", "c": "2"}}),
        ("a.b.c=x", None, {"a": {"b": {"c": "x"}}}),
        ("a=x,,y", None, {"a": "x,y"}),
        ("a=,,,b=", None, {"a": ",", "b": ""}),
        ("a=x=y", None, {"a": "x=y"}),
        ("null-co,node-name=x", "driver", {"driver": "null-co", "node-name": "x"}),
        ("driver=null-co,node-name=x", "driver", {"driver": "null-co", "node-name": "x"}),
        ("null-co", "driver", {"driver": "null-co"}),
        ("null-co,", "driver", {"driver": "null-co"}),
        # the implied key applies to the first parameter only
        ("a=1", "driver", {"a": "1"}),
        ("l.0=a,l.1=b", None, {"l": ["a", "b"]}),
        ("l.1=b,l.0=a", None, {"l": ["a", "b"]}),
        ("l.0.x=a,l.0.y=b,l.1.x=c", None, {"l": [{"x": "a", "y": "b"}, {"x": "c"}]}),
        ("l.0.0=a", None, {"l": [["a"]]}),
        # a later duplicate replaces the earlier value, as in QEMU
        ("a=1,a=2", None, {"a": "2"}),
        ("__com.redhat_x=1", None, {"__com.redhat_x": "1"}),
        ("a_b-c=1", None, {"a_b-c": "1"}),
        ("l.0=a,l.00=b", None, {"l": ["b"]}),
    ],
)
def test_parse(text, implied, expected):
    assert keyval.parse(text, implied) == expected


@pytest.mark.parametrize(
    "text, implied, message",
    [
        ("null,,co,node-name=x", "driver", "Invalid parameter ''"),
        (",node-name=a", "driver", "Invalid parameter ''"),
        ("null-co,=a", "driver", "Invalid parameter ''"),
        ("null-co,a", "driver", "Expected '=' after parameter 'a'"),
        ("foo", None, "Expected '=' after parameter 'foo'"),
        ("a.b", None, "Expected '=' after parameter 'a.b'"),
        ("a.b=1,a=2", None, "Parameters 'a.*' used inconsistently"),
        ("a=1,a.b=2", None, "Parameters 'a.*' used inconsistently"),
        ("x.a.b=1,x.a=2", None, "Parameters 'x.a.*' used inconsistently"),
        ("1a=2", None, "Invalid parameter '1a'"),
        ("a..b=2", None, "Invalid parameter 'a..b'"),
        ("a.0x=2", None, "Invalid parameter 'a.0x'"),
        ("a.=2", None, "Invalid parameter 'a.'"),
        ("a b=2", None, "Invalid parameter 'a b'"),
        ("l.0=a,l.2=b", None, "Parameter 'l.1' missing"),
        ("l.1=a", None, "Parameter 'l.0' missing"),
        ("x.l.1=a", None, "Parameter 'x.l.0' missing"),
        ("l.0=a,l.x=b", None, "Parameters 'l.*' used inconsistently"),
        ("0=a", None, "Invalid parameter '0'"),
        ("0=a,b=1", "x", "Invalid parameter '0'"),
        ("a" * 128 + "=1", None, f"Parameter '{'a' * 128}' is too long"),
        ("x." + "a" * 128 + "=1", None, f"Parameter fragment '{'a' * 128}' is too long"),
        ("a" * 128 + ".b=1", None, f"Parameter fragment '{'a' * 128}' is too long"),
        ("help", "driver", "Help is not available for this option"),
        ("null-co,help", "driver", "Help is not available for this option"),
        ("null-co,?", "driver", "Help is not available for this option"),
    ],
)
def test_errors(text, implied, message):
    with pytest.raises(GenericError) as ei:
        keyval.parse(text, implied)
    assert ei.value.desc == message


def test_fragment_of_127_is_fine():
    assert keyval.parse("a" * 127 + "=1") == {"a" * 127: "1"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("help", ({}, True)),
        ("?", ({}, True)),
        ("iothread,help", ({"qom-type": "iothread"}, True)),
        ("help,id=x", ({"id": "x"}, True)),
        ("iothread,id=x", ({"qom-type": "iothread", "id": "x"}, False)),
        # 'help=1' is an ordinary parameter
        ("iothread,help=1", ({"qom-type": "iothread", "help": "1"}, False)),
    ],
)
def test_help(text, expected):
    assert keyval.parse_with_help(text, "qom-type") == expected


def test_is_json():
    assert keyval.is_json('{"driver": "null-co"}')
    assert not keyval.is_json("driver=null-co")
    assert not keyval.is_json(" {")


# -- property: printing a tree as keyval and parsing it gives the tree back ----

_names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                  max_size=8)
_trees = st.recursive(
    _values,
    lambda children: st.one_of(
        st.dictionaries(_names, children, min_size=1, max_size=4),
        st.lists(children, min_size=1, max_size=3),
    ),
    max_leaves=12,
)


def _flatten(prefix: str, tree, out: list[str]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out.append(f"{prefix}={tree.replace(',', ',,')}")


@given(st.dictionaries(_names, _trees, max_size=5))
def test_roundtrip(tree):
    parts: list[str] = []
    _flatten("", tree, parts)
    assert keyval.parse(",".join(parts)) == tree
