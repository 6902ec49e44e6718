"""isobox-runc's side of isoboxd: start it when it is not running, register, unregister.

Imported on every create and delete, so only socket, json and os."""
from __future__ import annotations

from isobox import jsonfast as json  # json without its import cost (see jsonfast)
import os
import _socket
import time

from isobox.daemon import paths
from isobox.errors import IsoboxError

START_TIMEOUT = 10.0


def call(req: dict, timeout: float = 5.0) -> dict:
    """One request, one reply (JSON lines). Raises OSError when the server is not reachable."""
    # _socket, not socket.py: the latter imports enum, selectors... (~4 ms per runtime call)
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(paths.SOCKET)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("isoboxd closed the connection")
            buf += chunk
    finally:
        s.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise IsoboxError(f"isoboxd: {reply.get('error', 'request refused')}")
    return reply


def running() -> bool:
    try:
        call({"op": "ping"}, timeout=2.0)
        return True
    except OSError:
        return False


def warm_worker_answers() -> bool:
    """The warm worker (daemon/warm.py) accepts calls on its socket."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        s.settimeout(2.0)
        s.connect(paths.WARM_SOCKET)
        return True
    except OSError:
        return False
    finally:
        s.close()


def holder_alive() -> bool:
    """The holder holds an exclusive flock on LOCK while it lives."""
    import fcntl
    try:
        fd = os.open(paths.LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def start_detached() -> None:
    """Starts the holder in its own session with no inherited stdio or fds (it moves itself
    into its own cgroup), and returns at once; the caller waits for the socket."""
    from isobox.daemon.holder import python_command
    cmd = python_command("isobox.daemon.holder")
    pid = os.fork()
    if pid == 0:
        try:
            # the caller (a foreground `run`) may hold signals blocked: a daemon must not inherit that
            import signal
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 65536)
            os.chdir("/")
            os.execve(cmd[0], cmd, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


def ensure_running() -> None:
    if running():
        return
    if not holder_alive():
        start_detached()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if running():
            return
        time.sleep(0.02)
    raise IsoboxError(f"isoboxd did not start within {START_TIMEOUT:g}s; see {paths.LOG}, "
                      f"or run `isobox daemon` in the foreground")


def daemon_key(root: str, cid: str) -> str:
    """The container's directory name below FS_ROOT: unique across state roots (containerd
    namespaces may reuse an id), readable, and short enough for any valid id."""
    try:
        from _sha256 import sha256         # hashlib loads OpenSSL: ~5 ms of every runtime call
    except ImportError:
        from hashlib import sha256
    digest = sha256(f"{os.path.abspath(root)}\0{cid}".encode()).hexdigest()[:12]
    return f"{cid[:64]}.{digest}"


def register(key: str, cid: str, uid_base: int, gid_base: int, cgroups: dict[str, str],
             masked: list[str] = (), readonly: list[str] = ()) -> str:
    """Registers a container; returns its directory below FS_ROOT. masked, readonly: the
    spec's paths under /proc and /sys, which new proc and sysfs mounts inside get too."""
    ensure_running()
    call({"op": "register", "key": key, "id": cid, "uid_base": uid_base, "gid_base": gid_base,
          "cgroups": cgroups, "masked": [p for p in masked if p.startswith(("/proc/", "/sys/"))],
          "readonly": [p for p in readonly if p.startswith(("/proc/", "/sys/"))]})
    return f"{paths.FS_ROOT}/{key}"


def set_init(key: str, pid: int, start: int, storage: dict | None = None) -> None:
    """The init's pid once create finished, and the container's storage (mounts/storage.py):
    where set-id files may be made."""
    call({"op": "set_init", "key": key, "init_pid": pid, "init_start": start, "storage": storage or {}})


def unregister(key: str) -> None:
    """Best effort: a server that is down forgets dead containers on its own (its GC)."""
    try:
        call({"op": "unregister", "key": key}, timeout=2.0)
    except (OSError, IsoboxError):
        pass
