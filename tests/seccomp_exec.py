"""Run a program with some system calls failing (a seccomp filter).

    python tests/seccomp_exec.py io_uring_setup=ENOSYS [io_setup=EPERM ...] -- PROGRAM ARGS...

Installs a filter that makes each named system call fail with the given
errno (and lets everything else through), then execs PROGRAM: the way a
container runtime's seccomp profile refuses io_uring or Linux AIO.  The
filter survives the exec and is inherited by every thread and child.
x86_64 only; other architectures run unfiltered (the filter lets them
through), which ``available()`` tells tests.

Uses prctl(PR_SET_NO_NEW_PRIVS) and seccomp(SECCOMP_SET_MODE_FILTER)
through ctypes; no root needed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

SYSCALLS = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
            "io_setup": 206, "io_submit": 209, "io_getevents": 208}

AUDIT_ARCH_X86_64 = 0xC000003E
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
PR_SET_NO_NEW_PRIVS = 38
SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1


def available() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(rules: dict[int, int]) -> bytes:
    """BPF: on x86_64, syscall nr in ``rules`` -> fail with that errno."""
    insns = [_insn(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
             _insn(BPF_JEQ_K, 0, 1 + 2 * len(rules), AUDIT_ARCH_X86_64),
             _insn(BPF_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
    for nr, err in rules.items():
        insns += [_insn(BPF_JEQ_K, 0, 1, nr), _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | err)]
    insns.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(insns)


def install(rules: dict[int, int]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = program(rules)
    filt = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(code) // 8, ctypes.addressof(filt))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                    ctypes.c_long(0), ctypes.byref(prog)) != 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")


def parse_rules(specs: list[str]) -> dict[int, int]:
    rules = {}
    for spec in specs:
        name, err = spec.split("=")
        rules[SYSCALLS[name]] = getattr(errno, err)
    return rules


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    rules = parse_rules(argv[:sep])
    cmd = argv[sep + 1:]
    install(rules)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
