"""The exact (command, flag set) forms the engines issue, each called directly.

tests/e2e/test_zz_argv_coverage.py maps every form recorded during the end-to-end suite to a
test; the forms no other integration test calls with exactly that flag set are here:
dockerd's and containerd's runc shim (--root, --log, --log-format json on every call) and
Podman's conmon (no --root: the default state dir; --log-format=json --log only on
create and exec)."""
import json
import os
import time

import pytest

from conftest import RUNC
from test_conformance import quiet
from test_exec_tty import ConsoleServer, read_until


def _status(runtime, cid, root=None):
    r = runtime("state", cid) if root is None else quiet([*RUNC, "--root", root, "state", cid], tmp=runtime.tmp)
    return json.loads(r.stdout)["status"] if r.returncode == 0 else None


def _wait_status(runtime, cid, want, root=None):
    for _ in range(250):
        if _status(runtime, cid, root) == want:
            return True
        time.sleep(0.02)
    return False


def _process(tmp, args, terminal=False):
    path = os.path.join(tmp, f"process-{os.urandom(4).hex()}.json")
    with open(path, "w") as f:
        json.dump({"terminal": terminal, "args": args, "env": ["PATH=/bin:/usr/bin", "TERM=xterm"], "cwd": "/",
                   "user": {"uid": 0, "gid": 0}}, f)
    return path


class Shim:
    """Calls as containerd-shim-runc-v2 makes them: --root R --log L --log-format json CMD ..."""

    def __init__(self, runtime, bundle):
        self.rt = runtime
        self.base = [*RUNC, "--root", runtime.root, "--log", os.path.join(bundle, "log.json"), "--log-format", "json"]

    def __call__(self, *args, **kw):
        return quiet([*self.base, *args], tmp=self.rt.tmp, **kw)


@pytest.fixture
def shim_container(runtime, busybox_rootfs):
    """create --bundle --pid-file, start: a running `sleep` under the shim's flags."""
    bundle = runtime.bundle(busybox_rootfs, ["sleep", "300"])
    shim = Shim(runtime, bundle)
    cid = runtime.new_id()
    pid_file = os.path.join(bundle, "init.pid")
    r = shim("create", "--bundle", bundle, "--pid-file", pid_file, cid, cwd=bundle)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert os.path.exists(f"/proc/{int(open(pid_file).read())}")
    r = shim("start", cid)
    assert r.returncode == 0, r.stderr
    return shim, cid, bundle


def test_version_form():
    import subprocess
    r = subprocess.run([*RUNC, "--version"], capture_output=True, text=True, timeout=30)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and " version " in lines[0] and lines[1].startswith("commit:") \
        and lines[2].startswith("spec: ")


def test_shim_create_pid_file_start_delete_force(runtime, shim_container):
    shim, cid, _ = shim_container
    assert _status(runtime, cid) == "running"
    r = shim("delete", "--force", cid)
    assert r.returncode == 0, r.stderr
    assert runtime("state", cid).returncode != 0
    r = shim("delete", "--force", cid)          # the shim's cleanup after a delete: gone already,
    assert r.returncode == 0 and r.stderr == ""  # which runc 1.1 answers with success


def test_shim_exec_console_socket_detach(runtime, shim_container, tmp_path):
    shim, cid, _ = shim_container
    server = ConsoleServer(str(tmp_path / "exec-console.sock"))
    pid_file = str(tmp_path / "exec.pid")
    r = shim("exec", "--process", _process(str(tmp_path), ["sh"], terminal=True), "--console-socket",
             server.path, "--detach", "--pid-file", pid_file, cid)
    assert r.returncode == 0, r.stderr
    master = server.master()
    try:
        assert os.path.exists(f"/proc/{int(open(pid_file).read())}")
        os.write(master, b"tty; echo form-$((40+2))\n")
        out = read_until(master, b"form-42")
        assert b"form-42" in out and b"/dev/pts/" in out
        os.write(master, b"exit\n")
    finally:
        os.close(master)


