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


def _freezer_file(cg) -> str:
    try:
        return cg.freezer_file()
    except Exception:  # noqa: BLE001 - no freezer: the container simply cannot be paused
        return ""


def _register(root: str, plan: Plan, cg, cleanup: list) -> None:
    """Registers with isoboxd (starting it if needed); the builder binds its files."""
    from isobox.daemon import client, paths
    dirs = {c: d for c in ("memory", "cpu", "cpuacct", "cpuset", "blkio", "io", "pids", "")
            if (d := cg.dir(c)) is not None}
    k = client.daemon_key(root, plan.id)
    client.register(k, plan.id, plan.uid_base, plan.gid_base, dirs, plan.masked_paths, plan.readonly_paths)
    cleanup.append(lambda: client.unregister(k))
    if plan.seccomp is not None:
        plan.seccomp.key = k          # isoboxd accepts the listener only for this container
    plan.emulation = paths.emulated(k)


def create(store: StateStore, cid: str, bundle: str, pid_file: str | None = None,
           log=None, console_socket: str | None = None, console_sock=None,
           preserve_fds: int = 0) -> ContainerState:
    """console_socket: the engine's socket path; console_sock: an already connected socket
    (foreground `run` relays the terminal itself)."""
    validate_id(cid)
    spec = load_bundle(bundle)
    if store.exists(cid):
        raise IsoboxError(f"container with id {cid!r} already exists")
    plan = rewrite(cid, bundle, spec, owners.lookup(store))
    from isobox.init import console
    console.check_request(plan.process.terminal, console_socket, can_relay=console_sock is not None)
    store.reserve(cid)
    cleanup: list = [lambda: store.remove(cid)]
    try:
        from isobox.cgroups.layout import detect
        from isobox.cgroups.manager import CgroupError, ContainerCgroup
        from isobox.ids.allocator import Holder
        from isobox.init import handover
        from isobox.init.launch import launch

        primer = None
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
            # device access is the policy's allow list whatever the spec's rules say
            from isobox.cgroups.devices import allowed
            cg.create(plan.resources, (plan.uid_base, plan.gid_base),
                      allowed(plan.policy.device_map() if plan.policy else ()))
            if handover.REMOTE is not None:
                # after the mkdirs (the primer's first write holds cgroup_mutex while it waits);
                # only in isoboxd's worker: the local path clones its init with a raw clone(2),
                # which must not race another thread of the interpreter
                from isobox.cgroups import primer as cgprimer
                primer = cgprimer.start(cg.layout)
                if primer is not None:
                    cleanup.append(primer.stop)
        except CgroupError as e:
            raise IsoboxError(str(e)) from None
        _register(store.root, plan, cg, cleanup)
        if handover.REMOTE is not None:
            # a thread, like the primer: only in the worker (see there)
            from isobox.mounts.emulation import Prefetch
            plan.emulation_prefetch = Prefetch(plan.emulation)
            cleanup.append(plan.emulation_prefetch.close)
        if console_socket:
            console_sock = console.connect(console_socket)
            cleanup.append(console_sock.close)
        fifo = store.fifo(cid)
        os.mkfifo(fifo, 0o600)
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        try:
            launched = launch(plan, fifo_fd, cg, cleanup, console_sock, preserve_fds)
        finally:
            os.close(fifo_fd)
            if console_sock is not None:
                console_sock.close()
            if primer is not None:
                primer.stop()
            if plan.emulation_prefetch is not None:
                plan.emulation_prefetch.close()     # the builder has used (or dropped) its copies
        if plan.hooks:
            # the init exists and waits at the start barrier: prestart and createRuntime in the
            # runtime's namespaces, then createContainer in the container's; a failure undoes
            # the create, after which poststop runs (last in the undo order), as on delete
            from isobox.lifecycle import hooks
            hook_state = hooks.state(cid, "creating", launched.pid, plan.bundle, plan.annotations)
            cleanup.insert(0, lambda: hooks.run_warn(
                "poststop", plan.hooks, hooks.state(cid, "stopped", launched.pid, plan.bundle, plan.annotations), log))
            hooks.run("prestart", plan.hooks, hook_state)
            hooks.run("createRuntime", plan.hooks, hook_state)
            hooks.run_in_container("createContainer", plan.hooks, hook_state, launched.pid)
        st = ContainerState(
            id=cid, bundle=plan.bundle, rootfs=plan.rootfs, pid=launched.pid,
            starttime=proc_starttime(launched.pid) or 0, created=now_rfc3339(), owner="",
            annotations=plan.annotations, uid_base=plan.uid_base, gid_base=plan.gid_base, id_size=plan.id_size,
            cgroup_path=plan.cgroups_path, rootfs_method=launched.rootfs_method,
            shares_userns_of=plan.shares_userns_of, freezer=_freezer_file(cg))
        alloc.set_init(holder, st.pid, st.starttime)
        from isobox.daemon import client
        from isobox.mounts import storage
        client.set_init(client.daemon_key(store.root, cid), st.pid, st.starttime,
                        storage.registration(plan, st.pid))
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
