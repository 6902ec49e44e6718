import os
import shutil
import stat

import pytest

from isobox.ids import pool
from isobox.ids.pool import (POOL_COUNT, RANGE_SIZE, PoolError, SubIdEntry, choose_pool_start,
                             ensure_pool, parse_subid, plan_pool, read_pool)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Temp subuid/subgid paths; user creation is recorded instead of run."""
    created = []
    monkeypatch.setattr(pool, "_ensure_user", created.append)
    uid, gid = tmp_path / "subuid", tmp_path / "subgid"
    return str(uid), str(gid), created


def test_parse_ignores_comments_blanks_and_bad_lines():
    text = """
# comment
alice:100000:65536
  bob:165536:65536  

bad line
carol:x:1
dave:1:2:3
:5:5
eve:-1:10
frank:10:0
gina:200000:10"""
    assert parse_subid(text) == [SubIdEntry("alice", 100000, 65536),
                                 SubIdEntry("bob", 165536, 65536),
                                 SubIdEntry("gina", 200000, 10)]
    assert parse_subid("") == []


def test_choose_start_minimum_and_alignment():
    assert choose_pool_start([]) == 1048576
    assert choose_pool_start([SubIdEntry("a", 100000, 65536)]) == 1048576
    # ends exactly on a boundary
    assert choose_pool_start([SubIdEntry("a", 1048576, 65536)]) == 1048576 + 65536
    # ends off a boundary: rounded up
    s = choose_pool_start([SubIdEntry("a", 1000000, 200000)])
    assert s == 1245184 and s % RANGE_SIZE == 0 and s >= 1200000


def test_plan_considers_both_files():
    uid = "a:100000:65536\n"
    gid = "b:5000000:70000\n"  # only in subgid, but must still be avoided
    plan = plan_pool("isobox", uid, gid)
    assert plan.start >= 5070000 and plan.start % RANGE_SIZE == 0
    assert plan.count == POOL_COUNT
    line = f"isobox:{plan.start}:{POOL_COUNT}\n"
    assert plan.subuid_text == uid + line
    assert plan.subgid_text == gid + line
    # The new entry overlaps nothing in either file.
    for e in parse_subid(uid) + parse_subid(gid):
        assert e.start + e.count <= plan.start


def test_plan_handles_missing_trailing_newline_and_existing():
    plan = plan_pool("isobox", "a:100000:65536", "")
    assert plan.subuid_text == f"a:100000:65536\nisobox:1048576:{POOL_COUNT}\n"
    assert plan.subgid_text == f"isobox:1048576:{POOL_COUNT}\n"
    again = plan_pool("isobox", plan.subuid_text, plan.subgid_text)
    assert (again.start, again.count, again.subuid_text, again.subgid_text) == \
        (1048576, POOL_COUNT, None, None)


def test_ensure_pool_creates_and_is_idempotent(files):
    uid, gid, created = files
    with open(uid, "w") as f:
        f.write("root:100000:65536\nalice:2000000:65536\n")
    os.chmod(uid, 0o644)
    start, count = ensure_pool("isobox", uid, gid)
    assert created == ["isobox"]
    assert start == 2000000 + 65536 + (-(2000000 + 65536) % RANGE_SIZE)
    assert start % RANGE_SIZE == 0 and count == POOL_COUNT
    for p in (uid, gid):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
        assert SubIdEntry("isobox", start, count) in parse_subid(open(p).read())
    assert open(uid).read().startswith("root:100000:65536\nalice:2000000:65536\n")
    inodes = (os.stat(uid).st_ino, os.stat(gid).st_ino)
    assert ensure_pool("isobox", uid, gid) == (start, count)
    assert (os.stat(uid).st_ino, os.stat(gid).st_ino) == inodes  # not rewritten
    assert read_pool("isobox", uid, gid) == (start, count)
    assert not [n for n in os.listdir(os.path.dirname(uid)) if n.startswith(".")]


def test_ensure_pool_keeps_existing_mode(files):
    uid, gid, _ = files
    for p in (uid, gid):
        open(p, "w").close()
        os.chmod(p, 0o640)
    ensure_pool("isobox", uid, gid)
    assert stat.S_IMODE(os.stat(uid).st_mode) == 0o640


def test_ensure_pool_mismatch_errors(files):
    uid, gid, _ = files
    with open(uid, "w") as f:
        f.write(f"isobox:1048576:{POOL_COUNT}\n")
    open(gid, "w").close()
    with pytest.raises(PoolError, match=r"in .*subuid but not in .*subgid") as e:
        ensure_pool("isobox", uid, gid)
    assert "\n" not in str(e.value)
    with pytest.raises(PoolError, match="but not in"):
        read_pool("isobox", uid, gid)
    with open(gid, "w") as f:
        f.write(f"isobox:2097152:{POOL_COUNT}\n")
    with pytest.raises(PoolError, match="differ.*1048576.*2097152"):
        ensure_pool("isobox", uid, gid)
    assert open(uid).read() == f"isobox:1048576:{POOL_COUNT}\n"  # untouched


def test_existing_pool_uses_smaller_count(files):
    uid, gid, _ = files
    with open(uid, "w") as f:
        f.write("isobox:1048576:655360\n")
    with open(gid, "w") as f:
        f.write("isobox:1048576:196608\n")
    assert ensure_pool("isobox", uid, gid) == (1048576, 196608)


def test_read_pool_absent(files):
    uid, gid, _ = files
    with pytest.raises(PoolError) as e:
        read_pool("isobox", uid, gid)
    assert str(e.value) == (f"no subordinate ID pool for user isobox in {uid}; "
                            "run `isobox setup`")


def test_ensure_user_existing_and_failure(monkeypatch):
    pool._ensure_user("root")  # exists: nothing to do
    monkeypatch.setattr(shutil, "which", lambda name: "/bin/false")
    with pytest.raises(PoolError, match="cannot create user isobox-no-such-user"):
        pool._ensure_user("isobox-no-such-user")
