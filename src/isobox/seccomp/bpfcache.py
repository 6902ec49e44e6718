"""Compiled filters, kept as BPF: a create whose profile was compiled before loads the
program with seccomp(2) directly and never imports libseccomp.

Docker, containerd and Podman give nearly every container the same default profile. Compiling
it costs about 20 ms per create here (pyseccomp's import and libseccomp's rule building);
reading the exported program costs well under 1 ms. The key is a SHA-256 of the merged Profile
(rules, actions, arches, flags) and of isobox's seccomp sources; the file also names the
libseccomp library that compiled it (path, inode, size, mtime), so an upgraded libseccomp
compiles again. The directory is root's only and every file is checked to be a regular,
root-owned, 0600 file before it is trusted: a planted program would be a sandbox bypass.
Cached in /run (tmpfs): a reboot starts empty.

The program is what libseccomp's seccomp_export_bpf() writes: the very instructions its
seccomp_load() hands the kernel. The load flags are the ones libseccomp would pass:
NEW_LISTENER when a rule notifies (with TSYNC_ESRCH next to TSYNC, as libseccomp 2.5 does),
and TSYNC / LOG / SPEC_ALLOW from the profile's flags; no_new_privs is never set here (the
spec decides, as with libseccomp's CTL_NNP=0)."""
from __future__ import annotations

import os
import stat

from isobox.errors import IsoboxError
from isobox.seccomp import profile as P

CACHE_DIR = "/run/isobox/seccomp"
MAGIC = b"isobox-bpf-2\n"          # then a line naming libseccomp, a line of skipped names, the program
FLAG_BITS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2, "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
SECCOMP_FILTER_FLAG_NEW_LISTENER = 8
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 16
_SOURCES = ("profile.py", "compile.py", "bpfcache.py")


class Program:
    """A compiled filter as BPF bytes, with the interface of compile.Compiled."""

    def __init__(self, prof: P.Profile, bpf: bytes, skipped: list[str]):
        if not bpf or len(bpf) % 8:
            raise IsoboxError("seccomp: a compiled program has a bad length")
        self.profile = prof
        self.bpf = bpf
        self.skipped = skipped

    @property
    def uses_notify(self) -> bool:
        return self.profile.uses_notify()

    def flags(self) -> int:
        out = 0
        for name in self.profile.flags:
            out |= FLAG_BITS.get(name, 0)
        if self.uses_notify:
            out |= SECCOMP_FILTER_FLAG_NEW_LISTENER
            if out & 1:
                out |= SECCOMP_FILTER_FLAG_TSYNC_ESRCH
        return out

    def load(self) -> int:
        """Installs the program on the calling thread; the listener fd, or -1 without one."""
        return _load(self.bpf, self.flags(), self.uses_notify)


class Shipped:
    """A Program as a container init receives it from isoboxd's worker (init/handover.py):
    the instructions, the load flags and whether a listener comes back; no Profile."""

    def __init__(self, bpf: bytes, flags: int, uses_notify: bool):
        if not bpf or len(bpf) % 8:
            raise IsoboxError("seccomp: a compiled program has a bad length")
        self.bpf = bpf
        self._flags = flags
        self.uses_notify = uses_notify

    def flags(self) -> int:
        return self._flags

    def load(self) -> int:
        return _load(self.bpf, self._flags, self.uses_notify)


def _load(bpf: bytes, flags: int, uses_notify: bool) -> int:
    from isobox.linux.syscalls import seccomp_set_mode_filter
    try:
        fd = seccomp_set_mode_filter(bpf, flags)
    except OSError as e:
        raise IsoboxError(f"seccomp: cannot install the filter: {e.strerror}") from None
    return fd if uses_notify else -1


def key(prof: P.Profile) -> str:
    """What the program depends on: the merged profile and the code that compiles it."""
    try:
        from _sha256 import sha256          # hashlib loads OpenSSL: ~5 ms of every create
    except ImportError:
        from hashlib import sha256
    h = sha256()
    h.update(repr((prof.default_action, tuple(prof.arches), tuple(prof.flags),
                   [(tuple(r.names), r.action, tuple(r.args)) for r in prof.rules])).encode())
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _SOURCES:
        try:
            st = os.stat(os.path.join(here, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            pass
    return h.hexdigest()


def _lib_id(path: str) -> str:
    st = os.stat(path)
    return f"{path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"


def lookup(prof: P.Profile, directory: str = CACHE_DIR) -> Program | None:
    """The cached program for prof, or None (absent, untrusted or compiled by another libseccomp)."""
    try:
        dst = os.stat(directory, follow_symlinks=False)
        if not stat.S_ISDIR(dst.st_mode) or dst.st_uid != 0 or dst.st_mode & 0o077:
            return None
        fd = os.open(os.path.join(directory, key(prof)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            return None
        data = os.read(fd, st.st_size + 1)
    finally:
        os.close(fd)
    if not data.startswith(MAGIC):
        return None
    parts = data[len(MAGIC):].split(b"\n", 2)          # library identity, skipped names, program
    if len(parts) != 3:
        return None
    lib, skipped, bpf = parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace"), parts[2]
    try:
        if _lib_id(lib.split("\0")[0]) != lib:
            return None
        return Program(prof, bpf, [s for s in skipped.split(",") if s])
    except (OSError, IsoboxError):
        return None


def store(prog: Program, lib_path: str, directory: str = CACHE_DIR) -> None:
    """Writes prog for later creates (atomically; a failure only costs the next create a compile)."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, key(prog.profile))
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, MAGIC + f"{_lib_id(lib_path)}\n{','.join(prog.skipped)}\n".encode() + prog.bpf)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        pass
