"""What the image formats' differential tests run on each daemon: an image
exported over NBD, probed and written (:func:`export_and_probe`),
blockdev-create jobs on fresh file nodes (:func:`run_creates`), and a
command line that must fail alike (:func:`assert_same_failure`)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.differential.create_job import run_create
from tests.helpers import Daemon, normalise_prog, qemu_img, qemu_io, run_cli


def export_and_probe(kind: str, tmp_path: Path, img: Path, driver: str,
                     writes: list[str]) -> dict:
    """``img`` opened by ``driver`` on daemon ``kind`` and exported over
    NBD: query-named-block-nodes before and after qemu-io's ``writes``, then
    the data, ``qemu-img map`` and the size over NBD.  The image's
    directory reads DIR in the queries."""
    sock = tmp_path / f"{kind}.sock"
    args = ["--blockdev", f"driver=file,node-name=f,filename={img}",
            "--blockdev", f"driver={driver},node-name=v,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=v,writable=on"]
    url = f"nbd+unix:///v?socket={sock}"

    def norm(value: object) -> object:
        return json.loads(json.dumps(value).replace(str(img.parent), "DIR"))

    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        info = q.cmd_raw("query-named-block-nodes", {})["return"]
        for cmd in writes:
            qemu_io("-f", "raw", "-c", cmd, url)
        after = q.cmd_raw("query-named-block-nodes", {})["return"]
        out = tmp_path / f"{kind}.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", url, str(out))
        mapping = json.loads(qemu_img("map", "--output=json", "-f", "raw", url).stdout)
        size = json.loads(qemu_img("info", "--output=json", "-f", "raw", url).stdout)
    return {"info": norm(info), "after": norm(after), "data": out.read_bytes(),
            "map": mapping, "nbd-size": size["virtual-size"]}


def run_creates(kind: str, tmp_path: Path, creates: list[dict], ext: str,
                initial: bytes = b"", extra: list[str] | None = None
                ) -> tuple[list, list[Path]]:
    """Each of ``creates`` (BlockdevCreateOptions without ``file``) as a
    blockdev-create job on daemon ``kind`` (started with ``extra`` options
    too, e.g. a secret), on a fresh file node holding ``initial``: its
    outcome (("refused", error) or ("job", the concluded job's error)) and
    the file it left."""
    files = [tmp_path / f"c{n}-{kind}.{ext}" for n in range(len(creates))]
    args = list(extra or [])
    for n, f in enumerate(files):
        f.write_bytes(initial)
        args += ["--blockdev", f"driver=file,node-name=f{n},filename={f}"]
    out: list = []
    with Daemon(kind, tmp_path, args) as d:
        q = d.qmp()
        for n, opts in enumerate(creates):
            out.append(run_create(q, f"j{n}", {**opts, "file": f"f{n}"}))
    return out, files


def assert_same_failure(args: list[str]) -> None:
    """Both daemons refuse command line ``args`` (exit 1) with the same
    stderr but for the program's name, and qsd-trio without a traceback."""
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Traceback" not in ours.stderr
    assert theirs.returncode == 1
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))
