"""Kubernetes' path: containerd 1.6's CRI plugin runs pods with the RuntimeClass handler
`isobox`, the runtime `isobox install --containerd` registers, driven over the CRI gRPC API
the way the kubelet drives it.

There is no kubelet or crictl here, so the tests talk CRI themselves: cri/cri_subset.proto is
a hand-written subset of runtime.v1 (only the calls and fields used), compiled by grpcio-tools
when the module starts. The containerd is the tests' own (own root, state, socket); its config
is written by `isobox install --containerd`. Pods get their network from the CNI bridge plugin
on a bridge of the tests' own, deleted afterwards; the sandbox ("pause") image is the busybox
rootfs running `sleep`, imported locally.

restrict_oom_score_adj: the CRI plugin gives every sandbox oomScoreAdj -998. This host's
bounding set lacks CAP_SYS_RESOURCE, so no runtime may lower its own score there (runc fails
with "can't get final child's PID from pipe"; isobox says why). The option clamps the value to
containerd's own, as on any node without that capability."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import uuid

import pytest

from conftest import leftovers
from e2e.engine_fixtures import (E2E_LIB, E2E_RUN, ISOBOX_RUNC, containerd_config, ids_held_by, oci_archive,
                                 own_containerd, proc_uid_map, run, uid_map_base)

CNI_BIN = "/usr/lib/cni"
pytestmark = pytest.mark.skipif(
    not (shutil.which("containerd") and shutil.which("ctr") and os.path.exists(ISOBOX_RUNC) and os.geteuid() == 0
         and importlib.util.find_spec("grpc_tools") and os.path.exists(f"{CNI_BIN}/bridge")),
    reason="needs root, containerd, ctr, grpcio-tools, the CNI plugins and /usr/local/bin/isobox-runc")

ROOT = os.path.join(E2E_LIB, "cri")
STATE = os.path.join(E2E_RUN, "cri")
SOCK = os.path.join(E2E_RUN, "cri.sock")
PAUSE = "isobox.invalid/pause:e2e"
IMAGE = "isobox.invalid/busybox:e2e"
BRIDGE = "isoboxcri0"
SUBNET = "10.237.0"
CGROUP_PARENT = "/isobox-e2e-cri"
K8S_NS = "k8s.io"

# what a node admin writes before `isobox install --containerd` adds the isobox runtime
BASE_CONFIG = containerd_config(ROOT, STATE, SOCK, f"""\
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{{conf_dir}}"
""")


def cni_conflist(ipam_dir: str) -> str:
    return json.dumps({
        "cniVersion": "1.0.0", "name": "isobox-e2e-cri",
        "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{SUBNET}.0/24"}]],
                              "dataDir": ipam_dir}}]})


class Cri:
    """The kubelet's side of the calls the tests make."""

    def __init__(self, pb, rpc, channel):
        self.pb, self.grpc_error = pb, sys.modules["grpc"].RpcError
        self.rt = rpc.RuntimeServiceStub(channel)
        self.pods: list[str] = []

    def run_pod(self, privileged: bool = False, network: int = 0, sysctls: dict | None = None,
                handler: str = "isobox", share_pid: bool = False) -> tuple[str, object]:
        pb, name = self.pb, "p" + uuid.uuid4().hex[:10]
        ctx = pb.LinuxSandboxSecurityContext(privileged=privileged,
                                             namespace_options=self.namespaces(network, share_pid))
        cfg = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="isobox-e2e"),
            hostname=name, linux=pb.LinuxPodSandboxConfig(cgroup_parent=f"{CGROUP_PARENT}/{name}",
                                                          security_context=ctx, sysctls=sysctls or {}))
        sandbox = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler)).pod_sandbox_id
        self.pods.append(sandbox)
        return sandbox, cfg

    def namespaces(self, network: int = 0, share_pid: bool = False):
        """As the kubelet sets them: the pod's network and IPC (POD) unless host ones (NODE); a
        pid namespace per container (CONTAINER), or the pod's with shareProcessNamespace."""
        return self.pb.NamespaceOption(network=network, pid=0 if share_pid else 1, ipc=0)

    def start(self, sandbox: str, cfg, args: list[str], privileged: bool = False, resources=None,
              attempt: int = 0, name: str = "app") -> str:
        pb = self.pb
        share_pid = cfg.linux.security_context.namespace_options.pid == 0
        c = self.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=sandbox, sandbox_config=cfg, config=pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name=name, attempt=attempt), image=pb.ImageSpec(image=IMAGE),
                command=args,
                linux=pb.LinuxContainerConfig(resources=resources, security_context=pb.LinuxContainerSecurityContext(
                    privileged=privileged, namespace_options=self.namespaces(share_pid=share_pid)))))).container_id
        self.rt.StartContainer(pb.StartContainerRequest(container_id=c))
        return c

    def exec(self, cid: str, script: str) -> str:
        r = self.rt.ExecSync(self.pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=30))
        assert r.exit_code == 0, r.stderr.decode()
        return r.stdout.decode()

    def pod_pid(self, sandbox: str) -> int:
        r = self.rt.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox, verbose=True))
        return int(json.loads(r.info["info"])["pid"])

    def container_pid(self, cid: str) -> int:
        r = self.rt.ContainerStatus(self.pb.ContainerStatusRequest(container_id=cid, verbose=True))
        return int(json.loads(r.info["info"])["pid"])

    def remove_container(self, cid: str) -> None:
        self.rt.StopContainer(self.pb.StopContainerRequest(container_id=cid, timeout=0))
        self.rt.RemoveContainer(self.pb.RemoveContainerRequest(container_id=cid))

    def remove_pod(self, sandbox: str) -> None:
        """What the kubelet does when a pod goes: stop the sandbox (and its containers), remove it."""
        self.rt.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox))
        self.rt.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox))
        self.pods.remove(sandbox)


