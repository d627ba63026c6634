"""``tickwire bench book`` end to end on a small session: what it reports and how its
ratios are formed (never how fast anything is)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dataplane.book import Book
from host.exchange import itchgen


def test_bench_book_reports_paired_ratios_against_itch_book(tmp_path):
    pytest.importorskip("itch_book", reason="itch-book (the bench extra) is not installed")
    path = tmp_path / "s.itch"
    itchgen.write_session(str(path), 60_000, 50, seed=3)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "host.cli",
            "bench",
            "book",
            "--session",
            str(path),
            "--repeat",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    (r,) = json.loads(p.stdout)["results"]
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    assert r["digest"] == ref.digest() and r["live_orders"] == ref.live_orders
    assert r["rounds"] == 3 and r["itch_book_messages"] == r["messages"] == 60_000
    for key in (
        "ratio_vs_itch_book",
        "ratio_vs_itch_book_bbo",
        "appliance_ratio_vs_itch_book",
        "appliance_ratio_vs_itch_book_bbo",
    ):
        lo, hi = r[f"{key}_range"]
        assert 0 < lo <= r[key] <= hi  # the median of the rounds' paired ratios
    ours, theirs = r["book_msgs_per_s"], r["itch_book_msgs_per_s"]
    assert r["ratio_vs_itch_book_best"] == pytest.approx(ours / theirs)
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "host.cli",
            "bench",
            "book",
            "--session",
            str(path),
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert text.returncode == 0, text.stderr
    assert "median of 2 rounds" in text.stdout and "itch-book + bbo" in text.stdout
