"""/sys/devices/virtual/dmi/id/product_uuid: stable for a container, different between
containers (Kubernetes, Weave and Calico key nodes on it), and never the host's own."""
from __future__ import annotations

import hashlib

from isobox.daemon.fs.context import RenderCtx


def render(ctx: RenderCtx) -> bytes:
    h = hashlib.sha256(b"isobox product_uuid\0" + ctx.container.id.encode()).hexdigest()
    # RFC 4122 layout, version 4 / variant 10 bits set, like a random UUID firmware would report
    h = h[:12] + "4" + h[13:16] + "89ab"[int(h[16], 16) & 3] + h[17:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}\n".encode()
