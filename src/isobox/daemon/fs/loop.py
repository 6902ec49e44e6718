"""The /dev/fuse request loop: read a request, dispatch on its opcode, write the reply.

Several threads read the same fd (the kernel hands each request to one reader). No reply
depends on state kept between requests beyond what Filesystem rebuilds from its database,
so a new server can take over the connection at any request boundary."""
from __future__ import annotations

import errno
import logging
import os
import threading

from isobox.daemon.fs import proto
from isobox.daemon.fs.filesystem import Filesystem

log = logging.getLogger("isoboxd")
NO_REPLY = (proto.FORGET, proto.BATCH_FORGET, proto.INTERRUPT)
# asked once; ENOSYS makes the kernel stop asking (flush, xattrs, access with default_permissions)
ENOSYS_OPS = (proto.FLUSH, proto.GETXATTR, proto.LISTXATTR, proto.ACCESS)
# the tree is the kernel's and the emulation's, never the caller's: procfs answers EACCES
CHANGE_OPS = (proto.SYMLINK, proto.MKNOD, proto.MKDIR, proto.UNLINK, proto.RMDIR, proto.RENAME, proto.LINK,
              proto.CREATE, proto.RENAME2)
# what reveals or changes nothing of a container; every other request on a container's node
# comes from host root or from a process of that container, or is refused (Filesystem.admit)
UNGATED = (proto.INIT, proto.DESTROY, proto.STATFS, proto.RELEASE, proto.RELEASEDIR)


def init_reply(unique: int, body: bytes) -> tuple[bytes, int]:
    """Answers FUSE_INIT; returns (reply, negotiated minor)."""
    major, minor, max_readahead, flags = proto.INIT_IN.unpack_from(body)
    if major != 7:
        return proto.error(unique, errno.EPROTO), 0
    minor = min(minor, 41)
    out = proto.INIT_OUT.pack(7, minor, max_readahead, flags & proto.WANTED_FLAGS, 16, 12, proto.MAX_WRITE, 1,
                              proto.MAX_WRITE // 4096 * 2, 0, 0, 0)
    return proto.reply(unique, out), minor


class Loop:
    def __init__(self, fd: int, fs: Filesystem):
        self.fd = fd
        self.fs = fs
        self.stopped = threading.Event()

    def serve(self) -> None:
        """One worker: runs until the connection goes away (unmount or abort)."""
        fd = self.fd
        while not self.stopped.is_set():
            try:
                req = os.read(fd, proto.READ_BUFFER)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:        # the request was interrupted before we read it
                    continue
                if e.errno == errno.ENODEV:        # unmounted
                    self.stopped.set()
                    return
                raise
            out = self.handle(req)
            if out is not None:
                try:
                    os.write(fd, out)
                except OSError as e:
                    if e.errno != errno.ENOENT:    # ENOENT: the caller was interrupted meanwhile
                        log.warning("reply failed: %s", e)

    def handle(self, req: bytes) -> bytes | None:
        _len, op, unique, nodeid, uid, gid, pid, _ext, _pad = proto.IN_HEADER.unpack_from(req)
        body = memoryview(req)[proto.IN_HEADER.size:]
        if op in NO_REPLY:
            return None
        try:
            if op not in UNGATED:
                self.fs.admit(nodeid, uid, pid)
            return proto.reply(unique, self.dispatch(op, nodeid, body, uid, gid, pid))
        except OSError as e:
            return proto.error(unique, e.errno or errno.EIO)
        except KeyError:
            return proto.error(unique, errno.ENOENT)     # a node of an unregistered container
        except Exception:  # noqa: BLE001 - no request may take the daemon down
            log.exception("opcode %d on node %d failed", op, nodeid)
            return proto.error(unique, errno.EIO)

    def dispatch(self, op: int, nodeid: int, body: memoryview, uid: int, gid: int, pid: int) -> bytes:
        fs = self.fs
        if op == proto.OPEN or op == proto.OPENDIR:
            flags = proto.OPEN_IN.unpack_from(body)[0]
            if op == proto.OPENDIR:
                return proto.OPEN_OUT.pack(0, 0, 0)
            fh, oflags = fs.open(nodeid, flags, pid)
            return proto.OPEN_OUT.pack(fh, oflags, 0)
        if op == proto.READ:
            fh, offset, size, _ = proto.READ_IN.unpack_from(body)
            return fs.read(nodeid, fh, offset, size, pid)
        if op == proto.LOOKUP:
            return fs.lookup(nodeid, bytes(body).rstrip(b"\0").decode("utf-8", "surrogateescape"), pid, uid)
        if op == proto.GETATTR:
            return fs.getattr(nodeid, pid)
        if op == proto.RELEASE or op == proto.RELEASEDIR:
            return b""
        if op == proto.READDIR:
            fh, offset, size, _ = proto.READ_IN.unpack_from(body)
            return self.readdir(nodeid, offset, size, pid, uid)
        if op == proto.WRITE:
            _fh, offset, size, _wf, _lo, _fl, _pad = proto.WRITE_IN.unpack_from(body)
            data = bytes(body[proto.WRITE_IN.size:proto.WRITE_IN.size + size])
            return proto.WRITE_OUT.pack(fs.write(nodeid, offset, data, pid, uid, gid), 0)
        if op == proto.SETATTR:
            valid = int.from_bytes(body[:4], "little")
            return fs.setattr(nodeid, valid, pid)
        if op == proto.READLINK:
            return fs.readlink(nodeid)
        if op == proto.STATFS:
            return proto.STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096)
        if op == proto.INIT:
            raise OSError(errno.EPROTO, "second INIT")
        if op in ENOSYS_OPS:
            raise OSError(errno.ENOSYS, "")
        if op in CHANGE_OPS:
            raise OSError(errno.EACCES, "")
        if op == proto.DESTROY:
            self.stopped.set()
            return b""
        raise OSError(errno.ENOSYS, f"opcode {op}")

    def readdir(self, nodeid: int, offset: int, size: int, pid: int, uid: int = 0) -> bytes:
        out = bytearray()
        for i, (ino, name, dtype) in enumerate(self.fs.readdir(nodeid, pid, uid)):
            if i < offset:
                continue
            rec = proto.dirent(ino, i + 1, os.fsencode(name), dtype)
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)
