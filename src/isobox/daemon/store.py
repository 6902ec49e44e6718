"""What must outlive a server restart: registrations and node ids (SQLite, WAL).

A FUSE node id is (container index << 32) | path id. Both halves come from this database,
so a new server answers requests for nodes its predecessor handed out (the kernel keeps
using those ids for as long as a container has the file open or cached)."""
from __future__ import annotations

import json
import sqlite3
import threading

from isobox.daemon.fs.context import Container
from isobox.fileio import root_only

SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (key TEXT PRIMARY KEY, idx INTEGER UNIQUE NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS paths (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL);
"""
FIRST_PATH_ID = 2     # 1 is a container's own directory (path "")


class Store:
    def __init__(self, path: str):
        root_only(path)             # every container's key, ID range and init pid
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def containers(self) -> list[tuple[int, Container]]:
        rows = self.db.execute("SELECT idx, doc FROM containers").fetchall()
        return [(idx, Container(**json.loads(doc))) for idx, doc in rows]

    def save(self, c: Container, idx: int | None = None) -> int:
        """Inserts or updates; returns the container's index (stable for its life)."""
        doc = json.dumps(c.__dict__)
        with self.lock:
            row = self.db.execute("SELECT idx FROM containers WHERE key=?", (c.key,)).fetchone()
            if row:
                self.db.execute("UPDATE containers SET doc=? WHERE key=?", (doc, c.key))
                return row[0]
            if idx is None:
                # the lowest free index, so indexes stay small on a long-lived host
                used = {r[0] for r in self.db.execute("SELECT idx FROM containers")}
                idx = next(i for i in range(1, len(used) + 2) if i not in used)
            self.db.execute("INSERT INTO containers (key, idx, doc) VALUES (?, ?, ?)", (c.key, idx, doc))
            return idx

    def remove(self, key: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM containers WHERE key=?", (key,))

    def paths(self) -> dict[int, str]:
        return dict(self.db.execute("SELECT id, path FROM paths").fetchall())

    def path_id(self, path: str) -> int:
        with self.lock:
            row = self.db.execute("SELECT id FROM paths WHERE path=?", (path,)).fetchone()
            if row:
                return row[0]
            cur = self.db.execute("INSERT INTO paths (id, path) VALUES ((SELECT max(?, coalesce(max(id), 0) + 1) "
                                  "FROM paths), ?)", (FIRST_PATH_ID, path))
            return cur.lastrowid
