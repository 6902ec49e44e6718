"""The gate's decisions, on crafted requests, with dockerd's answers stubbed (a unit test of
the decision logic: the e2e tests in tests/e2e/test_gate_rules.py use a real dockerd)."""
import json
import os
import stat

import pytest

from isobox.gate import rules
from isobox.gate.request import Peer, Request
from isobox.policy.model import Policy, SocketImage

POLICY = "/etc/isobox/policy.toml"
IMG_ID = "sha256:" + "a" * 64
OTHER_ID = "sha256:" + "b" * 64
DIGEST = "registry.example/tools@sha256:" + "c" * 64
SOCK_CID = "1" * 64
PLAIN_CID = "2" * 64
HOSTPID_CID = "3" * 64
OLD_CID = "4" * 64


class FakeEngine:
    def __init__(self):
        self.calls: list[str] = []
        self.answers: dict[str, object] = {
            "/images/x/json": {"Id": "sha256:" + "d" * 64, "RepoDigests": []},
            "/images/allowed:latest/json": {"Id": IMG_ID, "RepoDigests": []},
            "/images/forged:latest/json": {"Id": OTHER_ID, "RepoDigests": []},   # `docker tag` of another image
            "/images/tools:1/json": {"Id": OTHER_ID, "RepoDigests": [DIGEST]},
            f"/images/{IMG_ID}/json": {"Id": IMG_ID, "RepoDigests": []},
            f"/containers/{SOCK_CID}/json": container(SOCK_CID, mounts=[bind("/var/run/docker.sock")]),
            "/containers/sockholder/json": container(SOCK_CID, mounts=[bind("/run/docker.sock")]),
            "/containers/varholder/json": container(SOCK_CID, mounts=[bind("/var/run")]),
            "/containers/plain/json": container(PLAIN_CID, mounts=[bind("/srv/data")]),
            "/containers/hostpid/json": container(HOSTPID_CID, PidMode="host"),
            "/containers/etcholder/json": container(PLAIN_CID, mounts=[bind("/etc")]),
            "/containers/old/json": container(OLD_CID, Runtime="runc"),
            "/networks/hostnet-id": {"Name": "host", "Driver": "host"},
            "/networks/mynet": {"Name": "mynet", "Driver": "bridge"},
            "/volumes/oldbind": {"Name": "oldbind", "Driver": "local",
                                 "Options": {"type": "none", "o": "bind", "device": "/etc"}},
            "/volumes/plainvol": {"Name": "plainvol", "Driver": "local", "Options": None},
            "/info": {"DefaultRuntime": "isobox", "Runtimes": {"isobox": {"path": "/usr/local/bin/isobox-runc"}}},
        }

    def __call__(self, path: str):
        self.calls.append(path)
        if path in self.answers:
            return 200, self.answers[path]
        return 404, {"message": "not found"}


def container(cid: str, mounts=(), Runtime="isobox", **hc) -> dict:
    return {"Id": cid, "Image": IMG_ID, "State": {"Pid": 0}, "Mounts": list(mounts),
            "HostConfig": {"Runtime": Runtime, **hc}}


def bind(src: str) -> dict:
    return {"Type": "bind", "Source": src, "Destination": "/x"}


@pytest.fixture
def engine(monkeypatch):
    e = FakeEngine()
    monkeypatch.setattr(rules, "ENGINE", e)
    monkeypatch.setattr(rules, "ENGINE_SOCKET", "/run/isobox-test/docker.sock")
    return e


@pytest.fixture
def policy(monkeypatch):
    box = {"p": Policy(path=POLICY, gate_socket_images=(SocketImage(IMG_ID), SocketImage(DIGEST)))}
    monkeypatch.setattr(rules, "load_policy", lambda: box["p"])
    return box


def req(method: str, path: str, body=b"", query=None, peer=None) -> Request:
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return Request(method=method, path=path, version="1.41", query=query or {}, headers=[], body=body, peer=peer)


def create(body, **kw):
    return rules.check(req("POST", "/containers/create", body, **kw))


