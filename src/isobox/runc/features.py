"""`features`: the runtime-spec features.json, listing only what isobox really does."""
from __future__ import annotations

from isobox.linux.capabilities import NAMES


def features() -> dict:
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        "hooks": [],
        "mountOptions": ["async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "mand",
                         "noatime", "nodev", "nodiratime", "noexec", "nomand", "norelatime", "nostrictatime",
                         "nosuid", "nosymfollow", "private", "rbind", "relatime", "remount", "ro", "rprivate",
                         "rshared", "rslave", "runbindable", "rw", "shared", "slave", "strictatime", "suid",
                         "symfollow", "sync", "tmpcopyup", "unbindable"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": list(NAMES),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": {
            "io.github.isobox.userns": "always",
            "io.github.isobox.idmapped-rootfs": "true",
            "org.opencontainers.runc.checkpoint.enabled": "false",
        },
    }
