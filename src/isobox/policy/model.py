"""The runtime's own policy: /etc/isobox/policy.toml, read by isobox-runc on every create and exec.

One model, shared by isobox-runc (where the rules hold) and by the Docker API gate (which
shows them earlier). Read on every runtime call, so this module imports nothing heavier
than tomllib.

    [mounts]
    deny = [...]                     # bind sources refused (replaces the built-in list)
    deny_extra = [...]               # added to deny
    allow_below = [...]              # engine-managed subtrees below a denied path ("*" = one component)
    writable_idmapped_binds = true   # false: every idmapped bind is forced read-only

    [devices]
    allow = [...]                    # host device nodes a spec (privileged or not) may receive

    [sysctl]
    max_push = false                 # true: a container raising fs.file-max, nf_conntrack_max ... above
                                     # the host's value raises the host's too (Sysbox's max-push)

    [gate]                           # the Docker API gate (isobox gate); the runtime ignores it
    runtime = "isobox"               # dockerd's name for isobox-runc: every container is made to use it
    allow_swarm = false              # true: swarm init/join and services pass
    allow_plugins = false            # true: managed plugins may be installed, upgraded and enabled
    socket_images = [                # images that may bind-mount the engine socket, by what dockerd
        "sha256:<image id>",         # resolved (image ID, or repo@sha256:<manifest digest>): never a tag
        { image = "repo@sha256:<digest>", api = ["GET /containers/json", "POST /containers/*/start"] },
    ]                                # api: the only calls requests from inside such a container may make

Path rules for a bind source (its canonical path, symlinks resolved by the kernel):
refused if it IS a denied path, lies BELOW one (unless inside an allow_below subtree), or
is an ANCESTOR of one (binding /var exposes /var/lib/docker). "/" is denied as itself only:
everything lies below it. An absent file means the built-in defaults; a file not owned by
root, or writable by group or others, is refused.
"""
from __future__ import annotations

import os
import stat
from isobox.plain import record  # not dataclasses: see isobox.plain

from isobox.errors import IsoboxError

DEFAULT_PATH = "/etc/isobox/policy.toml"
ENV = "ISOBOX_POLICY"   # tests only; the file it names must still be root-owned and not g/o-writable

ENGINE_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                  "/run/podman/podman.sock")
ENGINE_DATA = ("/var/lib/docker", "/var/lib/containerd", "/var/lib/containers", "/run/containerd", "/run/docker")
HOST_SYSTEM = ("/", "/proc", "/sys", "/dev", "/boot", "/etc", "/root", "/var/lib/isobox", "/etc/isobox",
               "/run/isobox", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/opt/isobox")
DEFAULT_DENY = ENGINE_SOCKETS + ENGINE_DATA + HOST_SYSTEM

# What the engines themselves bind from below their data roots (one container's own files,
# named volumes); without these no `docker run` would pass.
DEFAULT_ALLOW_BELOW = (
    "/var/lib/docker/containers/*",                                   # resolv.conf, hosts, hostname, mounts/shm
    "/var/lib/docker/volumes/*/_data",
    "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/*",       # CRI: hosts, resolv.conf, hostname
    "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/*",           # CRI: shm
    "/var/lib/containers/storage/overlay-containers/*/userdata",        # podman
    "/run/containers/storage/overlay-containers/*/userdata",
    "/var/lib/containers/storage/volumes/*/_data",
)

# The init binaries engines bind read-only themselves (`docker run --init`: docker-init, which
# Debian links to tini-static; podman's catatonit): allowed below /usr only as read-only file binds.
ENGINE_INIT_BINARIES = ("/usr/bin/docker-init", "/usr/bin/tini-static", "/usr/libexec/docker/docker-init",
                        "/usr/bin/catatonit", "/usr/libexec/podman/catatonit")

# Host nodes a spec may receive. OCI's six (null zero full random urandom tty) are always given.
DEFAULT_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
                   "/dev/fuse", "/dev/net/tun")

