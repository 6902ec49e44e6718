"""isoboxd's FUSE server without a mount: the wire structs, Loop.handle() on crafted request
bytes, the Filesystem cache policy over a real Store and the test process's own (read-only)
cgroups, tree.resolve, product_uuid and the Store's ids."""
from __future__ import annotations

import errno
import os
import re
import struct
import time

import pytest

from isobox.cgroups.layout import detect, parse_cgroup_file
from isobox.daemon.fs import proto, tree
from isobox.daemon.fs.context import Container, RenderCtx
from isobox.daemon.fs.filesystem import FRESH, LONG, Filesystem
from isobox.daemon.fs.loop import Loop, init_reply
from isobox.daemon.fs.procfiles import product_uuid
from isobox.daemon.store import FIRST_PATH_ID, Store

PID = os.getpid()


# -- helpers ---------------------------------------------------------------------------------

def own_cgroups() -> dict[str, str]:
    """Host dirs of this process's v1 memory, cpuset, cpu and cpuacct cgroups (read only)."""
    layout = detect()
    paths = parse_cgroup_file(open("/proc/self/cgroup").read())
    out = {}
    for ctrl in ("memory", "cpuset", "cpu", "cpuacct"):
        h = layout.hierarchy(ctrl)
        if h is None or h.version != 1 or ctrl not in paths:
            pytest.skip(f"needs a v1 {ctrl} hierarchy")
        p = paths[ctrl]
        if h.root != "/":
            if not (p == h.root or p.startswith(h.root.rstrip("/") + "/")):
                pytest.skip(f"{ctrl} cgroup outside the mounted subtree")
            p = p[len(h.root):] or "/"
        d = os.path.normpath(h.mountpoint + "/" + p.lstrip("/"))
        assert os.path.isdir(d), d
        out[ctrl] = d
    return out


def container(key: str = "k1", cid: str = "c1", cgroups: dict | None = None, base: int = 100000) -> Container:
    return Container(key=key, id=cid, uid_base=base, gid_base=base + 1,
                     cgroups=own_cgroups() if cgroups is None else cgroups)


class Env:
    def __init__(self, tmp_path):
        self.db = str(tmp_path / "db")
        self.notes: list[bytes] = []
        self.fs = Filesystem(Store(self.db), self.notes.append)
        self.loop = Loop(-1, self.fs)


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def req(op: int, nodeid: int = proto.ROOT_ID, body: bytes = b"", unique: int = 77, uid: int = 0, gid: int = 0,
        pid: int = PID) -> bytes:
    return proto.IN_HEADER.pack(proto.IN_HEADER.size + len(body), op, unique, nodeid, uid, gid, pid, 0, 0) + body


def parse_reply(out: bytes) -> tuple[int, int, bytes]:
    """(error, unique, payload); checks the length field."""
    ln, err, unique = proto.OUT_HEADER.unpack_from(out)
    assert ln == len(out)
    return err, unique, out[proto.OUT_HEADER.size:]


def ok(out: bytes | None, unique: int = 77) -> bytes:
    assert out is not None
    err, u, payload = parse_reply(out)
    assert u == unique
    assert err == 0, f"error {-err} ({errno.errorcode.get(-err)})"
    return payload


def err_of(out: bytes | None) -> int:
    assert out is not None
    err, _u, payload = parse_reply(out)
    assert payload == b""
    return -err


def read_in(offset: int, size: int, fh: int = 0) -> bytes:
    # the full 40-byte fuse_read_in: fh offset size read_flags lock_owner flags padding
    return proto.READ_IN.pack(fh, offset, size, 0) + struct.pack("<QII", 0, 0, 0)


def lookup_body(name: str) -> bytes:
    return name.encode() + b"\0"


def parse_dirents(buf: bytes) -> list[tuple[int, int, str, int, int]]:
    """[(ino, off, name, type, reclen)]"""
    out, pos = [], 0
    while pos < len(buf):
        ino, off, namelen, dtype = proto.DIRENT.unpack_from(buf, pos)
        name = buf[pos + 24:pos + 24 + namelen].decode()
        reclen = (24 + namelen + 7) // 8 * 8
        assert buf[pos + 24 + namelen:pos + reclen] == b"\0" * (reclen - 24 - namelen)
        out.append((ino, off, name, dtype, reclen))
        pos += reclen
    assert pos == len(buf)
    return out


def attr_fields(b: bytes, off: int = 0) -> dict:
    names = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec", "ctimensec", "mode",
             "nlink", "uid", "gid", "rdev", "blksize", "flags")
    return dict(zip(names, proto.ATTR.unpack_from(b, off)))


def entry(fs: Filesystem, parent: int, name: str) -> tuple[int, dict, int]:
    """(nodeid, attr, entry_valid) of a LOOKUP answered by fs."""
    e = fs.lookup(parent, name, PID)
    nodeid, gen, ev, av, _evn, _avn = proto.ENTRY_OUT.unpack_from(e)
    assert gen == 0 and ev == av
    return nodeid, attr_fields(e, proto.ENTRY_OUT.size), ev


