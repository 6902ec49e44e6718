"""isoboxd's emulated /proc and /sys nodes, mounted over the container's own before the
builder enters the user namespace, so the kernel locks them like every initial mount."""
from __future__ import annotations

import os

from isobox.linux import syscalls as k
from isobox.mounts import dev, resolve


def bind(rootfd: int, mounts: list[tuple[str, str, str]], opened: dict[str, int] | None = None) -> None:
    """opened: detached clones of some sources, made earlier (see Prefetch); used and closed."""
    opened = dict(opened or {})
    try:
        for kind, source, dest in mounts:
            fd = resolve.exists_in_root(rootfd, dest)
            if fd is None:
                continue    # the spec mounts no /proc, or this kernel has no such node (configfs)
            try:
                if kind == "overlay":
                    target = resolve.fd_path(fd)
                    # lower layers only: read-only, the container's own directory stays the bottom one
                    k.mount("isobox-emulation", target, "overlay",
                            k.MS_RDONLY | k.MS_NOSUID | k.MS_NODEV | k.MS_NOEXEC, f"lowerdir={source}:{target}")
                elif source in opened:
                    dev.attach(opened.pop(source), fd)
                else:
                    dev.bind_node(source, fd)
            finally:
                os.close(fd)
    finally:
        for src in opened.values():
            os.close(src)


class Prefetch:
    """Clones isoboxd's nodes for bind() on a thread of the warm worker while it starts the
    init: each clone looks its path up in isoboxd's FUSE tree (a round trip to isoboxd per
    component), about 4 ms for the ~15 nodes, which otherwise sit on the builder's critical
    path. result() waits for them; a node that failed is simply cloned again by bind()."""

    def __init__(self, mounts: list[tuple[str, str, str]]):
        import _thread
        self.sources = [source for kind, source, _ in mounts if kind == "bind"]
        self.fds: dict[str, int] = {}
        self.done = _thread.allocate_lock()
        self.done.acquire()
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            for source in self.sources:
                try:
                    self.fds[source] = k.open_tree(k.AT_FDCWD, source, k.OPEN_TREE_CLONE | k.OPEN_TREE_CLOEXEC)
                except OSError:
                    pass
        finally:
            self.done.release()

    def result(self) -> dict[str, int]:
        with self.done:            # held by the thread until it is done
            return self.fds

    def close(self) -> None:
        for fd in self.result().values():
            os.close(fd)
        self.fds = {}
