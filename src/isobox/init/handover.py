"""create and exec --detach through isoboxd's warm worker: the engine's own client forks
the container's process.

The container's init (H1) must descend from the process the engine started (its shim reaps
it), but everything else a create does (spec rewrite, IDs, cgroups, registration, the
builder, hooks) can run in the worker, which has every module imported. So the three
processes split launch.py's first step between them:

    worker (Remote.spawn)      -> client: "C" + marshal({"flags", "joins"})
    client (spawn_here)        joins the namespaces, clones H1, answers its pid and the
                               runtime's end of H1's socket pair (SCM_RIGHTS)
    worker (Remote.hand_over)  -> H1: marshal of what container.run reads, with the start
                               FIFO and the console socket as fds
    H1 (init_main)             rebuilds that Plan and runs container.run, driven by the
                               worker exactly as launch.py drives a locally cloned init.

A detached exec goes the same way with "X": the worker sends the container's namespaces,
the helper's pipes, the console socket and the process settings; the client forks the
helper (exec_init.helper), which the worker then drives as lifecycle/exec.py does. Every fd
arrives close-on-exec (MSG_CMSG_CLOEXEC), so none reaches the container's process.

The client is host root with the engine's fds. Before it joins or clones into a container's
namespaces it makes itself not dumpable (it exits right after), so H1 is born untraceable;
H1 and X are sealed (linux/sealed.py) as they start: the engine's stdio and preserved fds
(the client's first `keep_below` fds) and their own socket or pipes, nothing else.

marshal, not json or pickle: it is built in (pickle's C module imports functools and
collections, ~6 ms) and every value here is a plain int, str, bytes, list or dict. The peer
is trusted either way: the worker serves root's clients only and both run isobox's code.
"""
from __future__ import annotations

import _socket
import marshal
import os

from isobox.errors import IsoboxError
from isobox.ids.procinfo import proc_ppid
from isobox.init import channel

REMOTE: "Remote | None" = None     # set by the warm worker for a create or exec it serves
MAX_PLAN = 1 << 20                 # SEQPACKET: a message arrives whole or not at all
SPAWN = b"C"
SPAWN_EXEC = b"X"
SPAWN_FAILED = b"E"


# --- the worker's side ------------------------------------------------------------------
class Remote:
    """The worker's end of one warm create or exec: conn is its connection to the client."""

    def __init__(self, conn, client_pid: int):
        self.conn = conn
        self.client_pid = client_pid

    def spawn(self, flags: int, joins: list[tuple[str, int]]) -> tuple[int, _socket.socket]:
        """H1's host pid and the runtime's end of its socket pair, from the client."""
        self.conn.send(SPAWN + marshal.dumps({"flags": flags, "joins": joins}))
        pid, fds = self._answer(1, "the container's init")
        return pid, _socket.socket(fileno=fds[0])

    def spawn_exec(self, ns: dict[str, int], go_r: int, report_w: int, proc, console_sock, preserve_fds: int,
                   seccomp) -> int:
        """A detached exec: the client forks the helper X (exec_init.helper) with these fds
        and settings; X's host pid."""
        from isobox.init.exec_init import ORDER
        fds = [ns[name] for name, _ in ORDER] + [go_r, report_w]
        fds += [console_sock.fileno()] if console_sock is not None else []
        data = marshal.dumps({"process": _process_wire(proc), "preserve_fds": preserve_fds,
                              "seccomp": seccomp.to_wire() if seccomp is not None else None})
        if len(data) > MAX_PLAN:
            raise IsoboxError("the process settings are too large to hand over (over 1 MiB)")
        self.conn.sendmsg([SPAWN_EXEC + data], channel.rights(fds))
        pid, _ = self._answer(0, "the exec helper")
        return pid

    def _answer(self, nfds: int, what: str) -> tuple[int, list[int]]:
        """The client's reply to a spawn: a pid (checked to be its child) and nfds fds."""
        data, anc, _, _ = self.conn.recvmsg(4096, _socket.CMSG_LEN(4), _socket.MSG_CMSG_CLOEXEC)
        fds = channel.received_fds(anc)
        if not data.isdigit() or len(fds) != nfds or proc_ppid(int(data)) != self.client_pid:
            # only ever drive a process the calling client really forked
            for fd in fds:
                os.close(fd)
            if data.isdigit():
                raise IsoboxError(f"the isobox-runc client named pid {int(data)}, which is not its child")
            why = data[1:].decode(errors="replace") if data.startswith(SPAWN_FAILED) else ""
            raise IsoboxError(why or f"the isobox-runc client did not start {what}")
        return int(data), fds

    @staticmethod
    def hand_over(sock: _socket.socket, plan, fifo_fd: int, console_sock, new_cgroupns: bool,
                  preserve_fds: int) -> None:
        fds = [fifo_fd] + ([console_sock.fileno()] if console_sock is not None else [])
        data = encode(plan, new_cgroupns, preserve_fds)
        if len(data) > MAX_PLAN:
            raise IsoboxError("the container's process settings are too large to hand over (over 1 MiB)")
        sock.sendmsg([data], channel.rights(fds))


