"""The handler executor: few threads while calls are quick, more as soon as calls stall."""

import threading
import time

import pytest

from control.warm_pool import WarmPool
from engine import waits


@pytest.fixture
def pool():
    pools = []

    def make(**kw):
        p = WarmPool(**{"max_workers": 8, "core": 2, "slow_after_s": 0.2, **kw})
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.shutdown(wait=True)


def test_results_and_errors_reach_the_caller(pool):
    p = pool()
    assert p.submit(lambda a, b=0: a + b, 2, b=3).result(5) == 5
    with pytest.raises(ZeroDivisionError):
        p.submit(lambda: 1 / 0).result(5)
    assert [f.result(5) for f in [p.submit(lambda i=i: i * i) for i in range(50)]] == \
        [i * i for i in range(50)]


def test_quick_calls_run_on_core_threads_only(pool):
    p = pool(core=2, slow_after_s=5.0)
    running, most, lock = [0], [0], threading.Lock()

    def call():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1

    for f in [p.submit(call) for _ in range(60)]:
        f.result(10)
    assert most[0] == 2  # never more than core at once (and both were used)
    assert p.threads() == 2  # the queue waited for warm threads


def test_a_stalled_call_lends_its_place_soon(pool):
    # Two calls stuck on something (a disk, a node) must not hold the next call up for
    # longer than slow_after_s, Probe-like calls included.
    p = pool(core=2, slow_after_s=0.2)
    release = threading.Event()
    stuck = [p.submit(release.wait, 30) for _ in range(2)]
    time.sleep(0.05)
    started = time.monotonic()
    assert p.submit(lambda: "probe").result(10) == "probe"
    waited = time.monotonic() - started
    release.set()
    assert all(f.result(10) for f in stuck)
    assert 0.1 <= waited < 2.0, waited  # it waited for the stuck calls to count as slow


def test_calls_that_wait_for_each_other_do_not_deadlock(pool):
    p = pool(core=1, slow_after_s=0.1)
    second_ran = threading.Event()

    def first():
        return second_ran.wait(10)  # needs the call queued behind it

    a = p.submit(first)
    b = p.submit(second_ran.set)
    assert a.result(15) is True
    b.result(5)


def test_threads_never_exceed_max_workers(pool):
    p = pool(max_workers=3, core=1, slow_after_s=0.05)
    release = threading.Event()
    futures = [p.submit(release.wait, 30) for _ in range(6)]
    time.sleep(1.0)  # long enough for every lend the watcher would make
    assert p.busy() == 3 and p.threads() == 3
    release.set()
    assert all(f.result(10) for f in futures)


def test_shutdown_runs_what_was_queued_and_refuses_more(pool):
    p = pool(core=1, slow_after_s=5.0)
    done = []
    for i in range(5):
        p.submit(lambda i=i: (time.sleep(0.01), done.append(i)))
    p.shutdown(wait=True)
    assert done == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        p.submit(lambda: None)


def test_a_call_waiting_on_the_disk_lends_its_place_after_a_grace(pool):
    # engine/waits.py marks fsyncs and group-commit turns: on a slow disk the CPU must not
    # idle (and commits must still group) while the only core thread waits.
    p = pool(core=1, slow_after_s=30.0)
    disk = threading.Event()

    def committing():
        with waits.io_wait():
            return disk.wait(10)

    a = p.submit(committing)
    time.sleep(0.05)
    started = time.monotonic()
    assert p.submit(lambda: "next").result(5) == "next"
    assert time.monotonic() - started < 2.0  # far less than slow_after_s
    disk.set()
    assert a.result(5) is True


def test_a_call_computing_keeps_its_place(pool):
    p = pool(core=1, slow_after_s=30.0)
    busy = threading.Event()
    a = p.submit(busy.wait, 10)  # not marked as a disk wait: counts as computing
    time.sleep(0.05)
    b = p.submit(lambda: "next")
    with pytest.raises(TimeoutError):
        b.result(0.5)
    busy.set()
    assert a.result(5) is True and b.result(5) == "next"


def test_disk_waits_outside_a_pool_do_nothing():
    with waits.io_wait():
        pass


def test_probe_on_its_fast_lane_answers_while_every_handler_thread_is_taken(tmp_path):
    # A kubelet's or a sidecar's Probe must not queue behind provisioning calls.
    import grpc

    from control.warm_pool import fast_lane
    from proto import csi_pb2, csi_pb2_grpc

    release = threading.Event()

    class Stuck(csi_pb2_grpc.ControllerServicer):
        def CreateVolume(self, request, context):
            release.wait(30)
            return csi_pb2.CreateVolumeResponse()

    class Identity(csi_pb2_grpc.IdentityServicer):
        def Probe(self, request, context):
            return csi_pb2.ProbeResponse()

    executor = WarmPool(max_workers=1, core=1, slow_after_s=0.05)
    server = grpc.server(executor)
    csi_pb2_grpc.add_ControllerServicer_to_server(Stuck(), server)
    csi_pb2_grpc.add_IdentityServicer_to_server(fast_lane(Identity(), ("Probe",)), server)
    endpoint = f"unix://{tmp_path}/s.sock"
    server.add_insecure_port(endpoint)
    server.start()
    try:
        with grpc.insecure_channel(endpoint) as ch:
            stuck = csi_pb2_grpc.ControllerStub(ch).CreateVolume.future(
                csi_pb2.CreateVolumeRequest(name="x"), timeout=30)
            deadline = time.monotonic() + 5
            while executor.busy() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert executor.busy() == 1  # the only handler thread is taken
            csi_pb2_grpc.IdentityStub(ch).Probe(csi_pb2.ProbeRequest(), timeout=2)
            release.set()
            stuck.result(10)
    finally:
        release.set()
        server.stop(0).wait()
        executor.shutdown(wait=True)