def _client(out: str):
    """Compiles the CRI subset into `out` and imports it."""
    from grpc_tools import protoc
    src = os.path.join(os.path.dirname(__file__), "cri")
    assert protoc.main(["protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}",
                        os.path.join(src, "cri_subset.proto")]) == 0
    sys.path.insert(0, out)
    try:
        import cri_subset_pb2 as pb
        import cri_subset_pb2_grpc as rpc
    finally:
        sys.path.remove(out)
    return pb, rpc


@contextlib.contextmanager
def cri_node(tmp: pathlib.Path, busybox_tar: str, engine: str = "cri"):
    """A node's containerd with the CRI plugin, isobox installed into its config, the CNI bridge
    and the two images; yields the kubelet's side (Cri). Everything goes afterwards: the pods
    left, containerd, the bridge, the pods' cgroup parents (bench/cri uses it too)."""
    import grpc
    pb, rpc = _client(str(tmp))
    conf_dir = tmp / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-isobox-e2e.conflist").write_text(cni_conflist(str(tmp / "ipam")))
    cfg = tmp / "config.toml"
    cfg.write_text(BASE_CONFIG.replace("{conf_dir}", str(conf_dir)))
    run(["isobox", "install", "--containerd"], env=dict(os.environ, ISOBOX_CONTAINERD_CONFIG=str(cfg)))
    bridge_was_there = os.path.exists(f"/sys/class/net/{BRIDGE}")
    try:
        with own_containerd(str(cfg), SOCK, ROOT, STATE, engine, str(tmp / "containerd.log")):
            ctr = ["ctr", "-a", SOCK, "-n", K8S_NS, "images", "import", "--all-platforms"]
            run([*ctr, oci_archive(str(tmp / "pause.tar"), PAUSE, busybox_tar, cmd=("sleep", "2147483647"))])
            run([*ctr, oci_archive(str(tmp / "busybox.tar"), IMAGE, busybox_tar)])
            with grpc.insecure_channel(f"unix://{SOCK}") as channel:
                client = Cri(pb, rpc, channel)
                try:
                    yield client
                finally:
                    for sandbox in list(client.pods):  # whatever a failed test left
                        try:
                            client.remove_pod(sandbox)
                        except grpc.RpcError:
                            pass
    finally:
        if not bridge_was_there and os.path.exists(f"/sys/class/net/{BRIDGE}"):
            run(["ip", "link", "del", BRIDGE], check=False)
        for d in sorted((os.path.join(r, CGROUP_PARENT.strip("/")) for r in _cgroup_roots()), reverse=True):
            _rmdir_tree(d)


