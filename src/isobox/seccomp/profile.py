"""The OCI linux.seccomp object, validated and rewritten in pure Python (no libseccomp).

rewrite.py calls this before anything exists, so a bad profile fails create with one line.
Actions, architectures and comparison operators are encoded with libseccomp's own numbers,
so the compiler (compile.py) passes them through unchanged.
"""
from __future__ import annotations

import errno
from isobox.plain import field, record  # not dataclasses: see isobox.plain

from isobox.errors import IsoboxError

# libseccomp action values (seccomp.h: SCMP_ACT_*)
ACT_KILL_THREAD = 0x00000000
ACT_KILL_PROCESS = 0x80000000
ACT_TRAP = 0x00030000
ACT_ERRNO = 0x00050000
ACT_NOTIFY = 0x7FC00000
ACT_TRACE = 0x7FF00000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000

_ACTIONS = {
    "SCMP_ACT_KILL": ACT_KILL_THREAD, "SCMP_ACT_KILL_THREAD": ACT_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": ACT_KILL_PROCESS, "SCMP_ACT_TRAP": ACT_TRAP, "SCMP_ACT_ERRNO": ACT_ERRNO,
    "SCMP_ACT_TRACE": ACT_TRACE, "SCMP_ACT_ALLOW": ACT_ALLOW, "SCMP_ACT_LOG": ACT_LOG,
    "SCMP_ACT_NOTIFY": ACT_NOTIFY,
}
_WITH_DATA = (ACT_ERRNO, ACT_TRACE)   # the low 16 bits carry errnoRet / the tracer's message

# AUDIT_ARCH_* tokens as libseccomp uses them (SCMP_ARCH_*)
_LE, _64, _N32 = 0x40000000, 0x80000000, 0x20000000
ARCHES = {
    "SCMP_ARCH_X86": 3 | _LE, "SCMP_ARCH_X86_64": 62 | _64 | _LE, "SCMP_ARCH_X32": 62 | _LE,
    "SCMP_ARCH_ARM": 40 | _LE, "SCMP_ARCH_AARCH64": 183 | _64 | _LE,
    "SCMP_ARCH_MIPS": 8, "SCMP_ARCH_MIPS64": 8 | _64, "SCMP_ARCH_MIPS64N32": 8 | _64 | _N32,
    "SCMP_ARCH_MIPSEL": 8 | _LE, "SCMP_ARCH_MIPSEL64": 8 | _64 | _LE, "SCMP_ARCH_MIPSEL64N32": 8 | _64 | _LE | _N32,
    "SCMP_ARCH_PPC": 20, "SCMP_ARCH_PPC64": 21 | _64, "SCMP_ARCH_PPC64LE": 21 | _64 | _LE,
    "SCMP_ARCH_S390": 22, "SCMP_ARCH_S390X": 22 | _64, "SCMP_ARCH_PARISC": 15, "SCMP_ARCH_PARISC64": 15 | _64,
    "SCMP_ARCH_RISCV64": 243 | _64 | _LE,
}
ARCH_NAMES = {v: k for k, v in ARCHES.items()}

OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
       "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}

FLAGS = ("SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW")

# isobox's trap for isoboxd (a later issue): these go to its listener as SCMP_ACT_NOTIFY in the
# same filter as the engine's profile. Adding a name here is all a later issue needs to do.
# x86_64 has umount2 only; i386 also has umount (libseccomp resolves each per architecture).
# fsopen/fspick/open_tree: the new mount API, so libmount and runc cannot go around the trap.
TRAPPED = ("mount", "umount", "umount2", "fsopen", "fspick", "open_tree", "sysinfo", "mknod", "mknodat",
           "openat2", "setxattr", "lsetxattr", "fsetxattr", "io_uring_setup")

# Trapped only when their arguments ask for something isoboxd must vet: a set-user-ID or
# set-group-ID mode (chmod family), or creating a file with one (open family). Setting those
# bits is what plants a root shell in a host directory bound into the container; everything
# else (nearly every chmod and open) never leaves the kernel.
_MASKED_EQ = 7
_S_ISUID, _S_ISGID = 0o4000, 0o2000
_O_CREAT, _O_TMPFILE = 0o100, 0o20000000


def _setid(mode: int) -> tuple[tuple, ...]:
    return tuple(((mode, _MASKED_EQ, bit, bit),) for bit in (_S_ISUID, _S_ISGID))


