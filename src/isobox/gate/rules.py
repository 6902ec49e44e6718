"""The gate's policy decisions: one function per kind of request.

The proxy calls needs_body(method, path) to know which bodies to read whole, and check(req)
for EVERY request (the per-container API lists apply to all calls, not only to those with a
body). check() answers allow() -- possibly with a re-encoded body to forward instead of the
received one -- or refuse("isobox gate: <rule>: <what> (policy <file>)").

Rules (the names are the ones the messages carry):

  runtime            container create: HostConfig.Runtime is rewritten to [gate] runtime;
                     start/restart/exec of a container on another runtime is refused
  start.hostconfig   a HostConfig in the body of POST /containers/{id}/start (API < 1.24)
  namespaces.<ns>    pid/network/ipc/uts/userns/cgroupns "host", or "container:<c>" when <c>
                     holds the engine socket or itself uses the host's namespace
  mounts.deny[...]   Binds, Mounts (bind, and volume with driver options naming a host path),
                     volume create and named volumes whose options name a denied path
  devices.block      --device of a block device (or a directory holding one)
  volumes_from       --volumes-from a container with a mount this container could not have
  build.network      build networkmode=host (or container:<c> as above)
  build.runtime      a classic build while dockerd's default runtime is not isobox; a
                     BuildKit build while the `runc` on dockerd's PATH is not isobox-runc
  build.grpc         POST /grpc: BuildKit's own gRPC API (entitlements, network and runtime
                     options travel inside HTTP/2 frames the gate does not read)
  gate.allow_swarm   swarm init/join/update and service create/update
  gate.allow_plugins plugin pull/create/enable/upgrade/set
  gate.socket_images the engine socket bind (only for listed images, by ID or digest; the
                     gate's own --listen socket counts as one wherever it is), and the API
                     calls a request from inside such a container may make
  gate.engine        dockerd's real socket (--engine) or a directory above it, for every
                     image, even where the deny list does not name it
"""
from __future__ import annotations

import fnmatch
import http.client
import json
import os
import re
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote

from isobox.errors import IsoboxError
from isobox.gate import gojson
from isobox.gate.request import Decision, Request, allow, refuse
from isobox.policy import model
from isobox.policy.model import Policy, SocketImage

# Set by the proxy: engine_get(path) -> (status, decoded JSON or None), a GET on dockerd's
# own socket. Unset: a direct HTTP GET over ENGINE_SOCKET.
ENGINE: Callable[[str], tuple[int, object]] | None = None
ENGINE_SOCKET = "/var/run/docker.sock"      # dockerd's real socket (the proxy sets it)
LISTEN_SOCKET: str | None = None            # the socket the gate serves (`isobox gate` sets it)
POLICY_PATH: str | None = None              # None: model.policy_path()

NAMESPACES = (("PidMode", "pid"), ("NetworkMode", "network"), ("IpcMode", "ipc"), ("UTSMode", "uts"),
              ("UsernsMode", "userns"), ("CgroupnsMode", "cgroupns"))
_ID = r"[^/]+"


class EngineError(Exception):
    pass


class _Refused(Exception):
    def __init__(self, decision: Decision):
        self.decision = decision


# --- the engine -----------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def _socket_get(path: str) -> tuple[int, object]:
    conn = _UnixHTTPConnection(ENGINE_SOCKET)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(data) if data else None
    except ValueError:
        return r.status, None


def engine_get(path: str) -> tuple[int, object]:
    try:
        return (ENGINE or _socket_get)(path)
    except (OSError, http.client.HTTPException) as e:
        raise EngineError(f"cannot ask dockerd ({ENGINE_SOCKET}) for {path}: {e}") from None


