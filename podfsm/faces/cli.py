"""The `podfsm` command line.

    podfsm serve [--socket S] [--state-dir D] [--run-dir D] [--netns-dir D] [--runtime R]
                 [--cni-conf-dir D] [--host H --port P [--token-file F]] [--cri-socket PATH]
                 [--registry-config-dir DIR] [--image-dir DIR]
    podfsm runp FILE [--runtime R]      run a sandbox from a crictl pod config; prints its id
    podfsm pods [-o table|json] [-q]    list sandboxes
    podfsm inspectp ID [-o table|json]  one sandbox's status and history
    podfsm stopp ID...                  stop sandboxes (NotReady)
    podfsm rmp ID...                    remove sandboxes
    podfsm events [--since N]           stream transitions until the daemon stops
    podfsm pull | images | inspecti | rmi   images, as crictl's verbs (faces/imagecli.py)
    podfsm create | start | stop | rm | ps | inspect | logs | exec -s | stats
                                        containers, as crictl's verbs (faces/containercli.py)
    podfsm graph [ID] [--containers] [-o FILE]
                                        a diagram: .mmd .dot .svg .png (Mermaid on stdout); of
                                        a pod: its machine and its containers'

    podfsm debug failpoints             the failpoint names for PODFSM_FAILPOINTS
    podfsm demo | bench                 see their --help

Client verbs find the daemon by --socket, else $PODFSM_SOCKET, else /run/podfsm/podfsm.sock, and
take a sandbox id or a unique prefix of one. Exit status: 0 success; 1 the request failed (the
daemon's error, or a bad input file); 2 no daemon answers, or the command line is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from podfsm import __version__
from podfsm.core import failpoints
from podfsm.core.errors import PodfsmError, shown_id
from podfsm.core.records import SandboxStatus, TransitionEvent
from podfsm.faces import containercli, graph, imagecli, podgraph
from podfsm.faces.client import ApiError, Client, DaemonUnreachable, resolve_socket

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_DAEMON = 2
EXIT_USAGE = 2
_RUNTIMES = ("runc", "crun")

ClientVerb = Callable[[Client, argparse.Namespace], Awaitable[int]]


class _UsageError(Exception):
    """A command line that argparse accepted but that makes no sense."""


def main(argv: list[str] | None = None) -> int:
    """Run the podfsm command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.run(args)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"podfsm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`podfsm pods | head`): not an error of ours; keep Python from
        # complaining again while it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="podfsm", description="Pod sandboxes with a pod-level user namespace, as "
        "finite-state machines.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 success, 1 the request failed, 2 no daemon answers or bad usage.")
    parser.add_argument("--version", action="version", version=f"podfsm {__version__}")
    parser.add_argument("--socket", help="the daemon's unix socket (default: $PODFSM_SOCKET, "
                        "else /run/podfsm/podfsm.sock)")
    sub = parser.add_subparsers(metavar="VERB", required=True)

    # A client verb's own --socket must not reset one given before the verb.
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--socket", default=argparse.SUPPRESS,
                        help="the daemon's unix socket (default: $PODFSM_SOCKET, else "
                        "/run/podfsm/podfsm.sock)")

    p = sub.add_parser("serve", help="run the controller and its HTTP shim (as root)")
    _dir_options(p)
    p.add_argument("--socket", default=argparse.SUPPRESS,
                   help="unix socket to listen on (default: $PODFSM_SOCKET, else "
                   "/run/podfsm/podfsm.sock), mode 0660")
    p.add_argument("--host", help="TCP address to listen on too (needs --port; default "
                   "127.0.0.1)")
    p.add_argument("--port", type=int, help="also listen on this TCP port (the web page); TCP "
                   "requests need the token of --token-file")
    p.add_argument("--token-file", metavar="PATH", help="the TCP token, mode 0600, created "
                   "with a random token when missing (default: http-token beside the socket)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection whose request head takes longer (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close a connection whose request body takes longer (default 30)")
    p.add_argument("--max-event-streams", type=int, default=64, metavar="N",
                   help="event streams open at once; more get 503 (default 64)")
    p.add_argument("--cri-socket", default="/run/podfsm/cri.sock", metavar="PATH",
                   help="unix socket of the CRI v1 gRPC face, mode 0660, there once recovery "
                   "is done (default /run/podfsm/cri.sock; '' for none)")
    p.add_argument("--registry-config-dir", metavar="DIR",
                   help="registry hosts configuration, containerd's certs.d format: "
                   "DIR/<host>/hosts.toml (default /etc/podfsm/certs.d)")
    p.add_argument("--image-dir", metavar="DIR",
                   help="the image store (default <state-dir>/images)")
    p.add_argument("--stream-address", default="127.0.0.1", metavar="ADDR",
                   help="address of the streaming server whose URLs CRI Exec, Attach and "
                   "PortForward answer (default 127.0.0.1: whoever reaches it with a URL "
                   "gets into a pod)")
    p.add_argument("--stream-port", type=int, default=0, metavar="PORT",
                   help="its TCP port (default 0: a free one; -1: no streaming server)")
    p.set_defaults(run=_serve)

    p = sub.add_parser("runp", parents=[client], help="run a sandbox from a pod config file")
    p.add_argument("file", metavar="FILE", help="crictl pod config JSON ('-': stdin)")
    p.add_argument("--runtime", metavar="HANDLER",
                   help="runtime handler of this sandbox: runc or crun (default: the daemon's)")
    p.set_defaults(run=_runp)

    p = sub.add_parser("pods", parents=[client], help="list sandboxes")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("-q", "--quiet", action="store_true", help="only the ids")
    p.add_argument("--state", help="only sandboxes in this state")
    p.add_argument("--namespace", help="only sandboxes in this namespace")
    p.add_argument("--name", help="only sandboxes whose name contains this")
    p.set_defaults(run=_client_verb(_pods))

    p = sub.add_parser("inspectp", parents=[client], help="one sandbox's status and history")
    p.add_argument("id", metavar="ID", help="sandbox id or a unique prefix")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=_client_verb(_inspectp))

    imagecli.add_verbs(sub, client, _client_verb)
    containercli.add_verbs(sub, client, _client_verb)

    p = sub.add_parser("stopp", parents=[client], help="stop sandboxes (NotReady)")
    p.add_argument("ids", metavar="ID", nargs="+")
    p.set_defaults(run=_client_verb(_stopp))

    p = sub.add_parser("rmp", parents=[client], help="remove sandboxes")
    p.add_argument("ids", metavar="ID", nargs="+")
    p.set_defaults(run=_client_verb(_rmp))

    p = sub.add_parser("events", parents=[client], help="stream transitions")
    p.add_argument("--since", type=int, metavar="N",
                   help="first replay the transitions after event N (still held by the daemon)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(run=_client_verb(_events))

    p = sub.add_parser("graph", parents=[client], help="draw the state machine, or a sandbox's")
    p.add_argument("id", metavar="ID", nargs="?",
                   help="a sandbox (from the daemon): its machine and its containers'; "
                   "without it, the machine (no daemon needed)")
    p.add_argument("--containers", action="store_true",
                   help="without ID: the container state machine instead of the sandbox's")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write here, format by extension: .mmd .dot .svg .png "
                   "(default: Mermaid text on stdout)")
    p.set_defaults(run=_graph)

    p = sub.add_parser("debug", help="debugging aids")
    debug = p.add_subparsers(metavar="WHAT", required=True)
    d = debug.add_parser("failpoints", help="list the failpoint names for PODFSM_FAILPOINTS")
    d.set_defaults(run=_failpoints)

    p = sub.add_parser("demo", help="run one real pod with a pod user namespace, prove it, "
                       "tear it down (as root)")
    _dir_options(p)
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench", help="time sandbox lifecycles (as root)")
    p.add_argument("-n", "--count", type=_positive, default=20,
                   help="sandboxes per run (default 20)")
    p.add_argument("--concurrency", action=_ListAction, item=_positive, default=[1, 4, 16],
                   metavar="N[,N...]", help="parallel sandboxes (default 1,4,16)")
    p.add_argument("--runtime", action=_ListAction, item=_runtime, default=list(_RUNTIMES),
                   metavar="R[,R...]", help="runtimes to measure (default runc,crun)")
    p.add_argument("--json", action="store_true", help="results as JSON")
    p.add_argument("--cri", action="store_true",
                   help="also run each level through the CRI face (a gRPC load generator in "
                   "its own process) and print the gRPC server's CPU per cycle")
    p.add_argument("--exit-samples", type=_positive, default=20, metavar="N",
                   help="task exits to time, from kill -9 to NotReady (default 20)")
    p.add_argument("--ready", type=int, default=0, metavar="N",
                   help="also hold N sandboxes Ready: memory, and recovery after a restart")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="also run N lifecycles watching open fds and memory for leaks")
    p.add_argument("--run-on-disk", action="store_true",
                   help="keep the run and netns directories on the disk of the temporary "
                   "directory, not on a tmpfs of the bench's own (as /run is on systemd hosts)")
    p.add_argument("--chaos", type=int, default=0, metavar="N",
                   help="instead: N rounds of random operations, failpoints and SIGKILLs, "
                        "checking the invariants after each recovery (see docs/security.md)")
    p.add_argument("--unpack", action="store_true",
                   help="instead: the image layer extractor's throughput next to GNU tar's on "
                        "a busybox layer and a synthetic 95 MB one (see docs/images.md)")
    p.add_argument("--containers", action="store_true",
                   help="instead: pod + one container (busybox sleep) created, started, stopped "
                        "and removed, beside the pods-only baseline (see docs/containers.md)")
    p.add_argument("--unpack-dir", metavar="DIR",
                   help="with --unpack or --pull: work under DIR (default: the temporary "
                   "directory)")
    p.add_argument("--pull", action="store_true",
                   help="instead: cold and warm pulls of a 3-layer image from a registry on "
                   "127.0.0.1, and its unpacking next to GNU tar's (see docs/performance.md)")
    p.add_argument("--pull-runs", type=_positive, default=5, metavar="N",
                   help="with --pull: runs of each (default 5)")
    p.add_argument("--pull-small", type=_positive, default=12000, metavar="N",
                   help="with --pull: small files in the second layer (default 12000)")
    p.add_argument("--pull-big", type=_positive, default=4, metavar="N",
                   help="with --pull: big files in the third layer (default 4)")
    p.add_argument("--pull-big-mb", type=_positive, default=8, metavar="MB",
                   help="with --pull: MiB of each big file (default 8)")
    p.set_defaults(run=_bench)
    return parser