def _process_wire(p) -> dict:
    proc = {name: getattr(p, name) for name in p._FIELDS if name != "rlimits"}
    proc["rlimits"] = [(r.resource, r.soft, r.hard) for r in p.rlimits]
    return proc


def _process_from(d: dict):
    from isobox.spec.plan import Process, Rlimit
    return Process(**{**d, "rlimits": [Rlimit(*r) for r in d["rlimits"]]})


def _seccomp_from(d: dict | None):
    if d is None:
        return None
    from isobox.seccomp import Seccomp
    return Seccomp.from_wire(d)


def encode(plan, new_cgroupns: bool, preserve_fds: int) -> bytes:
    """What container.run reads of the Plan (process, seccomp, startContainer hooks, ids)."""
    return marshal.dumps({
        "id": plan.id, "bundle": plan.bundle, "annotations": plan.annotations, "hooks": plan.hooks,
        "process": _process_wire(plan.process),
        "seccomp": plan.seccomp.to_wire() if plan.seccomp is not None else None,
        "new_cgroupns": new_cgroupns, "preserve_fds": preserve_fds})


def decode(data: bytes):
    """(Plan, new_cgroupns, preserve_fds) from encode(): a Plan holding only what the init uses."""
    from isobox.spec.plan import Plan
    d = marshal.loads(data)
    sec = _seccomp_from(d["seccomp"])
    plan = Plan(id=d["id"], bundle=d["bundle"], rootfs="", readonly_root=False, new_namespaces=0,
                join_namespaces={}, join_user="", shares_userns_of="", uid_base=0, gid_base=0, id_size=0,
                explicit_mapping=False, mounts=[], masked_paths=[], readonly_paths=[], devices=[],
                hostname="", domainname="", sysctl={}, cgroups_path="", resources={},
                process=_process_from(d["process"]), annotations=d["annotations"], hooks=d["hooks"], seccomp=sec)
    return plan, d["new_cgroupns"], d["preserve_fds"]


# --- the client's side ------------------------------------------------------------------
def preload() -> None:
    """What the clone's child runs, imported while the worker prepares (the child inherits it)."""
    import resource  # noqa: F401
    import _signal  # noqa: F401
    from isobox.init import container, exec_init  # noqa: F401
    from isobox.linux import capabilities  # noqa: F401
    from isobox.seccomp import bpfcache  # noqa: F401
    from isobox.spec import plan  # noqa: F401


