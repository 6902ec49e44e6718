"""What every engine's installer shares: config paths, the one-time backup, the undo record
and atomic writes that keep the file's mode and owner."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from isobox.errors import IsoboxError
from isobox.fileio import atomic_write  # noqa: F401  (re-exported for the engines)

RUNTIME_NAME = "isobox"
RUNC_BINARY = "/usr/local/bin/isobox-runc"
BACKUP_SUFFIX = ".isobox-backup"
UNDO_SUFFIX = ".isobox-undo"     # what install overwrote (previous defaults), for uninstall


@dataclass
class Outcome:
    engine: str
    path: str
    changed: bool
    summary: str                                   # one line: what was done (or that nothing was)
    reload: str = ""                               # what the operator must run now
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.engine}: {self.summary}"]
        if self.changed and self.reload:
            out.append(f"{self.engine}: {self.reload}")
        out += [f"{self.engine}: {n}" for n in self.notes]
        return out


def config_path(env: str, default: str, path: str | None = None) -> str:
    return path or os.environ.get(env) or default


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IsoboxError(f"cannot read {path}: {e.strerror}") from None


def backup_once(path: str) -> str | None:
    """Copy the original next to it as <path>.isobox-backup, only if no backup exists yet.

    A file that did not exist gets no backup (uninstall then removes only isobox's keys)."""
    original = read_text(path)
    bak = path + BACKUP_SUFFIX
    if original is None:
        return None
    if os.path.lexists(bak):
        return bak
    st = os.stat(path)
    atomic_write(bak, original, like=st)
    return bak


def uninstall_file(engine: str, where: str, uninstall_text, reload: str, what: str) -> "Outcome":
    """The shared uninstall of a TOML-configured engine: apply uninstall_text(text, undo, where),
    delete the file if install had created it, and say what to reload."""
    text = read_text(where)
    if text is None:
        return Outcome(engine, where, False, f"{where} does not exist; nothing changed")
    undo = load_undo(where)
    new, new_undo = uninstall_text(text, undo, where)
    if new == text:
        return Outcome(engine, where, False, f"{where} has no isobox entries; nothing changed")
    if new is None:
        os.unlink(where)
        save_undo(where, new_undo)
        return Outcome(engine, where, True, f"removed {where} (isobox install had created it)", reload)
    commit(where, text, new, undo, new_undo)
    return Outcome(engine, where, True, f"removed isobox from {where}", reload,
                   [f"containers created with the isobox {what} cannot start again until isobox is installed"])


def load_undo(path: str) -> dict:
    text = read_text(path + UNDO_SUFFIX)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise IsoboxError(f"{path + UNDO_SUFFIX} is not valid JSON; fix or remove it") from None
    return data if isinstance(data, dict) else {}


def save_undo(path: str, undo: dict) -> None:
    u = path + UNDO_SUFFIX
    if undo:
        atomic_write(u, json.dumps(undo, indent=2, sort_keys=True) + "\n", mode=0o600)
    else:
        try:
            os.unlink(u)
        except FileNotFoundError:
            pass


def remember(undo: dict, key: str, previous, new) -> None:
    """Record the value install overwrites at `key` (None: the key was absent). Only the first
    record counts, so a second install never loses the value from before the first."""
    if key not in undo:
        undo[key] = {"previous": previous, "set": new}


def commit(path: str, old_text: str | None, new_text: str, undo_before: dict, undo_after: dict) -> None:
    """Back up (once), write the undo record, then the config, atomically."""
    if old_text is not None:
        backup_once(path)
    if undo_after != undo_before:
        save_undo(path, undo_after)
    atomic_write(path, new_text)
