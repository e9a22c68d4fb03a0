"""Reading I/O counters from fake v1/v2 cgroup files and a fake sysfs (no root)."""

from __future__ import annotations

from pathlib import Path

from engine.qos import stats
from engine.qos.stats import DeviceCounters, IoCounters

V1_SERVICED = """7:3 Read 120
7:3 Write 30
7:3 Sync 150
7:3 Async 0
7:3 Discard 0
7:3 Total 150
8:0 Read 999
8:0 Write 999
Total 2148
"""
V1_BYTES = """7:3 Read 491520
7:3 Write 122880
7:3 Total 614400
Total 614400
"""


def test_v1_counters_own_and_recursive(tmp_path: Path) -> None:
    (tmp_path / "blkio.throttle.io_serviced").write_text(V1_SERVICED)
    (tmp_path / "blkio.throttle.io_service_bytes").write_text(V1_BYTES)
    (tmp_path / "blkio.throttle.io_serviced_recursive").write_text("7:3 Read 5\n7:3 Write 6\n")
    own = stats.read_v1(str(tmp_path), (7, 3), recursive=False)
    assert own == IoCounters(120, 30, 491520, 122880)
    rec = stats.read_v1(str(tmp_path), (7, 3), recursive=True)
    assert rec == IoCounters(5, 6, 0, 0)  # the _recursive bytes file is absent: zero
    assert stats.read_v1(str(tmp_path), (7, 9), recursive=False) == IoCounters()


def test_v2_io_stat(tmp_path: Path) -> None:
    (tmp_path / "io.stat").write_text(
        "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0\n"
        "7:3 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"
    )
    assert stats.read_cgroup(2, str(tmp_path), (7, 3)) == IoCounters(1, 2, 4096, 8192)
    assert stats.read_cgroup(2, str(tmp_path / "gone"), (7, 3)) == IoCounters()


def test_rates_clamp_counter_drops() -> None:
    before = IoCounters(100, 100, 4096, 4096)
    after = IoCounters(300, 50, 8192, 4096)  # a removed child took its writes along
    r = stats.rates(before, after, 2.0)
    assert (r.read_iops, r.write_iops, r.read_bytes_per_s, r.write_bytes_per_s) == (
        100.0,
        0.0,
        2048.0,
        0.0,
    )
    assert stats.rates(before, after, 0.0) == stats.IoRates()


def test_inflight_is_ticks_per_millisecond() -> None:
    a = DeviceCounters(0, 0, 1000, 0)
    b = DeviceCounters(10, 10, 1500, 2000)
    assert stats.inflight(a, b, 1.0) == (0.5, 2.0)


def test_device_stat_from_sysfs(tmp_path: Path) -> None:
    dev = tmp_path / "dev" / "block" / "7:3"
    (dev / "queue").mkdir(parents=True)
    (dev / "stat").write_text(
        "    1001        0     8008       14      20        0      160       33        0"
        "        4       14        0        0        0        0        0        0\n"
    )
    (dev / "queue" / "iostats").write_text("1\n")
    assert stats.read_device((7, 3), str(tmp_path)) == DeviceCounters(1001, 20, 14, 33)
    (dev / "queue" / "iostats").write_text("0\n")
    assert stats.read_device((7, 3), str(tmp_path)) is None
    assert stats.read_device((7, 4), str(tmp_path)) is None
