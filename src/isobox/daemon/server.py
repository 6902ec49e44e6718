"""isoboxd's server: the FUSE workers, the registration socket and the background threads.

Started (and restarted) by the holder with the /dev/fuse fd inherited. Generation 0
answers the kernel's INIT; a later generation adopts the live connection and asks the
kernel to resend the requests its predecessor had read but not answered."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time

from isobox.daemon import paths
from isobox.daemon.fs import proto
from isobox.daemon.fs.context import Container, boottime
from isobox.daemon.fs.membership import in_container
from isobox.daemon.fs.filesystem import FRESH, Filesystem
from isobox.daemon.fs.loop import Loop, init_reply
from isobox.daemon.fdstore import recv_fd
from isobox.daemon.store import Store
from isobox.fileio import atomic_write, private_dir, read_text
from isobox.ids.procinfo import proc_starttime
from isobox.daemon.syscalls.notify import Notifier


WORKERS = 4
GC_EVERY = 5.0
REQUEST_IDLE = 2.0          # seconds a registration connection has to send its line
REQUEST_CAP = 64            # open registration connections; more evict the oldest
REQUEST_WORKERS = 4         # threads answering registration requests
MAX_REQUEST = 1 << 20
log = logging.getLogger("isoboxd")


class Server:
    def __init__(self, fuse_fd: int, generation: int):
        self.fd = fuse_fd
        self.generation = generation
        self.store = Store(paths.DB)
        self.fs = Filesystem(self.store, lambda b: os.write(self.fd, b), allow_push=_allow_push())
        from isobox.daemon.fs.loadavg import LoadTracker
        self.fs.loads = LoadTracker()
        self.loop = Loop(fuse_fd, self.fs)
        self.channel = socket.socket(fileno=int(os.environ["ISOBOXD_CHANNEL_FD"])) \
            if os.environ.get("ISOBOXD_CHANNEL_FD") else None
        self.sock = None                        # the registration socket's server, once bound
        self.orphan = False                     # the holder died: see _orphaned
        from isobox.daemon.syscalls import audit, registry
        handlers = registry.load()
        si = sys.modules.get("isobox.daemon.syscalls.sysinfo")
        if si is not None:
            si.LOADS = self.fs.loads          # sysinfo's loads are /proc/loadavg's
        from isobox.daemon.syscalls.inflight import Inflight
        self.audit = audit.Audit(paths.AUDIT_LOG)
        self.notifier = Notifier(handlers, self.audit.add, self._listener_gone, slow=frozenset(registry.SLOW),
                                 inflight=Inflight(paths.INFLIGHT), on_idle=self.audit.flush)

    # -- seccomp listeners lent by the holder --
    def receive_listeners(self) -> None:
        while True:
            try:
                msg, fd, _pid = recv_fd(self.channel)
            except OSError:
                msg, fd = b"", None
            if not msg:
                self._orphaned()  # the holder is gone
                return
            if fd is None:
                continue
            meta = json.loads(msg)
            c = self._owner(meta)
            if c is None:
                log.warning("refusing a seccomp listener from pid %s: not a process of container key %r",
                            meta.get("peer"), meta.get("key"))
                os.close(fd)
                self._listener_gone(meta.get("slot", ""))
                continue
            self.notifier.add(fd, meta["slot"], c)

    def _orphaned(self) -> None:
        """The holder died (kill -9): nobody restarts this server and no new listener can reach
        it. It keeps serving the containers it has (their mounts are bound to this connection
        for good) but gives up the registration socket, so the next create starts a fresh
        daemon; it exits when its last container is gone (gc)."""
        log.warning("the holder is gone: serving the %d running containers until they end", len(self.fs.by_idx))
        self.orphan = True
        for path in (paths.SOCKET, paths.SERVER_PID):
            try:
                if path == paths.SOCKET and self.sock is not None:
                    if os.stat(path).st_ino != os.fstat(self.sock.fileno()).st_ino:
                        continue               # already a newer daemon's
                elif path == paths.SERVER_PID and read_text(path).strip() != str(os.getpid()):
                    continue
                os.unlink(path)
            except (OSError, ValueError):
                pass
        if self.sock is not None:
            self.sock.shutdown()

    def _owner(self, meta: dict):
        """The registered container the listener's sender belongs to, by its cgroup."""
        idx = self.fs.by_key.get(str(meta.get("key", "")))
        if idx is None:
            return None
        c = self.fs.by_idx[idx]
        return c if in_container(int(meta.get("peer", 0)), c) else None

    def _listener_gone(self, slot: str) -> None:
        if self.channel is not None and slot:
            try:
                self.channel.send(b"drop " + slot.encode())
            except OSError:
                pass

    # -- requests on the registration socket --
    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "generation": self.generation}
        if op == "register":
            c = Container(key=req["key"], id=req["id"], uid_base=int(req["uid_base"]), gid_base=int(req["gid_base"]),
                          cgroups=dict(req["cgroups"]), created=boottime(),
                          masked=[str(m) for m in req.get("masked", ())],
                          readonly=[str(m) for m in req.get("readonly", ())])
            self.fs.unregister(c.key)          # a stale entry of a container that reused the id
            self.fs.register(c)
            return {"ok": True, "dir": f"{paths.FS_ROOT}/{c.key}"}
        if op == "set_init":
            idx = self.fs.by_key.get(req["key"])
            if idx is None:
                return {"ok": False, "error": f"container {req['key']} is not registered"}
            c = self.fs.by_idx[idx]
            c.init_pid, c.init_start = int(req["init_pid"]), int(req.get("init_start", 0))
            c.storage = {k: [int(v) for v in req.get("storage", {}).get(k, ())]
                         for k in ("private_devs", "private_mounts", "host_devs")}
            self.fs.save(c)
            return {"ok": True}
        if op == "unregister":
            return {"ok": True, "found": self.fs.unregister(req["key"])}
        if op == "list":
            return {"ok": True, "containers": [c.__dict__ for c in self.fs.by_idx.values()]}
        if op == "stats":
            return {"ok": True, "containers": len(self.fs.by_idx), "rss_kib": _rss_kib(),
                    "snapshots": len(self.fs.snaps), "listeners": len(self.notifier.listeners)}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def serve_socket(self) -> None:
        """The registration socket: root's only (0600 in root's 0700 RUN_DIR, and every peer's
        SO_PEERCRED uid must be 0). One selector thread reads each request (one JSON line within
        REQUEST_IDLE seconds) and REQUEST_WORKERS threads answer: an idle connection costs an fd,
        never a thread, and no failure ends the loop (a socket that cannot be bound is retried)."""
        from isobox.daemon.connloop import ConnLoop
        from isobox.daemon.fdstore import bind_private
        while not self.orphan:
            try:
                private_dir(paths.RUN_DIR)    # a reload tightens an older installation in place
                listener = bind_private(paths.SOCKET, socket.SOCK_STREAM)
                self.sock = ConnLoop(listener, _read_request, self._answer, name="registration socket",
                                     cap=REQUEST_CAP, idle=REQUEST_IDLE, workers=REQUEST_WORKERS)
                if self.orphan:               # _orphaned ran before there was a loop to stop
                    self.sock.shutdown()
                self.sock.serve_forever()
            except Exception:  # noqa: BLE001
                log.exception("registration socket: cannot serve %s, retrying", paths.SOCKET)
                time.sleep(1)

    def _answer(self, conn) -> None:
        try:
            reply = self.handle(json.loads(conn.request))
        except Exception as e:  # noqa: BLE001 - a bad request gets an answer, not a crash
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        conn.sock.sendall(json.dumps(reply).encode() + b"\n")

    # -- background --
    def notifier_thread(self) -> None:
        while True:
            time.sleep(FRESH / 2)
            self.fs.sweep()

    def gc(self) -> None:
        """Forgets containers whose init is gone (a runtime killed between create and delete
        never unregisters) and samples the load averages."""
        while True:
            time.sleep(GC_EVERY)
            try:
                for c in list(self.fs.by_idx.values()):
                    if _dead(c):
                        log.info("forgetting container %s: its init is gone", c.id)
                        self.fs.unregister(c.key)
                if self.orphan and not self.fs.by_idx:
                    log.info("orphaned server: no container left, exiting")
                    os._exit(0)
                self.fs.loads.sample()
            except Exception:  # noqa: BLE001
                log.exception("gc")

    def run(self) -> None:
        if self.generation == 0:
            self._init()
        for _ in range(WORKERS):
            threading.Thread(target=self._worker, daemon=True).start()
        if self.generation > 0:
            # requests the previous server read but never answered are queued again
            try:
                os.write(self.fd, proto.notify(proto.NOTIFY_RESEND, b""))
            except OSError as e:
                log.warning("resend failed (kernel older than 6.9?): %s", e)
        targets = [self.notifier_thread, self.gc, self.serve_socket, self.notifier.serve]
        if self.channel is not None:
            targets.append(self.receive_listeners)
        for target in targets:
            threading.Thread(target=target, daemon=True).start()
        atomic_write(paths.SERVER_PID, str(os.getpid()))
        log.info("serving generation %d with %d containers", self.generation, len(self.fs.by_idx))
        # every thread above was started with SIGTERM blocked (main()), so only this one takes
        # it and its wait is interrupted at once (see main())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        self.loop.stopped.wait()

    def _init(self) -> None:
        while True:
            req = os.read(self.fd, proto.READ_BUFFER)
            _len, op, unique = proto.IN_HEADER.unpack_from(req)[:3]
            if op == proto.INIT:
                out, minor = init_reply(unique, req[proto.IN_HEADER.size:])
                os.write(self.fd, out)
                log.info("FUSE protocol 7.%d", minor)
                return
            os.write(self.fd, proto.error(unique, 5))

    def _worker(self) -> None:
        try:
            self.loop.serve()
        except Exception:  # noqa: BLE001
            log.exception("worker died")
            self.loop.stopped.set()


