"""``tickwire tail`` (``host.appliance.tail``): the channel's stream as readable lines, JSON
lines, a depth ladder, and a digest of the levels a client rebuilt.

Without a network: a channel in a private shared-memory root, published in-process by the
consumer's own publishing code (``events.apply_stream`` and ``finish`` per packet,
``events.channel_tick`` for the channel's state, ``consumer.snapshot`` answering snapshot
requests between packets) -- each event kind reads as its line, ``--snapshot`` first shows
each symbol's BBO; ``--json`` carries every event; a lapped client says so once, takes a new
snapshot and still ends with the book's levels; the ladder's text; errors are one line and
exit status 2; a closed pipe ends it quietly.

In the lab (a running appliance): the issue's done-means -- a client on another core joins a
2M-message session mid-way through a snapshot and ends with the levels of ``tickwire book``
(digest equal); ``--json --count`` on a live session; the ladder in a terminal (tmux).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dataplane import book as bk
from dataplane import consumer, itch, shm
from dataplane import events as ev
from dataplane.book import Book
from dataplane.subscriber import Subscriber
from host.appliance import tail
from host.exchange import itchgen
from tests import itchbytes as ib
from tests.helpers import wait_for

CHANNEL = "tailunit"
T0 = 9 * 3600 * 10**9 + 30 * 60 * 10**9  # 09:30:00 in ITCH nanoseconds


# --- a channel published in-process ---------------------------------------------------------
class Channel:
    """A channel's shared memory under ``root``, written by the consumer's publishing
    functions (not by a network): ``publish`` applies framed ITCH messages a packet at a
    time, ``tick`` announces the channel's state, a thread answers snapshot requests."""

    def __init__(self, root: Path, slots: int = 1 << 16):
        self.root = root
        self.m = shm.create(CHANNEL, root)
        self.ring = ev.Ring.create(CHANNEL, slots, tsc_hz=0, root=root)
        self.book = Book()
        self.ctr, self.ctl = self.m["counters"], self.m["control"]
        self.ctr[shm.A_NEXT] = 1
        self.ctr[shm.S_PID] = os.getpid()
        self.ctr[shm.S_RUNNING] = 1
        self.lock = threading.Lock()  # snapshots are answered between packets
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        while not self._done.is_set():
            if int(self.ctl[shm.C_SNAP_REQ]) > int(self.ctl[shm.C_SNAP_DONE]):
                with self.lock:
                    b = self.book
                    consumer.snapshot(
                        b.sides,
                        b.ladder,
                        b.levels,
                        b.stocks,
                        self.m["levels"],
                        self.m["stocks"],
                        self.ctl,
                        self.ctr,
                        self.ring.hdr,
                    )
            time.sleep(0.0002)

    def publish(self, buf, per_packet: int = 30, rx: int = 1000) -> None:
        """Apply framed messages, ``per_packet`` of them per packet, as the consumer does."""
        buf = np.frombuffer(bytes(buf), np.uint8) if not isinstance(buf, np.ndarray) else buf
        offs = [0]
        while offs[-1] < len(buf):
            offs.append(offs[-1] + 2 + int.from_bytes(buf[offs[-1] : offs[-1] + 2], "big"))
        index = {o: i for i, o in enumerate(offs)}
        r = self.ring
        for i in range(0, len(offs) - 1, per_packet):
            j = min(i + per_packet, len(offs) - 1)
            with self.lock:
                seq0 = int(self.ctr[shm.A_NEXT]) - i
                pos = offs[i]
                while pos < offs[j]:
                    st, pos = ev.apply_stream(
                        buf, pos, offs[j], seq0 + index[pos], rx, *self.book.arrays(), r.ring, r.hdr
                    )
                    if st != itch.OK:
                        self.book.grow(st)
                ev.finish(r.ring, r.hdr, r.clk, r.ts, rx)
                self.ctr[shm.A_NEXT] = seq0 + j

    def tick(self) -> None:
        """The consumer's between-packets announcement of the channel's state."""
        with self.lock:
            r = self.ring
            ev.channel_tick(self.ctr, self.ctl, self.m["gaps"], r.ring, r.hdr, r.clk, r.ts)

    def end(self) -> None:
        """The end of session: every sequence taken."""
        self.ctr[shm.A_END_SEQ] = self.ctr[shm.A_NEXT]
        self.tick()

    def close(self) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture
