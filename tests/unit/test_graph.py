"""Diagrams: every state and transition of the table appears, and a sandbox's diagram
highlights its real current state and the path its history took."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from podfsm.core.records import HistoryEntry, SandboxStatus
from podfsm.core.states import STATES, TRANSITIONS, State
from podfsm.faces import graph

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"
FORWARD_PATH = [
    ("Unknown", "NamespacesReady", "setup_namespaces"),
    ("NamespacesReady", "ContainerCreated", "create_container"),
    ("ContainerCreated", "TaskRunning", "start_task"),
    ("TaskRunning", "Ready", "mark_ready"),
]
# start fails, kill_task unwinds it, runtime delete fails: the sandbox is left NotReady
FAILED_PATH = [
    ("Unknown", "NamespacesReady", "setup_namespaces", None),
    ("NamespacesReady", "ContainerCreated", "create_container", None),
    ("ContainerCreated", "TaskRunning", "start_task", None),
    ("TaskRunning", "ContainerCreated", "kill_task", "runtime start: \\N \"boom\""),
    ("ContainerCreated", "NotReady", "fail", "runtime start: \\N \"boom\""),
    ("NotReady", "NotReady", "stop", None),
]


def status(state: State, path: list[tuple[str, str, str, str | None]],
           last_error: str | None = None) -> SandboxStatus:
    history = [HistoryEntry(source=s, dest=d, trigger=t, at=T0 + timedelta(seconds=i), error=e)
               for i, (s, d, t, e) in enumerate(path)]
    return SandboxStatus(
        id="ab" * 32, name="web", namespace="default", uid="u1", attempt=0, state=state,
        created_at=T0, runtime="runc", pid=None, netns_path=None, userns_path=None, ip="",
        additional_ips=[], uid_mappings=[], gid_mappings=[], exit_status=None, finished_at=None,
        labels={}, annotations={}, last_error=last_error, leftovers=[], history=history)


READY = status(State.READY, [(*p, None) for p in FORWARD_PATH])
FAILED = status(State.NOT_READY, FAILED_PATH, last_error="run_sandbox failed at 'start_task'")


def mermaid_edges(text: str) -> dict[tuple[str, str], str]:
    """(source, dest) -> label of every `A --> B : label` line."""
    found = re.findall(r"^\s+(\w+) --> (\w+) : (.*)$", text, re.MULTILINE)
    return {(s, d): label for s, d, label in found}


def dot_edges(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """(source, dest) -> attributes of every `"A" -> "B" [...]` line."""
    out = {}
    for s, d, attrs in re.findall(r'^\s+"(\w+)" -> "(\w+)" \[(.*)\];$', text, re.MULTILINE):
        out[(s, d)] = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', attrs))
    return out


def dot_nodes(text: str) -> dict[str, dict[str, str]]:
    out = {}
    for name, attrs in re.findall(r'^\s+"(\w+)" \[(.*)\];$', text, re.MULTILINE):
        out[name] = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', attrs))
    return out


@pytest.mark.parametrize("st", [None, READY, FAILED], ids=["machine", "ready", "failed"])
def test_every_state_and_transition_of_the_table_is_in_the_mermaid_text(
    st: SandboxStatus | None,
) -> None:
    text = graph.mermaid(st)
    assert text.startswith("stateDiagram-v2\n")
    assert "[*] --> Unknown" in text
    edges = mermaid_edges(text)
    for state in STATES:
        assert any(state.value in pair for pair in edges), state
    for t in TRANSITIONS:
        label = edges[(t.source.value, t.dest.value)]
        assert t.trigger.value in [part.split(" (")[0] for part in label.split(" / ")], label
    # nothing beyond the table
    assert set(edges) == {(t.source.value, t.dest.value) for t in TRANSITIONS}


@pytest.mark.parametrize("st", [None, READY, FAILED], ids=["machine", "ready", "failed"])
def test_every_state_and_transition_of_the_table_is_in_the_dot_text(
    st: SandboxStatus | None,
) -> None:
    text = graph.dot(st)
    assert set(dot_nodes(text)) == {s.value for s in STATES}
    edges = dot_edges(text)
    assert set(edges) == {(t.source.value, t.dest.value) for t in TRANSITIONS}
    for t in TRANSITIONS:
        lines = edges[(t.source.value, t.dest.value)]["label"].split("\\n")
        assert any(line.split(" (")[0] == t.trigger.value for line in lines), (t, lines)


def test_the_machine_diagram_highlights_nothing() -> None:
    assert "current" not in graph.mermaid()
    assert "current" not in graph.dot()
    assert "(1" not in graph.dot()


def test_mermaid_highlights_the_current_state_and_the_states_passed_through() -> None:
    text = graph.mermaid(FAILED)
    classes = dict(re.findall(r"^\s+class (\w+) (\w+)$", text, re.MULTILINE))
    assert classes == {"Unknown": "visited", "NamespacesReady": "visited",
                       "ContainerCreated": "visited", "TaskRunning": "visited",
                       "NotReady": "current"}
    ready = dict(re.findall(r"^\s+class (\w+) (\w+)$", graph.mermaid(READY), re.MULTILINE))
    assert ready["Ready"] == "current"
    assert "NotReady" not in ready


def test_mermaid_numbers_the_steps_taken_in_order_and_marks_failures() -> None:
    edges = mermaid_edges(graph.mermaid(FAILED))
    assert edges[("Unknown", "NamespacesReady")] == "setup_namespaces (1)"
    assert edges[("ContainerCreated", "TaskRunning")] == "start_task (3)"
    assert edges[("TaskRunning", "ContainerCreated")] == "kill_task (4 error)"
    assert edges[("ContainerCreated", "NotReady")] == "fail (5 error) / stop"
    assert edges[("NotReady", "NotReady")] == "stop (6)"
    assert edges[("TaskRunning", "Ready")] == "mark_ready"  # never taken: no number
    # the history is kept as comments, errors included, on one line each
    comments = re.findall(r"^\s+%% (\d+)\. (.*)$", graph.mermaid(FAILED), re.MULTILINE)
    assert [int(n) for n, _ in comments] == [1, 2, 3, 4, 5, 6]
    assert 'error: runtime start: \\N "boom"' in comments[3][1]


def test_dot_highlights_the_current_state_and_tints_the_states_passed_through() -> None:
    nodes = dot_nodes(graph.dot(FAILED))
    assert nodes["NotReady"]["class"] == "state current"
    assert [n for n, a in nodes.items() if "current" in a["class"]] == ["NotReady"]
    assert {n for n, a in nodes.items() if a["class"] == "state visited"} == {
        "Unknown", "NamespacesReady", "ContainerCreated", "TaskRunning"}
    assert nodes["Ready"]["class"] == "state"
    assert dot_nodes(graph.dot(READY))["Ready"]["class"] == "state current"


def test_dot_colours_and_numbers_the_path_taken_and_greys_the_rest() -> None:
    edges = dot_edges(graph.dot(FAILED))
    taken = {pair: a for pair, a in edges.items() if a.get("class") == "taken"}
    assert set(taken) == {(s, d) for s, d, _, _ in FAILED_PATH}
    forward = taken[("Unknown", "NamespacesReady")]
    assert forward["label"] == "setup_namespaces (1)"
    assert forward["color"] == "#1565c0" and forward["style"] == "solid"
    # a compensating step is dashed; one that unwound a failure is red and says why
    unwound = taken[("TaskRunning", "ContainerCreated")]
    assert unwound["label"] == "kill_task (4 error)"
    assert unwound["style"] == "dashed" and unwound["color"] == "#c62828"
    assert 'error: runtime start: \\\\N \\"boom\\"' in unwound["tooltip"]
    assert taken[("ContainerCreated", "NotReady")]["label"] == "fail (5 error)\\nstop"
    assert taken[("NotReady", "NotReady")]["label"] == "stop (6)"
    for pair, attrs in edges.items():
        if pair not in taken:
            assert attrs["color"] == "#bdbdbd" and "(" not in attrs["label"], pair
    assert "last error: run_sandbox failed at 'start_task'" in graph.dot(FAILED)


def test_a_step_taken_twice_lists_both_numbers() -> None:
    st = status(State.NOT_READY, [("Unknown", "NotReady", "stop", None),
                                  ("NotReady", "NotReady", "stop", None),
                                  ("NotReady", "NotReady", "stop", None)])
    assert mermaid_edges(graph.mermaid(st))[("NotReady", "NotReady")] == "stop (2, 3)"
    assert dot_edges(graph.dot(st))[("NotReady", "NotReady")]["label"] == "stop (2, 3)"


@pytest.mark.parametrize("st", [None, FAILED], ids=["machine", "failed"])
def test_svg_is_xml_with_every_state_and_the_highlight(st: SandboxStatus | None) -> None:
    root = ET.fromstring(graph.render("svg", st))
    assert root.tag == f"{SVG}svg"
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert {s.value for s in STATES} <= texts
    groups = {g.get("id"): g.get("class", "") for g in root.iter(f"{SVG}g")}
    for s in STATES:
        assert f"state-{s.value}" in groups
    current = [i for i, c in groups.items() if "current" in c.split()]
    assert current == ([] if st is None else ["state-NotReady"])


def test_png_is_a_png() -> None:
    assert graph.render("png", READY).startswith(b"\x89PNG\r\n\x1a\n")


def test_text_formats_render_as_their_text() -> None:
    assert graph.render("mmd", READY).decode() == graph.mermaid(READY)
    assert graph.render("dot").decode() == graph.dot()


@pytest.mark.parametrize(("name", "fmt"), [("a.mmd", "mmd"), ("x/b.DOT", "dot"),
                                           ("c.svg", "svg"), ("d.png", "png")])
def test_the_format_comes_from_the_file_extension(name: str, fmt: str) -> None:
    assert graph.format_of(name) == fmt


@pytest.mark.parametrize("name", ["a.jpg", "noext", "a.svg.txt"])
def test_an_unknown_extension_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"\.mmd"):
        graph.format_of(name)
    with pytest.raises(ValueError):
        graph.render(name.rpartition(".")[2] or "x")


def test_a_missing_dot_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from podfsm.core.errors import PrerequisiteMissing

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PrerequisiteMissing, match="graphviz"):
        graph.render("svg")
    assert graph.render("mmd")  # the text formats need no binary


def test_step_kinds_come_from_the_table() -> None:
    assert graph.step_kind("setup_namespaces") is graph.StepKind.FORWARD
    assert graph.step_kind("teardown_namespaces") is graph.StepKind.COMPENSATING
    assert graph.step_kind("stop") is graph.StepKind.OTHER
    assert all(e.kind is graph.step_kind(t) for e in graph.edges() for t in e.triggers)
