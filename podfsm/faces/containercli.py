"""The container verbs of the command line, in crictl's shapes (cri-tools 1.26
cmd/crictl/container.go, logs.go, exec.go, container_stats.go):

    podfsm create POD_ID CONTAINER.json POD.json   the new container's id
    podfsm start ID...                             each id started
    podfsm stop [-t SECONDS] ID...                 each id stopped
    podfsm rm [-f] ID...                           each id removed (-f: a running one too)
    podfsm ps [-a] [--pod ID] [--state S] [--label K=V] [-q] [-o table|json]
    podfsm inspect [-o json|table] ID...           {"status": {...}, "info": {...}}
    podfsm logs [-f] [--tail N] [-t] ID            the log's text, stdout and stderr apart
    podfsm exec -s [--timeout S] ID CMD...         its output; exit status the command's
    podfsm stats [-a] [-s SECONDS] [-o table|json] [ID]

IDs are container ids or unique prefixes (POD_ID a sandbox's). The JSON is crictl's: the CRI
messages in protobuf's JSON mapping (lowerCamelCase, enums by name, int64 as strings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from podfsm.core.containerrecords import ContainerStatus
from podfsm.faces.client import ApiError, Client
from podfsm.faces.wire import ContainerStatsBody

EXIT_OK, EXIT_FAILED = 0, 1
ClientVerb = Callable[[Client, argparse.Namespace], Awaitable[int]]
#: the label the kubelet puts on a container naming its pod (crictl ps's POD column)
POD_NAME_LABEL = "io.kubernetes.pod.name"
_STATES = ("created", "running", "exited", "unknown")
_PROPAGATION = ("PROPAGATION_PRIVATE", "PROPAGATION_HOST_TO_CONTAINER",
                "PROPAGATION_BIDIRECTIONAL")


def add_verbs(sub: Any, client: argparse.ArgumentParser,
              wrap: Callable[[ClientVerb], Callable[[argparse.Namespace], int]]) -> None:
    """Add create, start, stop, rm, ps, inspect, logs, exec and stats to `sub`."""
    p = sub.add_parser("create", parents=[client],
                       help="create a container in a sandbox (crictl create)")
    p.add_argument("pod", metavar="POD_ID", help="the sandbox's id or a unique prefix")
    p.add_argument("config", metavar="CONTAINER.json", help="the CRI ContainerConfig ('-': "
                   "stdin)")
    p.add_argument("pod_config", metavar="POD.json", help="the pod's config, as crictl takes "
                   "it (read and checked to be a JSON object; the sandbox's own is used)")
    p.set_defaults(run=wrap(_create))

    p = sub.add_parser("start", parents=[client], help="start containers (crictl start)")
    p.add_argument("ids", metavar="ID", nargs="+")
    p.set_defaults(run=wrap(_start))

    p = sub.add_parser("stop", parents=[client], help="stop containers (crictl stop)")
    p.add_argument("-t", "--timeout", type=int, default=0, metavar="SECONDS",
                   help="seconds between the stop signal and SIGKILL (default 0)")
    p.add_argument("ids", metavar="ID", nargs="+")
    p.set_defaults(run=wrap(_stop))

    p = sub.add_parser("rm", parents=[client], help="remove containers (crictl rm)")
    p.add_argument("-f", "--force", action="store_true", help="a running one too (killed)")
    p.add_argument("ids", metavar="ID", nargs="+")
    p.set_defaults(run=wrap(_rm))

    p = sub.add_parser("ps", parents=[client], help="list containers (crictl ps)")
    p.add_argument("-a", "--all", action="store_true", help="every state, not only running")
    p.add_argument("-p", "--pod", metavar="POD_ID", default="",
                   help="only the containers of this sandbox (id or prefix)")
    p.add_argument("--state", choices=_STATES, type=str.lower, help="only this state")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="only containers with this label (repeatable)")
    p.add_argument("--id", default="", help="only ids that start with this")
    p.add_argument("-q", "--quiet", action="store_true", help="only the ids")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=wrap(_ps))

    p = sub.add_parser("inspect", parents=[client],
                       help="containers' status and info (crictl inspect)")
    p.add_argument("ids", metavar="ID", nargs="+")
    p.add_argument("-o", "--output", choices=("json", "table"), default="json")
    p.set_defaults(run=wrap(_inspect))

    p = sub.add_parser("logs", parents=[client], help="a container's log (crictl logs)")
    p.add_argument("id", metavar="ID")
    p.add_argument("-f", "--follow", action="store_true",
                   help="go on with new output until the container has exited")
    p.add_argument("--tail", type=int, default=-1, metavar="N",
                   help="only the last N lines (default: all)")
    p.add_argument("-t", "--timestamps", action="store_true", help="show each line's time")
    p.set_defaults(run=wrap(_logs))

    p = sub.add_parser("exec", parents=[client],
                       help="run a command in a running container (crictl exec -s)")
    p.add_argument("-s", "--sync", action="store_true",
                   help="run it to its end and print its output (the only mode so far)")
    p.add_argument("--timeout", type=int, default=0, metavar="SECONDS",
                   help="kill the command after this long (default: none)")
    p.add_argument("id", metavar="ID")
    p.add_argument("cmd", metavar="CMD", nargs=argparse.REMAINDER)
    p.set_defaults(run=wrap(_exec))

    p = sub.add_parser("stats", parents=[client], help="containers' resource usage "
                       "(crictl stats)")
    p.add_argument("id", metavar="ID", nargs="?")
    p.add_argument("-a", "--all", action="store_true", help="not only running containers")
    p.add_argument("-p", "--pod", metavar="POD_ID", default="", help="only this sandbox's")
    p.add_argument("-s", "--seconds", type=float, default=1.0, metavar="SECONDS",
                   help="CPU sample duration (default 1)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=wrap(_stats))


# ---------------------------------------------------------------------- crictl's formats

def human_duration(seconds: float) -> str:
    """go-units' HumanDuration, as crictl ps's CREATED column shows an age."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{s // 3600 // 24 // 365} years"


