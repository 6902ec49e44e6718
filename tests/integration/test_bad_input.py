"""Bad bundles, ids and specs: one line on stderr, a non-zero exit, and nothing left behind.

Every refusal is checked for the absence of a state dir under the runtime root, of mounts
and cgroups naming the container, of held host-ID ranges, and of any process still
carrying the container id in its command line (the init is a clone of the runtime).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time

import pytest

from conftest import RUNC, ids_held, leftovers

POOL_BASE = 1048576 + 65536 * 4000   # inside the isobox pool, far from the allocator's first ranges
LOOP = "while true; do sleep 0.1; done"


def detached(runtime, *args: str) -> subprocess.CompletedProcess:
    n = len(os.listdir(runtime.tmp))
    out, err = os.path.join(runtime.tmp, f"out{n}"), os.path.join(runtime.tmp, f"err{n}")
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.run([*RUNC, "--root", runtime.root, *args], stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                           timeout=60)
    with open(out) as o, open(err) as e:
        return subprocess.CompletedProcess(p.args, p.returncode, o.read(), e.read())


def processes_mentioning(tag: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/cgroup", "rb") as f:
                cg = f.read()
        except OSError:
            continue
        if tag.encode() in cmd or f"/{tag}\n".encode() in cg:
            out.append(int(name))
    return out


def assert_nothing_left(runtime, cid: str, tag: str | None = None) -> None:
    tag = tag or cid
    entries = os.listdir(runtime.root) if os.path.isdir(runtime.root) else []
    assert entries == [], entries
    assert leftovers(tag) == []
    assert ids_held(runtime.root) == []
    # a dying init may take a moment to be reaped by whoever inherited it
    deadline = time.monotonic() + 3
    while processes_mentioning(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(tag) == []


def refused(runtime, bundle: str, cid: str | None = None) -> str:
    """create must fail with exactly one line and leave nothing; returns that line."""
    cid = runtime.new_id() if cid is None else cid
    r = detached(runtime, "create", "--bundle", bundle, cid)
    assert r.returncode != 0, "create succeeded"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    assert_nothing_left(runtime, cid)
    return lines[0]


def edited(runtime, rootfs, edit, args=None) -> str:
    return runtime.bundle(rootfs, args or ["sh", "-c", LOOP], edit=edit)


# --- bundle and config.json ----------------------------------------------------------------

def test_malformed_config(runtime, busybox_rootfs):
    b = edited(runtime, busybox_rootfs, None)
    with open(os.path.join(b, "config.json"), "w") as f:
        f.write('{"ociVersion": "1.2.0", "process": ')
    assert "JSON" in refused(runtime, b)


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "{}"])
def test_config_wrong_shape(runtime, busybox_rootfs, text):
    b = edited(runtime, busybox_rootfs, None)
    with open(os.path.join(b, "config.json"), "w") as f:
        f.write(text)
    assert "config.json" in refused(runtime, b)


def test_config_missing(runtime, busybox_rootfs):
    b = edited(runtime, busybox_rootfs, None)
    os.unlink(os.path.join(b, "config.json"))
    assert "config.json" in refused(runtime, b)


def test_bundle_missing(runtime):
    assert "bundle" in refused(runtime, os.path.join(runtime.tmp, "no-such-bundle"))


def test_missing_process_args(runtime, busybox_rootfs):
    assert "process.args" in refused(runtime, edited(runtime, busybox_rootfs, lambda s: s["process"].pop("args")))


@pytest.mark.parametrize("args", [[], [1, 2], "sh"])
def test_bad_process_args(runtime, busybox_rootfs, args):
    def edit(s):
        s["process"]["args"] = args
    assert "process.args" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_missing_process(runtime, busybox_rootfs):
    assert "process" in refused(runtime, edited(runtime, busybox_rootfs, lambda s: s.pop("process")))


def test_rootfs_missing(runtime, busybox_rootfs):
    def edit(s):
        s["root"]["path"] = "no-such-rootfs"
    assert "rootfs" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_root_path_missing(runtime, busybox_rootfs):
    assert "root.path" in refused(runtime, edited(runtime, busybox_rootfs, lambda s: s.pop("root")))


# --- container ids ---------------------------------------------------------------------------

@pytest.mark.parametrize("cid", ["", "/", "..", ".", "a/b", "../x", "a b", "x" * 1025])
def test_invalid_id(runtime, busybox_rootfs, cid):
    b = edited(runtime, busybox_rootfs, None)
    r = detached(runtime, "create", "--bundle", b, cid)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "id" in lines[0], r.stderr
    # the id itself is no use as a leak tag ("/" is everywhere); the bundle path is
    assert_nothing_left(runtime, cid, tag=b)
    assert not os.path.exists(os.path.join(os.path.dirname(runtime.tmp), "x"))


@pytest.mark.parametrize("cid", ["x" * 1024, "\u00e9" * 300])
def test_longest_valid_id(runtime, busybox_rootfs, cid):
    """Ids up to 1,024 characters work end to end, though a directory name holds 255 bytes."""
    runtime.ids.append(cid)
    b = edited(runtime, busybox_rootfs, None, ["true"])
    r = detached(runtime, "create", "--bundle", b, cid)
    assert r.returncode == 0, r.stderr
    assert json.loads(runtime("state", cid, check=True).stdout)["id"] == cid
    assert any(c["id"] == cid for c in json.loads(runtime("list", "--format", "json", check=True).stdout))
    runtime("start", cid, check=True)
    runtime("delete", "--force", cid, check=True)
    assert_nothing_left(runtime, cid, tag=b)


def test_long_ids_with_a_common_prefix_do_not_collide(runtime, busybox_rootfs):
    a, b_ = "y" * 600 + "a", "y" * 600 + "b"
    bundle = edited(runtime, busybox_rootfs, None)
    for cid in (a, b_):
        runtime.ids.append(cid)
        r = detached(runtime, "create", "--bundle", bundle, cid)
        assert r.returncode == 0, r.stderr
    assert {json.loads(runtime("state", c, check=True).stdout)["id"] for c in (a, b_)} == {a, b_}


def test_duplicate_id(runtime, busybox_rootfs):
    b = edited(runtime, busybox_rootfs, None)
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", b, cid)
    assert r.returncode == 0, r.stderr
    first = json.loads(runtime("state", cid, check=True).stdout)
    held = ids_held(runtime.root)
    assert len(held) == 1

    r = detached(runtime, "create", "--bundle", b, cid)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "Traceback" not in r.stderr
    # the first container is untouched and still works
    assert ids_held(runtime.root) == held
    again = json.loads(runtime("state", cid, check=True).stdout)
    assert again == first and again["status"] == "created"
    runtime("start", cid, check=True)
    assert json.loads(runtime("state", cid, check=True).stdout)["status"] == "running"
    runtime("delete", "--force", cid, check=True)
    assert_nothing_left(runtime, cid)


# --- ID mappings ------------------------------------------------------------------------------

def _maps(uid: list[dict], gid: list[dict]):
    def edit(s):
        s["linux"]["uidMappings"] = uid
        s["linux"]["gidMappings"] = gid
    return edit


def _m(container: int, host: int, size: int) -> dict:
    return {"containerID": container, "hostID": host, "size": size}


def test_valid_explicit_mapping_is_accepted(runtime, busybox_rootfs):
    """The control for the refusals below: one range from 0, 65536 long, in the pool."""
    m = [_m(0, POOL_BASE, 65536)]
    b = edited(runtime, busybox_rootfs, _maps(m, m), ["sh", "-c", "cat /proc/self/uid_map"])
    r = runtime.run(b)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", str(POOL_BASE), "65536"]
    assert ids_held(runtime.root) == []


@pytest.mark.parametrize("uid,gid,word", [
    ([_m(0, POOL_BASE, 65536), _m(65536, POOL_BASE + 65536, 65536)], [_m(0, POOL_BASE, 65536)], "one"),
    ([_m(0, POOL_BASE, 65536)], [], "one"),
    ([_m(1, POOL_BASE, 65536)], [_m(1, POOL_BASE, 65536)], "container ID 0"),
    ([_m(0, POOL_BASE, 1000)], [_m(0, POOL_BASE, 1000)], "65536"),
    ([_m(0, 0, 65536)], [_m(0, 0, 65536)], "host ID 0"),
    ([_m(0, POOL_BASE, 65536)], [_m(0, POOL_BASE + 65536, 65536)], "same host start"),
    ([_m(0, POOL_BASE, 65536)], [_m(0, POOL_BASE, 131072)], "size"),
    ([_m(0, 2**32 - 65536, 65536)], [_m(0, 2**32 - 65536, 65536)], "4294967295"),
], ids=["two-uid-ranges", "no-gid-map", "containerID-1", "size-1000", "hostID-0", "different-hostIDs",
        "different-sizes", "top-of-id-space"])
def test_bad_mappings(runtime, busybox_rootfs, uid, gid, word):
    assert word in refused(runtime, edited(runtime, busybox_rootfs, _maps(uid, gid)))


def test_mapping_entry_wrong_shape(runtime, busybox_rootfs):
    m = [{"containerID": 0, "hostID": "1048576", "size": 65536}]
    assert "uidMappings" in refused(runtime, edited(runtime, busybox_rootfs, _maps(m, m)))


def test_mapping_overlapping_live_container(runtime, busybox_rootfs):
    first = runtime.new_id()
    r = detached(runtime, "create", "--bundle", edited(runtime, busybox_rootfs, None), first)
    assert r.returncode == 0, r.stderr
    pid = json.loads(runtime("state", first, check=True).stdout)["pid"]
    with open(f"/proc/{pid}/uid_map") as f:
        inside, base, size = (int(x) for x in f.read().split())
    assert (inside, size) == (0, 65536) and base >= 1048576
    held = ids_held(runtime.root)

    for host in (base, base + 1000, base - 65536 + 1):
        m = [_m(0, host, 65536)]
        cid = runtime.new_id()
        r = detached(runtime, "create", "--bundle", edited(runtime, busybox_rootfs, _maps(m, m)), cid)
        assert r.returncode != 0, f"mapping at {host} overlapping {base} accepted"
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and "overlap" in lines[0] and "Traceback" not in r.stderr, r.stderr
        assert not os.path.exists(os.path.join(runtime.root, cid))
        assert leftovers(cid) == []
        assert processes_mentioning(cid) == []
        assert ids_held(runtime.root) == held
    # the first container is unaffected
    runtime("start", first, check=True)
    assert json.loads(runtime("state", first, check=True).stdout)["status"] == "running"


# --- namespaces ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ns", ["pid", "network", "ipc", "uts", "mount"])
def test_absent_namespace_refused(runtime, busybox_rootfs, ns):
    def edit(s):
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != ns]
    line = refused(runtime, edited(runtime, busybox_rootfs, edit))
    assert f"isobox does not share the host's {ns} namespace" in line


@pytest.mark.parametrize("ns,proc", [("network", "net"), ("pid", "pid"), ("ipc", "ipc"), ("uts", "uts"),
                                     ("user", "user"), ("cgroup", "cgroup")])
@pytest.mark.parametrize("who", ["1", "self"])
def test_host_namespace_path_refused(runtime, busybox_rootfs, ns, proc, who):
    try:
        os.stat(f"/proc/{who}/ns/{proc}")
    except PermissionError:
        pytest.skip(f"/proc/{who}/ns is not readable here (pid 1 is not this host's init)")
    def edit(s):
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != ns]
        s["linux"]["namespaces"].append({"type": ns, "path": f"/proc/{who}/ns/{proc}"})
    if ns == "uts":
        edit_h = edit

        def edit(s):  # noqa: F811 - a joined uts namespace cannot also set a hostname
            edit_h(s)
            s.pop("hostname", None)
    line = refused(runtime, edited(runtime, busybox_rootfs, edit))
    assert "host" in line and ns in line


def test_mount_namespace_path_refused(runtime, busybox_rootfs):
    def edit(s):
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != "mount"]
        s["linux"]["namespaces"].append({"type": "mount", "path": "/proc/1/ns/mnt"})
    assert "mount" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_namespace_path_missing(runtime, busybox_rootfs):
    def edit(s):
        s["linux"]["namespaces"] = [n for n in s["linux"]["namespaces"] if n["type"] != "network"]
        s["linux"]["namespaces"].append({"type": "network", "path": "/no/such/netns"})
    assert "/no/such/netns" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_unknown_namespace_type(runtime, busybox_rootfs):
    assert "bogus" in refused(runtime, edited(runtime, busybox_rootfs,
                                              lambda s: s["linux"]["namespaces"].append({"type": "bogus"})))


def test_namespace_listed_twice(runtime, busybox_rootfs):
    assert "twice" in refused(runtime, edited(runtime, busybox_rootfs,
                                              lambda s: s["linux"]["namespaces"].append({"type": "pid"})))


# --- process ---------------------------------------------------------------------------------------

def test_executable_not_found(runtime, busybox_rootfs):
    line = refused(runtime, edited(runtime, busybox_rootfs, None, ["no-such-program", "x"]))
    assert "executable file not found" in line


def test_executable_absolute_path_missing(runtime, busybox_rootfs):
    assert "/no/such/program" in refused(runtime, edited(runtime, busybox_rootfs, None, ["/no/such/program"]))


def test_bad_cwd(runtime, busybox_rootfs):
    def edit(s):
        s["process"]["cwd"] = "/no/such/dir"
    line = refused(runtime, edited(runtime, busybox_rootfs, edit))
    assert "cwd" in line and "/no/such/dir" in line


def test_relative_cwd(runtime, busybox_rootfs):
    def edit(s):
        s["process"]["cwd"] = "tmp"
    assert "cwd" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_rlimit_above_runtime_hard_limit(runtime, busybox_rootfs):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("RLIMIT_NOFILE hard limit is unlimited here")

    def edit(s):
        s["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": hard + 1}]
    assert "RLIMIT_NOFILE" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_rlimit_at_runtime_hard_limit_accepted(runtime, busybox_rootfs):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def edit(s):
        s["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": hard}]
    r = runtime.run(edited(runtime, busybox_rootfs, edit, ["sh", "-c", "ulimit -Hn"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in (str(hard), "unlimited")


@pytest.mark.parametrize("rl,word", [
    ({"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}, "RLIMIT_BOGUS"),
    ({"type": "RLIMIT_NOFILE", "soft": 2048, "hard": 1024}, "RLIMIT_NOFILE"),
    ({"type": "RLIMIT_NOFILE", "soft": 1024}, "rlimits"),
])
def test_bad_rlimits(runtime, busybox_rootfs, rl, word):
    def edit(s):
        s["process"]["rlimits"] = [rl]
    assert word in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_oom_score_adj_below_runtime(runtime, busybox_rootfs):
    with open("/proc/self/oom_score_adj") as f:
        own = int(f.read())
    if own <= -1000:
        pytest.skip("the runtime's oom_score_adj is already the minimum")

    def edit(s):
        s["process"]["oomScoreAdj"] = own - 1
    assert "oomScoreAdj" in refused(runtime, edited(runtime, busybox_rootfs, edit))


@pytest.mark.parametrize("value", [1001, -1001, "5"])
def test_oom_score_adj_out_of_range(runtime, busybox_rootfs, value):
    def edit(s):
        s["process"]["oomScoreAdj"] = value
    assert "oomScoreAdj" in refused(runtime, edited(runtime, busybox_rootfs, edit))


@pytest.mark.parametrize("key", ["vm.swappiness", "kernel.pid_max", "fs.file-max"])
def test_non_namespaced_sysctl(runtime, busybox_rootfs, key):
    def edit(s):
        s["linux"]["sysctl"] = {key: "10"}
    assert key in refused(runtime, edited(runtime, busybox_rootfs, edit))


@pytest.mark.parametrize("caps", [["CAP_BOGUS"], ["CAP_CHOWN", "NOT_A_CAP"]])
def test_unknown_capability(runtime, busybox_rootfs, caps):
    def edit(s):
        s["process"]["capabilities"]["bounding"] = caps
    line = refused(runtime, edited(runtime, busybox_rootfs, edit))
    assert "capabilities" in line and caps[-1] in line


def test_capability_not_a_list(runtime, busybox_rootfs):
    def edit(s):
        s["process"]["capabilities"]["effective"] = "CAP_CHOWN"
    assert "capabilities" in refused(runtime, edited(runtime, busybox_rootfs, edit))


@pytest.mark.parametrize("user", [{"uid": -1, "gid": 0}, {"uid": "0", "gid": 0}, {"uid": 0, "gid": True}])
def test_bad_user(runtime, busybox_rootfs, user):
    def edit(s):
        s["process"]["user"] = user
    assert "process.user" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_relative_mount_destination(runtime, busybox_rootfs):
    def edit(s):
        s["mounts"].append({"destination": "mnt", "type": "tmpfs", "source": "tmpfs"})
    assert "mounts" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_relative_bind_source(runtime, busybox_rootfs):
    def edit(s):
        s["mounts"].append({"destination": "/mnt", "type": "bind", "source": "rel", "options": ["rbind"]})
    assert "bind source" in refused(runtime, edited(runtime, busybox_rootfs, edit))


@pytest.mark.parametrize("path", ["system.slice:docker:x", "/a/../../b"])
def test_bad_cgroups_path(runtime, busybox_rootfs, path):
    def edit(s):
        s["linux"]["cgroupsPath"] = path
    assert "cgroupsPath" in refused(runtime, edited(runtime, busybox_rootfs, edit))


def test_time_namespace_refused(runtime, busybox_rootfs):
    assert "time" in refused(runtime, edited(runtime, busybox_rootfs,
                                             lambda s: s["linux"]["namespaces"].append({"type": "time"})))


def test_run_refusal_leaves_nothing(runtime, busybox_rootfs):
    cid = runtime.new_id()
    r = runtime("run", "--bundle", edited(runtime, busybox_rootfs, None, ["no-such-program"]), cid)
    assert r.returncode != 0
    assert len(r.stderr.splitlines()) == 1 and "executable file not found" in r.stderr
    assert_nothing_left(runtime, cid)


def test_unreadable_rootfs_is_file(runtime, busybox_rootfs):
    b = edited(runtime, busybox_rootfs, None)
    with open(os.path.join(b, "rootfs-file"), "w") as f:
        f.write("x")

    def edit(s):
        s["root"]["path"] = "rootfs-file"
    with open(os.path.join(b, "config.json")) as f:
        spec = json.load(f)
    edit(spec)
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(spec, f)
    assert "rootfs" in refused(runtime, b)
    shutil.rmtree(b)


def test_pid_file_in_missing_dir(runtime, busybox_rootfs):
    cid = runtime.new_id()
    r = detached(runtime, "create", "--bundle", edited(runtime, busybox_rootfs, None), "--pid-file",
                 os.path.join(runtime.tmp, "no-such-dir", "pid"), cid)
    assert r.returncode != 0
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert_nothing_left(runtime, cid)


def test_root_is_a_file(runtime, busybox_rootfs):
    blocker = os.path.join(runtime.tmp, "not-a-dir")
    with open(blocker, "w") as f:
        f.write("x")
    cid = runtime.new_id()
    p = subprocess.run([*RUNC, "--root", blocker, "create", "--bundle", edited(runtime, busybox_rootfs, None), cid],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert leftovers(cid) == [] and processes_mentioning(cid) == []
    from isobox.ids.allocator import Allocator
    assert [h for h, _ in Allocator().holders() if h.container_id == cid] == []
