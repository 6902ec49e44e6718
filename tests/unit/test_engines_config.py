"""isobox install/uninstall on config text and temporary files: never the real /etc files."""
from __future__ import annotations

import json
import os
import tomllib

import pytest

from isobox.engines import common as c
from isobox.engines import containerd, docker, podman
from isobox.errors import IsoboxError

BIN = c.RUNC_BINARY

V1 = """# containerd 1.x, version 1 (no version key)
[plugins.cri]
  sandbox_image = "k8s.gcr.io/pause:3.2"   # keep me
  [plugins.cri.containerd]
    snapshotter = "overlayfs"
    [plugins.cri.containerd.runtimes.kata]
      runtime_type = "io.containerd.kata.v2"
"""
V2 = """# managed by ops
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  # the sandbox
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"  # stays runc without --default
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
"""
V3 = """version = 3
root = "/var/lib/containerd"
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"""
SECT = {1: ("plugins", "cri", "containerd"), 2: ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
        3: ("plugins", "io.containerd.cri.v1.runtime", "containerd")}


def _sect(text: str, version: int) -> dict:
    d = tomllib.loads(text)
    for k in SECT[version]:
        d = d[k]
    return d


# ---- containerd ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,version", [(V1, 1), (V2, 2), (V3, 3)])
def test_containerd_versions_use_their_table(text, version):
    new, undo, v = containerd.install_text(text, {})
    assert v == version
    rt = _sect(new, version)["runtimes"]["isobox"]
    assert rt == {"runtime_type": "io.containerd.runc.v2", "options": {"BinaryName": BIN, "SystemdCgroup": False}}
    other = {1: "io.containerd.grpc.v1.cri", 2: "cri", 3: "io.containerd.grpc.v1.cri"}[version]
    assert other not in tomllib.loads(new)["plugins"] or "containerd" not in tomllib.loads(new)["plugins"][other]
    assert containerd.status_of(tomllib.loads(new)) == (True, False, "")


