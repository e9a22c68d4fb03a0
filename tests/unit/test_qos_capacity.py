"""The capacity figure (engine/qos/capacity.py) from recorded per-second samples, no fio run.

The samples are real: per-second IOPS (reads + writes) that fio logged on this project's
shared test VM (a btrfs pool image, 4 KiB random 50/50, direct I/O).
"""

from __future__ import annotations

import random
import statistics

import pytest

from engine.qos import capacity, fio
from engine.qos.capacity import Capacity

# 24 one-second intervals of a quiet run (after 2 s of warm-up: index 3 onwards count)
QUIET_RUN = [26650, 26534, 26671, 23545, 23508, 21959, 21826, 24086, 23332, 21853, 24574,
             24222, 24533, 23133, 24290, 24928, 25113, 23164, 24490, 23185, 22954, 22576,
             20989, 23272]
# a run during which other sessions' test suites loaded the machine
BUSY_RUN = [17485, 15045, 12671, 12696, 9233, 20563, 20299, 19080, 21184, 22197, 19197,
            16821, 9805, 5577, 7750, 12720, 13928, 14762, 14540, 13113, 8549]
# what fio wrote for a 2-job run (msec, IOPS, direction, bs, offset), one file per job
TWO_JOB_LOGS = ["1000, 20611, 0, 0, 0\n1000, 20476, 1, 0, 0\n2001, 19698, 0, 0, 0\n"
                "2001, 19771, 1, 0, 0\n",
                "999, 20000, 0, 0, 0\n1000, 20100, 1, 0, 0\n2000, 19000, 0, 0, 0\n"
                "2002, 19100, 1, 0, 0\n"]


def per_interval(run: list[int]) -> dict[int, float]:
    return {i + 1: float(v) for i, v in enumerate(run)}


def figure(run: list[int], warmup_s: int = 2, seconds: int = 20) -> int:
    return capacity.capacity_from_samples(
        capacity.steady_samples(per_interval(run), warmup_s, seconds))


def test_the_warm_up_and_anything_past_the_end_are_left_out() -> None:
    kept = capacity.steady_samples(per_interval(QUIET_RUN), warmup_s=2, seconds=20)
    assert kept == [float(v) for v in QUIET_RUN[2:22]]


def test_the_figure_is_the_median_of_the_measured_seconds() -> None:
    assert figure(QUIET_RUN) == int(statistics.median(QUIET_RUN[2:22])) == 23526


@pytest.mark.parametrize("second, value", [(5, 3107), (9, 45526), (21, 0)],
                         ids=["stall", "burst", "dead-second"])
def test_one_noisy_second_barely_moves_it(second: int, value: int) -> None:
    noisy = list(QUIET_RUN)
    noisy[second] = value
    assert abs(figure(noisy) / figure(QUIET_RUN) - 1) < 0.03
    # what the old figure (the mean of one short run) would do with the same second
    old = statistics.mean(noisy[second - 1:second + 2])
    assert abs(old / statistics.mean(QUIET_RUN[second - 1:second + 2]) - 1) > 0.25


def test_a_load_beside_the_measurement_never_raises_it() -> None:
    rng = random.Random(7)
    quiet = figure(QUIET_RUN)
    for _ in range(200):  # each second loses some share, different every second
        loaded = [round(v * rng.uniform(0.2, 1.0)) for v in QUIET_RUN]
        assert figure(loaded) <= quiet
    assert figure(BUSY_RUN, seconds=18) < quiet


def test_too_few_seconds_is_an_error_not_a_figure() -> None:
    with pytest.raises(ValueError):
        capacity.capacity_from_samples([20000.0, 21000.0])


def test_iops_logs_of_every_job_and_both_directions_add_up(tmp_path) -> None:
    job = fio.FioJob("/x", "randrw", iops_log=str(tmp_path / "cap"))
    for n, text in enumerate(TWO_JOB_LOGS, 1):
        (tmp_path / f"cap_iops.{n}.log").write_text(text)
    assert fio.read_iops_log(job) == {1: 20611 + 20476 + 20000 + 20100,
                                      2: 19698 + 19771 + 19000 + 19100}
    argv = job.argv()
    assert f"--write_iops_log={tmp_path}/cap" in argv and "--log_avg_msec=1000" in argv


def test_the_record_keeps_source_method_date_and_samples() -> None:
    cap = Capacity(23808, capacity.MEASURED, "fio ...", 1_790_000_000.0, (23000, 24000, 25000))
    assert Capacity.from_record(cap.record()) == cap
    assert cap.date == "2026-09-21T14:13:20Z" and not cap.legacy


def test_a_figure_from_the_old_single_run_is_known_as_such() -> None:
    old = Capacity.from_record({"iops": 3107})
    assert old.legacy and old.iops == 3107 and old.date == "unknown"
