"""The slow-call pool: round robin between containers (keys), workers capped per key."""
from __future__ import annotations

import threading
import time

from isobox.daemon.syscalls import fairpool
from isobox.daemon.syscalls.fairpool import FairPool


def until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class Log:
    """Jobs that record their start and end, and can be held until released."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.gates: dict[str, threading.Event] = {}

    def job(self, key: str, name: str, hold: bool = False):
        gate = self.gates.setdefault(name, threading.Event())
        if not hold:
            gate.set()

        def run() -> None:
            with self.lock:
                self.started.append(name)
                self.running[key] = self.running.get(key, 0) + 1
                self.peak[key] = max(self.peak.get(key, 0), self.running[key])
            gate.wait(10)
            with self.lock:
                self.running[key] -= 1
        return run

    def release(self, name: str) -> None:
        self.gates[name].set()


def test_a_newcomer_waits_behind_one_job_of_each_other_key_not_their_backlog():
    log = Log()
    pool = FairPool(workers=1)
    pool.submit("a", 0, log.job("a", "a0", hold=True))
    until(lambda: log.started == ["a0"])
    for i in range(1, 50):
        pool.submit("a", 0, log.job("a", f"a{i}"))
    pool.submit("b", 0, log.job("b", "b0"))
    pool.submit("c", 0, log.job("c", "c0"))
    log.release("a0")
    until(lambda: len(log.started) == 52)
    assert log.started[:5] == ["a0", "b0", "c0", "a1", "a2"]


def test_a_key_alone_never_holds_every_worker_so_a_newcomer_starts_at_once():
    log = Log()
    pool = FairPool(workers=4, alone=2)
    for i in range(20):
        pool.submit("flood", 0, log.job("flood", f"f{i}", hold=True))
    until(lambda: len(log.started) == 2)
    time.sleep(0.05)
    assert log.started == ["f0", "f1"]                  # its share, although 2 workers are free
    pool.submit("victim", 0, log.job("victim", "v0", hold=True))
    until(lambda: "v0" in log.started)                  # no flood job had to end first
    for i in range(20):
        log.release(f"f{i}")
    log.release("v0")
    until(lambda: len(log.started) == 21)
    assert log.peak["flood"] == 2


def test_while_another_key_is_active_each_key_gets_one_worker():
    log = Log()
    pool = FairPool(workers=4, alone=3, shared=1)
    for i in range(10):
        pool.submit("flood", 0, log.job("flood", f"f{i}", hold=True))
    until(lambda: len(log.started) == 3)
    pool.submit("victim", 0, log.job("victim", "v0", hold=True))
    until(lambda: "v0" in log.started)
    log.peak["flood"] = log.running["flood"] = 3
    for name in ("f0", "f1", "f2"):                     # the ones that ran alone end
        log.release(name)
    until(lambda: log.running["flood"] == 1)
    time.sleep(0.05)
    assert log.running["flood"] == 1 and len(log.started) == 5   # f3 only, while v0 runs
    log.release("v0")
    for i in range(3, 10):
        log.release(f"f{i}")
    until(lambda: len(log.started) == 11)


def test_the_shared_cap_lasts_linger_after_the_other_key_went_quiet(monkeypatch):
    now = [100.0]
    pool = FairPool(workers=4, alone=3, clock=lambda: now[0])
    log = Log()
    pool.submit("victim", 0, log.job("victim", "v0"))
    until(lambda: pool.stats().get("victim") == (0, 0))
    assert pool.cap("flood") == 1
    now[0] += fairpool.LINGER
    assert pool.cap("flood") == 3


def test_dropped_jobs_never_run_and_a_failing_job_costs_no_worker():
    log = Log()
    pool = FairPool(workers=1)
    pool.submit("a", 7, log.job("a", "gate", hold=True))
    until(lambda: log.started == ["gate"])
    pool.submit("a", 7, log.job("a", "gone"))
    pool.submit("a", 8, lambda: 1 / 0)
    pool.submit("a", 8, log.job("a", "kept"))
    assert len(pool.drop(7)) == 1
    log.release("gate")
    until(lambda: "kept" in log.started)
    assert log.started == ["gate", "kept"]


def test_on_room_tells_when_a_long_queue_has_drained_to_low():
    rooms: list[str] = []
    log = Log()
    pool = FairPool(workers=1, low=2, on_room=rooms.append)
    pool.submit("a", 0, log.job("a", "gate", hold=True))
    until(lambda: log.started == ["gate"])
    queued = [pool.submit("a", 0, log.job("a", f"a{i}")) for i in range(6)]
    assert queued == [1, 2, 3, 4, 5, 6]
    assert rooms == []
    log.release("gate")
    until(lambda: len(log.started) == 7)
    assert rooms == ["a"]


# -- the notify loop's side: a container with HOLD slow calls queued is not read any more --

def _raw_chmod(cookie: int) -> bytes:
    from isobox.daemon.syscalls import notify
    return notify.NOTIF.pack(cookie, 1, 0, 90, 0xC000003E, 0, 0, 0, 0, 0, 0, 0)    # chmod on x86_64


def _armed(ep, fd: int) -> bool:
    return any(f == fd for f, _ in ep.poll(0))


def test_a_listener_with_hold_calls_queued_is_not_read_until_half_have_run():
    import os

    from isobox.daemon.syscalls import notify
    from isobox.daemon.syscalls.call import done
    gate = threading.Event()
    ran: list[int] = []

    def chmod(call):
        gate.wait(10)
        ran.append(call.id)
        return done(0, "test")
    n = notify.Notifier({"chmod": chmod}, lambda c, v: None, lambda k: None, slow=frozenset({"chmod"}), workers=2)
    r, w = os.pipe()                    # stands in for a listener: epoll sees it readable
    os.write(w, b"x")
    try:
        n.add(r, "flood", None)
        entry = n.listeners[r]
        n._dispatch(r, _raw_chmod(0), entry)
        until(lambda: n.pool.stats()["flood"] == (0, 1))        # its one worker (2 workers: cap 1)
        for i in range(1, notify.HOLD):
            n._dispatch(r, _raw_chmod(i), entry)
        assert n.pool.queued("flood") == notify.HOLD - 1 and not n.held and _armed(n.ep, r)
        n._dispatch(r, _raw_chmod(notify.HOLD), entry)
        assert n.held == {r: "flood"} and not _armed(n.ep, r)
        gate.set()
        until(lambda: not n.held)                               # read again at HOLD // 2 queued
        assert _armed(n.ep, r)
        until(lambda: len(ran) == notify.HOLD + 1)
    finally:
        gate.set()
        n.ep.close()
        os.close(r)
        os.close(w)


def test_a_key_with_a_backlog_rests_as_long_as_its_job_ran_while_another_key_is_active():
    starts: list[float] = []
    pool = FairPool(workers=4, alone=3, shared=1, rest=1.0)

    def flood_job() -> None:
        starts.append(time.monotonic())
        time.sleep(0.02)
    gate = threading.Event()
    pool.submit("victim", 0, lambda: gate.wait(10))     # another key, active all along
    until(lambda: pool.stats()["victim"] == (0, 1))
    for _ in range(5):
        pool.submit("flood", 0, flood_job)
    until(lambda: len(starts) == 5)
    gate.set()
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.038, gaps                     # 20 ms of job, then 20 ms of rest


def test_a_key_alone_never_rests():
    pool = FairPool(workers=2, alone=1, rest=1.0)
    done: list[int] = []
    for i in range(5):
        pool.submit("alone", 0, lambda i=i: (time.sleep(0.01), done.append(i)))
    until(lambda: len(done) == 5)
    assert done == [0, 1, 2, 3, 4]
    assert pool.keys["alone"].rest_until == 0.0 and not pool.resting


def test_only_a_caller_without_a_backlog_makes_the_others_rest():
    """Keys that all have backlogs (bulk work) share the workers and none rests."""
    log = Log()
    pool = FairPool(workers=1, rest=1.0)
    pool.submit("a", 0, log.job("a", "a0", hold=True))
    until(lambda: log.started == ["a0"])
    pool.submit("b", 0, log.job("b", "b0"))
    assert pool.waited_on("b") and not pool.waited_on("a")     # a waits for its one call; b queues
    pool.submit("a", 0, log.job("a", "a1"))
    assert not pool.waited_on("b")                              # both have backlogs
    log.release("a0")
    until(lambda: len(log.started) == 3)


def test_a_closed_listener_takes_its_queued_calls_along_and_frees_what_they_held(tmp_path):
    """Its queued calls are dropped (in-flight slots of deferred ones freed), and another
    listener of the same container held for that queue is read again."""
    import os

    from isobox.daemon.syscalls import notify
    from isobox.daemon.syscalls.call import defer, done
    from isobox.daemon.syscalls.inflight import SLOTS, Inflight
    gate = threading.Event()
    inflight = Inflight(str(tmp_path / "inflight"))

    def mount(call):                    # decided inline, then deferred to the pool
        return defer(lambda: (gate.wait(10), done(0, "test"))[1])
    n = notify.Notifier({"mount": mount}, lambda c, v: None, lambda k: None, workers=2, inflight=inflight)
    pipes = [os.pipe(), os.pipe()]
    try:
        for r, w in pipes:
            os.write(w, b"x")
            n.add(r, "k", None)
        (a, _), (b, _) = pipes
        raw = notify.NOTIF.pack(1, 1, 0, 165, 0xC000003E, 0, 0, 0, 0, 0, 0, 0)     # mount on x86_64
        n._dispatch(a, raw, n.listeners[a])
        until(lambda: n.pool.stats()["k"] == (0, 1))
        for _ in range(notify.HOLD - 1):
            n._dispatch(b, raw, n.listeners[b])
        n._dispatch(a, raw, n.listeners[a])
        assert n.held == {a: "k"} and not _armed(n.ep, a)
        assert len(inflight.free) == SLOTS - notify.HOLD - 1
        n._drop(b, "k")                 # closes b: all its tasks exited
        assert n.pool.queued("k") == 1 and n.held == {}
        assert _armed(n.ep, a)
        assert len(inflight.free) == SLOTS - 2      # the running call and a's queued one
        gate.set()
        until(lambda: len(inflight.free) == SLOTS)
    finally:
        gate.set()
        n.ep.close()
        os.close(pipes[0][0])
        for _, w in pipes:
            os.close(w)


def test_another_container_making_fast_calls_counts_as_active():
    """Its calls wait for the loop, which competes with these jobs for the CPUs and the
    interpreter lock: a flood of slow calls gets one worker and rests then too."""
    calling = {"victim"}
    pool = FairPool(workers=4, alone=3, elsewhere=lambda key: any(k != key for k in calling))
    assert pool.cap("flood") == 1 and pool.waited_on("flood")
    calling.clear()
    assert pool.cap("flood") == 3 and not pool.waited_on("flood")


def test_the_loop_paces_by_calls_only_a_listener_that_also_took_the_most_time():
    """Many cheap calls (sysinfo) next to a container flooding the pool: the cheap caller is
    the victim, not the hog, though it makes more calls."""
    from isobox.daemon.syscalls import notify
    n = notify.Notifier({}, lambda c, v: None, lambda k: None)
    try:
        n.calls.update({3: 1000, 4: 40})          # 3: sysinfo loop; 4: chmod flood, mostly held
        n.spent.update({3: 0.02, 4: 0.3})          # ... whose calls took 0.3 s on the pool
        assert not n._hogs(3, 1000) and not n._hogs(4, 40)
        n.spent[4] = 0.001                         # a flood of cheap calls: that one is paced
        assert n._hogs(3, 1000)
        assert n._hogs_time(3) and not n._hogs_time(4)
    finally:
        n.ep.close()
