"""Crash-safe allocation of host ID ranges to containers, persisted in SQLite.

Every write runs in a `BEGIN IMMEDIATE` transaction, which takes the database's
write lock up front, so concurrent creates in many processes are serialised
and can never pick the same range. A range lives as long as it has holders;
its reference count is simply the number of holder rows pointing at it.
"""
from __future__ import annotations

import os
import time

# The C module behind `sqlite3` (the same connect, Connection and Error): sqlite3.dbapi2 adds
# only the datetime adapters, never used here, and importing it (datetime, collections) costs
# ~5 ms of every create and delete.
import _sqlite3 as sqlite3

from isobox.plain import Frozen
from isobox.fileio import private_dir, root_only

from .pool import RANGE_SIZE, PoolError, read_pool
from .procinfo import proc_starttime

__all__ = ["Allocator", "Holder", "IdError", "proc_starttime", "DEFAULT_DB"]

DEFAULT_DB = "/var/lib/isobox/ids.db"
BUSY_TIMEOUT = 10.0  # seconds to wait for another process's transaction
GC_GRACE_SECONDS = 60.0  # a holder without init may be mid-create for this long
MAX_ID = 2**32 - 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ranges (
    base INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL              -- 'pool' or 'claim'
);
CREATE TABLE IF NOT EXISTS holders (
    root TEXT NOT NULL,
    container_id TEXT NOT NULL,
    base INTEGER NOT NULL,
    init_pid INTEGER,
    init_starttime INTEGER,
    created REAL NOT NULL,          -- wall clock, survives reboots unlike monotonic
    PRIMARY KEY (root, container_id)
);
CREATE INDEX IF NOT EXISTS holders_base ON holders(base);
"""


class IdError(Exception):
    """An allocation failure; the message is one clear line for the user."""


class Holder(Frozen):
    """(Not a dataclass: see isobox.plain.)"""
    root: str  # the runtime's --root state dir
    container_id: str
    _FIELDS = __slots__ = ("root", "container_id")

    def __init__(self, root: str, container_id: str):
        # Normalise so "run/x" and "/abs/run/x" are one holder and gc's
        # state-dir check does not depend on the caller's cwd.
        self._set(root=os.path.abspath(root), container_id=container_id)


def _span(base: int, size: int) -> str:
    return f"{base}-{base + size - 1}"


class _Txn:
    """Allocator._txn's context manager (a class: contextlib costs ~4 ms of imports per runtime call).
    A connection per transaction: cheap, and safe across fork()."""
    __slots__ = ("db_path", "conn")

    def __init__(self, db_path: str):
        self.db_path = db_path
        self.conn: sqlite3.Connection | None = None

    def __enter__(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except sqlite3.Error as e:
            raise IdError(f"cannot open ID database {self.db_path}: {e}") from None
        self.conn = conn
        try:
            # WAL (set once by `isobox setup`, see use_wal) commits atomically without an fsync
            # per transaction; what a power loss could drop is lost with /run anyway.
            # The rollback journal keeps synchronous=FULL.
            wal = conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            conn.execute("PRAGMA synchronous=NORMAL" if wal else "PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as e:
            self._fail(e)
            raise
        return conn

    def __exit__(self, et, ev, tb) -> bool:
        if et is None:
            try:
                self.conn.execute("COMMIT")  # type: ignore[union-attr]
            except BaseException as e:
                self._fail(e)
                raise
            self.conn.close()  # type: ignore[union-attr]
            return False
        self._fail(ev)
        return False

    def _fail(self, e: BaseException) -> None:
        """Roll back and close; a sqlite3 error is raised again as an IdError."""
        conn = self.conn
        assert conn is not None
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            conn.close()
        if isinstance(e, sqlite3.Error):
            raise IdError(f"ID database {self.db_path}: {e}") from None


class Allocator:
    def __init__(self, db_path: str | None = None,
                 pool: tuple[int, int] | None = None) -> None:
        self.db_path = db_path or os.environ.get("ISOBOX_IDS_DB") or DEFAULT_DB
        self._pool = pool  # read lazily: release/gc must work without /etc/subuid
        parent = os.path.dirname(os.path.abspath(self.db_path))
        try:
            if not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
                os.chmod(parent, 0o700)
            elif parent == os.path.dirname(DEFAULT_DB):
                private_dir(parent)          # made 0755 by an older version, or by a makedirs of images/
            fresh = root_only(self.db_path) == 0     # every container's id, state root and range
        except OSError as e:
            raise IdError(f"cannot create ID database {self.db_path}: {e.strerror}") from None
        if not fresh:
            return          # the schema exists: no write transaction (and fsync) per runtime call
        with self._txn() as conn:
            # Not executescript(): it would commit and drop the IMMEDIATE lock.
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)

    def use_wal(self) -> None:
        """Switch the database to write-ahead logging (persistent; run once, by set-up, so
        concurrent runtime calls never race to convert it)."""
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            raise IdError(f"ID database {self.db_path}: {e}") from None
        finally:
            conn.close()

    @property
    def pool(self) -> tuple[int, int]:
        if self._pool is None:
            try:
                self._pool = read_pool()
            except PoolError as e:  # keep callers on one exception type
                raise IdError(str(e)) from None
        return self._pool

    def _txn(self) -> _Txn:
        """`with self._txn() as conn:` one IMMEDIATE transaction, committed at the end of the
        block, rolled back on an exception (sqlite3 errors become IdError)."""
        return _Txn(self.db_path)

    # -- queries used inside transactions ---------------------------------

    @staticmethod
    def _held(conn: sqlite3.Connection, holder: Holder) -> int | None:
        row = conn.execute("SELECT base FROM holders WHERE root=? AND container_id=?",
                           (holder.root, holder.container_id)).fetchone()
        return None if row is None else row[0]

    def _check_free_holder(self, conn: sqlite3.Connection, holder: Holder) -> None:
        base = self._held(conn, holder)
        if base is not None:
            raise IdError(f"container {holder.container_id} already holds the ID range "
                          f"starting at {base}")

    @staticmethod
    def _add_holder(conn: sqlite3.Connection, holder: Holder, base: int,
                    pid: int | None = None, starttime: int | None = None) -> None:
        conn.execute("INSERT INTO holders VALUES (?,?,?,?,?,?)",
                     (holder.root, holder.container_id, base, pid, starttime, time.time()))

    def _free_slot(self, conn: sqlite3.Connection) -> int | None:
        """Lowest RANGE_SIZE-aligned slot in the pool clear of every live range."""
        start, count = self.pool
        end = start + count
        cand = -(-max(start, 1) // RANGE_SIZE) * RANGE_SIZE  # never the slot holding ID 0
        for base, size in conn.execute(
                "SELECT base, size FROM ranges WHERE base + size > ? AND base < ? "
                "ORDER BY base", (cand, end)):
            if base + size <= cand:
                continue
            if base >= cand + RANGE_SIZE:
                break
            cand = -(-(base + size) // RANGE_SIZE) * RANGE_SIZE  # live ranges never overlap
        return cand if cand + RANGE_SIZE <= end else None

    @staticmethod
    def _overlap(conn: sqlite3.Connection, base: int, size: int) -> tuple[int, int, str] | None:
        return conn.execute(
            "SELECT r.base, r.size, h.container_id FROM ranges r "
            "JOIN holders h ON h.base = r.base "
            "WHERE r.base < ? AND r.base + r.size > ? ORDER BY r.base LIMIT 1",
            (base + size, base)).fetchone()

    # -- public API ----------------------------------------------------------

    def allocate(self, holder: Holder, init_pid: int | None = None) -> int:
        starttime = proc_starttime(init_pid) if init_pid is not None else None
        with self._txn() as conn:
            self._check_free_holder(conn, holder)
            base = self._free_slot(conn)
            if base is None and self._gc(conn):  # reclaim dead holders before failing
                base = self._free_slot(conn)
            if base is not None:
                conn.execute("INSERT INTO ranges VALUES (?,?,'pool')", (base, RANGE_SIZE))
                self._add_holder(conn, holder, base, init_pid, starttime)
            in_use = conn.execute("SELECT count(*) FROM ranges").fetchone()[0]
        # Raised after the commit so that what gc reclaimed stays reclaimed.
        if base is None:
            raise IdError(f"ID pool exhausted: {in_use} ranges in use; delete unused "
                          f"containers or enlarge the isobox entries in /etc/subuid "
                          f"and /etc/subgid")
        return base

    def claim(self, holder: Holder, base: int, size: int) -> int:
        span = _span(base, size)
        if size <= 0 or base < 0 or base + size - 1 > MAX_ID:
            raise IdError(f"uid mapping {span} is not a valid host ID range")
        if base == 0:
            raise IdError(f"uid mapping {span} includes host ID 0 (root), which is never "
                          f"given to a container")
        with self._txn() as conn:
            self._check_free_holder(conn, holder)
            clash = self._overlap(conn, base, size)
            if clash is not None and self._gc(conn):
                clash = self._overlap(conn, base, size)
            if clash is None:
                conn.execute("INSERT INTO ranges VALUES (?,?,'claim')", (base, size))
                self._add_holder(conn, holder, base)
        if clash is not None:
            raise IdError(f"uid mapping {span} overlaps the range of container {clash[2]} "
                          f"({_span(clash[0], clash[1])})")
        return base

    def share(self, holder: Holder, base: int) -> int:
        with self._txn() as conn:
            self._check_free_holder(conn, holder)
            live = conn.execute("SELECT 1 FROM holders WHERE base=? LIMIT 1",
                                (base,)).fetchone()
            if live is None:
                raise IdError(f"no container holds an ID range starting at {base}; "
                              f"the container whose user namespace is joined must exist")
            self._add_holder(conn, holder, base)
        return base

    def set_init(self, holder: Holder, pid: int, starttime: int) -> None:
        with self._txn() as conn:
            cur = conn.execute(
                "UPDATE holders SET init_pid=?, init_starttime=? "
                "WHERE root=? AND container_id=?",
                (pid, starttime, holder.root, holder.container_id))
            if cur.rowcount == 0:
                raise IdError(f"container {holder.container_id} holds no ID range")

    def release(self, holder: Holder) -> int | None:
        with self._txn() as conn:
            base = self._held(conn, holder)
            if base is None:
                return None
            conn.execute("DELETE FROM holders WHERE root=? AND container_id=?",
                         (holder.root, holder.container_id))
            return base if self._free_unheld(conn, base) else None

    def lookup(self, holder: Holder) -> int | None:
        with self._txn() as conn:
            return self._held(conn, holder)

    def holders(self) -> list[tuple[Holder, int]]:
        with self._txn() as conn:
            rows = conn.execute("SELECT root, container_id, base FROM holders "
                                "ORDER BY base, root, container_id").fetchall()
        return [(Holder(r, c), b) for r, c, b in rows]

    def gc(self) -> list[Holder]:
        with self._txn() as conn:
            return self._gc(conn)

    # -- garbage collection -------------------------------------------------

    @staticmethod
    def _free_unheld(conn: sqlite3.Connection, base: int) -> bool:
        cur = conn.execute("DELETE FROM ranges WHERE base=? AND NOT EXISTS "
                           "(SELECT 1 FROM holders WHERE base=?)", (base, base))
        return cur.rowcount > 0

    @staticmethod
    def _dead(root: str, cid: str, pid: int | None, starttime: int | None,
              created: float) -> bool:
        if os.path.lexists(os.path.join(root, cid)):
            return False
        if pid is None or starttime is None:
            # Init never recorded: maybe still being created, or crashed early.
            return time.time() - created > GC_GRACE_SECONDS
        return proc_starttime(pid) != starttime  # gone, or pid reused

    def _gc(self, conn: sqlite3.Connection) -> list[Holder]:
        removed = []
        for root, cid, pid, st, created in conn.execute(
                "SELECT root, container_id, init_pid, init_starttime, created "
                "FROM holders").fetchall():
            if self._dead(root, cid, pid, st, created):
                conn.execute("DELETE FROM holders WHERE root=? AND container_id=?",
                             (root, cid))
                removed.append(Holder(root, cid))
        conn.execute("DELETE FROM ranges WHERE base NOT IN (SELECT base FROM holders)")
        return removed
