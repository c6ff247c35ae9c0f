"""The blklogwrites filter in process: the conformance suite with every
state checked against a replay of the log (tests/dm_log_writes.py, a reader
of its own), the entries and flush marks a known sequence of requests
leaves (QEMU's rules: FUA emulated by a flush that logs an entry only for
earlier writes, unaligned requests padded to whole log sectors), the
superblock update interval, larger log sectors, and log-append.
"""

from __future__ import annotations

import contextlib
import struct

import pytest

from qsd_trio.nodes.graph import BlockGraph
from qsd_trio.qapi.errors import GenericError
from tests import dm_log_writes as dmlog

from .conformance import check_block_node

MiB = 1 << 20


async def _node(graph, data, log, **opts):
    return await graph.add({"driver": "blklogwrites", "node-name": "b", "discard": "unmap",
                            "file": {"driver": "file", "filename": str(data)},
                            "log": {"driver": "file", "filename": str(log)}, **opts})


def _files(tmp_path, size, log_content=b""):
    data, log = tmp_path / "data.raw", tmp_path / "log"
    data.write_bytes(bytes(size))
    log.write_bytes(log_content)
    return data, log


async def test_conformance(tmp_path):
    @contextlib.asynccontextmanager
    async def factory(size, *, read_only=False):
        data, log = _files(tmp_path, size)
        graph = BlockGraph()
        node = await _node(graph, data, log, **{"read-only": read_only})
        factory.log = log
        try:
            yield node
        finally:
            await graph.close_all()

    async def verify(node, model):
        # after a flush the superblock counts every entry, and the writes
        # replayed from zeroes give what the node reads
        await node.flush()
        parsed = dmlog.parse(factory.log.read_bytes())
        assert parsed.entries and parsed.entries[-1].flags == dmlog.FLUSH
        image = dmlog.replay(parsed, bytearray(len(model)))
        assert image[:len(model)] == model

    await check_block_node(factory, verify=verify)


async def test_entries_and_flush_marks(tmp_path):
    data, log = _files(tmp_path, MiB)
    graph = BlockGraph()
    model = bytearray(MiB)
    at_flush: list[bytes] = []
    try:
        b = await _node(graph, data, log)
        assert b.request_alignment == 512
        await b.write(0, b"\x01" * 4096, fua=True)  # nothing written before: no flush
        model[0:4096] = b"\x01" * 4096
        # no flush yet, so no superblock yet (QEMU writes it on flushes)
        assert log.read_bytes()[:512] == bytes(512)
        await b.write(4096, b"\x02" * 4096)
        model[4096:8192] = b"\x02" * 4096
        # its flush is logged after it: for the log, the three are stable
        await b.write(8192, b"\x03" * 512, fua=True)
        model[8192:8704] = b"\x03" * 512
        at_flush.append(bytes(model))
        await b.flush()  # the FUA write counts as written since: an entry
        at_flush.append(bytes(model))
        await b.flush()  # nothing since: no entry
        await b.write_zeroes(0, 4096)  # aligned: one entry of zeroes
        model[0:4096] = bytes(4096)
        await b.write(10000, b"\x04" * 100)  # unaligned: its sectors, padded
        model[10000:10100] = b"\x04" * 100
        await b.write_zeroes(4196, 1000)  # head and tail sectors as data around a zero write
        model[4196:5196] = bytes(1000)
        await b.write_zeroes(8200, 100)  # within one sector: one data write
        model[8200:8300] = bytes(100)
        await b.discard(65536, 65536)
        model[65536:131072] = bytes(65536)
        await b.discard(1000, 2000)  # narrowed to the whole sectors inside
        model[1024:2560] = bytes(1536)
    finally:
        await graph.close_all()  # the close flushes: a last entry
    at_flush.append(bytes(model))
    parsed = dmlog.parse(log.read_bytes())
    assert dmlog.marks(parsed) == [
        ("write", 0, 8), ("write", 8, 8), ("write", 16, 1), ("flush", 0, 0),
        ("flush", 0, 0),
        ("write", 0, 8), ("write", 19, 1),
        ("write", 8, 1), ("write", 9, 1), ("write", 10, 1),
        ("write", 16, 1),
        ("discard", 128, 128), ("discard", 2, 3),
        ("flush", 0, 0)]
    assert parsed.entries[4 + 1].data == bytes(4096)  # a zero write logged as zeroes
    assert data.read_bytes() == bytes(model)
    for n, state in enumerate(at_flush, 1):
        # what a crash right after the n-th flush would have left
        assert dmlog.replay(parsed, bytearray(MiB), flushes=n) == bytearray(state), n