def refused(d, rule: str, *words: str) -> bool:
    assert not d.allow, d
    assert d.status == 403, d
    assert d.message.startswith(f"isobox gate: {rule}") and d.message.endswith(f"(policy {POLICY})"), d.message
    for w in words:
        assert w in d.message, d.message
    return True


def forwarded(d) -> dict:
    assert d.allow, d.message
    return json.loads(d.body)


# --- runtime -------------------------------------------------------------------------------------

@pytest.mark.parametrize("hc", [{}, {"Runtime": "runc"}, {"runtime": "runc"}])
def test_create_is_rewritten_to_isobox(engine, policy, hc):
    out = forwarded(create({"Image": "x", "HostConfig": hc}))
    assert out["HostConfig"]["Runtime"] == "isobox"


def test_duplicate_runtime_keys_are_all_replaced(engine, policy):
    d = create(b'{"Image":"x","HostConfig":{"Runtime":"runc","runtime":"runc"},"runtime":"runc"}')
    assert d.body.count(b"runc") == 0 and forwarded(d)["HostConfig"]["Runtime"] == "isobox"


def test_runtime_name_comes_from_the_policy(engine, policy):
    policy["p"] = Policy(path=POLICY, gate_runtime="sandbox")
    assert forwarded(create({"Image": "x"}))["HostConfig"]["Runtime"] == "sandbox"


def test_start_of_a_container_not_on_isobox_is_refused(engine, policy):
    assert refused(rules.check(req("POST", "/containers/old/start")), "runtime", "runc")
    assert refused(rules.check(req("POST", "/containers/old/restart")), "runtime")
    assert refused(rules.check(req("POST", "/containers/old/exec", {"Cmd": ["id"]})), "runtime")
    assert rules.check(req("POST", "/containers/plain/start")).allow
    assert rules.check(req("POST", "/containers/missing/start")).allow      # dockerd answers 404


@pytest.mark.parametrize("body", [b'{"Binds":["/:/h"]}', b'{"hostconfig":1}', b'{"a":1}', b"xx"])
def test_old_api_start_body_is_refused(engine, policy, body):
    assert refused(rules.check(req("POST", "/containers/plain/start", body)), "start.hostconfig")


@pytest.mark.parametrize("body", [b"", b"{}", b" null\n"])
def test_empty_start_bodies_pass(engine, policy, body):
    assert rules.check(req("POST", "/containers/plain/start", body)).allow


# --- namespaces ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key, ns", [("PidMode", "pid"), ("NetworkMode", "network"), ("IpcMode", "ipc"),
                                     ("UTSMode", "uts"), ("UsernsMode", "userns"), ("CgroupnsMode", "cgroupns")])
def test_host_namespaces_are_refused(engine, policy, key, ns):
    assert refused(create({"Image": "x", "HostConfig": {key: "host"}}), f"namespaces.{ns}", f"{key}=host")
    assert refused(create({"Image": "x", "hostconfig": {key.lower(): "host"}}), f"namespaces.{ns}")
    assert refused(create({"Image": "x", key.upper(): "host"}), f"namespaces.{ns}")      # top-level form


def test_duplicate_key_bypass_is_refused(engine, policy):
    d = create(b'{"Image":"x","HostConfig":{"PidMode":"host","PidMode":""},"hostconfig":{"pidmode":"host"}}')
    assert refused(d, "namespaces.pid")


def test_container_namespace_of_a_socket_holder_is_refused(engine, policy):
    assert refused(create({"Image": "x", "HostConfig": {"PidMode": "container:sockholder"}}),
                   "namespaces.pid", "holds the engine socket")
    assert refused(create({"Image": "x", "HostConfig": {"NetworkMode": "container:varholder"}}),
                   "namespaces.network")
    assert refused(create({"Image": "x", "HostConfig": {"PidMode": "container:hostpid"}}),
                   "namespaces.pid", "host's pid namespace")
    assert forwarded(create({"Image": "x", "HostConfig": {"PidMode": "container:plain"}}))


def test_host_network_by_id_is_refused(engine, policy):
    assert refused(create({"Image": "x", "HostConfig": {"NetworkMode": "hostnet-id"}}), "namespaces.network")
    assert forwarded(create({"Image": "x", "HostConfig": {"NetworkMode": "mynet"}}))


