"""seccomp user-notify: receive, answer, and the loop that serves every container's listener.

One epoll thread receives from all listeners. It takes one notification per ready listener
per round, so a container that floods one syscall cannot starve another container (the
fairness the issue measures). Fast handlers (refusals, sysinfo, continues) run inline in
that thread; handlers marked slow (they fork helpers or mount) run on a small pool that is
fair between containers too (fairpool.py: a queue per container, served round robin)."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import threading
import time

from isobox.daemon.syscalls.call import Call, Verdict
from isobox.daemon.syscalls.fairpool import FairPool

log = logging.getLogger("isoboxd")

# include/uapi/linux/seccomp.h
NOTIF = struct.Struct("<QIIiIQ6Q")        # id pid flags | seccomp_data: nr arch instruction_pointer args[6]
NOTIF_RESP = struct.Struct("<QqiI")       # id val error flags
ADDFD = struct.Struct("<QIIII")           # id flags srcfd newfd newfd_flags


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


SECCOMP_IOCTL_NOTIF_RECV = _ioc(3, 0, NOTIF.size)
SECCOMP_IOCTL_NOTIF_SEND = _ioc(3, 1, NOTIF_RESP.size)
SECCOMP_IOCTL_NOTIF_ID_VALID = _ioc(1, 2, 8)
SECCOMP_IOCTL_NOTIF_ADDFD = _ioc(1, 3, ADDFD.size)
SECCOMP_IOCTL_NOTIF_SET_FLAGS = _ioc(1, 4, 8)
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2


def recv(listener: int) -> bytes | None:
    """One raw struct seccomp_notif, or None when the caller went away meanwhile (ENOENT)."""
    buf = bytearray(NOTIF.size)
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINTR):
            return None
        raise
    return bytes(buf)


def sync_wake_up(listener: int, on: bool = True) -> bool:
    """SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (Linux 6.6): the kernel wakes the caller on the
    CPU that answers it, so a caller and isoboxd hand over on one CPU instead of waking a
    sleeping one (in a VM, an exit to the hypervisor): it halves a lone caller's round trip
    here. False on older kernels, which then simply wake as usual."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP if on else 0)
        return True
    except OSError:
        return False


def id_valid(listener: int, cookie: int) -> bool:
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("<Q", cookie))
        return True
    except OSError:
        return False


def send(listener: int, cookie: int, v: Verdict) -> None:
    if v.kind == "answered":
        return                  # the handler's ADDFD with FLAG_SEND was the answer
    if v.kind == "continue":
        resp = NOTIF_RESP.pack(cookie, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    elif v.kind == "error":
        resp = NOTIF_RESP.pack(cookie, 0, -v.errno, 0)
    else:
        resp = NOTIF_RESP.pack(cookie, v.value, 0, 0)
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, resp)
    except OSError as e:
        if e.errno != errno.ENOENT:        # ENOENT: the caller was killed meanwhile
            raise


def add_fd(listener: int, cookie: int, fd: int, cloexec: bool) -> int:
    """Installs fd in the caller and makes it the syscall's return value, atomically
    (SECCOMP_ADDFD_FLAG_SEND, Linux 5.14): for opens performed on the caller's behalf."""
    flags = os.O_CLOEXEC if cloexec else 0
    # a mutable buffer: only then does fcntl.ioctl return the ioctl's result (the new fd)
    buf = bytearray(ADDFD.pack(cookie, SECCOMP_ADDFD_FLAG_SEND, fd, 0, flags))
    return fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, buf, True)


def decode(raw: bytes) -> tuple[int, int, int, int, tuple[int, ...]]:
    """(cookie, pid, nr, arch, args)."""
    cookie, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack(raw)
    return cookie, pid, nr, arch, tuple(args)


_names: dict[tuple[int, int], str] = {}


def syscall_name(arch: int, nr: int) -> str:
    """The syscall's name in the caller's ABI (libseccomp's tables), e.g. (x86, 21) -> mount."""
    hit = _names.get((arch, nr))
    if hit is None:
        from isobox.seccomp.compile import _binding
        sc = _binding()
        try:
            hit = sc.resolve_syscall(arch, nr)
            hit = hit.decode() if isinstance(hit, bytes) else str(hit)
        except Exception:  # noqa: BLE001 - an ABI libseccomp does not know: refused by name ""
            hit = ""
        _names[(arch, nr)] = hit
    return hit


def make_call(listener: int, raw: bytes, container, decoded=None) -> Call:
    cookie, pid, nr, arch, args = decoded or decode(raw)
    return Call(listener=listener, id=cookie, pid=pid, nr=nr, arch=arch, args=args, name=syscall_name(arch, nr),
                container=container, valid=lambda: id_valid(listener, cookie))


