"""The runtime policy holds in isobox-runc: refused bind sources, the device allow-list,
read-only idmapped binds, and a policy file only root can change."""
import os

import pytest

from conftest import ids_held, leftovers


def policy_file(tmp_path, text: str, mode: int = 0o644) -> dict:
    f = tmp_path / "policy.toml"
    f.write_text(text)
    os.chmod(f, mode)
    return {**os.environ, "ISOBOX_POLICY": str(f)}


def add_bind(source: str, dest: str = "/mnt/h", opts=("rbind", "rw")):
    def edit(spec):
        spec["mounts"].append({"destination": dest, "type": "bind", "source": source, "options": list(opts)})
    return edit


def refused_cleanly(runtime, r, cid: str) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert leftovers(cid) == []
    assert ids_held(runtime.root) == []
    assert runtime("state", cid).returncode != 0
    return lines[0]


def test_bind_of_etc_is_refused_with_the_rule_and_nothing_left(runtime, busybox_rootfs):
    b = runtime.bundle(busybox_rootfs, ["true"], edit=add_bind("/etc"))
    cid = runtime.new_id()
    r = runtime("run", "--bundle", b, cid)
    line = refused_cleanly(runtime, r, cid)
    assert "bind mount of /etc refused by /etc/isobox/policy.toml (mounts.deny: /etc)" in line


@pytest.mark.parametrize("source, rule", [
    ("/var/run/docker.sock", "mounts.deny: /var/run/docker.sock"),
    ("/var", "contains it"),
    ("/proc/sys/kernel", "mounts.deny: /proc"),
    ("/", "mounts.deny: /"),
])
def test_denied_ancestors_and_below_are_refused(runtime, busybox_rootfs, source, rule):
    if not os.path.exists(source):
        pytest.skip(f"{source} does not exist on this host")
    b = runtime.bundle(busybox_rootfs, ["true"], edit=add_bind(source, opts=("rbind", "ro")))
    cid = runtime.new_id()
    line = refused_cleanly(runtime, runtime("run", "--bundle", b, cid), cid)
    assert f"bind mount of {source}" in line and rule in line


def test_bind_of_a_symlink_to_etc_is_refused(runtime, busybox_rootfs, tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to("/etc")
    b = runtime.bundle(busybox_rootfs, ["true"], edit=add_bind(str(link)))
    cid = runtime.new_id()
    line = refused_cleanly(runtime, runtime("run", "--bundle", b, cid), cid)
    assert f"bind mount of {link} (resolves to /etc) refused by /etc/isobox/policy.toml (mounts.deny: /etc)" in line


def test_bind_of_a_harmless_dir_works_and_is_writable(runtime, busybox_rootfs, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "hello").write_text("hi\n")
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "cat /mnt/h/hello && touch /mnt/h/new && echo ok"],
                       edit=add_bind(str(d)))
    r = runtime.run(b)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hi", "ok"]
    assert (d / "new").exists()


def test_readonly_idmapped_binds_when_the_policy_says_so(runtime, busybox_rootfs, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    env = policy_file(tmp_path, "[mounts]\nwritable_idmapped_binds = false\n")
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "touch /mnt/h/new 2>&1; ls /mnt/h"], edit=add_bind(str(d)))
    r = runtime("run", "--bundle", b, runtime.new_id(), env=env)
    assert r.returncode == 0, r.stderr
    assert "Read-only file system" in r.stdout
    assert not (d / "new").exists()


LOOP = {"path": "/dev/loop-control", "type": "c", "major": 10, "minor": 237, "fileMode": 0o600, "uid": 0, "gid": 0}


def _with_device(spec):
    spec["linux"].setdefault("devices", []).append(dict(LOOP))


def test_device_outside_the_allow_list_is_not_passed(runtime, busybox_rootfs):
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control")
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "test -c /dev/loop-control && echo present || echo absent"],
                       edit=_with_device)
    r = runtime.run(b)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "absent"


def test_device_in_the_policy_allow_list_is_passed(runtime, busybox_rootfs, tmp_path):
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control")
    env = policy_file(tmp_path, '[devices]\nallow = ["/dev/null", "/dev/loop-control"]\n')
    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "test -c /dev/loop-control && echo present || echo absent"],
                       edit=_with_device)
    r = runtime("run", "--bundle", b, runtime.new_id(), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "present"


def test_deny_extra_from_the_policy_file_is_enforced(runtime, busybox_rootfs, tmp_path):
    d = tmp_path / "secret"
    d.mkdir()
    env = policy_file(tmp_path, f'[mounts]\ndeny_extra = ["{d}"]\n')
    b = runtime.bundle(busybox_rootfs, ["true"], edit=add_bind(str(d)))
    cid = runtime.new_id()
    line = refused_cleanly(runtime, runtime("run", "--bundle", b, cid, env=env), cid)
    assert f"refused by {tmp_path}/policy.toml (mounts.deny_extra: {d})" in line


def test_world_writable_policy_file_is_refused(runtime, busybox_rootfs, tmp_path):
    env = policy_file(tmp_path, "", mode=0o666)
    b = runtime.bundle(busybox_rootfs, ["true"])
    cid = runtime.new_id()
    line = refused_cleanly(runtime, runtime("run", "--bundle", b, cid, env=env), cid)
    assert f"policy {tmp_path}/policy.toml is writable by group or others" in line


def test_unknown_key_in_the_policy_file_is_one_line(runtime, busybox_rootfs, tmp_path):
    env = policy_file(tmp_path, "[mounts]\nwritable_binds = false\n")
    b = runtime.bundle(busybox_rootfs, ["true"])
    cid = runtime.new_id()
    line = refused_cleanly(runtime, runtime("run", "--bundle", b, cid, env=env), cid)
    assert "unknown key mounts.writable_binds" in line


def test_symlink_swapped_in_a_loop_never_mounts_etc(runtime, busybox_rootfs, tmp_path):
    """A thread flips the source between a harmless dir and /etc while containers start:
    each run is either refused or mounts the harmless dir, never /etc."""
    import threading
    d = tmp_path / "harmless"
    d.mkdir()
    (d / "marker").write_text("harmless\n")
    link = tmp_path / "flip"
    link.symlink_to(d)
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            tmp = tmp_path / f".flip{i % 2}"
            tmp.symlink_to("/etc" if i % 2 else str(d))
            os.rename(tmp, link)
            i += 1

    b = runtime.bundle(busybox_rootfs, ["sh", "-c", "ls /mnt/h"], edit=add_bind(str(link), opts=("rbind", "ro")))
    t = threading.Thread(target=flip, daemon=True)
    t.start()
    outcomes = {"mounted": 0, "refused": 0}
    try:
        for _ in range(12):
            r = runtime.run(b)
            if r.returncode == 0:
                assert r.stdout.split() == ["marker"], r.stdout
                outcomes["mounted"] += 1
            else:
                assert "refused by" in r.stderr, r.stderr
                outcomes["refused"] += 1
    finally:
        stop.set()
        t.join()
    assert sum(outcomes.values()) == 12
