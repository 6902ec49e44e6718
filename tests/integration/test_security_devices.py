"""Device nodes in the rootfs never reach host devices beyond the policy's [devices] allow list.

The attack: a rootfs (an image layer, or what dockerd extracted) ships device nodes, and the
spec's cgroup rules allow everything (`docker run --privileged` sends {"allow": true}). The
rootfs is not nodev, so only the devices cgroup stands between such a node and the host
device. isobox clamps the rules to the allow list (plus the container's own devpts and the
nodes it always binds): every other node gives EPERM on open, for reading and writing.

The nodes are made here as host root in a private copy of the busybox rootfs (mode 0666, so
only the cgroup can refuse them) and removed again when the module ends. A static probe
(tests/probes/devopen.c) reports the exact errno of each open. The v1 allow-list is what
isobox-runc uses on this host; the cgroup v2 BPF program is checked on the real kernel too,
on the unified hierarchy, built from the same clamped rules.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from conftest import RUNC, make_rootfs
from probes import install

# name -> (type, major, minor): nodes the allow list does not give a container
FORBIDDEN = {
    "kmsg": ("c", 1, 11),           # the host's kernel log (writable by anyone who can open it)
    "mem": ("c", 1, 1),             # physical memory
    "loop-control": ("c", 10, 237),
    "ttyS0": ("c", 4, 64),          # a serial port
    "kvm": ("c", 10, 232),
    "loop0": ("b", 7, 0),
    "console": ("c", 5, 1),         # the host's system console
}
ALLOWED = {"null": ("c", 1, 3), "zero": ("c", 1, 5)}

# runc's specconv.AllowedDevices, which dockerd 20.10 sends for a non-privileged container
DOCKER_DEFAULT_RULES = [
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    *({"allow": True, "type": "c", "major": mj, "minor": mn, "access": "rwm"}
      for mj, mn in ((1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (5, 2), (10, 200))),
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
]
ALLOW_ALL = [{"allow": True, "access": "rwm"}]


def _privileged(spec: dict) -> None:
    from integration.test_isolation import privileged
    privileged(spec)


@pytest.fixture(scope="module")
def node_rootfs(tmp_path_factory):
    """A busybox rootfs with /devopen and the nodes of FORBIDDEN and ALLOWED in /nodes."""
    d = tmp_path_factory.mktemp("devnodes")
    root = make_rootfs(str(d / "rootfs"))
    install(root, "devopen")
    nodes = os.path.join(root, "nodes")
    os.mkdir(nodes)
    try:
        for name, (t, mj, mn) in {**FORBIDDEN, **ALLOWED}.items():
            kind = 0o020000 if t == "c" else 0o060000
            os.mknod(os.path.join(nodes, name), kind | 0o666, os.makedev(mj, mn))
            os.chmod(os.path.join(nodes, name), 0o666)      # the umask must not narrow it
        yield root
    finally:
        shutil.rmtree(str(d), ignore_errors=True)           # no live device nodes left in /tmp


def host_kmsg() -> str:
    """Every record of the host's kernel log, as the host reads /dev/kmsg."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    out = []
    try:
        while True:
            try:
                out.append(os.read(fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                return "".join(out)
            except BrokenPipeError:
                continue                    # a record was overwritten while reading: go on
    finally:
        os.close(fd)


def opens(stdout: str) -> dict[str, tuple[str, str]]:
    """devopen's lines -> {path: (read result, write result)}."""
    out = {}
    for line in stdout.replace("\r", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].startswith("r=") and parts[2].startswith("w="):
            out[parts[0]] = (parts[1][2:], parts[2][2:])
    return out


def run_probe(runtime, rootfs: str, rules: list | None, privileged: bool, marker: str, env=None):
    paths = [f"/nodes/{n}" for n in (*FORBIDDEN, *ALLOWED)] + ["/dev/null", "/dev/zero"]
    script = (f"/devopen -w '{marker}\n' /nodes/kmsg; /devopen {' '.join(paths)}; "
              "cat /sys/fs/cgroup/devices/devices.list 2>/dev/null | sed 's/^/list: /'")

    def edit(spec):
        if privileged:
            _privileged(spec)
        if rules is None:
            spec["linux"].setdefault("resources", {}).pop("devices", None)
        else:
            spec["linux"].setdefault("resources", {})["devices"] = rules
    b = runtime.bundle(rootfs, ["sh", "-c", script], edit=edit)
    r = runtime("run", "--bundle", b, runtime.new_id(), env=env)
    assert r.returncode == 0, r.stderr
    return r


def assert_clamped(r, marker: str) -> None:
    assert marker not in host_kmsg(), f"the container wrote into the host's kernel log:\n{r.stdout}"
    res = opens(r.stdout)
    for name in FORBIDDEN:
        assert res.get(f"/nodes/{name}") == ("EPERM", "EPERM"), (name, r.stdout)
    for path in ("/nodes/null", "/nodes/zero", "/dev/null", "/dev/zero"):
        assert res.get(path) == ("OK", "OK"), (path, r.stdout)
    assert "write=EPERM" in r.stdout, r.stdout
    lists = [l.removeprefix("list: ") for l in r.stdout.splitlines() if l.startswith("list: ")]
    if lists:                                        # v1: what the kernel holds for the container
        assert "a *:* rwm" not in lists and "c 1:11 rwm" not in lists, lists


def test_privileged_allow_all_rule_cannot_open_nodes_from_the_rootfs(runtime, node_rootfs):
    marker = f"isobox-devices-{uuid.uuid4().hex}"
    r = run_probe(runtime, node_rootfs, ALLOW_ALL, privileged=True, marker=marker)
    assert_clamped(r, marker)


def test_char_wildcard_rule_of_a_plain_container_is_clamped(runtime, node_rootfs):
    # `docker run --device-cgroup-rule 'c *:* rwm'` (no --privileged): the same clamp
    marker = f"isobox-devices-{uuid.uuid4().hex}"
    rules = [{"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "access": "rwm"}]
    assert_clamped(run_probe(runtime, node_rootfs, rules, privileged=False, marker=marker), marker)


@pytest.mark.parametrize("rules", [DOCKER_DEFAULT_RULES, None], ids=["docker-default", "no-rules"])
def test_default_rules_give_only_the_harmless_devices(runtime, node_rootfs, rules):
    marker = f"isobox-devices-{uuid.uuid4().hex}"
    assert_clamped(run_probe(runtime, node_rootfs, rules, privileged=False, marker=marker), marker)


def test_the_containers_terminal_still_works_when_privileged(runtime, node_rootfs):
    def edit(spec):
        _privileged(spec)
        spec["linux"]["resources"] = {"devices": ALLOW_ALL}
        spec["process"]["terminal"] = True
    script = "echo tty=$(tty); /devopen /dev/ptmx /dev/tty; /devopen -p; echo hi > /dev/tty && echo tty-ok"
    b = runtime.bundle(node_rootfs, ["sh", "-c", script], edit=edit)
    r = runtime.run(b)
    assert r.returncode == 0, r.stderr
    res = opens(r.stdout)
    assert "tty=/dev/pts/0" in r.stdout and "tty-ok" in r.stdout, r.stdout
    for path in ("/dev/ptmx", "/dev/tty"):
        assert res.get(path) == ("OK", "OK"), (path, r.stdout)
    assert "pty=OK /dev/pts/1" in r.stdout, r.stdout     # a new pair of the container's devpts


def test_policy_allow_list_is_the_only_way_to_more(runtime, node_rootfs, tmp_path):
    """A device the policy lists is usable when the spec's rules allow it too, and only then."""
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control on this host")
    pol = tmp_path / "policy.toml"
    pol.write_text('[devices]\nallow = ["/dev/null", "/dev/loop-control"]\n')
    os.chmod(pol, 0o644)
    env = {**os.environ, "ISOBOX_POLICY": str(pol)}
    marker = f"isobox-devices-{uuid.uuid4().hex}"
    r = run_probe(runtime, node_rootfs, ALLOW_ALL, privileged=True, marker=marker, env=env)
    res = opens(r.stdout)
    assert res["/nodes/loop-control"] == ("OK", "OK"), r.stdout
    assert res["/nodes/kmsg"] == ("EPERM", "EPERM") and res["/nodes/kvm"] == ("EPERM", "EPERM"), r.stdout
    r = run_probe(runtime, node_rootfs, DOCKER_DEFAULT_RULES, privileged=False, marker=marker, env=env)
    assert opens(r.stdout)["/nodes/loop-control"] == ("EPERM", "EPERM"), r.stdout   # the spec did not ask
    assert marker not in host_kmsg()


def test_runc_update_with_an_allow_all_rule_is_clamped(runtime, node_rootfs):
    b = runtime.bundle(node_rootfs, ["sleep", "120"])
    cid = runtime.new_id()
    err = os.path.join(runtime.tmp, "run-d.err")
    with open(os.devnull, "r+") as null, open(err, "w") as e:   # the container inherits stdio: no pipes
        r = subprocess.run([*RUNC, "--root", runtime.root, "run", "-d", "--bundle", b, cid],
                           stdin=null, stdout=null, stderr=e, timeout=60)
    with open(err) as e:
        assert r.returncode == 0, e.read()
    local = {**os.environ, "ISOBOX_WARM": "0"}     # this checkout's code, not the shared worker's
    r = runtime("update", "--resources", "-", cid, input=json.dumps({"devices": ALLOW_ALL}), env=local)
    assert r.returncode == 0, r.stderr
    r = runtime("exec", cid, "/devopen", *(f"/nodes/{n}" for n in (*FORBIDDEN, "null")))
    assert r.returncode == 0, r.stderr
    res = opens(r.stdout)
    for name in FORBIDDEN:
        assert res[f"/nodes/{name}"] == ("EPERM", "EPERM"), (name, r.stdout)
    assert res["/nodes/null"] == ("OK", "OK"), r.stdout


def test_mknod_through_isoboxd_gives_only_usable_harmless_nodes(runtime, node_rootfs):
    """Container root has CAP_MKNOD in its user namespace; isoboxd makes the harmless nodes
    (inside the clamp) and refuses the rest, the host's console included."""
    from isobox.daemon import client
    client.ensure_running()

    def edit(spec):
        _privileged(spec)
        spec["linux"]["resources"] = {"devices": ALLOW_ALL}
    script = ("mkdir -p /tmp/mk && cd /tmp/mk && "
              "for n in 'null c 1 3' 'tty c 5 0' 'console c 5 1' 'kmsg c 1 11' 'kvm c 10 232' 'loop0 b 7 0'; do "
              "set -- $n; if mknod $1 $2 $3 $4 2>/dev/null; then echo made-$1; else echo refused-$1; fi; done; "
              "/devopen /tmp/mk/null; ls /tmp/mk")
    b = runtime.bundle(node_rootfs, ["sh", "-c", script], edit=edit)
    r = runtime.run(b)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert "made-null" in lines and "made-tty" in lines, r.stdout
    for n in ("console", "kmsg", "kvm", "loop0"):
        assert f"refused-{n}" in lines, r.stdout
    assert opens(r.stdout)["/tmp/mk/null"] == ("OK", "OK"), r.stdout


# --- cgroup v2: the BPF program from the same clamp, on the real kernel ---------------------

OPENER = r"""
import os, sys
sys.stdin.readline()
for p in sys.argv[1:]:
    res = []
    for mode in (os.O_RDONLY, os.O_WRONLY):
        try:
            os.close(os.open(p, mode | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC))
            res.append("OK")
        except OSError as e:
            res.append(str(e.errno))
    print(p, "r=" + res[0], "w=" + res[1], flush=True)
"""


def test_v2_bpf_program_of_an_allow_all_spec_is_clamped():
    from isobox.cgroups.layout import Layout, detect
    from isobox.cgroups.manager import ContainerCgroup
    from isobox.linux import bpf
    unified = detect().unified
    if unified is None:
        pytest.skip("no cgroup2 mount on this host")
    # only the cgroup2 hierarchy (as "hybrid": no controller enabled in the host's root), so
    # the device check is the BPF program alone
    cg = ContainerCgroup(Layout("hybrid", (unified,)), f"/isobox-test-{secrets.token_hex(4)}/dev")
    targets = ["/dev/kmsg", "/dev/loop-control", "/dev/null", "/dev/zero"]
    p = None
    try:
        cg.create({"devices": ALLOW_ALL})          # no allow list given: isobox's own harmless set
        d = cg.dir("")
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert len(bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)) == 1
        finally:
            os.close(fd)
        p = subprocess.Popen([sys.executable, "-c", OPENER, *targets], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        cg.add(p.pid)
        out, _ = p.communicate("go\n", timeout=30)
        res = opens(out)
        eperm = str(errno.EPERM)
        assert res["/dev/kmsg"] == (eperm, eperm), out
        assert res["/dev/loop-control"] == (eperm, eperm), out
        assert res["/dev/null"] == ("OK", "OK") and res["/dev/zero"] == ("OK", "OK"), out
    finally:
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        cg.destroy()
        top = os.path.join(unified.mountpoint, cg.path.strip("/").split("/")[0])
        if os.path.isdir(top):
            os.rmdir(top)
