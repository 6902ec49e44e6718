"""create: validate, decide (rewrite), allocate, build, and stop at the start barrier.

Every resource is registered for undo the moment it exists, so a failure at any step
leaves no mount, cgroup, ID range, process or state file behind."""
from __future__ import annotations

import os

from isobox.errors import IsoboxError
from isobox.lifecycle import owners
from isobox.lifecycle.state import ContainerState, StateStore, now_rfc3339, proc_starttime
from isobox.spec.config import key, load_bundle, validate_id
from isobox.spec.plan import Plan
from isobox.spec.rewrite import rewrite


def write_pid_file(path: str, pid: int) -> None:
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def _undo(cleanup: list) -> None:
    for fn in reversed(cleanup):
        try:
            fn()
        except Exception:  # noqa: BLE001 - keep undoing the rest
            pass


def _ids(plan: Plan, holder) -> tuple[object, int]:
    from isobox.ids.allocator import Allocator, IdError
    from isobox.ids.pool import PoolError
    try:
        alloc = Allocator()
        if plan.shares_userns_of:
            base = alloc.share(holder, plan.uid_base)
        elif plan.explicit_mapping:
            base = alloc.claim(holder, plan.uid_base, plan.id_size)
        else:
            base = alloc.allocate(holder)
    except (IdError, PoolError) as e:
        raise IsoboxError(str(e)) from None
    return alloc, base


def create(store: StateStore, cid: str, bundle: str, pid_file: str | None = None,
           log=None) -> ContainerState:
    validate_id(cid)
    spec = load_bundle(bundle)
    if store.exists(cid):
        raise IsoboxError(f"container with id {cid!r} already exists")
    plan = rewrite(cid, bundle, spec, owners.lookup(store))
    store.reserve(cid)
    cleanup: list = [lambda: store.remove(cid)]
    try:
        from isobox.cgroups.layout import detect
        from isobox.cgroups.manager import CgroupError, ContainerCgroup
        from isobox.ids.allocator import Holder
        from isobox.init.launch import launch

        holder = Holder(store.root, key(cid))
        alloc, base = _ids(plan, holder)
        cleanup.append(lambda: alloc.release(holder))
        if not plan.explicit_mapping:
            plan.uid_base = plan.gid_base = base
        cg = ContainerCgroup(detect(), plan.cgroups_path)
        if cg.exists():
            raise IsoboxError(f"cgroup {plan.cgroups_path} is already in use; choose another cgroupsPath")
        try:
            cleanup.append(cg.destroy)
            cg.create(plan.resources, (plan.uid_base, plan.gid_base))
        except CgroupError as e:
            raise IsoboxError(str(e)) from None
        fifo = store.fifo(cid)
        os.mkfifo(fifo, 0o600)
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        try:
            launched = launch(plan, fifo_fd, cg, cleanup)
        finally:
            os.close(fifo_fd)
        st = ContainerState(
            id=cid, bundle=plan.bundle, rootfs=plan.rootfs, pid=launched.pid,
            starttime=proc_starttime(launched.pid) or 0, created=now_rfc3339(), owner="",
            annotations=plan.annotations, uid_base=plan.uid_base, gid_base=plan.gid_base, id_size=plan.id_size,
            cgroup_path=plan.cgroups_path, rootfs_method=launched.rootfs_method,
            shares_userns_of=plan.shares_userns_of)
        alloc.set_init(holder, st.pid, st.starttime)
        store.save_config(cid, spec)
        store.save(st)
        if pid_file:
            write_pid_file(pid_file, st.pid)
        if log:
            log.info(f"container {cid}: rootfs {launched.rootfs_method}; host IDs {plan.uid_base}-"
                     f"{plan.uid_base + plan.id_size - 1}")
            for note in plan.notes + launched.log:
                log.info(f"container {cid}: {note}")
        return st
    except BaseException:
        _undo(cleanup)
        raise
