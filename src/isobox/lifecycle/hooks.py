"""OCI hooks: prestart, createRuntime, createContainer, startContainer, poststart, poststop.

Each hook is run with the container's state JSON on stdin, args[0] as its argv[0], exactly
the env it names, and, when it has a timeout, SIGKILLed (with its process group) once the
timeout passes, which counts as a failure. Hooks of one kind run in order; the first failure
stops the rest of that kind.

Where each kind runs (see lifecycle/create.py, lifecycle/control.py, init/container.py):
  prestart, createRuntime  create, after launch(): the init exists and waits at the start
                           barrier; run in the runtime's namespaces; status "creating".
  createContainer          create, right after those: the hook binary is opened (O_PATH) in the
                           runtime's namespaces, then a child joins the init's user, mount, pid,
                           net, ipc, uts and cgroup namespaces as container root and execs it
                           through /proc/self/fd; status "creating".
  startContainer           start: the container's init, in the container, after the start FIFO
                           released it, with the process's credentials (set before the FIFO, as
                           runc does) and before exec; the path resolves in the container;
                           status "created".
  poststart                start, after the init exec'd the process; status "running"; a failure
                           is a warning.
  poststop                 delete, after the container is gone; status "stopped"; a failure is a
                           warning.

Imported lazily: only containers that have hooks pay for it (and it imports little itself).
"""
from __future__ import annotations

from isobox import jsonfast as json  # json without its import cost (see jsonfast)
import os
import select       # imported here: the init runs startContainer hooks after it left the host's files
import signal

from isobox.errors import IsoboxError
from isobox.linux import sealed     # here, not in the child: startContainer's runs in the container

KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
OCI_VERSION = "1.2.0"
_OUTPUT_MAX = 300        # characters of a failing hook's output quoted in the error line


# -- the spec ------------------------------------------------------------------------------------

def validate(spec: dict) -> dict[str, list[dict]]:
    """The spec's hooks, normalised to {kind: [{path, args, env, timeout}]} (kinds without hooks
    left out); one IsoboxError line for the first thing that is wrong."""
    raw = spec.get("hooks")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise IsoboxError("hooks must be an object mapping hook kinds to lists of hooks")
    out: dict[str, list[dict]] = {}
    for kind, items in raw.items():
        if kind not in KINDS:
            raise IsoboxError(f"unknown hook kind {kind!r} in hooks (known: {', '.join(KINDS)})")
        if items is None:
            continue
        if not isinstance(items, list):
            raise IsoboxError(f"hooks.{kind} must be a list of hooks")
        hooks = []
        for i, h in enumerate(items):
            where = f"hooks.{kind}[{i}]"
            if not isinstance(h, dict):
                raise IsoboxError(f"{where} must be an object with a path")
            path = h.get("path")
            if not isinstance(path, str) or not os.path.isabs(path):
                raise IsoboxError(f"{where}: path must be an absolute path (got {path!r})")
            for field in ("args", "env"):
                val = h.get(field)
                if val is not None and (not isinstance(val, list) or not all(isinstance(s, str) for s in val)):
                    raise IsoboxError(f"{where}: {field} must be a list of strings")
            timeout = h.get("timeout")
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
                raise IsoboxError(f"{where}: timeout must be a positive integer number of seconds (got {timeout!r})")
            hooks.append({"path": path, "args": list(h.get("args") or []), "env": list(h.get("env") or []),
                          "timeout": timeout})
        if hooks:
            out[kind] = hooks
    return out


def from_config(spec: dict) -> dict[str, list[dict]]:
    """The hooks of a config.json that create already accepted (the state dir's copy)."""
    try:
        return validate(spec)
    except IsoboxError:
        return {}


def state(cid: str, status: str, pid: int, bundle: str, annotations: dict | None) -> bytes:
    return json.dumps({"ociVersion": OCI_VERSION, "id": cid, "status": status, "pid": pid, "bundle": bundle,
                       "annotations": annotations or {}}).encode()


def _name(kind: str, i: int, hook: dict) -> str:
    return f"{kind} hook #{i} ({hook['path']})"


