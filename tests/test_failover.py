"""Acceptance of arbitration and recovery, end to end in a private lab, AF_XDP mode (kernel
sockets when AF_XDP is unavailable): the simulator publishes with faults on the lines, the
appliance arbitrates, recovers from the simulator's re-request server, and its books end
exactly where ``tickwire book`` ends -- or, when recovery is impossible, says so."""

import json
import time

import numpy as np
import pytest

from dataplane.book import Book
from host.exchange import itchgen
from tests.labnet import built, private_lab, run_sim
from tests.test_run import Appliance, _xdp_available

pytestmark = pytest.mark.lab
N_MSGS = 120_000
MODE = "xdp" if _xdp_available() is None else "socket"


@pytest.fixture(scope="module")
def labcfg():
    cfg = private_lab("fov")
    with built(cfg):
        yield cfg


@pytest.fixture(scope="module")
def session_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "s.itch"
    itchgen.write_session(str(path), N_MSGS, 80, 41)
    book = Book()
    book.feed(np.fromfile(path, np.uint8))
    return path, book.digest()


def _cfg(labcfg, tmp_path) -> str:
    from tests.labnet import write_config

    return write_config(labcfg, tmp_path / "sim.toml")


def _run(labcfg, tmp_path, session_file, *faults, rate="500000", extra=(), run_extra=""):
    path, _ = session_file
    app = Appliance(labcfg, tmp_path, MODE, run_extra=run_extra)
    try:
        args = ["--session", str(path), "--rate", rate, "--eos-for", "3", "--heartbeat", "0.1",
                "--record", str(tmp_path / "rec.json"), *extra]  # fmt: skip
        for f in faults:
            args += ["--fault", f]
        sim = run_sim(_cfg(labcfg, tmp_path), *args)
        s = app.finish()
    finally:
        app.kill()
    return s, sim, json.loads((tmp_path / "rec.json").read_text())


def _whole(s, digest):
    assert s["ended"] == "stopped" and not s["stale"] and not s["halted"]
    assert s["taken"] == N_MSGS and s["next_seq"] == N_MSGS + 1
    assert s["gap_messages"] == 0 and s["lost_events"] == 0
    assert s["digest"] == digest and s["check"] is None
    assert s["book"]["dup_add"] == 0 and s["book"]["unknown_ref"] == 0


def test_line_a_cut_mid_session_continues_from_b(labcfg, session_file, tmp_path):
    s, sim, rec = _run(labcfg, tmp_path, session_file, "A:cut=200@80", rate="1000000")
    _whole(s, session_file[1])
    cut = [e for e in rec["lines"]["A"]["events"] if e["fault"] == "cut" and "packet" in e]
    assert len(cut) > 100  # 200 ms at 1M msgs/s: thousands of messages
    assert s["gaps_declared"] == 0  # B had everything: nothing to recover
    assert s["lines"]["B"]["first"] >= sum(e["count"] for e in cut)


def test_same_range_dropped_on_both_lines_is_recovered(labcfg, session_file, tmp_path):
    s, sim, rec = _run(labcfg, tmp_path, session_file, "AB:drop=50000-50999")
    _whole(s, session_file[1])
    assert s["gaps_declared"] >= 1 and s["gap_declared_messages"] >= 1000
    assert s["lines"]["recovery"]["first"] >= 1000
    r = s["recovery"]
    assert r["filled"] >= 1 and r["unrecoverable"] == 0
    assert sim["rerequest"]["answered"] >= 1 and sim["rerequest"]["messages"] >= 1000
    lat = s["recovery_latency_ns"]
    assert lat["count"] >= 1 and lat["p50"] < 2e9  # within the SLO (2 s)


def test_random_loss_on_both_lines_with_reordering(labcfg, session_file, tmp_path):
    s, sim, rec = _run(labcfg, tmp_path, session_file, "A:loss=0.01", "B:loss=0.01",
                       "A:reorder=4@0.05", "B:reorder=4@0.05", extra=["--seed", "9"])  # fmt: skip
    _whole(s, session_file[1])
    lost = {ln: {e["packet"] for e in rec["lines"][ln]["events"] if e["fault"] == "loss"}
            for ln in "AB"}  # fmt: skip
    assert lost["A"] and lost["B"]
    both = lost["A"] & lost["B"]
    if both:  # packets neither line carried came from the re-request server
        assert s["lines"]["recovery"]["first"] > 0


def test_loss_at_the_end_of_a_burst_is_seen_through_heartbeats(labcfg, session_file, tmp_path):
    s, sim, rec = _run(labcfg, tmp_path, session_file, f"AB:drop={N_MSGS - 40}-{N_MSGS}")
    _whole(s, session_file[1])
    assert s["gaps_declared"] >= 1 and s["lines"]["recovery"]["first"] >= 40


