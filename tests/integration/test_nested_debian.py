"""Debian's own tools inside a privileged isobox container, on real Debian trees.

The root filesystems are debootstrap'd bookworm and trixie (minbase + runc), cached under
/var/cache/isobox-test/<suite> (tests/debian_trees.py); the first build takes about a minute
per suite from deb.debian.org, and the tests skip with debootstrap's last line when no
mirror answers. A tree is shared read-write by the tests and isobox maps it with an idmapped
mount, so every test works on a tmpfs it mounts itself, and each checks afterwards that the
tree is unchanged.

  * trixie's util-linux (>= 2.39) mounts proc with fsopen: isoboxd answers ENOSYS and libmount
    falls back to mount(2), which isoboxd performs; the new proc has the container's meminfo.
  * the distribution's runc (1.1.5 in bookworm, 1.1.15 in trixie) starts an inner container,
    as root of the isobox container and in rootless mode (a nested user namespace). runc
    mounts the inner proc and sysfs through its own descriptors ("/proc/self/fd/6"), which
    the mount handler resolves to the caller's descriptor.

isoboxd's handlers are the working tree's, served by test_isoboxd_mounts's supervisor."""
from __future__ import annotations

import os
import re
import shutil

import pytest

import debian_trees
from integration import test_isoboxd_mounts
from integration.test_isoboxd_mounts import kv
from integration.test_isolation import privileged

sup = test_isoboxd_mounts.sup       # the fixture: a Notifier with the working tree's handlers

MIB = 1024 * 1024
MEMTOTAL = "MemTotal:         262144 kB"       # the container's 256 MiB limit, as isoboxd shows it
SUITES = ("bookworm", "trixie")


# ------------------------------------------------------------------ trees

@pytest.fixture(scope="session")
def debian_tree(request):
    """suite -> path of its cached debootstrap tree (built once per machine; skips if it cannot be)."""
    got: dict[str, str | Exception] = {}
    report = request.config.pluginmanager.get_plugin("terminalreporter")

    def get(suite: str) -> str:
        if suite not in got:
            try:
                path, took = debian_trees.tree(suite)
            except debian_trees.Unavailable as e:
                got[suite] = e
            else:
                got[suite] = path
                if report is not None:
                    what = f"built in {took:.0f}s" if took else "reused from the cache"
                    report.write_line(f"debootstrap {suite}: {path} {what}")
        v = got[suite]
        if isinstance(v, Exception):
            pytest.skip(str(v))
        return v
    return get


def fingerprint(root: str) -> dict[str, tuple]:
    """Every entry's type, owner, mode, size and times (ctime catches chown and chmod)."""
    out: dict[str, tuple] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                out[e.path[len(root):]] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                           st.st_ctime_ns)
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return out


