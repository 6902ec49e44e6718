"""The single place where the engine's spec becomes what isobox runs.

Like Sysbox's spec conversion: namespaces (always a new user namespace owning the rest;
never the host's), ID mappings, masks, devices, the cgroup mount and process checks that
the host would otherwise refuse half-way through create. Everything here is decided
before any kernel object exists, so a refusal leaves nothing behind.
"""
from __future__ import annotations

import os
import resource

from isobox.errors import IsoboxError
from isobox.linux import capabilities, syscalls as k
from isobox.spec import mountopts
from isobox.spec.config import key
from isobox.spec.plan import Device, Mount, Plan, Process, Rlimit

RANGE_SIZE = 65536

# OCI namespace type -> (name in /proc/PID/ns, clone flag)
NS_TYPES = {
    "pid": ("pid", k.CLONE_NEWPID), "network": ("net", k.CLONE_NEWNET), "ipc": ("ipc", k.CLONE_NEWIPC),
    "uts": ("uts", k.CLONE_NEWUTS), "mount": ("mnt", k.CLONE_NEWNS), "user": ("user", k.CLONE_NEWUSER),
    "cgroup": ("cgroup", k.CLONE_NEWCGROUP), "time": ("time", k.CLONE_NEWTIME),
}
# absent from the spec means "share the host's": refused, because isobox never does
MUST_BE_PRESENT = ("pid", "network", "ipc", "uts", "mount")

# Masked whatever the engine asked: host identity and kernel addresses (a privileged spec
# from dockerd carries no masks at all).
DEFAULT_MASKED = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/proc/kallsyms", "/proc/sysrq-trigger",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq")

# Character devices every container gets (OCI's defaults). Which host devices a spec may
# add is the policy's [devices] allow list (isobox/policy/model.py).
DEFAULT_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_IPC_SYSCTLS = {"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall", "kernel.shmmax",
                "kernel.shmmni", "kernel.shm_rmid_forced"}
_UTS_SYSCTLS = {"kernel.hostname", "kernel.domainname"}

# Finds the isobox container whose init lives in the namespace (type, dev, ino), if any:
# returns (container id, init pid, uid base, gid base, size).
# (typing is not imported: it costs ~6 ms of start-up on every runtime call)
OwnerLookup = "Callable[[str, int, int], tuple[str, int, int, int, int] | None]"


