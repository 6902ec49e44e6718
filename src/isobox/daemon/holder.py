"""isoboxd's holder: the process that owns the FUSE connection and keeps the server alive.

Locked FUSE mounts inside containers can never be unmounted or replaced, so the /dev/fuse
connection behind them must outlive any server process. The holder opens /dev/fuse, mounts
FS_ROOT, and runs the server as its child with the fd inherited; when the server dies
(crash, kill -9, upgrade: SIGHUP) it starts a new one on the same fd, which asks the kernel
to resend what was in flight. The holder does nothing else, so there is little in it to
crash. It is never the parent of a container's processes."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from isobox.daemon import paths
from isobox.daemon.fdstore import FdStore
from isobox.fileio import atomic_write, private_dir, read_text
from isobox.linux import syscalls as k

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SERVICE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def detach_old_mount() -> bool:
    """Detaches /run/isobox/fs left by a holder that died (kill -9). Its connection died with
    it, or lives on only in an orphaned server for containers bound to it; a dead mount
    answers ENOTCONN to stat, so this comes before anything looks at the directory."""
    if not _mounted(paths.FS_ROOT):
        return False
    try:
        k.umount2(paths.FS_ROOT, k.MNT_DETACH)
        return True
    except OSError:
        return False    # hidden under another mount (a private /run/isobox): nothing to undo here


def _mount(fd: int) -> None:
    detach_old_mount()
    os.makedirs(paths.FS_ROOT, 0o711, exist_ok=True)
    k.mount("isoboxd", paths.FS_ROOT, "fuse.isoboxd", k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC,
            f"fd={fd},rootmode=40711,user_id=0,group_id=0,allow_other,default_permissions")


def _own_cgroup() -> object | None:
    """Leaves the caller's cgroup (an engine's shim, a test) for /isoboxd in every hierarchy,
    so stopping whoever started us does not stop the daemon."""
    try:
        from isobox.cgroups.layout import detect
        from isobox.cgroups.manager import ContainerCgroup
        cg = ContainerCgroup(detect(), paths.CGROUP)
        if not cg.exists():
            cg.create({})
        cg.add(os.getpid())
        return cg
    except Exception as e:  # noqa: BLE001 - a daemon in the caller's cgroup still works
        print(f"isoboxd: staying in the caller's cgroup: {e}", file=sys.stderr)
        return None


def _leave_cgroup(cg) -> None:
    if cg is None:
        return
    for h in cg.layout.hierarchies:
        try:
            with open(os.path.join(h.mountpoint, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            os.rmdir(cg._host_dir(h))
        except OSError:
            pass


def _hold_ids_db():
    """An idle connection to the ID database, kept for the holder's life. In WAL mode the last
    connection to close checkpoints the WAL into the database with an fsync (about 2 ms here);
    every isobox-runc call opens and closes its own, so without another one open, each create
    paid that twice and each delete once. None when the database does not exist yet."""
    from isobox.ids.allocator import DEFAULT_DB
    if not os.path.exists(DEFAULT_DB):
        return None
    import sqlite3
    try:
        conn = sqlite3.connect(f"file:{DEFAULT_DB}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()    # opens the WAL index
        return conn
    except sqlite3.Error as e:
        print(f"isoboxd: not holding the ID database open: {e}", file=sys.stderr)
        return None


def python_command(module: str) -> list[str]:
    """Runs module.main() in a fresh interpreter. -I: no user site, no environment; the
    sys.path is passed on explicitly (the wrappers run with -S). It is the one `isobox daemon
    --reload` last wrote, so a checkout installed from a new place is what the next server
    and worker import; the holder itself keeps its own code."""
    try:
        with open(paths.CODE_PATH) as f:
            path = [str(p) for p in json.load(f)]
    except (OSError, ValueError, TypeError):
        path = sys.path
    boot = f"import sys; sys.path[:0] = {path!r}; from {module} import main; main()"
    return [sys.executable, "-I", "-c", boot]


def publish_code_path() -> None:
    """Records this process's sys.path as the one new servers and workers import from."""
    atomic_write(paths.CODE_PATH, json.dumps(sys.path), mode=0o600)


