"""The exchange in a box: MoldUDP64 framing, the A/B publisher and its fault plan, and the
re-request server -- over real sockets in a private netns lab, received by plain kernel
sockets in the appliance namespace."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import moldudp64 as mold
from host.exchange import itchgen
from host.exchange import faultplan
from host.exchange import publisher as sim
from tests.labnet import (
    Receiver,
    Requester,
    SimProcess,
    built,
    private_lab,
    run_sim,
    write_config,
)

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
        assert (status, seq, count, session) == (mold.P_DATA, p["seq"][j], p["count"][j],
                                                 b"SESSION001")  # fmt: skip
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
    assert [(x.line, x.kind, x.first, x.last) for x in f] == [("A", "drop", 10, 20),
                                                             ("B", "drop", 10, 20)]  # fmt: skip
    assert faultplan.parse_fault("B:cut=200@1000")[0].ms == 200
    assert faultplan.parse_fault("A:reorder=4")[0].prob == 0.05
    assert faultplan.parse_fault("A:dup=0.5")[0].prob == 0.5
    assert faultplan.parse_fault("A:dup=7-9")[0].first == 7
    for bad in ("C:drop=1-2", "A:drop=5-1", "A:loss=2", "A:cut=100", "A:boom=1", "A:drop",
                "A:reorder=1", "A:delay=-3"):  # fmt: skip
        with pytest.raises(faultplan.SimError):
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
        done = subprocess.run([sys.executable, "-m", "host.cli", "sim", *args],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 1, (args, done.stderr)
        assert text in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


# --- in the lab ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labcfg(tmp_path_factory):
    cfg = private_lab("sim")
    with built(cfg):
        path = tmp_path_factory.mktemp("lab") / "lab.toml"
        yield cfg, write_config(cfg, path)


@pytest.fixture(scope="module")
def session_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "s.itch"
    itchgen.write_session(str(path), N_MSGS, 40, 21)
    return path


def _messages(path) -> list[bytes]:
    data = path.read_bytes()
    out, p = [], 0
    while p < len(data):
        n = int.from_bytes(data[p : p + 2], "big")
        out.append(data[p + 2 : p + 2 + n])
        p += 2 + n
    return out


def _blocks(payload: bytes) -> list[bytes]:
    out, p = [], 0
    while p < len(payload):
        n = int.from_bytes(payload[p : p + 2], "big")
        out.append(payload[p + 2 : p + 2 + n])
        p += 2 + n
    return out


@pytest.mark.lab
def test_both_lines_carry_the_session_with_heartbeats_and_end(labcfg, session_file):
    cfg, cfg_path = labcfg
    rx = Receiver(cfg)
    try:
        summary = run_sim(cfg_path, "--session", str(session_file), "--rate", "300000",
                          "--preroll", "0.7", "--heartbeat", "0.2", "--eos-for", "0.5",
                          "--no-rerequest")  # fmt: skip
        rx.wait_eos()
        time.sleep(0.2)
    finally:
        rx.close()
    a, b = rx.data("A"), rx.data("B")
    assert a == b  # identical packet streams
    seqs = [s for s, _, _ in a]
    counts = [c for _, c, _ in a]
    assert seqs[0] == 1 and all(s + c == n for s, c, n in zip(seqs, counts, seqs[1:], strict=False))
    assert sum(counts) == N_MSGS
    assert [m for _, _, pl in a for m in _blocks(pl)] == _messages(session_file)
    assert all(len(pl) + mold.HEADER_LEN <= 1400 for _, _, pl in a)
    for letter in ("A", "B"):
        pk = [p.parsed for p in rx.line(letter)]
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
def test_start_at_a_sequence_and_at_a_market_phase(labcfg, session_file):
    cfg, cfg_path = labcfg
    msgs = _messages(session_file)
    q = next(i for i, m in enumerate(msgs) if m[:1] == b"S" and m[11:12] == b"Q") + 1
    for args, first in ((["--start-seq", "12345"], 12345), (["--start-phase", "Q"], q)):
        rx = Receiver(cfg)
        try:
            s = run_sim(cfg_path, "--session", str(session_file), "--max", "--eos-for", "0.3",
                        "--no-rerequest", *args)  # fmt: skip
            rx.wait_eos()
        finally:
            rx.close()
        assert s["first_seq"] == first
        data = rx.data("A")
        assert data and data[0][0] == first
        assert _blocks(data[0][2])[0] == msgs[first - 1]


@pytest.mark.lab
def test_every_fault_happens_exactly_as_recorded(labcfg, session_file, tmp_path):
    cfg, cfg_path = labcfg
    record = tmp_path / "record.json"
    plan = tmp_path / "plan.toml"
    plan.write_text('seed = 5\nfaults = ["A:drop=1000-2999", "A:loss=0.02", "A:dup=0.01", '
                    '"A:reorder=4@0.05", "B:cut=120@100", "B:delay=40"]\n')  # fmt: skip
    rx = Receiver(cfg)
    try:
        summary = run_sim(cfg_path, "--session", str(session_file), "--rate", "100000",
                          "--faults", str(plan), "--record", str(record), "--eos-for", "0.3",
                          "--heartbeat", "0.05", "--no-rerequest")  # fmt: skip
        rx.wait_eos()
        time.sleep(0.2)
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
    # B: nothing dropped statically; the cut removed exactly what it recorded, in 100..220 ms
    ev_b = rec["lines"]["B"]["events"]
    cut = [e for e in ev_b if e["fault"] == "cut" and "packet" in e]
    assert cut and all(100 <= e["at_ms"] < 220 for e in ev_b if e["fault"] == "cut")
    assert rec["lines"]["B"]["sent"] == [k for k in range(len(packets))
                                         if k not in {e["packet"] for e in cut}]  # fmt: skip
    assert any(e["fault"] == "delay" and e["ms"] == 40 for e in ev_b)


@pytest.mark.lab
def test_delay_holds_one_line_back(labcfg, session_file):
    cfg, cfg_path = labcfg
    rx = Receiver(cfg)
    try:
        run_sim(cfg_path, "--session", str(session_file), "--rate", "200000", "--fault",
                "B:delay=400", "--eos-for", "0.2", "--no-rerequest")  # fmt: skip
        rx.wait_eos()
    finally:
        rx.close()
    first = {ln: next(p.t for p in rx.line(ln) if p.parsed[0] == mold.P_DATA) for ln in "AB"}
    assert first["B"] - first["A"] > 0.25  # 400 ms nominal; generous bound
    assert rx.data("A") == rx.data("B")


@pytest.mark.lab
def test_pacing_follows_the_rate_and_the_timestamps(labcfg, session_file):
    cfg, cfg_path = labcfg
    s = run_sim(cfg_path, "--session", str(session_file), "--rate", "50000", "--eos-for", "0",
                "--no-rerequest")  # fmt: skip
    assert s["seconds"] >= 0.45  # 30,000 messages at 50,000/s: 0.6 s nominal
    buf = np.fromfile(session_file, np.uint8)
    sess = sim.Session.from_buffer(buf)
    ts = np.zeros(sess.n, np.int64)
    mold.timestamps(sess.buf, sess.offsets, sess.n, ts)
    span = (ts[-1] - ts[0]) / 1e9
    speed = span / 0.6
    s = run_sim(cfg_path, "--session", str(session_file), "--speed", f"{speed}", "--eos-for",
                "0", "--no-rerequest")  # fmt: skip
    assert s["seconds"] >= 0.45


def _answer(req: Requester, quiet: float = 0.5) -> tuple[list[tuple[int, int]], list[bytes], int]:
    """(seq, count) per packet, all messages in order, total bytes of one answer."""
    pkts = req.collect(quiet=quiet)
    heads, msgs = [], []
    for p in pkts:
        status, seq, count, session, m = mold.parse(p)
        assert status == mold.P_DATA and session == b"TICKWIRE01"
        heads.append((seq, count))
        msgs += m
    return heads, msgs, sum(len(p) for p in pkts)


@pytest.mark.lab
def test_rerequests_answer_exactly_and_honour_caps_and_bad_requests(labcfg, session_file):
    cfg, cfg_path = labcfg
    msgs = _messages(session_file)
    rx = Receiver(cfg)
    proc = SimProcess(cfg_path, "--session", str(session_file), "--max", "--eos-for", "60",
                      "--heartbeat", "0.2", "--rr-window", "10000", "--rr-max-messages", "300",
                      "--rr-max-bytes", "64000", "--rr-rate", "1000000")  # fmt: skip
    req = Requester(cfg, "A")
    try:
        rx.wait_eos()  # everything published, the server is up
        heads, got, _ = _answer(req.ask(25_000, 100))
        assert got == msgs[25_000 - 1 : 25_100 - 1]
        assert heads[0][0] == 25_000 and all(s + c == n[0] for (s, c), n in
                                             zip(heads, heads[1:], strict=False))  # fmt: skip
        _, got, _ = _answer(req.ask(22_000, 5_000))  # over the message cap
        assert got == msgs[22_000 - 1 : 22_300 - 1]
        _, got, _ = _answer(req.ask(N_MSGS - 9, 50))  # past the end: what exists
        assert got == msgs[-10:]
        req.ask(N_MSGS + 1, 10)  # the future
        req.ask(100, 10)  # below the retained window (the last 10,000)
        req.ask(25_000, 10, session=b"OTHERSESS1")
        for junk in (b"", b"x" * 5, mold.request(req.session, 25_000, 10) + b"!",
                     mold.request(req.session, 0, 10), mold.request(req.session, 25_000, 0)):
            req.send_raw(junk)  # fmt: skip
        assert _answer(req, quiet=1.0)[1] == []  # none of those is answered
        _, got, _ = _answer(req.ask(29_000, 20))  # and the server still works
        assert got == msgs[29_000 - 1 : 29_020 - 1]
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


@pytest.mark.lab
def test_rerequest_byte_cap_and_rate_limit_per_requester(labcfg, session_file):
    cfg, cfg_path = labcfg
    msgs = _messages(session_file)
    rx = Receiver(cfg)
    proc = SimProcess(cfg_path, "--session", str(session_file), "--max", "--eos-for", "60",
                      "--heartbeat", "0.2", "--payload", "400", "--rr-max-messages", "1000",
                      "--rr-max-bytes", "2000", "--rr-rate", "200")  # fmt: skip
    a, b = Requester(cfg, "A"), Requester(cfg, "B")
    try:
        rx.wait_eos()
        heads, got, size = _answer(a.ask(10_000, 1000))  # byte cap binds first
        assert 0 < len(got) < 1000 and size <= 2000
        assert got == msgs[10_000 - 1 : 10_000 - 1 + len(got)]
        assert heads[0][0] == 10_000
        t0 = time.monotonic()
        served = len(got)
        for _ in range(6):  # a burst: the bucket (200 msgs/s, one second's worth) runs dry
            a.ask(12_000, 1000)
        served += len(_answer(a, quiet=0.5)[1])
        elapsed = time.monotonic() - t0
        assert served <= 200 + 200 * elapsed + 1
        _, got_b, _ = _answer(b.ask(20_000, 50))  # another requester is unaffected
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
    assert r["rate_limited"] >= 1 and r["partial"] >= 1
    assert summary["interrupted"] is True


@pytest.mark.lab
def test_bench_sim_reports_rates_and_cleans_up(session_file):
    from tests.labnet import lab_or_skip

    lab_or_skip()
    done = subprocess.run([sys.executable, "-m", "host.cli", "bench", "sim", "--session",
                           str(session_file), "--repeat", "1", "--json"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)["result"]
    assert r["messages"] == N_MSGS and r["packets_per_line"] > 0
    assert r["sim_msgs_per_s"] > 0 and r["baseline_msgs_per_s"] > 0
    assert r["ratio_vs_baseline"] == pytest.approx(r["baseline_seconds"] / r["sim_seconds"])
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tb" not in " ".join(x.split()[0] for x in listed.splitlines() if x.strip())