def _ns_ident(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise IsoboxError(f"namespace path {path!r}: {e.strerror}") from None
    return st.st_dev, st.st_ino


def _host_ns(procname: str) -> set[tuple[int, int]]:
    out = set()
    for who in ("1", "self"):
        try:
            st = os.stat(f"/proc/{who}/ns/{procname}")
            out.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    return out


def _namespaces(linux: dict, find_owner: OwnerLookup) -> tuple[int, dict[str, str], str, str, tuple | None, set[str]]:
    """(new namespace flags, joined paths by type, user namespace to join, the container whose
    namespaces are joined and its ownership record, the joined types no isobox container lives
    in: an engine made them for this container, as containerd's CRI plugin makes a pod's netns)."""
    present: dict[str, str] = {}
    for ns in linux.get("namespaces", []):
        t = ns["type"]
        if t not in NS_TYPES:
            raise IsoboxError(f"unknown namespace type {t!r} in linux.namespaces")
        if t in present:
            raise IsoboxError(f"namespace {t!r} is listed twice in linux.namespaces")
        present[t] = ns.get("path", "") or ""
    for t in MUST_BE_PRESENT:
        if t not in present:
            raise IsoboxError(f"isobox does not share the host's {t} namespace "
                              f"(add {{\"type\": \"{t}\"}} to linux.namespaces)")
    if "time" in present:
        raise IsoboxError("time namespaces are not supported by isobox yet (remove it from linux.namespaces)")
    present.setdefault("user", "")
    present.setdefault("cgroup", "")
    if present["mount"]:
        raise IsoboxError("isobox always creates the container's mount namespace; remove the mount namespace path")

    new_flags = 0
    join: dict[str, str] = {}
    owner = None   # the isobox container whose namespaces are joined
    unowned: set[str] = set()
    for t, path in present.items():
        procname, flag = NS_TYPES[t]
        if not path:
            new_flags |= flag
            continue
        ident = _ns_ident(path)
        if ident in _host_ns(procname):
            raise IsoboxError(f"isobox does not join the host's {t} namespace ({path})")
        found = find_owner(procname, *ident)
        if t == "user" and not found:
            raise IsoboxError(f"user namespace {path} does not belong to an isobox container; "
                              "isobox only joins the user namespaces of its own containers")
        if not found:
            unowned.add(t)
        else:
            if owner and owner[0] != found[0] and \
                    _ns_ident(f"/proc/{owner[1]}/ns/user") != _ns_ident(f"/proc/{found[1]}/ns/user"):
                # containers of one user namespace (a pod's) are one owner: any of them will do
                raise IsoboxError(f"namespaces of containers in two different user namespaces ({owner[0]}, "
                                  f"{found[0]}) cannot be joined")
            owner = owner or found
        join[t] = path
    join_user = ""
    if owner:
        # Joining another container's namespaces means living in its user namespace, or
        # container root would hold no capability over what it joined.
        join_user = join.pop("user", "") or f"/proc/{owner[1]}/ns/user"
        new_flags &= ~k.CLONE_NEWUSER
    return new_flags, join, join_user, owner[0] if owner else "", owner, unowned


def _mapping(linux: dict, owner: tuple | None) -> tuple[int, int, int, bool]:
    """(uid base, gid base, size, explicit) — base 0 means "allocate from the pool"."""
    um, gm = linux.get("uidMappings") or [], linux.get("gidMappings") or []
    if not um and not gm:
        if owner:
            return owner[2], owner[3], owner[4], True
        return 0, 0, RANGE_SIZE, False
    if len(um) != 1 or len(gm) != 1:
        raise IsoboxError("isobox needs exactly one uid and one gid mapping (one contiguous range from "
                          "container ID 0)")
    u, g = um[0], gm[0]
    if u["containerID"] != 0 or g["containerID"] != 0:
        raise IsoboxError("the ID mapping must start at container ID 0")
    if u["hostID"] != g["hostID"] or u["size"] != g["size"]:
        raise IsoboxError("uid and gid mappings must have the same host start and size")
    if u["size"] < RANGE_SIZE:
        raise IsoboxError(f"the ID mapping must be at least {RANGE_SIZE} IDs long (got {u['size']})")
    if u["hostID"] <= 0 or u["hostID"] + u["size"] > 2**32 - 1:
        raise IsoboxError("the ID mapping must not include host ID 0 and must stay below 4294967295")
    if owner and (u["hostID"], u["size"]) != (owner[2], owner[4]):
        raise IsoboxError(f"the ID mapping differs from that of container {owner[0]}, whose namespaces it joins")
    return u["hostID"], g["hostID"], u["size"], True


def _can_lower_oom(value: int, own: int) -> bool:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except PermissionError:
        return False
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(own))
    return True


