"""The record store: atomic and durable writes, the controller lock, schema migration, corrupt
records set aside. Plain files in a temporary directory; no root needed."""

from __future__ import annotations

import errno
import json
import logging
import os
import zlib
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


def slots(rec: SandboxRecord | str) -> list[str]:
    sid = rec if isinstance(rec, str) else rec.id
    return [f"{sid}.0.rec", f"{sid}.1.rec"]


def framed(body: bytes, seq: int = 0) -> bytes:
    return b"podfsm-record %d %d %08x\n%s\n" % (seq, len(body), zlib.crc32(body), body)


def test_evolve_makes_what_model_copy_makes() -> None:
    rec = record(1)
    changes: dict[str, Any] = {"state": State.READY, "pending": None, "leftovers": ["x"]}
    mine, theirs = rec.evolve(**changes), rec.model_copy(update=changes)
    assert mine == theirs and type(mine) is SandboxRecord
    assert mine.model_fields_set == theirs.model_fields_set
    assert mine.model_dump_json() == theirs.model_dump_json()
    assert rec.state is State.UNKNOWN and rec.leftovers == []  # the original is untouched
    with pytest.raises(TypeError, match="no field"):
        rec.evolve(bogus=1)
    with pytest.raises(ValueError, match="frozen"):
        mine.state = State.NOT_READY


async def test_save_and_load_round_trip(store: FileStore) -> None:
    a, b = record(1), record(2, state=State.READY, pending=None)
    await store.save(a, durable=True)
    await store.save(b)
    assert files(store) == [slots(a)[0], slots(b)[0]]
    loaded, problems = await store.load_all()
    assert problems == []
    assert {r.id: r for r in loaded} == {a.id: a, b.id: b}
    header, body = Path(store.dir, slots(a)[0]).read_bytes().split(b"\n", 1)
    assert header.split()[:2] == [b"podfsm-record", b"0"]
    assert json.loads(body)["schema_version"] == SCHEMA_VERSION


async def test_writes_alternate_between_the_two_slots_and_the_newest_wins(
    store: FileStore, tmp_path: Path
) -> None:
    rec = record(1)
    versions = [rec.evolve(state=s) for s in (State.UNKNOWN, State.NAMESPACES_READY,
                                               State.CONTAINER_CREATED, State.READY)]
    for i, v in enumerate(versions):
        await store.save(v, durable=i == 0)
        assert files(store) == slots(rec)[: min(i + 1, 2)]
        fresh = FileStore(str(tmp_path / "state"))  # a restarted controller reads it back
        (loaded,), problems = await fresh.load_all()
        assert loaded == v and problems == []
    # the older slot holds the previous version: a write torn by a crash falls back to it
    newest = Path(store.dir, slots(rec)[1])  # versions[3] went to slot 1
    newest.write_bytes(newest.read_bytes()[:100])
    (loaded,), problems = await store.load_all()
    assert loaded == versions[2] and problems == []
    await store.save(versions[3])  # the torn slot is the one written next
    (loaded,), _ = await store.load_all()
    assert loaded == versions[3]


@pytest.mark.parametrize("damage", ["truncated", "old tail left", "bit flip", "no header"])
async def test_a_torn_slot_is_never_taken_for_a_record(store: FileStore, damage: str) -> None:
    rec = record(1)
    await store.save(rec, durable=True)
    good = rec.evolve(state=State.READY)
    await store.save(good)
    assert [r for r in (await store.load_all())[0]] == [good]
    # slot 0 gets a newer sequence number but its content did not all reach the disk
    newer = framed(rec.evolve(state=State.NOT_READY).model_dump_json().encode(), seq=9)
    broken = {
        "truncated": newer[:-40],
        "old tail left": newer[:-1] + b" trailing bytes of the slot's previous content\n",
        "bit flip": newer[:60] + bytes([newer[60] ^ 1]) + newer[61:],
        "no header": newer.split(b"\n", 1)[1],
    }[damage]
    Path(store.dir, slots(rec)[0]).write_bytes(broken)
    loaded, problems = await store.load_all()
    assert loaded == [good] and problems == []


