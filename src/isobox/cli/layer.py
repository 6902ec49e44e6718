"""A writable layer of its own for each `isobox run` container, over the read-only image.

`isobox run` acts as an engine with an overlay snapshotter: as host root it makes
CONTAINERS/<id>/{upper,work,rootfs}, mounts an overlay (lowerdir = the image, never written)
on rootfs and hands that to the runtime as root.path. isobox-runc then builds the container's
own overlay over idmapped clones of the same layers (mounts/rootfs.py), as for dockerd.

Why CONTAINERS is root-only (0700, below /var/lib/isobox, 0700 too): files container root
writes land in the upper as host uid 0 (the upper is idmapped), so a set-uid file there would
be set-uid host root for any host user who could reach it.

Ownership: <id>/owner names the run (pid and start time, so a reused pid is not taken for
it; not an flock, which the container's init would inherit until its exec). A run that died
(SIGKILL, power loss) leaves an owner that is gone; the next run (or `isobox setup`) deletes
its container once that has stopped or was never started, then the layer. A container still
running after its run died keeps its layer until it ends. CONTAINERS/.lock (shared while a run
makes its directory and owner file, exclusive while a collector reads owners and writes
itself in as the owner of what it collects) keeps the two from crossing.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from contextlib import contextmanager
from typing import Iterator

from isobox.errors import IsoboxError
from isobox.linux import syscalls as k

STORAGE = "/var/lib/isobox"
CONTAINERS = os.path.join(STORAGE, "containers")
LOCK = os.path.join(CONTAINERS, ".lock")


def refuse_storage(rootfs: str) -> None:
    """A --rootfs that is isobox's storage, inside it (the image, another container's layer)
    or above it (/) would hand container root what it must never write."""
    real = os.path.realpath(rootfs)
    if os.path.commonpath([real, STORAGE]) in (real, STORAGE):
        raise IsoboxError(f"--rootfs {rootfs} lies in or contains isobox's storage ({STORAGE}), which no "
                          "container may write: give a directory of your own, or no --rootfs for the built-in image")


def rootfs_of(cid: str) -> str:
    """Where the container's root will be mounted (known before the layer exists, for the spec)."""
    return os.path.join(CONTAINERS, cid, "rootfs")


def _containers_dir() -> None:
    """CONTAINERS exists, is a real directory of root's, and nobody else may enter it."""
    os.makedirs(os.path.dirname(CONTAINERS), mode=0o700, exist_ok=True)
    try:
        os.mkdir(CONTAINERS, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(CONTAINERS)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise IsoboxError(f"{CONTAINERS} is not a directory owned by root: remove it and run `isobox setup`")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(CONTAINERS, 0o700)     # root's own directory, made by hand with another mode


@contextmanager
def _global(op: int) -> Iterator[None]:
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, op)
        yield
    finally:
        os.close(fd)


def _me() -> str:
    from isobox.ids.procinfo import proc_starttime
    pid = os.getpid()
    return f"{pid} {proc_starttime(pid)}\n"


def _own(d: str) -> None:
    tmp = os.path.join(d, ".owner.tmp")
    with open(tmp, "w") as f:
        f.write(_me())
    os.rename(tmp, os.path.join(d, "owner"))


def owner_alive(d: str) -> bool:
    """Whether the process named in d/owner still runs (no owner file: a run died making it)."""
    from isobox.ids.procinfo import proc_starttime
    try:
        with open(os.path.join(d, "owner")) as f:
            pid, start = f.read().split()
        return proc_starttime(int(pid)) == int(start)
    except (OSError, ValueError):
        return False


