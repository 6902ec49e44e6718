"""isobox-runc's hand-written runc-compatible argument parser (pure logic, no containers)."""
from __future__ import annotations

import pytest

from isobox.errors import IsoboxError
from isobox.runc.args import COMMANDS, parse


def test_empty():
    p = parse([])
    assert p.command == "" and p.globals == {} and p.args == []


@pytest.mark.parametrize("argv", [
    ["--root", "/r", "state", "c1"],
    ["--root=/r", "state", "c1"],
    ["-root", "/r", "state", "c1"],
    ["-root=/r", "state", "c1"],
    ["state", "--root", "/r", "c1"],      # runc's global flags may follow the command
    ["state", "c1", "--root=/r"],
])
def test_value_flag_forms(argv):
    p = parse(argv)
    assert p.globals == {"root": "/r"}
    assert p.command == "state" and p.args == ["c1"] and p.flags == {}


def test_create_flags_and_aliases():
    p = parse(["--log", "/l", "--log-format", "json", "create", "-b", "/bundle", "--pid-file=/p", "--no-new-keyring",
               "c1"])
    assert p.globals == {"log": "/l", "log-format": "json"}
    assert p.command == "create"
    assert p.flags == {"bundle": "/bundle", "pid-file": "/p", "no-new-keyring": True}
    assert p.args == ["c1"]


@pytest.mark.parametrize("value,expected", [("true", True), ("TRUE", True), ("1", True), ("false", False),
                                            ("0", False), ("False", False)])
def test_bool_flag_with_value(value, expected):
    p = parse(["run", f"--detach={value}", "c1"])
    assert p.flags == {"detach": expected}


def test_bool_flag_alias_and_run_flags():
    p = parse(["run", "-d", "--keep", "--bundle", "b", "c1"])
    assert p.flags == {"detach": True, "keep": True, "bundle": "b"}


def test_bool_flag_does_not_eat_next_arg():
    p = parse(["delete", "--force", "c1"])
    assert p.flags == {"force": True} and p.args == ["c1"]
    p = parse(["delete", "-f", "c1"])
    assert p.flags == {"force": True} and p.args == ["c1"]


@pytest.mark.parametrize("argv", [["run", "--detach=maybe", "c1"], ["--debug=yes", "list"]])
def test_bool_flag_bad_value(argv):
    with pytest.raises(IsoboxError, match="takes no value"):
        parse(argv)


def test_global_bool_flags():
    p = parse(["--debug", "--systemd-cgroup", "list"])
    assert p.globals == {"debug": True, "systemd-cgroup": True}
    assert parse(["-v"]).globals == {"version": True}
    assert parse(["-h"]).globals == {"help": True}
    assert parse(["--rootless", "false", "list"]).globals == {"rootless": "false"}


@pytest.mark.parametrize("argv,match", [
    (["--bogus", "list"], "unknown flag --bogus for isobox-runc"),
    (["list", "--bogus=1"], "unknown flag --bogus for list"),
    (["create", "--detach", "c1"], "unknown flag --detach for create"),
    (["start", "-f", "c1"], "unknown flag -f for start"),
])
def test_unknown_flags(argv, match):
    with pytest.raises(IsoboxError, match=match):
        parse(argv)


@pytest.mark.parametrize("argv,match", [
    (["--root"], "--root of isobox-runc needs a value"),
    (["create", "c1", "--bundle"], "--bundle of create needs a value"),
    (["list", "--format"], "--format of list needs a value"),
])
def test_missing_values(argv, match):
    with pytest.raises(IsoboxError, match=match):
        parse(argv)


def test_value_flag_takes_next_even_if_dashed():
    p = parse(["create", "--bundle", "-weird", "c1"])
    assert p.flags == {"bundle": "-weird"} and p.args == ["c1"]


def test_unknown_command():
    with pytest.raises(IsoboxError, match="unknown command 'frob'") as e:
        parse(["frob", "x"])
    assert "\n" not in str(e.value)
    for cmd in COMMANDS:
        assert cmd in str(e.value)


@pytest.mark.parametrize("argv,match", [
    (["start"], "start needs a container id"),
    (["state"], "state needs a container id"),
    (["delete"], "delete needs a container id"),
    (["create"], "create needs a container id"),
    (["start", "a", "b"], r"start takes 1 argument\(s\), got 2"),
    (["list", "x"], r"list takes 0 argument\(s\), got 1"),
    (["spec", "x"], r"spec takes 0 argument\(s\), got 1"),
    (["features", "x"], r"features takes 0 argument\(s\), got 1"),
    (["kill"], "kill needs a container id"),
    (["kill", "a", "TERM", "x"], "kill needs a container id"),
])
def test_positional_counts(argv, match):
    with pytest.raises(IsoboxError, match=match):
        parse(argv)


def test_kill_forms():
    assert parse(["kill", "c1"]).args == ["c1"]
    p = parse(["kill", "--all", "c1", "KILL"])
    assert p.flags == {"all": True} and p.args == ["c1", "KILL"]
    p = parse(["kill", "-a", "c1", "9"])
    assert p.flags == {"all": True} and p.args == ["c1", "9"]
    p = parse(["kill", "c1", "SIGKILL", "--all"])
    assert p.flags == {"all": True} and p.args == ["c1", "SIGKILL"]


def test_kill_dash_number_after_id_is_positional():
    p = parse(["kill", "c1", "-9"])
    assert p.args == ["c1", "-9"] and p.flags == {}


def test_kill_dash_number_before_id_is_a_flag():
    with pytest.raises(IsoboxError, match="unknown flag -9 for kill"):
        parse(["kill", "-9", "c1"])


def test_double_dash():
    p = parse(["state", "--", "-c1"])
    assert p.args == ["-c1"] and p.flags == {}


def test_single_dash_is_positional():
    p = parse(["state", "-"])
    assert p.args == ["-"]


def test_command_flag_wins_over_global_of_same_name():
    # `spec --rootless` is spec's boolean flag, not the global --rootless that takes a value
    p = parse(["spec", "--rootless"])
    assert p.flags == {"rootless": True} and p.globals == {}


def test_last_value_wins():
    p = parse(["--root", "/a", "--root", "/b", "list"])
    assert p.globals == {"root": "/b"}


def test_list_flags():
    p = parse(["list", "-q", "-f", "json"])
    assert p.flags == {"quiet": True, "format": "json"}
