"""Fair service of slow trapped calls (finding 8): one container cannot starve another.

Attack: container A runs 200 threads that loop a slow trapped call (set-uid chmod of their own
file, or mount of proc: isoboxd forks helpers for each). Container B meanwhile makes the same
calls one at a time. When isoboxd's pool served slow calls first come first served, each of
B's calls waited behind the ~200 of A's that were queued: 17 ms became 1.4-2.0 s.

The assertion is about order, not time, so that a slow or busy machine cannot fail it: A's
threads count every completed call in a counter both containers map (a bind of one host file),
and B's probe reads it around each of its calls. First come first served, about 200 of A's
calls complete while one of B's waits; round robin per container, a few (those of A already
running, and the ones A's share of the workers finishes while B's runs). A flood of proc
mounts completes few calls of its own (each is slow), so B's p90 is also bounded, loosely
(10 times its unloaded p90 plus 100 ms: it was seconds)."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from dataclasses import dataclass

import pytest

from integration.test_isolation import privileged
from probes import rootfs_with


THREADS = 200
# flood calls allowed to complete during one victim call. FIFO: about THREADS. Fair: A's jobs
# already running when B's call came, plus those A's share of the workers completes meanwhile
# (a proc mount costs several chmods, so that share is what this bound leaves room for).
AHEAD_MAX = THREADS // 4
# and, as a second guard for floods whose own calls complete slowly (proc mounts: FIFO let a
# few of them hold every worker for seconds), a generous bound on the victim's p90
SLOWER_MAX, SLACK_MS = 10, 100
CALLS = 10                  # victim calls per measurement (each took up to 2 s before the fix)


@pytest.fixture(scope="module")
def fair_rootfs(tmp_path_factory) -> str:
    return rootfs_with(tmp_path_factory, "fairness")


@pytest.fixture
def shared(tmp_path) -> str:
    """A host directory both containers bind at /shared, holding the flood's counter."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    counter = d / "counter"
    counter.write_bytes(bytes(4096))
    os.chmod(counter, 0o666)
    return str(d)


def with_shared(src: str):
    def edit(spec: dict) -> None:
        privileged(spec)
        spec["mounts"].append({"destination": "/shared", "type": "bind", "source": src, "options": ["rbind", "rw"]})
    return edit


def start(runtime, rootfs: str, edit) -> str:
    b = runtime.bundle(rootfs, ["sh", "-c", "exec sleep 600 </dev/null >/dev/null 2>&1"], edit=edit)
    cid = runtime.new_id()
    runtime("run", "--detach", "--bundle", b, cid, check=True, timeout=60)
    return cid


@dataclass
class Victim:
    median_ms: float
    p90_ms: float
    ahead_max: int              # most flood calls completed during one victim call
    ahead_median: int


def victim(runtime, cid: str, kind: str, n: int = CALLS) -> Victim:
    r = runtime("exec", cid, "/fairness", "victim", kind, str(n), "/shared/counter", timeout=300)
    assert r.returncode == 0 and "errno=0" in r.stdout, r.stdout + r.stderr
    f = dict(x.split("=", 1) for x in r.stdout.split())
    return Victim(int(f["median_ns"]) / 1e6, int(f["p90_ns"]) / 1e6, int(f["ahead_max"]), int(f["ahead_median"]))


def counter(shared: str) -> tuple[int, int, int, int]:
    """(flood calls completed, flood threads started, last errno, calls failed)."""
    with open(os.path.join(shared, "counter"), "rb") as f:
        return struct.unpack("<QQQQ", f.read(32))


def start_flood(runtime, cid: str, kind: str, shared: str) -> int:
    """The flood's host pid, once every thread runs and the calls flow."""
    from conftest import RUNC
    pid_file = os.path.join(runtime.tmp, f"flood-{cid}.pid")
    # detached, stdio on /dev/null: the flood outlives this call (and must not hold its pipes)
    subprocess.run([*RUNC, "--root", runtime.root, "exec", "--detach", "--pid-file", pid_file, cid,
                    "/fairness", "flood", str(THREADS), kind, "/shared/counter"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True, timeout=60)
    with open(pid_file) as f:
        pid = int(f.read())
    deadline = time.monotonic() + 60
    while counter(shared)[1] < THREADS or counter(shared)[0] < 2 * THREADS:
        assert time.monotonic() < deadline, f"the flood did not get going: {counter(shared)}"
        time.sleep(0.1)
    return pid


def stop_flood(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("flood_kind", ["chmod", "mount"])
def test_a_flood_of_slow_calls_does_not_starve_another_container(isoboxd, runtime, fair_rootfs, shared,
                                                                   flood_kind):
    """B's proc mount and set-uid chmod while A floods with 200 threads of chmod (the pool's
    direct path) or of proc mounts (decided inline, then deferred to the pool)."""
    b = start(runtime, fair_rootfs, with_shared(shared))
    a = start(runtime, fair_rootfs, with_shared(shared))
    idle = {k: victim(runtime, b, k) for k in ("mount", "chmod")}
    pid = start_flood(runtime, a, flood_kind, shared)
    try:
        loaded = {k: victim(runtime, b, k) for k in ("mount", "chmod")}
    finally:
        stop_flood(pid)
    for k in ("mount", "chmod"):
        print(f"FAIRNESS flood={flood_kind} victim={k} idle={idle[k].median_ms:.1f}ms p90={idle[k].p90_ms:.1f}ms "
              f"loaded={loaded[k].median_ms:.1f}ms p90={loaded[k].p90_ms:.1f}ms "
              f"ahead max={loaded[k].ahead_max} median={loaded[k].ahead_median}")
    for k in ("mount", "chmod"):
        assert loaded[k].ahead_max < AHEAD_MAX, (
            f"{THREADS} threads of {flood_kind} in another container: {loaded[k].ahead_max} of their calls "
            f"were served while one {k} of this container waited ({loaded[k].median_ms:.0f} ms median, "
            f"{idle[k].median_ms:.0f} ms unloaded)")
        assert loaded[k].p90_ms < SLOWER_MAX * idle[k].p90_ms + SLACK_MS, (
            f"{THREADS} threads of {flood_kind} in another container: this container's {k} p90 went from "
            f"{idle[k].p90_ms:.0f} ms to {loaded[k].p90_ms:.0f} ms")
