"""Docker end to end: Debian's dockerd 20.10 (started by the tests, with its own containerd and
the runc v2 shim) runs isobox-runc as the `isobox` runtime, driven by the real docker CLI.

Every container is removed in a finally block, and removal is checked to leave no mount,
cgroup, state directory or ID range behind."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import termios
import threading
import time

import pytest

from e2e.conftest import ARGV_DIR, DOCKER, DOCKER_ARGV, IMAGE, container_leaks, ids_held, read_argv_records, unique

RT = "--runtime=isobox"
BASE_MIN = 65536          # a container's range never includes host ID 0


def wait_for(pred, timeout: float = 30, step: float = 0.2):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


def runtime_root(cid: str) -> str | None:
    """The --root dockerd's shim passed to isobox-runc for this container (from the argv record)."""
    for rec in read_argv_records():
        argv = rec["argv"]
        if cid in argv and "--root" in argv:
            return argv[argv.index("--root") + 1]
    return None


def remove(docker, name: str) -> None:
    """docker rm -f, then check that nothing of the container survives in the runtime."""
    cid = docker("inspect", "-f", "{{.Id}}", name).stdout.strip()
    r = docker("rm", "-f", name)
    assert r.returncode == 0 or "No such container" in r.stderr, r.stderr
    if not cid:
        return
    root = runtime_root(cid)
    assert root, f"isobox-runc was never called for {cid}"
    leaks = wait_for(lambda: not container_leaks(cid, root), timeout=15) or container_leaks(cid, root)
    assert leaks is True, f"{name} left behind: {leaks}"


@contextlib.contextmanager
def running(docker, *args: str, cmd=("sleep", "600"), name: str | None = None, runtime: str | None = RT):
    """docker run -d --runtime=isobox [args] IMAGE cmd; removed (and checked for leaks) on exit."""
    name = name or unique()
    try:
        flags = [runtime] if runtime else []
        r = docker("run", "-d", "--name", name, *flags, *args, IMAGE, *cmd)
        assert r.returncode == 0, r.stderr
        yield name
    finally:
        remove(docker, name)


def host_pid(docker, name: str) -> int:
    return int(docker.inspect(name, "{{.State.Pid}}"))


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def uid_base(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/uid_map") as f:
        inside, base, length = map(int, f.read().split()[:3])
    assert inside == 0
    return base, length


def host_cgroup(pid: int, controller: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if controller in ctrls.split(","):
                return f"/sys/fs/cgroup/{ctrls}{path}" if ctrls != "" else path
    raise AssertionError(f"{pid} has no {controller} cgroup")


def cg_read(pid: int, controller: str, name: str) -> str:
    with open(os.path.join(host_cgroup(pid, controller), name)) as f:
        return f.read().strip()


def ex(docker, name: str, *cmd: str, check: bool = True) -> str:
    r = docker("exec", name, *cmd)
    if check:
        assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


# ---------------------------------------------------------------------------- a pty driver
class Pty:
    """The docker CLI on a pty of ours (its controlling terminal), with a window size."""

    def __init__(self, docker, args: list[str], rows: int = 37, cols: int = 111):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def ctty():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        self.proc = subprocess.Popen([DOCKER, *args], stdin=slave, stdout=slave, stderr=slave, env=docker.env,
                                     start_new_session=True, preexec_fn=ctty)
        os.close(slave)
        self.buf = b""

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 30) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.buf)
            if m:
                return m
            r, _, _ = select.select([self.master], [], [], 0.3)
            if r:
                try:
                    self.buf += os.read(self.master, 4096)
                except OSError:
                    break
        m = re.search(pattern, self.buf)
        assert m, f"{pattern!r} not in {self.buf!r}"
        return m

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            os.close(self.master)


