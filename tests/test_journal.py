"""The message journal (host/appliance/journal.py) on real files: a generated session
appended in batches across segments reads back byte for byte (from the start and, through
the index, from the middle); a torn tail is cut on open and appending goes on; corruption
is refused and located; gaps and duplicates; a full disk (a real, small tmpfs); retention
by size and by age; the sync policies; ``tickwire journal verify``; the ``[journal]``
table."""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.moldudp64 import index_messages
from host import config
from host.appliance import journal
from host.appliance.journal import Hole, Reader, Writer
from host.exchange import itchgen
from tests.reference import frames

CHANNEL, SESSION = "totalview", "TICKWIRE01"


@functools.cache
def session(n: int = 20_000, seed: int = 7) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """A generated session written by ``write_session``: the file's bytes, its messages'
    offsets (``index_messages``: each at its 2-byte length), and the messages themselves
    (split by the reference framer)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.itch"
        itchgen.write_session(path, n, 40, seed)
        data = path.read_bytes()
    buf = np.frombuffer(data, np.uint8)
    offsets = np.zeros(len(buf) // 2 + 1, np.int64)
    count, bad = index_messages(buf, offsets)
    assert bad == -1
    msgs = [m for _, m in frames(data)]
    assert len(msgs) == count == n
    return buf, offsets[: count + 1], msgs


def append(w: Writer, first: int, last: int, batch: int = 500) -> None:
    """Messages ``first..last`` of the session (1-based seqs) in batches."""
    buf, offsets, _ = session()
    for a in range(first, last + 1, batch):
        b = min(a + batch - 1, last)
        seqs = np.arange(a, b + 1, dtype=np.int64)
        w.append_many(seqs, buf, offsets[a - 1 : b + 1], prefix=2)


def messages(directory, from_seq=None) -> list:
    return list(Reader(directory).records(from_seq))


def want(first: int, last: int) -> list[tuple[int, bytes]]:
    msgs = session()[2]
    return [(s, msgs[s - 1]) for s in range(first, last + 1)]


def record_offsets(path: Path) -> list[int]:
    """Where each whole record of a segment starts (read with the format's own struct)."""
    raw = path.read_bytes()
    out, pos = [], journal.HEADER_LEN
    while pos + journal.REC_HDR <= len(raw):
        ln = journal.RECORD.unpack_from(raw, pos)[3]
        if pos + journal.REC_HDR + ln > len(raw):
            break
        out.append(pos)
        pos += journal.REC_HDR + ln
    return out


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# --- the format ----------------------------------------------------------------------------
def test_the_batch_builder_writes_the_codecs_bytes(tmp_path):
    msgs = session()[2]
    with Writer(tmp_path, CHANNEL, SESSION, index_every=2) as w:
        for s in (1, 2, 3):
            w.append(s, msgs[s - 1])
    (seg,) = Reader(tmp_path).segments()
    raw = seg.read_bytes()
    h = journal.unpack_header(raw)
    assert (h.first_seq, h.channel, h.session, h.index_every) == (1, CHANNEL, b"TICKWIRE01", 2)
    assert raw[:4] == b"TWJ1" and seg.name == "00000000000000000001.twj"
    body = b"".join(journal.pack_record(journal.KIND_MESSAGE, s, msgs[s - 1]) for s in (1, 2, 3))
    assert raw[journal.HEADER_LEN :] == body
    # the CRC is zlib's over the header's first 16 bytes, then the payload
    first = raw[journal.HEADER_LEN : journal.HEADER_LEN + journal.REC_HDR + len(msgs[0])]
    crc = struct.unpack_from("<I", first, 16)[0]
    assert crc == zlib.crc32(first[:16] + msgs[0])
    # the index: records 0 and 2, (seq, offset)
    rows = np.fromfile(seg.with_suffix(".twi"), "<u8").reshape(-1, 2).tolist()
    assert rows == [[1, 80], [3, 80 + 2 * journal.REC_HDR + len(msgs[0]) + len(msgs[1])]]


# --- round trip ----------------------------------------------------------------------------
def test_a_session_round_trips_across_segments_from_the_start_and_the_middle(tmp_path):
    n = len(session()[2])
    with Writer(tmp_path, CHANNEL, SESSION, segment_bytes=64 << 10, index_every=64) as w:
        append(w, 1, n, batch=777)
        st = w.stats()
    assert st["messages"] == st["records"] == n and st["holes"] == []
    assert (st["first_seq"], st["last_seq"], st["next_seq"]) == (1, n, n + 1)
    segs = Reader(tmp_path).segments()
    assert st["segments"] == len(segs) > 5
    assert all(p.stat().st_size <= 64 << 10 for p in segs)
    assert messages(tmp_path) == want(1, n)
    assert messages(tmp_path, 12_345) == want(12_345, n)
    assert messages(tmp_path, n) == want(n, n) and messages(tmp_path, n + 1) == []
    report = journal.verify([tmp_path])
    assert report["clean"] and report["summary"]["records"] == n
    assert {f["index"] for f in report["files"]} == {"ok"}


def test_reading_from_the_middle_seeks_through_the_index(tmp_path):
    """A bad record early in a segment: a read from a seq past its index point never sees
    it (the reader seeked over it), a read from the start does."""
    with Writer(tmp_path, CHANNEL, SESSION, index_every=100) as w:
        append(w, 1, 1000)
    (seg,) = Reader(tmp_path).segments()
    offs = record_offsets(seg)
    flip(seg, offs[10] + journal.REC_HDR)  # seq 11's payload
    assert messages(tmp_path, 650) == want(650, 1000)
    with pytest.raises(journal.JournalCorrupt, match=f"offset {offs[10]}: CRC mismatch"):
        messages(tmp_path, 1)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.integers(1, 400), min_size=1, max_size=30),
    segment_bytes=st.integers(100, 20_000),
    index_every=st.integers(1, 80),
    data=st.data(),
)
def test_any_batching_segment_size_and_index_spacing_round_trip(
    batches, segment_bytes, index_every, data
):
    buf, offsets, msgs = session()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        with Writer(d, CHANNEL, SESSION, segment_bytes=segment_bytes, index_every=index_every) as w:
            seq = 1
            for size in batches:
                seqs = np.arange(seq, seq + size, dtype=np.int64)
                w.append_many(seqs, buf, offsets[seq - 1 : seq + size], prefix=2)
                seq += size
        last = seq - 1
        assert messages(d) == want(1, last)
        start = data.draw(st.integers(1, last), label="from_seq")
        assert messages(d, start) == want(start, last)
        assert journal.verify([d])["clean"]


