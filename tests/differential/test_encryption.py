"""Encrypted images on both daemons: the errors for missing or wrong secrets
and formats, what query-named-block-nodes shows of a luks node and of an
encrypted qcow2 node, and blockdev-create of both, read back by qemu-io.

Normalised: program names, temporary paths, and the per-image randomness
(UUIDs, PBKDF2 iteration counts from each daemon's own benchmark)."""

from __future__ import annotations

import base64
import os
import shutil

import pytest

from tests.helpers import Daemon, normalise_prog, qemu_img, run, run_cli

PW = "abc"
SECRET = ["--object", f"secret,id=sec0,data={PW}"]
MK = "AAECAwQFBgcICQoLDA0ODwABAgMEBQYHCAkKCwwNDg8="  # bytes 0..15 twice, base64
IV = "AAECAwQFBgcICQoLDA0ODw=="


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    obj = ["--object", f"secret,id=sec0,data={PW}"]
    qemu_img("create", "-q", *obj, "-f", "luks", "-o", "key-secret=sec0,iter-time=10",
             str(d / "l.luks"), "1M")
    qemu_img("create", "-q", *obj, "-f", "qcow2", "-o",
             "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
             str(d / "q.qcow2"), "1M")
    qemu_img("create", "-q", *obj, "-f", "qcow2", "-o",
             "encrypt.format=aes,encrypt.key-secret=sec0", str(d / "aes.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "plain.qcow2"), "1M")
    shutil.copyfile(d / "l.luks", d / "short.luks")
    os.truncate(d / "short.luks", 1 << 20)  # ends before its payload offset
    return d


def _abc_ciphertext() -> str:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    c = Cipher(algorithms.AES(bytes(range(16)) * 2), modes.CBC(bytes(range(16))))
    return base64.b64encode(c.encryptor().update(b"abc" + bytes([13]) * 13)).decode()


def _cases(d):
    f = "--blockdev"
    file = lambda name: [f, f"driver=file,node-name=f,filename={d / name}"]  # noqa: E731
    return {
        "qcow2-no-secret": file("q.qcow2") + [f, "driver=qcow2,node-name=d,file=f"],
        "qcow2-wrong-password": ["--object", "secret,id=sec0,data=bad"] + file("q.qcow2") + [
            f, "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0"],
        "qcow2-missing-secret": file("q.qcow2") + [
            f, "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=s1"],
        "qcow2-format-mismatch": SECRET + file("q.qcow2") + [
            f, "driver=qcow2,node-name=d,file=f,encrypt.format=aes,encrypt.key-secret=sec0"],
        "qcow2-aes-as-luks": SECRET + file("aes.qcow2") + [
            f, "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0"],
        "qcow2-aes-no-secret": file("aes.qcow2") + [
            f, "driver=qcow2,node-name=d,file=f,encrypt.format=aes"],
        "qcow2-plain-with-encrypt": SECRET + file("plain.qcow2") + [
            f, "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0"],
        "qcow2-no-format": SECRET + file("q.qcow2") + [
            f, "driver=qcow2,node-name=d,file=f,encrypt.key-secret=sec0"],
        "luks-no-secret": file("l.luks") + [f, "driver=luks,node-name=d,file=f"],
        "luks-wrong-password": ["--object", "secret,id=sec0,data=abd"] + file("l.luks") + [
            f, "driver=luks,node-name=d,file=f,key-secret=sec0"],
        "luks-missing-secret": file("l.luks") + [
            f, "driver=luks,node-name=d,file=f,key-secret=nope"],
        "luks-not-luks": SECRET + file("q.qcow2") + [
            f, "driver=luks,node-name=d,file=f,key-secret=sec0"],
        "luks-short-file": SECRET + file("short.luks") + [
            f, "driver=luks,node-name=d,file=f,key-secret=sec0"],
        "luks-base64-password": ["--object", "secret,id=sec0,data=YWJk,format=base64"]
        + file("l.luks") + [f, "driver=luks,node-name=d,file=f,key-secret=sec0"],
        # keyid: AES-256-CBC ciphertext under another secret ('abc', PKCS#7)
        "secret-keyid-unlocks": ["--object", f"secret,id=mk,data={MK},format=base64",
                                 "--object", f"secret,id=sec0,keyid=mk,iv={IV},"
                                 f"data={_abc_ciphertext()},format=base64"]
        + file("l.luks") + [f, "driver=luks,node-name=d,file=f,key-secret=sec0",
                            f, "driver=null-co"],
        "secret-keyid-raw-ciphertext": ["--object", f"secret,id=mk,data={MK},format=base64",
                                        "--object", f"secret,id=sec0,keyid=mk,iv={IV},"
                                        f"data={_abc_ciphertext()}"],
        "secret-keyid-short-key": ["--object", "secret,id=mk,data=short",
                                   "--object", "secret,id=sec0,keyid=mk,data=AAAA"],
        "secret-keyid-no-iv": ["--object", f"secret,id=mk,data={MK},format=base64",
                               "--object", "secret,id=sec0,keyid=mk,data=AAAA"],
        "secret-keyid-bad-padding": ["--object", f"secret,id=mk,data={MK},format=base64",
                                     "--object", f"secret,id=sec0,keyid=mk,iv={IV},"
                                     "data=AAAAAAAAAAAAAAAAAAAAAA==,format=base64"],
        "secret-bad-base64": ["--object", "secret,id=sec0,data=a$b,format=base64"],
        "secret-no-data": ["--object", "secret,id=sec0"],
        "secret-data-and-file": ["--object", "secret,id=sec0,data=a,file=/etc/hostname"],
        "secret-missing-file": ["--object", "secret,id=sec0,file=/nonexistent/pw"],
    }


CASE_NAMES = list(_cases(__import__("pathlib").Path("/x")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_open_errors_match(images, case):
    args = _cases(images)[case]
    theirs = run_cli("qemu", args)
    ours = run_cli("trio", args)
    assert "Traceback" not in ours.stderr
    assert (ours.returncode, normalise_prog(ours.stderr)) == \
        (theirs.returncode, normalise_prog(theirs.stderr))
    assert theirs.returncode == 1


def _normalise(info: list[dict]) -> list[dict]:
    for n in info:
        spec = n["image"].get("format-specific", {}).get("data", {})
        enc = spec.get("encrypt", spec if n["drv"] == "luks" else None)
        if isinstance(enc, dict) and "slots" in enc:
            enc.pop("master-key-iters")
            for s in enc["slots"]:
                s.pop("iters", None)
        n["image"].pop("actual-size", None)
    return info


@pytest.mark.parametrize("name,blockdev", [
    ("l.luks", "driver=luks,node-name=d,file=f,key-secret=sec0"),
    ("q.qcow2", "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0"),
    ("aes.qcow2", "driver=qcow2,node-name=d,file=f,encrypt.format=aes,encrypt.key-secret=sec0"),
])
def test_query_named_block_nodes_match(images, tmp_path, name, blockdev):
    out = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}-{name}"
        shutil.copyfile(images / name, img)
        args = SECRET + ["--blockdev", f"driver=file,node-name=f,filename={img}",
                         "--blockdev", blockdev]
        with Daemon(kind, tmp_path, args) as d:
            info = d.qmp().cmd_raw("query-named-block-nodes", {})["return"]
        text = str(info).replace(str(img), "IMG")
        out[kind] = _normalise(eval(text))  # noqa: S307 - our own repr of JSON values
    assert out["trio"] == out["qemu"]
    top = out["trio"][0]
    assert top["encrypted"] is True and top["image"]["encrypted"] is True


def test_blockdev_create_both_formats(tmp_path):
    """blockdev-create of luks and of LUKS-encrypted qcow2 through QMP;
    qemu-io reads what the daemon wrote through the new nodes."""
    luks_img, qcow_img = tmp_path / "new.luks", tmp_path / "new.qcow2"
    with Daemon("trio", tmp_path, SECRET) as d:
        q = d.qmp()

        def create(job_id, options):
            r = q.cmd_raw("blockdev-create", {"job-id": job_id, "options": options})
            assert r == {"return": {}}, r
            while True:
                ev = q.pull_event(wait=True)
                if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == job_id \
                        and ev["data"]["status"] == "concluded":
                    break
            jobs = q.cmd_raw("query-jobs", {})["return"]
            assert [j.get("error") for j in jobs] == [None], jobs
            q.cmd_raw("job-dismiss", {"id": job_id})

        for img, fn in ((luks_img, "fl"), (qcow_img, "fq")):
            create(f"c-{fn}", {"driver": "file", "filename": str(img), "size": 0})
            r = q.cmd_raw("blockdev-add", {"driver": "file", "node-name": fn,
                                       "filename": str(img)})
            assert r == {"return": {}}, r
        create("c-luks", {"driver": "luks", "file": "fl", "size": 1 << 20,
                          "key-secret": "sec0", "iter-time": 10})
        create("c-qcow2", {"driver": "qcow2", "file": "fq", "size": 4 << 20,
                           "encrypt": {"format": "luks", "key-secret": "sec0",
                                       "iter-time": 10}})
        for node, opts in (("l", {"driver": "luks", "file": "fl", "key-secret": "sec0"}),
                           ("q", {"driver": "qcow2", "file": "fq",
                                  "encrypt": {"format": "luks", "key-secret": "sec0"}})):
            r = q.cmd_raw("blockdev-add", {"node-name": node, **opts})
            assert r == {"return": {}}, r
        q.cmd_raw("nbd-server-start", {"addr": {"type": "unix",
                                            "data": {"path": str(tmp_path / "nbd.sock")}}})
        for node in ("l", "q"):
            q.cmd_raw("block-export-add", {"type": "nbd", "id": node, "node-name": node,
                                       "writable": True})
            run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 1000 70000",
                f"nbd+unix:///{node}?socket={tmp_path / 'nbd.sock'}")
    obj = ["--object", f"secret,id=sec0,data={PW}"]
    for opts in (f"driver=luks,key-secret=sec0,file.filename={luks_img}",
                 f"driver=qcow2,encrypt.key-secret=sec0,file.filename={qcow_img}"):
        p = run("qemu-io", *obj, "--image-opts", "-c", "read -P 0x6b 1000 70000", opts)
        assert "Pattern verification failed" not in p.stdout, p.stdout
    p = qemu_img("check", *obj, "--image-opts",
                 f"driver=qcow2,encrypt.key-secret=sec0,file.filename={qcow_img}")
    assert "No errors were found" in p.stdout
    info = qemu_img("info", *obj, "--image-opts",
                    f"driver=luks,key-secret=sec0,file.filename={luks_img}").stdout
    assert "virtual size: 1 MiB" in info and "cipher mode: xts" in info


AMEND_CASES = [
    {"state": "active"},
    {"state": "active", "new-secret": "sec1", "old-secret": "sec0"},
    {"state": "active", "new-secret": "sec1", "keyslot": 0, "iter-time": 10},
    {"state": "active", "new-secret": "sec1", "keyslot": 9, "iter-time": 10},
    {"state": "active", "new-secret": "sec1", "secret": "bad", "iter-time": 10},
    {"state": "inactive", "new-secret": "sec1"},
    {"state": "inactive", "iter-time": 10},
    {"state": "inactive"},
    {"state": "inactive", "keyslot": 0},
    {"state": "inactive", "keyslot": 3},
    {"state": "inactive", "old-secret": "bad"},
    {"state": "inactive", "old-secret": "sec0"},
    {"state": "active", "new-secret": "sec1", "keyslot": 2, "iter-time": 10},
    {"state": "active", "new-secret": "sec1", "iter-time": 10},
    {"state": "inactive", "keyslot": 1, "old-secret": "sec1"},
]


@pytest.mark.parametrize("fmt", ["qcow2", "luks"])
def test_amend_key_slots_match(images, tmp_path, fmt):
    """x-blockdev-amend of LUKS key slots: the same errors, the same slots
    afterwards, and qemu-io opens the image with the added passphrase."""
    name = "q.qcow2" if fmt == "qcow2" else "l.luks"
    results = {}
    for kind in ("qemu", "trio"):
        img = tmp_path / f"{kind}-{name}"
        shutil.copyfile(images / name, img)
        node = ("driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0"
                if fmt == "qcow2" else "driver=luks,node-name=d,file=f,key-secret=sec0")
        args = SECRET + ["--object", "secret,id=sec1,data=xyz",
                         "--object", "secret,id=bad,data=nope",
                         "--blockdev", f"driver=file,node-name=f,filename={img}",
                         "--blockdev", node]
        out = []
        with Daemon(kind, tmp_path, args) as d:
            q = d.qmp()
            for i, enc in enumerate(AMEND_CASES):
                opts = {"driver": "qcow2", "encrypt": {"format": "luks", **enc}} \
                    if fmt == "qcow2" else {"driver": "luks", **enc}
                r = q.cmd_raw("x-blockdev-amend", {"job-id": f"j{i}", "node-name": "d",
                                                   "options": opts})
                assert r == {"return": {}}, r
                while True:
                    ev = q.pull_event(wait=True)
                    if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"]["id"] == f"j{i}" \
                            and ev["data"]["status"] == "concluded":
                        break
                job = next(j for j in q.cmd_raw("query-jobs", {})["return"]
                           if j["id"] == f"j{i}")
                out.append(job.get("error"))
                q.cmd_raw("job-dismiss", {"id": f"j{i}"})
            info = q.cmd_raw("query-named-block-nodes", {"flat": True})["return"][0]
        spec = info["image"]["format-specific"]["data"]
        slots = (spec["encrypt"] if fmt == "qcow2" else spec)["slots"]
        results[kind] = (out, [s["active"] for s in slots])
        p = run("qemu-io", "--object", "secret,id=s,data=xyz", "--image-opts", "-c",
                "read 0 512", f"driver={fmt},{'encrypt.' if fmt == 'qcow2' else ''}"
                f"key-secret=s,file.filename={img}")
        assert "read 512/512" in p.stdout, p.stdout + p.stderr
    assert results["trio"] == results["qemu"]
    assert results["trio"][1] == [True, False, True] + [False] * 5