def test_privileged_is_allowed(engine, policy):
    assert forwarded(create({"Image": "x", "HostConfig": {"Privileged": True}}))["HostConfig"]["Privileged"] is True


# --- mounts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("src", ["/", "/etc", "//etc", "/etc/", "/tmp/../etc", "/etc/./ssh", "/proc", "/sys/",
                                 "/var/lib/docker", "/var/run", "/var", "/run", "/var/run/docker.sock"])
def test_denied_bind_sources_are_refused(engine, policy, src):
    assert refused(create({"Image": "x", "HostConfig": {"Binds": [f"{src}:/h"]}}), "mounts.deny", src)
    m = {"Type": "bind", "Source": src, "Target": "/h"}
    assert refused(create({"Image": "x", "HostConfig": {"Mounts": [m]}}), "mounts.deny", src)


def test_symlink_to_a_denied_path_is_refused(engine, policy, tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to("/etc")
    d = create({"Image": "x", "HostConfig": {"Binds": [f"{link}:/h"]}})
    assert refused(d, "mounts.deny: /etc", "resolves to /etc")


def test_ordinary_binds_pass(engine, policy, tmp_path):
    out = forwarded(create({"Image": "x", "HostConfig": {"Binds": [f"{tmp_path}:/h:ro", "/data:ro", "named:/v"],
                                                         "Mounts": [{"Type": "tmpfs", "Target": "/t"}]}}))
    assert out["HostConfig"]["Binds"][0] == f"{tmp_path}:/h:ro"


def test_lowercase_binds_are_refused(engine, policy):
    assert refused(create(b'{"Image":"x","hostconfig":{"binds":["/:/h"]}}'), "mounts.deny")
    assert refused(create(b'{"Image":"x","binds":["/:/h"]}'), "mounts.deny")                 # top-level form
    assert refused(create(b'{"Image":"x","HostConfig":{"Binds":["/:/h"],"binds":["/etc:/e"]}}'),
                   "mounts.deny", "/etc")


def test_duplicate_mount_arrays_are_checked_as_merged(engine, policy):
    d = create(b'{"Image":"x","HostConfig":{"Mounts":[{"Type":"bind","Source":"/etc","Target":"/a"}],'
               b'"mounts":[{"Target":"/b"}]}}')
    assert refused(d, "mounts.deny", "/etc")


def test_deny_extra_is_honoured(engine, policy, tmp_path):
    policy["p"] = Policy(path=POLICY, deny_extra=(str(tmp_path),))
    assert refused(create({"Image": "x", "HostConfig": {"Binds": [f"{tmp_path}/sub:/h"]}}), "mounts.deny_extra")


@pytest.mark.parametrize("opts", [
    {"type": "none", "o": "bind", "device": "/etc"},
    {"type": "none", "o": "rbind,ro", "device": "//etc/"},
    {"type": "overlay", "o": "lowerdir=/etc:/srv,upperdir=/tmp/u,workdir=/tmp/w", "device": "overlay"},
])
def test_local_driver_volumes_binding_denied_paths_are_refused(engine, policy, opts):
    assert refused(rules.check(req("POST", "/volumes/create", {"Name": "v", "Driver": "local", "DriverOpts": opts})),
                   "mounts.deny", "/etc")
    m = {"Type": "volume", "Source": "v", "Target": "/v",
         "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": opts}}}
    assert refused(create({"Image": "x", "HostConfig": {"Mounts": [m]}}), "mounts.deny", "/etc")


def test_volume_create_case_and_duplicate_bypasses(engine, policy):
    body = b'{"name":"v","driveropts":{"type":"none","o":"bind","device":"/srv"},"DriverOpts":{"device":"/etc"}}'
    assert refused(rules.check(req("POST", "/volumes/create", body)), "mounts.deny", "/etc")


def test_volume_create_of_an_ordinary_path_passes(engine, policy, tmp_path):
    d = rules.check(req("POST", "/volumes/create", {"Name": "v", "DriverOpts": {"type": "none", "o": "bind",
                                                                               "device": str(tmp_path)}}))
    assert forwarded(d)["DriverOpts"]["device"] == str(tmp_path)


