"""The runtime side (P) of the namespace sequence in locked-mounts.md, in its order:

1. clone() the container init H1 with a new user namespace owning new pid/net/ipc/uts
   namespaces (H1 is pid 1); or, to share another isobox container's user namespace, fork a
   helper H that joins it and clones H1 from there.
2. write H1's ID maps, put H1 in the container's cgroup, let it unshare its cgroup namespace
   (so the namespace's root is the container's cgroup).
3. join H1's pid namespace and fork the host-root builder C (pid 2), which builds and locks
   the tree (builder.py) and reports.
4. hand C's new, locked mount namespace to H1, which enters it and reports ready.
P itself never changes its mount namespace.

Every process born into a container's namespaces (H1, C) or about to join them (the helper H)
is sealed (linux/sealed.py) before it can be seen there: P is not dumpable while it clones or
forks them, so they are born untraceable, and each closes every fd but its own right away.
"""
from __future__ import annotations

import os
import _signal  # keep: also loads it for the container init, which imports it past pivot_root
from isobox.plain import field, record  # not dataclasses: see isobox.plain

from isobox.errors import IsoboxError
from isobox.init import builder, channel, container, nsjoin
from isobox.linux import sealed
from isobox.linux import syscalls as k
from isobox.spec.plan import Plan

_NS_ORDER = (("user", k.CLONE_NEWUSER), ("ipc", k.CLONE_NEWIPC), ("uts", k.CLONE_NEWUTS), ("net", k.CLONE_NEWNET),
             ("pid", k.CLONE_NEWPID), ("cgroup", k.CLONE_NEWCGROUP))
_SPEC_TO_PROC = {"pid": "pid", "network": "net", "ipc": "ipc", "uts": "uts", "cgroup": "cgroup", "user": "user"}


@record
class Launched:
    pid: int
    rootfs_method: str
    log: list[str] = field(default_factory=list)