def chan(tmp_path):
    c = Channel(tmp_path)
    yield c
    c.close()


def _y(stock: str, action: str, **h) -> bytes:  # Reg SHO restriction (tests/itchbytes has none)
    return ib.header("Y", **h) + ib.alpha(stock) + action.encode()


def _session_msgs() -> bytes:
    t = T0
    return ib.framed(
        ib.S("O", ts=t),
        ib.R("AAPL", locate=1),
        ib.R("MSFT", locate=2),
        ib.H("AAPL", "T", locate=1, ts=t + 1),
        _y("AAPL", "1", locate=1, ts=t + 2),
        ib.A(10, "B", 100, 123_400, locate=1, ts=t + 3),
        ib.A(11, "S", 200, 123_500, locate=1, ts=t + 4),
        ib.A(20, "B", 7, 4_000_000, stock="MSFT", locate=2, ts=t + 5),
        ib.E(11, 50, locate=1, ts=t + 6),
        ib.C(10, 20, 123_300, printable="N", locate=1, ts=t + 7),
        ib.P(300, 123_450, side="S", locate=1, ts=t + 8),
        ib.Q(1_000, 123_450, locate=1, ts=t + 9),
        ib.D(11, locate=1, ts=3_723_000_000_042),  # 01:02:03.000000042
    )


def _stream(chan, symbols=None, err=None) -> tail.Stream:
    sub = Subscriber(CHANNEL, symbols, root=chan.root)
    return tail.Stream(sub, err or io.StringIO())


def _read_all(stream: tail.Stream) -> np.ndarray:
    parts = []
    while True:
        got, _snap = stream.poll()
        if not len(got):
            return np.concatenate(parts) if parts else got
        parts.append(got.copy())


def test_each_event_kind_reads_as_its_line(chan):
    stream = _stream(chan)
    stream.join()  # at sequence 0: the head
    chan.publish(_session_msgs(), per_packet=4)
    chan.ctl[shm.C_LINE_STATE + 0] = ev.LINE_STALE
    chan.m["gaps"][0, :2] = (100, 65)  # a gap declared: 100..164
    chan.ctl[shm.C_GAP_HEAD] = 1
    chan.ctl[shm.C_STALE] = 1
    chan.end()
    lines = stream.lines(_read_all(stream))
    t = "09:30:00.0000000"
    assert lines == [
        f"{t}00          1          CHANNEL system event O (start of messages)",
        f"{t}01          4 AAPL     STATE   trading",
        f"{t}02          5 AAPL     REGSHO  short sale restriction 1",
        f"{t}03          6 AAPL     BBO     bid 100@12.3400 x -- ask",
        f"{t}04          7 AAPL     BBO     bid 100@12.3400 x 200@12.3500 ask",
        f"{t}05          8 MSFT     BBO     bid 7@400.0000 x -- ask",
        f"{t}06          9 AAPL     BBO     bid 100@12.3400 x 150@12.3500 ask",
        f"{t}06          9 AAPL     TRADE   50 @ 12.3500 (sell side resting)",
        f"{t}07         10 AAPL     BBO     bid 80@12.3400 x 150@12.3500 ask",
        f"{t}07         10 AAPL     TRADE   20 @ 12.3300 (buy side resting, non-printable)",
        f"{t}08         11 AAPL     TRADE   300 @ 12.3450 (sell side resting)",
        f"{t}09         12 AAPL     TRADE   1000 @ 12.3450 (cross)",
        "01:02:03.000000042         13 AAPL     BBO     bid 80@12.3400 x -- ask",
        # channel events carry no ITCH time: the last one seen stands in
        "01:02:03.000000042         13          CHANNEL line A stale",
        "01:02:03.000000042         13          CHANNEL gap declared 100..164",
        "01:02:03.000000042         13          CHANNEL books stale (a gap was not recovered)",
        "01:02:03.000000042         13          CHANNEL end of session",
    ]


