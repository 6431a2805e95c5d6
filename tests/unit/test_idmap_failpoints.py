"""Id-range allocation and the failpoint plan."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podfsm.core import failpoints, idmap
from podfsm.core.spec import IDMapping

START = 1 << 20


def test_first_range_is_the_pool_start_and_never_host_ids() -> None:
    m = idmap.allocate([], START, 1 << 24)
    assert (m.host_id, m.length, m.container_id) == (START, 65536, 0)
    with pytest.raises(ValueError, match="host ids"):
        idmap.allocate([], 1000, 1 << 24)


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_allocations_never_overlap_what_is_in_use(offsets: list[int]) -> None:
    in_use = [IDMapping(container_id=0, host_id=START + o * 7000, length=5000) for o in offsets]
    m = idmap.allocate(in_use, START, 1 << 30)
    assert idmap.find_overlap(m, in_use) is None
    assert m.host_id >= START and m.length == 65536


def test_full_pool_is_refused_with_a_message() -> None:
    in_use = [IDMapping(container_id=0, host_id=START, length=65536)]
    with pytest.raises(ValueError, match="no free range"):
        idmap.allocate(in_use, START, 65536)


def test_failpoint_names_cover_before_and_after_every_step() -> None:
    assert len(failpoints.NAMES) == 2 * len(failpoints.STEPS + failpoints.IMAGE_STEPS
                                            + failpoints.CONTAINER_STEPS)
    assert "container_start_monitor.after" in failpoints.NAMES
    assert "unpack_layer.before" in failpoints.NAMES
    assert not any(n.startswith("unpack_layer") for n in failpoints.SANDBOX_NAMES)
    assert "cni_add.before" in failpoints.NAMES and "runtime_start.after" in failpoints.NAMES


def test_failpoint_plan_parses_actions_and_counts() -> None:
    plan = failpoints.parse("cni_add.before=2*error; runtime_start.after=delay(50);"
                            "pin_namespaces.after=crash")
    assert plan["runtime_start.after"].delay_ms == 50
    assert plan["pin_namespaces.after"].kind == "crash"
    cni = plan["cni_add.before"]
    assert [cni.take(), cni.take(), cni.take()] == [True, True, False]


@pytest.mark.parametrize("bad", ["nosuch.before=error", "cni_add.before=explode", "cni_add"])
def test_bad_failpoint_specs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        failpoints.parse(bad)
