"""OCI mount options -> mount(2) flags, propagation and filesystem data (pure logic)."""
from __future__ import annotations

from isobox.plain import field, record  # not dataclasses: see isobox.plain

from isobox.linux import syscalls as k

# option -> (clear, set)
_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, k.MS_RDONLY), "rw": (True, k.MS_RDONLY),
    "nosuid": (False, k.MS_NOSUID), "suid": (True, k.MS_NOSUID),
    "nodev": (False, k.MS_NODEV), "dev": (True, k.MS_NODEV),
    "noexec": (False, k.MS_NOEXEC), "exec": (True, k.MS_NOEXEC),
    "sync": (False, k.MS_SYNCHRONOUS), "async": (True, k.MS_SYNCHRONOUS),
    "dirsync": (False, k.MS_DIRSYNC), "mand": (False, k.MS_MANDLOCK), "nomand": (True, k.MS_MANDLOCK),
    "noatime": (False, k.MS_NOATIME), "atime": (True, k.MS_NOATIME),
    "nodiratime": (False, k.MS_NODIRATIME), "diratime": (True, k.MS_NODIRATIME),
    "relatime": (False, k.MS_RELATIME), "norelatime": (True, k.MS_RELATIME),
    "strictatime": (False, k.MS_STRICTATIME), "nostrictatime": (True, k.MS_STRICTATIME),
    "nosymfollow": (False, k.MS_NOSYMFOLLOW), "symfollow": (True, k.MS_NOSYMFOLLOW),
    "bind": (False, k.MS_BIND), "rbind": (False, k.MS_BIND | k.MS_REC), "remount": (False, k.MS_REMOUNT),
}
_PROPAGATION = {
    "private": k.MS_PRIVATE, "rprivate": k.MS_PRIVATE | k.MS_REC,
    "shared": k.MS_SHARED, "rshared": k.MS_SHARED | k.MS_REC,
    "slave": k.MS_SLAVE, "rslave": k.MS_SLAVE | k.MS_REC,
    "unbindable": k.MS_UNBINDABLE, "runbindable": k.MS_UNBINDABLE | k.MS_REC,
}
# accepted for compatibility, no effect here
_IGNORED = {"tmpcopyup", "defaults", "noacl", "acl"}


@record
class MountOptions:
    flags: int = 0
    propagation: int = 0
    data: list[str] = field(default_factory=list)
    idmap: str = ""          # "", "idmap" or "ridmap" as asked by the spec

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & k.MS_BIND)

    @property
    def recursive_bind(self) -> bool:
        return bool(self.flags & k.MS_REC)


def parse(options: list[str]) -> MountOptions:
    out = MountOptions()
    for opt in options:
        if opt in _FLAGS:
            clear, bit = _FLAGS[opt]
            out.flags = out.flags & ~bit if clear else out.flags | bit
        elif opt in _PROPAGATION:
            out.propagation = _PROPAGATION[opt]
        elif opt in ("idmap", "ridmap"):
            out.idmap = opt
        elif opt in _IGNORED:
            continue
        else:
            out.data.append(opt)
    return out


def attr_flags(flags: int) -> int:
    """MS_* lock-relevant flags -> MOUNT_ATTR_* for mount_setattr on a detached tree."""
    out = 0
    if flags & k.MS_RDONLY:
        out |= k.MOUNT_ATTR_RDONLY
    if flags & k.MS_NOSUID:
        out |= k.MOUNT_ATTR_NOSUID
    if flags & k.MS_NODEV:
        out |= k.MOUNT_ATTR_NODEV
    if flags & k.MS_NOEXEC:
        out |= k.MOUNT_ATTR_NOEXEC
    return out


def shift_id_options(data: list[str], uid_base: int, gid_base: int) -> list[str]:
    """uid=/gid= options name container IDs; the host-owned superblock needs host IDs.

    Filesystems mounted by the host-root builder are owned by the init user namespace, so
    their root must carry the container root's host ID or container root cannot write them.
    """
    out = []
    seen_uid = seen_gid = False
    for opt in data:
        key, _, val = opt.partition("=")
        if key == "uid" and val.isdigit():
            out.append(f"uid={uid_base + int(val)}")
            seen_uid = True
        elif key == "gid" and val.isdigit():
            out.append(f"gid={gid_base + int(val)}")
            seen_gid = True
        else:
            out.append(opt)
    if not seen_uid:
        out.append(f"uid={uid_base}")
    if not seen_gid:
        out.append(f"gid={gid_base}")
    return out