def test_symbols_filter_the_lines_but_not_the_channel(chan):
    stream = _stream(chan, ["MSFT"])
    stream.join()
    chan.publish(_session_msgs())
    chan.end()
    lines = stream.lines(_read_all(stream))
    assert [ln.split(None, 3)[2:] for ln in lines] == [
        ["CHANNEL", "system event O (start of messages)"],
        ["MSFT", "BBO     bid 7@400.0000 x -- ask"],
        ["CHANNEL", "end of session"],
    ]


def test_json_carries_every_event_of_the_followed_symbols(chan):
    chan.publish(ib.framed(ib.R("AAPL", locate=1), ib.R("MSFT", locate=2)))
    stream = _stream(chan, ["AAPL"])
    snap = stream.join()
    first = json.loads(tail.snapshot_json(snap, stream.sub))
    assert first["kind"] == "snapshot" and first["seq"] == 2 and first["levels"] == []
    chan.publish(ib.framed(ib.A(10, "B", 100, 123_400, locate=1, ts=T0)))
    chan.ctl[shm.C_LINE_STATE + 1] = ev.LINE_DOWN
    chan.end()
    docs = [json.loads(s) for s in stream.jsons(_read_all(stream))]
    assert [(d["kind"], d["seq"]) for d in docs] == [
        ("level", 3),
        ("bbo", 3),
        ("channel", 3),
        ("channel", 3),
    ]
    level = docs[0]
    assert (level["symbol"], level["side"], level["price"], level["shares"], level["orders"]) == (
        "AAPL",
        "B",
        123_400,
        100,
        1,
    )
    assert level["itch_ns"] == T0 and level["stamps_ns"]["rx"] == 1000
    assert docs[2]["event"] == "line_down" and docs[2]["line"] == "B"
    assert docs[3] == {
        "kind": "channel",
        "seq": 3,
        "event": "end_of_session",
        "next_seq": 4,
        "stamps_ns": {"rx": 0, "apply": 0, "publish": 0},
    }
    # the next snapshot has the level, named
    snap = stream.join()
    assert json.loads(tail.snapshot_json(snap, stream.sub))["levels"] == [
        [1, "AAPL", "B", 123_400, 100, 1]
    ]


