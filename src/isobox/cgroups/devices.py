"""Device access rules: OCI linux.resources.devices -> v1 devices.allow/deny writes or a
cgroup v2 BPF_PROG_TYPE_CGROUP_DEVICE program.

Rules are applied in order as the v1 kernel does (an Emulator, like runc's): the list
starts from deny "a", then each rule; isobox's harmless character devices are allowed
last, so a spec that denies everything still gets a working /dev. The v2 program is
generated from the emulator's final rules exactly as runc's devicefilter does: every
block has the same action (the opposite of the default), so their order is irrelevant.

Whatever the spec's rules say, the result is clamped (clamp()) to an allow list before
either backend sees it: CORE plus the policy's [devices] allow. The rootfs is not nodev, so
a node shipped in an image would otherwise reach any host device a rule such as
{"allow": true} (docker run --privileged) opens up.
"""
from __future__ import annotations

from _collections_abc import Iterable   # collections.abc without collections (~2 ms a call)

from isobox.linux import bpf
from isobox.plain import Frozen, Plain

from .layout import CgroupError

Key = tuple[str, int, int]   # (type "c"|"b", major, minor); -1 = any

# (type, major, minor) every container may use whatever the policy says: the nodes isobox
# always binds (the OCI defaults) and the container's own devpts (a c 136:N or 5:2 node
# opened outside a devpts instance reaches no host pty: the kernel looks the pty up there).
CORE: tuple[Key, ...] = (
    ("c", 1, 3),     # null
    ("c", 1, 5),     # zero
    ("c", 1, 7),     # full
    ("c", 1, 8),     # random
    ("c", 1, 9),     # urandom
    ("c", 5, 0),     # tty
    ("c", 5, 2),     # ptmx
    ("c", 136, -1),  # pts/*
)
# Allowed after the spec's rules (with_defaults); fuse and tun then only pass the clamp when
# the policy lists them (its default does). Also the clamp of a cgroup made without a policy
# (isoboxd's own, which opens /dev/fuse).
ALWAYS_ALLOWED: tuple[Key, ...] = CORE + (
    ("c", 10, 229),  # fuse
    ("c", 10, 200),  # net/tun
)

WILDCARD = -1
_ACCESS = "rwm"


class Rule(Frozen):
    """(Not a dataclass: see isobox.plain.)"""
    allow: bool
    type: str      # "a" | "c" | "b"
    major: int     # -1 = wildcard
    minor: int     # -1 = wildcard
    access: str    # subset of "rwm", in that order
    _FIELDS = __slots__ = ("allow", "type", "major", "minor", "access")

    def __init__(self, allow: bool, type: str, major: int, minor: int, access: str):
        self._set(allow=allow, type=type, major=major, minor=minor, access=access)

    def v1(self) -> str:
        """The line for devices.allow / devices.deny."""
        if self.type == "a":
            return "a"
        mj = "*" if self.major < 0 else str(self.major)
        mn = "*" if self.minor < 0 else str(self.minor)
        return f"{self.type} {mj}:{mn} {self.access}"


def _norm_access(a: str) -> str:
    return "".join(c for c in _ACCESS if c in a)


def parse_rules(rules: object) -> list[Rule]:
    """Validate OCI device cgroup rules; errors are one line naming the rule index."""
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise CgroupError("linux.resources.devices must be a list of rules")
    out = []
    for i, r in enumerate(rules):
        where = f"linux.resources.devices[{i}]"
        if not isinstance(r, dict):
            raise CgroupError(f"{where} must be an object")
        allow = r.get("allow")
        if not isinstance(allow, bool):
            raise CgroupError(f"{where}.allow must be true or false")
        typ = r.get("type") or "a"
        if typ not in ("a", "c", "b"):
            raise CgroupError(f"{where}.type must be a, c or b, got {typ!r}")
        nums = []
        for k in ("major", "minor"):
            v = r.get(k)
            if v is None:
                v = WILDCARD
            if isinstance(v, bool) or not isinstance(v, int) or v < -1 or v > 0xFFFFFFFF:
                raise CgroupError(f"{where}.{k} must be an integer >= -1 (-1 = any), got {v!r}")
            nums.append(v)
        access = r.get("access") or _ACCESS
        if not isinstance(access, str) or not access or any(c not in _ACCESS for c in access):
            raise CgroupError(f"{where}.access must be made of r, w and m, got {access!r}")
        access = _norm_access(access)
        if typ == "a":
            # "a" means every device: majors/minors and access are meaningless (as the kernel).
            out.append(Rule(allow, "a", WILDCARD, WILDCARD, _ACCESS))
        else:
            out.append(Rule(allow, typ, nums[0], nums[1], access))
    return out


