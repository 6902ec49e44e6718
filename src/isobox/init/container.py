"""The container's init (H1): pid 1 of the container, child of the runtime's clone().

It waits for the runtime at each step, enters the locked mount namespace, and becomes the
container's process in all but execve before it blocks on the start FIFO, as runc's init
does: credentials, capabilities, no_new_privs and the seccomp filter are set, every fd but
stdio, the preserved ones and the FIFO is closed. `start` releases it; then only the
startContainer hooks (with those credentials) and execve are left.

So nothing waits at the barrier with host credentials: a created init is the container's
user (finding 10: a pod's running sibling holds CAP_SYS_PTRACE over container root), and it
is not dumpable from its clone to its execve (born so: launch.py, handover.py), so nothing in
the container can trace it or open the interpreter through /proc/1/exe (its memory map still
belongs to the host's user namespace)."""
from __future__ import annotations

import os
import resource

from isobox.errors import IsoboxError
from isobox.init import channel, console
from isobox.linux import sealed
from isobox.linux import syscalls as k
from isobox.spec.plan import Plan, Process


def run(plan: Plan, sock, fifo_fd: int, new_cgroupns: bool, console_sock=None, preserve_fds: int = 0) -> None:
    """Never returns: execs the container process or _exits. The caller sealed it."""
    code = 1
    try:
        k.prctl(k.PR_SET_DUMPABLE, 0)
        from isobox.seccomp import installer   # connects the listener socket while host paths resolve
        sec = installer(plan.seccomp)          # None without a profile or the trap
        hook_state = None
        if plan.hooks.get("startContainer"):
            # imported and prepared while the host's files and /proc are still in view
            from isobox.ids.procinfo import host_pid
            from isobox.lifecycle import hooks
            hook_state = hooks.state(plan.id, "created", host_pid(), plan.bundle, plan.annotations)
        channel.recv(sock, "runtime")                    # maps written, cgroup joined
        if new_cgroupns:
            k.unshare(k.CLONE_NEWCGROUP)                  # root = the container's cgroup
        channel.send(sock, "ok")
        _, fds = channel.recv(sock, "runtime")           # the locked mount namespace
        k.setns(fds[0], k.CLONE_NEWNS)
        os.close(fds[0])
        exe = prepare(plan.process)
        if console_sock is not None:
            console.setup(console_sock)       # pty from the container's devpts, sent to the engine
        reset_signals()
        close_host_fds(preserve_fds, keep={fifo_fd, sock.fileno(), *listener_fds(sec)})
        become(plan.process, sec)             # a failure here is create's, as with runc
        # past the filter: write, read, close and execve are all the profile must allow
        os.write(sock.fileno(), b"ready")
        sock.close()
        if not os.read(fifo_fd, 1):
            os._exit(1)
        if hook_state is not None:
            # startContainer: in the container, with the process's credentials (runc's order);
            # a failure goes back to `start` through the FIFO and the process never runs
            hooks.run_start_container(plan.hooks, hook_state, fifo_fd)
        os.close(fifo_fd)
        os.execve(exe, plan.process.args, env_dict(plan.process.env))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the runtime as one line
        try:
            channel.send(sock, "err:" + channel.error_line(e))
        except OSError:
            os.write(2, f"isobox: {channel.error_line(e)}\n".encode())
        code = 127 if isinstance(e, FileNotFoundError) else 1
    finally:
        os._exit(code)


def listener_fds(inst) -> list[int]:
    """What the seccomp installer holds until become() has sent the listener (its connection,
    or the trap socket's directory): seccomp.Installer.keep_fds."""
    return inst.keep_fds() if inst is not None else []


def close_host_fds(preserve: int, keep: set[int]) -> None:
    """Whatever the runtime inherited from its caller must not reach the container: every fd
    but stdio, the preserved ones (made inheritable) and keep is closed now."""
    last = 2 + preserve
    for fd in range(3, last + 1):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass                # not open: the runtime's check of --preserve-fds reports it
    sealed.close_all_but([*range(last + 1), *keep])


def env_dict(env: list[str]) -> dict[str, str]:
    out = {}
    for item in env:
        key, _, val = item.partition("=")
        out[key] = val
    return out


def prepare(proc: Process) -> str:
    """Checks made at create, so a bad spec fails there: cwd, executable, rlimits."""
    try:
        os.chdir(proc.cwd)
    except OSError as e:
        raise IsoboxError(f"cannot chdir to cwd {proc.cwd!r} set in config.json: {e.strerror}") from None
    for r in proc.rlimits:
        try:
            resource.setrlimit(r.resource, (r.soft, r.hard))
        except (OSError, ValueError) as e:
            raise IsoboxError(f"cannot set rlimit {r.resource}: {e}") from None
    return find_executable(proc.args[0], env_dict(proc.env).get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                                                    "/usr/bin:/sbin:/bin"))


def find_executable(name: str, path: str) -> str:
    if "/" in name:
        if os.access(name, os.X_OK):
            return name
        raise IsoboxError(f'exec: "{name}": no such file or directory or not executable')
    for d in path.split(":"):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise IsoboxError(f'exec: "{name}": executable file not found in $PATH')


def reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ and handles SIGINT; ignored dispositions survive
    execve, so the container's process would inherit them. Give it the kernel defaults."""
    import _signal     # not signal.py: it imports enum (~3 ms of every create); launch.py preloads it
    for sig in range(1, _signal.NSIG):
        if sig in (_signal.SIGKILL, _signal.SIGSTOP):
            continue
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


def become(proc: Process, seccomp=None) -> None:
    """Credentials, then capabilities, as runc does: bounding set first (dropping needs
    CAP_SETPCAP), keep the permitted set across setuid, then set the spec's sets."""
    if seccomp is not None and hasattr(seccomp, "early"):
        seccomp.early(proc)   # loads now only if the process could not later (no NNP, no CAP_SYS_ADMIN)
    top = _last_cap()
    for cap in range(top + 1):
        if not proc.caps_bounding >> cap & 1:
            k.prctl(k.PR_CAPBSET_DROP, cap)
    k.prctl(k.PR_SET_KEEPCAPS, 1)
    os.setgroups(proc.additional_gids)
    os.setresgid(proc.gid, proc.gid, proc.gid)
    os.setresuid(proc.uid, proc.uid, proc.uid)
    k.prctl(k.PR_SET_KEEPCAPS, 0)
    k.capset(proc.caps_effective, proc.caps_permitted, proc.caps_inheritable)
    k.prctl(k.PR_CAP_AMBIENT, k.PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(top + 1):
        if proc.caps_ambient >> cap & 1:
            k.prctl(k.PR_CAP_AMBIENT, k.PR_CAP_AMBIENT_RAISE, cap)
    # the credential change set "dumpable" to fs.suid_dumpable, which may be 1: not dumpable
    # until execve, whatever the host's setting
    k.prctl(k.PR_SET_DUMPABLE, 0)
    if proc.umask is not None:
        os.umask(proc.umask)
    if proc.no_new_privileges:
        k.prctl(k.PR_SET_NO_NEW_PRIVS, 1)
    if seccomp is not None:
        seccomp()      # installs the filter: last, just before execve


def _last_cap() -> int:
    from isobox.linux.capabilities import last_cap
    return last_cap()