# ---------------------------------------------------------------------------- lifecycle
def test_run_detached_logs_and_stop(dockerd):
    script = 'echo hello-logs; echo to-stderr >&2; trap "echo bye; exit 0" TERM; while :; do sleep 0.2; done'
    with running(dockerd, cmd=("sh", "-c", script)) as c:
        assert dockerd.inspect(c, "{{.HostConfig.Runtime}} {{.State.Status}}") == "isobox running"
        base, length = uid_base(host_pid(dockerd, c))
        assert base >= BASE_MIN and length >= 65536
        assert wait_for(lambda: "hello-logs" in dockerd("logs", c).stdout)
        assert "to-stderr" in dockerd("logs", c).stderr
        t = time.monotonic()
        dockerd("stop", "-t", "20", c, check=True)
        assert time.monotonic() - t < 15, "SIGTERM did not reach the container's pid 1"
        assert dockerd.inspect(c, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
        assert "bye" in dockerd("logs", c).stdout


def test_run_it_on_a_pty(dockerd):
    name = unique()
    t = Pty(dockerd, ["run", "-it", "--name", name, RT, IMAGE, "sh"])
    try:
        t.expect(rb"# ")
        t.send(b"tty; stty size; echo D$((40+2))ONE\n")
        t.expect(rb"D42ONE\r\n")
        assert re.search(rb"^/dev/pts/0\r$", t.buf, re.M), t.buf
        assert re.search(rb"^37 111\r$", t.buf, re.M), t.buf
        t.send(b"exit 7\n")
        assert t.close() == 7
    finally:
        remove(dockerd, name)


def test_exec_with_and_without_tty(dockerd):
    with running(dockerd) as c:
        out = ex(dockerd, c, "sh", "-c", "echo pid=$$ uid=$(id -u); tty || true")
        assert "uid=0" in out and "not a tty" in out
        assert dockerd("exec", "-i", c, "cat", input="piped-in\n").stdout == "piped-in\n"
        assert dockerd("exec", c, "sh", "-c", "exit 5").returncode == 5
        t = Pty(dockerd, ["exec", "-it", c, "sh"], rows=21, cols=83)
        t.expect(rb"# ")
        t.send(b"tty; stty size; echo E$((40+2))X\n")
        t.expect(rb"E42X\r\n")
        assert re.search(rb"^/dev/pts/\d+\r$", t.buf, re.M), t.buf
        assert re.search(rb"^21 83\r$", t.buf, re.M), t.buf
        t.send(b"exit\n")
        assert t.close() == 0


def test_kill(dockerd):
    with running(dockerd) as c:
        dockerd("kill", c, check=True)
        assert wait_for(lambda: dockerd.inspect(c, "{{.State.Status}}") == "exited")
        assert dockerd.inspect(c, "{{.State.ExitCode}}") == "137"
    with running(dockerd, cmd=("sh", "-c", 'trap "exit 9" USR1; while :; do sleep 0.2; done')) as c:
        dockerd("kill", "-s", "USR1", c, check=True)
        assert wait_for(lambda: dockerd.inspect(c, "{{.State.Status}}") == "exited")
        assert dockerd.inspect(c, "{{.State.ExitCode}}") == "9"


def test_restart(dockerd):
    with running(dockerd) as c:
        before = host_pid(dockerd, c)
        dockerd("restart", "-t", "1", c, check=True)
        assert dockerd.inspect(c, "{{.State.Status}}") == "running"
        after = host_pid(dockerd, c)
        assert after != before and not os.path.exists(f"/proc/{before}/status") or \
            status(before).get("State", "").startswith("Z")
        assert uid_base(after)[0] >= BASE_MIN
        assert ex(dockerd, c, "echo", "again") == "again\n"


def test_rm_force_running_frees_everything(dockerd):
    name = unique()
    dockerd("run", "-d", "--name", name, RT, "-m", "64m", IMAGE, "sleep", "600", check=True)
    cid = dockerd.inspect(name, "{{.Id}}")
    pid = host_pid(dockerd, name)
    base, _ = uid_base(pid)
    root = runtime_root(cid)
    assert [h for h, b in ids_held(root) if h.container_id == cid] != []
    remove(dockerd, name)
    assert all(b != base for h, b in ids_held(root))


def test_cp_into_and_out_of_existing_directories_of_a_running_container(dockerd, tmp_path):
    """isobox's overlay shares dockerd's upper directory; dockerd's own overlay (where `docker
    cp` writes) must still copy up directories, before and after the container wrote in them."""
    src = tmp_path / "in.txt"
    src.write_text("from-the-host\n")
    with running(dockerd) as c:
        dockerd("cp", str(src), f"{c}:/tmp/", check=True)
        dockerd("cp", str(src), f"{c}:/root/in.txt", check=True)
        dockerd("cp", str(src), f"{c}:/etc/in.txt", check=True)      # /etc holds Docker's binds
        assert ex(dockerd, c, "cat", "/tmp/in.txt", "/root/in.txt", "/etc/in.txt") == "from-the-host\n" * 3
        ex(dockerd, c, "sh", "-c", "mkdir -p /var/made && echo from-inside > /var/made/f")
        dockerd("cp", str(src), f"{c}:/var/made/", check=True)
        assert ex(dockerd, c, "ls", "/var/made").split() == ["f", "in.txt"]
        dockerd("cp", f"{c}:/var/made/f", str(tmp_path / "out.txt"), check=True)
        assert (tmp_path / "out.txt").read_text() == "from-inside\n"
        # what the host wrote is the container root's inside
        assert ex(dockerd, c, "stat", "-c", "%u:%g", "/tmp/in.txt").strip() == "0:0"


def test_pause_unpause(dockerd):
    with running(dockerd) as c:
        pid = host_pid(dockerd, c)
        dockerd("pause", c, check=True)
        assert dockerd.inspect(c, "{{.State.Status}}") == "paused"
        assert cg_read(pid, "freezer", "freezer.state") == "FROZEN"
        assert status(pid)["State"].startswith("D") or status(pid)["State"].startswith("S")
        dockerd("unpause", c, check=True)
        assert dockerd.inspect(c, "{{.State.Status}}") == "running"
        assert cg_read(pid, "freezer", "freezer.state") == "THAWED"
        assert ex(dockerd, c, "echo", "thawed") == "thawed\n"


# ---------------------------------------------------------------------------- resources
def stats_limit(docker, name: str) -> str:
    return docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name, check=True).stdout.strip()


