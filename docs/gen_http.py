"""Writes docs/http.md from the OpenAPI document that `podfsm serve` serves at /openapi.json.

    python docs/gen_http.py            # rewrite docs/http.md
    python docs/gen_http.py --check    # exit 1 if docs/http.md is not what this makes now

tests/unit/test_docs.py runs the check, so the page cannot drift from the code. The document is
taken from a real Shim (the app `serve` runs) over a stand-in controller, through the app's own
GET /openapi.json (in process, over httpx's ASGI transport), so the page shows exactly what a
client fetches.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import re
import sys
from pathlib import Path
from typing import Any

import httpx

from podfsm.config import ControllerConfig
from podfsm.core import spec
from podfsm.faces.http import Shim

HERE = Path(__file__).resolve().parent
OUT = HERE / "http.md"
SCHEMAS = "#/components/schemas/"
METHODS = ("get", "post", "put", "patch", "delete")


class _NoController:
    """Enough of a Controller for the app to be built and to serve its OpenAPI document."""

    recovering = False
    recovery_problems: tuple[str, ...] = ()
    last_event_seq = 0
    #: the default configuration: its id pool's bounds are in the document
    config = ControllerConfig()


def document() -> dict[str, Any]:
    """The OpenAPI document, as GET /openapi.json serves it."""
    shim = Shim(_NoController(), ready=False)  # type: ignore[arg-type]

    async def fetch() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=shim.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://podfsm") as client:
            resp = await client.get("/openapi.json")
            resp.raise_for_status()
            doc: dict[str, Any] = resp.json()
            return doc

    return asyncio.run(fetch())


# ---------------------------------------------------------------------- rendering


def _anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def _type(schema: dict[str, Any]) -> str:
    """A schema in a few words, with links to the named ones."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(SCHEMAS)
        return f"[{name}](#{_anchor(name)})"
    if "enum" in schema:  # narrower than an anyOf beside it (the modes a field supports)
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "anyOf" in schema:
        parts = [s for s in schema["anyOf"] if s.get("type") != "null"]
        nullable = len(parts) < len(schema["anyOf"])
        text = " or ".join(_type(s) for s in parts)
        return f"{text} or null" if nullable else text
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of string to {_type(schema['additionalProperties'])}"
    if kind == "string" and "format" in schema:
        return f"string ({schema['format']})"
    return str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    words = []
    for key, text in (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"),
                      ("maximum", "<= {}"), ("exclusiveMaximum", "< {}"),
                      ("minLength", "length >= {}"), ("maxLength", "length <= {}")):
        if key in schema:
            words.append(text.format(schema[key]))
    if "pattern" in schema.get("propertyNames", {}):
        words.append(f"names match `{schema['propertyNames']['pattern']}`")
    return ", ".join(words)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _media(content: dict[str, Any]) -> str:
    return ", ".join(f"`{m}`" + (f" {_type(c['schema'])}" if "$ref" in c.get("schema", {})
                                 else "") for m, c in content.items())


