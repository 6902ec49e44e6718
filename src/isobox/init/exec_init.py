"""The process side of `exec`: a helper (X) joins the container's namespaces, user namespace
first, then forks the process (Y), which is born in the container's pid namespace.

X starts in the host's namespaces so the runtime can move it into the container's cgroups
before anything of it enters the container; Y inherits them. X is sealed (linux/sealed.py)
the moment it exists, before any setns: not dumpable, only the fds below. Y, born from it
into the container's pid namespace, inherits both and stays so until execve (CVE-2016-9962:
a dumpable Y, host uid 0 in the container's user namespace, was traced by container root).
Its memory map belongs to the host's user namespace, so nothing in the container can trace
it, read its memory or open its /proc/Y/{exe,fd,root} whatever capabilities it holds there."""
from __future__ import annotations

import os

from isobox.init import channel, console, container, nsjoin
from isobox.linux import sealed
from isobox.linux import syscalls as k
from isobox.spec.plan import Process

# user first (after any namespace it does not own, see nsjoin): joining it grants the
# capabilities the other setns calls need there
ORDER = (("user", k.CLONE_NEWUSER), ("ipc", k.CLONE_NEWIPC), ("uts", k.CLONE_NEWUTS), ("net", k.CLONE_NEWNET),
         ("cgroup", k.CLONE_NEWCGROUP), ("pid", k.CLONE_NEWPID), ("mnt", k.CLONE_NEWNS))


def open_namespaces(pid: int) -> dict[str, int]:
    return {name: os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name, _ in ORDER}


def helper_fds(ns: dict[str, int], go_r: int, report_w: int, console_sock, preserve: int) -> list[int]:
    """What X keeps: stdio, the preserved fds, the namespaces, its two pipes, the console socket."""
    return [*range(3 + preserve), *ns.values(), go_r, report_w,
            *([console_sock.fileno()] if console_sock is not None else [])]


def helper(ns: dict[str, int], go_r: int, report_w: int, proc: Process, console_sock, preserve: int,
           seccomp) -> None:
    """X, right after its fork: never returns."""
    try:
        sealed.seal(helper_fds(ns, go_r, report_w, console_sock, preserve))
        if not os.read(go_r, 1):
            os._exit(1)
        os.close(go_r)
        inst = None
        if seccomp is not None:
            from isobox.seccomp import installer
            inst = installer(seccomp)          # connects any listener socket while host paths resolve
        others = [(ns[name], flag) for name, flag in ORDER if name != "user"]
        for fd, flag in nsjoin.user_order(others, ns["user"]):
            k.setns(fd, flag)
            os.close(fd)
        y = os.fork()
        if y == 0:
            _process(proc, report_w, console_sock, preserve, inst)
        os.write(report_w, f"pid:{y}\n".encode())
    except BaseException as e:  # noqa: BLE001 - one line to the runtime, never a traceback
        os.write(report_w, ("err:" + channel.error_line(e) + "\n").encode())
    finally:
        os._exit(0)


def _process(proc: Process, report_w: int, console_sock, preserve: int, seccomp) -> None:
    """Y: becomes the exec'd process or reports why not."""
    try:
        k.prctl(k.PR_SET_DUMPABLE, 0)
        exe = container.prepare(proc)
        if console_sock is not None:
            console.setup(console_sock)
        container.reset_signals()
        container.close_host_fds(preserve, keep={report_w, *container.listener_fds(seccomp)})
        container.become(proc, seccomp)
        os.execve(exe, proc.args, container.env_dict(proc.env))
    except BaseException as e:  # noqa: BLE001
        os.write(report_w, ("err:" + channel.error_line(e) + "\n").encode())
    finally:
        os._exit(127)