def with_defaults(rules: list[Rule]) -> list[Rule]:
    """deny "a", the spec's rules in order, then isobox's always-allowed devices."""
    return ([Rule(False, "a", WILDCARD, WILDCARD, _ACCESS)] + list(rules)
            + [Rule(True, t, mj, mn, _ACCESS) for t, mj, mn in ALWAYS_ALLOWED])


def allowed(policy_devices: Iterable[Key]) -> frozenset[Key]:
    """The clamp's allow list for a container: CORE plus the policy's devices, given as
    (type, major, minor) keys (isobox.policy.model.Policy.device_map(), resolved at create)."""
    return frozenset(CORE) | frozenset(policy_devices)


def _narrower(a: Key, b: Key) -> Key | None:
    """The devices in both a and b (a key again: a wildcard meets a number or a wildcard)."""
    if a[0] != b[0]:
        return None
    out = [a[0]]
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        if x != WILDCARD and y != WILDCARD and x != y:
            return None
        out.append(y if x == WILDCARD else x)
    return tuple(out)


def clamp(rules: list[Rule], allow: Iterable[Key]) -> list[Rule]:
    """The rules' effect restricted to the keys of allow: a deny-all list whose exceptions
    grant no device outside allow, and inside it no more than the rules did. "m" is clamped
    like "r" and "w" (in a user namespace the kernel refuses device mknod before asking the
    cgroup, so it gains nothing; the allow list stays the one statement of device access)."""
    emu = Emulator.from_rules(rules)
    out = [Rule(False, "a", WILDCARD, WILDCARD, _ACCESS)]
    for key in sorted(set(allow)):
        t, mj, mn = key
        if t not in ("c", "b"):
            raise CgroupError(f"device allow list entry {key!r} must be of type c or b")
        if emu.default_allow:
            # everything but the deny exceptions: a deny that touches part of a wildcard key
            # (c 136:5 in c 136:*) takes its access from the whole key, since a deny-all list
            # cannot leave a hole; less access is the safe side
            acc = set(_ACCESS)
            for ekey, eacc in emu.exceptions.items():
                if _narrower(ekey, key) is not None:
                    acc -= set(eacc)
            if acc:
                out.append(Rule(True, t, mj, mn, _norm_access("".join(acc))))
        else:
            for ekey, eacc in emu.exceptions.items():
                both = _narrower(ekey, key)
                if both is not None:
                    out.append(Rule(True, *both, eacc))
    return Emulator.from_rules(out).rules()


class Emulator(Plain):
    """The v1 devices cgroup state machine: a default and exceptions (key -> access)."""
    default_allow: bool         # a fresh v1 cgroup below the host root allows everything
    exceptions: dict[tuple[str, int, int], str]
    _FIELDS = ("default_allow", "exceptions")

    def __init__(self, default_allow: bool = True, exceptions: dict[tuple[str, int, int], str] | None = None):
        self.default_allow = default_allow
        self.exceptions = {} if exceptions is None else exceptions

    def apply(self, r: Rule) -> None:
        if r.type == "a":
            self.default_allow = r.allow
            self.exceptions = {}
            return
        if r.allow != self.default_allow:
            self._add(r)     # an exception to the default
        else:
            self._remove(r)  # takes access away from an exception

    def _add(self, r: Rule) -> None:
        key = (r.type, r.major, r.minor)
        self.exceptions[key] = _norm_access(self.exceptions.get(key, "") + r.access)

    def _remove(self, r: Rule) -> None:
        key = (r.type, r.major, r.minor)
        for (t, mj, mn), acc in self.exceptions.items():
            if (t, mj, mn) == key:
                continue
            covers = t == r.type and mj in (WILDCARD, r.major) and mn in (WILDCARD, r.minor)
            if covers and set(acc) & set(r.access):
                # The kernel would silently ignore it; say so instead.
                word = "allow" if r.allow else "deny"
                raise CgroupError(f"device rule '{word} {r.v1()}' cannot punch a hole in the "
                                  f"wider rule '{Rule(not r.allow, t, mj, mn, acc).v1()}'")
        left = _norm_access("".join(c for c in self.exceptions.get(key, "") if c not in r.access))
        if left:
            self.exceptions[key] = left
        else:
            self.exceptions.pop(key, None)

    def rules(self) -> list[Rule]:
        """The minimal equivalent list: the wildcard first, then the exceptions."""
        out = [Rule(self.default_allow, "a", WILDCARD, WILDCARD, _ACCESS)]
        for (t, mj, mn), acc in sorted(self.exceptions.items()):
            out.append(Rule(not self.default_allow, t, mj, mn, acc))
        return out

    @classmethod
    def from_rules(cls, rules: list[Rule], start: "Emulator | None" = None) -> "Emulator":
        e = start or cls()
        for r in rules:
            e.apply(r)
        return e

    @classmethod
    def from_v1_list(cls, text: str) -> "Emulator":
        """Parse devices.list. An allow-all cgroup shows only "a *:* rwm" (its deny
        exceptions are not listed), so exceptions are unknown in that case."""
        e = cls(default_allow=False)
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            t, mm, acc = parts
            if t == "a":
                return cls(default_allow=True)
            mj, _, mn = mm.partition(":")
            key = (t, WILDCARD if mj == "*" else int(mj), WILDCARD if mn == "*" else int(mn))
            e.exceptions[key] = _norm_access(acc)
        return e


