"""Notifications being handled, on disk, so a server that dies mid-call does not leave the
caller blocked for ever.

The kernel delivers a notification once; the listener stays open in the holder, so a call
whose server died is neither answered nor failed. Each handler first writes the raw
notification into a slot of this file and clears it after answering; a new server reads the
slots and handles those calls again when their listener comes back (if the kernel says the
call is still pending). Defined result: the call is handled as if it had just arrived; an
action the dead server had already performed (a mount, a chmod) is performed again, which
for every handler here is harmless or fails with the kernel's own errno (EEXIST for mknod)."""
from __future__ import annotations

import mmap
import os
import threading

SLOTS = 64
KEY = 160
RECORD = 256            # key (NUL-padded) | raw struct seccomp_notif (80) | padding


class Inflight:
    """Shared-mapped, so marking a call costs a memory copy rather than a write(2) each way:
    the pages stay in the file (tmpfs) when the server dies mid-call."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self.fd).st_size < SLOTS * RECORD:
            os.ftruncate(self.fd, SLOTS * RECORD)
        self.map = mmap.mmap(self.fd, SLOTS * RECORD)
        self.lock = threading.Lock()
        self.free = list(range(SLOTS))
        self.keys: dict[str, bytes] = {}

    def begin(self, key: str, raw: bytes) -> int:
        """A slot index, or -1 when every slot is taken (the call is then simply not saved)."""
        with self.lock:
            if not self.free:
                return -1
            idx = self.free.pop()
        k = self.keys.get(key)
        if k is None:
            if len(self.keys) > 4096:
                self.keys.clear()
            k = self.keys[key] = key.encode()[:KEY].ljust(KEY, b"\0")
        at = idx * RECORD
        self.map[at + KEY:at + KEY + len(raw)] = raw
        self.map[at:at + KEY] = k          # the key's first byte last: it marks the slot used
        return idx

    def end(self, idx: int) -> None:
        if idx < 0:
            return
        self.map[idx * RECORD] = 0
        with self.lock:
            self.free.append(idx)

    def take(self) -> list[tuple[str, bytes]]:
        """What a previous server left unanswered; clears the file."""
        data = self.map[:]
        out = []
        for i in range(0, len(data) - RECORD + 1, RECORD):
            rec = data[i:i + RECORD]
            if rec[0]:
                out.append((rec[:KEY].rstrip(b"\0").decode(errors="replace"), rec[KEY:KEY + 80]))
        self.map[:] = bytes(len(data))
        return out