# --- torn tails and corruption -------------------------------------------------------------
def _journal(directory: Path, last: int = 600) -> Path:
    """A journal of messages 1..last over several segments; its newest segment."""
    with Writer(directory, CHANNEL, SESSION, segment_bytes=8 << 10, index_every=16) as w:
        append(w, 1, last, batch=97)
    return Reader(directory).segments()[-1]


def test_a_torn_tail_is_cut_on_open_at_every_offset_of_the_last_record(tmp_path):
    orig = tmp_path / "orig"
    newest = _journal(orig)
    size = newest.stat().st_size
    last_rec = record_offsets(newest)[-1]
    assert last_rec + journal.REC_HDR < size
    for cut in range(last_rec + 1, size):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(orig, d)
        os.truncate(d / newest.name, cut)
        assert not journal.verify([d])["clean"]
        assert messages(d) == want(1, 599)  # a reader stops at the last whole record
        with Writer(d, CHANNEL, SESSION) as w:
            assert w.recovered == cut - last_rec
            assert w.next_seq == 600 and w.stats()["last_seq"] == 599
            append(w, 600, 610)
        assert (d / newest.name).stat().st_size > size  # appended after the cut
        assert messages(d) == want(1, 610), cut
        assert journal.verify([d])["clean"]


@pytest.mark.parametrize("how", ["bad CRC", "zero tail", "header only"])
def test_other_torn_tails_are_cut_too(tmp_path, how):
    newest = _journal(tmp_path)
    size = newest.stat().st_size
    last_rec = record_offsets(newest)[-1]
    if how == "bad CRC":  # the final record, whole but for one byte
        flip(newest, size - 1)
        cut, last = size - last_rec, 599
    elif how == "zero tail":  # a file system that extended the file before the crash
        with open(newest, "ab") as f:
            f.write(bytes(3000))
        cut, last = 3000, 600
    else:  # a segment created, then the crash before its header was whole
        extra = tmp_path / journal.segment_name(601)
        extra.write_bytes(journal.pack_header(601, CHANNEL, b"TICKWIRE01", 16, 0)[:40])
        cut, last = 40, 600
    report = journal.verify([tmp_path])
    assert report["summary"]["torn_tails"] == 1 and not report["summary"]["errors"]
    with Writer(tmp_path, CHANNEL, SESSION) as w:
        assert w.recovered == cut and w.next_seq == last + 1
        append(w, last + 1, 700)
    assert messages(tmp_path) == want(1, 700)
    assert journal.verify([tmp_path])["clean"]


