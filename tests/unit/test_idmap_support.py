"""The kernel probe behind the CRI Status's user_namespaces feature, and the controller's
answer per handler (podfsm.drivers.idmapmounts.support_problem)."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from podfsm.drivers import idmapmounts


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    idmapmounts.support_problem.cache_clear()
    yield
    idmapmounts.support_problem.cache_clear()


def test_a_kernel_older_than_5_19_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idmapmounts.platform, "release", lambda: "5.15.0-91-generic")
    assert idmapmounts.support_problem() == (
        "kernel 5.15.0-91-generic is older than 5.19: overlayfs cannot use idmapped layers")


def test_a_kernel_without_the_new_mount_api_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idmapmounts.platform, "release", lambda: "6.1.0")

    def no_open_tree(path: str, recursive: bool) -> int:
        raise idmapmounts._explain("open_tree", errno.ENOSYS, path)

    monkeypatch.setattr(idmapmounts, "_open_tree", no_open_tree)
    problem = idmapmounts.support_problem()
    assert problem is not None and "open_tree is not available on kernel 6.1.0" in problem


def test_an_unknown_architecture_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idmapmounts.platform, "machine", lambda: "riscv64")
    problem = idmapmounts.support_problem()
    assert problem is not None and "no syscall numbers for riscv64" in problem


def test_release_strings_are_compared_as_numbers() -> None:
    assert idmapmounts._release_tuple("6.18.0-1-amd64") == (6, 18)
    assert idmapmounts._release_tuple("5.9") < idmapmounts._release_tuple("5.19")
    assert idmapmounts._release_tuple("5.19-rc1") == (5, 19)
    assert idmapmounts._release_tuple("garbage") == (0, 0)


def test_mountinfo_escapes_are_undone() -> None:
    assert idmapmounts._unescape(r"/a\040b\011c\134d") == "/a b\tc\\d"
    assert idmapmounts._unescape("/plain") == "/plain"
