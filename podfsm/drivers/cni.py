"""CniNetwork: the pod network, through real CNI plugins run as the CNI spec says.

Each plugin is executed directly (no shell) with ``asyncio.create_subprocess_exec``, its config
on stdin and CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH and CNI_ARGS in its
environment; ADD chains ``prevResult`` through the list, DEL runs it in reverse. What the rules
are (which file, what each plugin is given, what the result means) lives in the pure
:mod:`podfsm.core.cniconf`; this module only runs processes and reads the kernel (what it reads
of the host, the config directory, reservations, the netns, is in :mod:`podfsm.drivers.cnihost`,
importable from here).

Interfaces are read with pyroute2 over a netlink socket created inside the pod's netns by a
short-lived dedicated thread (setns is per thread), so nothing forks and a missing netns can
never be created by accident.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from podfsm.core import cniconf
from podfsm.core.cniconf import NetworkConfigList
from podfsm.core.errors import PrerequisiteMissing, StepFailed
from podfsm.core.records import NetworkResult
from podfsm.core.requests import InterfaceInfo, NetworkRequest
from podfsm.drivers.localnet import LocalnetHolds, needs_localnet
from podfsm.drivers.reaper import CommandTimedOut, ReaperError
from podfsm.drivers.reaperclient import ChainStep, ReaperClient

# isort: off
from podfsm.drivers.cnihost import (  # moved there; importable from here as before
    STEP as STEP, _NETLINK_ROUTE as _NETLINK_ROUTE, _PluginFailed as _PluginFailed, _kill as _kill,
    _json_object as _json_object, _read_conf_dir as _read_conf_dir,
    _read_reservations as _read_reservations, _open_netns as _open_netns,
    _live_netns as _live_netns, _netlink_socket_in as _netlink_socket_in, _counters as _counters,
)
# isort: on


DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
#: Seconds one plugin run may take. ADD/DEL take ~15-20 ms here; a plugin stuck far longer
#: (a hung IPAM daemon) must not hold a sandbox forever.
DEFAULT_PLUGIN_TIMEOUT = 60.0
_IFF_UP = 0x1
# Plugins such as portmap and firewall run iptables: they need a PATH even if we have none.
_FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class _Step:
    """One plugin run of a chain: plugin `index` of `conf`, with this environment and either
    the previous step's output (`chained`) or `prev` as its prevResult."""

    conf: NetworkConfigList
    index: int
    #: the variables set over the inherited environment (CNI_*, PATH)
    env: dict[str, str]
    prev: Mapping[str, Any] | None = None
    chained: bool = False


