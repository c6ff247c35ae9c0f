"""The legacy ``rbd:`` file name, parsed as qemu_rbd_parse_filename does."""

from __future__ import annotations

import json

import pytest

from qsd_trio.nodes.rbd import parse_filename
from qsd_trio.qapi.errors import GenericError


@pytest.mark.parametrize("name, want", [
    ("rbd:p/img", {"pool": "p", "namespace": "", "image": "img"}),
    ("rbd:p/ns/img", {"pool": "p", "namespace": "ns", "image": "img"}),
    ("rbd:p/img@snap", {"pool": "p", "namespace": "", "image": "img", "snapshot": "snap"}),
    ("rbd:p/img@snap:conf=/c.conf", {"pool": "p", "namespace": "", "image": "img",
                                     "snapshot": "snap", "conf": "/c.conf"}),
    ("rbd:p/img:id=bob:conf=/c", {"pool": "p", "namespace": "", "image": "img", "user": "bob",
                                  "conf": "/c"}),
    # a backslash escapes a delimiter and is dropped
    (r"rbd:p/im\:g\@x", {"pool": "p", "namespace": "", "image": "im:g@x"}),
    (r"rbd:p/img:mon_host=a\:1:rbd_cache=false",
     {"pool": "p", "namespace": "", "image": "img",
      "=keyvalue-pairs": json.dumps(["mon_host", "a:1", "rbd_cache", "false"])}),
])
def test_parse(name, want):
    assert parse_filename(name) == want


@pytest.mark.parametrize("name, err", [
    ("nbd:p/img", "File name must start with 'rbd:'"),
    ("rbd:img", "Pool name is required"),
    ("rbd:p/img:conf", "conf option conf has no value"),
])
def test_errors(name, err):
    with pytest.raises(GenericError) as e:
        parse_filename(name)
    assert str(e.value) == err


def test_missing_library_is_named():
    """Without Ceph's libraries driver=rbd fails with a message naming them
    (the loader's path for a library that is not installed)."""
    from qsd_trio.nodes import rbd_lib

    with pytest.raises(rbd_lib.RbdUnavailable, match="libqsdnosuch.so.9 is not installed"):
        rbd_lib._open_lib("qsdnosuch", "libqsdnosuch.so.9")
