"""Engine sockets served by an isobox gate, as isobox-runc sees them at create.

The runtime's deny list refuses the engine sockets (/var/run/docker.sock, ...), but once
`isobox gate` serves that path, a container that binds it can only make the calls the gate
lets through (its policy, including the per-image API lists of [gate] socket_images). So a
bind of a socket served by a live gate is allowed, and dockerd's own socket behind it stays
refused.

The gate records what it serves in a root-only state file, STATE_DIR/<hash of listen>.json:
the listen path and the (st_dev, st_ino) of the socket file it created, the engine socket's
path and (st_dev, st_ino), its pid and the pid's start time. The runtime matches the
descriptor it is about to mount against those records (fstat of that very fd: a path swapped
after the check cannot change the verdict), then checks that the gate is still the process
that wrote the record and that something listens behind the fd.

Only socket binds come here, so the common create pays nothing; a socket bind costs a
directory listing, a few small reads and one connect.
"""
from __future__ import annotations

import _socket          # not `socket` (enum, selectors...) nor dataclasses: isobox-runc imports this
import json
import os
import stat
import struct

STATE_DIR = "/run/isobox/gate"     # below /run/isobox: denied to binds, root-only


class GateState:
    """One record. start: field 22 of /proc/<pid>/stat (a reused pid has another start time)."""
    __slots__ = ("listen", "dev", "ino", "engine", "engine_dev", "engine_ino", "pid", "start")

    def __init__(self, listen: str, dev: int, ino: int, engine: str, engine_dev: int, engine_ino: int,
                 pid: int, start: int) -> None:
        self.listen, self.dev, self.ino, self.engine = listen, dev, ino, engine
        self.engine_dev, self.engine_ino, self.pid, self.start = engine_dev, engine_ino, pid, start


def state_path(listen: str, state_dir: str | None = None) -> str:
    """One file per listen path: a restarted gate replaces its predecessor's record."""
    import hashlib          # the gate's side only: the runtime lists the directory instead
    digest = hashlib.sha256(os.path.abspath(listen).encode()).hexdigest()[:16]
    return os.path.join(state_dir or STATE_DIR, f"{digest}.json")


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: count fields after the last ")"
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


# --- the gate's side ------------------------------------------------------------------------

def record(listen: str, engine: str, state_dir: str | None = None) -> str:
    """Write this process's record for the socket it serves at `listen`; returns its path."""
    directory = state_dir or STATE_DIR
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)                    # an older, wider directory is narrowed
    lst, est = os.stat(listen), os.stat(engine)
    state = {"listen": os.path.abspath(listen), "dev": lst.st_dev, "ino": lst.st_ino,
             "engine": os.path.abspath(engine), "engine_dev": est.st_dev, "engine_ino": est.st_ino,
             "pid": os.getpid(), "start": start_time(os.getpid())}
    path = state_path(listen, directory)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.rename(tmp, path)                          # readers see the old record or the new one
    return path


def forget(path: str) -> None:
    """Remove the record at exit, unless another gate (a newer pid) has replaced it since."""
    st = _read(path)
    if st is not None and st.pid == os.getpid():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --- the runtime's side ----------------------------------------------------------------------

def _read(path: str) -> GateState | None:
    """A record, if it is a regular root-owned file nobody else may write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return None
        try:
            d = json.loads(f.read(65536))
            return GateState(str(d["listen"]), int(d["dev"]), int(d["ino"]), str(d["engine"]),
                             int(d["engine_dev"]), int(d["engine_ino"]), int(d["pid"]), int(d["start"]))
        except (ValueError, KeyError, TypeError):
            return None


def _states(state_dir: str) -> list[GateState]:
    """Every record in a root-owned, root-only directory (else none: anyone could forge one)."""
    try:
        dst = os.stat(state_dir, follow_symlinks=False)
    except OSError:
        return []
    if not stat.S_ISDIR(dst.st_mode) or dst.st_uid != 0 or dst.st_mode & 0o022:
        return []
    try:
        names = os.listdir(state_dir)
    except OSError:
        return []
    out = []
    for name in names:
        if name.endswith(".json"):
            st = _read(os.path.join(state_dir, name))
            if st is not None:
                out.append(st)
    return out


def _alive(state: GateState) -> bool:
    """The pid still runs, is the process that wrote the record (same start time), and is a gate."""
    if state.pid <= 0 or start_time(state.pid) != state.start:
        return False
    try:
        with open(f"/proc/{state.pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"gate" in args and b"--listen" in args


def _served_through(fd: int, state: GateState) -> bool:
    """Something listens behind the very descriptor to be mounted (connect through its
    /proc/self/fd link), and when its pid is visible from here, it is the gate's. (The builder
    runs in the container's PID namespace, where SO_PEERCRED reports 0 for a host process;
    the record's start time already ties the pid to the gate there.)"""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.settimeout(2)
        s.connect(f"/proc/self/fd/{fd}")
        pid = struct.unpack("3i", s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[0]
    except OSError:
        return False
    finally:
        s.close()
    return pid in (0, state.pid)


def classify(fd: int, st: os.stat_result, state_dir: str | None = None) -> tuple[str, GateState] | None:
    """For a socket descriptor: ("gate", record) if a live isobox gate serves it, ("engine",
    record) if it is the engine socket behind a live gate, else None."""
    if not stat.S_ISSOCK(st.st_mode):
        return None
    me = (st.st_dev, st.st_ino)
    for state in _states(state_dir or STATE_DIR):
        if me == (state.dev, state.ino):
            if _alive(state) and _served_through(fd, state):
                return "gate", state
        elif me == (state.engine_dev, state.engine_ino) and _alive(state):
            return "engine", state
    return None
