"""Admission and RunPodSandbox: each forward step registers its compensating step first; a
failure unwinds them LIFO.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

import anyio

from podfsm.controller.base import Sandbox, Undo, describe, now
from podfsm.controller.teardown import Teardown
from podfsm.core import idmap, paths, sizes, steps
from podfsm.core.errors import (
    IdRangeUnavailable,
    InvalidPodConfig,
    NameReserved,
    NodeFull,
    PodfsmError,
    SandboxRunError,
    StateDirError,
    StepFailed,
)
from podfsm.core.ocispec import runtime_default_seccomp, seccomp_from_profile
from podfsm.core.records import SandboxRecord
from podfsm.core.requests import NamespaceRequest, PauseRequest
from podfsm.core.spec import IDMapping, PodSandboxConfig, ProfileType
from podfsm.core.states import Trigger
from podfsm.engine import SandboxMachine

log = logging.getLogger(__name__)

#: the largest Localhost seccomp profile read (Docker's default profile is about 20 KB)
MAX_SECCOMP_PROFILE = 1 << 20


class Run(Teardown):
    """Admission (name, id ranges) and the forward steps with their unwinding."""

    def _admit(self, pod: PodSandboxConfig, runtime: str) -> Sandbox:
        """Reserve the name and the id range and publish the sandbox, its lock held by the
        caller. Synchronous, so reservations are atomic without a lock; nothing is written or
        touched on the system here (the run writes the first record)."""
        existing = self._names.get(pod.reserved_name)
        if existing is not None:
            raise NameReserved(pod.reserved_name, existing)
        list_bytes = self._check_list_budget(pod)
        self._check_host_support(pod)
        self._check_cgroup_parent(pod)
        self._check_log_directory(pod)
        uid_map, gid_map, allocated = self._id_ranges(pod)
        self._check_ids_mapped(pod, uid_map, gid_map)
        seccomp = self._seccomp(pod)
        sandbox_id = secrets.token_hex(32)
        rec = SandboxRecord(
            id=sandbox_id,
            config=pod,
            created_at=now(),
            runtime=runtime,
            uid_mapping=uid_map,
            gid_mapping=gid_map,
            allocated_ids=allocated,
            planned_netns_path=self.netns_pin_path(sandbox_id) if pod.pod_netns else None,
            planned_userns_path=self.userns_pin_path(sandbox_id) if pod.pod_userns else None,
            pending=Trigger.SETUP_NAMESPACES.value,
            seccomp_profile=seccomp,
        )
        size = len(rec.model_dump_json().encode())
        if size > sizes.ADMITTED_RECORD_BYTES:
            raise InvalidPodConfig(
                f"pod config too large: its record would take {size} bytes as JSON (the config, "
                f"whose escaping doubles a backslash, and the seccomp profile), more than "
                f"{sizes.ADMITTED_RECORD_BYTES}: the store keeps records of at most "
                f"{sizes.MAX_RECORD_BYTES} bytes, what a sandbox's record gains included")
        sb = Sandbox(rec, SandboxMachine(), list_bytes=list_bytes)
        sb.lock.acquire_nowait()
        self._sandboxes[sandbox_id] = sb
        self._names[pod.reserved_name] = sandbox_id
        return sb

    def _check_list_budget(self, pod: PodSandboxConfig) -> int:
        """What the pod would take of a list answer; NodeFull when the sandboxes there are
        and this one would not fit in one a gRPC client receives (core.sizes)."""
        need = sizes.list_entry_bytes(pod)
        listed = sum(sb.list_bytes for sb in self._sandboxes.values())
        if listed + need > sizes.LIST_BUDGET_BYTES:
            raise NodeFull(
                f"{len(self._sandboxes)} sandboxes take {listed} bytes of a list answer and "
                f"this one would take {need} more (its metadata, labels and annotations), "
                f"more than the {sizes.LIST_BUDGET_BYTES} a ListPodSandbox answer may carry "
                f"(gRPC clients receive at most {sizes.GRPC_MAX_MESSAGE}): remove sandboxes "
                "first")
        return need

    def _check_host_support(self, pod: PodSandboxConfig) -> None:
        """Refusals that need a look at this host: a sysctl the kernel does not have; SELinux
        or AppArmor settings where the facility is enabled (podfsm does not apply them; on a
        host without them containerd ignores them too, and so does podfsm)."""
        for name in pod.linux.sysctls:
            if not self._host.sysctl_exists(name):
                raise InvalidPodConfig(f"sysctl {name!r} does not exist on this host")
        sc = pod.linux.security_context
        wants_apparmor = (sc.apparmor is not None
                          and sc.apparmor.profile_type is not ProfileType.Unconfined)
        if sc.selinux_options is None and not wants_apparmor:
            return  # the host is asked only when it matters (two file reads per admission)
        lsms = self._host.security_modules()
        if sc.selinux_options is not None and "selinux" in lsms:
            raise InvalidPodConfig("linux.security_context.selinux_options: SELinux is enabled "
                                   "on this host and podfsm does not apply SELinux labels")
        if wants_apparmor and "apparmor" in lsms:
            raise InvalidPodConfig("linux.security_context.apparmor: AppArmor is enabled on "
                                   "this host and podfsm does not apply AppArmor profiles")

    def _check_cgroup_parent(self, pod: PodSandboxConfig) -> None:
        """The parent must be podfsm's cgroup root or below it, and not inside another
        sandbox's cgroup (`<its parent>/<its id>`): a pod there counts against the other's
        limits, and the other's cgroup could not be removed while it is there. (A parent above
        another sandbox's cgroup is fine: removal never takes a parent another sandbox uses.)
        The spec has refused every other spelling of a path (core.paths)."""
        parent = pod.linux.cgroup_parent
        root = self.config.cgroup_root
        if parent and not paths.within(parent, root):
            raise InvalidPodConfig(
                f"linux.cgroup_parent {parent!r} is not under podfsm's cgroup root {root} "
                "(ControllerConfig.cgroup_root)")
        for sb in self._sandboxes.values():
            theirs = f"{self.cgroup_parent(sb.record)}/{sb.record.id}"
            if parent and paths.within(parent, theirs):
                raise InvalidPodConfig(
                    f"linux.cgroup_parent {parent!r} is inside the cgroup of sandbox "
                    f"{sb.record.id}: a pod's cgroup holds that pod only")

    def _log_directory_problem(self, log_directory: str, real: str) -> str | None:
        """Why a log directory (as named, and as it resolves) may not be used, or None: it
        must not lie inside podfsm's own directories (a directory made among the records
        stopped the next start) nor, through a symlink, in a kernel pseudo-filesystem."""
        cfg = self.config
        for label, top in (("state_dir", cfg.state_dir), ("run_dir", cfg.run_dir),
                           ("netns_dir", cfg.netns_dir),
                           *(("kernel pseudo-filesystem", d) for d in paths.SYSTEM_DIRS)):
            tops = {paths.clean(top), self._host.real_path(top)}
            if any(paths.within(p, t) for p in (log_directory, real) for t in tops):
                shown = "" if real == log_directory else f" (resolved: {real!r})"
                return (f"log_directory {log_directory!r}{shown} is inside podfsm's {label} "
                        f"{top}: a pod's logs have no place there" if label.endswith("dir")
                        else f"log_directory {log_directory!r}{shown} is inside {top}, a "
                        f"{label}: no place for logs")
        return None

    def _check_log_directory(self, pod: PodSandboxConfig) -> None:
        if pod.log_directory:
            problem = self._log_directory_problem(
                pod.log_directory, self._host.real_path(pod.log_directory))
            if problem is not None:
                raise InvalidPodConfig(problem)

    @staticmethod
    def _check_ids_mapped(pod: PodSandboxConfig, uid_map: IDMapping | None,
                          gid_map: IDMapping | None) -> None:
        """The pause's uid, gid and groups must exist in the pod's user namespace: the
        runtime could not switch to an unmapped id."""
        sc = pod.linux.security_context
        checks: list[tuple[str, int, IDMapping | None]] = []
        if sc.run_as_user is not None:
            checks.append(("run_as_user", sc.run_as_user.value, uid_map))
        if sc.run_as_group is not None:
            checks.append(("run_as_group", sc.run_as_group.value, gid_map))
        checks += [("supplemental_groups", g, gid_map) for g in sc.supplemental_groups]
        for name, value, mapping in checks:
            if mapping is not None and not mapping.covers(value):
                raise InvalidPodConfig(
                    f"linux.security_context.{name} {value} is not mapped in the pod's user "
                    f"namespace (container ids {mapping.container_id}-"
                    f"{mapping.container_id + mapping.length - 1})")

    def _seccomp(self, pod: PodSandboxConfig) -> dict[str, Any] | None:
        """The OCI seccomp object for the pause, as containerd chooses it: none for a
        privileged sandbox or Unconfined, the pause's default for RuntimeDefault, the file's
        content for Localhost (read now, so a missing or bad file is refused up front)."""
        sc = pod.linux.security_context
        profile = sc.seccomp_profile()
        if profile is None or sc.privileged or profile.profile_type is ProfileType.Unconfined:
            return None
        if profile.profile_type is ProfileType.RuntimeDefault:
            return runtime_default_seccomp()
        path = profile.localhost_ref
        where = ("linux.security_context.seccomp.localhost_ref" if sc.seccomp is not None
                 else "linux.security_context.seccomp_profile_path")
        if not os.path.isabs(path):
            raise InvalidPodConfig(f"{where} {path!r} must be an absolute path")
        # Every refusal says why in words, never quoting the file, and a path that is missing,
        # a directory, a device or unreadable gets one answer (the driver's): a client learns
        # nothing of the host's files from it.
        try:
            text = self._host.read_seccomp_profile(path, MAX_SECCOMP_PROFILE)
            loaded = seccomp_from_profile(text)
        except (OSError, ValueError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else "it is not a readable regular file"
            raise InvalidPodConfig(f"{where}: the seccomp profile {path!r} cannot be used: "
                                   f"{why}") from None
        return loaded

    def _id_ranges(self, pod: PodSandboxConfig) -> tuple[IDMapping | None, IDMapping | None, bool]:
        if not pod.pod_userns:
            return None, None, False
        cfg = self.config
        uids_in_use = [sb.record.uid_mapping for sb in self._sandboxes.values()
                       if sb.record.uid_mapping is not None]
        gids_in_use = [sb.record.gid_mapping for sb in self._sandboxes.values()
                       if sb.record.gid_mapping is not None]
        uid_map, gid_map = pod.requested_uid_mapping, pod.requested_gid_mapping
        if uid_map is None or gid_map is None:
            try:
                uid_map = idmap.allocate(uids_in_use + gids_in_use, cfg.idmap_pool_start,
                                         cfg.idmap_pool_size)
            except ValueError as exc:
                raise IdRangeUnavailable(str(exc)) from None
            return uid_map, uid_map, True
        pool_end = cfg.idmap_pool_start + cfg.idmap_pool_size
        for kind, want in (("uids", uid_map), ("gids", gid_map)):
            rng = f"{want.host_id}-{want.host_end - 1}"
            if want.length > cfg.idmap_max_length:
                raise InvalidPodConfig(
                    f"userns_options.{kind}[0] host ids {rng}: {want.length} ids are more than "
                    f"the {cfg.idmap_max_length} a pod may have (ControllerConfig."
                    "idmap_max_length)")
            if want.host_id < cfg.idmap_pool_start or want.host_end > pool_end:
                raise InvalidPodConfig(
                    f"userns_options.{kind}[0] host ids {rng} are not inside podfsm's id pool "
                    f"{cfg.idmap_pool_start}-{pool_end - 1} (host ids 0-65535 stay the host's)")
        for kind, want, used in (("uid", uid_map, uids_in_use), ("gid", gid_map, gids_in_use)):
            clash = idmap.find_overlap(want, used)
            if clash is not None:
                raise IdRangeUnavailable(
                    f"{kind} mapping host ids {want.host_id}-{want.host_end - 1} overlap another "
                    f"sandbox's {clash.host_id}-{clash.host_end - 1}"
                )
        return uid_map, gid_map, False

    async def _run(self, sb: Sandbox) -> None:
        undo: list[Undo] = []
        step = Trigger.SETUP_NAMESPACES
        # Every system step is shielded once begun (its work goes on elsewhere), so a caller's
        # cancellation could find no unshielded await to land on and the run would simply go
        # on to Ready: it is taken at each step boundary instead, and the run unwinds as a
        # failed run does (as containerd's RunPodSandbox does when its client's context ends).
        # Past the last boundary the run is finished: Ready, as its caller may learn later.
        boundary = anyio.lowlevel.checkpoint_if_cancelled
        try:
            await boundary()
            await self._first_save(sb)
            await self._setup_files(sb, undo)
            await self._setup_namespaces(sb, undo)
            step = Trigger.CREATE_CONTAINER
            await boundary()
            await self._create_container(sb, undo)
            step = Trigger.START_TASK
            await boundary()
            await self._start_task(sb, undo)
            step = Trigger.MARK_READY
            await boundary()
            await self._mark_ready(sb)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                leftovers = await self._unwind(sb, undo, exc)
            if isinstance(exc, StateDirError) and not undo:
                raise  # nothing was touched: the store's own error says it all
            if isinstance(exc, Exception):
                cause = exc.cause if isinstance(exc, SandboxRunError) else exc
                raise SandboxRunError(step.value, cause, leftovers) from exc
            raise

    async def _unwind(self, sb: Sandbox, undo: list[Undo], cause: BaseException) -> list[str]:
        """Run the compensating steps LIFO. Fully unwound: the sandbox is forgotten. Otherwise
        it stays listed NotReady with what is left. Returns what is left."""
        leftovers: list[str] = []
        message = describe(cause)
        with anyio.move_on_after(self.config.unwind_timeout) as scope:
            for u in reversed(undo):
                try:
                    await u.action()
                except Exception as exc:
                    log.error("sandbox %s: undo %s failed: %s", sb.record.id, u.step.label,
                              exc)
                    leftovers.append(f"{u.step.label}: {describe(exc)}")
                    continue
                trigger = u.step.trigger
                if trigger is not None and sb.machine.may(trigger):
                    # The step is undone on the system: a record that cannot be written now
                    # must not stop the rest of the unwinding.
                    await self._save_or_log(sb, trigger, error=message)
        if scope.cancelled_caught:
            leftovers.append(f"unwinding timed out after {self.config.unwind_timeout}s")
        if not leftovers:
            try:
                await self._forget(sb)
            except PodfsmError as exc:
                leftovers.append(f"record: {describe(exc)}")
        if leftovers:
            trig = (Trigger.FAIL,) if sb.machine.may(Trigger.FAIL) else ()
            await self._save_or_log(sb, *trig, error=message, pending=None,
                                    last_error=message, leftovers=leftovers)
        return leftovers

    async def _first_save(self, sb: Sandbox) -> None:
        """Write the first record (it says the namespaces are about to be made), then the
        sandbox's run directory: both exist before anything else of it does, so a crash at
        any later point leaves either a record to recover or a directory that names an orphan.
        """
        async with self._failpoints_around("save_record"):
            # Durable (fsync): it precedes the CNI ADD, whose address reservation outlives a
            # reboot on disk; later writes need not be (see podfsm.drivers.store).
            await self._store_save(sb.record, durable=True)
        self._host.create_sandbox_dir(self.sandbox_run_dir(sb.record.id))

    async def _setup_files(self, sb: Sandbox, undo: list[Undo]) -> None:
        """hostname, hosts, resolv.conf, the /dev/shm tmpfs and the log directory. Recorded
        with the next write; until then the teardown finds the tmpfs by its derived path."""
        undo.append(Undo(steps.REMOVE_FILES, lambda: self._remove_files(sb)))
        try:
            files = await self._host.setup_files(
                self.sandbox_run_dir(sb.record.id), sb.record.config,
                [d for s in self._others(sb) if s.record.files is not None
                 for d in s.record.files.log_directories_made])
        except OSError as exc:
            raise StepFailed("sandbox files", describe(exc)) from exc
        sb.record = sb.record.evolve(files=files)
        # admission looked at the path before; a symlink swapped in since is caught here
        problem = (self._log_directory_problem(files.log_directory, files.log_directory_real)
                   if files.log_directory else None)
        if problem is not None:
            raise StepFailed("sandbox files", problem)

    async def _setup_namespaces(self, sb: Sandbox, undo: list[Undo]) -> None:
        rec = sb.record
        pod = rec.config
        undo.append(Undo(steps.UNPIN_NAMESPACES, lambda: self._teardown_namespaces(sb)))
        if rec.planned_netns_path or rec.planned_userns_path:
            async with self._failpoints_around("pin_namespaces"):
                # Shielded, as every step whose work goes on in another process once begun: a
                # cancellation takes effect after it, and the unwinding then knows what exists.
                with anyio.CancelScope(shield=True):
                    pinned = await self._ns.create(NamespaceRequest(
                        sandbox_id=rec.id,
                        netns_path=rec.planned_netns_path,
                        userns_path=rec.planned_userns_path,
                        uid_mapping=rec.uid_mapping,
                        gid_mapping=rec.gid_mapping,
                    ))
                sb.record = rec = rec.evolve(namespaces=pinned)
            if pinned.userns_path and pinned.netns_path and (
                pinned.netns_owner_inode != pinned.userns_inode
            ):
                raise StepFailed("verify namespaces",
                                 f"netns {pinned.netns_path} is owned by user namespace inode "
                                 f"{pinned.netns_owner_inode}, not the pod's "
                                 f"{pinned.userns_inode}")
        if pod.pod_netns:
            await anyio.lowlevel.checkpoint_if_cancelled()  # the CNI ADD is a step of its own
            undo.append(Undo(steps.DETACH_NETWORK, lambda: self._teardown_network(sb)))
            async with self._failpoints_around("cni_add"):
                # Once sent, the ADD chain runs to its end in the reaper (shielded there, in
                # the driver); the DEL registered above then releases whatever it did.
                result = await self._net.attach(self._net_request(rec))
                sb.record = rec.evolve(network=result)
        await self._save(sb, Trigger.SETUP_NAMESPACES, pending=Trigger.CREATE_CONTAINER.value)

    async def _create_container(self, sb: Sandbox, undo: list[Undo]) -> None:
        rec = sb.record
        self._check_netns_owner(rec)
        undo.append(Undo(steps.DELETE_CONTAINER, lambda: self._teardown_container(sb)))
        async with self._failpoints_around("runtime_create"):
            ns = rec.namespaces
            pod = rec.config
            sc = pod.linux.security_context
            rt = self._runtime(rec.runtime)
            request = PauseRequest(
                container_id=rec.id,
                hostname=pod.effective_hostname,
                netns_path=ns.netns_path if ns else None,
                userns_path=ns.userns_path if ns else None,
                uid_mapping=rec.uid_mapping,
                gid_mapping=rec.gid_mapping,
                cgroup_parent=self.cgroup_parent(rec),
                annotations=dict(pod.annotations),
                annotation_patterns=self.config.pod_annotations,
                sysctls=dict(pod.linux.sysctls),
                run_as_user=sc.run_as_user.value if sc.run_as_user else None,
                run_as_group=sc.run_as_group.value if sc.run_as_group else None,
                supplemental_groups=tuple(sc.supplemental_groups),
                seccomp=rec.seccomp_profile,
                host_pid=pod.host_pid,
                host_ipc=pod.host_ipc,
                files=rec.files,
                resources=pod.linux.resources,
            )
            sb.creating = True
            try:
                with anyio.CancelScope(shield=True):  # `create` runs on in the reaper once sent
                    task = await rt.create(request)
            finally:
                sb.creating = False
            sb.record = rec.evolve(container_created=True, task=task,
                                   bundle_path=rt.bundle_path(rec.id))
        await self._save(sb, Trigger.CREATE_CONTAINER, pending=Trigger.START_TASK.value)

    async def _start_task(self, sb: Sandbox, undo: list[Undo]) -> None:
        rec = sb.record
        self._check_netns_owner(rec)
        undo.append(Undo(steps.KILL_TASK, lambda: self._teardown_task(sb)))
        async with self._failpoints_around("runtime_start"):
            with anyio.CancelScope(shield=True):  # so does `start`
                await self._runtime(rec.runtime).start_task(rec.id)
        # Written together with mark_ready: the check in between touches nothing, and a crash
        # there leaves `pending=start_task`, which recovery treats the same way.
        await self._save(sb, Trigger.START_TASK, persist=False)
        assert sb.record.task is not None
        self._supervise(sb, sb.record.task)

    async def _mark_ready(self, sb: Sandbox) -> None:
        problem = self._task_problem(sb.record)
        if problem is not None:
            raise StepFailed("verify task", problem)
        await self._save(sb, Trigger.MARK_READY, pending=None)

