"""CNI network configuration: parsing, selection, plugin stdin and result parsing. No I/O.

This is the part of libcni (containernetworking/cni) that podfsm needs, written as pure
functions so every rule can be tested without a kernel:

- a network is a *configuration list* (``.conflist``: ``cniVersion``, ``name``, ``plugins``);
  a single-plugin ``.conf``/``.json`` file is wrapped into a one-plugin list, as libcni's
  ``ConfListFromConf`` does;
- the network used is the first file of the config directory by sorted file name (what
  containerd and kubelet do with their default of one network);
- each plugin receives its own config object with ``name`` and ``cniVersion`` of the list, the
  previous plugin's result as ``prevResult`` and, for the capabilities it declares,
  ``runtimeConfig``;
- the final result gives the pod's addresses.

The driver that runs the plugins is :mod:`podfsm.drivers.cni`.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from podfsm.core.records import NetworkInterface, NetworkResult
from podfsm.core.spec import PortMapping

#: File name endings libcni's ConfFiles accepts in a config directory.
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
#: The version of the shipped default network; Debian's plugins 1.1.1 support 0.1.0 to 1.0.0.
DEFAULT_CNI_VERSION = "1.0.0"
#: The plugin type that brings up "lo". It ignores CNI_IFNAME and always acts on "lo", and in a
#: chain passes prevResult through unchanged (measured with plugins 1.1.1), so it can sit at the
#: end of a conflist at no cost. Networks without it get a separate loopback network.
LOOPBACK_TYPE = "loopback"
LOOPBACK_NETWORK_NAME = "cni-loopback"
#: Where host-local keeps its reservations unless ``ipam.dataDir`` says otherwise.
HOST_LOCAL_DATA_DIR = "/var/lib/cni/networks"
#: Longest Linux interface name (IFNAMSIZ - 1).
MAX_IFNAME_LEN = 15

# libcni's ValidateNetworkName; the name also becomes a directory under host-local's store, so
# it must never hold "/" or be "." or "..".
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
# A plugin type is looked up as a file name in the plugin directories: no path separators.
_TYPE_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class NetworkConfigList:
    """A validated CNI network configuration list.

    ``plugins`` holds each plugin's config object exactly as written (unknown keys kept: they
    belong to the plugin); never mutate them (:func:`plugin_config` shares them).
    """

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    disable_check: bool = False
    #: the file it came from, or "<default>" for the shipped network; used in messages
    source: str = ""

    @property
    def plugin_types(self) -> tuple[str, ...]:
        """The ``type`` of each plugin, in chain order."""
        return tuple(str(p["type"]) for p in self.plugins)

    @property
    def has_loopback(self) -> bool:
        """True when the chain itself brings up "lo"."""
        return LOOPBACK_TYPE in self.plugin_types

    def to_dict(self) -> dict[str, Any]:
        """The configuration list as JSON-ready data (a deep copy)."""
        out: dict[str, Any] = {
            "cniVersion": self.cni_version,
            "name": self.name,
            "plugins": copy.deepcopy(list(self.plugins)),
        }
        if self.disable_check:
            out["disableCheck"] = True
        return out


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"0.4.0"`` -> ``(0, 4, 0)``. Raises ValueError for anything else."""
    m = _VERSION_RE.match(version)
    if m is None:
        raise ValueError(f"CNI version {version!r} is not of the form X.Y.Z")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def supports_check(version: str) -> bool:
    """CHECK exists from spec 0.4.0 on (libcni refuses it for older lists)."""
    return version_tuple(version) >= (0, 4, 0)


def passes_prev_result_on_del(version: str) -> bool:
    """From spec 0.4.0 on, DEL and CHECK get the ADD result as ``prevResult`` (as libcni)."""
    return version_tuple(version) >= (0, 4, 0)


# ---------------------------------------------------------------------------------------------
# parsing and validation


