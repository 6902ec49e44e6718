"""Seccomp for isobox: the spec's profile and isobox's own trap, in one filter.

    rewrite.py (runtime, before anything exists)
        plan.seccomp = prepare(spec["linux"].get("seccomp"), cid=..., bundle=..., annotations=...,
                               trap_socket=plan.seccomp_trap_socket)
            parse + validate (profile.py), merge the trap (ERRNO must not pre-empt NOTIFY),
            compile with libseccomp (compile.py); any problem is one IsoboxError line.
    container init / exec'd process
        inst = installer(plan.seccomp)   # while still in the host's mount namespace: holds the
                                          # trap socket's directory (connected in early())
        container.become(proc, inst)     # become() calls inst.early(proc) first and inst() last
        os.execve(...)

When the filter is loaded: last in become(), when the process will be able to — with
no_new_privs set, or with CAP_SYS_ADMIN in its user namespace after the capabilities are set.
Otherwise (a non-root user without no_new_privs: seccomp(2) without NNP needs CAP_SYS_ADMIN) it
is loaded at the start of become(), while container root still holds every capability of its
user namespace; the profile must then allow what become() does (prctl, setgroups, setresgid,
setresuid, capset, capget, openat/read/close of /proc/sys/kernel/cap_last_cap, umask) — Docker's
default profile does. The container's init calls become() before it waits for `start` (nothing
with host credentials waits there, init/container.py), so after the filter it still writes
"ready", reads the start FIFO, runs any startContainer hooks and execs: write, read, close and
execve (and the hooks' own calls) must be allowed too.

The trap is ON by default: its listener goes to isoboxd's holder (daemon/paths.TRAP_SOCKET).
TRAP_SOCKET or the ISOBOX_SECCOMP_TRAP_SOCKET environment of isobox-runc name another socket,
or turn it off with "" or "off" (tests and debugging; only root runs isobox-runc usefully). With it, the syscalls in TRAPPED
return SCMP_ACT_NOTIFY; the socket is connected right before credentials change (it is root's
only, and idle connections are dropped) and the listener fd is sent over it with SCM_RIGHTS
and one JSON message {"type": "isobox-seccomp", "id", "pid" (host pid, 0 when unknown),
"nsPid" (in the container), "trapped": [...]}; each exec'd process sends its own.

A spec listenerPath (without the trap) works as in runc: connect, send the
containerProcessState JSON {"ociVersion", "fds": ["seccompFd"], "pid", "metadata", "state"}
with the fd. Both together are refused: a task has one listener (a second gives EBUSY).
The init never keeps the listener fd: it is closed before execve.
"""
from __future__ import annotations

from isobox import jsonfast as json  # json without its import cost (see jsonfast)
import os
import _socket  # not socket.py: it costs ~5 ms of imports on every create

from isobox.errors import IsoboxError
from isobox.ids.procinfo import host_pid as _host_pid
# imported here, not when loading: the filter is loaded after the process entered the
# container's mount namespace, where isobox's modules do not exist
from isobox.seccomp import newer
from isobox.init.channel import rights
from isobox.seccomp.profile import TRAPPED, Profile, merge_trap, parse  # noqa: F401  (re-exported)

TRAP_SOCKET_ENV = "ISOBOX_SECCOMP_TRAP_SOCKET"
TRAP_SOCKET: str | None = None      # module switch; None: take the environment variable
OCI_VERSION = "1.2.0"
CAP_SYS_ADMIN = 21


def trap_socket() -> str:
    """The trap's socket path, or "" (off)."""
    if TRAP_SOCKET is not None:
        return TRAP_SOCKET
    env = os.environ.get(TRAP_SOCKET_ENV)
    if env is not None:
        return "" if env in ("", "off") else env
    from isobox.daemon.paths import TRAP_SOCKET as ISOBOXD
    return ISOBOXD


