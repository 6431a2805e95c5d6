"""The OpenAPI document of the HTTP face, built from the pydantic models that validate.

One table, OPERATIONS, lists every operation: its method and path, its query model (the same
model the handler validates the query string with), its body model and its answers. The routes
of app.py are built from the same table, so the document, the router and a 405's `Allow` list
the same methods. A new query parameter is a field of the operation's query model in wire.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from podfsm import __version__
from podfsm.config import ControllerConfig
from podfsm.core.containerrecords import ContainerStatus
from podfsm.core.images import ImageRecord
from podfsm.core.records import HostFacts, SandboxStatus, TransitionEvent
from podfsm.core.spec import ID_SPACE, PATH_SEGMENT, PodSandboxConfig
from podfsm.faces import graph
from podfsm.faces.wire import (
    CONTAINER_ID_PATTERN,
    IMAGE_ID_PATTERN,
    SANDBOX_ID_PATTERN,
    ContainerList,
    ContainersQuery,
    ContainerStatsBody,
    CreateContainerBody,
    ErrorBody,
    EventsQuery,
    ExecBody,
    ExecResponse,
    GraphQuery,
    Health,
    ImageList,
    ImagesQuery,
    LogsQuery,
    MachineGraphQuery,
    PullBody,
    RunQuery,
    SandboxList,
    StopQuery,
)

REF = "#/components/schemas/{model}"
#: the scheme name of the TCP listener's token (the unix socket needs none)
BEARER = "token"

#: what each error status means, wherever it is answered
ERRORS: dict[int, str] = {
    400: "a malformed parameter (a sandbox id is 64 lower-case hex digits)",
    401: "TCP only: no valid token (`Authorization: Bearer TOKEN` or the page's cookie)",
    403: "TCP only: a Host that is not one of the listening names, or a foreign Origin",
    404: ("no sandbox (or image, or container) with that id; for a pull: no registry endpoint "
          "has that image (`ImageNotInRegistry`)"),
    409: ("a conflict with the sandboxes that exist (nothing was created): one with that name, "
          "namespace, uid and attempt exists (`NameReserved`), or the host id range asked for "
          "overlaps another sandbox's or the id pool has no free range (`IdRangeUnavailable`), "
          "or the sandboxes there are already take what one list answer may carry "
          "(`NodeFull`); the same request may succeed once they are removed; an image in use "
          "by a container (`ImageInUse`); a container name reserved in its pod "
          "(`ContainerNameReserved`); a container or its pod in the wrong state for this "
          "(`ContainerPrecondition`: the pod is not Ready, the container is not Created to "
          "start or Running to exec)"),
    413: "the body is over 1 MiB",
    415: "the body is not `application/json`",
    422: ("the pod config is refused (nothing was created): `InvalidPodConfig` names the field "
          "and the rule, one the schema states or one its descriptions say (a sysctl, a seccomp "
          "profile file or a security module of this host; ids that the pod's mappings must "
          "hold); an unknown runtime_handler; a malformed image reference or credentials "
          "(`InvalidImageReference`, `InvalidPullRequest`); a refused container config "
          "(`InvalidContainerConfig` names the field)"),
    500: "the run failed: `step` says which step, `leftovers` what unwinding left",
    502: ("the pull failed (nothing of it was kept): no registry endpoint served it "
          "(`ImagePullError` gives each one's answer), content did not match its digest "
          "(`DigestMismatch` names it) or a layer was hostile (`UnpackError` names the "
          "entry)"),
    503: "the controller is starting, recovering or shutting down; retry",
    504: "the exec'd command outlived its timeout and was killed (`ExecTimeout`)",
}
#: answered by every operation that needs the controller (503) or, on TCP, a token (401, 403)
_GUARDED = (401, 403, 503)


@dataclass(frozen=True)
class Operation:
    """One operation of the API. `handler` names the Shim method that serves it."""

    method: str
    path: str
    operation_id: str
    summary: str
    handler: str
    #: status -> (description, body model name or None, or a {media: schema} content map)
    ok: dict[int, tuple[str, Any]]
    errors: tuple[int, ...] = ()
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_description: str = ""
    headers: tuple[dict[str, Any], ...] = ()
    #: False: served without a token on TCP too
    guarded: bool = True
    links: dict[str, dict[str, Any]] = field(default_factory=dict)


def _per_sandbox(operation_id: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": {"sandbox_id": "$response.body#/id"}}


#: one Server-Sent Event of /v1/events: `id` its seq, `data` a TransitionEvent in JSON
_SSE_EVENT = {"type": "object", "properties": {
    "id": {"type": "string", "pattern": "^[0-9]+$"},
    "event": {"type": "string", "enum": ["message"]},
    "data": {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"$ref": REF.format(model="TransitionEvent")}}}}
_DIAGRAM = {media: {"schema": {"type": "string"}} for media in graph.MEDIA_TYPES.values()}
_RUN_LINKS = {"GetSandbox": _per_sandbox("sandboxStatus"),
              "StopSandbox": _per_sandbox("stopSandbox"),
              "SandboxGraph": _per_sandbox("sandboxGraph"),
              "RemoveSandbox": _per_sandbox("removeSandbox")}
_SANDBOX = "/v1/sandboxes/{sandbox_id}"
_CONTAINER = "/v1/containers/{container_id}"
_IMAGE = "/v1/images/{image_id}"


def _per_container(operation_id: str) -> dict[str, Any]:
    return {"operationId": operation_id,
            "parameters": {"container_id": "$response.body#/id"}}


_CONTAINER_LINKS = {"GetContainer": _per_container("containerStatus"),
                    "StartContainer": _per_container("startContainer"),
                    "StopContainer": _per_container("stopContainer"),
                    "ContainerLogs": _per_container("containerLogs"),
                    "RemoveContainer": _per_container("removeContainer")}
_LOG_LINES = {"text/plain": {"schema": {"type": "string", "description": (
    "the CRI log's lines: `<RFC 3339 time> stdout|stderr P|F <text>`")}}}


def _per_image(operation_id: str) -> dict[str, Any]:
    return {"operationId": operation_id,
            "parameters": {"image_id": "$response.body#/id"}}

OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/healthz", "healthz", "Is the controller serving?", "healthz",
              {200: ("serving", "Health"), 503: ("starting or recovering", "Health")},
              guarded=False),
    Operation("get", "/v1/sandboxes", "listSandboxes", "Every sandbox, oldest first",
              "list_sandboxes", {200: ("the sandboxes", "SandboxList")}),
    Operation("post", "/v1/sandboxes", "runSandbox",
              "Run a sandbox from a crictl pod config, up to Ready", "run_sandbox",
              {201: ("Ready", "SandboxStatus")}, (400, 409, 413, 415, 422, 500),
              query=RunQuery, body=PodSandboxConfig, body_description=(
                  "the CRI PodSandboxConfig as `crictl runp` reads it: snake_case or "
                  "lowerCamelCase keys, enums as names or numbers"),
              links=_RUN_LINKS),
    Operation("get", _SANDBOX, "sandboxStatus", "One sandbox's status", "sandbox_status",
              {200: ("its status", "SandboxStatus")}, (400, 404)),
    Operation("delete", _SANDBOX, "removeSandbox",
              "Stop if needed, delete everything: the sandbox disappears (idempotent: an "
              "unknown id is removed already)", "remove_sandbox",
              {204: ("removed, or there was no such sandbox", None)}, (400, 500)),
    Operation("post", f"{_SANDBOX}/stop", "stopSandbox",
              "Kill the task, CNI DEL, unpin: NotReady (idempotent: an unknown id is stopped "
              "already)", "stop_sandbox",
              {200: ("its status, NotReady", "SandboxStatus"),
               204: ("there is no such sandbox", None)}, (400, 500),
              links={"GetSandbox": _per_sandbox("sandboxStatus"),
                     "RemoveSandbox": _per_sandbox("removeSandbox")}),
    Operation("get", f"{_SANDBOX}/graph", "sandboxGraph",
              "The machine with this sandbox's state and path drawn on it", "sandbox_graph",
              {200: ("the diagram", _DIAGRAM)}, (400, 404), query=GraphQuery),
    Operation("get", "/v1/images", "listImages", "Every image, oldest pull first",
              "list_images", {200: ("the images", "ImageList")}, (400,), query=ImagesQuery),
    Operation("post", "/v1/images", "pullImage",
              "Pull an image from its registry (or the mirrors of --registry-config-dir), "
              "verify and unpack it", "pull_image", {201: ("pulled", "ImageRecord")},
              (404, 413, 415, 422, 502), body=PullBody,
              body_description="the reference, and credentials when the registry wants some",
              links={"GetImage": _per_image("imageStatus"),
                     "RemoveImage": _per_image("removeImage")}),
    Operation("get", _IMAGE, "imageStatus", "One image's record", "image_status",
              {200: ("its record", "ImageRecord")}, (400, 404)),
    Operation("delete", _IMAGE, "removeImage",
              "Remove the image (every name of it) and the content only it needed "
              "(idempotent)", "remove_image",
              {204: ("removed, or there was no such image", None)}, (400, 409)),
    Operation("get", "/v1/containers", "listContainers", "Every container, oldest first, "
              "filtered as the CRI's ContainerFilter", "list_containers",
              {200: ("the containers", "ContainerList")}, (400,), query=ContainersQuery),
    Operation("post", "/v1/containers", "createContainer",
              "Create a container in a Ready sandbox (Created: its process exists, not "
              "started)", "create_container", {201: ("Created", "ContainerStatus")},
              (400, 404, 409, 413, 415, 422, 500), body=CreateContainerBody,
              body_description="the sandbox and the CRI ContainerConfig",
              links=_CONTAINER_LINKS),
    Operation("get", _CONTAINER, "containerStatus", "One container's status",
              "container_status", {200: ("its status", "ContainerStatus")}, (400, 404)),
    Operation("delete", _CONTAINER, "removeContainer",
              "Kill it if it runs, delete it, its rootfs and directory (idempotent: an "
              "unknown id is removed already)", "remove_container",
              {204: ("removed, or there was no such container", None)}, (400, 500)),
    Operation("get", f"{_CONTAINER}/info", "containerInfo",
              "The verbose status's info: pid, monitor pid, the OCI spec, the config, "
              "the history", "container_info",
              {200: ("its info", {"application/json": {"schema": {"type": "object"}}})},
              (400, 404)),
    Operation("post", f"{_CONTAINER}/start", "startContainer",
              "Start a Created container", "start_container",
              {200: ("its status, Running (or Exited at once)", "ContainerStatus")},
              (400, 404, 409, 500)),
    Operation("post", f"{_CONTAINER}/stop", "stopContainer",
              "The stop signal, then SIGKILL after the timeout: Exited (idempotent for an "
              "Exited container)", "stop_container",
              {200: ("its status, Exited", "ContainerStatus")}, (400, 404, 500),
              query=StopQuery),
    Operation("post", f"{_CONTAINER}/exec", "execSync",
              "Run a command in the running container to its end (as the CRI's ExecSync)",
              "exec_sync", {200: ("what the command did", "ExecResponse")},
              (400, 404, 409, 413, 415, 500, 504), body=ExecBody,
              body_description="the command, and a timeout"),
    Operation("get", f"{_CONTAINER}/logs", "containerLogs",
              "The container's CRI log; with follow, streamed until it has exited",
              "container_logs", {200: ("the log's lines", _LOG_LINES)}, (400, 404, 409),
              query=LogsQuery),
    Operation("get", f"{_CONTAINER}/stats", "containerStats",
              "CPU and memory of its cgroup, bytes and inodes of its writable layer",
              "container_stats", {200: ("its figures", "ContainerStatsBody")}, (400, 404)),
    Operation("get", "/v1/graph", "machineGraph", "The state machine's diagram",
              "machine_graph", {200: ("the diagram", _DIAGRAM)}, (400,),
              query=MachineGraphQuery),
    Operation("get", "/v1/events", "events",
              "Transitions as Server-Sent Events; `data:` is a TransitionEvent", "events",
              {200: ("the event stream", {"text/event-stream": {"schema": _SSE_EVENT}})},
              (400,), query=EventsQuery,
              headers=({"name": "Last-Event-ID", "in": "header", "required": False,
                        "description": "resume after this event seq (what a reconnecting "
                                       "EventSource sends); anything but digits is ignored",
                        "schema": {"type": "string"}},)),
)

#: every path's methods, upper case, as a 405's Allow lists them
ALLOWED: dict[str, tuple[str, ...]] = {}
for _op in OPERATIONS:
    _methods = {*ALLOWED.get(_op.path, ()), _op.method.upper()}
    if "GET" in _methods:
        _methods.add("HEAD")
    ALLOWED[_op.path] = tuple(sorted(_methods))


def _content(spec: Any) -> dict[str, Any]:
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {"content": {"application/json": {"schema": {"$ref": REF.format(model=spec)}}}}
    return {"content": spec}


def _query_parameters(model: type[BaseModel] | None) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(mode="validation", ref_template=REF)
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", "")
        prop.pop("title", None)
        if "anyOf" in prop:  # `X | None = None`: absent is the None, so the value is an X
            prop = {**next(s for s in prop.pop("anyOf") if s.get("type") != "null"), **prop}
            if prop.get("default", 0) is None:
                del prop["default"]
        params.append({"name": name, "in": "query", "required": name in schema.get(
            "required", []), "description": description, "schema": prop})
    return params


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
    params = [*_query_parameters(op.query), *op.headers]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "description": op.body_description,
                              **_content(op.body.__name__)}
    responses: dict[str, Any] = {}
    for status, (description, spec) in op.ok.items():
        responses[str(status)] = {"description": description, **_content(spec)}
        if op.links and spec is not None:  # links read the id from a body
            responses[str(status)]["links"] = op.links
    for status in sorted({*op.errors, *(_GUARDED if op.guarded else ())}):
        responses[str(status)] = {"description": ERRORS[status], **_content("ErrorBody")}
    out["responses"] = responses
    out["security"] = [{BEARER: []}] if op.guarded else []
    return out


def _ecma(pattern: str) -> str:
    """A model's pattern (Python's re) in JSON Schema's dialect (ECMA-262), same meaning for
    any string JSON can carry: `\\Z` is ECMA's `$` (which, unlike Python's, never matches
    before a trailing newline); surrogates, which no well-formed JSON string holds, leave
    the character classes (the validators of the dialect refuse them); a character beyond the
    BMP (`\\U0001d173`, which ECMA-262 spells otherwise) is written as itself."""
    pattern = pattern.replace("\\ud800-\\udfff", "")
    pattern = re.sub(r"\\U([0-9a-fA-F]{8})", lambda m: chr(int(m[1], 16)), pattern)
    return pattern[:-2] + "$" if pattern.endswith("\\Z") else pattern


def _portable(node: Any) -> Any:
    """`node` (a JSON schema) with every pattern in JSON Schema's dialect, and a map whose
    keys have a pattern said as pydantic cannot: pydantic writes `patternProperties`, which
    leaves a key that does not match free to hold anything, where the model refuses it."""
    if isinstance(node, list):
        return [_portable(v) for v in node]
    if not isinstance(node, dict):
        return node
    keyed = node.get("patternProperties")
    if isinstance(keyed, dict) and len(keyed) == 1 and "additionalProperties" not in node:
        (key_pattern, values), = keyed.items()
        node = {k: v for k, v in node.items() if k != "patternProperties"}
        node["propertyNames"] = {**node.get("propertyNames", {}), "pattern": key_pattern}
        node["additionalProperties"] = values
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "pattern" and isinstance(value, str):
            out[key] = _ecma(value)
        elif key == "patternProperties" and isinstance(value, dict):
            out[key] = {_ecma(k): _portable(v) for k, v in value.items()}
        else:
            out[key] = _portable(value)
    return out


def _id_pool(config: ControllerConfig) -> dict[str, Any]:
    """The schema of a requested id mapping that the daemon's id pool takes, as the
    controller checks it at admission: host ids inside the pool, at most idmap_max_length of
    them (that host_id + length stays inside too is arithmetic JSON Schema cannot say)."""
    end = min(config.idmap_pool_start + config.idmap_pool_size, ID_SPACE - 1)
    mapping = {"properties": {
        "host_id": {"minimum": config.idmap_pool_start, "maximum": end - 1},
        "length": {"maximum": min(config.idmap_max_length, end - config.idmap_pool_start)}}}
    return {"properties": {"uids": {"items": mapping}, "gids": {"items": mapping}}}


def _cgroup_parent(config: ControllerConfig, prop: dict[str, Any]) -> None:
    """Narrow linux.cgroup_parent's schema `prop` to what the daemon takes, as the controller
    checks it at admission: empty (the root), its cgroup_root, or below it. The pattern
    replaces the model's (a narrower one; two patterns at once would make a generator filter
    one's strings by the other)."""
    root = "".join("\\" + c if c in ".+" else c for c in config.cgroup_root)
    prop["pattern"] = _ecma(rf"^({root}(/{PATH_SEGMENT})*)?\Z")
    prop["description"] = (f"empty (this daemon's cgroup_root, {config.cgroup_root}), "
                           f"{config.cgroup_root} or a path below it, not inside another "
                           "sandbox's cgroup (`<its parent>/<its id>`, else 422); "
                           + prop.get("description", ""))


