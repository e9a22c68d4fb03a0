"""What the etcd store does beyond the contract: unknown outcomes resolved for real (a
proxy loses requests or replies), failover in a 3-member cluster, TLS, leases, election.

Real etcd members on loopback (tests/etcd_cluster.py); timeouts are short so that the
failure cases stay fast.
"""

from __future__ import annotations

import threading
import time

import pytest

from control.election import Election
from control.etcd_client import EtcdConfig
from control.etcd_store import EtcdStore, NotLeader, prefix_end
from control.store import Busy, Conflict, OutcomeUnknown, Put, Unavailable, update
from proto.etcd import rpc_pb2, rpc_pb2_grpc
from tests.etcd_cluster import EtcdCluster
from tests.tcp_proxy import TcpProxy

# a short attempt moves on from a stopped member quickly; the whole call may outlast an
# election on a loaded machine. Calls meant to fail use SHORT, to fail fast.
FAST = {"timeout_s": 5.0, "attempt_timeout_s": 0.5}
SHORT = {"timeout_s": 1.0, "attempt_timeout_s": 0.4}


@pytest.fixture
def open_store(etcd1):
    """open_store(endpoints=None, **options): a store on etcd1 (or on the given endpoints),
    with short timeouts, in a namespace of this test; closed afterwards."""
    stores = []
    namespace = f"/t-{time.monotonic_ns()}/"

    def open_(endpoints: list[str] | None = None, cluster: EtcdCluster = etcd1,
              **options: object) -> EtcdStore:
        url = "etcd://" + ",".join(endpoints or cluster.endpoints)
        store = EtcdStore(EtcdConfig.from_url(url, namespace=namespace, **{**FAST, **options}))
        stores.append(store)
        return store

    yield open_
    for s in stores:
        s.close()


@pytest.fixture
def etcd3(tmp_path):
    with EtcdCluster(str(tmp_path), size=3) as cluster:
        yield cluster


def _history(store: EtcdStore, prefix: bytes, start: int, count: int, timeout_s: float = 3.0):
    """(key, value) of the first `count` raw etcd puts under prefix since `start`."""
    watch = store.watch_raw(prefix, prefix_end(prefix), start, lambda ev: (ev.kv.key, ev.kv.value))
    out = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            if (ev := watch.get(0.1)) is not None:
                out.append(ev)
        while (ev := watch.get(0.3)) is not None:  # and nothing more
            out.append(ev)
    finally:
        watch.cancel()
    return out


# -- configuration ------------------------------------------------------------------------------
def test_urls():
    c = EtcdConfig.from_url("etcd://10.0.0.1:2379,etcd-1,[::1]:2380")
    assert c.endpoints == ("10.0.0.1:2379", "etcd-1:2379", "[::1]:2380") and not c.tls
    c = EtcdConfig.from_url("etcds://h:1", ca_file="ca", cert_file="c", key_file="k",
                            timeout_s=1)
    assert c.tls and c.ca_file == "ca" and c.timeout_s == 1
    for bad in ("http://h:1", "etcd://", "etcd://h:0", "etcd://h:99999", "etcd://h:x",
                "etcd://h:1/path", "etcd://[::1"):
        with pytest.raises(ValueError):
            EtcdConfig.from_url(bad)
    with pytest.raises(ValueError, match="etcds"):
        EtcdConfig.from_url("etcd://h:1", ca_file="ca")
    with pytest.raises(ValueError, match="key"):
        EtcdConfig.from_url("etcds://h:1", cert_file="c")


def test_a_commit_too_large_for_etcd_is_refused_whole(open_store):
    store = open_store()
    for size in (1_600_000, 3_000_000):  # over etcd's request limit; over gRPC's as well
        with pytest.raises(ValueError, match="too large"):
            store.commit([Put("volume/small", {}), Put("volume/big", {"x": "a" * size})])
    assert store.list("volume/") == []
    store.commit([Put("volume/small", {})])  # and the store goes on