class Seccomp:
    """What Plan.seccomp holds: the compiled filter (a bpfcache.Program) and where its
    listener fd goes."""

    def __init__(self, compiled, *, cid: str, bundle: str, annotations: dict, trap_socket: str):
        self.compiled = compiled
        self.cid = cid
        self.bundle = bundle
        self.annotations = annotations
        self.trap_socket = trap_socket
        self.key = ""                  # isoboxd's key for the container (set once registered)
        prof: Profile = compiled.profile
        self.listener_path = prof.listener_path
        self.listener_metadata = prof.listener_metadata
        self.notes = list(prof.notes)
        if compiled.skipped:
            self.notes.append("seccomp: syscalls unknown to libseccomp skipped: " + ", ".join(compiled.skipped))

    @property
    def socket_path(self) -> str:
        return self.trap_socket or self.listener_path

    _WIRE = ("cid", "bundle", "annotations", "trap_socket", "key", "listener_path", "listener_metadata")

    def to_wire(self) -> dict:
        """What a container init needs to load the filter, as plain values (init/handover.py)."""
        c = self.compiled
        out = {name: getattr(self, name) for name in self._WIRE}
        out.update(bpf=c.bpf, flags=c.flags(), notify=c.uses_notify)
        return out

    @classmethod
    def from_wire(cls, d: dict) -> "Seccomp":
        from isobox.seccomp.bpfcache import Shipped
        self = cls.__new__(cls)
        self.compiled = Shipped(d["bpf"], d["flags"], d["notify"])
        for name in cls._WIRE:
            setattr(self, name, d[name])
        self.notes = []
        return self


def check(spec_seccomp: dict | None, trap_socket: str = "") -> Profile | None:
    """Pure validation and trap merge, no libseccomp: the Profile to compile, or None."""
    prof = parse(spec_seccomp) if spec_seccomp is not None else None
    if trap_socket:
        if not trap_socket.startswith("/"):
            raise IsoboxError(f"seccomp trap socket {trap_socket!r} must be an absolute path")
        prof = merge_trap(prof)
    return prof


def prepare(spec_seccomp: dict | None, *, cid: str = "", bundle: str = "", annotations: dict | None = None,
            trap_socket: str = "") -> Seccomp | None:
    """Validates, merges and compiles; None when there is neither a profile nor the trap."""
    prof = check(spec_seccomp, trap_socket)
    if prof is None:
        return None
    return Seccomp(program(prof), cid=cid, bundle=bundle, annotations=dict(annotations or {}),
                   trap_socket=trap_socket)


def program(prof: Profile):
    """prof as BPF: from the cache (bpfcache.py) when an earlier create compiled it, else
    compiled with libseccomp now and cached."""
    from isobox.seccomp import bpfcache
    prog = bpfcache.lookup(prof)
    if prog is None:
        from isobox.seccomp.compile import compile_profile, library_path
        compiled = compile_profile(prof)
        prog = bpfcache.Program(prof, compiled.export_bpf(), compiled.skipped)
        lib = library_path()
        if lib:
            bpfcache.store(prog, lib)
    return prog


def _connect(path: str) -> _socket.socket:
    from isobox.init.channel import connect_unix
    return connect_unix(path, "the seccomp listener socket")


def _trap_dir(path: str) -> int:
    """An O_PATH fd of the trap socket's directory; fails now, at create, when the socket is
    missing (as connecting at once did)."""
    import stat
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.stat(os.path.basename(path), dir_fd=fd).st_mode):
            raise IsoboxError(f"cannot connect to the seccomp listener socket {path}: not a socket")
    except FileNotFoundError:
        os.close(fd)
        raise IsoboxError(f"cannot connect to the seccomp listener socket {path}: No such file or directory") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class _TrapDir:
    """The trap socket's directory (an O_PATH fd) until Installer.early() connects. It stands
    in Installer.conn meanwhile, so code that keeps the installer's connection open across a
    close of every other fd (init/container.listener_fds) keeps this fd instead."""
    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


