"""What isobox runs: the engine's spec after rewrite.py made every isobox decision.

The init sequence reads only this, never the raw spec.
"""
from __future__ import annotations

from isobox.plain import field, record  # not dataclasses: see isobox.plain

from isobox.spec.mountopts import MountOptions


@record
class Mount:
    destination: str
    type: str
    source: str
    options: MountOptions


@record
class Device:
    path: str            # inside the container
    host_path: str       # bound from the host (mknod cannot work in a user namespace)


@record
class Rlimit:
    resource: int
    soft: int
    hard: int


@record
class Process:
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    additional_gids: list[int]
    umask: int | None
    caps_bounding: int
    caps_effective: int
    caps_permitted: int
    caps_inheritable: int
    caps_ambient: int
    no_new_privileges: bool
    rlimits: list[Rlimit]
    oom_score_adj: int | None
    terminal: bool = False


@record
class Plan:
    id: str
    bundle: str
    rootfs: str                      # host path of the rootfs directory
    readonly_root: bool
    new_namespaces: int              # CLONE_NEW* flags to create
    join_namespaces: dict[str, str]  # type -> path, joined before the new ones are made
    join_user: str                   # path of an isobox container's user namespace, or ""
    shares_userns_of: str            # that container's id
    uid_base: int
    gid_base: int
    id_size: int
    explicit_mapping: bool           # the spec named the range (claimed) rather than the pool
    mounts: list[Mount]
    masked_paths: list[str]
    readonly_paths: list[str]
    devices: list[Device]
    hostname: str
    domainname: str
    sysctl: dict[str, str]
    cgroups_path: str
    resources: dict
    process: Process
    annotations: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # decisions worth a log line
    policy: object = None                            # isobox.policy.model.Policy in force for this create
    hooks: dict = field(default_factory=dict)        # kind -> [{path, args, env, timeout}] (lifecycle/hooks.py)
    seccomp: object = None                           # isobox.seccomp.Seccomp (compiled filter) or None
    seccomp_trap_socket: str = ""                    # isoboxd's socket for the trap's listener fd; "" = trap off
    emulation: list = field(default_factory=list)    # (host source, container path): isoboxd's files,
                                                     # set by create once the container is registered
    emulation_prefetch: object = None                # mounts.emulation.Prefetch (warm worker only)