def _open_ns(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _join_paths(plan: Plan) -> list[tuple[str, int]]:
    """(path, flag) for each namespace to join, in nsjoin's order around the user namespace."""
    flags = dict((n, f) for n, f in _NS_ORDER)
    joins = [(path, flags[_SPEC_TO_PROC[t]]) for t, path in plan.join_namespaces.items()]
    if not plan.join_user:
        return joins
    fds = {path: _open_ns(path) for path in [plan.join_user, *(p for p, _ in joins)]}
    try:
        ordered = nsjoin.user_order([(fds[p], f) for p, f in joins], fds[plan.join_user])
    finally:
        for fd in fds.values():
            os.close(fd)
    path_of = {fd: p for p, fd in fds.items()}
    return [(path_of[fd], f) for fd, f in ordered]


def _clone_flags(plan: Plan) -> int:
    return plan.new_namespaces & ~(k.CLONE_NEWCGROUP | k.CLONE_NEWNS)


def untraceable() -> int:
    """Makes the caller not dumpable, so that what it clones or forks into a container's
    namespaces is not dumpable from birth (the flag is inherited); returns the old value for
    traceable_again(). The caller is host root: nothing changes for it but ptrace and core dumps."""
    old = k.prctl(k.PR_GET_DUMPABLE)
    k.prctl(k.PR_SET_DUMPABLE, 0)
    return old


def traceable_again(old: int) -> None:
    if old == 1:
        k.prctl(k.PR_SET_DUMPABLE, 1)


def init_fds(sock_h, fifo_fd: int, console_sock, preserve_fds: int) -> list[int]:
    """What the container init keeps of its parent's fds: stdio, the preserved ones, its
    socket to the runtime, the start FIFO and the console socket."""
    return [*range(3 + preserve_fds), sock_h.fileno(), fifo_fd,
            *([console_sock.fileno()] if console_sock is not None else [])]


def _init_child(keep: list[int], plan: Plan, sock_h, fifo_fd: int, new_cgroupns: bool, console_sock,
                preserve_fds: int, drop=()) -> None:
    """H1 right after its clone: sealed, then the container's init. Never returns."""
    try:
        sealed.seal(keep, die_with_parent=False)     # it outlives P (the caller's subreaper reaps it)
        for sock in drop:
            sock.detach()                            # closed by the seal: forget the numbers
        container.run(plan, sock_h, fifo_fd, new_cgroupns, console_sock, preserve_fds)
    finally:
        os._exit(1)


def _spawn_init(plan: Plan, sock_h, fifo_fd: int, sock_p, console_sock, preserve_fds: int) -> int:
    clone_flags = _clone_flags(plan)
    new_cgroupns = bool(plan.new_namespaces & k.CLONE_NEWCGROUP)
    keep = init_fds(sock_h, fifo_fd, console_sock, preserve_fds)
    joins = [(_open_ns(path), flag) for path, flag in _join_paths(plan)]
    if not plan.join_user:
        # namespaces of the host's user namespace (a CNI netns, say) are joined by P itself,
        # which still holds the host capabilities setns needs
        for fd, flag in joins:
            k.setns(fd, flag)
            os.close(fd)
        old = untraceable()
        try:
            pid = k.clone(clone_flags)
            if pid == 0:
                _init_child(keep, plan, sock_h, fifo_fd, new_cgroupns, console_sock, preserve_fds, (sock_p,))
        finally:
            traceable_again(old)
        return pid
    # Sharing another container's user namespace: a helper joins it (and the others),
    # then clones H1, and reports H1's host pid.
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            # before any setns: H is host root with P's fds until then (H1 inherits the flag)
            sealed.seal([*keep, w, *(fd for fd, _ in joins)])
            for fd, flag in joins:
                k.setns(fd, flag)
                os.close(fd)
            pid = k.clone(clone_flags)
            if pid == 0:
                _init_child(keep, plan, sock_h, fifo_fd, new_cgroupns, console_sock, preserve_fds, (sock_p,))
            os.write(w, str(pid).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, ("err:" + channel.error_line(e)).encode())
        finally:
            os._exit(0)
    os.close(w)
    for fd, _ in joins:
        os.close(fd)
    data = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(helper, 0)
    if not data or data.startswith("err:"):
        raise IsoboxError(data[4:] or "could not join the namespaces of the shared container")
    return int(data)


def _write_maps(pid: int, plan: Plan) -> None:
    for kind, base in (("uid", plan.uid_base), ("gid", plan.gid_base)):
        with open(f"/proc/{pid}/{kind}_map", "w") as f:
            f.write(f"0 {base} {plan.id_size}\n")


def launch(plan: Plan, fifo_fd: int, cgroup, cleanup: list, console_sock=None, preserve_fds: int = 0) -> Launched:
    """Create the container up to the start barrier; returns H1's host pid.

    `cleanup` receives callables that undo what exists so far (the caller runs them on failure).
    The builder starts as soon as the ID maps exist and works while P moves H1 into the
    cgroups (v1 cgroup.procs writes cost about 1 ms per hierarchy); it waits for H1's cgroup
    namespace only when it reaches the cgroup mounts.
    """
    from isobox.init import handover
    if handover.REMOTE is not None:
        # served by isoboxd's worker: the engine's client clones H1 (init/handover.py)
        pid, sock_p = handover.REMOTE.spawn(_clone_flags(plan), _join_paths(plan))
        cleanup.append(lambda: _kill_and_reap(pid))
        handover.Remote.hand_over(sock_p, plan, fifo_fd, console_sock,
                                  bool(plan.new_namespaces & k.CLONE_NEWCGROUP), preserve_fds)
    else:
        sock_p, sock_h = channel.pair()
        pid = _spawn_init(plan, sock_h, fifo_fd, sock_p, console_sock, preserve_fds)
        sock_h.close()
        cleanup.append(lambda: _kill_and_reap(pid))
    if not plan.join_user:
        _write_maps(pid, plan)

    ns_fds = {name: _open_ns(f"/proc/{pid}/ns/{name}") for name, _ in _NS_ORDER if name != "cgroup"}
    if plan.emulation_prefetch is not None:
        plan.emulation_prefetch.result()      # the builder inherits the clones: wait for them
    own_pidns = _open_ns("/proc/self/ns/pid_for_children")
    old = untraceable()                   # C is born in the container's pid namespace
    try:
        k.setns(ns_fds["pid"], k.CLONE_NEWPID)
        c, report_r, hold_w, cgroupns_w = _fork_builder(plan, ns_fds, pid, cgroup)
    finally:
        k.setns(own_pidns, k.CLONE_NEWPID)
        traceable_again(old)
        os.close(own_pidns)
        for fd in ns_fds.values():
            os.close(fd)
    cleanup.append(lambda: _kill_and_reap(c))

    cgroup.add(pid)
    if plan.process.oom_score_adj is not None:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(plan.process.oom_score_adj))
    channel.send(sock_p, "go")
    channel.recv(sock_p, "container init")
    try:
        os.write(cgroupns_w, b"1")
    except BrokenPipeError:
        pass                    # the builder already failed; its report says why
    os.close(cgroupns_w)
    log: list[str] = []
    method, m2 = _finish_builder(c, report_r, hold_w, log)
    try:
        channel.send(sock_p, "mntns", [m2])
    finally:
        os.close(m2)
    channel.recv(sock_p, "container init")
    sock_p.close()
    return Launched(pid, method, log)


