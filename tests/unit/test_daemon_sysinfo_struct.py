"""struct sysinfo packing per ABI, and the pure parts of the sysinfo and mknod handlers."""
from __future__ import annotations

import ctypes
import os
import stat
import struct

import pytest

from isobox.daemon.syscalls import mknod as M
from isobox.daemon.syscalls import sysinfo as S


class NativeSysinfo(ctypes.Structure):
    """glibc's <sys/sysinfo.h> struct sysinfo on x86_64, laid out by the C compiler's rules."""
    _fields_ = [("uptime", ctypes.c_long), ("loads", ctypes.c_ulong * 3), ("totalram", ctypes.c_ulong),
                ("freeram", ctypes.c_ulong), ("sharedram", ctypes.c_ulong), ("bufferram", ctypes.c_ulong),
                ("totalswap", ctypes.c_ulong), ("freeswap", ctypes.c_ulong), ("procs", ctypes.c_ushort),
                ("pad", ctypes.c_ushort), ("totalhigh", ctypes.c_ulong), ("freehigh", ctypes.c_ulong),
                ("mem_unit", ctypes.c_uint), ("_f", ctypes.c_char * 0)]


SAMPLE = S.Info(uptime=1234, loads=(65536, 32768, 1), totalram=256 << 20, freeram=200 << 20,
                sharedram=4096, bufferram=0, totalswap=64 << 20, freeswap=60 << 20, procs=7, mem_unit=1)


def test_native_layout_matches_the_c_struct():
    assert S.NATIVE.size == ctypes.sizeof(NativeSysinfo) == 112
    s = NativeSysinfo.from_buffer_copy(S.pack_native(SAMPLE))
    assert (s.uptime, list(s.loads)) == (1234, [65536, 32768, 1])
    assert (s.totalram, s.freeram, s.sharedram, s.bufferram) == (256 << 20, 200 << 20, 4096, 0)
    assert (s.totalswap, s.freeswap, s.procs, s.totalhigh, s.freehigh, s.mem_unit) == (64 << 20, 60 << 20, 7, 0, 0, 1)


def test_native_layout_matches_what_the_kernel_writes():
    """The real syscall fills the same 112 bytes the packer produces (offsets, not values)."""
    buf = ctypes.create_string_buffer(b"\xaa" * 112, 112)
    assert ctypes.CDLL(None, use_errno=True).sysinfo(buf) == 0
    fields = S.NATIVE.unpack(buf.raw)
    assert fields[-1] == 1                      # mem_unit at offset 104
    assert fields[4] > 0 and fields[5] <= fields[4]   # totalram, freeram


COMPAT_OFFSETS = {"uptime": 0, "loads": 4, "totalram": 16, "freeram": 20, "sharedram": 24, "bufferram": 28,
                  "totalswap": 32, "freeswap": 36, "procs": 40, "totalhigh": 44, "freehigh": 48, "mem_unit": 52}


def test_compat_layout_is_kernel_compat_sysinfo():
    raw = S.pack_compat(SAMPLE)
    assert len(raw) == S.COMPAT.size == 64
    u32 = lambda off: struct.unpack_from("<I", raw, off)[0]  # noqa: E731
    assert u32(COMPAT_OFFSETS["uptime"]) == 1234
    assert [u32(4), u32(8), u32(12)] == [65536, 32768, 1]
    assert u32(COMPAT_OFFSETS["totalram"]) == 256 << 20 and u32(COMPAT_OFFSETS["freeswap"]) == 60 << 20
    assert struct.unpack_from("<H", raw, COMPAT_OFFSETS["procs"])[0] == 7
    assert u32(COMPAT_OFFSETS["mem_unit"]) == 1
    assert raw[56:] == b"\0" * 8


def test_compat_scales_like_the_kernel_when_memory_exceeds_32_bits():
    big = S.Info(totalram=8 << 30, freeram=6 << 30, sharedram=1 << 20, totalswap=1 << 30, freeswap=1 << 29,
                 mem_unit=1)
    raw = S.pack_compat(big)
    unit = struct.unpack_from("<I", raw, COMPAT_OFFSETS["mem_unit"])[0]
    assert unit == S.PAGE_SIZE
    shift = unit.bit_length() - 1
    for name in ("totalram", "freeram", "sharedram", "totalswap", "freeswap"):
        assert struct.unpack_from("<I", raw, COMPAT_OFFSETS[name])[0] == getattr(big, name) >> shift, name


