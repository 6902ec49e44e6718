"""The runtime policy: parsing, validation, the path rules and the mount-time fd check."""
import os
import subprocess

import pytest

from isobox.errors import IsoboxError
from isobox.policy import check, model
from isobox.policy.model import Policy, parse

P = Policy(path="/etc/isobox/policy.toml")


# --- parsing and validation -------------------------------------------------------------

def test_default_file_round_trips_to_the_built_in_defaults():
    assert parse(model.default_toml()) == P


def test_empty_file_means_defaults():
    assert parse("", "/x.toml") == Policy(path="/x.toml")


def test_keys_are_read_and_normalized():
    p = parse('[mounts]\ndeny_extra = ["/srv//secret/", "/srv/secret"]\nwritable_idmapped_binds = false\n'
              '[devices]\nallow = ["/dev/loop-control"]\n')
    assert p.deny == model.DEFAULT_DENY
    assert p.deny_extra == ("/srv/secret",)
    assert p.writable_idmapped_binds is False
    assert p.devices == ("/dev/loop-control",)


def test_deny_replaces_the_built_in_list():
    assert parse('[mounts]\ndeny = ["/srv"]\n').deny == ("/srv",)


@pytest.mark.parametrize("text, words", [
    ('[mounts]\ndenyy = []\n', "unknown key mounts.denyy"),
    ('[mount]\ndeny = []\n', "unknown table [mount]"),
    ('[devices]\nallowed = []\n', "unknown key devices.allowed"),
    ('[mounts]\nwritable_idmapped_binds = "no"\n', "mounts.writable_idmapped_binds must be true or false"),
    ('[mounts]\ndeny = "/etc"\n', "mounts.deny must be a list of absolute paths"),
    ('[mounts]\ndeny_extra = ["relative"]\n', "mounts.deny_extra must be a list of absolute paths"),
    ('[devices]\nallow = [1]\n', "devices.allow must be a list of absolute paths"),
    ('mounts = 1\n', "mounts must be a table"),
    ('[mounts\n', "policy /p.toml:"),
])
def test_bad_files_give_one_line_naming_the_key(text, words):
    with pytest.raises(IsoboxError) as e:
        parse(text, "/p.toml")
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "/p.toml" in msg


# --- loading: ownership and mode ----------------------------------------------------------

def test_absent_file_means_defaults(tmp_path):
    assert model.load(str(tmp_path / "none.toml")) == Policy(path=str(tmp_path / "none.toml"))


def test_env_names_the_file(tmp_path, monkeypatch):
    f = tmp_path / "p.toml"
    f.write_text('[mounts]\ndeny_extra = ["/srv"]\n')
    os.chmod(f, 0o644)
    monkeypatch.setenv(model.ENV, str(f))
    assert model.policy_path() == str(f)
    assert model.load().deny_extra == ("/srv",)
    monkeypatch.delenv(model.ENV)
    assert model.policy_path() == "/etc/isobox/policy.toml"


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664])
def test_group_or_world_writable_file_is_refused(tmp_path, mode):
    f = tmp_path / "p.toml"
    f.write_text("")
    os.chmod(f, mode)
    with pytest.raises(IsoboxError, match="writable by group or others"):
        model.load(str(f))


def test_file_not_owned_by_root_is_refused(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("")
    os.chmod(f, 0o644)
    os.chown(f, 1000, 1000)
    with pytest.raises(IsoboxError, match="not owned by root"):
        model.load(str(f))


def test_directory_is_refused(tmp_path):
    with pytest.raises(IsoboxError, match="not a regular file"):
        model.load(str(tmp_path))


# --- path rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("path, rule", [
    ("/", "mounts.deny: /"),
    ("/etc", "mounts.deny: /etc"),
    ("/etc/", "mounts.deny: /etc"),
    ("/etc/passwd", "mounts.deny: /etc"),                      # below
    ("/etc/isobox", "mounts.deny: /etc/isobox"),
    ("/proc/sys/kernel", "mounts.deny: /proc"),
    ("/dev/sda", "mounts.deny: /dev"),
    ("/run/docker.sock", "mounts.deny: /var/run/docker.sock"),
    ("/var/lib/docker", "mounts.deny: /var/lib/docker"),
    ("/var/lib/docker/image/overlay2", "mounts.deny: /var/lib/docker"),
    ("/var/lib/docker/containers", "mounts.deny: /var/lib/docker"),  # all containers, not one
    ("/run/containerd/io.containerd.runtime.v2.task", "mounts.deny: /run/containerd"),
    ("/var/lib/isobox/ids.db", "mounts.deny: /var/lib/isobox"),
    ("/usr/share/doc", "mounts.deny: /usr"),
])
def test_denied_or_below(path, rule):
    assert P.path_rule(path) == rule