def process_from_spec(proc: dict) -> Process:
    user = proc.get("user", {})
    caps = proc.get("capabilities", {})
    try:
        masks = {key: capabilities.to_mask(caps.get(key)) for key in
                 ("bounding", "effective", "permitted", "inheritable", "ambient")}
    except ValueError as e:
        raise IsoboxError(f"process.capabilities: {e}") from None
    rlimits = []
    for r in proc.get("rlimits", []):
        name = r["type"]
        res = getattr(resource, name, None)
        if not name.startswith("RLIMIT_") or res is None:
            raise IsoboxError(f"unknown rlimit type {name!r}")
        soft, hard = r["soft"], r["hard"]
        if soft > hard:
            raise IsoboxError(f"rlimit {name}: soft limit {soft} is above the hard limit {hard}")
        own_hard = resource.getrlimit(res)[1]
        if own_hard != resource.RLIM_INFINITY and (hard > own_hard or hard == resource.RLIM_INFINITY):
            raise IsoboxError(f"rlimit {name}: hard limit {hard} is above the runtime's own hard limit {own_hard} "
                              "(the host lacks CAP_SYS_RESOURCE to raise it); lower it or raise the engine's limit")
        rlimits.append(Rlimit(res, soft, hard))
    oom = proc.get("oomScoreAdj")
    if oom is not None:
        if not isinstance(oom, int) or not -1000 <= oom <= 1000:
            raise IsoboxError("process.oomScoreAdj must be an integer from -1000 to 1000")
        with open("/proc/self/oom_score_adj") as f:
            own = int(f.read())
        # The kernel's bound is the hidden oom_score_adj_min (what was inherited, e.g. the shim's
        # parent's value), not our current value: containerd's shim raises itself by 1 without
        # CAP_SYS_RESOURCE and may lower back. Probe it on ourselves, then restore.
        if oom < own and not _can_lower_oom(oom, own):
            raise IsoboxError(f"process.oomScoreAdj {oom} is below the runtime's own oom_score_adj {own} "
                              "(lowering it needs CAP_SYS_RESOURCE in the host)")
    umask = proc.get("user", {}).get("umask")
    return Process(
        args=list(proc["args"]), env=list(proc.get("env", [])), cwd=proc.get("cwd", "/") or "/",
        uid=user.get("uid", 0), gid=user.get("gid", 0), additional_gids=list(user.get("additionalGids", [])),
        umask=umask if isinstance(umask, int) else None,
        caps_bounding=masks["bounding"], caps_effective=masks["effective"], caps_permitted=masks["permitted"],
        caps_inheritable=masks["inheritable"], caps_ambient=masks["ambient"],
        no_new_privileges=bool(proc.get("noNewPrivileges", False)), rlimits=rlimits, oom_score_adj=oom,
        terminal=bool(proc.get("terminal", False)))


def _devices(linux: dict, notes: list[str], pol) -> list[Device]:
    allowed = pol.device_map()
    out = {f"/dev/{n}": Device(f"/dev/{n}", f"/dev/{n}") for n in DEFAULT_DEVICES}
    for d in linux.get("devices", []) or []:
        path = d.get("path", "")
        t = "c" if d.get("type") == "u" else d.get("type")
        key = (t, d.get("major"), d.get("minor"))
        host = allowed.get(key)
        if host is None:
            notes.append(f"device {path} ({d.get('type')} {key[1]}:{key[2]}) not passed: not in {pol.path} "
                         "devices.allow")
            continue
        out[path] = Device(path, host)
    return list(out.values())


def _sysctl(linux: dict, join: dict[str, str], unowned: set[str]) -> dict[str, str]:
    """Sysctls of namespaces that are this container's own: new ones, or joined ones no other
    isobox container lives in (a pod sandbox's CNI netns: CRI puts the pod's net.* sysctls,
    and containerd 2.x its unprivileged port and ping ranges, on the sandbox)."""
    out = {}
    for name, val in (linux.get("sysctl") or {}).items():
        if name in _IPC_SYSCTLS or name.startswith("fs.mqueue."):
            kind = "ipc"
        elif name.startswith("net."):
            kind = "network"
        elif name in _UTS_SYSCTLS:
            kind = "uts"
        else:
            kind = ""
        ok = bool(kind) and (kind not in join or kind in unowned)
        if not ok:
            raise IsoboxError(f"sysctl {name} is not namespaced to this container; isobox only sets namespaced sysctls")
        if not isinstance(val, str):
            raise IsoboxError(f"sysctl {name}: value must be a string")
        out[name] = val
    return out


