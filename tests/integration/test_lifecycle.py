"""isobox-runc's lifecycle commands, end to end, as an engine drives them.

create/run --detach are run with stdout/stderr in files, not pipes: the container's init
inherits them (as with runc), so a pipe would not reach EOF until the container exits.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import RUNC, ids_held, leftovers

STATE_KEYS = ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner"]
LOOP = "trap 'exit 3' TERM; while true; do sleep 0.1; done"


# --- helpers -----------------------------------------------------------------------------

def detached(runtime, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run an isobox-runc command whose container outlives it (create, run -d)."""
    n = len(os.listdir(runtime.tmp))
    out, err = os.path.join(runtime.tmp, f"out{n}"), os.path.join(runtime.tmp, f"err{n}")
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.run([*RUNC, "--root", runtime.root, *args], stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                           timeout=timeout)
    with open(out) as o, open(err) as e:
        return subprocess.CompletedProcess(p.args, p.returncode, o.read(), e.read())


def create(runtime, bundle: str, *flags: str, cid: str | None = None) -> str:
    cid = cid or runtime.new_id()
    r = detached(runtime, "create", "--bundle", bundle, *flags, cid)
    assert r.returncode == 0, r.stderr
    return cid


def state(runtime, cid: str) -> dict:
    r = runtime("state", cid, check=True)
    return json.loads(r.stdout)


def wait_status(runtime, cid: str, want: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = state(runtime, cid)
        if st["status"] == want or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert "usage:" not in r.stderr and "usage:" not in r.stdout, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    return lines[0]


def nspid(pid: int) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return line.split()[1:]
    raise AssertionError("no NSpid line")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(")") + 2] not in "ZX"


@pytest.fixture
def looping(runtime, busybox_rootfs):
    """A bundle whose process exits 3 on SIGTERM and otherwise runs until killed."""
    return runtime.bundle(busybox_rootfs, ["sh", "-c", LOOP])


# --- create / state / start --------------------------------------------------------------

def test_create_pid_file(runtime, looping):
    piddir = os.path.join(runtime.tmp, "pids")
    os.mkdir(piddir)
    pidfile = os.path.join(piddir, "init.pid")
    cid = create(runtime, looping, "--pid-file", pidfile)
    # create has returned: the file must already be complete and alone in its directory
    assert os.listdir(piddir) == ["init.pid"]
    with open(pidfile) as f:
        text = f.read()
    pid = int(text.strip())
    assert pid_alive(pid)
    assert nspid(pid)[-1] == "1" and len(nspid(pid)) >= 2
    assert state(runtime, cid)["pid"] == pid


def test_state_keys_and_status_transitions(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "sleep 1"])
    cid = create(runtime, b)
    st = state(runtime, cid)
    assert list(st) == STATE_KEYS
    assert st["id"] == cid and st["status"] == "created" and st["pid"] > 0
    assert st["bundle"] == b and st["ociVersion"]
    assert st["rootfs"] == busybox_rootfs
    assert st["created"].endswith("Z")
    runtime("start", cid, check=True)
    assert state(runtime, cid)["status"] == "running"
    st = wait_status(runtime, cid, "stopped")
    assert st["status"] == "stopped" and st["pid"] == 0
    assert list(st) == STATE_KEYS
    runtime("delete", cid, check=True)
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_state_has_annotations_when_spec_has_them(runtime, busybox_rootfs):
    ann = {"org.example.k": "v", "io.kubernetes.cri.container-type": "container"}
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", LOOP], edit=lambda s: s.update(annotations=ann))
    cid = create(runtime, b)
    st = state(runtime, cid)
    assert list(st) == STATE_KEYS[:7] + ["annotations", "owner"]   # runc's order
    assert st["annotations"] == ann


def test_start_twice_fails(runtime, looping):
    cid = create(runtime, looping)
    runtime("start", cid, check=True)
    assert "already running" in one_line_error(runtime("start", cid))
    assert state(runtime, cid)["status"] == "running"


def test_start_of_stopped_fails(runtime, busybox_rootfs):
    cid = create(runtime, runtime.bundle(busybox_rootfs, ["true"]))
    runtime("start", cid, check=True)
    assert wait_status(runtime, cid, "stopped")["status"] == "stopped"
    assert "stopped" in one_line_error(runtime("start", cid))


# --- kill ----------------------------------------------------------------------------------