def walk(fs: Filesystem, key: str, rel: str) -> int:
    nodeid = entry(fs, proto.ROOT_ID, key)[0]
    for part in rel.split("/"):
        nodeid = entry(fs, nodeid, part)[0]
    return nodeid


def nodeid_via_readdir(fs: Filesystem, key: str, rel: str) -> int:
    """The nodeid of rel as READDIR hands it out (no LOOKUP, so nothing rendered yet)."""
    d, name = rel.rsplit("/", 1)
    parent = walk(fs, key, d)
    return next(ino for ino, n, _t in fs.readdir(parent, PID) if n == name)


def notes_of(notes: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for n in notes:
        ln, code, unique = proto.OUT_HEADER.unpack_from(n)
        assert ln == len(n) and unique == 0
        out.append((code, n[proto.OUT_HEADER.size:]))
    return out


# -- proto -----------------------------------------------------------------------------------

def test_struct_sizes_match_kernel_abi():
    assert proto.IN_HEADER.size == 40
    assert proto.OUT_HEADER.size == 16
    assert proto.ATTR.size == 88
    assert proto.ENTRY_OUT.size + proto.ATTR.size == 128
    assert proto.ATTR_OUT.size + proto.ATTR.size == 104
    assert proto.INIT_IN.size == 16
    assert proto.INIT_OUT.size == 64
    assert proto.OPEN_OUT.size == 16
    assert proto.OPEN_IN.size == 8
    assert proto.READ_IN.size >= 24          # the prefix we read of the 40-byte fuse_read_in
    assert proto.WRITE_IN.size == 40
    assert proto.WRITE_OUT.size == 8
    assert proto.STATFS_OUT.size == 80       # struct fuse_kstatfs
    assert proto.DIRENT.size == 24
    assert proto.INVAL_INODE.size == 24
    assert proto.INVAL_ENTRY.size == 16


def test_in_header_field_offsets():
    h = proto.IN_HEADER.pack(1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert struct.unpack_from("<I", h, 0)[0] == 1       # len
    assert struct.unpack_from("<I", h, 4)[0] == 2       # opcode
    assert struct.unpack_from("<Q", h, 8)[0] == 3       # unique
    assert struct.unpack_from("<Q", h, 16)[0] == 4      # nodeid
    assert struct.unpack_from("<III", h, 24) == (5, 6, 7)   # uid gid pid
    assert struct.unpack_from("<HH", h, 36) == (8, 9)   # total_extlen padding


def test_reply_error_notify_encoding():
    r = proto.reply(0x1122334455, b"abc")
    assert r == struct.pack("<IiQ", 19, 0, 0x1122334455) + b"abc"
    assert proto.reply(5) == struct.pack("<IiQ", 16, 0, 5)
    e = proto.error(9, errno.ENOENT)
    assert e == struct.pack("<IiQ", 16, -errno.ENOENT, 9)
    assert proto.OUT_HEADER.unpack(e)[1] == -2
    n = proto.notify(proto.NOTIFY_INVAL_INODE, proto.INVAL_INODE.pack(42, 0, -1))
    assert n[:16] == struct.pack("<IiQ", 16 + 24, proto.NOTIFY_INVAL_INODE, 0)
    assert struct.unpack_from("<Qqq", n, 16) == (42, 0, -1)


def test_attr_fields_and_offsets():
    a = proto.attr(0xABCDEF, 1000, proto.S_IFREG | 0o444, 100000, 100001, nlink=3, mtime=1234)
    f = attr_fields(a)
    assert f == {"ino": 0xABCDEF, "size": 1000, "blocks": 2, "atime": 1234, "mtime": 1234, "ctime": 1234,
                 "atimensec": 0, "mtimensec": 0, "ctimensec": 0, "mode": proto.S_IFREG | 0o444, "nlink": 3,
                 "uid": 100000, "gid": 100001, "rdev": 0, "blksize": 4096, "flags": 0}
    # kernel offsets of struct fuse_attr
    assert struct.unpack_from("<Q", a, 8)[0] == 1000
    assert struct.unpack_from("<I", a, 60)[0] == proto.S_IFREG | 0o444
    assert struct.unpack_from("<III", a, 64) == (3, 100000, 100001)
    assert struct.unpack_from("<I", a, 80)[0] == 4096
    assert attr_fields(proto.attr(1, 0, 0, 0, 0))["blocks"] == 0
    assert attr_fields(proto.attr(1, 512, 0, 0, 0))["blocks"] == 1
    assert attr_fields(proto.attr(1, 513, 0, 0, 0))["blocks"] == 2


@pytest.mark.parametrize("n", range(1, 18))
def test_dirent_padded_to_8(n):
    name = b"x" * n
    d = proto.dirent(7, 3, name, proto.DT_REG)
    assert len(d) % 8 == 0
    assert len(d) == (24 + n + 7) // 8 * 8
    assert proto.DIRENT.unpack_from(d) == (7, 3, n, proto.DT_REG)
    assert d[24:24 + n] == name and set(d[24 + n:]) <= {0}


# -- loop: INIT ------------------------------------------------------------------------------

def test_init_reply_caps_minor_masks_flags():
    flags = 0xFFFFFFFF
    out, minor = init_reply(3, proto.INIT_IN.pack(7, 44, 131072, flags) + b"\0" * 48)
    assert minor == 41
    payload = ok(out, 3)
    assert len(payload) == 64
    major, mi, readahead, oflags, max_bg, congestion, max_write, time_gran, max_pages, _align, flags2, _stack = \
        proto.INIT_OUT.unpack(payload)
    assert (major, mi, readahead) == (7, 41, 131072)
    assert oflags == proto.WANTED_FLAGS
    assert not oflags & proto.INIT_EXT
    assert max_write == proto.MAX_WRITE == struct.unpack_from("<I", payload, 20)[0]
    assert max_pages * 4096 >= max_write
    assert time_gran == 1 and flags2 == 0
    assert proto.READ_BUFFER >= proto.MAX_WRITE + 4096


def test_init_reply_keeps_lower_minor_and_offered_flags_only():
    out, minor = init_reply(4, proto.INIT_IN.pack(7, 38, 4096, proto.ASYNC_READ | proto.INIT_EXT))
    assert minor == 38
    payload = ok(out, 4)
    assert proto.INIT_OUT.unpack(payload)[1] == 38
    assert proto.INIT_OUT.unpack(payload)[3] == proto.ASYNC_READ


def test_init_reply_wrong_major():
    out, minor = init_reply(5, proto.INIT_IN.pack(8, 0, 0, 0))
    assert minor == 0
    assert err_of(out) == errno.EPROTO


def test_second_init_is_eproto(env):
    assert err_of(env.loop.handle(req(proto.INIT, body=proto.INIT_IN.pack(7, 41, 0, 0)))) == errno.EPROTO


# -- loop: opcodes ---------------------------------------------------------------------------

def test_unknown_opcode_enosys(env):
    assert err_of(env.loop.handle(req(4242))) == errno.ENOSYS
    assert err_of(env.loop.handle(req(19))) == errno.ENOSYS   # FSYNC: not handled


@pytest.mark.parametrize("op", [proto.FLUSH, proto.GETXATTR, proto.LISTXATTR, proto.ACCESS])
def test_enosys_ops(env, op):
    assert err_of(env.loop.handle(req(op, body=b"\0" * 16))) == errno.ENOSYS


@pytest.mark.parametrize("op", [proto.FORGET, proto.BATCH_FORGET, proto.INTERRUPT])
def test_no_reply_ops(env, op):
    assert env.loop.handle(req(op, body=b"\0" * 16)) is None


@pytest.mark.parametrize("op", [proto.CREATE, proto.MKDIR, proto.UNLINK, proto.RMDIR, proto.RENAME,
                                proto.SYMLINK, proto.MKNOD, proto.LINK, proto.RENAME2])
def test_change_ops_eacces(env, op):
    env.fs.register(container())
    nodeid = walk(env.fs, "k1", "proc")
    assert err_of(env.loop.handle(req(op, nodeid, b"\0" * 16 + b"x\0"))) == errno.EACCES
    assert err_of(env.loop.handle(req(op, proto.ROOT_ID, b"\0" * 16 + b"x\0"))) == errno.EACCES


def test_statfs_release_destroy(env):
    p = ok(env.loop.handle(req(proto.STATFS)))
    assert len(p) == 80
    assert struct.unpack_from("<III", p, 40) == (4096, 255, 4096)
    assert ok(env.loop.handle(req(proto.RELEASE, body=b"\0" * 24))) == b""
    assert ok(env.loop.handle(req(proto.RELEASEDIR, body=b"\0" * 24))) == b""
    assert not env.loop.stopped.is_set()
    assert ok(env.loop.handle(req(proto.DESTROY))) == b""
    assert env.loop.stopped.is_set()


def test_root_getattr_and_opendir(env):
    p = ok(env.loop.handle(req(proto.GETATTR, body=b"\0" * 16)))
    valid, _ns, _dummy = proto.ATTR_OUT.unpack_from(p)
    a = attr_fields(p, proto.ATTR_OUT.size)
    assert valid == LONG
    assert a["ino"] == proto.ROOT_ID and a["mode"] == proto.S_IFDIR | 0o711 and a["nlink"] == 2
    assert proto.OPEN_OUT.unpack(ok(env.loop.handle(req(proto.OPENDIR, body=proto.OPEN_IN.pack(0, 0))))) == \
        (0, 0, 0)


def test_lookup_unknown_name_in_root_enoent(env):
    env.fs.register(container())
    assert err_of(env.loop.handle(req(proto.LOOKUP, proto.ROOT_ID, lookup_body("nope")))) == errno.ENOENT
    assert err_of(env.loop.handle(req(proto.LOOKUP, proto.ROOT_ID, lookup_body("proc")))) == errno.ENOENT


def test_lookup_registered_key(env):
    env.fs.register(container("k1"))
    idx = env.fs.register(container("k2", "c2", base=200000))
    assert idx == 2
    p = ok(env.loop.handle(req(proto.LOOKUP, proto.ROOT_ID, lookup_body("k2"))))
    assert len(p) == 128
    nodeid, gen, ev, av, _, _ = proto.ENTRY_OUT.unpack_from(p)
    assert nodeid == (2 << 32) | 1
    assert gen == 0 and ev == av == 0       # asked again on every walk: who asks is checked each time
    a = attr_fields(p, 40)
    assert a["ino"] == nodeid
    assert a["mode"] == proto.S_IFDIR | 0o555
    assert (a["uid"], a["gid"]) == (200000, 200001)
    # and a child of it, through the loop
    p = ok(env.loop.handle(req(proto.LOOKUP, nodeid, lookup_body("proc"))))
    child = proto.ENTRY_OUT.unpack_from(p)[0]
    assert child >> 32 == 2 and child & 0xFFFFFFFF >= FIRST_PATH_ID
    assert err_of(env.loop.handle(req(proto.LOOKUP, nodeid, lookup_body("etc")))) == errno.ENOENT


def readdir_req(env, nodeid, offset, size):
    return parse_dirents(ok(env.loop.handle(req(proto.READDIR, nodeid, read_in(offset, size)))))


def test_readdir_root_lists_containers(env):
    env.fs.register(container("k1"))
    env.fs.register(container("k2", "c2"))
    ents = readdir_req(env, proto.ROOT_ID, 0, 4096)
    assert [(e[2], e[0], e[3]) for e in ents] == [
        (".", 1, proto.DT_DIR), ("..", 1, proto.DT_DIR),
        ("k1", (1 << 32) | 1, proto.DT_DIR), ("k2", (2 << 32) | 1, proto.DT_DIR)]
    assert [e[1] for e in ents] == [1, 2, 3, 4]


def test_readdir_offsets_and_size(env):
    env.fs.register(container())
    proc = walk(env.fs, "k1", "proc")
    full = readdir_req(env, proc, 0, 1 << 16)
    names = [e[2] for e in full]
    assert names[:2] == [".", ".."]
    assert names[2:] == list(tree.STATIC_DIRS["proc"])
    assert [e[1] for e in full] == list(range(1, len(full) + 1))
    assert full[0][0] == full[1][0] == proc
    types = {e[2]: e[3] for e in full}
    assert types["meminfo"] == proto.DT_REG and types["sys"] == proto.DT_DIR
    # resuming at each offset gives exactly the remaining entries
    for off in range(len(full) + 1):
        assert readdir_req(env, proc, off, 1 << 16) == full[off:]
    # a buffer that fits only the first records: whole records only, never over the size
    size = full[0][4] + full[1][4] + full[2][4] + 7
    part = ok(env.loop.handle(req(proto.READDIR, proc, read_in(0, size))))
    assert len(part) <= size
    assert parse_dirents(part) == full[:3]
    # then continuing from the last off seen
    rest = readdir_req(env, proc, full[2][1], 1 << 16)
    assert rest == full[3:]
    # a buffer too small for one record: empty reply (end of directory for the kernel only at the end)
    assert ok(env.loop.handle(req(proto.READDIR, proc, read_in(0, 8)))) == b""
    # ids from readdir are those of lookup
    assert dict((e[2], e[0]) for e in full)["meminfo"] == walk(env.fs, "k1", "proc/meminfo")


def test_node_of_unregistered_container_enoent(env):
    env.fs.register(container())
    for op, body in ((proto.GETATTR, b"\0" * 16), (proto.LOOKUP, lookup_body("proc")),
                     (proto.OPEN, proto.OPEN_IN.pack(0, 0)), (proto.READ, read_in(0, 4096)),
                     (proto.READDIR, read_in(0, 4096))):
        assert err_of(env.loop.handle(req(op, (9 << 32) | 1, body))) == errno.ENOENT, op
    # a path id nobody handed out
    assert err_of(env.loop.handle(req(proto.GETATTR, (1 << 32) | 0xFFFFFF, b"\0" * 16))) == errno.ENOENT
    # and a container that was registered, then removed
    proc = walk(env.fs, "k1", "proc")
    assert env.fs.unregister("k1")
    assert err_of(env.loop.handle(req(proto.GETATTR, proc, b"\0" * 16))) == errno.ENOENT
    assert err_of(env.loop.handle(req(proto.GETATTR, (1 << 32) | 1, b"\0" * 16))) == errno.ENOENT


def test_handler_exception_is_eio_and_loop_survives(env, monkeypatch):
    env.fs.register(container())
    # a truncated OPEN body: struct.error inside the dispatcher
    assert err_of(env.loop.handle(req(proto.OPEN, (1 << 32) | 1, b"\0\0"))) == errno.EIO

    def boom(*_a):
        raise RuntimeError("handler bug")
    monkeypatch.setattr(env.fs, "getattr", boom)
    assert err_of(env.loop.handle(req(proto.GETATTR, (1 << 32) | 1, b"\0" * 16, unique=5))) == errno.EIO
    assert parse_reply(env.loop.handle(req(proto.GETATTR, (1 << 32) | 1, b"\0" * 16, unique=5)))[1] == 5
    monkeypatch.undo()
    assert not env.loop.stopped.is_set()
    ok(env.loop.handle(req(proto.GETATTR, (1 << 32) | 1, b"\0" * 16)))


def test_read_through_loop(env):
    env.fs.register(container())
    n = walk(env.fs, "k1", "sys/devices/virtual/dmi/id/product_uuid")
    fh, oflags, _ = proto.OPEN_OUT.unpack(ok(env.loop.handle(req(proto.OPEN, n, proto.OPEN_IN.pack(os.O_RDONLY, 0)))))
    # lookup rendered it, but only an OPEN vouches for the kernel's pages (they may be a
    # previous server's): the first open bypasses the cache
    assert fh == 0 and oflags & proto.FOPEN_DIRECT_IO
    data = ok(env.loop.handle(req(proto.READ, n, read_in(0, 4096, fh))))
    assert re.fullmatch(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\n", data)
    assert ok(env.loop.handle(req(proto.READ, n, read_in(5, 3, fh)))) == data[5:8]
    assert ok(env.loop.handle(req(proto.READ, n, read_in(len(data), 4096, fh)))) == b""
    assert err_of(env.loop.handle(req(proto.READ, walk(env.fs, "k1", "proc"), read_in(0, 10)))) == errno.EISDIR
    # a write to a procfile is refused
    wr = proto.WRITE_IN.pack(0, 0, 2, 0, 0, 0, 0) + b"1\n"
    assert err_of(env.loop.handle(req(proto.WRITE, n, wr))) == errno.EACCES


# -- filesystem: cache policy ----------------------------------------------------------------

MEMINFO = "proc/meminfo"
UUID = "sys/devices/virtual/dmi/id/product_uuid"


def test_first_open_direct_io_then_sweep_notifies(env):
    fs = env.fs
    fs.register(container())
    n = nodeid_via_readdir(fs, "k1", MEMINFO)
    assert n not in fs.snaps
    fh, flags = fs.open(n, os.O_RDONLY, PID)
    assert (fh, flags) == (0, proto.FOPEN_DIRECT_IO | proto.FOPEN_NOFLUSH)
    assert fs.pending == [n]
    assert fs.snaps[n].data.startswith(b"MemTotal:")
    assert env.notes == []        # never notified from the FUSE worker itself
    fs.sweep()
    assert fs.pending == []
    assert notes_of(env.notes) == [(proto.NOTIFY_INVAL_INODE, proto.INVAL_INODE.pack(n, 0, -1))]
    assert len(env.notes[0]) == 16 + 24


def test_second_open_within_fresh_keeps_cache(env):
    fs = env.fs
    fs.register(container())
    n = nodeid_via_readdir(fs, "k1", MEMINFO)
    fs.open(n, os.O_RDONLY, PID)
    snap = fs.snaps[n]
    fh, flags = fs.open(n, os.O_RDONLY, PID)
    assert fh == 0
    assert flags & proto.FOPEN_KEEP_CACHE and not flags & proto.FOPEN_DIRECT_IO
    assert fs.snaps[n] is snap            # not re-rendered
    assert fs.pending == [n]              # only the first open queued an invalidation


def test_open_after_fresh_same_size_noflush(env):
    fs = env.fs
    fs.register(container())
    n = nodeid_via_readdir(fs, "k1", UUID)   # deterministic rendering: same size every time
    fs.open(n, os.O_RDONLY, PID)
    fs.sweep()
    old = fs.snaps[n]
    time.sleep(FRESH + 0.01)
    fh, flags = fs.open(n, os.O_RDONLY, PID)
    assert (fh, flags) == (0, proto.FOPEN_NOFLUSH)
    assert fs.snaps[n] is not old and fs.snaps[n].data == old.data
    assert fs.pending == []


def test_open_after_fresh_meminfo_rerenders(env):
    fs = env.fs
    fs.register(container())
    n = nodeid_via_readdir(fs, "k1", MEMINFO)
    fs.open(n, os.O_RDONLY, PID)
    fs.sweep()
    size = len(fs._render(fs.by_idx[1], MEMINFO))
    fs.snaps[n].data = b"x" * size           # what was served before, same size, other bytes
    fs.snaps[n].at -= FRESH                  # and rendered FRESH ago
    fh, flags = fs.open(n, os.O_RDONLY, PID)
    new = fs.snaps[n]
    assert new.data.startswith(b"MemTotal:")             # re-rendered
    assert fh == 0
    if len(new.data) == size:
        assert flags == proto.FOPEN_NOFLUSH and fs.pending == []
    else:       # a value changed its number of digits between the two renderings
        assert flags == proto.FOPEN_DIRECT_IO | proto.FOPEN_NOFLUSH and fs.pending == [n]


def test_open_after_fresh_size_changed_direct_io(env):
    fs = env.fs
    fs.register(container())
    n = nodeid_via_readdir(fs, "k1", MEMINFO)
    fs.open(n, os.O_RDONLY, PID)
    fs.sweep()
    env.notes.clear()
    fs.snaps[n].data = b"short\n"
    fs.snaps[n].at = float("-inf")
    fh, flags = fs.open(n, os.O_RDONLY, PID)
    assert (fh, flags) == (0, proto.FOPEN_DIRECT_IO | proto.FOPEN_NOFLUSH)
    assert fs.pending == [n]
    assert fs.snaps[n].data.startswith(b"MemTotal:")
    fs.sweep()
    assert notes_of(env.notes) == [(proto.NOTIFY_INVAL_INODE, proto.INVAL_INODE.pack(n, 0, -1))]


@pytest.mark.parametrize("mode", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC])
def test_open_procfile_for_write_eacces(env, mode):
    fs = env.fs
    fs.register(container())
    for rel in (MEMINFO, UUID):
        n = walk(fs, "k1", rel)
        with pytest.raises(OSError) as e:
            fs.open(n, mode, PID)
        assert e.value.errno == errno.EACCES
        r = env.loop.handle(req(proto.OPEN, n, proto.OPEN_IN.pack(mode, 0)))
        assert err_of(r) == errno.EACCES


def test_getattr_size_matches_read_without_rerender(env):
    fs = env.fs
    fs.register(container())
    n = walk(fs, "k1", MEMINFO)
    p = fs.getattr(n, PID)
    valid = proto.ATTR_OUT.unpack_from(p)[0]
    a = attr_fields(p, proto.ATTR_OUT.size)
    snap = fs.snaps[n]
    assert valid == LONG
    assert a["size"] == len(snap.data) > 0
    assert a["mode"] == proto.S_IFREG | 0o444 and a["ino"] == n
    time.sleep(FRESH + 0.01)      # a re-rendering now would differ (MemFree moves): read must not do one
    data = fs.read(n, 0, 0, 1 << 20, PID)
    assert fs.snaps[n] is snap
    assert data == snap.data and len(data) == a["size"]
    assert fs.read(n, 0, 10, 7, PID) == snap.data[10:17]
    assert snap.in_kernel
    # while pages of it may be cached, getattr keeps reporting their size
    p2 = fs.getattr(n, PID)
    assert attr_fields(p2, proto.ATTR_OUT.size)["size"] == len(data)
    assert fs.snaps[n] is snap
    # the sweeper drops those pages, after which getattr may re-render
    fs.sweep()
    assert not snap.in_kernel
    assert notes_of(env.notes) == [(proto.NOTIFY_INVAL_INODE, proto.INVAL_INODE.pack(n, 0, -1))]
    p3 = fs.getattr(n, PID)
    assert fs.snaps[n] is not snap
    assert attr_fields(p3, proto.ATTR_OUT.size)["size"] == len(fs.snaps[n].data)
    assert fs.read(n, 0, 0, 1 << 20, PID) == fs.snaps[n].data


def test_lookup_attrs_and_modes(env):
    fs = env.fs
    fs.register(container())
    n, a, ev = entry(fs, walk(fs, "k1", "sys/devices/virtual/dmi/id"), "product_uuid")
    assert a["mode"] == proto.S_IFREG | 0o400 and ev == LONG
    assert a["size"] == 37 and (a["uid"], a["gid"]) == (100000, 100001)
    _n, a, _ev = entry(fs, walk(fs, "k1", "sys/kernel"), "debug")
    assert a["mode"] == proto.S_IFDIR | 0o700 and a["nlink"] == 2
    assert fs.readdir(_n, PID)[2:] == []
    _n, a, _ev = entry(fs, walk(fs, "k1", "sys/kernel"), "config")
    assert a["mode"] == proto.S_IFDIR | 0o755


def test_unregister_notifies_inval_entry(env):
    fs = env.fs
    fs.register(container("k1"))
    fs.register(container("key-2", "c2"))
    n = walk(fs, "key-2", MEMINFO)
    fs.open(n, os.O_RDONLY, PID)
    assert n in fs.snaps
    env.notes.clear()
    assert fs.unregister("key-2")
    assert n not in fs.snaps
    assert notes_of(env.notes) == [(proto.NOTIFY_INVAL_ENTRY,
                                    proto.INVAL_ENTRY.pack(proto.ROOT_ID, 5, 0) + b"key-2\0")]
    assert "key-2" not in fs.by_key and 2 not in fs.by_idx
    assert [k for _i, k in [(i, c.key) for i, c in fs.store.containers()]] == ["k1"]
    env.notes.clear()
    assert not fs.unregister("key-2")
    assert env.notes == []


def test_unregister_tolerates_enoent_from_kernel(tmp_path):
    def write(_b):
        raise OSError(errno.ENOENT, "never looked up")
    fs = Filesystem(Store(str(tmp_path / "db")), write)
    fs.register(container())
    assert fs.unregister("k1")


def test_node_ids_stable_across_restart(env, tmp_path):
    fs1 = env.fs
    fs1.register(container("k1"))
    fs1.register(container("k2", "c2"))
    ids1 = {rel: walk(fs1, "k2", rel) for rel in (MEMINFO, UUID, "proc", "sys/kernel/debug")}
    fs1.store.db.close()
    notes2: list[bytes] = []
    fs2 = Filesystem(Store(env.db), notes2.append)          # a new server on the same database
    # the new server answers for ids the old one handed out, before any lookup of its own
    p = fs2.getattr(ids1[MEMINFO], PID)
    a = attr_fields(p, proto.ATTR_OUT.size)
    assert a["ino"] == ids1[MEMINFO] and a["mode"] == proto.S_IFREG | 0o444
    assert a["size"] == len(fs2.snaps[ids1[MEMINFO]].data)
    assert fs2.read(ids1[UUID], 0, 0, 100, PID) == fs2._render(fs2.by_idx[2], UUID)
    # and hands out the same ids
    assert {rel: walk(fs2, "k2", rel) for rel in ids1} == ids1
    assert entry(fs2, proto.ROOT_ID, "k1")[0] == (1 << 32) | 1
    assert entry(fs2, proto.ROOT_ID, "k2")[0] == (2 << 32) | 1
    # the first open of a file the old server may have left in the page cache bypasses it
    fs3 = Filesystem(Store(env.db), notes2.append)
    assert fs3.open(ids1[MEMINFO], os.O_RDONLY, PID) == (0, proto.FOPEN_DIRECT_IO | proto.FOPEN_NOFLUSH)
    assert fs3.pending == [ids1[MEMINFO]]
    # a new path gets a new id, not one already handed out
    new = walk(fs2, "k2", "proc/cpuinfo")
    assert new not in ids1.values()


def test_reader_in_sub_cgroup_gets_direct_io(env):
    cg = own_cgroups()
    parent = os.path.dirname(cg["memory"])
    layout = detect()
    if os.path.normpath(cg["memory"]) == os.path.normpath(layout.hierarchy("memory").mountpoint):
        pytest.skip("this process sits in the memory hierarchy's root")
    fs = env.fs
    fs.register(container("kA", "cA", dict(cg, memory=parent)))
    n = walk(fs, "kA", MEMINFO)           # lookup rendered the container's snapshot
    fh, flags = fs.open(n, os.O_RDONLY, PID)
    assert (fh, flags) == (1, proto.FOPEN_DIRECT_IO)
    fs.pending.clear()
    data = fs.read(n, 1, 0, 1 << 20, PID)
    assert data.startswith(b"MemTotal:")
    # its rendering may now sit in the shared page cache: the next container open re-renders
    assert fs.snaps[n].at == float("-inf") and fs.pending == [n]


def test_reader_view_cache_is_per_container(env):
    cg = own_cgroups()
    layout = detect()
    if os.path.normpath(cg["memory"]) == os.path.normpath(layout.hierarchy("memory").mountpoint):
        pytest.skip("this process sits in the memory hierarchy's root")
    fs = env.fs
    fs.register(container("kA", "cA", dict(cg, memory=os.path.dirname(cg["memory"]))))
    fs.register(container("kB", "cB", cg))       # this process is in B's cgroup itself, not below it
    a, b = walk(fs, "kA", MEMINFO), walk(fs, "kB", MEMINFO)
    assert fs.open(a, os.O_RDONLY, PID)[0] == 1
    fh, flags = fs.open(b, os.O_RDONLY, PID)
    assert fh == 0          # B's own view (fh 1 would be a reader-specific rendering)


# -- tree.resolve ----------------------------------------------------------------------------

def no_cpus():
    raise AssertionError("allowed_cpus() called for a path that is not cpuN")


def test_resolve_static_dirs():
    for rel in tree.STATIC_DIRS:
        assert tree.resolve(rel, no_cpus) == tree.STATIC
    assert tree.STATIC == tree.Node("dir", 0o555, "container", "static")
    assert tree.STATIC_DIRS[""] == ("proc", "sys")


def test_resolve_procfiles():
    for rel in tree.PROCFILES:
        n = tree.resolve(rel, no_cpus)
        assert n.kind == "file" and n.handler == "procfile" and n.owner == "container"
        assert n.mode == (0o400 if rel == UUID else 0o444)
    # every procfile is listed in its directory, and every listed file name is a procfile
    for d, names in tree.STATIC_DIRS.items():
        for name in names:
            rel = f"{d}/{name}" if d else name
            assert tree.resolve(rel, lambda: {0}) is not None, rel


def test_resolve_empty_dirs_modes():
    assert tree.resolve("sys/kernel/debug", no_cpus) == tree.Node("dir", 0o700, "container", "empty")
    assert tree.resolve("sys/kernel/tracing", no_cpus).mode == 0o700
    assert tree.resolve("sys/kernel/config", no_cpus).mode == 0o755
    assert tree.resolve("sys/kernel/security", no_cpus).mode == 0o755
    assert tree.listdir("sys/kernel/debug", tree.resolve("sys/kernel/debug", no_cpus), no_cpus) == []


def test_resolve_unknown_and_sysctl():
    for rel in ("etc", "proc/self", "proc/sysfoo", "sys/kernel/debug/x", "sys/devices/system/cpufoo",
                "proc/meminfo/x", "sys/devices/virtual/net"):
        assert tree.resolve(rel, no_cpus) is None, rel
    assert tree.resolve("proc/sys", no_cpus).handler == "sysctl"
    assert tree.resolve("proc/sys/kernel/hostname", no_cpus).handler == "sysctl"


def test_resolve_cpu_dirs():
    host = sorted(int(n[3:]) for n in os.listdir(tree.HOST_CPU) if n[3:].isdigit() and n.startswith("cpu"))
    assert host
    first = host[0]
    rel = f"{tree.CPU_DIR}/cpu{first}"
    n = tree.resolve(rel, lambda: {first})
    assert n.kind == "dir" and n.owner == "host" and n.handler == "cpu" and not n.mode & 0o222
    assert tree.resolve(rel, lambda: set()) is None
    assert tree.resolve(rel, lambda: {first + 1}) is None
    assert tree.resolve(rel + "/topology", lambda: set()) is None       # below a hidden CPU too
    assert tree.resolve(tree.CPU_DIR, no_cpus).handler == "cpu"
    assert tree.resolve(tree.CPU_DIR + "/online", no_cpus).handler == "procfile"
    names = tree.listdir(tree.CPU_DIR, tree.resolve(tree.CPU_DIR, no_cpus), lambda: {first})
    assert f"cpu{first}" in names
    assert not [x for x in names if x.startswith("cpu") and x[3:].isdigit() and x != f"cpu{first}"]
    assert tree.host_path(rel) == f"/sys/devices/system/cpu/cpu{first}"


def test_filesystem_hides_disallowed_cpus(env):
    fs = env.fs
    fs.register(container())
    allowed = fs.container_view(fs.by_idx[1]).cpus()
    cpu = walk(fs, "k1", tree.CPU_DIR)
    listed = {n for _i, n, _t in fs.readdir(cpu, PID) if n.startswith("cpu") and n[3:].isdigit()}
    assert listed == {f"cpu{i}" for i in allowed}


# -- product_uuid ----------------------------------------------------------------------------

def uuid_of(cid: str) -> str:
    c = Container(key="k", id=cid, uid_base=0, gid_base=0, cgroups={})
    return product_uuid.render(RenderCtx(container=c, view=None)).decode()


def test_product_uuid():
    a, a2, b = uuid_of("alpha"), uuid_of("alpha"), uuid_of("beta")
    assert a == a2 and a != b
    for u in (a, b, uuid_of(""), uuid_of("x" * 200)):
        assert u.endswith("\n") and len(u) == 37
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\n", u), u
    host = ""
    try:
        host = open("/sys/devices/virtual/dmi/id/product_uuid").read().strip().lower()
    except OSError:
        pass
    assert a.strip() != host


def test_product_uuid_variant_spread():
    # the variant nibble takes all four values over enough ids (it is derived, not fixed)
    assert {uuid_of(f"c{i}")[19] for i in range(64)} == set("89ab")


# -- store -----------------------------------------------------------------------------------

def test_store_index_lowest_free(tmp_path):
    s = Store(str(tmp_path / "db"))
    cs = [container(f"k{i}", f"c{i}", cgroups={"memory": "/x"}) for i in range(4)]
    assert [s.save(c) for c in cs] == [1, 2, 3, 4]
    s.remove("k1")
    s.remove("k3")
    assert s.save(container("n1", "n1", cgroups={})) == 2
    assert s.save(container("n2", "n2", cgroups={})) == 4
    assert s.save(container("n3", "n3", cgroups={})) == 5
    # an update keeps the index and stores the new document
    c0 = cs[0]
    c0.sysctl["kernel.hostname"] = "h"
    assert s.save(c0) == 1
    s2 = Store(str(tmp_path / "db"))
    got = dict(s2.containers())
    assert got[1] == c0 and got[1].sysctl == {"kernel.hostname": "h"}
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert got[3].key == "k2"


def test_store_path_ids(tmp_path):
    s = Store(str(tmp_path / "db"))
    a, b, c = s.path_id("proc"), s.path_id("proc/meminfo"), s.path_id("sys")
    assert a == FIRST_PATH_ID and FIRST_PATH_ID >= 2
    assert len({a, b, c}) == 3 and min(a, b, c) >= FIRST_PATH_ID
    assert s.path_id("proc/meminfo") == b
    s2 = Store(str(tmp_path / "db"))
    assert s2.paths() == {a: "proc", b: "proc/meminfo", c: "sys"}
    assert s2.path_id("proc") == a
    assert s2.path_id("new") > max(a, b, c)


def test_filesystem_never_uses_path_id_1_or_0(env):
    fs = env.fs
    fs.register(container())
    ids = [walk(fs, "k1", rel) & 0xFFFFFFFF for rel in ("proc", MEMINFO, "sys/kernel/debug")]
    assert min(ids) >= FIRST_PATH_ID