@pytest.mark.parametrize("path", ["/var", "/var/lib", "/run", "/var/run"])
def test_ancestors_of_denied_paths_are_refused(path):
    r = P.path_rule(path)
    assert r and "contains it" in r


@pytest.mark.parametrize("path", ["/var/tmp", "/var/tmp/x", "/var/log", "/var/libx", "/var/lib/dockerx",
                                  "/etcx", "/run/user/0", "/tmp/data", "/home/u/src", "/srv", "/mnt",
                                  "/var/lib/kubelet/pods/x/volumes"])
def test_unrelated_paths_and_siblings_pass(path):
    assert P.path_rule(path) is None


@pytest.mark.parametrize("path", ["/var/lib/docker/containers/abc/hosts", "/var/lib/docker/containers/abc/mounts/shm",
                                  "/var/lib/docker/volumes/v1/_data",
                                  "/var/lib/containers/storage/overlay-containers/x/userdata/resolv.conf",
                                  "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/s/shm"])
def test_engine_managed_files_below_data_roots_pass(path):
    assert P.path_rule(path) is None


def test_allow_below_never_wins_over_is_or_ancestor():
    p = Policy(path="/p", deny_extra=("/var/lib/docker/containers/abc/secret",))
    assert p.path_rule("/var/lib/docker/containers/abc") == \
        "mounts.deny_extra: /var/lib/docker/containers/abc/secret; /var/lib/docker/containers/abc contains it"
    assert p.path_rule("/var/lib/docker/containers/abc/secret") == \
        "mounts.deny_extra: /var/lib/docker/containers/abc/secret"


def test_rootfs_mode_checks_is_and_ancestor_only():
    assert P.path_rule("/var/lib/docker/overlay2/x/merged", below=False) is None
    assert P.path_rule("/var", below=False)
    assert P.path_rule("/", below=False)


def test_refusal_names_source_resolution_file_and_rule():
    e = P.refusal("/tmp/l", "mounts.deny: /etc", "/etc")
    assert str(e) == "bind mount of /tmp/l (resolves to /etc) refused by /etc/isobox/policy.toml (mounts.deny: /etc)"
    e = P.refusal("/var/run/docker.sock", "mounts.deny: /var/run/docker.sock", "/var/run/docker.sock")
    assert str(e) == ("bind mount of /var/run/docker.sock refused by /etc/isobox/policy.toml "
                      "(mounts.deny: /var/run/docker.sock)")


# --- devices --------------------------------------------------------------------------------

def test_default_devices_are_the_harmless_character_devices():
    m = P.device_map()
    assert m[("c", 1, 3)] == "/dev/null"
    assert ("c", 10, 237) not in m          # loop-control
    assert all(t == "c" for t, _, _ in m)


def test_allowed_device_is_mapped_by_its_numbers():
    p = Policy(path="/p", devices=model.DEFAULT_DEVICES + ("/dev/loop-control", "/nonexistent", "/etc/passwd"))
    assert p.device_map()[("c", 10, 237)] == "/dev/loop-control"


def test_rewrite_filters_devices_through_the_policy(tmp_path, monkeypatch):
    from isobox.spec.rewrite import _devices
    linux = {"devices": [{"path": "/dev/loop-control", "type": "c", "major": 10, "minor": 237},
                         {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200},
                         {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]}
    notes = []
    got = {d.path: d.host_path for d in _devices(linux, notes, P)}
    assert "/dev/loop-control" not in got and "/dev/sda" not in got
    assert any("/dev/loop-control" in n and "devices.allow" in n for n in notes)
    p = Policy(path="/p", devices=("/dev/loop-control",))
    got = {d.path: d.host_path for d in _devices(linux, [], p)}
    assert got["/dev/loop-control"] == "/dev/loop-control" and "/dev/net/tun" not in got
    assert "/dev/null" in got   # OCI's defaults are always given


# --- the mount-time check on a descriptor -----------------------------------------------------

def _check(pol, path):
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        check.bind_source(pol, path, fd)
    finally:
        os.close(fd)


def test_symlink_to_etc_is_refused_by_its_canonical_path(tmp_path):
    (tmp_path / "l").symlink_to("/etc")
    with pytest.raises(IsoboxError) as e:
        _check(P, str(tmp_path / "l"))
    assert str(e.value) == (f"bind mount of {tmp_path}/l (resolves to /etc) refused by /etc/isobox/policy.toml "
                            "(mounts.deny: /etc)")


def test_plain_tmp_dir_and_file_pass(tmp_path):
    (tmp_path / "f").write_text("x")
    _check(P, str(tmp_path))
    _check(P, str(tmp_path / "f"))


def test_hard_link_alias_of_a_denied_file_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("x")
    os.link(secret, tmp_path / "alias")
    p = Policy(path="/p", deny_extra=(str(secret),))
    with pytest.raises(IsoboxError, match=r"mounts.deny_extra: .*secret \(same file\)"):
        _check(p, str(tmp_path / "alias"))


def test_bind_mounted_alias_of_a_denied_dir_and_below_it_is_refused(tmp_path):
    (tmp_path / "secret/sub").mkdir(parents=True)
    (tmp_path / "secret/sub/f").write_text("x")
    (tmp_path / "alias").mkdir()
    p = Policy(path="/p", deny_extra=(str(tmp_path / "secret"),))
    subprocess.run(["mount", "--bind", str(tmp_path / "secret"), str(tmp_path / "alias")], check=True)
    try:
        with pytest.raises(IsoboxError, match=r"\(same file\)"):
            _check(p, str(tmp_path / "alias"))
        with pytest.raises(IsoboxError, match=r"below an alias of it"):
            _check(p, str(tmp_path / "alias/sub"))
        with pytest.raises(IsoboxError, match=r"below an alias of it"):
            _check(p, str(tmp_path / "alias/sub/f"))
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "alias")], check=True)