def engine_pid() -> int | None:
    """dockerd's pid: the peer credentials of its socket's listener."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(ENGINE_SOCKET)
            pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return pid or None
    except OSError:
        return None


# --- one request's context -------------------------------------------------------------------

@dataclass
class Ctx:
    req: Request
    policy: Policy
    _cache: dict = field(default_factory=dict)

    def msg(self, rule: str, what: str) -> str:
        return f"isobox gate: {rule}: {what} (policy {self.policy.path})"

    def refuse(self, rule: str, what: str, status: int = 403) -> _Refused:
        return _Refused(refuse(self.msg(rule, what), status))

    def get(self, path: str) -> tuple[int, object]:
        if path not in self._cache:
            self._cache[path] = engine_get(path)
        return self._cache[path]

    def inspect(self, kind: str, ref: str) -> dict | None:
        """GET /<kind>/<ref>/json: the object, or None when dockerd says 404."""
        # (networks and volumes are inspected without the /json suffix)
        suffix = "" if kind in ("volumes", "networks") else "/json"
        status, js = self.get(f"/{kind}/{quote(ref, safe='/:@')}{suffix}")
        if status == 404:
            return None
        if status != 200 or not isinstance(js, dict):
            raise EngineError(f"dockerd answered {status} for {kind} {ref}")
        return js


# --- paths ------------------------------------------------------------------------------------

def _forms(paths) -> set[str]:
    return {model._norm(p) for p in paths} | {os.path.realpath(p) for p in paths}


def _public_sockets() -> set[str]:
    """The engine socket paths containers of allowed images may bind: the public socket (the
    gate's, once installed), never dockerd's real socket behind the gate."""
    listen = (LISTEN_SOCKET,) if LISTEN_SOCKET else ()
    public, real = _forms((*model.ENGINE_SOCKETS, *listen)), _forms((ENGINE_SOCKET,))
    return public if real <= public else public - real


def _all_sockets() -> set[str]:
    listen = (LISTEN_SOCKET,) if LISTEN_SOCKET else ()
    return _forms((*model.ENGINE_SOCKETS, ENGINE_SOCKET, *listen))


def _engine_rule(form: str) -> str | None:
    """dockerd's real socket (or a directory above it) is refused to every image, even where the
    deny list does not name it (a gate in front of a dockerd on another path): binding it would
    bypass the gate."""
    real = _forms((ENGINE_SOCKET,)) - _public_sockets()
    if any(r == form or (form != "/" and model._below(r, form)) for r in real):
        return f"gate.engine: {ENGINE_SOCKET}"
    return None


def _listen_rule(form: str) -> str | None:
    """The gate's own socket is an engine socket wherever it is served: only [gate] socket_images
    may bind it, and no image a directory above it."""
    if not LISTEN_SOCKET:
        return None
    for sock in _forms((LISTEN_SOCKET,)):
        if sock == form:
            return f"gate.socket_images: {LISTEN_SOCKET} (the gate's socket; the image is not listed)"
        if form != "/" and model._below(sock, form):
            return f"gate.socket_images: {LISTEN_SOCKET}; {form} contains it"
    return None


def path_forms(src: str) -> list[str]:
    """The forms a bind source is checked in: lexical (`//`, trailing `/`, `..`) and as the
    kernel will find it on this host (symlinks resolved)."""
    lexical = model._norm(src if src.startswith("/") else "/" + src)
    return list(dict.fromkeys((lexical, os.path.realpath(lexical))))


def _path_refusal(ctx: Ctx, src: str, what: str, socket_ok: bool, prefix: str = "") -> None:
    """Refuse a host path the policy denies. socket_ok: the image may bind the engine socket
    itself (its exact path, never a directory above it)."""
    forms = path_forms(src)
    if socket_ok and any(f in _public_sockets() for f in forms):
        return
    for f in forms:
        rule = ctx.policy.path_rule(f) or _engine_rule(f) or _listen_rule(f)
        if rule:
            via = f" (resolves to {f})" if f != src else ""
            raise ctx.refuse(prefix + rule, f"{what} {src}{via} refused")


def _holds_socket(container: dict) -> bool:
    """The container has the engine socket (or a directory above it) mounted."""
    sockets = _all_sockets()
    for m in container.get("Mounts") or []:
        src = m.get("Source") or ""
        if m.get("Type") not in (None, "bind") or not src.startswith("/"):
            continue
        for f in path_forms(src):
            if any(s == f or model._below(s, f) for s in sockets):
                return True
    return False


# --- images -----------------------------------------------------------------------------------

def _image_entry(ctx: Ctx, image: dict) -> SocketImage | None:
    """The [gate] socket_images entry matching a resolved image (its ID or a repo digest)."""
    ident = image.get("Id") or ""
    digests = image.get("RepoDigests") or []
    for entry in ctx.policy.gate_socket_images:
        if entry.image == ident or entry.image in digests:
            return entry
        if "@" not in entry.image and any(d.endswith("@" + entry.image) for d in digests):
            return entry
    return None


# --- container create ------------------------------------------------------------------------

_BIND_MODES = {"ro", "rw", "z", "Z", "shared", "rshared", "slave", "rslave", "private", "rprivate", "nocopy",
               "consistent", "cached", "delegated"}


def parse_bind(spec: str) -> tuple[str | None, str]:
    """(source, kind) of a Binds entry as dockerd's Linux parser reads it: kind "bind" (an
    absolute host path), "volume" (a named volume) or "anonymous" (source None)."""
    arr = spec.split(":")
    if len(arr) == 1 or (len(arr) == 2 and all(m in _BIND_MODES for m in arr[1].split(","))):
        return None, "anonymous"
    src = arr[0]
    return src, ("bind" if src.startswith("/") else "volume")


def _driver_opts_refusal(ctx: Ctx, opts: dict, what: str) -> None:
    """Local-driver options that mount a host path: device=<path> (o=bind, or a block device
    mounted with type=ext4...), and any path-valued mount option (overlay's lowerdir=...)."""
    paths: list[str] = []
    dev = opts.get("device") or ""
    if dev.startswith("/"):
        paths.append(dev)
    for opt in (opts.get("o") or "").split(","):
        _k, _, val = opt.partition("=")
        paths += [p for p in val.split(":") if p.startswith("/")]
    for p in paths:
        _block_refusal(ctx, p, what)
        _path_refusal(ctx, p, what, socket_ok=False)


def _block_refusal(ctx: Ctx, path: str, what: str) -> None:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return
    if stat.S_ISBLK(st.st_mode):
        raise ctx.refuse("devices.block", f"{what} {path} is a block device")
    if stat.S_ISDIR(st.st_mode) and what.startswith("--device"):
        # dockerd adds every device below a directory given to --device
        for root, _dirs, files in os.walk(real):
            for name in files:
                try:
                    if stat.S_ISBLK(os.lstat(os.path.join(root, name)).st_mode):
                        raise ctx.refuse("devices.block",
                                         f"{what} {path} holds block device {os.path.join(root, name)}")
                except OSError:
                    continue


def _check_mounts(ctx: Ctx, hc: gojson.StructVal, socket_ok: bool) -> None:
    for spec in (hc.get("Binds").items if hc.get("Binds") else []):
        src, kind = parse_bind(spec)
        if kind == "bind":
            _path_refusal(ctx, src, "bind mount of", socket_ok)
        elif kind == "volume":
            _named_volume(ctx, src)
    for m in (hc.get("Mounts").items if hc.get("Mounts") else []):
        mtype = (m.get("Type") or "").lower()
        src = m.get("Source") or ""
        if mtype == "bind":
            _path_refusal(ctx, src, "bind mount (--mount) of", socket_ok)
        elif mtype == "volume":
            vo = m.get("VolumeOptions")
            dc = vo.get("DriverConfig") if vo is not None else None
            if dc is not None and dc.get("Options"):
                _driver_opts_refusal(ctx, dc.get("Options"), f"volume {src or '(anonymous)'} with driver option")
            if src:
                _named_volume(ctx, src)
        elif mtype not in ("tmpfs", "npipe", ""):
            # an unknown type is an error in dockerd; refuse rather than guess what it mounts
            raise ctx.refuse("mounts", f"mount type {m.get('Type')!r} is not known to the gate", 400)


def _named_volume(ctx: Ctx, name: str) -> None:
    """A volume that already exists (made before the gate, or by a plugin) may bind a host path."""
    vol = ctx.inspect("volumes", name)
    if vol and isinstance(vol.get("Options"), dict):
        _driver_opts_refusal(ctx, vol["Options"], f"volume {name} with driver option")


def _ns_target(ctx: Ctx, key: str, ns: str, mode: str) -> None:
    """A namespace shared with another container ("container:<ref>")."""
    other = ctx.inspect("containers", mode.split(":", 1)[1])
    if other is None:
        return                                  # dockerd answers "no such container"
    if _holds_socket(other):
        raise ctx.refuse(f"namespaces.{ns}", f"{key}={mode}: that container holds the engine socket")
    theirs = ((other.get("HostConfig") or {}).get(key if key != "networkmode" else "NetworkMode") or "")
    if theirs.lower() == "host":
        raise ctx.refuse(f"namespaces.{ns}", f"{key}={mode}: that container uses the host's {ns} namespace")


def _check_namespaces(ctx: Ctx, hc: gojson.StructVal) -> None:
    for key, ns in NAMESPACES:
        mode = (hc.get(key) or "").strip()
        if mode.lower() == "host":
            raise ctx.refuse(f"namespaces.{ns}", f"{key}=host (the host's {ns} namespace) refused")
        if mode.lower().startswith("container:"):
            _ns_target(ctx, key, ns, mode)
    net = (hc.get("NetworkMode") or "").strip()
    if net and net.lower() not in ("default", "bridge", "none", "host") and not net.lower().startswith("container:"):
        # a network name or ID: the host network can be named by its ID
        n = ctx.inspect("networks", net)
        if n and (n.get("Driver") == "host" or n.get("Name") == "host"):
            raise ctx.refuse("namespaces.network", f"NetworkMode={net} is the host network")


def _check_devices(ctx: Ctx, hc: gojson.StructVal) -> None:
    for d in (hc.get("Devices").items if hc.get("Devices") else []):
        p = d.get("PathOnHost") or ""
        if p:
            _block_refusal(ctx, p, "--device")


def _check_volumes_from(ctx: Ctx, hc: gojson.StructVal, socket_ok: bool) -> None:
    for ref in (hc.get("VolumesFrom").items if hc.get("VolumesFrom") else []):
        name = ref.rsplit(":", 1)[0] if ref.endswith((":ro", ":rw")) else ref
        other = ctx.inspect("containers", name)
        if other is None:
            continue
        if _holds_socket(other) and not socket_ok:
            raise ctx.refuse("volumes_from", f"--volumes-from {ref}: that container holds the engine socket")
        for m in other.get("Mounts") or []:
            src = m.get("Source") or ""
            if m.get("Type") == "bind" and src.startswith("/"):
                _path_refusal(ctx, src, f"--volumes-from {ref}: its bind mount of", socket_ok, "volumes_from: ")


def _create(ctx: Ctx) -> Decision:
    cc = gojson.container_create(ctx.req.body)
    hc = cc.host_config if cc.host_config is not None else gojson.StructVal()
    image_ref = cc.config.get("Image") or ""
    socket_ok = False
    entry = None
    if ctx.policy.gate_socket_images and image_ref and _wants_socket(hc):
        image = ctx.inspect("images", image_ref)
        if image is None:
            # as dockerd would answer: the CLI pulls the image and retries the create
            return refuse(f"No such image: {image_ref}", 404)
        entry = _image_entry(ctx, image)
        if entry is not None:
            socket_ok = True
            # pin the image checked: a `docker tag` between here and dockerd changes nothing
            cc.config.fields["Image"] = image["Id"]
    _check_namespaces(ctx, hc)
    _check_mounts(ctx, hc, socket_ok)
    _check_devices(ctx, hc)
    _check_volumes_from(ctx, hc, socket_ok)
    hc.fields["Runtime"] = ctx.policy.gate_runtime        # whatever --runtime said
    cc.host_config = hc
    return allow(cc.body())


def _wants_socket(hc: gojson.StructVal) -> bool:
    """Whether the create names an engine socket (so the image must be resolved)."""
    srcs = [parse_bind(b)[0] for b in (hc.get("Binds").items if hc.get("Binds") else [])]
    srcs += [m.get("Source") for m in (hc.get("Mounts").items if hc.get("Mounts") else [])]
    pub = _public_sockets()
    return any(s and any(f in pub for f in path_forms(s)) for s in srcs) or bool(hc.get("VolumesFrom"))


# --- start, restart, exec ---------------------------------------------------------------------

def _runtime_of(ctx: Ctx, ref: str, verb: str) -> None:
    c = ctx.inspect("containers", ref)
    if c is None:
        return                                   # dockerd answers 404
    rt = (c.get("HostConfig") or {}).get("Runtime") or ""
    if rt != ctx.policy.gate_runtime:
        raise ctx.refuse("runtime", f"{verb} container {ref}: it runs on runtime {rt or '(default)'}, "
                                    f"not {ctx.policy.gate_runtime} (made before the gate; recreate it)")


_TRIVIAL_START_BODIES = (b"", b"{}", b"null")


def _start(ctx: Ctx, ref: str) -> Decision:
    body = bytes(ctx.req.body or b"").strip(b" \t\r\n")
    if body not in _TRIVIAL_START_BODIES:
        raise ctx.refuse("start.hostconfig", f"a HostConfig in the body of POST /containers/{ref}/start "
                                             f"(API < 1.24 form) refused; set it at create")
    _runtime_of(ctx, ref, "start")
    return allow()


def _exec(ctx: Ctx, ref: str) -> Decision:
    _runtime_of(ctx, ref, "exec in")
    body = ctx.req.body or b""
    if not body.strip():
        return allow()
    return allow(gojson.encode(gojson.EXEC_CREATE, gojson.decode(gojson.EXEC_CREATE, body)))


# --- volumes ------------------------------------------------------------------------------------

def _volume_create(ctx: Ctx) -> Decision:
    v = gojson.decode(gojson.VOLUME_CREATE, ctx.req.body or b"{}") or gojson.StructVal()
    opts = v.get("DriverOpts") or {}
    _driver_opts_refusal(ctx, opts, f"volume {v.get('Name') or '(anonymous)'} with driver option")
    return allow(gojson.encode(gojson.VOLUME_CREATE, v))


# --- builds -------------------------------------------------------------------------------------

def _build(ctx: Ctx) -> Decision:
    q = ctx.req.query
    for mode in q.get("networkmode", []):
        m = mode.strip()
        if m.lower() == "host":
            raise ctx.refuse("build.network", "build with networkmode=host refused")
        if m.lower().startswith("container:"):
            _ns_target(ctx, "networkmode", "network", m)
    if "2" in [v.strip() for v in q.get("version", [])]:
        problem = buildkit_runc_problem(ctx)
        if problem:
            raise ctx.refuse("build.runtime", problem)
    else:
        status, info = ctx.get("/info")
        default = (info or {}).get("DefaultRuntime") if isinstance(info, dict) else None
        if default != ctx.policy.gate_runtime:
            raise ctx.refuse("build.runtime", f"a classic build runs its RUN steps on dockerd's default runtime "
                                              f"({default or 'unknown'}), not {ctx.policy.gate_runtime}; set "
                                              f'"default-runtime": "{ctx.policy.gate_runtime}" in daemon.json')
    return allow()


_BK_CACHE: dict[str, tuple[float, str | None]] = {}


def buildkit_runc_problem(ctx: Ctx) -> str | None:
    """dockerd 20.10's BuildKit runs the `runc` its PATH finds (builder-next/executor_unix.go:
    runcexecutor CommandCandidates ["runc"]), not a configured runtime: a BuildKit build is
    isolated only when that `runc` is isobox-runc (or a script exec'ing it)."""
    now = time.monotonic()
    hit = _BK_CACHE.get(ENGINE_SOCKET)
    if hit and now - hit[0] < 10:
        return hit[1]
    problem = _buildkit_runc_problem(ctx)
    _BK_CACHE[ENGINE_SOCKET] = (now, problem)
    return problem


def engine_path_var() -> str | None:
    """dockerd's PATH (from /proc/<pid>/environ), where BuildKit looks for runc."""
    pid = engine_pid()
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
    except OSError:
        return None
    return env.get(b"PATH", b"").decode(errors="replace")


def _lookpath(name: str, path_var: str) -> str | None:
    for d in path_var.split(":"):
        p = os.path.join(d or ".", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _buildkit_runc_problem(ctx: Ctx) -> str | None:
    _status, info = ctx.get("/info")
    runtimes = (info or {}).get("Runtimes") if isinstance(info, dict) else None
    want = ((runtimes or {}).get(ctx.policy.gate_runtime) or {}).get("path")
    if not want:
        return f"dockerd has no runtime {ctx.policy.gate_runtime} (daemon.json \"runtimes\")"
    path_var = engine_path_var()
    if path_var is None:
        return "BuildKit runs the runc on dockerd's PATH; the gate cannot read dockerd's environment to check it"
    runc = _lookpath("runc", path_var)
    want_real = os.path.realpath(want if os.path.isabs(want) else (_lookpath(want, path_var) or want))
    if runc and _is_isobox_runc(runc, want_real):
        return None
    return (f"BuildKit RUN steps use the runc on dockerd's PATH ({runc or 'none'}), not {want_real}; "
            f"put an isobox-runc `runc` first on dockerd's PATH or build with DOCKER_BUILDKIT=0")


def _is_isobox_runc(runc: str, want_real: str) -> bool:
    if os.path.realpath(runc) == want_real:
        return True
    try:
        with open(runc, "rb") as f:
            head = f.read(4097)
    except OSError:
        return False
    # a root-owned wrapper script `exec <isobox-runc> "$@"` counts
    st = os.stat(runc)
    return (len(head) <= 4096 and head.startswith(b"#!") and st.st_uid == 0 and not st.st_mode & 0o022
            and re.search(rb"^\s*exec\s+" + re.escape(want_real.encode()) + rb"\s", head, re.M) is not None)


# --- swarm, plugins --------------------------------------------------------------------------------

def _swarm(ctx: Ctx) -> Decision:
    if not ctx.policy.gate_allow_swarm:
        raise ctx.refuse("gate.allow_swarm", f"{ctx.req.method} {ctx.req.path} (swarm) refused")
    if ctx.req.path.startswith("/services/"):
        spec = gojson.decode(gojson.SERVICE_SPEC, ctx.req.body or b"{}") or gojson.StructVal()
        cs = (spec.get("TaskTemplate") or gojson.StructVal()).get("ContainerSpec")
        if cs is not None:
            for m in (cs.get("Mounts").items if cs.get("Mounts") else []):
                if (m.get("Type") or "").lower() == "bind":
                    _path_refusal(ctx, m.get("Source") or "", "service bind mount of", False)
                vo = m.get("VolumeOptions")
                dc = vo.get("DriverConfig") if vo is not None else None
                if dc is not None and dc.get("Options"):
                    _driver_opts_refusal(ctx, dc.get("Options"), "service volume with driver option")
        return allow(gojson.encode(gojson.SERVICE_SPEC, spec))
    return allow()


def _plugins(ctx: Ctx) -> Decision:
    if not ctx.policy.gate_allow_plugins:
        raise ctx.refuse("gate.allow_plugins", f"{ctx.req.method} {ctx.req.path} (managed plugin) refused")
    return allow()


def _grpc(ctx: Ctx) -> Decision:
    raise ctx.refuse("build.grpc", "POST /grpc (BuildKit's gRPC API, e.g. buildx) refused: its entitlements and "
                                   "options cannot be checked; use `docker build`")


# --- requests from inside allowed containers ---------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _ns_ident(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
        return st.st_dev, st.st_ino
    except OSError:
        return None


def peer_container(ctx: Ctx) -> dict | None:
    """The container the connecting process runs in: a docker ID in its cgroup path, confirmed
    by the container's init sharing the peer's PID namespace."""
    peer = ctx.req.peer
    if peer is None or peer.pid <= 0:
        return None
    try:
        with open(f"/proc/{peer.pid}/cgroup") as f:
            cg = f.read()
    except OSError:
        return None
    mine = _ns_ident(peer.pid)
    if mine is None or mine == _ns_ident(os.getpid()):
        return None                                    # in the host's PID namespace: not a container
    for cid in dict.fromkeys(_HEX64.findall(cg)):
        c = ctx.inspect("containers", cid)
        pid = ((c or {}).get("State") or {}).get("Pid") or 0
        if c and pid and _ns_ident(pid) == mine:
            return c
    return None


def api_allowed(patterns: tuple[str, ...], method: str, path: str) -> bool:
    if path == "/_ping" and method in ("GET", "HEAD"):
        return True                                    # every client pings first
    segs = path.strip("/").split("/")
    for pat in patterns:
        pm, _, pp = pat.partition(" ")
        if pm != "*" and pm != method:
            continue
        psegs = pp.strip("/").split("/")
        if psegs and psegs[-1] == "**":
            if len(segs) >= len(psegs) - 1 and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segs, psegs[:-1])):
                return True
        elif len(psegs) == len(segs) and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segs, psegs)):
            return True
    return False


