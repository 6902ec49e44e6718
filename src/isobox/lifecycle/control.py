"""start, kill and delete of an existing container."""
from __future__ import annotations

import errno
import os
import _signal as signal  # not signal.py: it imports enum (~8 ms per runtime call)
import time

from isobox.errors import IsoboxError
from isobox.spec.config import key
from isobox.lifecycle.state import ContainerState, StateStore, alive, cgroup_of, status
from isobox.linux import syscalls as k


def _spec_hooks(store: StateStore, cid: str) -> dict:
    """The hooks of the config.json that create saved (no import unless there are some)."""
    try:
        spec = store.load_config(cid)
    except (OSError, ValueError):
        return {}
    if not isinstance(spec, dict) or not spec.get("hooks"):
        return {}
    from isobox.lifecycle import hooks
    return hooks.from_config(spec)


def start(store: StateStore, cid: str, log=None) -> ContainerState:
    st = store.load(cid)
    s = status(store, st)
    if s == "stopped":
        raise IsoboxError("cannot start a container that has stopped")
    if s != "created":
        raise IsoboxError("cannot start an already running container")
    fifo = store.fifo(cid)
    spec_hooks = _spec_hooks(store, cid)
    if spec_hooks.get("startContainer") or spec_hooks.get("poststart"):
        from isobox.lifecycle import hooks
        st = _start_with_hooks(store, st, fifo, spec_hooks, hooks)
        # poststart: after the process started; a failure is only a warning
        hooks.run_warn("poststart", spec_hooks, hooks.state(cid, "running", st.pid, st.bundle, st.annotations), log)
        return st
    _release(fifo)
    return st


def _release(fifo: str) -> None:
    """Let the init past its start barrier (no reader left on the FIFO: the init is gone)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT):
            raise IsoboxError("container not running") from None
        raise
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
    os.unlink(fifo)


def _start_with_hooks(store: StateStore, st: ContainerState, fifo: str, spec_hooks: dict, hooks) -> ContainerState:
    """start when the init runs startContainer hooks: release it, then wait until it exec'd the
    process or exited; a hook failure it wrote back to the FIFO becomes start's error."""
    watch = None
    try:
        if spec_hooks.get("startContainer"):
            try:
                watch = hooks.StartWatch(st.pid, fifo, spec_hooks)
            except (ProcessLookupError, FileNotFoundError):
                raise IsoboxError("container not running") from None
        _release(fifo)
        if watch is not None:
            watch.wait()
    finally:
        if watch is not None:
            watch.close()
    return st


_SIGNAMES = {name[3:]: getattr(signal, name) for name in dir(signal)
             if name.startswith("SIG") and not name.startswith("SIG_") and isinstance(getattr(signal, name), int)}


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        n = int(t)
        if 0 < n < signal.NSIG:
            return n
    else:
        name = t[3:] if t.startswith("SIG") else t
        if name in _SIGNAMES:
            return _SIGNAMES[name]
        if name.startswith("RTMIN") or name.startswith("RTMAX"):
            base = signal.SIGRTMIN if name.startswith("RTMIN") else signal.SIGRTMAX
            off = name[5:]
            if not off:
                return base
            if off[0] in "+-" and off[1:].isdigit():
                n = base + int(off)
                if signal.SIGRTMIN <= n <= signal.SIGRTMAX:
                    return n
    raise IsoboxError(f"unknown signal {text!r} (use a name like TERM or KILL, or a number)")


def _signal_init(st: ContainerState, sig: int) -> None:
    # a pidfd pins the process we checked, so a recycled pid is never signalled
    try:
        pidfd = k.pidfd_open(st.pid)
    except ProcessLookupError:
        raise IsoboxError("container not running") from None
    try:
        if not alive(st):
            raise IsoboxError("container not running")
        k.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        raise IsoboxError("container not running") from None
    finally:
        os.close(pidfd)


def kill(store: StateStore, cid: str, sig: int, all_processes: bool = False) -> None:
    st = store.load(cid)
    if not all_processes:
        if status(store, st) == "stopped":
            raise IsoboxError("container not running")
        _signal_init(st, sig)
        return
    # --all: every process in the container's cgroup, even once the init is gone (the shim
    # sends it after kill, for what a shared pid namespace may leave behind), as runc does
    _signal_cgroup(cgroup_of(st), sig)


def _signal_cgroup(cg, sig: int) -> None:
    """Signals what is in the cgroup. For SIGKILL the cgroup is frozen meanwhile, so a
    process forking in between cannot leave a child unsignalled; the thaw lets them die."""
    pids = cg.pids()
    if not pids:
        return
    frozen = False
    if sig == signal.SIGKILL:
        from isobox.cgroups.layout import CgroupError
        try:
            cg.freeze()
            frozen = True
            pids = cg.pids()
        except CgroupError:
            pass                                   # no freezer: signal what is there
    try:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    finally:
        if frozen:
            cg.thaw()


def delete(store: StateStore, cid: str, force: bool = False, log=None) -> None:
    if force and not store.exists(cid):
        # as runc: forcing away a container that is not there succeeds (the shim sends
        # `delete --force` after `delete`), taking a state dir a killed create left behind
        try:
            store.remove(cid)
        except OSError:
            pass
        return
    st = store.load(cid)
    s = status(store, st)
    if s not in ("stopped", "created") and not force:
        raise IsoboxError(f"cannot delete container {cid} that is not stopped: {s}")
    spec_hooks = _spec_hooks(store, cid)     # read before _delete removes the saved config
    _delete(store, cid, st)
    if spec_hooks.get("poststop"):
        # poststop: after the container is gone; a failure is only a warning
        from isobox.lifecycle import hooks
        hooks.run_warn("poststop", spec_hooks, hooks.state(cid, "stopped", st.pid, st.bundle, st.annotations), log)


def _delete(store: StateStore, cid: str, st: ContainerState) -> None:
    from isobox.ids.allocator import Allocator, Holder
    if alive(st):
        try:
            _signal_init(st, signal.SIGKILL)
        except IsoboxError:
            pass
    cg = cgroup_of(st)
    cg.destroy()
    _wait_gone(st)
    Allocator().release(Holder(store.root, key(cid)))
    from isobox.daemon import client
    client.unregister(client.daemon_key(store.root, cid))
    store.remove(cid)


def _wait_gone(st: ContainerState, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(st) and time.monotonic() < deadline:
        time.sleep(0.005)
