"""Writing configuration files crash-safely: temp file in the same directory, fsync,
rename over the original (keeping its mode and owner), fsync of the directory; and reading
a small text file (a pid file, a /proc value) with a default when it cannot be read."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, text: str, like: os.stat_result | None = None, mode: int = 0o644) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`.

    The new file keeps the mode and owner of `like` (or of the existing file)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o755, exist_ok=True)
    if like is None:
        try:
            like = os.stat(path)
        except FileNotFoundError:
            like = None
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if like is not None:
                os.fchmod(f.fileno(), like.st_mode & 0o7777)
                try:
                    os.fchown(f.fileno(), like.st_uid, like.st_gid)
                except PermissionError:
                    pass
            else:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_text(path: str, default: str = "") -> str:
    """The file's text, stripped; default when it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default