def run() -> int:
    private_dir(paths.RUN_DIR)       # root's only, also when an older version made it 0755
    lock = os.open(paths.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"isoboxd: already running (pid {read_text(paths.HOLDER_PID, '?')})", file=sys.stderr)
        return 1
    stop = False
    child: subprocess.Popen | None = None
    warm: list[subprocess.Popen] = []        # the warm worker (daemon/warm.py), once started

    def terminate(p: subprocess.Popen | None) -> None:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)

    def on_stop(_sig, _frame) -> None:
        nonlocal stop
        stop = True
        terminate(child)
        terminate(warm[-1] if warm else None)

    def on_hup(_sig, _frame) -> None:       # upgrade: a new server takes over the connection
        terminate(child)
        terminate(warm[-1] if warm else None)      # and a new worker imports the new code

    for s in STOP_SIGNALS:
        signal.signal(s, on_stop)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])     # inherited blocks would make us unstoppable
    signal.signal(signal.SIGHUP, on_hup)
    cg = _own_cgroup()
    fuse = os.open("/dev/fuse", os.O_RDWR)   # inherited by each server
    for stale in (paths.DB, paths.DB + "-wal", paths.DB + "-shm", paths.SOCKET, paths.INFLIGHT):
        try:
            os.unlink(stale)                  # a new connection: old node ids mean nothing
        except FileNotFoundError:
            pass
    _mount(fuse)
    ids_db = _hold_ids_db()  # noqa: F841 - held open on purpose (see _hold_ids_db)
    store = FdStore()
    threading.Thread(target=store.serve_trap, args=(paths.TRAP_SOCKET,), daemon=True).start()
    atomic_write(paths.HOLDER_PID, str(os.getpid()))
    publish_code_path()
    log = os.open(paths.LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def supervise_warm() -> None:
        """Keeps the warm worker running (restarted when it dies or on SIGHUP)."""
        while not stop:
            started = time.monotonic()
            warm.append(subprocess.Popen(python_command("isobox.daemon.warm"), env={"PATH": SERVICE_PATH},
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log))
            if stop:                           # a stop signal that came before the append
                terminate(warm[-1])
            warm[-1].wait()
            del warm[:-1]
            if time.monotonic() - started < 1 and not stop:
                time.sleep(1)                  # a worker that cannot start: do not spin

    threading.Thread(target=supervise_warm, daemon=True).start()
    generation, quick_deaths = 0, 0
    try:
        while not stop:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = {"ISOBOXD_FUSE_FD": str(fuse), "ISOBOXD_GENERATION": str(generation),
                   "ISOBOXD_CHANNEL_FD": str(theirs.fileno()), "PATH": SERVICE_PATH}
            started = time.monotonic()
            child = subprocess.Popen(python_command("isobox.daemon.server"), pass_fds=(fuse, theirs.fileno()), env=env,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            theirs.close()
            store.attach(mine)
            threading.Thread(target=store.serve_channel, args=(mine,), daemon=True).start()
            while True:
                try:
                    child.wait()
                    break
                except InterruptedError:
                    continue
            with store.lock:
                store.channel = None
            mine.close()
            generation += 1
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < 1 else 0
            if quick_deaths >= 5 and not stop:
                time.sleep(1)                 # a server that cannot start: do not spin
    finally:
        try:
            k.umount2(paths.FS_ROOT, k.MNT_DETACH)
        except OSError:
            pass
        terminate(warm[-1] if warm else None)
        for f in (paths.HOLDER_PID, paths.CODE_PATH, paths.SERVER_PID, paths.SOCKET, paths.TRAP_SOCKET, paths.WARM_SOCKET):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
        _leave_cgroup(cg)
    return 0




def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
