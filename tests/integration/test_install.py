"""`isobox install` / `uninstall` through the CLI on temporary files (env overrides: the real /etc
files are never touched), checked with the engines' own tools where that is cheap."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

ISOBOX = [sys.executable, "-I", "-m", "isobox.cli.main"]
BIN = "/usr/local/bin/isobox-runc"
REAL = ("/etc/docker/daemon.json", "/etc/containerd/config.toml", "/etc/containers/containers.conf")


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.update(ISOBOX_DOCKER_CONFIG=str(tmp_path / "daemon.json"),
             ISOBOX_CONTAINERD_CONFIG=str(tmp_path / "config.toml"),
             ISOBOX_PODMAN_CONFIG=str(tmp_path / "containers.conf"))
    return e


@pytest.fixture(autouse=True)
def real_files_untouched():
    def snap():
        out = {}
        for p in REAL:
            for f in (p, p + ".isobox-backup", p + ".isobox-undo"):
                try:
                    st = os.stat(f)
                    out[f] = (st.st_mtime_ns, st.st_size)
                except FileNotFoundError:
                    out[f] = None
        return out
    before = snap()
    yield
    assert snap() == before


def isobox(env, *args):
    return subprocess.run([*ISOBOX, *args], capture_output=True, text=True, env=env, timeout=120)


ALL = ("--docker", "--containerd", "--podman")


def test_install_idempotent_uninstall_round_trip(env, tmp_path):
    (tmp_path / "daemon.json").write_text('{"log-level": "warn"}\n')
    shutil.copy("/etc/containerd/config.toml", tmp_path / "config.toml") if os.path.exists(
        "/etc/containerd/config.toml") else (tmp_path / "config.toml").write_text("version = 2\n")
    orig_toml = (tmp_path / "config.toml").read_text()
    r = isobox(env, "install", *ALL, "--default")
    assert r.returncode == 0, r.stderr
    assert "kill -HUP" in r.stdout and "restart containerd" in r.stdout and "nothing to reload" in r.stdout
    files = sorted(os.listdir(tmp_path))
    r2 = isobox(env, "install", *ALL, "--default")
    assert r2.returncode == 0 and r2.stdout.count("nothing changed") == 3, r2.stdout
    assert sorted(os.listdir(tmp_path)) == files
    assert json.loads((tmp_path / "daemon.json").read_text())["default-runtime"] == "isobox"
    r3 = isobox(env, "uninstall", *ALL)
    assert r3.returncode == 0, r3.stderr
    assert json.loads((tmp_path / "daemon.json").read_text()) == {"log-level": "warn"}
    assert tomllib.loads((tmp_path / "config.toml").read_text()) == tomllib.loads(orig_toml)
    assert not (tmp_path / "containers.conf").exists()        # install created it
    assert (tmp_path / "daemon.json.isobox-backup").exists() and (tmp_path / "config.toml.isobox-backup").exists()
    r4 = isobox(env, "uninstall", *ALL)
    assert r4.stdout.count("nothing changed") == 3, r4.stdout


def test_invalid_json_refused_in_one_line(env, tmp_path):
    (tmp_path / "daemon.json").write_text("{oops")
    r = isobox(env, "install", "--docker")
    assert r.returncode == 1 and len(r.stdout.strip().splitlines()) == 1 and "not valid JSON" in r.stdout
    assert (tmp_path / "daemon.json").read_text() == "{oops" and os.listdir(tmp_path) == ["daemon.json"]


def test_unknown_flag(env):
    r = isobox(env, "install", "--kubernetes")
    assert r.returncode == 1 and "unknown argument" in r.stderr


@pytest.mark.skipif(not shutil.which("containerd"), reason="containerd not installed")
@pytest.mark.parametrize("text", ["version = 2\n", None, "[plugins.cri.containerd]\n  snapshotter = \"overlayfs\"\n"],
                         ids=["v2", "absent", "v1"])
def test_containerd_reads_the_runtime(env, tmp_path, text):
    p = tmp_path / "config.toml"
    if text is not None:
        p.write_text(text)
    assert isobox(env, "install", "--containerd", "--default").returncode == 0
    r = subprocess.run(["containerd", "--config", str(p), "config", "dump"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.isobox]' in r.stdout
    assert f'BinaryName = "{BIN}"' in r.stdout
    assert 'default_runtime_name = "isobox"' in r.stdout
    assert '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]' in r.stdout   # built-in kept


@pytest.mark.skipif(not shutil.which("podman"), reason="podman not installed")
def test_podman_reads_the_runtime(env, tmp_path):
    p = tmp_path / "containers.conf"
    shutil.copy("/usr/share/containers/containers.conf", p) if os.path.exists(
        "/usr/share/containers/containers.conf") else p.write_text("")
    assert isobox(env, "install", "--podman", "--default").returncode == 0
    r = subprocess.run(["podman", "info", "--format",
                        "{{.Host.OCIRuntime.Name}} {{.Host.OCIRuntime.Path}} {{.Host.CgroupManager}}"],
                       capture_output=True, text=True, timeout=120, env={**env, "CONTAINERS_CONF": str(p)})
    if r.returncode != 0:
        pytest.skip(f"podman info failed here: {r.stderr.strip()[-200:]}")
    assert r.stdout.split() == ["isobox", BIN, "cgroupfs"]


@pytest.mark.skipif(not shutil.which("dockerd"), reason="dockerd not installed")
def test_dockerd_validates_the_file(env, tmp_path):
    help_ = subprocess.run(["dockerd", "--help"], capture_output=True, text=True, timeout=60).stdout
    if "--validate" not in help_:
        pytest.skip("this dockerd has no --validate (added in moby 23.0; Debian 12 ships 20.10)")
    p = tmp_path / "daemon.json"
    p.write_text('{"debug": true}')
    assert isobox(env, "install", "--docker", "--default").returncode == 0
    r = subprocess.run(["dockerd", "--validate", "--config-file", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_doctor_rows_follow_the_files(env, tmp_path, monkeypatch):
    for k in ("ISOBOX_DOCKER_CONFIG", "ISOBOX_CONTAINERD_CONFIG", "ISOBOX_PODMAN_CONFIG"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setattr(shutil, "which", lambda b: f"/usr/bin/{b}")
    from isobox.engines.install import doctor_rows
    rows = {r[0]: r for r in doctor_rows()}
    assert all(r[1] == "warn" and "isobox install --" in r[2] for r in rows.values())
    assert isobox(env, "install", "--docker", "--containerd", "--podman").returncode == 0
    rows = {r[0]: r for r in doctor_rows()}
    assert all(r[1] == "ok" and "registered" in r[2] and "not the default" in r[2] for r in rows.values()), rows
    assert isobox(env, "install", "--containerd", "--default").returncode == 0
    assert "default runtime" in {r[0]: r for r in doctor_rows()}["containerd"][2]
    (tmp_path / "daemon.json").write_text("{")
    assert {r[0]: r for r in doctor_rows()}["docker"][1] == "FAIL"
