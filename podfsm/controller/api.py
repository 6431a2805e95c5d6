"""The Controller's public API: entering and leaving, run, status, list, stop, remove, events."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio

from podfsm.config import ControllerConfig
from podfsm.controller.base import Subscriber
from podfsm.controller.containers import Containers
from podfsm.controller.images import ImageManager
from podfsm.controller.recovery import Recovery
from podfsm.core.errors import (
    ImageInUse,
    InvalidPodConfig,
    PodfsmError,
    PrerequisiteMissing,
    SandboxNotFound,
)
from podfsm.core.images import ImageRecord
from podfsm.core.records import (
    FilesystemUsage,
    InterfaceStats,
    LifecycleEvent,
    SandboxRecord,
    SandboxStats,
    SandboxStatus,
    TransitionEvent,
)
from podfsm.core.registryhosts import RegistryAuth
from podfsm.core.requests import InterfaceInfo
from podfsm.core.spec import PodSandboxConfig, parse_pod_config
from podfsm.core.states import State
from podfsm.drivers import factory
from podfsm.drivers.base import ImageDriver


@dataclass(frozen=True)
class Condition:
    """One condition of the controller, as the CRI's Status reports it."""

    type: str
    status: bool
    reason: str = ""
    message: str = ""


class Controller(Containers, Recovery):
    """Runs pod sandboxes. Use as `async with Controller(cfg) as ctl:`.

    Entering recovers every persisted sandbox and re-attaches supervision to running ones;
    leaving stops supervision and the worker pool but leaves running sandboxes running.
    Drivers may be injected (tests use fakes); by default the real ones are built from `cfg`.
    """

    def __init__(self, config: ControllerConfig | None = None, *,
                 images: ImageDriver | None = None, **drivers: Any) -> None:
        super().__init__(config, **drivers)
        self._image_driver = images
        self._image_manager: ImageManager | None = None

    async def __aenter__(self) -> Controller:
        cfg = self.config
        if self._real:
            factory.require_root()
        stack = self._exit_stack
        try:
            if self._store is None:
                fs = factory.store(cfg)
                fs.open()
                stack.callback(fs.close)
                self._store = fs
            stack.callback(factory.claim_dirs(cfg))
            await self._ns.start()
            stack.push_async_callback(self._ns.close)
            for rt in self._runtimes.values():
                await rt.start()
                stack.push_async_callback(rt.close)
            await self._net.start()
            stack.push_async_callback(self._net.close)
            images = self._image_driver or (factory.images(cfg, self._failpoints) if self._real
                                           else None)
            if images is not None:
                manager = ImageManager(images, self._failpoints_around)
                manager.in_use = lambda image_id: self.container_using_image(image_id) \
                    is not None
                await manager.open()
                stack.push_async_callback(manager.close)
                self._image_manager = manager
            if self._ctr_driver is None and self._real:
                self._ctr_driver = factory.containers(cfg)
            if self._ctr_driver is not None:
                self._open_containers()
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            self.recovering = True
            try:
                await self._recover()
                if self._ctr_driver is not None:
                    await self._recover_containers()
            finally:
                self.recovering = False
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sub in list(self._subscribers):
            sub.close()
        for lsub in list(self._lifecycle_subscribers):
            lsub.close()
        await self._exit_stack.aclose()

    async def run_sandbox(self, config: PodSandboxConfig | dict[str, Any], *,
                          runtime_handler: str | None = None) -> SandboxStatus:
        """Create a sandbox and bring it to Ready. On failure everything done is unwound and
        SandboxRunError says which step failed (and what is left, if unwinding failed too).

        `runtime_handler` names the OCI runtime of this sandbox ("runc" or "crun", one of
        `runtime_handlers`); None or "" means the configured default. An unknown one is
        refused with InvalidPodConfig before anything is made."""
        pod = config if isinstance(config, PodSandboxConfig) else parse_pod_config(config)
        handler = runtime_handler or self._rt.name
        if handler not in self._runtimes:
            raise InvalidPodConfig(f"unknown runtime handler {handler!r} (installed: "
                                   f"{', '.join(self._runtimes)})")
        async with self._limiter:
            # The sandbox is published with its lock already held, and nothing awaits between
            # admission and the run's own clean-up: a concurrent stop/remove/status waits for
            # the run, and a cancellation can never leave an admitted sandbox that never ran.
            sb = self._admit(pod, handler)
            try:
                await self._run(sb)
                return SandboxStatus.from_record(sb.record)
            finally:
                sb.lock.release()

    async def sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        """The sandbox's status. Raises SandboxNotFound for an unknown id."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(sandbox_id)
        return SandboxStatus.from_record(sb.record)

    async def sandbox_config(self, sandbox_id: str) -> PodSandboxConfig:
        """The pod config the sandbox was run with. Raises SandboxNotFound for an unknown id."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(sandbox_id)
        return sb.record.config

    async def sandbox_interfaces(self, sandbox_id: str) -> list[InterfaceInfo]:
        """The pod's interfaces and addresses, read live from its pinned netns."""
        status = await self.sandbox_status(sandbox_id)
        if not status.netns_path:
            return []
        return await self._net.interfaces(status.netns_path)

    async def runtime_containers(self) -> list[str]:
        """Ids of the containers in this controller's own runtime roots (every handler's)."""
        ids: set[str] = set()
        for rt in self._runtimes.values():
            ids.update(await rt.list_containers())
        return sorted(ids)

    async def reserved_container_ids(self) -> set[str]:
        """Container ids holding an address in the pod network's IPAM store."""
        return await self._net.reserved_container_ids()

    def resolve_id(self, id_or_prefix: str) -> str:
        """The id of the sandbox whose id is `id_or_prefix`, or the only one that starts with
        it (crictl sends truncated ids). Raises SandboxNotFound when none or several match."""
        if id_or_prefix in self._sandboxes:
            return id_or_prefix
        found = [i for i in self._sandboxes if id_or_prefix and i.startswith(id_or_prefix)]
        if len(found) != 1:
            raise SandboxNotFound(id_or_prefix)
        return found[0]

    async def list_sandboxes(self, *, id_prefix: str | None = None,
                             state: State | Collection[State] | None = None,
                             labels: Mapping[str, str] | None = None) -> list[SandboxStatus]:
        """Every sandbox, oldest first; or only those that pass every filter given:
        `id_prefix` (the sandbox it names, resolved as resolve_id does: none when it names
        none or several), `state` (one or any of several), and `labels` (each key present
        with that value)."""
        recs: Iterable[SandboxRecord] = (sb.record for sb in self._sandboxes.values())
        if id_prefix:
            try:
                recs = [self._sandboxes[self.resolve_id(id_prefix)].record]
            except SandboxNotFound:
                return []
        if state is not None:
            wanted = {state} if isinstance(state, State) else set(state)
            recs = (r for r in recs if r.state in wanted)
        if labels:
            want = dict(labels)
            recs = (r for r in recs
                    if all(r.config.labels.get(k) == v for k, v in want.items()))
        return [SandboxStatus.from_record(r) for r in sorted(recs, key=lambda r: r.created_at)]

    async def sandbox_stats(self, sandbox_id: str) -> SandboxStats:
        """CPU and memory of the sandbox's cgroup (while its pause task runs) and the counters
        of its pod's interfaces. Raises SandboxNotFound for an unknown id."""
        status = await self.sandbox_status(sandbox_id)
        cgroup = None
        if status.pid is not None and status.state in (State.READY, State.TASK_RUNNING):
            cgroup = self._host.cgroup_stats(status.pid)
        ifaces: list[InterfaceInfo] = []
        rec = self._sandboxes[sandbox_id].record
        if rec.namespaces is not None and rec.namespaces.netns_path:
            with contextlib.suppress(PodfsmError, OSError):
                ifaces = await self._net.interfaces(rec.namespaces.netns_path)
        default = rec.network.ifname if rec.network else ""
        return SandboxStats(
            id=sandbox_id, timestamp_ns=time.time_ns(), cgroup=cgroup,
            default_interface=default,
            interfaces=[InterfaceStats(name=i.name, rx_bytes=i.rx_bytes, rx_errors=i.rx_errors,
                                       tx_bytes=i.tx_bytes, tx_errors=i.tx_errors)
                        for i in ifaces if i.name != "lo"],
        )

    async def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        """Everything known about the sandbox, for a verbose status (the keys containerd's
        sandbox info has where they apply, and podfsm's own under "podfsm"). Raises
        SandboxNotFound for an unknown id."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(sandbox_id)
        rec = sb.record
        ns = rec.namespaces
        netns = (ns.netns_path if ns else None) or rec.planned_netns_path
        return {
            "pid": rec.task.pid if rec.task else 0,
            "processStatus": "running" if rec.task and rec.state is State.READY else "stopped",
            "netNamespaceClosed": not (ns and ns.netns_path),
            "runtimeHandler": rec.runtime,
            "runtimeType": f"podfsm.oci.{rec.runtime}",
            "config": rec.config.model_dump(mode="json", by_alias=True),
            "runtimeSpec": self._host.runtime_spec(rec.bundle_path),
            "cniResult": rec.network.raw if rec.network else None,
            "netnsPath": netns or "",
            "usernsPath": (ns.userns_path if ns else None) or rec.planned_userns_path or "",
            "podfsm": {
                "state": rec.state.value,
                "pending": rec.pending,
                "bundlePath": rec.bundle_path,
                "uidMapping": rec.uid_mapping.model_dump() if rec.uid_mapping else None,
                "gidMapping": rec.gid_mapping.model_dump() if rec.gid_mapping else None,
                "exitStatus": rec.exit_status,
                "lastError": rec.last_error,
                "leftovers": list(rec.leftovers),
                "history": [h.model_dump(mode="json") for h in rec.history],
            },
        }

    def conditions(self) -> list[Condition]:
        """RuntimeReady (the controller is entered and has recovered) and NetworkReady (the
        CNI network and its plugins are usable), each with a reason and message when false."""
        runtime_ok = self._tg is not None and not self.recovering
        net_problem = self._net.problem()
        return [
            Condition(type="RuntimeReady", status=runtime_ok,
                      reason="" if runtime_ok else "Recovering",
                      message="" if runtime_ok else "podfsm is recovering its sandboxes"),
            Condition(type="NetworkReady", status=net_problem is None,
                      reason="" if net_problem is None else "NetworkPluginNotReady",
                      message=net_problem or ""),
        ]

    @property
    def cgroup_driver(self) -> str:
        """The cgroup driver of the pause containers' cgroups: "cgroupfs" (podfsm writes
        cgroupfs paths, <parent>/<id>, into every spec)."""
        return "cgroupfs"

    async def filesystem_usage(self) -> list[FilesystemUsage]:
        """Usage of the filesystems holding state_dir and run_dir (one entry each when they
        are on different filesystems)."""
        return self._host.filesystem_usage([self.config.state_dir, self.config.run_dir])

    # images (see controller/images.py and docs/images.md)

    @property
    def images(self) -> ImageManager:
        if self._image_manager is None:
            raise PrerequisiteMissing("this controller has no image store (fake drivers and "
                                      "no image driver given)")
        return self._image_manager

    async def pull_image(self, reference: str, auth: RegistryAuth | None = None, *,
                         timeout: float | None = None) -> ImageRecord:
        """Pull an image (`busybox`, `name:tag`, `name@sha256:...`) from its registry (or the
        mirrors the registry config gives), verify and unpack it; its record. Raises
        InvalidImageReference, ImagePullError (DigestMismatch naming the digest), TimeoutError
        after `timeout` seconds; nothing of a failed pull is kept."""
        return await self.images.pull(reference, auth, timeout=timeout)

    async def list_images(self, reference: str | None = None) -> list[ImageRecord]:
        """Every image (oldest pull first), or the one `reference` names."""
        return self.images.all(reference)

    async def image_status(self, reference: str) -> ImageRecord:
        """The image named by id, id prefix, tag, digest or short name; ImageNotFound."""
        return self.images.get(reference)

    async def image_info(self, reference: str) -> dict[str, Any]:
        """The verbose information of an image (its config, chain id, layers)."""
        return await self.images.info(self.images.get(reference))

    async def remove_image(self, reference: str) -> None:
        """Remove the image (every name of it) and the content only it needed. Idempotent: an
        unknown image is not an error. ImageInUse, naming the container, while one uses it."""
        img = self.images.find(reference)
        user = self.container_using_image(img.id) if img is not None else None
        if img is not None and user is not None:
            raise ImageInUse(f"image {img.id} is in use by container {user}")
        await self.images.remove(reference)

    async def image_fs_info(self) -> list[FilesystemUsage]:
        """What the image store holds: bytes and inodes, with its filesystem's mount point
        (without an image store, fake drivers: the filesystems of state_dir and run_dir)."""
        if self._image_manager is None:
            return await self.filesystem_usage()
        return [await self._image_manager.usage()]

    async def stop_sandbox(self, sandbox_id: str) -> None:
        """Kill the task, CNI DEL, unpin: NotReady. Idempotent; an unknown id is not an error."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            return
        async with self._limiter, sb.lock:
            if not sb.removed:
                with anyio.CancelScope(shield=True):  # once begun, a stop is finished
                    # the containers first, under the sandbox's lock: no create slips in
                    await self._stop_pod_containers(sandbox_id)
                    await self._stop(sb)

    async def remove_sandbox(self, sandbox_id: str) -> None:
        """Stop if needed, delete everything; the sandbox disappears. Idempotent."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            return
        async with self._limiter, sb.lock:
            if not sb.removed:
                with anyio.CancelScope(shield=True):
                    await self._remove_pod_containers(sandbox_id)  # the containers first
                    await self._remove(sb)

    async def events(self, since: int | None = None) -> AsyncIterator[TransitionEvent]:
        """Every transition of every sandbox from now on (after `since`, a seq number, when
        given and still in the backlog). Ends when the controller closes."""
        sub = Subscriber[TransitionEvent]()
        self._subscribers.add(sub)
        try:
            if since is not None:
                for ev in list(self._backlog):
                    if ev.seq > since:
                        yield ev
            while True:
                ev_or_none = await sub.get()
                if ev_or_none is None:
                    return
                if since is None or ev_or_none.seq > since:
                    yield ev_or_none
        finally:
            self._subscribers.discard(sub)
            sub.dispose()

    async def lifecycle_events(self) -> AsyncGenerator[LifecycleEvent, None]:
        """Sandbox lifecycle events (created, started, stopped, deleted) from now on, each with
        the sandbox's status at that moment; see core.states.lifecycle_kind. Ends when the
        controller closes."""
        sub = Subscriber[LifecycleEvent]()
        self._lifecycle_subscribers.add(sub)
        try:
            while (ev := await sub.get()) is not None:
                yield ev
        finally:
            self._lifecycle_subscribers.discard(sub)
            sub.dispose()

    @property
    def last_event_seq(self) -> int:
        return self._seq

