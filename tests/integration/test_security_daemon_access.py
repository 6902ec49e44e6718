"""Attacks on what isoboxd exposes on the host: its sockets, its database, the directories that
name containers, a container's FUSE nodes reached through a path, and floods of connections.

The attacker is a real unprivileged host user: a forked child that drops to uid/gid 4242 with
no supplementary groups (setresgid/setgroups/setresuid). The floods run as root, against the
one daemon of the host. Real isoboxd, real containers, real kernel checks; nothing mocked."""
from __future__ import annotations

import array
import errno
import json
import os
import resource
import select
import selectors
import socket
import sqlite3
import stat
import struct
import subprocess
import time

import pytest

from integration.test_isolation import privileged

from isobox.daemon import client, paths
from isobox.fileio import private_dir
from isobox.linux import syscalls as k

USER = 4242
MIB = 1 << 20
IDLE_LIMIT = 2.0        # what isoboxd gives an idle connection (fdstore.IDLE, server.REQUEST_IDLE)


# ------------------------------------------------------------------------------- helpers

def as_user(fn, before=None, uids=(USER, USER, USER), fsuid: int | None = None, timeout: float = 60):
    """fn()'s JSON-able result, computed in a forked child running as a host user.

    before() runs first, still as root (a private mount namespace, say). uids: the child's
    (real, effective, saved) uid; fsuid: then setfsuid() to this (0 with saved uid 0 passes the
    file-mode checks while SO_PEERCRED still reports the effective uid)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            if before is not None:
                before()
            os.setgroups([])
            os.setresgid(USER, USER, USER)
            os.setresuid(*uids)
            if fsuid is not None:
                k.setfsuid(fsuid)
            out = fn()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent, never raised in a fork
            out = {"child failed": repr(e)}
        finally:
            try:
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(code)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the child did not finish"
            if not select.select([r], [], [], left)[0]:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    out = json.loads(data)
    assert not (isinstance(out, dict) and "child failed" in out), out
    return out


def outcome(fn) -> str:
    """"ok: ..." when fn() succeeded, else the errno's name."""
    try:
        return "ok: " + repr(fn())[:120]
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
    except sqlite3.Error as e:
        return f"sqlite: {e}"


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def write(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def succeeded(results: dict) -> dict:
    return {what: res for what, res in results.items() if res.startswith("ok")}


def start(runtime, rootfs: str, edit=None) -> tuple[str, int]:
    b = runtime.bundle(rootfs, ["sh", "-c", "exec sleep 300 </dev/null >/dev/null 2>&1"], edit=edit)
    cid = runtime.new_id()
    runtime("run", "--detach", "--bundle", b, cid, check=True, timeout=60)
    return cid, json.loads(runtime("state", cid, check=True).stdout)["pid"]


def limited(spec: dict) -> None:
    privileged(spec)
    spec["linux"]["resources"] = {"memory": {"limit": 256 * MIB}}


def trap_answers(runtime, rootfs: str) -> None:
    """A new container's listener reached isoboxd: its trapped sysinfo (busybox free) reports
    its memory limit, not the host's (a listener nobody reads would hang it: the timeout)."""
    r = runtime.run(runtime.bundle(rootfs, ["sh", "-c", "free | awk '/^Mem:/{print $2}'"], edit=limited),
                    timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["262144"], (r.returncode, r.stdout, r.stderr)


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def pid_in(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def connect_many(path: str, n: int, kind: int = socket.SOCK_STREAM) -> list[socket.socket]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 512:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    out = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
            out.append(s)
            # blocking, but a full backlog nobody accepts from fails after 10 s (SO_SNDTIMEO:
            # a Python timeout would make the socket non-blocking, and connect then EAGAIN)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
            s.connect(path)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


def wait_all_closed(socks: list[socket.socket], within: float) -> list[socket.socket]:
    """The sockets the daemon has not closed after `within` seconds (EOF or reset counts)."""
    sel = selectors.DefaultSelector()
    open_ = set()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        open_.add(s)
    deadline = time.monotonic() + within
    try:
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    open_.discard(s)
    finally:
        sel.close()
    return list(open_)


def closed_within(s: socket.socket, seconds: float) -> bool:
    """The peer closed s (EOF) within seconds, without sending anything first."""
    s.settimeout(seconds)
    try:
        return s.recv(4096) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


# ------------------------------------------------------------------ a host user: sockets

def test_a_host_user_cannot_connect_to_any_isoboxd_socket(isoboxd):
    def probe() -> dict:
        def connect(path: str, kind: int):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.settimeout(3)
                s.connect(path)
                return "connected"
            finally:
                s.close()
        return {"registration": outcome(lambda: connect(paths.SOCKET, socket.SOCK_STREAM)),
                "trap": outcome(lambda: connect(paths.TRAP_SOCKET, socket.SOCK_STREAM)),
                "warm": outcome(lambda: connect(paths.WARM_SOCKET, socket.SOCK_SEQPACKET))}
    got = as_user(probe)
    assert not succeeded(got), got


def test_a_peer_that_is_not_root_gets_nothing_even_past_the_file_mode(isoboxd):
    """euid 4242 with fsuid 0 (saved uid 0) passes the sockets' file modes; SO_PEERCRED still
    names 4242, and every socket must drop such a peer at once, before reading a byte."""
    def probe() -> dict:
        out = {}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(3)
            s.connect(paths.SOCKET)
            s.sendall(b'{"op": "list"}\n')
            reply = s.recv(65536)
            out["registration"] = "ok: answered " + reply[:60].decode(errors="replace") if reply else "closed"
        except OSError as e:
            out["registration"] = errno.errorcode.get(e.errno, str(e))
        finally:
            s.close()
        for name, path, kind in (("trap", paths.TRAP_SOCKET, socket.SOCK_STREAM),
                                 ("warm", paths.WARM_SOCKET, socket.SOCK_SEQPACKET)):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.settimeout(3)
                s.connect(path)
                t0 = time.monotonic()
                out[name] = "closed" if closed_within(s, 1.0) else \
                    f"ok: still open after {time.monotonic() - t0:.1f}s"
            except OSError as e:
                out[name] = errno.errorcode.get(e.errno, str(e))
            finally:
                s.close()
        return out
    got = as_user(probe, uids=(USER, USER, 0), fsuid=0)
    assert not succeeded(got), got


# ------------------------------------------------------ a host user: files naming containers

def test_a_host_user_reads_no_registration_and_lists_no_container(isoboxd, reachable, busybox_rootfs):
    from conftest import Runtime
    from isobox.spec.config import key
    runtime = Runtime(os.path.join(reachable, "state"), reachable)
    try:
        cid, _ = start(runtime, busybox_rootfs)
        d = os.path.join(runtime.root, key(cid))
        files = [paths.DB, paths.DB + "-wal", paths.DB + "-shm", paths.INFLIGHT, paths.LOG,
                 "/var/lib/isobox/ids.db", "/var/lib/isobox/ids.db-wal", "/var/lib/isobox/ids.db-shm",
                 os.path.join(d, "state.json"), os.path.join(d, "config.json")]
        present = [f for f in files if os.path.exists(f)]
        assert paths.DB in present and os.path.join(d, "state.json") in present
        dirs = [paths.RUN_DIR, "/var/lib/isobox", paths.FS_ROOT, runtime.root, d]

        def probe() -> dict:
            out = {f"read {f}": outcome(lambda f=f: read(f)) for f in present}
            out.update({f"list {p}": outcome(lambda p=p: os.listdir(p)) for p in dirs})
            out["sqlite " + paths.DB] = outcome(lambda: sqlite3.connect(f"file:{paths.DB}?mode=ro", uri=True)
                                                .execute("SELECT key FROM containers").fetchall())
            return out
        got = as_user(probe)
        assert not succeeded(got), got
    finally:
        runtime.cleanup()


def test_files_naming_containers_are_root_only_whatever_the_umask_and_are_fixed_in_place(tmp_path, isoboxd):
    """Created 0600/0700 under umask 0, and an older installation's 0644 files and 0755
    directories (the database with its -wal and -shm) are made root-only when next opened."""
    from isobox.daemon.store import Store
    from isobox.ids.allocator import Allocator
    from isobox.lifecycle.state import ContainerState, StateStore

    def mode(p) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0)
    try:
        # the live daemon's
        assert mode(paths.RUN_DIR) == 0o700
        for f in (paths.DB, paths.DB + "-wal", paths.DB + "-shm"):
            if os.path.exists(f):
                assert mode(f) & 0o077 == 0, (f, oct(mode(f)))
        # a database left world-readable by an older server, WAL and all
        db = str(tmp_path / "isoboxd.db")
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        for f in (db, db + "-wal", db + "-shm"):
            os.chmod(f, 0o644)
        Store(db)
        assert {f: oct(mode(f)) for f in (db, db + "-wal", db + "-shm")} == \
            {f: "0o600" for f in (db, db + "-wal", db + "-shm")}
        conn.close()
        fresh = str(tmp_path / "fresh.db")
        Store(fresh)
        assert mode(fresh) == 0o600
        # the ID database: new, and an old one
        ids = tmp_path / "ids"
        Allocator(str(ids / "ids.db"), pool=(100000, 65536 * 4))
        assert mode(ids / "ids.db") == 0o600
        os.chmod(ids / "ids.db", 0o644)
        Allocator(str(ids / "ids.db"), pool=(100000, 65536 * 4))
        assert mode(ids / "ids.db") == 0o600
        # isobox-runc's state: the root, each container's directory and its files
        store = StateStore(str(tmp_path / "state"))
        store.reserve("c1")
        store.save(ContainerState(id="c1", bundle="/b", rootfs="/r"))
        store.save_config("c1", {"ociVersion": "1.2.0"})
        assert mode(store.root) == 0o700 and mode(store.dir("c1")) == 0o700
        assert mode(os.path.join(store.dir("c1"), "state.json")) == 0o600
        assert mode(os.path.join(store.dir("c1"), "config.json")) == 0o600
        # the run directory made by an older version
        run = tmp_path / "run"
        run.mkdir(0o755)
        private_dir(str(run))
        assert mode(run) == 0o700
    finally:
        os.umask(old)


# ---------------------------------------------------------- a host user: a container's nodes

def test_a_key_and_a_reachable_path_open_nothing_of_the_container(isoboxd, runtime, busybox_rootfs, reachable):
    """The key (root read it) and the container's node bound where the user can reach it, in a
    private mount namespace: its emulated files, /proc/sys reads and writes, listings."""
    cid, _ = start(runtime, busybox_rootfs)
    key = client.daemon_key(runtime.root, cid)
    node = os.path.join(reachable, "node")
    os.mkdir(node, 0o755)
    # what the user targets is really there, and the container itself still reads it
    assert read(f"{paths.FS_ROOT}/{key}/proc/sys/kernel/panic").strip().isdigit()
    r = runtime("exec", cid, "sh", "-c", "cat /proc/sys/kernel/panic && head -1 /proc/meminfo && ls /proc/sys/kernel",
                timeout=30)
    assert r.returncode == 0 and "MemTotal" in r.stdout, r.stderr

    def bind() -> None:
        k.unshare(k.CLONE_NEWNS)
        k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
        k.mount(f"{paths.FS_ROOT}/{key}", node, None, k.MS_BIND)

    def probe() -> dict:
        return {
            "list the node": outcome(lambda: os.listdir(node)),
            "list proc/sys": outcome(lambda: os.listdir(f"{node}/proc/sys")),
            "read proc/meminfo": outcome(lambda: read(f"{node}/proc/meminfo")),
            "read proc/uptime": outcome(lambda: read(f"{node}/proc/uptime")),
            "read emulated kernel/panic": outcome(lambda: read(f"{node}/proc/sys/kernel/panic")),
            "read namespaced kernel/hostname": outcome(lambda: read(f"{node}/proc/sys/kernel/hostname")),
            "write emulated kernel/panic": outcome(lambda: write(f"{node}/proc/sys/kernel/panic", b"7\n")),
            "write emulated vm/overcommit_memory": outcome(
                lambda: write(f"{node}/proc/sys/vm/overcommit_memory", b"1\n")),
            "write namespaced kernel/hostname": outcome(
                lambda: write(f"{node}/proc/sys/kernel/hostname", b"pwned\n")),
        }
    got = as_user(probe, before=bind)
    assert not succeeded(got), got
    assert read(f"{paths.FS_ROOT}/{key}/proc/sys/kernel/panic").strip() != b"7"


def test_the_fuse_root_names_no_container_to_a_host_user(isoboxd, runtime, busybox_rootfs, reachable):
    cid, _ = start(runtime, busybox_rootfs)
    key = client.daemon_key(runtime.root, cid)
    os.stat(f"{paths.FS_ROOT}/{key}")            # root looked it up: the kernel may cache the entry
    top = os.path.join(reachable, "fs")
    os.mkdir(top, 0o755)

    def bind() -> None:
        k.unshare(k.CLONE_NEWNS)
        k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
        k.mount(paths.FS_ROOT, top, None, k.MS_BIND)

    def probe() -> dict:
        return {"list the root": outcome(lambda: os.listdir(top)),
                "stat the key": outcome(lambda: os.stat(f"{top}/{key}").st_ino),
                "list the key": outcome(lambda: os.listdir(f"{top}/{key}")),
                "read through the key": outcome(lambda: read(f"{top}/{key}/proc/meminfo"))}
    got = as_user(probe, before=bind)
    assert not succeeded(got), got


# ------------------------------------------------------------------------- floods, as root

def test_idle_connections_to_the_trap_socket_cost_no_thread_and_are_dropped(isoboxd, runtime, busybox_rootfs):
    holder = pid_in(paths.HOLDER_PID)
    before = threads(holder)
    socks = connect_many(paths.TRAP_SOCKET, 3000)
    try:
        peak = threads(holder)
        for _ in range(5):
            time.sleep(0.1)
            peak = max(peak, threads(holder))
        assert peak <= before + 2, f"the holder went from {before} to {peak} threads for 3000 idle connections"
        trap_answers(runtime, busybox_rootfs)      # a create meanwhile: its listener is taken
        left = wait_all_closed(socks, IDLE_LIMIT + 5)
        assert not left, f"{len(left)} idle connections still open after {IDLE_LIMIT + 5}s"
    finally:
        for s in socks:
            s.close()
    assert threads(holder) <= before + 2
    trap_answers(runtime, busybox_rootfs)          # and serving goes on after the flood


def test_garbage_and_forged_messages_to_the_trap_socket_are_refused_without_harm(isoboxd, runtime, busybox_rootfs):
    cid, _ = start(runtime, busybox_rootfs)
    key = client.daemon_key(runtime.root, cid)

    def send(payload: bytes, nfds: int) -> tuple[bool, list[int]]:
        """(connection closed by the holder, read ends of the pipes whose write ends were sent)"""
        reads, writes = [], []
        for _ in range(nfds):
            r, w = os.pipe()
            reads.append(r)
            writes.append(w)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(paths.TRAP_SOCKET)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", writes))] if writes else []
            try:
                s.sendmsg([payload], anc)
            except BrokenPipeError:
                return True, reads
            return closed_within(s, 1.5), reads
        finally:
            s.close()
            for w in writes:
                os.close(w)

    def released(r: int) -> bool:
        """The holder closed its copy of the pipe's write end (the read end sees EOF)."""
        ready = select.select([r], [], [], 3)[0]
        return bool(ready) and os.read(r, 1) == b""

    cases = {
        "garbage": (os.urandom(1000), 0),
        "garbage with an fd": (b"\xff\xfe not json", 1),
        "forged message with a pipe for a listener": (json.dumps(
            {"type": "isobox-seccomp", "id": cid, "key": key, "pid": 1, "nsPid": 1}).encode(), 1),
        "a JSON list with fds": (b"[1, 2, 3]", 3),
        "many fds": (json.dumps({"type": "isobox-seccomp", "key": key}).encode(), 12),
        "oversized": (b"{" + b" " * (200 * 1024), 1),
    }
    report = {}
    for name, (payload, nfds) in cases.items():
        closed, reads = send(payload, nfds)
        try:
            report[name] = (closed, all(released(r) for r in reads))
        finally:
            for r in reads:
                os.close(r)
    assert report == {name: (True, True) for name in cases}, report
    trap_answers(runtime, busybox_rootfs)
    assert runtime("exec", cid, "true", timeout=30).returncode == 0


def test_idle_connections_to_the_registration_socket_cost_no_thread_and_are_dropped(isoboxd):
    server = pid_in(paths.SERVER_PID)
    before = threads(server)
    socks = connect_many(paths.SOCKET, 200)
    try:
        time.sleep(0.3)
        grown = threads(server) - before
        t0 = time.monotonic()
        assert client.call({"op": "ping"}, timeout=5)["ok"]
        assert time.monotonic() - t0 < 1.0, "a ping waited behind idle connections"
        assert grown <= 10, f"the server started {grown} threads for 200 idle connections"
        left = wait_all_closed(socks, IDLE_LIMIT + 5)
        assert not left, f"{len(left)} idle connections still open after {IDLE_LIMIT + 5}s"
    finally:
        for s in socks:
            s.close()
    # a bad request gets an error, a good one after it an answer
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect(paths.SOCKET)
        s.sendall(b"\xff{not json\n")
        assert json.loads(s.recv(65536))["ok"] is False
    finally:
        s.close()
    assert client.call({"op": "ping"})["ok"]


def test_idle_connections_to_the_warm_socket_hold_few_processes_and_are_dropped(isoboxd):
    holder = pid_in(paths.HOLDER_PID)

    def children(pid: int) -> list[int]:
        out = []
        for tid in os.listdir(f"/proc/{pid}/task"):     # a child belongs to the thread that forked it
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        return out

    def warm_worker() -> int:
        return next(p for p in children(holder) if b"isobox.daemon.warm" in read(f"/proc/{p}/cmdline"))

    worker = warm_worker()
    socks = connect_many(paths.WARM_SOCKET, 40, socket.SOCK_SEQPACKET)
    try:
        time.sleep(1.0)
        held = len(children(worker))
        assert held <= 20, f"the warm worker holds {held} processes for 40 idle connections"
        left = wait_all_closed(socks, 15)
        assert not left, f"{len(left)} idle connections still open after 15s"
    finally:
        for s in socks:
            s.close()
    assert client.warm_worker_answers()


def test_a_container_started_long_after_its_create_still_hands_its_listener_in(isoboxd, runtime, busybox_rootfs):
    """Short idle limits must not cost the legitimate client: an engine may start a container
    long after creating it (docker create; docker start), and its init hands the listener in
    only then, so it may not hold a connection open across the wait."""
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "free | awk '/^Mem:/{print $2}'"], edit=limited)
    cid = runtime.new_id()
    out = os.path.join(runtime.tmp, "out")
    with open(out, "w") as f:     # the init keeps create's stdio: a file, not a pipe
        subprocess.run([*runtime_cmd(runtime), "create", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                       stdout=f, stderr=f, timeout=60, check=True)
    time.sleep(max(IDLE_LIMIT, 5.0) + 1.5)      # longer than any idle limit, old (5 s) or new
    r = runtime("start", cid, timeout=30)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while json.loads(runtime("state", cid, check=True).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline, "the container did not finish"
        time.sleep(0.1)
    with open(out) as f:
        assert f.read().split() == ["262144"]


def runtime_cmd(runtime) -> list[str]:
    from conftest import RUNC
    return [*RUNC, "--root", runtime.root]


# ------------------------------------------------ a serving loop under resource exhaustion

def _pids_cgroup() -> str | None:
    """A new pids cgroup directory for one process (v1 pids hierarchy, or v2 with pids
    delegated from the root), or None when the host has neither."""
    from isobox.cgroups.layout import detect
    h = detect().hierarchy("pids")
    if h is None:
        return None
    if h.version == 2:
        try:
            with open(os.path.join(h.mountpoint, "cgroup.subtree_control")) as f:
                if "pids" not in f.read().split():
                    return None
        except OSError:
            return None
    d = os.path.join(h.mountpoint, f"isobox-test-{os.getpid()}-{time.monotonic_ns()}")
    os.mkdir(d)
    return d


def test_the_trap_loop_outlives_a_process_that_can_start_no_thread_and_open_few_fds(tmp_path):
    """The holder's trap loop (FdStore.serve_trap) in a process whose pids cgroup allows no
    new task and whose fd limit is 32: a flood (accept's EMFILE), garbage and idle peers must
    not end it. It used to start a thread per connection, and a failed start ended it."""
    cg = _pids_cgroup()
    if cg is None:
        pytest.skip("no pids cgroup to confine the loop in")
    path = str(tmp_path / "trap.sock")
    pid = os.fork()
    if pid == 0:
        try:
            # a daemon's own fds only: pytest's (dozens after a long run) would fill the 32
            # slots below the limit before the loop opened any
            from isobox.linux.sealed import close_all_but
            close_all_but((0, 1, 2))
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            with open(os.path.join(cg, "pids.max"), "w") as f:
                f.write("1")                       # this task: no thread, no fork
            resource.setrlimit(resource.RLIMIT_NOFILE, (32, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            from isobox.daemon.fdstore import FdStore
            FdStore().serve_trap(path)
        finally:
            os._exit(3)
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "the loop did not bind"
            time.sleep(0.02)
        socks = connect_many(path, 100)
        for s in socks[-10:]:
            try:
                s.sendall(b"garbage without a listener")
            except (BrokenPipeError, ConnectionResetError):
                pass                               # already evicted to make room: fine too
        left = wait_all_closed(socks, IDLE_LIMIT + 5)
        assert not left, f"{len(left)} connections still open"
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the serving process ended"
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(late)
        late.connect(path)                         # refused if nobody listens any more
        t0 = time.monotonic()
        assert closed_within(late, IDLE_LIMIT + 3), "a new connection was not served"
        assert time.monotonic() - t0 >= IDLE_LIMIT * 0.5, "dropped before its idle limit"
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the serving process ended"
    finally:
        for s in socks:
            s.close()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.1)