# -- unknown outcomes ------------------------------------------------------------------------------
def test_a_lost_reply_is_resolved_as_applied_once(etcd1, open_store):
    """The proxy forwards the commit to etcd but loses the reply: the store learns on the
    other member that it applied, returns its revision, and never applies it twice."""
    with TcpProxy(etcd1.endpoints[0]) as proxy:
        store = open_store([proxy.endpoint, etcd1.endpoints[0]])
        start = store.revision() + 1  # (through the proxy: it is the preferred member now)
        sent = proxy.forwarded_requests
        proxy.mode = "drop_replies"
        revision = store.commit([Put("volume/a", {"n": 1})])  # unconditional: a resend would show
        assert proxy.forwarded_requests > sent  # the commit did go through the proxy
    assert store.get("volume/a").version == revision
    data = _history(store, store._data, start, 1)
    assert [k for k, _ in data] == [store._data + b"volume/a"]
    tokens = _history(store, store._slot_prefix, start, 1)
    assert [v[:7] for _, v in tokens] == [b"commit-"]  # resolved by reading: no fence


def test_a_lost_request_is_fenced_off_and_sent_again(etcd1, open_store):
    """The proxy swallows the commit: the store fences it off on the other member (so it
    can never apply late), then sends it again: applied exactly once."""
    with TcpProxy(etcd1.endpoints[0]) as proxy:
        store = open_store([proxy.endpoint, etcd1.endpoints[0]])
        start = store.revision() + 1
        proxy.mode = "drop_requests"
        revision = store.commit([Put("volume/a", {"n": 1})])
    assert store.get("volume/a").version == revision
    assert len(_history(store, store._data, start, 1)) == 1
    tokens = _history(store, store._slot_prefix, start, 2)
    assert [v[:6] for _, v in tokens] == [b"fence-", b"commit"]


def test_a_fenced_off_commit_can_never_apply_later(etcd1, open_store):
    """The commit that was in flight arrives after its fence: etcd refuses it."""
    store = open_store()
    ops = [Put("volume/late", {"n": 1})]
    slot = store._take_slot()
    late = store._request(ops, None, slot, b"commit-late")
    assert store._resolve(slot, b"commit-late", RuntimeError("lost"), ops,
                          time.monotonic() + 2) == 0  # fenced: not applied
    with etcd1.members[0].channel() as ch:
        rsp = rpc_pb2_grpc.KVStub(ch).Txn(late, timeout=2)
    assert not rsp.succeeded and store.get("volume/late") is None


@pytest.mark.parametrize("mode, applied", [("drop_replies", True), ("drop_requests", False)])
def test_an_unreachable_store_says_the_outcome_is_unknown(etcd1, open_store, mode, applied):
    with TcpProxy(etcd1.endpoints[0]) as proxy:
        store = open_store([proxy.endpoint], **SHORT)
        store.get("volume/a")
        proxy.mode = mode
        began = time.monotonic()
        with pytest.raises(OutcomeUnknown, match="outcome unknown") as e:
            store.commit([Put("volume/a", {"n": 1}, expect=0)])
        assert time.monotonic() - began < SHORT["timeout_s"] + SHORT["attempt_timeout_s"] + 1
        assert isinstance(e.value, Unavailable)
        proxy.reset()
        time.sleep(0.2)  # what was forwarded has been applied by now
        assert (store.get("volume/a") is not None) == applied
        # the store goes on (with a fresh commit token key)
        assert store.commit([Put("volume/b", {})]) > 0


# -- a 3-member cluster ---------------------------------------------------------------------------
def test_writes_go_on_with_one_member_down_or_stopped(etcd3, open_store):
    store = open_store(cluster=etcd3)
    count = 0

    def bump(n: int) -> None:
        nonlocal count
        for _ in range(n):
            update(store, "counter/x", lambda v: {"n": (v or {"n": 0})["n"] + 1})
            count += 1

    bump(5)
    etcd3.kill(0)  # the member the store was using
    bump(10)
    etcd3.members[0].start()
    etcd3.wait_healthy()
    etcd3.pause(1)  # SIGSTOP: sockets open, no answers (it may have been the leader)
    try:
        bump(10)
    finally:
        etcd3.resume(1)
    assert store.get("counter/x").value == {"n": count} == {"n": 25}