def human_size(n: float) -> str:
    """go-units' HumanSize (4 significant digits, SI units), as crictl stats shows sizes."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB"):
        if size < 1000 or unit == "ZB":
            return f"{size:.4g}{unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _ns(at: datetime | None) -> str:
    return "0" if at is None else str(int(at.timestamp() * 1_000_000) * 1000)


def _pb_state(st: ContainerStatus) -> str:
    return f"CONTAINER_{st.state.value.upper()}"


def _metadata(st: ContainerStatus) -> dict[str, Any]:
    return {"name": st.name, "attempt": st.attempt}


def cri_container(st: ContainerStatus) -> dict[str, Any]:
    """A container as crictl ps -o json shows the CRI's Container."""
    return {"id": st.id, "podSandboxId": st.sandbox_id, "metadata": _metadata(st),
            "image": {"image": st.image, "annotations": {}}, "imageRef": st.image_ref,
            "state": _pb_state(st), "createdAt": _ns(st.created_at), "labels": st.labels,
            "annotations": st.annotations}


def cri_status(st: ContainerStatus) -> dict[str, Any]:
    """A container's status as crictl inspect shows the CRI's ContainerStatus."""
    return {"id": st.id, "metadata": _metadata(st), "state": _pb_state(st),
            "createdAt": _ns(st.created_at), "startedAt": _ns(st.started_at),
            "finishedAt": _ns(st.finished_at), "exitCode": st.exit_code or 0,
            "image": {"image": st.image, "annotations": {}}, "imageRef": st.image_ref,
            "reason": st.reason, "message": st.message, "labels": st.labels,
            "annotations": st.annotations,
            "mounts": [{"containerPath": m.get("container_path", ""),
                        "hostPath": m.get("host_path", ""),
                        "readonly": bool(m.get("readonly")),
                        "selinuxRelabel": bool(m.get("selinux_relabel")),
                        "propagation": _PROPAGATION[int(m.get("propagation") or 0)]}
                       for m in st.mounts],
            "logPath": st.log_path}


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
                     .rstrip() for r in [headers, *rows])


def parse_log_line(line: str) -> tuple[str, str, bool, str] | None:
    """A CRI log line `<time> <stream> <P|F> <text>` as (time, stream, full, text); None for
    a line not in that form."""
    parts = line.split(" ", 3)
    if len(parts) < 3 or parts[1] not in ("stdout", "stderr") or parts[2] not in ("P", "F"):
        return None
    return parts[0], parts[1], parts[2] == "F", parts[3] if len(parts) == 4 else ""