_KEYS = {
    "mounts": {"deny": "paths", "deny_extra": "paths", "allow_below": "paths", "writable_idmapped_binds": "bool"},
    "devices": {"allow": "paths"},
    "sysctl": {"max_push": "bool"},
    "gate": {"runtime": "name", "allow_swarm": "bool", "allow_plugins": "bool", "socket_images": "images"},
}

# An image is named by what dockerd resolved it to, never by a tag (`docker tag` forges tags):
# its ID (the config digest) or a repo digest (the registry manifest's digest, content-addressed).
# (Patterns compiled only when a [gate] key is read: isobox-runc reads this file on every call.)
_IMAGE_REF = r"(?:[a-z0-9][a-z0-9._/:-]*@)?sha256:[0-9a-f]{64}"
# One API call: "METHOD /path" ("*" = any method; in the path "*" = one component, a final
# "**" = anything below), the path without its /v1.xx prefix.
_API_CALL = r"(?:\*|GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS) /[^\s]*"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


@record(frozen=True)
class SocketImage:
    """An image whose containers may bind-mount the engine socket."""
    image: str                                # sha256:<id> or repo@sha256:<digest>
    api: tuple[str, ...] | None = None        # None: any call; else only these from inside its containers


def _norm(p: str) -> str:
    p = os.path.normpath(p)
    return "/" if p.startswith("//") and p.strip("/") == "" else ("/" + p.lstrip("/"))


def _below(path: str, top: str) -> bool:
    """path lies strictly below top (both normalized)."""
    return top != path and path.startswith(top.rstrip("/") + "/")


def _match_prefix(path: str, pattern: str) -> bool:
    """path is pattern (or below it), '*' matching exactly one component."""
    pp, pat = path.strip("/").split("/"), pattern.strip("/").split("/")
    if len(pp) < len(pat):
        return False
    for a, b in zip(pp, pat):
        if b != "*" and a != b:
            return False
    return True


@record(frozen=True)
class Policy:
    path: str                                 # the file the rules come from (named in refusals)
    deny: tuple[str, ...] = DEFAULT_DENY
    deny_extra: tuple[str, ...] = ()
    allow_below: tuple[str, ...] = DEFAULT_ALLOW_BELOW
    writable_idmapped_binds: bool = True
    devices: tuple[str, ...] = DEFAULT_DEVICES
    sysctl_max_push: bool = False             # isoboxd may raise a host-global sysctl a container raised
    gate_runtime: str = "isobox"              # the dockerd runtime name every container is given
    gate_allow_swarm: bool = False
    gate_allow_plugins: bool = False
    gate_socket_images: tuple[SocketImage, ...] = ()

    def denied(self) -> list[tuple[str, str]]:
        """(rule key, path) for every denied path."""
        return [("mounts.deny", p) for p in self.deny] + [("mounts.deny_extra", p) for p in self.deny_extra]

    def allowed_below(self, path: str) -> bool:
        return any(_match_prefix(path, pat) for pat in self.allow_below)

    def path_rule(self, path: str, below: bool = True) -> str | None:
        """The rule refusing a bind of canonical path `path`, or None. below=False checks only
        "is" and "ancestor" (for a rootfs, which engines keep below their data roots)."""
        path = _norm(path)
        candidates = []
        for rule, d in self.denied():
            forms = {d}
            try:
                forms.add(os.path.realpath(d))     # /var/run/docker.sock -> /run/docker.sock
            except OSError:
                pass
            candidates.append((rule, d, forms))
        for rule, d, forms in candidates:
            if path in forms:
                return f"{rule}: {d}"
        for rule, d, forms in candidates:
            if any(_below(f, path) for f in forms):
                return f"{rule}: {d}; {path} contains it"
        if below and not self.allowed_below(path):
            for rule, d, forms in candidates:
                if d != "/" and any(_below(path, f) for f in forms if f != "/"):
                    return f"{rule}: {d}"
        return None

    def refusal(self, source: str, rule: str, canonical: str | None = None) -> IsoboxError:
        via = f" (resolves to {canonical})" if canonical and _norm(canonical) != _norm(source) else ""
        return IsoboxError(f"bind mount of {source}{via} refused by {self.path} ({rule})")

    def device_map(self) -> dict[tuple[str, int, int], str]:
        """(type 'c'|'b', major, minor) -> host path, for every allowed node that exists."""
        out: dict[tuple[str, int, int], str] = {}
        for p in self.devices:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode):
                t = "c"
            elif stat.S_ISBLK(st.st_mode):
                t = "b"
            else:
                continue
            out.setdefault((t, os.major(st.st_rdev), os.minor(st.st_rdev)), p)
        return out