def _creating_setid(flags: int, mode: int) -> tuple[tuple, ...]:
    return tuple(((flags, _MASKED_EQ, c, c), (mode, _MASKED_EQ, bit, bit))
                 for c in (_O_CREAT, _O_TMPFILE) for bit in (_S_ISUID, _S_ISGID))


# name -> (argument conditions that trap (any of), conditions that do not (any of))
CONDITIONAL = {
    "chmod": (_setid(1), (((1, _MASKED_EQ, _S_ISUID | _S_ISGID, 0),),)),
    "fchmod": (_setid(1), (((1, _MASKED_EQ, _S_ISUID | _S_ISGID, 0),),)),
    "fchmodat": (_setid(2), (((2, _MASKED_EQ, _S_ISUID | _S_ISGID, 0),),)),
    "fchmodat2": (_setid(2), (((2, _MASKED_EQ, _S_ISUID | _S_ISGID, 0),),)),
    "creat": (_setid(1), (((1, _MASKED_EQ, _S_ISUID | _S_ISGID, 0),),)),
    "open": (_creating_setid(1, 2), (((1, _MASKED_EQ, _O_CREAT | _O_TMPFILE, 0),),
                                     ((2, _MASKED_EQ, _S_ISUID | _S_ISGID, 0),))),
    "openat": (_creating_setid(2, 3), (((2, _MASKED_EQ, _O_CREAT | _O_TMPFILE, 0),),
                                       ((3, _MASKED_EQ, _S_ISUID | _S_ISGID, 0),))),
}

# With the trap and no engine profile: every x86 ABI, so 32-bit binaries cannot bypass it.
TRAP_ONLY_ARCHES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")


@record
class Rule:
    names: tuple[str, ...]
    action: int                                   # with ERRNO/TRACE data folded in
    args: tuple[tuple[int, int, int, int], ...]   # (index, op, value, valueTwo)


@record
class Profile:
    default_action: int
    arches: tuple[int, ...]
    flags: tuple[str, ...]
    rules: list[Rule]
    listener_path: str = ""
    listener_metadata: str = ""
    trap: bool = False
    notes: list[str] = field(default_factory=list)

    def uses_notify(self) -> bool:
        return any(r.action == ACT_NOTIFY for r in self.rules)


def _fail(msg: str):
    raise IsoboxError(f"linux.seccomp: {msg}")


def _action(name, errno_ret, where: str) -> int:
    if not isinstance(name, str) or name not in _ACTIONS:
        _fail(f"{where}: unknown action {name!r} (one of {', '.join(sorted(_ACTIONS))})")
    act = _ACTIONS[name]
    if act in _WITH_DATA:
        ret = errno.EPERM if errno_ret is None else errno_ret
        if not isinstance(ret, int) or isinstance(ret, bool) or not 0 <= ret <= 0xFFFF:
            _fail(f"{where}: errnoRet must be an integer from 0 to 65535")
        return act | ret
    if errno_ret is not None:
        _fail(f"{where}: errnoRet is only valid with SCMP_ACT_ERRNO and SCMP_ACT_TRACE, not {name}")
    return act