def test_existing_volume_binding_a_denied_path_is_refused(engine, policy):
    assert refused(create({"Image": "x", "HostConfig": {"Binds": ["oldbind:/v"]}}), "mounts.deny", "/etc")
    assert forwarded(create({"Image": "x", "HostConfig": {"Binds": ["plainvol:/v"]}}))


def test_block_device_volume_is_refused(engine, policy, tmp_path):
    dev = tmp_path / "blk"
    os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    d = rules.check(req("POST", "/volumes/create", {"DriverOpts": {"type": "ext4", "device": str(dev)}}))
    assert refused(d, "devices.block")


# --- devices, volumes-from ------------------------------------------------------------------------

def test_block_devices_are_refused(engine, policy, tmp_path):
    dev = tmp_path / "blk"
    os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    hc = {"Devices": [{"PathOnHost": str(dev), "PathInContainer": "/dev/x", "CgroupPermissions": "rwm"}]}
    assert refused(create({"Image": "x", "HostConfig": hc}), "devices.block", str(dev))
    link = tmp_path / "link"
    link.symlink_to(dev)
    hc = {"devices": [{"pathonhost": str(link)}]}
    assert refused(create({"Image": "x", "HostConfig": hc}), "devices.block")
    assert refused(create({"Image": "x", "HostConfig": {"Devices": [{"PathOnHost": str(tmp_path)}]}}),
                   "devices.block", "holds block device")


def test_character_devices_pass(engine, policy):
    assert forwarded(create({"Image": "x", "HostConfig": {"Devices": [{"PathOnHost": "/dev/fuse"}]}}))


def test_volumes_from_a_socket_holder_is_refused(engine, policy):
    assert refused(create({"Image": "x", "HostConfig": {"VolumesFrom": ["sockholder:ro"]}}), "volumes_from")
    assert refused(create({"Image": "x", "HostConfig": {"VolumesFrom": ["etcholder"]}}), "volumes_from: mounts.deny")
    assert forwarded(create({"Image": "x", "HostConfig": {"VolumesFrom": ["plain"]}}))


# --- the engine socket allow-list -----------------------------------------------------------------

def test_allowed_image_by_id_may_bind_the_socket(engine, policy):
    out = forwarded(create({"Image": "allowed:latest", "HostConfig": {"Binds": ["/var/run/docker.sock:/s"]}}))
    assert out["Image"] == IMG_ID                  # pinned: a later `docker tag` changes nothing
    out = forwarded(create({"Image": "tools:1", "HostConfig": {"Mounts": [
        {"Type": "bind", "Source": "/run/docker.sock", "Target": "/s"}]}}))
    assert out["Image"] == OTHER_ID                # allowed by its repo digest


def test_forged_tag_may_not_bind_the_socket(engine, policy):
    d = create({"Image": "forged:latest", "HostConfig": {"Binds": ["/var/run/docker.sock:/s"]}})
    assert refused(d, "mounts.deny: /var/run/docker.sock")
    assert "/images/forged:latest/json" in engine.calls


def test_allowed_image_may_not_bind_an_ancestor_of_the_socket(engine, policy):
    for src in ("/var/run", "/run", "/var/run/"):
        d = create({"Image": "allowed:latest", "HostConfig": {"Binds": [f"{src}:/s"]}})
        assert refused(d, "mounts.deny", "contains it")


def test_allowed_image_may_not_bind_dockerds_real_socket(engine, policy, monkeypatch):
    monkeypatch.setattr(rules, "ENGINE_SOCKET", "/run/isobox/gate/docker.sock")
    d = create({"Image": "allowed:latest", "HostConfig": {"Binds": ["/run/isobox/gate/docker.sock:/s"]}})
    assert refused(d, "mounts.deny")


