"""exec: run another process in a running container.

The runtime (P) forks a helper that joins the container (exec_init.py) after P has moved it
into every cgroup of the container; the process it forks is left to the caller's subreaper
when detached, or waited for (P is a subreaper) in the foreground."""
from __future__ import annotations

import os
import signal

from isobox.errors import IsoboxError
from isobox.lifecycle import foreground
from isobox.lifecycle.state import ContainerState, StateStore, cgroup_of, status
from isobox.linux import syscalls as k
from isobox.spec.plan import Process


def exec_process(store: StateStore, st: ContainerState, proc: Process, *, detach: bool, pid_file: str | None,
                 console_socket: str | None, preserve_fds: int, ignore_paused: bool = False,
                 seccomp=None) -> int:
    from isobox.init import exec_init
    s = status(store, st)
    if s == "stopped":
        raise IsoboxError("cannot exec in a stopped container")
    if s == "paused" and not ignore_paused:
        raise IsoboxError("cannot exec in a paused container (use --ignore-paused)")
    from isobox.init import console
    console.check_request(proc.terminal, console_socket, can_relay=not detach)
    console_sock = relay_sock = None
    if console_socket:
        console_sock = console.connect(console_socket)
    elif proc.terminal:
        from isobox.lifecycle import relay
        relay_sock, console_sock = relay.socket_pair()
    ns = exec_init.open_namespaces(st.pid)
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    if not detach:
        k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
        foreground.hold_signals()
    from isobox.init import handover
    if detach and handover.REMOTE is not None:
        # served by isoboxd's worker: the engine's client forks X, so that the process ends up
        # with the engine's subreaper (init/handover.py)
        try:
            x = handover.REMOTE.spawn_exec(ns, go_r, report_w, proc, console_sock, preserve_fds, seccomp)
        except BaseException:
            for fd in (go_r, go_w, report_r, report_w, *ns.values()):
                os.close(fd)
            raise
    else:
        x = os.fork()
        if x == 0:
            # helper() seals X first: go_w, report_r and the rest of P's fds go there
            exec_init.helper(ns, go_r, report_w, proc, console_sock, preserve_fds, seccomp)
    for fd in (go_r, report_w, *ns.values()):
        os.close(fd)
    if console_sock is not None:
        console_sock.close()
    try:
        cgroup_of(st).add(x)
    except BaseException:
        os.kill(x, signal.SIGKILL)
        os.waitpid(x, 0)
        raise
    os.write(go_w, b"1")
    os.close(go_w)
    pid = _report(report_r, x)
    if pid_file:
        from isobox.lifecycle.create import write_pid_file
        write_pid_file(pid_file, pid)
    if detach:
        return 0
    master = None
    if relay_sock is not None:
        from isobox.lifecycle import relay
        master = relay.receive_master(relay_sock)
    return foreground.follow(pid, master)


def _report(fd: int, helper: int) -> int:
    """The helper writes "pid:N"; the process then writes nothing (its end closes at execve)
    or "err:..."."""
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    try:
        os.waitpid(helper, 0)
    except ChildProcessError:
        pass
    pid = 0
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("pid:"):
            pid = int(line[4:])
        elif line.startswith("err:"):
            raise IsoboxError(line[4:])
    if not pid:
        raise IsoboxError("the exec helper died before starting the process")
    return pid
