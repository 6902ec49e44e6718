"""Podman 4.3 (conmon, root, cgroupfs manager) running containers with isobox-runc, end to end.

Podman runs here with storage of its own (--root /var/lib/isobox-e2e/podman, --runroot
/run/isobox-e2e/podman, overlay over ext4), a containers.conf of its own (CONTAINERS_CONF) and
`--network none`, and imports a busybox rootfs tar built here (no registry).

Two ways in, both tested:
- `podman --runtime /usr/local/bin/isobox-runc ...` (the path; its basename "isobox-runc" must be
  in runtime_supports_json);
- the runtime registered by name in containers.conf ([engine.runtimes] isobox = [...]), also the
  default runtime there. `--runtime isobox-runc` (a bare name) works only when that name is
  registered too: podman looks names up in [engine.runtimes], never on PATH.

Argv recording: podman scrubs the environment of the runtime calls it makes itself (start,
kill, delete, state get only PATH and XDG_RUNTIME_DIR), and conmon passes on only
`conmon_env_vars`. ISOBOX_ARGV_LOG therefore reaches the calls conmon makes (create, exec) in
every test, and the registered runtime "isobox" points at a two-line wrapper that sets it and
execs /usr/local/bin/isobox-runc, so those tests record every call.

Root podman asks for RLIMIT_NOFILE and RLIMIT_NPROC of 1048576 whatever the host allows;
this host's hard limits are lower and it lacks CAP_SYS_RESOURCE, so isobox (like runc) refuses
them: containers.conf sets `default_ulimits` below the host's limits."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import uuid

import pytest

from conftest import leftovers
from e2e import hostclean
from e2e.engine_fixtures import (E2E_LIB, E2E_RUN, ISOBOX_RUNC, argv_log, ids_held_by, proc_uid_map,
                                 read_argv, run, run_pty, uid_map_base, wait_for)

pytestmark = pytest.mark.skipif(not (shutil.which("podman") and shutil.which("conmon")
                                     and os.path.exists(ISOBOX_RUNC) and os.geteuid() == 0),
                                reason="needs root, podman, conmon and /usr/local/bin/isobox-runc")

IMAGE = "localhost/isobox/busybox:e2e"
GRAPHROOT = os.path.join(E2E_LIB, "podman")
RUNROOT = os.path.join(E2E_RUN, "podman")
TMPDIR = os.path.join(E2E_RUN, "podman-tmp")
EVENTS = os.path.join(E2E_RUN, "podman-events.log")
LOOP = "trap 'exit 0' TERM; while :; do sleep 0.1; done"  # a pid 1 that stops on SIGTERM


def _containers_conf(wrapper: str, argv_path: str) -> str:
    nofile = min(os.sysconf("SC_OPEN_MAX"), 1024)
    return f"""[containers]
netns = "none"
default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{EVENTS}"
runtime = "isobox"
runtime_supports_json = ["crun", "runc", "kata", "runsc", "krun", "isobox", "isobox-runc"]
conmon_env_vars = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ISOBOX_ARGV_LOG={argv_path}"]

