"""``tickwire bench recovery``: each kill and restart it reports ended with the book's
digest, the restored state is what the first run left (its journal had all it took), a
restart with the snapshot service joins by its spin, and the lab is gone afterwards -- never
how fast anything was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataplane.book import Book
from host import config, netns
from host.exchange import itchgen, lab


@pytest.mark.lab
@pytest.mark.timeout(1200)
def test_bench_recovery_restarts_exactly_and_reports_each_restart(tmp_path):
    path = tmp_path / "s.itch"
    n = 60_000
    itchgen.write_session(str(path), n, 30, 8)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    prefix = f"tbrt{os.getpid() % 100000:05d}"
    p = subprocess.run(
        [sys.executable, "-m", "host.cli", "bench", "recovery", "--session", str(path)]
        + ["--rate", "20000", "--positions", "0.5", "--intervals", "0.5"]
        + ["--prefix", prefix, "--json"],
        capture_output=True,
        text=True,
        timeout=1100,
    )
    lc = config.with_lab(prefix=prefix).lab
    lab.down(lc)  # a no-op when the bench cleaned up, as it must
    assert p.returncode == 0, p.stderr
    assert not netns.exists(lc.exchange_ns) and not netns.exists(lc.appliance_ns)
    r = json.loads(p.stdout)["result"]
    assert r["messages"] == n and r["digest"] == ref.digest() and r["all_exact"] is True
    base, spin, snap = r["runs"]
    assert base["interval_s"] is None and base["snapshot_seq"] is None
    assert base["journal_messages"] == 0 and base["recovered"] >= base["killed_at_seq"]
    assert base["began"] == "empty" and snap["began"] == "restored"
    assert spin["began"] == "joined" and spin["began_seq"] >= spin["killed_at_seq"]
    assert spin["taken"] == n - spin["began_seq"]  # from the spin on, each once
    assert snap["interval_s"] == 0.5 and snap["snapshot_seq"] is not None
    restored = snap["snapshot_seq"] + snap["journal_messages"]
    # the journal had everything the dead consumer took (it took at least killed_at_seq)
    assert snap["snapshot_seq"] <= snap["killed_at_seq"] <= restored <= n
    for x in (base, snap):
        assert x["taken"] == n
    for x in (base, spin, snap):
        assert x["unrecoverable_messages"] == 0 and x["next_seq"] == n + 1
        assert 0 < x["running_s"] <= x["live_s"] <= x["down_s"]
