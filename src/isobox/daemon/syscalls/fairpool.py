"""The pool that runs slow trapped calls (they fork helpers, mount): fair between containers.

A shared first-come-first-served pool let one container starve the others: 200 threads
making slow calls kept about 200 jobs queued, and another container's proc mount waited
behind all of them (17 ms became 1.4-2.0 s). Here every container (key) has its own queue,
and free workers take the next job round robin over the keys with work, so a newcomer's call
waits behind at most one job of each other container, not behind their whole backlog.

Workers are also capped per key. A job cannot be preempted, and a newcomer's job competes
for the CPUs, and for the interpreter lock, with every job already running: so a key alone
may hold at most `alone` workers (never all: one stays free for a newcomer), and a key
while another one is active (it has work queued or running, or had some within LINGER)
holds at most `shared` workers, one by default, an equal share for each caller whatever
the number of its threads.

That one worker still costs the others: a loop of set-id chmods keeps about one CPU busy
(each helper forks isoboxd), and the machine may have two. So a key that has a backlog while
a key without one is active (a caller that waits for each call) rests after each job for
REST times as long as the job ran: it gets at most half of one worker's time, its callers
wait in the kernel, and the CPUs go to the others. A container making one call at a time
has no backlog when its call ends and never rests; keys that all have backlogs do not rest
either, they share the workers."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("isoboxd")

LINGER = 0.5        # seconds a key counts as active after its last job: the gap between a
                    # caller's consecutive calls (a shell running mount, chmod...) is far shorter
REST = 1.0          # a key with a backlog, while another is active, waits this many times as
                    # long as its last job ran before its next starts


class _Key:
    """One key's jobs and accounting."""
    __slots__ = ("jobs", "running", "last", "in_ring", "rest_until")

    def __init__(self) -> None:
        self.jobs: deque[tuple[object, Callable, tuple]] = deque()   # (tag, fn, args)
        self.running = 0
        self.last = 0.0                 # clock() when its last job ended
        self.in_ring = False
        self.rest_until = 0.0           # clock() before which its next job may not start


