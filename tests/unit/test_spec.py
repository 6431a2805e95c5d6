"""The pod config: what crictl accepts is accepted, every refusal names the problem."""

from __future__ import annotations

from typing import Any

import pytest

from podfsm.core.errors import InvalidPodConfig
from podfsm.core.spec import NamespaceMode, PodSandboxConfig, parse_pod_config


def pod(userns: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"metadata": {"name": "web", "namespace": "default", "uid": "u1"}}
    if userns is not None:
        d["linux"] = {"security_context": {"namespace_options": {"userns_options": userns}}}
    d.update(extra)
    return d


ONE = [{"host_id": 1000, "container_id": 0, "length": 100000}]


def test_snake_case_config_with_pod_userns_and_mappings() -> None:
    cfg = parse_pod_config(pod({"mode": "POD", "uids": ONE, "gids": ONE}))
    assert cfg.pod_userns and cfg.pod_netns
    assert cfg.requested_uid_mapping is not None
    assert cfg.requested_uid_mapping.line() == "0 1000 100000"


def test_lower_camel_case_keys_and_enum_numbers_are_accepted() -> None:
    data = {
        "metadata": {"name": "web", "namespace": "ns1", "attempt": 2},
        "portMappings": [{"protocol": 1, "containerPort": 53, "hostPort": 5353}],
        "linux": {"securityContext": {"namespaceOptions": {
            "network": 0,
            "usernsOptions": {"mode": 0, "uids": [{"hostId": 200000, "containerId": 0,
                                                    "length": 65536}],
                              "gids": [{"hostId": 200000, "containerId": 0, "length": 65536}]},
        }}},
    }
    cfg = parse_pod_config(data)
    assert cfg.metadata.attempt == 2
    assert cfg.port_mappings[0].host_port == 5353
    assert cfg.pod_userns
    assert cfg.requested_gid_mapping is not None and cfg.requested_gid_mapping.host_id == 200000


def test_mode_node_means_host_user_namespace() -> None:
    cfg = parse_pod_config(pod({"mode": "NODE"}))
    assert not cfg.pod_userns


def test_no_userns_options_means_host_user_namespace() -> None:
    assert not parse_pod_config(pod()).pod_userns


def test_pod_mode_without_mappings_asks_for_allocation() -> None:
    cfg = parse_pod_config(pod({"mode": "POD"}))
    assert cfg.pod_userns and cfg.requested_uid_mapping is None


def test_host_network_has_no_pod_netns() -> None:
    d = pod()
    d["linux"] = {"security_context": {"namespace_options": {"network": "NODE"}}}
    assert not parse_pod_config(d).pod_netns


REFUSALS = {
    "two mappings": (pod({"mode": "POD", "uids": ONE * 2, "gids": ONE}), "exactly one"),
    "container id not 0": (
        pod({"mode": "POD", "uids": [{"host_id": 1000, "container_id": 1, "length": 10}],
             "gids": ONE}), "container_id must be 0"),
    "length 0": (pod({"mode": "POD", "uids": [{"host_id": 1000, "container_id": 0,
                                               "length": 0}], "gids": ONE}), "length"),
    "mode CONTAINER": (pod({"mode": "CONTAINER"}), "CONTAINER is not supported"),
    "mode TARGET": (pod({"mode": 3}), "TARGET is not supported"),
    "uids without gids": (pod({"mode": "POD", "uids": ONE}), "both uids and gids"),
    "host root mapped": (pod({"mode": "POD", "uids": [{"host_id": 0, "container_id": 0,
                                                       "length": 10}], "gids": ONE}), "root"),
    "bad name": ({"metadata": {"name": "tab\there"}}, "control"),
    "name with =": ({"metadata": {"name": "a=b"}}, "CNI_ARGS"),
    "empty name": ({"metadata": {"name": ""}}, "must not be empty"),
    "no metadata": ({}, "metadata"),
    "bad namespace": ({"metadata": {"name": "a", "namespace": "x;y"}}, "metadata.namespace"),
    "name too long": ({"metadata": {"name": "n" * 254}}, "longer than 253"),
    "unknown mode name": (pod({"mode": "HOST"}), "unknown NamespaceMode"),
    "mapping past the id space": (pod({"mode": "POD", "uids": [
        {"host_id": 4294967000, "container_id": 0, "length": 1000}], "gids": ONE}), "past"),
    "not an object": ([1, 2], "JSON object"),
    "mapping of id 4294967295": (pod({"mode": "POD", "uids": [
        {"host_id": 4294967295, "container_id": 0, "length": 1}], "gids": ONE}), "past"),
    "host sysctl": (dict(pod(), linux={"sysctls": {"kernel.nope": "1"}}), "not namespaced"),
    "empty sysctl": (dict(pod(), linux={"sysctls": {"": ""}}), "not a sysctl name"),
    "cgroup parent escaping": (dict(pod(), linux={"cgroup_parent": "../../../x"}), "'..'"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_problem(case: str) -> None:
    data, words = REFUSALS[case]
    with pytest.raises(InvalidPodConfig) as info:
        parse_pod_config(data)
    assert words in str(info.value)


def test_mode_numbers_map_to_cri_enum() -> None:
    assert [m.name for m in NamespaceMode] == ["POD", "CONTAINER", "NODE", "TARGET"]


def test_model_validate_is_the_library_entry_point() -> None:
    cfg = PodSandboxConfig.model_validate(pod({"mode": "POD"}))
    assert cfg.reserved_name == "web_default_u1_0"
    assert cfg.effective_hostname == "web"


def test_namespaced_sysctls_and_a_cgroup_parent_are_accepted() -> None:
    cfg = parse_pod_config(dict(pod(), linux={
        "cgroup_parent": "/kubepods/besteffort",
        "sysctls": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "1024"}}))
    assert cfg.linux.sysctls["kernel.shmmax"] == "1024"


def test_critest_names_are_accepted_and_give_a_dns_label_hostname() -> None:
    name = "PodSandbox-for-create-test-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
    cfg = parse_pod_config({"metadata": {"name": name, "namespace": "cri-test-Namespace"}})
    assert cfg.metadata.name == name
    assert cfg.effective_hostname == name.lower()[:63].strip("-")
    unicode = parse_pod_config({"metadata": {"name": "Ünïcode pod"}})
    assert unicode.effective_hostname == "n-code-pod"
