# Two commands for a newcomer on a fresh Debian 12 machine:
#   make run   - install everything, start qsd-trio on a demo image
#   make test  - install what the tests need, run the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEBS   := qemu-utils qemu-system-common libnbd-bin python3-libnbd fio fuse3 python3-venv e2fsprogs mount
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test soak deps venv lint bench clean

deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# byte-compile once: the generated schema module is large, and an
	# environment with PYTHONDONTWRITEBYTECODE would recompile it every start
	$(PY) -m compileall -q qsd_trio
	touch $@

venv: deps $(VENV)/.stamp

test: venv
	$(PY) -m ruff check qsd_trio tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider

soak: venv
	$(PY) -m pytest -q -m soak

bench: venv
	$(PY) benchmarks/run.py

run: venv
	@mkdir -p demo
	@[ -f demo/disk.qcow2 ] || qemu-img create -q -f qcow2 demo/disk.qcow2 1G
	@echo "qsd-trio: demo image demo/disk.qcow2"
	@echo "  QMP:  $(PY) -m qemu.qmp.qmp_shell $(CURDIR)/demo/qmp.sock"
	@echo "  NBD:  nbdinfo 'nbd+unix:///disk?socket=$(CURDIR)/demo/nbd.sock'"
	@echo "        qemu-img info 'nbd+unix:///disk?socket=$(CURDIR)/demo/nbd.sock'"
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
