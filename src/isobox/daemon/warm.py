"""isoboxd's warm worker: runs isobox-runc calls with everything already imported.

A process of its own (the holder starts and restarts it), single-threaded, so that forking
it is safe: per accepted call it forks a child that takes the caller's fds 0-2, working
directory and environment and runs isobox-runc's main() (see runc/warm_client.py for the
protocol and for which commands come here). The socket is root's only (0600 in a 0700
directory) and every peer must be uid 0, checked before a byte is read: the worker acts as
root, like the runtime the engines call. A caller has REQUEST_TIMEOUT seconds to send its
request, and at most MAX_BUSY calls hold a process at once."""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import sys

from isobox.daemon import paths

# what the runtime imports for the warm commands, loaded once here instead of per call
PRELOAD = ("isobox.runc.main", "isobox.runc.args", "isobox.runc.log", "isobox.runc.manage_cmd",
           "isobox.lifecycle.control", "isobox.lifecycle.state", "isobox.lifecycle.hooks",
           "isobox.cgroups.manager", "isobox.cgroups.layout", "isobox.ids.allocator", "isobox.daemon.client",
           "isobox.lifecycle.create", "isobox.lifecycle.exec", "isobox.runc.exec_cmd", "isobox.init.launch", "isobox.init.handover", "isobox.init.builder",
           "isobox.init.console", "isobox.spec.rewrite", "isobox.spec.config", "isobox.seccomp",
           "isobox.seccomp.bpfcache", "isobox.policy.model", "isobox.cgroups.primer", "_sha256")
WARM = frozenset({"create", "exec", "start", "state", "kill", "delete", "list", "ps", "pause", "resume",
                  "update", "features"})
SPAWNS = frozenset({"create", "exec"})       # the client forks the container's process (init/handover.py)
MAX_REQUEST = 1 << 20
SPARES = 2                  # children waiting for a call
MAX_BUSY = 16               # calls served at once; more wait in the listen backlog
REQUEST_TIMEOUT = 2.0       # seconds a caller has to send its request once accepted
MAX_FDS = 64                # the caller's fds 0-2 and the ones it preserves for a create
LOCAL = b"L"                # "run it yourself" (warm_client.LOCAL)


def decode(data: bytes) -> tuple[list[str], str, dict[str, str], int]:
    """(argv, cwd, env, caller's ppid) from warm_client.encode()."""
    parts = data.split(b"\0")
    if parts[0] != b"1":
        raise ValueError("unknown request version")
    cwd, ppid, argc = os.fsdecode(parts[1]), int(parts[2]), int(parts[3])
    argv = [os.fsdecode(a) for a in parts[4:4 + argc]]
    if len(argv) != argc:
        raise ValueError("truncated argv")
    env = {}
    for item in parts[4 + argc:]:
        k, eq, v = item.partition(b"=")
        if eq:
            env[os.fsdecode(k)] = os.fsdecode(v)
    return argv, cwd, env, ppid


def command(argv: list[str]) -> str | None:
    """The command this worker serves ("exec" only detached: a foreground exec waits for
    its process as the caller's subreaper), or None."""
    from isobox.runc.args import parse
    try:
        p = parse(argv)
    except Exception:  # noqa: BLE001 - a bad command line is reported by the local path, word for word
        return None
    if p.command == "exec" and not p.flags.get("detach"):
        return None
    return p.command if p.command in WARM else None


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request: one SEQPACKET message (the socket keeps the boundaries, so a create can
    go on talking over the same connection; see init/handover.py)."""
    from isobox.init.channel import received_fds
    msg, anc, flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(MAX_FDS * 4))
    fds = received_fds(anc)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("request truncated")
    return msg, fds


def _run_child(conn: socket.socket, fds: list[int], argv: list[str], cwd: str, env: dict[str, str],
               ppid: int, spawner: int) -> None:
    """In the forked child: become the caller's isobox-runc process, run main(), answer.
    spawner: the client's pid for a create or exec (the client forks the container's process)."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # hooks and helpers are waited for
        # the caller's fds land on 0, 1, 2 (and 3... when a create preserves some): first move
        # them and the connection above that range, so no dup2 closes one still to be placed
        high = MAX_FDS + 16
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, high) for fd in [conn.fileno(), *fds]]
        for fd in fds:
            os.close(fd)
        conn.close()
        conn = socket.socket(fileno=moved[0])
        for target, fd in enumerate(moved[1:]):
            os.dup2(fd, target)
            os.close(fd)
        conn.send(b"A")
        if spawner:
            from isobox.init import handover
            handover.REMOTE = handover.Remote(conn, spawner)
        os.environ.clear()
        os.environ.update(env)
        os.environ["ISOBOX_CALLER_PPID"] = str(ppid)
        os.environ["ISOBOX_WARM_WORKER"] = "1"
        try:
            os.chdir(cwd)
        except OSError as e:
            os.write(2, f"isobox-runc: cannot enter the working directory {cwd}: {e.strerror}\n".encode())
        else:
            sys.argv = ["isobox-runc", *argv]
            from isobox.runc.main import main
            code = main(argv)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        try:
            conn.send(b"R%d" % code)
        except OSError:
            pass
        os._exit(0)