def _running(runtime, bundle):
    cid = create(runtime, bundle)
    runtime("start", cid, check=True)
    assert state(runtime, cid)["status"] == "running"
    time.sleep(0.3)   # let sh install its trap
    return cid


def test_kill_default_is_term(runtime, looping):
    cid = _running(runtime, looping)
    runtime("kill", cid, check=True)
    assert wait_status(runtime, cid, "stopped")["status"] == "stopped"


def test_kill_term_ignored_without_trap_but_kill_works(runtime, busybox_rootfs):
    # pid 1 ignores signals it has no handler for, except SIGKILL from an ancestor namespace
    cid = _running(runtime, runtime.bundle(busybox_rootfs, ["sleep", "30"]))
    runtime("kill", cid, "TERM", check=True)
    time.sleep(0.3)
    assert state(runtime, cid)["status"] == "running"
    runtime("kill", cid, "KILL", check=True)
    assert wait_status(runtime, cid, "stopped")["status"] == "stopped"


@pytest.mark.parametrize("sig", ["KILL", "SIGKILL", "9", "kill"])
def test_kill_by_name_and_number(runtime, busybox_rootfs, sig):
    cid = _running(runtime, runtime.bundle(busybox_rootfs, ["sleep", "30"]))
    runtime("kill", cid, sig, check=True)
    assert wait_status(runtime, cid, "stopped")["status"] == "stopped"


def test_kill_all(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "sleep 100 & sleep 200 & wait"])
    cid = _running(runtime, b)
    init = state(runtime, cid)["pid"]
    with open(f"/proc/{init}/task/{init}/children") as f:
        children = [int(p) for p in f.read().split()]
    assert len(children) == 2
    runtime("kill", "--all", cid, "KILL", check=True)
    assert wait_status(runtime, cid, "stopped")["status"] == "stopped"
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in children)


def test_kill_all_term_reaches_non_init_processes(runtime, busybox_rootfs):
    # TERM to every process: the children die (default action), sh's wait returns, sh exits
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "sleep 100 & wait; sleep 100"])
    cid = _running(runtime, b)
    init = state(runtime, cid)["pid"]
    with open(f"/proc/{init}/task/{init}/children") as f:
        child = int(f.read().split()[0])
    runtime("kill", "-a", cid, "TERM", check=True)
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)


def test_kill_unknown_signal(runtime, looping):
    cid = _running(runtime, looping)
    for bad in ("NOPE", "0", "65", "SIG", "RTMIN+99"):
        line = one_line_error(runtime("kill", cid, bad))
        assert "signal" in line
    assert state(runtime, cid)["status"] == "running"


def test_kill_stopped_container(runtime, busybox_rootfs):
    cid = create(runtime, runtime.bundle(busybox_rootfs, ["true"]))
    runtime("start", cid, check=True)
    wait_status(runtime, cid, "stopped")
    assert "container not running" in one_line_error(runtime("kill", cid, "KILL"))


def test_kill_unknown_container(runtime):
    assert "container does not exist" in one_line_error(runtime("kill", "nosuchcontainer", "KILL"))


# --- delete ---------------------------------------------------------------------------------

def test_delete_running_needs_force(runtime, looping):
    cid = _running(runtime, looping)
    line = one_line_error(runtime("delete", cid))
    assert f"cannot delete container {cid} that is not stopped: running" in line
    assert state(runtime, cid)["status"] == "running"
    pid = state(runtime, cid)["pid"]
    runtime("delete", "--force", cid, check=True)
    assert not pid_alive(pid)
    assert not os.path.exists(os.path.join(runtime.root, cid))
    assert "container does not exist" in one_line_error(runtime("state", cid))
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_delete_created_container(runtime, looping):
    cid = create(runtime, looping)
    pid = state(runtime, cid)["pid"]
    runtime("delete", cid, check=True)
    assert not pid_alive(pid)
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_delete_unknown(runtime):
    assert "container does not exist" in one_line_error(runtime("delete", "nosuchcontainer"))
    # --force succeeds quietly, as runc's (the shim sends it after every delete)
    r = runtime("delete", "-f", "nosuchcontainer")
    assert r.returncode == 0 and r.stdout == r.stderr == ""


def test_delete_force_takes_the_state_dir_a_killed_create_left(runtime):
    stale = os.path.join(runtime.root, "halfmade")
    os.makedirs(stale)
    open(os.path.join(stale, "config.json"), "w").close()
    assert "container does not exist" in one_line_error(runtime("delete", "halfmade"))
    assert os.path.isdir(stale)
    assert runtime("delete", "--force", "halfmade").returncode == 0
    assert not os.path.exists(stale)