def test_bind_mounted_alias_of_an_ancestor_is_refused(tmp_path):
    (tmp_path / "top/secret").mkdir(parents=True)
    (tmp_path / "alias").mkdir()
    p = Policy(path="/p", deny_extra=(str(tmp_path / "top/secret"),))
    subprocess.run(["mount", "--bind", str(tmp_path / "top"), str(tmp_path / "alias")], check=True)
    try:
        with pytest.raises(IsoboxError, match=r"contains it \(same directory\)"):
            _check(p, str(tmp_path / "alias"))
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "alias")], check=True)


def test_bind_mounts_the_descriptor_it_checked(tmp_path, monkeypatch):
    """TOCTOU: the object checked is the object mounted — specmounts.bind clones the tree
    from the checked O_PATH fd with AT_EMPTY_PATH, never from the path again."""
    from isobox.linux import syscalls as k
    from isobox.mounts import specmounts
    from isobox.spec import mountopts
    from isobox.spec.plan import Mount

    (tmp_path / "src").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "src")
    checked, cloned = [], []

    real_check = check.bind_source

    def spy_check(pol, source, fd, **kw):
        checked.append(os.fstat(fd))
        real_check(pol, source, fd, **kw)
        # after the check, swap the symlink to /etc: the mount must not follow it
        os.unlink(tmp_path / "l")
        os.symlink("/etc", tmp_path / "l")

    def fake_open_tree(dfd, path, flags):
        assert path == "" and flags & k.AT_EMPTY_PATH
        cloned.append(os.fstat(dfd))
        raise OSError(99, "stop here")

    monkeypatch.setattr(check, "bind_source", spy_check)
    monkeypatch.setattr(k, "open_tree", fake_open_tree)
    monkeypatch.setattr(specmounts, "_target", lambda rootfd, dest, d: os.open("/", os.O_PATH))
    m = Mount("/mnt", "bind", str(tmp_path / "l"), mountopts.parse(["rbind"]))
    with pytest.raises(OSError, match="stop here"):
        specmounts.bind(-1, m, -1, [], P)
    assert len(checked) == len(cloned) == 1
    src = os.stat(tmp_path / "src")
    assert (checked[0].st_dev, checked[0].st_ino) == (cloned[0].st_dev, cloned[0].st_ino) == (src.st_dev, src.st_ino)


def test_bind_enforces_the_loaded_policy(tmp_path, monkeypatch):
    from isobox.mounts import specmounts
    from isobox.spec import mountopts
    from isobox.spec.plan import Mount
    f = tmp_path / "p.toml"
    f.write_text(f'[mounts]\ndeny_extra = ["{tmp_path}/src"]\n')
    os.chmod(f, 0o644)
    (tmp_path / "src").mkdir()
    monkeypatch.setenv(model.ENV, str(f))
    m = Mount("/mnt", "bind", str(tmp_path / "src"), mountopts.parse(["rbind"]))
    with pytest.raises(IsoboxError, match=f"refused by {f} \\(mounts.deny_extra: {tmp_path}/src\\)"):
        specmounts.bind(-1, m, -1, [], model.load())


def test_engine_init_binary_only_as_a_read_only_file_bind():
    """`docker run --init` binds /usr/bin/docker-init (Debian: -> tini-static) read-only."""
    from isobox.policy import check
    target = os.path.realpath("/usr/bin/docker-init")
    if not os.path.exists(target) or target not in model.ENGINE_INIT_BINARIES:
        pytest.skip("no docker-init here")
    fd = os.open("/usr/bin/docker-init", os.O_PATH | os.O_CLOEXEC)
    try:
        check.bind_source(model.Policy(path="p"), "/usr/bin/docker-init", fd, readonly=True)
        with pytest.raises(IsoboxError, match="mounts.deny: /usr"):
            check.bind_source(model.Policy(path="p"), "/usr/bin/docker-init", fd)
    finally:
        os.close(fd)
