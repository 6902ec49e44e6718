"""The device clamp: whatever the spec's rules say, the v1 allow-list and the v2 BPF program
grant nothing outside the allow list (devices.CORE plus the policy's [devices] allow), and
inside it no more than the rules did. Both backends get the same clamped list."""
from __future__ import annotations

import stat

import pytest

from isobox.cgroups import devices as dev
from isobox.cgroups import manager
from isobox.cgroups.layout import CgroupError
from isobox.cgroups.manager import ContainerCgroup



def R(allow: bool, t: str = "a", mj: int = -1, mn: int = -1, acc: str = "rwm") -> dev.Rule:
    return dev.Rule(allow, t, mj, mn, acc)


# runc's specconv.AllowedDevices (dockerd 20.10, no --privileged)
DOCKER_DEFAULT = [
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    *({"allow": True, "type": "c", "major": mj, "minor": mn, "access": "rwm"}
      for mj, mn in ((1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (5, 2), (10, 200))),
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
]
PRIVILEGED = [{"allow": True, "access": "rwm"}]
# the review's attack: nodes an image may ship
ATTACK = [("c", 1, 11), ("c", 1, 1), ("c", 10, 237), ("c", 4, 64), ("c", 10, 232), ("b", 7, 0),
          ("c", 5, 1), ("b", 8, 0)]
POLICY = dev.allowed([("c", 1, 3), ("c", 1, 5), ("c", 10, 229), ("c", 10, 200)])   # the default policy


def effective(spec_rules, allow=POLICY) -> list[dev.Rule]:
    return dev.clamp(dev.with_defaults(dev.parse_rules(spec_rules)), allow)


def both(rules: list[dev.Rule], t: str, mj: int, mn: int, acc: str) -> bool:
    """What v1 (the emulator the kernel mirrors) and v2 (the BPF program) decide; they must agree."""
    emu = dev.Emulator.from_rules(rules)
    hits = [set(a) for k, a in emu.exceptions.items() if k[0] == t and k[1] in (-1, mj) and k[2] in (-1, mn)]
    # the v1 kernel: an allow-all cgroup refuses what an exception touches; a deny-all one
    # grants what one exception covers whole
    v1 = not any(set(acc) & h for h in hits) if emu.default_allow else any(set(acc) <= h for h in hits)
    v2 = dev.bpf_simulate(dev.bpf_program(rules), t, mj, mn, acc)
    assert v1 == v2, (rules, t, mj, mn, acc)
    return v2


@pytest.mark.parametrize("spec", [PRIVILEGED, DOCKER_DEFAULT, None, [{"allow": True, "type": "c", "access": "rwm"}],
                                  [{"allow": True, "type": "b", "major": 7, "access": "rwm"}]],
                         ids=["privileged", "docker-default", "absent", "c-wildcard", "loop-majors"])
def test_attack_devices_are_denied_whatever_the_spec(spec):
    rules = effective(spec)
    assert rules[0] == R(False, "a", -1, -1, "rwm")              # never an allow-all default
    for t, mj, mn in ATTACK:
        for acc in ("r", "w", "m"):
            assert not both(rules, t, mj, mn, acc), (spec, t, mj, mn, acc)
    for t, mj, mn in (("c", 1, 3), ("c", 1, 5), ("c", 5, 0), ("c", 5, 2), ("c", 136, 0), ("c", 136, 9)):
        assert both(rules, t, mj, mn, "rw"), (spec, t, mj, mn)
    assert not any(r.allow and (r.type == "a" or r.major == -1) for r in rules), rules


def test_privileged_gets_exactly_the_allow_list():
    rules = effective(PRIVILEGED)
    assert rules == [R(False, "a", -1, -1, "rwm")] + [R(True, *k) for k in sorted(POLICY)]
    assert dev.v1_writes(rules)[0] == ("devices.deny", "a")
    assert ("devices.allow", "a") not in dev.v1_writes(rules)


def test_mknod_is_clamped_like_read_and_write():
    # docker's "c *:* m" / "b *:* m": the kernel refuses device mknod in a user namespace
    # before asking the cgroup, so they only survive on allowed devices
    rules = effective(DOCKER_DEFAULT)
    assert both(rules, "c", 1, 3, "m") and not both(rules, "c", 1, 11, "m") and not both(rules, "b", 8, 0, "m")


def test_policy_device_needs_the_spec_too():
    kvm = ("c", 10, 232)
    allow = POLICY | {kvm}
    assert both(effective(PRIVILEGED, allow), *kvm, "rw")                          # listed and asked for
    assert not both(effective(DOCKER_DEFAULT, allow), *kvm, "rw")                  # listed, not asked for
    asked = DOCKER_DEFAULT + [{"allow": True, "type": "c", "major": 10, "minor": 232, "access": "r"}]
    r = effective(asked, allow)
    assert both(r, *kvm, "r") and not both(r, *kvm, "w")                        # no more than asked
    assert not both(effective(asked), *kvm, "r")                                # asked, not listed


def test_deny_rules_of_an_allow_all_spec_still_apply():
    kvm = ("c", 10, 232)
    rules = effective(PRIVILEGED + [{"allow": False, "type": "c", "major": 10, "minor": 232, "access": "w"}],
                      POLICY | {kvm})
    assert both(rules, *kvm, "r") and not both(rules, *kvm, "w")
    # a hole in a wildcard key cannot be left in a deny-all list: the whole key loses the access
    rules = dev.clamp([R(True), R(False, "c", 4, 5, "w")], [("c", 4, -1)])
    assert rules == [R(False), R(True, "c", 4, -1, "rm")]
    assert not both(rules, "c", 4, 5, "w") and not both(rules, "c", 4, 6, "w") and both(rules, "c", 4, 6, "r")


def test_narrow_rules_inside_a_wildcard_key_are_kept():
    rules = dev.clamp([R(False), R(True, "c", 136, 3, "r"), R(True, "c", -1, -1, "m")], [("c", 136, -1)])
    assert rules == [R(False), R(True, "c", 136, -1, "m"), R(True, "c", 136, 3, "r")]


def test_clamp_is_idempotent_and_rejects_bad_keys():
    rules = effective(DOCKER_DEFAULT)
    assert dev.clamp(rules, POLICY) == rules
    with pytest.raises(CgroupError, match="must be of type c or b"):
        dev.clamp(rules, [("a", -1, -1)])


@pytest.mark.parametrize("target", ["v1", "bpf"])
def test_manager_hands_both_backends_the_clamped_rules(monkeypatch, tmp_path, target):
    writes: list[tuple[str, str]] = []
    programs: list = []
    monkeypatch.setattr(manager, "_write", lambda path, v: writes.append((path.rsplit("/", 1)[1], v)))
    monkeypatch.setattr(manager, "_attach_device_filter", lambda d, insns: programs.append(insns))
    monkeypatch.setattr(ContainerCgroup, "_device_target", lambda self: (target, str(tmp_path)))
    cg = ContainerCgroup.__new__(ContainerCgroup)          # only the device step is exercised
    cg._apply_devices(dev.with_defaults(dev.parse_rules(PRIVILEGED)), POLICY, fresh=True)
    want = dev.clamp([R(True)], POLICY)
    if target == "v1":
        assert writes == [("devices.allow" if r.allow else "devices.deny", r.v1()) for r in want]
        assert writes[0] == ("devices.deny", "a")
    else:
        assert programs == [dev.bpf_program(want)]
        assert not dev.bpf_simulate(programs[0], "c", 1, 11, "w")


def test_isoboxd_makes_only_nodes_the_clamp_lets_a_container_open():
    from isobox.daemon.syscalls import mknod
    assert {("c", mj, mn) for mj, mn in mknod.SAFE} <= set(dev.CORE)
    for mj, mn in ((5, 1), (1, 11), (10, 232)):           # the host's console, kmsg, kvm
        assert mknod.classify(stat.S_IFCHR | 0o600, mj, mn) == "refuse"