def test_containerd_keeps_comments_and_other_runtimes():
    new, _, _ = containerd.install_text(V2, {})
    assert "# managed by ops" in new and "# the sandbox" in new and "# stays runc without --default" in new
    s = _sect(new, 2)
    assert s["runtimes"]["runc"]["options"]["SystemdCgroup"] is True
    assert s["default_runtime_name"] == "runc"
    assert tomllib.loads(new)["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] == "registry.k8s.io/pause:3.9"
    new1, _, _ = containerd.install_text(V1, {})
    assert "# keep me" in new1 and _sect(new1, 1)["runtimes"]["kata"]["runtime_type"] == "io.containerd.kata.v2"


def test_containerd_default_and_uninstall_restores_previous():
    new, undo, _ = containerd.install_text(V2, {}, default=True)
    assert _sect(new, 2)["default_runtime_name"] == "isobox"
    assert undo["default_runtime_name"]["previous"] == "runc"
    back, left = containerd.uninstall_text(new, undo)
    assert tomllib.loads(back) == tomllib.loads(V2)
    assert back.rstrip() == V2.rstrip() and left == {}


@pytest.mark.parametrize("text", [V1, V2, V3])
def test_containerd_idempotent_and_round_trip(text):
    new, undo, _ = containerd.install_text(text, {})
    again, undo2, _ = containerd.install_text(new, undo)
    assert again == new and undo2 == undo
    back, _ = containerd.uninstall_text(new, undo)
    assert tomllib.loads(back) == tomllib.loads(text)


def test_containerd_adds_builtin_runc_when_its_map_would_be_replaced():
    # a runtimes table in the file replaces containerd's built-in map: the default "runc" must stay
    new, undo, _ = containerd.install_text("version = 2\n", {})
    rts = _sect(new, 2)["runtimes"]
    assert rts["runc"] == {"runtime_type": "io.containerd.runc.v2"} and "isobox" in rts
    back, _ = containerd.uninstall_text(new, undo)
    assert tomllib.loads(back) == {"version": 2}


def test_containerd_absent_file_gets_minimal_v2(tmp_path):
    p = str(tmp_path / "config.toml")
    out = containerd.install(p)
    assert out.changed and "version 2" in out.summary
    data = tomllib.loads(open(p).read())
    assert data["version"] == 2 and containerd.status_of(data)[0]
    assert not os.path.exists(p + c.BACKUP_SUFFIX)           # nothing to back up
    assert containerd.uninstall(p).changed
    assert not os.path.exists(p)                            # install created it, uninstall removes it


@pytest.mark.parametrize("bad", ['version = 2\n[plugins\n', 'version = 7\n', 'version = "2"\n'])
def test_containerd_refuses_invalid_untouched(tmp_path, bad):
    p = tmp_path / "config.toml"
    p.write_text(bad)
    with pytest.raises(IsoboxError) as e:
        containerd.install(str(p))
    assert "\n" not in str(e.value) and "untouched" in str(e.value)
    assert p.read_text() == bad
    assert sorted(os.listdir(tmp_path)) == ["config.toml"]


# ---- docker --------------------------------------------------------------------------------

def test_docker_keeps_keys_and_sets_default(tmp_path):
    p = tmp_path / "daemon.json"
    orig = {"log-driver": "journald", "runtimes": {"nvidia": {"path": "nvidia-container-runtime"}},
            "default-runtime": "nvidia"}
    p.write_text(json.dumps(orig))
    out = docker.install(str(p), default=True)
    assert out.changed and "kill -HUP" in out.reload
    cfg = json.loads(p.read_text())
    assert cfg["runtimes"] == {"nvidia": {"path": "nvidia-container-runtime"}, "isobox": {"path": BIN}}
    assert cfg["default-runtime"] == "isobox" and cfg["log-driver"] == "journald"
    assert docker.status_of(cfg) == (True, True, "")
    again = docker.install(str(p), default=True)
    assert not again.changed and "nothing changed" in again.summary
    out = docker.uninstall(str(p))
    assert json.loads(p.read_text()) == orig               # nvidia is the default again
    assert "reload dockerd" in out.reload                  # a non-empty default-runtime: SIGHUP is enough
    assert json.loads((tmp_path / "daemon.json.isobox-backup").read_text()) == orig


def test_docker_uninstall_of_removed_default_says_restart(tmp_path):
    p = tmp_path / "daemon.json"
    p.write_text('{"debug": true}')
    docker.install(str(p), default=True)
    out = docker.uninstall(str(p))
    assert json.loads(p.read_text()) == {"debug": True}
    assert out.reload.startswith("restart dockerd") and "default-runtime" in out.reload


def test_docker_creates_missing_file_and_removes_it(tmp_path):
    p = tmp_path / "sub" / "daemon.json"
    docker.install(str(p))
    assert json.loads(p.read_text()) == {"runtimes": {"isobox": {"path": BIN}}}
    assert oct(p.stat().st_mode & 0o777) == "0o644"
    docker.uninstall(str(p))
    assert not p.exists()


@pytest.mark.parametrize("bad", ['{"debug": true,', "[1, 2]", '{"runtimes": "x"}'])
def test_docker_refuses_invalid_untouched(tmp_path, bad):
    p = tmp_path / "daemon.json"
    p.write_text(bad)
    with pytest.raises(IsoboxError) as e:
        docker.install(str(p))
    assert "\n" not in str(e.value)
    assert p.read_text() == bad and sorted(os.listdir(tmp_path)) == ["daemon.json"]


def test_backup_written_once_and_mode_owner_kept(tmp_path):
    p = tmp_path / "daemon.json"
    p.write_text('{"a": 1}')
    os.chmod(p, 0o600)
    os.chown(p, 1234, 5678)
    docker.install(str(p))
    bak = tmp_path / "daemon.json.isobox-backup"
    assert bak.read_text() == '{"a": 1}'
    st = p.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    docker.uninstall(str(p))
    p.write_text('{"a": 2}')
    docker.install(str(p))
    assert bak.read_text() == '{"a": 1}'                   # never overwritten by a later install
    docker.uninstall(str(p))
    assert bak.exists()                                    # uninstall leaves it
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ---- podman --------------------------------------------------------------------------------

PODMAN = """# site settings
[containers]
log_driver = "k8s-file"   # keep

[engine]
runtime = "crun"
events_logger = "file"

[engine.runtimes]
crun = ["/usr/bin/crun"]
"""


def test_podman_install_full_list_cgroupfs_default_and_round_trip():
    new, undo = podman.install_text(PODMAN, {}, default=True)
    assert "# site settings" in new and "# keep" in new
    e = tomllib.loads(new)["engine"]
    assert e["runtimes"] == {"crun": ["/usr/bin/crun"], "isobox": [BIN], "isobox-runc": [BIN]}
    assert e["runtime_supports_json"] == ["crun", "runc", "kata", "runsc", "youki", "krun", "ocijail",
                                          "isobox", "isobox-runc"]
    assert e["cgroup_manager"] == "cgroupfs" and e["runtime"] == "isobox" and e["events_logger"] == "file"
    assert podman.status_of(tomllib.loads(new)) == (True, True, "")
    again, undo2 = podman.install_text(new, undo, default=True)
    assert again == new and undo2 == undo
    back, left = podman.uninstall_text(new, undo)
    assert tomllib.loads(back) == tomllib.loads(PODMAN) and left == {}


def test_podman_existing_list_is_extended_not_replaced():
    text = '[engine]\nruntime_supports_json = ["crun"]\ncgroup_manager = "systemd"\n'
    new, undo = podman.install_text(text, {})
    e = tomllib.loads(new)["engine"]
    assert e["runtime_supports_json"] == ["crun", "isobox", "isobox-runc"] and e["cgroup_manager"] == "cgroupfs"
    back, _ = podman.uninstall_text(new, undo)
    assert tomllib.loads(back) == tomllib.loads(text)     # systemd restored: install changed it


def test_podman_shipped_file_round_trip_keeps_comments():
    shipped = "/usr/share/containers/containers.conf"
    if not os.path.exists(shipped):
        pytest.skip("podman's containers.conf is not installed")
    text = open(shipped).read()
    new, undo = podman.install_text(text, {})
    assert new.count("\n#") == text.count("\n#")
    back, _ = podman.uninstall_text(new, undo)
    assert tomllib.loads(back) == tomllib.loads(text) and back.count("\n#") == text.count("\n#")


def test_podman_refuses_invalid_untouched(tmp_path):
    p = tmp_path / "containers.conf"
    p.write_text("[engine\n")
    with pytest.raises(IsoboxError):
        podman.install(str(p))
    assert p.read_text() == "[engine\n" and os.listdir(tmp_path) == ["containers.conf"]


def test_env_overrides_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("ISOBOX_DOCKER_CONFIG", str(tmp_path / "d.json"))
    monkeypatch.setenv("ISOBOX_CONTAINERD_CONFIG", str(tmp_path / "c.toml"))
    monkeypatch.setenv("ISOBOX_PODMAN_CONFIG", str(tmp_path / "p.conf"))
    assert docker.path() == str(tmp_path / "d.json")
    assert containerd.path() == str(tmp_path / "c.toml")
    assert podman.path() == str(tmp_path / "p.conf")
