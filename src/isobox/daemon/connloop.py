"""One thread serving a listening unix socket, with bounded cost whatever its peers do.

isoboxd's sockets are root's only, but a bug or a flood must not cost the host a thread (or a
pid) per connection, nor end the serving loop. So a connection costs one fd and one entry
here: the loop accepts, checks the peer with SO_PEERCRED before reading a byte, gives each
connection `idle` seconds in all to deliver its request, and holds at most `cap` of them (a
new one evicts the oldest, which is the likeliest to be idle). A complete request is served
inline or by one of a fixed number of worker threads. No failure (accept's EMFILE, garbage,
an exception in a handler) ends the loop; only shutdown() does."""
from __future__ import annotations

import collections
import errno
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from typing import Callable

log = logging.getLogger("isoboxd")
ACCEPTS_PER_ROUND = 64          # then readable connections get their turn
COMPLAIN_EVERY = 10.0           # seconds between two log lines about refused peers
RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel recorded them at connect."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def host_root(cred: tuple[int, int, int]) -> bool:
    return cred[1] == 0


class Conn:
    """One accepted connection: what the protocol read so far, and when it must be done."""
    __slots__ = ("sock", "peer", "deadline", "buf", "request", "open")

    def __init__(self, sock: socket.socket, peer: tuple[int, int, int], deadline: float):
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.buf = bytearray()
        self.request: object = None      # what read() parsed, for serve()
        self.open = True                 # False once dropped (a later event of the round is stale)


class ConnLoop:
    """read(conn) -> True once conn holds a complete request (BlockingIOError: nothing yet;
    any other exception, or EOF reported by read as EOFError: the connection is dropped).
    serve(conn) answers it; the loop closes the socket afterwards. workers=0 serves inline
    (serve must not block), else on that many threads, fed through a queue of at most cap."""

    def __init__(self, listener: socket.socket, read: Callable[[Conn], bool], serve: Callable[[Conn], None], *,
                 name: str, cap: int, idle: float, workers: int = 0,
                 admit: Callable[[tuple[int, int, int]], bool] = host_root):
        self.listener = listener
        self.read, self.serve, self.admit = read, serve, admit
        self.name, self.cap, self.idle = name, cap, idle
        self.conns: collections.OrderedDict[int, Conn] = collections.OrderedDict()   # fd -> conn, oldest first
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._paused_until = 0.0           # accept paused (out of fds, nothing to evict)
        self._listening = False
        self._refused = 0
        self._complained = 0.0
        self.jobs: queue.Queue[Conn] | None = queue.Queue(maxsize=cap) if workers else None
        self.workers = workers
        self._workers_up = 0               # started (they never end)
        self._workers_retry = 0.0          # when to try again to start the missing ones

    # what server._orphaned uses (it once held a socketserver)
    def fileno(self) -> int:
        return self.listener.fileno()

    def shutdown(self) -> None:
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listen(True)
        logged = 0.0
        while not self.stopping:
            try:
                self._round()
            except Exception:  # noqa: BLE001 - the loop outlives anything one round meets
                if time.monotonic() - logged >= COMPLAIN_EVERY:      # the log is on tmpfs
                    log.exception("%s: serving loop error (continuing)", self.name)
                    logged = time.monotonic()
                time.sleep(0.05)          # never spin on an error that repeats
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.sel.close()
        for s in (self.listener, self._wake_r, self._wake_w):
            s.close()

    # -- one round --
    def _round(self) -> None:
        now = time.monotonic()
        if self._workers_up < self.workers and now >= self._workers_retry:
            self._start_workers()
        if not self._listening and now >= self._paused_until:
            self._listen(True)
        wait = self.conns[next(iter(self.conns))].deadline - now if self.conns else 1.0
        if not self._listening:
            wait = min(wait, self._paused_until - now)
        for key, _ in self.sel.select(max(0.0, min(wait, 1.0))):
            if key.data is None:
                self._accept()
            elif key.data == "wake":
                self._wake_r.recv(64)
            elif key.data.open:
                self._readable(key.data)
        self._expire(time.monotonic())

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self.sel.register(self.listener, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self.sel.unregister(self.listener)
        self._listening = on

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    # out of fds: make room, or stop polling the listener briefly (it stays
                    # readable, so polling it now would spin)
                    if not self._evict_oldest():
                        self._listen(False)
                        self._paused_until = time.monotonic() + 0.1
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            self._take(sock)

    def _take(self, sock: socket.socket) -> None:
        try:
            peer = peer_cred(sock)
            if not self.admit(peer):
                self._complain(peer)
                sock.close()
                return
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        while len(self.conns) >= self.cap:
            self._evict_oldest()
        conn = Conn(sock, peer, time.monotonic() + self.idle)
        self.conns[sock.fileno()] = conn
        try:
            self.sel.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError, KeyError):
            self._drop(conn)

    def _readable(self, conn: Conn) -> None:
        try:
            complete = self.read(conn)
        except (BlockingIOError, InterruptedError):
            return
        except Exception:  # noqa: BLE001 - EOF, garbage, a reset: this connection only
            self._drop(conn)
            return
        if not complete:
            return
        self._forget(conn)
        if self.jobs is None or not self._workers_up:
            self._serve(conn)              # inline (also while no worker could be started)
            return
        try:
            self.jobs.put_nowait(conn)
        except queue.Full:
            conn.sock.close()

    def _serve(self, conn: Conn) -> None:
        try:
            self.serve(conn)
        except Exception:  # noqa: BLE001 - a handler's failure costs its request, not the loop
            log.exception("%s: request from pid %d failed", self.name, conn.peer[0])
        finally:
            conn.sock.close()

    def _start_workers(self) -> None:
        """A thread that cannot start (pids exhausted) is retried a second later; meanwhile
        requests are served inline."""
        while self._workers_up < self.workers:
            try:
                threading.Thread(target=self._work, name=f"{self.name}-worker", daemon=True).start()
            except RuntimeError as e:
                log.warning("%s: cannot start a worker (%s), retrying in 1 s", self.name, e)
                self._workers_retry = time.monotonic() + 1.0
                return
            self._workers_up += 1

    def _work(self) -> None:
        assert self.jobs is not None
        while True:
            conn = self.jobs.get()
            try:
                conn.sock.settimeout(self.idle)       # the answer, too, has a deadline
            except OSError:
                pass
            self._serve(conn)

    # -- bookkeeping --
    def _expire(self, now: float) -> None:
        while self.conns:
            conn = self.conns[next(iter(self.conns))]
            if conn.deadline > now:
                return
            self._drop(conn)

    def _evict_oldest(self) -> bool:
        if not self.conns:
            return False
        self._drop(self.conns[next(iter(self.conns))])
        return True

    def _forget(self, conn: Conn) -> None:
        """Out of the loop's hands (the socket stays open)."""
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, conn: Conn) -> None:
        self._forget(conn)
        conn.open = False
        conn.sock.close()

    def _complain(self, peer: tuple[int, int, int]) -> None:
        """A refused peer: logged at most every COMPLAIN_EVERY seconds (the log is on tmpfs)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._complained >= COMPLAIN_EVERY:
            log.warning("%s: refused %d connection(s) from peers that are not host root (last: pid %d uid %d)",
                        self.name, self._refused, peer[0], peer[1])
            self._complained, self._refused = now, 0
