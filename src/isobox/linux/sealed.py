"""The first thing every process isobox forks to act in a container's namespaces does.

A child of host root that is about to join a container's namespaces is, for a while, host
uid 0 with the host's root directory and its parent's fds. runc was broken that way
(CVE-2016-9962: `runc exec` joined the pid namespace while dumpable, and container root
traced it to its host fds). So, before anything else and before any setns:

- PR_SET_DUMPABLE 0: its memory map belongs to the host's user namespace, so no process of
  a container (whatever capabilities it holds in its own user namespace) may ptrace it,
  read its memory, or open its /proc/PID/{fd,root,cwd,environ,mem}. The flag survives
  setns and credential changes and is reset only by execve;
- every fd but the ones it needs is closed (close_range), so nothing it inherited from a
  threaded daemon or an engine (listeners, /dev/fuse, databases, pipes) is in it at all;
- PR_SET_PDEATHSIG SIGKILL where asked, so it never outlives the process that drives it.

The caller is a forked child of a possibly threaded process: only syscalls here.
"""
from __future__ import annotations

import gc
import _signal  # not signal.py (enum), nor collections.abc: ~5 ms of every warm create's client
from _collections_abc import Iterable  # what collections.abc re-exports, loaded with os

from isobox.linux import syscalls as k

_MAX_FD = 0xFFFFFFFF


def close_all_but(keep: Iterable[int]) -> None:
    """Closes every fd not in keep (negative numbers are ignored)."""
    low = 0
    for fd in sorted({fd for fd in keep if fd >= 0}):
        if fd > low:
            k.close_range(low, fd - 1)
        low = fd + 1
    k.close_range(low, _MAX_FD)


def seal(keep: Iterable[int], die_with_parent: bool = True) -> None:
    """Untraceable, with only the fds in keep, killed if its parent dies (see the module doc)."""
    k.prctl(k.PR_SET_DUMPABLE, 0)
    if die_with_parent:
        k.prctl(k.PR_SET_PDEATHSIG, _signal.SIGKILL)
    # objects copied from the parent (sockets, files) still name the fds closed here: no cyclic
    # collection may finalise one and close whatever reused its number since
    gc.disable()
    close_all_but(keep)


def is_sealed() -> bool:
    """For tests and asserts: this process is not dumpable."""
    return k.prctl(k.PR_GET_DUMPABLE) == 0