def policy_path() -> str:
    return os.environ.get(ENV) or DEFAULT_PATH


def parse(text: str, path: str = DEFAULT_PATH) -> Policy:
    return _from_data(_toml(text, path), path)


def _toml(text: str, path: str) -> dict:
    import tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise IsoboxError(f"policy {path}: {e}") from None


# tomllib (with typing) costs ~11 ms to import on every create and exec; the parsed file is
# kept as JSON in a root-only directory and reused while the file's text is unchanged.
CACHE_DIR = "/run/isobox/.policy-cache"


def _cached_toml(text: str, path: str) -> dict:
    from isobox import jsonfast as json  # json without its import cost (see jsonfast)
    cache = os.path.join(CACHE_DIR, path.replace("%", "%25").replace("/", "%2F"))
    try:
        with open(cache) as f:
            entry = json.load(f)
        if entry.get("text") == text and isinstance(entry.get("data"), dict):
            return entry["data"]
    except (OSError, ValueError):
        pass
    data = _toml(text, path)
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"text": text, "data": data}, f)
        os.rename(tmp, cache)
    except (OSError, TypeError, ValueError):
        pass                     # no cache: parse again next time
    return data


def _from_data(data: dict, path: str) -> Policy:
    vals: dict = {}
    for table, body in data.items():
        if table not in _KEYS:
            raise IsoboxError(f"policy {path}: unknown table [{table}] (known: {', '.join(_KEYS)})")
        if not isinstance(body, dict):
            raise IsoboxError(f"policy {path}: {table} must be a table ([{table}])")
        for k, v in body.items():
            kind = _KEYS[table].get(k)
            name = f"{table}.{k}"
            if kind is None:
                raise IsoboxError(f"policy {path}: unknown key {name} (known in [{table}]: "
                                  f"{', '.join(_KEYS[table])})")
            if kind == "bool":
                if not isinstance(v, bool):
                    raise IsoboxError(f"policy {path}: {name} must be true or false")
                vals[name] = v
            elif kind == "name":
                import re
                if not isinstance(v, str) or not re.fullmatch(_NAME, v):
                    raise IsoboxError(f"policy {path}: {name} must be a runtime name (letters, digits, . _ -)")
                vals[name] = v
            elif kind == "images":
                vals[name] = _socket_images(v, name, path)
            else:
                if not isinstance(v, list) or not all(isinstance(x, str) and x.startswith("/") for x in v):
                    raise IsoboxError(f"policy {path}: {name} must be a list of absolute paths")
                vals[name] = tuple(dict.fromkeys(_norm(x) for x in v))
    return Policy(
        path=path, deny=vals.get("mounts.deny", DEFAULT_DENY), deny_extra=vals.get("mounts.deny_extra", ()),
        allow_below=vals.get("mounts.allow_below", DEFAULT_ALLOW_BELOW),
        writable_idmapped_binds=vals.get("mounts.writable_idmapped_binds", True),
        devices=vals.get("devices.allow", DEFAULT_DEVICES), sysctl_max_push=vals.get("sysctl.max_push", False),
        gate_runtime=vals.get("gate.runtime", "isobox"), gate_allow_swarm=vals.get("gate.allow_swarm", False),
        gate_allow_plugins=vals.get("gate.allow_plugins", False),
        gate_socket_images=vals.get("gate.socket_images", ()))


