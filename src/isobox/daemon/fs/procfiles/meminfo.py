"""/proc/meminfo from the cgroup's memory limit, usage and memory.stat (LXCFS formulas).

Lines we do not compute pass through from the host unchanged."""
from __future__ import annotations

from isobox.daemon.fs.cgview import host_file
from isobox.daemon.fs.context import RenderCtx
from isobox.daemon.fs.procfiles.swaps import swap_kb


def line(name: str, kb: int) -> str:
    """One kernel-formatted line: "MemTotal:" padded to 16, the value right-aligned in 8."""
    return f"{name + ':':<16}{kb:>8} kB"


def values(view) -> dict[str, int]:
    """The lines we override, in kB."""
    limit = view.memory_limit()
    usage = min(view.memory_usage(), limit)
    st = view.memory_counters()
    k = lambda name: st.get(name, 0) // 1024  # noqa: E731 - bytes -> kB
    free = (limit - usage) // 1024
    anon = k("anon") if "anon" in st else max(0, k("active_anon") + k("inactive_anon") - k("shmem"))
    out = {
        "MemTotal": limit // 1024,
        "MemFree": free,
        # LXCFS: free + reclaimable page cache + reclaimable slab; never above MemTotal.
        "MemAvailable": min(limit // 1024, free + k("active_file") + k("inactive_file") + k("slab_reclaimable")),
        "Buffers": 0,
        "Cached": k("file"),
        "SwapCached": 0,
        "Active": k("active_anon") + k("active_file"),
        "Inactive": k("inactive_anon") + k("inactive_file"),
        "Active(anon)": k("active_anon"),
        "Inactive(anon)": k("inactive_anon"),
        "Active(file)": k("active_file"),
        "Inactive(file)": k("inactive_file"),
        "Unevictable": k("unevictable"),
        "Dirty": k("file_dirty"),
        "Writeback": k("file_writeback"),
        "AnonPages": anon,
        "Mapped": k("file_mapped"),
        "Shmem": k("shmem"),
        "AnonHugePages": k("anon_thp"),
        "ShmemHugePages": 0,
        "ShmemPmdMapped": 0,
        "Zswap": k("zswap"),
        "Zswapped": k("zswapped"),
    }
    # v1 memory.stat has no slab split. The host's lines cannot pass through: busybox `free`
    # adds SReclaimable to buff/cache, so the host's slab made "used" negative in a small
    # container. 0 is what the cgroup lets us know.
    out.update({"Slab": k("slab"), "SReclaimable": k("slab_reclaimable"),
                "SUnreclaim": k("slab_unreclaimable"), "KReclaimable": k("slab_reclaimable"),
                # mlocked pages are unevictable; the host's count can exceed the container's memory
                "Mlocked": min(k("unevictable"), limit // 1024)})
    sw = swap_kb(view)
    if sw is not None:
        out["SwapTotal"], out["SwapFree"] = sw[0], sw[0] - sw[1]
    return out


def render(ctx: RenderCtx) -> bytes:
    vals = values(ctx.view)
    out = []
    for ln in host_file("/proc/meminfo").splitlines():
        name = ln.partition(":")[0]
        out.append(line(name, vals[name]) if name in vals else ln)
    return ("\n".join(out) + "\n").encode()