# --- list ------------------------------------------------------------------------------------

def test_list(runtime, looping):
    assert runtime("list", check=True).stdout.split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    a = create(runtime, looping)
    b = _running(runtime, looping)
    r = runtime("list", check=True)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    rows = {l.split()[0]: l.split() for l in lines[1:]}
    assert set(rows) == {a, b}
    assert rows[a][2] == "created" and rows[b][2] == "running"
    assert rows[a][1] == str(state(runtime, a)["pid"]) and rows[a][3] == looping

    js = json.loads(runtime("list", "--format", "json", check=True).stdout)
    assert sorted(s["id"] for s in js) == sorted([a, b])
    assert all(list(s) == STATE_KEYS for s in js)
    assert json.loads(runtime("list", "-f", "json", check=True).stdout) == js

    assert sorted(runtime("list", "-q", check=True).stdout.split()) == sorted([a, b])
    assert sorted(runtime("list", "--quiet", check=True).stdout.split()) == sorted([a, b])
    assert "format" in one_line_error(runtime("list", "--format", "yaml"))


def test_list_empty_json(runtime):
    assert json.loads(runtime("list", "--format", "json", check=True).stdout) == []


# --- run ---------------------------------------------------------------------------------------

def test_run_detach(runtime, looping):
    cid = runtime.new_id()
    t0 = time.monotonic()
    r = detached(runtime, "run", "--detach", "--bundle", looping, cid)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 20
    st = state(runtime, cid)
    assert st["status"] == "running" and pid_alive(st["pid"])


def test_run_detach_pid_file(runtime, looping):
    cid = runtime.new_id()
    pidfile = os.path.join(runtime.tmp, "run.pid")
    r = detached(runtime, "run", "-d", "--pid-file", pidfile, "-b", looping, cid)
    assert r.returncode == 0, r.stderr
    with open(pidfile) as f:
        assert int(f.read()) == state(runtime, cid)["pid"]


def test_run_keep(runtime, busybox_rootfs):
    r = runtime.run(runtime.bundle(busybox_rootfs, ["sh", "-c", "exit 4"]), "--keep")
    assert r.returncode == 4, r.stderr
    cid = runtime.ids[-1]
    st = state(runtime, cid)
    assert st["status"] == "stopped" and st["pid"] == 0
    assert cid in runtime("list", "-q", check=True).stdout.split()
    runtime("delete", cid, check=True)
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_run_without_keep_deletes(runtime, busybox_rootfs):
    r = runtime.run(runtime.bundle(busybox_rootfs, ["true"]))
    assert r.returncode == 0, r.stderr
    cid = runtime.ids[-1]
    assert runtime("list", "-q", check=True).stdout == ""
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_run_exit_code(runtime, busybox_rootfs, code):
    r = runtime.run(runtime.bundle(busybox_rootfs, ["sh", "-c", f"exit {code}"]))
    assert r.returncode == code, r.stderr


def test_run_stdout_and_stdin(runtime, busybox_rootfs):
    r = runtime.run(runtime.bundle(busybox_rootfs, ["sh", "-c", "read x; echo got:$x; echo err >&2"]),
                    input="hello\n")
    assert r.returncode == 0
    assert r.stdout == "got:hello\n"
    assert r.stderr == "err\n"