def test_with_two_of_three_down_calls_fail_in_time(etcd3, open_store):
    store = open_store(cluster=etcd3, **SHORT)
    store.commit([Put("volume/a", {})])
    etcd3.kill(1)
    etcd3.kill(2)
    bound = SHORT["timeout_s"] + SHORT["attempt_timeout_s"] + 1
    began = time.monotonic()
    with pytest.raises(Unavailable):
        store.commit([Put("volume/b", {}, expect=0)])
    assert time.monotonic() - began < bound
    began = time.monotonic()
    with pytest.raises(Unavailable):
        store.get("volume/a")
    assert time.monotonic() - began < bound
    etcd3.members[1].start()
    etcd3.wait_healthy()
    store = open_store(cluster=etcd3)
    try:  # volume/b may or may not have landed: the caller was told the outcome is unknown
        store.commit([Put("volume/b", {}, expect=0)])
    except Conflict:
        pass
    assert store.get("volume/b") is not None


def test_a_watch_moves_to_another_member(etcd3, open_store):
    store = open_store(cluster=etcd3)
    writer = open_store(etcd3.endpoints[1:], cluster=etcd3)
    with store.watch("volume/") as w:
        writer.commit([Put("volume/0", {})])
        assert w.get(3).key == "volume/0"
        etcd3.kill(0)  # the watch's member
        revisions = [writer.commit([Put(f"volume/{i}", {})]) for i in range(1, 6)]
        got = [w.get(5) for _ in range(5)]
    assert [e.revision for e in got if e] == revisions


# -- TLS -----------------------------------------------------------------------------------------
def test_tls_with_client_certificates(tmp_path):
    with EtcdCluster(str(tmp_path), tls=True) as cluster:
        tls = cluster.tls
        assert tls is not None
        url = cluster.url
        assert url.startswith("etcds://")
        with EtcdStore(EtcdConfig.from_url(url, ca_file=tls.ca.cert_file,
                                           cert_file=tls.client.cert_file,
                                           key_file=tls.client.key_file, **FAST)) as store:
            rev = store.commit([Put("volume/a", {"n": 1}, expect=0)])
            assert store.get("volume/a").version == rev
        for config in (
            EtcdConfig.from_url(url, ca_file=tls.ca.cert_file, **SHORT),  # no client cert
            EtcdConfig.from_url(url.replace("etcds", "etcd"), **SHORT),  # no TLS at all
        ):
            with EtcdStore(config) as store:
                began = time.monotonic()
                with pytest.raises(Unavailable):
                    store.get("volume/a")
                assert time.monotonic() - began < SHORT["timeout_s"] + 1


# -- leases ---------------------------------------------------------------------------------------
def test_an_expired_lease_takes_its_keys_along(open_store):
    store = open_store()
    lease = store.grant_lease(1, keep_alive=False)
    store.commit([Put("node/a", {"zone": "z"}, lease=lease.id)])
    with store.watch("node/") as w:
        event = w.get(5)
    assert event is not None and event.key == "node/a" and event.value is None
    assert not lease.alive() and lease.time_to_live() == -1
    with pytest.raises(Exception, match="lease not found"):
        store.commit([Put("node/b", {}, lease=lease.id)])


def test_a_kept_alive_lease_outlives_its_ttl_until_revoked(open_store):
    store = open_store()
    lease = store.grant_lease(1)
    store.commit([Put("node/a", {}, lease=lease.id)])
    time.sleep(2.2)
    assert store.get("node/a") is not None and lease.alive() and lease.time_to_live() >= 0
    lease.revoke()
    assert store.get("node/a") is None and lease.lost.is_set()


def test_a_lease_that_cannot_be_renewed_is_lost_in_time(etcd1, open_store):
    with TcpProxy(etcd1.endpoints[0]) as proxy:
        store = open_store([proxy.endpoint])
        lease = store.grant_lease(1)
        proxy.mode = "drop_replies"
        assert lease.lost.wait(3)  # within the TTL and a renewal period
        assert not lease.alive()


