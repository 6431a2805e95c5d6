"""Size bounds: what admission accepts, the store keeps and a CRI client can list.

Three limits meet here. The store reads no record larger than MAX_RECORD_BYTES; gRPC clients
(crictl, the kubelet) receive no message larger than GRPC_MAX_MESSAGE (16 MiB, their default);
and a pod config may carry up to 256 KiB of labels and 256 KiB of annotations (keys and
values, in UTF-8 bytes: Kubernetes' cap on an object's annotations, applied to labels too).

- A record: admission measures the first record exactly (the config as JSON, with the
  escaping that doubles a backslash, and the Localhost seccomp profile) and refuses one over
  ADMITTED_RECORD_BYTES. What a record gains later is bounded apart (history, errors, the
  network's result): see `record_growth_bound`, and the store refuses to write more than it
  would read back. So a record admission accepted is always read back at the next start.
- A list: each sandbox counts for `list_entry_bytes`, an upper bound of its entry in a
  ListPodSandbox or ListPodSandboxStats answer (protobuf: UTF-8 strings, no escaping), and
  admission refuses a sandbox that would take the sum over LIST_BUDGET_BYTES. That budget is
  podfsm's limit on pods: at most LIST_BUDGET_BYTES / MIN_ENTRY_BYTES of them.

Pure: tests check the bounds against real encodings (tests/unit/test_sizes.py).
"""

from __future__ import annotations

from podfsm.core import paths
from podfsm.core.spec import PodSandboxConfig

#: the largest record the store reads (a slot over this is set aside as corrupt)
MAX_RECORD_BYTES = 4 << 20
#: the largest first record admission accepts: the rest of MAX_RECORD_BYTES is for what a
#: record gains while its sandbox lives (record_growth_bound, with room to spare)
ADMITTED_RECORD_BYTES = 2 << 20
#: gRPC's default limit on a received message, crictl's and the kubelet's
GRPC_MAX_MESSAGE = 16 << 20
#: what the entries of all sandboxes in one list answer may take: 1 MiB under gRPC's limit
LIST_BUDGET_BYTES = GRPC_MAX_MESSAGE - (1 << 20)

#: how many transitions a record keeps (the newest); a sandbox's life takes about 8, each
#: failed stop one more
MAX_HISTORY = 64
#: the longest error text a history entry keeps, and last_error and each leftover
MAX_ENTRY_ERROR = 1024
MAX_LAST_ERROR = 4096
#: a stop reports at most one leftover per teardown step
MAX_LEFTOVERS = 8

#: protobuf bytes of one string field beside its content: a tag and a length (a varint of at
#: most 3 bytes below 2 MiB, and no string of a pod config is that long)
_STRING = 4
#: one map<string, string> entry beside its key and value: the entry's tag and length, two
#: string fields
_MAP_ENTRY = 4 + 2 * _STRING
#: an entry's fixed part: the repeated field's tag and length (5), the id (66), metadata's
#: tag and length with its attempt (10), state (2), created_at (11), runtime_handler (at most
#: 64 bytes, 66); and for ListPodSandboxStats (whose entry is the same attributes and the
#: stats): cpu, memory, the process count and up to MAX_STATS_INTERFACES interfaces of at most
#: 15-byte names with four counters each, less than 2 KiB
_FIXED_ENTRY = 5 + 66 + 10 + 2 + 11 + 66 + 2048
#: how many interfaces a sandbox's stats report (the default one first)
MAX_STATS_INTERFACES = 16
#: the smallest a sandbox counts for (a one-character name and namespace, nothing else)
MIN_ENTRY_BYTES = _FIXED_ENTRY + 3 * _STRING + 2


def utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8 (as protobuf and Kubernetes count strings)."""
    return len(text.encode("utf-8", "surrogatepass"))


def map_bytes(entries: dict[str, str]) -> int:
    """Keys and values of a map in UTF-8 bytes (Kubernetes' measure of annotations)."""
    return sum(utf8_len(k) + utf8_len(v) for k, v in entries.items())


def list_entry_bytes(pod: PodSandboxConfig) -> int:
    """An upper bound of the bytes one sandbox of this config takes in a ListPodSandbox or a
    ListPodSandboxStats answer."""
    md = pod.metadata
    strings = utf8_len(md.name) + utf8_len(md.namespace) + utf8_len(md.uid) + 3 * _STRING
    maps = (map_bytes(pod.labels) + map_bytes(pod.annotations)
            + _MAP_ENTRY * (len(pod.labels) + len(pod.annotations)))
    return _FIXED_ENTRY + strings + maps


def record_growth_bound(log_directory: str) -> int:
    """An upper bound of what a record gains after admission, as JSON: the history
    (MAX_HISTORY entries with an error of MAX_ENTRY_ERROR characters, 6 bytes each at worst as
    a \\u escape), last_error, the leftovers, the sandbox's files (four paths under the run
    directory, the log directory twice), the pinned namespaces, the task, and the network's
    result less its `raw` CNI answer (whose size the plugins decide: the store refuses a record
    it would not read back, and the run then fails and is unwound). A path podfsm makes (under
    its run and netns directories) counts as 4096 characters of 6 bytes each."""
    entry = 6 * MAX_ENTRY_ERROR + 256
    path_bytes = (4 + 2) * 6 * 4096 + 2 * 2 * utf8_len(log_directory)  # files, pinned namespaces
    # the log directory as resolved and each directory made for it (resolved too: a host
    # path of up to 4096 characters, 6 bytes each at worst), one per segment at most
    path_bytes += (1 + paths.LOG_DIRECTORY_SEGMENTS) * 6 * 4096
    return (MAX_HISTORY * entry + 6 * MAX_LAST_ERROR + MAX_LEFTOVERS * 6 * MAX_ENTRY_ERROR
            + path_bytes + 8 * 1024)


def clip(text: str | None, most: int) -> str | None:
    """`text` cut to at most `most` characters, saying so."""
    if text is None or len(text) <= most:
        return text
    note = f"... ({len(text)} characters)"
    return text[: most - len(note)] + note