@pytest.mark.parametrize(("where", "what"), [(journal.REC_HDR + 3, "CRC mismatch"), (0, "framing")])
def test_a_bad_record_with_records_after_it_is_corruption(tmp_path, where, what):
    newest = _journal(tmp_path)
    at = record_offsets(newest)[-3]
    before = newest.read_bytes()
    flip(newest, at + where)
    report = journal.verify([tmp_path])
    bad = [f for f in report["files"] if f["errors"]]
    assert not report["clean"] and [f["path"] for f in bad] == [str(newest.resolve())]
    assert bad[0]["errors"][0]["offset"] == at and what in bad[0]["errors"][0]["error"]
    with pytest.raises(journal.JournalCorrupt, match=f"{newest.name}: offset {at}: .*{what}") as e:
        Writer(tmp_path, CHANNEL, SESSION)
    assert (e.value.path, e.value.offset) == (str(newest), at)
    with pytest.raises(journal.JournalCorrupt, match=f"offset {at}"):
        messages(tmp_path)
    flip(newest, at + where)  # the writer touched nothing
    assert newest.read_bytes() == before
    with Writer(tmp_path, CHANNEL, SESSION) as w:
        assert w.recovered == 0 and w.next_seq == 601


def test_corruption_in_an_older_segment_is_verifys_to_find(tmp_path):
    _journal(tmp_path)
    older = Reader(tmp_path).segments()[1]
    at = record_offsets(older)[5]
    flip(older, at + journal.REC_HDR)
    report = journal.verify([older])
    assert report["files"][0]["errors"][0]["offset"] == at
    assert "CRC mismatch" in journal.verify_text(report)


def test_a_missing_or_stale_index_is_rebuilt_on_open(tmp_path):
    newest = _journal(tmp_path)
    newest.with_suffix(".twi").unlink()
    assert journal.verify([newest])["files"][0]["index"] == "missing"
    with Writer(tmp_path, CHANNEL, SESSION):
        pass
    assert journal.verify([newest])["files"][0]["index"] == "ok"
    newest.with_suffix(".twi").write_bytes(struct.pack("<QQ", 12345, 99))
    assert journal.verify([newest])["files"][0]["index"] == "stale"
    assert journal.verify([newest])["clean"]  # advisory: never an error
    assert messages(tmp_path, 590) == want(590, 600)  # a bad entry is not trusted
    with Writer(tmp_path, CHANNEL, SESSION) as w:
        assert w.next_seq == 601
    assert journal.verify([newest])["files"][0]["index"] == "ok"


