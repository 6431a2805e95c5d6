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
    "cgroup parent escaping": (dict(pod(), linux={"cgroup_parent": "../../../x"}),
                               "must be an absolute path"),
    "cgroup parent with ..": (dict(pod(), linux={"cgroup_parent": "/podfsm/../x"}), "'..'"),
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
    assert cfg.reserved_name == ("web", "default", "u1", 0)
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


# ------------------------------------------------- the JSON schema says what the validator does

_MAP = {"host_id": 1 << 20, "container_id": 0, "length": 65536}


def _pod(userns: Any = None, privileged: bool | None = None, sysctls: Any = None,
         ports: Any = None, **modes: Any) -> dict[str, Any]:
    ns: dict[str, Any] = dict(modes)
    if userns is not None:
        ns["userns_options"] = userns
    sc: dict[str, Any] = {"namespace_options": ns}
    if privileged is not None:
        sc["privileged"] = privileged
    linux: dict[str, Any] = {"security_context": sc}
    if sysctls is not None:
        linux["sysctls"] = sysctls
    pod: dict[str, Any] = {"metadata": {"name": "a"}, "linux": linux}
    if ports is not None:
        pod["port_mappings"] = ports
    return pod


def _schema_validator(config: Any = None) -> Any:
    import jsonschema_rs  # schemathesis' validator, so the same reading of the document

    from podfsm.faces.http.openapi import openapi_document

    doc = openapi_document(None, config)
    return jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/PodSandboxConfig", "components": doc["components"]},
        validate_formats=True)


@pytest.mark.parametrize(("pod", "accepted"), [
    (_pod(userns={}), True),
    (_pod(userns={"mode": "NODE"}), True),
    (_pod(userns={"mode": "NODE", "uids": [_MAP], "gids": [_MAP]}), False),
    (_pod(userns={"mode": 2, "gids": [_MAP]}), False),
    (_pod(userns={"mode": "CONTAINER"}), False),
    (_pod(userns={"uids": [_MAP], "gids": [_MAP]}), True),
    (_pod(userns={"mode": 0, "uids": [_MAP]}), False),
    (_pod(userns={"gids": [_MAP]}), False),
    (_pod(userns={"uids": [_MAP, _MAP], "gids": [_MAP]}), False),
    (_pod(userns={"uids": [_MAP], "gids": [{**_MAP, "container_id": 1}]}), False),
    (_pod(userns={"uids": [{**_MAP, "host_id": 0}], "gids": [_MAP]}), False),
    (_pod(userns={"uids": [_MAP], "gids": [{**_MAP, "length": 0}]}), False),
    (_pod(userns={"uids": [{**_MAP, "host_id": (1 << 32) - 2, "length": 1}], "gids": [_MAP]}),
     True),
    (_pod(network="CONTAINER"), False),
    (_pod(network="TARGET"), False),
    (_pod(pid="CONTAINER"), True),
    (_pod(pid=3), False),
    (_pod(ipc="CONTAINER"), False),
    (_pod(privileged=True), True),
    (_pod(privileged=True, userns={}), False),
    (_pod(privileged=True, userns={"mode": "POD"}), False),
    (_pod(privileged=True, userns={"mode": "NODE"}), True),
    (_pod(privileged=False, userns={}), True),
    (_pod(pid="NODE", userns={}), False),
    (_pod(ipc=2, userns={"uids": [_MAP], "gids": [_MAP]}), False),
    (_pod(pid="NODE", ipc="NODE", userns={"mode": "NODE"}), True),
    (_pod(pid="NODE", ipc="NODE"), True),
    (_pod(sysctls={"net.ipv4.ip_forward": "1", "kernel.shmmax": "1"}), True),
    (_pod(sysctls={"net.ipv4.ip_forward": "1"}, network="NODE"), False),
    (_pod(sysctls={"fs.mqueue.msg_max": "1"}, network="NODE"), True),
    (_pod(sysctls={"kernel.shmmax": "1"}, ipc="NODE"), False),
    (_pod(sysctls={"fs.mqueue.msg_max": "1"}, ipc=2), False),
    (_pod(sysctls={"net.core.somaxconn": "1"}, ipc="NODE"), True),
    (_pod(sysctls={"vm.swappiness": "1"}), False),
    (_pod(sysctls={"kernel.semx": "1"}), False),
    (_pod(sysctls={"net": "1"}), False),
    (_pod(ports=[{"host_port": 80}]), False),
    (_pod(ports=[{"host_port": 80, "container_port": 80}]), True),
    (_pod(ports=[{"host_port": 80, "container_port": 80}], network="NODE"), False),
    (_pod(ports=[{"container_port": 80}], network="NODE"), True),
])
def test_the_json_schema_states_the_namespace_rules(pod: dict[str, Any], accepted: bool) -> None:
    """Each rule of _namespaces (and _ports, _sysctls) is in the document: a client generated
    from it, or schemathesis, sends only what is accepted and learns what is refused."""
    try:
        parse_pod_config(pod)
        valid = True
    except InvalidPodConfig:
        valid = False
    assert valid is accepted
    assert _schema_validator().is_valid(pod) is accepted


def test_host_id_plus_length_is_the_rule_the_schema_cannot_state() -> None:
    # each side's bound is stated, their sum is arithmetic JSON Schema has no word for
    pod = _pod(userns={"uids": [{**_MAP, "host_id": (1 << 32) - 10, "length": 10}],
                       "gids": [_MAP]})
    with pytest.raises(InvalidPodConfig, match="runs past the last id"):
        parse_pod_config(pod)
    assert _schema_validator().is_valid(pod)


def test_the_daemons_id_pool_is_in_its_document() -> None:
    from podfsm.config import ControllerConfig

    cfg = ControllerConfig(idmap_pool_start=1 << 20, idmap_pool_size=1 << 20,
                           idmap_max_length=1 << 17)
    schema = _schema_validator(cfg)
    end = (1 << 20) + (1 << 20)
    for mapping, inside in (({**_MAP}, True), ({**_MAP, "host_id": 65536}, False),
                            ({**_MAP, "host_id": end - 1, "length": 1}, True),
                            ({**_MAP, "host_id": end}, False),
                            ({**_MAP, "length": 1 << 17}, True),
                            ({**_MAP, "length": (1 << 17) + 1}, False)):
        assert schema.is_valid(_pod(userns={"uids": [mapping], "gids": [_MAP]})) is inside, \
            mapping
    # the static document (no daemon) has only the id space's bounds
    assert _schema_validator().is_valid(_pod(userns={"uids": [{**_MAP, "host_id": 65536}],
                                                     "gids": [_MAP]}))
