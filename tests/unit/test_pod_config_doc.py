"""docs/pod-config.md lists every field of the pod config model, and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from podfsm.core.spec import LinuxContainerResources, PodSandboxConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "pod-config.md"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
        for inner in get_args(t):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.add(path)
        sub = _model_of(info.annotation)
        if sub is LinuxContainerResources or sub is None:
            continue
        if sub.__name__ == "IDMapping" and path.endswith(".gids"):
            continue  # the table says "as uids"
        paths |= field_paths(sub, path + ".")
    return paths


def documented() -> set[str]:
    rows = re.findall(r"^\| `([^`]+)`", DOC.read_text(), re.MULTILINE)
    return set(rows)


def test_every_field_has_a_row_and_every_row_a_field() -> None:
    # the resources fields share one row, checked by the next test
    want = field_paths(PodSandboxConfig) | {"linux.overhead.*"}
    have = documented()
    assert want - have == set(), f"fields missing from docs/pod-config.md: {want - have}"
    assert have - want == set(), f"rows of docs/pod-config.md that are not fields: {have - want}"


def test_the_resources_row_names_every_resources_field() -> None:
    row = next(line for line in DOC.read_text().splitlines()
               if line.startswith("| `linux.overhead.*`"))
    for name in LinuxContainerResources.model_fields:
        assert f"`{name}`" in row, name


def test_every_example_pod_config_is_accepted() -> None:
    from podfsm.core.spec import parse_pod_config

    # examples/pods are run side by side by the faces' test; examples/pod-config (a port
    # mapping, a log directory under /var/log) is only read
    examples = sorted((DOC.parents[1] / "examples").glob("pod*/*.json"))
    assert len(examples) >= 5
    for path in examples:
        parse_pod_config(json.loads(path.read_text()))