@pytest.fixture
def tree(request, debian_tree):
    """The suite's tree (the test's `suite` parameter); fails the test if it changed it."""
    path = debian_tree(request.getfixturevalue("suite"))
    before = fingerprint(path)
    yield path
    after = fingerprint(path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test changed the shared tree {path}: {changed[:20]}"


@pytest.fixture(scope="session")
def tools(tmp_path_factory) -> str:
    """A directory holding a copy of the host's static busybox (the inner containers' rootfs),
    bound read-only at /srv (isobox's policy refuses binds from under /bin)."""
    d = tmp_path_factory.mktemp("tools")
    shutil.copy2("/bin/busybox", d / "busybox")
    return str(d)


def spec_edit(tools_dir: str | None = None):
    def edit(spec: dict) -> None:
        privileged(spec)
        spec["linux"]["resources"] = {"memory": {"limit": 256 * MIB}}
        if tools_dir:
            spec["mounts"].append({"destination": "/srv", "type": "bind", "source": tools_dir,
                                   "options": ["rbind", "ro"]})
    return edit


def run_sh(runtime, rootfs: str, script: str, edit, timeout: float = 120):
    r = runtime.run(runtime.bundle(rootfs, ["sh", "-c", script], edit=edit), timeout=timeout)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


# ------------------------------------------------------------------ mount -t proc

@pytest.mark.parametrize("suite", SUITES)
def test_mount_proc(suite, sup, runtime, tree):
    r = run_sh(runtime, tree, (
        "mount --version\n"
        "mount -t tmpfs -o size=1m scratch /mnt && mkdir /mnt/p || exit 1\n"
        "mount -t proc proc /mnt/p; echo rc=$?\n"
        "head -1 /mnt/p/meminfo\n"
        "echo fuse=$(grep ' /mnt/p/meminfo ' /proc/self/mountinfo | grep -c fuse.isoboxd)\n"
        "umount /mnt/p; echo umount=$?\n"
        "echo left=$(grep -c ' /mnt/p' /proc/self/mountinfo)\n"), spec_edit())
    got = kv(r.stdout)
    assert got["rc"] == "0", (r.stdout, r.stderr)
    assert MEMTOTAL in r.stdout.splitlines()
    assert got["fuse"] == "1" and got["umount"] == "0" and got["left"] == "0"
    version = re.search(r"util-linux (\d+)\.(\d+)", r.stdout)
    assert version, r.stdout
    new_api = (int(version[1]), int(version[2])) >= (2, 39)
    mounts = [(s, d, k) for s, d, k, _ in sup.verdicts if s in ("fsopen", "mount") and d.get("fstype") == "proc"]
    if suite == "trixie":
        # the point of this test: libmount's fsopen path is the one exercised
        assert new_api, f"trixie's util-linux is older than 2.39: {version[0]}"
        assert [(s, k) for s, _, k in mounts] == [("fsopen", "error"), ("mount", "value")], mounts
    elif not new_api:
        assert [(s, k) for s, _, k in mounts] == [("mount", "value")], mounts


# ------------------------------------------------------------------ the distribution's runc

INNER = r"""
set -e
mount -t tmpfs -o size=64m scratch /mnt
mkdir -p /mnt/b/rootfs/bin /mnt/b/rootfs/proc /mnt/b/rootfs/dev /mnt/b/rootfs/sys /mnt/b/rootfs/tmp /mnt/state
cp /srv/busybox /mnt/b/rootfs/bin/busybox
for t in sh cat echo head; do ln -s busybox /mnt/b/rootfs/bin/$t; done
cat > /mnt/b/rootfs/probe <<'EOF'
echo pid=$$
echo uidmap=$(cat /proc/self/uid_map)
echo mem=$(head -1 /proc/meminfo)
echo inner-ok
EOF
echo outer_uidmap=$(cat /proc/self/uid_map)
runc --version | head -1
cd /mnt/b
runc spec SPECFLAGS
sed -i -e 's/"terminal": true/"terminal": false/' -e 's|^\(\s*\)"sh"$|\1"sh", "/probe"|' config.json
grep -q '"/probe"' config.json
set +e
runc --root /mnt/state run inner; echo runc=$?
runc --root /mnt/state list -q | wc -l | sed 's/^/listed=/'
"""


@pytest.mark.parametrize("mode", ["root", "rootless"])
@pytest.mark.parametrize("suite", SUITES)
def test_distro_runc_runs_inner_container(suite, mode, sup, runtime, tree, tools):
    script = INNER.replace("SPECFLAGS", "--rootless" if mode == "rootless" else "")
    r = run_sh(runtime, tree, script, spec_edit(tools))
    got = kv(r.stdout)
    assert got.get("runc") == "0" and "inner-ok" in r.stdout, (r.stdout, r.stderr)
    assert got["pid"] == "1"                                  # its own pid namespace
    assert got["mem"] == " ".join(MEMTOTAL.split())           # isoboxd's meminfo in the inner proc
    assert got["listed"] == "0"                               # `runc run` deleted it
    if mode == "root":
        assert got["uidmap"].split() == got["outer_uidmap"].split()     # no user namespace of its own
    else:
        assert got["uidmap"].split() == ["0", "0", "1"]       # a nested user namespace: root only
    # runc mounts through its O_PATH descriptors; isoboxd performs proc (and sysfs as root)
    performed = {(d["fstype"], bool(re.fullmatch(r"/proc/self/fd/\d+", d["target"])))
                 for s, d, k, _ in sup.verdicts if s == "mount" and k == "value"}
    assert ("proc", True) in performed, sup.verdicts
    if mode == "root":
        assert ("sysfs", True) in performed, sup.verdicts
    refused = [(s, d, why) for s, d, k, why in sup.verdicts if k == "error" and s in ("mount", "umount2", "fsopen")]
    assert not refused, refused


@pytest.mark.parametrize("suite", ["trixie"])
def test_runc_cgroupfs_openat2(suite, sup, runtime, tree, tools):
    """runc opens cgroup files with openat2 when the kernel has it; isoboxd answers ENOSYS
    (as a kernel before 5.6 would), and runc must then work without warnings."""
    r = run_sh(runtime, tree, INNER.replace("SPECFLAGS", ""), spec_edit(tools))
    assert kv(r.stdout).get("runc") == "0", (r.stdout, r.stderr)
    assert "falling back to securejoin" not in r.stderr, r.stderr
    # isoboxd answers openat2 with ENOSYS (its open_how lives in memory): runc remembers the
    # first answer and quietly uses openat from then on
    calls = [why for s, d, k, why in sup.verdicts if s == "openat2"]
    assert all("not available" in why for why in calls), calls
    assert len(calls) <= 3, calls
