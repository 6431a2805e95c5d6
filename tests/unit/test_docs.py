"""The docs cannot drift from the code: docs/http.md is what docs/gen_http.py makes from the
OpenAPI document now, and the CLI page names every verb the command line has."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from podfsm.faces import cli
from podfsm.faces.http import openapi_document

DOCS = Path(__file__).resolve().parents[2] / "docs"


def gen_http() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_http", DOCS / "gen_http.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_http", module)
    spec.loader.exec_module(module)
    return module


def test_http_md_is_what_gen_http_makes_now() -> None:
    made = gen_http().render()
    assert (DOCS / "http.md").read_text() == made, \
        "docs/http.md is out of date: run .venv/bin/python docs/gen_http.py"


def test_http_md_covers_every_operation_status_and_schema() -> None:
    doc = openapi_document()
    text = (DOCS / "http.md").read_text()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert f"### `{method.upper()} {path}`" in text
            assert f"Operation id: `{op['operationId']}`" in text
    for name in doc["components"]["schemas"]:
        assert f"\n### {name}\n" in text
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    anchors = {gen_http()._anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}
    assert links <= anchors, links - anchors


def test_cli_md_names_every_verb_and_exit_status() -> None:
    text = (DOCS / "cli.md").read_text()
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    for verb in sub.choices:
        assert f"podfsm {verb}" in text, verb
    for code in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_NO_DAEMON):
        assert f"| {code} |" in text


def test_the_state_diagram_in_how_it_works_is_the_table_now() -> None:
    from podfsm.faces.graph import mermaid

    text = (DOCS / "how-it-works.md").read_text()
    block = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert block == mermaid().rstrip("\n") + "\n", \
        "regenerate the block with `podfsm graph` (docs/how-it-works.md, States)"


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_layout_in_readme_and_how_it_works_names_every_module() -> None:
    import podfsm

    package = Path(podfsm.__file__).parent
    modules = {p.name for p in package.rglob("*.py") if p.name not in ("__init__.py",
                                                                       "__main__.py")}
    for path, heading in ((DOCS.parent / "README.md", "Layout"),
                          (DOCS / "how-it-works.md", "Where each part lives")):
        section = _section(path, heading)
        missing = sorted(m for m in modules if f"{m}`" not in section)
        assert not missing, f"{path.name} ({heading}) does not name {missing}"