def _operation(path: str, method: str, op: dict[str, Any], shared: list[Any]) -> list[str]:
    summary = op.get("summary", "")
    out = [f"### `{method.upper()} {path}`", "",
           summary + ("" if summary.endswith((".", "?", "!")) else "."), "",
           f"Operation id: `{op['operationId']}`.", ""]
    params = [*shared, *op.get("parameters", [])]
    if params:
        out += ["| parameter | in | required | type | description |",
                "| --- | --- | --- | --- | --- |"]
        for p in params:
            schema = p.get("schema", {})
            kind = _type(schema)
            if "default" in schema:
                kind += f", default `{schema['default']}`"
            if _constraints(schema):
                kind += f", {_constraints(schema)}"
            out.append(f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} "
                       f"| {_cell(kind)} | {_cell(p.get('description', ''))} |")
        out.append("")
    body = op.get("requestBody")
    if body:
        about = f": {body['description']}" if body.get("description") else ""
        out += [f"Request body ({'required' if body.get('required') else 'optional'}): "
                f"{_media(body['content'])}{about}.", ""]
    out += ["| status | meaning | body |", "| --- | --- | --- |"]
    for status, resp in op["responses"].items():
        out.append(f"| {status} | {_cell(resp.get('description', ''))} | "
                   f"{_media(resp.get('content', {})) or '-'} |")
    out.append("")
    for status, resp in op["responses"].items():
        for name, link in resp.get("links", {}).items():
            params = ", ".join(f"`{k}` = `{v}`" for k, v in link["parameters"].items())
            out.append(f"Link `{name}` ({status}): `{link['operationId']}` with {params}.")
    if any(resp.get("links") for resp in op["responses"].values()):
        out.append("")
    if op.get("security") == []:
        out += ["Served without a token on TCP too.", ""]
    return out


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    if schema.get("description"):
        out += [_cell(schema["description"]), ""]
    if "enum" in schema:
        names = getattr(spec, name, None)
        if isinstance(names, type) and issubclass(names, enum.IntEnum):
            # pod configs may give the name instead of the number, as protobuf JSON allows
            values = ", ".join(f"`{m.value}` ({m.name})" for m in names)
            out += [f"{schema.get('type', 'any')}, or its name: one of {values}.", ""]
        else:
            out += [f"{_type({'type': schema.get('type', 'any')})}: {_type(schema)}.", ""]
        return out
    props = schema.get("properties", {})
    if not props:
        return [*out, f"{_type(schema)}.", ""]
    required = set(schema.get("required", []))
    out += ["| field | type | required | default | constraints |",
            "| --- | --- | --- | --- | --- |"]
    for field, sub in props.items():
        default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
        out.append(f"| `{field}` | {_cell(_type(sub))} | {'yes' if field in required else 'no'} "
                   f"| {default} | {_constraints(sub)} |")
    if schema.get("additionalProperties") is False:
        out += ["", "No other fields."]
    notes = [(field, sub["description"]) for field, sub in props.items() if sub.get("description")]
    if notes:
        out += ["", *(f"- `{field}`: {_cell(text)}." for field, text in notes)]
    rules = {k: schema[k] for k in ("anyOf", "allOf", "if", "then", "else") if k in schema}
    if rules:
        out += ["", "Rules between fields, as JSON Schema states them:", "", "```json",
                json.dumps(rules, indent=1), "```"]
    out.append("")
    return out


