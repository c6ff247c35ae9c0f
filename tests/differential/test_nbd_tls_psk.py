"""NBD over TLS with pre-shared keys (tls-creds-psk): qemu-storage-daemon 7.2
and qsd-trio serve the same clients, refuse the same ones and give the same
errors for bad credentials objects.

Clients are GnuTLS ones, as users have them: libnbd (nbdinfo, nbdcopy with
``tls-psk-file`` and the URI's user name) and QEMU's own NBD client
(qemu-io/qemu-img with ``--object tls-creds-psk,endpoint=client``).
"""

from __future__ import annotations

import json
import secrets
import subprocess

from tests.helpers import Daemon, qemu_img, qemu_io, run

KINDS = ("qemu", "trio")


def write_keys(path, *names: str) -> None:
    path.write_text("".join(f"{n}:{secrets.token_hex(32)}\n" for n in names))


def uri(sock: str, user: str | None, keys=None, export: str = "x") -> str:
    if user is None:
        return f"nbd+unix:///{export}?socket={sock}"
    return f"nbds+unix://{user}@/{export}?socket={sock}&tls-psk-file={keys}"


def nbdinfo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60)


def test_psk_clients_same(tmp_path):
    """Same image, same clients, both daemons: what works and what is refused."""
    server_keys = tmp_path / "server"
    server_keys.mkdir()
    write_keys(server_keys / "keys.psk", "alice", "bob")
    # a client that knows alice's name but not her key
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    write_keys(wrong / "keys.psk", "alice", "carol")
    seen = {}
    images = {}
    for kind in KINDS:
        img = tmp_path / f"{kind}.qcow2"
        qemu_img("create", "-f", "qcow2", str(img), "16M")
        images[kind] = img
        sock = str(tmp_path / f"{kind}.sock")
        d = Daemon(kind, tmp_path, [
            "--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={server_keys}",
            # QEMU 7.2 checks tls-authz only for x509 certificates: bob gets in
            "--object", "authz-simple,id=az0,identity=alice",
            "--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=az0",
            "--export", "type=nbd,id=e,node-name=disk,name=x,writable=on"])
        d.start()
        try:
            out = {}
            keys = server_keys / "keys.psk"
            r = nbdinfo("--json", uri(sock, "alice", keys))
            assert r.returncode == 0, r.stderr
            out["info"] = json.loads(r.stdout.replace(sock, "SOCK"))
            # QEMU's client: write through TLS, then read back
            creds = f"tls-creds-psk,id=c0,endpoint=client,dir={server_keys},username=alice"
            opts = (f"driver=nbd,server.type=unix,server.path={sock},export=x,"
                    "tls-creds=c0")
            qemu_io("--object", creds, "--image-opts", "-c", "write -P 0x5a 64k 1M",
                    "-c", "write -z 4M 64k", opts)
            r = qemu_io("--object", creds, "--image-opts", "-c", "read -P 0x5a 64k 1M", opts)
            out["qemu-io read"] = "Pattern verification failed" not in r.stdout
            # libnbd copies the whole disk out over TLS
            dump = tmp_path / f"{kind}.raw"
            run("nbdcopy", uri(sock, "bob", keys), str(dump))
            out["nbdcopy"] = dump.read_bytes()[64 * 1024:64 * 1024 + 4] == b"\x5a" * 4
            out["map"] = json.loads(nbdinfo("--map", "--json", uri(sock, "bob", keys)).stdout)
            # refused: the wrong key, an unknown identity, no TLS at all
            out["wrong key"] = nbdinfo("--size", uri(sock, "alice", wrong / "keys.psk")).returncode
            out["unknown identity"] = nbdinfo("--size", uri(sock, "carol", wrong / "keys.psk")).returncode
            r = nbdinfo("--size", uri(sock, None))
            out["no tls"] = (r.returncode, r.stderr.replace(sock, "SOCK"))
            # the daemon goes on serving after the refusals
            out["after"] = nbdinfo("--size", uri(sock, "alice", keys)).stdout
            seen[kind] = out
        finally:
            d.stop()
    assert seen["trio"] == seen["qemu"]
    t = seen["trio"]
    assert t["qemu-io read"] and t["nbdcopy"] and t["after"].strip() == str(16 << 20)
    assert t["wrong key"] != 0 and t["unknown identity"] != 0 and t["no tls"][0] != 0
    qemu_img("compare", str(images["qemu"]), str(images["trio"]))
    assert qemu_img("check", str(images["trio"])).returncode == 0


