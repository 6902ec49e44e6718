"""In which order a process joins existing namespaces.

A namespace is joined with CAP_SYS_ADMIN over the user namespace that owns it. After
setns(user) the joiner holds capabilities only in the container's user namespace, so a
namespace owned by another one (the netns an engine made in the host's user namespace for a
Kubernetes pod, through CNI) must be joined first, while the joiner is still host root."""
from __future__ import annotations

import os

from isobox.linux import syscalls as k


def owned_by(ns_fd: int, user_fd: int) -> bool:
    """The namespace behind ns_fd belongs to the user namespace behind user_fd."""
    owner = k.ioctl_ns_get_userns(ns_fd)
    try:
        a, b = os.fstat(owner), os.fstat(user_fd)
    finally:
        os.close(owner)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def user_order(joins: list[tuple[int, int]], user_fd: int) -> list[tuple[int, int]]:
    """(fd, CLONE_NEW* flag) pairs, user namespace excluded, split around setns(user):
    the ones owned elsewhere, then (user_fd, CLONE_NEWUSER), then the container's own."""
    early = [j for j in joins if not owned_by(j[0], user_fd)]
    return early + [(user_fd, k.CLONE_NEWUSER)] + [j for j in joins if j not in early]