def v1_writes(rules: list[Rule], current: Emulator | None = None) -> list[tuple[str, str]]:
    """(file, line) writes that bring a v1 devices cgroup to rules (already with defaults).

    Without a known current state (create, or an allow-all cgroup whose exceptions
    cannot be read) the whole list is written from the wildcard on; with one, only the
    difference, so a cgroup with sub-cgroups (where the kernel refuses "a") can be updated.
    """
    target = Emulator.from_rules(rules)
    if current is None or current.default_allow or current.default_allow != target.default_allow:
        return [("devices.allow" if r.allow else "devices.deny", r.v1()) for r in target.rules()]
    out: list[tuple[str, str]] = []
    for key, acc in sorted(current.exceptions.items()):
        drop = "".join(c for c in acc if c not in target.exceptions.get(key, ""))
        if drop:
            out.append(("devices.deny", Rule(False, *key, drop).v1()))
    for key, acc in sorted(target.exceptions.items()):
        add = "".join(c for c in acc if c not in current.exceptions.get(key, ""))
        if add:
            out.append(("devices.allow", Rule(True, *key, add).v1()))
    return out


# --- cgroup v2: the BPF program ----------------------------------------------------

def bpf_program(rules: list[Rule]) -> list[bpf.Insn]:
    """BPF_PROG_TYPE_CGROUP_DEVICE instructions equivalent to rules (runc's devicefilter)."""
    emu = Emulator.from_rules(rules)
    default_allow = emu.default_allow
    insns: list[bpf.Insn] = [
        bpf.ldx_w(bpf.R2, bpf.R1, 0),                  # R2 = type (low 16 bits of access_type)
        bpf.alu32_imm(bpf.BPF_AND, bpf.R2, 0xFFFF),
        bpf.ldx_w(bpf.R3, bpf.R1, 0),                  # R3 = access (high 16 bits)
        bpf.alu32_imm(bpf.BPF_RSH, bpf.R3, 16),
        bpf.ldx_w(bpf.R4, bpf.R1, 4),                  # R4 = major
        bpf.ldx_w(bpf.R5, bpf.R1, 8),                  # R5 = minor
    ]
    block = 0
    for r in emu.rules()[1:]:  # the wildcard is the default, handled by the final block
        nxt = f"block-{block + 1}"
        dev_type = bpf.BPF_DEVCG_DEV_CHAR if r.type == "c" else bpf.BPF_DEVCG_DEV_BLOCK
        acc = ((bpf.BPF_DEVCG_ACC_READ if "r" in r.access else 0)
               | (bpf.BPF_DEVCG_ACC_WRITE if "w" in r.access else 0)
               | (bpf.BPF_DEVCG_ACC_MKNOD if "m" in r.access else 0))
        insns.append(bpf.jne_imm(bpf.R2, dev_type, nxt))
        if r.access != _ACCESS:
            # if (R3 & acc) != R3: the request wants more than this rule covers
            insns += [bpf.alu32_reg(bpf.BPF_MOV, bpf.R1, bpf.R3),
                      bpf.alu32_imm(bpf.BPF_AND, bpf.R1, acc),
                      bpf.jne_reg(bpf.R1, bpf.R3, nxt)]
        if r.major >= 0:
            insns.append(bpf.jne_imm(bpf.R4, _s32(r.major), nxt))
        if r.minor >= 0:
            insns.append(bpf.jne_imm(bpf.R5, _s32(r.minor), nxt))
        insns += [bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1 if r.allow else 0), bpf.exit_()]
        block += 1
        insns.append(_Label(f"block-{block}"))
    insns += [bpf.alu32_imm(bpf.BPF_MOV, bpf.R0, 1 if default_allow else 0), bpf.exit_()]
    return _resolve(insns)


