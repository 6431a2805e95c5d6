"""The largest pod configs podfsm accepts field by field, for the tests of its size bounds
(podfsm.core.sizes): the most bytes as a record (JSON doubles a backslash) and as a list entry
(protobuf counts UTF-8 bytes)."""

from __future__ import annotations

from typing import Any

from podfsm.core.spec import MAP_BYTES_MAX

#: a printable character of 4 UTF-8 bytes (the most a character takes)
WIDE = "\U0001f600"


def worst_map(value_max: int, count: int = 256, fill: str = "\\") -> dict[str, str]:
    """`count` entries whose keys and values take MAP_BYTES_MAX bytes in all, each entry
    unique by a short prefix, filled with `fill` (a backslash: twice its size in JSON)."""
    per_entry = MAP_BYTES_MAX // count
    out: dict[str, str] = {}
    for i in range(count):
        key = f"k{i:03d}" + fill * 60
        rest = per_entry - len(key.encode())
        assert rest <= value_max
        out[key] = fill * (rest // len(fill.encode()))
    return out


def worst_metadata(tag: str) -> dict[str, Any]:
    """metadata at its limits in wide characters, unique by `tag` (ASCII)."""
    return {"name": tag + WIDE * (253 - len(tag)), "namespace": WIDE * 253,
            "uid": WIDE * 128, "attempt": (1 << 32) - 1}


def worst_listed(tag: str, fill: str = "\\") -> dict[str, Any]:
    """A pod config at the limits of everything a list answer carries of it."""
    return {"metadata": worst_metadata(tag),
            "labels": worst_map(1024, fill=fill),
            "annotations": worst_map(65536, fill=fill)}


def worst_everywhere(tag: str, sysctls: list[str]) -> dict[str, Any]:
    """A pod config at the limits of (nearly) every field, for the size of its record:
    `sysctls`, names the host has, each with a value of 4096 wide characters."""
    text = WIDE * 4096
    resources = {"unified": {f"memory.x{i:02d}" + "x" * 200: text for i in range(64)},
                 "cpuset_cpus": "0" * 1024, "cpuset_mems": "0" * 1024}
    return {**worst_listed(tag),
            "hostname": "h" * 63,
            "log_directory": "/" + "/".join(["\\" * 254] * 12),
            "dns_config": {"servers": ["10.0.0.1"] * 3, "searches": ["a" * 63] * 32,
                           "options": ["ndots:5"] * 16},
            "port_mappings": [{"protocol": "UDP", "container_port": 65535,
                               "host_port": 65535 - i}
                              for i in range(256)],
            "linux": {"cgroup_parent": "/podfsm/" + "c" * 254,
                      "sysctls": {name: text for name in sysctls},
                      "resources": resources, "overhead": resources}}
