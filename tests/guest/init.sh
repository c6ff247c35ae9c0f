#!/bin/busybox sh
# /init of the qsd-trio test guest (see machine.py for the host side).
#
# Loads the modules listed in /mods/order, makes the host's / (virtio-9p tag
# "hostroot", read-only) the root of a chroot under an overlay with a tmpfs
# on top, mounts the read-write share (tag "share") at the host path given
# as qsd.share= on the kernel command line, then serves the control port
# (virtio-serial port named qsd.ctl), one line per message:
#   host -> guest  "RUN <n>"          run <share>/cmd/<n>.sh with bash in the
#                                     chroot, in the background; stdout and
#                                     stderr go to <share>/cmd/<n>.out
#   guest -> host  "READY <kernel>"   once, when the port is served
#                  "DONE <n> <rc>"    when command <n> has ended
# Anything that fails before READY powers the guest off, which the host sees
# as the end of its connection, with this console as the explanation.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
log() { echo "qsd-guest[$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() { log "FAIL: $*"; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }
log "kernel $(cat /kver)"
for m in $(cat /mods/order); do insmod /mods/$m.ko || fail "insmod $m"; done
log "modules loaded"
SHARE=
for arg in $(cat /proc/cmdline); do
  case $arg in qsd.share=*) SHARE=${arg#qsd.share=} ;; esac
done
[ -n "$SHARE" ] || fail "no qsd.share= on the kernel command line"
O=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $O,ro,cache=loose hostroot /host || fail "mount hostroot"
mount -t 9p -o $O,cache=none share /share || fail "mount share"
mount -t tmpfs -o mode=755,size=75% tmpfs /ovl
mkdir -p /ovl/u /ovl/w
N=/newroot
mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/u,workdir=/ovl/w $N || fail "mount overlay"
mount -t proc proc $N/proc
mount -t sysfs sysfs $N/sys
mount -t devtmpfs devtmpfs $N/dev
mkdir -p $N/dev/pts $N/dev/shm
mount -t devpts -o ptmxmode=666 devpts $N/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $N/dev/shm
mount -t tmpfs -o mode=755 tmpfs $N/run
mkdir -p "$N$SHARE" && mount --bind /share "$N$SHARE" || fail "bind share"
ip link set lo up
hostname qsd-guest
PORT=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name 2>/dev/null)" = qsd.ctl ] && PORT=/dev/${p##*/}
done
[ -n "$PORT" ] && [ -c "$PORT" ] || fail "no qsd.ctl virtio-serial port"
exec 3<>"$PORT" || fail "open $PORT"
log "serving $PORT"
echo "READY $(cat /kver)" >&3
run() {
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    /bin/chroot $N /bin/bash "$SHARE/cmd/$1.sh" < /dev/null > "/share/cmd/$1.out" 2>&1 3>&-
  echo "DONE $1 $?" >&3
}
while :; do
  # read fails while the host end is not connected: wait for it
  if ! read -r verb n <&3; then sleep 0.2; continue; fi
  case $verb in
    RUN) run "$n" & ;;
    *) log "unknown message: $verb $n" ;;
  esac
done
