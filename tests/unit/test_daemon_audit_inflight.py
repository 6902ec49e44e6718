"""The audit buffer (merging repeats, writing on flush) and the in-flight slots file."""
from __future__ import annotations

import json
import os

from isobox.daemon.fs.context import Container
from isobox.daemon.syscalls.audit import Audit
from isobox.daemon.syscalls.call import Call, done, refuse
from isobox.daemon.syscalls.inflight import SLOTS, Inflight


def call(pid: int, name: str = "mount", **detail) -> Call:
    c = Container(key="k", id="c1", uid_base=0, gid_base=0, cgroups={}, created=0.0)
    return Call(listener=-1, id=1, pid=pid, nr=0, arch=0, args=(0,) * 6, name=name, container=c, detail=dict(detail))


def lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_nothing_is_written_before_a_flush_and_repeats_merge(tmp_path):
    log = tmp_path / "audit.log"
    a = Audit(str(log))
    me = os.getpid()
    for _ in range(5):
        a.add(call(me, fstype="ext4"), refuse(1, "no"))
    a.add(call(me, fstype="xfs"), refuse(1, "no"))
    a.add(call(me, fstype="ext4"), refuse(1, "no"))
    a.add(call(me, name="mknod", path="/dev/x"), done(0, "made"))
    assert not log.exists() or lines(log) == []
    a.flush()
    got = lines(log)
    assert [(e["syscall"], e["args"].get("fstype"), e.get("count", 1)) for e in got] == \
        [("mount", "ext4", 6), ("mount", "xfs", 1), ("mknod", None, 1)]
    assert got[0]["decision"] == "refused" and got[0]["errno"] == os.strerror(1)
    assert got[0]["command"] and got[0]["container"] == "c1" and got[0]["pid"] == me
    assert got[2]["decision"] == "performed" and "errno" not in got[2]
    a.flush()                                   # nothing pending: nothing more written
    assert len(lines(log)) == 3


def test_write_is_immediate_and_unhashable_arguments_are_not_merged(tmp_path):
    log = tmp_path / "audit.log"
    a = Audit(str(log))
    a.write(call(os.getpid(), opts=["a"]), refuse(1, "x"))
    assert len(lines(log)) == 1
    a.add(call(os.getpid(), opts=["a"]), refuse(1, "x"))
    a.add(call(os.getpid(), opts=["a"]), refuse(1, "x"))
    a.flush()
    assert len(lines(log)) == 3


def test_inflight_slots_survive_a_new_owner_and_are_cleared_once_taken(tmp_path):
    path = str(tmp_path / "inflight")
    first = Inflight(path)
    raw = bytes(range(80))
    kept = first.begin("container-a", raw)
    ended = first.begin("container-b", b"\x01" * 80)
    first.end(ended)
    assert kept >= 0
    second = Inflight(path)                     # a new server, the old one died mid-call
    assert second.take() == [("container-a", raw)]
    assert Inflight(path).take() == []


def test_inflight_full_means_not_saved(tmp_path):
    f = Inflight(str(tmp_path / "inflight"))
    slots = [f.begin("k", b"\0" * 80) for _ in range(SLOTS)]
    assert -1 not in slots and f.begin("k", b"\0" * 80) == -1
    f.end(slots[0])
    assert f.begin("k", b"\0" * 80) == slots[0]