# -- running one hook ------------------------------------------------------------------------------

def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _output(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 65536).decode(errors="replace")
    lines = [ln.strip() for ln in data.splitlines() if ln.strip()]
    text = " | ".join(lines)
    return text if len(text) <= _OUTPUT_MAX else "..." + text[-_OUTPUT_MAX:]


def _exec(hook: dict, path: str | int) -> None:
    argv = hook["args"] or [hook["path"]]
    env = dict(e.partition("=")[::2] for e in hook["env"])
    os.execve(path, argv, env)


def _exec_plain(hook: dict) -> None:
    _exec(hook, hook["path"])


def _child(stdin_fd: int, out_fd: int, body) -> None:
    """In the forked child: sealed (createContainer's joins the container's namespaces), stdio,
    own process group, default signals, then body() execs."""
    code = 127
    try:
        # not dumpable until the hook's execve, nothing the runtime or its caller had open
        sealed.seal([stdin_fd, out_fd], die_with_parent=False)
        os.dup2(stdin_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        sealed.close_all_but([0, 1, 2])
        os.setpgid(0, 0)
        for sig in range(1, signal.NSIG):
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        code = body() or 0
    except BaseException as e:  # noqa: BLE001
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        try:
            os.write(2, f"isobox: cannot run hook: {msg}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def _wait(pid: int, timeout: int | None) -> int | None:
    """The wait status, or None when the timeout passed (the hook's group is then killed)."""
    if timeout is not None:
        pidfd = os.pidfd_open(pid)
        try:
            p = select.poll()
            p.register(pidfd, select.POLLIN)
            if not p.poll(timeout * 1000):
                for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                    try:
                        kill()
                    except ProcessLookupError:
                        pass
                os.waitpid(pid, 0)
                return None
        finally:
            os.close(pidfd)
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue


def run_one(kind: str, i: int, hook: dict, state_json: bytes, body=None) -> None:
    """Run one hook; IsoboxError naming it on failure. body() execs in the child (default:
    execve of the path in the caller's namespaces)."""
    stdin_fd = _memfd("isobox-hook-state", state_json)
    out_fd = _memfd("isobox-hook-output")
    try:
        pid = os.fork()
        if pid == 0:
            _child(stdin_fd, out_fd, body or (lambda: _exec_plain(hook)))
        status = _wait(pid, hook.get("timeout"))
        if status is None:
            raise IsoboxError(f"error running {_name(kind, i, hook)}: timed out after {hook['timeout']}s "
                              "(killed)")
        if os.WIFSIGNALED(status):
            why = f"killed by signal {os.WTERMSIG(status)}"
        elif os.WEXITSTATUS(status):
            why = f"exit status {os.WEXITSTATUS(status)}"
        else:
            return
        out = _output(out_fd)
        raise IsoboxError(f"error running {_name(kind, i, hook)}: {why}" + (f": {out}" if out else ""))
    finally:
        os.close(stdin_fd)
        os.close(out_fd)


def run(kind: str, hooks: dict, state_json: bytes) -> None:
    """Every hook of kind, in the caller's namespaces; the first failure raises."""
    for i, hook in enumerate(hooks.get(kind, ())):
        run_one(kind, i, hook, state_json)


def run_warn(kind: str, hooks: dict, state_json: bytes, log=None) -> None:
    """poststart and poststop: a failure is a warning and the rest still run."""
    for i, hook in enumerate(hooks.get(kind, ())):
        try:
            run_one(kind, i, hook, state_json)
        except (IsoboxError, OSError) as e:
            warn(log, str(e))


def warn(log, msg: str) -> None:
    if log is None:
        from isobox.runc.log import Log
        log = Log(None)
    log.warning(msg)


# -- createContainer: in the container's namespaces ------------------------------------------------

# joined in this order, the user namespace last (host root may enter the others directly)
_CONTAINER_NS = ("ipc", "uts", "net", "pid", "cgroup", "mnt", "user")


def _in_container(hook: dict, init_pid: int) -> int:
    """Child body for createContainer: the path resolves here, in the runtime's namespaces; the
    hook runs in the container's namespaces as container root (pid namespace included, so it
    gets a second fork)."""
    from isobox.linux import syscalls as k
    exe = os.open(hook["path"], os.O_PATH)
    os.set_inheritable(exe, True)                    # a #! interpreter reopens /proc/self/fd/N
    flags = {"ipc": k.CLONE_NEWIPC, "uts": k.CLONE_NEWUTS, "net": k.CLONE_NEWNET, "pid": k.CLONE_NEWPID,
             "cgroup": k.CLONE_NEWCGROUP, "mnt": k.CLONE_NEWNS, "user": k.CLONE_NEWUSER}
    fds = [(os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flags[name])
           for name in _CONTAINER_NS]
    mine = [os.stat(f"/proc/self/ns/{name}") for name in _CONTAINER_NS]    # before /proc changes
    for own, (fd, flag) in zip(mine, fds):
        theirs = os.fstat(fd)
        if (theirs.st_dev, theirs.st_ino) != (own.st_dev, own.st_ino):   # never re-enter one's own
            k.setns(fd, flag)
        os.close(fd)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    k.prctl(k.PR_SET_DUMPABLE, 0)        # the new credentials set it to fs.suid_dumpable (maybe 1)
    os.chdir("/")
    pid = os.fork()                                  # enters the container's pid namespace
    if pid == 0:
        try:
            _exec(hook, f"/proc/self/fd/{exe}")
        except OSError:
            _exec(hook, exe)                         # no /proc in the container: fexecve
    while True:
        try:
            status = os.waitpid(pid, 0)[1]
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os.kill(os.getpid(), os.WTERMSIG(status))     # signals are at their defaults here
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def run_in_container(kind: str, hooks: dict, state_json: bytes, init_pid: int) -> None:
    for i, hook in enumerate(hooks.get(kind, ())):
        run_one(kind, i, hook, state_json, body=lambda h=hook: _in_container(h, init_pid))


# -- startContainer: the init's side and start's side ----------------------------------------------

def run_start_container(hooks: dict, state_json: bytes, fifo_fd: int) -> None:
    """In the container's init, which already has the process's credentials, capabilities and
    filter; before exec. A failure is written to the start FIFO (so `start` can report it) and
    raised; the init then exits without exec."""
    try:
        for i, hook in enumerate(hooks.get("startContainer", ())):
            run_one("startContainer", i, hook, state_json)
    except BaseException as e:
        msg = str(e) if isinstance(e, IsoboxError) else f"error running startContainer hooks: {e}"
        try:
            os.write(fifo_fd, b"\nhookerr:" + msg.replace("\n", " ").encode()[:3900])
        except OSError:
            pass
        raise IsoboxError(msg) from None


def _exe_ident(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino


class StartWatch:
    """`start` of a container with startContainer hooks: it waits until the init either exec'd
    the process (its /proc/PID/exe changed) or exited, and reads a hook failure back from the
    FIFO. Open it before writing the FIFO."""

    def __init__(self, pid: int, fifo: str, hooks: dict):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.exe = _exe_ident(pid)
        self.read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        timeouts = [h.get("timeout") for h in hooks.get("startContainer", ())]
        self.limit = None if None in timeouts else sum(timeouts) + 10

    def wait(self) -> None:
        import select
        import time
        deadline = None if self.limit is None else time.monotonic() + self.limit
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        while True:
            if not p.poll(10):
                now = _exe_ident(self.pid)
                if now is not None and now != self.exe:
                    return                             # exec'd: the hooks passed
                if deadline is not None and time.monotonic() > deadline:
                    return
                continue
            try:
                data = os.read(self.read_fd, 4096).decode(errors="replace")
            except BlockingIOError:
                data = ""
            if "hookerr:" in data:
                raise IsoboxError(data.split("hookerr:", 1)[1].strip() + "; the container's process was not started")
            return

    def close(self) -> None:
        for fd in (self.pidfd, self.read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