async def test_superblock_every_interval(tmp_path):
    data, log = _files(tmp_path, MiB)
    graph = BlockGraph()
    try:
        b = await _node(graph, data, log, **{"log-super-update-interval": 2})
        for i in range(3):
            await b.write(i * 512, bytes([i + 1]) * 512)
        # updated after the second entry, not after the third
        assert dmlog.parse(log.read_bytes()).entries == [
            dmlog.Entry(0, 1, 0, b"\x01" * 512), dmlog.Entry(1, 1, 0, b"\x02" * 512)]
    finally:
        await graph.close_all()
    assert len(dmlog.parse(log.read_bytes()).entries) == 4  # and the flush at close


async def test_larger_log_sectors(tmp_path):
    data, log = _files(tmp_path, MiB)
    graph = BlockGraph()
    try:
        b = await _node(graph, data, log, **{"log-sector-size": 4096})
        assert b.request_alignment == 4096
        await b.write(5000, b"\x07" * 100)
    finally:
        await graph.close_all()
    parsed = dmlog.parse(log.read_bytes())
    assert parsed.sector_size == 4096
    assert dmlog.marks(parsed) == [("write", 1, 1), ("flush", 0, 0)]
    assert parsed.entries[0].data == bytes(904) + b"\x07" * 100 + bytes(3092)


async def test_log_append_continues(tmp_path):
    data, log = _files(tmp_path, MiB)
    graph = BlockGraph()
    try:
        b = await _node(graph, data, log)
        await b.write(0, b"\x01" * 1024)
    finally:
        await graph.close_all()
    first = log.read_bytes()
    graph = BlockGraph()
    try:
        b = await _node(graph, data, log, **{"log-append": True})
        await b.write(512, b"\x02" * 512)
        await b.discard(4096, 4096)
    finally:
        await graph.close_all()
    after = log.read_bytes()
    # the old entries stay where they were; new ones follow them
    assert after[512:len(first)] == first[512:]
    parsed = dmlog.parse(after)
    assert dmlog.marks(parsed) == [("write", 0, 2), ("flush", 0, 0), ("write", 1, 1),
                                   ("discard", 8, 8), ("flush", 0, 0)]
    assert dmlog.replay(parsed, bytearray(MiB)) == bytearray(data.read_bytes())


async def test_log_append_to_an_empty_log(tmp_path):
    data, log = _files(tmp_path, MiB)
    graph = BlockGraph()
    try:
        b = await _node(graph, data, log, **{"log-append": True})
        await b.write(0, b"\x05" * 512)
    finally:
        await graph.close_all()
    assert dmlog.marks(dmlog.parse(log.read_bytes())) == [("write", 0, 1), ("flush", 0, 0)]


def _superblock(count: int) -> bytes:
    return struct.pack("<QQQI", dmlog.MAGIC, 1, count, 512) + bytes(484)


async def test_log_append_past_the_end_of_the_log(tmp_path):
    # five entries counted, none there: each reads as an empty entry of
    # one sector (QEMU's bdrv_pread past the end reads zeroes), so the
    # next entry goes to sector 6
    data, log = _files(tmp_path, MiB, _superblock(5))
    graph = BlockGraph()
    try:
        b = await _node(graph, data, log, **{"log-append": True})
        await b.write(0, b"\x03" * 512)
    finally:
        await graph.close_all()
    raw = log.read_bytes()
    assert struct.unpack_from("<QQQQ", raw, 6 * 512) == (0, 1, 0, 0)
    assert raw[7 * 512:8 * 512] == b"\x03" * 512
    assert struct.unpack_from("<QQQI", raw, 0)[2] == 7  # five, the write, the flush


async def test_log_append_with_an_absurd_count_fails_at_once(tmp_path):
    # QEMU would read zero entries one by one until their offset passes
    # the largest it accepts; the result, not the wait, is what it gives
    data, log = _files(tmp_path, MiB, _superblock(2**64 - 1))
    graph = BlockGraph()
    try:
        with pytest.raises(GenericError) as e:
            await _node(graph, data, log, **{"log-append": True})
        assert e.value.desc == ("Failed to read log entry 18014398507384831: "
                                "Input/output error")
        assert not graph.nodes
    finally:
        await graph.close_all()