def spawn_here(conn: _socket.socket, request: bytes, keep_below: int = 3) -> None:
    """The client's answer to a SPAWN request: clone H1 (which never returns here) and send
    the worker its pid and the runtime's end of the socket pair. keep_below: fds 0 to
    keep_below - 1 are the engine's stdio and preserved fds, which H1 inherits."""
    from isobox.linux import syscalls as k
    sock_p = sock_h = None
    try:
        req = marshal.loads(request)
        sock_p, sock_h = channel.pair()
        k.prctl(k.PR_SET_DUMPABLE, 0)          # before any setns: H1 inherits it from the clone
        for path, flag in req["joins"]:
            # the client needs no host capability after this (it only answers and exits), so it
            # joins the namespaces itself, a shared container's user namespace first
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                k.setns(fd, flag)
            finally:
                os.close(fd)
        pid = k.clone(req["flags"])
    except (OSError, ValueError, KeyError, EOFError, TypeError) as e:
        for s in (sock_p, sock_h):
            if s is not None:
                s.close()
        conn.send(SPAWN_FAILED + f"cannot start the container's init: {channel.error_line(e)}".encode())
        return
    if pid == 0:
        try:
            from isobox.linux import sealed
            sealed.seal([*range(keep_below), sock_h.fileno()], die_with_parent=False)
            conn.detach()                       # closed by the seal
            sock_p.detach()
            init_main(sock_h)
        finally:
            os._exit(1)
    sock_h.close()
    try:
        conn.sendmsg([str(pid).encode()], channel.rights([sock_p.fileno()]))
    finally:
        sock_p.close()


def exec_here(conn: _socket.socket, request: bytes, fds: list[int], keep_below: int = 3) -> None:
    """The client's answer to a SPAWN_EXEC request: fork the exec helper X (which never
    returns here) and send the worker its pid. X forks the process and exits; the process is
    then the caller's subreaper's, as with runc exec --detach."""
    try:
        x = os.fork()
    except OSError as e:
        for fd in fds:
            os.close(fd)
        conn.send(SPAWN_FAILED + f"cannot start the exec helper: {e.strerror}".encode())
        return
    if x == 0:
        try:
            from isobox.linux import sealed
            sealed.seal([*range(keep_below), *fds])     # exec_init.helper narrows it further
            conn.detach()
            exec_main(request, fds)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    conn.send(str(x).encode())


def exec_main(request: bytes, fds: list[int]) -> None:
    """X: never returns (exec_init.helper reports to the worker over report_w)."""
    try:
        from isobox.init import exec_init
        d = marshal.loads(request)
        n = len(exec_init.ORDER)
        ns = {name: fds[i] for i, (name, _) in enumerate(exec_init.ORDER)}
        go_r, report_w = fds[n], fds[n + 1]
        console_sock = _socket.socket(fileno=fds[n + 2]) if len(fds) > n + 2 else None
        exec_init.helper(ns, go_r, report_w, _process_from(d["process"]), console_sock, d["preserve_fds"],
                         _seccomp_from(d["seccomp"]))
    finally:
        os._exit(1)     # helper() never returns; the worker reads an empty report as "died"


# --- H1's side ------------------------------------------------------------------------
def init_main(sock: _socket.socket) -> None:
    """Never returns: receives the settings, then is the container's init (container.run)."""
    from isobox.init import container
    try:
        data, anc, _, _ = sock.recvmsg(MAX_PLAN, _socket.CMSG_LEN(2 * 4), _socket.MSG_CMSG_CLOEXEC)
        fds = channel.received_fds(anc)
        if not data or not fds:
            os._exit(1)            # the worker gave up before handing over; it undoes the rest
        plan, new_cgroupns, preserve_fds = decode(data)
        console_sock = _socket.socket(fileno=fds[1]) if len(fds) > 1 else None
    except BaseException as e:  # noqa: BLE001 - the worker waits for a line, not a traceback
        try:
            channel.send(sock, "err:" + channel.error_line(e))
        finally:
            os._exit(1)
    container.run(plan, sock, fds[0], new_cgroupns, console_sock, preserve_fds)