class FairPool:
    """submit(key, tag, fn, *args) runs fn(*args) on one of `workers` threads.

    tag names the job's source (the listener fd) so that drop(tag) can forget the jobs of a
    listener that closed. on_room(key), when given, is called (from a worker) when a key's
    queue falls to `low` jobs, for a caller that stopped feeding it while it was long."""

    def __init__(self, workers: int = 4, alone: int | None = None, shared: int = 1, low: int = 0,
                 on_room: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 rest: float = REST, elsewhere: Callable[[str], bool] | None = None, name: str = "notify"):
        self.workers = workers
        self.alone = max(1, workers - 1 if alone is None else min(alone, workers - 1)) if workers > 1 else 1
        self.shared = max(1, min(shared, self.alone))
        self.low = low
        self.on_room = on_room
        self.clock = clock
        self.rest = rest
        self.elsewhere = elsewhere          # (key) -> another container is making fast calls now
        self.resting: set[str] = set()      # keys with a job waiting for the end of their rest
        self.cond = threading.Condition(threading.Lock())
        self.keys: dict[str, _Key] = {}
        self.ring: deque[str] = deque()     # keys with queued jobs and a worker to spare, in turn
        self.name = name
        self.threads: list[threading.Thread] = []   # started by the first submit

    # -- for the loop --
    def submit(self, key: str, tag: object, fn: Callable, *args) -> int:
        """Queues the job; returns how many jobs of key are now waiting (not running)."""
        with self.cond:
            k = self.keys.get(key)
            if k is None:
                k = self.keys[key] = _Key()
            k.jobs.append((tag, fn, args))
            self._enlist(key, k)
            if not self.threads:
                self.threads = [threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
                                for i in range(self.workers)]
                for t in self.threads:
                    t.start()
            return len(k.jobs)

    def queued(self, key: str) -> int:
        with self.cond:
            k = self.keys.get(key)
            return len(k.jobs) if k is not None else 0

    def drop(self, tag: object) -> list[tuple[Callable, tuple]]:
        """Forgets the queued jobs with this tag (their listener is closed: no answer can reach
        the caller, and the fd number may already name another listener); returns them."""
        gone: list[tuple[Callable, tuple]] = []
        with self.cond:
            for k in self.keys.values():
                gone += [(fn, args) for t, fn, args in k.jobs if t == tag]
                k.jobs = deque(j for j in k.jobs if j[0] != tag)
        return gone

    # -- the policy --
    def contended(self, key: str) -> bool:
        """Another key has work queued or running, or had some within LINGER, or is making
        fast calls (which wait for the loop, and the loop for the CPU and the interpreter
        lock these jobs hold)."""
        now = self.clock()
        return any(other != key and (k.jobs or k.running or now - k.last < LINGER)
                   for other, k in self.keys.items()) or self._elsewhere(key)

    def waited_on(self, key: str) -> bool:
        """Another key without a backlog is active: a caller waiting for each of its calls,
        whose latency the backlog of this one must not stretch."""
        now = self.clock()
        return any(other != key and not k.jobs and (k.running or now - k.last < LINGER)
                   for other, k in self.keys.items()) or self._elsewhere(key)

    def _elsewhere(self, key: str) -> bool:
        try:
            return self.elsewhere is not None and self.elsewhere(key)
        except Exception:  # noqa: BLE001 - a hint only
            return False

    def cap(self, key: str) -> int:
        """Workers key may hold now: `shared` while another key is active, else `alone`."""
        return self.shared if self.contended(key) else self.alone

    def _enlist(self, key: str, k: _Key) -> None:
        """Puts key at the end of the ring if it has a job, a worker to spare and no rest to
        finish (lock held)."""
        if not k.jobs or k.in_ring or k.running >= self.cap(key):
            return
        if self.clock() < k.rest_until:
            self.resting.add(key)           # _next enlists it when the rest is over
            return
        k.in_ring = True
        self.ring.append(key)
        self.cond.notify()

    def _rested(self) -> float | None:
        """Enlists the keys whose rest is over; seconds until the next one's is (lock held)."""
        now, soonest = self.clock(), None
        for key in list(self.resting):
            k = self.keys.get(key)
            if k is None or not k.jobs or now >= k.rest_until:
                self.resting.discard(key)
                if k is not None:
                    self._enlist(key, k)
            else:
                left = k.rest_until - now
                soonest = left if soonest is None else min(soonest, left)
        return soonest

    def _next(self) -> tuple[str, _Key, tuple[object, Callable, tuple]]:
        """The next job in turn (lock held; waits for one)."""
        while True:
            wait = self._rested() if self.resting else None
            while not self.ring:
                self.cond.wait(wait)
                wait = self._rested() if self.resting else None
            key = self.ring.popleft()
            k = self.keys[key]
            k.in_ring = False
            if not k.jobs or k.running >= self.cap(key):
                continue                    # dropped, or over its share since it was enlisted
            job = k.jobs.popleft()
            k.running += 1
            self._enlist(key, k)            # back of the ring: the other keys go first
            return key, k, job

    def _work(self) -> None:
        while True:
            with self.cond:
                key, k, (_tag, fn, args) = self._next()
                room = self.on_room is not None and len(k.jobs) == self.low
            if room:
                try:
                    self.on_room(key)
                except Exception:  # noqa: BLE001 - the pool must keep its workers
                    log.exception("on_room")
            started = self.clock()
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's bug must not cost a worker
                log.exception("slow call job failed")
            with self.cond:
                k.running -= 1
                k.last = self.clock()
                if k.jobs and self.rest and self.waited_on(key):
                    # it has more calls than its share serves while another waits for each
                    # of its own: its helpers' CPU time would slow that one's (when every
                    # active key has a backlog, none rests: they just share the workers)
                    k.rest_until = max(k.rest_until, k.last + self.rest * (k.last - started))
                if k.jobs:
                    self._enlist(key, k)
                elif not k.running:
                    self._forget_idle()

    def _forget_idle(self) -> None:
        """Drops keys with nothing queued or running for longer than LINGER (lock held)."""
        now = self.clock()
        for key in [key for key, k in self.keys.items()
                    if not k.jobs and not k.running and now - k.last >= LINGER and not k.in_ring]:
            del self.keys[key]

    def stats(self) -> dict[str, tuple[int, int]]:
        """key -> (queued, running)."""
        with self.cond:
            return {key: (len(k.jobs), k.running) for key, k in self.keys.items()}
