"""The subordinate-ID pool: the host IDs isobox hands out to containers.

The pool is declared in /etc/subuid and /etc/subgid for the user `isobox` so
that other tools (useradd, podman, ...) see it as taken. The same start is used
in both files because every container gets one range used for uids and gids.
"""
from __future__ import annotations

from isobox.plain import Frozen

RANGE_SIZE = 65536
POOL_COUNT = RANGE_SIZE * 4096
POOL_MIN_START = 1048576  # stay clear of the ranges useradd hands to login users
MAX_ID = 2**32 - 2  # (uid_t)-1 is reserved


class PoolError(Exception):
    """A problem with the pool declaration; the message is one line for the user."""


class SubIdEntry(Frozen):
    """(Not a dataclass: see isobox.plain.)"""
    name: str
    start: int
    count: int
    _FIELDS = __slots__ = ("name", "start", "count")

    def __init__(self, name: str, start: int, count: int):
        self._set(name=name, start=start, count=count)

    @property
    def end(self) -> int:
        """One past the last ID."""
        return self.start + self.count


class PoolPlan(Frozen):
    """Result of plan_pool: the pool and the new file texts (None = unchanged)."""
    start: int
    count: int
    subuid_text: str | None
    subgid_text: str | None
    _FIELDS = __slots__ = ("start", "count", "subuid_text", "subgid_text")

    def __init__(self, start: int, count: int, subuid_text: str | None, subgid_text: str | None):
        self._set(start=start, count=count, subuid_text=subuid_text, subgid_text=subgid_text)


def parse_subid(text: str) -> list[SubIdEntry]:
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) != 3 or not fields[0]:
            continue  # tolerate junk like shadow's tools do
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start < 0 or count <= 0:
            continue
        entries.append(SubIdEntry(fields[0], start, count))
    return entries


def _align_up(n: int) -> int:
    return -(-n // RANGE_SIZE) * RANGE_SIZE


def choose_pool_start(entries: list[SubIdEntry]) -> int:
    """Smallest multiple of RANGE_SIZE >= POOL_MIN_START past every entry's end.

    Going past the highest end (rather than filling gaps) keeps the choice
    simple and leaves gaps to useradd, which allocates from the low end.
    """
    end = max((e.end for e in entries), default=0)
    return _align_up(max(POOL_MIN_START, end))


def _user_entry(entries: list[SubIdEntry], user: str, path: str) -> SubIdEntry | None:
    # A user may have several lines; the first one is the pool.
    for e in entries:
        if e.name == user:
            if e.count < RANGE_SIZE:
                raise PoolError(f"subordinate ID pool of user {user} in {path} has only "
                                f"{e.count} IDs; at least {RANGE_SIZE} are needed")
            return e
    return None


def _existing_pool(user: str, uids: list[SubIdEntry], gids: list[SubIdEntry],
                   subuid: str, subgid: str) -> tuple[int, int] | None:
    """The user's pool if declared consistently in both files, None if in neither."""
    u, g = _user_entry(uids, user, subuid), _user_entry(gids, user, subgid)
    if u is None and g is None:
        return None
    if u is None or g is None:
        have, lack = (subuid, subgid) if g is None else (subgid, subuid)
        e = u or g
        raise PoolError(f"user {user} has a subordinate ID pool in {have} but not in {lack}; "
                        f"add `{user}:{e.start}:{e.count}` to {lack} or remove the entry")
    if u.start != g.start:
        raise PoolError(f"subordinate ID pools of user {user} differ: {subuid} starts at "
                        f"{u.start}, {subgid} at {g.start}; they must start at the same ID")
    return u.start, min(u.count, g.count)


def plan_pool(user: str, subuid_text: str, subgid_text: str,
              subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> PoolPlan:
    """Pure part of ensure_pool: decide the pool and the edited file contents."""
    uids, gids = parse_subid(subuid_text), parse_subid(subgid_text)
    existing = _existing_pool(user, uids, gids, subuid, subgid)
    if existing is not None:
        return PoolPlan(existing[0], existing[1], None, None)
    start = choose_pool_start(uids + gids)
    if start + POOL_COUNT - 1 > MAX_ID:
        raise PoolError(f"no room for a subordinate ID pool of {POOL_COUNT} IDs after the "
                        f"entries in {subuid} and {subgid}")
    line = f"{user}:{start}:{POOL_COUNT}\n"

    def add(text: str) -> str:
        return text + ("\n" if text and not text.endswith("\n") else "") + line

    return PoolPlan(start, POOL_COUNT, add(subuid_text), add(subgid_text))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _write_atomic(path: str, text: str) -> None:
    """Replace path via temp file + rename, keeping its mode/owner (0644 if new)."""
    from isobox.fileio import atomic_write  # setup-only: read_pool is on every create's path
    atomic_write(path, text)


def _ensure_user(user: str) -> None:
    import pwd
    import shutil
    import subprocess
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        r = subprocess.run([useradd, "--system", "--no-create-home",
                            "--shell", "/usr/sbin/nologin", user],
                           capture_output=True, text=True)
    except OSError as e:
        raise PoolError(f"cannot create user {user}: {e}") from None
    if r.returncode != 0:
        msg = " ".join(r.stderr.split()) or f"exit status {r.returncode}"
        raise PoolError(f"cannot create user {user}: {msg}")


def ensure_pool(user: str = "isobox", subuid: str = "/etc/subuid",
                subgid: str = "/etc/subgid") -> tuple[int, int]:
    """Create the user and the pool entries if absent; return (start, count)."""
    _ensure_user(user)  # first: useradd may itself touch the subid files
    plan = plan_pool(user, _read(subuid), _read(subgid), subuid, subgid)
    if plan.subuid_text is not None:
        _write_atomic(subuid, plan.subuid_text)
    if plan.subgid_text is not None:
        _write_atomic(subgid, plan.subgid_text)
    return plan.start, plan.count


def read_pool(user: str = "isobox", subuid: str = "/etc/subuid",
              subgid: str = "/etc/subgid") -> tuple[int, int]:
    uids, gids = parse_subid(_read(subuid)), parse_subid(_read(subgid))
    pool = _existing_pool(user, uids, gids, subuid, subgid)  # raises on mismatch
    if pool is None:
        raise PoolError(f"no subordinate ID pool for user {user} in {subuid}; "
                        f"run `isobox setup`")
    return pool
