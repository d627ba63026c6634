"""The exchange in a box: MoldUDP64 framing, the A/B publisher and its fault plan, and the
re-request server -- over real sockets in a private netns lab, received by plain kernel
sockets in the appliance namespace."""

import json
import re
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import moldudp64 as mold
from dataplane.sysabi import IOVEC, MMSGHDR
from host.config import LabConfig
from host.exchange import faultplan, itchgen, rerequest
from host.exchange import publisher as sim
from tests.helpers import free_port, wait_for
from tests.labnet import (
    Receiver,
    Requester,
    SimProcess,
    receive_messages,
    run_sim,
    sent_counts,
    write_config,
)
from tests.reference import frames

N_MSGS = 30_000


# --- framing (no root) -------------------------------------------------------------------
def _framed(lengths: list[int]) -> np.ndarray:
    out = bytearray()
    for i, n in enumerate(lengths):
        out += n.to_bytes(2, "big") + bytes([(i + k) & 0xFF for k in range(n)])
    return np.frombuffer(bytes(out), np.uint8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=300), st.integers(72, 600))
def test_pack_never_splits_and_respects_the_limit(lengths, limit):
    buf = _framed(lengths)
    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    n, bad = mold.index_messages(buf, offsets)
    assert (n, bad) == (len(lengths), -1)
    packets = np.zeros(n, mold.PACKET)
    k = mold.pack(offsets, 0, n, limit, packets)
    assert k > 0
    p = packets[:k]
    assert p["seq"][0] == 1 and np.all(p["seq"][1:] == p["seq"][:-1] + p["count"][:-1])
    assert p["count"].sum() == n
    assert np.all(p["end"] - p["start"] + mold.HEADER_LEN <= limit)
    assert p["start"][0] == 0 and p["end"][-1] == len(buf)
    assert np.all(p["start"][1:] == p["end"][:-1])  # contiguous: nothing split or lost
    # greedy: the next message would not have fitted
    nxt = offsets[p["first"][:-1] + p["count"][:-1] + 1]
    assert np.all(nxt - p["start"][:-1] + mold.HEADER_LEN > limit)
    hdrs = np.zeros(mold.HEADER_LEN * k, np.uint8)
    mold.write_headers(p, k, np.frombuffer(b"SESSION001", np.uint8), hdrs)
    for j in range(k):
        pkt = hdrs[20 * j : 20 * j + 20].tobytes() + buf[p["start"][j] : p["end"][j]].tobytes()
        status, seq, count, session, msgs = mold.parse(pkt)
        assert (status, seq, count, session) == (
            mold.P_DATA,
            p["seq"][j],
            p["count"][j],
            b"SESSION001",
        )
        assert [len(m) for m in msgs] == lengths[seq - 1 : seq - 1 + count]


def test_parse_rejects_malformed_packets():
    s = b"SESSION001"
    assert mold.parse(s + b"\x00" * 9)[0] == mold.P_SHORT
    assert mold.parse(mold.request(s, 7, 0))[:3] == (mold.P_HEARTBEAT, 7, 0)
    assert mold.parse(mold.request(s, 9, 0xFFFF))[:3] == (mold.P_END, 9, 0xFFFF)
    assert mold.parse(mold.request(s, 7, 0) + b"x")[0] == mold.P_BAD_BLOCKS
    one = b"\x00\x03abc"
    assert mold.parse(mold.request(s, 1, 1) + one)[0] == mold.P_DATA
    assert mold.parse(mold.request(s, 1, 2) + one)[0] == mold.P_BAD_BLOCKS  # count too high
    assert mold.parse(mold.request(s, 1, 1) + one + b"z")[0] == mold.P_BAD_BLOCKS
    assert mold.parse(mold.request(s, 1, 1) + b"\x00\x09abc")[0] == mold.P_BAD_BLOCKS


def test_fault_specs_parse_and_reject():
    f = faultplan.parse_fault("AB:drop=10-20")
    assert [(x.line, x.kind, x.first, x.last) for x in f] == [
        ("A", "drop", 10, 20),
        ("B", "drop", 10, 20),
    ]
    assert faultplan.parse_fault("B:cut=200@1000")[0].ms == 200
    assert faultplan.parse_fault("A:reorder=4")[0].prob == 0.05
    assert faultplan.parse_fault("A:dup=0.5")[0].prob == 0.5
    assert faultplan.parse_fault("A:dup=7-9")[0].first == 7
    for bad in (
        "C:drop=1-2",
        "A:drop=5-1",
        "A:loss=2",
        "A:cut=100",
        "A:boom=1",
        "A:drop",
        "A:reorder=1",
        "A:delay=-3",
    ):
        with pytest.raises(faultplan.FaultSpecError):
            faultplan.parse_fault(bad)


