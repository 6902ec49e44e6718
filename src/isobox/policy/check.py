"""Checking a bind source at mount time, on the very object that gets mounted.

The caller opens the source once (O_PATH, following symlinks as mount(2) would), this
module checks that descriptor, and the caller clones the mount from the same descriptor
(open_tree(fd, "", AT_EMPTY_PATH)): a symlink or directory swapped after the check cannot
change what is mounted. Besides the canonical path (readlink of /proc/self/fd/N), the
source and its ancestors are compared by (st_dev, st_ino) against the denied paths, so a
bind-mounted or hard-linked alias of /var/run/docker.sock or /etc is caught as well.
"""
from __future__ import annotations

import os
import stat

from isobox.policy.model import ENGINE_INIT_BINARIES, Policy, _norm

_MAX_DEPTH = 256


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _inodes(policy: Policy) -> tuple[dict, dict]:
    """(denied (dev, ino) -> rule, (dev, ino) of every ancestor of a denied path -> rule)."""
    denied: dict = {}
    ancestors: dict = {}
    for rule, d in policy.denied():
        try:
            denied.setdefault(_ident(os.stat(d)), f"{rule}: {d}")
            real = os.path.realpath(d)
        except OSError:
            continue
        parent = os.path.dirname(real)
        while True:
            try:
                ancestors.setdefault(_ident(os.stat(parent)), f"{rule}: {d}; {parent} contains it")
            except OSError:
                pass
            if parent == "/":
                break
            parent = os.path.dirname(parent)
    return denied, ancestors


def _parents(fd: int, st: os.stat_result, canonical: str):
    """(dev, ino) of each directory above the object fd refers to, up to "/"."""
    if stat.S_ISDIR(st.st_mode):
        cur = os.dup(fd)
    else:
        parent = os.path.dirname(canonical) or "/"
        cur = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            again = os.stat(os.path.basename(canonical), dir_fd=cur, follow_symlinks=False)
        except OSError:
            again = None
        if again is None or _ident(again) != _ident(st):
            os.close(cur)
            raise _Changed()
        yield _ident(os.fstat(cur))
    try:
        for _ in range(_MAX_DEPTH):
            nxt = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
            if _ident(os.fstat(nxt)) == _ident(os.fstat(cur)):
                os.close(nxt)
                return
            os.close(cur)
            cur = nxt
            yield _ident(os.fstat(cur))
    finally:
        os.close(cur)


class _Changed(Exception):
    pass


def canonical_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _gate_socket(policy: Policy, source: str, fd: int, st: os.stat_result, canonical: str) -> bool:
    """True: the socket is served by a live isobox gate, which enforces the policy on every call
    made through it, so even a denied path (the public /var/run/docker.sock) may be bound.
    Raises for the engine socket behind such a gate, wherever it lives. (Imported here only:
    a create without socket binds pays nothing.)"""
    from isobox.policy import gatesock
    found = gatesock.classify(fd, st)
    if found is None:
        return False
    kind, state = found
    if kind == "engine":
        raise policy.refusal(source, f"the engine socket behind the isobox gate on {state.listen}", canonical)
    return True


def bind_source(policy: Policy, source: str, fd: int, readonly: bool = False) -> None:
    """Raise IsoboxError naming the rule if the object fd refers to may not be bind-mounted.
    readonly: the bind is made read-only (and locked so): an engine's init binary may pass."""
    st = os.fstat(fd)
    canonical = canonical_path(fd)
    if canonical.endswith(" (deleted)") or not canonical.startswith("/"):
        raise policy.refusal(source, "the source is not reachable from the host's root", canonical)
    canonical = _norm(canonical)
    if readonly and stat.S_ISREG(st.st_mode) and canonical in ENGINE_INIT_BINARIES:
        return
    if stat.S_ISSOCK(st.st_mode) and _gate_socket(policy, source, fd, st, canonical):
        return
    rule = policy.path_rule(canonical)
    if rule:
        raise policy.refusal(source, rule, canonical)
    denied, ancestors = _inodes(policy)
    me = _ident(st)
    if me in denied:
        raise policy.refusal(source, denied[me] + " (same file)", canonical)
    if stat.S_ISDIR(st.st_mode) and me in ancestors:
        raise policy.refusal(source, ancestors[me] + " (same directory)", canonical)
    if policy.allowed_below(canonical):
        return
    try:
        for ident in _parents(fd, st, canonical):
            if ident in denied and not denied[ident].endswith(": /"):
                raise policy.refusal(source, denied[ident] + " (below an alias of it)", canonical)
    except _Changed:
        raise policy.refusal(source, "the source changed while it was checked", canonical) from None
