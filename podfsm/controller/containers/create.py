"""create_container: Unknown -> Created. The rootfs is mounted, the bundle written and the
monitor started (which runs the runtime's create), each step recorded before and after and
wrapped in failpoints `container_<step>.before/.after`; a failure unwinds what was done."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import anyio

from podfsm.controller.base import Sandbox, describe, now
from podfsm.controller.containers.base import Container, ContainerBase
from podfsm.core.containeroci import (
    ContainerSpecInput,
    HostDevice,
    container_spec,
    resolve_user,
    stop_signal,
    user_spec,
)
from podfsm.core.containerrecords import ContainerRecord
from podfsm.core.containerspec import ContainerConfig, parse_container_config
from podfsm.core.containerstates import ContainerTrigger, CreateStep
from podfsm.core.errors import (
    ContainerNameReserved,
    ContainerPrecondition,
    ImageNotFound,
    InvalidContainerConfig,
    PodfsmError,
    SandboxNotFound,
    StepFailed,
)
from podfsm.core.ocispec import seccomp_from_profile
from podfsm.core.spec import ProfileType
from podfsm.core.states import State

#: a file of at most this size is read as a Localhost seccomp profile
SECCOMP_PROFILE_LIMIT = 1 << 20
#: how long a removal waits for the container's monitor to exit once the runtime deleted it
MONITOR_EXIT_WAIT = 5.0


class CreateContainer(ContainerBase):

    async def create_container(self, sandbox_id: str,
                               config: ContainerConfig | dict[str, Any]) -> str:
        """Create a container in the sandbox `sandbox_id` from `config` (a CRI ContainerConfig,
        or its JSON form) and return its id; it is Created (its process exists, not started).
        Refused before anything is made: an invalid config (InvalidContainerConfig), an
        unknown sandbox (SandboxNotFound), a sandbox not Ready or with a user namespace
        (ContainerPrecondition), an image not pulled (ImageNotFound), a name in use
        (NameReserved). A failed step unwinds what was done and raises StepFailed."""
        cfg = config if isinstance(config, ContainerConfig) else parse_container_config(config)
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.removed:
            raise SandboxNotFound(sandbox_id)
        # under the sandbox's lock: its stop or remove (which stop and remove its containers
        # under the same lock) waits until this container is Created or unwound
        async with sb.lock:
            if sb.removed:
                raise SandboxNotFound(sandbox_id)
            return await self._create_in(sb, cfg)

    async def _create_in(self, sb: Sandbox, cfg: ContainerConfig) -> str:
        self._check_pod(sb)
        img = self._imgs.find(cfg.image.image)
        if img is None:
            raise ImageNotFound(cfg.image.image)
        image_config = await self._image_config(img.id)
        log_path = ""
        if cfg.log_path:
            if not sb.record.config.log_directory:
                raise InvalidContainerConfig(
                    "log_path is set but the pod has no log_directory to hold it")
            log_path = os.path.join(sb.record.config.log_directory, cfg.log_path)
        cid = secrets.token_hex(32)
        rec = ContainerRecord(
            id=cid, sandbox_id=sb.record.id, config=cfg, runtime=sb.record.runtime,
            image_id=img.id, image_ref=(img.repo_digests[0] if img.repo_digests else img.id),
            image_name=cfg.image.image, created_at=now(), dir=self._cd.dir(cid),
            log_path=log_path, stop_signal=stop_signal(cfg, image_config), pending="create",
        )
        name = self.reserved_container_name(rec, sb)
        if name in self._ctr_names:
            raise ContainerNameReserved(cfg.metadata.name, self._ctr_names[name])
        c = Container(rec)
        self._ctr_names[name] = cid
        self._containers[cid] = c
        async with c.lock:
            try:
                await self._create_steps(c, sb, image_config, [
                    self._cd.layer_path(chain) for chain in reversed(img.chain_ids)])
            except BaseException as exc:
                await self._unwind_create(c, exc)
                raise
        return cid

    def _check_pod(self, sb: Sandbox) -> None:
        rec = sb.record
        if rec.state is not State.READY:
            raise ContainerPrecondition(f"sandbox {rec.id} is {rec.state.value}, not Ready: "
                                        "a container is created only in a Ready sandbox")
        if rec.uid_mapping is not None or (rec.namespaces and rec.namespaces.userns_path):
            raise ContainerPrecondition(
                f"sandbox {rec.id} has its own user namespace: containers in a user-namespaced "
                "pod are not supported yet (idmapped rootfs and mounts come with a later issue)")
        if rec.task is None:
            raise ContainerPrecondition(f"sandbox {rec.id} has no pause process to join")

    async def _image_config(self, image_id: str) -> dict[str, Any]:
        raw = await self._imgs.driver.read_blob(image_id)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StepFailed("image", f"the config of image {image_id} is not JSON") from exc
        conf = doc.get("config") if isinstance(doc, dict) else None
        return conf if isinstance(conf, dict) else {}

    async def _step(self, c: Container, step: CreateStep) -> Any:
        """Record `step` as pending, around its failpoints (the caller runs it)."""
        await self._csave(c, pending=step.value)
        return self._failpoints_around(f"container_{step.value}")

    async def _create_steps(self, c: Container, sb: Sandbox, image_config: dict[str, Any],
                            lowers: list[str]) -> None:
        cid, cd = c.record.id, self._cd
        async with await self._step(c, CreateStep.MOUNT_ROOTFS):
            try:
                rootfs = await cd.mount_rootfs(cid, lowers)
            except OSError as exc:
                raise StepFailed(CreateStep.MOUNT_ROOTFS.value,
                                 f"cannot mount the rootfs: {exc}") from exc
        # what is done is written with the next step's pending (one write a step: an
        # unwinding undoes every step whatever `done` says, each undo being idempotent)
        c.record = c.record.evolve(done=[*c.record.done, CreateStep.MOUNT_ROOTFS.value])
        async with await self._step(c, CreateStep.WRITE_BUNDLE):
            spec = await self._spec(c, sb, image_config, rootfs)
            await cd.write_spec(cid, spec)
        c.record = c.record.evolve(done=[*c.record.done, CreateStep.WRITE_BUNDLE.value])
        async with await self._step(c, CreateStep.START_MONITOR):
            task, monitor = await cd.create(
                c.record.runtime, cid, c.record.config.metadata.name,
                c.record.log_path or os.path.join(c.record.dir, "container.log"),
                tty=c.record.config.tty, stdin=c.record.config.stdin)
        await self._csave(c, ContainerTrigger.CREATE, pending=None, task=task, monitor=monitor,
                          done=[*c.record.done, CreateStep.START_MONITOR.value])

    async def _spec(self, c: Container, sb: Sandbox, image_config: dict[str, Any],
                    rootfs: str) -> dict[str, Any]:
        cfg = c.record.config
        sc = cfg.linux.security_context
        pod = sb.record.config
        try:
            user = resolve_user(
                user_spec(cfg, image_config),
                await self._cd.read_etc(rootfs, "passwd"),
                await self._cd.read_etc(rootfs, "group"),
                supplemental=sc.supplemental_groups,
                run_as_group=sc.run_as_group.value if sc.run_as_group else None)
        except ValueError as exc:
            raise InvalidContainerConfig(f"user: {exc}") from None
        lsms = self._host.security_modules()
        if "selinux" in lsms and sc.selinux_options is not None:
            raise InvalidContainerConfig("linux.security_context.selinux_options: SELinux is "
                                         "enabled here and podfsm does not apply it")
        if "apparmor" in lsms and (sc.apparmor_profile not in ("", "unconfined") or (
                sc.apparmor is not None
                and sc.apparmor.profile_type is not ProfileType.Unconfined)):
            raise InvalidContainerConfig("linux.security_context.apparmor: AppArmor is "
                                         "enabled here and podfsm does not apply it")
        host_paths: dict[str, str] = {}
        for m in cfg.mounts:
            try:
                host_paths[m.container_path] = self._cd.real_host_path(m.host_path)
            except OSError as exc:
                raise InvalidContainerConfig(
                    f"mount host_path {m.host_path!r}: {exc.strerror or exc}") from None
        devices: dict[str, HostDevice] = {}
        for d in cfg.devices:
            try:
                devices[d.container_path] = HostDevice(*self._cd.host_device(d.host_path))
            except (OSError, ValueError) as exc:
                raise InvalidContainerConfig(f"device host_path {d.host_path!r}: "
                                             f"{getattr(exc, 'strerror', None) or exc}") \
                    from None
        localhost = None
        prof = sc.seccomp
        ref = prof.localhost_ref if prof and prof.profile_type is ProfileType.Localhost else (
            sc.seccomp_profile_path.removeprefix("localhost/")
            if sc.seccomp_profile_path.startswith("localhost/") else "")
        if ref:
            try:
                localhost = seccomp_from_profile(
                    self._host.read_seccomp_profile(ref, SECCOMP_PROFILE_LIMIT), ref)
            except (OSError, ValueError) as exc:
                raise InvalidContainerConfig(f"seccomp profile: {exc}") from None
        pod_ns = pod.linux.security_context.namespace_options
        ns = sb.record.namespaces
        assert sb.record.task is not None
        inp = ContainerSpecInput(
            container_id=c.record.id, sandbox_id=sb.record.id, config=cfg,
            image_config=image_config, image_name=c.record.image_name, rootfs=rootfs,
            pause_pid=sb.record.task.pid, netns_path=ns.netns_path if ns else None,
            pod_pid_mode=pod_ns.pid, pod_ipc_mode=pod_ns.ipc,
            pod_hostname=pod.effective_hostname, pod_name=pod.metadata.name,
            pod_namespace=pod.metadata.namespace, pod_uid=pod.metadata.uid,
            files=sb.record.files, cgroup_parent=self.cgroup_parent(sb.record), user=user,
            host_paths=host_paths, seccomp_localhost=localhost,
            annotation_patterns=tuple(self.config.pod_annotations), devices=devices,
        )
        try:
            return container_spec(inp)
        except ValueError as exc:
            raise InvalidContainerConfig(str(exc)) from None

    async def _unwind_create(self, c: Container, exc: BaseException) -> None:
        """Undo the create steps done, in reverse; the record goes last. What cannot be
        undone stays recorded (the container is then listed Unknown and removable)."""
        c.record = c.record.evolve(last_error=describe(exc))
        try:
            await self._undo_create(c)
        except (PodfsmError, OSError) as undo_exc:
            await self._csave(c, pending=None, last_error=(
                f"{describe(exc)}; unwinding failed too: {describe(undo_exc)}"))
            return
        self._forget_container(c)

    async def _undo_create(self, c: Container) -> None:
        cid, cd, rt = c.record.id, self._cd, c.record.runtime
        # the monitor step may have got as far as the runtime's create: undo it in any case
        await cd.delete(rt, cid)
        monitor = c.record.monitor
        if monitor is not None:
            # conmon writes the exit file into the directory as it goes: let it finish first
            with anyio.move_on_after(MONITOR_EXIT_WAIT):
                await cd.wait_exit(monitor)
        cd.remove_spec(cid)
        await cd.unmount_rootfs(cid)
        await cd.remove_dir(cid)

    def _forget_container(self, c: Container) -> None:
        c.removed = True
        self._unsupervise_container(c)
        self._containers.pop(c.record.id, None)
        for name, cid in list(self._ctr_names.items()):
            if cid == c.record.id:
                del self._ctr_names[name]
