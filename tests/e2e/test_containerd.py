"""containerd 1.6 (ctr 1.6.20) driving isobox-runc through the runc v2 shim, end to end.

The tests start their own containerd (own root, state and socket under /run/isobox-e2e and
/var/lib/isobox-e2e, CRI plugin off) with ISOBOX_ARGV_LOG set, so the shim's every isobox-runc
call is recorded; they import a busybox OCI archive built here and use their own ctr namespace.

ctr ignores the CRI `runtimes` table of config.toml: it reaches isobox-runc through the runc v2
shim's options, which ctr 1.6 sets only from `--runc-binary` (BinaryName) for the runtime
io.containerd.runc.v2 (`--runtime-config-path` is only sent for other runtimes). The config
below still registers the CRI runtime "isobox" as `isobox install` will, and a test checks that
containerd parses it."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import uuid

import pytest

from conftest import leftovers
from e2e.engine_fixtures import (ARGV_DIR, E2E_LIB, E2E_RUN, ISOBOX_RUNC, argv_forms, containerd_config, ids_held_by,
                                 oci_archive, own_containerd, proc_uid_map, read_argv, roots_in, run, run_pty, uid_map_base,
                                 wait_for)

pytestmark = pytest.mark.skipif(not (shutil.which("containerd") and shutil.which("ctr")
                                     and os.path.exists(ISOBOX_RUNC) and os.geteuid() == 0),
                                reason="needs root, containerd, ctr and /usr/local/bin/isobox-runc")

NS = "isobox-e2e"
IMAGE = "docker.io/isobox/busybox:e2e"
ROOT = os.path.join(E2E_LIB, "containerd")
STATE = os.path.join(E2E_RUN, "containerd")
SOCK = os.path.join(E2E_RUN, "containerd.sock")
ARGV_LOG = os.path.join(ARGV_DIR, "containerd.jsonl")
RUNC_V2 = "io.containerd.runc.v2"

CONFIG = containerd_config(ROOT, STATE, SOCK, f"""\
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.isobox]
  runtime_type = "{RUNC_V2}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.isobox.options]
    BinaryName = "{ISOBOX_RUNC}"
    SystemdCgroup = false
