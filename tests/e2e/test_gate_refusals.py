"""The gate's rules end to end: the real docker CLI (and raw API requests) through `isobox gate`
in front of a dockerd started by the tests.

Where a bypass relies on how dockerd decodes JSON (lowercase keys, duplicate keys, the
deprecated top-level host config), the same body is first sent to dockerd DIRECTLY to show
that dockerd really honours it; then through the gate, which must refuse it."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

from e2e.conftest import IMAGE, Gate, unique


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(self._path)


def api(sock: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | None]:
    c = _Unix(sock)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    try:
        return r.status, json.loads(data) if data else None
    except ValueError:
        return r.status, {"raw": data.decode(errors="replace")}


@pytest.fixture(scope="module")
def gate(dockerd):
    """`isobox gate` on a socket of its own, in front of the test dockerd, with the default policy."""
    from isobox.policy import model
    tmp = tempfile.mkdtemp(prefix="isobox-e2e-gate-", dir="/tmp")
    policy = os.path.join(tmp, "policy.toml")
    with open(policy, "w") as f:
        f.write(model.default_toml())
    os.chmod(policy, 0o644)
    g = Gate(dockerd, tmp, extra=("--policy", policy))
    try:
        g.start()
        yield g
    finally:
        g.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def refused(r: subprocess.CompletedProcess, rule: str) -> None:
    assert r.returncode != 0, r.stdout
    assert f"isobox gate: {rule}" in r.stderr, r.stderr


def direct_create(dockerd, body: bytes) -> str:
    """Create (not start) a container on dockerd's own socket: the bypass as dockerd sees it."""
    status, js = api(dockerd.sock, "POST", f"/v1.41/containers/create?name={unique('gate-direct')}", body)
    assert status == 201, js
    return js["Id"]


def rm(dockerd, *names: str) -> None:
    for n in names:
        dockerd("rm", "-f", n)


# --- namespaces and mounts through the docker CLI ------------------------------------------------------

def test_pid_host_is_refused(gate):
    refused(gate("run", "--rm", "--pid=host", IMAGE, "true"), "namespaces.pid")


def test_net_host_is_refused(gate):
    refused(gate("run", "--rm", "--network=host", IMAGE, "true"), "namespaces.network")


@pytest.mark.parametrize("src", ["/", "//etc", "/etc/", "/tmp/../etc", "/var/run"])
def test_denied_binds_are_refused(gate, src):
    refused(gate("run", "--rm", "-v", f"{src}:/h", IMAGE, "true"), "mounts.deny")


def test_mount_flag_bind_is_refused(gate):
    refused(gate("run", "--rm", "--mount", "type=bind,source=/etc,target=/h", IMAGE, "true"), "mounts.deny")


def test_symlink_to_etc_is_refused(gate):
    with tempfile.TemporaryDirectory() as d:
        link = os.path.join(d, "innocent")
        os.symlink("/etc", link)
        refused(gate("run", "--rm", "-v", f"{link}:/h", IMAGE, "true"), "mounts.deny")


def test_local_driver_bind_volume_is_refused(gate):
    refused(gate("volume", "create", "-o", "type=none", "-o", "o=bind", "-o", "device=/etc", unique("v")),
            "mounts.deny")
    refused(gate("run", "--rm", "--mount",
                 "type=volume,target=/v,volume-opt=type=none,volume-opt=o=bind,volume-opt=device=/etc",
                 IMAGE, "true"), "mounts.deny")


# --- bodies dockerd decodes differently from a naive JSON reader ---------------------------------------

def test_lowercase_binds_reach_dockerd_and_are_refused(dockerd, gate):
    body = json.dumps({"Image": IMAGE, "Cmd": ["true"], "hostconfig": {"binds": ["/:/h"]}}).encode()
    cid = direct_create(dockerd, body)
    try:
        assert dockerd.inspect(cid, "{{json .HostConfig.Binds}}") == '["/:/h"]'      # dockerd honours it
    finally:
        rm(dockerd, cid)
    status, js = api(gate.sock, "POST", "/v1.41/containers/create", body)
    assert status == 403 and js["message"].startswith("isobox gate: mounts.deny"), js


def test_duplicate_key_body_reaches_dockerd_and_is_refused(dockerd, gate):
    # a reader keeping only the last "hostconfig" sees no PidMode; Go merges both objects
    body = (f'{{"Image":"{IMAGE}","Cmd":["true"],"HostConfig":{{"PidMode":"host"}},'
            f'"hostconfig":{{"Privileged":false}}}}').encode()
    cid = direct_create(dockerd, body)
    try:
        assert dockerd.inspect(cid, "{{.HostConfig.PidMode}}") == "host"
    finally:
        rm(dockerd, cid)
    status, js = api(gate.sock, "POST", "/v1.41/containers/create", body)
    assert status == 403 and js["message"].startswith("isobox gate: namespaces.pid"), js


def test_top_level_host_config_reaches_dockerd_and_is_refused(dockerd, gate):
    body = json.dumps({"Image": IMAGE, "Cmd": ["true"], "Binds": ["/:/h"]}).encode()      # no "HostConfig" at all
    cid = direct_create(dockerd, body)
    try:
        assert dockerd.inspect(cid, "{{json .HostConfig.Binds}}") == '["/:/h"]'
    finally:
        rm(dockerd, cid)
    status, js = api(gate.sock, "POST", "/v1.41/containers/create", body)
    assert status == 403 and js["message"].startswith("isobox gate: mounts.deny"), js


def test_old_api_start_body_is_refused(dockerd, gate):
    name = unique("gate-oldstart")
    gate("create", "--name", name, IMAGE, "true", check=True)
    try:
        status, js = api(gate.sock, "POST", f"/v1.23/containers/{name}/start",
                         json.dumps({"Binds": ["/:/h"]}).encode())
        assert status == 403 and js["message"].startswith("isobox gate: start.hostconfig"), js
    finally:
        rm(dockerd, name)


# --- the runtime -----------------------------------------------------------------------------------------

def test_runtime_runc_runs_on_isobox(dockerd, gate):
    name = unique("gate-runc")
    gate("run", "-d", "--name", name, "--runtime=runc", IMAGE, "sleep", "60", check=True)
    try:
        assert gate("inspect", "-f", "{{.HostConfig.Runtime}}", name, check=True).stdout.strip() == "isobox"
        pid = int(gate("inspect", "-f", "{{.State.Pid}}", name, check=True).stdout.strip())
        with open(f"/proc/{pid}/uid_map") as f:
            first = f.read().split()
        assert first[:2] == ["0", first[1]] and first[1] != "0", first     # root maps to a host range
    finally:
        rm(dockerd, name)


def test_container_made_before_the_gate_is_not_started(dockerd, gate):
    name = unique("gate-pre")
    dockerd("create", "--name", name, "--runtime=runc", IMAGE, "true", check=True)
    try:
        refused(gate("start", name), "runtime")
    finally:
        rm(dockerd, name)


def test_privileged_works(gate):
    r = gate("run", "--rm", "--privileged", IMAGE, "cat", "/proc/self/uid_map", check=True)
    assert r.stdout.split()[1] != "0", r.stdout