[engine.runtimes]
isobox = ["{wrapper}", "{ISOBOX_RUNC}"]
isobox-runc = ["{wrapper}", "{ISOBOX_RUNC}"]
"""


class Podman:
    def __init__(self, env: dict):
        self.env = env
        self.base = ["podman", "--root", GRAPHROOT, "--runroot", RUNROOT, "--storage-driver", "overlay",
                     "--tmpdir", TMPDIR]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([*self.base, *args], check=check, timeout=timeout, env=self.env)

    def name(self) -> str:
        return "p" + uuid.uuid4().hex[:10]

    def inspect(self, name: str) -> dict:
        return json.loads(self("inspect", "--type", "container", name).stdout)[0]

    def full_id(self, name: str) -> str:
        return self.inspect(name)["Id"]


@pytest.fixture(scope="module")
def podman(tmp_path_factory, busybox_tar):
    tmp = tmp_path_factory.mktemp("podman")
    argv_path = argv_log("podman")
    wrapper = tmp / "bin" / "isobox-runc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nISOBOX_ARGV_LOG={argv_path} exec {ISOBOX_RUNC} \"$@\"\n")
    wrapper.chmod(0o755)
    conf = tmp / "containers.conf"
    conf.write_text(_containers_conf(str(wrapper), argv_path))
    for d in (GRAPHROOT, RUNROOT, TMPDIR):
        os.makedirs(d, exist_ok=True)
    # podman's cgroupfs parent (libpod_parent, and libpod_parent/conmon for conmon) outlives its
    # containers: remove it at the end if this fixture made it
    parents = [os.path.join("/sys/fs/cgroup", h, "libpod_parent") for h in os.listdir("/sys/fs/cgroup")]
    parents = [p for p in parents if not os.path.exists(p)]
    env = dict(os.environ, CONTAINERS_CONF=str(conf), ISOBOX_ARGV_LOG=argv_path)
    p = Podman(env)
    p.argv_path = argv_path
    try:
        p("import", busybox_tar, IMAGE)
        yield p
    finally:
        p("rm", "-af", "-t", "0", check=False)
        p("rmi", "-af", check=False)
        for d in (GRAPHROOT, RUNROOT):
            hostclean.umount_below(d)
        for d in (GRAPHROOT, RUNROOT, TMPDIR):
            shutil.rmtree(d, ignore_errors=True)
        for f in (EVENTS, EVENTS + ".lock"):
            if os.path.exists(f):
                os.unlink(f)
        for parent in parents:
            for d in (os.path.join(parent, "conmon"), parent):
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def _calls(podman, cid: str) -> list[list[str]]:
    return [a for a in read_argv(podman.argv_path) if cid in a]


def _assert_freed(cids: list[str]) -> None:
    from isobox.lifecycle.state import DEFAULT_ROOT  # podman passes no --root
    assert ids_held_by(cids) == []
    for cid in cids:
        assert leftovers(cid) == [], cid
        assert not os.path.exists(os.path.join(DEFAULT_ROOT, cid)), f"state of {cid} left in {DEFAULT_ROOT}"


def test_run_rm_runtime_path(podman, tmp_path):
    cidfile = tmp_path / "cid"
    r = podman("--runtime", ISOBOX_RUNC, "run", "--rm", "--pull", "never", "--network", "none",
               "--cidfile", str(cidfile), IMAGE, "sh", "-c", "cat /proc/self/uid_map; id -u; echo x > /f; cat /f")
    base = uid_map_base(r.stdout)
    assert base >= 65536 and r.stdout.split()[2] == "65536"
    assert r.stdout.split()[3:] == ["0", "x"]
    cid = cidfile.read_text().strip()
    # conmon's create was recorded (conmon_env_vars); podman's own calls do not carry the variable
    assert [a for a in _calls(podman, cid) if "create" in a]
    assert podman("ps", "-aq", "--filter", f"id={cid}").stdout.strip() == ""
    _assert_freed([cid])


def test_registered_runtime_is_default(podman):
    name = podman.name()
    podman("run", "--pull", "never", "--network", "none", "--name", name, IMAGE, "cat", "/proc/self/uid_map")
    try:
        info = podman.inspect(name)
        assert info["OCIRuntime"] == "isobox"
        assert info["State"]["ExitCode"] == 0
        cid = info["Id"]
        cmds = {next((x for x in a if x in ("create", "start", "delete", "state", "kill")), "") for a in
                _calls(podman, cid)}
        assert {"create", "start"} <= cmds, cmds
    finally:
        podman("rm", name)
    _assert_freed([cid])


def test_run_tty(podman):
    name = podman.name()
    rc, out = run_pty([*podman.base, "--runtime", "isobox", "run", "-it", "--rm", "--pull", "never",
                       "--network", "none", "--name", name, IMAGE,
                       "sh", "-c", "sleep 1; tty; stty size; cat /proc/self/uid_map"], rows=31, cols=97,
                      env=podman.env)
    assert rc == 0, out
    assert "/dev/pts/0" in out and "31 97" in out, out
    assert uid_map_base(out) >= 65536


def test_detached_exec_stop_rm(podman):
    name = podman.name()
    podman("--runtime", "isobox", "run", "-d", "--pull", "never", "--network", "none", "--name", name,
           IMAGE, "sh", "-c", LOOP)
    cid = podman.full_id(name)
    try:
        pid = podman.inspect(name)["State"]["Pid"]
        base, length = proc_uid_map(pid)
        assert base >= 65536 and length == 65536
        r = podman("exec", name, "sh", "-c", "cat /proc/self/uid_map; id -u")
        assert uid_map_base(r.stdout) == base and r.stdout.split()[-1] == "0"
        r = podman("exec", name, "sh", "-c", "exit 7", check=False)
        assert r.returncode == 7, r
        r = run([*podman.base, "exec", "-i", name, "cat"], input="from stdin\n", env=podman.env)
        assert r.stdout == "from stdin\n"
        podman("stop", "-t", "10", name)
        st = podman.inspect(name)["State"]
        assert st["Status"] == "exited" and st["ExitCode"] == 0, st
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        podman("rm", "-f", "-t", "0", name)
    assert podman("ps", "-aq", "--filter", f"id={cid}").stdout.strip() == ""
    _assert_freed([cid])
    cmds = [next((x for x in a if x in ("create", "start", "exec", "kill", "delete", "state")), "?")
            for a in _calls(podman, cid)]
    assert {"create", "start", "exec", "kill", "delete"} <= set(cmds), cmds


def test_exec_it(podman):
    name = podman.name()
    podman("--runtime", ISOBOX_RUNC, "run", "-d", "--pull", "never", "--network", "none", "--name", name,
           IMAGE, "sh", "-c", LOOP)
    try:
        rc, out = run_pty([*podman.base, "exec", "-it", name,
                           "sh", "-c", "sleep 1; tty; stty size; cat /proc/self/uid_map"], rows=29, cols=91,
                          env=podman.env)
        assert rc == 0, out
        assert "/dev/pts/" in out and "29 91" in out, out
        assert uid_map_base(out) == proc_uid_map(podman.inspect(name)["State"]["Pid"])[0]
    finally:
        podman("rm", "-f", "-t", "0", name)


def test_rm_force_running(podman):
    name = podman.name()
    podman("run", "-d", "--pull", "never", "--network", "none", "--name", name, IMAGE, "sleep", "1000")
    cid = podman.full_id(name)
    podman("rm", "-f", "-t", "0", name)
    assert podman("ps", "-aq", "--filter", f"id={cid}").stdout.strip() == ""
    _assert_freed([cid])


def test_two_at_once_disjoint_then_freed(podman):
    names = [podman.name() for _ in range(2)]
    errs: list[BaseException] = []

    def start(n: str) -> None:
        try:
            podman("run", "-d", "--pull", "never", "--network", "none", "--name", n, IMAGE, "sleep", "1000")
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cids = []
    try:
        assert not errs, errs
        infos = [podman.inspect(n) for n in names]
        cids = [i["Id"] for i in infos]
        assert all(i["State"]["Running"] for i in infos)
        (b1, l1), (b2, l2) = [proc_uid_map(i["State"]["Pid"]) for i in infos]
        assert l1 == l2 == 65536
        assert b1 + l1 <= b2 or b2 + l2 <= b1, (b1, b2)
        assert len(ids_held_by(cids)) == 2
    finally:
        podman("rm", "-f", "-t", "0", *names, check=False)
    _assert_freed(cids)


def test_runtime_by_bare_name(podman):
    r = podman("--runtime", "isobox-runc", "run", "--rm", "--pull", "never", "--network", "none", IMAGE,
               "cat", "/proc/self/uid_map")
    assert uid_map_base(r.stdout) >= 65536


def test_kill_pause_unpause(podman):
    name = podman.name()
    podman("run", "-d", "--pull", "never", "--network", "none", "--name", name, IMAGE,
           "sh", "-c", "while :; do date +%s > /tmp/t; sleep 0.1; done")
    cid = podman.full_id(name)
    try:
        podman("pause", name)
        assert podman.inspect(name)["State"]["Status"] == "paused"
        podman("unpause", name)
        assert podman.inspect(name)["State"]["Status"] == "running"
        assert podman("exec", name, "cat", "/tmp/t").stdout.strip().isdigit()
        podman("kill", "-s", "KILL", name)
        assert wait_for(lambda: podman.inspect(name)["State"]["Status"] == "exited", 20)
        assert podman.inspect(name)["State"]["ExitCode"] == 137
    finally:
        podman("rm", "-f", "-t", "0", name)
    _assert_freed([cid])
    cmds = [next((x for x in a if x in ("pause", "resume", "kill")), "") for a in _calls(podman, cid)]
    assert {"pause", "resume", "kill"} <= set(cmds), cmds


def test_bridge_network(podman):
    """Podman's default network (netavark here) gives the isobox container a veth and address."""
    r = podman("run", "--rm", "--pull", "never", "--network", "bridge", IMAGE,
               "sh", "-c", "cat /proc/self/uid_map; ip -4 -o addr show eth0; ip route")
    assert uid_map_base(r.stdout) >= 65536
    assert " inet " in r.stdout and "default via" in r.stdout, r.stdout