def _take_one(listener: socket.socket, taken: int, k) -> None:
    """A spare child: wait for one call, tell the parent to fork the next spare, serve it."""
    parent = os.getppid()
    k.prctl(k.PR_SET_PDEATHSIG, signal.SIGKILL)      # a spare never outlives its worker...
    if os.getppid() != parent:
        os._exit(0)
    _warm_up()
    conn, _ = listener.accept()
    k.prctl(k.PR_SET_PDEATHSIG, 0)                   # ...but a call in progress finishes
    listener.close()
    try:
        os.write(taken, os.getpid().to_bytes(4, "little"))
    except OSError:
        pass
    os.close(taken)
    fds: list[int] = []
    try:
        peer, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != 0:
            os._exit(0)              # not host root: closed unread (the caller runs the call itself)
        conn.settimeout(REQUEST_TIMEOUT)     # an idle caller must not hold this process
        data, fds = _receive(conn)
        conn.settimeout(None)                # a create goes on talking for as long as it needs
        argv, cwd, env, ppid = decode(data)
        cmd = command(argv)
        if len(fds) >= 3 and cmd is not None:
            _run_child(conn, fds, argv, cwd, env, ppid, peer if cmd in SPAWNS else 0)   # does not return
        conn.send(LOCAL)
    except (OSError, ValueError):
        pass                         # no "A" written: the client runs the call itself
    os._exit(0)


def _warm_up() -> None:
    """In a fresh spare, before it waits: walk the paths every call takes, so the copy-on-write
    faults of the pages they touch (refcounts, caches) happen now instead of inside a call."""
    import io
    argv = ["--root", "/run/isobox-warm-up-nonexistent", "state", "warm-up"]
    decode(b"\0".join([b"1", b"/", b"0", b"4", *[a.encode() for a in argv], b"A=b"]))
    command(argv)
    out, err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        from isobox.runc.main import main
        main(argv)                  # "container does not exist": reads nothing, writes nothing
    finally:
        sys.stdout, sys.stderr = out, err


def serve(listener: socket.socket) -> None:
    """Pre-forks SPARES children that each take one call: the fork (about 3 ms for a process
    this size) happens between calls instead of inside one. A spare that took a call writes
    its pid to a pipe; a child that ends (after its call, or before taking any) is noticed by
    its pidfd. While calls run, a new spare is forked only when no idle one is left: on a
    2-CPU host the fork competes with the call for CPU (~0.6 ms of a 2 ms `state`), and
    sequential calls (an engine's create, start, delete) never need it."""
    import select
    from isobox.linux import syscalls as k
    taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
    idle: dict[int, int] = {}            # pidfd -> pid, waiting for a call
    busy: dict[int, int] = {}            # pidfd -> pid, serving one
    while True:
        # at most MAX_BUSY calls hold a process: a flood of connections waits in the backlog
        while len(idle) < (1 if busy else SPARES) and len(busy) + len(idle) < MAX_BUSY:
            pid = os.fork()
            if pid == 0:
                os.close(taken_r)
                try:
                    _take_one(listener, taken_w, k)
                finally:
                    os._exit(0)
            idle[os.pidfd_open(pid)] = pid
        ready, _, _ = select.select([taken_r, *idle, *busy], [], [])
        if taken_r in ready:
            data = os.read(taken_r, 4 * 64)
            took = {int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data) - 3, 4)}
            for fd, pid in list(idle.items()):
                if pid in took:
                    busy[fd] = idle.pop(fd)
        for group in (idle, busy):
            for fd in [fd for fd in group if fd in ready]:
                os.close(fd)
                del group[fd]


def main() -> None:
    import importlib
    from isobox.linux import syscalls as k
    holder = os.getppid()
    # the holder is the supervisor: a worker left by a holder killed with -9 would keep a
    # stale socket open for ever (calls already forked finish: the signal is not inherited)
    k.prctl(k.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != holder:
        return
    for name in PRELOAD:
        importlib.import_module(name)
    import gc
    gc.freeze()              # what is loaded now stays shared with the children (no GC writes)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)         # children are reaped by the kernel
    tmp = f"{paths.WARM_SOCKET}.{os.getpid()}"
    old = os.umask(0o077)
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(tmp)
    finally:
        os.umask(old)
    listener.listen(128)
    os.rename(tmp, paths.WARM_SOCKET)                    # never a socket nobody listens on
    serve(listener)


if __name__ == "__main__":
    main()