def test_a_lapped_client_says_so_once_and_takes_a_new_snapshot(tmp_path):
    """The writer laps a client that stopped reading: it says so once on stderr, counts it,
    and joins again from a new snapshot, so its levels at the end of session are still the
    book's (the digest stays a proof)."""
    chan = Channel(tmp_path, slots=ev.MIN_SLOTS)
    try:
        buf = itchgen.generate(30_000, 20, seed=5)
        cut = _frame_boundary(buf, len(buf) // 2)
        err = io.StringIO()
        stream = _stream(chan, err=err)
        stream.join()
        chan.publish(buf[:cut])  # many times the ring, nothing read meanwhile
        got, snap = stream.poll()
        assert not len(got) and snap is not None and stream.laps == 1
        assert err.getvalue().count("\n") == 1
        assert "lapped" in err.getvalue() and "snapshot again -- taking one now" in err.getvalue()
        pos = cut
        while pos < len(buf):  # now a reader that keeps up
            nxt = _frame_boundary(buf, pos + 10_000)
            chan.publish(buf[pos:nxt])
            _read_all(stream)
            pos = nxt
        chan.end()
        _read_all(stream)
        assert stream.sub.ended and stream.laps == 1
        assert stream.snapshots == [0, cut_seq(buf, cut)]
        ref = Book()
        ref.feed(buf)
        assert stream.sub.digest() == ref.digest()
    finally:
        chan.close()


def _frame_boundary(buf: np.ndarray, near: int) -> int:
    """The first message boundary at or after byte ``near`` (or the end)."""
    pos = 0
    while pos < min(near, len(buf)):
        pos += 2 + int.from_bytes(buf[pos : pos + 2], "big")
    return pos


def cut_seq(buf: np.ndarray, cut: int) -> int:
    """The sequence of the last message before byte offset ``cut``."""
    n, pos = 0, 0
    while pos < cut:
        pos += 2 + int.from_bytes(buf[pos : pos + 2], "big")
        n += 1
    return n


def _opts(chan, **kw) -> tail.Options:
    return tail.Options(channel=CHANNEL, root=chan.root, **kw)


def test_snapshot_lines_start_with_each_symbols_bbo(chan):
    chan.publish(_session_msgs())
    chan.end()
    out, err = io.StringIO(), io.StringIO()
    assert tail.run(_opts(chan, snapshot=True, until_eos=True), out, err) == 0, err.getvalue()
    assert out.getvalue().splitlines() == [
        "snapshot                   13 AAPL     BBO     bid 80@12.3400 x -- ask",
        "snapshot                   13 MSFT     BBO     bid 7@400.0000 x -- ask",
    ]


def test_digest_run_after_the_end_is_the_books(chan):
    buf = itchgen.generate(20_000, 10, seed=3)
    chan.publish(buf)
    chan.end()
    out, err = io.StringIO(), io.StringIO()
    rc = tail.run(_opts(chan, snapshot=True, until_eos=True, digest=True), out, err)
    assert rc == 0, err.getvalue()
    (doc,) = [json.loads(s) for s in out.getvalue().splitlines()]
    ref = Book()
    ref.feed(buf)
    assert doc["digest"] == ref.digest()
    assert (doc["seq"], doc["snapshot_seq"], doc["lapped"], doc["ended"]) == (
        20_000,
        20_000,
        0,
        True,
    )
    assert doc["levels"] == bk.count_levels(ref.sides)
    assert err.getvalue() == ""


def test_json_count_run_follows_a_live_channel(chan):
    """``--json --snapshot --count N``: the snapshot record, then N events, seqs in order,
    while another thread publishes."""
    buf = itchgen.generate(20_000, 10, seed=4)
    cut = _frame_boundary(buf, len(buf) // 3)
    chan.publish(buf[:cut])

    def rest():  # once the client has its snapshot
        wait_for(lambda: ev.readers(CHANNEL, chan.root), 30, "a reader")
        wait_for(lambda: int(chan.ctl[shm.C_SNAP_DONE]) >= 1, 30, "a snapshot answered")
        chan.publish(buf[cut:])

    pub = threading.Thread(target=rest)
    pub.start()
    out, err = io.StringIO(), io.StringIO()
    rc = tail.run(_opts(chan, snapshot=True, json=True, count=500, seconds=60), out, err)
    pub.join()
    assert rc == 0, err.getvalue()
    docs = [json.loads(s) for s in out.getvalue().splitlines()]
    assert len(docs) == 501 and docs[0]["kind"] == "snapshot"
    assert docs[0]["seq"] == cut_seq(buf, cut)
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(seqs) and seqs[1] > seqs[0]
    assert {d["kind"] for d in docs[1:]} >= {"level", "bbo"}


def test_the_ladder_text():
    """Asks over bids (best in the middle), an empty row where a side has fewer levels, and
    the last update's stages on the ring's clock: rx -> apply -> publish -> read."""
    last = tail.Update(9, "level", rx_ns=1000, apply_dt=2500, pub_dt=40, read_ns=15_540)
    text = tail.ladder_lines(
        "AAPL",
        "tv",
        bids=[(123_400, 100, 1), (123_300, 50, 2)],
        asks=[(123_500, 200, 1)],
        levels=2,
        last=last,
        seq=9,
        lines={"A": "up", "B": "stale"},
        stale=True,
        ended=False,
        laps=1,
    )
    assert text == [
        "AAPL   channel tv   seq 9   (q quits)",
        "              price      shares   orders",
        "",
        "ask         12.3500         200        1",
        "      spread 0.0100",
        "bid         12.3400         100        1",
        "bid         12.3300          50        2",
        "last update: seq 9, level",
        "latency: receive->apply 2.5 us  apply->publish 40 ns  publish->read 12.0 us",
        "line A up, line B stale; books STALE; lapped 1x",
    ]


def test_errors_are_one_line_and_status_2(chan, tmp_path):
    def run(**kw):
        err = io.StringIO()
        opts = tail.Options(**{"channel": CHANNEL, "root": chan.root, **kw})
        rc = tail.run(opts, io.StringIO(), err)
        return rc, err.getvalue()

    rc, msg = run(channel="nosuch")
    assert rc == 2 and msg.count("\n") == 1 and "no consumer shared memory" in msg
    rc, msg = run(digest=True, until_eos=True)
    assert rc == 2 and "--digest needs --snapshot" in msg
    rc, msg = run(core=4095)
    assert rc == 2 and msg.startswith("tickwire tail: --core 4095: not a CPU")
    rc, msg = run(symbols=("TOOLONGNAME",))
    assert rc == 2 and msg.count("\n") == 1
    chan.ctr[shm.S_RUNNING] = 0
    rc, msg = run()
    assert rc == 2 and "consumer is not running" in msg
    # the CLI: the same, through the entry point
    done = subprocess.run(
        [*TICKWIRE, "tail", "--channel", "nosuch_tail"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stdout == ""


def test_a_closed_pipe_ends_it_quietly(chan):
    chan.publish(ib.framed(ib.R("AAPL", locate=1), ib.A(1, "B", 5, 10_000, locate=1)))
    r, w = os.pipe()
    os.close(r)
    out = os.fdopen(w, "w")
    err = io.StringIO()
    try:
        assert tail.run(_opts(chan, snapshot=True, json=True), out, err) == 0
        assert err.getvalue() == ""
    finally:
        out.close()


# --- lab ---------------------------------------------------------------------------------------
TICKWIRE = (
    [str(Path(sys.executable).with_name("tickwire"))]
    if Path(sys.executable).with_name("tickwire").exists()
    else [sys.executable, "-m", "host.cli"]
)
N_MSGS = 2_000_000


@pytest.fixture(scope="module")
def big_session(tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "tail2m.itch"
    itchgen.write_session(str(path), N_MSGS, 50, 7)
    book = Book()
    book.feed(np.fromfile(path, np.uint8))
    return path, book


def _publish(cfg, tmp_path, path, rate: int):
    from tests.labnet import SimProcess, write_config

    return SimProcess(
        write_config(cfg, tmp_path / "sim.toml"),
        "--session",
        str(path),
        "--rate",
        str(rate),
        "--eos-for",
        "1",
        "--no-rerequest",
    )


@pytest.mark.lab
@pytest.mark.parametrize(
    "mode", ["socket", pytest.param("xdp", marks=pytest.mark.needs("xdp", "afxdp"))]
)
def test_a_client_on_another_core_joining_mid_session_ends_with_the_books_digest(
    labcfg, big_session, tmp_path, mode
):
    """The done-means of issue 16 §3: the consumer on core 0, ``tickwire tail`` on core 1
    gets ready, joins mid-way (``--after``: a snapshot once a third of 2M messages is taken)
    and ends with ``tickwire book``'s digest; so does the appliance."""
    from tests.labnet import Appliance

    path, book = big_session
    app = Appliance(labcfg, tmp_path, mode, run_extra="core = 0\nevent_slots = 4194304\n")
    sim = client = None
    try:
        client = subprocess.Popen(
            [
                *TICKWIRE,
                "tail",
                "--channel",
                app.channel,
                "--snapshot",
                "--until-eos",
                "--digest",
                "--json",
                "--core",
                "1",
                "--after",
                str(N_MSGS // 3),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "ready" in client.stderr.readline()  # its code warm, before the session
        sim = _publish(labcfg, tmp_path, path, 100_000)  # about 20 s
        out, err = client.communicate(timeout=180)
        assert client.returncode == 0, err
        doc = json.loads(out)
        assert doc["digest"] == book.digest()
        assert N_MSGS // 3 <= doc["snapshot_seq"] < N_MSGS  # joined mid-way
        assert doc["seq"] == N_MSGS and doc["ended"] and not doc["stale"]
        assert doc["lapped"] == 0 and doc["snapshots"] == 1
        assert doc["lines"] == {"A": "up", "B": "up"}
        sim.finish()
        assert app.finish()["digest"] == book.digest()
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        if sim is not None:
            sim.kill()
        app.kill()


@pytest.fixture(scope="module")
def live(labcfg, big_session, tmp_path_factory):
    """An appliance with a session being published slowly (killed when the module is done)."""
    from tests.labnet import Appliance

    path, book = big_session
    tmp = tmp_path_factory.mktemp("live")
    app = Appliance(labcfg, tmp, "socket")
    sim = None
    try:
        sim = _publish(labcfg, tmp, path, 20_000)
        app.wait_taken(50_000)
        yield app, _busiest_symbol(book)
    finally:
        if sim is not None:
            sim.kill()
        app.kill()


def _busiest_symbol(book: Book) -> str:
    """The ticker with the most price levels at the end of the session."""
    rows = np.zeros((bk.count_levels(book.sides), 5), np.int64)
    bk.export_levels(book.sides, book.ladder, book.levels, rows)
    loc = int(np.bincount(rows[:, 0]).argmax())
    return bk._symbol(int(book.stocks[loc]["symbol"]))


@pytest.mark.lab
def test_json_lines_of_a_live_session(live):
    app, _sym = live
    done = subprocess.run(
        [*TICKWIRE, "tail", "--channel", app.channel, "--json", "--count", "3000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    docs = [json.loads(s) for s in done.stdout.splitlines()]
    assert len(docs) == 3000
    assert all("kind" in d and "seq" in d for d in docs)
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(seqs)
    assert {"level", "bbo"} <= {d["kind"] for d in docs}


@pytest.mark.lab
def test_lines_into_a_pipe_that_closes(live):
    app, sym = live
    done = subprocess.run(
        ["bash", "-c", '"$@" | head -n 3; exit "${PIPESTATUS[0]}"', "tail", *TICKWIRE]
        + ["tail", "--channel", app.channel, sym],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(f" {sym} " in ln for ln in lines)


@pytest.mark.lab
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_the_ladder_in_a_terminal(live, tmp_path):
    app, sym = live
    name = f"twtail{os.getpid()}"
    rc_file = tmp_path / "rc"
    cmd = " ".join([*TICKWIRE, "tail", "--channel", app.channel, "--ladder", sym, "--levels", "5"])
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]  # a server of its own

    def pane() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", name], capture_output=True, text=True
        ).stdout

    def shows_the_ladder() -> str | None:
        text = pane()
        rows = text.splitlines()
        ok = (
            rows
            and rows[0].startswith(f"{sym} ")
            and any(r.startswith("ask ") for r in rows)
            and any(r.startswith("bid ") for r in rows)
            and "receive->apply" in text
            and "publish->read" in text
            and "line A up" in text
        )
        return text if ok else None

    try:
        subprocess.run(
            [*tmux, "new-session", "-d", "-s", name, "-x", "100", "-y", "40"]
            + [f"{cmd}; echo $? > {rc_file}"],
            check=True,
            timeout=30,
        )
        wait_for(shows_the_ladder, 60, "the ladder with its latency footer", pane)
        subprocess.run([*tmux, "send-keys", "-t", name, "q"], check=True, timeout=30)
        wait_for(lambda: rc_file.exists() and rc_file.read_text().strip(), 30, "tail to exit")
        assert rc_file.read_text().strip() == "0"
        wait_for(
            lambda: (
                subprocess.run([*tmux, "has-session", "-t", name], capture_output=True).returncode
            ),
            30,
            "the tmux session to end",
        )
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
