"""The /proc/sys backend the FUSE tree calls. Paths are relative to /proc/sys ("" is the root).

Every path falls in one of three classes (sysctl_table.py holds the lists):

- emulated: a per-container value in Container.sysctl, seeded from the host on first use and
  parsed exactly as the kernel's handler parses it. Max-push (the host gets the larger value)
  only when the caller passes allow_push, i.e. the administrator's policy allows it.
- namespaced: the kernel already keeps one value per net/uts/ipc/user/pid namespace, so reads
  and writes go to the *reader's* namespaces, and writes run with the reader's credentials so
  the kernel decides who may write.
- host-global: read through from the host; open for write fails with EACCES, as the kernel
  fails an unprivileged writer.
"""
from __future__ import annotations

import errno
import os
import stat as st
import threading
from dataclasses import dataclass

from isobox.daemon.fs import nsexec
from isobox.daemon.fs import sysctl_table as tbl
from isobox.daemon.fs.context import Container
from isobox.linux import nscaps

PROC_SYS = "/proc/sys"
_THREAD_KINDS = ("net", "uts", "ipc")   # namespaces one thread may switch into
_lock = threading.Lock()                 # serialises per-container values and host pushes


@dataclass(frozen=True)
class Entry:
    kind: str                 # "dir" | "file"
    mode: int                 # permission bits
    owner: str                # "container" (its root) | "host" (shown as nobody)


def _check_rel(rel: str) -> str:
    """Refuse anything that is not a plain relative path below /proc/sys."""
    if rel == "":
        return rel
    if "\0" in rel or rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
        raise OSError(errno.ENOENT, rel)
    return rel


def _host(rel: str) -> str:
    return f"{PROC_SYS}/{rel}" if rel else PROC_SYS


def classify(rel: str) -> str:
    """"emulated", "namespaced" or "host"."""
    if rel in tbl.EMULATED:
        return "emulated"
    if tbl.namespace_of(rel):
        return "namespaced"
    return "host"


def _thread_kinds(rel: str) -> tuple[str, ...]:
    """Namespaces to enter to see rel as the reader does, when one thread can do it."""
    ns = tbl.namespace_of(rel) if rel != "net" else "net"
    return (ns,) if ns in _THREAD_KINDS else ()


# --- stat / listdir ---
def stat(c: Container, reader_pid: int, rel: str) -> Entry | None:
    try:
        rel = _check_rel(rel)
    except OSError:
        return None
    kind = classify(rel)
    if kind == "emulated":
        spec = tbl.EMULATED[rel]
        return Entry("file", spec.mode, "container") if os.path.exists(_host(rel)) else None
    try:
        with nsexec.thread_ns(reader_pid, _thread_kinds(rel)):
            s = os.lstat(_host(rel))
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise
        return None
    if st.S_ISDIR(s.st_mode):
        return Entry("dir", st.S_IMODE(s.st_mode), "container")
    return Entry("file", st.S_IMODE(s.st_mode), "container" if kind == "namespaced" else "host")


def listdir(c: Container, reader_pid: int, rel: str) -> list[tuple[str, str]]:
    rel = _check_rel(rel)
    with nsexec.thread_ns(reader_pid, _thread_kinds(rel)):
        with os.scandir(_host(rel)) as it:
            real = {e.name: ("dir" if e.is_dir(follow_symlinks=False) else "file") for e in it}
    for name in tbl.emulated_children(rel):
        if os.path.exists(_host(f"{rel}/{name}" if rel else name)):   # the host must have it
            real[name] = "file"
    return sorted(real.items())


# --- read ---
def read(c: Container, reader_pid: int, rel: str) -> bytes:
    rel = _check_rel(rel)
    kind = classify(rel)
    if kind == "emulated":
        return _read_emulated(c, rel)
    ns = tbl.namespace_of(rel)
    if kind == "namespaced" and (ns not in _THREAD_KINDS or not _world_readable(rel)):
        # user/pid namespaces need a process; root-only files are read with the reader's rights
        return nsexec.run_as(reader_pid, (ns,), "read", _host(rel))[1]
    with nsexec.thread_ns(reader_pid, _thread_kinds(rel)):
        return _read_file(_host(rel))


def _world_readable(rel: str) -> bool:
    try:
        return bool(os.stat(_host(rel)).st_mode & 0o004)
    except OSError:
        return True                 # let the real read produce the kernel's error


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = b""
        while len(out) < nsexec.MAX_READ:
            chunk = os.read(fd, 65536)
            if not chunk:
                return out
            out += chunk
        return out
    finally:
        os.close(fd)


def _read_emulated(c: Container, rel: str) -> bytes:
    spec = tbl.EMULATED[rel]
    if spec.fresh:
        return _read_file(_host(rel))
    return (_current(c, rel) + "\n").encode()


