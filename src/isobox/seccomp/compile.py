"""Compiling a Profile with libseccomp, through the `pyseccomp` binding.

Binding choice (issue 3, "libseccomp through a maintained binding"):

- `pyseccomp` 0.1.2 (PyPI, 2021): one pure-Python file of ctypes over the system's
  libseccomp.so.2 (2.5.4 here), py3-none-any wheel, API-compatible with libseccomp's own
  Python binding (SyscallFilter, Arg, Attr, NOTIFY). Installs anywhere libseccomp2 is
  present; no compiler, no Cython, no libseccomp-dev. It is small enough to audit, and it
  only forwards to libseccomp, which does the real work (and is maintained by the
  libseccomp project and Debian). Its one gap: no public get_notify_fd; we call
  `_libseccomp.seccomp_notify_fd`, the C function itself (see `notify_fd`).
- `mephi42-seccomp` 2.5.6 (libseccomp's own Cython binding, packaged): not installable
  here (no distribution on the registries this host reaches: "from versions: none"); as
  an sdist it would need Cython, a compiler and libseccomp-dev on every host.
- Debian's python3-seccomp: built for the system CPython, not the venv's; an ABI accident.

Import cost (python -X importtime, this VM): `import pyseccomp` = 45 ms cumulative, of which
31 ms is ctypes.util (subprocess, shutil) and two `ldconfig -p` forks from
find_library("c") / find_library("seccomp"). `_binding()` instead offers pyseccomp a
find_library that answers with the sonames (libc.so.6, libseccomp.so.2; the dynamic linker
finds them in ld.so.cache), which brings the import to ~6 ms (typing is most of it). It is
imported only when a spec has a seccomp profile (or the trap is on), never at start-up.

The filter is compiled in the runtime, by rewrite.py (so a profile libseccomp refuses fails
create before anything exists); the container init is a clone of the runtime and inherits
the compiled filter and the loaded library. Nothing is ever loaded from the container's
rootfs: after setns into the container's mount namespace, a dlopen would find the
container's libraries.
"""
from __future__ import annotations

import os
import sys

from isobox.errors import IsoboxError
from isobox.seccomp import profile as P

_mod = None
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
NR_SCMP_ERROR = -1     # libseccomp: unknown syscall name


def _binding():
    """pyseccomp, imported once, without ldconfig forks when the sonames load."""
    global _mod
    if _mod is not None:
        return _mod
    import ctypes
    import types
    stub = None
    if "ctypes.util" not in sys.modules:
        stub = types.ModuleType("ctypes.util")
        stub.find_library = _SONAMES.get
        sys.modules["ctypes.util"] = stub
        ctypes.util = stub
    try:
        import pyseccomp
    except OSError:
        # the sonames did not load: the ordinary way, with ldconfig
        sys.modules.pop("pyseccomp", None)
        stub = _unstub(stub)
        try:
            import pyseccomp
        except (ImportError, OSError, RuntimeError) as e:
            raise IsoboxError(f"seccomp: cannot load libseccomp through pyseccomp: {e}") from None
    except ImportError as e:
        raise IsoboxError(f"seccomp: the pyseccomp package is missing ({e}); reinstall isobox") from None
    finally:
        _unstub(stub)
    _mod = pyseccomp
    return pyseccomp


def _unstub(stub):
    if stub is not None and sys.modules.get("ctypes.util") is stub:
        del sys.modules["ctypes.util"]
        import ctypes
        if getattr(ctypes, "util", None) is stub:
            del ctypes.util
    return None


_ATTR_FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": "CTL_TSYNC", "SECCOMP_FILTER_FLAG_LOG": "CTL_LOG",
               "SECCOMP_FILTER_FLAG_SPEC_ALLOW": "CTL_SSB"}


class Compiled:
    """A libseccomp filter context ready to load, plus what the hand-off needs."""

    def __init__(self, prof: P.Profile, filt, skipped: list[str]):
        self.profile = prof
        self.filter = filt
        self.skipped = skipped        # names libseccomp does not know on any architecture

    @property
    def uses_notify(self) -> bool:
        return self.profile.uses_notify()

    def load(self) -> int:
        """Installs the filter on the calling thread; returns the listener fd or -1."""
        sc = _binding()
        try:
            self.filter.load()
        except OSError as e:
            raise IsoboxError(f"seccomp: cannot install the filter: {e.strerror}") from None
        if not self.uses_notify:
            return -1
        fd = sc._libseccomp.seccomp_notify_fd(self.filter._filter)
        if fd < 0:
            raise IsoboxError("seccomp: the filter has notify rules but libseccomp returned no listener fd")
        return fd

    def export_bpf(self) -> bytes:
        """The program libseccomp's seccomp_load() would hand the kernel (struct sock_filter[])."""
        fd = os.memfd_create("isobox-bpf", os.MFD_CLOEXEC)
        try:
            self.filter.export_bpf(_Fd(fd))
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

    def export_pfc(self) -> str:
        import tempfile
        with tempfile.TemporaryFile("w+") as f:
            self.filter.export_pfc(f)
            f.seek(0)
            return f.read()


class _Fd:
    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def library_path() -> str:
    """The libseccomp file this process loaded (the cache records which one compiled)."""
    with open("/proc/self/maps") as f:
        for line in f:
            if "libseccomp" in line:
                return line.split(None, 5)[5].strip()
    return ""


def compile_profile(prof: P.Profile) -> Compiled:
    sc = _binding()
    try:
        filt = sc.SyscallFilter(prof.default_action)
    except OSError:
        raise IsoboxError("linux.seccomp: libseccomp refused defaultAction") from None
    # libseccomp sets no_new_privs itself when loading unless told not to: the spec decides that
    filt.set_attr(sc.Attr.CTL_NNP, 0)
    # a binary tree of syscall numbers instead of libseccomp's default linear list: every
    # syscall of the container runs this program, trapped or not
    try:
        filt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    except OSError:
        pass            # libseccomp < 2.5: the linear filter still works
    for a in prof.arches:
        try:
            if not filt.exist_arch(a):
                filt.add_arch(a)
        except OSError as e:
            raise IsoboxError(f"linux.seccomp: libseccomp refused architecture "
                              f"{P.ARCH_NAMES.get(a, hex(a))}: {e.strerror}") from None
    for fl in prof.flags:
        try:
            filt.set_attr(getattr(sc.Attr, _ATTR_FLAGS[fl]), 1)
        except OSError as e:
            raise IsoboxError(f"linux.seccomp: flag {fl} is not supported here: {e.strerror}") from None
    skipped: list[str] = []
    for rule in prof.rules:
        if rule.action == prof.default_action:
            continue                  # libseccomp refuses a rule equal to the default (runc skips it too)
        conds = [sc.Arg(i, op, a, b) for i, op, a, b in rule.args]
        # runc: several conditions on one argument are alternatives (one rule each), otherwise one rule
        groups = [[c] for c in conds] if len({i for i, *_ in rule.args}) < len(rule.args) else [conds]
        for name in rule.names:
            nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
            if nr == NR_SCMP_ERROR:
                skipped.append(name)  # unknown to libseccomp: skipped, as runc does
                continue
            for g in groups:
                try:
                    filt.add_rule(rule.action, nr, *g)
                except OSError as e:
                    raise IsoboxError(f"linux.seccomp: libseccomp refused the {P._act_name(rule.action)} rule for "
                                      f"{name}: {e.strerror} (conflicting or invalid rule)") from None
    return Compiled(prof, filt, sorted(set(skipped)))