def test_sim_errors_are_one_line(tmp_path):
    good = tmp_path / "s.itch"
    itchgen.write_session(str(good), 2_000, 10, 3)
    (tmp_path / "t.itch").write_bytes(good.read_bytes()[:-5])
    cases = [
        (["--session", str(tmp_path / "missing.itch")], "no such session file"),
        (["--session", str(tmp_path / "t.itch")], "truncated"),
        (["--session", str(good), "--fault", "A:explode=1"], "LINE:KIND=ARGS"),
        (["--session", str(good), "--payload", "1600"], "does not fit the lab MTU"),
        (["--session", str(good), "--start-phase", "Z"], "no system event S with code"),
        (["--session", str(good), "--session-name", "WAY-TOO-LONG"], "1-10"),
    ]
    for args, text in cases:
        done = subprocess.run(
            [sys.executable, "-m", "host.cli", "sim", *args], capture_output=True, text=True
        )
        assert done.returncode == 1, (args, done.stderr)
        assert text in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


# --- schedule and pacing (no root): when each packet is due, and nothing goes before ------
def _sim(n: int = 3000, **opts) -> sim.Simulator:
    return sim.Simulator(
        sim.Session.from_buffer(itchgen.generate(n, 10, 3)), LabConfig(), sim.SimOptions(**opts)
    )


def test_rate_pacing_spaces_packets_by_their_first_message():
    s = _sim(pacing=sim.Pacing(mode="rate", rate=50_000.0))
    first = s.packets["first"]
    assert np.array_equal(s.nominal, ((first - first[0]) * (1e9 / 50_000)).astype(np.int64))
    # 3,000 messages at 50,000/s: the last packet is due just under 60 ms in
    assert (s.packets["first"][-1] - first[0]) / 50_000 == s.nominal[-1] / 1e9
    assert np.array_equal(s.lines["A"].due, s.nominal)


def test_realtime_pacing_follows_the_itch_timestamps_over_the_speed():
    s = _sim(pacing=sim.Pacing(mode="realtime", speed=1000.0))
    ts = np.zeros(s.session.n, np.int64)
    mold.timestamps(s.session.buf, s.session.offsets, s.session.n, ts)
    want = ((ts[s.packets["first"]] - ts[s.packets["first"][0]]) / 1000.0).astype(np.int64)
    assert np.all(np.diff(s.nominal) >= 0) and s.nominal[-1] > 0
    assert np.array_equal(s.nominal, np.maximum.accumulate(np.maximum(want, 0)))
    assert not _sim(pacing=sim.Pacing(mode="max")).nominal.any()


def test_delay_holds_one_line_back_by_exactly_its_milliseconds():
    s = _sim(
        pacing=sim.Pacing(mode="rate", rate=50_000.0), faults=faultplan.parse_fault("B:delay=400")
    )
    a, b = s.lines["A"], s.lines["B"]
    assert np.array_equal(a.sched, b.sched)  # the same packets, in the same order
    assert np.array_equal(b.due, a.due + 400_000_000) and b.delay_ns == 400_000_000
    assert {"line": "B", "fault": "delay", "ms": 400} in s.line_events("B")