def _socket_images(v, name: str, path: str) -> tuple[SocketImage, ...]:
    """gate.socket_images: strings (any API call) or tables {image = ..., api = [...]}."""
    import re
    if not isinstance(v, list):
        raise IsoboxError(f"policy {path}: {name} must be a list of image IDs or digests")
    out: list[SocketImage] = []
    for item in v:
        api = None
        if isinstance(item, dict):
            unknown = set(item) - {"image", "api"}
            if unknown:
                raise IsoboxError(f"policy {path}: unknown key {name}.{sorted(unknown)[0]} (known: image, api)")
            ref, api = item.get("image"), item.get("api")
            if api is not None:
                if not isinstance(api, list) or not all(isinstance(a, str) and re.fullmatch(_API_CALL, a) for a in api):
                    raise IsoboxError(f'policy {path}: {name}.api must be a list of "METHOD /path" calls '
                                      f'(e.g. "GET /containers/json", "POST /containers/*/start")')
                api = tuple(api)
        else:
            ref = item
        if not isinstance(ref, str) or not re.fullmatch(_IMAGE_REF, ref):
            raise IsoboxError(f"policy {path}: {name}: {ref!r} is not an image ID (sha256:<64 hex>) or digest "
                              f"(repo@sha256:<64 hex>); tags are not accepted: `docker tag` can forge them")
        out.append(SocketImage(ref, api))
    return tuple(out)


def load(path: str | None = None) -> Policy:
    """The policy in force: the file (root-owned, not group/world-writable), or the defaults
    when it does not exist."""
    path = path or policy_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        return Policy(path=path)
    except OSError as e:
        raise IsoboxError(f"policy {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise IsoboxError(f"policy {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_uid != 0:
            raise IsoboxError(f"policy {path} is not owned by root (uid {st.st_uid}); refusing it "
                              f"(chown root {path})")
        if st.st_mode & 0o022:
            raise IsoboxError(f"policy {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                              f"refusing it (chmod go-w {path})")
        raw = f.read()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise IsoboxError(f"policy {path}: not UTF-8 text") from None
    return _from_data(_cached_toml(text, path), path)


def _toml_list(items) -> str:
    return "[\n" + "".join(f'    "{x}",\n' for x in items) + "]"


def default_toml() -> str:
    """What `isobox setup` writes when no policy exists."""
    return (
        "# isobox runtime policy: read by isobox-runc on every create and exec (and by the Docker API gate).\n"
        "# Must stay owned by root and not writable by group or others, or isobox-runc refuses it.\n\n"
        "[mounts]\n"
        "# Bind sources refused: the path itself, anything below it (except allow_below), and every\n"
        "# ancestor (binding /var would expose /var/lib/docker). \"/\" means / itself.\n"
        f"deny = {_toml_list(DEFAULT_DENY)}\n"
        "# Your additions (kept apart so upgrades can extend `deny`).\n"
        "deny_extra = []\n"
        "# Engine-managed subtrees below a denied path that engines bind themselves (\"*\" = one component).\n"
        f"allow_below = {_toml_list(DEFAULT_ALLOW_BELOW)}\n"
        "# false: every ID-mapped bind of a host file or directory is made read-only (container root\n"
        "# owns host-root files on an ID-mapped bind, so it could plant setuid-root files there).\n"
        "writable_idmapped_binds = true\n\n"
        "[devices]\n"
        "# Host device nodes a spec (privileged or not) may receive; any other is not passed.\n"
        "# null, zero, full, random, urandom and tty are always given (the OCI default devices).\n"
        f"allow = {_toml_list(DEFAULT_DEVICES)}\n\n"
        "[gate]\n"
        "# The Docker API gate (isobox gate). The dockerd runtime name of isobox-runc: every container\n"
        "# is created with it whatever --runtime says.\n"
        "runtime = \"isobox\"\n"
        "# Swarm (init, join, services) and managed plugins are refused unless allowed here.\n"
        "allow_swarm = false\n"
        "allow_plugins = false\n"
        "# Images that may bind-mount the engine socket, by image ID or repo digest (never a tag), e.g.\n"
        "#   \"sha256:<64 hex>\", or { image = \"repo@sha256:<64 hex>\", api = [\"GET /containers/json\"] }\n"
        "# to limit what requests from inside its containers may call.\n"
        "socket_images = []\n")
