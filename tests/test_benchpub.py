"""``tickwire bench publish`` end to end on a small session, and its phase in ``tickwire
bench rx``: what it reports and how its ratios are formed -- the three runs take the same
messages and end with the same book, the ring-on runs write events and the off run none,
the reader sees what was published -- never how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataplane.book import Book
from host import config, netns
from host.bench import publish
from host.bench import rx as benchrx
from host.exchange import itchgen, lab

MESSAGES = 100_000


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", "bench", "publish", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("benchpub") / "s.itch"
    itchgen.write_session(str(path), MESSAGES, 50, seed=4)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    return path, ref.digest()


@pytest.fixture(scope="module")
def result(session):
    path, _ = session
    p = _cli("--session", str(path), "--repeat", "1", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["bench"] == "publish"
    return out["result"]


def test_three_runs_take_the_same_session_and_only_the_ring_differs(result, session):
    _, digest = session
    f = result["offline"]
    assert result["messages"] == MESSAGES and f["rounds"] == 1
    for mode in publish.MODES:
        assert f[mode]["messages"] == MESSAGES, mode  # every message taken, each way
        assert f[mode]["digest"] == digest, mode  # the book does not depend on the ring
        assert f[mode]["events_per_msg"] == pytest.approx(f[mode]["events"] / MESSAGES)
    assert f["same_digest"] is True and result["digest"] == digest
    assert f["off"]["events"] == 0  # H_ON 0: nothing published
    assert f["on"]["events"] > 0
    assert f["order"]["events"] > f["on"]["events"]  # per-order events come on top


def test_ratios_are_the_quotients_and_the_budget_reads_them(result):
    f = result["offline"]
    off = f["off"]["msgs_per_s"]
    for mode in publish.MODES:
        assert f[mode]["msgs_per_s"] == pytest.approx(f[mode]["messages"] / f[mode]["seconds"])
    assert f["ratio_on_vs_off"] == pytest.approx(f["on"]["msgs_per_s"] / off)
    assert f["ratio_order_vs_off"] == pytest.approx(f["order"]["msgs_per_s"] / off)
    assert f["budget"] == publish.BUDGET
    assert f["budget_met"] == (f["ratio_on_vs_off"] >= publish.BUDGET)


def test_the_reader_on_another_core_sees_what_was_published(result):
    lat = result["latency_ns"]
    assert lat["producer_core"] != lat["reader_core"]
    assert lat["messages"] == MESSAGES
    assert lat["events"] == result["offline"]["on"]["events"]  # the same session, ring on
    assert lat["count"] > 0, json.dumps(lat)
    # a reader never lapped saw every event, channel events (no receive stamp) apart
    assert lat["lapped"] > 0 or lat["count"] + lat["unstamped"] == lat["events"]
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["reader_max_gap_ns"] >= 0 and 0 <= lat["reader_stalled_fraction"]


def test_the_reports_say_it(result):
    text = publish.publish_text(result)
    for what in ("ring off (baseline)", "ring on + order events", "budget >= 0.90"):
        assert what in text, what
    assert "publish to reader" in text and "p99.9" in text
    rx_lines = "\n".join(benchrx.publish_lines(result))  # tickwire bench rx's part
    assert "ring on / off" in rx_lines and "publish to reader" in rx_lines


def test_bench_rx_runs_the_publish_phase_with_its_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("TICKWIRE_CACHE", str(tmp_path))  # the generated session goes here
    r = benchrx.publish_phase(
        {"publish_messages": 20_000, "sender_core": 0, "consumer_core": 0}  # one core: no reader
    )
    assert r["offline"]["on"]["messages"] == 20_000 and "latency_ns" not in r
    assert "publish to reader" not in "\n".join(benchrx.publish_lines(r))


def test_one_core_for_both_or_a_core_not_ours_is_one_clear_error():
    p = _cli("--producer-core", "0", "--reader-core", "0")
    assert p.returncode == 1 and p.stderr.startswith("tickwire: ")
    assert "both 0" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _cli("--reader-core", str(os.cpu_count() + 7))
    assert p.returncode == 1 and "not a CPU this process may use" in p.stderr


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_lab_phase_runs_the_appliance_events_off_then_on_and_removes_its_lab(session):
    path, digest = session
    prefix = f"tbpt{os.getpid() % 100000:05d}"
    cfg = config.with_lab(prefix=prefix)
    opts = publish.PublishOptions(
        session=str(path), repeat=1, latency=False, lab=True, lab_rate=500_000, prefix=prefix
    )
    try:
        r = publish.bench_publish(opts)
    finally:
        lab.down(cfg.lab)  # a no-op when the bench cleaned up, as it must
    assert not netns.exists(cfg.lab.exchange_ns) and not netns.exists(cfg.lab.appliance_ns)
    lb = r["lab"]
    for key, events in (("off", False), ("on", True)):
        assert lb[key]["events"] is events
        assert lb[key]["taken"] == MESSAGES and lb[key]["unrecoverable_messages"] == 0
        assert lb[key]["digest"] == digest
    assert lb["same_digest"] is True
    off, on = lb["off"]["msgs_per_s"], lb["on"]["msgs_per_s"]
    assert lb["ratio_on_vs_off"] == (pytest.approx(on / off) if on and off else None)
    ratio = lb["ratio_on_vs_off"]
    assert lb["budget_met"] == (None if ratio is None else ratio >= publish.BUDGET)
    assert "lab ring on / off" in publish.publish_text(r)
