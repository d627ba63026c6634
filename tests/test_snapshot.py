"""Book snapshots (``host.appliance.snapshot``) and ``tickwire replay``: a snapshot taken by
a fork is the book at its sequence, a damaged one is refused, and snapshot + journal after
it rebuild the books to ``tickwire book``'s digest -- offline, and in the lab from the
running appliance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataplane import moldudp64 as mold
from dataplane import shm
from dataplane.book import Book
from host.appliance import journal, replay, snapshot
from host.config import SnapshotConfig
from host.exchange import itchgen

SESSION = "TEST000001"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "s.itch"
    itchgen.write_session(str(path), 30_000, 30, 12)
    buf = np.fromfile(path, np.uint8)
    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    n, bad = mold.index_messages(buf, offsets)
    assert bad < 0
    return path, buf, offsets[: n + 1]


def _book_to(buf, offs, k) -> Book:
    b = Book()
    b.feed(buf[: offs[k]])
    return b


def _taker(tmp_path, channel):
    maps = shm.create(channel)
    cfg = SnapshotConfig(enabled=True, dir=str(tmp_path / "snaps"), keep=2)
    return snapshot.Taker(channel, SESSION, cfg, maps), maps


def test_a_forked_snapshot_is_the_book_at_its_sequence_and_loads_back(session, tmp_path):
    _, buf, offs = session
    channel = f"snapt{os.getpid()}"
    try:
        taker, maps = _taker(tmp_path, channel)
        book = _book_to(buf, offs, 12_345)
        maps["counters"][shm.A_NEXT] = 12_346
        maps["counters"][shm.A_TAKEN] = 12_345
        maps["control"][shm.C_BOOKSNAP_REQ] = 1
        taker.poll(book)  # forks
        assert taker.child
        book.feed(buf[offs[12_345] :])  # the parent goes on: the snapshot must not see it
        taker.finish()
        assert maps["control"][shm.C_BOOKSNAP_DONE] == 1
        info = json.loads((shm.channel_dir(channel) / "snapshot.json").read_text())
        assert info["seq"] == 12_345 and info["fork_us"] > 0
        got, linfo = snapshot.load(info["path"])
        assert linfo["digest"] == info["digest"] == _book_to(buf, offs, 12_345).digest()
        assert got.digest() != book.digest()  # the live book moved on after the fork
        got.feed(buf[offs[12_345] :])  # and the loaded one is a working book
        assert got.digest() == book.digest()
    finally:
        shm.remove(channel)


def test_keep_prunes_and_newest_skips_a_damaged_snapshot(session, tmp_path):
    _, buf, offs = session
    d = tmp_path / "s"
    for k in (100, 200, 300):
        snapshot.write(d, "c", SESSION, k, _book_to(buf, offs, k), k)
    paths = snapshot.listing(d)
    assert [int(p.name.split(".")[0]) for p in paths] == [100, 200, 300]
    raw = bytearray(paths[-1].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte in the newest
    paths[-1].write_bytes(bytes(raw))
    with pytest.raises(snapshot.SnapshotError):
        snapshot.load(paths[-1])
    said = []
    _, info = snapshot.newest(d, log=said.append)
    assert info["seq"] == 200 and len(said) == 1 and "snapshot skipped" in said[0]
    paths[0].write_bytes(b"not a snapshot")
    with pytest.raises(snapshot.SnapshotError, match="not a readable snapshot"):
        snapshot.load(paths[0])


def test_replay_of_snapshot_plus_journal_is_the_books_digest(session, tmp_path):
    path, buf, offs = session
    n = len(offs) - 1
    jd = tmp_path / "j"
    with journal.Writer(jd, "c", SESSION, sync="none") as w:
        seqs = np.arange(1, n + 1, dtype=np.int64)
        w.append_many(seqs[:20_000], buf, offs[:20_001], prefix=2)
        w.hole(20_001, 10, "unrecoverable")  # the live books skipped these ten
        w.append_many(seqs[20_010:], buf, offs[20_010:], prefix=2)
    live = _book_to(buf, offs, 20_000)
    live.feed(buf[offs[20_010] :])
    snap = snapshot.write(tmp_path / "s", "c", SESSION, 15_000, _book_to(buf, offs, 15_000), 1)
    r = replay.snapshot_and_journal(snap["path"], [str(jd)])
    assert r["digest"] == live.digest() and r["seq"] == n and r["snapshot_seq"] == 15_000
    assert r["messages"] == n - 15_000 - 10 and [h["count"] for h in r["holes"]] == [10]
    r = replay.snapshot_and_journal(snap["path"], [str(jd)], until=18_000)
    assert r["digest"] == _book_to(buf, offs, 18_000).digest() and r["seq"] == 18_000
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "replay", "--snapshot", snap["path"]]
        + ["--journal", str(jd), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["digest"] == live.digest()


@pytest.mark.lab
@pytest.mark.timeout(1200)
def test_in_the_lab_a_snapshot_on_demand_plus_the_journal_replays_to_the_live_books(
    labcfg, session, tmp_path
):
    """The appliance with journal and snapshots on; ``tickwire snapshot`` a third of the
    way in; its book is the offline book at its sequence, and ``tickwire replay`` of it
    and the journal ends with the live books' digest."""
    from tests.labnet import Appliance, SimProcess, write_config

    path, buf, offs = session
    n = len(offs) - 1
    app = Appliance(
        labcfg,
        tmp_path,
        "socket",
        run_extra=(
            f'[journal]\nenabled = true\ndir = "{tmp_path / "j"}"\n'
            f'[snapshot]\nenabled = true\ndir = "{tmp_path / "s"}"\n'
        ),
    )
    sim = None
    try:
        sim = SimProcess(
            write_config(labcfg, tmp_path / "sim.toml"),
            *("--session", str(path), "--rate", "10000", "--eos-for", "1", "--no-rerequest"),
        )
        app.wait_taken(n // 3)
        done = subprocess.run(
            [sys.executable, "-m", "host.cli", "snapshot", "--channel", app.channel, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        info = json.loads(done.stdout)
        summary = app.finish()
        sim.finish()
    finally:
        if sim is not None:
            sim.kill()
        app.kill()
    seq = info["seq"]
    assert n // 3 <= seq < n
    assert info["digest"] == _book_to(buf, offs, seq).digest()  # the book at its sequence
    (jd,) = (tmp_path / "j" / app.channel).iterdir()
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "replay", "--snapshot", info["path"]]
        + ["--journal", str(jd), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["digest"] == summary["digest"] == _book_to(buf, offs, n).digest()
    assert r["seq"] == n and r["messages"] == n - seq and not r["holes"]