@pytest.fixture(scope="module")
def cri(tmp_path_factory, busybox_tar):
    with cri_node(tmp_path_factory.mktemp("cri"), busybox_tar) as client:
        yield client


def _cgroup_roots() -> list[str]:
    return [os.path.join("/sys/fs/cgroup", d) for d in os.listdir("/sys/fs/cgroup")]


def _rmdir_tree(d: str) -> None:
    """Empty cgroup directories under and at d (a pod's cgroup_parent is the kubelet's to make
    and remove; here the tests play the kubelet)."""
    if not os.path.isdir(d):
        return
    for dirpath, _, _ in sorted(os.walk(d), key=lambda w: -w[0].count("/")):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _host_uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        return [int(x) for x in next(l for l in f if l.startswith("Uid:")).split()[1:]]


def test_pod_runs_in_one_isobox_range_shared_by_its_containers(cri):
    """The sandbox gets an exclusive range; the pod's container joins the sandbox's user
    namespace and range (as Sysbox does for pods), and the CNI network namespace the engine
    made in the host's user namespace, where the pod's net.* sysctls are set."""
    sandbox, cfg = cri.run_pod(sysctls={"net.ipv4.ip_unprivileged_port_start": "80"})
    pause = cri.pod_pid(sandbox)
    base, size = proc_uid_map(pause)
    assert base >= 65536 and size == 65536
    app = cri.start(sandbox, cfg, ["sleep", "300"])
    pid = cri.container_pid(app)
    assert proc_uid_map(pid) == (base, size)
    for kind in ("user", "net", "ipc", "uts"):
        assert _ns(pid, kind) == _ns(pause, kind), kind
    assert _ns(pid, "pid") != _ns(pause, "pid") and _ns(pid, "mnt") != _ns(pause, "mnt")
    assert _host_uids(pid) == [base] * 4            # container root is an unprivileged host user
    out = cri.exec(app, "cat /proc/self/uid_map; id -u; ip -4 -o addr show eth0; "
                        "cat /proc/sys/net/ipv4/ip_unprivileged_port_start")
    assert uid_map_base(out) == base and "\n0\n" in out
    assert f"inet {SUBNET}." in out, out              # the pod's CNI address, seen from the container
    assert out.split()[-1] == "80"                    # the pod's sysctl, set in the pod's netns
    cri.remove_pod(sandbox)
    assert ids_held_by([sandbox, app]) == []
    assert leftovers(sandbox) == [] and leftovers(app) == []


def test_privileged_pod_stays_isolated(cri):
    """privileged: true in the pod and the container: full capabilities inside, still an
    unprivileged range on the host, and the emulated /proc in place."""
    sandbox, cfg = cri.run_pod(privileged=True)
    app = cri.start(sandbox, cfg, ["sleep", "300"], privileged=True)
    base, _ = proc_uid_map(cri.container_pid(app))
    assert base >= 65536
    out = cri.exec(app, "grep CapEff /proc/self/status; cat /proc/self/uid_map; head -1 /proc/uptime; "
                        "mount | grep ' /proc/uptime '")
    # containerd 1.6 grants a privileged container the capabilities it holds itself (this
    # host's bounding set, without CAP_SYS_RESOURCE), in the pod's user namespace
    with open("/proc/self/status") as f:
        host_bounding = next(l for l in f if l.startswith("CapBnd:")).split()[1]
    assert f"CapEff:\t{host_bounding}" in out and uid_map_base(out) == base
    assert int(host_bounding, 16) >> 21 & 1                 # CAP_SYS_ADMIN among them
    with open("/proc/uptime") as f:
        host_uptime = float(f.read().split()[0])
    assert float(out.splitlines()[2].split()[0]) < host_uptime   # the container's own uptime
    assert "fuse" in out.splitlines()[3]
    cri.remove_pod(sandbox)
    assert ids_held_by([sandbox, app]) == [] and leftovers(app) == []


