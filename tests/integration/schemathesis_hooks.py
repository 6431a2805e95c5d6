"""schemathesis hooks (SCHEMATHESIS_HOOKS) for the run of tests/integration/test_faces.py and
the longer run of docs/http.md.

A generated pod config that the document calls valid must be accepted, so runSandbox may
answer 201 or 409 (a conflict with the sandboxes that exist) and nothing else. A few rules
JSON Schema cannot state: the document says them in words (the fields' descriptions), and
`repair_pod_config` below makes each generated positive case keep them, each repair naming its
rule. Negative cases are left as generated: they must stay refused.

- arithmetic between fields: a requested mapping's host_id + length inside the id pool (the
  pool's end is the document's bound on host_id); run_as_user, run_as_group and
  supplemental_groups inside the pod's mapped container ids;
- the host: each sysctl must exist in the kernel and take the value given (the generated
  values are random text: the sysctls are dropped); a Localhost seccomp profile must be a file
  (the one written here); SELinux and AppArmor settings where the host enables them;
- bytes the kernel counts where the pattern counts characters: path segments of at most 255
  bytes and whole paths of cgroup_parent and log_directory; log_directory is moved below a
  directory of this run, so that the directories podfsm makes for it stay out of the host's /.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from typing import Any

import schemathesis
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation

#: the ids podfsm allocates when a POD user namespace asks for none
ALLOCATED = 65536
NAME_MAX = 255

_SCRATCH = tempfile.mkdtemp(prefix="podfsm-st-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
#: a Localhost seccomp profile that exists: allow everything (the pause makes few calls)
SECCOMP_PROFILE = os.path.join(_SCRATCH, "seccomp.json")
with open(SECCOMP_PROFILE, "w") as _f:
    json.dump({"defaultAction": "SCMP_ACT_ALLOW"}, _f)
#: where the log directories of generated pods go
LOG_ROOT = os.path.join(_SCRATCH, "logs")


def _positive_body(case: Any) -> bool:
    meta = case.meta
    if meta is None:
        return True
    component = meta.components.get(ParameterLocation.BODY)
    mode = component.mode if component is not None else meta.generation.mode
    return bool(mode == GenerationMode.POSITIVE)


def _pool_end(case: Any) -> int:
    """One past the last host id of the daemon's pool: the document's bound on host_id + 1."""
    found: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            bound = node.get("host_id")
            if isinstance(bound, dict) and isinstance(bound.get("maximum"), int):
                found.append(bound["maximum"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(case.operation.schema.raw_schema["components"]["schemas"]["UserNamespace"])
    return min(found) + 1


def _dict(parent: Any, key: str) -> dict[str, Any] | None:
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, dict) else None


def _fit_path(path: str, prefix: str, most: int) -> str:
    """`path` below `prefix`, its segments at most NAME_MAX bytes, the whole at most `most`."""
    parts = [p if len(p.encode()) <= NAME_MAX else p.encode()[:NAME_MAX].decode(errors="ignore")
             for p in path.split("/")]
    out = prefix + "/".join(parts)
    while len(out.encode()) > most or out.rsplit("/", 1)[-1] == "..":
        out = out[:-1]
    return out


@schemathesis.hook.apply_to(operation_id="runSandbox")
def map_case(context: Any, case: Any) -> Any:
    if isinstance(case.body, dict) and _positive_body(case):
        repair_pod_config(case.body, _pool_end(case))
    return case


def repair_pod_config(body: dict[str, Any], pool_end: int) -> None:
    """Make a schema-valid pod config keep the rules the schema cannot state (in place)."""
    if isinstance(body.get("log_directory"), str) and body["log_directory"]:
        body["log_directory"] = _fit_path(body["log_directory"], LOG_ROOT, 4095)
    linux = _dict(body, "linux")
    if linux is None:
        return
    if linux.get("sysctls"):
        linux["sysctls"] = {}  # which exist, and which values each takes, is the kernel's
    if isinstance(linux.get("cgroup_parent"), str):
        linux["cgroup_parent"] = _fit_path(linux["cgroup_parent"], "", 1024)
    sc = _dict(linux, "security_context")
    if sc is None:
        return
    if os.path.exists("/sys/fs/selinux/enforce"):
        sc.pop("selinux_options", None)
    if os.path.exists("/sys/module/apparmor/parameters/enabled"):
        sc.pop("apparmor", None)
    seccomp = _dict(sc, "seccomp")
    if seccomp is not None and seccomp.get("profile_type") in ("Localhost", 2):
        seccomp["localhost_ref"] = SECCOMP_PROFILE
    if str(sc.get("seccomp_profile_path", "")).startswith("localhost/"):
        sc["seccomp_profile_path"] = "localhost/" + SECCOMP_PROFILE
    us = _dict(_dict(sc, "namespace_options"), "userns_options")
    if us is None or us.get("mode", "POD") not in ("POD", 0):
        return  # no pod user namespace: every id is the host's
    lengths = {}
    for kind in ("uids", "gids"):
        maps = us.get(kind) or [{"length": ALLOCATED}]
        for m in maps:  # host_id + length inside the pool
            if isinstance(m.get("host_id"), int) and isinstance(m.get("length"), int):
                m["length"] = min(m["length"], pool_end - m["host_id"])
        lengths[kind] = maps[0].get("length", 0) or 1
    for field, kind in (("run_as_user", "uids"), ("run_as_group", "gids")):
        wrapper = _dict(sc, field)
        if wrapper is not None and isinstance(wrapper.get("value"), int):
            wrapper["value"] %= lengths[kind]  # a container id the mapping holds
    if isinstance(sc.get("supplemental_groups"), list):
        sc["supplemental_groups"] = [g % lengths["gids"] for g in sc["supplemental_groups"]]


@schemathesis.hook.apply_to(operation_id="imageStatus")
def map_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Half of the positive cases ask for the image the test pulled before the run (its id is
    SCHEMATHESIS_IMAGE_ID): a random id names no image."""
    held = os.environ.get("SCHEMATHESIS_IMAGE_ID")
    if held and path_parameters is not None and random.random() < 0.5:
        path_parameters["image_id"] = held
    return path_parameters
