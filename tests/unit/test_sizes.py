"""The size bounds of podfsm.core.sizes, against real encodings: a record admission accepts is
one the store reads back, and a full list is one a gRPC client receives."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cri_api.v1 import api_pb2 as pb

from podfsm import InvalidPodConfig, NodeFull, StateDirError
from podfsm.core import sizes
from podfsm.core.records import (
    CgroupStats,
    HistoryEntry,
    InterfaceStats,
    NetworkResult,
    PinnedNamespaces,
    SandboxFiles,
    SandboxRecord,
    SandboxStats,
    SandboxStatus,
    TaskInfo,
)
from podfsm.core.spec import MAP_BYTES_MAX, parse_pod_config
from podfsm.core.states import State
from podfsm.drivers.store import FileStore
from podfsm.faces.cri import convert
from tests.fakes import Rig
from tests.worst import worst_everywhere, worst_listed, worst_map

ID = "ab" * 32


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    yield r
    await r.rt.kill_all()


def host_sysctls(count: int) -> list[str]:
    """`count` net.* sysctls this host has (admission checks that they exist)."""
    names = []
    for root, _dirs, files in os.walk("/proc/sys/net/ipv4"):
        names += [os.path.join(root, f)[len("/proc/sys/"):].replace("/", ".") for f in files]
    names = [n for n in sorted(names) if n.count(".") >= 2 and len(n) <= 256]
    assert len(names) >= count
    return names[:count]


# ------------------------------------------------------------------------------- the maps


@pytest.mark.parametrize("field", ["labels", "annotations"])
def test_a_map_over_256_kib_is_refused_saying_its_size(field: str) -> None:
    at_limit = worst_map(1024)
    assert sizes.map_bytes(at_limit) == MAP_BYTES_MAX
    parse_pod_config({"metadata": {"name": "x"}, field: at_limit})
    over = dict(at_limit)
    over[next(iter(over))] += "x"
    with pytest.raises(InvalidPodConfig) as info:
        parse_pod_config({"metadata": {"name": "x"}, field: over})
    said = str(info.value)
    assert f"{field}: {MAP_BYTES_MAX + 1} bytes of keys and values in all" in said
    assert "more than 262144" in said and "\\\\" not in said  # no content quoted


def test_the_map_cap_counts_utf8_bytes() -> None:
    wide = {"k": "\U0001f600" * (MAP_BYTES_MAX // 4)}  # 65536 characters, 4 bytes each
    with pytest.raises(InvalidPodConfig, match="annotations: 262145 bytes"):
        parse_pod_config({"metadata": {"name": "x"}, "annotations": wide})


# ------------------------------------------------------------------------------- the list


def status_of(config: dict[str, object], sid: str = ID) -> SandboxStatus:
    pod = parse_pod_config(config)
    rec = SandboxRecord(id=sid, config=pod, created_at=datetime.now(UTC), runtime="x" * 64,
                        state=State.READY)
    return SandboxStatus.from_record(rec)


def worst_stats(sid: str = ID) -> SandboxStats:
    top, when = (1 << 64) - 1, (1 << 63) - 1  # counters are uint64, times int64
    return SandboxStats(
        id=sid, timestamp_ns=when, default_interface="eth0",
        cgroup=CgroupStats(cgroup="/x", timestamp_ns=when, cpu_usage_ns=top, memory_usage_bytes=top,
                     memory_working_set_bytes=top, memory_rss_bytes=top, page_faults=top,
                     major_page_faults=top),
        interfaces=[InterfaceStats(name=f"e{i:02d}" + "x" * 12, rx_bytes=top, rx_errors=top,
                                   tx_bytes=top, tx_errors=top)
                    for i in range(sizes.MAX_STATS_INTERFACES)])


@pytest.mark.parametrize("fill", ["\\", "\U0001f600", "a"])
def test_a_list_entry_is_never_larger_than_its_bound(fill: str) -> None:
    config = worst_listed("w", fill=fill)
    st = status_of(config)
    bound = sizes.list_entry_bytes(parse_pod_config(config))
    listed = pb.ListPodSandboxResponse(items=[convert.pod_sandbox(st)]).ByteSize()
    stats = pb.ListPodSandboxStatsResponse(
        stats=[convert.sandbox_stats(st, worst_stats())]).ByteSize()
    assert listed <= bound and stats <= bound
    assert bound - max(listed, stats) < 4096  # and not loose: the budget holds real pods


def test_the_smallest_entry_is_min_entry_bytes() -> None:
    assert sizes.list_entry_bytes(parse_pod_config({"metadata": {"name": "x",
                                                                 "namespace": "y"}})) \
        == sizes.MIN_ENTRY_BYTES


def test_a_full_list_fits_a_grpc_message() -> None:
    one = sizes.list_entry_bytes(parse_pod_config(worst_listed("w")))
    count = sizes.LIST_BUDGET_BYTES // one
    items = [convert.pod_sandbox(status_of(worst_listed(f"w{i}"), f"{i:064x}"))
             for i in range(count)]
    answer = pb.ListPodSandboxResponse(items=items).ByteSize()
    assert sizes.LIST_BUDGET_BYTES - one < answer <= sizes.LIST_BUDGET_BYTES
    assert answer < sizes.GRPC_MAX_MESSAGE


async def test_admission_refuses_a_sandbox_the_list_could_not_carry(rig: Rig) -> None:
    one = sizes.list_entry_bytes(parse_pod_config(worst_listed("w")))
    fits = sizes.LIST_BUDGET_BYTES // one
    async with rig.controller() as ctl:
        ids = [(await ctl.run_sandbox(worst_listed(f"w{i}"))).id for i in range(fits)]
        with pytest.raises(NodeFull) as info:
            await ctl.run_sandbox(worst_listed("one too many"))
        assert f"{fits} sandboxes take" in str(info.value)
        small = await ctl.run_sandbox({"metadata": {"name": "small"}})  # room for a small one
        await ctl.remove_sandbox(ids.pop())
        ids.append((await ctl.run_sandbox(worst_listed("one too many"))).id)
        for sid in [*ids, small.id]:
            await ctl.remove_sandbox(sid)
    rig.nothing_left()


# ------------------------------------------------------------------------------- the record


def test_a_record_admitted_and_grown_to_its_worst_fits_the_store() -> None:
    assert sizes.ADMITTED_RECORD_BYTES + sizes.record_growth_bound("/" * 4095) \
        < sizes.MAX_RECORD_BYTES - (1 << 20)  # and a MiB left for the CNI result


async def test_the_largest_config_is_refused_at_admission_naming_its_size(rig: Rig) -> None:
    config = worst_everywhere("w", host_sysctls(128))
    async with rig.controller() as ctl:
        with pytest.raises(InvalidPodConfig) as info:
            await ctl.run_sandbox(config)
        assert "pod config too large: its record would take" in str(info.value)
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()


async def test_a_record_at_the_admission_limit_grown_to_its_worst_is_read_back(
        rig: Rig, tmp_path: Path) -> None:
    # the largest record admission accepts: sysctls filled until the next would pass the limit
    names = host_sysctls(128)
    config = worst_everywhere("w", [])
    config["linux"].pop("overhead")
    config["linux"].pop("resources")
    async with rig.controller() as ctl:
        for name in names:
            config["linux"]["sysctls"][name] = "\U0001f600" * 4096
            try:
                st = await ctl.run_sandbox(config)
            except InvalidPodConfig as exc:
                assert "pod config too large" in str(exc)
                break
            await ctl.remove_sandbox(st.id)
        else:
            pytest.fail("no config reached the admission limit")
        del config["linux"]["sysctls"][name]
        st = await ctl.run_sandbox(config)
        rec = rig.store.records[st.id]
        # as admitted: what the run adds (the files made) is the growth bounded below
        admitted = len(rec.evolve(files=None).model_dump_json().encode())
        assert sizes.ADMITTED_RECORD_BYTES - 20_000 < admitted <= sizes.ADMITTED_RECORD_BYTES
        await ctl.remove_sandbox(st.id)
    rig.nothing_left()
    # what the record can gain, at its worst
    error = "\x01" * sizes.MAX_ENTRY_ERROR  # a \u0001 escape each: 6 bytes
    at = datetime.now(UTC)
    path = "/" + "\x01" * 4094
    grown = rec.evolve(
        history=[HistoryEntry(source="Ready", dest="NotReady", trigger="stop", at=at,
                              error=error)] * sizes.MAX_HISTORY,
        last_error="\x01" * sizes.MAX_LAST_ERROR,
        leftovers=[error] * sizes.MAX_LEFTOVERS,
        files=SandboxFiles(hostname_path=path, hosts_path=path, resolv_conf_path=path,
                           shm_path=path, log_directory=rec.config.log_directory,
                           log_directory_created=rec.config.log_directory),
        namespaces=PinnedNamespaces(netns_path=path, userns_path=path, netns_inode=1 << 63,
                                    userns_inode=1 << 63, netns_owner_inode=1 << 63),
        task=TaskInfo(pid=1 << 31, start_time=1 << 63), exit_status=255, finished_at=at,
        network=NetworkResult(network_name="n" * 255, ip="f" * 45,
                              raw={"cniVersion": "1.0.0", "pad": "p" * (900 << 10)}))
    size = len(grown.model_dump_json().encode())
    assert size - admitted - (900 << 10) <= sizes.record_growth_bound(rec.config.log_directory)
    store = FileStore(str(tmp_path / "state"))
    store.open()
    try:
        await store.save(grown, durable=True)
        records, set_aside = await store.load_all()
    finally:
        store.close()
    assert set_aside == [] and [r.id for r in records] == [grown.id]


async def test_the_store_refuses_to_write_a_record_it_would_not_read_back(
        tmp_path: Path) -> None:
    rec = SandboxRecord(id=ID, config=parse_pod_config({"metadata": {"name": "x"}}),
                        created_at=datetime.now(UTC), runtime="runc",
                        network=NetworkResult(network_name="n",
                                              raw={"pad": "p" * sizes.MAX_RECORD_BYTES}))
    store = FileStore(str(tmp_path / "state"))
    store.open()
    try:
        with pytest.raises(StateDirError, match="the 4194304 the store reads back"):
            await store.save(rec, durable=True)
        assert os.listdir(store.dir) == []
    finally:
        store.close()


def test_clip_says_how_long_the_text_was() -> None:
    assert sizes.clip("abc", 5) == "abc" and sizes.clip(None, 5) is None
    cut = sizes.clip("x" * 5000, 1024)
    assert cut is not None and len(cut) == 1024 and cut.endswith("... (5000 characters)")


@pytest.mark.parametrize("config", [
    {"metadata": {"name": "x", "uid": "a;" * 50_000}},
    {"metadata": {"name": "x"}, "log_directory": "rel" * 40_000},
    {"metadata": {"name": "x"}, "linux": {"cgroup_parent": "/podfsm/.." + "/a" * 50_000}},
    {"metadata": {"name": "x"}, "annotations": {f"k{i}": "\x01" * 65536 for i in range(40)}},
    {"metadata": {"name": "x"}, "port_mappings": [{"protocol": "x" * 100_000}]},
    {"metadata": {"name": "x"}, "labels": {"\x01" * 317: "v"}},
], ids=["uid", "log_directory", "cgroup_parent", "annotations", "enum", "key"])
def test_a_refusal_quotes_little_of_what_it_refuses(config: dict[str, object]) -> None:
    # a gRPC status travels in a trailer, under the client's metadata limit (8 KiB by default
    # in gRPC's core), and each is a log line
    with pytest.raises(InvalidPodConfig) as info:
        parse_pod_config(config)
    said = str(info.value)
    assert len(said) < 2500, said[:300]
    assert "characters)" in said or "..." in said
