"""A pod's diagram: its sandbox's machine and, beside it, one machine per container of the pod
(podfsm.core.containerstates' table), each with its current state highlighted and the path
its history took numbered on the edges, as faces/graph.py draws a sandbox alone. Also the
container machine by itself (`podfsm graph --containers`).

Mermaid: one composite state per machine (`state "..." as sandbox { ... }`), the containers'
states prefixed `c<n>_` (Mermaid's state names are global). DOT: one cluster per machine; SVG
node ids `sandbox-state-<Name>` and `container-<id13>-state-<Name>`. Pure functions of the
tables and the statuses, except `render_pod` for the image formats (Graphviz's dot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from podfsm.core import containerstates as cs
from podfsm.core.containerrecords import ContainerStatus
from podfsm.core.records import HistoryEntry, SandboxStatus
from podfsm.core.states import INITIAL as SANDBOX_INITIAL
from podfsm.core.states import STATES as SANDBOX_STATES
from podfsm.faces import graph
from podfsm.faces.graph import StepKind

_FORWARD = frozenset({cs.ContainerTrigger.CREATE.value, cs.ContainerTrigger.START.value})
_COMPENSATING = frozenset({cs.ContainerTrigger.REMOVE.value})
_COLOURS = {StepKind.FORWARD: "#1565c0", StepKind.COMPENSATING: "#ef6c00",
            StepKind.OTHER: "#616161"}


def container_step_kind(trigger: str) -> StepKind:
    """create and start go forward, remove unwinds, the rest (exit, stop, fail) are other."""
    if trigger in _FORWARD:
        return StepKind.FORWARD
    if trigger in _COMPENSATING:
        return StepKind.COMPENSATING
    return StepKind.OTHER


@dataclass(frozen=True)
class _Machine:
    """One machine to draw: its states, edges (source, dest, triggers), and an instance's
    history and current state (none for the bare machine)."""

    key: str  # the prefix of its node ids
    title: str
    states: tuple[str, ...]
    initial: str
    edges: tuple[tuple[str, str, tuple[str, ...], StepKind], ...]
    history: tuple[HistoryEntry, ...] = ()
    current: str | None = None

    def steps_on(self, source: str, dest: str, trigger: str) -> list[tuple[int, bool]]:
        return [(i, h.error is not None) for i, h in enumerate(self.history, start=1)
                if (h.source, h.dest, h.trigger) == (source, dest, trigger)]

    def label(self, source: str, dest: str, triggers: tuple[str, ...]) -> list[str]:
        out = []
        for trig in triggers:
            taken = self.steps_on(source, dest, trig)
            tags = ", ".join(f"{n} error" if err else str(n) for n, err in taken)
            out.append(f"{trig} ({tags})" if taken else trig)
        return out

    def visited(self) -> set[str]:
        return {self.initial, *(h.dest for h in self.history)}


def _container_edges() -> tuple[tuple[str, str, tuple[str, ...], StepKind], ...]:
    grouped: dict[tuple[str, str], list[str]] = {}
    for t in cs.TRANSITIONS:
        grouped.setdefault((t.source.value, t.dest.value), []).append(t.trigger.value)
    return tuple((s, d, tuple(trigs), container_step_kind(trigs[0]))
                 for (s, d), trigs in grouped.items())


def _sandbox_machine(st: SandboxStatus) -> _Machine:
    return _Machine("sandbox", f"sandbox {st.namespace}/{st.name} {st.id[:13]}: "
                    f"{st.state.value}", tuple(s.value for s in SANDBOX_STATES),
                    SANDBOX_INITIAL.value,
                    tuple((e.source, e.dest, tuple(t.value for t in e.triggers), e.kind)
                          for e in graph.edges()),
                    tuple(st.history), st.state.value)


def _container_machine(st: ContainerStatus | None, n: int = 0) -> _Machine:
    states = tuple(s.value for s in cs.STATES)
    if st is None:
        return _Machine("container", "podfsm container state machine", states,
                        cs.INITIAL.value, _container_edges())
    return _Machine(f"c{n}", f"container {st.name} {st.id[:13]}: {st.state.value}", states,
                    cs.INITIAL.value, _container_edges(), tuple(st.history), st.state.value)


def _machines(sandbox: SandboxStatus, containers: Sequence[ContainerStatus]) -> list[_Machine]:
    return [_sandbox_machine(sandbox),
            *(_container_machine(c, n) for n, c in enumerate(containers, start=1))]


# ---------------------------------------------------------------------- Mermaid

def _mermaid_machine(m: _Machine, prefix: str) -> list[str]:
    def sid(state: str) -> str:
        return f"{prefix}{state}"

    lines = [f'    state "{m.title}" as {m.key} {{']
    if prefix:
        lines += [f'        state "{s}" as {sid(s)}' for s in m.states]
    lines.append(f"        [*] --> {sid(m.initial)}")
    for source, dest, trigs, _ in m.edges:
        lines.append(f"        {sid(source)} --> {sid(dest)} : "
                     + " / ".join(m.label(source, dest, trigs)))
    lines.append("    }")
    for i, h in enumerate(m.history, start=1):
        err = f" error: {' '.join(h.error.split())}" if h.error else ""
        lines.append(f"    %% {m.key} {i}. {h.source} -> {h.dest} {h.trigger} "
                     f"at {h.at.isoformat()}{err}")
    if m.current is not None:
        visited = m.visited()
        for s in m.states:
            if s == m.current:
                lines.append(f"    class {sid(s)} current")
            elif s in visited:
                lines.append(f"    class {sid(s)} visited")
    return lines


def pod_mermaid(sandbox: SandboxStatus, containers: Sequence[ContainerStatus]) -> str:
    """The pod as Mermaid stateDiagram-v2 text: a composite state per machine."""
    lines = ["stateDiagram-v2"]
    for m in _machines(sandbox, containers):
        lines += _mermaid_machine(m, "" if m.key == "sandbox" else f"{m.key}_")
    lines += [f"    {c}" for c in graph._MERMAID_CLASSES]
    return "\n".join(lines) + "\n"


def container_mermaid() -> str:
    """The container machine alone, as Mermaid."""
    m = _container_machine(None)
    lines = ["stateDiagram-v2", f"    [*] --> {m.initial}"]
    lines += [f"    {s} --> {d} : {' / '.join(t)}" for s, d, t, _ in m.edges]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- DOT

def _dot_machine(m: _Machine, node_id: str, cluster: bool) -> list[str]:
    q, attrs = graph._q, graph._attrs

    def nid(state: str) -> str:
        return q(f"{m.key}:{state}")

    out = [f"  subgraph {q('cluster_' + m.key)} {{" if cluster else "  {",
           f"    graph {attrs(label=m.title, fontname='Helvetica', color='#9e9e9e')};",
           f"    {q(m.key + ':__initial')} {attrs(shape='point', width=0.18, label='')};"]
    visited = m.visited() if m.current is not None else set()
    for s in m.states:
        a: dict[str, str | float] = {"id": f"{node_id}-state-{s}" if node_id else f"state-{s}",
                                     "label": s, "tooltip": s,
                                     "class": "state"}
        if s == m.current:
            a.update(fillcolor="#ffd54f", color="#e65100", penwidth=3,
                     fontname="Helvetica-Bold", **{"class": "state current"})
        elif s in visited:
            a.update(fillcolor="#e3f2fd", color="#1565c0", penwidth=1.5,
                     **{"class": "state visited"})
        out.append(f"    {nid(s)} {attrs(**a)};")
    out.append(f"    {q(m.key + ':__initial')} -> {nid(m.initial)};")
    for source, dest, trigs, kind in m.edges:
        taken = [step for t in trigs for step in m.steps_on(source, dest, t)]
        colour = _COLOURS[kind]
        e: dict[str, str | float] = {"label": "\n".join(m.label(source, dest, trigs)),
                                     "style": "dashed" if kind is StepKind.COMPENSATING
                                     else "solid", "tooltip": " / ".join(trigs)}
        if m.current is None:
            e.update(color=colour, fontcolor=colour)
        elif not taken:
            e.update(color="#bdbdbd", fontcolor="#bdbdbd")
        else:
            colour = "#c62828" if any(err for _, err in taken) else colour
            e.update(color=colour, fontcolor=colour, penwidth=2.5, fontname="Helvetica-Bold",
                     **{"class": "taken"})
        out.append(f"    {nid(source)} -> {nid(dest)} {attrs(**e)};")
    out.append("  }")
    return out


def _digraph(title: str, body: list[str]) -> str:
    a = graph._attrs
    node = a(shape="box", style="rounded,filled", fillcolor="white", fontname="Helvetica",
             color="#424242")
    return "\n".join([
        "digraph podfsm {",
        f"  graph {a(label=title, labelloc='t', fontname='Helvetica', rankdir='TB')};",
        f"  node {node};",
        f"  edge {a(fontname='Helvetica', fontsize=10)};",
        *body, "}"]) + "\n"


def pod_dot(sandbox: SandboxStatus, containers: Sequence[ContainerStatus]) -> str:
    """The pod as Graphviz DOT: a cluster per machine."""
    body: list[str] = []
    for m, st in zip(_machines(sandbox, containers), [None, *containers], strict=True):
        body += _dot_machine(m, "sandbox" if st is None else f"container-{st.id[:13]}",
                             cluster=True)
    return _digraph(f"pod {sandbox.namespace}/{sandbox.name} and its "
                    f"{len(containers)} container(s)", body)


def container_dot() -> str:
    """The container machine alone, as DOT."""
    return _digraph("podfsm container state machine",
                    _dot_machine(_container_machine(None), "", cluster=False))


def render_pod(fmt: str, sandbox: SandboxStatus, containers: Sequence[ContainerStatus]
               ) -> bytes:
    """The pod's diagram in `fmt` (graph.FORMATS); SVG and PNG run Graphviz's dot."""
    if fmt == "mmd":
        return pod_mermaid(sandbox, containers).encode()
    source = pod_dot(sandbox, containers)
    return source.encode() if fmt == "dot" else graph.run_dot(source, fmt)


def render_containers(fmt: str) -> bytes:
    """The container machine's diagram in `fmt`."""
    if fmt == "mmd":
        return container_mermaid().encode()
    source = container_dot()
    return source.encode() if fmt == "dot" else graph.run_dot(source, fmt)