def _load_json(data: str | bytes, source: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_name(value: object, source: str, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: field {field!r} is required and must be a non-empty string")
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{source}: field {field!r} = {value!r} is not a valid network name "
            "(letters, digits, '_', '.', '-', starting with a letter or digit)"
        )
    return value


def _check_version(value: object, source: str, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: field {field!r} is required and must be a string like "
                         f"{DEFAULT_CNI_VERSION!r}")
    try:
        version_tuple(value)
    except ValueError:
        raise ValueError(f"{source}: field {field!r} = {value!r} is not a version X.Y.Z") from None
    return value


def _field(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check_plugin(plugin: object, source: str, where: str) -> dict[str, Any]:
    """Validate one plugin object; `where` is its place ("plugins[2]", or "" for a .conf)."""
    if not isinstance(plugin, dict):
        raise ValueError(f"{source}: {where or 'the config'} must be a JSON object")
    ptype = plugin.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise ValueError(f"{source}: field '{_field(where, 'type')}' is required and must be a "
                         "non-empty string")
    if not _TYPE_RE.match(ptype):
        raise ValueError(f"{source}: field '{_field(where, 'type')}' = {ptype!r} is not a "
                         "plugin name (a file name in the plugin directories, without '/')")
    caps = plugin.get("capabilities")
    if caps is not None and (
        not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values())
    ):
        raise ValueError(f"{source}: field '{_field(where, 'capabilities')}' must map names "
                         "to true/false")
    ipam = plugin.get("ipam")
    if ipam is not None:
        if not isinstance(ipam, dict):
            raise ValueError(f"{source}: field '{_field(where, 'ipam')}' must be a JSON object")
        itype = ipam.get("type")
        # An ipam object without a type is legal for plugins that ignore it; with one, the
        # type is a plugin too and must be findable.
        if itype is not None and (not isinstance(itype, str) or not _TYPE_RE.match(itype)):
            raise ValueError(f"{source}: field '{_field(where, 'ipam.type')}' = {itype!r} is not a "
                             "plugin name")
        data_dir = ipam.get("dataDir")
        if data_dir is not None and (
            not isinstance(data_dir, str) or not posixpath.isabs(data_dir)
        ):
            raise ValueError(f"{source}: field '{_field(where, 'ipam.dataDir')}' must be an "
                             "absolute path")
    return plugin


def conflist_from_dict(obj: Mapping[str, Any], source: str) -> NetworkConfigList:
    """Validate a configuration list given as data. Raises ValueError naming source and field."""
    name = _check_name(obj.get("name"), source, "name")
    version = _check_version(obj.get("cniVersion"), source, "cniVersion")
    plugins = obj.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ValueError(f"{source}: field 'plugins' is required and must be a non-empty list")
    checked = tuple(
        _check_plugin(p, source, f"plugins[{i}]") for i, p in enumerate(plugins)
    )
    disable_check = obj.get("disableCheck", False)
    if not isinstance(disable_check, bool):
        raise ValueError(f"{source}: field 'disableCheck' must be true or false")
    return NetworkConfigList(
        name=name,
        cni_version=version,
        plugins=copy.deepcopy(checked),
        disable_check=disable_check,
        source=source,
    )


def parse_conflist(data: str | bytes, source: str) -> NetworkConfigList:
    """Parse a ``.conflist`` (``{"cniVersion", "name", "plugins": [...]}``)."""
    return conflist_from_dict(_load_json(data, source), source)


def parse_conf(data: str | bytes, source: str) -> NetworkConfigList:
    """Parse a single-plugin ``.conf``/``.json`` and wrap it into a one-plugin list, keeping
    the plugin object whole (libcni's ConfListFromConf)."""
    obj = _load_json(data, source)
    if "plugins" in obj:
        # A list saved under a .conf name: libcni would misread it as a plugin without a type.
        raise ValueError(f"{source}: holds a 'plugins' list; name the file *.conflist")
    name = _check_name(obj.get("name"), source, "name")
    version = _check_version(obj.get("cniVersion"), source, "cniVersion")
    _check_plugin(obj, source, "")
    return conflist_from_dict(
        {"cniVersion": version, "name": name, "plugins": [obj]}, source
    )


def parse_network_file(filename: str, data: str | bytes) -> NetworkConfigList:
    """Parse one config file, as a list if it ends in ``.conflist``, else as a single plugin."""
    if filename.endswith(".conflist"):
        return parse_conflist(data, filename)
    if filename.endswith((".conf", ".json")):
        return parse_conf(data, filename)
    raise ValueError(f"{filename}: not a CNI config file (expected one of {CONF_EXTENSIONS})")


def select_network(
    files: Mapping[str, str | bytes], directory: str = ""
) -> NetworkConfigList | None:
    """The network to use: the first config file by sorted name, or None if there is none.

    `files` maps file names (in `directory`) to their contents; names not ending in
    ``.conf``/``.conflist``/``.json`` are ignored. Like containerd (one network by default), a
    broken first file is an error rather than silently skipped: the node operator put it there
    to be used. Errors name the file (joined to `directory`) and the field.
    """
    candidates = sorted(f for f in files if f.endswith(CONF_EXTENSIONS))
    if not candidates:
        return None
    first = candidates[0]
    return parse_network_file(posixpath.join(directory, first), files[first])


def default_conflist(name: str, bridge: str, subnet: str) -> dict[str, Any]:
    """The network podfsm ships: a bridge with host-local IPAM, then loopback in the same chain.

    The bridge is the pods' gateway (``isGateway``: which turns on the host's
    ``net.ipv4.ip_forward``), does no masquerading (``ipMasq`` false: no host firewall rules),
    and lets a pod reach itself through its service address (``hairpinMode``). ``portmap``
    (with the ``portMappings`` capability) serves the pods' port_mappings.
    """
    _check_name(name, "<default>", "name")
    if not bridge or len(bridge) > MAX_IFNAME_LEN or "/" in bridge or bridge.strip() != bridge:
        raise ValueError(f"<default>: bridge name {bridge!r} must be 1-{MAX_IFNAME_LEN} "
                         "characters without '/' or spaces")
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise ValueError(f"<default>: subnet {subnet!r} is not a network: {exc}") from None
    if net.version != 4 or net.prefixlen > 30:
        raise ValueError(f"<default>: subnet {subnet!r} must be an IPv4 network of /30 or wider")
    return {
        "cniVersion": DEFAULT_CNI_VERSION,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(net)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            # CRI port_mappings: host ports DNAT-ed to the pod (iptables rules that CNI DEL
            # removes; portmap's top-level CNI-HOSTPORT-* chains stay, as under containerd)
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            {"type": LOOPBACK_TYPE},
        ],
    }


