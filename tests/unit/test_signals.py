"""Signal names and numbers as `isobox-runc kill` accepts them (runc's forms)."""
from __future__ import annotations

import signal

import pytest

from isobox.errors import IsoboxError
from isobox.lifecycle.control import parse_signal


@pytest.mark.parametrize("text,sig", [
    ("TERM", signal.SIGTERM), ("SIGTERM", signal.SIGTERM), ("term", signal.SIGTERM), ("sigterm", signal.SIGTERM),
    ("KILL", signal.SIGKILL), ("SIGKILL", signal.SIGKILL), ("9", signal.SIGKILL), ("15", signal.SIGTERM),
    ("HUP", signal.SIGHUP), ("USR1", signal.SIGUSR1), ("SIGUSR2", signal.SIGUSR2), ("WINCH", signal.SIGWINCH),
    ("CHLD", signal.SIGCHLD), ("STOP", signal.SIGSTOP), ("CONT", signal.SIGCONT), ("1", 1),
    ("64", 64), ("RTMIN", signal.SIGRTMIN), ("SIGRTMIN", signal.SIGRTMIN), ("RTMAX", signal.SIGRTMAX),
    ("RTMIN+1", signal.SIGRTMIN + 1), ("SIGRTMIN+3", signal.SIGRTMIN + 3), ("RTMAX-1", signal.SIGRTMAX - 1),
    ("RTMIN+0", signal.SIGRTMIN),
])
def test_valid(text, sig):
    assert parse_signal(text) == sig


@pytest.mark.parametrize("text", [
    "", "0", "65", "100", "-9", "+9", "SIG", "NOPE", "SIGNOPE", "TERM ", " 9", "9.0", "RTMIN+", "RTMIN+x",
    "RTMIN-1", "RTMAX+1", "RTMIN+99", "RTMAX-99", "SIG_DFL", "DFL", "SIG_IGN", "IGN",
])
def test_invalid(text):
    with pytest.raises(IsoboxError, match="unknown signal") as e:
        parse_signal(text)
    assert "\n" not in str(e.value)
    assert repr(text) in str(e.value)


def test_every_standard_name_round_trips():
    for s in signal.Signals:
        name = s.name
        assert parse_signal(name) == s.value
        assert parse_signal(name[3:]) == s.value
        assert parse_signal(str(s.value)) == s.value


def test_upper_bound_is_nsig_minus_one():
    assert parse_signal(str(signal.NSIG - 1)) == signal.NSIG - 1
    with pytest.raises(IsoboxError):
        parse_signal(str(signal.NSIG))
