"""ps, pause/resume, update, events and the declared-unsupported commands."""
import json
import os
import subprocess
import time

import pytest

from conftest import RUNC


def detached(runtime, *args):
    with open(os.path.join(runtime.tmp, "o"), "w") as o, open(os.path.join(runtime.tmp, "e"), "w") as e:
        r = subprocess.run([*RUNC, "--root", runtime.root, *args], stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                           timeout=60)
    return r.returncode


@pytest.fixture
def running(runtime, busybox_rootfs):
    def limits(spec):
        spec["linux"]["resources"] = {"memory": {"limit": 256 * 1024 * 1024}, "pids": {"limit": 100}}
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/tick; sleep 0.05; done"],
                       edit=limits)
    cid = runtime.new_id()
    assert detached(runtime, "run", "-d", "--bundle", b, cid) == 0
    st = json.loads(runtime("state", cid, check=True).stdout)
    return cid, st["pid"]


def cgfile(pid, controller, name):
    for line in open(f"/proc/{pid}/cgroup"):
        _, ctrls, path = line.strip().split(":", 2)
        if controller in ctrls.split(","):
            return open(f"/sys/fs/cgroup/{controller}{path}/{name}").read().strip()
    raise AssertionError(controller)


def test_ps_json_and_table(runtime, busybox_rootfs):
    cid = runtime.new_id()
    assert detached(runtime, "run", "-d", "--bundle", runtime.bundle(busybox_rootfs, ["sleep", "300"]), cid) == 0
    init = json.loads(runtime("state", cid, check=True).stdout)["pid"]
    assert detached(runtime, "exec", "-d", cid, "sleep", "77") == 0
    pids = json.loads(runtime("ps", "--format", "json", cid, check=True).stdout)
    assert init in pids and len(pids) >= 2
    table = runtime("ps", cid, check=True).stdout.splitlines()
    assert "PID" in table[0].split()
    assert any("sleep 77" in line for line in table[1:])
    assert all(int(line.split()[table[0].split().index("PID")]) in pids for line in table[1:])


def test_pause_and_resume(runtime, running):
    cid, init = running
    runtime("pause", cid, check=True)
    assert json.loads(runtime("state", cid).stdout)["status"] == "paused"
    before = open(f"/proc/{init}/root/tmp/tick").read()
    time.sleep(0.3)
    assert open(f"/proc/{init}/root/tmp/tick").read() == before, "a paused container made progress"
    r = runtime("exec", cid, "true")
    assert r.returncode != 0 and "paused" in r.stderr
    r = runtime("pause", cid)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    runtime("resume", cid, check=True)
    assert json.loads(runtime("state", cid).stdout)["status"] == "running"
    time.sleep(0.3)
    assert open(f"/proc/{init}/root/tmp/tick").read() != before
    r = runtime("resume", cid)
    assert r.returncode != 0 and "not paused" in r.stderr


def test_update_flags_file_and_stdin(runtime, running):
    cid, init = running
    runtime("update", "--memory", "128m", "--pids-limit", "50", cid, check=True)
    assert cgfile(init, "memory", "memory.limit_in_bytes") == str(128 * 1024 * 1024)
    assert cgfile(init, "pids", "pids.max") == "50"
    path = os.path.join(runtime.tmp, "res.json")
    with open(path, "w") as f:
        json.dump({"cpu": {"quota": 20000, "period": 100000}}, f)
    runtime("update", "-r", path, cid, check=True)
    assert cgfile(init, "cpu", "cpu.cfs_quota_us") == "20000"
    runtime("update", "-r", "-", cid, input=json.dumps({"pids": {"limit": 40}}), check=True)
    assert cgfile(init, "pids", "pids.max") == "40"
    r = runtime("update", "--memory", "lots", cid)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = runtime("update", "--kernel-memory", "1m", cid)
    assert r.returncode != 0 and "not supported" in r.stderr


def test_events_stats_one_shot(runtime, running):
    cid, _ = running
    r = runtime("events", "--stats", cid, check=True)
    ev = json.loads(r.stdout)
    assert ev["type"] == "stats" and ev["id"] == cid
    assert ev["data"]["memory"]["usage"]["usage"] > 0
    assert ev["data"]["pids"]["current"] >= 1


@pytest.mark.parametrize("argv", [["checkpoint", "x"], ["restore", "--image-path", "/tmp/i", "x"],
                                  ["--criu", "/usr/sbin/criu", "checkpoint", "x"]])
def test_checkpoint_restore_declared_unsupported(runtime, argv):
    r = runtime(*argv)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "not supported" in r.stderr


def test_features_declare_checkpoint_off(runtime):
    f = json.loads(runtime("features", check=True).stdout)
    assert f["annotations"]["org.opencontainers.runc.checkpoint.enabled"] == "false"
    assert f["linux"]["cgroup"]["systemd"] is False


def test_update_every_flag_form(runtime, running):
    cid, init = running
    runtime("update", "--cpu-period", "200000", "--cpu-quota", "50000", "--cpu-share", "512",
            "--cpuset-cpus", "0", "--cpuset-mems", "0", "--memory", "200m", "--memory-reservation", "100m",
            "--memory-swap", "300m", "--pids-limit", "33", cid, check=True)
    assert cgfile(init, "cpu", "cpu.cfs_period_us") == "200000"
    assert cgfile(init, "cpu", "cpu.cfs_quota_us") == "50000"
    assert cgfile(init, "cpu", "cpu.shares") == "512"
    assert cgfile(init, "cpuset", "cpuset.cpus") == "0"
    assert cgfile(init, "memory", "memory.limit_in_bytes") == str(200 * 1024 * 1024)
    assert cgfile(init, "memory", "memory.soft_limit_in_bytes") == str(100 * 1024 * 1024)
    assert cgfile(init, "pids", "pids.max") == "33"
    if os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"):
        assert cgfile(init, "memory", "memory.memsw.limit_in_bytes") == str(300 * 1024 * 1024)
    for flag, value in (("--cpu-rt-period", "1000000"), ("--cpu-rt-runtime", "0"), ("--blkio-weight", "500")):
        r = runtime("update", flag, value, cid)
        # applied, or refused in one line where this host has no such knob
        assert r.returncode == 0 or (len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr)
    for flag in ("--l3-cache-schema", "--mem-bw-schema", "--kernel-memory-tcp"):
        r = runtime("update", flag, "x", cid)
        assert r.returncode != 0 and "not supported" in r.stderr
