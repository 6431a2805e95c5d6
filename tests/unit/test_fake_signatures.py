"""The fakes the unit tests run the controller on take what the drivers' Protocols say: every
method a Protocol names exists on its fake with the same parameters (names, kinds and order),
so a driver interface that grows an argument cannot leave a fake behind silently (the contract
tests in tests/integration/test_contract.py then hold the fakes' behaviour to the real drivers)."""

from __future__ import annotations

import inspect

import pytest

from podfsm.drivers import base
from tests.fakecontainers import FakeContainers
from tests.fakeimages import FakeImages
from tests.fakes import FakeNamespaces, FakeNetwork, FakeRuntime, MemoryStore

PAIRS = [(base.NamespaceDriver, FakeNamespaces), (base.NetworkDriver, FakeNetwork),
         (base.RuntimeDriver, FakeRuntime), (base.Store, MemoryStore),
         (base.ImageDriver, FakeImages), (base.ContainerDriver, FakeContainers)]


def _members(proto: type) -> list[str]:
    return [name for name, value in vars(proto).items()
            if not name.startswith("_") and inspect.isfunction(value)]


def _shape(fn: object) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()  # type: ignore[arg-type]
            if p.name != "self"]


@pytest.mark.parametrize(("proto", "fake"), PAIRS, ids=[f.__name__ for _, f in PAIRS])
def test_each_fake_takes_what_its_protocol_says(proto: type, fake: type) -> None:
    names = _members(proto)
    assert names, proto
    for name in names:
        assert hasattr(fake, name), f"{fake.__name__} lacks {name}"
        want, got = _shape(getattr(proto, name)), _shape(getattr(fake, name))
        assert got == want, f"{fake.__name__}.{name}: {got} != {proto.__name__}'s {want}"
        assert inspect.iscoroutinefunction(getattr(fake, name)) == \
            inspect.iscoroutinefunction(getattr(proto, name)), f"{fake.__name__}.{name}: async?"
