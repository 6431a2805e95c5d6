"""Pure tests of podfsm.core.cniconf: selection, wrapping, plugin stdin, results, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from podfsm.core import cniconf
from podfsm.core.spec import PortMapping, Protocol


def _conflist(name: str = "net", version: str = "1.0.0", **extra: Any) -> str:
    plugins = extra.pop("plugins", [{"type": "bridge"}, {"type": "loopback"}])
    return json.dumps({"cniVersion": version, "name": name, "plugins": plugins, **extra})


# -- parsing and selection ----------------------------------------------------------------------


def test_default_conflist_is_valid_and_as_shipped() -> None:
    raw = cniconf.default_conflist("podfsm", "podfsm0", "10.209.0.0/16")
    conf = cniconf.conflist_from_dict(raw, "<default>")
    assert conf.name == "podfsm"
    assert conf.cni_version == "1.0.0"
    assert conf.plugin_types == ("bridge", "portmap", "loopback")
    assert conf.plugins[1]["capabilities"] == {"portMappings": True}
    assert conf.has_loopback
    bridge = conf.plugins[0]
    assert bridge["bridge"] == "podfsm0"
    assert bridge["isGateway"] is True
    assert bridge["ipMasq"] is False
    assert bridge["hairpinMode"] is True
    assert bridge["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.209.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    assert cniconf.required_plugins(conf) == ["bridge", "host-local", "portmap", "loopback"]
    assert cniconf.ipam_store_dirs(conf) == ["/var/lib/cni/networks/podfsm"]
    assert conf.to_dict() == raw


@pytest.mark.parametrize(
    ("name", "bridge", "subnet", "needle"),
    [
        ("podfsm", "a-bridge-name-too-long", "10.209.0.0/16", "bridge name"),
        ("podfsm", "podfsm0", "10.209.0.1/16", "subnet"),
        ("podfsm", "podfsm0", "fd00::/64", "IPv4"),
        ("../etc", "podfsm0", "10.209.0.0/16", "name"),
    ],
)
def test_default_conflist_refuses_bad_settings(
    name: str, bridge: str, subnet: str, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        cniconf.default_conflist(name, bridge, subnet)


def test_select_network_takes_first_by_sorted_name_and_ignores_other_files() -> None:
    files = {
        "99-late.conflist": _conflist("late"),
        "10-first.conflist": _conflist("first"),
        "00-readme.txt": "not a config",
        "05-backup.conflist.bak": "{",
    }
    conf = cniconf.select_network(files, "/etc/cni/net.d")
    assert conf is not None
    assert conf.name == "first"
    assert conf.source == "/etc/cni/net.d/10-first.conflist"


def test_select_network_none_when_no_config() -> None:
    assert cniconf.select_network({}) is None
    assert cniconf.select_network({"notes.md": "x"}) is None


def test_select_network_reports_a_broken_first_file() -> None:
    files = {"10-bad.conflist": "{nope", "20-good.conflist": _conflist("good")}
    with pytest.raises(ValueError, match=r"/d/10-bad\.conflist: not valid JSON"):
        cniconf.select_network(files, "/d")


@pytest.mark.parametrize("ext", [".conf", ".json"])
def test_single_plugin_conf_is_wrapped_into_a_list(ext: str) -> None:
    plugin = {
        "cniVersion": "0.4.0", "name": "single", "type": "bridge", "bridge": "br9",
        "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"},
    }
    conf = cniconf.select_network({f"10-x{ext}": json.dumps(plugin)})
    assert conf is not None
    assert conf.name == "single"
    assert conf.cni_version == "0.4.0"
    assert conf.plugin_types == ("bridge",)
    assert conf.plugins[0] == plugin  # kept whole, plugin-specific keys included
    assert not conf.has_loopback


def test_conf_sorted_before_conflist_is_chosen() -> None:
    files = {
        "10-a.conflist": _conflist("list"),
        "05-z.conf": json.dumps({"cniVersion": "1.0.0", "name": "conf", "type": "ptp"}),
    }
    conf = cniconf.select_network(files)
    assert conf is not None and conf.name == "conf"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[]", "must be a JSON object"),
        (json.dumps({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}), "'name' is required"),
        (_conflist("bad/name"), "'name' = 'bad/name' is not a valid network name"),
        (json.dumps({"name": "n", "plugins": [{"type": "x"}]}), "'cniVersion' is required"),
        (_conflist(version="1.0"), "'cniVersion' = '1.0' is not a version"),
        (_conflist(plugins=[]), "'plugins' is required and must be a non-empty list"),
        (_conflist(plugins={"type": "x"}), "'plugins' is required"),
        (_conflist(plugins=[{"type": "bridge"}, {"bridge": "x"}]), r"'plugins\[1\]\.type'"),
        (_conflist(plugins=[{"type": "../../bin/sh"}]), r"'plugins\[0\]\.type' = '\.\./"),
        (_conflist(plugins=[3]), r"plugins\[0\] must be a JSON object"),
        (_conflist(plugins=[{"type": "b", "ipam": []}]), r"'plugins\[0\]\.ipam' must be"),
        (
            _conflist(plugins=[{"type": "b", "ipam": {"type": "host-local", "dataDir": "x"}}]),
            r"'plugins\[0\]\.ipam\.dataDir' must be an absolute path",
        ),
        (
            _conflist(plugins=[{"type": "b", "capabilities": {"portMappings": "yes"}}]),
            r"'plugins\[0\]\.capabilities'",
        ),
        (_conflist(disableCheck="no"), "'disableCheck' must be true or false"),
    ],
)
def test_bad_conflist_errors_name_file_and_field(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        cniconf.parse_network_file("/etc/cni/net.d/10-x.conflist", text)
    assert str(err.value).startswith("/etc/cni/net.d/10-x.conflist: ")


def test_bad_conf_errors_name_the_plain_field() -> None:
    with pytest.raises(ValueError, match=r"10-x\.conf: field 'type' is required"):
        cniconf.parse_network_file("10-x.conf", json.dumps({"cniVersion": "1.0.0", "name": "n"}))
    with pytest.raises(ValueError, match="name the file"):
        cniconf.parse_network_file("10-x.conf", _conflist())


def test_disable_check_and_versions() -> None:
    conf = cniconf.parse_conflist(_conflist(disableCheck=True), "f")
    assert conf.disable_check
    assert cniconf.supports_check("0.4.0") and cniconf.supports_check("1.0.0")
    assert not cniconf.supports_check("0.3.1")
    assert not cniconf.passes_prev_result_on_del("0.3.0")


def test_loopback_conflist_and_store_dirs_with_data_dir() -> None:
    lo = cniconf.loopback_conflist()
    assert lo.plugin_types == ("loopback",)
    assert cniconf.ipam_store_dirs(lo) == []
    conf = cniconf.parse_conflist(_conflist("n1", plugins=[
        {"type": "bridge", "ipam": {"type": "host-local", "dataDir": "/srv/ipam"}},
        {"type": "portmap"},
    ]), "f")
    assert cniconf.ipam_store_dirs(conf) == ["/srv/ipam/n1"]
    assert cniconf.required_plugins(conf) == ["bridge", "host-local", "portmap"]


# -- plugin stdin -------------------------------------------------------------------------------


def test_plugin_config_injects_name_version_and_chains_prev_result() -> None:
    conf = cniconf.parse_conflist(_conflist("chain", plugins=[
        {"type": "bridge", "cniVersion": "0.3.1", "name": "other"},
        {"type": "loopback"},
    ]), "f")
    first = cniconf.plugin_config(conf, 0)
    assert first == {"type": "bridge", "cniVersion": "1.0.0", "name": "chain"}
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]}
    second = cniconf.plugin_config(conf, 1, prev_result=prev)
    assert second["prevResult"] == prev
    assert second["name"] == "chain"
    # the stored config is never changed by building stdin
    assert conf.plugins[0]["cniVersion"] == "0.3.1"
    assert conf.plugins[0]["name"] == "other" and "prevResult" not in conf.plugins[1]


def test_runtime_config_only_for_declared_capabilities() -> None:
    conf = cniconf.parse_conflist(_conflist(plugins=[
        {"type": "bridge"},
        {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False},
         "runtimeConfig": {"other": 1}},
    ]), "f")
    pms = [
        PortMapping(protocol=Protocol.UDP, container_port=53, host_port=5353, host_ip="127.0.0.1"),
        PortMapping(container_port=80, host_port=8080),
        PortMapping(container_port=9000),  # no host port: publishes nothing
    ]
    caps = cniconf.capability_args_for(pms)
    assert caps == {"portMappings": [
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
    ]}
    caps["bandwidth"] = {"ingressRate": 1}
    assert "runtimeConfig" not in cniconf.plugin_config(conf, 0, capability_args=caps)
    rc = cniconf.plugin_config(conf, 1, capability_args=caps)["runtimeConfig"]
    assert rc == {"other": 1, "portMappings": caps["portMappings"]}
    assert cniconf.capability_args_for([PortMapping(container_port=1)]) == {}


def test_cni_args() -> None:
    assert cniconf.cni_args("default", "web", "abc", "u-1") == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
        "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
    )
    with pytest.raises(ValueError, match="K8S_POD_NAME"):
        cniconf.cni_args("ns", "a;b", "id", "")


# -- results and errors -------------------------------------------------------------------------


def test_parse_result_v1_takes_first_ipv4_and_skips_host_side_ips() -> None:
    raw = {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "br0", "mac": "aa:aa:aa:aa:aa:aa"},
            {"name": "veth1", "mac": "bb:bb:bb:bb:bb:bb"},
            {"name": "eth0", "mac": "cc:cc:cc:cc:cc:cc", "sandbox": "/run/netns/x"},
        ],
        "ips": [
            {"interface": 2, "address": "fd00::5/64"},
            {"interface": 0, "address": "10.9.0.1/24"},  # host side: not the pod's
            {"interface": 2, "address": "10.9.0.5/24", "gateway": "10.9.0.1"},
            {"interface": 2, "address": "10.9.1.5/24"},
        ],
    }
    res = cniconf.parse_result(raw, "net", "eth0")
    assert res.ip == "10.9.0.5"
    assert res.additional_ips == ["fd00::5", "10.9.1.5"]
    assert [i.name for i in res.interfaces] == ["br0", "veth1", "eth0"]
    assert res.interfaces[2].sandbox == "/run/netns/x"
    assert res.interfaces[2].mac == "cc:cc:cc:cc:cc:cc"
    assert res.network_name == "net" and res.ifname == "eth0"
    assert res.raw == raw


def test_parse_result_ipv6_only_and_empty_and_old_versions() -> None:
    res = cniconf.parse_result({"ips": [{"address": "fd00::7/64"}]}, "n")
    assert res.ip == "fd00::7" and res.additional_ips == []
    empty = cniconf.parse_result({"cniVersion": "1.0.0"}, "n")
    assert empty.ip == "" and empty.additional_ips == [] and empty.interfaces == []
    old = cniconf.parse_result(
        {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.9/16"}, "ip6": {"ip": "fd00::9/64"}}, "n"
    )
    assert old.ip == "10.1.0.9" and old.additional_ips == ["fd00::9"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"ips": "10.0.0.1/24"}, "'ips' must be a list"),
        ({"ips": [{"gateway": "10.0.0.1"}]}, r"'ips\[0\]\.address' is missing"),
        ({"ips": [{"address": "not-an-ip"}]}, "is not an address/prefix"),
        ({"interfaces": [{"mac": "x"}]}, r"'interfaces\[0\]\.name' is missing"),
        ({"ip4": {"gateway": "x"}}, "'ip4.ip' is missing"),
    ],
)
def test_parse_result_refuses_garbage(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        cniconf.parse_result(raw, "n")


def test_plugin_error_message_forms() -> None:
    js = json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "failed", "details": "why"})
    assert cniconf.plugin_error_message(js.encode(), b"", 1) == "failed: why (code 11)"
    js = json.dumps({"code": 7, "msg": "no details"})
    assert cniconf.plugin_error_message(js.encode(), b"noise", 1) == "no details (code 7)"
    assert cniconf.plugin_error_message(b"", b"panic: boom\n", 2) == "panic: boom"
    assert cniconf.plugin_error_message(b"plain text", b"", 1) == "plain text"
    assert "exit status 3" in cniconf.plugin_error_message(b"", b"", 3)
    assert len(cniconf.plugin_error_message(b"", b"x" * 10000, 1)) < 2100


def test_host_local_store_helpers() -> None:
    assert cniconf.is_host_local_reservation("10.9.0.5")
    assert cniconf.is_host_local_reservation("fd00::5")
    for name in ("lock", "last_reserved_ip.0", ".10.9.0.5.swp", "README"):
        assert not cniconf.is_host_local_reservation(name)
    assert cniconf.reservation_owner("abc123\r\neth0") == "abc123"
    assert cniconf.reservation_owner("abc123") == "abc123"
    assert cniconf.reservation_owner("") == ""


def test_undecodable_file_is_named() -> None:
    with pytest.raises(ValueError, match=r"^/d/10-a\.conf: not valid JSON"):
        cniconf.select_network({"10-a.conf": b'{"name": "\xff"}'}, "/d")


def test_port_mappings_reach_portmap_as_runtime_config_and_not_other_plugins() -> None:
    conf = cniconf.conflist_from_dict(
        cniconf.default_conflist("podfsm", "podfsm0", "10.209.0.0/16"), "<default>")
    pms = [PortMapping(protocol="UDP", container_port=53, host_port=5353, host_ip="192.0.2.7"),
           PortMapping(container_port=80, host_port=8080),
           PortMapping(protocol=2, container_port=9, host_port=9999),
           PortMapping(container_port=81)]
    args = cniconf.capability_args_for(pms)
    bridge, portmap, _ = (cniconf.plugin_config(conf, i, None, args)
                          for i in range(len(conf.plugins)))
    assert "runtimeConfig" not in bridge
    assert portmap["runtimeConfig"] == {"portMappings": [
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.0.2.7"},
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 9999, "containerPort": 9, "protocol": "sctp"}]}


def test_portmap_is_idle_without_port_mappings_and_nothing_else_is() -> None:
    portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
    assert cniconf.idle_without(portmap, {})
    assert cniconf.idle_without(portmap, cniconf.capability_args_for([PortMapping(
        container_port=80)]))  # no host port: nothing to publish
    assert not cniconf.idle_without(portmap, cniconf.capability_args_for([PortMapping(
        container_port=80, host_port=8080)]))
    assert not cniconf.idle_without({"type": "bridge"}, {})


@pytest.mark.parametrize(("plugins", "families", "bridge"), [
    ([{"type": "bridge", "bridge": "br9", "ipam": {"type": "host-local",
                                                  "ranges": [[{"subnet": "10.1.0.0/24"}]]}},
      {"type": "portmap", "capabilities": {"portMappings": True}}], {4}, "br9"),
    ([{"type": "bridge", "ipam": {"type": "host-local", "subnet": "fd00::/64"}},
      {"type": "portmap", "snat": False}], {6}, None),
    ([{"type": "bridge", "ipam": {"type": "host-local", "ranges": [
        [{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]]}},
      {"type": "portmap"}], {4, 6}, "cni0"),
    ([{"type": "ptp", "ipam": {"type": "dhcp"}}, {"type": "portmap"}], None, None),
])
def test_the_families_and_the_bridge_portmap_sets_route_localnet_on(
        plugins: list[dict[str, Any]], families: set[int] | None, bridge: str | None) -> None:
    conf = cniconf.conflist_from_dict({"cniVersion": "1.0.0", "name": "n",
                                       "plugins": plugins}, "x")
    assert cniconf.address_families(conf) == (frozenset(families) if families else None)
    assert cniconf.localnet_bridge(conf) == bridge
