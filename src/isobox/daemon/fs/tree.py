"""The path-keyed registry: what each path below a container's directory is.

A container's directory mirrors the container paths that are bound over (paths.py):
proc/<file>, proc/sys/..., sys/devices/system/cpu/..., sys/kernel/{config,debug,...}.
resolve() answers with a Node naming its handler; the handlers live in procfiles/ (one
module per emulated file), sysctl.py (/proc/sys) and here (static and passthrough dirs)."""
from __future__ import annotations

import os
import stat as st
from dataclasses import dataclass

HOST_CPU = "/sys/devices/system/cpu"
CPU_DIR = "sys/devices/system/cpu"

# emulated file (relative path) -> module in isobox.daemon.fs.procfiles
PROCFILES = {
    "proc/meminfo": "meminfo", "proc/cpuinfo": "cpuinfo", "proc/stat": "stat", "proc/uptime": "uptime",
    "proc/loadavg": "loadavg", "proc/swaps": "swaps", "proc/diskstats": "diskstats",
    "sys/devices/system/cpu/online": "cpu_online",
    "sys/devices/virtual/dmi/id/product_uuid": "product_uuid",
}
# modes other than 0444 (the kernel keeps product_uuid to root)
FILE_MODES = {"sys/devices/virtual/dmi/id/product_uuid": 0o400}
# empty directories hiding host state, with the kernel's modes (as Sysbox shows them)
EMPTY_DIRS = {"sys/kernel/config": 0o755, "sys/kernel/debug": 0o700, "sys/kernel/tracing": 0o700,
              "sys/kernel/security": 0o755}
STATIC_DIRS = {
    "": ("proc", "sys"),
    "proc": ("meminfo", "cpuinfo", "stat", "uptime", "loadavg", "swaps", "diskstats", "sys"),
    "sys": ("devices", "kernel"),
    "sys/kernel": ("config", "debug", "tracing", "security"),
    "sys/devices": ("system", "virtual"),
    "sys/devices/system": ("cpu",),
    # the top layer of an overlay on the container's /sys/devices/virtual (paths.py)
    "sys/devices/virtual": ("dmi",),
    "sys/devices/virtual/dmi": ("id",),
    "sys/devices/virtual/dmi/id": ("product_uuid",),
}
# the static names that are not directories
FILE_NAMES = {rel.rsplit("/", 1)[1] for rel in PROCFILES}


@dataclass(frozen=True)
class Node:
    kind: str          # "dir" | "file" | "link"
    mode: int          # permission bits
    owner: str         # "container": the container's root; "host": host root (nobody inside)
    handler: str       # "static" | "empty" | "procfile" | "sysctl" | "cpu"


STATIC = Node("dir", 0o555, "container", "static")
PROCFILE = Node("file", 0o444, "container", "procfile")


def resolve(rel: str, allowed_cpus) -> Node | None:
    """allowed_cpus() -> set of CPU numbers, called only for sys/devices/system/cpu/cpuN."""
    if rel in STATIC_DIRS:
        return STATIC
    if rel in PROCFILES:
        return Node("file", FILE_MODES[rel], "container", "procfile") if rel in FILE_MODES else PROCFILE
    if rel in EMPTY_DIRS:
        return Node("dir", EMPTY_DIRS[rel], "container", "empty")
    if rel == "proc/sys" or rel.startswith("proc/sys/"):
        return Node("dir", 0, "", "sysctl")      # the sysctl backend answers the details
    if rel == CPU_DIR or rel.startswith(CPU_DIR + "/"):
        return _cpu(rel, allowed_cpus)
    return None


def _cpu(rel: str, allowed_cpus) -> Node | None:
    first = rel[len(CPU_DIR) + 1:].split("/", 1)[0]
    if _cpu_number(first) is not None and _cpu_number(first) not in allowed_cpus():
        return None
    try:
        s = os.lstat(host_path(rel))
    except OSError:
        return None
    kind = "dir" if st.S_ISDIR(s.st_mode) else "link" if st.S_ISLNK(s.st_mode) else "file"
    # host sysfs is host root's: read-only for every container, as in the container's own sysfs
    return Node(kind, st.S_IMODE(s.st_mode) & 0o555, "host", "cpu")


def _cpu_number(name: str) -> int | None:
    return int(name[3:]) if name.startswith("cpu") and name[3:].isdigit() else None


def listdir(rel: str, node: Node, allowed_cpus) -> list[str]:
    if node.handler == "static":
        return list(STATIC_DIRS[rel])
    if node.handler == "cpu":
        names = sorted(os.listdir(host_path(rel)))
        if rel == CPU_DIR:
            cpus = allowed_cpus()
            names = [n for n in names if _cpu_number(n) is None or _cpu_number(n) in cpus]
        return names
    return []


def host_path(rel: str) -> str:
    """The host sysfs file behind a passthrough node."""
    return HOST_CPU + rel[len(CPU_DIR):]