# --- sequences -----------------------------------------------------------------------------
def test_gaps_become_holes_and_duplicates_are_refused(tmp_path):
    buf, offsets, msgs = session()
    with Writer(tmp_path, CHANNEL, SESSION) as w:
        append(w, 1, 10)
        append(w, 15, 20)  # 11..14 missing
        with pytest.raises(ValueError, match="seq 20: already journaled"):
            w.append(20, msgs[19])
        with pytest.raises(ValueError, match="seq 5: already journaled"):
            append(w, 5, 30)
        with pytest.raises(ValueError, match="22 after 23: not increasing"):
            w.append_many([21, 23, 22], buf, offsets[20:24], prefix=2)
        seqs = np.array([21, 22, 25, 26])  # a gap inside a batch
        idx = np.array([20, 21, 24, 25])
        parts = [msgs[i] for i in idx]
        flat = np.frombuffer(b"".join(parts), np.uint8)
        w.append_many(seqs, flat, np.cumsum([0, *map(len, parts)]))
        w.hole(27, 3, "lapped by the ring")
        w.append(31, msgs[30])  # and a gap before it: 30
        st = w.stats()
    holes = [(11, 4, "gap"), (23, 2, "gap"), (27, 3, "lapped by the ring"), (30, 1, "gap")]
    assert st["holes"] == holes and st["messages"] == 10 + 6 + 4 + 1
    expect = [*want(1, 10), Hole(11, 4, "gap"), *want(15, 22), Hole(23, 2, "gap")]
    expect += [*want(25, 26), Hole(27, 3, "lapped by the ring"), Hole(30, 1, "gap"), *want(31, 31)]
    assert messages(tmp_path) == expect
    assert messages(tmp_path, 28) == expect[-3:]  # the hole covering 28 comes whole
    report = journal.verify([tmp_path])
    assert report["clean"] and report["summary"]["hole_messages"] == 10
    assert [(h["first"], h["count"], h["why"]) for h in report["files"][0]["holes"]] == holes
    with Writer(tmp_path, CHANNEL, SESSION) as w:  # the next seq survives a reopen
        assert w.next_seq == 32
        with pytest.raises(ValueError, match="already journaled"):
            w.hole(31, 1, "again")


def test_one_writer_per_journal_and_one_session_per_journal(tmp_path):
    with Writer(tmp_path, CHANNEL, SESSION) as w:
        append(w, 1, 5)
        with pytest.raises(journal.JournalError, match="another writer has this journal open"):
            Writer(tmp_path, CHANNEL, SESSION)
    with pytest.raises(journal.JournalError, match="session TICKWIRE01, not channel .* TW2"):
        Writer(tmp_path, CHANNEL, "TW2")
    with pytest.raises(journal.JournalError, match="journal begins at 1|not in the journal"):
        messages(tmp_path, 0)


# --- a full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"needs to mount a tmpfs: `mount -t tmpfs` failed ({done.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)


@pytest.mark.needs("root")
def test_a_full_disk_is_a_counted_hole_never_an_exception(small_tmpfs):
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\xff" * (128 << 10))
    d = small_tmpfs / "journal"
    w = Writer(d, CHANNEL, SESSION, sync="every", retry_s=0)
    try:
        seq = 1
        while not w.stats()["disk_full"]:
            append(w, seq, seq + 199)
            seq += 200
            assert seq < 10_000, "the tmpfs never filled"
        first_lost = w.stats()["last_seq"] + 1
        for _ in range(3):  # still full: counted, retried, never raised
            append(w, seq, seq + 199)
            seq += 200
        st = w.stats()
        assert st["disk_full"] and st["lost"] == seq - first_lost
        assert st["pending_holes"] == [(first_lost, seq - first_lost, "disk full")]
        assert st["holes"] == [] and st["errors"] >= 4
        # the partial record the full disk cut is gone: the file is whole records only
        assert journal.verify([d])["clean"]
        filler.unlink()
        append(w, seq, seq + 99)
        st = w.stats()
        assert not st["disk_full"] and st["pending_holes"] == []
        assert st["holes"] == [(first_lost, seq - first_lost, "disk full")]
        assert st["last_seq"] == seq + 99
    finally:
        w.close()
    report = journal.verify([d])
    assert report["clean"]
    assert report["files"][0]["holes"] == [
        {"first": first_lost, "count": seq - first_lost, "why": "disk full"}
    ]
    expect = [*want(1, first_lost - 1), Hole(first_lost, seq - first_lost, "disk full")]
    assert messages(d) == [*expect, *want(seq, seq + 99)]


