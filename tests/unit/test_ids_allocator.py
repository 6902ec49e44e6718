import os
import stat
import subprocess
import sys

import pytest

from isobox.ids import allocator as alloc_mod
from isobox.ids.allocator import Allocator, Holder, IdError, proc_starttime

START = 1048576
R = 65536


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "state" / "ids.db")


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return str(d)


def make(db, ranges=3):
    return Allocator(db, pool=(START, ranges * R))


def test_db_created_private(db):
    make(db)
    assert stat.S_IMODE(os.stat(os.path.dirname(db)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


def test_env_var_overrides_default(tmp_path, monkeypatch):
    path = str(tmp_path / "env.db")
    monkeypatch.setenv("ISOBOX_IDS_DB", path)
    assert Allocator(pool=(START, R)).db_path == path
    assert Allocator(str(tmp_path / "arg.db"), pool=(START, R)).db_path.endswith("arg.db")


def test_allocate_release_lowest_first(db, root):
    a = make(db)
    h1, h2, h3 = (Holder(root, f"c{i}") for i in range(3))
    assert a.allocate(h1) == START
    assert a.allocate(h2) == START + R
    assert a.lookup(h2) == START + R
    assert a.release(h1) == START
    assert a.lookup(h1) is None
    assert a.allocate(h3) == START  # freed slot is reused
    assert a.release(h1) is None  # unknown: no error
    with pytest.raises(IdError, match="already holds"):
        a.allocate(h3)


def test_exhaustion(db, root):
    a = make(db, ranges=3)
    for i in range(3):
        a.allocate(Holder(root, f"c{i}"))
    with pytest.raises(IdError) as e:
        a.allocate(Holder(root, "c3"))
    assert str(e.value).startswith("ID pool exhausted: 3 ranges in use;")
    assert "\n" not in str(e.value)


def test_share_refcount(db, root):
    a = make(db)
    owner, member = Holder(root, "pod-infra"), Holder(root, "pod-app")
    base = a.allocate(owner)
    assert a.share(member, base) == base
    assert a.lookup(member) == base
    assert a.release(owner) is None  # still held by member
    assert a.allocate(Holder(root, "other")) == START + R  # shared range stays taken
    assert a.release(member) == base  # last holder frees it
    assert a.allocate(Holder(root, "again")) == base
    with pytest.raises(IdError, match="no container holds"):
        a.share(Holder(root, "x"), START + 2 * R)


def test_claim_overlap_and_zero(db, root):
    a = make(db)
    a.claim(Holder(root, "X"), 200000, R)
    with pytest.raises(IdError) as e:
        a.claim(Holder(root, "Y"), 200000 + R - 1, 10)
    assert str(e.value).startswith(
        f"uid mapping {200000 + R - 1}-{200000 + R + 8} overlaps the range of container X")
    a.claim(Holder(root, "Y"), 200000 + R, 10)  # adjacent is fine
    with pytest.raises(IdError, match="host ID 0"):
        a.claim(Holder(root, "Z"), 0, R)
    with pytest.raises(IdError, match="not a valid"):
        a.claim(Holder(root, "Z"), 5, 0)
    # Claims inside the pool are skipped by allocation and vice versa.
    a.claim(Holder(root, "P"), START + 100, 1000)
    assert a.allocate(Holder(root, "A")) == START + R
    with pytest.raises(IdError, match="overlaps the range of container A"):
        a.claim(Holder(root, "Q"), START + R + 5, 1)
    assert a.release(Holder(root, "X")) == 200000
    a.claim(Holder(root, "Q"), 200000, R)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    st = proc_starttime(p.pid)
    p.kill()
    p.wait()
    return p.pid, st


def test_proc_starttime():
    assert proc_starttime(os.getpid()) > 0
    pid, st = _dead_pid()
    assert st is not None and proc_starttime(pid) != st


def test_gc(db, root, monkeypatch):
    a = make(db, ranges=8)
    me, my_st = os.getpid(), proc_starttime(os.getpid())
    gone_pid, gone_st = _dead_pid()
    h = {n: Holder(root, n) for n in ("dead", "hasdir", "alive", "reused", "young", "noinit")}
    for x in h.values():
        a.allocate(x)
    a.set_init(h["dead"], gone_pid, gone_st)
    os.mkdir(os.path.join(root, "hasdir"))
    a.set_init(h["hasdir"], gone_pid, gone_st)  # init gone but state dir present
    a.set_init(h["alive"], me, my_st)
    a.set_init(h["reused"], me, my_st + 1)  # same pid, different process
    assert sorted(x.container_id for x in a.gc()) == ["dead", "reused"]
    left = {x.container_id for x, _ in a.holders()}
    assert left == {"hasdir", "alive", "young", "noinit"}
    # Without a recorded init, only holders older than the grace period go.
    monkeypatch.setattr(alloc_mod, "GC_GRACE_SECONDS", -1.0)
    assert sorted(x.container_id for x in a.gc()) == ["noinit", "young"]
    with pytest.raises(IdError, match="holds no ID range"):
        a.set_init(h["dead"], me, my_st)


def test_gc_keeps_shared_range_until_last(db, root):
    a = make(db)
    gone_pid, gone_st = _dead_pid()
    owner, member = Holder(root, "o"), Holder(root, "m")
    base = a.allocate(owner)
    a.share(member, base)
    a.set_init(owner, gone_pid, gone_st)
    a.set_init(member, os.getpid(), proc_starttime(os.getpid()))
    assert a.gc() == [owner]
    assert a.holders() == [(member, base)]
    a.set_init(member, gone_pid, gone_st)
    assert a.gc() == [member]
    assert a.allocate(Holder(root, "n")) == base


def test_allocate_runs_gc_when_full(db, root):
    a = make(db, ranges=1)
    gone_pid, gone_st = _dead_pid()
    old = Holder(root, "old")
    a.allocate(old)
    a.set_init(old, gone_pid, gone_st)
    assert a.allocate(Holder(root, "new")) == START
    assert a.lookup(old) is None


def test_allocate_records_init(db, root):
    a = make(db)
    a.allocate(Holder(root, "c"), init_pid=os.getpid())
    assert a.gc() == []  # alive init with matching starttime


def test_persistence_across_instances(db, root):
    a = make(db)
    base = a.allocate(Holder(root, "c1"))
    a.claim(Holder(root, "c2"), 300000, 10)
    b = make(db)  # as if after a crash: only committed data is there
    assert b.lookup(Holder(root, "c1")) == base
    assert b.holders() == [(Holder(root, "c2"), 300000), (Holder(root, "c1"), base)]
    assert b.allocate(Holder(root, "c3")) == START + R


def test_holder_root_normalised(db, root, monkeypatch):
    a = make(db)
    monkeypatch.chdir(os.path.dirname(root))
    base = a.allocate(Holder(os.path.basename(root), "c"))
    assert a.lookup(Holder(root, "c")) == base