def _current(c: Container, rel: str) -> str:
    """The container's value, seeded from the host the first time."""
    with _lock:
        val = c.sysctl.get(rel)
    if val is None:
        seeded = tbl.format_value(tbl.parse_value(_read_file(_host(rel)).decode()))
        with _lock:
            val = c.sysctl.setdefault(rel, seeded)
    return val


# --- write ---
def check_open_write(c: Container, reader_pid: int, rel: str) -> None:
    """Raise what the kernel raises when the reader opens rel for writing."""
    rel = _check_rel(rel)
    kind = classify(rel)
    if kind == "host":
        _exists_or_enoent(rel)
        raise OSError(errno.EACCES, f"{rel} is host-global")
    if kind == "emulated":
        _exists_or_enoent(rel)
        if tbl.EMULATED[rel].readonly:
            raise OSError(errno.EACCES, f"{rel} is read-only")
        if nsexec.read_creds(reader_pid).uids[1] != c.uid_base:
            raise OSError(errno.EACCES, f"{rel} is writable by the container's root only")
        return
    ns = tbl.namespace_of(rel)
    if ns == "uts":
        return                      # written with sethostname: the kernel checks CAP_SYS_ADMIN there
    nsexec.run_as(reader_pid, (ns,), "open", _host(rel))


def _exists_or_enoent(rel: str) -> None:
    if not os.path.exists(_host(rel)):
        raise OSError(errno.ENOENT, rel)


def write(c: Container, reader_pid: int, reader_uid: int, reader_gid: int, rel: str, data: bytes,
          allow_push: bool, offset: int = 0) -> int:
    """Write data at offset; returns bytes consumed. Writes past offset 0 are swallowed, as the
    kernel does with sysctl_writes_strict=1 (the default)."""
    rel = _check_rel(rel)
    kind = classify(rel)
    if kind == "host":
        raise OSError(errno.EACCES, f"{rel} is host-global")
    if kind == "emulated":
        return _write_emulated(c, reader_pid, reader_uid, rel, data, allow_push, offset)
    ns = tbl.namespace_of(rel)
    if ns == "uts":
        return _write_uts(reader_pid, rel, data, offset)
    if offset:
        return _write_ns_at(reader_pid, ns, rel, data)
    return nsexec.run_as(reader_pid, (ns,), "write", _host(rel), data)[0]


def _write_ns_at(reader_pid: int, ns: str, rel: str, data: bytes) -> int:
    """A continuation write: the kernel ignores it but still checks the open."""
    nsexec.run_as(reader_pid, (ns,), "open", _host(rel))
    return len(data)


def _write_uts(reader_pid: int, rel: str, data: bytes, offset: int) -> int:
    """kernel/hostname, domainname: the sysctl file is owned by host root, but a container root
    may set its own names with sethostname(2); do that, with the reader's rights."""
    if rel not in ("kernel/hostname", "kernel/domainname"):
        raise OSError(errno.EACCES, f"{rel} is read-only")
    if offset or not data:
        return len(data)
    name = data.split(b"\0", 1)[0].split(b"\n", 1)[0][:64]   # proc_dostring: stop at NUL/newline
    op = "sethostname" if rel.endswith("hostname") else "setdomainname"
    nsexec.run_as(reader_pid, ("uts",), op, "", name)
    return len(data)


def _write_emulated(c: Container, reader_pid: int, reader_uid: int, rel: str, data: bytes,
                    allow_push: bool, offset: int) -> int:
    spec = tbl.EMULATED[rel]
    if spec.readonly:
        raise OSError(errno.EACCES, f"{rel} is read-only")
    if reader_uid != c.uid_base:
        raise OSError(errno.EACCES, f"{rel} is writable by the container's root only")
    if spec.cap is not None and (c.init_pid <= 0 or not nscaps.capable_in_container(reader_pid, c.init_pid, spec.cap)):
        # judged in the container's user namespace (the kernel's rule), not on CapEff: the
        # root of a user namespace nested in the container has a full CapEff
        raise OSError(errno.EPERM, f"{rel} needs capability {spec.cap} in the container's user namespace")
    if offset:
        return len(data)
    _current(c, rel)                # seed before parsing: a vector write keeps the untouched values
    with _lock:
        current = tbl.parse_value(c.sysctl[rel])
        new, used, err = tbl.parse_write(spec, data, current)
        if spec.push == "max" and allow_push:
            _push_max(rel, new)
        c.sysctl[rel] = tbl.format_value(new)
    if err is not None:
        raise err
    return used


def _push_max(rel: str, new: list[int]) -> None:
    """Max-push: raise the host value when the container asks for more (policy-gated)."""
    host = tbl.parse_value(_read_file(_host(rel)).decode())
    if new[0] <= host[0]:
        return
    fd = os.open(_host(rel), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, tbl.format_value(new).encode())
    finally:
        os.close(fd)