# --- retention -----------------------------------------------------------------------------
def test_retention_by_size_deletes_whole_oldest_segments(tmp_path):
    with Writer(tmp_path, CHANNEL, SESSION, segment_bytes=4096, retain_bytes=20_000) as w:
        append(w, 1, 2000, batch=50)
        st = w.stats()
    segs = Reader(tmp_path).segments()
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir() if p.suffix in (".twj", ".twi"))
    assert st["deleted"] > 10 and st["segments"] == len(segs) >= 4
    assert on_disk == st["journal_bytes"] <= 20_000
    first = st["first_seq"]
    assert segs[0].name == journal.segment_name(first)
    assert messages(tmp_path, first) == want(first, 2000)
    with pytest.raises(journal.JournalError, match=f"seq 1 is not in the journal.*{first}"):
        messages(tmp_path, 1)
    assert journal.verify([tmp_path])["clean"]


def test_retention_by_age_never_deletes_the_newest_segment(tmp_path):
    now = [time.time()]
    w = Writer(
        tmp_path,
        CHANNEL,
        SESSION,
        segment_bytes=4096,
        retain_age_s=3600,
        clock=lambda: now[0],
    )
    with w:
        append(w, 1, 600, batch=50)
        segs = Reader(tmp_path).segments()
        assert len(segs) > 4 and w.retain() == []
        for p in segs[:2]:
            os.utime(p, (now[0] - 7200, now[0] - 7200))
        assert w.retain() == segs[:2]
        now[0] += 2 * 86400  # two days on: all of them are old
        assert w.retain() == segs[2:-1]
        assert Reader(tmp_path).segments() == segs[-1:]
        assert w.stats()["deleted"] == len(segs) - 1
        append(w, 601, 700)  # rolls: the segment that was the newest may go now
        assert w.stats()["first_seq"] > int(segs[-1].stem)
    first = int(Reader(tmp_path).segments()[0].stem)
    assert messages(tmp_path, first) == want(first, 700)


# --- sync policies -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sync", "interval", "syncs"), [("every", 1.0, 5), ("none", 1.0, 0), ("interval", 3600, 0)]
)
def test_the_sync_policy_is_what_fdatasync_counts(tmp_path, sync, interval, syncs):
    with Writer(tmp_path, CHANNEL, SESSION, sync=sync, sync_interval_s=interval) as w:
        for k in range(5):
            append(w, 1 + 100 * k, 100 * (k + 1), batch=100)
        w.tick()
        assert w.stats()["syncs"] == syncs


def test_interval_sync_happens_on_append_and_tick_once_due(tmp_path):
    with Writer(tmp_path, CHANNEL, SESSION, sync="interval", sync_interval_s=1e-9) as w:
        append(w, 1, 100)
        assert w.stats()["syncs"] == 1
        w.tick()  # nothing new to sync
        assert w.stats()["syncs"] == 1
        append(w, 101, 300, batch=100)
        assert w.stats()["syncs"] == 3