PACE_FROM = 500             # calls in a window before a listener that dominates is paced
PACE = 0.001                # seconds such a listener waits before its next call is taken
COSTLY = 0.0005             # an inline call that held the loop this long (s): a listener whose
                            # calls took more than twice the time of every other busy one waits as
                            # long as that call took (umount parsing a huge mountinfo)
LOOP_NICE = -10             # the notify loop's niceness (the rest of isoboxd keeps 0)
SHARE_WINDOW = 1.0          # seconds over which calls per listener are counted for ordering
WORKERS = 4                 # threads for slow calls
ALONE = 2                   # of them, what one container may hold while no other has slow calls
HOLD = 8                    # slow calls of one container waiting in isoboxd before its listener is
                            # no longer read: the rest wait in the kernel (bounded memory, in-flight
                            # slots left for the others); read again once half of them have run


class Notifier:
    """Serves every listener: add() one per container process tree that loaded the filter.

    Fairness: each epoll round takes one notification per ready listener, the listeners that
    made the fewest calls in the last SHARE_WINDOW first, so a container flooding one syscall
    waits behind the others instead of them behind it. Synchronous wake-ups (sync_wake_up)
    are on only while at most one listener is busy: they pull every caller onto isoboxd's
    CPU, which speeds up a lone caller but piles contending containers onto one CPU (measured:
    the fairness test's p99 ratio went from about 1.4 to 1.7 with them always on), so the
    first sign of a second busy listener turns them off until a quiet window. While two are
    busy, one that makes more than twice the calls of any other (a loop of sysinfo, say) is
    paced: after each of its calls its listener is disarmed for PACE, so its caller waits in
    the kernel instead of taking the CPUs the other containers' processes need (it still gets
    about a thousand calls a second). Calls are not all equally cheap, so the time each
    listener's calls took (inline, and on the pool) is counted too. Pacing by count needs
    that time to be the largest as well: a thousand sysinfo calls next to a container whose
    set-id chmods keep the pool busy make the sysinfo caller the victim, not the hog. And a
    listener whose calls took more than twice the time of every other busy one (an umount
    parses the caller's mountinfo, which a container can grow to thousands of lines) is
    disarmed after each call that took COSTLY or more, for as long as it took, which leaves
    at least half of the loop to the others.

    Slow calls go to FairPool: a queue per container (key, shared by the listeners of its
    exec'd processes), served round robin, with a cap on the workers one container holds.
    When one container has HOLD calls queued there, its listener is not read until half have
    run: the rest wait in the kernel. Audit events of inline calls are
    handed to on_verdict at once (a buffer) and on_idle() is called when no listener is
    ready, so writing the log never stands between two callers."""

    def __init__(self, handlers: dict, on_verdict, on_gone, slow: frozenset[str] = frozenset(), workers: int = WORKERS,
                 inflight=None, on_idle=None):
        self.handlers = handlers
        self.inflight = inflight              # Inflight: calls a dead server left unanswered
        self.orphans: dict[str, list[bytes]] = {}
        if inflight is not None:
            for key, raw in inflight.take():
                self.orphans.setdefault(key, []).append(raw)
        self.on_verdict = on_verdict          # (call, verdict) -> None: the audit log
        self.on_idle = on_idle                # () -> None: write what on_verdict buffered
        self.on_gone = on_gone                # (key) -> None: every task of a listener exited
        self.slow = slow
        self.ep = select.epoll()
        self.lock = threading.Lock()
        self.listeners: dict[int, tuple[str, object]] = {}     # fd -> (key, container)
        self.held: dict[int, str] = {}        # fd -> key: not read while its key has HOLD calls queued
        self.calls: dict[int, int] = {}       # fd -> calls served in the current window
        self.spent: dict[int, float] = {}     # fd -> seconds its calls took in the window, inline and
                                              # on the pool (pool threads add theirs: a lost update
                                              # only blurs a hint)
        self.synced = True                    # listeners have SYNC_WAKE_UP set (see the class doc)
        self.dirty = False                    # on_verdict got events since the last on_idle
        self.paused: dict[int, float] = {}    # fd -> monotonic time its pacing pause ends
        self.pool = FairPool(workers, alone=ALONE, low=HOLD // 2, on_room=self._room, elsewhere=self._calling)

    def add(self, fd: int, key: str, container) -> None:
        if self.synced:
            sync_wake_up(fd)
        with self.lock:
            self.listeners[fd] = (key, container)
            orphans = self.orphans.pop(key, [])
        for raw in orphans:
            if id_valid(fd, decode(raw)[0]):
                self.pool.submit(key, fd, self._handle_raw, fd, key, raw, container)
        self.ep.register(fd, select.EPOLLIN)

    def _sync(self, on: bool) -> None:
        self.synced = on
        with self.lock:
            fds = list(self.listeners)
        for fd in fds:
            sync_wake_up(fd, on)

    def serve(self) -> None:
        try:
            # callers are stopped until this thread answers: it must not wait for a CPU behind
            # the containers' own busy processes (a flooding container included)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOOP_NICE)
        except OSError:
            pass
        window = time.monotonic()
        calls = self.calls
        spent = self.spent
        paused = self.paused
        clock = time.perf_counter
        while True:
            timeout = -1.0
            if paused:
                timeout = max(0.0, min(paused.values()) - time.monotonic())
            events = self.ep.poll(0 if self.dirty else timeout)
            now = time.monotonic()
            if paused:
                for fd in [fd for fd, until in paused.items() if until <= now]:
                    del paused[fd]
                    if fd in self.listeners and fd not in self.held:     # see _room
                        self.ep.modify(fd, select.EPOLLIN)
            if not events:
                if self.dirty:
                    self.dirty = False
                    if self.on_idle is not None:
                        self.on_idle()
                continue
            if now - window > SHARE_WINDOW:
                if not self.synced and len(calls) <= 1:
                    self._sync(True)               # a quiet window: one caller at most
                calls.clear()
                spent.clear()
                window = now
            if len(events) > 1:
                events.sort(key=lambda e: calls.get(e[0], 0))
            if self.synced and (len(events) > 1 or (len(calls) == 1 and events[0][0] not in calls)):
                self._sync(False)                  # a second busy listener in this window
            for fd, ev in events:
                entry = self.listeners.get(fd)
                if entry is None:
                    continue
                if ev & select.EPOLLIN:
                    raw = recv(fd)
                    if raw is not None:
                        n = calls[fd] = calls.get(fd, 0) + 1
                        t0 = clock()
                        self._dispatch(fd, raw, entry)
                        took = clock() - t0
                        spent[fd] = spent.get(fd, 0.0) + took
                        if self.synced or fd in paused:
                            continue
                        if n >= PACE_FROM and self._hogs(fd, n):
                            self.ep.modify(fd, 0)          # its next call waits (in the kernel)
                            paused[fd] = now + PACE
                        elif took >= COSTLY and self._hogs_time(fd):
                            self.ep.modify(fd, 0)          # at most half the loop's time for it
                            paused[fd] = time.monotonic() + max(PACE, took)
                elif ev & (select.EPOLLHUP | select.EPOLLERR):
                    paused.pop(fd, None)
                    self._drop(fd, entry[0])

    def _hogs(self, fd: int, n: int) -> bool:
        """Another listener made calls in this window, and fd more than twice as many as any,
        and none took more of isoboxd's time than fd (a thousand sysinfo calls cost less than
        the set-id chmods of a container flooding the pool: that one is not their victim)."""
        others = [(c, self.spent.get(other, 0.0)) for other, c in self.calls.items() if other != fd]
        mine = self.spent.get(fd, 0.0)
        return bool(others) and all(n > 2 * c and mine >= t for c, t in others)

    def _calling(self, key: str) -> bool:
        """A listener of another container made calls in the current window (for the pool:
        while one does, the slow calls of this one get only their share). Read from the
        pool's threads: list() copies the dict without letting the loop run in between."""
        listeners = self.listeners
        return any((entry := listeners.get(fd)) is not None and entry[0] != key for fd in list(self.calls))

    def _hogs_time(self, fd: int) -> bool:
        """Another listener made calls in this window, and fd's took more than twice the time
        of any other's."""
        mine = self.spent.get(fd, 0.0)
        others = [self.spent.get(other, 0.0) for other in self.calls if other != fd]
        return bool(others) and all(mine > 2 * t for t in others)

    def _drop(self, fd: int, key: str) -> None:
        with self.lock:
            self.listeners.pop(fd, None)
            self.held.pop(fd, None)
            held = set(self.held.values())
        for fn, args in self.pool.drop(fd):
            if fn == self._finish and self.inflight is not None:
                self.inflight.end(args[2])      # the slot _handle_raw took for the deferred call
        for other in held:                      # dropping may have shrunk a queue past HOLD // 2
            if self.pool.queued(other) <= HOLD // 2:
                self._room(other)
        self.calls.pop(fd, None)
        self.spent.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        os.close(fd)
        self.on_gone(key)

    def _dispatch(self, fd: int, raw: bytes, entry: tuple[str, object]) -> None:
        decoded = decode(raw)
        key = entry[0]
        if syscall_name(decoded[3], decoded[2]) in self.slow:
            queued = self.pool.submit(key, fd, self._handle_raw, fd, key, raw, entry[1])
        else:
            queued = self._handle_raw(fd, key, raw, entry[1], inline=True, decoded=decoded)
        if queued >= HOLD:
            self._hold(fd, key)

    def _hold(self, fd: int, key: str) -> None:
        """Stops reading fd while its container has HOLD slow calls queued (loop thread).
        Disarmed before it is marked: a _room in between finds nothing to re-arm, and the
        check below, which then sees the drained queue, re-arms it."""
        self.ep.modify(fd, 0)
        with self.lock:
            self.held[fd] = key
        if self.pool.queued(key) <= HOLD // 2:     # the workers drained it meanwhile
            self._room(key)

    def _room(self, key: str) -> None:
        """The pool ran key's queue down to HOLD // 2: its held listeners are read again. Runs
        on a worker; a listener the loop paused (PACE) is left to the loop, which re-arms it
        when the pause ends unless it is still held (both sides remove their mark first, then
        look at the other's, so one of them re-arms it)."""
        with self.lock:
            fds = [fd for fd, k in self.held.items() if k == key]
            for fd in fds:
                del self.held[fd]
        for fd in fds:
            if fd not in self.paused:
                try:
                    self.ep.modify(fd, select.EPOLLIN)
                except OSError:
                    pass                # closed meanwhile (_drop)

    def _handle_raw(self, fd: int, key: str, raw: bytes, container, inline: bool = False, decoded=None) -> int:
        """Handles one notification; inline, returns how many slow calls of key wait on the
        pool when it deferred its work there (0 otherwise)."""
        slot = self.inflight.begin(key, raw) if self.inflight is not None else -1
        finished = True
        try:
            call = make_call(fd, raw, container, decoded)
            handler = self.handlers.get(call.name)
            if inline and handler is not None:
                v = self._decide(call, handler)
                if v.kind == "defer":      # the slow part goes to the pool; the loop moves on
                    finished = False
                    return self.pool.submit(key, fd, self._finish, call, v.work, slot)
                self._answer(call, v, inline=True)
            else:
                t0 = time.perf_counter()
                try:
                    self.handle(call)
                finally:
                    if not inline:          # (the loop times its own calls)
                        self._charge(fd, time.perf_counter() - t0)
        finally:
            if finished and self.inflight is not None:
                self.inflight.end(slot)
        return 0

    def _finish(self, call: Call, work, slot: int) -> None:
        t0 = time.perf_counter()
        try:
            self._answer(call, self._decide(call, work, deferred=True))
        finally:
            if self.inflight is not None:
                self.inflight.end(slot)
            self._charge(call.listener, time.perf_counter() - t0)

    def _charge(self, fd: int, took: float) -> None:
        """Pool time of fd's calls, for the loop's ordering and pacing (a pool thread)."""
        self.spent[fd] = self.spent.get(fd, 0.0) + took

    def handle(self, call: Call) -> Verdict:
        handler = self.handlers.get(call.name)
        v = self._decide(call, handler) if handler is not None else \
            Verdict("continue", reason="no handler", audit=False)
        if v.kind == "defer":
            return self._answer(call, self._decide(call, v.work, deferred=True))
        return self._answer(call, v)

    def _decide(self, call: Call, fn, deferred: bool = False) -> Verdict:
        try:
            return fn() if deferred else fn(call)
        except OSError as e:
            return Verdict("error", errno=e.errno or errno.EPERM, reason=f"{e.strerror or e}")
        except Exception as e:  # noqa: BLE001 - a bug in a handler refuses the call, never crashes the daemon
            log.exception("%s handler failed", call.name)
            return Verdict("error", errno=errno.EPERM, reason=f"isoboxd error: {type(e).__name__}")

    def _answer(self, call: Call, v: Verdict, inline: bool = False) -> Verdict:
        if v.kind == "defer":
            v = Verdict("error", errno=errno.EPERM, reason="isoboxd error: deferred twice")
        try:
            send(call.listener, call.id, v)
        except OSError as e:
            log.warning("answering %s failed: %s", call.name, e)
        if v.audit:
            try:
                self.on_verdict(call, v)
                if inline:
                    self.dirty = True           # written when the loop is idle
                elif self.on_idle is not None:
                    self.on_idle()              # the pool's threads write their own at once
            except Exception:  # noqa: BLE001
                log.exception("audit")
        return v
