"""Id-range allocation for pod user namespaces (KEP-127): each pod gets 65536 ids, ranges never
overlap, host ids 0-65535 stay with the host. Pure: the caller passes the ranges in use."""

from __future__ import annotations

from collections.abc import Iterable

from podfsm.core.spec import IDMapping

POD_RANGE = 65536


def overlaps(a: IDMapping, b: IDMapping) -> bool:
    return a.host_id < b.host_end and b.host_id < a.host_end


def find_overlap(candidate: IDMapping, in_use: Iterable[IDMapping]) -> IDMapping | None:
    """The first range in use that `candidate` overlaps, or None."""
    for used in in_use:
        if overlaps(candidate, used):
            return used
    return None


def allocate(in_use: Iterable[IDMapping], pool_start: int, pool_size: int,
             length: int = POD_RANGE) -> IDMapping:
    """The lowest free, aligned range of `length` ids in the pool. Raises ValueError if full."""
    if pool_start < POD_RANGE:
        raise ValueError("the id pool must not include host ids 0-65535")
    taken = sorted(in_use, key=lambda m: m.host_id)
    start = pool_start
    for used in taken:
        if used.host_end <= start:
            continue
        if used.host_id >= start + length:
            break
        # move past this range, keeping alignment to `length`
        start = max(start, pool_start + -(-(used.host_end - pool_start) // length) * length)
    if start + length > pool_start + pool_size:
        raise ValueError(
            f"the id pool {pool_start}-{pool_start + pool_size - 1} has no free range of {length}"
        )
    return IDMapping(container_id=0, host_id=start, length=length)