def loopback_conflist(cni_version: str = DEFAULT_CNI_VERSION) -> NetworkConfigList:
    """A network of only the loopback plugin, run with CNI_IFNAME "lo" (as containerd does) for
    configured networks that do not bring up "lo" themselves."""
    return conflist_from_dict(
        {"cniVersion": cni_version, "name": LOOPBACK_NETWORK_NAME,
         "plugins": [{"type": LOOPBACK_TYPE}]},
        "<loopback>",
    )


def required_plugins(conf: NetworkConfigList) -> list[str]:
    """Every plugin binary the list needs, chain plugins and their IPAM plugins, in order."""
    out: list[str] = []
    for plugin in conf.plugins:
        names = [plugin["type"]]
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and isinstance(ipam.get("type"), str):
            names.append(ipam["type"])
        for n in names:
            if n not in out:
                out.append(n)
    return out


def ipam_store_dirs(conf: NetworkConfigList) -> list[str]:
    """The host-local reservation directories of this network (``<dataDir>/<network name>``)."""
    out: list[str] = []
    for plugin in conf.plugins:
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type") == "host-local":
            base = ipam.get("dataDir") or HOST_LOCAL_DATA_DIR
            d = posixpath.join(base, conf.name)
            if d not in out:
                out.append(d)
    return out


# ---------------------------------------------------------------------------------------------
# what each plugin is given


def port_mappings_arg(port_mappings: Iterable[PortMapping]) -> list[dict[str, Any]]:
    """CRI port mappings as the ``portMappings`` capability argument. Mappings without a host
    port are dropped, as containerd does: they publish nothing."""
    out: list[dict[str, Any]] = []
    for pm in port_mappings:
        if pm.host_port <= 0:
            continue
        entry: dict[str, Any] = {
            "hostPort": pm.host_port,
            "containerPort": pm.container_port,
            "protocol": pm.protocol.name.lower(),
        }
        if pm.host_ip:
            entry["hostIP"] = pm.host_ip
        out.append(entry)
    return out