def _u64(v, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
        _fail(f"{where} must be an unsigned 64-bit integer")
    return v


def parse(obj: dict) -> Profile:
    """Validates an OCI linux.seccomp object; raises one IsoboxError line."""
    if not isinstance(obj, dict):
        _fail("must be an object")
    if "defaultAction" not in obj:
        _fail("defaultAction is required")
    default = _action(obj["defaultAction"], obj.get("defaultErrnoRet"), "defaultAction")
    if default == ACT_NOTIFY:
        _fail("SCMP_ACT_NOTIFY cannot be the default action")
    arches = []
    for a in obj.get("architectures") or []:
        if a not in ARCHES:
            _fail(f"unknown architecture {a!r} in architectures")
        arches.append(ARCHES[a])
    flags = []
    for fl in obj.get("flags") or []:
        if fl not in FLAGS:
            _fail(f"unsupported flag {fl!r} (isobox with libseccomp 2.5 supports {', '.join(FLAGS)})")
        flags.append(fl)
    rules = []
    for i, sc in enumerate(obj.get("syscalls") or []):
        where = f"syscalls[{i}]"
        if not isinstance(sc, dict):
            _fail(f"{where} must be an object")
        names = sc.get("names")
        if not names or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            _fail(f"{where}: names must be a non-empty list of syscall names")
        if "action" not in sc:
            _fail(f"{where}: action is required")
        act = _action(sc["action"], sc.get("errnoRet"), where)
        args = []
        for j, a in enumerate(sc.get("args") or []):
            w = f"{where}.args[{j}]"
            if not isinstance(a, dict):
                _fail(f"{w} must be an object")
            idx = a.get("index")
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx <= 5:
                _fail(f"{w}: index must be 0 to 5")
            op = a.get("op")
            if op not in OPS:
                _fail(f"{w}: unknown op {op!r} (one of {', '.join(OPS)})")
            args.append((idx, OPS[op], _u64(a.get("value", 0), f"{w}.value"),
                         _u64(a.get("valueTwo", 0), f"{w}.valueTwo")))
        rules.append(Rule(tuple(names), act, tuple(args)))
    prof = Profile(default, tuple(arches), tuple(flags), rules,
                   listener_path=obj.get("listenerPath") or "", listener_metadata=obj.get("listenerMetadata") or "")
    if not isinstance(prof.listener_path, str) or not isinstance(prof.listener_metadata, str):
        _fail("listenerPath and listenerMetadata must be strings")
    if prof.listener_path and not prof.listener_path.startswith("/"):
        _fail(f"listenerPath {prof.listener_path!r} must be an absolute path")
    if prof.uses_notify() and not prof.listener_path:
        _fail("SCMP_ACT_NOTIFY rules need a listenerPath")
    if prof.listener_path and not prof.uses_notify():
        _fail("listenerPath is set but no rule uses SCMP_ACT_NOTIFY")
    return prof


def merge_trap(prof: Profile | None, trapped: tuple[str, ...] = TRAPPED) -> Profile:
    """Puts isobox's trap into the engine's profile: one filter, one listener.

    In a filter an ERRNO (or KILL/TRAP) verdict outranks USER_NOTIF, and libseccomp refuses
    two actions for one syscall, so every engine rule naming a trapped syscall loses that name
    (isoboxd decides instead) and one unconditional NOTIFY rule is added. The engine's default
    action no longer applies to trapped syscalls either: a rule beats the default.

    A CONDITIONAL syscall the engine allows keeps the engine's action for the arguments
    isoboxd does not care about (an unconditional rule would shadow the conditional NOTIFY
    rules in libseccomp, so the engine's rule is split); one the engine refuses stays refused."""
    if prof is None:
        rules = [Rule(tuple(trapped), ACT_NOTIFY, ())]
        rules += [Rule((name,), ACT_NOTIFY, cond) for name, (traps, _) in CONDITIONAL.items() for cond in traps]
        return Profile(ACT_ALLOW, tuple(ARCHES[a] for a in TRAP_ONLY_ARCHES), (), rules, trap=True)
    if prof.listener_path:
        raise IsoboxError(f"linux.seccomp.listenerPath ({prof.listener_path}) cannot be used with isobox's seccomp "
                          "trap: a process can have only one seccomp listener (EBUSY); remove listenerPath "
                          "or turn the trap off")
    trap = set(trapped)
    rules, notes = [], list(prof.notes)
    allowed: dict[str, int] = {}          # conditional syscall -> the engine's unconditional allowing action
    for r in prof.rules:
        gone = [n for n in r.names if n in trap]
        if gone:
            notes.append(f"seccomp: engine rule {_act_name(r.action)} for {', '.join(gone)} replaced by isobox's trap")
        split = [n for n in r.names if n in CONDITIONAL and not r.args and r.action in (ACT_ALLOW, ACT_LOG)]
        for n in split:
            allowed[n] = r.action
        keep = tuple(n for n in r.names if n not in trap and n not in split)
        if keep:
            rules.append(Rule(keep, r.action, r.args))
    rules.append(Rule(tuple(trapped), ACT_NOTIFY, ()))
    named = {n for r in prof.rules for n in r.names}
    for name, (traps, rest) in CONDITIONAL.items():
        if name in allowed:
            rules += [Rule((name,), allowed[name], cond) for cond in rest]
        elif name in named or prof.default_action not in (ACT_ALLOW, ACT_LOG):
            continue          # the engine refuses it (or decides by arguments itself): nothing to vet
        rules += [Rule((name,), ACT_NOTIFY, cond) for cond in traps]
    return Profile(prof.default_action, prof.arches, prof.flags, rules, trap=True, notes=notes)


def _act_name(act: int) -> str:
    for name, v in _ACTIONS.items():
        if name != "SCMP_ACT_KILL" and (act == v or (v in _WITH_DATA and act & 0xFFFF0000 == v)):
            return name
    return hex(act)
