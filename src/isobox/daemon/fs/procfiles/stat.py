"""/proc/stat: the container's own CPU times on its allowed CPUs (real numbers, LXCFS style).

Per allowed CPU: user/system are the cgroup's, idle = host idle + (host busy - cgroup busy),
all other columns 0. v1 has per-CPU cpuacct counters; v2 only totals, which we spread
evenly over the allowed CPUs. Without any cgroup CPU accounting the host's lines of the
allowed CPUs are shown. Every non-cpu line passes through from the host."""
from __future__ import annotations

import os

from isobox.daemon.fs.cgview import host_file
from isobox.daemon.fs.context import RenderCtx

_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")  # /proc/stat counts USER_HZ ticks


def _host_cpu_lines(text: str) -> dict[int, list[int]]:
    out = {}
    for ln in text.splitlines():
        if ln.startswith("cpu") and ln[3:4].isdigit():
            name, *vals = ln.split()
            out[int(name[3:])] = [int(v) for v in vals]
    return out


def _cgroup_ticks(view, cpus: list[int]) -> dict[int, tuple[int, int]] | None:
    """{cpu: (user_ticks, system_ticks)} for the allowed CPUs, or None when not accounted."""
    per = view.cpu_usage_percpu()
    if per is not None:
        return {c: (per.get(c, (0, 0))[0] // _NS_PER_TICK, per.get(c, (0, 0))[1] // _NS_PER_TICK)
                for c in cpus}
    tot = view.cpu_usage()
    if tot is None or not cpus:
        return None
    n = len(cpus)
    u, s = tot[0] // _NS_PER_TICK, tot[1] // _NS_PER_TICK
    # Spread evenly; the first CPUs take the remainder so the sum stays exact.
    return {c: (u // n + (i < u % n), s // n + (i < s % n)) for i, c in enumerate(cpus)}


def cpu_rows(view, host_text: str) -> dict[int, list[int]]:
    """The 10 columns of each allowed cpuN line."""
    host = _host_cpu_lines(host_text)
    cpus = [c for c in view.cpus() if c in host]
    cg = _cgroup_ticks(view, cpus)
    rows: dict[int, list[int]] = {}
    for c in cpus:
        h = (host[c] + [0] * 10)[:10]
        if cg is None:
            rows[c] = h
            continue
        user, system = cg[c]
        # guest/guest_nice are already inside user/nice, so they are not added again.
        host_busy = h[0] + h[1] + h[2] + h[4] + h[5] + h[6] + h[7]
        idle = h[3] + max(0, host_busy - user - system)
        rows[c] = [user, 0, system, idle, 0, 0, 0, 0, 0, 0]
    return rows


def render(ctx: RenderCtx) -> bytes:
    text = host_file("/proc/stat")
    rows = cpu_rows(ctx.view, text)
    total = [sum(col) for col in zip(*rows.values())] if rows else [0] * 10
    out = []
    for ln in text.splitlines():
        if ln.startswith("cpu "):
            out.append("cpu  " + " ".join(map(str, total)))
            out.extend(f"cpu{c} " + " ".join(map(str, rows[c])) for c in sorted(rows))
        elif ln.startswith("cpu") and ln[3:4].isdigit():
            continue
        else:
            out.append(ln)
    return ("\n".join(out) + "\n").encode()