""", top='disabled_plugins = ["io.containerd.grpc.v1.cri"]\n')


class Ctr:
    def __init__(self, sock: str):
        self.base = ["ctr", "-a", sock, "-n", NS]
        self.names: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess:
        return run([*self.base, *args], check=check, timeout=timeout)

    def name(self) -> str:
        n = "c" + uuid.uuid4().hex[:10]
        self.names.append(n)
        return n

    def tasks(self) -> dict[str, tuple[int, str]]:
        out = {}
        for line in self("task", "ls").stdout.splitlines()[1:]:
            f = line.split()
            if len(f) >= 3:
                out[f[0]] = (int(f[1]), f[2])
        return out

    def remove(self, name: str) -> None:
        """kill -9, task delete, container rm; quiet if already gone."""
        if name in self.tasks():
            self("task", "kill", "-s", "SIGKILL", name, check=False)
            wait_for(lambda: self.tasks().get(name, (0, "STOPPED"))[1] == "STOPPED", 20)
            self("task", "delete", name, check=False)
        self("container", "rm", name, check=False)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory, busybox_tar):
    tmp = tmp_path_factory.mktemp("containerd")
    cfg = tmp / "config.toml"
    cfg.write_text(CONFIG)
    with own_containerd(str(cfg), SOCK, ROOT, STATE, "containerd", str(tmp / "containerd.log")):
        ctr = Ctr(SOCK)
        try:
            ctr("images", "import", "--all-platforms", oci_archive(str(tmp / "busybox-oci.tar"), IMAGE, busybox_tar))
            ctr.config = str(cfg)
            yield ctr
        finally:
            for name in set(ctr.names):  # whatever a failed test left
                try:
                    ctr.remove(name)
                except Exception:  # noqa: BLE001 - teardown must go on
                    pass


def _isobox_root(name: str) -> str:
    """The --root the shim passed to isobox-runc for this container (from the recorded argv)."""
    roots = roots_in([a for a in read_argv(ARGV_LOG) if name in a])
    assert len(roots) == 1, roots
    return roots.pop()


def _assert_freed(names: list[str]) -> None:
    assert ids_held_by(names) == []
    for n in names:
        assert leftovers(n) == [], n
        root = _isobox_root(n)
        assert not os.path.exists(os.path.join(root, n)), f"state dir {root}/{n} left"


def test_config_registers_isobox_runtime(containerd, tmp_path):
    # the daemon runs with the CRI plugin off (ctr does not use it); `config dump` shows the CRI
    # section only with the plugin on, so dump the same file with it enabled
    cfg = tmp_path / "with-cri.toml"
    cfg.write_text("\n".join(l for l in CONFIG.splitlines() if not l.startswith("disabled_plugins")))
    dump = run(["containerd", "--config", str(cfg), "config", "dump"]).stdout
    block = dump[dump.index('runtimes.isobox]'):]
    assert f'runtime_type = "{RUNC_V2}"' in block.split("[plugins", 1)[0]
    opts = block[block.index("runtimes.isobox.options]"):].split("[plugins", 1)[0]
    assert f'BinaryName = "{ISOBOX_RUNC}"' in opts and "SystemdCgroup = false" in opts


def test_run_runc_binary_rm_shows_range(containerd):
    name = containerd.name()
    r = containerd("run", "--runc-binary", ISOBOX_RUNC, "--rm", IMAGE, name,
                   "sh", "-c", "cat /proc/self/uid_map; id -u")
    base = uid_map_base(r.stdout)
    assert base >= 65536 and "\n0\n" in "\n" + r.stdout
    assert r.stdout.split()[2] == "65536"
    calls = [a for a in read_argv(ARGV_LOG) if name in a]
    assert [c for c in calls if "create" in c], "containerd did not call isobox-runc"
    assert containerd.tasks().get(name) is None
    _assert_freed([name])


def test_run_runtime_runc_v2_with_binary_name_option(containerd):
    """The shim's runtime options (BinaryName) select isobox-runc for io.containerd.runc.v2."""
    name = containerd.name()
    r = containerd("run", "--runtime", RUNC_V2, "--runc-binary", ISOBOX_RUNC, "--rm", IMAGE, name,
                   "cat", "/proc/self/uid_map")
    assert uid_map_base(r.stdout) >= 65536
    assert any("create" in a for a in read_argv(ARGV_LOG) if name in a)
    info = containerd("container", "ls").stdout
    assert name not in info


def test_run_tty(containerd):
    # ctr sends the window size after start (HandleConsoleResize): let it arrive before stty
    name = containerd.name()
    rc, out = run_pty([*containerd.base, "run", "-t", "--rm", "--runc-binary", ISOBOX_RUNC, IMAGE, name,
                       "sh", "-c", "sleep 1; tty; stty size; cat /proc/self/uid_map"], rows=33, cols=101)
    assert rc == 0, out
    assert "/dev/pts/0" in out and "33 101" in out, out
    assert uid_map_base(out) >= 65536


def _detached(containerd, *cmd: str) -> str:
    name = containerd.name()
    containerd("run", "-d", "--runc-binary", ISOBOX_RUNC, IMAGE, name, *cmd)
    assert wait_for(lambda: containerd.tasks().get(name, (0, ""))[1] == "RUNNING", 20)
    return name


def test_detached_exec_kill_delete_rm(containerd):
    name = _detached(containerd, "sleep", "1000")
    pid, status = containerd.tasks()[name]
    base, length = proc_uid_map(pid)
    assert base >= 65536 and length == 65536
    r = containerd("task", "exec", "--exec-id", "e1", name, "sh", "-c", "cat /proc/self/uid_map; echo $$")
    assert uid_map_base(r.stdout) == base
    r = containerd("task", "exec", "--exec-id", "e2", name, "sh", "-c", "exit 7", check=False)
    assert r.returncode == 7, r
    ps = containerd("task", "ps", name).stdout
    assert str(pid) in ps
    containerd("task", "kill", "-s", "SIGKILL", name)
    assert wait_for(lambda: containerd.tasks().get(name, (0, ""))[1] == "STOPPED", 20)
    containerd("task", "delete", name)
    assert name not in containerd.tasks()
    containerd("container", "rm", name)
    assert name not in containerd("container", "ls").stdout
    _assert_freed([name])


