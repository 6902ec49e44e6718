"""/proc/swaps: the header, plus one synthetic "none ... virtual" line when the cgroup may swap."""
from __future__ import annotations

from isobox.daemon.fs.context import RenderCtx

HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"  # kernel 6.x swap_show() header


def swap_kb(view) -> tuple[int, int] | None:
    """(total, used) swap of the cgroup in kB; None when swap is not accounted for it."""
    total = view.swap_limit()
    used = view.swap_usage()
    if total is None or used is None:
        return None
    return total // 1024, min(used // 1024, total // 1024)


def render(ctx: RenderCtx) -> bytes:
    sw = swap_kb(ctx.view)
    if sw is None or sw[0] == 0:  # not accounted, or no swap allowed / none on the host
        return HEADER.encode()
    return (HEADER + swap_line(*sw)).encode()


def swap_line(total_kb: int, used_kb: int) -> str:
    """The synthetic swap line; the kernel's swap_show() spacing (name padded to 40,
    an extra tab after numbers below 10^7)."""
    tab = lambda n: "\t" if n < 10_000_000 else ""  # noqa: E731
    return f"{'none':<40}virtual\t{total_kb}\t{tab(total_kb)}{used_kb}\t{tab(used_kb)}0\n"
