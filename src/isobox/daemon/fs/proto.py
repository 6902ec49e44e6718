"""The FUSE wire protocol (include/uapi/linux/fuse.h), only the parts isoboxd speaks.

isoboxd reads /dev/fuse itself instead of going through libfuse (pyfuse3): a locked FUSE
mount can never be replaced, so after a crash or an upgrade a new server must adopt the very
same /dev/fuse connection (kept by the holder) and ask the kernel to resend what was in
flight (FUSE_NOTIFY_RESEND). libfuse and pyfuse3 can only serve a connection they mounted
themselves. A flat loop of struct.unpack/os.write also costs fewer microseconds per request
than pyfuse3's trio machinery (platform-feasibility.md §4)."""
from __future__ import annotations

import struct

# opcodes (enum fuse_opcode)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT = 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, ACCESS = 27, 28, 29, 34
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, CREATE, RENAME2 = 6, 8, 9, 10, 11, 12, 13, 35, 45

# notifications (enum fuse_notify_code)
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_RESEND = 7            # kernel >= 6.9: requeue every request the server had read

# fuse_init_in/out flags
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
WANTED_FLAGS = ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | PARALLEL_DIROPS | MAX_PAGES

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5

ROOT_ID = 1
MAX_WRITE = 64 * 1024
# the kernel refuses reads into a buffer smaller than max_write plus the headers
READ_BUFFER = MAX_WRITE + 4096

IN_HEADER = struct.Struct("<IIQQIIIHH")        # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")             # len error unique
INIT_IN = struct.Struct("<IIII")               # major minor max_readahead flags (flags2... follow)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")   # 64 bytes
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")      # struct fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")           # nodeid generation entry_valid attr_valid + nsecs, then attr
ATTR_OUT = struct.Struct("<QII")               # attr_valid attr_valid_nsec dummy, then attr
OPEN_OUT = struct.Struct("<QII")               # fh open_flags backing_id
READ_IN = struct.Struct("<QQII")               # fh offset size read_flags (lock_owner flags pad follow)
WRITE_IN = struct.Struct("<QQIIQII")           # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("<II")
OPEN_IN = struct.Struct("<II")                 # flags open_flags
STATFS_OUT = struct.Struct("<QQQQQIII28x")     # blocks bfree bavail files ffree bsize namelen frsize
DIRENT = struct.Struct("<QQII")                # ino off namelen type, then the name padded to 8
INVAL_INODE = struct.Struct("<Qqq")            # ino off len
INVAL_ENTRY = struct.Struct("<QII")            # parent namelen flags, then the name and a NUL

S_IFDIR, S_IFREG, S_IFLNK = 0o040000, 0o100000, 0o120000
DT_DIR, DT_REG, DT_LNK = 4, 8, 10


def reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload


def error(unique: int, errno_: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -errno_, unique)


def notify(code: int, payload: bytes) -> bytes:
    # notifications carry unique 0 and the code in the error field
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), code, 0) + payload


def attr(ino: int, size: int, mode: int, uid: int, gid: int, nlink: int = 1, mtime: int = 0) -> bytes:
    return ATTR.pack(ino, size, (size + 511) // 512, mtime, mtime, mtime, 0, 0, 0, mode, nlink, uid, gid, 0,
                     4096, 0)


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    rec = DIRENT.pack(ino, off, len(name), dtype) + name
    return rec + b"\0" * (-len(rec) % 8)
