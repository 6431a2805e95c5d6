"""The pod config's field rules, apart from its models (:mod:`podfsm.core.spec`): the patterns
and limits of its strings, ids and paths, the CRI enums and their parsers (names or numbers), the
sysctls a pod may set, the JSON-schema pieces the models share, the address rules of DNS and
port mappings, and how a validation error is told in one line.

Everything here is importable from :mod:`podfsm.core.spec` as before.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from podfsm.core import paths

# Every pattern is matched against the whole string: `\Z`, never `$` (which also matches before
# a trailing newline), with Python's regex engine (the JSON schema carries the same patterns).
#: What no string may hold, since it may reach a file, a command line, an environment variable,
#: a log line or a terminal: C0 and C1 controls, line and paragraph separators, zero-width and
#: bidirectional formatting characters (they reorder what a terminal shows), a BOM, and lone
#: surrogates (not encodable).
UNSAFE = (r"\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff"
          r"\ud800-\udfff")
#: and, for names: every character str.isprintable refuses (Unicode 14, Python 3.11) but
#: unassigned and private-use ones, which have no control, format or separator function:
#: controls, format characters (bidi, zero-width, the invisible tag characters), separators but
#: the space, surrogates. It covers UNSAFE. The JSON schema carries it too (the planes above
#: the BMP as literal characters, which both Python's re and ECMA-262 take; no large range, as
#: a schema-driven generator expands each range a character at a time);
#: tests/unit/test_pod_fields.py checks it against unicodedata of the Python it runs on.
_UNPRINTABLE = (r"\x00-\x1f\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2"
                r"\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000"
                r"\ud800-\udfff\ufeff\ufff9-\ufffb"
                "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
                "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f")
_UNPRINTABLE_RE = re.compile(f"[{_UNPRINTABLE}]")
TEXT = rf"^[^{UNSAFE}]*\Z"
#: printable text without ';' and '=' (CNI_ARGS separators)
CNI_ARG_TEXT = rf"^[^{_UNPRINTABLE};=]*\Z"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
HOSTNAME = rf"^{_DNS_LABEL}\Z"
_DOMAIN_LABEL = r"[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?"
DOMAIN = rf"^{_DOMAIN_LABEL}(\.{_DOMAIN_LABEL})*\.?\Z"
#: a resolv.conf option as resolv.conf(5) writes them: `ndots:5`, `edns0`, `timeout:2`
RESOLV_OPTION = r"^[a-z][a-z0-9-]*(:[0-9]{1,4})?\Z"
NAME_MAX = paths.NAME_MAX
_SEG = f"[^/{UNSAFE}]"
#: a non-empty path segment other than "." and "..", of at most NAME_MAX characters
#: (paths.check_host_path also counts its bytes)
PATH_SEGMENT = (rf"([^/.{UNSAFE}]{_SEG}{{0,254}}|\.[^/.{UNSAFE}]{_SEG}{{0,253}}"
                rf"|\.\.{_SEG}{{1,253}})")
#: a cgroup_parent: empty, or an absolute path spelled one way only (core.paths), as
#: paths.check_host_path checks it (openapi.py narrows it to the daemon's cgroup_root)
CGROUP_PARENT = rf"^(/{PATH_SEGMENT})*\Z"
#: a log_directory: empty, or an absolute path spelled one way only, not "/" (as
#: _log_directory checks it; that it lies outside /proc, /sys and /dev is said in words)
LOG_DIRECTORY = rf"^(/{PATH_SEGMENT})*\Z"
CPUSET = r"^[0-9,\-]*\Z"
_SYSCTL_NAME = re.compile(r"[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+")
ID_SPACE = 1 << 32  # uid_t range
#: the largest uid or gid a process may be given: Kubernetes validates run_as_user,
#: run_as_group and supplemental groups as 0-2147483647, and runc refuses more ("uids and gids
#: must be in range 0-2147483647")
MAX_ID = (1 << 31) - 1

#: the most labels, and the most annotations, a pod may carry: keys and values in UTF-8
#: bytes, Kubernetes' cap on an object's annotations (TotalAnnotationSizeLimitB); see
#: podfsm.core.sizes for why (a record the store reads back, a list a client can receive)
MAP_BYTES_MAX = 256 << 10
_MAP_BYTES = (f"at most {MAP_BYTES_MAX} bytes (256 KiB) of keys and values in all, counted in "
              "UTF-8 as Kubernetes counts annotations; else 422")

Text = Annotated[str, Field(max_length=4096, pattern=TEXT)]
LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=TEXT)]


class NamespaceMode(enum.IntEnum):
    """CRI NamespaceMode, with the protobuf numbers."""

    POD = 0
    CONTAINER = 1
    NODE = 2
    TARGET = 3


class Protocol(enum.IntEnum):
    """CRI Protocol of a port mapping."""

    TCP = 0
    UDP = 1
    SCTP = 2


class ProfileType(enum.IntEnum):
    """CRI SecurityProfile.ProfileType."""

    RuntimeDefault = 0
    Unconfined = 1
    Localhost = 2


class SupplementalGroupsPolicy(enum.IntEnum):
    """CRI SupplementalGroupsPolicy."""

    Merge = 0
    Strict = 1


def _enum_parser(kind: type[enum.IntEnum]) -> Any:
    by_name = {m.name.upper(): m for m in kind}

    def parse(value: Any) -> Any:
        if isinstance(value, kind):
            return value
        if isinstance(value, str):
            try:
                return by_name[value.strip().upper()]
            except KeyError:
                names = ", ".join(m.name for m in kind)
                raise ValueError(
                    f"unknown {kind.__name__} {_shown(value)} (one of {names})") from None
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"unknown {kind.__name__} number {value}") from None
        raise ValueError(f"{kind.__name__} must be a name or a number, not {_shown(value)}")

    return BeforeValidator(parse, json_schema_input_type=Union[  # noqa: UP007
        Literal[tuple(m.name for m in kind)], Literal[tuple(int(m) for m in kind)]])


Mode = Annotated[NamespaceMode, _enum_parser(NamespaceMode)]
Proto = Annotated[Protocol, _enum_parser(Protocol)]
Profile = Annotated[ProfileType, _enum_parser(ProfileType)]
GroupsPolicy = Annotated[SupplementalGroupsPolicy, _enum_parser(SupplementalGroupsPolicy)]


class _Model(BaseModel):
    # extra="forbid": a key that is not a field is refused, as protobuf JSON parsing does.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        regex_engine="python-re",
    )


def _mode_enum(*modes: NamespaceMode) -> JsonDict:
    """A JSON schema `enum` of these modes, by name and by number (as the field takes them)."""
    return {"enum": [x for m in modes for x in (m.name, int(m))]}


#: the JSON schemas of a mode that is (or, absent, defaults to) POD, and of NODE
_POD_MODE, _NODE_MODE = _mode_enum(NamespaceMode.POD), _mode_enum(NamespaceMode.NODE)
#: a userns_options that gives the pod its own user namespace (mode POD, or absent: POD)
_POD_USERNS: JsonDict = {"type": "object", "properties": {"mode": _POD_MODE}}
#: the one mapping mode POD takes, as _namespaces checks it: container_id 0, host_id not 0,
#: length > 0, host_id + length <= 2**32 - 1 (the sum is not said; each side's bound is)
_POD_MAPPING: JsonDict = {"properties": {"container_id": {"const": 0},
                               "host_id": {"minimum": 1, "maximum": ID_SPACE - 2},
                               "length": {"minimum": 1, "maximum": ID_SPACE - 2}}}


#: what the schema cannot say of a requested mapping
_MAPPING = ("mode POD: host_id + length must not pass the end of the daemon's id pool (the "
            "bounds of host_id) nor 4294967295, else 422; a range that overlaps another "
            "sandbox's is 409 (IdRangeUnavailable); none given: podfsm allocates 65536 ids")

#: what the schema cannot say of the pause's ids
_MAPPED = ("with a pod user namespace (userns_options mode POD), a container id its mapping "
           "holds: below the {} mapping's length, or below 65536 when podfsm allocates the "
           "range; else 422 (the runtime could not switch to it)")
_LSM = ("refused (422) on a host where {} is enabled, since podfsm does not apply it; "
        "ignored elsewhere, as containerd does")

# Sysctls a pod may set: the ones namespaced by the kernel (ipc and net), as runc accepts them
# for a container with its own ipc and network namespaces.
IPC_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
                "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")


_IPC_SYSCTL_TEXT = (r"kernel\.(" + "|".join(n.removeprefix("kernel.") for n in IPC_SYSCTLS)
                    + r")|fs\.mqueue(\.[a-zA-Z0-9_-]+)+")
#: the names _sysctls accepts (a sysctl name, namespaced: net.* or ipc), for the JSON schema
SYSCTL_NAME = rf"^(net(\.[a-zA-Z0-9_-]+)+|{_IPC_SYSCTL_TEXT})\Z"


def _mode_is(field: str, mode: NamespaceMode) -> JsonDict:
    """The JSON schema of a security_context (under `linux`) whose namespace_options.`field`
    is `mode`."""
    return {"required": ["security_context"], "properties": {"security_context": {
        "required": ["namespace_options"], "properties": {"namespace_options": {
            "required": [field], "properties": {field: _mode_enum(mode)}}}}}}


#: PATH_MAX less the NUL: the longest path the kernel takes, in bytes
LOG_DIRECTORY_MAX = 4095
_PATH_BYTES = (f"an absolute path spelled one way only: no `.`, `..` or empty segment, no "
               f"trailing `/`; each segment at most {NAME_MAX} bytes of UTF-8 and the whole at "
               "most maxLength bytes (the kernel counts bytes, the pattern characters)")
_LOG_PLACES = ("; not inside /proc, /sys or /dev, nor inside the daemon's state, run or netns "
               "directory, also through a symlink (else 422)")


def is_ipc_sysctl(name: str) -> bool:
    """True for the sysctls of the ipc namespace (kernel.shm*/msg*/sem, fs.mqueue.*)."""
    return name in IPC_SYSCTLS or name.startswith("fs.mqueue.")


#: an IPv4 or IPv6 address, as JSON Schema's formats say it and _ip checks it
_IP_ADDRESS: list[JsonDict] = [{"type": "string", "format": "ipv4"},
                               {"type": "string", "format": "ipv6"}]
_IP_FORMATS: JsonDict = {"anyOf": list(_IP_ADDRESS)}


def _ip(v: str, where: str) -> str:
    # a scope id (fe80::1%eth0) is no address in another network namespace, and not ipv6's
    # format
    if "%" in v:
        raise ValueError(f"{where} {v!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{where} {v!r} is not an IP address") from None


#: what the daemon checks of a port mapping's host_ip at admission (with the network)
HOST_IP_RULE = ("empty (every address of the host), an unspecified address (0.0.0.0 or ::: "
                "every address of that family) or an address of this host (else 422): of a "
                "family the pod network gives pods (portmap skips the others); no multicast or "
                "broadcast address")
#: the host_ip texts that the model refuses, as patterns of the normalised text (ipv4
#: multicast 224-239.x and the limited broadcast; ipv6 multicast ff00::/8)
_NOT_HOST_IP = (r"^2(2[4-9]|3[0-9])\.", r"^255\.255\.255\.255$", r"^[fF][fF][0-9a-fA-F]{2}:")


def _no_windows(v: dict[str, Any] | None) -> dict[str, Any] | None:
    if v:
        raise ValueError("windows settings are refused: podfsm is a Linux runtime")
    return v


_PLAIN = {
    "extra_forbidden": "unknown field: not part of the CRI PodSandboxConfig",
    "string_unicode": "is not valid unicode (a lone surrogate?)",
    "string_pattern_mismatch": "has a refused character or form",
}


#: how many refused fields an error names, and how much of a refused value it quotes: a config
#: of 256 annotations of 64 KiB must not make an answer (a gRPC status travels in a trailer,
#: under the client's metadata limit) or a log line of megabytes
SHOWN_PROBLEMS = 8
SHOWN_VALUE = 64


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) <= SHOWN_VALUE:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
    return f"{text[:SHOWN_VALUE]}... ({size})"


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each refused field (its path, as snake_case or as given) and why: the
    first SHOWN_PROBLEMS of them, each value cut after SHOWN_VALUE characters."""
    parts = []
    errors = exc.errors()
    for err in errors[:SHOWN_PROBLEMS]:
        loc = ".".join(str(p) for p in err["loc"]) or "pod config"
        if len(loc) > 2 * SHOWN_VALUE:  # a key is part of the path: 317 characters at most
            loc = loc[: 2 * SHOWN_VALUE] + "..."
        msg = _PLAIN.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch":
            pattern = (err.get("ctx") or {}).get("pattern", "")
            if len(pattern) > 2 * SHOWN_VALUE:
                pattern = pattern[: 2 * SHOWN_VALUE] + "..."
            msg = f"{_shown(err['input'])} {msg} (must match {pattern})"
        parts.append(f"{loc}: {msg}")
    if len(errors) > SHOWN_PROBLEMS:
        parts.append(f"and {len(errors) - SHOWN_PROBLEMS} more")
    return "invalid pod config: " + "; ".join(parts)