def _read_request(conn) -> bool:
    """One JSON line (or whatever came before EOF); True once it is complete."""
    chunk = conn.sock.recv(65536)
    if not chunk:
        if not conn.buf:
            raise EOFError("closed without a request")
        conn.request = bytes(conn.buf)
        return True
    conn.buf += chunk
    end = conn.buf.find(b"\n")
    if end >= 0:
        conn.request = bytes(conn.buf[:end + 1])
        return True
    if len(conn.buf) > MAX_REQUEST:
        raise ValueError("request too long")
    return False


def _dead(c: Container) -> bool:
    """The container's init is gone: exited (a zombie too), or its pid now names another
    process."""
    if c.init_pid <= 0:
        return boottime() - c.created > 120       # create never finished
    start = proc_starttime(c.init_pid)
    return start is None or (bool(c.init_start) and start != c.init_start)


def _allow_push() -> bool:
    try:
        from isobox.policy import model
        return model.load().sysctl_max_push
    except Exception:  # noqa: BLE001 - an unreadable policy means the safe default
        return False


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0



def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s isoboxd[%(process)d] %(levelname)s %(message)s")
    at_term: list = []

    def on_term(*_) -> None:
        for fn in at_term:          # audit lines still buffered (at most FLUSH_EVERY of them)
            try:
                fn()
            except Exception:  # noqa: BLE001 - stopping must not fail
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    # Python runs handlers in the main thread only. A SIGTERM that a FUSE or notify thread
    # took would wait until the main thread next woke up (seconds: an upgrade's SIGHUP took
    # 10 s). Blocked here, every thread started from now on inherits the block; run()
    # unblocks it in the main thread once they are all started.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    # A thread busy with one container's flood of trapped calls would otherwise keep the GIL
    # for 5 ms slices, and every other container's call would wait that long (the fairness
    # the issue measures): hand it over every 0.2 ms.
    sys.setswitchinterval(0.0002)
    fd = int(os.environ["ISOBOXD_FUSE_FD"])
    server = Server(fd, int(os.environ.get("ISOBOXD_GENERATION", "0")))
    at_term.append(server.audit.flush)
    server.run()
    # the connection is gone (unmounted): tell the holder not to restart us
    os.kill(os.getppid(), signal.SIGTERM)
