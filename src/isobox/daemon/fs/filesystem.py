"""The filesystem behind the FUSE loop: node ids, attributes, and the cache policy.

Speed comes from the kernel's page cache, not from Python: an emulated /proc file is
rendered at most every FRESH seconds per container, its size is reported exactly, and an
open inside that window is answered with FOPEN_KEEP_CACHE, so `cat /proc/meminfo` costs one
OPEN round trip and the read is served by the kernel. A rendering whose size changed is
announced with FUSE_NOTIFY_INVAL_INODE (attributes and pages), and a sweeper drops pages
older than FRESH that are still cached, so readers holding the file open (top re-reads
/proc/stat) never see values older than about 2 x FRESH. A reader in a sub-cgroup of the
container (a nested container with its own limit) gets FOPEN_DIRECT_IO and its own values,
rendered for it, as LXCFS does for every reader."""
from __future__ import annotations

import errno
import importlib
import os
import threading
import time
from dataclasses import dataclass

from isobox.daemon.fs import proto, sysctl, tree
from isobox.daemon.fs.cgview import CgroupView, reader_view, view_for_dirs
from isobox.daemon.fs.context import Container, RenderCtx
from isobox.daemon.fs.membership import in_container
from isobox.daemon.store import Store

FRESH = 0.1                 # seconds a rendering may be served from the page cache
LONG = 3600                 # attribute/entry validity of nodes whose changes are notified
SHORT = 1                   # of nodes that may appear or disappear (sysctl, sysfs passthrough)
SENDFILE_SIZE = 4096
O_ACCMODE = 3
FATTR_MODE, FATTR_UID, FATTR_GID = 1, 2, 4


@dataclass
class Snapshot:
    data: bytes
    at: float
    in_kernel: bool = False    # served to the page cache since the last invalidation
    trusted: bool = False      # an OPEN made sure the kernel's pages (if any) are this rendering's


