#!/bin/bash
# start.sh DIR -- start a throwaway single-node Ceph (Pacific) cluster in DIR:
# one ceph-mon + one ceph-osd (memstore: data in RAM), cephx auth, pool "rbd".
# No systemd, nothing under /etc/ceph or /var/lib/ceph; everything lives in DIR.
# Stop it with stop.sh DIR (keep the two scripts side by side: on failure
# start.sh calls stop.sh --keep-dir DIR, leaving the logs in DIR/log).
# Prints CEPH_CONF=... and CEPH_KEYRING=... on success; every client then
# needs only -c DIR/ceph.conf (or CEPH_CONF=DIR/ceph.conf), e.g.
#   rbd -c DIR/ceph.conf create rbd/img --size 256M
#   qemu-img info "rbd:rbd/img:conf=DIR/ceph.conf"
# Debian 12 packages (the Makefile's test packages): ceph-mon ceph-osd ceph-common
# (no ceph-mgr needed).  Knobs (environment):
#   CEPH_OBJECTSTORE=memstore|bluestore  (default memstore: data in the OSD's RAM;
#                                         bluestore: 10 GiB sparse file in DIR)
#   CEPH_MEMSTORE_BYTES=N                (capacity memstore reports, default 4 GiB)
#   CEPH_BOOT_TIMEOUT=S                  (default 60)
#   CEPH_ONE_NODE_TRACE=1                (print step timings on stderr)
set -euo pipefail

if [ $# -ne 1 ]; then echo "usage: $0 DIR" >&2; exit 2; fi
DIR=$(realpath -m "$1")
if [ -e "$DIR/ceph.conf" ]; then echo "$0: $DIR already holds a cluster" >&2; exit 1; fi
mkdir -p "$DIR"/{run,log}
if [ ${#DIR} -gt 90 ]; then
    echo "$0: note: DIR is long; admin sockets ($DIR/run/*.asok) exceed the 107-byte" \
         "unix socket limit and are skipped (the cluster works without them)" >&2
fi
CONF=$DIR/ceph.conf
KEYRING=$DIR/keyring
OBJECTSTORE=${CEPH_OBJECTSTORE:-memstore}      # or bluestore (sparse file in DIR)
MEMSTORE_BYTES=${CEPH_MEMSTORE_BYTES:-4294967296} # size the OSD reports (memstore only)
BOOT_TIMEOUT=${CEPH_BOOT_TIMEOUT:-60}

T0=$(date +%s.%N)
step() { [ -z "${CEPH_ONE_NODE_TRACE:-}" ] || echo "$(awk -v t0="$T0" -v t1="$(date +%s.%N)" "BEGIN{printf \"+%.2fs\", t1-t0}") $*" >&2; }
ceph() { command ceph -c "$CONF" --connect-timeout 30 "$@"; }

fail() {  # report, stop whatever was started, keep DIR (logs) for a look
    echo "$0: $*" >&2
    for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
        [ -s "$f" ] && { echo "--- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
    "$(dirname "$0")/stop.sh" --keep-dir "$DIR" || true
    exit 1
}

free_port() {
    /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

FSID=$(cat /proc/sys/kernel/random/uuid)
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)

write_conf() {
    cat > "$CONF" <<CONF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$1]
keyring = $KEYRING
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $DIR/run
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
osd objectstore = $OBJECTSTORE

[mon]
mon data = $DIR/\$name
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon data avail warn = 1
mon data avail crit = 0
mon cluster log file = $DIR/log/cluster.log
ms bind retry count = 1
paxos propose interval = 0.1
paxos min wait = 0.01
mon osd cache size = 50

[osd]
osd data = $DIR/\$name
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
public addr = 127.0.0.1
cluster addr = 127.0.0.1
osd op num shards = 1
osd op num threads per shard = 2
memstore device bytes = $MEMSTORE_BYTES
bluestore block size = 10737418240
bluestore block create = true
bluestore cache autotune = false
bluestore cache size = 67108864
CONF
}

step keys
# --- keys: one keyring for mon., client.admin and osd.0 (imported by mon mkfs)
ceph-authtool --create-keyring "$KEYRING" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$KEYRING" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$KEYRING" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null

# --- monitor: pick a free port; retry if another process grabs it first
started=
for try in 1 2 3 4 5; do
    PORT=$(free_port)
    write_conf "$PORT"
    rm -rf "$DIR/mon.a" "$DIR/monmap"
    monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$PORT]" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$KEYRING" \
        >"$DIR/log/mon.a.mkfs.out" 2>&1 || fail "ceph-mon --mkfs failed"
    # ceph-mon daemonizes; the parent returns once the child is up (or failed)
    if ceph-mon -c "$CONF" -i a </dev/null >"$DIR/log/mon.a.out" 2>&1; then
        started=1; break
    fi
    echo "$0: ceph-mon failed on port $PORT (try $try), retrying" >&2
done
[ -n "$started" ] || fail "could not start ceph-mon"
export CEPH_CONF=$CONF CEPH_KEYRING=$KEYRING
step mon started
echo "$PORT" > "$DIR/mon.port"

# --- OSD
OSD_ID=$(ceph osd new "$OSD_UUID") || fail "ceph osd new failed"
[ "$OSD_ID" = 0 ] || fail "unexpected osd id $OSD_ID"
step osd new
mkdir -p "$DIR/osd.0"
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" \
    >"$DIR/log/osd.0.mkfs.out" 2>&1 || fail "ceph-osd --mkfs failed"
step osd mkfs done
ceph-osd -c "$CONF" -i 0 </dev/null >"$DIR/log/osd.0.out" 2>&1 || fail "ceph-osd failed to start"

step osd started
deadline=$((SECONDS + BOOT_TIMEOUT))
until ceph osd dump -f json 2>/dev/null | /usr/bin/python3 -c '
import json,sys; d=json.load(sys.stdin)
sys.exit(0 if any(o["osd"]==0 and o["up"]==1 and o["in"]==1 for o in d["osds"]) else 1)'; do
    [ $SECONDS -lt $deadline ] || fail "osd.0 not up/in after ${BOOT_TIMEOUT}s"
    sleep 0.5
done

step osd up
# --- pool "rbd"
ceph osd pool create rbd 8 8 replicated >/dev/null 2>&1 || fail "pool create failed"
step pool created
timeout "$BOOT_TIMEOUT" rbd -c "$CONF" pool init rbd || fail "rbd pool init failed"
step pool init done
# wait until the PGs serve I/O (no mgr, so 'ceph -s' cannot show PG states)
timeout "$BOOT_TIMEOUT" rados -c "$CONF" -p rbd put .ceph-one-node-probe /dev/null \
    || fail "pool rbd does not serve I/O"
rados -c "$CONF" -p rbd rm .ceph-one-node-probe

step done
echo "CEPH_CONF=$CONF"
echo "CEPH_KEYRING=$KEYRING"
