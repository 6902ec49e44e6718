"""isoboxd end to end: what a container sees in /proc and /sys, per-container sysctls,
readers in sub-cgroups, autostart, restart under load, and bad writes.

Real containers (isobox-runc), the real daemon and its real FUSE mount; nothing mocked."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from integration.test_isolation import privileged

from isobox.daemon import client, paths

MIB = 1024 * 1024


@pytest.fixture
def daemon():
    client.ensure_running()
    yield


def limits(spec: dict, memory: int = 256 * MIB, cpus: str = "1") -> None:
    spec["linux"]["resources"] = {"memory": {"limit": memory}, "cpu": {"cpus": cpus, "mems": "0"}}


def sh_out(runtime, rootfs: str, script: str, edit=None) -> str:
    r = runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=edit))
    assert r.returncode == 0, r.stderr
    return r.stdout


def start(runtime, rootfs: str, edit=None) -> tuple[str, int]:
    b = runtime.bundle(rootfs, ["sh", "-c", "exec sleep 300 </dev/null >/dev/null 2>&1"], edit=edit)
    cid = runtime.new_id()
    runtime("run", "--detach", "--bundle", b, cid, check=True, timeout=30)
    return cid, json.loads(runtime("state", cid, check=True).stdout)["pid"]


def exec_sh(runtime, cid: str, script: str, *flags: str) -> subprocess.CompletedProcess:
    return runtime("exec", *flags, cid, "sh", "-c", script, timeout=30)


def registered() -> list[str]:
    return [c["id"] for c in client.call({"op": "list"})["containers"]]


def host(path: str) -> str:
    with open(path) as f:
        return f.read()


# ------------------------------------------------------------------- what a container sees

def test_memory_limit_and_cpuset_everywhere(daemon, runtime, busybox_rootfs):
    if os.cpu_count() < 2:
        pytest.skip("cpuset 1 needs a second CPU")
    out = sh_out(runtime, busybox_rootfs, (
        "echo mem=$(head -1 /proc/meminfo | tr -s ' ')\n"
        "echo nproc=$(nproc)\n"
        "echo procs=$(grep -c ^processor /proc/cpuinfo) $(grep ^processor /proc/cpuinfo | tr -d ' \t')\n"
        "echo online=$(cat /sys/devices/system/cpu/online)\n"
        "echo sysdirs=$(ls /sys/devices/system/cpu | grep -E '^cpu[0-9]+$')\n"
        "echo statcpus=$(grep -E '^cpu[0-9]+ ' /proc/stat | cut -d' ' -f1)\n"
        "echo uptime=$(cut -d' ' -f1 /proc/uptime)\n"
        "echo swaps=$(wc -l < /proc/swaps)\n"), edit=limits)
    got = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert got["mem"] == "MemTotal: 262144 kB"
    assert got["nproc"] == "1"
    assert got["procs"] == "1 processor:1"          # the real number, as sched_getaffinity says
    assert got["online"] == "1"
    assert got["sysdirs"] == "cpu1"
    assert got["statcpus"] == "cpu1"
    assert 0 <= float(got["uptime"]) < 30, got["uptime"]   # since the container started, not the host
    assert float(host("/proc/uptime").split()[0]) > 60
    assert got["swaps"] == "1"                       # header only: no swap for this container


def test_nodes_owned_by_container_root_with_kernel_modes(daemon, runtime, busybox_rootfs):
    out = sh_out(runtime, busybox_rootfs, (
        "stat -c '%n %u:%g %a' /proc/meminfo /proc/stat /proc/uptime /proc/sys/net/ipv4/ip_forward "
        "/proc/sys/vm/overcommit_memory /proc/sys/kernel/threads-max\n"
        "stat -c '%n %a %h' /sys/kernel/debug /sys/kernel/tracing /sys/kernel/security\n"
        "echo debug=$(ls -A /sys/kernel/debug | wc -l) tracing=$(ls -A /sys/kernel/tracing | wc -l)\n"
        "echo net=$(ls /sys/class/net)\n"), edit=privileged)
    lines = out.splitlines()
    assert "/proc/meminfo 0:0 444" in lines and "/proc/stat 0:0 444" in lines
    assert "/proc/sys/net/ipv4/ip_forward 0:0 644" in lines
    assert "/proc/sys/vm/overcommit_memory 0:0 644" in lines
    assert "/proc/sys/kernel/threads-max 65534:65534 644" in lines   # host-global: host root's
    assert "/sys/kernel/debug 700 2" in lines and "/sys/kernel/tracing 700 2" in lines
    assert "debug=0 tracing=0" in lines
    assert "net=lo" in lines            # only the container's interfaces, not the host's
    assert "lo" != " ".join(os.listdir("/sys/class/net"))


def test_sub_cgroup_reader_sees_its_own_limit(daemon, runtime, busybox_rootfs):
    cid, _pid = start(runtime, busybox_rootfs, edit=lambda s: (privileged(s), limits(s)))
    r = exec_sh(runtime, cid, "mkdir /sys/fs/cgroup/memory/inner && "
                "echo 67108864 > /sys/fs/cgroup/memory/inner/memory.limit_in_bytes && "
                "echo $$ > /sys/fs/cgroup/memory/inner/cgroup.procs && head -1 /proc/meminfo && "
                "head -1 /proc/meminfo")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0].split() == ["MemTotal:", "65536", "kB"]
    outer = exec_sh(runtime, cid, "head -1 /proc/meminfo")
    assert outer.stdout.split() == ["MemTotal:", "262144", "kB"]     # the container's own view is untouched


# ------------------------------------------------------------------- /proc/sys

def test_sysctl_values_are_per_container(daemon, runtime, busybox_rootfs):
    before = host("/proc/sys/vm/overcommit_memory"), host("/proc/sys/net/ipv4/ip_forward")
    new_vm = "2" if before[0].strip() != "2" else "1"
    new_fw = "0" if before[1].strip() != "0" else "1"
    a, _ = start(runtime, busybox_rootfs, edit=privileged)
    b, _ = start(runtime, busybox_rootfs, edit=privileged)
    r = exec_sh(runtime, a, f"echo {new_vm} > /proc/sys/vm/overcommit_memory && "
                f"echo {new_fw} > /proc/sys/net/ipv4/ip_forward && "
                "cat /proc/sys/vm/overcommit_memory /proc/sys/net/ipv4/ip_forward")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [new_vm, new_fw]
    assert (host("/proc/sys/vm/overcommit_memory"), host("/proc/sys/net/ipv4/ip_forward")) == before
    other = exec_sh(runtime, b, "cat /proc/sys/vm/overcommit_memory /proc/sys/net/ipv4/ip_forward")
    assert other.stdout.split() == [before[0].strip(), before[1].strip()]


def test_sysctl_writes_act_with_the_callers_rights(daemon, runtime, busybox_rootfs):
    cid, _ = start(runtime, busybox_rootfs, edit=privileged)
    orig = exec_sh(runtime, cid, "cat /proc/sys/net/ipv4/ip_forward").stdout.strip()
    flip = "0" if orig == "1" else "1"
    user = exec_sh(runtime, cid, f"echo {flip} > /proc/sys/net/ipv4/ip_forward", "--user", "1000:1000")
    assert user.returncode != 0 and "denied" in user.stderr.lower()
    assert exec_sh(runtime, cid, "cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == orig
    # a new network namespace inside: its write stays there
    inner = exec_sh(runtime, cid, f"unshare -n sh -c 'echo {flip} > /proc/sys/net/ipv4/ip_forward && "
                    "cat /proc/sys/net/ipv4/ip_forward'")
    assert inner.returncode == 0, inner.stderr
    assert inner.stdout.strip() == flip
    assert exec_sh(runtime, cid, "cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == orig
    # host-global and not emulated: refused at open, as the kernel refuses an unprivileged writer
    glob = exec_sh(runtime, cid, "echo 1 > /proc/sys/kernel/threads-max")
    assert glob.returncode != 0 and "denied" in glob.stderr.lower()


def test_garbage_writes_fail_and_the_daemon_survives(daemon, runtime, busybox_rootfs):
    cid, _ = start(runtime, busybox_rootfs, edit=privileged)
    server = client.call({"op": "ping"})["pid"]
    # (file, input): all refused by the kernel too (its parser: not a number, overflow, range)
    cases = [(f, i) for f in ("vm/overcommit_memory", "fs/file-max", "kernel/panic", "kernel/printk",
                              "net/ipv4/ip_forward", "net/core/somaxconn", "fs/protected_symlinks")
             for i in ("abc", "99999999999999999999999999", "0x", "1x")]
    cases += [("vm/overcommit_memory", "7"), ("fs/protected_symlinks", "2"), ("kernel/dmesg_restrict", "5")]
    script = "".join(f"printf '{i}' > /proc/sys/{f} 2>/dev/null && echo 'ACCEPTED {f} {i}'\n" for f, i in cases)
    script += ("for f in vm/overcommit_memory fs/file-max net/ipv4/ip_forward; do\n"
               "  head -c 70000 /dev/zero | tr '\\0' x > /proc/sys/$f 2>/dev/null && echo \"ACCEPTED $f huge\"\n"
               "done\ncat /proc/sys/vm/overcommit_memory /proc/meminfo > /dev/null && echo READ-OK\n")
    r = exec_sh(runtime, cid, script)
    assert "READ-OK" in r.stdout, r.stderr
    accepted = [l for l in r.stdout.splitlines() if l.startswith("ACCEPTED")]
    assert accepted == [], accepted
    assert client.call({"op": "ping"})["pid"] == server      # no request took the server down


# ------------------------------------------------------------------- life cycle

def test_delete_and_failed_create_leave_no_registration(daemon, runtime, busybox_rootfs):
    cid, _ = start(runtime, busybox_rootfs)
    assert cid in registered()
    runtime("delete", "--force", cid, check=True)
    assert cid not in registered()
    assert not os.path.exists(f"{paths.FS_ROOT}/{client.daemon_key(runtime.root, cid)}")

    def bad_bind(spec):        # refused by the policy in the builder, after registration
        spec["mounts"].append({"destination": "/x", "type": "bind", "source": "/etc", "options": ["rbind"]})
    b = runtime.bundle(busybox_rootfs, ["true"], edit=bad_bind)
    failed = runtime.new_id()
    r = runtime("create", "--bundle", b, failed)
    assert r.returncode != 0
    assert failed not in registered()


def test_runtime_starts_a_stopped_daemon(runtime, busybox_rootfs):
    if client.running():
        left = registered()
        assert left == [], f"containers still registered from earlier tests: {left}"
        r = subprocess.run(["isobox", "daemon", "--stop"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    assert not client.running() and not client.holder_alive()
    with open("/proc/self/mountinfo") as f:
        assert paths.FS_ROOT not in f.read()
    out = sh_out(runtime, busybox_rootfs, "head -1 /proc/meminfo", edit=limits)
    assert out.split() == ["MemTotal:", "262144", "kB"]
    assert client.running()
    holder = int(host(paths.HOLDER_PID))
    # detached: its own session, not a child of ours, in its own cgroup
    with open(f"/proc/{holder}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[1]) != os.getpid() and int(fields[3]) != os.getsid(0)   # ppid, session id
    assert f":{paths.CGROUP}" in host(f"/proc/{holder}/cgroup")


def test_a_holder_killed_with_9_is_replaced_by_the_next_create(runtime, busybox_rootfs):
    """kill -9 of the holder (not the server): nobody restarts the server any more. It keeps
    serving the running container (its mounts belong to that connection), gives up the
    registration socket so that the next create starts a fresh daemon over the old mount, and
    exits once its last container is gone."""
    client.ensure_running()
    assert registered() == [], "containers still registered from earlier tests"
    cid, pid = start(runtime, busybox_rootfs, edit=limits)
    holder = int(host(paths.HOLDER_PID))
    server = client.call({"op": "ping"})["pid"]
    children = subprocess.run(["pgrep", "-P", str(holder)], capture_output=True, text=True).stdout.split()
    warm = [int(p) for p in children if int(p) != server]
    os.kill(holder, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (os.path.exists(f"/proc/{holder}") or client.running()
                                           or any(os.path.exists(f"/proc/{p}") for p in warm)):
        time.sleep(0.05)
    assert not client.running(), "the orphaned server still answers registrations"
    assert os.path.exists(f"/proc/{server}")
    assert warm and not any(os.path.exists(f"/proc/{p}") for p in warm), "the warm worker outlived its holder"
    # the running container keeps its emulation
    assert host(f"/proc/{pid}/root/proc/meminfo").split()[:3] == ["MemTotal:", "262144", "kB"]
    out = sh_out(runtime, busybox_rootfs, "head -1 /proc/meminfo", edit=limits)
    assert out.split() == ["MemTotal:", "262144", "kB"]
    assert int(host(paths.HOLDER_PID)) != holder
    with open("/proc/self/mountinfo") as f:
        assert sum(line.split()[4] == paths.FS_ROOT for line in f) == 1
    assert host(f"/proc/{pid}/root/proc/meminfo").split()[:3] == ["MemTotal:", "262144", "kB"]
    runtime("delete", "--force", cid, check=True)
    deadline = time.monotonic() + 20                  # the orphan's gc runs every 5 s
    while time.monotonic() < deadline and os.path.exists(f"/proc/{server}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{server}"), "the orphaned server outlived its last container"


def test_kill_9_under_load_loses_no_request(daemon, runtime, busybox_rootfs):
    cid, pid = start(runtime, busybox_rootfs, edit=limits)
    root = f"/proc/{pid}/root"
    files = [f"{root}/proc/meminfo", f"{root}/proc/uptime", f"{root}/proc/sys/kernel/ostype", f"{root}/proc/stat"]
    stop = threading.Event()
    errors: list[str] = []
    worst = [0.0] * 8
    reads = [0] * 8

    def reader(i: int) -> None:
        path = files[i % len(files)]
        while not stop.is_set():
            t = time.monotonic()
            try:
                with open(path, "rb") as f:
                    if not f.read():
                        errors.append(f"{path}: empty")
            except OSError as e:
                errors.append(f"{path}: {e}")
            worst[i] = max(worst[i], time.monotonic() - t)
            reads[i] += 1

    inside = subprocess.Popen(
        [*runtime_cmd(runtime), "exec", cid, "sh", "-c",
         "end=$(($(date +%s) + 4)); n=0; while [ $(date +%s) -lt $end ]; do "
         "cat /proc/meminfo /proc/uptime > /dev/null || echo ERR; n=$((n+1)); done; echo reads=$n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        old = client.call({"op": "ping"})["pid"]
        os.kill(old, signal.SIGKILL)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        out, err = inside.communicate(timeout=30)
    new = client.call({"op": "ping"})
    assert new["pid"] != old and new["generation"] >= 1
    assert errors == [], errors[:5]
    assert max(worst) < 1.0, worst
    assert min(reads) > 10, reads
    assert "ERR" not in out and "reads=" in out, out + err


def runtime_cmd(runtime) -> list[str]:
    from conftest import RUNC
    return [*RUNC, "--root", runtime.root]


def test_product_uuid_is_stable_per_container_and_differs_between_them(daemon, runtime, busybox_rootfs):
    import re
    a, _ = start(runtime, busybox_rootfs)
    b, _ = start(runtime, busybox_rootfs)
    read = "cat /sys/devices/virtual/dmi/id/product_uuid"
    ua, ua2, ub = (exec_sh(runtime, c, read).stdout.strip() for c in (a, a, b))
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", ua), ua
    assert ua == ua2 and ua != ub
    host = "/sys/devices/virtual/dmi/id/product_uuid"
    if os.path.exists(host):
        assert ua != host_read(host)
    # the rest of /sys/devices/virtual is the container's own, still live
    assert exec_sh(runtime, a, "ls /sys/devices/virtual/net").stdout.split() == ["lo"]


def host_read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
