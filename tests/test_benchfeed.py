"""``tickwire bench feed`` and its parts: what they report and that the clients it counts
got the whole stream -- never how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataplane.book import Book
from host import config, netns
from host.bench import feed
from host.exchange import itchgen, lab
from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.parametrize("lib", feed.LIBS)
def test_the_fanout_delivers_every_frame_to_every_client_on_either_library(lib):
    """The library comparison's two servers send the same frames; the clients get them all,
    contiguous, and time every event."""
    port = free_port()
    srv = _py(
        "host.bench.fanout",
        "--lib",
        lib,
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--clients",
        "3",
        "--rate",
        "5000",
        "--seconds",
        "0.5",
    )
    try:
        assert srv.stderr.readline().strip() == "listening", srv.stderr.read()
        load = _py("host.bench.feedload", f"ws://127.0.0.1:{port}/x", "--clients", "3")
        out, err = load.communicate(timeout=120)
        assert load.returncode == 0, err
        sout, serr = srv.communicate(timeout=60)
        assert srv.returncode == 0, serr
    finally:
        for p in (srv,):
            if p.poll() is None:
                p.kill()
    c, s = json.loads(out.splitlines()[-1]), json.loads(sout.splitlines()[-1])
    assert s["lib"] == lib and s["frames"] > 0 and s["events"] == s["frames"] * 5
    assert c["ended"] == ["end"] and c["breaks"] == 0
    assert [x["events"] for x in c["conns"]] == [s["events"]] * 3
    assert c["latency_ns"]["count"] == 3 * s["events"]  # every event timed


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
@pytest.mark.timeout(1200)
def test_bench_feed_runs_each_client_count_evicts_the_stalled_and_cleans_up(tmp_path):
    path = tmp_path / "s.itch"
    itchgen.write_session(str(path), 200_000, 30, 9)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    prefix = f"tbft{os.getpid() % 100000:05d}"
    cfg = config.with_lab(prefix=prefix)
    p = subprocess.run(
        [sys.executable, "-m", "host.cli", "bench", "feed", "--session", str(path)]
        + ["--rate", "100000", "--clients", "1,3", "--stall-with", "3", "--no-libraries"]
        + ["--prefix", prefix, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    lab.down(cfg.lab)  # a no-op when the bench cleaned up, as it must
    assert p.returncode == 0, p.stderr
    assert not netns.exists(cfg.lab.exchange_ns) and not netns.exists(cfg.lab.appliance_ns)
    r = json.loads(p.stdout)["result"]
    assert r["digest"] == ref.digest() and r["messages"] == 200_000
    runs = {x["name"]: x for x in r["runs"]}
    assert list(runs) == ["none", "1", "3", "3+stalled", "none again"]
    for x in runs.values():
        assert x["taken"] == 200_000 and x["digest"] == ref.digest()
    for name, n in (("1", 1), ("3", 3), ("3+stalled", 3)):
        x = runs[name]
        # whole subscriptions joined before the session: each got the same events, all of
        # them contiguous, to the end of session
        assert len(x["per_client_events"]) == n and len(set(x["per_client_events"])) == 1
        assert x["per_client_events"][0] > 200_000 and x["events"] == sum(x["per_client_events"])
        assert x["breaks"] == 0 and x["ended"] == ["end"]
        assert x["latency_ns"]["count"] > 0
    assert "evictions" in runs["3+stalled"] and sum(runs["3+stalled"]["evictions"].values()) == 1
    assert runs["3+stalled"]["stalled_ended"] != ["end"]  # it never got to the end
    assert not runs["1"]["evictions"] and not runs["3"]["evictions"]
    v = r["verdicts"]
    assert v["stalled_evicted"] is True and v["same_digest"] is True
    assert v["every_client_ended_whole"] is True and v["others_unharmed"] is True
    ratio = runs["3+stalled"]["latency_ns"]["p99"] / runs["3"]["latency_ns"]["p99"]
    assert v["p99_with_stalled_vs_without"] == pytest.approx(ratio)
    assert v["p99_within_2x"] == (ratio <= feed.STALL_BUDGET)
    assert "consumer_most_vs_none" in v and "a client that stops reading" in feed.feed_text(r)
