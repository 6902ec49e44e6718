"""Cgroup layout detection and per-container cgroups (v1, v2 and hybrid hosts)."""
from .layout import CgroupError, Hierarchy, Layout, detect, parse_cgroup_file, parse_mountinfo
from .manager import ContainerCgroup

__all__ = ["CgroupError", "ContainerCgroup", "Hierarchy", "Layout", "detect",
           "parse_cgroup_file", "parse_mountinfo"]
