"""The record store: atomic and durable writes, the controller lock, schema migration, corrupt
records set aside. Plain files in a temporary directory; no root needed."""

from __future__ import annotations

import errno
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from podfsm.core.errors import ControllerLocked, StateDirError
from podfsm.core.records import SCHEMA_VERSION, SandboxRecord
from podfsm.core.spec import parse_pod_config
from podfsm.core.states import State
from podfsm.drivers.store import FileStore, RecordTooNew, migrate


def record(n: int = 1, **changes: Any) -> SandboxRecord:
    rec = SandboxRecord(
        id=f"{n:064x}",
        config=parse_pod_config({"metadata": {"name": f"p{n}", "namespace": "default"}}),
        created_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        runtime="runc",
    )
    return rec.evolve(**changes) if changes else rec


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = FileStore(str(tmp_path / "state"))
    s.open()
    yield s
    s.close()


def files(s: FileStore) -> list[str]:
    return sorted(os.listdir(s.dir))


async def test_save_and_load_round_trip(store: FileStore) -> None:
    a, b = record(1), record(2, state=State.READY, pending=None)
    await store.save(a)
    await store.save(b)
    assert files(store) == [f"{a.id}.json", f"{b.id}.json"]  # no temporary file left
    loaded, problems = await store.load_all()
    assert problems == []
    assert {r.id: r for r in loaded} == {a.id: a, b.id: b}
    written = json.loads(Path(store.dir, f"{a.id}.json").read_text())
    assert written["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("durable", [True, False])
async def test_a_failed_write_leaves_the_old_record_and_no_temporary_file(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    old = record(1)
    await store.save(old)
    real_write = os.write

    def no_space(fd: int, data: Any = b"") -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_then_full(fd: int, data: Any) -> int:
        real_write(fd, data[:10])  # a torn temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    # durable: the temporary file is written, then its fsync fails as on a full disk;
    # not durable: the write itself fails halfway
    if durable:
        monkeypatch.setattr(os, "fsync", no_space)
    else:
        monkeypatch.setattr(os, "write", write_then_full)
    with pytest.raises(StateDirError, match="full"):
        await store.save(old.evolve(state=State.NOT_READY), durable=durable)
    monkeypatch.undo()
    assert files(store) == [f"{old.id}.json"]
    (loaded,), _ = await store.load_all()
    assert loaded == old


async def test_only_a_durable_write_pays_for_fsync_of_file_and_directory(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    rec = record(1)
    await store.save(rec)
    await store.save(rec.evolve(state=State.READY))
    await store.delete(rec.id)
    assert synced == []
    await store.save(rec, durable=True)
    assert len(synced) == 2
    assert synced[0].startswith(os.path.join(store.dir, f"{rec.id}.json."))
    assert synced[0].endswith(".tmp")
    assert synced[1] == store.dir
    (loaded,), _ = await store.load_all()
    assert loaded == rec


async def test_a_write_is_never_abandoned_halfway_by_a_cancellation(store: FileStore) -> None:
    rec = record(1)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.save(rec, durable=True)  # shielded inside: it completes
    (loaded,), _ = await store.load_all()
    assert loaded == rec
    assert files(store) == [f"{rec.id}.json"]


async def test_a_temporary_file_left_by_a_crash_is_removed_and_the_old_record_stands(
    store: FileStore,
) -> None:
    rec = record(1)
    await store.save(rec)
    torn = os.path.join(store.dir, f"{rec.id}.json.1234-0.tmp")
    Path(torn).write_text('{"schema_version": 1, "id": "')  # the crash came mid-write
    loaded, problems = await store.load_all()
    assert loaded == [rec] and problems == []
    assert files(store) == [f"{rec.id}.json"]


async def test_delete_is_idempotent(store: FileStore) -> None:
    rec = record(1)
    await store.save(rec)
    await store.delete(rec.id)
    await store.delete(rec.id)
    await store.delete("never-there")
    assert files(store) == []


def test_a_second_store_on_the_same_state_dir_is_refused(store: FileStore) -> None:
    other = FileStore(store.state_dir)
    with pytest.raises(ControllerLocked, match="another podfsm controller"):
        other.open()
    store.close()
    other.open()  # free once the first is closed
    other.close()


def test_an_unusable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateDirError, match="state dir"):
        FileStore(str(blocker / "state")).open()


@pytest.mark.parametrize("content", [
    b"not json at all",
    b"[1, 2, 3]",
    b'{"schema_version": 1, "id": "x"}',  # required fields missing
    b"\xff\xfe\x00garbage",
    b'{"schema_version": "one"}',
    b"",
])
async def test_a_corrupt_record_is_set_aside_and_the_others_load(
    store: FileStore, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    good = [record(1), record(3)]
    for r in good:
        await store.save(r)
    bad_name = f"{2:064x}.json"
    Path(store.dir, bad_name).write_bytes(content)
    caplog.set_level(logging.ERROR)
    loaded, problems = await store.load_all()
    assert sorted(r.id for r in loaded) == [r.id for r in good]
    assert len(problems) == 1 and bad_name in problems[0] and "set aside" in problems[0]
    assert any(bad_name in r.getMessage() for r in caplog.records)
    assert os.listdir(store.quarantine) == [bad_name]
    assert bad_name not in files(store)
    again, problems = await store.load_all()  # set aside once, not again
    assert len(again) == 2 and problems == []


async def test_a_record_under_another_sandboxs_name_is_set_aside(store: FileStore) -> None:
    rec = record(1)
    Path(store.dir, f"{9:064x}.json").write_text(rec.model_dump_json())
    loaded, problems = await store.load_all()
    assert loaded == [] and "does not match its file name" in problems[0]


async def test_a_record_from_a_newer_podfsm_stops_the_start_and_is_kept(
    store: FileStore,
) -> None:
    data = json.loads(record(1).model_dump_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    path = os.path.join(store.dir, f"{data['id']}.json")
    Path(path).write_text(json.dumps(data))
    with pytest.raises(StateDirError, match="newer than this podfsm"):
        await store.load_all()
    assert os.path.exists(path)  # not set aside: its sandbox must not be taken for an orphan


def test_migrate_brings_old_records_up_step_by_step() -> None:
    def v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
        d["runtime_name"] = d.pop("runtime")
        return d

    def v2_to_v3(d: dict[str, Any]) -> dict[str, Any]:
        d["notes"] = []
        return d

    steps = {1: v1_to_v2, 2: v2_to_v3}
    out = migrate({"schema_version": 1, "runtime": "runc"}, target=3, steps=steps)
    assert out == {"schema_version": 3, "runtime_name": "runc", "notes": []}
    # a record without a version is version 1
    assert migrate({"runtime": "crun"}, target=2, steps=steps)["runtime_name"] == "crun"
    assert migrate({"schema_version": 3}, target=3, steps=steps) == {"schema_version": 3}
    with pytest.raises(RecordTooNew):
        migrate({"schema_version": 4}, target=3, steps=steps)
    with pytest.raises(ValueError, match="no migration"):
        migrate({"schema_version": 1}, target=3, steps={2: v2_to_v3})
    for bad in (0, -1, "1", True, None):
        with pytest.raises(ValueError):
            migrate({"schema_version": bad}, target=3, steps=steps)


def test_the_current_schema_needs_no_migration() -> None:
    data = json.loads(record(1).model_dump_json())
    assert SandboxRecord.model_validate(migrate(dict(data))) == record(1)
