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


def private_dir(path: str) -> None:
    """Makes path a directory only root may enter (0700, whatever the umask), creating it or
    tightening one an older version (or an os.makedirs of a subdirectory) left open: below
    RUN_DIR are the database, the state of isobox-runc's default root and the FUSE mount,
    which all name containers and their keys. Nothing legitimate enters it as another user:
    container processes reach their nodes through binds, and the inits connect to the trap
    socket while they are still host uid 0."""
    import os
    import stat
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(path)
    if st.st_uid != 0:
        os.chown(path, 0, 0)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)

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