def test_exec_tty(containerd):
    # as for run -t, ctr resizes the exec pty after it started
    name = _detached(containerd, "sleep", "1000")
    try:
        rc, out = run_pty([*containerd.base, "task", "exec", "-t", "--exec-id", "t1", name,
                           "sh", "-c", "sleep 1; tty; stty size; cat /proc/self/uid_map"], rows=27, cols=88)
        assert rc == 0, out
        assert "/dev/pts/" in out and "27 88" in out, out
        assert uid_map_base(out) == proc_uid_map(containerd.tasks()[name][0])[0]
    finally:
        containerd.remove(name)


def test_kill_default_signal(containerd):
    """`ctr task kill` sends SIGTERM; a pid 1 that handles it exits with its own status."""
    name = _detached(containerd, "sh", "-c", "trap 'exit 3' TERM; while :; do sleep 0.1; done")
    try:
        containerd("task", "kill", name)
        assert wait_for(lambda: containerd.tasks().get(name, (0, ""))[1] == "STOPPED", 20)
        r = containerd("task", "delete", name)
        assert r.returncode == 0
        calls = [a for a in read_argv(ARGV_LOG) if name in a and "kill" in a]
        assert calls and calls[0][-1] == "15", calls
    finally:
        containerd.remove(name)


def _freezer_state(pid: int) -> str | None:
    """freezer.state of the v1 freezer cgroup pid is in (None without a v1 freezer)."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if "freezer" in ctrls.split(","):
                with open(f"/sys/fs/cgroup/freezer{path}/freezer.state") as g:
                    return g.read().strip()
    return None


def test_pause_resume(containerd):
    name = _detached(containerd, "sh", "-c", "while :; do date +%s > /tmp/t; sleep 0.1; done")
    try:
        containerd("task", "pause", name)
        assert containerd.tasks()[name][1] == "PAUSED"
        state = _freezer_state(containerd.tasks()[name][0])
        assert state in ("FROZEN", None), state
        containerd("task", "resume", name)
        assert containerd.tasks()[name][1] == "RUNNING"
        assert _freezer_state(containerd.tasks()[name][0]) in ("THAWED", None)
        r = containerd("task", "exec", "--exec-id", "p1", name, "cat", "/tmp/t")
        assert r.stdout.strip().isdigit()
    finally:
        containerd.remove(name)


def test_two_at_once_disjoint_then_freed(containerd):
    names = [containerd.name() for _ in range(2)]
    errs: list[BaseException] = []

    def start(n: str) -> None:
        try:
            containerd("run", "-d", "--runc-binary", ISOBOX_RUNC, IMAGE, n, "sleep", "1000")
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errs, errs
        assert wait_for(lambda: all(containerd.tasks().get(n, (0, ""))[1] == "RUNNING" for n in names), 20)
        ranges = [proc_uid_map(containerd.tasks()[n][0]) for n in names]
        (b1, l1), (b2, l2) = ranges
        assert l1 == l2 == 65536
        assert b1 + l1 <= b2 or b2 + l2 <= b1, ranges
        assert len(ids_held_by(names)) == 2
    finally:
        for n in names:
            containerd.remove(n)
    _assert_freed(names)


def test_recorded_argv_forms(containerd):
    """What the runc v2 shim really calls (kept for the suite-wide conformance check)."""
    argvs = read_argv(ARGV_LOG)
    assert argvs
    for a in argvs:
        assert a[:1] == ["--root"] and "--log" in a and a[a.index("--log-format") + 1] == "json", a
    cmds = {c for c, _ in argv_forms(argvs)}
    assert {"create", "start", "exec", "kill", "pause", "resume", "delete"} <= cmds, cmds


def test_run_exit_status_and_streams(containerd):
    # (not stdin: ctr 1.6 never closes a task's stdin at EOF, with runc too, so `cat` would hang)
    name = containerd.name()
    r = containerd("run", "--runc-binary", ISOBOX_RUNC, "--rm", IMAGE, name,
                   "sh", "-c", "echo out; echo err >&2; exit 5", check=False)
    assert r.returncode == 5, r
    assert r.stdout == "out\n" and "err\n" in r.stderr, r
