"""Writing configuration files crash-safely: temp file in the same directory, fsync,
rename over the original (keeping its mode and owner), fsync of the directory; reading a
small text file (a pid file, a /proc value) with a default when it cannot be read; and files
and directories only root may read (root_only, private_dir), whatever the umask."""
from __future__ import annotations

import os


def atomic_write(path: str, text: str, like: os.stat_result | None = None, mode: int = 0o644) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`.

    The new file keeps the mode and owner of `like` (or of the existing file)."""
    import tempfile          # not at the top: the runtime imports this module for root_only
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


SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def root_only(path: str, companions: tuple[str, ...] = SQLITE_COMPANIONS) -> int:
    """Creates path 0600 whatever the umask, or tightens one an older version left readable
    to others, with its companion files (SQLite gives the -wal, -shm and -journal it creates
    the database's mode); returns its size (0: just created)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
            for suffix in companions:
                try:
                    os.chmod(path + suffix, 0o600)
                except FileNotFoundError:
                    pass
        return st.st_size
    finally:
        os.close(fd)


def private_dir(path: str) -> None:
    """Makes path a directory only root may enter (root's, 0700), creating it or tightening
    one an older version (or an os.makedirs of a subdirectory) left open."""
    import stat
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(path)
    if st.st_uid != 0:
        os.chown(path, 0, 0)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
