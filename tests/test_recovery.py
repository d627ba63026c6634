"""Recovery client against the real re-request server on loopback (no root needed).

A fake consumer declares gaps into the shared ``gaps`` ring and drains the ``recov`` ring
like the real one (first copy of a sequence wins), so every test checks what the consumer
would receive: exactly the file's messages for the declared ranges, or ``REC_LOST``.
Waits are bounded; time-dependent behaviour (throttle, backoff, SLO) is checked with the
clock injected into ``step()``, never with wall-clock bounds.
"""

from __future__ import annotations

import socket
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane import moldudp64 as mold
from dataplane import shm
from host.appliance.recovery import (
    SHARED_LEN,
    RecoveryClient,
    RecoveryConfig,
    metric_families,
    read_shared,
)
from host.exchange import itchgen, rerequest
from host.exchange.publisher import Session
from host.exchange.rerequest import ReRequestServer, ServerConfig
from tests.helpers import free_port, wait_for

NAME = "RECOVTEST1"
N = 20_000
S = 1_000_000_000  # ns per second


@pytest.fixture(scope="module")
def sess() -> Session:
    return Session.from_buffer(itchgen.generate(N, 40, 11))


def message(sess: Session, seq: int) -> bytes:
    return bytes(sess.buf[sess.offsets[seq - 1] + 2 : sess.offsets[seq]])


def packet(sess: Session, seq: int, count: int, name: str = NAME) -> bytes:
    """A MoldUDP64 data packet carrying the file's messages seq..seq+count-1."""
    blocks = b"".join(
        len(m).to_bytes(2, "big") + m for m in (message(sess, s) for s in range(seq, seq + count))
    )
    return mold.session_bytes(name) + seq.to_bytes(8, "big") + count.to_bytes(2, "big") + blocks


def udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@contextmanager
def server(sess: Session, **kw):
    cfg = ServerConfig(port=udp_port(), workers=2, **kw)
    srv = ReRequestServer(
        sess,
        mold.session_bytes(NAME),
        np.array([sess.n], np.int64),
        cfg,
        payload_limit=1400,
        bind_ip="127.0.0.1",
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Consumer:
    """The consumer's side of the two rings, in Python."""

    def __init__(self, maps: dict):
        self.m = maps
        self.data: dict[int, bytes] = {}  # first copy wins, as in the arbiter
        self.lost: list[tuple[int, int]] = []
        self.entries: list[tuple[int, int, int]] = []  # (kind, first, count) in ring order

    def declare(self, first: int, count: int, detected_ns: int | None = None) -> None:
        ctl = self.m["control"]
        head = int(ctl[shm.C_GAP_HEAD])
        t = time.monotonic_ns() if detected_ns is None else detected_ns
        self.m["gaps"][head % shm.GAP_SLOTS] = (first, count, t, 0)
        ctl[shm.C_GAP_HEAD] = head + 1

    def drain(self) -> None:
        ctl = self.m["control"]
        while int(ctl[shm.C_REC_TAIL]) != int(ctl[shm.C_REC_HEAD]):
            i = int(ctl[shm.C_REC_TAIL]) % shm.REC_SLOTS
            kind, n, first, count = (int(v) for v in self.m["recov_meta"][i])
            self.entries.append((kind, first, count))
            if kind == shm.REC_DATA:
                status, seq, cnt, name, msgs = mold.parse(self.m["recov"][i, :n].tobytes())
                assert (status, seq, cnt, name) == (
                    mold.P_DATA,
                    first,
                    count,
                    mold.session_bytes(NAME),
                )
                for k, msg in enumerate(msgs):
                    self.data.setdefault(seq + k, msg)
            else:
                assert kind == shm.REC_LOST and n == 0
                self.lost.append((first, count))
            ctl[shm.C_REC_TAIL] = int(ctl[shm.C_REC_TAIL]) + 1


def wait_until(
    client: RecoveryClient, consumer: Consumer, pred, timeout: float = 30.0, drain: bool = True
):
    def met():
        if drain:
            consumer.drain()
        c = client.counters()
        assert client.error is None, client.error
        return c if pred(c) else None

    return wait_for(met, timeout, "the recovery condition", client.counters, interval=0.002)


def lockstep(client: RecoveryClient, srv: ReRequestServer, consumer: Consumer, now_ns: int):
    """Step a client driven by hand (``start=False``) at ``now_ns`` until the exchange with
    the server is quiet: it has taken every request sent, the client every packet answered
    (a wait for events, with a deadline; the time both see is the test's)."""

    def quiet():
        client.step(now_ns)
        consumer.drain()
        c = client.counters()
        answered = c["answers"] + c["rejected_answers"]
        return (
            c
            if (srv.counters["requests"] == c["requested"] and answered == srv.counters["packets"])
            else None
        )

    return wait_for(quiet, 30, "a quiet exchange", lambda: (client.counters(), srv.counters))


def frozen_server_clock(monkeypatch) -> list[int]:
    """The re-request server's clock, in ns, set by the test (its rate limit refills by it)."""
    now = [0]
    monkeypatch.setattr(rerequest, "time", types.SimpleNamespace(monotonic=lambda: now[0] / S))
    return now


def settled(c: dict) -> bool:
    return c["detected"] > 0 and c["outstanding"] == 0


def cfg_for(port: int, **kw) -> RecoveryConfig:
    return RecoveryConfig(server_host="127.0.0.1", server_port=port, session=NAME, **kw)


@contextmanager
def running(tmp: Path, port: int, start: bool = True, shared=None, **kw):
    maps = shm.create("t", root=tmp)
    client = RecoveryClient(
        cfg_for(port, **kw), maps, bind_ip="127.0.0.1", log=lambda m: None, shared=shared
    )
    consumer = Consumer(maps)
    if start:
        client.start()
    else:
        client.open()
    try:
        yield client, consumer
    finally:
        client.stop()


def union(gaps) -> set[int]:
    return {s for first, count in gaps for s in range(first, first + count)}


def assert_exact(sess: Session, consumer: Consumer, seqs: set[int]) -> None:
    assert set(consumer.data) == seqs
    assert all(consumer.data[s] == message(sess, s) for s in seqs)
    assert consumer.lost == []


# --- filling --------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 100, 10_000])
def test_gap_is_requested_in_capped_pieces_and_filled_exactly(sess, tmp_path, count):
    first = 1234
    with server(sess) as srv, running(tmp_path, srv.cfg.port) as (client, consumer):
        consumer.declare(first, count)
        c = wait_until(client, consumer, settled)
        consumer.drain()
        assert_exact(sess, consumer, set(range(first, first + count)))
        assert c["detected"] == c["filled"] == 1
        assert c["unrecoverable"] == c["unrecoverable_messages"] == 0
        assert c["messages_recovered"] == count
        assert c["requested"] >= -(-count // 1000)  # split at the server's cap
        assert c["requested"] == srv.counters["requests"]
        assert srv.counters["malformed"] == srv.counters["other_session"] == 0
        assert c["answers"] == len(consumer.entries)
        # the only answers turned away are repeats, and repeats only come from a request
        # retried after a timeout (a loaded machine can make a 50 ms answer late): the
        # late original and the retry's answer both arrive, the second is dropped
        assert c["rejected_answers"] == c["rejected_duplicate"]
        if c["retries"] == 0:
            assert c["rejected_duplicate"] == 0
        # handed over in sequence order, so the consumer never holds a recovered packet
        firsts = [f for _k, f, _n in consumer.entries]
        assert firsts == sorted(firsts)
        lat = client.latency()
        assert lat["count"] == 1 and lat["p50"] > 0


def test_overlapping_and_adjacent_gaps_are_coalesced(sess, tmp_path):
    gaps = [(100, 500), (400, 600), (1000, 400), (3000, 10)]  # 100..1399 touch; 3000 apart
    with server(sess) as srv, running(tmp_path, srv.cfg.port, start=False) as (client, cons):
        for g in gaps:
            cons.declare(*g)
        client.start()  # all four are taken in its first iteration
        c = wait_until(client, cons, settled)
        cons.drain()
        assert_exact(sess, cons, union(gaps))
        assert (c["detected"], c["coalesced"], c["filled"]) == (4, 2, 2)
        # 1,300 messages in two requests (three without coalescing), plus one for 3000
        assert c["requested"] == srv.counters["requests"] == 3


def test_partial_answers_are_completed(sess, tmp_path):
    with server(sess, max_bytes=1500) as srv, running(tmp_path, srv.cfg.port) as (client, cons):
        cons.declare(50, 3000)
        c = wait_until(client, cons, settled)
        cons.drain()
        assert_exact(sess, cons, set(range(50, 3050)))
        assert srv.counters["partial"] > 0 and c["partials"] > 0
        assert c["requested"] > 3 and c["filled"] == 1 and c["unrecoverable"] == 0


def test_rate_limited_server_fills_eventually(sess, tmp_path, monkeypatch):
    """Client and server on the test's clock, 50 ms at a time: 6,000 messages from a server
    giving 3,000 a second (its bucket full to start) take at least one second, and come
    back whole within the SLO."""
    server_now = frozen_server_clock(monkeypatch)
    with (
        server(sess, rate=3000.0) as srv,
        running(tmp_path, srv.cfg.port, start=False, slo=10.0, retries=20, timeout=0.2) as (
            client,
            cons,
        ),
    ):
        t0 = server_now[0] = time.monotonic_ns()
        cons.declare(10, 6000, t0)
        t = t0
        while not settled(c := lockstep(client, srv, cons, t)):
            assert t - t0 < 10 * S, c
            t += S // 20
            server_now[0] = t
        assert_exact(sess, cons, set(range(10, 6010)))
        assert srv.counters["rate_limited"] + srv.counters["partial"] > 0
        assert c["filled"] == 1 and c["unrecoverable"] == 0
        assert t - t0 >= S  # the second 3,000 waited for the bucket to refill


# --- rejecting --------------------------------------------------------------------------------
def test_answers_of_another_session_unrequested_or_malformed_are_rejected(sess, tmp_path):
    dead = udp_port()  # nothing answers: the gap stays outstanding while we inject
    with (
        running(tmp_path, dead, timeout=5.0, slo=60.0) as (client, cons),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inj,
    ):
        cons.declare(500, 100)
        wait_until(client, cons, lambda c: c["requested"] >= 1)
        to = client.address
        inj.sendto(packet(sess, 500, 10, name="OTHERSESS1"), to)
        inj.sendto(packet(sess, 5000, 10), to)  # nobody asked
        inj.sendto(b"short", to)
        inj.sendto(mold.session_bytes(NAME) + (510).to_bytes(8, "big") + bytes(2), to)  # heartbeat
        inj.sendto(packet(sess, 500, 10)[:-1], to)  # blocks do not add up
        c = wait_until(client, cons, lambda c: c["rejected_answers"] == 5)
        assert (
            c["rejected_other_session"],
            c["rejected_unrequested"],
            c["rejected_malformed"],
        ) == (1, 1, 3)
        assert c["answers"] == 0 and cons.entries == []
        inj.sendto(packet(sess, 500, 10), to)  # a good answer for part of the gap
        c = wait_until(client, cons, lambda c: c["answers"] == 1 and len(cons.entries) == 1)
        inj.sendto(packet(sess, 500, 10), to)  # again: already filled
        c = wait_until(client, cons, lambda c: c["rejected_answers"] == 6)
        assert c["rejected_duplicate"] == 1 and c["messages_recovered"] == 10
        assert c["outstanding"] == 1 and c["outstanding_messages"] == 90
        cons.drain()
        assert set(cons.data) == set(range(500, 510))
        assert all(cons.data[s] == message(sess, s) for s in range(500, 510))


# --- giving up --------------------------------------------------------------------------------
def test_server_down_retries_with_backoff_then_lost(tmp_path):
    """Injected clock: each retry waits twice as long; after the retries, REC_LOST."""
    cfg = {"timeout": 0.02, "retries": 3, "backoff": 2.0, "slo": 10.0, "min_interval": 0.0}
    with running(tmp_path, udp_port(), start=False, **cfg) as (client, cons):
        t0 = time.monotonic_ns()
        cons.declare(700, 2500, t0)  # three requests at the cap of 1,000
        # sent at 0; timeouts 20, 40, 80 ms -> retries at 20, 60, 140 ms; lost at 300 ms
        for k, at_ms in enumerate((0, 20, 60, 140)):
            if at_ms:
                client.step(t0 + at_ms * S // 1000 - 1)
                assert client.counters()["requested"] == 3 * k
            client.step(t0 + at_ms * S // 1000)
            assert client.counters()["requested"] == 3 * (k + 1)
        client.step(t0 + 300 * S // 1000 - 1)
        cons.drain()
        assert cons.entries == [] and client.counters()["outstanding"] == 1
        client.step(t0 + 300 * S // 1000)  # the last retry timed out
        cons.drain()
        c = client.counters()
        assert union(cons.lost) == set(range(700, 3200)) and cons.data == {}
        assert sum(n for _f, n in cons.lost) == 2500
        assert (c["requested"], c["retries"]) == (12, 9)
        assert (
            c["unrecoverable"],
            c["unrecoverable_messages"],
            c["lost_by_retries"],
            c["lost_by_slo"],
            c["filled"],
            c["outstanding"],
        ) == (1, 2500, 2500, 0, 0, 0)
        assert client.latency()["count"] == 0
        assert cons.m["control"][shm.C_STALE] == 0  # the consumer applies the policy


def test_server_down_in_real_time_gives_up_after_its_retries(tmp_path):
    """The client's own thread and clock: its retries (0.01 s, doubling) run out long before
    its SLO of an hour."""
    with running(tmp_path, udp_port(), timeout=0.01, retries=3, slo=3600.0) as (client, cons):
        cons.declare(42, 1500)
        c = wait_until(client, cons, settled)
        cons.drain()
        assert union(cons.lost) == set(range(42, 1542)) and cons.data == {}
        assert c["unrecoverable"] == 1 and c["lost_by_retries"] == 1500
        assert c["lost_by_slo"] == 0 and c["retries"] == 2 * 3


def test_slo_passed_declares_the_rest_unrecoverable(sess, tmp_path):
    """Injected clock: a gap older than its SLO gives up what is still missing."""
    dead = udp_port()
    with (
        running(tmp_path, dead, start=False, timeout=0.05, retries=100, backoff=1.0, slo=0.3) as (
            client,
            cons,
        ),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as inj,
    ):
        t0 = time.monotonic_ns()
        cons.declare(100, 50, t0)
        client.step(t0)
        inj.sendto(packet(sess, 100, 20), client.address)  # part of it arrives
        wait_for(
            lambda: (client.step(t0 + 1), client.counters()["answers"])[1],
            10,
            "the partial answer taken",
        )
        client.step(t0 + int(0.3 * S) - 1)
        cons.drain()
        assert cons.lost == [] and set(cons.data) == set(range(100, 120))
        client.step(t0 + int(0.3 * S))
        cons.drain()
        c = client.counters()
        assert cons.lost == [(120, 30)]
        assert (c["unrecoverable"], c["lost_by_slo"], c["lost_by_retries"]) == (1, 30, 0)


# --- throttle, ring full, config ----------------------------------------------------------------
def test_requests_are_throttled_by_min_interval(sess, tmp_path):
    with (
        server(sess) as srv,
        running(
            tmp_path,
            srv.cfg.port,
            start=False,
            min_interval=1.0,
            timeout=30.0,
            settle=1.0,
            slo=60.0,
        ) as (client, cons),
    ):
        t0 = time.monotonic_ns()
        cons.declare(1, 3000, t0)
        expect = [(0.0, 1), (0.5, 1), (0.999, 1), (1.0, 2), (1.5, 2), (2.0, 3), (5.0, 3)]
        for at, requested in expect:
            assert lockstep(client, srv, cons, t0 + int(at * S))["requested"] == requested, at
        wait_for(
            lambda: (client.step(t0 + 5 * S), not client.counters()["outstanding"])[1],
            20,
            "every answer taken",
        )
        cons.drain()
        assert_exact(sess, cons, set(range(1, 3001)))
        assert srv.counters["requests"] == 3


def stepped(client: RecoveryClient, pred, what: str) -> dict:
    """Step a client driven by hand (``start=False``) on its own clock until ``pred`` holds
    for its counters; returns them."""

    def met():
        client.step()
        c = client.counters()
        return c if pred(c) else None

    return wait_for(met, 30, what, client.counters)


def test_full_ring_holds_entries_until_room(sess, tmp_path):
    with server(sess) as srv, running(tmp_path, srv.cfg.port, start=False) as (client, cons):
        ctl = cons.m["control"]
        ctl[shm.C_REC_HEAD] = shm.REC_SLOTS  # the consumer has not taken anything: full
        cons.declare(300, 100)
        c = stepped(client, lambda c: c["messages_recovered"] == 100, "the whole gap answered")
        assert c["held"] > 0 and c["ring_full"] == 1
        for _ in range(3):  # more iterations change nothing while the ring stays full
            client.step()
            c = client.counters()
            assert c["filled"] == 0 and c["outstanding"] == 1 and c["ring_full"] == 1
            assert int(ctl[shm.C_REC_HEAD]) == shm.REC_SLOTS
        ctl[shm.C_REC_TAIL] = shm.REC_SLOTS  # it takes them: room again
        c = stepped(client, settled, "the held entries handed over")
        cons.drain()
        assert_exact(sess, cons, set(range(300, 400)))
        assert c["filled"] == 1 and c["held"] == 0


def test_bad_gap_declarations_are_ignored_and_counted(tmp_path):
    with running(tmp_path, udp_port(), start=False) as (client, cons):
        cons.declare(0, 10)
        cons.declare(5, 0)
        client.step()
        c = client.counters()
        assert (c["bad_gaps"], c["detected"], c["requested"], c["outstanding"]) == (2, 0, 0, 0)


def test_config_is_validated_naming_the_field():
    for kw, field in (
        ({"policy": "panic"}, "policy"),
        ({"server_host": "nope"}, "server_host"),
        ({"max_per_request": 70000}, "max_per_request"),
        ({"timeout": 0.0}, "timeout"),
        ({"backoff": 0.5}, "backoff"),
        ({"settle": 1.0}, "settle"),
    ):
        with pytest.raises(ValueError, match=field):
            RecoveryConfig(**kw)
    with pytest.raises(ValueError, match="session"):
        RecoveryConfig(session="ELEVENCHARS")
    assert RecoveryConfig(policy="halt").policy_code == shm.POLICY_HALT
    assert RecoveryConfig().policy_code == shm.POLICY_STALE


def test_shared_mirror_and_metrics(sess, tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    arr = np.zeros(SHARED_LEN, np.int64)
    with (
        server(sess) as srv,
        running(tmp_path, srv.cfg.port, shared=arr, policy="halt") as (client, cons),
    ):
        cons.declare(77, 700)
        wait_until(client, cons, settled)
        st = wait_for(
            lambda: (st := read_shared(arr))["counters"]["filled"] == 1 and st,
            10,
            "the shared mirror showing the gap filled",
        )
        assert st["running"] and st["policy"] == "halt"
        assert st["counters"]["filled"] == 1 and st["counters"]["messages_recovered"] == 700
        assert st["latency_ns"]["count"] == 1

        class Coll:
            def collect(self):
                yield from metric_families("t", read_shared(arr))

        reg = CollectorRegistry(auto_describe=False)
        reg.register(Coll())
        text = generate_latest(reg).decode()
        assert 'tickwire_recovery_gaps_total{channel="t",stage="filled"} 1.0' in text
        assert 'tickwire_recovery_latency_seconds_count{channel="t"} 1.0' in text
        assert 'tickwire_recovery_policy_halt{channel="t"} 1.0' in text
    assert not read_shared(arr)["running"]


# --- property: any set of gaps, exactly their union ----------------------------------------------
@pytest.fixture(scope="module")
def shared_server(sess):
    with server(sess) as srv:
        yield srv


gap_sets = st.lists(st.tuples(st.integers(1, N - 700), st.integers(1, 700)), min_size=1, max_size=8)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(gaps=gap_sets, split=st.integers(0, 8))
def test_any_gap_set_recovers_exactly_its_union(sess, shared_server, gaps, split):
    """Some gaps are declared before the client starts, the rest while it runs."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        running(Path(tmp), shared_server.cfg.port, start=False) as (client, cons),
    ):
        for g in gaps[:split]:
            cons.declare(*g)
        client.start()
        for g in gaps[split:]:
            cons.declare(*g)
        c = wait_until(client, cons, lambda c: c["detected"] == len(gaps) and settled(c))
        cons.drain()
        assert_exact(sess, cons, union(gaps))
        assert c["filled"] + c["coalesced"] == len(gaps) and c["unrecoverable"] == 0
        assert c["detected"] == c["filled"] + c["unrecoverable"] + c["coalesced"] + c["outstanding"]
        assert c["messages_recovered"] >= len(union(gaps))
