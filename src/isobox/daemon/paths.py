"""Where isoboxd lives and what it emulates. Imported by isobox-runc, so it stays tiny."""
from __future__ import annotations

RUN_DIR = "/run/isobox"
FS_ROOT = "/run/isobox/fs"                   # the one FUSE mount; <key>/ per container below it
SOCKET = "/run/isobox/isoboxd.sock"          # the server's registration socket
TRAP_SOCKET = "/run/isobox/isoboxd-trap.sock"  # the holder's: containers hand their seccomp listeners in
WARM_SOCKET = "/run/isobox/isobox-runc.sock"  # the warm worker's: isobox-runc hands calls over (runc/warm_client.py)
AUDIT_LOG = "/var/log/isobox/audit.log"      # one JSON line per refusal or action (`isobox events`)
INFLIGHT = "/run/isobox/isoboxd-inflight"    # notifications being handled, re-handled after a crash
LOCK = "/run/isobox/isoboxd.lock"            # held (flock) by the holder while it lives
HOLDER_PID = "/run/isobox/isoboxd.pid"
SERVER_PID = "/run/isobox/isoboxd-server.pid"
DB = "/run/isobox/isoboxd.db"                # registrations and node ids: survive a server restart
LOG = "/run/isobox/isoboxd.log"
CODE_PATH = "/run/isobox/isoboxd.path"      # sys.path (JSON) new servers and workers import from
CGROUP = "/isoboxd"                          # the daemon's own cgroup in every hierarchy

# container path -> path below FS_ROOT/<key>; bound by the builder before the user namespace,
# so the kernel locks them like every other initial mount
FILES = ("/proc/meminfo", "/proc/cpuinfo", "/proc/stat", "/proc/uptime", "/proc/loadavg", "/proc/swaps",
         "/proc/diskstats")
DIRS = ("/proc/sys", "/sys/devices/system/cpu", "/sys/kernel/config", "/sys/kernel/debug",
        "/sys/kernel/tracing", "/sys/kernel/security")


HOST_DMI = "/sys/devices/virtual/dmi/id"
UUID = "/sys/devices/virtual/dmi/id/product_uuid"
VIRTUAL = "/sys/devices/virtual"


def emulated(key: str) -> list[tuple[str, str, str]]:
    """(kind, host source, container destination): "bind" binds source over destination;
    "overlay" stacks the source directory over it, read-only. A destination the
    container lacks (no configfs on this host, say) is skipped by the builder."""
    import os
    base = f"{FS_ROOT}/{key}"
    out = [("bind", base + d, d) for d in DIRS] + [("bind", base + f, f) for f in FILES]
    if os.path.isdir(HOST_DMI):
        out.append(("bind", base + UUID, UUID))
    else:
        # no DMI on this host: sysfs cannot get a new directory, so an overlay adds dmi/ on
        # top of the container's own /sys/devices/virtual (its other entries stay live)
        out.append(("overlay", base + VIRTUAL, VIRTUAL))
    return out
