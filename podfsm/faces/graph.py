"""State diagrams, derived from the one state table (podfsm.core.states.TRANSITIONS).

Two views: the whole machine, and one sandbox's machine, which is the same diagram with the
sandbox's current state highlighted and the path its history took drawn on it: every edge taken
is coloured and carries the numbers of its steps in order, a step that failed or that unwound a
failure (a history entry with an error) is red, and a compensating step is dashed.

Transitions with the same source and destination are drawn as one edge that lists their
triggers. Output is Mermaid (stateDiagram-v2) text, Graphviz DOT text, or SVG/PNG made by running
Graphviz's `dot`. Everything here is a pure function of the table and the given status, except
`render`, which runs `dot` for the image formats.
"""

from __future__ import annotations

import enum
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from podfsm.core.errors import PrerequisiteMissing, StepFailed
from podfsm.core.records import HistoryEntry, SandboxStatus
from podfsm.core.states import COMPENSATIONS, FORWARD, INITIAL, STATES, TRANSITIONS, Trigger

#: the formats `render` makes, by file extension
FORMATS: tuple[str, ...] = ("mmd", "dot", "svg", "png")
MEDIA_TYPES: dict[str, str] = {
    "mmd": "text/vnd.mermaid; charset=utf-8",
    "dot": "text/vnd.graphviz; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
}

_DOT_TIMEOUT = 30.0


class StepKind(enum.StrEnum):
    """What a trigger is in the table: a forward step, a compensating step or anything else."""

    FORWARD = "forward"
    COMPENSATING = "compensating"
    OTHER = "other"


_FORWARD = frozenset(t.value for t in FORWARD)
_COMPENSATING = frozenset(t.value for t in COMPENSATIONS.values() if t is not None)


def step_kind(trigger: str) -> StepKind:
    """The kind of the trigger named `trigger` (OTHER for a name the table does not know)."""
    if trigger in _FORWARD:
        return StepKind.FORWARD
    if trigger in _COMPENSATING:
        return StepKind.COMPENSATING
    return StepKind.OTHER


@dataclass(frozen=True)
class Edge:
    """One arrow of the diagram: every transition of the table from `source` to `dest`."""

    source: str
    dest: str
    triggers: tuple[Trigger, ...]

    @property
    def kind(self) -> StepKind:
        """The edge's kind: its first trigger's (the table never mixes kinds on one edge)."""
        return step_kind(self.triggers[0])


def edges() -> tuple[Edge, ...]:
    """The table's transitions grouped by (source, dest), in the table's order."""
    grouped: dict[tuple[str, str], list[Trigger]] = {}
    for t in TRANSITIONS:
        grouped.setdefault((t.source.value, t.dest.value), []).append(t.trigger)
    return tuple(Edge(src, dst, tuple(trigs)) for (src, dst), trigs in grouped.items())


@dataclass(frozen=True)
class Step:
    """One history entry of a sandbox, numbered from 1 in the order it happened."""

    number: int
    entry: HistoryEntry

    @property
    def failed(self) -> bool:
        return self.entry.error is not None

    def tag(self) -> str:
        """How the step shows on its edge: its number, marked when it carries an error."""
        return f"{self.number} error" if self.failed else str(self.number)


@dataclass(frozen=True)
class _Path:
    """A sandbox's history laid onto the table's edges."""

    steps: tuple[Step, ...]

    def on(self, edge: Edge, trigger: Trigger) -> list[Step]:
        return [s for s in self.steps
                if (s.entry.source, s.entry.dest, s.entry.trigger)
                == (edge.source, edge.dest, trigger.value)]

    def visited(self) -> set[str]:
        """The states the sandbox has been in."""
        return {INITIAL.value, *(s.entry.dest for s in self.steps)}


def _path(status: SandboxStatus | None) -> _Path | None:
    if status is None:
        return None
    return _Path(tuple(Step(i, h) for i, h in enumerate(status.history, start=1)))


def _label_parts(edge: Edge, path: _Path | None) -> Iterator[tuple[str, list[Step]]]:
    for trig in edge.triggers:
        taken = path.on(edge, trig) if path is not None else []
        text = trig.value
        if taken:
            text += " (" + ", ".join(s.tag() for s in taken) + ")"
        yield text, taken


def _title(status: SandboxStatus) -> str:
    return f"{status.namespace}/{status.name} {status.id[:13]}: {status.state.value}"


# ---------------------------------------------------------------------- Mermaid

_MERMAID_CLASSES = (
    "classDef current fill:#ffd54f,stroke:#e65100,stroke-width:3px,font-weight:bold",
    "classDef visited fill:#e3f2fd,stroke:#1565c0",
)


def mermaid(status: SandboxStatus | None = None) -> str:
    """The machine as Mermaid stateDiagram-v2 text; with `status`, that sandbox's machine:
    current state in class `current`, states it passed through in class `visited`, the numbers
    of its steps on the edges taken, and its history as %% comments."""
    path = _path(status)
    lines = ["stateDiagram-v2"]
    if status is not None:
        lines.append(f"    %% sandbox {_title(status)}")
        for step in path.steps if path else ():
            h = step.entry
            error = f" error: {_one_line(h.error)}" if h.error else ""
            lines.append(f"    %% {step.number}. {h.source} -> {h.dest} {h.trigger} "
                         f"at {h.at.isoformat()}{error}")
    lines.append(f"    [*] --> {INITIAL.value}")
    for edge in edges():
        label = " / ".join(text for text, _ in _label_parts(edge, path))
        lines.append(f"    {edge.source} --> {edge.dest} : {label}")
    if status is not None and path is not None:
        lines.extend(f"    {c}" for c in _MERMAID_CLASSES)
        for state in STATES:
            if state is status.state:
                lines.append(f"    class {state.value} current")
            elif state.value in path.visited():
                lines.append(f"    class {state.value} visited")
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------- Graphviz DOT