# ---------------------------------------------------------------------- verbs

def _read_json_object(path: str, what: str) -> dict[str, Any]:
    """The JSON object in `path` ('-': stdin); ValueError naming the problem."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} is a JSON object")
    return data


async def _create(c: Client, args: argparse.Namespace) -> int:
    try:
        config = _read_json_object(args.config, "container config")
        _read_json_object(args.pod_config, "pod config")
    except ValueError as exc:
        print(f"podfsm: {exc}", file=sys.stderr)
        return EXIT_FAILED
    st = await c.create_container(await c.resolve_id(args.pod), config)
    print(st.id)
    return EXIT_OK


async def _each(c: Client, ids: list[str],
                action: Callable[[str], Awaitable[object]]) -> int:
    """`action` on each container (crictl prints each id done); a failure is reported and
    the rest go on, the exit status is then 1."""
    code = EXIT_OK
    for given in ids:
        try:
            cid = await c.resolve_container_id(given)
            await action(cid)
        except ApiError as exc:
            print(f"podfsm: {given}: {exc.message}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        print(cid)
    return code


async def _start(c: Client, args: argparse.Namespace) -> int:
    return await _each(c, args.ids, c.start_container)


async def _stop(c: Client, args: argparse.Namespace) -> int:
    if args.timeout < 0:
        print("podfsm: stop: --timeout must not be negative", file=sys.stderr)
        return EXIT_FAILED
    return await _each(c, args.ids, lambda cid: c.stop_container(cid, args.timeout))


async def _rm(c: Client, args: argparse.Namespace) -> int:
    async def remove(cid: str) -> None:
        st = await c.container_status(cid)
        if st.state.value == "Running" and not args.force:
            raise ApiError(409, "ContainerRunning",
                           f"container {cid} is running, please stop it first (or rm -f)")
        await c.remove_container(cid)

    return await _each(c, args.ids, remove)


async def _pod_names(c: Client) -> dict[str, str]:
    return {sb.id: sb.name for sb in await c.list_sandboxes()}


async def _ps(c: Client, args: argparse.Namespace) -> int:
    labels: dict[str, str] = {}
    for item in args.label:
        key, eq, value = item.partition("=")
        if not eq or not key:
            print(f"podfsm: ps: --label {item!r} is not KEY=VALUE", file=sys.stderr)
            return EXIT_FAILED
        labels[key] = value
    state = args.state.capitalize() if args.state else (None if args.all else "Running")
    sts = await c.list_containers(id_prefix=args.id, sandbox_id=args.pod, state=state,
                                  labels=labels)
    if args.quiet:
        for st in sts:
            print(st.id)
    elif args.output == "json":
        print(json.dumps({"containers": [cri_container(st) for st in sts]}, indent=2))
    else:
        now = datetime.now(UTC)
        pods = await _pod_names(c) if sts else {}
        rows = [[st.id[:13], _image_column(st.image),
                 human_duration((now - st.created_at).total_seconds()) + " ago",
                 st.state.value, st.name, str(st.attempt), st.sandbox_id[:13],
                 st.labels.get(POD_NAME_LABEL) or pods.get(st.sandbox_id, "unknown")]
                for st in sts]
        print(_table(["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID",
                      "POD"], rows))
    return EXIT_OK


def _image_column(image: str) -> str:
    """crictl truncates an image given as a digest (`sha256:<hex>`) to 13 hex digits."""
    algo, colon, digest = image.partition(":")
    if colon and algo == "sha256" and len(digest) == 64:
        return digest[:13]
    return image


async def _inspect(c: Client, args: argparse.Namespace) -> int:
    code = EXIT_OK
    for given in args.ids:
        try:
            cid = await c.resolve_container_id(given)
            st = await c.container_status(cid)
            info = await c.container_info(cid) if args.output == "json" else {}
        except ApiError as exc:
            print(f"podfsm: {given}: {exc.message}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        if args.output == "json":
            print(json.dumps({"status": cri_status(st), "info": info}, indent=2))
        else:
            print(_describe(st))
    return code


def _describe(st: ContainerStatus) -> str:
    """crictl inspect -o table's lines."""
    def at(t: datetime | None) -> str:
        return "-" if t is None else t.isoformat(timespec="seconds")

    rows = [("ID", st.id), ("Name", st.name), ("State", _pb_state(st)),
            ("Created", at(st.created_at)), ("Started", at(st.started_at)),
            ("Finished", at(st.finished_at)), ("Exit Code", str(st.exit_code or 0)),
            ("Reason", st.reason or "-"), ("Image", st.image), ("ImageRef", st.image_ref),
            ("Pod", st.sandbox_id), ("Log", st.log_path or "-"), ("Runtime", st.runtime),
            ("PID", "-" if st.pid is None else str(st.pid))]
    rows += [(f"Label {k}", v) for k, v in sorted(st.labels.items())]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k + ':':<{width}}{v}" for k, v in rows)


