"""The OpenAPI document of the HTTP face, built from the pydantic models that validate."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from podfsm import __version__
from podfsm.core.records import SandboxStatus, TransitionEvent
from podfsm.core.spec import PodSandboxConfig
from podfsm.faces import graph
from podfsm.faces.wire import ErrorBody, Health, SandboxList


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the shim; schemas come from the pydantic models."""
    ref_template = "#/components/schemas/{model}"
    _, top = models_json_schema(
        [(PodSandboxConfig, "validation"), (SandboxStatus, "serialization"),
         (SandboxList, "serialization"), (TransitionEvent, "serialization"),
         (ErrorBody, "serialization"), (Health, "serialization")],
        ref_template=ref_template, by_alias=False,
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": ref_template.format(model=name)}

    def json_body(name: str, description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref(name)}}}

    def errors(*codes: int) -> dict[str, Any]:
        meaning = {
            400: "a malformed parameter", 404: "no sandbox with that id",
            409: "a sandbox with that name, namespace, uid and attempt exists",
            413: "the body is over 1 MiB",
            422: "the pod config is refused (nothing was created)",
            500: "the run failed: `step` says which step, `leftovers` what unwinding left",
            503: "the controller is starting or recovering; retry",
        }
        return {str(c): json_body("ErrorBody", meaning[c]) for c in codes}

    sandbox_id = {"name": "sandbox_id", "in": "path", "required": True,
                  "description": "the sandbox's id (64 hex digits)", "schema": {"type": "string"}}
    fmt = {"name": "format", "in": "query", "required": False,
           "schema": {"type": "string", "enum": list(graph.FORMATS), "default": "svg"}}
    diagram = {"200": {"description": "the diagram", "content": {
        media: {"schema": {"type": "string"}} for media in graph.MEDIA_TYPES.values()}}}
    paths: dict[str, Any] = {
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Is the controller serving?",
            "responses": {"200": json_body("Health", "serving"),
                          "503": json_body("Health", "starting or recovering")}}},
        "/v1/sandboxes": {
            "get": {"operationId": "listSandboxes", "summary": "Every sandbox, oldest first",
                    "responses": {"200": json_body("SandboxList", "the sandboxes"),
                                  **errors(503)}},
            "post": {"operationId": "runSandbox",
                     "summary": "Run a sandbox from a crictl pod config, up to Ready",
                     "parameters": [{"name": "runtime_handler", "in": "query",
                                     "required": False, "schema": {"type": "string"},
                                     "description": "the OCI runtime of this sandbox (runc or "
                                     "crun; default: the daemon's); unknown: 422"}],
                     "requestBody": {"required": True, "description": (
                         "the CRI PodSandboxConfig as `crictl runp` reads it: snake_case or "
                         "lowerCamelCase keys, enums as names or numbers"),
                         "content": {"application/json": {"schema": ref("PodSandboxConfig")}}},
                     "responses": {"201": json_body("SandboxStatus", "Ready"),
                                   **errors(409, 413, 422, 500, 503)}}},
        "/v1/sandboxes/{sandbox_id}": {
            "parameters": [sandbox_id],
            "get": {"operationId": "sandboxStatus", "summary": "One sandbox's status",
                    "responses": {"200": json_body("SandboxStatus", "its status"),
                                  **errors(404, 503)}},
            "delete": {"operationId": "removeSandbox",
                       "summary": "Stop if needed, delete everything: the sandbox disappears",
                       "responses": {"204": {"description": "removed"},
                                     **errors(404, 500, 503)}}},
        "/v1/sandboxes/{sandbox_id}/stop": {
            "parameters": [sandbox_id],
            "post": {"operationId": "stopSandbox",
                     "summary": "Kill the task, CNI DEL, unpin: NotReady (idempotent)",
                     "responses": {"200": json_body("SandboxStatus", "its status, NotReady"),
                                   **errors(404, 500, 503)}}},
        "/v1/sandboxes/{sandbox_id}/graph": {
            "parameters": [sandbox_id],
            "get": {"operationId": "sandboxGraph",
                    "summary": "The machine with this sandbox's state and path drawn on it",
                    "parameters": [fmt], "responses": {**diagram, **errors(400, 404, 503)}}},
        "/v1/graph": {"get": {
            "operationId": "machineGraph", "summary": "The state machine's diagram",
            "parameters": [fmt], "responses": {**diagram, **errors(400)}}},
        "/v1/events": {"get": {
            "operationId": "events",
            "summary": "Transitions as Server-Sent Events; `data:` is a TransitionEvent",
            "parameters": [
                {"name": "since", "in": "query", "required": False,
                 "description": "resume after this event seq (as Last-Event-ID does)",
                 "schema": {"type": "integer", "minimum": 0}},
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the event stream", "content": {
                "text/event-stream": {"schema": {"type": "string"}}}}, **errors(400, 503)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "podfsm", "version": __version__,
                 "description": "Pod sandboxes as finite-state machines: the HTTP shim of "
                                "`podfsm serve`, on its unix socket."},
        "paths": paths,
        "components": {"schemas": top["$defs"]},
    }

