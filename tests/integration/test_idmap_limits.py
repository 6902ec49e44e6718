"""What cannot be ID-mapped is never chowned: it shows as nobody, or is refused."""
import os
import subprocess

from conftest import RUNC, ids_held, leftovers


def test_non_idmappable_bind_source_shows_as_nobody_and_is_not_chowned(runtime, busybox_rootfs):
    # /proc's files live on procfs, which cannot be ID-mapped
    before = os.stat("/proc/sys/kernel/hostname")

    def bind(spec):
        spec["mounts"].append({"destination": "/hostsys", "type": "bind", "source": "/proc/sys/kernel",
                               "options": ["rbind", "ro"]})
    log = os.path.join(runtime.tmp, "log.json")
    b = runtime.bundle(busybox_rootfs, ["stat", "-c", "%u:%g", "/hostsys/hostname"], edit=bind)
    cid = runtime.new_id()
    # the default policy refuses anything below /proc; this test needs a procfs source
    policy = os.path.join(runtime.tmp, "policy.toml")
    with open(policy, "w") as f:
        f.write('[mounts]\ndeny = ["/etc"]\n')
    os.chmod(policy, 0o644)
    r = runtime("--log", log, "--log-format", "json", "run", "--bundle", b, cid,
                env={**os.environ, "ISOBOX_POLICY": policy})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "65534:65534"
    after = os.stat("/proc/sys/kernel/hostname")
    assert (before.st_uid, before.st_gid) == (after.st_uid, after.st_gid) == (0, 0)
    with open(log) as f:
        assert "cannot be idmapped" in f.read()


def test_rootfs_on_a_non_idmappable_filesystem_is_refused_cleanly(runtime, busybox_rootfs, tmp_path):
    """A rootfs directory inside an overlay (not the overlay's own mount point) cannot be
    ID-mapped; isobox refuses in one line rather than chowning the image."""
    base = tmp_path / "ovl"
    for d in ("lower/rootfs", "upper", "work", "merged"):
        (base / d).mkdir(parents=True)
    subprocess.run(["cp", "-a", busybox_rootfs + "/.", str(base / "lower/rootfs")], check=True)
    b = runtime.bundle(str(base / "merged/rootfs"), ["true"])
    cid = runtime.new_id()
    script = (f"mount -t overlay overlay -o lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work "
              f"{base}/merged && exec {' '.join(RUNC)} --root {runtime.root} run --bundle {b} {cid}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be ID-mapped" in lines[0] and "overlay" in lines[0], r.stderr
    assert leftovers(cid) == [] and ids_held(runtime.root) == []
    assert not os.path.exists(os.path.join(runtime.root, cid))