class Filesystem:
    def __init__(self, store: Store, write_fd, allow_push: bool = False):
        self.store = store
        self.notify = write_fd                   # writes a notification to /dev/fuse
        self.allow_push = allow_push
        self.lock = threading.Lock()
        self.by_idx: dict[int, Container] = {}
        self.by_key: dict[str, int] = {}
        self.paths: dict[int, str] = {1: ""}     # path id -> relative path
        self.path_ids: dict[str, int] = {"": 1}
        self.snaps: dict[int, Snapshot] = {}     # nodeid -> rendering served through the page cache
        self.views: dict[tuple[str, int], tuple[float, object]] = {}   # (key, reader pid) -> (when, view or None)
        self.loads = None
        self.pending: list[int] = []             # nodeids whose size the kernel must re-read
        self.modules: dict[str, object] = {}
        self.cviews: dict[str, CgroupView] = {}  # container key -> view of its cgroups
        self.sysctl_nodes: dict[tuple, tuple] = {}   # (key, rel, reader pid) -> (when, Node or None)
        self.sysctl_reads: dict[tuple, tuple] = {}   # (key, rel, reader pid) -> (when, value read)
        self.members: dict[tuple[str, int], tuple[float, bool]] = {}   # (key, reader pid) -> (when, may_use)
        for idx, c in store.containers():
            self.by_idx[idx], self.by_key[c.key] = c, idx
        for pid_, path in store.paths().items():
            self.paths[pid_], self.path_ids[path] = path, pid_

    # -- registrations --
    def register(self, c: Container) -> int:
        with self.lock:
            idx = self.store.save(c)
            self.by_idx[idx], self.by_key[c.key] = c, idx
            return idx

    def unregister(self, key: str) -> bool:
        with self.lock:
            idx = self.by_key.pop(key, None)
            if idx is None:
                return False
            self.by_idx.pop(idx, None)
            self.cviews.pop(key, None)
            self.store.remove(key)
            for nodeid in [n for n in self.snaps if n >> 32 == idx]:
                del self.snaps[nodeid]
        # the kernel caches the directory's entry for LONG seconds: make it forget it, on a
        # thread of its own. Never on a FUSE worker, which could deadlock on the directory's
        # lock; and not before the caller's answer: when the container's binds of its files
        # are still being torn down, the kernel's invalidation waits for an RCU grace period
        # (~5 ms of every `delete` here), and nothing the caller does next depends on it.
        threading.Thread(target=self._forget, args=(key.encode(),), daemon=True).start()
        return True

    def _forget(self, name: bytes) -> None:
        try:
            self.notify(proto.notify(proto.NOTIFY_INVAL_ENTRY,
                                     proto.INVAL_ENTRY.pack(proto.ROOT_ID, len(name), 0) + name + b"\0"))
        except OSError:
            pass     # ENOENT: never looked up

    def save(self, c: Container) -> None:
        self.store.save(c)

    # -- node ids --
    def _node(self, nodeid: int) -> tuple[Container | None, str]:
        """(container, relative path); (None, "") is the mount root. KeyError if unknown."""
        if nodeid == proto.ROOT_ID:
            return None, ""
        return self.by_idx[nodeid >> 32], self.paths[nodeid & 0xFFFFFFFF]

    def _nodeid(self, c: Container, rel: str) -> int:
        pid_ = self.path_ids.get(rel)
        if pid_ is None:
            pid_ = self.store.path_id(rel)
            with self.lock:
                self.paths[pid_], self.path_ids[rel] = rel, pid_
        return (self.by_key[c.key] << 32) | pid_

    # -- who may use a container's nodes --
    def may_use(self, c: Container, uid: int, pid: int) -> bool:
        """Host root, or a process of the container (in its cgroup or below, the rule its
        seccomp listener is checked by): knowing a key and reaching a path to its node
        grants a host user nothing. Cached per reader for FRESH seconds."""
        if uid == 0:
            return True
        now = time.monotonic()
        hit = self.members.get((c.key, pid))
        if hit is not None and now - hit[0] < FRESH:
            return hit[1]
        try:
            ok = in_container(pid, c)
        except Exception:  # noqa: BLE001 - no answer means no
            ok = False
        if len(self.members) > 4096:
            self.members.clear()
        self.members[(c.key, pid)] = (now, ok)
        return ok

    def admit(self, nodeid: int, uid: int, pid: int) -> None:
        """Raises EACCES unless the requester may use the container nodeid belongs to (the
        mount root itself is anyone's: what it lists is filtered in lookup and readdir)."""
        if nodeid == proto.ROOT_ID:
            return
        c = self.by_idx[nodeid >> 32]
        if not self.may_use(c, uid, pid):
            raise OSError(errno.EACCES, c.key)

    def _cpus(self, c: Container):
        return lambda: set(self.container_view(c).cpus())

    def resolve(self, c: Container, rel: str, pid: int) -> tree.Node | None:
        node = tree.resolve(rel, self._cpus(c))
        if node is not None and node.handler == "sysctl":
            # one open+read+close asks about the same node 3-4 times (LOOKUP, OPEN, READ...),
            # and each answer enters the reader's namespaces: keep it for FRESH seconds
            now = time.monotonic()
            hit = self.sysctl_nodes.get((c.key, rel, pid))
            if hit is not None and now - hit[0] < FRESH:
                return hit[1]
            e = sysctl.stat(c, pid, rel[len("proc/sys/"):] if rel != "proc/sys" else "")
            node = None if e is None else tree.Node("dir" if e.kind == "dir" else "file", e.mode, e.owner, "sysctl")
            if len(self.sysctl_nodes) > 4096:
                self.sysctl_nodes.clear()
            self.sysctl_nodes[(c.key, rel, pid)] = (now, node)
        return node

    # -- attributes --
    def attr(self, nodeid: int, c: Container | None, rel: str, node: tree.Node) -> tuple[bytes, int]:
        """(struct fuse_attr, validity in seconds)."""
        if c is None:
            return proto.attr(proto.ROOT_ID, 0, proto.S_IFDIR | 0o711, 0, 0, 2), LONG
        uid, gid = (c.uid_base, c.gid_base) if node.owner == "container" else (0, 0)
        # Direct-I/O files report a page, not procfs's 0: sendfile (busybox cat) reads through
        # the page cache, bounded by i_size, and the short READ reply then sets the real size.
        # Validity 0 makes each open look the node up again, which restores the page size.
        size, valid = (SENDFILE_SIZE, 0) if node.kind == "file" else (0, SHORT)
        if node.handler == "procfile":
            size, valid = len(self._current(nodeid, c, rel, refresh=True).data), LONG
        elif node.handler in ("static", "empty"):
            valid = LONG
        elif node.kind == "link":
            size = len(os.readlink(tree.host_path(rel)))
        if rel == "":
            # the container's own directory: every walk through FS_ROOT/<key> asks again, so a
            # reader who may not use it is refused even after root's lookup was cached
            valid = 0
        kind = {"dir": proto.S_IFDIR, "file": proto.S_IFREG, "link": proto.S_IFLNK}[node.kind]
        mode = node.mode | (0o777 if node.kind == "link" else 0)
        return proto.attr(nodeid, size, kind | mode, uid, gid, 2 if node.kind == "dir" else 1), valid

    def lookup(self, parent: int, name: str, pid: int, uid: int = 0) -> bytes:
        c, rel = self._node(parent)
        if c is None:
            idx = self.by_key.get(name)
            if idx is None:
                raise OSError(errno.ENOENT, name)
            c, rel = self.by_idx[idx], ""
            if not self.may_use(c, uid, pid):
                # EACCES, not ENOENT: an ENOENT to the kernel's revalidation of a cached entry
                # would invalidate it, detaching whatever the container mounted below its nodes
                raise OSError(errno.EACCES, name)
        else:
            rel = f"{rel}/{name}" if rel else name
        node = self.resolve(c, rel, pid)
        if node is None:
            raise OSError(errno.ENOENT, name)
        nodeid = self._nodeid(c, rel)
        a, valid = self.attr(nodeid, c, rel, node)
        return proto.ENTRY_OUT.pack(nodeid, 0, valid, valid, 0, 0) + a

    def getattr(self, nodeid: int, pid: int) -> bytes:
        c, rel = self._node(nodeid)
        node = self.resolve(c, rel, pid) if c is not None else tree.STATIC
        if node is None:
            raise OSError(errno.ENOENT, rel)
        a, valid = self.attr(nodeid, c, rel, node)
        return proto.ATTR_OUT.pack(valid, 0, 0) + a

    def setattr(self, nodeid: int, valid: int, pid: int) -> bytes:
        c, rel = self._node(nodeid)
        node = self.resolve(c, rel, pid) if c is not None else tree.STATIC
        if node is None or node.handler != "sysctl" or valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            raise OSError(errno.EPERM, rel)
        return self.getattr(nodeid, pid)     # truncating a sysctl is a no-op, as in procfs

    # -- files --
    def open(self, nodeid: int, flags: int, pid: int) -> tuple[int, int]:
        """(fh, open_flags). fh 1 marks a reader-specific (direct I/O) open."""
        c, rel = self._node(nodeid)
        node = self.resolve(c, rel, pid) if c is not None else None
        if node is None:
            raise OSError(errno.ENOENT, rel)
        writing = flags & O_ACCMODE != os.O_RDONLY
        if node.handler == "sysctl":
            if writing:
                sysctl.check_open_write(c, pid, rel[len("proc/sys/"):])
            return 0, proto.FOPEN_DIRECT_IO
        if writing:
            raise OSError(errno.EACCES, rel)
        if node.handler != "procfile":
            return 0, proto.FOPEN_DIRECT_IO
        if self.reader_view(c, pid) is not None:
            return 1, proto.FOPEN_DIRECT_IO
        snap = self.snaps.get(nodeid)
        now = time.monotonic()
        if snap is not None and snap.trusted and now - snap.at < FRESH:
            return 0, proto.FOPEN_KEEP_CACHE | proto.FOPEN_NOFLUSH
        new = self.snaps[nodeid] = Snapshot(self._render(c, rel), now, trusted=True)
        if snap is not None and snap.trusted and len(snap.data) == len(new.data):
            return 0, proto.FOPEN_NOFLUSH         # without KEEP_CACHE the kernel drops the pages
        # The kernel may hold another size, or pages of a previous server. Notifying it
        # here could deadlock (the invalidation waits for page locks of reads that only this
        # thread's peers answer), so this open bypasses the cache and the sweeper notifies.
        self.pending.append(nodeid)
        return 0, proto.FOPEN_DIRECT_IO | proto.FOPEN_NOFLUSH

    def read(self, nodeid: int, fh: int, offset: int, size: int, pid: int) -> bytes:
        c, rel = self._node(nodeid)
        node = self.resolve(c, rel, pid) if c is not None else None
        if node is None:
            raise OSError(errno.ENOENT, rel)
        if node.handler == "procfile":
            if fh == 1:
                data = self._module(rel).render(self._ctx(c, pid, self.reader_view(c, pid)))
                snap = self.snaps.get(nodeid)
                if snap is not None:
                    # sendfile reads direct-I/O files through the shared page cache: what this
                    # reader got may sit there, so the container's next open re-renders
                    snap.at = float("-inf")
                    self.pending.append(nodeid)
            else:
                snap = self._current(nodeid, c, rel, refresh=False)   # the size the kernel was told
                snap.in_kernel = True
                data = snap.data
        elif node.handler == "sysctl":
            data = self._sysctl_read(c, rel, pid, offset)
        elif node.handler == "cpu":
            with open(tree.host_path(rel), "rb") as f:
                f.seek(offset)
                return f.read(size)
        else:
            raise OSError(errno.EISDIR, rel)
        return data[offset:offset + size]

    def write(self, nodeid: int, offset: int, data: bytes, pid: int, uid: int, gid: int) -> int:
        c, rel = self._node(nodeid)
        node = self.resolve(c, rel, pid) if c is not None else None
        if node is None or node.handler != "sysctl":
            raise OSError(errno.EACCES, rel)
        n = sysctl.write(c, pid, uid, gid, rel[len("proc/sys/"):], data, self.allow_push, offset)
        self.save(c)             # per-container values survive a server restart
        return n

    def readlink(self, nodeid: int) -> bytes:
        c, rel = self._node(nodeid)
        if c is None or not rel.startswith(tree.CPU_DIR):
            raise OSError(errno.EINVAL, rel)
        return os.fsencode(os.readlink(tree.host_path(rel)))

    def readdir(self, nodeid: int, pid: int, uid: int = 0) -> list[tuple[int, str, int]]:
        """[(ino, name, dtype)] including . and .. (at the root: the containers the reader may use)"""
        c, rel = self._node(nodeid)
        out = [(nodeid, ".", proto.DT_DIR), (nodeid, "..", proto.DT_DIR)]
        if c is None:
            return out + [((idx << 32) | 1, key, proto.DT_DIR) for key, idx in list(self.by_key.items())
                          if idx in self.by_idx and self.may_use(self.by_idx[idx], uid, pid)]
        node = self.resolve(c, rel, pid)
        if node is None:
            raise OSError(errno.ENOENT, rel)
        if node.handler == "sysctl":
            entries = [(name, kind) for name, kind in sysctl.listdir(c, pid, rel[len("proc/sys/"):]
                                                                   if rel != "proc/sys" else "")]
        else:
            entries = []
            for name in tree.listdir(rel, node, self._cpus(c)):
                child = self.resolve(c, f"{rel}/{name}" if rel else name, pid)
                if child is not None:
                    entries.append((name, child.kind))
        dtypes = {"dir": proto.DT_DIR, "file": proto.DT_REG, "link": proto.DT_LNK}
        for name, kind in entries:
            out.append((self._nodeid(c, f"{rel}/{name}" if rel else name), name, dtypes[kind]))
        return out

    def _sysctl_read(self, c: Container, rel: str, pid: int, offset: int) -> bytes:
        """The value as the reader sees it; a read past the start (the reader's EOF probe or
        the rest of a long value) is served from the first read's copy."""
        now = time.monotonic()
        key = (c.key, rel, pid)
        hit = self.sysctl_reads.get(key)
        if offset and hit is not None and now - hit[0] < FRESH:
            return hit[1]
        data = sysctl.read(c, pid, rel[len("proc/sys/"):])
        if len(self.sysctl_reads) > 4096:
            self.sysctl_reads.clear()
        self.sysctl_reads[key] = (now, data)
        return data

    # -- rendering --
    def _module(self, rel: str):
        name = tree.PROCFILES[rel]
        mod = self.modules.get(name)
        if mod is None:
            mod = self.modules[name] = importlib.import_module(f"isobox.daemon.fs.procfiles.{name}")
        return mod

    def _ctx(self, c: Container, pid: int, view) -> RenderCtx:
        return RenderCtx(container=c, view=view or self.container_view(c), reader_pid=pid, loads=self.loads)

    def container_view(self, c: Container) -> CgroupView:
        view = self.cviews.get(c.key)
        if view is None:
            view = self.cviews[c.key] = view_for_dirs(c.cgroups)
        return view

    def reader_view(self, c: Container, pid: int):
        """The reader's own view when it sits in a sub-cgroup of the container, else None
        (cached per pid for FRESH seconds: the lookup reads /proc/<pid>/cgroup)."""
        now = time.monotonic()
        hit = self.views.get((c.key, pid))
        if hit is not None and now - hit[0] < FRESH:
            return hit[1]
        try:
            view = reader_view(pid, self.container_view(c))
        except OSError:
            view = None
        if len(self.views) > 4096:
            self.views.clear()
        self.views[(c.key, pid)] = (now, view)
        return view

    def _current(self, nodeid: int, c: Container, rel: str, refresh: bool) -> Snapshot:
        """The rendering to serve. A stale one is replaced only while no page of it can be
        in the kernel's cache, so a size the kernel was told always matches its pages."""
        snap = self.snaps.get(nodeid)
        now = time.monotonic()
        if snap is None or (refresh and not snap.in_kernel and now - snap.at >= FRESH):
            snap = self.snaps[nodeid] = Snapshot(self._render(c, rel), now)
        return snap

    def _render(self, c: Container, rel: str) -> bytes:
        return self._module(rel).render(self._ctx(c, 0, None))

    def invalidate(self, nodeid: int) -> None:
        try:
            self.notify(proto.notify(proto.NOTIFY_INVAL_INODE, proto.INVAL_INODE.pack(nodeid, 0, -1)))
        except OSError:
            pass     # ENOENT: the kernel has no such inode (never looked up or forgotten)

    def sweep(self) -> None:
        """Sends the pending invalidations and drops page-cache copies older than FRESH
        (the notifier thread calls it every FRESH / 2 seconds)."""
        while self.pending:
            self.invalidate(self.pending.pop())
        now = time.monotonic()
        for nodeid, snap in list(self.snaps.items()):
            if snap.in_kernel and now - snap.at >= FRESH:
                snap.in_kernel = False
                self.invalidate(nodeid)
