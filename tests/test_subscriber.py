"""Local clients of a running appliance (``dataplane.subscriber``): a client that joins a
live session mid-way through a snapshot ends with the levels of ``tickwire book``; one that
stalls is told it was lapped, and a new snapshot makes it whole again; channel events (line
state, end of session) arrive in order; events carry per-stage stamps on one clock."""

import os
import time

import numpy as np
import pytest

from dataplane import events as ev
from dataplane.book import Book
from dataplane.subscriber import Subscriber
from host.exchange import itchgen
from tests.labnet import Appliance, SimProcess, write_config

pytestmark = pytest.mark.lab

N_MSGS = 300_000
MODES = ["socket", pytest.param("xdp", marks=pytest.mark.needs("xdp", "afxdp"))]


@pytest.fixture(scope="module")
def session_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "s.itch"
    itchgen.write_session(str(path), N_MSGS, 50, 7)
    book = Book()
    book.feed(np.fromfile(path, np.uint8))
    return path, book


def _publish(cfg, tmp_path, path, rate="300000"):
    return SimProcess(
        write_config(cfg, tmp_path / "sim.toml"),
        "--session",
        str(path),
        "--rate",
        rate,
        "--eos-for",
        "1",
        "--no-rerequest",
    )


def _follow(sub: Subscriber, timeout: float = 60.0) -> list:
    """Poll until the end of session; returns the channel events seen."""
    deadline = time.monotonic() + timeout
    seen = []
    while not sub.ended:
        got = sub.poll()
        seen += [sub.decode(e) for e in got[got["kind"] == ev.CHANNEL]]
        if not len(got):
            assert time.monotonic() < deadline, "no end of session"
            time.sleep(0.0002)
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_a_client_joining_mid_session_ends_with_the_books_levels(
    labcfg, session_file, tmp_path, mode
):
    path, book = session_file
    app = Appliance(labcfg, tmp_path, mode)
    sim = None
    try:
        sub = Subscriber(app.channel)
        sim = _publish(labcfg, tmp_path, path)
        app.wait_taken(N_MSGS // 3)
        snap = sub.snapshot()
        assert 0 < snap.seq < N_MSGS  # mid-way: some of the session, not all of it
        assert snap.lines == {"A": "up", "B": "up"} and not snap.stale
        chan = _follow(sub)
        assert sub.digest() == book.digest()
        assert sub.lapped == 0 and sub.last_seq == N_MSGS
        (me,) = [r for r in ev.readers(app.channel) if r["pid"] == os.getpid()]
        assert me["lag"] == 0 and me["snapshots"] == 1
        sub.close()
        assert [r for r in ev.readers(app.channel) if r["pid"] == os.getpid()] == []
        # channel state: the lines up (from the snapshot), the end of session last
        assert chan[-1].code == "end_of_session" and chan[-1].value == N_MSGS + 1
        assert sub.lines == {"A": "up", "B": "up"} and not sub.stale
        # the client's BBO copy agrees with the book's
        for loc in (1, 2, 3):
            assert sub.bbo(loc) == book.bbo(loc)
        # tickers resolve from the stock directory the snapshot carried
        sym = sub.symbol(1)
        assert sym and sub.locate(sym) == 1
        sim.finish()
        s = app.finish()
        assert s["digest"] == book.digest()
    finally:
        if sim is not None:
            sim.kill()
        app.kill()


@pytest.mark.parametrize("mode", ["xdp"], ids=["xdp"])
@pytest.mark.needs("xdp", "afxdp")
def test_stamps_are_on_one_clock_and_in_stage_order(labcfg, session_file, tmp_path, mode):
    path, _book = session_file
    app = Appliance(labcfg, tmp_path, mode)
    sim = None
    try:
        sub = Subscriber(app.channel)
        sub.join_live()
        sim = _publish(labcfg, tmp_path, path)
        got, reads = [], []
        deadline = time.monotonic() + 60
        while sum(len(g) for g in got) < 20_000 and time.monotonic() < deadline:
            batch = sub.poll()
            reads.append(np.full(len(batch), sub.now_ns(), np.int64))
            got.append(batch.copy())
        e, read = np.concatenate(got), np.concatenate(reads)
        keep = e["kind"] == ev.LEVEL
        e, read = e[keep], read[keep]
        assert len(e) >= 5_000
        rx = e["rx_ns"].astype(np.int64)
        applied = rx + e["apply_dt"]
        published = applied + e["pub_dt"]
        assert (rx > 0).all() and (applied >= rx).all()
        assert (published >= applied).all() and (read >= published).all()
        # the stamps are CLOCK_MONOTONIC nanoseconds: the receive stamps lie within the run
        assert (rx < time.monotonic_ns()).all() and (rx > time.monotonic_ns() - 120e9).all()
        sim.finish()
        app.finish()
    finally:
        if sim is not None:
            sim.kill()
        app.kill()


def test_a_stalled_client_is_told_it_was_lapped(labcfg, session_file, tmp_path):
    path, book = session_file
    # the consumer must outlive the session: the client's new snapshot comes after its end
    app = Appliance(labcfg, tmp_path, "socket", until_eos=False, run_extra="event_slots = 4096\n")
    sim = None
    try:
        sub = Subscriber(app.channel)
        sub.snapshot()  # at sequence 0: nothing published yet
        sim = _publish(labcfg, tmp_path, path)
        app.wait_taken(N_MSGS)  # the client read nothing meanwhile
        with pytest.raises(ev.Lapped, match="snapshot again"):
            while True:
                sub.poll()
        assert sub.lapped == 1
        (me,) = [r for r in ev.readers(app.channel) if r["pid"] == os.getpid()]
        assert me["lapped"] == 1 and me["lag"] > 4096  # what the metrics show
        with pytest.raises(RuntimeError, match="snapshot"):
            sub.poll()  # no silent carrying on
        snap = sub.snapshot()  # whole again: the session is over, the snapshot says so
        assert snap.seq == N_MSGS and snap.eos == N_MSGS + 1 and sub.ended
        assert sub.digest() == book.digest()
        assert not len(sub.poll())
        sim.finish()
        app.finish(terminate=True)
    finally:
        if sim is not None:
            sim.kill()
        app.kill()