def _remove(d: str) -> None:
    """Unmount d/rootfs and delete d; leaves d alone if rootfs stays mounted (a later
    collection retries), so nothing is ever deleted through a mount."""
    rootfs = os.path.join(d, "rootfs")
    for _ in range(8):                    # stacked mounts: one umount each
        if not os.path.ismount(rootfs):
            break
        try:
            k.umount2(rootfs)
        except OSError as e:
            if e.errno == errno.EBUSY:
                k.umount2(rootfs, k.MNT_DETACH)    # a host process has its cwd there: detach
            elif e.errno != errno.EINVAL:
                raise
    if os.path.ismount(rootfs):
        raise IsoboxError(f"{rootfs} is still mounted; unmount it, then run `isobox setup` to collect it")
    shutil.rmtree(d)


def _stale_container(cid: str) -> bool:
    """Whether the container of a dead run may go: stopped, never started, or never recorded."""
    from isobox.lifecycle.state import StateStore, status
    store = StateStore()
    if not store.exists(cid):
        return True
    try:
        return status(store, store.load(cid)) in ("stopped", "created")
    except IsoboxError:
        return False                      # unreadable state: leave it to the admin


def _end(cid: str) -> None:
    """What the dead run would have done after its container: delete it and its bundle."""
    from isobox.cli import bundle
    from isobox.lifecycle import control
    from isobox.lifecycle.state import StateStore
    control.delete(StateStore(), cid, force=True)
    bundle.remove_bundle(os.path.join(bundle.BUNDLES, cid))


def collect() -> list[str]:
    """Removes the layers (and containers) of runs that died; returns their ids. Never fails
    the run that calls it: what it cannot remove now, a later collection retries."""
    if not os.path.isdir(CONTAINERS):
        return []
    claimed: list[str] = []
    with _global(fcntl.LOCK_EX):
        for name in sorted(os.listdir(CONTAINERS)):
            d = os.path.join(CONTAINERS, name)
            try:
                if name.startswith(".") or owner_alive(d) or not _stale_container(name):
                    continue              # its run (or its container) is alive
                _own(d)                   # ours now: no other collector takes it meanwhile
            except Exception:  # noqa: BLE001 - see the docstring
                continue
            claimed.append(name)
    done = []
    for name in claimed:                  # outside the global lock: runs may start meanwhile
        try:
            _end(name)
            _remove(os.path.join(CONTAINERS, name))
        except Exception:  # noqa: BLE001 - see the docstring
            continue
        done.append(name)
    return done


def _claim(cid: str) -> str:
    d = os.path.join(CONTAINERS, cid)
    with _global(fcntl.LOCK_SH):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            raise IsoboxError(f"{d} already exists: container id {cid!r} is in use") from None
        _own(d)
    return d


def _mount(d: str, image: str) -> None:
    st = os.stat(image)
    upper, work, rootfs = (os.path.join(d, n) for n in ("upper", "work", "rootfs"))
    # the overlay's root directory takes its mode and owner from the upper's: the image's
    os.mkdir(upper, 0o700)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, stat.S_IMODE(st.st_mode))
    os.mkdir(work, 0o700)
    os.mkdir(rootfs, 0o700)
    if any(c in p for p in (image, d) for c in ",:\\"):
        raise IsoboxError(f"cannot use {image} as an image: overlay paths may not contain ',', ':' or '\\'")
    # index=off: isobox-runc mounts a second overlay over this upper (mounts/rootfs.py), which
    # index=on refuses; nosuid,nodev: this host-side view is never for running anything.
    data = f"lowerdir={image},upperdir={upper},workdir={work},index=off"
    try:
        k.mount("overlay", rootfs, "overlay", k.MS_NOSUID | k.MS_NODEV, data)
    except OSError as e:
        raise IsoboxError(f"cannot mount the container's writable layer over {image}: "
                          f"{os.strerror(e.errno or 0)}; isobox needs overlayfs (modprobe overlay)") from None


@contextmanager
def writable_layer(cid: str, image: str) -> Iterator[str]:
    """Yields rootfs_of(cid): a fresh overlay over image, unmounted and deleted on the way
    out whatever happens inside (the caller deletes its container first)."""
    _containers_dir()
    collect()
    d = _claim(cid)
    try:
        _mount(d, image)
        yield rootfs_of(cid)
    finally:
        _remove(d)
