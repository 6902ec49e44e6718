"""Many processes allocating from one DB at once must never get the same range."""
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing

from isobox.ids.allocator import Allocator

PROCS, PER_PROC = 16, 8
POOL = (1048576, 65536 * PROCS * PER_PROC)  # exactly enough: any double-use shows up

# Each worker waits for a "go" file so that all of them start contending together.
WORKER = r"""
import json, os, sys, time
from isobox.ids.allocator import Allocator, Holder
db, root, go, worker, mode = sys.argv[1:6]
while not os.path.exists(go):
    time.sleep(0.001)
a = Allocator(db, pool=(%d, %d))
out = []
for j in range(%d):
    h = Holder(root, f"w{worker}-{j}")
    out.append(a.allocate(h) if mode == "allocate" else a.release(h))
print(json.dumps(out))
""" % (POOL[0], POOL[1], PER_PROC)


def _run_all(tmp_path, mode):
    db, root, go = str(tmp_path / "ids.db"), str(tmp_path / "run"), tmp_path / f"go-{mode}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, db, root, str(go), str(i), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCS)]
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and not err, err
        results.extend(json.loads(out))
    return results


def test_concurrent_allocate_then_release(tmp_path):
    Allocator(str(tmp_path / "ids.db"), pool=POOL)  # not required, but checks re-init is fine
    bases = _run_all(tmp_path, "allocate")
    assert len(bases) == PROCS * PER_PROC
    assert len(set(bases)) == len(bases)
    assert all(b % 65536 == 0 and POOL[0] <= b < POOL[0] + POOL[1] for b in bases)
    assert len(Allocator(str(tmp_path / "ids.db"), pool=POOL).holders()) == len(bases)

    freed = _run_all(tmp_path, "release")
    assert sorted(freed) == sorted(bases)
    a = Allocator(str(tmp_path / "ids.db"), pool=POOL)
    assert a.holders() == []
    with closing(sqlite3.connect(a.db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM ranges").fetchone()[0] == 0
    assert not os.path.exists(a.db_path + "-journal")