def test_compat_swap_alone_over_32_bits_also_scales():
    raw = S.pack_compat(S.Info(totalram=1 << 30, totalswap=5 << 30, mem_unit=1))
    assert struct.unpack_from("<I", raw, COMPAT_OFFSETS["mem_unit"])[0] == S.PAGE_SIZE


def test_compat_fits_32_bits_keeps_bytes():
    raw = S.pack_compat(S.Info(totalram=(4 << 30) - 4096, mem_unit=1))
    assert struct.unpack_from("<I", raw, COMPAT_OFFSETS["totalram"])[0] == (4 << 30) - 4096


def test_procs_saturate_at_u16():
    assert struct.unpack_from("<H", S.pack_native(S.Info(procs=70000)), 80)[0] == 0xFFFF


def test_layout_by_abi():
    assert S.layout_for(S.AUDIT_ARCH_X86_64) is S.pack_native      # x86_64 and x32
    assert S.layout_for(S.AUDIT_ARCH_I386) is S.pack_compat
    assert S.layout_for(0xC00000B7) is None                          # aarch64: not trapped, not packed


def test_loads_are_the_trackers_in_si_load_shift():
    from isobox.daemon.fs.loadavg import FIXED_1, LoadTracker

    class View:
        key = "/k"

        def threads(self):
            return []
    t = LoadTracker()
    t.track("/k", View())
    t._entries["/k"].loads = [FIXED_1, FIXED_1 // 2, 3]
    assert S.load_fixed(t, View()) == (65536, 32768, 3 << 5)
    assert S.load_fixed(None, View()) == (0, 0, 0)


# -- mknod's pure parts --

@pytest.mark.parametrize("maj,mnr", [(1, 3), (5, 2), (259, 0), (4095, 1 << 19)])
def test_decode_dev_is_new_decode_dev(maj, mnr):
    assert M.decode_dev(os.makedev(maj, mnr) & 0xFFFFFFFF) == (maj, mnr)


@pytest.mark.parametrize("mode,dev,kind", [
    (stat.S_IFCHR | 0o666, (1, 3), "make"), (stat.S_IFCHR | 0o620, (5, 0), "make"),
    (stat.S_IFCHR, (1, 1), "refuse"), (stat.S_IFBLK | 0o660, (8, 0), "refuse"),
    (stat.S_IFCHR, (0, 0), "kernel"), (stat.S_IFIFO | 0o644, (0, 0), "kernel"),
    (stat.S_IFSOCK | 0o644, (0, 0), "kernel"), (stat.S_IFREG | 0o644, (0, 0), "kernel"),
    (0o644, (0, 0), "kernel"), (stat.S_IFREG | 0o4755, (0, 0), "setid"), (0o2755, (0, 0), "setid"),
    (stat.S_IFDIR | 0o755, (0, 0), "kernel"),
])
def test_classify(mode, dev, kind):
    assert M.classify(mode, *dev) == kind


def test_decode_both_syscalls():
    from isobox.daemon.syscalls.call import Call
    dev = os.makedev(1, 9)
    c = Call(0, 0, 1, 133, S.AUDIT_ARCH_X86_64, (0x1000, stat.S_IFCHR | 0o666, dev, 0, 0, 0), "mknod", None)
    assert M.decode(c) == M.Request(M.AT_FDCWD, 0x1000, stat.S_IFCHR | 0o666, 1, 9)
    c = Call(0, 0, 1, 259, S.AUDIT_ARCH_X86_64, (0xFFFFFF9C, 0x2000, 0xDEAD0000 | stat.S_IFCHR | 0o600, dev, 0, 0),
             "mknodat", None)
    assert M.decode(c) == M.Request(-100, 0x2000, stat.S_IFCHR | 0o600, 1, 9)   # int dirfd, umode_t mode


@pytest.mark.parametrize("path,parts", [("/dev/x", ("/dev", "x")), ("x", (".", "x")), ("/x", ("/", "x")),
                                        ("a/b/", ("a/b", "")), ("../x", ("..", "x"))])
def test_split(path, parts):
    assert M.split(path) == parts


def test_mapped():
    assert M.mapped(100000, "0 100000 65536\n") and not M.mapped(0, "0 100000 65536\n")