def test_the_gates_own_socket_is_an_engine_socket_wherever_it_is(engine, policy, monkeypatch):
    """A gate on a path the deny list does not name: only listed images may bind it."""
    monkeypatch.setattr(rules, "LISTEN_SOCKET", "/srv/gate/docker.sock")
    out = forwarded(create({"Image": "allowed:latest", "HostConfig": {"Binds": ["/srv/gate/docker.sock:/s"]}}))
    assert out["Image"] == IMG_ID
    d = create({"Image": "forged:latest", "HostConfig": {"Binds": ["/srv/gate/docker.sock:/s"]}})
    assert refused(d, "gate.socket_images: /srv/gate/docker.sock", "not listed")
    d = create({"Image": "allowed:latest", "HostConfig": {"Binds": ["/srv/gate:/s"]}})
    assert refused(d, "gate.socket_images", "contains it")


def test_dockerds_socket_on_an_undenied_path_is_refused_to_every_image(engine, policy, monkeypatch):
    monkeypatch.setattr(rules, "ENGINE_SOCKET", "/srv/engine/docker.sock")
    for src in ("/srv/engine/docker.sock", "/srv/engine", "/srv//engine/"):
        d = create({"Image": "allowed:latest", "HostConfig": {"Binds": [f"{src}:/s"]}})
        assert refused(d, "gate.engine: /srv/engine/docker.sock")


def test_unknown_image_asks_the_cli_to_pull(engine, policy):
    d = create({"Image": "nothere", "HostConfig": {"Binds": ["/var/run/docker.sock:/s"]}})
    assert not d.allow and d.status == 404 and "No such image" in d.message


def test_no_engine_lookup_for_ordinary_creates(engine, policy):
    forwarded(create({"Image": "x", "HostConfig": {"Binds": ["/srv:/s"]}}))
    assert not any(c.startswith("/images/") for c in engine.calls)


def test_api_list_limits_requests_from_inside_an_allowed_container(engine, policy, monkeypatch):
    policy["p"] = Policy(path=POLICY, gate_socket_images=(
        SocketImage(IMG_ID, ("GET /containers/json", "POST /containers/*/start")),))
    c = dict(engine.answers[f"/containers/{SOCK_CID}/json"])
    monkeypatch.setattr(rules, "peer_container", lambda ctx: c)
    peer = Peer(pid=1234, uid=0, gid=0)
    assert rules.check(req("GET", "/containers/json", peer=peer)).allow
    assert rules.check(req("HEAD", "/_ping", peer=peer)).allow
    assert rules.check(req("POST", "/containers/plain/start", peer=peer)).allow
    assert refused(rules.check(req("POST", "/containers/create", {"Image": "x"}, peer=peer)),
                   "gate.socket_images", "POST /containers/create")
    assert refused(rules.check(req("DELETE", "/containers/plain", peer=peer)), "gate.socket_images")


def test_api_patterns():
    pats = ("GET /containers/*/json", "* /volumes/**")
    assert rules.api_allowed(pats, "GET", "/containers/abc/json")
    assert not rules.api_allowed(pats, "GET", "/containers/abc/def/json")
    assert rules.api_allowed(pats, "DELETE", "/volumes/x")
    assert rules.api_allowed(pats, "GET", "/volumes")
    assert not rules.api_allowed(pats, "POST", "/containers/abc/json")


def test_peer_in_the_host_pid_namespace_is_not_a_container(engine, policy):
    r = req("GET", "/containers/json", peer=Peer(pid=os.getpid(), uid=0, gid=0))
    assert rules.peer_container(rules.Ctx(r, policy["p"])) is None


# --- builds, swarm, plugins ------------------------------------------------------------------------

def test_build_host_network_is_refused(engine, policy):
    assert refused(rules.check(req("POST", "/build", query={"networkmode": ["host"]})), "build.network")
    assert refused(rules.check(req("POST", "/build", query={"networkmode": ["default", "HOST"]})), "build.network")
    assert refused(rules.check(req("POST", "/build", query={"networkmode": ["container:sockholder"]})),
                   "namespaces.network")
    assert rules.check(req("POST", "/build", query={"networkmode": ["default"]})).allow


def test_classic_build_needs_isobox_as_default_runtime(engine, policy):
    engine.answers["/info"] = {"DefaultRuntime": "runc", "Runtimes": {}}
    assert refused(rules.check(req("POST", "/build")), "build.runtime", "default-runtime")


