"""runc's --log / --log-format output: text (logrus style) or JSON lines, which containerd
reads back for the last "level":"error" message."""
from __future__ import annotations

from isobox import jsonfast as json  # json without its import cost (see jsonfast)
import os
import sys
import time


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


class Log:
    def __init__(self, path: str | None, fmt: str = "text", debug: bool = False):
        self.path = path
        self.fmt = fmt
        self.debug_on = debug

    def _write(self, level: str, msg: str) -> None:
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": _now()})
        else:
            line = f'time="{_now()}" level={level} msg={json.dumps(msg)}'
        if self.path:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, (line + "\n").encode())
                finally:
                    os.close(fd)
                return
            except OSError:
                pass
        if level in ("error", "warning") or self.debug_on:
            sys.stderr.write(line + "\n")

    def info(self, msg: str) -> None:
        if self.path or self.debug_on:
            self._write("info", msg)

    def debug(self, msg: str) -> None:
        if self.debug_on:
            self._write("debug", msg)

    def warning(self, msg: str) -> None:
        self._write("warning", msg)

    def error(self, msg: str) -> None:
        if self.path:
            self._write("error", msg)