def test_psk_object_errors_same(tmp_path):
    keys = tmp_path / "k"
    keys.mkdir()
    write_keys(keys / "keys.psk", "alice")
    empty = tmp_path / "empty"
    empty.mkdir()
    psk = {"qom-type": "tls-creds-psk", "id": "t0"}
    seen = {}
    for kind in KINDS:
        d = Daemon(kind, tmp_path, [])
        d.start()
        try:
            q = d.qmp()
            out = []
            for cmd, args in [
                ("object-add", dict(psk, endpoint="server")),
                ("object-add", dict(psk, endpoint="server", dir=str(empty))),
                ("object-add", dict(psk, dir=str(empty), username="alice")),
                ("object-add", dict(psk, endpoint="server", dir=str(keys), username="alice")),
                # client credentials cannot serve
                ("object-add", dict(psk, dir=str(keys), username="alice")),
                ("nbd-server-start", {"addr": {"type": "unix", "data": {
                    "path": str(tmp_path / f"{kind}.sock")}}, "tls-creds": "t0"}),
                ("object-add", dict(psk, id="t1", endpoint="server", dir=str(keys))),
                ("nbd-server-start", {"addr": {"type": "unix", "data": {
                    "path": str(tmp_path / f"{kind}.sock")}}, "tls-creds": "t1"}),
            ]:
                r = q.cmd_raw(cmd, args)
                r.pop("id", None)
                out.append((cmd, r))
            seen[kind] = out
        finally:
            d.stop()
    assert seen["trio"] == seen["qemu"]
    assert seen["trio"][-1] == ("nbd-server-start", {"return": {}})


def test_anon_clients_same(tmp_path):
    """tls-creds-anon: anonymous Diffie-Hellman with QEMU's own client (libnbd
    has no anonymous TLS); tls-authz does not apply, as in QEMU 7.2."""
    seen, images = {}, {}
    for kind in KINDS:
        img = tmp_path / f"anon-{kind}.raw"
        qemu_img("create", "-f", "raw", str(img), "4M")
        images[kind] = img
        sock = str(tmp_path / f"anon-{kind}.sock")
        d = Daemon(kind, tmp_path, [
            "--object", "tls-creds-anon,id=tls0,endpoint=server",
            "--object", "authz-simple,id=az0,identity=nobody",
            "--blockdev", f"driver=file,node-name=f,filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0,tls-authz=az0",
            "--export", "type=nbd,id=e,node-name=f,name=x,writable=on"])
        d.start()
        try:
            opts = f"driver=nbd,server.type=unix,server.path={sock},export=x,tls-creds=c0"
            r = qemu_io("--object", "tls-creds-anon,id=c0,endpoint=client", "--image-opts",
                        "-c", "write -P 0x33 4k 64k", "-c", "read -P 0x33 4k 64k", opts)
            plain = nbdinfo("--size", uri(sock, None))
            seen[kind] = ("Pattern verification failed" in r.stdout, plain.returncode,
                          plain.stderr.replace(sock, "SOCK"))
        finally:
            d.stop()
    assert seen["trio"] == seen["qemu"]
    assert seen["trio"][:2] == (False, 1)
    qemu_img("compare", "-f", "raw", "-F", "raw", str(images["qemu"]), str(images["trio"]))