def test_buildkit_build_needs_isobox_runc_on_dockerds_path(engine, policy, monkeypatch, tmp_path):
    rules._BK_CACHE.clear()
    runc_dir = tmp_path / "bin"
    runc_dir.mkdir()
    target = tmp_path / "isobox-runc"
    target.write_text("#!/bin/sh\n")
    target.chmod(0o755)
    engine.answers["/info"] = {"DefaultRuntime": "isobox", "Runtimes": {"isobox": {"path": str(target)}}}
    monkeypatch.setattr(rules, "engine_path_var", lambda: f"{runc_dir}:/usr/sbin:/usr/bin")
    assert refused(rules.check(req("POST", "/build", query={"version": ["2"]})), "build.runtime", "BuildKit")
    rules._BK_CACHE.clear()
    shim = runc_dir / "runc"
    shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    shim.chmod(0o755)
    assert rules.check(req("POST", "/build", query={"version": ["2"]})).allow
    rules._BK_CACHE.clear()


def test_grpc_is_refused(engine, policy):
    assert refused(rules.check(req("POST", "/grpc")), "build.grpc")


@pytest.mark.parametrize("path", ["/swarm/init", "/swarm/join", "/services/create", "/services/abc/update"])
def test_swarm_is_refused_unless_allowed(engine, policy, path):
    assert refused(rules.check(req("POST", path, {})), "gate.allow_swarm")
    policy["p"] = Policy(path=POLICY, gate_allow_swarm=True)
    assert rules.check(req("POST", path, {})).allow


def test_allowed_swarm_services_still_may_not_bind_denied_paths(engine, policy):
    policy["p"] = Policy(path=POLICY, gate_allow_swarm=True)
    spec = {"taskTemplate": {"containerSpec": {"Image": "x", "Mounts": [{"Type": "bind", "Source": "/etc"}]}}}
    assert refused(rules.check(req("POST", "/services/create", spec)), "mounts.deny")


@pytest.mark.parametrize("path", ["/plugins/pull", "/plugins/create", "/plugins/foo:latest/enable",
                                  "/plugins/vendor/foo/upgrade", "/plugins/foo/set"])
def test_plugins_are_refused_unless_allowed(engine, policy, path):
    assert refused(rules.check(req("POST", path)), "gate.allow_plugins")
    policy["p"] = Policy(path=POLICY, gate_allow_plugins=True)
    assert rules.check(req("POST", path)).allow


# --- plumbing ------------------------------------------------------------------------------------

def test_needs_body():
    assert rules.needs_body("POST", "/containers/create")
    assert rules.needs_body("POST", "/containers/abc/start")
    assert rules.needs_body("POST", "/volumes/create")
    assert not rules.needs_body("POST", "/build")            # the context tar streams through
    assert not rules.needs_body("GET", "/containers/json")
    assert not rules.needs_body("POST", "/containers/abc/attach")


def test_other_requests_pass_untouched(engine, policy):
    d = rules.check(req("GET", "/containers/json"))
    assert d.allow and d.body is None


@pytest.mark.parametrize("body", [b"{", b'{"HostConfig":{"Binds":"/:/h"}}', b'{"Image":NaN}'])
def test_malformed_bodies_are_refused_with_400(engine, policy, body):
    d = create(body)
    assert not d.allow and d.status == 400 and d.message.startswith("isobox gate: request:")


def test_engine_unreachable_fails_closed(policy, monkeypatch, tmp_path):
    monkeypatch.setattr(rules, "ENGINE", None)
    monkeypatch.setattr(rules, "ENGINE_SOCKET", str(tmp_path / "none.sock"))
    d = rules.check(req("POST", "/containers/old/start"))
    assert not d.allow and d.status == 502 and "isobox gate: engine:" in d.message


def test_policy_file_is_read(engine, monkeypatch, tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text('[gate]\nallow_plugins = true\n[mounts]\ndeny_extra = ["/srv/secret"]\n')
    monkeypatch.setattr(rules, "POLICY_PATH", str(p))
    assert rules.check(req("POST", "/plugins/pull")).allow
    d = rules.check(req("POST", "/containers/create", {"Image": "x", "HostConfig": {"Binds": ["/srv/secret:/s"]}}))
    assert not d.allow and d.message.endswith(f"(policy {p})")
