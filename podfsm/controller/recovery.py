"""Recovery on start: reconcile every record with the system, collect what has no record."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from podfsm.controller.base import (
    SANDBOX_ID,
    Sandbox,
    describe,
    now,
)
from podfsm.controller.run import Run
from podfsm.core import paths, sizes, steps
from podfsm.core.errors import PodfsmError
from podfsm.core.records import PinnedNamespaces, SandboxRecord
from podfsm.core.requests import NetworkRequest, SetAside
from podfsm.core.spec import parse_pod_config
from podfsm.core.states import State, Trigger
from podfsm.core.steps import Compensation
from podfsm.engine import SandboxMachine

log = logging.getLogger(__name__)

#: the label of the stand-in of a sandbox whose record was set aside (see _keep_set_aside):
#: `crictl pods --label podfsm.io/set-aside=true` lists them
SET_ASIDE_LABEL = "podfsm.io/set-aside"


class Recovery(Run):
    """Entering the Controller: records reconciled, orphans collected."""

    async def _recover(self) -> None:
        records, set_aside = await self.store.load_all(check=self._record_problem)
        self.recovery_problems = [s.problem for s in set_aside]
        #: what a record set aside held is collected as an orphan of its id (only a well-formed
        #: id: everything an orphan's collection touches is derived from it)
        self._set_aside_ids = {s.sandbox_id for s in set_aside
                               if SANDBOX_ID.match(s.sandbox_id)}
        for rec in records:
            sb = Sandbox(rec, SandboxMachine(rec.state),
                         list_bytes=sizes.list_entry_bytes(rec.config))
            self._sandboxes[rec.id] = sb
            self._names[rec.config.reserved_name] = rec.id
            if _is_stand_in(rec):  # reported at every start until removed
                self.recovery_problems.append(f"sandbox {rec.id}: {rec.last_error}")
        # What the runtime and the IPAM store say, asked once for all sandboxes: one
        # `runtime list` and one directory read instead of a runtime call and a CNI CHECK per
        # sandbox (which made a restart with 250 sandboxes take 3 s).
        states: dict[str, dict[str, str]] = {}
        for name, rt in self._runtimes.items():
            states[name] = await rt.states()
        world = _World(states, await self._net.reserved_container_ids())
        for kept in set_aside:
            await self._keep_set_aside(kept, world)
        async with anyio.create_task_group() as tg:
            for sb in list(self._sandboxes.values()):
                tg.start_soon(self._recover_one, sb, world)
        await self._collect_orphans()

    async def _keep_set_aside(self, kept: SetAside, world: _World) -> None:
        """A record that could not be used is never taken for an orphan's: what its sandbox
        has on the system (its pause, its namespaces, its address) stays as found, under a
        stand-in record that lists it NotReady, named `set-aside-<id>` in namespace `podfsm`
        with the label SET_ASIDE_LABEL, its last_error saying why, unsupervised, until a client
        removes it (a removal tears down what an orphan's collection would: the container in
        its runtime, the pod's network and pins, its run directory). The stand-in is written,
        so the next start keeps it too. With no container, pin nor address of it on the system
        there is nothing to keep: its files are collected as an orphan's."""
        sid = kept.sandbox_id
        if not SANDBOX_ID.match(sid) or sid in self._sandboxes:
            return
        handler = next((name for name, found in world.runtime_states.items() if sid in found),
                       None)
        netns, userns = self.netns_pin_path(sid), self.userns_pin_path(sid)
        has_netns, has_userns = self._ns.pins_exist(netns), self._ns.pins_exist(userns)
        reserved = sid in world.reserved
        if not (handler or has_netns or has_userns or reserved):
            return  # files alone (a bundle, a run directory): collected as an orphan's
        has_bundle = sid in self._rt.bundle_ids()
        # the cgroup parent the pause was given, from its bundle: removal takes it away too
        spec = self._host.runtime_spec(self._rt.bundle_path(sid)) if has_bundle else None
        path = str(((spec or {}).get("linux") or {}).get("cgroupsPath") or "")
        parent = os.path.dirname(path) if path.endswith("/" + sid) else ""
        root = self.config.cgroup_root
        if parent != root and not parent.startswith(root + "/"):
            parent = ""
        network = "POD" if has_netns or reserved else "NODE"
        config = parse_pod_config({
            "metadata": {"name": f"set-aside-{sid[:12]}", "namespace": "podfsm", "uid": sid},
            "labels": {SET_ASIDE_LABEL: "true"},
            "linux": {"cgroup_parent": parent, "security_context": {
                "namespace_options": {"network": network}}}})
        why = (f"its record was set aside at start-up ({kept.problem}); what it has on the "
               "system is kept as found, unsupervised: remove the sandbox to tear it down")
        rec = SandboxRecord(id=sid, config=config, state=State.NOT_READY, created_at=now(),
                            runtime=handler or self._rt.name,
                            container_created=bool(handler) or has_bundle,
                            planned_netns_path=netns if has_netns else None,
                            planned_userns_path=userns if has_userns else None,
                            last_error=sizes.clip(why, sizes.MAX_LAST_ERROR))
        log.error("sandbox %s: %s", sid, why)
        self.recovery_problems.append(f"sandbox {sid}: {why}")
        try:
            await self._store_save(rec, durable=True)
        except PodfsmError as exc:
            self.recovery_problems.append(f"sandbox {sid}: its stand-in record: {exc}")
        self._sandboxes[sid] = Sandbox(rec, SandboxMachine(State.NOT_READY),
                                       list_bytes=sizes.list_entry_bytes(config))
        self._set_aside_ids.discard(sid)

    def _record_problem(self, rec: SandboxRecord) -> str | None:
        """Why a loaded record must not be acted on, or None. Its id must be a sandbox id and
        each pin path it holds the one this controller derives from that id (under netns_dir
        and run_dir), so no record can make podfsm unpin, unmount or remove anything else as
        root. (The bundle path is never read back: the runtime driver derives it from the id.)"""
        if not SANDBOX_ID.match(rec.id):
            return f"id {rec.id!r} is not a sandbox id"
        netns, userns = self.netns_pin_path(rec.id), self.userns_pin_path(rec.id)
        ns = rec.namespaces or PinnedNamespaces()
        for label, value, want in (("netns path", rec.planned_netns_path, netns),
                                   ("netns path", ns.netns_path, netns),
                                   ("userns path", rec.planned_userns_path, userns),
                                   ("userns path", ns.userns_path, userns)):
            if value is not None and value != want:
                return f"its {label} {value!r} is not the one podfsm uses ({want})"
        files = rec.files
        if files is not None and any(not paths.within(files.log_directory_real, d)
                                     for d in files.log_directories_made):
            # removal takes these: only the log directory and directories above it
            return (f"its log directories made {files.log_directories_made!r} are not "
                    f"{files.log_directory_real!r} or above it")
        return None

    async def _recover_one(self, sb: Sandbox, world: _World) -> None:
        """Reconcile one record with the system.

        - a stop or remove that was under way is finished;
        - a Ready sandbox whose pause process is alive (the same process, in the pinned
          namespaces, running for the runtime, its address still reserved) is supervised
          again; one whose
          task died meanwhile goes NotReady (TASK_EXIT, with the status the reaper kept);
        - an interrupted run goes NotReady (FAIL) keeping what it made (its netns path, its
          address) until stop/remove, as containerd does.
        Nothing is ever left in between: every record ends Ready, NotReady, or removed.
        """
        async with self._limiter, sb.lock:
            rec = sb.record
            try:
                if rec.pending == "remove":
                    await self._remove(sb)
                elif rec.pending == "stop":
                    await self._stop(sb)
                elif rec.state is State.READY and rec.pending is None:
                    await self._reattach(sb, world)
                elif rec.state is not State.NOT_READY:
                    what = rec.pending or rec.state.value
                    msg = f"interrupted by a controller restart during {what}"
                    await self._save(sb, Trigger.FAIL, error=msg, last_error=msg, pending=None)
            except Exception as exc:
                log.error("sandbox %s: recovery failed: %s", rec.id, exc)
                self.recovery_problems.append(f"sandbox {rec.id}: {describe(exc)}")

    async def _reattach(self, sb: Sandbox, world: _World) -> None:
        rec = sb.record
        task = rec.task
        if task is None or not self._task_driver(rec).task_alive(task):
            status = (await self._exit_status(rec.runtime, task, 0.2) if task is not None
                      else None)
            msg = "task exited while podfsm was down"
            await self._save(sb, Trigger.TASK_EXIT, exit_status=status,
                             finished_at=rec.finished_at or now(), error=msg)
            return
        problem = self._task_problem(rec) or (
            self._ns.pin_problem(rec.namespaces) if rec.namespaces else None)
        said = world.runtime_states.get(rec.runtime, {}).get(rec.id)
        if problem is None and said != "running":
            problem = f"the runtime says the container is {said or 'gone'} ({rec.runtime})"

        if problem is None and rec.network is not None and rec.id not in world.reserved:
            problem = "pod network check failed: its address is no longer reserved"
        if problem is not None:
            msg = f"found broken after a controller restart: {problem}"
            await self._save(sb, Trigger.FAIL, error=msg, last_error=msg)
            return
        self._supervise(sb, task)

    async def _collect_orphans(self) -> None:
        """Remove what this controller made but has no record of; nothing else is touched.

        What is ours: containers in our own runtime root, sandbox run directories and bundles
        under our run_dir (every sandbox has a run directory from before its first system
        step until after its record is gone), ids of records set aside as corrupt (of which
        nothing was found on the system: else they are kept, see _keep_set_aside), and netns
        pins carrying our tag. For each such id: runtime delete, CNI DEL, unpin, directory.
        """
        known = set(self._sandboxes)
        ids: set[str] = set()
        for rt in self._runtimes.values():
            try:
                ids.update(await rt.list_containers())
            except PodfsmError as exc:
                self.recovery_problems.append(f"orphan containers ({rt.name}): {exc}")
        ids.update(n for n in self._rt.bundle_ids() if SANDBOX_ID.match(n))
        ids.update(n for n in self._host.sandbox_dirs(self.sandboxes_dir)
                   if SANDBOX_ID.match(n))
        ids.update(self._set_aside_ids)
        for sid in sorted(ids - known):
            await self._collect_orphan(sid)
        prefix = f"podfsm-{self._tag}-"
        known_prefixes = {sid[:16] for sid in known}
        for name in self._ns.pins_in(self.config.netns_dir, prefix):
            if name[len(prefix):] not in known_prefixes:
                log.warning("unpinning orphan netns %s", name)
                try:
                    await self._ns.destroy(os.path.join(self.config.netns_dir, name), None)
                except PodfsmError as exc:
                    self.recovery_problems.append(f"orphan netns pin {name}: {exc}")

    async def _collect_orphan(self, sid: str) -> None:
        log.warning("collecting orphan sandbox %s (no record of it)", sid)
        netns = self.netns_pin_path(sid)
        # Which handler made it is not known without a record: delete is idempotent, so every
        # handler is asked.
        actions: dict[Compensation, list[tuple[str, Callable[[], Awaitable[None]]]]] = {
            steps.DELETE_CONTAINER: [(f"{rt.name} delete", functools.partial(rt.delete, sid))
                                     for rt in self._runtimes.values()],
            steps.DETACH_NETWORK: [(steps.DETACH_NETWORK.label, lambda: self._net.detach(
                NetworkRequest(sandbox_id=sid,
                               netns_path=netns if self._ns.pins_exist(netns) else None), None))],
            steps.UNPIN_NAMESPACES: [(steps.UNPIN_NAMESPACES.label,
                                      lambda: self._ns.destroy(netns, self.userns_pin_path(sid)))],
            steps.RELEASE_SHM: [(steps.RELEASE_SHM.label,
                                 lambda: self._host.release_shm(self.shm_path(sid)))],
        }
        failed = False
        for label, action in (a for step in steps.ORPHAN_ORDER for a in actions[step]):
            try:
                await action()
            except Exception as exc:
                failed = True
                self.recovery_problems.append(f"orphan {sid}: {label}: {describe(exc)}")
        if not failed:
            with contextlib.suppress(OSError):
                self._host.remove_sandbox_dir(self.sandbox_run_dir(sid))


def _is_stand_in(rec: SandboxRecord) -> bool:
    """Whether `rec` is the stand-in _keep_set_aside wrote for a record set aside."""
    md = rec.config.metadata
    return (rec.config.labels.get(SET_ASIDE_LABEL) == "true" and md.uid == rec.id
            and md.namespace == "podfsm" and md.name == f"set-aside-{rec.id[:12]}")


@dataclass(frozen=True)
class _World:
    """What the drivers report once, at recovery."""

    #: handler name -> container id -> the runtime's status
    runtime_states: dict[str, dict[str, str]]
    reserved: set[str]

