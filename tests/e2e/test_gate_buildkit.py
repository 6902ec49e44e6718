"""BuildKit through the gate: dockerd 20.10's BuildKit runs each RUN step with the first `runc`
on dockerd's PATH (go-runc: `runc --log L --log-format json run --bundle B ID`), not a daemon.json
runtime. The gate (rules.py, build.runtime) refuses version=2 builds until that runc is isobox's;
`isobox install --gate` writes the wrapper (here into a temporary root) and the fixture's dockerd
is restarted with its directory first on PATH, as the systemd drop-in or /etc/default/docker does.

Uses Debian's docker CLI (/usr/bin/docker, 20.10, BuildKit built in): the 28.x CLI needs buildx."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from e2e.conftest import IMAGE, SRC, Gate, unique


@pytest.fixture
def gate_of(dockerd):
    """A fresh gate per phase: the gate caches its BuildKit verdict for 10 s per engine socket."""
    made: list[Gate] = []

    def make() -> Gate:
        g = Gate(dockerd, tempfile.mkdtemp(prefix="isobox-gbk-", dir="/tmp"))
        g.env["DOCKER_BUILDKIT"] = "1"
        g.start()
        made.append(g)
        return g
    yield make
    for g in made:
        g.stop()
        shutil.rmtree(g.tmp, ignore_errors=True)


@pytest.fixture
def wrapper_dir():
    """`isobox install --gate` into a temporary root (no systemd there: the daemon.json mechanism);
    the wrapper it writes is what dockerd gets first on PATH."""
    root = tempfile.mkdtemp(prefix="isobox-gbk-root-", dir="/tmp")
    env = dict(os.environ, PYTHONPATH=SRC, ISOBOX_GATE_ROOT=root,
               ISOBOX_DOCKER_CONFIG=os.path.join(root, "etc/docker/daemon.json"))
    r = subprocess.run([sys.executable, "-m", "isobox.cli.main", "install", "--gate"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    yield os.path.join(root, "usr/local/lib/isobox/buildkit-bin")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def buildkit_dockerd(dockerd, wrapper_dir):
    dockerd.path_prefix = wrapper_dir
    dockerd.restart(default_runtime=dockerd.default_runtime)
    try:
        yield dockerd
    finally:
        dockerd.path_prefix = None
        dockerd.restart(default_runtime=dockerd.default_runtime)


def _build(gate: Gate, ctx: str, tag: str) -> subprocess.CompletedProcess:
    with open(os.path.join(ctx, "Dockerfile"), "w") as f:
        f.write(f"FROM {IMAGE}\nRUN cat /proc/self/uid_map\n")
    return gate("build", "--progress=plain", "--no-cache", "-t", tag, ctx, timeout=300)


def test_buildkit_refused_until_runc_is_isobox(dockerd, gate_of, tmp_path):
    assert dockerd.path_prefix is None
    r = _build(gate_of(), str(tmp_path), f"isobox-e2e/{unique('bk-refused')}:latest")
    assert r.returncode != 0
    assert "isobox gate: build.runtime: BuildKit RUN steps use the runc on dockerd's PATH" in r.stderr, r.stderr
    assert "put an isobox-runc `runc` first on dockerd's PATH" in r.stderr


def test_buildkit_run_step_is_isolated(buildkit_dockerd, gate_of, tmp_path):
    gate = gate_of()
    tag = f"isobox-e2e/{unique('bk')}:latest"
    try:
        r = _build(gate, str(tmp_path), tag)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n--- gate log:\n{gate.log()[-2000:]}"
        # --progress=plain: "#5 0.405          0    1048576      65536"
        maps = re.findall(r"^#\d+ [\d.]+\s+0\s+(\d+)\s+(\d+)\s*$", r.stderr, re.M)
        assert maps, r.stderr
        base, count = map(int, maps[0])
        assert base > 0 and count == 65536, maps          # isobox's range, not the host's 0 4294967295
        runs = [rec for rec in _argv_records(buildkit_dockerd.argv_log) if "run" in rec]
        assert runs and all("--bundle" in a and "--root" not in a for a in runs), runs
    finally:
        gate("rmi", "-f", tag)


def _argv_records(path: str) -> list[list[str]]:
    import json
    with open(path) as f:
        return [json.loads(line)["argv"] for line in f if line.strip()]