def test_run_exit_status_and_stdin(podman):
    r = podman("run", "--rm", "--pull", "never", "--network", "none", IMAGE, "sh", "-c", "exit 5", check=False)
    assert r.returncode == 5, r
    r = run([*podman.base, "run", "--rm", "-i", "--pull", "never", "--network", "none", IMAGE, "cat"],
            input="through conmon\n", env=podman.env)
    assert r.stdout == "through conmon\n"


def test_pod_containers_share_the_infra_containers_range(podman, busybox_tar):
    """`podman pod create`: the infra container holds the pod's namespaces; a container run in
    the pod joins them, and with them the infra container's user namespace and ID range."""
    pause = "isobox-e2e/pause:latest"      # no catatonit here: busybox sleeping as the infra image
    podman("import", "--change", 'ENTRYPOINT ["sleep", "2147483647"]', busybox_tar, pause)
    pod = podman.name()
    podman("pod", "create", "--name", pod, "--infra-image", pause, "--network", "none")
    try:
        podman("--runtime", ISOBOX_RUNC, "pod", "start", pod)
        infra = podman.inspect(json.loads(podman("pod", "inspect", pod).stdout)["InfraContainerID"])
        infra_pid = infra["State"]["Pid"]
        base, size = proc_uid_map(infra_pid)
        assert base >= 65536 and size == 65536
        name = podman.name()
        r = podman("--runtime", ISOBOX_RUNC, "run", "-d", "--pull", "never", "--pod", pod, "--name", name, IMAGE,
                   "sleep", "300")
        pid = podman.inspect(name)["State"]["Pid"]
        assert proc_uid_map(pid) == (base, size)
        for ns in ("user", "net", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{infra_pid}/ns/{ns}"), ns
        out = podman("exec", name, "sh", "-c", "cat /proc/self/uid_map; id -u").stdout
        assert uid_map_base(out) == base and out.split()[-1] == "0"
        cids = [infra["Id"], podman.full_id(name)]
    finally:
        podman("pod", "rm", "-f", "-t", "0", pod, check=False)
    _assert_freed(cids)
