"""[gate] socket_images end to end: an allowed image (by ID) binds the engine socket the gate
serves and, from inside, may make only the calls its api list names; another image wearing the
allowed image's tag may not bind it.

The gate serves /run/docker.sock (= /var/run/docker.sock), a path isobox-runc's own deny list
refuses: the bind passes the runtime only because an isobox gate serves that socket
(policy/gatesock.py), so this covers gate and runtime together. The module is skipped when
something already lives at /run/docker.sock (a host dockerd: never replaced by a test).

Inside the container (busybox: no client that speaks HTTP over a unix socket) a tiny static C
client, compiled here and bind-mounted read-only, sends one request and prints the response."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from e2e.conftest import IMAGE, Gate, unique
PUBLIC = "/run/docker.sock"
ALLOWED_API = ["GET /containers/json", "GET /_ping", "GET /version"]

CLIENT_C = r"""
/* hc SOCKET METHOD PATH [BODY]: one HTTP/1.1 request over a unix socket; prints the response. */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: hc SOCKET METHOD PATH [BODY]\n"); return 2; }
    const char *body = argc > 4 ? argv[4] : "";
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return 1; }
    char req[8192];
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     argv[2], argv[3], strlen(body), body);
    if (n <= 0 || n >= (int)sizeof req || write(s, req, n) != n) { perror("write"); return 1; }
    char buf[65536];
    ssize_t r;
    while ((r = read(s, buf, sizeof buf)) > 0) fwrite(buf, 1, r, stdout);
    putchar('\n');
    return 0;
}
"""


def _client(tmp: str) -> str:
    src, out = os.path.join(tmp, "hc.c"), os.path.join(tmp, "hc")
    with open(src, "w") as f:
        f.write(CLIENT_C)
    r = subprocess.run(["gcc", "-static", "-O2", "-o", out, src], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot build a static client (gcc -static): {r.stderr[-500:]}")
    os.chmod(tmp, 0o755)                  # the container's root (an unprivileged host uid) runs it
    return out


class PolicyGate(Gate):
    """`isobox gate --listen /run/docker.sock --engine <dockerd's> --policy <tmp policy>`, ready
    once it has recorded itself for isobox-runc."""

    def __init__(self, dockerd, tmp: str, image_id: str):
        self.policy = os.path.join(tmp, "policy.toml")
        api = ", ".join(f'"{a}"' for a in ALLOWED_API)
        with open(self.policy, "w") as f:
            f.write(f'[gate]\nsocket_images = [{{ image = "{image_id}", api = [{api}] }}]\n')
        os.chmod(self.policy, 0o644)
        super().__init__(dockerd, tmp, listen=PUBLIC, extra=("--policy", self.policy, "--mode", "660"))

    def ready(self) -> bool:
        from isobox.policy import gatesock
        return os.path.exists(gatesock.state_path(PUBLIC)) and os.path.exists(PUBLIC) and \
            self("version").returncode == 0


@pytest.fixture(scope="module")
def image_id(dockerd) -> str:
    return dockerd("image", "inspect", "-f", "{{.Id}}", IMAGE, check=True).stdout.strip()


@pytest.fixture(scope="module")
def setup(dockerd, image_id):
    if os.path.lexists(PUBLIC):
        pytest.skip(f"{PUBLIC} exists (a host engine?): this test serves it and will not replace it")
    tmp = tempfile.mkdtemp(prefix="isobox-e2e-sockimg-", dir="/tmp")
    g = PolicyGate(dockerd, tmp, image_id)
    try:
        client = _client(tmp)
        g.start()
        yield g, client
    finally:
        g.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _inside(gate: PolicyGate, image: str, client: str, *calls: tuple[str, ...]) -> subprocess.CompletedProcess:
    """docker run IMAGE with the gate's socket and the client bound; runs one client call per
    entry of calls, each response's status line and body on stdout."""
    script = "; ".join("/hc /var/run/docker.sock " + " ".join(f"'{a}'" for a in c) for c in calls)
    return gate("run", "--rm", "--name", unique("sockimg"), "-v", f"{PUBLIC}:/var/run/docker.sock",
                "-v", f"{client}:/hc:ro", image, "sh", "-c", script)


def test_the_allowed_image_uses_the_socket_within_its_api_list(setup, image_id):
    gate, client = setup
    body = '{"Image": "%s", "Cmd": ["true"]}' % image_id
    r = _inside(gate, image_id, client, ("GET", "/containers/json"), ("GET", "/v1.41/version"),
                ("POST", "/containers/create", body))
    assert r.returncode == 0, f"{r.stderr}\n--- gate log:\n{gate.log()[-3000:]}"
    responses = r.stdout.split("HTTP/1.1 ")[1:]
    assert len(responses) == 3, r.stdout
    assert responses[0].startswith("200 ") and responses[1].startswith("200 "), r.stdout
    assert responses[2].startswith("403 "), r.stdout
    assert "isobox gate: gate.socket_images" in responses[2] and "POST /containers/create" in responses[2]


def test_the_host_side_is_not_limited_by_the_containers_api_list(setup):
    gate, _ = setup
    r = gate("create", "--name", unique("sockimg-host"), IMAGE, "true")
    assert r.returncode == 0, r.stderr
    gate("rm", "-f", r.stdout.strip())


def test_another_image_wearing_the_allowed_tag_may_not_bind_it(setup, dockerd, image_id, busybox_tar):
    gate, client = setup
    tag = f"isobox-e2e/{unique('sockimg-tag')}:latest"
    other = f"isobox-e2e/{unique('sockimg-other')}:latest"
    dockerd("tag", image_id, tag, check=True)
    assert _inside(gate, tag, client, ("GET", "/_ping")).returncode == 0      # the tag resolves to the ID: fine
    # a different image (its own config, so its own ID), then given the allowed image's tag
    dockerd("import", "--change", "ENV FORGED=1", busybox_tar, other, check=True)
    try:
        assert dockerd("image", "inspect", "-f", "{{.Id}}", other, check=True).stdout.strip() != image_id
        dockerd("tag", other, tag, check=True)
        r = _inside(gate, tag, client, ("GET", "/_ping"))
        assert r.returncode != 0, r.stdout
        assert "isobox gate: mounts.deny" in r.stderr, r.stderr      # resolved to the other ID: unlisted
    finally:
        dockerd("rmi", "-f", tag, other)


def test_the_allowed_image_may_not_bind_dockerds_own_socket(setup, dockerd, image_id):
    gate, client = setup
    r = gate("run", "--rm", "-v", f"{dockerd.sock}:/var/run/docker.sock", image_id, "true")
    assert r.returncode != 0, r.stdout
    assert "isobox gate: gate.engine" in r.stderr, r.stderr


def test_an_unlisted_image_may_not_bind_the_socket(setup, dockerd, busybox_tar):
    gate, client = setup
    other = f"isobox-e2e/{unique('sockimg-unlisted')}:latest"
    dockerd("import", "--change", "ENV UNLISTED=1", busybox_tar, other, check=True)
    try:
        r = _inside(gate, other, client, ("GET", "/_ping"))
        assert r.returncode != 0 and "isobox gate: mounts.deny" in r.stderr, r.stderr
    finally:
        dockerd("rmi", "-f", other)