class Installer:
    """Made before the process enters the container's mount namespace; loads the filter once.

    isoboxd's trap socket is connected late, in early(): the holder drops a connection that
    stays idle for seconds, and an init reaches become() only after the runtime has built its
    whole tree (seconds on a loaded host; in older orders, after `start`).
    Until then the installer holds only the socket's directory (an O_PATH fd taken while host
    paths resolve) and connects to the name relative to it just before credentials change:
    the process is then still host uid 0, the only peer the root-only socket accepts. A spec
    listenerPath is connected at once, as before."""

    def __init__(self, sec: Seccomp, host_pid: int | None = None):
        self.sec = sec
        self.conn: _socket.socket | _TrapDir | None = None
        if sec.compiled.uses_notify and sec.socket_path:
            self.conn = _TrapDir(_trap_dir(sec.trap_socket)) if sec.trap_socket else _connect(sec.socket_path)
        self.host_pid = _host_pid() if host_pid is None else host_pid
        self.done = False

    def keep_fds(self) -> list[int]:
        """What must stay open until the listener is sent."""
        return [self.conn.fileno()] if self.conn is not None else []

    def early(self, proc) -> None:
        """Called before credentials change: connects the trap socket, and loads now if the
        process will not be able to later."""
        self._connect_trap()
        if not (proc.no_new_privileges or proc.caps_effective >> CAP_SYS_ADMIN & 1):
            self()

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self._connect_trap()
            _load_and_send(self.sec, self.conn, self.host_pid)
            self.conn = None

    def _connect_trap(self) -> None:
        where = self.conn
        if not isinstance(where, _TrapDir):
            return
        self.conn = None
        here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # relative to the directory held since before the mount namespace changed: the
            # name need not resolve from the container's root
            os.fchdir(where.fd)
            conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
            try:
                conn.connect(os.path.basename(self.sec.trap_socket))
            except OSError:
                conn.close()
                raise
            self.conn = conn
        except OSError as e:
            raise IsoboxError(f"cannot connect to the seccomp listener socket {self.sec.trap_socket}: "
                              f"{e.strerror}") from None
        finally:
            os.fchdir(here)
            os.close(here)
            where.close()


def installer(sec: Seccomp | None, host_pid: int | None = None) -> Installer | None:
    return Installer(sec, host_pid) if sec is not None else None


def install(sec_or_spec, conn: _socket.socket | None = None, *, host_pid: int = 0, cid: str = "",
            trap_socket: str = "") -> None:
    """Loads a filter now, on the calling thread, and hands its listener fd over.

    sec_or_spec: a Seccomp from prepare(), or an OCI linux.seccomp dict (then compiled here).
    conn: an already connected socket for the listener fd; when None, the socket path is
    connected now (which must then resolve in the caller's current mount namespace)."""
    sec = sec_or_spec
    if not isinstance(sec, Seccomp):
        sec = prepare(sec_or_spec, cid=cid, trap_socket=trap_socket)
        if sec is None:
            return
    if conn is None and sec.compiled.uses_notify and sec.socket_path:
        conn = _connect(sec.socket_path)
    _load_and_send(sec, conn, host_pid)


def _load_and_send(sec: Seccomp, conn: _socket.socket | None, host_pid: int) -> None:
    try:
        if sec.trap_socket:
            newer.load()            # what libseccomp cannot name (setxattrat) is ENOSYS
        fd = sec.compiled.load()
        if fd < 0:
            return
        try:
            if conn is None:
                raise IsoboxError("seccomp: the filter has a listener but there is no socket to send it to")
            if sec.trap_socket:
                msg = {"type": "isobox-seccomp", "id": sec.cid, "key": sec.key, "pid": host_pid,
                       "nsPid": os.getpid(), "trapped": list(TRAPPED)}
            else:
                msg = {"ociVersion": OCI_VERSION, "fds": ["seccompFd"], "pid": host_pid,
                       "metadata": sec.listener_metadata,
                       "state": {"ociVersion": OCI_VERSION, "id": sec.cid, "status": "creating", "pid": host_pid,
                                 "bundle": sec.bundle, "annotations": sec.annotations}}
            try:
                conn.sendmsg([json.dumps(msg).encode()], rights([fd]))
            except OSError as e:
                raise IsoboxError(f"seccomp: cannot send the listener fd to {sec.socket_path}: {e.strerror}") from None
        finally:
            os.close(fd)       # the container must never hold its own listener
    finally:
        if conn is not None:
            conn.close()