@pytest.mark.parametrize("attempt", range(6))  # the signal races run's handler set-up: try several times
def test_run_forwards_sigterm(runtime, busybox_rootfs, attempt):
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "trap 'exit 3' TERM; echo ready; sleep 30 & wait"])
    cid = runtime.new_id()
    p = subprocess.Popen([*RUNC, "--root", runtime.root, "run", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 3, err
        assert time.monotonic() - t0 < 10
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


def test_run_killed_container_gives_128_plus_signal(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "echo ready; sleep 30"])
    cid = runtime.new_id()
    p = subprocess.Popen([*RUNC, "--root", runtime.root, "run", "--bundle", b, cid], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        runtime("kill", cid, "KILL", check=True)
        p.communicate(timeout=20)
        assert p.returncode == 128 + signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_run_bad_bundle_leaves_nothing(runtime, busybox_rootfs):
    r = runtime.run(runtime.bundle(busybox_rootfs, ["/no/such/program"]))
    assert "executable" in one_line_error(r) or "no such file" in r.stderr
    cid = runtime.ids[-1]
    assert not os.path.exists(os.path.join(runtime.root, cid))
    assert leftovers(cid) == [] and ids_held(runtime.root) == []


# --- spec / features / version / log ------------------------------------------------------------

def test_spec(runtime, tmp_path):
    d = tmp_path / "specdir"
    d.mkdir()
    r = runtime("spec", cwd=str(d))
    assert r.returncode == 0, r.stderr
    spec = json.loads((d / "config.json").read_text())
    assert spec["ociVersion"] and spec["process"]["args"] and spec["root"]["path"] == "rootfs"
    assert {"type": "user"} in spec["linux"]["namespaces"]
    before = (d / "config.json").read_text()
    assert "exists" in one_line_error(runtime("spec", cwd=str(d)))
    assert (d / "config.json").read_text() == before

    e = tmp_path / "specdir2"
    e.mkdir()
    runtime("spec", "--bundle", str(e), check=True)
    assert json.loads((e / "config.json").read_text()) == spec
    assert "exists" in one_line_error(runtime("spec", "-b", str(e)))


def test_spec_rootless_refused(runtime, tmp_path):
    assert "rootless" in one_line_error(runtime("spec", "--rootless", cwd=str(tmp_path)))
    assert not (tmp_path / "config.json").exists()


def test_features(runtime):
    f = json.loads(runtime("features", check=True).stdout)
    assert "user" in f["linux"]["namespaces"]
    assert {"pid", "network", "ipc", "uts", "mount"} <= set(f["linux"]["namespaces"])
    assert f["ociVersionMin"] and f["ociVersionMax"]
    assert "CAP_SYS_ADMIN" in f["linux"]["capabilities"]


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(runtime, flag):
    r = runtime(flag, check=True)
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("isobox-runc version ")
    assert lines[1].startswith("commit:")
    assert lines[2].startswith("spec:")
    assert r.stderr == ""


def test_log_json_on_failure(runtime, tmp_path):
    log = tmp_path / "runc.log"
    r = runtime("--log", str(log), "--log-format", "json", "delete", "nosuchcontainer")
    assert "container does not exist" in one_line_error(r)
    entries = [json.loads(l) for l in log.read_text().splitlines()]
    errors = [e for e in entries if e.get("level") == "error"]
    assert len(errors) == 1
    assert "container does not exist" in errors[0]["msg"]
    assert errors[0].get("time")


def test_log_text_on_failure(runtime, tmp_path):
    log = tmp_path / "runc.log"
    r = runtime("--log", str(log), "state", "nosuchcontainer")
    one_line_error(r)
    text = log.read_text()
    assert "level=error" in text and "container does not exist" in text


def test_log_flag_after_command(runtime, tmp_path):
    log = tmp_path / "runc.log"
    r = runtime("delete", "--log", str(log), "--log-format=json", "nosuchcontainer")
    one_line_error(r)
    assert json.loads(log.read_text().splitlines()[-1])["level"] == "error"


@pytest.mark.parametrize("argv,word", [
    (["--systemd-cgroup", "list"], "systemd"),
    (["--rootless=true", "list"], "rootless"),
    (["--rootless", "true", "list"], "rootless"),
    (["create", "--no-pivot", "--bundle", "/nonexistent", "x1"], "pivot"),
    (["run", "--no-pivot", "--bundle", "/nonexistent", "x1"], "pivot"),
    (["list", "--bogus"], "--bogus"),
    (["--bogus", "list"], "--bogus"),
    (["frobnicate"], "frobnicate"),
    (["--log-format", "xml", "list"], "log-format"),
    (["state"], "container id"),
    (["delete", "a", "b"], "argument"),
    (["kill"], "container id"),
    (["kill", "a", "TERM", "x"], "container id"),
    (["create", "--bundle"], "--bundle"),
    (["create", "--console-socket", "/nonexistent/s", "--bundle", "/nonexistent", "x1"], "bundle"),
    (["list", "--quiet=maybe"], "quiet"),
])
def test_refused_invocations_are_one_line(runtime, argv, word):
    line = one_line_error(runtime(*argv))
    assert word in line
    assert not os.path.exists(os.path.join(runtime.root, "x1"))


def test_rootless_false_and_auto_accepted(runtime):
    assert runtime("--rootless=false", "list", check=True).stdout.split()[0] == "ID"
    assert runtime("--rootless", "auto", "list", check=True).stdout.split()[0] == "ID"


def test_no_command_prints_usage_and_fails(runtime):
    r = runtime()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert runtime("--help").returncode == 0