def test_container_limits_land_in_the_pods_cgroup_and_show_inside(cri):
    """The kubelet's limits: the container's cgroup lies below the pod's cgroup_parent (where the
    kubelet accounts the pod), carries the memory and CPU limits, and the container's
    /proc/meminfo shows the memory limit as its total."""
    sandbox, cfg = cri.run_pod()
    limit = 96 << 20
    app = cri.start(sandbox, cfg, ["sleep", "300"], resources=cri.pb.LinuxContainerResources(
        memory_limit_in_bytes=limit, cpu_period=100000, cpu_quota=50000))
    with open(f"/proc/{cri.container_pid(app)}/cgroup") as f:
        paths = {c: p.strip() for line in f for _, cs, p in [line.split(":", 2)] for c in cs.split(",")}
    pod_cgroup = cfg.linux.cgroup_parent
    assert paths["memory"].startswith(pod_cgroup + "/") and paths["cpu"].startswith(pod_cgroup + "/"), paths
    with open(f"/sys/fs/cgroup/memory{paths['memory']}/memory.limit_in_bytes") as f:
        assert int(f.read()) == limit
    with open(f"/sys/fs/cgroup/cpu{paths['cpu']}/cpu.cfs_quota_us") as f:
        assert int(f.read()) == 50000
    out = cri.exec(app, "grep MemTotal /proc/meminfo")
    assert out.split()[1] == str(limit >> 10), out
    cri.remove_pod(sandbox)
    assert leftovers(app) == [] and leftovers(sandbox) == []


def test_a_pod_of_several_containers_shares_one_range(cri):
    """Sidecars: each further container joins namespaces that the sandbox and the containers
    before it all live in; they are all one user namespace, so each joins it."""
    sandbox, cfg = cri.run_pod()
    base = proc_uid_map(cri.pod_pid(sandbox))[0]
    apps = [cri.start(sandbox, cfg, ["sleep", "300"], name=f"app{i}") for i in range(4)]
    users = {os.readlink(f"/proc/{cri.container_pid(a)}/ns/user") for a in apps}
    assert users == {os.readlink(f"/proc/{cri.pod_pid(sandbox)}/ns/user")}
    assert {proc_uid_map(cri.container_pid(a))[0] for a in apps} == {base}
    cri.remove_pod(sandbox)
    assert ids_held_by([sandbox, *apps]) == []
    assert all(leftovers(a) == [] for a in apps)


def test_share_process_namespace_pod(cri):
    """shareProcessNamespace: true: the pod's containers share the sandbox's pid namespace and
    see each other's processes, the sandbox's `sleep` being pid 1."""
    sandbox, cfg = cri.run_pod(share_pid=True)
    app = cri.start(sandbox, cfg, ["sleep", "300"])
    pid, pause = cri.container_pid(app), cri.pod_pid(sandbox)
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{pause}/ns/pid")
    out = cri.exec(app, "cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -o args")
    assert out.splitlines()[0].strip() == "sleep 2147483647" and "sleep 300" in out, out
    cri.remove_pod(sandbox)
    assert ids_held_by([sandbox, app]) == [] and leftovers(app) == []


def test_a_restarted_container_reuses_the_pods_range_which_lives_until_the_pod_goes(cri):
    """The kubelet replaces a crashed container in the same pod (attempt 1): the new one takes
    the pod's range again, the old one's removal does not free it, the pod's removal does."""
    sandbox, cfg = cri.run_pod()
    base = proc_uid_map(cri.pod_pid(sandbox))[0]
    first = cri.start(sandbox, cfg, ["sleep", "300"])
    cri.remove_container(first)
    assert leftovers(first) == [] and ids_held_by([first]) == []
    assert [b for _, b in ids_held_by([sandbox])] == [base]      # the sandbox still holds it
    second = cri.start(sandbox, cfg, ["sleep", "300"], attempt=1)
    assert proc_uid_map(cri.container_pid(second))[0] == base
    cri.remove_pod(sandbox)
    assert ids_held_by([sandbox, first, second]) == []
    assert leftovers(second) == [] and leftovers(sandbox) == []


def test_host_network_pod_is_refused_with_isoboxs_line(cri):
    """hostNetwork: true gives the sandbox no network namespace of its own: isobox refuses,
    and the kubelet would show its line in the pod's events."""
    with pytest.raises(cri.grpc_error) as e:
        cri.run_pod(network=2)                       # NamespaceMode NODE
    assert "isobox does not share the host's network namespace" in e.value.details()