def _fork_builder(plan: Plan, ns_fds: dict[str, int], init_pid: int, cgroup) -> tuple[int, int, int, int]:
    inside = (cgroup.inside_mounts(), cgroup.inside_symlinks())
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    cg_r, cg_w = os.pipe()
    prefetched = list(plan.emulation_prefetch.fds.values()) if plan.emulation_prefetch is not None else []
    c = os.fork()
    if c == 0:
        try:
            # pid 2 of the container, host root: only the fds it builds with (stdio for errors)
            sealed.seal([0, 1, 2, report_w, hold_r, cg_r, *ns_fds.values(), *prefetched])

            def cgroupns() -> int:
                if not os.read(cg_r, 1):
                    raise IsoboxError("the runtime stopped before the cgroup namespace was ready")
                return _open_ns(f"/proc/{init_pid}/ns/cgroup")

            log: list[str] = []
            method = builder.build(plan, ns_fds, cgroupns, inside, log)
            _write_msg(report_w, "ok:" + method + "\n" + "\n".join(log))
            os.read(hold_r, 1)            # keep the namespace alive until P has opened it
        except BaseException as e:  # noqa: BLE001
            _write_msg(report_w, "err:" + channel.error_line(e))
        finally:
            os._exit(0)
    for fd in (report_w, hold_r, cg_r):
        os.close(fd)
    return c, report_r, hold_w, cg_w


def _finish_builder(c: int, report_r: int, hold_w: int, log: list[str]) -> tuple[str, int]:
    try:
        data = _read_msg(report_r).decode(errors="replace")
        if not data.startswith("ok:"):
            raise IsoboxError(data[4:] if data.startswith("err:") else "the rootfs builder died")
        method, *notes = data[3:].split("\n")
        log.extend(n for n in notes if n)
        m2 = _open_ns(f"/proc/{c}/ns/mnt")
        return method, m2
    finally:
        os.close(hold_w)
        os.close(report_r)
        try:
            os.waitpid(c, 0)
        except ChildProcessError:
            pass


def _write_msg(fd: int, msg: str) -> None:
    data = msg.encode()
    os.write(fd, len(data).to_bytes(8, "little") + data)


def _read_msg(fd: int) -> bytes:
    """A length-prefixed report: the builder keeps its end open after writing it."""
    buf = b""
    while len(buf) < 8 or len(buf) < 8 + int.from_bytes(buf[:8], "little"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return buf[8:]


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass                    # cloned by the warm client: its own child, reaped there