def test_a_persistent_lease_is_renewed_again_after_an_outage(etcd1, open_store):
    """No renewal gets through for longer than the TTL: a persistent lease is not certainly
    valid meanwhile, but not lost either (etcd may still have it: here it does, the
    requests reach it); once answers come back it is valid again."""
    with TcpProxy(etcd1.endpoints[0]) as proxy:
        store = open_store([proxy.endpoint])
        lease = store.grant_lease(1, persistent=True)
        assert lease.renew_period_s <= 1.0
        proxy.mode = "drop_replies"
        time.sleep(1.6)
        assert lease.remaining_s() == 0 and not lease.lost.is_set() and not lease.gone.is_set()
        proxy.mode = "forward"
        deadline = time.monotonic() + 5
        while lease.remaining_s() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.remaining_s() > 0 and not lease.lost.is_set()
        lease.revoke()
        assert lease.gone.is_set()


def test_a_persistent_lease_that_etcd_let_expire_is_gone(etcd1, open_store):
    """etcd expired the lease while no renewal reached it: the next answer says so, and
    the lease is gone (and lost) for good."""
    with TcpProxy(etcd1.endpoints[0]) as proxy:
        store = open_store([proxy.endpoint])
        lease = store.grant_lease(1, persistent=True)
        proxy.mode = "drop_requests"
        time.sleep(2.5)  # the TTL and etcd's expiry check
        assert not lease.gone.is_set()
        proxy.mode = "forward"
        assert lease.gone.wait(5) and lease.lost.is_set() and lease.remaining_s() == 0


# -- leader election ------------------------------------------------------------------------------
def test_leadership_hands_over_on_resign_and_fences_the_old_leader(open_store):
    a, b = open_store(), open_store()
    lease_a, lease_b = a.grant_lease(2), b.grant_lease(2)
    leader_a = Election(a, "controller").campaign("node-a", lease_a, timeout_s=5)
    fenced_a = leader_a.fenced(a)
    fenced_a.commit([Put("volume/x", {"by": "a"})])
    assert Election(b, "controller").leader().value == "node-a"

    won = []
    t = threading.Thread(target=lambda: won.append(
        Election(b, "controller").campaign("node-b", lease_b, timeout_s=10)))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # b waits while a leads
    current = Election(b, "controller").leader()
    leader_a.resign()
    t.join(5)
    assert won and Election(a, "controller").observe(current, 2).value == "node-b"
    with pytest.raises(NotLeader):
        fenced_a.commit([Put("volume/x", {"by": "a, deposed"})])
    assert a.get("volume/x").value == {"by": "a"}
    won[0].fenced(b).commit([Put("volume/x", {"by": "b"})])
    assert a.get("volume/x").value == {"by": "b"}


def test_leadership_hands_over_when_the_leaders_lease_expires(open_store):
    a, b = open_store(), open_store()
    lease_a = a.grant_lease(1, keep_alive=False)  # a "pauses": its lease is not renewed
    leader_a = Election(a, "ctl").campaign("node-a", lease_a)
    leader_b = Election(b, "ctl").campaign("node-b", b.grant_lease(2), timeout_s=5)
    assert Election(a, "ctl").leader().value == "node-b"
    with pytest.raises(NotLeader):  # even skipping the local lease check, etcd refuses
        a.commit([Put("volume/x", {})], fence=leader_a.fence)
    assert a.get("volume/x") is None
    leader_b.fenced(b).commit([Put("volume/x", {})])


def test_a_campaign_that_times_out_withdraws(open_store):
    a, b = open_store(), open_store()
    Election(a, "ctl").campaign("node-a", a.grant_lease(2))
    with pytest.raises(Busy):
        Election(b, "ctl").campaign("node-b", b.grant_lease(2), timeout_s=0.3)
    prefix = Election(b, "ctl").prefix
    rsp = b.client.call("KV", "Range", rpc_pb2.RangeRequest(
        key=prefix, range_end=prefix_end(prefix), count_only=True), idempotent=True)
    assert rsp.count == 1  # only a's candidacy is left


def test_a_fenced_commit_fits_the_largest_commit(open_store):
    """126 guarded writes + the commit token + the leader fence = etcd's 128 compares."""
    store = open_store()
    leader = Election(store, "ctl").campaign("me", store.grant_lease(2))
    ops = [Put(f"volume/{i:03d}", {}, expect=0) for i in range(store.max_ops)]
    leader.fenced(store).commit(ops)
    assert len(store.list("volume/")) == store.max_ops