def _peer_limit(ctx: Ctx) -> None:
    if not ctx.policy.gate_socket_images or ctx.req.peer is None:
        return
    c = peer_container(ctx)
    if c is None:
        return
    image = ctx.inspect("images", c.get("Image") or "") or {"Id": c.get("Image")}
    entry = _image_entry(ctx, image)
    if entry is None or entry.api is None:
        return
    if not api_allowed(entry.api, ctx.req.method, ctx.req.path):
        raise ctx.refuse("gate.socket_images", f"{ctx.req.method} {ctx.req.path} from container "
                                               f"{(c.get('Id') or '')[:12]} (image {entry.image}) is not in its api list")


# --- routing ------------------------------------------------------------------------------------------

_ROUTES: list[tuple[str, re.Pattern, Callable[..., Decision], bool]] = []


def _route(method: str, pattern: str, fn: Callable[..., Decision], body: bool) -> None:
    _ROUTES.append((method, re.compile(pattern), fn, body))


_route("POST", r"/containers/create", _create, True)
_route("POST", rf"/containers/({_ID})/start", _start, True)
_route("POST", rf"/containers/({_ID})/restart", lambda ctx, ref: (_runtime_of(ctx, ref, "restart"), allow())[1], False)
_route("POST", rf"/containers/({_ID})/unpause", lambda ctx, ref: (_runtime_of(ctx, ref, "unpause"), allow())[1], False)
_route("POST", rf"/containers/({_ID})/exec", _exec, True)
_route("POST", r"/volumes/create", _volume_create, True)
_route("POST", r"/build", _build, False)
_route("POST", r"/grpc", _grpc, False)
_route("POST", r"/services/create", _swarm, True)
_route("POST", rf"/services/{_ID}/update", _swarm, True)
_route("POST", r"/swarm/(?:init|join|update)", _swarm, False)
_route("POST", r"/plugins/(?:pull|create)", _plugins, False)
_route("POST", r"/plugins/.+/(?:enable|upgrade|set)", _plugins, False)


def _match(method: str, path: str):
    for m, pat, fn, body in _ROUTES:
        if m == method:
            hit = pat.fullmatch(path)
            if hit:
                return fn, hit.groups(), body
    return None


def needs_body(method: str, path: str) -> bool:
    """Whether check() must see this request's whole body."""
    hit = _match(method.upper(), path)
    return bool(hit and hit[2])


def load_policy() -> Policy:
    return model.load(POLICY_PATH)


def check(req: Request) -> Decision:
    """The decision for one request (every request: the per-container API lists apply to all)."""
    try:
        policy = load_policy()
    except IsoboxError as e:
        return refuse(f"isobox gate: policy: {e}", 500)
    ctx = Ctx(req, policy)
    try:
        _peer_limit(ctx)
        hit = _match(req.method.upper(), req.path)
        if hit is None:
            return allow()
        fn, args, _body = hit
        return fn(ctx, *args)
    except _Refused as r:
        return r.decision
    except gojson.GoJSONError as e:
        return refuse(ctx.msg("request", f"body of {req.method} {req.path} refused: {e}"), 400)
    except EngineError as e:
        return refuse(ctx.msg("engine", str(e)), 502)
