"""The chaos run, short: random operations, failpoints and SIGKILLs of the controller and of
pause processes on the real drivers; after every recovery the invariants hold and at the end
nothing is left. `podfsm bench --chaos N` is the long one (figures in docs/security.md)."""

from __future__ import annotations

import os

import pytest

from podfsm.tools.chaos import leftovers, run_chaos
from tests.integration.conftest import destroy_env, make_env, pod

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("PODFSM_CHAOS_ROUNDS", "6"))


async def test_chaos_keeps_every_invariant_and_leaves_nothing(runtime: str) -> None:
    env = make_env(runtime)
    try:
        report = await run_chaos(env.cfg, ROUNDS, seed=os.environ.get("PODFSM_CHAOS_SEED", 1),
                                 workdir=env.tmp)
        print(report.summary())
        assert report.violations == []
        assert report.leftovers == {}
        assert env.leftovers() == {}
        assert report.rounds == ROUNDS
        assert report.controller_kills + report.failpoint_crashes == ROUNDS
        assert report.operations.get("run ok", 0) > 0
    finally:
        destroy_env(env)


async def test_chaos_with_containers_keeps_every_invariant_and_leaves_nothing(
        runtime: str) -> None:
    """Writer containers created, stopped and removed among the pods, the containers'
    failpoints too: after each recovery no container is between states, a Running one's
    process lives, no writer's log misses a line; at the end nothing of them is left."""
    env = make_env(runtime)
    try:
        report = await run_chaos(env.cfg, ROUNDS, seed=os.environ.get("PODFSM_CHAOS_SEED", 1),
                                 workdir=env.tmp, containers=True)
        print(report.summary())
        assert report.violations == []
        assert report.leftovers == {}
        assert env.leftovers() == {}
        assert report.controller_kills + report.failpoint_crashes == ROUNDS  # none died alone
        assert report.operations.get("create_ctr ok", 0) > 0
    finally:
        destroy_env(env)


async def test_the_leftover_check_sees_a_live_pause_process(runtime: str) -> None:
    # The runtime pivots into the pause rootfs, so /proc/<pid>/root reads "/" there: the
    # pause processes are told by their executable (a check that saw none could pass anything).
    env = make_env(runtime)
    try:
        async with env.controller() as ctl:
            st = await ctl.run_sandbox(pod("seen"))
            assert leftovers(env.cfg)["pause processes"] == [str(st.pid)]
            assert env.pause_processes() == [st.pid]
            await ctl.remove_sandbox(st.id)
        assert leftovers(env.cfg) == {}
    finally:
        destroy_env(env)
