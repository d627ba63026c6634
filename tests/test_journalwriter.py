"""The journal writer: the message ring in shared memory (``dataplane.msgring``) into the
journal (``host.appliance.journal``) -- each sequence once, in order, holes where the books
skipped or the writer was lapped -- and, in the lab, ``tickwire run`` with ``[journal]`` on
under loss on both lines: the journal holds every message of the session exactly once and
replays to ``tickwire book``'s digest."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dataplane import moldudp64 as mold
from dataplane import msgring
from dataplane.book import Book
from host.appliance import journal, journalwriter
from host.config import JournalConfig
from host.exchange import itchgen

SESSION = "TEST000001"


def _session(tmp_path, n=5000, seed=3):
    path = tmp_path / "s.itch"
    itchgen.write_session(str(path), n, 20, seed)
    buf = np.fromfile(path, np.uint8)
    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    k, bad = mold.index_messages(buf, offsets)
    assert bad < 0 and k == n
    return buf, offsets[: k + 1], path


def _put(buf, offs, hdr_ring, seq, lo, hi):
    """Packet-like record: messages lo..hi-1 of the file (``buf`` is file framing, the
    same 2-byte-length blocks MoldUDP64 carries)."""
    mbuf, mhdr = hdr_ring
    msgring.put(mbuf, mhdr, buf, offs[lo], offs[hi], seq, hi - lo)


def _journal(tmp_path, channel, root, stop_after, **jkw):
    jcfg = JournalConfig(enabled=True, dir=str(tmp_path / "j"), sync="none", **jkw)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) >= stop_after

    st = journalwriter.run(channel, jcfg, SESSION, root=root, stop=stop)
    return st, journalwriter.journal_dir(jcfg, channel, SESSION)


def _read(d):
    out = []
    for r in journal.Reader(d).records():
        out.append(r if isinstance(r, journal.Hole) else (r[0], bytes(r[1])))
    return out


def test_every_message_once_in_order_holes_where_the_books_skipped(tmp_path):
    buf, offs, _ = _session(tmp_path)
    root = tmp_path / "shm"
    ring = msgring.create("jw", 1 << 20, root=root)
    _put(buf, offs, ring, 1, 0, 1000)
    msgring.hole(*ring, 1001, 500)  # unrecoverable: the books skipped these
    _put(buf, offs, ring, 1501, 1500, 5000)
    st, d = _journal(tmp_path, "jw", root, stop_after=1)
    assert st["messages"] == 4500 and st["last_seq"] == 5000 and st["lapped"] == 0
    got = _read(d)
    holes = [r for r in got if isinstance(r, journal.Hole)]
    assert [(h.first, h.count, h.why) for h in holes] == [(1001, 500, "unrecoverable")]
    msgs = [r for r in got if not isinstance(r, journal.Hole)]
    want = [(i + 1, bytes(buf[offs[i] + 2 : offs[i + 1]])) for i in range(5000)]
    assert msgs == want[:1000] + want[1500:]
    assert journal.verify([d])["clean"]
    assert journalwriter.read_stats("jw", root)["messages"] == 4500


def test_a_restart_in_the_same_session_writes_nothing_twice(tmp_path):
    buf, offs, _ = _session(tmp_path)
    root = tmp_path / "shm"
    ring = msgring.create("jw", 1 << 20, root=root)
    _put(buf, offs, ring, 1, 0, 3000)
    _journal(tmp_path, "jw", root, stop_after=1)
    ring = msgring.create("jw", 1 << 20, root=root)  # a new consumer, from the beginning
    for lo in range(0, 5000, 700):
        _put(buf, offs, ring, lo + 1, lo, min(lo + 700, 5000))
    st, d = _journal(tmp_path, "jw", root, stop_after=1)
    assert st["already"] == 3000 and st["messages"] == 2000 and st["last_seq"] == 5000
    msgs = _read(d)
    assert [s for s, _ in msgs] == list(range(1, 5001))
    assert journal.verify([d])["clean"]


def test_a_writer_lapped_by_the_ring_records_a_hole_never_a_wrong_message(tmp_path):
    buf, offs, _ = _session(tmp_path, n=20500)
    root = tmp_path / "shm"
    ring = msgring.create("jw", msgring.MIN_SIZE, root=root)  # 64 KiB: laps at once
    for lo in range(0, 20000, 50):
        _put(buf, offs, ring, lo + 1, lo, lo + 50)
    calls = []

    def stop():  # the writer starts a lap behind; once it noticed, the consumer goes on
        calls.append(1)
        if len(calls) == 2:
            for lo in range(20000, 20500, 50):
                _put(buf, offs, ring, lo + 1, lo, lo + 50)
        return len(calls) >= 3

    jcfg = JournalConfig(enabled=True, dir=str(tmp_path / "j"), sync="none")
    st = journalwriter.run("jw", jcfg, SESSION, root=root, stop=stop)
    assert st["lapped"] == 1 and st["messages"] == 500
    got = _read(journalwriter.journal_dir(jcfg, "jw", SESSION))
    assert isinstance(got[0], journal.Hole)
    assert (got[0].first, got[0].count, got[0].why) == (1, 20000, "journal writer lapped")
    assert got[1:] == [(s, bytes(buf[offs[s - 1] + 2 : offs[s]])) for s in range(20001, 20501)]


def test_the_ring_wraps_records_whole(tmp_path):
    """Records of every size around the wrap point: the reader's split gives back each
    message exactly, chunk after chunk."""
    buf, offs, _ = _session(tmp_path, n=20000, seed=5)
    ring = msgring.private(msgring.MIN_SIZE)
    reader = msgring.Reader(*ring, cursor=0)
    split = msgring.Split(msgring.MIN_SIZE)
    rng = np.random.default_rng(1)
    lo, seen = 0, []
    while lo < 20000:
        for _ in range(int(rng.integers(1, 20))):
            if lo >= 20000:
                break
            k = min(int(rng.integers(1, 40)), 20000 - lo)
            _put(buf, offs, ring, lo + 1, lo, lo + k)
            lo += k
        chunk = reader.poll()
        seqs, out, o, holes = split.messages(chunk, reader.start)
        seen += [(int(s), bytes(out[o[i] : o[i + 1]])) for i, s in enumerate(seqs)]
    assert [s for s, _ in seen] == list(range(1, 20001))
    assert all(p == bytes(buf[offs[s - 1] + 2 : offs[s]]) for s, p in seen)


@pytest.mark.lab
@pytest.mark.timeout(1200)
def test_in_the_lab_under_loss_the_journal_holds_the_session_once(labcfg, tmp_path):
    from tests.labnet import Appliance, SimProcess, write_config

    n = 200_000
    path = tmp_path / "s.itch"
    itchgen.write_session(str(path), n, 40, 17)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    jdir = tmp_path / "journal"
    app = Appliance(
        labcfg,
        tmp_path,
        "socket",
        run_extra=f'[journal]\nenabled = true\ndir = "{jdir}"\nsync = "interval"\n',
    )
    sim = None
    try:
        sim = SimProcess(
            write_config(labcfg, tmp_path / "sim.toml"),
            *("--session", str(path), "--rate", "100000", "--eos-for", "1"),
            *("--fault", "A:loss=0.01", "--fault", "B:loss=0.01"),
        )
        summary = app.finish()
        sim.finish()
        from host.appliance import metrics, status

        fams = {f.name: f for f in metrics.JournalCollector(app.channel).collect()}
        assert fams["tickwire_journal_messages"].samples[0].value == n
        assert fams["tickwire_journal_up"].samples[0].value == 0  # stopped with the run
        assert fams["tickwire_journal_holes"].samples[0].value == 0
        assert f"journal: stopped, {n:,} messages written" in status.text(
            status.collect(app.channel)
        )
    finally:
        if sim is not None:
            sim.kill()
        app.kill()
    assert summary["digest"] == ref.digest() and summary["unrecoverable_messages"] == 0
    assert summary["gaps_declared"] > 0  # loss on both lines: recovery filled gaps
    j = summary["journal"]
    assert j["messages"] == n and j["last_seq"] == n and not j["holes"] and not j["running"]
    (d,) = (jdir / app.channel).iterdir()  # the feed's session names the directory
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "journal", "verify", str(d), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rep = json.loads(done.stdout)
    assert rep["clean"] and rep["summary"]["last_seq"] == n and rep["summary"]["holes"] == 0
    seqs, framed = [], []
    for seq, payload in journal.Reader(d).records():
        seqs.append(seq)
        framed.append(len(payload).to_bytes(2, "big") + bytes(payload))
    book = Book()
    book.feed(np.frombuffer(b"".join(framed), np.uint8))
    assert seqs == list(range(1, n + 1))  # each once, in order: recovered ones in place
    assert book.digest() == ref.digest()