def test_shim_pause_resume_ps_update(runtime, shim_container):
    shim, cid, _ = shim_container
    assert shim("pause", cid).returncode == 0
    assert _status(runtime, cid) == "paused"
    assert shim("resume", cid).returncode == 0
    assert _status(runtime, cid) == "running"
    r = shim("ps", "--format", "json", cid)
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1
    import subprocess
    r = subprocess.run([*shim.base, "update", "--resources", "-", cid], capture_output=True, text=True,
                       input=json.dumps({"memory": {"limit": 96 << 20}, "cpu": {"quota": 50000, "period": 100000},
                                         "pids": {"limit": 50}}), timeout=60)
    assert r.returncode == 0, r.stderr
    init = json.loads(runtime("state", cid, check=True).stdout)["pid"]
    with open(f"/proc/{init}/cgroup") as f:
        mem = next(l.split(":", 2)[2].strip() for l in f if ":memory:" in l)
    assert open(f"/sys/fs/cgroup/memory{mem}/memory.limit_in_bytes").read().strip() == str(96 << 20)


def test_shim_kill_then_delete(runtime, shim_container):
    shim, cid, _ = shim_container
    assert shim("kill", cid, "9").returncode == 0
    assert _wait_status(runtime, cid, "stopped")
    assert shim("delete", cid).returncode == 0


def _shim_started(runtime, bundle: str) -> tuple[Shim, str, int]:
    shim, cid = Shim(runtime, bundle), runtime.new_id()
    pid_file = os.path.join(bundle, "init.pid")
    r = shim("create", "--bundle", bundle, "--pid-file", pid_file, cid, cwd=bundle)
    assert r.returncode == 0, r.stderr
    assert shim("start", cid).returncode == 0
    return shim, cid, int(open(pid_file).read())


def test_shim_kill_all_reaches_what_a_shared_pid_namespace_leaves(runtime, busybox_rootfs):
    """kill --all, which the shim sends after kill: every process still in the container's
    cgroup, also once its init is gone (in a joined pid namespace the init's death does not
    end its children), and no error for a stopped container, as runc."""
    first = _shim_started(runtime, runtime.bundle(busybox_rootfs, ["sleep", "300"]))[2]

    def join_pid(spec: dict) -> None:
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "pid":
                ns["path"] = f"/proc/{first}/ns/pid"

    bundle = runtime.bundle(busybox_rootfs, ["sh", "-c", "sleep 301 & sleep 302 & wait"], edit=join_pid)
    shim, cid, init = _shim_started(runtime, bundle)
    init_cg = open(f"/proc/{init}/cgroup").read()
    for _ in range(100):
        children = [p for p in _cgroup_procs(init_cg) if p != init]
        if len(children) == 2:
            break
        time.sleep(0.02)
    assert len(children) == 2, children
    assert shim("kill", cid, "9").returncode == 0
    assert _wait_status(runtime, cid, "stopped")
    assert all(os.path.exists(f"/proc/{p}") for p in children)   # left alive by the init's death
    assert shim("kill", cid, "9").returncode != 0                 # a plain kill: not running
    r = shim("kill", "--all", cid, "9")
    assert r.returncode == 0, r.stderr
    for _ in range(250):
        if not _cgroup_procs(init_cg):
            break
        time.sleep(0.02)
    assert _cgroup_procs(init_cg) == []
    assert shim("kill", "--all", cid, "9").returncode == 0         # nothing left: still no error
    assert shim("delete", cid).returncode == 0


def _cgroup_procs(proc_cgroup: str) -> list[int]:
    """The pids in the memory cgroup a /proc/PID/cgroup text names."""
    mem = next(l.split(":", 2)[2].strip() for l in proc_cgroup.splitlines() if ":memory:" in l)
    with open(f"/sys/fs/cgroup/memory{mem}/cgroup.procs") as f:
        return [int(p) for p in f.read().split()]


# ---------------------------------------------------------------------------- Podman (conmon)
@pytest.fixture
def default_root_ids():
    """Containers made in the default state dir (/run/isobox), as conmon calls without --root."""
    ids = []
    yield ids
    for cid in ids:
        quiet([*RUNC, "delete", "--force", cid], tmp="/tmp")


def _conmon_create(runtime, busybox_rootfs, ids, tmp, terminal=False, args=("sleep", "300")):
    def edit(spec):
        spec["process"]["terminal"] = terminal
    bundle = runtime.bundle(busybox_rootfs, list(args), edit=edit)
    cid = "form" + os.urandom(5).hex()
    ids.append(cid)
    log = os.path.join(bundle, "oci-log")
    pid_file = os.path.join(bundle, "pidfile")
    flags = ["--bundle", bundle, "--pid-file", pid_file]
    server = None
    if terminal:
        server = ConsoleServer(os.path.join(tmp, f"c-{cid}.sock"))
        flags += ["--console-socket", server.path]
    r = quiet([*RUNC, "--log-format=json", "--log", log, "create", *flags, cid], tmp=runtime.tmp, cwd=bundle)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(f"/proc/{int(open(pid_file).read())}")
    return cid, bundle, server


