"""The per-container state directory: <root>/<id>/{state.json, config.json, start.fifo}.

state.json is written atomically (temp file + rename) so a crash never leaves half a
record; the container's status is derived from its init process and the start FIFO, the
same way runc derives it, rather than stored.
"""
from __future__ import annotations

from isobox import jsonfast as json  # json without its import cost (see jsonfast)
import os
import time

from isobox.errors import IsoboxError
from isobox.ids.procinfo import proc_starttime
from isobox.spec.config import key

DEFAULT_ROOT = "/run/isobox"
OCI_VERSION = "1.2.0"


class ContainerState:
    """What a container's state.json records.

    A plain class, not a dataclass: `state`, `start` and `kill` run once per engine call,
    and importing dataclasses (it pulls in inspect) costs about 20 ms of start-up here."""
    __slots__ = ("id", "bundle", "rootfs", "pid", "starttime", "created", "owner", "annotations", "uid_base",
                 "gid_base", "id_size", "cgroup_path", "rootfs_method", "shares_userns_of", "freezer")

    def __init__(self, id: str, bundle: str, rootfs: str, pid: int = 0, starttime: int = 0, created: str = "",
                 owner: str = "", annotations: dict | None = None, uid_base: int = 0, gid_base: int = 0,
                 id_size: int = 65536, cgroup_path: str = "", rootfs_method: str = "", shares_userns_of: str = "",
                 freezer: str = ""):
        self.id = id
        self.bundle = bundle
        self.rootfs = rootfs
        self.pid = pid
        self.starttime = starttime
        self.created = created
        self.owner = owner
        self.annotations = annotations or {}
        self.uid_base = uid_base
        self.gid_base = gid_base
        self.id_size = id_size
        self.cgroup_path = cgroup_path
        self.rootfs_method = rootfs_method
        self.shares_userns_of = shares_userns_of
        self.freezer = freezer

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


def now_rfc3339() -> str:
    t = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t // 10**9)) + f".{t % 10**9:09d}Z"


class StateStore:
    def __init__(self, root: str = DEFAULT_ROOT):
        self.root = os.path.abspath(root)

    def dir(self, cid: str) -> str:
        return os.path.join(self.root, key(cid))

    def fifo(self, cid: str) -> str:
        return os.path.join(self.dir(cid), "start.fifo")

    def exists(self, cid: str) -> bool:
        return os.path.exists(os.path.join(self.dir(cid), "state.json"))

    def reserve(self, cid: str) -> str:
        """Create the state dir; mkdir is the lock that makes duplicate ids fail. Root's only
        (0700, files 0600): it names the container, its pid, bundle and ID range, and nothing
        but the runtime, as root, reads it (the init opens its start FIFO before it changes
        credentials)."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        d = self.dir(cid)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            raise IsoboxError(f"container with id {cid!r} already exists") from None
        return d

    def save(self, st: ContainerState) -> None:
        d = self.dir(st.id)
        tmp = os.path.join(d, ".state.json.tmp")
        with _private(tmp) as f:
            json.dump(st.to_dict(), f)
        os.rename(tmp, os.path.join(d, "state.json"))

    def load(self, cid: str) -> ContainerState:
        try:
            with open(os.path.join(self.dir(cid), "state.json")) as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            raise IsoboxError("container does not exist") from None
        except (OSError, ValueError) as e:
            raise IsoboxError(f"container {cid}: unreadable state ({e})") from None
        return ContainerState(**data)

    def ids(self) -> list[str]:
        """Directory keys of the stored containers (the id itself unless it is very long)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if os.path.exists(os.path.join(self.root, n, "state.json")))

    def save_config(self, cid: str, spec: dict) -> None:
        with _private(os.path.join(self.dir(cid), "config.json")) as f:
            json.dump(spec, f)

    def load_config(self, cid: str) -> dict:
        with open(os.path.join(self.dir(cid), "config.json")) as f:
            return json.load(f)

    def remove(self, cid: str) -> None:
        d = self.dir(cid)
        for name in ("start.fifo", "config.json", ".state.json.tmp", "state.json"):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass


def _private(path: str):
    """path opened for writing (truncated), created 0600: umask 0 must not open it to others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)          # a file left by an older version keeps its mode otherwise
    except OSError:
        os.close(fd)
        raise
    return open(fd, "w")


def alive(st: ContainerState) -> bool:
    return st.pid > 0 and proc_starttime(st.pid) == st.starttime


def cgroup_of(st: ContainerState):
    """The container's cgroup across every hierarchy (imported only by those who need it)."""
    from isobox.cgroups.layout import detect
    from isobox.cgroups.manager import ContainerCgroup
    return ContainerCgroup(detect(), st.cgroup_path)


def status(store: StateStore, st: ContainerState) -> str:
    if not alive(st):
        return "stopped"
    if os.path.exists(store.fifo(st.id)):
        return "created"
    if _frozen(st):
        return "paused"
    return "running"


def _frozen(st: ContainerState) -> bool:
    if not st.freezer:
        return False
    try:
        with open(st.freezer) as f:
            text = f.read()
    except OSError:
        return False
    return text.strip() == "FROZEN" or "frozen 1" in text.splitlines()


def oci_state(store: StateStore, st: ContainerState) -> dict:
    """The OCI state object, with the keys and order runc prints."""
    s = status(store, st)
    return {
        "ociVersion": OCI_VERSION,
        "id": st.id,
        "pid": st.pid if s != "stopped" else 0,
        "status": s,
        "bundle": st.bundle,
        "rootfs": st.rootfs,
        "created": st.created,
        **({"annotations": st.annotations} if st.annotations else {}),
        "owner": st.owner,
    }
