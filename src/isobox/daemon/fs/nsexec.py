"""Run a /proc/sys access inside another process's namespaces.

Two ways, both rooted at the daemon's own /proc mount (sysctl lookups follow the namespaces of
the *calling task*, not of the procfs mount):

- thread_ns(): setns() the calling thread into the reader's net/uts/ipc namespaces, then back.
  These three may be switched per thread, so no fork is needed for the frequent reads.
- run_as(): fork a one-shot helper that joins the reader's namespaces (user and pid too), takes
  the reader's uids, gids, groups and capabilities, and only then opens the file, so the kernel
  makes every permission decision. The daemon is threaded, so the child only makes syscalls and
  leaves with os._exit; the result comes back over a pipe.
"""
from __future__ import annotations

import array
import contextlib
import errno
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from isobox.linux import sealed
from isobox.linux import syscalls as sc

NS_FLAG = {"net": sc.CLONE_NEWNET, "uts": sc.CLONE_NEWUTS, "ipc": sc.CLONE_NEWIPC,
           "pid": sc.CLONE_NEWPID, "user": sc.CLONE_NEWUSER}
HELPER_TIMEOUT = 5.0                # a helper stuck this long is killed; the request gets EIO
MAX_READ = 1 << 20                  # no sysctl file comes close; caps a hostile reply
_HDR = struct.Struct("=iq")         # errno (0 = ok), result (bytes written, or length of data)


@dataclass
class Creds:
    """The reader's identity, ids as the host sees them (from /proc/<pid>/status)."""
    uids: tuple[int, int, int]      # real, effective, saved
    gids: tuple[int, int, int]
    groups: list[int]
    cap_eff: int
    cap_prm: int


def _proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise OSError(errno.ESRCH, f"reader {pid} is gone") from None


def read_creds(pid: int) -> Creds:
    fields = dict(line.split(":", 1) for line in _proc(pid, "status").splitlines() if ":" in line)
    uids = [int(x) for x in fields["Uid"].split()]
    gids = [int(x) for x in fields["Gid"].split()]
    return Creds((uids[0], uids[1], uids[2]), (gids[0], gids[1], gids[2]),
                 [int(x) for x in fields.get("Groups", "").split()],
                 int(fields["CapEff"], 16), int(fields["CapPrm"], 16))


def host_to_ns(host_id: int, id_map: str) -> int | None:
    """Translate a host id into the namespace whose map (as read from the host) is id_map."""
    for line in id_map.splitlines():
        parts = line.split()
        if len(parts) == 3:
            inner, outer, count = (int(x) for x in parts)
            if outer <= host_id < outer + count:
                return inner + host_id - outer
    return None


def same_ns(pid: int, kind: str) -> bool:
    try:
        theirs = os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except (FileNotFoundError, ProcessLookupError):
        raise OSError(errno.ESRCH, f"reader {pid} is gone") from None
    return theirs == os.stat(f"/proc/thread-self/ns/{kind}").st_ino


def _open_ns(pid: int, kind: str) -> int:
    try:
        return os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise OSError(errno.ESRCH, f"reader {pid} is gone") from None


