"""/proc/cpuinfo: only the processor blocks of the allowed CPUs, keeping their real numbers.

Not renumbered on purpose: sched_getaffinity() inside the container reports real CPU
numbers, and /proc/stat and /sys/devices/system/cpu/online must name the same CPUs."""
from __future__ import annotations

from isobox.daemon.fs.cgview import host_file
from isobox.daemon.fs.context import RenderCtx


def blocks(text: str) -> list[tuple[int | None, str]]:
    """(processor number, block text) for each blank-line separated block."""
    out: list[tuple[int | None, str]] = []
    for blk in text.split("\n\n"):
        if not blk.strip():
            continue
        num = None
        for ln in blk.splitlines():
            key, _, val = ln.partition(":")
            if key.strip() == "processor":
                try:
                    num = int(val)
                except ValueError:
                    pass
                break
        out.append((num, blk.strip("\n")))
    return out


def filter_cpuinfo(text: str, cpus: list[int]) -> str:
    allowed = set(cpus)
    # Blocks without a "processor" line (e.g. s390x's header) are kept as they are.
    kept = [b for n, b in blocks(text) if n is None or n in allowed]
    return "".join(b + "\n\n" for b in kept)


def render(ctx: RenderCtx) -> bytes:
    return filter_cpuinfo(host_file("/proc/cpuinfo"), ctx.view.cpus()).encode()
