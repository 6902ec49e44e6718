"""Which isobox container a namespace belongs to (for pods and --net=container:X)."""
from __future__ import annotations

import os

from isobox.lifecycle.state import StateStore, alive


def lookup(store: StateStore):
    def find(procname: str, dev: int, ino: int):
        for cid in store.ids():
            try:
                st = store.load(cid)
            except Exception:  # noqa: BLE001 - a half-written neighbour is not ours to judge
                continue
            if not alive(st):
                continue
            try:
                s = os.stat(f"/proc/{st.pid}/ns/{procname}")
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == (dev, ino):
                return st.id, st.pid, st.uid_base, st.gid_base, st.id_size
        return None
    return find
