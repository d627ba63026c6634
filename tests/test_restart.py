"""Restart without losing the day (issue 18 §3): the consumer is SIGKILLed mid-session
under loss on both lines; ``tickwire run`` fails saying so; started again, it restores the
newest snapshot, replays the journal past it, recovers the rest from the re-request server
and ends with ``tickwire book``'s digest -- each message applied once, the journal whole."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from dataplane.book import Book
from host.appliance import journal
from host.exchange import itchgen

N = 120_000


@pytest.mark.lab
@pytest.mark.timeout(1500)
def test_sigkill_then_restart_under_loss_ends_with_the_offline_digest(labcfg, tmp_path):
    from tests.labnet import Appliance, SimProcess, write_config

    path = tmp_path / "s.itch"
    itchgen.write_session(str(path), N, 40, 23)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    extra = (
        f'[journal]\nenabled = true\ndir = "{tmp_path / "j"}"\n'
        f'[snapshot]\nenabled = true\ndir = "{tmp_path / "s"}"\ninterval_s = 0.5\n'
    )
    channel = f"trst{os.getpid()}"
    first = Appliance(labcfg, tmp_path, "socket", run_extra=extra, channel=channel)
    second = sim = None
    try:
        sim = SimProcess(
            write_config(labcfg, tmp_path / "sim.toml"),
            *("--session", str(path), "--rate", "20000", "--eos-for", "120"),
            *("--fault", "A:loss=0.01", "--fault", "B:loss=0.01"),
        )
        c = first.wait_taken(N // 3, timeout=120)
        snaps = list((tmp_path / "s" / channel).rglob("*.twsnap.npz"))
        assert snaps, "no timed snapshot before the kill"
        os.kill(c["pid"], signal.SIGKILL)
        _, err = first.proc.communicate(timeout=120)
        assert first.proc.returncode == 1 and "killed by signal 9 (SIGKILL)" in err
        second = Appliance(labcfg, tmp_path, "socket", run_extra=extra, channel=channel)
        summary = second.finish(timeout=600)
        sim.finish(terminate=True)
    finally:
        if sim is not None:
            sim.kill()
        for app in (second, first):
            if app is not None:
                app.kill()
    r = summary["restored"]
    assert r["snapshot_seq"] is not None and r["seq"] >= r["snapshot_seq"] >= 1
    assert r["seq"] >= N // 3 - 1 and not r["holes"]
    assert summary["digest"] == ref.digest() and summary["unrecoverable_messages"] == 0
    assert summary["next_seq"] == N + 1
    # what the restarted consumer took is exactly the rest: no message applied twice
    assert summary["taken"] == N
    j = summary["journal"]
    assert j["last_seq"] == N and not j["holes"] and j["already"] == 0
    (jd,) = (tmp_path / "j" / channel).iterdir()
    seqs = [r[0] for r in journal.Reader(jd).records() if not isinstance(r, journal.Hole)]
    assert seqs == list(range(1, N + 1))