def test_conmon_create_start_kill_delete_force(runtime, busybox_rootfs, default_root_ids, tmp_path):
    cid, bundle, _ = _conmon_create(runtime, busybox_rootfs, default_root_ids, str(tmp_path))
    assert quiet([*RUNC, "start", cid], tmp=runtime.tmp).returncode == 0
    assert _wait_status(runtime, cid, "running", root="/run/isobox")
    log = os.path.join(bundle, "oci-log")
    pid_file = str(tmp_path / "exec.pid")
    r = quiet([*RUNC, "--log-format=json", "--log", log, "exec", "--process", _process(str(tmp_path), ["sleep", "50"]),
               "--detach", "--pid-file", pid_file, cid], tmp=runtime.tmp)
    assert r.returncode == 0, r.stderr
    assert open(f"/proc/{int(open(pid_file).read())}/cmdline").read().startswith("sleep")
    assert quiet([*RUNC, "pause", cid], tmp=runtime.tmp).returncode == 0
    assert _status(runtime, cid, root="/run/isobox") == "paused"
    assert quiet([*RUNC, "resume", cid], tmp=runtime.tmp).returncode == 0
    assert _status(runtime, cid, root="/run/isobox") == "running"
    assert quiet([*RUNC, "kill", cid, "KILL"], tmp=runtime.tmp).returncode == 0
    assert _wait_status(runtime, cid, "stopped", root="/run/isobox")
    assert quiet([*RUNC, "delete", "--force", cid], tmp=runtime.tmp).returncode == 0
    assert _status(runtime, cid, root="/run/isobox") is None


def test_conmon_terminal_create_and_exec_tty(runtime, busybox_rootfs, default_root_ids, tmp_path):
    cid, bundle, server = _conmon_create(runtime, busybox_rootfs, default_root_ids, str(tmp_path), terminal=True,
                                         args=("sh",))
    master = server.master()
    try:
        assert quiet([*RUNC, "start", cid], tmp=runtime.tmp).returncode == 0
        os.write(master, b"echo init-$((40+2))\n")
        assert b"init-42" in read_until(master, b"init-42")
        exec_server = ConsoleServer(str(tmp_path / "exec.sock"))
        pid_file = str(tmp_path / "exec.pid")
        r = quiet([*RUNC, "--log-format=json", "--log", os.path.join(bundle, "oci-log"), "exec", "--console-socket",
                   exec_server.path, "--detach", "--pid-file", pid_file, "--process",
                   _process(str(tmp_path), ["sh"], terminal=True), "--tty", cid], tmp=runtime.tmp)
        assert r.returncode == 0, r.stderr
        em = exec_server.master()
        try:
            os.write(em, b"echo exec-$((40+2))\n")
            assert b"exec-42" in read_until(em, b"exec-42")
            os.write(em, b"exit\n")
        finally:
            os.close(em)
    finally:
        os.close(master)
    assert quiet([*RUNC, "delete", "--force", cid], tmp=runtime.tmp).returncode == 0


# ---------------------------------------------------------------------------- dockerd's BuildKit (go-runc)
def test_buildkit_run_foreground(runtime, busybox_rootfs, default_root_ids, tmp_path):
    """dockerd 20.10's BuildKit runs each RUN step as `runc --log L --log-format json run --bundle B ID`
    (go-runc Run, no --root: the default state dir; stdio are pipes; recorded by tests/e2e/test_gate_buildkit.py):
    foreground, the step's exit status is run's, and nothing is left in the state dir."""
    bundle = runtime.bundle(busybox_rootfs, ["sh", "-c", "cat /proc/self/uid_map; exit 3"])
    cid = "bk" + os.urandom(5).hex()
    default_root_ids.append(cid)
    log = os.path.join(bundle, "runc-log.json")
    r = quiet([*RUNC, "--log", log, "--log-format", "json", "run", "--bundle", bundle, cid], tmp=runtime.tmp)
    assert r.returncode == 3, r.stderr
    inside, host_base, count = r.stdout.split()
    assert inside == "0" and int(host_base) > 0 and count == "65536", r.stdout
    assert _status(runtime, cid, root="/run/isobox") is None      # run deletes what it made
