"""sysinfo(2) answered from the container's cgroups.

busybox `free` and `uptime`, glibc's sysconf(_SC_PHYS_PAGES / _SC_AVPHYS_PAGES) and
get_nprocs-style sizing in runtimes (JVM, Go, Node) read sysinfo, not /proc/meminfo. Left
to the kernel it reports the host; here every field is computed from the same sources as
the emulated /proc files, so the two never disagree:

  uptime          ceil(/proc/uptime's first number) (the kernel rounds up the same way)
  loads[3]        /proc/loadavg's averages in 16.16 fixed point (SI_LOAD_SHIFT)
  totalram        MemTotal (the memory limit), freeram MemFree (limit - usage),
  sharedram       Shmem; bufferram 0 (Buffers: 0)
  totalswap       SwapTotal, freeswap SwapFree (the host's when swap is not accounted)
  procs           threads in the caller's cgroup subtree (the kernel's nr_threads)
  mem_unit        1 (64-bit ABIs; the i386 ABI scales like the kernel's compat_sysinfo)

The struct is written into the caller's memory with process_vm_writev (see write_out), after checking
that the caller is still the one stopped in the syscall (call.valid()), then the syscall
returns 0 without entering the kernel.
"""
from __future__ import annotations

import errno
import math
import os
import struct
import threading
import time
from dataclasses import dataclass

from isobox.daemon.fs.cgview import CgroupView, host_meminfo_kb, reader_view, view_for_dirs
from isobox.daemon.fs.context import Container
from isobox.daemon.fs.procfiles.swaps import swap_kb
from isobox.daemon.fs.procfiles.uptime import uptime
from isobox.daemon.syscalls.call import Call, Verdict, done, proceed, refuse
from isobox.daemon.syscalls.registry import handles
from isobox.linux import syscalls as k

# include/uapi/linux/audit.h. x32 reports AUDIT_ARCH_X86_64 (its syscall numbers carry
# __X32_SYSCALL_BIT) and shares the 64-bit struct: sysinfo is a "common" syscall in
# syscall_64.tbl and x32's __kernel_long_t is 64 bits.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003

SI_LOAD_SHIFT = 16            # include/uapi/linux/sysinfo.h
FSHIFT = 11                   # the LoadTracker's fixed point (include/linux/sched/loadavg.h)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# struct sysinfo, little-endian, no implicit padding: the explicit "x" bytes are the
# compiler's alignment holes (after pad, and at the end) and the libc5 _f[] tail.
NATIVE = struct.Struct("<q3Q6QHH4x2QI4x")     # x86_64 / x32: 112 bytes
COMPAT = struct.Struct("<i3I6IHH2II8x")       # i386 (kernel/sys.c struct compat_sysinfo): 64 bytes

LOADS = None                  # the server's LoadTracker (server.py sets it); None: loads are 0
_fallback_lock = threading.Lock()


@dataclass
class Info:
    """struct sysinfo's values, memory in bytes (mem_unit 1) until an ABI packs them."""
    uptime: int = 0
    loads: tuple[int, int, int] = (0, 0, 0)
    totalram: int = 0
    freeram: int = 0
    sharedram: int = 0
    bufferram: int = 0
    totalswap: int = 0
    freeswap: int = 0
    procs: int = 0
    totalhigh: int = 0
    freehigh: int = 0
    mem_unit: int = 1


# -- packing (pure) ---------------------------------------------------------------------------

_MEM_FIELDS = ("totalram", "freeram", "sharedram", "bufferram", "totalswap", "freeswap", "totalhigh", "freehigh")


def pack_native(i: Info) -> bytes:
    u64 = lambda v: max(0, v) & 0xFFFFFFFFFFFFFFFF  # noqa: E731 - unsigned long, as stored by the kernel
    return NATIVE.pack(i.uptime, *(u64(x) for x in i.loads), *(u64(getattr(i, f)) for f in _MEM_FIELDS[:6]),
                       min(i.procs, 0xFFFF), 0, u64(i.totalhigh), u64(i.freehigh), i.mem_unit)