def test_server_down_makes_gaps_unrecoverable_and_books_stale(labcfg, session_file, tmp_path):
    path, digest = session_file
    app = Appliance(labcfg, tmp_path, MODE, until_eos=False,
                    run_extra="recovery_retries = 2\nrecovery_timeout_ms = 20\n")  # fmt: skip
    try:
        run_sim(_cfg(labcfg, tmp_path), "--session", str(path), "--rate", "500000",
                "--eos-for", "0.5", "--heartbeat", "0.1", "--no-rerequest", "--fault",
                "AB:drop=30000-30999")  # fmt: skip
        deadline = time.monotonic() + 30
        while not app.reader.counters()["stale"]:
            assert time.monotonic() < deadline, app.reader.counters()
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while (c := app.reader.counters())["next_seq"] <= N_MSGS:
            assert time.monotonic() < deadline, c
            time.sleep(0.05)
        assert c["stale"] and c["lost_events"] >= 1 and c["gap_messages"] >= 1000
        assert c["taken"] + c["gap_messages"] == N_MSGS  # every sequence: taken or declared
        assert c["gap_messages"] < 1000 + 2 * 100, c  # whole packets around the range
        from host.appliance import status

        st = status.collect(app.channel)
        assert st["recovery"]["counters"]["unrecoverable"] >= 1
        assert "BOOKS STALE" in status.text(st)
        s = app.finish(terminate=True)
    finally:
        app.kill()
    assert s["stale"] and s["digest"] != digest  # never served as healthy


def test_halt_policy_stops_before_the_gap(labcfg, session_file, tmp_path):
    path, _ = session_file
    app = Appliance(labcfg, tmp_path, MODE, until_eos=False,
                    run_extra='policy = "halt"\nrecovery_retries = 1\nrecovery_timeout_ms = 20\n')
    try:
        run_sim(_cfg(labcfg, tmp_path), "--session", str(path), "--rate", "500000",
                "--eos-for", "0.5", "--heartbeat", "0.1", "--no-rerequest", "--fault",
                "AB:drop=30000-30999")  # fmt: skip
        s = app.finish(timeout=60, rc=3)
    finally:
        app.kill()
    assert s["ended"] == "halted" and s["halted"] and s["stale"]
    assert s["taken"] < 30000 + 1 and s["next_seq"] <= 30000


# --- the same, with the faults injected by BPF on the wire (bpf/fault.c, TC egress) ---------
def test_bpf_cut_of_line_a_mid_session(labcfg, session_file, tmp_path):
    from host.exchange import wirefaults as faults
    from tests.labnet import SimProcess

    path, digest = session_file
    app = Appliance(labcfg, tmp_path, MODE)
    with faults.WireFaults(labcfg.lab, "AB") as wire:
        try:
            sim = SimProcess(_cfg(labcfg, tmp_path), "--session", str(path), "--rate", "200000",
                             "--eos-for", "2", "--heartbeat", "0.1")  # fmt: skip
            deadline = time.monotonic() + 60
            while app.reader.counters()["taken"] < 20_000:  # mid-session
                assert time.monotonic() < deadline
                time.sleep(0.005)
            wire.cut(200, line="A")
            sim.finish()
            s = app.finish()
            cut = wire.stats("A")
        finally:
            app.kill()
    _whole(s, digest)
    assert cut["dropped_cut"] > 10 and cut["dropped_messages"] > 1000  # 200 ms at 200k/s
    assert s["gaps_declared"] == 0  # line B carried all of it


def test_bpf_same_range_dropped_on_both_lines(labcfg, session_file, tmp_path):
    from host.exchange import wirefaults as faults

    path, digest = session_file
    with faults.WireFaults(labcfg.lab, "AB") as wire:
        wire.drop_range(70_000, 70_999)
        s, sim, _ = _run(labcfg, tmp_path, session_file)
        st = wire.stats()
    _whole(s, digest)
    for letter in "AB":
        assert st[letter]["dropped_range"] > 0 and st[letter]["dropped_messages"] >= 1000
    assert s["lines"]["recovery"]["first"] >= 1000 and s["recovery"]["filled"] >= 1


def test_bench_failover_reports_and_cleans_up():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "host.cli", "bench", "failover", "--messages",
                           "60000", "--rate", "100000", "--mode", MODE, "--json"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)["result"]
    assert r["failover_ms"] is not None and r["failover_ms"] >= 0
    assert r["failover_digest_ok"] and r["failover_cut_packets"] > 0
    for size in ("1", "100", "10000"):
        g = r["gap_fill"][size]
        assert g["whole"] and g["recovered"] >= g["dropped_messages"] >= int(size)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tbf" not in listed
