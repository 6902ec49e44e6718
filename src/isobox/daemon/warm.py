"""isoboxd's warm worker: runs isobox-runc calls with everything already imported.

A process of its own (the holder starts and restarts it), single-threaded, so that forking
it is safe: per accepted call it forks a child that takes the caller's fds 0-2, working
directory and environment and runs isobox-runc's main() (see runc/warm_client.py for the
protocol and for which commands come here). The socket is root's only (0600 in a 0711
directory) and every peer must be uid 0: the worker acts as root, like the runtime the
engines call."""
from __future__ import annotations

import os
import signal
import socket
import struct
import sys

from isobox.daemon import paths

# what the runtime imports for the warm commands, loaded once here instead of per call
PRELOAD = ("isobox.runc.main", "isobox.runc.args", "isobox.runc.log", "isobox.runc.manage_cmd",
           "isobox.lifecycle.control", "isobox.lifecycle.state", "isobox.lifecycle.hooks",
           "isobox.cgroups.manager", "isobox.cgroups.layout", "isobox.ids.allocator", "isobox.daemon.client")
WARM = frozenset({"start", "state", "kill", "delete", "list", "ps", "pause", "resume", "update", "features"})
MAX_REQUEST = 1 << 20
SPARES = 2                  # children waiting for a call
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
    from isobox.runc.args import parse
    try:
        return parse(argv).command
    except Exception:  # noqa: BLE001 - a bad command line is reported by the local path, word for word
        return None


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    while True:
        msg, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(3 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += [int.from_bytes(payload[i:i + 4], "little") for i in range(0, len(payload) - 3, 4)]
        if not msg:
            return data, fds
        data += msg
        if len(data) > MAX_REQUEST:
            raise ValueError("request too large")


def _run_child(conn: socket.socket, fds: list[int], argv: list[str], cwd: str, env: dict[str, str],
               ppid: int) -> None:
    """In the forked child: become the caller's isobox-runc process, run main(), answer."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # hooks and helpers are waited for
        conn.sendall(b"A")
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
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
            conn.sendall(b"R%d" % code)
        except OSError:
            pass
        os._exit(0)


def _take_one(listener: socket.socket, taken: int, k) -> None:
    """A spare child: wait for one call, tell the parent to fork the next spare, serve it."""
    parent = os.getppid()
    k.prctl(k.PR_SET_PDEATHSIG, signal.SIGKILL)      # a spare never outlives its worker...
    if os.getppid() != parent:
        os._exit(0)
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
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        data, fds = _receive(conn)
        argv, cwd, env, ppid = decode(data)
        if uid == 0 and len(fds) == 3 and command(argv) in WARM:
            _run_child(conn, fds, argv, cwd, env, ppid)      # does not return
        conn.sendall(LOCAL)
    except (OSError, ValueError):
        pass                         # no "A" written: the client runs the call itself
    os._exit(0)


def serve(listener: socket.socket) -> None:
    """Pre-forks SPARES children that each take one call: the fork (about 3 ms for a process
    this size) happens between calls instead of inside one. A spare that took a call writes
    its pid to a pipe; one that died before taking any is noticed by its pidfd; either way a
    new spare replaces it, so a connection never waits for a child that will not come."""
    import select
    from isobox.linux import syscalls as k
    taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
    spares: dict[int, int] = {}          # pidfd -> pid
    while True:
        while len(spares) < SPARES:
            pid = os.fork()
            if pid == 0:
                os.close(taken_r)
                try:
                    _take_one(listener, taken_w, k)
                finally:
                    os._exit(0)
            spares[os.pidfd_open(pid)] = pid
        ready, _, _ = select.select([taken_r, *spares], [], [])
        gone: set[int] = set()
        if taken_r in ready:
            data = os.read(taken_r, 4 * 64)
            gone = {int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data) - 3, 4)}
        for fd, pid in list(spares.items()):
            if pid in gone or fd in ready:
                os.close(fd)
                del spares[fd]


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
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(tmp)
    finally:
        os.umask(old)
    listener.listen(128)
    os.rename(tmp, paths.WARM_SOCKET)                    # never a socket nobody listens on
    serve(listener)


if __name__ == "__main__":
    main()