def test_nothing_is_sent_before_it_is_due():
    """The sender's gate, with the clock given: a packet goes out at its due time, never a
    nanosecond before, and goes out whole (the header, then its slice of the session)."""
    s = _sim(
        pacing=sim.Pacing(mode="rate", rate=50_000.0), faults=faultplan.parse_fault("B:delay=400")
    )
    st = s.lines["B"]
    batch = 4
    iov, mm = np.zeros(2 * batch, IOVEC), np.zeros(batch, MMSGHDR)
    for i in range(batch):
        mm[i]["hdr"]["iov"] = iov.ctypes.data + 2 * IOVEC.itemsize * i
        mm[i]["hdr"]["iovlen"] = 2
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(10)
        tx.connect(rx.getsockname())
        for k in (0, len(st.sched) // 2, len(st.sched) - 1):
            args = (
                tx.fileno(),
                mm,
                iov,
                s.headers.ctypes.data,
                s.session.buf.ctypes.data,
                s.packets,
                st.sched,
                st.due,
                k,
            )
            assert sim.send_due(*args, st.due[k] - 1, st.cuts, st.cutlog, 0) == (k, 0, 0, 0)
            cursor, _, sent, err = sim.send_due(*args, st.due[k], st.cuts, st.cutlog, 0)
            assert (err, sent) == (0, cursor - k) and sent >= 1
            p = s.packets[st.sched[k]]
            data = rx.recv(65536)
            assert (
                data
                == s.headers[20 * st.sched[k] : 20 * st.sched[k] + 20].tobytes()
                + s.session.buf[p["start"] : p["end"]].tobytes()
            )
            for _ in range(sent - 1):  # others due at the same nanosecond went with it
                rx.recv(65536)


def test_rerequest_rate_limit_per_requester_with_the_clock_given(monkeypatch):
    """The token bucket (200 messages/s, one second's worth) with a frozen clock: a burst
    gets exactly the bucket, the next request nothing, another address its own bucket, and
    half a second later half a bucket more."""
    now = [1000.0]
    monkeypatch.setattr(rerequest, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    sess = sim.Session.from_buffer(itchgen.generate(3000, 10, 5))
    name = mold.session_bytes("TICKWIRE01")
    cfg = rerequest.ServerConfig(port=free_port(socket.SOCK_DGRAM), rate=200.0, workers=1)
    srv = rerequest.ReRequestServer(
        sess, name, np.array([sess.n], np.int64), cfg, payload_limit=1400, bind_ip="127.0.0.1"
    )
    srv.start()
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.2", 0))  # another requester address: all of 127/8 is loopback
        to = ("127.0.0.1", cfg.port)

        def ask(sock, seq, count, expect):
            sock.sendto(mold.request(name, seq, count), to)
            got = [m for p in receive_messages(sock, expect) for m in mold.parse(p)[4]]
            assert got == [
                bytes(sess.buf[sess.offsets[i] + 2 : sess.offsets[i + 1]])
                for i in range(seq - 1, seq - 1 + expect)
            ]

        ask(a, 100, 150, 150)
        ask(a, 300, 150, 50)  # what is left of the bucket: a partial answer
        a.sendto(mold.request(name, 500, 10), to)  # nothing left
        wait_for(lambda: srv.counters["rate_limited"] == 1, 10, "the request turned away")
        ask(b, 700, 150, 150)  # another requester is unaffected
        now[0] += 0.5  # half a second: 100 tokens
        ask(a, 900, 150, 100)
        # the server counts an answer after sending it: wait for the count, not the bytes
        wait_for(
            lambda: srv.counters["answered"] == 4 and srv.counters["messages"] == 450,
            10,
            "the fourth answer counted",
        )
        assert (srv.counters["answered"], srv.counters["partial"]) == (4, 2)
        assert srv.counters["messages"] == 150 + 50 + 150 + 100
    finally:
        a.close()
        b.close()
        srv.stop()


# --- in the lab ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def simlab(labcfg, tmp_path_factory):
    """The module's lab, and a config file for ``tickwire sim`` in it."""
    path = tmp_path_factory.mktemp("lab") / "lab.toml"
    return labcfg, write_config(labcfg, path)


@pytest.fixture(scope="module")
def session_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "s.itch"
    itchgen.write_session(str(path), N_MSGS, 40, 21)
    return path


def _messages(data: bytes) -> list[bytes]:
    """The messages of an ITCH stream (a session file, a MoldUDP64 payload's blocks)."""
    return [m for _, m in frames(data)]


@pytest.mark.lab
def test_both_lines_carry_the_session_with_heartbeats_and_end(simlab, session_file):
    cfg, cfg_path = simlab
    rx = Receiver(cfg)
    try:
        summary = run_sim(
            cfg_path,
            "--session",
            str(session_file),
            "--rate",
            "300000",
            "--preroll",
            "0.7",
            "--heartbeat",
            "0.2",
            "--eos-for",
            "0.5",
            "--no-rerequest",
        )
        rx.wait_packets(sent_counts(summary))  # everything the simulator says it sent
    finally:
        rx.close()
    a, b = rx.data("A"), rx.data("B")
    assert a == b  # identical packet streams
    seqs = [s for s, _, _ in a]
    counts = [c for _, c, _ in a]
    assert seqs[0] == 1 and all(s + c == n for s, c, n in zip(seqs, counts, seqs[1:], strict=False))
    assert sum(counts) == N_MSGS
    assert [m for _, _, pl in a for m in _messages(pl)] == _messages(session_file.read_bytes())
    assert all(len(pl) + mold.HEADER_LEN <= 1400 for _, _, pl in a)
    for letter in ("A", "B"):
        pk = [p.parsed for p in rx.line(letter)]
        assert len(pk) == sent_counts(summary)[letter]  # and nothing the simulator did not send
        assert all(p[3] == b"TICKWIRE01" for p in pk)
        hb = [p for p in pk if p[0] == mold.P_HEARTBEAT]
        assert len(hb) >= 2 and all(p[1] == 1 for p in hb[:2])  # before data: next is 1
        eos = [p for p in pk if p[0] == mold.P_END]
        assert len(eos) >= 2 and all(p[1] == N_MSGS + 1 for p in eos)
        assert pk[-1][0] == mold.P_END  # nothing after the end of session
        assert summary["lines"][letter]["packets"] == len(a)
        assert summary["lines"][letter]["messages"] == N_MSGS
        assert summary["lines"][letter]["end_of_session"] == len(eos)
    assert summary["published"] == N_MSGS and not summary["interrupted"]


@pytest.mark.lab
def test_start_at_a_sequence_and_at_a_market_phase(simlab, session_file):
    cfg, cfg_path = simlab
    msgs = _messages(session_file.read_bytes())
    q = next(i for i, m in enumerate(msgs) if m[:1] == b"S" and m[11:12] == b"Q") + 1
    for args, first in ((["--start-seq", "12345"], 12345), (["--start-phase", "Q"], q)):
        rx = Receiver(cfg)
        try:
            s = run_sim(
                cfg_path,
                "--session",
                str(session_file),
                "--max",
                "--eos-for",
                "0.3",
                "--no-rerequest",
                *args,
            )
            rx.wait_eos()  # each line's data went before its end of session
        finally:
            rx.close()
        assert s["first_seq"] == first
        data = rx.data("A")
        assert data and data[0][0] == first
        assert _messages(data[0][2])[0] == msgs[first - 1]


@pytest.mark.lab
def test_every_fault_happens_exactly_as_recorded(simlab, session_file, tmp_path):
    cfg, cfg_path = simlab
    record = tmp_path / "record.json"
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'seed = 5\nfaults = ["A:drop=1000-2999", "A:loss=0.02", "A:dup=0.01", '
        '"A:reorder=4@0.05", "B:cut=120@100", "B:delay=40"]\n'
    )
    rx = Receiver(cfg)
    try:
        summary = run_sim(
            cfg_path,
            "--session",
            str(session_file),
            "--rate",
            "100000",
            "--faults",
            str(plan),
            "--record",
            str(record),
            "--eos-for",
            "0.3",
            "--heartbeat",
            "0.05",
            "--no-rerequest",
        )
        rx.wait_packets(sent_counts(summary))
    finally:
        rx.close()
    rec = json.loads(record.read_text())
    packets = [tuple(p) for p in rec["packets"]]
    for letter in ("A", "B"):
        got = [(s, c) for s, c, _ in rx.data(letter)]
        assert got == [packets[k] for k in rec["lines"][letter]["sent"]], letter
        kinds: dict = {}
        for e in rec["lines"][letter]["events"]:
            kinds[e["fault"]] = kinds.get(e["fault"], 0) + 1
        assert summary["lines"][letter]["faults"] == kinds
    ev_a = rec["lines"]["A"]["events"]
    # drop: exactly the packets overlapping 1000..2999, none of them sent
    dropped = {e["packet"] for e in ev_a if e["fault"] == "drop"}
    assert dropped == {k for k, (s, c) in enumerate(packets) if s <= 2999 and s + c - 1 >= 1000}
    sent_a = rec["lines"]["A"]["sent"]
    assert not dropped & set(sent_a)
    lost = {e["packet"] for e in ev_a if e["fault"] == "loss"}
    assert lost and not lost & set(sent_a) and not lost & dropped
    # what A sent is every packet but the dropped and lost, duplicates twice
    dups = [e["packet"] for e in ev_a if e["fault"] == "dup"]
    assert dups and all(sent_a.count(k) == 2 for k in dups)
    expected = sorted([k for k in range(len(packets)) if k not in dropped | lost] + dups)
    assert sorted(sent_a) == expected
    assert any(e["fault"] == "reorder" for e in ev_a) and sent_a != sorted(sent_a)
    # B: nothing dropped statically; the cut removed exactly what it recorded, and recorded
    # it inside its window (100..220 ms of the simulator's clock)
    ev_b = rec["lines"]["B"]["events"]
    cut = [e for e in ev_b if e["fault"] == "cut" and "packet" in e]
    assert cut and all(100 <= e["at_ms"] < 220 for e in ev_b if e["fault"] == "cut")
    assert rec["lines"]["B"]["sent"] == [
        k for k in range(len(packets)) if k not in {e["packet"] for e in cut}
    ]
    assert any(e["fault"] == "delay" and e["ms"] == 40 for e in ev_b)


@pytest.mark.lab
def test_a_delayed_line_carries_the_same_packets(simlab, session_file):
    """How late B is, is its schedule's business (tested above, with the clock given);
    here: the delayed line still carries exactly what the other does."""
    cfg, cfg_path = simlab
    rx = Receiver(cfg)
    try:
        summary = run_sim(
            cfg_path,
            "--session",
            str(session_file),
            "--rate",
            "200000",
            "--fault",
            "B:delay=400",
            "--eos-for",
            "0.2",
            "--no-rerequest",
        )
        rx.wait_packets(sent_counts(summary))
    finally:
        rx.close()
    assert summary["lines"]["B"]["faults"] == {"delay": 1}
    assert rx.data("A") == rx.data("B") and len(rx.data("B")) == summary["packets"]


@pytest.mark.lab
def test_pacing_options_reach_the_schedule(simlab, session_file):
    cfg, cfg_path = simlab
    s = run_sim(
        cfg_path,
        "--session",
        str(session_file),
        "--rate",
        "50000",
        "--eos-for",
        "0",
        "--no-rerequest",
    )
    assert s["pacing"] == "50,000 msgs/s" and s["published"] == N_MSGS
    sess = sim.Session.from_file(str(session_file))
    ts = np.zeros(sess.n, np.int64)
    mold.timestamps(sess.buf, sess.offsets, sess.n, ts)
    speed = (ts[-1] - ts[0]) / 1e9 / 0.5  # the session's span in half a second
    s = run_sim(
        cfg_path,
        "--session",
        str(session_file),
        "--speed",
        f"{speed}",
        "--eos-for",
        "0",
        "--no-rerequest",
    )
    assert s["pacing"] == f"real time x {speed:g}" and s["published"] == N_MSGS


def _answer(req: Requester, messages: int) -> tuple[list[tuple[int, int]], list[bytes], int]:
    """(seq, count) per packet, all messages in order, total bytes of an answer of
    ``messages`` messages."""
    pkts = req.answer(messages)
    heads, msgs = [], []
    for p in pkts:
        status, seq, count, session, m = mold.parse(p)
        assert status == mold.P_DATA and session == b"TICKWIRE01"
        heads.append((seq, count))
        msgs += m
    return heads, msgs, sum(len(p) for p in pkts)


@pytest.mark.lab
def test_rerequests_answer_exactly_and_honour_caps_and_bad_requests(simlab, session_file):
    cfg, cfg_path = simlab
    msgs = _messages(session_file.read_bytes())
    rx = Receiver(cfg)
    proc = SimProcess(
        cfg_path,
        "--session",
        str(session_file),
        "--max",
        "--eos-for",
        "60",
        "--heartbeat",
        "0.2",
        "--rr-window",
        "10000",
        "--rr-max-messages",
        "300",
        "--rr-max-bytes",
        "64000",
        "--rr-rate",
        "1000000",
    )
    req = Requester(cfg, "A")
    try:
        rx.wait_eos()  # everything published, the server is up
        heads, got, _ = _answer(req.ask(25_000, 100), 100)
        assert got == msgs[25_000 - 1 : 25_100 - 1]
        assert heads[0][0] == 25_000 and all(
            s + c == n[0] for (s, c), n in zip(heads, heads[1:], strict=False)
        )
        _, got, _ = _answer(req.ask(22_000, 5_000), 300)  # over the message cap
        assert got == msgs[22_000 - 1 : 22_300 - 1]
        _, got, _ = _answer(req.ask(N_MSGS - 9, 50), 10)  # past the end: what exists
        assert got == msgs[-10:]
        req.ask(N_MSGS + 1, 10)  # the future
        req.ask(100, 10)  # below the retained window (the last 10,000)
        req.ask(25_000, 10, session=b"OTHERSESS1")
        for junk in (
            b"",
            b"x" * 5,
            mold.request(req.session, 25_000, 10) + b"!",
            mold.request(req.session, 0, 10),
            mold.request(req.session, 25_000, 0),
        ):
            req.send_raw(junk)
        # the server still works, and answered none of those: one worker takes this
        # requester's datagrams in order, so an answer to any of them would come first
        heads, got, _ = _answer(req.ask(29_000, 20), 20)
        assert heads[0][0] == 29_000 and got == msgs[29_000 - 1 : 29_020 - 1]
    finally:
        req.close()
        rx.close()
        try:
            summary = proc.finish(terminate=True)
        finally:
            proc.kill()
    r = summary["rerequest"]
    assert r["future"] == 1 and r["outside_window"] == 1 and r["other_session"] == 1
    assert r["malformed"] == 5
    assert r["answered"] == 4 and r["messages"] == 100 + 300 + 10 + 20
    assert r["requests"] == 4 + 3 + 5 and r["partial"] == 2


def _capped(session_file, seq: int, want: int, payload: int, max_bytes: int) -> int:
    """Messages in an answer from ``seq`` cut at ``max_bytes`` of whole packets of at most
    ``payload`` bytes (the packing is ``tickwire sim``'s own, tested above)."""
    sess = sim.Session.from_file(str(session_file))
    packets = np.zeros(want, mold.PACKET)
    k = mold.pack(sess.offsets, seq - 1, seq - 1 + want, payload, packets)
    size = np.cumsum(mold.HEADER_LEN + packets["end"][:k] - packets["start"][:k])
    return int(packets["count"][:k][size <= max_bytes].sum())


@pytest.mark.lab
def test_rerequest_byte_cap_and_requesters_apart(simlab, session_file):
    """The byte cap over the lab's wire; the rate limit per requester is tested above with
    the clock given."""
    cfg, cfg_path = simlab
    msgs = _messages(session_file.read_bytes())
    rx = Receiver(cfg)
    proc = SimProcess(
        cfg_path,
        "--session",
        str(session_file),
        "--max",
        "--eos-for",
        "60",
        "--heartbeat",
        "0.2",
        "--payload",
        "400",
        "--rr-max-messages",
        "1000",
        "--rr-max-bytes",
        "2000",
        "--rr-rate",
        "200",
    )
    a, b = Requester(cfg, "A"), Requester(cfg, "B")
    try:
        rx.wait_eos()
        n = _capped(session_file, 10_000, 1000, 400, 2000)
        assert 0 < n < 1000
        heads, got, size = _answer(a.ask(10_000, 1000), n)  # byte cap binds first
        assert size <= 2000 and got == msgs[10_000 - 1 : 10_000 - 1 + n]
        assert heads[0][0] == 10_000
        _, got_b, _ = _answer(b.ask(20_000, 50), 50)  # another requester, its own bucket
        assert got_b == msgs[20_000 - 1 : 20_050 - 1]
    finally:
        a.close()
        b.close()
        rx.close()
        try:
            summary = proc.finish(terminate=True)
        finally:
            proc.kill()
    r = summary["rerequest"]
    assert r["answered"] == 2 and r["partial"] == 1 and r["messages"] == n + 50
    assert summary["interrupted"] is True


@pytest.mark.lab
def test_bench_sim_reports_rates_and_cleans_up(session_file):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "host.cli",
            "bench",
            "sim",
            "--session",
            str(session_file),
            "--repeat",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)["result"]
    assert r["messages"] == N_MSGS and r["packets_per_line"] > 0
    assert r["sim_msgs_per_s"] > 0 and r["baseline_msgs_per_s"] > 0
    assert r["ratio_vs_baseline"] == pytest.approx(r["baseline_seconds"] / r["sim_seconds"])
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [x.split()[0] for x in listed.splitlines() if re.match(r"tb\d{5}-", x)]
    assert not left, f"bench sim left its lab: {left}"  # its prefix: tb and a pid