# --- tickwire journal verify ---------------------------------------------------------------
def tickwire(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_tickwire_journal_verify(tmp_path):
    newest = _journal(tmp_path / "j")
    segs = Reader(tmp_path / "j").segments()
    done = tickwire("journal", "verify", str(tmp_path / "j"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(segs) + 1 and all(line.endswith(": OK") for line in lines[:-1])
    assert lines[-1].startswith(f"{len(segs)} files, seq 1..600, 600 records")
    assert lines[-1].endswith(": clean")
    done = tickwire("journal", "verify", "--json", str(segs[0]), str(segs[1]))
    doc = json.loads(done.stdout)
    assert done.returncode == 0 and doc["clean"] and doc["summary"]["files"] == 2

    at = record_offsets(newest)[1]
    flip(newest, at + journal.REC_HDR)
    done = tickwire("journal", "verify", str(tmp_path / "j"))
    assert done.returncode == 1
    (bad,) = [line for line in done.stdout.splitlines() if "CORRUPT" in line]
    assert bad.startswith(str(newest.resolve())) and f"offset {at}: CRC mismatch" in bad
    doc = json.loads(tickwire("journal", "verify", "--json", str(newest)).stdout)
    assert not doc["clean"] and doc["files"][0]["errors"][0]["offset"] == at

    for args in ([str(tmp_path / "nothing")], [str(newest.with_suffix(".twi"))], [str(tmp_path)]):
        done = tickwire("journal", "verify", *args)
        assert done.returncode == 2 and done.stderr.startswith("tickwire journal verify: ")


def test_verify_reports_a_missing_segment_between_two(tmp_path):
    _journal(tmp_path)
    segs = Reader(tmp_path).segments()
    segs[2].unlink()
    report = journal.verify([tmp_path])
    assert not report["clean"]
    err = report["files"][2]["errors"][0]
    assert err["offset"] == 0 and "missing (a segment removed?)" in err["error"]


# --- configuration and measurement ---------------------------------------------------------
def test_the_journal_table_defaults_and_writer_options():
    j = config.Config().journal
    assert (j.enabled, j.dir, j.sync, j.sync_interval_s) == (
        False,
        "/var/lib/tickwire/journal",
        "interval",
        1.0,
    )
    assert (j.segment_mb, j.retain_gb, j.retain_days) == (256, 0, 0)
    cfg = config.from_dict(
        {"journal": {"enabled": True, "sync": "every", "retain_gb": 2, "retain_days": 1.5}}
    )
    opts = journal.writer_options(cfg.journal)
    assert opts == {
        "sync": "every",
        "sync_interval_s": 1.0,
        "segment_bytes": 256 << 20,
        "retain_bytes": 2 << 30,
        "retain_age_s": 1.5 * 86400,
    }


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"sync": "always"}, r"^journal\.sync: 'always' is not one of none, interval, every"),
        ({"sync_interval_s": 0}, r"^journal\.sync_interval_s: 0\.0 is outside"),
        ({"segment_mb": -1}, r"^journal\.segment_mb: -1 is outside 1\.\.65536"),
        ({"segment_mb": 1.5}, r"^journal\.segment_mb: expected an integer"),
        ({"retain_gb": -1}, r"^journal\.retain_gb: -1\.0 must be a number, 0 or more"),
        ({"retain_gb": 0.1}, r"^journal\.retain_gb: 0\.1 GiB is less than one segment"),
        ({"retain_days": -0.5}, r"^journal\.retain_days: -0\.5 must be a number, 0 or more"),
        ({"retain_days": float("nan")}, r"^journal\.retain_days: nan"),
        ({"dir": "journal"}, r"^journal\.dir: 'journal' is not an absolute path"),
        ({"enabled": "yes"}, r"^journal\.enabled: expected true or false"),
        ({"keep": 3}, r"^journal\.keep: unknown key \(known: dir, enabled, retain_days"),
    ],
)
def test_a_bad_journal_table_names_its_key(table, why):
    with pytest.raises(config.ConfigError, match=why):
        config.from_dict({"journal": table})


def test_bench_appends_a_whole_session(tmp_path):
    buf = session()[0]
    r = journal.bench(buf, tmp_path / "b", batch=1000, sync="every")
    assert r["messages"] == 20_000 and r["syncs"] == 20 and r["msgs_per_s"] > 0
    assert journal.verify([tmp_path / "b"])["summary"]["messages"] == 20_000