async def _logs(c: Client, args: argparse.Namespace) -> int:
    cid = await c.resolve_container_id(args.id)
    async for line in c.container_logs(cid, follow=args.follow, tail=args.tail):
        parsed = parse_log_line(line)
        if parsed is None:
            continue
        at, stream, full, text = parsed
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.write((f"{at} " if args.timestamps else "") + text + ("\n" if full else ""))
        out.flush()
    return EXIT_OK


async def _exec(c: Client, args: argparse.Namespace) -> int:
    if not args.sync:
        print("podfsm: exec: only -s (sync) is implemented; streaming exec comes with the "
              "streaming issue", file=sys.stderr)
        return EXIT_FAILED
    if not args.cmd:
        print("podfsm: exec: no command given", file=sys.stderr)
        return EXIT_FAILED
    if args.timeout < 0:
        print("podfsm: exec: --timeout must not be negative", file=sys.stderr)
        return EXIT_FAILED
    cid = await c.resolve_container_id(args.id)
    res = await c.exec_sync(cid, list(args.cmd), args.timeout)
    sys.stdout.write(res.stdout)
    sys.stdout.flush()
    sys.stderr.write(res.stderr)
    sys.stderr.flush()
    return res.exit_code


async def _stats(c: Client, args: argparse.Namespace) -> int:
    if args.id:
        sts = [await c.container_status(await c.resolve_container_id(args.id))]
    else:
        sts = await c.list_containers(sandbox_id=args.pod,
                                      state=None if args.all else "Running")
    first = {st.id: await _stats_of(c, st.id) for st in sts}
    if args.output == "json":
        print(json.dumps({"stats": [_cri_stats(st, s) for st in sts
                                    if (s := first[st.id]) is not None]}, indent=2))
        return EXIT_OK
    await asyncio.sleep(max(args.seconds, 0.0))
    rows = []
    for st in sts:
        old, new = first[st.id], await _stats_of(c, st.id)
        if old is None or new is None:
            continue
        cpu, mem = new.cpu_usage_ns or 0, new.memory_working_set_bytes or 0
        if not args.all and cpu == 0 and mem == 0:
            continue
        perc = 0.0
        if cpu and old.cpu_usage_ns is not None and new.timestamp_ns > old.timestamp_ns:
            perc = (cpu - old.cpu_usage_ns) / (new.timestamp_ns - old.timestamp_ns) * 100
        rows.append([st.id[:13], st.name, f"{perc:.2f}", human_size(mem),
                     human_size(new.writable_bytes), str(new.writable_inodes)])
    print(_table(["CONTAINER", "NAME", "CPU %", "MEM", "DISK", "INODES"], rows))
    return EXIT_OK


async def _stats_of(c: Client, cid: str) -> ContainerStatsBody | None:
    """Its figures, or None when it went away meanwhile."""
    try:
        return await c.container_stats(cid)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def _cri_stats(st: ContainerStatus, s: ContainerStatsBody) -> dict[str, Any]:
    """crictl stats -o json's ContainerStats."""
    ts = str(s.timestamp_ns)

    def value(v: int | None) -> dict[str, str] | None:
        return None if v is None else {"value": str(v)}

    return {"attributes": {"id": st.id, "metadata": _metadata(st), "labels": st.labels,
                           "annotations": st.annotations},
            "cpu": {"timestamp": ts, "usageCoreNanoSeconds": value(s.cpu_usage_ns)},
            "memory": {"timestamp": ts, "workingSetBytes": value(s.memory_working_set_bytes)},
            "writableLayer": {"timestamp": ts, "fsId": {"mountpoint": ""},
                              "usedBytes": value(s.writable_bytes),
                              "inodesUsed": value(s.writable_inodes)}}