@pytest.mark.parametrize("durable", [True, False])
async def test_a_failed_write_leaves_the_old_record_and_no_new_file(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    old = record(1)
    await store.save(old)
    real_write, real_pwrite = os.write, os.pwrite

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_then_full(fd: int, data: Any) -> int:
        real_write(fd, data[:10])  # a torn temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    def pwrite_then_full(fd: int, data: Any, offset: int) -> int:
        real_pwrite(fd, data[:10], offset)  # a torn slot, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full_halfway() -> None:
        monkeypatch.setattr(os, "write", write_then_full)
        monkeypatch.setattr(os, "pwrite", pwrite_then_full)

    # durable: the temporary file is written, then its fsync fails as on a full disk;
    # not durable: the in-place write itself fails halfway
    if durable:
        monkeypatch.setattr(os, "fsync", no_space)
    else:
        disk_full_halfway()
    with pytest.raises(StateDirError, match="full"):
        await store.save(old.evolve(state=State.NOT_READY), durable=durable)
    monkeypatch.undo()
    assert files(store) == [slots(old)[0]]  # no temporary file, the new slot went again
    (loaded,), _ = await store.load_all()
    assert loaded == old
    # a failed first write leaves no file at all
    disk_full_halfway()
    with pytest.raises(StateDirError, match="full"):
        await store.save(record(2), durable=durable)
    monkeypatch.undo()
    assert files(store) == [slots(old)[0]]


async def test_a_temporary_file_left_by_a_crash_is_removed_and_the_record_stands(
    store: FileStore,
) -> None:
    rec = record(1)
    await store.save(rec, durable=True)
    torn = os.path.join(store.dir, f"{slots(rec)[1]}.1234-0.tmp")
    Path(torn).write_bytes(b"podfsm-record 1 99")  # the crash came in the middle of it
    loaded, problems = await store.load_all()
    assert loaded == [rec] and problems == []
    assert files(store) == [slots(rec)[0]]


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
    # the temporary file (a spare slot file the delete left, renamed over the slot), then the
    # directory
    assert len(synced) == 2 and synced[1] == store.dir
    assert os.path.dirname(synced[0]) == store.spare_dir
    assert files(store) == [slots(rec)[0]]
    (loaded,), _ = await store.load_all()
    assert loaded == rec
    # with no spare left (the delete left two), the temporary file is a new one beside the slot
    await store.save(record(2), durable=True)
    synced.clear()
    other = record(3)
    await store.save(other, durable=True)
    assert synced[0].startswith(os.path.join(store.dir, slots(other)[0]) + ".")
    assert synced[0].endswith(".tmp")
    assert files(store) == sorted([slots(rec)[0], slots(record(2))[0], slots(other)[0]])


async def test_a_deleted_sandboxs_slot_files_are_emptied_and_reused_by_the_next(
    store: FileStore,
) -> None:
    old = record(1)
    await store.save(old, durable=True)
    await store.save(old.evolve(state=State.READY))
    inodes = {os.stat(os.path.join(store.dir, name)).st_ino for name in slots(old)}
    await store.delete(old.id)
    assert files(store) == []
    spares = sorted(os.listdir(store.spare_dir))
    assert len(spares) == 2
    assert all(os.path.getsize(os.path.join(store.spare_dir, n)) == 0 for n in spares)
    new = record(2)
    await store.save(new, durable=True)
    await store.save(new.evolve(state=State.READY, pending=None))
    assert files(store) == slots(new)
    assert {os.stat(os.path.join(store.dir, name)).st_ino for name in slots(new)} == inodes
    assert os.listdir(store.spare_dir) == []
    # a longer record before, a shorter one now: nothing of the old one is left in a slot
    (loaded,), problems = await store.load_all()
    assert loaded == new.evolve(state=State.READY, pending=None) and problems == []


async def test_spares_a_crash_left_are_emptied_at_open_and_what_is_not_a_file_removed(
    tmp_path: Path,
) -> None:
    first = FileStore(str(tmp_path / "state"))
    first.open()
    first.close()
    Path(first.spare_dir, "1-0").write_bytes(framed(b'{"id": "x"}'))  # moved, not emptied
    Path(first.spare_dir, "1-1").symlink_to("/etc/passwd")
    Path(first.spare_dir, "1-2").mkdir()
    s = FileStore(str(tmp_path / "state"))
    s.open()
    try:
        assert os.listdir(s.spare_dir) == ["1-0"]
        assert os.path.getsize(os.path.join(s.spare_dir, "1-0")) == 0
        rec = record(1)
        await s.save(rec, durable=True)
        (loaded,), problems = await s.load_all()
        assert loaded == rec and problems == []
        assert os.listdir(s.spare_dir) == []
    finally:
        s.close()


async def test_spares_are_capped(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("podfsm.drivers.store.MAX_SPARES", 3)
    for n in (1, 2):
        await store.save(record(n), durable=True)
        await store.save(record(n))
    for n in (1, 2):
        await store.delete(record(n).id)
    assert files(store) == []
    assert len(os.listdir(store.spare_dir)) == 3


async def test_a_write_is_never_abandoned_halfway_by_a_cancellation(store: FileStore) -> None:
    rec = record(1)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.save(rec, durable=True)  # shielded inside: it completes
    (loaded,), _ = await store.load_all()
    assert loaded == rec
    assert files(store) == [slots(rec)[0]]


async def test_delete_is_idempotent(store: FileStore) -> None:
    rec = record(1)
    await store.save(rec)
    await store.save(rec)
    assert files(store) == slots(rec)
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
@pytest.mark.parametrize("frame", [True, False])
async def test_a_corrupt_record_is_set_aside_and_the_others_load(
    store: FileStore, caplog: pytest.LogCaptureFixture, content: bytes, frame: bool
) -> None:
    good = [record(1), record(3)]
    for r in good:
        await store.save(r)
    bad = f"{2:064x}"
    # both slots bad: framed garbage (a podfsm bug) or a file that is not a slot at all
    for name in slots(bad):
        Path(store.dir, name).write_bytes(framed(content) if frame else content)
    caplog.set_level(logging.ERROR)
    loaded, problems = await store.load_all()
    assert sorted(r.id for r in loaded) == [r.id for r in good]
    assert [p.sandbox_id for p in problems] == [bad]
    assert bad in problems[0].problem and "set aside" in problems[0].problem
    assert any(bad in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(store.quarantine)) == slots(bad)
    assert not set(slots(bad)) & set(files(store))
    again, problems = await store.load_all()  # set aside once, not again
    assert len(again) == 2 and problems == []


async def test_a_record_under_another_sandboxs_name_is_set_aside(store: FileStore) -> None:
    rec = record(1)
    Path(store.dir, slots(f"{9:064x}")[0]).write_bytes(framed(rec.model_dump_json().encode()))
    loaded, problems = await store.load_all()
    assert loaded == [] and "does not match its file name" in problems[0].problem


async def test_a_record_from_a_newer_podfsm_stops_the_start_and_is_kept(
    store: FileStore,
) -> None:
    data = json.loads(record(1).model_dump_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    path = os.path.join(store.dir, slots(data["id"])[0])
    Path(path).write_bytes(framed(json.dumps(data).encode()))
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


def _write_slot(store: FileStore, name: str, body: bytes) -> None:
    Path(store.dir, name).write_bytes(framed(body))


async def test_a_deeply_nested_record_is_set_aside_and_start_up_goes_on(
    store: FileStore, caplog: pytest.LogCaptureFixture
) -> None:
    good = record(1)
    await store.save(good)
    # framed correctly (length and checksum match): only its content is hostile
    deep = b'{"id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _write_slot(store, f"{2:064x}.0.rec", deep)
    shallow_but_deep = json.dumps(record(3).model_dump(mode="json") | {
        "last_error": None, "leftovers": [], "history": []}).encode()
    nested: Any = "x"
    for _ in range(200):
        nested = [nested]
    body = json.loads(shallow_but_deep)
    body["network"] = {"network_name": "n", "raw": {"deep": nested}}
    _write_slot(store, f"{3:064x}.0.rec", json.dumps(body).encode())
    with caplog.at_level(logging.ERROR):
        loaded, set_aside = await store.load_all()
    assert loaded == [good]
    problems = {s.sandbox_id: s.problem for s in set_aside}
    assert set(problems) == {f"{2:064x}", f"{3:064x}"}
    assert all("nested" in p for p in problems.values()), problems
    assert "nested" in caplog.text
    assert files(store) == slots(good)[:1]


async def test_a_slot_whose_name_is_not_a_sandbox_id_is_set_aside(store: FileStore) -> None:
    rec = record(1).evolve(id="evil")
    _write_slot(store, "evil.0.rec", rec.model_dump_json().encode())
    _write_slot(store, "x\x1b[2J.0.rec", rec.model_dump_json().encode())
    loaded, set_aside = await store.load_all()
    assert loaded == []
    assert sorted(s.sandbox_id for s in set_aside) == ["evil", "x\x1b[2J"]
    assert all("not a sandbox id" in s.problem for s in set_aside)
    assert all("\x1b" not in s.problem for s in set_aside)  # escaped for terminals
    assert files(store) == []


async def test_a_symlinked_slot_is_never_followed(store: FileStore, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(framed(record(1).model_dump_json().encode()))
    os.symlink(target, os.path.join(store.dir, slots(record(1))[0]))
    loaded, (aside,) = await store.load_all()
    assert loaded == [] and "symlink" in aside.problem
    assert target.read_bytes() == framed(record(1).model_dump_json().encode())


async def test_a_record_the_check_refuses_is_set_aside(store: FileStore) -> None:
    await store.save(record(1))
    await store.save(record(2))
    loaded, (aside,) = await store.load_all(
        check=lambda r: "refused here" if r.id == record(2).id else None)
    assert loaded == [record(1)]
    assert aside.sandbox_id == record(2).id and "refused here" in aside.problem
    assert files(store) == slots(record(1))[:1]