def _mounts(spec: dict) -> list[Mount]:
    out = []
    for m in spec.get("mounts", []) or []:
        opts = mountopts.parse(m.get("options", []))
        mtype = m.get("type") or ("bind" if opts.is_bind else "")
        if mtype == "cgroup" or mtype == "cgroup2":
            # replaced by isobox's own cgroup mounts, always writable below the container's root
            mtype = "isobox-cgroup"
        if mtype == "bind":
            opts.flags |= k.MS_BIND
        src = m.get("source", "") or ""
        if opts.is_bind and not os.path.isabs(src):
            raise IsoboxError(f"mount {m['destination']}: bind source {src!r} must be an absolute path")
        if not mtype:
            raise IsoboxError(f"mount {m['destination']}: no type given")
        out.append(Mount(os.path.normpath(m["destination"]), mtype, src, opts))
    return out


def rewrite(cid: str, bundle: str, spec: dict, find_owner: OwnerLookup) -> Plan:
    linux = spec.get("linux", {}) or {}
    bundle = os.path.abspath(bundle)
    root = spec["root"]["path"]
    rootfs = os.path.normpath(os.path.join(bundle, root))
    if not os.path.isdir(rootfs):
        raise IsoboxError(f"rootfs {rootfs!r} does not exist or is not a directory")
    from isobox.policy import model
    pol = model.load()   # refused here (bad file, bad mode) before anything exists
    # A rootfs is itself an idmapped bind: refuse a denied path or an ancestor of one (engines
    # keep rootfs below their data roots, so "below" is not checked for it).
    rule = pol.path_rule(os.path.realpath(rootfs), below=False)
    if rule:
        raise IsoboxError(f"rootfs {rootfs} refused by {pol.path} ({rule})")
    new_flags, join, join_user, shares, owner, unowned = _namespaces(linux, find_owner)
    uid_base, gid_base, size, explicit = _mapping(linux, owner)
    notes: list[str] = []
    masked = list(dict.fromkeys([*linux.get("maskedPaths", []), *DEFAULT_MASKED]))
    readonly = list(dict.fromkeys([*linux.get("readonlyPaths", []), *DEFAULT_READONLY]))
    hostname = spec.get("hostname", "") or ""
    if hostname and "uts" in join:
        raise IsoboxError("hostname cannot be set in a joined uts namespace")
    # seccomp: validated, merged with isobox's trap and compiled here (libseccomp is imported
    # only when there is a profile or the trap); the init inherits the compiled filter
    from isobox import seccomp
    trap = seccomp.trap_socket()
    sec = seccomp.prepare(linux.get("seccomp"), cid=cid, bundle=bundle, annotations=spec.get("annotations") or {},
                          trap_socket=trap)
    if sec is not None:
        notes += sec.notes
    return Plan(
        id=cid, bundle=bundle, rootfs=rootfs, readonly_root=bool(spec["root"].get("readonly")),
        new_namespaces=new_flags, join_namespaces=join, join_user=join_user, shares_userns_of=shares,
        uid_base=uid_base, gid_base=gid_base, id_size=size, explicit_mapping=explicit,
        mounts=_mounts(spec), masked_paths=masked, readonly_paths=readonly,
        devices=_devices(linux, notes, pol),
        hostname=hostname, domainname=spec.get("domainname", "") or "", sysctl=_sysctl(linux, join, unowned),
        cgroups_path=_cgroups_path(cid, linux), resources=linux.get("resources") or {},
        process=process_from_spec(spec["process"]), annotations=spec.get("annotations") or {}, notes=notes,
        policy=pol, hooks=_hooks(spec), seccomp=sec, seccomp_trap_socket=trap)


def _hooks(spec: dict) -> dict:
    """Each hook: an absolute path, args and env lists of strings, a positive integer timeout."""
    if not spec.get("hooks"):
        return {}
    from isobox.lifecycle import hooks
    return hooks.validate(spec)


def _cgroups_path(cid: str, linux: dict) -> str:
    p = linux.get("cgroupsPath") or f"/isobox/{key(cid)}"
    if ":" in p and not p.startswith("/"):
        raise IsoboxError(f"cgroupsPath {p!r} looks like a systemd slice; isobox uses the cgroupfs driver "
                          "(configure the engine with cgroupfs)")
    if ".." in p.split("/"):
        raise IsoboxError(f"cgroupsPath {p!r} must not contain '..'")
    return "/" + p.strip("/")