def render(doc: dict[str, Any] | None = None) -> str:
    """docs/http.md."""
    doc = doc if doc is not None else document()
    info = doc["info"]
    ops = [(path, method, item[method], item.get("parameters", []))
           for path, item in doc["paths"].items() for method in METHODS if method in item]
    out = [
        "# The HTTP API",
        "",
        "<!-- Generated by docs/gen_http.py from the OpenAPI document; do not edit by hand. -->",
        "",
        f"{info['description']} OpenAPI {doc['openapi']}, podfsm {info['version']}.",
        "",
        "`podfsm serve` listens on a unix socket (default `/run/podfsm/podfsm.sock`, mode 0660),",
        "and on TCP only when given `--port` (on 127.0.0.1 unless `--host` says otherwise).",
        "On TCP every request but the page, `/healthz` and `/openapi.json` needs the token of",
        "`--token-file` as `Authorization: Bearer TOKEN` (or the cookie the URL that `serve`",
        "logs gives the page), a `Host` that names the listener, and, when it changes state, no",
        "foreign `Origin`; see [security.md](security.md#who-may-talk-to-podfsm). The unix socket",
        "needs no token. POST bodies are `application/json` (else 415).",
        "The document itself is served at `GET /openapi.json`; the live web page at `GET /`.",
        "For example, with curl:",
        "",
        "```sh",
        "curl --unix-socket /run/podfsm/podfsm.sock http://podfsm/v1/sandboxes",
        "curl --unix-socket /run/podfsm/podfsm.sock -X POST -H 'content-type: application/json' \\",
        "     --data-binary @examples/pods/userns-allocated.json http://podfsm/v1/sandboxes",
        "curl -N --unix-socket /run/podfsm/podfsm.sock http://podfsm/v1/events",
        "```",
        "",
        "examples/curl.sh runs a whole session this way.",
        "",
        "## Errors",
        "",
        "Every error is a JSON [ErrorBody](#errorbody): `error` says what went wrong in words,",
        "`kind` names it (`SandboxNotFound`, `NameReserved`, `InvalidPodConfig`, `BadRequest`,",
        "`SandboxRunError`, ...); a failed run adds `step` (the step that failed) and `leftovers`",
        "(what unwinding could not remove; empty when everything was unwound). 404 unknown",
        "sandbox, 409 a conflict with the sandboxes that exist (a name or host ids in use, a",
        "full node), 422 an invalid pod config (nothing was created; see below), 400 a",
        "malformed parameter, 401/403 TCP without the token or from elsewhere, 413 a body over",
        "1 MiB, 415 a body that is not JSON, 500 a run that failed (any other 500 says only its",
        "incident number; the daemon's log has the rest), 503 while the controller starts or",
        "recovers, or when too many event streams are open (with `Retry-After`; nothing was",
        "done, so retrying is safe). A method a path does not serve is 405 with an `Allow` that",
        "lists every method it does (HEAD with GET; OPTIONS is not served).",
        "",
        "Stopping and removing are idempotent, as the CRI's StopPodSandbox and RemovePodSandbox",
        "(and crictl's `stopp` and `rmp`, which print `Stopped sandbox ID` / `Removed sandbox ID`",
        "and exit 0): `POST /v1/sandboxes/{id}/stop` of an unknown id is 204 (no body),",
        "`DELETE` of one is 204. The CLI's `stopp` and `rmp` do the same.",
        "",
        "## Containers",
        "",
        "`/v1/containers` holds the container verbs (the CRI's container RPCs; the CLI's",
        "`create`, `start`, `stop`, `rm`, `ps`, `inspect`, `logs`, `exec -s` and `stats` use",
        "them). `POST /v1/containers` takes `{\"sandbox_id\": ..., \"config\": <the CRI",
        "ContainerConfig>}`: an unknown sandbox is 404 whatever the config, a refused config",
        "422 (`InvalidContainerConfig` names the field), an image not pulled 404",
        "(`ImageNotFound`), a name used in the pod 409 (`ContainerNameReserved`), a pod not",
        "Ready or with a user namespace 409 (`ContainerPrecondition`); nothing was made. A verb",
        "in the wrong state (start of a container not Created, exec in one not Running) is 409",
        "`ContainerPrecondition`. Stop and remove are idempotent as in the CRI (an Exited",
        "container stops as a no-op, an unknown id is removed already); stop of an unknown id",
        "is 404. `POST .../exec` answers the command's exit code, stdout and stderr once it has",
        "ended, or 504 `ExecTimeout` once it outlived `timeout` and was killed. `GET .../logs`",
        "is the CRI log's lines as `text/plain` (`<time> stdout|stderr P|F <text>`);",
        "`?follow=true` streams new lines until the container has exited (the stream then",
        "ends), `?tail=N` starts with the last N lines. `GET /v1/sandboxes/{id}/graph` of a",
        "pod with containers draws each container's machine beside the pod's;",
        "`GET /v1/graph?machine=container` the container machine.",
        "",
        "## Events",
        "",
        "`GET /v1/events` is a Server-Sent Events stream: each transition is one event whose",
        "`id:` is its sequence number and whose `data:` is a [TransitionEvent](#transitionevent);",
        "a comment line is sent as a heartbeat. A client that reconnects with `Last-Event-ID`",
        "(browsers' EventSource does) or `?since=N` first gets the transitions after that number",
        "that the daemon still holds. The stream ends when the daemon shuts down, and when a",
        "client falls 256 events behind (it resumes with `Last-Event-ID`).",
        "",
        "## What runSandbox answers",
        "",
        "A pod config the document calls valid is run: 201 with its status, Ready. Otherwise",
        "nothing was created, and the answer says why:",
        "",
        "- **409 Conflict**: the config is fine, but conflicts with the sandboxes that exist:",
        "  one with the same name, namespace, uid and attempt (`NameReserved`, as a CRI",
        "  runtime reserves names), or the host id range asked for overlaps another sandbox's",
        "  or the id pool has no free range (`IdRangeUnavailable`), or the sandboxes there",
        "  are already take what one list answer may carry (`NodeFull`, see",
        "  [security.md](security.md)). The same request may succeed once those sandboxes",
        "  are removed.",
        "- **422 Unprocessable Content**: the config is refused (`InvalidPodConfig`, naming the",
        "  field and the rule): either it breaks a rule the schema states (a client that",
        "  validates against the document never sends it), or one of the few rules the schema",
        "  can only say in words, in the fields' descriptions: `host_id + length` inside the id",
        "  pool, `run_as_user`, `run_as_group` and `supplemental_groups` inside the pod's mapped",
        "  ids, a sysctl a pod on this host lacks or a value its kernel refuses (tried in new",
        "  namespaces before anything is made), a port mapping's host_ip that is not this",
        "  host's or of a family the pod network lacks, a repeated host port, a Localhost",
        "  seccomp profile that is not a readable profile file, SELinux or AppArmor settings",
        "  on a host that enables them,",
        "  paths whose segments pass 255 bytes; or the query's `runtime_handler` is not",
        "  installed.",
        "- **500**: the run failed at a step (`step`; `leftovers` what unwinding could not",
        "  remove), e.g. the runtime could not create the pause.",
        "",
        "Rules that depend on the daemon's configuration are stated per daemon in the document",
        "it serves: the id pool's bounds on `host_id` and `length`, `cgroup_parent` under its",
        "`cgroup_root`, the installed runtime handlers, the sysctls a pod on this host has",
        "(listed once, in new namespaces) and the addresses a `host_ip` may name (the host's,",
        "its bridges' aside, of the pod network's families). This page shows the defaults.",
        "",
        "## Checked by schemathesis",
        "",
        "[schemathesis](https://schemathesis.readthedocs.io) checks this document against a",
        "real `podfsm serve --port` with the token: every check, every phase, every warning a",
        "failure, and no status allowed beyond what it accepts by default",
        "(tests/integration/schemathesis.toml): a pod config the document calls valid must be",
        "answered 2xx (or 409). tests/integration/schemathesis_hooks.py keeps the generated",
        "valid configs to the rules the schema says only in words (above), naming each rule; the",
        "negative cases are left as generated. The stateful phase follows the links below from",
        "the id a run returns to the operations that take it, creating and removing real",
        "sandboxes: the test asserts that each link from a run was followed to a 2xx and that",
        "at least one sandbox went through a whole lifecycle (run, then status, graph and stop,",
        "then remove, each answered 2xx). The container operations meet no container there",
        "(their cases get 404 or the document's refusals; every route of theirs is driven with",
        "real containers by tests/unit/test_container_faces.py and",
        "tests/integration/test_container_faces.py): they stay out of the stateful phase and",
        "their \"missing test data\" warning is off; createContainer skips the coverage phase",
        "(its walk of the whole ContainerConfig took over 2 minutes), fuzzing sends it valid and",
        "invalid configs; a 413 counts as a refusal of an oversized invalid body. The test",
        "suite runs it with 2 examples per operation and up to 40 stateful scenarios of up to",
        "16 steps (tests/integration/test_faces.py::test_schemathesis_against_a_real_daemon:",
        "about 1700 cases, 18 stateful links followed, 4 to 4.5 minutes on a loaded 2-core",
        "machine, the container operations 17 s of its coverage phase); the longer run is",
        "`PODFSM_SCHEMATHESIS_EXAMPLES=100` for the test, or",
        "by hand:",
        "",
        "```sh",
        "podfsm serve --port 8080 &    # the token is in http-token beside the socket",
        "SCHEMATHESIS_HOOKS=tests/integration/schemathesis_hooks.py \\",
        "schemathesis --config-file tests/integration/schemathesis.toml run \\",
        "    http://127.0.0.1:8080/openapi.json --checks all -n 100 --workers 1 \\",
        "    --header \"Authorization: Bearer $(cat /run/podfsm/http-token)\"",
        "```",
        "",
        "It runs one worker: two threads of Hypothesis on CPython 3.11 hit the interpreter's",
        "shared AST-constructor depth counter (\"AST constructor recursion depth mismatch\",",
        "python/cpython#106905).",
        "",
        "Query parameters are the fields of each operation's query model in",
        "`podfsm/faces/wire.py` (the server validates with the same model), request and",
        "response bodies are the pydantic models themselves: the document carries their",
        "constraints as the models state them.",
        "",
        "## Endpoints",
        "",
        "| method | path | summary |",
        "| --- | --- | --- |",
        *(f"| {m.upper()} | [`{p}`](#{_anchor(f'{m} {p}')}) | "
          f"{_cell(o.get('summary', ''))} |" for p, m, o, _ in ops),
        "",
    ]
    for path, method, op, shared in ops:
        out += _operation(path, method, op, shared)
    out += ["## Schemas", ""]
    for name, schema in sorted(doc["components"]["schemas"].items()):
        out += _schema(name, schema)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/http.md from the OpenAPI document.")
    parser.add_argument("--check", action="store_true",
                        help="only compare: exit 1 if docs/http.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python docs/gen_http.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