def test_memory_limit_and_stats(dockerd):
    with running(dockerd, "--memory", "64m") as c:
        pid = host_pid(dockerd, c)
        assert cg_read(pid, "memory", "memory.limit_in_bytes") == str(64 << 20)
        assert ex(dockerd, c, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes").strip() == str(64 << 20)
        assert stats_limit(dockerd, c).endswith("/ 64MiB")


def test_update_memory_and_cpus(dockerd):
    with running(dockerd, "--memory", "64m", "--cpus", "0.5") as c:
        pid = host_pid(dockerd, c)
        dockerd("update", "--memory", "96m", "--memory-swap", "96m", "--cpus", "1.5", c, check=True)
        assert cg_read(pid, "memory", "memory.limit_in_bytes") == str(96 << 20)
        assert cg_read(pid, "cpu", "cpu.cfs_quota_us") == "150000"
        assert cg_read(pid, "cpu", "cpu.cfs_period_us") == "100000"
        assert stats_limit(dockerd, c).endswith("/ 96MiB")
        assert dockerd.inspect(c, "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}") == f"{96 << 20} 1500000000"


def test_oom_kill_is_reported(dockerd):
    name = unique()
    try:
        # tail keeps its whole (newline-free) input in memory: 64 MiB against a 32 MiB limit
        r = dockerd("run", "--name", name, RT, "-m", "32m", "--memory-swap", "32m", IMAGE,
                    "sh", "-c", "head -c 67108864 /dev/zero | tail > /dev/null")
        assert r.returncode == 137, (r.stdout, r.stderr)
        assert dockerd.inspect(name, "{{.State.OOMKilled}} {{.State.ExitCode}}") == "true 137"
    finally:
        remove(dockerd, name)


def test_cpus(dockerd):
    with running(dockerd, "--cpus", "0.5") as c:
        pid = host_pid(dockerd, c)
        assert cg_read(pid, "cpu", "cpu.cfs_quota_us") == "50000"
        assert ex(dockerd, c, "cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us").strip() == "50000"


def test_pids_limit(dockerd):
    with running(dockerd, "--pids-limit", "12") as c:
        pid = host_pid(dockerd, c)
        assert cg_read(pid, "pids", "pids.max") == "12"
        r = dockerd("exec", c, "sh", "-c", "for i in $(seq 20); do sleep 30 & done 2>&1; wait")
        assert "can't fork" in r.stdout + r.stderr or "Resource temporarily unavailable" in r.stdout + r.stderr
        assert int(cg_read(pid, "pids", "pids.current")) <= 12


# ---------------------------------------------------------------------------- filesystems
def test_read_only_and_tmpfs(dockerd):
    with running(dockerd, "--read-only", "--tmpfs", "/scratch:size=2m", "--tmpfs", "/run") as c:
        r = dockerd("exec", c, "touch", "/rootfile")
        assert r.returncode != 0 and "Read-only file system" in r.stderr
        out = ex(dockerd, c, "sh", "-c", "echo data > /scratch/f && cat /scratch/f && stat -c '%u:%g %a' /scratch "
                                         "&& grep ' /scratch ' /proc/mounts")
        lines = out.splitlines()
        assert lines[0] == "data" and lines[1] == "0:0 1777"
        assert lines[2].startswith("tmpfs /scratch tmpfs rw") and "size=2048k" in lines[2]
        assert ex(dockerd, c, "sh", "-c", "touch /run/ok && echo ok") == "ok\n"


def test_tmpfs_on_writable_root(dockerd):
    with running(dockerd, "--tmpfs", "/cache:rw,noexec,size=1m") as c:
        out = ex(dockerd, c, "sh", "-c", "grep ' /cache ' /proc/mounts; echo x > /cache/y && cat /cache/y")
        assert "tmpfs /cache tmpfs" in out and "noexec" in out and out.endswith("x\n")


def test_user_1000(dockerd):
    with running(dockerd, "--user", "1000:1000") as c:
        assert ex(dockerd, c, "id").strip() == "uid=1000 gid=1000 groups=1000"
        pid = host_pid(dockerd, c)
        base, _ = uid_base(pid)
        assert status(pid)["Uid"].split()[0] == str(base + 1000)
        assert status(pid)["Gid"].split()[0] == str(base + 1000)
        assert ex(dockerd, c, "sh", "-c", "grep CapEff /proc/self/status").split()[1] == "0000000000000000"


def test_bind_mount_keeps_host_owners(dockerd, tmp_path):
    host = tmp_path / "hostdir"
    host.mkdir()
    (host / "by-root").write_text("r\n")
    (host / "by-1234").write_text("u\n")
    os.chown(host / "by-1234", 1234, 1234)
    with running(dockerd, "-v", f"{host}:/data") as c:
        out = ex(dockerd, c, "sh", "-c", "stat -c '%u:%g %n' /data/by-root /data/by-1234")
        assert out.splitlines() == ["0:0 /data/by-root", "1234:1234 /data/by-1234"]
        ex(dockerd, c, "sh", "-c", "echo written > /data/new && mkdir /data/dir")
        st = os.stat(host / "new")
        assert (st.st_uid, st.st_gid) == (0, 0)
        assert (host / "new").read_text() == "written\n"
        assert os.stat(host / "dir").st_uid == 0
        # container root can change what 1234 owns there (it is root over the bind), as host root could
        ex(dockerd, c, "sh", "-c", "echo more >> /data/by-1234")
        assert os.stat(host / "by-1234").st_uid == 1234
    shutil.rmtree(host)


# ---------------------------------------------------------------------------- network
def test_network_none(dockerd):
    with running(dockerd, "--network", "none") as c:
        links = ex(dockerd, c, "ip", "-o", "link")
        assert "lo" in links and "eth0" not in links
        assert dockerd("exec", c, "ping", "-c", "1", "-W", "1", "172.17.0.1").returncode != 0


def test_default_bridge(dockerd):
    with running(dockerd) as a, running(dockerd) as b:
        addr = ex(dockerd, a, "ip", "-o", "-4", "addr", "show", "eth0")
        assert re.search(r"inet 172\.\d+\.\d+\.\d+/", addr), addr
        gw = dockerd.inspect(a, "{{.NetworkSettings.Gateway}}")
        b_ip = dockerd.inspect(b, "{{.NetworkSettings.IPAddress}}")
        assert gw and b_ip
        assert ex(dockerd, a, "ip", "route").startswith(f"default via {gw} dev eth0")
        assert "1 packets received" in ex(dockerd, a, "ping", "-c", "1", "-W", "5", gw)
        assert "1 packets received" in ex(dockerd, a, "ping", "-c", "1", "-W", "5", b_ip)


# ---------------------------------------------------------------------------- processes
def test_init(dockerd):
    with running(dockerd, "--init") as c:
        assert ex(dockerd, c, "cat", "/proc/1/cmdline").split("\0")[0] in ("/sbin/docker-init", "/dev/init")
        ps = ex(dockerd, c, "ps", "-o", "pid,comm")
        assert re.search(r"^\s*\d+\s+sleep$", ps, re.M), ps
        assert int(ex(dockerd, c, "pidof", "sleep")) != 1
        t = time.monotonic()
        dockerd("stop", "-t", "20", c, check=True)
        assert time.monotonic() - t < 15, "the init did not forward SIGTERM"


def test_top_includes_sub_cgroups_made_inside(dockerd):
    script = ("mkdir /sys/fs/cgroup/pids/inner /sys/fs/cgroup/memory/inner && "
              "sh -c 'echo $$ > /sys/fs/cgroup/pids/inner/cgroup.procs; "
              "echo $$ > /sys/fs/cgroup/memory/inner/cgroup.procs; exec sleep 4242' & exec sleep 600")
    with running(dockerd, "--privileged", cmd=("sh", "-c", script)) as c:
        pid = host_pid(dockerd, c)
        inner = wait_for(lambda: [p for p in os.listdir("/proc") if p.isdigit()
                                  and _cmdline(p) == "sleep\x004242\x00"])
        assert inner, "the process for the sub-cgroup did not start"
        assert host_cgroup(int(inner[0]), "pids") == host_cgroup(pid, "pids") + "/inner"
        top = dockerd("top", c, check=True).stdout
        assert "sleep 4242" in top and "sleep 600" in top, top
        base, _ = uid_base(pid)
        assert re.search(rf"^{base}\s+{inner[0]}\s", top, re.M), top


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


# ---------------------------------------------------------------------------- security
CAP_NET_RAW, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_CHOWN = 13, 12, 21, 0


def caps(text: str, which: str = "CapEff") -> int:
    return int(re.search(rf"^{which}:\s+([0-9a-f]+)$", text, re.M).group(1), 16)


def test_privileged_works_and_stays_isolated(dockerd):
    with running(dockerd, "--privileged") as c:
        st = ex(dockerd, c, "cat", "/proc/self/status")
        eff, bnd = caps(st), caps(st, "CapBnd")
        assert eff == bnd and eff & (1 << CAP_SYS_ADMIN) and eff & (1 << CAP_NET_ADMIN)
        assert eff >= (1 << 38) - 1, hex(eff)           # every capability docker 20.10 knows
        assert ex(dockerd, c, "sh", "-c", "hostname inner && hostname") == "inner\n"
        assert ex(dockerd, c, "sh", "-c", "ip link set lo mtu 1400 && ip -o link show lo").count("mtu 1400") == 1
        assert ex(dockerd, c, "sh", "-c", "mkdir -p /m && mount -t tmpfs t /m && echo mounted") == "mounted\n"
        pid = host_pid(dockerd, c)
        base, _ = uid_base(pid)
        assert base >= BASE_MIN
        s = status(pid)
        assert s["Uid"].split() == [str(base)] * 4 and s["Gid"].split()[0] == str(base)
        assert caps("\n".join(f"{k}:\t{v}" for k, v in s.items()), "CapEff") == eff     # in its own userns
        with open("/proc/self/ns/user") as f:
            pass
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        # the host's values stay the host's
        r = dockerd("exec", c, "sh", "-c", "umount /proc 2>&1; echo rc=$?")
        assert "rc=0" not in r.stdout
        assert open("/proc/sys/kernel/hostname").read().strip() != "inner"


def test_cap_add_and_drop(dockerd):
    with running(dockerd, "--cap-drop", "CHOWN", "--cap-drop", "NET_RAW", "--cap-add", "NET_ADMIN") as c:
        eff = caps(ex(dockerd, c, "cat", "/proc/self/status"))
        assert not eff & (1 << CAP_CHOWN) and not eff & (1 << CAP_NET_RAW) and eff & (1 << CAP_NET_ADMIN)
        assert not eff & (1 << CAP_SYS_ADMIN)
        r = dockerd("exec", c, "sh", "-c", "touch /f && chown 5:5 /f")
        assert r.returncode != 0 and "Operation not permitted" in r.stderr
        ex(dockerd, c, "ip", "link", "set", "lo", "mtu", "1300")
    with running(dockerd) as c:
        assert dockerd("exec", c, "ip", "link", "set", "lo", "mtu", "1300").returncode != 0
        ex(dockerd, c, "sh", "-c", "touch /f && chown 5:5 /f")


def test_docker_default_seccomp_profile(dockerd):
    # unshare(CLONE_NEWUSER) needs no capability: only Docker's profile (which allows unshare
    # with CAP_SYS_ADMIN alone) refuses it
    with running(dockerd) as c:
        assert status(host_pid(dockerd, c))["Seccomp"] == "2"
        r = dockerd("exec", c, "unshare", "-U", "true")
        assert r.returncode != 0 and "Operation not permitted" in r.stderr
    with running(dockerd, "--security-opt", "seccomp=unconfined") as c:
        # the engine's profile is gone (unshare works); isobox's own trap filter stays loaded
        assert status(host_pid(dockerd, c))["Seccomp"] == "2"
        ex(dockerd, c, "unshare", "-U", "true")


def test_no_new_privileges(dockerd):
    with running(dockerd, "--security-opt", "no-new-privileges") as c:
        assert status(host_pid(dockerd, c))["NoNewPrivs"] == "1"
        assert "NoNewPrivs:\t1" in ex(dockerd, c, "cat", "/proc/self/status")
    with running(dockerd) as c:
        assert "NoNewPrivs:\t0" in ex(dockerd, c, "cat", "/proc/self/status")


def test_restart_policy_on_failure(dockerd):
    with running(dockerd, "--restart", "on-failure:2", cmd=("sh", "-c", "sleep 0.3; exit 3")) as c:
        assert wait_for(lambda: dockerd.inspect(c, "{{.RestartCount}} {{.State.Status}}") == "2 exited",
                        timeout=60), dockerd.inspect(c, "{{.RestartCount}} {{.State.Status}}")
        assert dockerd.inspect(c, "{{.State.ExitCode}}") == "3"
        time.sleep(1.5)
        assert dockerd.inspect(c, "{{.RestartCount}} {{.State.Status}}") == "2 exited"


def test_concurrent_containers_get_disjoint_ranges_and_free_them(dockerd):
    names = [unique("par") for _ in range(3)]
    errors: list[str] = []

    def start(n):
        r = dockerd("run", "-d", "--name", n, RT, IMAGE, "sleep", "600")
        if r.returncode:
            errors.append(r.stderr)
    try:
        threads = [threading.Thread(target=start, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        ranges = sorted(uid_base(host_pid(dockerd, n)) for n in names)
        for (b1, l1), (b2, _) in zip(ranges, ranges[1:]):
            assert b1 + l1 <= b2, ranges
        cids = [dockerd.inspect(n, "{{.Id}}") for n in names]
        root = runtime_root(cids[0])
        held = {h.container_id: b for h, b in ids_held(root)}
        assert sorted(held[c] for c in cids) == [b for b, _ in ranges]
    finally:
        for n in names:
            remove(dockerd, n)
    assert not {h.container_id for h, _ in ids_held(root)} & set(cids)


def test_pid_host_is_refused_with_isoboxs_line(dockerd):
    name = unique()
    try:
        r = dockerd("run", "--name", name, RT, "--pid=host", IMAGE, "true")
        assert r.returncode != 0
        assert "does not share the host's pid namespace" in r.stderr, r.stderr
    finally:
        remove(dockerd, name)


def test_runtime_calls_per_docker_run_rm(dockerd, capsys):
    """The calls dockerd makes to the runtime for one `docker run --rm true` (bench/engine)."""
    name = unique("bench")
    t = time.monotonic()
    dockerd("run", "--rm", "--name", name, RT, IMAGE, "true", check=True)
    elapsed = time.monotonic() - t
    # the name is gone after --rm: find the container by the calls made since
    time.sleep(1)
    recs = [r for r in read_argv_records() if r["engine"] == "docker"]
    last_create = max(i for i, r in enumerate(recs) if "create" in r["argv"])
    cid = recs[last_create]["argv"][-1]
    calls = [r["argv"] for r in recs if cid in r["argv"]]
    commands = [next(a for a in argv if a in ("create", "start", "delete", "kill", "state", "ps")) for argv in calls]
    assert commands[:2] == ["create", "start"] and "delete" in commands
    result = {"calls": len(calls), "commands": commands, "wall_seconds": round(elapsed, 3)}
    with open(os.path.join(ARGV_DIR, "calls-per-docker-run.json"), "w") as f:
        json.dump(result, f)
    with capsys.disabled():
        print(f"\nisobox-runc calls per `docker run --rm`: {len(calls)} ({', '.join(commands)}), "
              f"{elapsed:.2f}s wall")


# ---------------------------------------------------------------------------- default runtime
@pytest.fixture(scope="class")
def default_isobox(dockerd):
    dockerd.restart(default_runtime="isobox")
    try:
        yield dockerd
    finally:
        dockerd.restart(default_runtime=None)


class TestAsDefaultRuntime:
    def test_info_names_isobox(self, default_isobox):
        assert default_isobox("info", "--format", "{{.DefaultRuntime}}", check=True).stdout.strip() == "isobox"

    def test_run_rm_without_runtime_flag(self, default_isobox):
        r = default_isobox("run", "--rm", IMAGE, "cat", "/proc/self/uid_map", check=True)
        base, length = map(int, r.stdout.split()[1:3])
        assert base >= BASE_MIN and length >= 65536

    def test_detached_exec_stop(self, default_isobox):
        with running(default_isobox, runtime=None,
                     cmd=("sh", "-c", 'trap "exit 0" TERM; while :; do sleep 0.2; done')) as c:
            assert default_isobox.inspect(c, "{{.HostConfig.Runtime}}") == "isobox"
            assert uid_base(host_pid(default_isobox, c))[0] >= BASE_MIN
            assert ex(default_isobox, c, "id", "-u") == "0\n"
            default_isobox("stop", "-t", "20", c, check=True)
            assert default_isobox.inspect(c, "{{.State.ExitCode}}") == "0"

    def test_it_on_a_pty(self, default_isobox):
        name = unique()
        t = Pty(default_isobox, ["run", "-it", "--name", name, IMAGE, "sh"], rows=30, cols=90)
        try:
            t.expect(rb"# ")
            t.send(b"tty; stty size; cat /proc/self/uid_map; echo F$((40+2))Y\n")
            t.expect(rb"F42Y\r\n")
            t.send(b"exit\n")
            assert t.close() == 0
            assert re.search(rb"^30 90\r$", t.buf, re.M) and re.search(rb"^/dev/pts/0\r$", t.buf, re.M), t.buf
            assert not re.search(rb"^\s*0\s+0\s", t.buf, re.M), t.buf
        finally:
            remove(default_isobox, name)

    def test_runc_is_still_selectable(self, default_isobox):
        r = default_isobox("run", "--rm", "--runtime=runc", IMAGE, "cat", "/proc/self/uid_map", check=True)
        assert r.stdout.split()[:2] == ["0", "0"]