def pack_compat(i: Info) -> bytes:
    """kernel/sys.c COMPAT_SYSCALL_DEFINE1(sysinfo): when RAM or swap does not fit 32 bits,
    mem_unit grows to PAGE_SIZE and every memory value is shifted to match; the rest is
    truncated to 32 bits like the kernel's assignments."""
    mem = {f: max(0, getattr(i, f)) for f in _MEM_FIELDS}
    unit = i.mem_unit
    if (mem["totalram"] >> 32) or (mem["totalswap"] >> 32):
        bits = 0
        while unit < PAGE_SIZE:
            unit <<= 1
            bits += 1
        mem = {f: v >> bits for f, v in mem.items()}
    u32 = lambda v: v & 0xFFFFFFFF  # noqa: E731
    up = ((i.uptime + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)       # s32, wrapping as C does
    return COMPAT.pack(up, *(u32(x) for x in i.loads), *(u32(mem[f]) for f in _MEM_FIELDS[:6]),
                       min(i.procs, 0xFFFF), 0, u32(mem["totalhigh"]), u32(mem["freehigh"]), unit)


def layout_for(arch: int):
    """The packer for the caller's ABI, or None when isoboxd does not know its struct."""
    return {AUDIT_ARCH_X86_64: pack_native, AUDIT_ARCH_I386: pack_compat}.get(arch)


# -- values -----------------------------------------------------------------------------------

def load_fixed(tracker, view: CgroupView) -> tuple[int, int, int]:
    """The view's load averages in SI_LOAD_SHIFT fixed point, from the tracker that also
    renders /proc/loadavg (so both show the same numbers); zeros without one."""
    if tracker is None:
        return 0, 0, 0
    tracker.track(view.key, view)
    # LoadTracker has no public accessor for the raw averages; read them under its lock.
    with tracker._lock:
        e = tracker._entries.get(view.key)
        loads = list(e.loads) if e is not None else [0, 0, 0]
    shift = SI_LOAD_SHIFT - FSHIFT          # the kernel's get_avenrun(loads, 0, shift)
    return loads[0] << shift, loads[1] << shift, loads[2] << shift


def swap_bytes(view: CgroupView) -> tuple[int, int]:
    """(total, free) swap in bytes as /proc/meminfo shows them: the cgroup's when accounted,
    else the host's lines, which meminfo passes through unchanged."""
    sw = swap_kb(view)
    if sw is not None:
        return sw[0] * 1024, (sw[0] - sw[1]) * 1024
    host = host_meminfo_kb()
    return host.get("SwapTotal", 0) * 1024, host.get("SwapFree", 0) * 1024


def info_for(container: Container, view: CgroupView, tracker=None) -> Info:
    limit = view.memory_limit()
    usage = min(view.memory_usage(), limit)
    total_swap, free_swap = swap_bytes(view)
    up, _idle = uptime(container, view)
    return Info(uptime=math.ceil(up), loads=load_fixed(tracker, view), totalram=limit, freeram=limit - usage,
                sharedram=view.memory_counters().get("shmem", 0), bufferram=0, totalswap=total_swap,
                freeswap=free_swap, procs=len(view.threads()), mem_unit=1)


FRESH = 0.1                     # as /proc's files: values at most 100 ms old
_cache: dict[tuple, tuple[float, Info]] = {}


def cached_info(container: Container, pid: int) -> Info:
    """info_for() of the caller's view, computed at most every FRESH seconds per view: a
    container looping on sysinfo must cost the daemon microseconds, not cgroup reads."""
    now = time.monotonic()
    hit = _cache.get((container.key, pid))
    if hit is not None and now - hit[0] < FRESH:
        return hit[1]
    view = caller_view(container, pid)
    vhit = _cache.get((container.key, view.key))
    info = vhit[1] if vhit is not None and now - vhit[0] < FRESH else info_for(container, view, LOADS)
    if len(_cache) > 4096:
        _cache.clear()
    _cache[(container.key, view.key)] = _cache[(container.key, pid)] = (now, info)
    return info


def packed(container: Container, pid: int, arch: int, pack) -> bytes:
    """The struct for this caller's ABI, packed once per cached Info (a flood of sysinfo from
    one container then costs the daemon two ioctls and one process_vm_writev per call)."""
    info = cached_info(container, pid)
    hit = _packed.get((id(info), arch))
    if hit is None:
        if len(_packed) > 4096:
            _packed.clear()
        hit = _packed[(id(info), arch)] = (info, pack(info))
    return hit[1]


_packed: dict[tuple[int, int], tuple[Info, bytes]] = {}    # keeps info alive so its id stays unique


def caller_view(container: Container, pid: int) -> CgroupView:
    """The caller's own cgroup when it sits below the container's (as for /proc reads)."""
    top = view_for_dirs(container.cgroups)
    try:
        return reader_view(pid, top) or top
    except OSError:
        return top


# -- writing into the caller ------------------------------------------------------------------

def write_out(call: Call, addr: int, data: bytes) -> Verdict | None:
    """Copies data to the caller's addr; a Verdict when that cannot be done, else None.

    process_vm_writev fails on a read-only page with EFAULT, exactly as the kernel's
    copy_to_user would (a write through /proc/<pid>/mem would force it). It names the caller
    by pid, so the notification is checked first: a caller still stopped in the syscall cannot
    have been reaped, and for its pid to name another process by the write, the caller would
    have to be killed, reaped and its pid handed out again (after the whole pid space wrapped)
    within the microseconds between the two calls. A pidfd would not close even that: it pins
    the process, not its pid number."""
    if addr == 0:
        return refuse(errno.EFAULT, "sysinfo: bad address")
    gone = Verdict("error", errno=errno.ESRCH, reason="sysinfo: caller went away", audit=False)
    try:
        if call.valid is not None and not call.valid():
            return gone
        if k.process_vm_writev(call.pid, addr, data) != len(data):
            return refuse(errno.EFAULT, "sysinfo: bad address")
    except OSError as e:
        if e.errno == errno.ESRCH:
            return gone
        return refuse(errno.EFAULT, "sysinfo: bad address")
    return None


@handles("sysinfo")
def handle(call: Call) -> Verdict:
    pack = layout_for(call.arch)
    if pack is None:
        return refuse(errno.ENOSYS, f"sysinfo: unknown ABI {call.arch:#x}")
    c = call.container
    if c is None:      # a listener no container owns: nothing to answer from but the host
        return proceed("sysinfo: no container")
    data = packed(c, call.pid, call.arch, pack)
    bad = write_out(call, call.args[0], data)
    if bad is not None:
        return bad
    v = done(0, "sysinfo from the container's cgroups")
    # Not audited: every `free`, `top` and JVM start calls it; a log line per call would
    # bury the refusals and device creations the audit log exists to show.
    v.audit = False
    return v