def _dir_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="where records are kept (default /var/lib/podfsm)")
    p.add_argument("--run-dir", help="runtime state, bundles, pins (default /run/podfsm)")
    p.add_argument("--netns-dir", help="where netns are pinned (default /run/netns)")
    p.add_argument("--runtime", choices=_RUNTIMES, help="OCI runtime (default runc)")
    p.add_argument("--cni-conf-dir", help="CNI network configs (default /etc/cni/net.d)")


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError(value)
    return n


def _runtime(value: str) -> str:
    if value not in _RUNTIMES:
        raise ValueError(value)
    return value


class _ListAction(argparse.Action):
    """A comma list that may also be repeated: `--x 1,2 --x 3` is [1, 2, 3]. Given at all, it
    replaces the default."""

    def __init__(self, option_strings: Sequence[str], dest: str, *,
                 item: Callable[[str], Any], **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self._item = item

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        assert isinstance(values, str)
        items = getattr(namespace, self.dest)
        items = [] if items is self.default else list(items)
        for part in values.split(","):
            try:
                items.append(self._item(part.strip()))
            except ValueError:
                parser.error(f"{option_string}: invalid value {part.strip()!r}")
        setattr(namespace, self.dest, items)


# ---------------------------------------------------------------------- verbs without a daemon

def _serve(args: argparse.Namespace) -> int:
    from podfsm.config import ControllerConfig
    from podfsm.faces.http import serve

    if args.host is not None and args.port is None:
        raise _UsageError("--host needs --port")
    if args.token_file is not None and args.port is None:
        raise _UsageError("--token-file needs --port (the unix socket takes no token)")
    if args.stream_port > 65535 or args.stream_port < -1:
        raise _UsageError(f"--stream-port {args.stream_port} is not a port (0: a free one, "
                          "-1: none)")
    if min(args.header_timeout, args.body_timeout) <= 0 or args.max_event_streams < 1:
        raise _UsageError("--header-timeout, --body-timeout and --max-event-streams must be "
                          "positive")
    try:
        cfg = ControllerConfig.model_validate(_dirs(args))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"podfsm serve: bad configuration: {problems}", file=sys.stderr)
        return EXIT_FAILED
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    for chatty in ("transitions", "httpx"):  # a line per callback or request drowns the rest
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        asyncio.run(serve(cfg, resolve_socket(args.socket), args.host, args.port,
                          token_file=args.token_file, header_timeout=args.header_timeout,
                          body_timeout=args.body_timeout,
                          max_streams=args.max_event_streams,
                          cri_socket=args.cri_socket or None,
                          stream_address=args.stream_address,
                          stream_port=None if args.stream_port < 0 else args.stream_port))
    except PodfsmError as exc:
        print(f"podfsm serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _dirs(args: argparse.Namespace) -> dict[str, str]:
    names = ("state_dir", "run_dir", "netns_dir", "runtime", "cni_conf_dir",
             "registry_config_dir", "image_dir")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _failpoints(args: argparse.Namespace) -> int:
    for name in failpoints.NAMES:
        print(name)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from podfsm.tools.demo import main as demo_main

    return demo_main(args)


def _bench(args: argparse.Namespace) -> int:
    from podfsm.tools.benchmain import main as bench_main

    return bench_main(args)


def _graph(args: argparse.Namespace) -> int:
    try:
        fmt = graph.format_of(args.output) if args.output else "mmd"
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if args.id is not None:
        if args.containers:
            raise _UsageError("--containers draws the container machine: give no ID (a "
                              "sandbox's diagram shows its containers already)")
        fetch = _client_verb(lambda c, a: _fetch_graph(c, a, fmt))
        return fetch(args)
    try:
        _write(args.output, podgraph.render_containers(fmt) if args.containers
               else graph.render(fmt))
    except (PodfsmError, OSError) as exc:
        print(f"podfsm graph: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


async def _fetch_graph(c: Client, args: argparse.Namespace, fmt: str) -> int:
    sandbox_id = await c.resolve_id(args.id)
    _write(args.output, await c.graph(fmt, sandbox_id))
    return EXIT_OK


def _write(path: str | None, data: bytes) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------- client verbs

def _client_verb(verb: ClientVerb) -> Callable[[argparse.Namespace], int]:
    """Run `verb` with a Client of the daemon; map its failures to exit statuses."""

    def run(args: argparse.Namespace) -> int:
        async def call() -> int:
            async with Client(resolve_socket(args.socket)) as c:
                return await verb(c, args)

        try:
            return asyncio.run(call())
        except DaemonUnreachable as exc:
            print(f"podfsm: {exc}", file=sys.stderr)
            return EXIT_NO_DAEMON
        except ApiError as exc:
            print(f"podfsm: {exc.message}", file=sys.stderr)
            return EXIT_FAILED
        except OSError as exc:  # the output went away (a closed pipe) or a file failed
            print(f"podfsm: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return run


def _runp(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        pod = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"podfsm: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"podfsm: {args.file} is not JSON: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not isinstance(pod, dict):
        print(f"podfsm: {args.file}: a pod config is a JSON object", file=sys.stderr)
        return EXIT_FAILED

    async def run(c: Client, args: argparse.Namespace) -> int:
        st = await c.run_sandbox(pod, runtime_handler=args.runtime)
        print(st.id)
        return EXIT_OK

    return _client_verb(run)(args)


async def _pods(c: Client, args: argparse.Namespace) -> int:
    sts = [st for st in await c.list_sandboxes()
           if (args.state is None or st.state.value.lower() == args.state.lower())
           and (args.namespace is None or st.namespace == args.namespace)
           and (args.name is None or args.name in st.name)]
    if args.quiet:
        for st in sts:
            print(st.id)
    elif args.output == "json":
        print(json.dumps({"items": [st.model_dump(mode="json") for st in sts]}, indent=2))
    else:
        now = datetime.now(UTC)
        print(_table(["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME",
                      "IP"],
                     [[st.id[:13], _ago(st.created_at, now), st.state.value, st.name,
                       st.namespace, str(st.attempt), st.runtime, st.ip or "-"] for st in sts]))
    return EXIT_OK


async def _inspectp(c: Client, args: argparse.Namespace) -> int:
    st = await c.sandbox_status(await c.resolve_id(args.id))
    if args.output == "json":
        print(st.model_dump_json(indent=2))
    else:
        print(describe(st))
    return EXIT_OK


async def _stopp(c: Client, args: argparse.Namespace) -> int:
    return await _each(args.ids, c, "Stopped", c.stop_sandbox)


async def _rmp(c: Client, args: argparse.Namespace) -> int:
    return await _each(args.ids, c, "Removed", c.remove_sandbox)


async def _each(ids: list[str], c: Client, done: str,
                action: Callable[[str], Awaitable[object]]) -> int:
    """Apply `action` to every id; report each failure and go on (as crictl does). Stop and
    remove are idempotent, as in the CRI: an id that names no sandbox is stopped and removed
    already, and gets crictl's line and exit 0."""
    code = EXIT_OK
    for given in ids:
        sandbox_id = given
        try:
            sandbox_id = await c.resolve_id(given)
            await action(sandbox_id)
        except ApiError as exc:
            if exc.status == 404:
                print(f"{done} sandbox {sandbox_id}")
                continue
            print(f"podfsm: {shown_id(given)}: {exc.message}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        print(f"{done} sandbox {sandbox_id}")
    return code


async def _events(c: Client, args: argparse.Namespace) -> int:
    async for ev in c.events(since=args.since):
        print(ev.model_dump_json() if args.output == "json" else event_line(ev), flush=True)
    return EXIT_OK


# ---------------------------------------------------------------------- human output

def event_line(ev: TransitionEvent) -> str:
    """One transition as a line of `podfsm events`."""
    line = (f"{ev.seq:>5} {ev.at.isoformat(timespec='milliseconds')} {ev.sandbox_id[:13]} "
            f"{ev.source} -> {ev.dest} ({ev.trigger})")
    return line + (f" error: {ev.error}" if ev.error else "")


def describe(st: SandboxStatus) -> str:
    """A sandbox's status for people (`inspectp` without -o json)."""
    now = datetime.now(UTC)

    def maps(ms: list[Any]) -> str:
        return ", ".join(f"{m.container_id} -> {m.host_id} ({m.length})" for m in ms) or "-"

    rows = [
        ("ID", st.id),
        ("Name", f"{st.namespace}/{st.name}" + (f" (uid {st.uid})" if st.uid else "")
         + f", attempt {st.attempt}"),
        ("State", st.state.value),
        ("Created", f"{st.created_at.isoformat(timespec='seconds')} "
                    f"({_ago(st.created_at, now)})"),
        ("Runtime", st.runtime),
        ("PID", "-" if st.pid is None else str(st.pid)),
        ("IP", ", ".join([st.ip, *st.additional_ips]) if st.ip else "-"),
        ("Netns", st.netns_path or "- (host network)"),
        ("Userns", st.userns_path or "- (host user namespace)"),
        ("UID map", maps(st.uid_mappings)),
        ("GID map", maps(st.gid_mappings)),
        ("Exit status", "-" if st.exit_status is None else str(st.exit_status)),
    ]
    if st.last_error:
        rows.append(("Last error", st.last_error))
    rows.extend(("Left over", x) for x in st.leftovers)
    width = max(len(k) for k, _ in rows) + 2
    out = [f"{k + ':':<{width}}{v}" for k, v in rows]
    out.append("History:")
    hist = [[str(i), h.at.isoformat(timespec="milliseconds"), h.trigger,
             f"{h.source} -> {h.dest}", h.error or ""] for i, h in enumerate(st.history, 1)]
    out.append(_indent(_table(["#", "AT", "TRIGGER", "TRANSITION", "ERROR"], hist)))
    return "\n".join(out)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in [headers, *rows]]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _ago(then: datetime, now: datetime) -> str:
    s = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"

