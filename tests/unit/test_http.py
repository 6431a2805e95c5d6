"""The HTTP shim on a real uvicorn server on a unix socket, over a Controller with the fake
drivers: every endpoint and error status, the event stream and its resumption, the socket's
mode, no TCP unless asked, graceful shutdown that leaves sandboxes running, and a fuzz of the API
from its OpenAPI document. No root needed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.routing import Route

from podfsm import Controller, ControllerConfig, PrerequisiteMissing, SandboxStatus
from podfsm.core.records import TransitionEvent
from podfsm.core.spec import NamespaceMode, PodSandboxConfig, Protocol
from podfsm.faces import graph
from podfsm.faces.http import (
    PAGE,
    TOKEN_FILE,
    Daemon,
    DaemonError,
    ErrorBody,
    Health,
    SandboxList,
    Shim,
    create_app,
    openapi_document,
)
from podfsm.faces.http import events as http_events
from podfsm.faces.http.openapi import ALLOWED
from tests.fakes import FakeNamespaces, Rig


class Served:
    """`podfsm serve` (the real Daemon) over the fakes, in a thread with its own event loop."""

    def __init__(self, rig: Rig, sock_dir: str, *, port: int | None = None) -> None:
        self.rig = rig
        self.ctl = rig.controller()
        self.socket = os.path.join(sock_dir, "podfsm.sock")
        self.daemon = Daemon(rig.cfg, self.socket, port=port, controller=self.ctl,
                             heartbeat=0.2, graceful_timeout=5)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="podfsm-serve", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self.daemon.run())
        except BaseException as exc:
            self.error = exc

    def start(self) -> Served:
        self._thread.start()
        assert self.daemon.listening.wait(10), self.error
        with self.client() as c:
            deadline = time.monotonic() + 10
            while c.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        return self

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket),
                            base_url="http://podfsm", timeout=timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, *, cleanup: bool = True) -> None:
        """Remove every sandbox through the API (unless told not to), then shut the daemon
        down."""
        if cleanup and self.running:
            self.rig.faults.fail.clear()
            self.ctl.recovering = False
            with self.client() as c:
                for item in c.get("/v1/sandboxes").json()["items"]:
                    assert c.delete(f"/v1/sandboxes/{item['id']}").status_code == 204
        self.daemon.request_exit()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the daemon did not shut down"
        if self.error is not None:
            raise self.error


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


def pod(name: str = "web", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"},
            "linux": {"security_context": {"namespace_options": {
                "userns_options": {"mode": "POD"}}}}, **extra}


def error_of(resp: httpx.Response) -> ErrorBody:
    assert resp.headers["content-type"] == "application/json"
    return ErrorBody.model_validate_json(resp.content)


# ---------------------------------------------------------------------- sandboxes

def test_run_get_list_stop_remove(client: httpx.Client, served: Served) -> None:
    resp = client.post("/v1/sandboxes", json=pod())
    assert resp.status_code == 201
    st = SandboxStatus.model_validate_json(resp.content)
    assert st.state == "Ready" and st.name == "web" and st.ip == "10.99.0.2"
    assert resp.headers["location"] == f"/v1/sandboxes/{st.id}"
    assert [h.dest for h in st.history] == ["NamespacesReady", "ContainerCreated",
                                            "TaskRunning", "Ready"]

    listed = SandboxList.model_validate_json(client.get("/v1/sandboxes").content)
    assert [s.id for s in listed.items] == [st.id]
    assert listed.last_event_seq == served.ctl.last_event_seq == 4

    got = client.get(f"/v1/sandboxes/{st.id}")
    assert got.status_code == 200
    assert SandboxStatus.model_validate_json(got.content) == st

    stopped = client.post(f"/v1/sandboxes/{st.id}/stop")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "NotReady"
    assert client.post(f"/v1/sandboxes/{st.id}/stop").json()["state"] == "NotReady"

    assert client.delete(f"/v1/sandboxes/{st.id}").status_code == 204
    assert client.get("/v1/sandboxes").json()["items"] == []


def test_inspect_json_carries_the_design_fields(client: httpx.Client) -> None:
    body = client.post("/v1/sandboxes", json=pod()).json()
    for key in ("id", "name", "namespace", "uid", "state", "created_at", "pid", "netns_path",
                "userns_path", "ip", "additional_ips", "uid_mappings", "gid_mappings",
                "exit_status", "history"):
        assert key in body, key
    assert set(body["history"][0]) == {"source", "dest", "trigger", "at", "error"}


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/sandboxes/{}"), ("GET", "/v1/sandboxes/{}/graph"),
])
def test_an_unknown_sandbox_is_404(client: httpx.Client, method: str, path: str) -> None:
    resp = client.request(method, path.format("f" * 64))
    assert resp.status_code == 404
    err = error_of(resp)
    assert err.kind == "SandboxNotFound"
    assert "f" * 64 in err.error


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/sandboxes/{}/stop"), ("DELETE", "/v1/sandboxes/{}"),
])
def test_stopping_or_removing_an_unknown_sandbox_succeeds(
    client: httpx.Client, method: str, path: str,
) -> None:
    # as the CRI's StopPodSandbox and RemovePodSandbox (and crictl stopp/rmp): idempotent
    resp = client.request(method, path.format("f" * 64))
    assert resp.status_code == 204 and resp.content == b""


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/sandboxes/{}"), ("POST", "/v1/sandboxes/{}/stop"),
    ("DELETE", "/v1/sandboxes/{}"), ("GET", "/v1/sandboxes/{}/graph"),
])
@pytest.mark.parametrize("bad", ["x", "F" * 64, "f" * 63, "f" * 65])
def test_a_malformed_sandbox_id_is_400(client: httpx.Client, method: str, path: str,
                                       bad: str) -> None:
    resp = client.request(method, path.format(bad))
    assert resp.status_code == 400
    assert "64 lower-case hex digits" in error_of(resp).error


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_pod_config_that_is_not_application_json_is_415(
    client: httpx.Client, rig: Rig, content_type: str | None,
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    resp = client.post("/v1/sandboxes", content=json.dumps(pod()), headers=headers)
    assert resp.status_code == 415
    assert error_of(resp).kind == "UnsupportedMediaType"
    assert rig.store.records == {}
    # a body on stop must be JSON too; no body needs no type
    resp = client.post(f"/v1/sandboxes/{'f' * 64}/stop", content=b"x", headers=headers)
    assert resp.status_code == 415


def test_a_reserved_name_is_409(client: httpx.Client) -> None:
    first = client.post("/v1/sandboxes", json=pod()).json()
    resp = client.post("/v1/sandboxes", json=pod())
    assert resp.status_code == 409
    err = error_of(resp)
    assert err.kind == "NameReserved" and first["id"] in err.error
    # another attempt of the same pod is another name
    assert client.post("/v1/sandboxes", json={**pod(), "metadata": {
        "name": "web", "namespace": "default", "attempt": 1}}).status_code == 201


def test_host_ids_in_use_are_409(client: httpx.Client) -> None:
    # a conflict with the sandboxes that exist, as a name in use is: the same request is
    # fine once the other sandbox is gone
    ids = {"host_id": 1 << 21, "container_id": 0, "length": 65536}
    mapped = {"security_context": {"namespace_options": {"userns_options": {
        "mode": "POD", "uids": [ids], "gids": [ids]}}}}
    first = client.post("/v1/sandboxes", json=pod("first", linux=mapped)).json()
    resp = client.post("/v1/sandboxes", json=pod("second", linux=mapped))
    assert resp.status_code == 409
    err = error_of(resp)
    assert err.kind == "IdRangeUnavailable" and "overlap another sandbox's" in err.error
    assert client.delete(f"/v1/sandboxes/{first['id']}").status_code == 204
    assert client.post("/v1/sandboxes", json=pod("second", linux=mapped)).status_code == 201


def _field_schema(doc: dict[str, Any], model: str, field: str) -> dict[str, Any]:
    schema: dict[str, Any] = doc["components"]["schemas"][model]["properties"][field]
    return schema


@pytest.mark.parametrize("value", [
    "", "/", "///", "/podfsm", "/podfsm/", "/podfsm/a/b", "/podfsm//a", "/podfsm/.",
    "/podfsm/...", "/podfsm/..a", "/podfsm/a b", "/podfsm/" + "x" * 255,
    "/podfsm/..", "/podfsm/../x", "/podfsm/a/../b", "/podfsmx", "/pod", "podfsm", "//podfsm",
    "/other/podfsm", "/podfsm/" + "x" * 256, "/podfsm/a\nb",
])
def test_the_documented_cgroup_parent_is_what_the_daemon_takes(
        client: httpx.Client, value: str) -> None:
    # the pattern comes from the daemon's cgroup_root: what it matches is run, the rest 422
    prop = _field_schema(client.get("/openapi.json").json(), "LinuxPodSandboxConfig",
                         "cgroup_parent")
    documented = re.fullmatch(prop["pattern"].removesuffix("$"), value) is not None
    resp = client.post("/v1/sandboxes", json=pod(linux={"cgroup_parent": value}))
    assert resp.status_code == (201 if documented else 422), (value, resp.text)


@pytest.mark.parametrize("tail", [
    "/a", "/a/", "//a//b", "/.", "/...", "/..a", "/a/" + "x" * 255,
    "/..", "/a/..", "/a/../b", "/a/" + "x" * 256,
])
def test_the_documented_log_directory_is_what_the_daemon_takes(
        client: httpx.Client, tmp_path: Path, tail: str) -> None:
    prop = _field_schema(client.get("/openapi.json").json(), "PodSandboxConfig",
                         "log_directory")
    value = f"{tmp_path}{tail}"
    documented = re.fullmatch(prop["pattern"].removesuffix("$"), value) is not None
    resp = client.post("/v1/sandboxes", json=pod(log_directory=value))
    assert resp.status_code == (201 if documented else 422), (value, resp.text)
    for root_only in ("/", "//"):
        assert re.fullmatch(prop["pattern"].removesuffix("$"), root_only) is None


def test_the_document_states_what_the_models_only_check() -> None:
    doc = json.dumps(openapi_document())
    # a map's key pattern refuses a key; pydantic's patternProperties would let it be anything
    assert "patternProperties" not in doc
    schemas = openapi_document()["components"]["schemas"]
    labels = _field_schema(openapi_document(), "PodSandboxConfig", "labels")
    assert labels["propertyNames"]["pattern"] and labels["additionalProperties"]["type"] == \
        "string"
    servers = _field_schema(openapi_document(), "DNSConfig", "servers")["items"]
    assert {s["format"] for s in servers["anyOf"]} == {"ipv4", "ipv6"}
    # names: the planes above the BMP are written as characters, which ECMA-262 reads
    name = schemas["PodSandboxMetadata"]["properties"]["name"]["pattern"]
    assert "\U000e0001" in name and "\\U" not in name
    # the rules the schema cannot state are said in words
    sc = schemas["LinuxSandboxSecurityContext"]["properties"]
    assert "mapping" in sc["run_as_user"]["description"]
    assert "exist" in schemas["LinuxPodSandboxConfig"]["properties"]["sysctls"]["description"]
    assert "409" in schemas["UserNamespace"]["properties"]["uids"]["description"]


def test_the_schemathesis_hooks_repair_what_the_schema_cannot_state(
        client: httpx.Client) -> None:
    # tests/integration/schemathesis_hooks.py keeps generated configs to the rules the
    # document says in words; what it makes of a config that breaks each of them is run
    from tests.integration.schemathesis_hooks import SECCOMP_PROFILE, repair_pod_config

    pool_end = ControllerConfig().idmap_pool_start + ControllerConfig().idmap_pool_size
    near_end = {"host_id": pool_end - 10, "container_id": 0, "length": 65536}
    body = pod(log_directory="/x/" + "\u00e9" * 200, port_mappings=[
        {"container_port": 80, "host_port": 8080}, {"container_port": 81, "host_port": 8080,
                                                     "protocol": 0}], linux={
        "sysctls": {"net.nope": "?", "kernel.msgmax": "?", "net.ipv4.ping_group_range": "?"},
        "cgroup_parent": "/podfsm/" + "\u00e9" * 200,
        "security_context": {
            "run_as_user": {"value": 70000}, "run_as_group": {"value": 123456},
            "supplemental_groups": [5, 99999], "seccomp": {
                "profile_type": "Localhost", "localhost_ref": "/nonexistent/profile.json"},
            "namespace_options": {"userns_options": {
                "mode": "POD", "uids": [near_end], "gids": [dict(near_end)]}}}})
    assert client.post("/v1/sandboxes", json=body).status_code == 422
    repair_pod_config(body, pool_end)
    sc = body["linux"]["security_context"]
    assert sc["seccomp"]["localhost_ref"] == SECCOMP_PROFILE
    # a sysctl this host's pods have, at the value a pod starts with; one naming ids dropped
    assert list(body["linux"]["sysctls"]) == ["kernel.msgmax"]
    assert body["linux"]["sysctls"]["kernel.msgmax"].isdigit()
    assert body["port_mappings"] == [{"container_port": 80, "host_port": 8080}]
    assert sc["run_as_user"]["value"] < 10 and sc["supplemental_groups"] == [5, 99999 % 10]
    resp = client.post("/v1/sandboxes", json=body)
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize(("server", "ok"), [
    ("10.0.0.1", True), ("::1", True), ("2001:db8::53", True),
    ("fe80::1%eth0", False), ("010.0.0.1", False), ("1.2.3", False), ("::g", False),
])
def test_dns_servers_are_addresses(client: httpx.Client, server: str, ok: bool) -> None:
    resp = client.post("/v1/sandboxes", json=pod(dns_config={"servers": [server]}))
    assert resp.status_code == (201 if ok else 422), resp.text


@pytest.mark.parametrize(("body", "says"), [
    (b"{not json", "not a JSON pod config"),
    (b"", "not a JSON pod config"),
    (b"\xff\xfe", "not a JSON pod config"),
    (b"[" * 100_000, "not a JSON pod config"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "metadata"),
    (json.dumps({"metadata": {"name": "semi;colon"}}).encode(), "CNI_ARGS"),
    (json.dumps(pod(linux={"security_context": {"namespace_options": {
        "userns_options": {"mode": "CONTAINER"}}}})).encode(), "CONTAINER is not supported"),
    (json.dumps(pod(linux={"security_context": {"namespace_options": {"userns_options": {
        "mode": "POD", "uids": [{"host_id": 100000, "container_id": 1, "length": 10}],
        "gids": [{"host_id": 100000, "container_id": 0, "length": 10}]}}}})).encode(),
     "container_id must be 0"),
    (b'{"metadata": {"name": "web"}, "labels": {"a": "\\ud800"}}', "labels.a"),
    (json.dumps({"metadata": {"name": "web"}, "hostnme": "x"}).encode(), "unknown field"),
    (json.dumps({"metadata": {"name": "web\n"}}).encode(), "metadata.name"),
])
def test_an_invalid_pod_config_is_422_and_creates_nothing(
    client: httpx.Client, rig: Rig, body: bytes, says: str,
) -> None:
    resp = client.post("/v1/sandboxes", content=body,
                       headers={"content-type": "application/json"})
    assert resp.status_code == 422
    err = error_of(resp)
    assert err.kind == "InvalidPodConfig"
    assert says in err.error
    assert rig.store.records == {} and rig.ns.pinned == set()


def test_a_body_over_a_mebibyte_is_413(client: httpx.Client) -> None:
    resp = client.post("/v1/sandboxes", content=b" " * ((1 << 20) + 1),
                       headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert error_of(resp).kind == "PayloadTooLarge"


def test_a_failed_run_is_500_naming_the_step_and_leaves_nothing(
    client: httpx.Client, rig: Rig,
) -> None:
    rig.faults.fail.add("runtime.start")
    resp = client.post("/v1/sandboxes", json=pod())
    assert resp.status_code == 500
    err = error_of(resp)
    assert err.kind == "SandboxRunError" and err.step == "start_task"
    assert "everything done was unwound" in err.error and err.leftovers == []
    assert client.get("/v1/sandboxes").json()["items"] == []


def test_a_run_whose_unwinding_fails_stays_listed_and_its_diagram_shows_the_path(
    client: httpx.Client, rig: Rig,
) -> None:
    # the pause task dies at start, so the ready check fails; undoing the create fails too
    rig.faults.fail.update({"runtime.start.dies", "runtime.delete"})
    resp = client.post("/v1/sandboxes", json=pod())
    assert resp.status_code == 500
    err = error_of(resp)
    assert err.step == "mark_ready" and any("runtime delete" in x for x in err.leftovers)
    (item,) = client.get("/v1/sandboxes").json()["items"]
    assert item["state"] == "NotReady" and item["leftovers"]
    mmd = client.get(f"/v1/sandboxes/{item['id']}/graph", params={"format": "mmd"}).text
    assert "ContainerCreated --> TaskRunning : start_task (3)" in mmd
    assert "TaskRunning --> ContainerCreated : kill_task (4 error)" in mmd
    assert "ContainerCreated --> NotReady : fail (5 error) / stop" in mmd
    assert "class NotReady current" in mmd
    rig.faults.fail.clear()
    assert client.delete(f"/v1/sandboxes/{item['id']}").status_code == 204


# ---------------------------------------------------------------------- availability

def test_503_while_recovering(client: httpx.Client, served: Served) -> None:
    served.ctl.recovering = True
    try:
        for method, path in [("GET", "/v1/sandboxes"), ("POST", "/v1/sandboxes"),
                             ("GET", "/v1/sandboxes/x"), ("POST", "/v1/sandboxes/x/stop"),
                             ("DELETE", "/v1/sandboxes/x"), ("GET", "/v1/sandboxes/x/graph"),
                             ("GET", "/v1/events")]:
            resp = client.request(method, path, json=pod() if method == "POST" else None)
            assert resp.status_code == 503, path
            assert error_of(resp).kind == "ServiceUnavailable"
            assert resp.headers["retry-after"] == "1"
        health = client.get("/healthz")
        assert health.status_code == 503
        assert Health.model_validate_json(health.content).status == "recovering"
        assert client.get("/v1/graph").status_code == 200  # needs no controller
        assert client.get("/").status_code == 200
    finally:
        served.ctl.recovering = False
    assert client.get("/v1/sandboxes").status_code == 200
    # unauthenticated on TCP: it says nothing but the status (recovery problems are logged)
    assert client.get("/healthz").json() == {"status": "ok"}


async def test_503_while_the_controller_is_starting(rig: Rig) -> None:
    shim = Shim(rig.controller(), ready=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(shim.app),
                                 base_url="http://podfsm") as c:
        resp = await c.get("/v1/sandboxes")
        assert resp.status_code == 503
        assert "starting" in error_of(resp).error
        assert (await c.get("/healthz")).json()["status"] == "starting"


async def test_create_app_serves_an_entered_controller(rig: Rig) -> None:
    async with rig.controller() as ctl:
        app = create_app(ctl)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://podfsm") as c:
            st = (await c.post("/v1/sandboxes", json=pod())).json()
            assert st["state"] == "Ready"
            assert (await c.delete(f"/v1/sandboxes/{st['id']}")).status_code == 204
    rig.nothing_left()


async def test_a_bug_answers_500_in_json_too_without_its_internals(
    rig: Rig, caplog: pytest.LogCaptureFixture,
) -> None:
    class Buggy(Controller):
        async def list_sandboxes(self) -> list[SandboxStatus]:
            raise RuntimeError("oops in /var/lib/podfsm/secret")

    app = Shim(Buggy(rig.cfg, namespaces=rig.ns, network=rig.net, runtime=rig.rt,
                     store=rig.store)).app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False),
                                 base_url="http://podfsm") as c:
        resp = await c.get("/v1/sandboxes")
    assert resp.status_code == 500
    err = error_of(resp)
    assert err.kind == "InternalError"
    assert "oops" not in resp.text and "/var/lib" not in resp.text and "Runtime" not in resp.text
    incident = err.error.split("incident ")[1].split(":")[0]
    # the details are in the log, under the incident number the answer gives
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)


def test_unknown_routes_and_methods_answer_json(client: httpx.Client) -> None:
    resp = client.get("/nope")
    assert resp.status_code == 404 and error_of(resp).kind == "NotFound"
    resp = client.delete("/v1/graph")
    assert resp.status_code == 405 and error_of(resp).kind == "MethodNotAllowed"


def test_a_405_allows_every_method_of_the_resource(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    sid = "f" * 64
    for path, item in doc["paths"].items():
        methods = {m.upper() for m in item if m != "parameters"}
        allow = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - methods:
            resp = client.request(method, path.replace("{sandbox_id}", sid))
            assert resp.status_code == 405, (method, path)
            assert resp.headers["allow"] == allow, (method, path)
    assert client.options("/v1/sandboxes").headers["allow"] == "GET, HEAD, POST"
    assert client.options(f"/v1/sandboxes/{sid}").headers["allow"] == "DELETE, GET, HEAD"


# ---------------------------------------------------------------------- diagrams, docs, page

@pytest.mark.parametrize("fmt", graph.FORMATS)
def test_the_machine_diagram_in_every_format(client: httpx.Client, fmt: str) -> None:
    resp = client.get("/v1/graph", params={"format": fmt})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == graph.MEDIA_TYPES[fmt]
    assert resp.content == graph.render(fmt)


def test_a_sandbox_diagram_highlights_its_state(client: httpx.Client) -> None:
    st = client.post("/v1/sandboxes", json=pod()).json()
    svg = client.get(f"/v1/sandboxes/{st['id']}/graph").text  # svg by default
    assert svg.lstrip().startswith("<?xml") and 'class="node state current"' in svg
    dot = client.get(f"/v1/sandboxes/{st['id']}/graph", params={"format": "dot"}).text
    assert '"Ready" [id="state-Ready", tooltip="Ready", fillcolor="#ffd54f"' in dot
    assert 'label="mark_ready (4)"' in dot


def test_an_unknown_diagram_format_is_400(client: httpx.Client) -> None:
    resp = client.get("/v1/graph", params={"format": "gif"})
    assert resp.status_code == 400
    assert error_of(resp).kind == "BadRequest"


def test_the_openapi_document_describes_every_route(client: httpx.Client, rig: Rig) -> None:
    doc = client.get("/openapi.json").json()
    ctl = rig.controller()
    facts = asyncio.run(ctl.host_facts())
    assert doc == json.loads(json.dumps(openapi_document(ctl.runtime_handlers, ctl.config,
                                                         facts)))
    assert doc["openapi"].startswith("3.")
    documented = {(path, m.upper()) for path, item in doc["paths"].items()
                  for m in item if m != "parameters"}
    routes = {r.path for r in Shim(rig.controller()).starlette.routes if isinstance(r, Route)}
    assert routes - {"/", "/openapi.json", "/v1/sandboxes/{sandbox_id:path}",
                     "/v1/images/{image_id:path}", "/v1/containers/{container_id:path}"} == {
        path for path, _ in documented}
    assert {(p, m) for p, ms in ALLOWED.items() for m in ms if m != "HEAD"} == documented
    # links lead from the id a run returns to every operation that takes one
    links = doc["paths"]["/v1/sandboxes"]["post"]["responses"]["201"]["links"]
    takes_id = {op["operationId"] for path, item in doc["paths"].items() if "{sandbox_id}" in path
                for m, op in item.items() if m != "parameters"}
    assert {link["operationId"] for link in links.values()} == takes_id
    assert all(link["parameters"] == {"sandbox_id": "$response.body#/id"}
               for link in links.values())
    for name in ("PodSandboxConfig", "SandboxStatus", "TransitionEvent", "ErrorBody",
                 "SandboxList", "Health"):
        assert name in doc["components"]["schemas"]

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref


def test_the_page_is_self_contained_and_follows_the_event_stream(client: httpx.Client) -> None:
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert resp.text == PAGE
    assert "new EventSource(" in PAGE and "/v1/events" in PAGE
    assert "/graph?format=svg" in PAGE
    for external in ("http://", "https://", "src=", "href=", "@import"):
        assert external not in PAGE


# ---------------------------------------------------------------------- events

def read_events(lines: Iterator[str], n: int, *,
                heartbeats: int = 25) -> list[tuple[int, TransitionEvent]]:
    """The next `n` events of an SSE stream, or fewer if `heartbeats` heartbeats come first."""
    events: list[tuple[int, TransitionEvent]] = []
    ident, data = -1, []
    for line in lines:
        if line.startswith(":"):
            heartbeats -= 1
            if heartbeats <= 0:
                break
        elif line.startswith("id: "):
            ident = int(line.removeprefix("id: "))
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif not line and data:
            events.append((ident, TransitionEvent.model_validate_json("\n".join(data))))
            data = []
            if len(events) == n:
                break
    return events


def test_events_stream_with_ids_and_resume_after_last_event_id(client: httpx.Client) -> None:
    with client.stream("GET", "/v1/events") as live:
        assert live.headers["content-type"].startswith("text/event-stream")
        lines = live.iter_lines()
        st = client.post("/v1/sandboxes", json=pod()).json()
        got = read_events(lines, 4)
    assert [i for i, _ in got] == [1, 2, 3, 4] == [ev.seq for _, ev in got]
    assert [(ev.source, ev.dest, ev.trigger) for _, ev in got] == [
        (h["source"], h["dest"], h["trigger"]) for h in st["history"]]
    assert {ev.sandbox_id for _, ev in got} == {st["id"]}

    # a reconnecting EventSource sends the last id it saw: it gets what came after
    with client.stream("GET", "/v1/events", headers={"Last-Event-ID": "2"}) as resumed:
        lines = resumed.iter_lines()
        assert [i for i, _ in read_events(lines, 2)] == [3, 4]
        client.post(f"/v1/sandboxes/{st['id']}/stop")
        (stop,) = read_events(lines, 1)
        assert stop[0] == 5 and stop[1].trigger == "stop" and stop[1].dest == "NotReady"

    # ?since= does the same for a first connection; the header wins when both are given
    with client.stream("GET", "/v1/events", params={"since": "3"},
                       headers={"Last-Event-ID": "4"}) as both:
        assert [i for i, _ in read_events(both.iter_lines(), 1)] == [5]
    with client.stream("GET", "/v1/events", params={"since": "4"}) as since:
        assert [i for i, _ in read_events(since.iter_lines(), 1)] == [5]


async def test_a_client_that_falls_behind_is_dropped_and_resumes_from_its_last_id(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_events, "QUEUE", 3)
    async with rig.controller() as ctl:
        shim = Shim(ctl)
        chunks: list[bytes] = []
        unblock = anyio.Event()

        async def send(message: Any) -> None:
            body = message.get("body", b"")
            chunks.append(body)
            if body.startswith(b"id: "):
                await unblock.wait()  # a client that reads nothing more

        async def receive() -> Any:
            await anyio.sleep_forever()

        scope = {"type": "http", "method": "GET", "path": "/v1/events", "query_string": b"",
                 "headers": []}
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(http_events.EventStream(shim), scope, receive, send)
                for i in range(3):  # 12 transitions while the client is stuck on the first
                    await ctl.run_sandbox(PodSandboxConfig.model_validate(pod(f"p{i}")))
                assert len(shim.streams) == 1
                unblock.set()
        # the stream ended by itself: the first event and the queue, nothing held for later
        ids = [int(c.split(b"\n")[0][4:]) for c in chunks if c.startswith(b"id: ")]
        # (the first run may begin before the stream subscribes)
        assert ids == list(range(ids[0], ids[0] + 4)) and ids[0] <= 2
        assert chunks[-1] == b"" and shim.streams == set()
        # the client resumes after the last id it got, from the controller's backlog
        resumed: list[int] = []
        with anyio.fail_after(10), anyio.CancelScope() as done:
            async def collect(message: Any) -> None:
                body = message.get("body", b"")
                if body.startswith(b"id: "):
                    resumed.append(int(body.split(b"\n")[0][4:]))
                    if resumed[-1] == 12:
                        done.cancel()

            await http_events.EventStream(shim)(
                {**scope, "headers": [(b"last-event-id", str(ids[-1]).encode())]},
                receive, collect)
        assert resumed == list(range(ids[-1] + 1, 13))
        for st in await ctl.list_sandboxes():
            await ctl.remove_sandbox(st.id)
    rig.nothing_left()


def test_a_fresh_stream_replays_nothing_and_beats_its_heart(client: httpx.Client) -> None:
    client.post("/v1/sandboxes", json=pod())
    with client.stream("GET", "/v1/events") as resp:
        assert read_events(resp.iter_lines(), 1, heartbeats=2) == []


def test_a_last_event_id_from_before_a_restart_starts_afresh(client: httpx.Client) -> None:
    # the daemon's seq restarts at 0: an id it has not reached must not hide new events
    with client.stream("GET", "/v1/events", headers={"Last-Event-ID": "9999"}) as resp:
        lines = resp.iter_lines()
        client.post("/v1/sandboxes", json=pod())
        assert [i for i, _ in read_events(lines, 4)] == [1, 2, 3, 4]


@pytest.mark.parametrize("since", ["abc", "-1", "\u00b2", "1" * 40])
def test_a_malformed_since_is_400(client: httpx.Client, since: str) -> None:
    resp = client.get("/v1/events", params={"since": since})
    assert resp.status_code == 400 and error_of(resp).kind == "BadRequest"


def test_a_malformed_last_event_id_is_ignored(client: httpx.Client) -> None:
    client.post("/v1/sandboxes", json=pod())
    with client.stream("GET", "/v1/events", params={"since": "3"},
                       headers={b"Last-Event-ID": "\u00b2".encode("latin-1")}) as resp:
        assert [i for i, _ in read_events(resp.iter_lines(), 1)] == [4]


def test_shutdown_ends_open_event_streams_at_once(served: Served) -> None:
    with served.client() as c, c.stream("GET", "/v1/events") as resp:
        lines = resp.iter_lines()
        assert read_events(lines, 1, heartbeats=1) == []
        started = time.monotonic()
        served.daemon.request_exit()
        rest = list(lines)  # returns once the daemon ends the stream
    assert all(x.startswith(":") or not x for x in rest)
    served.stop(cleanup=False)
    assert time.monotonic() - started < 3  # not the 5 s graceful timeout


# ---------------------------------------------------------------------- listening

def _socket_inodes() -> set[int]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def tcp_listeners() -> set[tuple[str, int]]:
    """The TCP sockets this process listens on, as (address, port)."""
    ours = _socket_inodes()
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                local, state, inode = cols[1], cols[3], int(cols[9])
                if state == "0A" and inode in ours:
                    addr, port = local.split(":")
                    raw = bytes.fromhex(addr)
                    if len(raw) == 4:
                        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
                    else:
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        host = socket.inet_ntop(socket.AF_INET6, words)
                    found.add((host, int(port, 16)))
    return found


def test_the_socket_is_0660_and_nothing_listens_on_tcp(served: Served) -> None:
    st = os.stat(served.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == os.geteuid()
    assert tcp_listeners() == set()
    assert served.daemon.tcp_address is None


def test_a_port_listens_on_loopback_only(rig: Rig, sock_dir: str) -> None:
    served = Served(rig, sock_dir, port=0).start()
    try:
        assert served.daemon.tcp_address is not None
        _, port = served.daemon.tcp_address
        assert tcp_listeners() == {("127.0.0.1", port)}
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
        assert stat.S_IMODE(os.stat(served.socket).st_mode) == 0o660
        # TCP needs the token, kept 0600 beside the socket unless --token-file says otherwise
        token_file = os.path.join(sock_dir, TOKEN_FILE)
        assert served.daemon.token_file == token_file
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = Path(token_file).read_text().strip()
        assert token == served.daemon.token and len(token) >= 32
        url = f"http://127.0.0.1:{port}/v1/sandboxes"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"authorization": f"Bearer {token}x"}).status_code == 401
        assert httpx.get(url, headers={"authorization": f"Bearer {token}"}).status_code == 200
        with served.client() as c:  # the unix socket takes none
            assert c.get("/v1/sandboxes").status_code == 200
    finally:
        served.stop()
        os.unlink(os.path.join(sock_dir, TOKEN_FILE))
    assert tcp_listeners() == set()


def test_a_host_without_a_port_is_refused(rig: Rig) -> None:
    with pytest.raises(DaemonError, match="port"):
        Daemon(rig.cfg, "/tmp/x.sock", host="0.0.0.0")


def test_a_stale_socket_is_replaced(rig: Rig, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "podfsm.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)  # bound, never listened, closed: nothing answers
    served = Served(rig, sock_dir).start()
    served.stop()


def test_a_live_socket_or_another_file_is_never_replaced(served: Served, sock_dir: str,
                                                         rig: Rig) -> None:
    second = Daemon(rig.cfg, served.socket, controller=rig.controller())
    with pytest.raises(DaemonError, match="already answers"):
        asyncio.run(second.run())
    with served.client() as c:
        assert c.get("/healthz").status_code == 200
    other = os.path.join(sock_dir, "file")
    Path(other).write_text("precious")
    try:
        with pytest.raises(DaemonError, match="not a socket"):
            asyncio.run(Daemon(rig.cfg, other, controller=rig.controller()).run())
        assert Path(other).read_text() == "precious"
    finally:
        os.unlink(other)


class _BrokenNamespaces(FakeNamespaces):
    async def start(self) -> None:
        raise PrerequisiteMissing("no namespace workers today")


def test_a_controller_that_cannot_start_stops_the_daemon(rig: Rig, sock_dir: str) -> None:
    ctl = Controller(rig.cfg, namespaces=_BrokenNamespaces(rig.faults), network=rig.net,
                     runtime=rig.rt, store=rig.store, failpoints="")
    daemon = Daemon(rig.cfg, os.path.join(sock_dir, "podfsm.sock"), controller=ctl)
    with pytest.raises(PrerequisiteMissing, match="no namespace workers"):
        asyncio.run(daemon.run())


async def _wait_healthy(c: httpx.AsyncClient) -> None:
    with anyio.fail_after(10):
        while True:
            try:
                if (await c.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.01)


def _aclient(path: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path),
                             base_url="http://podfsm", timeout=10)


async def test_sigterm_shuts_down_gracefully_leaves_sandboxes_and_a_restart_reattaches(
    rig: Rig, sock_dir: str,
) -> None:
    path = os.path.join(sock_dir, "podfsm.sock")
    first = Daemon(rig.cfg, path, controller=rig.controller(), heartbeat=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        async with _aclient(path) as c:
            await _wait_healthy(c)
            st = (await c.post("/v1/sandboxes", json=pod())).json()
            async with c.stream("GET", "/v1/events") as events:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the daemon, not fatal
                with anyio.fail_after(5):
                    async for _ in events.aiter_lines():
                        pass  # the stream ends when the daemon shuts down
    assert not os.path.exists(path)
    assert os.path.exists(f"/proc/{st['pid']}")  # the sandbox keeps running
    assert rig.store.records[st["id"]].state == "Ready"

    second = Daemon(rig.cfg, path, controller=rig.controller(), heartbeat=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(second.run)
        async with _aclient(path) as c:
            await _wait_healthy(c)
            again = (await c.get(f"/v1/sandboxes/{st['id']}")).json()
            assert again["state"] == "Ready" and again["pid"] == st["pid"]
            assert (await c.delete(f"/v1/sandboxes/{st['id']}")).status_code == 204
        second.request_exit()
    rig.nothing_left()


# ---------------------------------------------------------------------- fuzz

_DOC = openapi_document()
_SCHEMAS: dict[str, Any] = _DOC["components"]["schemas"]
_ENUM_NAMES = {e.__name__: [m.name.lower() if m.value % 2 else m.name for m in e]
               for e in (NamespaceMode, Protocol)}
_DNS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=10,
)


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that mostly fit `schema` (a pydantic JSON schema), often not quite."""
    if "$ref" in schema:
        return from_schema(_SCHEMAS[schema["$ref"].rsplit("/", 1)[1]], depth)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, depth) for s in schema["anyOf"]])
    if "enum" in schema:
        # an enum's names may be listed by the schema itself (the pod config's: names or
        # numbers), or known here by the enum's title
        names = _ENUM_NAMES.get(schema.get("title", ""), [])
        values = st.sampled_from(schema["enum"]) | st.integers(-1, 5)
        return values | st.sampled_from(names) if names else values
    kind = schema.get("type")
    if kind == "object" and depth < 6:
        props = {k: from_schema(v, depth + 1) for k, v in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        base = st.fixed_dictionaries(
            {k: s for k, s in props.items() if k in required},
            optional={k: s for k, s in props.items() if k not in required})
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return st.dictionaries(st.text(max_size=10) | _DNS, from_schema(extra, depth + 1),
                                   max_size=3)
        return base | st.dictionaries(st.text(max_size=6), _JSON, max_size=2)
    if kind == "array" and depth < 6:
        return st.lists(from_schema(schema.get("items", {}), depth + 1), max_size=3)
    if kind == "string":
        return _DNS | st.text(max_size=12)
    if kind == "integer":
        lo, hi = schema.get("minimum", -(2**33)), schema.get("maximum", 2**33)
        return st.integers(lo, hi) | st.integers()
    if kind == "boolean":
        return st.booleans()
    return _JSON


# the event stream never ends: it is asked with HEAD, which answers as GET would, sans body
_OPERATIONS = [(path, "head" if path == "/v1/events" else method, op)
               for path, item in _DOC["paths"].items()
               for method, op in item.items() if method != "parameters"]
_NUMBERS = st.integers(0, 10).map(str) | st.text(max_size=6)
_HEADER_VALUES = st.integers(0, 10).map(str) | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=6)
_MAPPING = st.integers(65536, 2**31).map(
    lambda h: [{"host_id": h, "container_id": 0, "length": 65536}])