class CniNetwork:
    """The NetworkDriver over CNI plugins (containernetworking-plugins).

    The network is the first config file of `conf_dir` by sorted name, or, when there is none,
    the shipped default: a bridge `default_bridge` with host-local addresses from
    `default_subnet`, then loopback, named `default_name`. ``start()`` must be called before
    anything else; it may be called again to reload the configuration.
    """

    network_name: str

    def __init__(
        self,
        conf_dir: str = DEFAULT_CONF_DIR,
        bin_dirs: Sequence[str] = DEFAULT_BIN_DIRS,
        default_name: str = "podfsm",
        default_bridge: str = "podfsm0",
        default_subnet: str = "10.209.0.0/16",
        *,
        plugin_timeout: float = DEFAULT_PLUGIN_TIMEOUT,
        reaper_run_dir: str | None = None,
    ) -> None:
        self.conf_dir = conf_dir
        # With a run_dir, plugins are run by that run_dir's reaper process: the caller's
        # process then never forks for them (asyncio's child watcher would start a thread per
        # plugin run, the largest CPU cost the controller had).
        self._reaper = ReaperClient(reaper_run_dir) if reaper_run_dir else None
        #: the pods that need route_localnet on the bridge (kept under the same run_dir)
        self._localnet = LocalnetHolds(reaper_run_dir) if reaper_run_dir else None
        self.bin_dirs: tuple[str, ...] = tuple(bin_dirs)
        self.default_name = default_name
        self.default_bridge = default_bridge
        self.default_subnet = default_subnet
        self.plugin_timeout = plugin_timeout
        #: the name of the network in use (the default name until start() has loaded it)
        self.network_name = default_name
        self._conflist: NetworkConfigList | None = None
        # Set when the configured chain does not bring up "lo" itself: run apart with
        # CNI_IFNAME=lo, as containerd does.
        self._loopback: NetworkConfigList | None = None
        self._plugin_paths: dict[str, str] = {}
        self._base_env: dict[str, str] = {}

    # -- configuration -----------------------------------------------------------------------

    @property
    def conflist(self) -> NetworkConfigList:
        """The network configuration list in use (after start())."""
        if self._conflist is None:
            raise RuntimeError("CniNetwork.start() has not been called")
        return self._conflist

    @property
    def separate_loopback(self) -> bool:
        """True when "lo" is brought up by a separate loopback network (the configured chain
        has no loopback plugin)."""
        return self._loopback is not None

    @property
    def plugin_paths(self) -> Mapping[str, str]:
        """Plugin type -> the executable found for it at start()."""
        return dict(self._plugin_paths)

    async def start(self) -> None:
        """Load the network config and check that every plugin it names exists.

        Raises ValueError (naming the file and field) for a broken config file, and
        PrerequisiteMissing when a plugin binary is not in any of the plugin directories.
        """
        if self._reaper is not None and not self._reaper.connected:
            await self._reaper.connect()
        files = await asyncio.to_thread(_read_conf_dir, self.conf_dir)
        conf = cniconf.select_network(files, self.conf_dir)
        if conf is None:
            conf = cniconf.conflist_from_dict(
                cniconf.default_conflist(
                    self.default_name, self.default_bridge, self.default_subnet
                ),
                "<default>",
            )
        loopback = None if conf.has_loopback else cniconf.loopback_conflist()
        needed = cniconf.required_plugins(conf)
        if loopback is not None:
            needed += [t for t in cniconf.required_plugins(loopback) if t not in needed]
        paths = await asyncio.to_thread(self._find_plugins, needed, conf.source)

        # What a plugin gets over the environment it inherits (this process's, or the reaper's,
        # which it inherited from the controller that started it): PATH, as plugins such as
        # portmap run iptables, and CNI_PATH; _env adds the per-call CNI_* variables.
        self._base_env = {"PATH": os.environ.get("PATH") or _FALLBACK_PATH,
                          "CNI_PATH": ":".join(self.bin_dirs)}
        self._plugin_paths = paths
        self._conflist = conf
        self._loopback = loopback
        self.network_name = conf.name

    def _find_plugins(self, names: Sequence[str], source: str) -> dict[str, str]:
        existing = [d for d in self.bin_dirs if os.path.isdir(d)]
        searched = ", ".join(self.bin_dirs) or "(no directory given)"
        if not existing:
            raise PrerequisiteMissing(
                f"no CNI plugin directory exists (searched {searched}): install "
                "containernetworking-plugins (Debian: apt-get install "
                "containernetworking-plugins) or put the plugins in /opt/cni/bin"
            )
        found: dict[str, str] = {}
        for name in names:
            for d in existing:
                path = os.path.join(d, name)
                if os.path.isfile(path) and os.access(path, os.X_OK):
                    found[name] = path
                    break
            else:
                raise PrerequisiteMissing(
                    f"CNI plugin {name!r} needed by network config {source} was not found in "
                    f"{searched}; install it (containernetworking-plugins) or fix the config"
                )
        return found

    # -- the NetworkDriver operations --------------------------------------------------------

    async def attach(self, req: NetworkRequest) -> NetworkResult:
        """CNI ADD through every plugin, ``prevResult`` chained.

        On failure, DEL is run for the plugins already run (the failing one included: a failed
        ADD may have done part of its work) before StepFailed is raised with the plugin's own
        message, so nothing is left behind. If the call is cancelled the running plugin is
        killed and nothing is undone here: the caller's compensation (detach) does that.
        """
        conf = self.conflist
        if not req.netns_path:
            raise StepFailed(STEP, "ADD needs the pod's network namespace path")
        env = self._env(req, "ADD", req.netns_path, req.ifname)
        caps = cniconf.capability_args_for(req.port_mappings)
        self._localnet_held(req, True)
        steps: list[_Step] = []
        if self._loopback is not None:
            steps.append(_Step(self._loopback, 0, self._env(req, "ADD", req.netns_path, "lo")))
        steps += [_Step(conf, i, env, chained=i > 0) for i in range(len(conf.plugins))]
        outputs = await self._run_steps("ADD", steps, caps, stop_on_failure=True)

        lo_done = False
        prev: dict[str, Any] | None = None
        for step, out in zip(steps, outputs, strict=False):
            try:
                if isinstance(out, _PluginFailed):
                    raise out
                if step.conf is self._loopback:
                    lo_done = True
                    continue
                prev = _json_object(out, step.conf.plugin_types[step.index])
            except _PluginFailed as exc:
                if step.conf is self._loopback:
                    raise StepFailed(STEP, str(exc)) from None
                undo = await self._undo(req, conf, step.index, prev, lo_done)
                raise StepFailed(STEP, str(exc) + undo) from None

        assert prev is not None  # a conflist has at least one plugin
        try:
            return cniconf.parse_result(prev, conf.name, req.ifname)
        except ValueError as exc:
            undo = await self._undo(req, conf, len(conf.plugins) - 1, prev, lo_done)
            raise StepFailed(STEP, f"ADD returned a result podfsm cannot read: {exc}"
                             + undo) from None

    async def _undo(
        self,
        req: NetworkRequest,
        conf: NetworkConfigList,
        last: int,
        prev: dict[str, Any] | None,
        lo_done: bool,
    ) -> str:
        """DEL plugins `last`..0 (and the loopback network); '' or what could not be undone."""
        netns = _live_netns(req.netns_path)
        env = self._env(req, "DEL", netns, req.ifname)
        del_prev = prev if cniconf.passes_prev_result_on_del(conf.cni_version) else None
        caps = cniconf.capability_args_for(req.port_mappings)
        lo_env = self._env(req, "DEL", netns, "lo") if lo_done else None
        errors = await self._del_chain(conf, env, del_prev, last, caps, lo_env)
        if errors:
            return "; undoing it failed too: " + "; ".join(errors)
        self._localnet_held(req, False)
        return ""

    def _localnet_held(self, req: NetworkRequest, held: bool) -> None:
        """Count the pod among those that need route_localnet on the bridge (before its ADD),
        or no longer (after its DEL): see podfsm.drivers.localnet."""
        bridge = cniconf.localnet_bridge(self.conflist)
        if self._localnet is None or bridge is None or not needs_localnet(req.port_mappings):
            return
        if held:
            self._localnet.hold(bridge, req.sandbox_id)
        else:
            self._localnet.release(bridge, req.sandbox_id)

    async def check(self, req: NetworkRequest, result: NetworkResult) -> None:
        """CNI CHECK of every plugin against the stored ADD result.

        A list with ``disableCheck`` or a version before 0.4.0 (which has no CHECK) passes.
        """
        conf = self.conflist
        if conf.disable_check or not cniconf.supports_check(conf.cni_version):
            return
        netns = _live_netns(req.netns_path)
        if not netns:
            raise StepFailed(STEP, f"CHECK: network namespace {req.netns_path!r} does not exist")
        if not result.raw:
            raise StepFailed(STEP, "CHECK needs the stored ADD result, and there is none")
        env = self._env(req, "CHECK", netns, req.ifname)
        # As libcni: every command gets the runtime config, so portmap can CHECK its rules.
        caps = cniconf.capability_args_for(req.port_mappings)
        steps = [_Step(conf, i, env, result.raw) for i in range(len(conf.plugins))]
        if self._loopback is not None:
            steps.append(_Step(self._loopback, 0, self._env(req, "CHECK", netns, "lo")))
        for out in await self._run_steps("CHECK", steps, caps, stop_on_failure=True):
            if isinstance(out, _PluginFailed):
                raise StepFailed(STEP, str(out)) from None

    async def detach(self, req: NetworkRequest, result: NetworkResult | None) -> None:
        """CNI DEL of every plugin in reverse order.

        Idempotent. When the netns path is None, missing or no longer a namespace, CNI_NETNS is
        passed empty: the plugins then skip the namespace and still release the address. Every
        plugin is given its DEL even if an earlier one failed (so the address is released
        whatever else went wrong); any failures are then raised together as StepFailed.
        """
        conf = self.conflist
        netns = _live_netns(req.netns_path)
        prev: dict[str, Any] | None = None
        if result is not None and result.raw and cniconf.passes_prev_result_on_del(
            conf.cni_version
        ):
            prev = dict(result.raw)
        env = self._env(req, "DEL", netns, req.ifname)
        caps = cniconf.capability_args_for(req.port_mappings)
        lo_env = self._env(req, "DEL", netns, "lo") if self._loopback is not None else None
        errors = await self._del_chain(conf, env, prev, len(conf.plugins) - 1, caps, lo_env)
        if errors:
            raise StepFailed(STEP, "; ".join(errors))
        self._localnet_held(req, False)

    async def _del_chain(
        self,
        conf: NetworkConfigList,
        env: dict[str, str],
        prev: dict[str, Any] | None,
        last: int,
        caps: Mapping[str, Any],
        lo_env: dict[str, str] | None,
    ) -> list[str]:
        """DEL plugins `last`..0, then the loopback network when `lo_env` is given, each even if
        another failed; the failures."""
        steps = [_Step(conf, i, env, prev) for i in range(last, -1, -1)]
        if lo_env is not None and self._loopback is not None:
            steps.append(_Step(self._loopback, 0, lo_env))
        outputs = await self._run_steps("DEL", steps, caps, stop_on_failure=False)
        return [str(out) for out in outputs if isinstance(out, _PluginFailed)]

    def address_families(self) -> frozenset[int] | None:
        return cniconf.address_families(self.conflist)

    def problem(self) -> str | None:
        """None while the network config file loaded at start() is still there and every
        plugin the network needs is still an executable file; else what is wrong."""
        if self._conflist is None:
            return "the CNI network is not loaded"
        source = self._conflist.source
        if os.path.isabs(source) and not os.path.exists(source):
            return f"the CNI network config {source} is gone"
        for plugin, path in self._plugin_paths.items():
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                return (f"CNI plugin {plugin!r} of network {self.network_name!r} is gone from "
                        f"{path}")
        return None

    async def interfaces(self, netns_path: str) -> list[InterfaceInfo]:
        """The interfaces of the netns at `netns_path`, with their addresses ("10.x.y.z/24")
        and whether they are up. Raises StepFailed if the path is not a network namespace;
        never creates anything at the path."""
        # imported here: pyroute2 costs ~12 MB of resident memory, and only status reads need it
        from pyroute2 import AsyncIPRoute

        fd = (await _netlink_socket_in(netns_path)).detach()
        try:
            # pyroute2 adopts the fd and closes it. No netns= argument: that path forks a
            # helper and, with its default flags, would create a missing netns.
            ipr = AsyncIPRoute(fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        async with ipr:
            links = [msg async for msg in await ipr.link("dump")]
            addrs = [msg async for msg in await ipr.addr("dump")]
        by_index: dict[int, list[str]] = {}
        for a in addrs:
            ip = a.get("local") or a.get("address")
            if ip:
                by_index.setdefault(int(a["index"]), []).append(f"{ip}/{a['prefixlen']}")
        return [
            InterfaceInfo(
                name=str(link.get("ifname")),
                mac=str(link.get("address") or ""),
                addresses=tuple(by_index.get(int(link["index"]), ())),
                up=bool(int(link["flags"]) & _IFF_UP),
                **_counters(link.get("stats64") or link.get("stats")),
            )
            for link in links
        ]

    async def reserved_container_ids(self) -> set[str]:
        """Container ids holding an address in this network's host-local store (for orphan
        collection). A network without host-local IPAM reserves nothing podfsm can see."""
        dirs = cniconf.ipam_store_dirs(self.conflist)
        return await asyncio.to_thread(_read_reservations, dirs)

    # -- running plugins ---------------------------------------------------------------------

    def _env(self, req: NetworkRequest, command: str, netns: str, ifname: str) -> dict[str, str]:
        try:
            args = cniconf.cni_args(req.pod_namespace, req.pod_name, req.sandbox_id, req.pod_uid)
        except ValueError as exc:
            raise StepFailed(STEP, str(exc)) from None
        env = dict(self._base_env)
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=req.sandbox_id,
            CNI_NETNS=netns,
            CNI_IFNAME=ifname,
            CNI_ARGS=args,
        )
        return env

    async def _run_steps(
        self, command: str, steps: Sequence[_Step], caps: Mapping[str, Any], *,
        stop_on_failure: bool,
    ) -> list[bytes | _PluginFailed]:
        """Run the plugins of `steps` in order: their outputs, or what failed. A chained step
        gets the previous step's output as its ``prevResult``. With `stop_on_failure` the list
        ends at the first failure. Through the reaper the whole list is one request."""
        runs: list[tuple[_Step, str | None]] = []  # the step and its plugin's path, or
        for step in steps:                          # None when it is skipped as idle
            ptype = step.conf.plugin_types[step.index]
            idle = cniconf.idle_without(step.conf.plugins[step.index], caps) and (
                step.chained or step.prev is not None or command == "DEL")
            runs.append((step, None if idle else self._plugin_paths.get(ptype, "")))
        if self._reaper is None:
            return await self._run_one_by_one(command, runs, caps, stop_on_failure)
        return await self._run_by_reaper(command, runs, caps, stop_on_failure)

    async def _run_one_by_one(
        self, command: str, runs: Sequence[tuple[_Step, str | None]], caps: Mapping[str, Any],
        stop_on_failure: bool,
    ) -> list[bytes | _PluginFailed]:
        outputs: list[bytes | _PluginFailed] = []
        last: bytes | None = None
        for step, path in runs:
            prev: Mapping[str, Any] | None = step.prev
            if step.chained and last is not None:
                try:
                    prev = _json_object(last, step.conf.plugin_types[step.index - 1])
                except _PluginFailed:
                    break  # the caller names what was wrong with that output
            try:
                if path is None:  # idle: what the plugin would answer, without running it
                    out = json.dumps(prev).encode() if command == "ADD" else b""
                else:
                    out = await self._run(step, path, command, prev, caps)
            except _PluginFailed as exc:
                outputs.append(exc)
                if stop_on_failure:
                    break
                continue
            outputs.append(out)
            last = out
        return outputs

    async def _run(
        self, step: _Step, path: str, command: str, prev: Mapping[str, Any] | None,
        caps: Mapping[str, Any],
    ) -> bytes:
        """Run one plugin in a child of this process; its stdout, or _PluginFailed."""
        ptype = step.conf.plugin_types[step.index]
        if not path:  # only if start() was skipped for this config
            raise _PluginFailed(ptype, command, "plugin was not found at start")
        stdin = json.dumps(cniconf.plugin_config(step.conf, step.index, prev, caps)).encode()
        try:
            proc = await asyncio.create_subprocess_exec(
                path,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, **step.env},
                cwd="/",
                process_group=0,  # a timeout kills what the plugin started too
            )
        except OSError as exc:
            raise _PluginFailed(ptype, command, f"cannot execute {path}: {exc}") from None
        try:
            async with asyncio.timeout(self.plugin_timeout):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            await _kill(proc)
            raise _PluginFailed(
                ptype, command, f"no answer within {self.plugin_timeout:g} s (killed)"
            ) from None
        except BaseException:
            # Cancelled: do not leave the plugin running unsupervised, nor a zombie.
            await _kill(proc)
            raise
        if proc.returncode != 0:
            raise _PluginFailed(
                ptype, command, cniconf.plugin_error_message(out, err, proc.returncode)
            )
        return out

    async def _run_by_reaper(
        self, command: str, runs: Sequence[tuple[_Step, str | None]], caps: Mapping[str, Any],
        stop_on_failure: bool,
    ) -> list[bytes | _PluginFailed]:
        """The plugins as one `chain` request to the reaper. An idle plugin is left out of
        the chain: its output is its input's prevResult, which the next step gets anyway."""
        assert self._reaper is not None
        chain: list[ChainStep] = []
        sent: list[int] = []  # index in `runs` of each step sent
        for k, (step, path) in enumerate(runs):
            if path is None:
                continue
            if not path:
                # only if start() was skipped for this config: nothing of it is run
                ptype = step.conf.plugin_types[step.index]
                return [_PluginFailed(ptype, command, "plugin was not found at start")]
            # A chained step after a left-out one takes the output of the step before that:
            # the same object the left-out plugin would have passed on.
            chained = step.chained and bool(chain)
            prev = None if chained else step.prev
            conf = cniconf.plugin_config(step.conf, step.index, prev, caps)
            chain.append(ChainStep([path], step.env, json.dumps(conf), prev_result=chained))
            sent.append(k)
        try:
            # Shielded: a cancelled caller would not stop the plugins in the reaper, and the
            # caller's compensating DEL could then run before this ADD reserves its address
            # (a leak). Each plugin is bounded by plugin_timeout; cancellation lands after.
            with anyio.CancelScope(shield=True):
                results = await self._reaper.chain(
                    chain, stop_on_failure=stop_on_failure, timeout=self.plugin_timeout,
                    cwd="/")
        except ReaperError as exc:
            step = runs[sent[0]][0] if sent else runs[0][0]
            return [_PluginFailed(step.conf.plugin_types[step.index], command, str(exc))]
        by_run: dict[int, bytes | _PluginFailed] = {}
        for k, res in zip(sent, results, strict=False):
            step = runs[k][0]
            ptype = step.conf.plugin_types[step.index]
            if isinstance(res, CommandTimedOut):
                by_run[k] = _PluginFailed(ptype, command,
                                          f"no answer within {res.timeout:g} s (killed)")
            elif isinstance(res, ReaperError):
                by_run[k] = _PluginFailed(ptype, command, str(res))
            elif res.rc != 0:
                by_run[k] = _PluginFailed(ptype, command, cniconf.plugin_error_message(
                    res.stdout.encode(), res.stderr.encode(), res.rc))
            else:
                by_run[k] = res.stdout.encode()
        outputs: list[bytes | _PluginFailed] = []
        last: bytes | None = None
        for k, (step, path) in enumerate(runs):
            if path is None:
                if stop_on_failure and last is None and step.chained:
                    break  # nothing ran before it
                prev_out = last if step.chained else (
                    json.dumps(step.prev).encode() if step.prev is not None else None)
                outputs.append((prev_out or b"null") if command == "ADD" else b"")
                continue
            if k not in by_run:
                break  # the chain stopped before it
            out = by_run[k]
            outputs.append(out)
            if isinstance(out, _PluginFailed):
                if stop_on_failure:
                    break
                continue
            last = out
        return outputs

    async def close(self) -> None:
        """Disconnect from the reaper, if plugins run there."""
        if self._reaper is not None:
            await self._reaper.close()


__all__ = ["DEFAULT_BIN_DIRS", "DEFAULT_CONF_DIR", "CniNetwork"]