def plugin_config(
    conf: NetworkConfigList,
    index: int,
    prev_result: Mapping[str, Any] | None = None,
    capability_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The stdin object of plugin `index` (libcni's buildOneConfig): the plugin's config with
    the list's ``name`` and ``cniVersion``, ``prevResult`` when given, and a ``runtimeConfig``
    holding the `capability_args` the plugin declares in ``capabilities``.

    A new top-level dict whose nested values are shared with `conf`, `prev_result` and
    `capability_args` (a deep copy per plugin run was the largest CPU cost of building it):
    serialize it, do not mutate what is inside."""
    cfg = dict(conf.plugins[index])
    cfg["name"] = conf.name
    cfg["cniVersion"] = conf.cni_version
    if prev_result is not None:
        cfg["prevResult"] = prev_result
    caps = cfg.get("capabilities") or {}
    runtime: dict[str, Any] = {}
    for cap, value in (capability_args or {}).items():
        if caps.get(cap) is True:
            runtime[cap] = value
    if runtime:
        # Merge over what the file says, as libcni does: the runtime's values win.
        existing = cfg.get("runtimeConfig")
        merged = dict(existing) if isinstance(existing, dict) else {}
        merged.update(runtime)
        cfg["runtimeConfig"] = merged
    return cfg


def cni_args(pod_namespace: str, pod_name: str, infra_container_id: str, pod_uid: str) -> str:
    """The CNI_ARGS value the kubelet/containerd convention gives (K8S_POD_*).

    ``IgnoreUnknown=1`` first, so plugins that know none of these keys do not refuse them.
    """
    pairs = [
        ("K8S_POD_NAMESPACE", pod_namespace),
        ("K8S_POD_NAME", pod_name),
        ("K8S_POD_INFRA_CONTAINER_ID", infra_container_id),
        ("K8S_POD_UID", pod_uid),
    ]
    for key, value in pairs:
        # Plugins split CNI_ARGS on ';' then '=': either inside a value corrupts every key.
        if ";" in value or "=" in value:
            raise ValueError(f"CNI_ARGS: {key} value {value!r} may not contain ';' or '='")
    return ";".join(["IgnoreUnknown=1", *(f"{k}={v}" for k, v in pairs)])


# ---------------------------------------------------------------------------------------------
# what the plugins return


def plugin_error_message(stdout: bytes, stderr: bytes, returncode: int | None) -> str:
    """The message of a failed plugin: its JSON error on stdout (``code``, ``msg``,
    ``details``) when there is one, else its stderr or stdout text."""
    try:
        obj = json.loads(stdout)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict) and ("msg" in obj or "code" in obj):
        msg = str(obj.get("msg") or "").strip() or "no message"
        details = str(obj.get("details") or "").strip()
        text = f"{msg}: {details}" if details else msg
        code = obj.get("code")
        return f"{text} (code {code})" if code is not None else text
    for stream in (stderr, stdout):
        text = stream.decode("utf-8", "replace").strip()
        if text:
            return _tail(text)
    return f"exit status {returncode} with no error message"


def _tail(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _ip_configs(result: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    """(address in CIDR form, interface index or None) of each IP of a result of any version."""
    out: list[tuple[str, int | None]] = []
    ips = result.get("ips")
    if ips is not None:
        # 0.3.0 and later
        if not isinstance(ips, list):
            raise ValueError("CNI result: field 'ips' must be a list")
        for i, ipc in enumerate(ips):
            if not isinstance(ipc, dict) or not isinstance(ipc.get("address"), str):
                raise ValueError(f"CNI result: field 'ips[{i}].address' is missing")
            idx = ipc.get("interface")
            out.append((ipc["address"], idx if isinstance(idx, int) else None))
        return out
    # 0.1.0/0.2.0: {"ip4": {"ip": "10.1.2.3/24", ...}, "ip6": {...}}
    for key in ("ip4", "ip6"):
        block = result.get(key)
        if block is None:
            continue
        if not isinstance(block, dict) or not isinstance(block.get("ip"), str):
            raise ValueError(f"CNI result: field '{key}.ip' is missing")
        out.append((block["ip"], None))
    return out


def parse_result(
    result: Mapping[str, Any], network_name: str, ifname: str = "eth0"
) -> NetworkResult:
    """Turn the final ADD result into a NetworkResult.

    ``ip`` is the first IPv4 address (without prefix), else the first address; the others, in
    order, are ``additional_ips``. IPs whose ``interface`` points at a host-side interface (one
    without ``sandbox``) are not the pod's and are left out. Raises ValueError for a result
    that is not a CNI result.
    """
    raw_ifaces = result.get("interfaces") or []
    if not isinstance(raw_ifaces, list):
        raise ValueError("CNI result: field 'interfaces' must be a list")
    interfaces: list[NetworkInterface] = []
    in_sandbox: list[bool] = []
    for i, itf in enumerate(raw_ifaces):
        if not isinstance(itf, dict) or not isinstance(itf.get("name"), str):
            raise ValueError(f"CNI result: field 'interfaces[{i}].name' is missing")
        interfaces.append(NetworkInterface(
            name=itf["name"], mac=str(itf.get("mac") or ""),
            sandbox=str(itf.get("sandbox") or ""),
        ))
        in_sandbox.append(bool(itf.get("sandbox")))

    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for cidr, idx in _ip_configs(result):
        # An index we cannot resolve says nothing either way: keep the address.
        if idx is not None and 0 <= idx < len(in_sandbox) and not in_sandbox[idx]:
            continue
        try:
            addrs.append(ipaddress.ip_interface(cidr).ip)
        except ValueError:
            raise ValueError(f"CNI result: address {cidr!r} is not an address/prefix") from None

    first = next((i for i, a in enumerate(addrs) if a.version == 4), 0)
    rest = [str(a) for i, a in enumerate(addrs) if i != first]
    return NetworkResult(
        network_name=network_name,
        ifname=ifname,
        ip=str(addrs[first]) if addrs else "",
        additional_ips=rest,
        interfaces=interfaces,
        raw=copy.deepcopy(dict(result)),
    )


def is_host_local_reservation(filename: str) -> bool:
    """True for a host-local reservation file (named by its IP), False for its ``lock``,
    ``last_reserved_ip.*`` and anything else that happens to be in the directory."""
    if filename == "lock" or filename.startswith("last_reserved_ip."):
        return False
    try:
        ipaddress.ip_address(filename)
    except ValueError:
        return False
    return True


def reservation_owner(content: str) -> str:
    """The container id of a host-local reservation file: its first line (host-local 1.x
    writes ``<id>\\r\\n<ifname>``)."""
    first = content.splitlines()[0] if content else ""
    return first.strip()


def idle_without(plugin: Mapping[str, Any], capability_args: Mapping[str, Any]) -> bool:
    """True when running `plugin` with these capability arguments would change nothing: the
    portmap plugin acts only on its ``portMappings`` runtime config; without any it returns
    ``prevResult`` (ADD, CHECK) and touches no rule (DEL: measured, it runs no iptables). A
    pod's DEL gets the same port mappings as its ADD, so both are skipped or neither."""
    return plugin.get("type") == "portmap" and not capability_args.get("portMappings")


def capability_args_for(port_mappings: Sequence[PortMapping]) -> dict[str, Any]:
    """The capability arguments podfsm passes to plugins: only ``portMappings``, when any."""
    pms = port_mappings_arg(port_mappings)
    return {"portMappings": pms} if pms else {}


def address_families(conflist: NetworkConfigList) -> frozenset[int] | None:
    """The IP versions (4, 6) the network gives pods, read from its host-local IPAM (``subnet``
    or ``ranges``); None when it cannot tell (another IPAM, or none)."""
    families: set[int] = set()
    for plugin in conflist.plugins:
        ipam = plugin.get("ipam")
        if not isinstance(ipam, dict) or not ipam:
            continue
        if ipam.get("type") != "host-local":
            return None
        subnets = [ipam.get("subnet")]
        for range_set in ipam.get("ranges") or ():
            subnets += [r.get("subnet") for r in range_set if isinstance(r, dict)] \
                if isinstance(range_set, list) else []
        for subnet in subnets:
            if isinstance(subnet, str) and subnet:
                try:
                    families.add(ipaddress.ip_network(subnet, strict=False).version)
                except ValueError:
                    return None
    return frozenset(families) or None


def localnet_bridge(conflist: NetworkConfigList) -> str | None:
    """The host interface on which portmap sets ``route_localnet`` (so that 127.0.0.1 reaches
    a pod's host port): the bridge of a ``bridge`` plugin (default cni0) chained with a
    ``portmap`` that masquerades (``snat``, its default); None for any other network."""
    snat = any(p.get("type") == "portmap" and p.get("snat", True) is not False
               for p in conflist.plugins)
    bridge = next((p for p in conflist.plugins if p.get("type") == "bridge"), None)
    if not snat or bridge is None:
        return None
    name = bridge.get("bridge") or "cni0"
    if not isinstance(name, str) or "/" in name or name in (".", ".."):
        return None
    return name