# pod configs the controller accepts (bar clashes with sandboxes already running)
_VALID_PODS = st.fixed_dictionaries(
    {"metadata": st.fixed_dictionaries({"name": _DNS}, optional={
        "namespace": _DNS, "uid": _DNS, "attempt": st.integers(0, 3)})},
    optional={
        "hostname": _DNS,
        "labels": st.dictionaries(_DNS, st.text(max_size=8), max_size=2),
        "port_mappings": st.lists(from_schema(_SCHEMAS["PortMapping"]), max_size=2),
        "linux": st.fixed_dictionaries({"security_context": st.fixed_dictionaries({
            "namespace_options": st.fixed_dictionaries({}, optional={
                "network": st.sampled_from(["POD", "NODE", 0, 2]),
                "userns_options": st.one_of(
                    st.fixed_dictionaries({"mode": st.sampled_from(["POD", "NODE", 0, 2])}),
                    _MAPPING.map(lambda m: {"mode": "POD", "uids": m, "gids": m})),
            })})}),
    })
_BODIES = st.one_of(
    _VALID_PODS, from_schema(_SCHEMAS["PodSandboxConfig"]), _JSON,
).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)
_IDS = st.text(min_size=1, max_size=70).filter(lambda s: s not in (".", ".."))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_the_api_from_its_openapi_document(client: httpx.Client, rig: Rig,
                                                data: st.DataObject) -> None:
    """Random requests to every documented operation: only documented statuses, never a 5xx
    (the fakes never fail a run), well-formed bodies, and nothing left afterwards."""
    created: list[str] = []
    try:
        for _ in range(data.draw(st.integers(1, 6), label="requests")):
            path, method, op = data.draw(st.sampled_from(_OPERATIONS), label="operation")
            if "{sandbox_id}" in path:
                # mostly a sandbox of this example, once there is one
                known = st.sampled_from(created)
                sid = data.draw(st.one_of(known, known, _IDS) if created else _IDS, label="id")
                path = path.replace("{sandbox_id}", urllib.parse.quote(sid, safe=""))
            params, headers = {}, {}
            for param in op.get("parameters", []):
                name, where = param["name"], param["in"]
                if name == "format":
                    params[name] = data.draw(st.sampled_from(graph.FORMATS) | st.text(max_size=5),
                                             label=name)
                elif where == "query" and data.draw(st.booleans(), label=f"send {name}"):
                    params[name] = data.draw(_NUMBERS, label=name)
                elif where == "header" and data.draw(st.booleans(), label=f"send {name}"):
                    value = data.draw(_HEADER_VALUES, label=name)
                    headers[name.encode()] = value.encode("latin-1").strip()
            body = data.draw(_BODIES, label="body") if "requestBody" in op else None
            resp = client.request(method.upper(), path, params=params, headers=headers,
                                  content=body)
            event(f"{op['operationId']} {resp.status_code}")
            assert resp.status_code < 500, resp.text
            assert str(resp.status_code) in op["responses"], (method, path, resp.status_code)
            if method == "head":
                assert resp.content == b""
            elif resp.status_code >= 400:
                error_of(resp)
            elif resp.status_code == 201:
                created.append(SandboxStatus.model_validate_json(resp.content).id)
            elif resp.headers.get("content-type") == "application/json":
                json.loads(resp.content)
    finally:
        for item in client.get("/v1/sandboxes").json()["items"]:
            assert client.delete(f"/v1/sandboxes/{item['id']}").status_code == 204
    assert rig.store.records == {} and rig.ns.pinned == set() and rig.net.reserved == {}