@contextlib.contextmanager
def thread_ns(pid: int, kinds: tuple[str, ...]) -> Iterator[None]:
    """Move the calling thread into pid's namespaces of the given kinds (net, uts, ipc) for the block."""
    moves: list[tuple[int, int, int]] = []          # (original fd, target fd, flag)
    try:
        for kind in kinds:
            if kind in ("user", "pid"):
                raise ValueError(f"{kind} namespace cannot be joined by one thread")
            if same_ns(pid, kind):
                continue
            orig = os.open(f"/proc/thread-self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            moves.append((orig, -1, NS_FLAG[kind]))
            target = _open_ns(pid, kind)
            moves[-1] = (orig, target, NS_FLAG[kind])
        entered = []
        try:
            for orig, target, flag in moves:
                sc.setns(target, flag)
                entered.append((orig, flag))
            yield
        finally:
            for orig, flag in reversed(entered):
                try:
                    sc.setns(orig, flag)
                except OSError:
                    # fail closed: a thread left in a container's namespace would serve that
                    # container's view to everyone else. The holder restarts the server.
                    os.abort()
    finally:
        for orig, target, _ in moves:
            os.close(orig)
            if target >= 0:
                os.close(target)


@dataclass
class _Plan:
    """Everything the helper needs, prepared before fork so the child only makes syscalls."""
    ns_fds: list[tuple[int, int]]   # (fd, flag) joined as root, before the user namespace
    user_fd: int                    # -1: stay in the daemon's user namespace
    groups: list[int]
    uids: tuple[int, int, int]      # as seen inside the joined user namespace
    gids: tuple[int, int, int]
    cap_eff: int
    cap_prm: int
    fork_into_pid: bool             # a pid namespace only applies to children


def _plan(pid: int, kinds: tuple[str, ...]) -> _Plan:
    creds = read_creds(pid)
    plan = _Plan([], -1, creds.groups, creds.uids, creds.gids, creds.cap_eff, creds.cap_prm, False)
    try:
        for kind in kinds:
            if kind != "user" and not same_ns(pid, kind):
                plan.ns_fds.append((_open_ns(pid, kind), NS_FLAG[kind]))
                plan.fork_into_pid |= kind == "pid"
        if not same_ns(pid, "user"):
            plan.user_fd = _open_ns(pid, "user")
            uid_map, gid_map = _proc(pid, "uid_map"), _proc(pid, "gid_map")
            uids = tuple(host_to_ns(u, uid_map) for u in creds.uids)
            gids = tuple(host_to_ns(g, gid_map) for g in creds.gids)
            if None in uids or None in gids:
                raise OSError(errno.EPERM, "reader's ids are not mapped in its user namespace")
            plan.uids, plan.gids = uids, gids  # type: ignore[assignment]
    except BaseException:
        _close_plan(plan)
        raise
    return plan


def _plan_fds(plan: _Plan) -> list[int]:
    return [fd for fd, _ in plan.ns_fds] + [plan.user_fd]


def _close_plan(plan: _Plan) -> None:
    for fd, _ in plan.ns_fds:
        os.close(fd)
    if plan.user_fd >= 0:
        os.close(plan.user_fd)


def _become(plan: _Plan) -> None:
    """In the child: join the namespaces, then drop to the reader's credentials."""
    for fd, flag in plan.ns_fds:    # as host root first: we may lack rights there once in the userns
        sc.setns(fd, flag)
    os.setgroups(plan.groups)       # host gids, while still privileged in the init user namespace
    if plan.user_fd >= 0:
        sc.setns(plan.user_fd, sc.CLONE_NEWUSER)
    sc.prctl(sc.PR_SET_KEEPCAPS, 1)   # keep the permitted set through setresuid; capset trims it
    os.setresgid(*plan.gids)
    os.setresuid(*plan.uids)
    sc.capset(plan.cap_eff & plan.cap_prm, plan.cap_prm, 0)
    # a credential change resets dumpable to fs.suid_dumpable, which may be 1 on a host
    sc.prctl(sc.PR_SET_DUMPABLE, 0)


def _do(op: str, path: str, data: bytes) -> tuple[int, bytes]:
    """The operation, as the reader: returns (result, payload)."""
    if op == "open":
        os.close(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        return 0, b""
    if op == "write":
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return os.write(fd, data), b""
        finally:
            os.close(fd)
    if op == "read":
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = b""
            while len(out) < MAX_READ:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
            return len(out), out
        finally:
            os.close(fd)
    if op in ("sethostname", "setdomainname"):
        getattr(sc, op)(data.decode("utf-8", "surrogateescape"))
        return len(data), b""
    raise OSError(errno.EINVAL, op)


def _child(plan: _Plan, wfd: int, op: str, path: str, data: bytes) -> None:
    """Never returns: becomes the reader, does op, reports over wfd and exits."""
    try:
        _become(plan)
        if plan.fork_into_pid:
            inner = os.fork()
            if inner == 0:
                sealed.seal((wfd,))
                _finish(wfd, op, path, data)
            os.waitpid(inner, 0)
            os._exit(0)
        _finish(wfd, op, path, data)
    except OSError as e:
        _report(wfd, e)
    except BaseException:
        pass
    os._exit(1)


def _finish(wfd: int, op: str, path: str, data: bytes) -> None:
    try:
        res, payload = _do(op, path, data)
        os.write(wfd, _HDR.pack(0, res) + payload)
        os._exit(0)
    except OSError as e:
        _report(wfd, e)
    except BaseException:
        pass
    os._exit(1)


def _report(wfd: int, e: OSError) -> None:
    with contextlib.suppress(OSError):
        os.write(wfd, _HDR.pack(e.errno or errno.EIO, 0))


def run_as(pid: int, kinds: tuple[str, ...], op: str, path: str, data: bytes = b"") -> tuple[int, bytes]:
    """Do op ("open", "write", "read", "sethostname", "setdomainname") on path inside pid's
    namespaces of the given kinds plus its user namespace, with pid's credentials.
    Returns (result, payload) or raises OSError with the kernel's errno."""
    plan = _plan(pid, kinds)
    try:
        return fork_helper(lambda wfd: _child(plan, wfd, op, path, data), "sysctl helper", _plan_fds(plan))
    finally:
        _close_plan(plan)


def fork_helper(child_fn, what: str, keep: Iterable[int]) -> tuple[int, bytes]:
    """Forks child_fn(wfd), which reports one _HDR (+ payload) on wfd and never returns;
    (result, payload), or OSError with the errno it reported (EIO if it died silently).
    The child is sealed first (linux/sealed.py): not traceable, and holding only wfd and the
    fds in keep, none of the server's (/dev/fuse, listeners, databases, logs)."""
    rfd, wfd = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            try:
                sealed.seal((wfd, *keep))
                child_fn(wfd)
            finally:
                os._exit(1)
        os.close(wfd)
        wfd = -1
        reply = _collect(rfd, child)
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    if len(reply) < _HDR.size:
        raise OSError(errno.EIO, f"{what} died")
    err, res = _HDR.unpack_from(reply)
    if err:
        raise OSError(err, os.strerror(err))
    return res, reply[_HDR.size:]


def _collect(rfd: int, child: int) -> bytes:
    """Read the helper's reply with a deadline, then reap it (killing it unless it finished)."""
    deadline = time.monotonic() + HELPER_TIMEOUT
    poller = select.poll()          # not select(): the daemon may hold fds above FD_SETSIZE
    poller.register(rfd, select.POLLIN)
    out, eof = b"", False
    try:
        while len(out) <= MAX_READ + _HDR.size:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                eof = True
                break
            out += chunk
    finally:
        reap(child, finished=eof)
    return out


def reap(child: int, finished: bool) -> None:
    """Waits for a helper by PID, killing it first unless it finished its work (it hung,
    or its reply never came): no helper outlives the call it served."""
    if not finished:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)


# --- run_fn: an arbitrary operation as the caller, with an fd coming back -----------------------

_FN_HDR = struct.Struct("=iq")      # errno (0 = ok), result; then the payload; an fd rides along


def run_fn(pid: int, fn: Callable[[], tuple[int, bytes, int]], before: Callable[[], None] | None = None,
           kinds: tuple[str, ...] = (), keep: Iterable[int] = ()) -> tuple[int, bytes, int]:
    """Run fn in a forked helper that joined pid's namespaces of the given kinds plus its user
    namespace and took its credentials. before() runs first in the helper, still host root (to
    join a mount namespace or chroot, which the caller's credentials may not allow). fn returns
    (result, payload, fd or -1); the fd is passed back with SCM_RIGHTS and owned by the caller of
    run_fn. Raises OSError with the errno fn (or becoming pid) failed with. The helper is sealed
    (linux/sealed.py) and keeps only its socket, the namespaces it joins and the fds in keep
    (whatever before and fn use).

    Both callables run in a child of a threaded process: they must only make syscalls (no
    imports, no locks, no logging)."""
    plan = _plan(pid, kinds)
    parent, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        child = os.fork()
        if child == 0:
            try:
                sealed.seal((child_sock.fileno(), *_plan_fds(plan), *keep))
                _fn_child(plan, child_sock, fn, before)
            finally:
                os._exit(1)
        child_sock.close()
        reply, fds = _fn_collect(parent, child)
    finally:
        _close_plan(plan)
        parent.close()
        child_sock.close()
    if len(reply) < _FN_HDR.size:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EIO, "helper died")
    err, res = _FN_HDR.unpack_from(reply)
    if err:
        for fd in fds:
            os.close(fd)
        raise OSError(err, os.strerror(err))
    for extra in fds[1:]:
        os.close(extra)
    return res, reply[_FN_HDR.size:], fds[0] if fds else -1


def _fn_child(plan: _Plan, sock: socket.socket, fn, before) -> None:
    """Never returns: becomes the caller, runs fn, sends the reply (and fd) and exits."""
    try:
        if before is not None:
            before()
        _become(plan)
        res, payload, fd = fn()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
        sock.sendmsg([_FN_HDR.pack(0, res) + payload], anc)
        os._exit(0)
    except OSError as e:
        with contextlib.suppress(OSError):
            sock.sendmsg([_FN_HDR.pack(e.errno or errno.EIO, 0)])
    except BaseException:
        pass
    os._exit(1)


def _fn_collect(sock: socket.socket, child: int) -> tuple[bytes, list[int]]:
    """One reply (with any fds) within the deadline; then reap the helper, killing it if late."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    msg, fds, done = b"", [], False
    try:
        if poller.poll(HELPER_TIMEOUT * 1000):
            msg, anc, _flags, _addr = sock.recvmsg(MAX_READ, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", data[:len(data) - len(data) % 4]).tolist()
            done = True
    finally:
        reap(child, finished=done)
    return msg, fds