_COLOURS = {
    StepKind.FORWARD: "#1565c0",
    StepKind.COMPENSATING: "#ef6c00",
    StepKind.OTHER: "#616161",
}
_ERROR_COLOUR = "#c62828"
_UNTAKEN_COLOUR = "#bdbdbd"
_STYLES = {StepKind.FORWARD: "solid", StepKind.COMPENSATING: "dashed", StepKind.OTHER: "solid"}


def _q(text: str) -> str:
    """A DOT double-quoted string. Backslashes are doubled so that label escapes such as \\N in
    an error message stay literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(**attrs: str | float) -> str:
    return "[" + ", ".join(f"{k}={_q(str(v))}" for k, v in attrs.items()) + "]"


def dot(status: SandboxStatus | None = None) -> str:
    """The machine as Graphviz DOT text; with `status`, that sandbox's machine: the current
    state filled and bold (SVG class `current`), states passed through tinted, edges taken
    coloured and numbered, the rest greyed. Every node's SVG id is `state-<Name>`."""
    path = _path(status)
    title = "podfsm sandbox state machine" if status is None else _title(status)
    if status is not None and status.last_error:
        title += "\nlast error: " + _one_line(status.last_error)[:300]
    graph_attrs = _attrs(label=title, labelloc="t", fontname="Helvetica", rankdir="TB",
                         nodesep=0.6, ranksep=0.55, tooltip=title)
    node_attrs = _attrs(shape="box", style="rounded,filled", fillcolor="white",
                        fontname="Helvetica", color="#424242")
    out = [
        "digraph podfsm {",
        f"  graph {graph_attrs};",
        f"  node {node_attrs};",
        f"  edge {_attrs(fontname='Helvetica', fontsize=10)};",
        f"  __initial {_attrs(shape='point', width=0.18, label='', tooltip='start')};",
    ]
    visited = path.visited() if path is not None else set()
    for state in STATES:
        attrs: dict[str, str | float] = {"id": f"state-{state.value}", "tooltip": state.value}
        if status is not None and state is status.state:
            attrs.update(fillcolor="#ffd54f", color="#e65100", penwidth=3,
                         fontname="Helvetica-Bold", **{"class": "state current"})
        elif state.value in visited:
            attrs.update(fillcolor="#e3f2fd", color="#1565c0", penwidth=1.5,
                         **{"class": "state visited"})
        else:
            attrs.update({"class": "state"})
        out.append(f"  {_q(state.value)} {_attrs(**attrs)};")
    out.append(f"  __initial -> {_q(INITIAL.value)};")
    for edge in edges():
        out.append(f"  {_q(edge.source)} -> {_q(edge.dest)} {_attrs(**_edge_attrs(edge, path))};")
    out.append("}")
    return "\n".join(out) + "\n"


def _edge_attrs(edge: Edge, path: _Path | None) -> dict[str, str | float]:
    parts = list(_label_parts(edge, path))
    steps = [s for _, taken in parts for s in taken]
    colour = _COLOURS[edge.kind]
    attrs: dict[str, str | float] = {
        "label": "\n".join(text for text, _ in parts),
        "style": _STYLES[edge.kind],
        "tooltip": " / ".join(t.value for t in edge.triggers),
    }
    if path is None:
        attrs.update(color=colour, fontcolor=colour)
    elif not steps:
        attrs.update(color=_UNTAKEN_COLOUR, fontcolor=_UNTAKEN_COLOUR)
    else:
        if any(s.failed for s in steps):
            colour = _ERROR_COLOUR
        attrs.update(color=colour, fontcolor=colour, penwidth=2.5, fontname="Helvetica-Bold",
                     tooltip="\n".join(_describe(s) for s in steps))
        attrs["class"] = "taken"
    return attrs


def _describe(step: Step) -> str:
    h = step.entry
    text = f"{step.number}. {h.trigger}: {h.source} -> {h.dest} at {h.at.isoformat()}"
    if h.error:
        text += f"\nerror: {_one_line(h.error)}"
    return text


# ---------------------------------------------------------------------- rendering

def format_of(filename: str) -> str:
    """The format a file name asks for by its extension; ValueError for any other."""
    ext = os.path.splitext(filename)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(
            f"cannot tell the diagram format of {filename!r}: use a file name ending in "
            + ", ".join(f".{f}" for f in FORMATS)
        )
    return ext


def render(fmt: str, status: SandboxStatus | None = None) -> bytes:
    """The diagram (of the machine, or of `status`'s sandbox) in `fmt`, one of FORMATS.
    SVG and PNG run Graphviz's `dot`."""
    if fmt == "mmd":
        return mermaid(status).encode()
    source = dot(status)
    if fmt == "dot":
        return source.encode()
    if fmt not in FORMATS:
        raise ValueError(f"unknown diagram format {fmt!r} (one of {', '.join(FORMATS)})")
    return run_dot(source, fmt)


def run_dot(source: str, fmt: str) -> bytes:
    """Lay out DOT `source` with Graphviz's `dot` into `fmt` (svg or png)."""
    try:
        proc = subprocess.run(["dot", f"-T{fmt}"], input=source.encode(), capture_output=True,
                              timeout=_DOT_TIMEOUT, check=False)
    except FileNotFoundError:
        raise PrerequisiteMissing(
            "Graphviz's `dot` is needed to draw SVG or PNG diagrams: install graphviz "
            "(or ask for the .mmd or .dot text)"
        ) from None
    except subprocess.TimeoutExpired:
        raise StepFailed("render diagram", f"dot -T{fmt} took over {_DOT_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        raise StepFailed("render diagram",
                         f"dot -T{fmt} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
