"""Syscall name -> handler. Each handler module registers itself with @handles(...)."""
from __future__ import annotations

from collections.abc import Callable

from isobox.daemon.syscalls.call import Call, Verdict

HANDLERS: dict[str, Callable[[Call], Verdict]] = {}
SLOW: set[str] = set()          # handled on the pool: they fork helpers or wait on mounts
MODULES = ("setid", "sysinfo", "mount", "mknod", "umount", "mountapi")      # isobox.daemon.syscalls.<name>


def handles(*names: str, slow: bool = False):
    def deco(fn: Callable[[Call], Verdict]):
        for n in names:
            HANDLERS[n] = fn
            if slow:
                SLOW.add(n)
        return fn
    return deco


def load() -> dict[str, Callable[[Call], Verdict]]:
    import importlib
    for m in MODULES:
        try:
            importlib.import_module(f"isobox.daemon.syscalls.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"isobox.daemon.syscalls.{m}":
                raise
    return HANDLERS
