"""What a handler knows when it renders a file: the container and whose view it renders."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Container:
    """One registered container, as isobox-runc described it at create."""
    key: str                      # the state directory key (isobox.spec.config.key(id))
    id: str
    uid_base: int                 # host uid of the container's root
    gid_base: int
    cgroups: dict[str, str]       # controller ("memory", "cpu", "cpuacct", "cpuset", "blkio", "pids",
                                  # "io"; "" = the v2 hierarchy) -> host directory of its cgroup
    init_pid: int = 0             # host pid of the container's init (0 until create finished)
    init_start: int = 0           # its start time (clock ticks since boot): tells a reused pid apart
    created: float = 0.0          # CLOCK_BOOTTIME seconds when the container was registered
    sysctl: dict[str, str] = field(default_factory=dict)  # per-container values of emulated sysctls
    masked: list[str] = field(default_factory=list)     # the spec's maskedPaths: new proc/sysfs mounts get them too
    readonly: list[str] = field(default_factory=list)   # and its readonlyPaths
    storage: dict[str, list[int]] = field(default_factory=dict)  # mounts/storage.py: where set-id
                                  # files may be made (private_devs, private_mounts, host_devs)


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class RenderCtx:
    container: Container
    view: object                  # isobox.daemon.fs.cgview.CgroupView of the reader (or of the container)
    reader_pid: int = 0           # host pid of the reader (FUSE header); 0 when rendered for the cache
    loads: object = None          # isobox.daemon.fs.loadavg.LoadTracker shared by the daemon
