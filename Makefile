# Two commands for a newcomer on a fresh Debian 12 machine:
#   make run   - install what running needs, start qsd-trio on a demo image
#   make test  - install what the tests need too, run the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# running: the venv, and qemu-img for the demo image
RUN_DEBS  := python3-venv qemu-utils
# the tests: the reference qemu-storage-daemon (in qemu-system-common), the
# NBD clients, fio, FUSE mounts, ext4 loop images, QEMU guests, a one-node
# Ceph cluster and QEMU's rbd driver (tests/ceph/)
TEST_DEBS := qemu-system-common libnbd-bin python3-libnbd fio fuse3 e2fsprogs mount qemu-system-x86 iproute2 nbdkit ceph-mon ceph-osd ceph-common python3-rbd python3-rados qemu-block-extra
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test soak guest deps test-deps venv test-venv lint bench clean

# apt-get install those of the Debian packages $(1) that are missing
define install_debs
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi
endef

deps:
	$(call install_debs,$(RUN_DEBS))

test-deps: deps
	$(call install_debs,$(TEST_DEBS))

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[qmp]'
	# byte-compile once: the generated schema module is large, and an
	# environment with PYTHONDONTWRITEBYTECODE would recompile it every start
	$(PY) -m compileall -q qsd_trio
	touch $@

$(VENV)/.test-stamp: $(VENV)/.stamp
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.stamp

test-venv: test-deps venv $(VENV)/.test-stamp

test: test-venv
	$(PY) -m ruff check qsd_trio tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

soak: test-venv
	$(PY) -m pytest -q -m soak

# every QEMU-guest test (make test runs only the smoke ones); tests/guest
guest: test-venv
	$(PY) -m pytest -q -p no:cacheprovider -m 'not soak' \
	  tests/integration/test_vhost_user_guest.py tests/integration/test_vhost_user_restart.py \
	  tests/integration/test_vduse_guest.py

bench: test-venv
	$(PY) benchmarks/run.py

run: venv
	@mkdir -p demo
	@[ -f demo/disk.qcow2 ] || qemu-img create -q -f qcow2 demo/disk.qcow2 1G
	@echo "qsd-trio: demo image demo/disk.qcow2"
	@echo "  QMP:  $(PY) -m qemu.qmp.qmp_shell $(CURDIR)/demo/qmp.sock"
	@echo "  NBD:  qemu-img info 'nbd+unix:///disk?socket=$(CURDIR)/demo/nbd.sock'"
	@echo "  ctl:  $(VENV)/bin/qsd-trio-ctl $(CURDIR)/demo/qmp.sock tree   (or exports, stats, jobs)"
	@echo "  stop: Ctrl-C, or the QMP command quit"
	$(VENV)/bin/qsd-trio \
	  --blockdev driver=file,node-name=file0,filename=demo/disk.qcow2 \
	  --blockdev driver=qcow2,node-name=disk,file=file0 \
	  --chardev socket,id=qmp0,path=demo/qmp.sock,server=on,wait=off \
	  --monitor chardev=qmp0 \
	  --nbd-server addr.type=unix,addr.path=demo/nbd.sock \
	  --export type=nbd,id=exp0,node-name=disk,name=disk,writable=on \
	  --pidfile demo/qsd.pid

clean:
	rm -rf $(VENV) demo build *.egg-info
