"""The CRI face: Kubernetes' CRI v1 RuntimeService and ImageService over gRPC on a unix socket,
for pod sandboxes (see docs/cri.md). `server.CriServer` serves a Controller; `convert` maps
protobuf messages to and from podfsm's models. No logic of its own: every answer is one
Controller call.
"""

from podfsm.faces.cri.server import DEFAULT_CRI_SOCKET, CriServer

__all__ = ["DEFAULT_CRI_SOCKET", "CriServer"]