class _Label(str):
    pass


def _s32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def _resolve(items: list) -> list[bpf.Insn]:
    labels: dict[str, int] = {}
    code: list[bpf.Insn] = []
    for it in items:
        if isinstance(it, _Label):
            labels[str(it)] = len(code)
        else:
            code.append(it)
    out = []
    for pc, i in enumerate(code):
        if isinstance(i.off, str):
            i = bpf.Insn(i.code, i.dst, i.src, labels[i.off] - pc - 1, i.imm)
        out.append(i)
    return out


def bpf_simulate(insns: list[bpf.Insn], dev_type: str, major: int, minor: int, access: str) -> bool:
    """Run the generated program on one request (pure Python, for tests and doctor)."""
    t = bpf.BPF_DEVCG_DEV_CHAR if dev_type == "c" else bpf.BPF_DEVCG_DEV_BLOCK
    acc = sum(v for c, v in (("r", bpf.BPF_DEVCG_ACC_READ), ("w", bpf.BPF_DEVCG_ACC_WRITE),
                              ("m", bpf.BPF_DEVCG_ACC_MKNOD)) if c in access)
    ctx = [t | (acc << 16), major, minor]
    reg = [0] * 11
    pc = 0
    m32 = 0xFFFFFFFF
    while True:
        i = insns[pc]
        pc += 1
        if i.code == bpf.BPF_LDX | bpf.BPF_MEM | bpf.BPF_W:
            reg[i.dst] = ctx[i.off // 4]
        elif i.code == bpf.BPF_ALU | bpf.BPF_AND | bpf.BPF_K:
            reg[i.dst] = reg[i.dst] & i.imm & m32
        elif i.code == bpf.BPF_ALU | bpf.BPF_RSH | bpf.BPF_K:
            reg[i.dst] = (reg[i.dst] & m32) >> i.imm
        elif i.code == bpf.BPF_ALU | bpf.BPF_MOV | bpf.BPF_X:
            reg[i.dst] = reg[i.src] & m32
        elif i.code == bpf.BPF_ALU | bpf.BPF_MOV | bpf.BPF_K:
            reg[i.dst] = i.imm & m32
        elif i.code == bpf.BPF_JMP32 | bpf.BPF_JNE | bpf.BPF_K:
            if reg[i.dst] & m32 != i.imm & m32:
                pc += i.off
        elif i.code == bpf.BPF_JMP32 | bpf.BPF_JNE | bpf.BPF_X:
            if reg[i.dst] & m32 != reg[i.src] & m32:
                pc += i.off
        elif i.code == bpf.BPF_JMP | bpf.BPF_EXIT:
            return reg[bpf.R0] == 1
        else:
            raise ValueError(f"unknown opcode {i.code:#x}")


def attach_bpf(cgroup_dir: str, insns: list[bpf.Insn]) -> None:
    """Load the program and attach it to a v2 cgroup, replacing isobox's earlier one.

    Attached with BPF_F_ALLOW_MULTI (as runc) so a nested systemd may add its own; the
    new program is attached before the old ones are detached, so there is never a
    moment without a filter.
    """
    import os
    try:
        prog = bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, insns)
    except OSError as e:
        raise CgroupError(f"cannot load the device BPF program: {e.strerror}") from None
    try:
        dfd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        os.close(prog)
        raise CgroupError(f"cannot open cgroup {cgroup_dir}: {e.strerror}") from None
    try:
        try:
            old = bpf.prog_query(dfd, bpf.BPF_CGROUP_DEVICE)
        except OSError:
            old = []
        try:
            bpf.prog_attach(dfd, prog, bpf.BPF_CGROUP_DEVICE, bpf.BPF_F_ALLOW_MULTI)
        except OSError as e:
            raise CgroupError(f"cannot attach the device BPF program to {cgroup_dir}: "
                              f"{e.strerror}") from None
        for pid in old:
            try:
                ofd = bpf.prog_get_fd_by_id(pid)
            except OSError:
                continue
            try:
                bpf.prog_detach(dfd, ofd, bpf.BPF_CGROUP_DEVICE)
            except OSError:
                pass
            finally:
                os.close(ofd)
    finally:
        os.close(dfd)
        os.close(prog)
