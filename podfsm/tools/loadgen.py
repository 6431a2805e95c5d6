"""A CRI load generator for `podfsm bench --cri`: COUNT pod-sandbox lifecycles (RunPodSandbox,
then StopPodSandbox and RemovePodSandbox) through a CRI socket, CONCURRENCY at a time, timed per
call. Run as its own process so its CPU is not counted as the server's.

    python -m podfsm.tools.loadgen SOCKET COUNT CONCURRENCY TAG

Prints JSON: {"run_ms": [...], "stop_remove_ms": [...], "wall_s": ...}.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc


def config(i: int, tag: str) -> pb.PodSandboxConfig:
    """The same pod as bench.pod(i, tag), as a CRI message."""
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=f"bench-{tag}-{i}", namespace="podfsm-bench",
                                       uid=f"{tag}{i}"),
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=pb.POD,
                                                 userns_options=pb.UserNamespace(mode=pb.POD)))))


def main(argv: list[str]) -> int:
    sock, count, concurrency, tag = argv[0], int(argv[1]), int(argv[2]), argv[3]
    run_ms: list[float] = []
    teardown_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(count))
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        rt = pb_grpc.RuntimeServiceStub(channel)  # type: ignore[no-untyped-call]
        rt.Version(pb.VersionRequest(), timeout=30)

        def worker() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                try:
                    t0 = time.perf_counter()
                    sid = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config(i, tag)),
                                           timeout=120).pod_sandbox_id
                    t1 = time.perf_counter()
                    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
                    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                        timeout=120)
                    t2 = time.perf_counter()
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                    return
                with lock:
                    run_ms.append((t1 - t0) * 1000)
                    teardown_ms.append((t2 - t1) * 1000)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    print(json.dumps({"run_ms": run_ms, "stop_remove_ms": teardown_ms, "wall_s": wall,
                      "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
