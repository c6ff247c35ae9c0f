"""The VDUSE ioctl numbers and structure layouts of proto/vduse.py
against the kernel's own header (linux/vduse.h of linux-libc-dev),
compiled with the C compiler: a wrong size in an ioctl number makes the
kernel answer ENOTTY, a wrong offset garbles the device's config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from qsd_trio.proto import vduse as v

HEADER = Path("/usr/include/linux/vduse.h")
pytestmark = pytest.mark.skipif(not HEADER.exists() or shutil.which("cc") is None,
                                reason="no linux/vduse.h or C compiler")

PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/vduse.h>
#define P(x) printf(#x " %llu\n", (unsigned long long)(x))
int main(void) {
    P(VDUSE_SET_API_VERSION); P(VDUSE_CREATE_DEV); P(VDUSE_DESTROY_DEV);
    P(VDUSE_IOTLB_GET_FD); P(VDUSE_DEV_GET_FEATURES); P(VDUSE_DEV_SET_CONFIG);
    P(VDUSE_DEV_INJECT_CONFIG_IRQ); P(VDUSE_VQ_SETUP); P(VDUSE_VQ_GET_INFO);
    P(VDUSE_VQ_SETUP_KICKFD); P(VDUSE_VQ_INJECT_IRQ); P(VDUSE_API_VERSION);
    P(VDUSE_NAME_MAX); P(VDUSE_ACCESS_WO);
    P(VDUSE_GET_VQ_STATE); P(VDUSE_SET_STATUS); P(VDUSE_UPDATE_IOTLB);
    P(sizeof(struct vduse_dev_config)); P(offsetof(struct vduse_dev_config, features));
    P(offsetof(struct vduse_dev_config, config_size));
    P(sizeof(struct vduse_iotlb_entry)); P(offsetof(struct vduse_iotlb_entry, perm));
    P(sizeof(struct vduse_vq_info)); P(offsetof(struct vduse_vq_info, split));
    P(offsetof(struct vduse_vq_info, ready));
    P(sizeof(struct vduse_vq_config)); P(sizeof(struct vduse_vq_eventfd));
    P(sizeof(struct vduse_dev_request)); P(sizeof(struct vduse_dev_response));
    P(offsetof(struct vduse_dev_request, vq_state));
    P(offsetof(struct vduse_dev_response, vq_state));
    return 0;
}
"""


def test_ioctls_and_layouts_match_the_kernel_header(tmp_path):
    src = tmp_path / "uapi.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "uapi"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    c = {name: int(value) for name, value in (ln.rsplit(" ", 1) for ln in out.splitlines())}
    for name in ("VDUSE_SET_API_VERSION", "VDUSE_CREATE_DEV", "VDUSE_DESTROY_DEV",
                 "VDUSE_IOTLB_GET_FD", "VDUSE_DEV_GET_FEATURES", "VDUSE_DEV_SET_CONFIG",
                 "VDUSE_DEV_INJECT_CONFIG_IRQ", "VDUSE_VQ_SETUP", "VDUSE_VQ_GET_INFO",
                 "VDUSE_VQ_SETUP_KICKFD", "VDUSE_VQ_INJECT_IRQ", "VDUSE_API_VERSION",
                 "VDUSE_NAME_MAX", "VDUSE_ACCESS_WO", "VDUSE_GET_VQ_STATE",
                 "VDUSE_SET_STATUS", "VDUSE_UPDATE_IOTLB"):
        assert getattr(v, name) == c[name], name
    # what proto/vduse.py packs and unpacks, at the header's offsets
    mark = 0x0102030405060708
    head = v.dev_config("dev", 2, mark, 1, 4096, b"")
    assert len(head) == c["sizeof(struct vduse_dev_config)"]
    assert head.index(mark.to_bytes(8, "little")) == c["offsetof(struct vduse_dev_config, features)"]
    cfg = v.dev_config("dev", 2, 0, 1, 4096, b"c" * 60)
    at = c["offsetof(struct vduse_dev_config, config_size)"]
    assert cfg[at:at + 4] == (60).to_bytes(4, "little") and cfg[at + 4:] == b"c" * 60
    query = v.iotlb_query(0x1000)
    assert len(query) == c["sizeof(struct vduse_iotlb_entry)"]
    query[c["offsetof(struct vduse_iotlb_entry, perm)"]] = v.VDUSE_ACCESS_WO
    assert v.iotlb_entry(query) == (0, 0x1000, 0x1001, v.VDUSE_ACCESS_WO)
    info = v.vq_info_query(3)
    assert len(info) == c["sizeof(struct vduse_vq_info)"]
    info[c["offsetof(struct vduse_vq_info, split)"]] = 7
    info[c["offsetof(struct vduse_vq_info, ready)"]] = 1
    assert v.vq_info(info) == (0, 0, 0, 0, 7, True)
    assert len(v.vq_config(0, 256)) == c["sizeof(struct vduse_vq_config)"]
    assert len(v.vq_eventfd(0, 5)) == c["sizeof(struct vduse_vq_eventfd)"]
    assert v.MSG_SIZE == c["sizeof(struct vduse_dev_request)"] == \
        c["sizeof(struct vduse_dev_response)"]
    state_at = c["offsetof(struct vduse_dev_request, vq_state)"]
    request = (v.VDUSE_GET_VQ_STATE.to_bytes(4, "little") + (9).to_bytes(4, "little")).ljust(
        state_at, b"\0") + (2).to_bytes(4, "little")
    kind, request_id, body = v.decode_request(request.ljust(v.MSG_SIZE, b"\0"))
    assert (kind, request_id, v.vq_state_index(body)) == (v.VDUSE_GET_VQ_STATE, 9, 2)
    reply = v.response(9, v.VDUSE_REQ_RESULT_OK, v.vq_state(2, 11))
    assert len(reply) == v.MSG_SIZE
    assert reply[c["offsetof(struct vduse_dev_response, vq_state)"]:][:6] == \
        (2).to_bytes(4, "little") + (11).to_bytes(2, "little")
