"""ctypes bindings for bpf(2), only what cgroup device programs need (linux/bpf.h).

Instructions are encoded by hand as struct bpf_insn (8 bytes: code, dst_reg:4 | src_reg:4,
s16 off, s32 imm), the way runc's devicefilter builds them with cilium/ebpf's asm package.
x86_64 syscall number, like the rest of isobox.linux.
"""
from __future__ import annotations

import ctypes
import os
import struct

from isobox.linux.syscalls import _syscall  # one libc handle for all bindings

SYS_bpf = 321

# commands
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # attach type
BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2

# struct bpf_cgroup_dev_ctx: u32 access_type (type | access << 16), u32 major, u32 minor
BPF_DEVCG_ACC_MKNOD = 1
BPF_DEVCG_ACC_READ = 2
BPF_DEVCG_ACC_WRITE = 4
BPF_DEVCG_DEV_BLOCK = 1
BPF_DEVCG_DEV_CHAR = 2

# instruction classes / ops
BPF_LDX, BPF_ALU, BPF_JMP, BPF_JMP32 = 0x01, 0x04, 0x05, 0x06
BPF_W, BPF_MEM = 0x00, 0x60
BPF_K, BPF_X = 0x00, 0x08
BPF_AND, BPF_RSH, BPF_MOV = 0x50, 0x70, 0xB0
BPF_JNE, BPF_EXIT = 0x50, 0x90

R0, R1, R2, R3, R4, R5 = range(6)


class Insn(tuple):
    """(code, dst, src, off, imm); off of a jump may be a label (str) until resolved."""

    def __new__(cls, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0):
        return super().__new__(cls, (code, dst, src, off, imm))

    code = property(lambda s: s[0])
    dst = property(lambda s: s[1])
    src = property(lambda s: s[2])
    off = property(lambda s: s[3])
    imm = property(lambda s: s[4])


def ldx_w(dst: int, src: int, off: int) -> Insn:
    return Insn(BPF_LDX | BPF_MEM | BPF_W, dst, src, off, 0)


def alu32_imm(op: int, dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_K, dst, 0, 0, imm)


def alu32_reg(op: int, dst: int, src: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_X, dst, src, 0, 0)


def jne_imm(dst: int, imm: int, target: int | str) -> Insn:
    """32-bit compare (BPF_JMP32, kernel >= 5.1): the ctx fields are u32, so a value
    >= 2**31 still matches, where a 64-bit compare with the sign-extended imm would not."""
    return Insn(BPF_JMP32 | BPF_JNE | BPF_K, dst, 0, target, imm)


def jne_reg(dst: int, src: int, target: int | str) -> Insn:
    return Insn(BPF_JMP32 | BPF_JNE | BPF_X, dst, src, target, 0)


def exit_() -> Insn:
    return Insn(BPF_JMP | BPF_EXIT)


def encode(insns: list[Insn]) -> bytes:
    out = bytearray()
    for i in insns:
        if not isinstance(i.off, int):
            raise ValueError(f"unresolved jump label {i.off!r}")
        out += struct.pack("<BBhi", i.code, (i.dst & 0xF) | ((i.src & 0xF) << 4), i.off, i.imm)
    return bytes(out)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, max(len(attr), 128))
    r = _syscall(ctypes.c_long(SYS_bpf), ctypes.c_long(cmd), buf, ctypes.c_ulong(len(buf)))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _bpf_out(cmd: int, attr: bytes) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(attr, max(len(attr), 128))
    r = _syscall(ctypes.c_long(SYS_bpf), ctypes.c_long(cmd), buf, ctypes.c_ulong(len(buf)))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r, buf.raw


def prog_load(prog_type: int, insns: list[Insn], license: str = "Apache",
              expected_attach_type: int = 0) -> int:
    """BPF_PROG_LOAD -> program fd; a verifier refusal carries the verifier log in the message."""
    code = encode(insns)
    code_buf = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(65536)

    def attr(with_log: bool) -> bytes:
        # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
        # prog_flags, prog_name[16], prog_ifindex, expected_attach_type
        return struct.pack("<IIQQIIQII16sII", prog_type, len(insns), ctypes.addressof(code_buf),
                           ctypes.addressof(lic), 1 if with_log else 0, len(log) if with_log else 0,
                           ctypes.addressof(log) if with_log else 0, 0, 0, b"isobox_dev", 0,
                           expected_attach_type)
    try:
        return _bpf(BPF_PROG_LOAD, attr(False))
    except OSError as e:
        if e.errno != 13 and e.errno != 22:  # EACCES/EINVAL: verifier; ask it why
            raise
        try:
            fd = _bpf(BPF_PROG_LOAD, attr(True))
            return fd
        except OSError as e2:
            text = log.value.decode(errors="replace").strip().splitlines()
            msg = f"{os.strerror(e2.errno)} (verifier: {text[-1] if text else 'no log'})"
            raise OSError(e2.errno, msg) from None


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    _bpf(BPF_PROG_ATTACH, struct.pack("<IIIII", target_fd, prog_fd, attach_type, flags, 0))


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    _bpf(BPF_PROG_DETACH, struct.pack("<IIIII", target_fd, prog_fd, attach_type, 0, 0))


def prog_query(target_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """Program ids attached directly to target_fd (not inherited ones)."""
    ids = (ctypes.c_uint32 * max_progs)()
    # target_fd, attach_type, query_flags, attach_flags (out), prog_ids, prog_cnt (in/out)
    _r, raw = _bpf_out(BPF_PROG_QUERY, struct.pack("<IIIIQI", target_fd, attach_type, 0, 0,
                                                   ctypes.addressof(ids), max_progs))
    cnt = struct.unpack_from("<I", raw, 24)[0]
    return list(ids[:min(cnt, max_progs)])


def prog_get_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<III", prog_id, 0, 0))
