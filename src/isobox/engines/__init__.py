"""Registering isobox-runc with the engines: dockerd, containerd and Podman.

Only `isobox install`/`uninstall` (tomlkit) and `isobox doctor` (read-only, stdlib tomllib)
import this package; isobox-runc never does."""
