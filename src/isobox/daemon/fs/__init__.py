"""The emulated /proc and /sys files, served over one FUSE connection."""