def _host_facts(schemas: dict[str, Any], facts: HostFacts) -> None:
    """Narrow the pod config's schemas to what admission takes on this host: the sysctls a
    pod of each kind can write, and the addresses a host_ip may name."""
    linux = schemas["LinuxPodSandboxConfig"]
    sysctls = linux["properties"]["sysctls"]
    if facts.sysctls is not None and facts.userns_sysctls is not None:
        # Every name either kind of pod has. That a pod with its own user namespace has fewer
        # is said in words: an if/then on its mode (its userns_options may be null) is more
        # than schemathesis' generator takes ("does not support this part").
        names = sorted({*facts.sysctls, *facts.userns_sysctls})
        sysctls["propertyNames"] = {**sysctls.get("propertyNames", {}), "enum": names}
        fewer = sorted(set(names) - set(facts.userns_sysctls))
        sysctls["description"] = (
            f"one of the {len(names)} namespaced sysctls this host gives a pod"
            + (f" (a pod with its own user namespace has not {', '.join(fewer)}: 422)"
               if fewer else "")
            + "; each set to a value the kernel takes (tried in new namespaces of the pod's "
            "kind before anything is made, else 422 naming it)")
    if facts.host_ips is not None:
        host_ip = schemas["PortMapping"]["properties"]["host_ip"]
        choices: list[dict[str, Any]] = [{"type": "string", "maxLength": 0},
                                         {"type": "string", "enum": list(facts.host_ips)}]
        if facts.families is None or 4 in facts.families:  # every 127.x is this host's
            choices.append({"type": "string", "format": "ipv4", "pattern": r"^127\."})
        host_ip["anyOf"] = choices
        host_ip["description"] = (
            "empty (every address), or an address of this host of a family the pod network "
            "gives pods, or that family's unspecified address (else 422): those listed, and "
            "any other the host has when the pod is run (its bridges' addresses, which come "
            "and go, are not listed)")


