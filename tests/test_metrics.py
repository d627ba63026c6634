"""The Prometheus collector: stateless (derived from shared counters and the time), every
family labelled by channel, one conversion for every latency histogram, one bucket
function for the jitted and the Python side."""

import numpy as np
import pytest
from numba import njit
from prometheus_client.registry import CollectorRegistry

from dataplane import shm
from host.appliance import metrics, recovery

S = 1_000_000_000
NOW = 100 * S


def _scrape(*collectors) -> dict:
    """``{(name, labels): value}`` of one registry holding ``collectors``."""
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in reg.collect()
        for s in fam.samples
    }


def _maps(rx_a: int = 0, rx_b: int = 0) -> dict:
    m = {
        name: np.zeros(shape, dtype)
        for name, (dtype, shape) in shm.REGIONS.items()
        if name in ("counters", "latency", "control")
    }
    m["counters"][shm.L_RX_NS] = rx_a
    m["counters"][shm.LINE_STRIDE + shm.L_RX_NS] = rx_b
    return m


def _state(got: dict, line: str) -> float:
    return got[("tickwire_line_state", (("channel", "t"), ("line", line)))]


def test_line_state_is_the_same_for_every_scraper_and_every_scrape():
    """A line silent for 2 s is stale and one silent for 10 s down on the first scrape of a
    fresh collector, and stays so however many collectors scrape how often (a collector
    that advanced a state machine per scrape showed -1 here)."""
    m = _maps(rx_a=NOW - 2 * S, rx_b=NOW - 10 * S)
    one = metrics.ConsumerCollector("t", m, now_ns=lambda: NOW)
    first = _scrape(one)
    assert (_state(first, "A"), _state(first, "B")) == (1.0, 2.0)
    for _ in range(3):
        _scrape(one)
    other = metrics.ConsumerCollector("t", m, now_ns=lambda: NOW)
    assert _scrape(one) == _scrape(other) == first


def test_a_line_back_after_being_down_is_what_its_silence_says():
    m = _maps(rx_a=NOW - 10 * S)
    coll = metrics.ConsumerCollector("t", m, now_ns=lambda: NOW)
    assert _state(_scrape(coll), "A") == 2.0
    m["counters"][shm.L_RX_NS] = NOW - 2 * S  # one packet, then quiet again
    assert _state(_scrape(coll), "A") == 1.0
    m["counters"][shm.L_RX_NS] = NOW
    assert _state(_scrape(coll), "A") == 0.0
    assert _state(_scrape(coll), "B") == -1.0  # never heard


def test_xdp_passed_packets_carry_the_channel():
    stats = {"lines": {"A": {"packets": 5, "bytes": 500}}, "passed": {"igmp": 3, "other": 1}}
    got = _scrape(metrics.ConsumerCollector("t", _maps(), lambda: stats, now_ns=lambda: NOW))
    assert got[("tickwire_xdp_passed_packets_total", (("channel", "t"), ("reason", "igmp")))] == 3
    assert got[("tickwire_xdp_packets_total", (("channel", "t"), ("line", "A")))] == 5


def test_sequencing_counters_are_named_for_what_they_count():
    m = _maps()
    c = m["counters"]
    c[shm.A_GAPS_DECLARED], c[shm.A_GAP_DECLARED_MSGS] = 4, 400
    c[shm.A_UNRECOVERABLE_GAPS], c[shm.A_UNRECOVERABLE_MSGS] = 1, 100
    got = _scrape(metrics.ConsumerCollector("t", m, now_ns=lambda: NOW))
    ch = (("channel", "t"),)
    assert got[("tickwire_gaps_declared_total", ch)] == 4
    assert got[("tickwire_gap_declared_messages_total", ch)] == 400
    assert got[("tickwire_unrecoverable_gaps_total", ch)] == 1
    assert got[("tickwire_unrecoverable_messages_total", ch)] == 100
    names = {name for name, _ in got}
    assert not names & {"tickwire_gap_events_total", "tickwire_gap_messages_total"}
    counts = shm.Reader("t", maps={**m, "control": m["control"]}).counters()
    assert "gap_events" not in counts and counts["gaps_declared"] == 4
    assert (counts["unrecoverable_gaps"], counts["unrecoverable_messages"]) == (1, 100)


def test_both_latency_histograms_convert_alike():
    """The consumer's receive-to-book and the recovery client's fill latency: the same
    buckets from the same counts."""
    hist = np.zeros(shm.LAT_BUCKETS, np.int64)
    for ns, n in ((500, 2), (3_000, 5), (40_000_000, 1), (5 * S, 1)):
        hist[shm.lat_bucket.py_func(ns)] += n
    m = _maps()
    m["latency"][:] = hist
    st = {
        "running": True,
        "alive_ns": 0,
        "policy": "stale",
        "histogram": hist,
        "counters": dict.fromkeys(recovery.COUNTERS, 0),
    }

    class Rec:
        def collect(self):
            yield from recovery.metric_families("t", st)

    got = _scrape(metrics.ConsumerCollector("t", m, now_ns=lambda: NOW), Rec())

    def buckets(name):
        return {dict(lv)["le"]: v for (n, lv), v in got.items() if n == f"{name}_bucket"}

    rx = buckets("tickwire_receive_to_book_seconds")
    assert rx == buckets("tickwire_recovery_latency_seconds")
    assert rx["1e-06"] == 2 and rx["5e-06"] == 7 and rx["0.1"] == 8 and rx["+Inf"] == 9
    assert len(rx) == len(metrics.LAT_BOUNDS_S) + 1


@njit
def _jitted_bucket(ns):
    return shm.lat_bucket(ns)


def test_the_bucket_function_agrees_jitted_and_in_python_at_every_edge():
    edges = [e for e in map(shm.bucket_low, range(shm.LAT_BUCKETS)) if e < 1 << 63]  # int64
    values = sorted({v for e in edges for v in (e - 1, e, e + 1) if 0 <= v < 1 << 63} | {-5})
    for v in values:
        assert _jitted_bucket(v) == shm.lat_bucket.py_func(v), v
    for i, e in enumerate(edges):  # every bucket starts at its bucket_low
        assert shm.lat_bucket.py_func(e) == i
        if i:
            assert shm.lat_bucket.py_func(e - 1) == i - 1


@pytest.mark.parametrize("ns", [0, 7, 8, 1000, 10**9, (1 << 63) - 1])
def test_a_bucket_holds_its_value(ns):
    i = shm.lat_bucket.py_func(ns)
    assert shm.bucket_low(i) <= ns
    assert i == shm.LAT_BUCKETS - 1 or ns < shm.bucket_low(i + 1)
