"""The chaos run, short: random operations, failpoints and SIGKILLs of the controller and of
pause processes on the real drivers; after every recovery the invariants hold and at the end
nothing is left. `podfsm bench --chaos N` is the long one (figures in docs/security.md)."""

from __future__ import annotations

import os

import pytest

from podfsm.faces.chaos import run_chaos
from tests.integration.conftest import destroy_env, make_env

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