def openapi_document(runtime_handlers: list[str] | None = None,
                     config: ControllerConfig | None = None,
                     facts: HostFacts | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the shim; schemas come from the pydantic models.
    `runtime_handlers` (the daemon's installed ones) become the choices of runSandbox's
    `runtime_handler`, which the server checks against the same list; `config` (the daemon's)
    adds its id pool's bounds to the user namespace mappings a pod may ask for, and its
    cgroup_root to linux.cgroup_parent; `facts` (the host's) the sysctls a pod can set and the
    addresses a port mapping's host_ip may name."""
    _, top = models_json_schema(
        [(PodSandboxConfig, "validation"), (SandboxStatus, "serialization"),
         (SandboxList, "serialization"), (TransitionEvent, "serialization"),
         (ErrorBody, "serialization"), (Health, "serialization"),
         (ImageRecord, "serialization"), (ImageList, "serialization"),
         (PullBody, "validation"), (ContainerStatus, "serialization"),
         (ContainerList, "serialization"), (CreateContainerBody, "validation"),
         (ExecBody, "validation"), (ExecResponse, "serialization"),
         (ContainerStatsBody, "serialization")],
        ref_template=REF, by_alias=False,
    )
    sandbox_id = {"name": "sandbox_id", "in": "path", "required": True,
                  "description": "the sandbox's id (64 hex digits; the CLI expands prefixes)",
                  "schema": {"type": "string", "pattern": SANDBOX_ID_PATTERN}}
    image_id = {"name": "image_id", "in": "path", "required": True,
                "description": "the image's id, `sha256:` and 64 hex digits or the digits "
                               "alone (the CLI resolves names and prefixes)",
                "schema": {"type": "string", "pattern": IMAGE_ID_PATTERN}}
    container_id = {"name": "container_id", "in": "path", "required": True,
                    "description": "the container's id (64 hex digits; the CLI expands "
                                   "prefixes)",
                    "schema": {"type": "string", "pattern": CONTAINER_ID_PATTERN}}
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        item = paths.setdefault(op.path, {})
        if "{sandbox_id}" in op.path:
            item["parameters"] = [sandbox_id]
        if "{image_id}" in op.path:
            item["parameters"] = [image_id]
        if "{container_id}" in op.path:
            item["parameters"] = [container_id]
        item[op.method] = _operation(op)
        for param in item[op.method].get("parameters", []):
            if param["name"] == "runtime_handler" and runtime_handlers is not None:
                param["schema"] = {**param["schema"], "enum": ["", *runtime_handlers]}
                param["schema"].pop("maxLength", None)
    schemas = _portable(top["$defs"])
    if config is not None:
        userns = schemas["UserNamespace"]
        userns["allOf"] = [*userns.get("allOf", ()), _id_pool(config)]
        _cgroup_parent(config, schemas["LinuxPodSandboxConfig"]["properties"]["cgroup_parent"])
    if facts is not None:
        _host_facts(schemas, facts)
    return {
        "openapi": "3.1.0",
        "info": {"title": "podfsm", "version": __version__,
                 "description": "Pod sandboxes as finite-state machines: the HTTP shim of "
                                "`podfsm serve`, on its unix socket and, with a token, on "
                                "TCP."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {BEARER: {
                "type": "http", "scheme": "bearer",
                "description": "TCP only: the token of `serve --token-file` (the unix "
                               "socket needs none; access to it is its file mode)"}},
        },
    }
