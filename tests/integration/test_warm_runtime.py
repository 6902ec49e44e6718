"""isobox-runc's warm path: the installed wrapper hands start/state/kill/delete/... to
isoboxd's pre-imported worker (daemon/warm.py), which must behave exactly like the
in-process runtime: the caller's fds, working directory, environment and exit code."""
from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time

import pytest

from isobox.daemon import client, paths

WRAPPER = "/usr/local/bin/isobox-runc"


@pytest.fixture
def warm():
    if not os.path.exists(WRAPPER):
        pytest.skip("isobox-runc is not installed (scripts/setup.sh)")
    client.ensure_running()
    deadline = time.monotonic() + 10
    while not os.path.exists(paths.WARM_SOCKET) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(paths.WARM_SOCKET), "the warm worker did not start"


def wrapper(runtime, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([WRAPPER, "--root", runtime.root, *args], capture_output=True, text=True, timeout=60,
                          env=env, **kw)


def started(runtime, rootfs: str) -> str:
    b = runtime.bundle(rootfs, ["sh", "-c", "exec sleep 300 </dev/null >/dev/null 2>&1"])
    cid = runtime.new_id()
    runtime("run", "--detach", "--bundle", b, cid, check=True, timeout=30)
    return cid


def served_warm(runtime, tmp_path, *args: str, env=None) -> tuple[subprocess.CompletedProcess, bool]:
    log = tmp_path / f"log-{time.monotonic_ns()}"
    r = wrapper(runtime, "--debug", "--log", str(log), *args, env=env)
    text = log.read_text() if log.exists() else ""
    return r, "served by isoboxd's warm worker" in text


def test_state_kill_delete_are_served_warm_with_the_callers_output(warm, runtime, busybox_rootfs, tmp_path):
    status = subprocess.run(["isobox", "daemon", "--status"], capture_output=True, text=True, timeout=30)
    assert "warm worker answering" in status.stdout, status.stdout + status.stderr
    cid = started(runtime, busybox_rootfs)
    r, warm_ = served_warm(runtime, tmp_path, "state", cid)
    assert r.returncode == 0 and warm_, r.stderr
    assert json.loads(r.stdout)["status"] == "running"
    r, warm_ = served_warm(runtime, tmp_path, "kill", cid, "KILL")
    assert r.returncode == 0 and warm_, r.stderr
    deadline = time.monotonic() + 10
    while json.loads(wrapper(runtime, "state", cid).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r, warm_ = served_warm(runtime, tmp_path, "delete", cid)
    assert r.returncode == 0 and warm_, r.stderr
    # errors: the same line and exit code as in-process
    r, warm_ = served_warm(runtime, tmp_path, "delete", cid)
    local = wrapper(runtime, "delete", cid, env={**os.environ, "ISOBOX_WARM": "0"})
    assert warm_ and r.returncode == local.returncode == 1
    assert r.stderr == local.stderr == "isobox-runc: container does not exist\n"


def test_create_run_exec_stay_in_the_callers_process(warm, runtime, busybox_rootfs, tmp_path):
    b = runtime.bundle(busybox_rootfs, ["true"])
    cid = runtime.new_id()
    r, warm_ = served_warm(runtime, tmp_path, "run", "--bundle", b, cid)
    assert r.returncode == 0 and not warm_, r.stderr


def test_stdin_cwd_and_environment_reach_the_worker(warm, runtime, busybox_rootfs, tmp_path):
    cid = started(runtime, busybox_rootfs)
    # stdin: update -r - reads the resources from the caller's stdin
    r = subprocess.run([WRAPPER, "--root", runtime.root, "update", "-r", "-", cid], capture_output=True, text=True,
                       input=json.dumps({"pids": {"limit": 77}}), timeout=60)
    assert r.returncode == 0, r.stderr
    pid = json.loads(runtime("state", cid, check=True).stdout)["pid"]
    with open(f"/proc/{pid}/cgroup") as f:
        rel = next(line.split(":", 2)[2].strip() for line in f if line.split(":")[1] == "pids")
    with open(f"/sys/fs/cgroup/pids{rel}/pids.max") as f:
        assert f.read().strip() == "77"
    # cwd: a relative --root is the caller's, not the worker's
    parent, name = os.path.split(runtime.root)
    r = subprocess.run([WRAPPER, "--root", name, "list", "-q"], capture_output=True, text=True, cwd=parent, timeout=60)
    assert r.returncode == 0 and cid in r.stdout.split(), r.stderr
    # environment: ISOBOX_ARGV_LOG is honoured, with the caller's parent as ppid
    rec = tmp_path / "argv.jsonl"
    r = wrapper(runtime, "state", cid, env={**os.environ, "ISOBOX_ARGV_LOG": str(rec)})
    assert r.returncode == 0
    line = json.loads(rec.read_text().splitlines()[-1])
    assert line["argv"][-2:] == ["state", cid] and line["ppid"] == os.getpid()


def test_a_non_root_caller_is_not_served(warm, runtime, tmp_path):
    """The worker acts as root: its socket is root's only, so another user runs in-process
    (and gets the runtime's own answer for what it may not do)."""
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    log = tmp_path / "log"
    os.chmod(tmp_path, 0o777)
    r = subprocess.run([WRAPPER, "--debug", "--log", str(log), "--root", str(tmp_path / "r"), "list"],
                       capture_output=True, text=True, preexec_fn=drop, timeout=60)
    assert "served by isoboxd's warm worker" not in (log.read_text() if log.exists() else "")
    assert r.returncode in (0, 1)


def test_a_killed_worker_is_replaced_and_calls_keep_working(warm, runtime, busybox_rootfs, tmp_path):
    cid = started(runtime, busybox_rootfs)
    with open(f"/run/isobox/isoboxd.pid") as f:
        holder = int(f.read())
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(holder)], capture_output=True,
                                               text=True).stdout.split()]
    warm_pid = next(p for p in workers if b"isobox.daemon.warm" in open(f"/proc/{p}/cmdline", "rb").read())
    os.kill(warm_pid, signal.SIGKILL)
    r = wrapper(runtime, "state", cid)         # served in-process meanwhile, or by the new worker
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == cid
    deadline = time.monotonic() + 15
    while True:
        r, warm_ = served_warm(runtime, tmp_path, "state", cid)
        if warm_:
            break
        assert time.monotonic() < deadline, "the holder did not restart the warm worker"
        time.sleep(0.2)
    # the killed worker's spares died with it: nothing of it is left
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-P", str(warm_pid)], capture_output=True, text=True).stdout.split()
    assert left == []
