"""Acceptance of arbitration and recovery, end to end in a private lab, AF_XDP mode (kernel
sockets when AF_XDP is unavailable): the simulator publishes with faults on the lines, the
appliance arbitrates, recovers from the simulator's re-request server, and its books end
exactly where ``tickwire book`` ends -- or, when recovery is impossible, says so."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dataplane.book import Book
from host.exchange import itchgen
from tests import capabilities
from tests.helpers import wait_for
from tests.labnet import Appliance, SimProcess, run_session, run_sim, write_config

pytestmark = pytest.mark.lab
N_MSGS = 120_000


@pytest.fixture(scope="module")
def mode() -> str:
    """AF_XDP where this machine has it, kernel sockets otherwise (the acceptance is the
    same); probed when the first test runs, not at import."""
    return "xdp" if capabilities.missing(["xdp", "afxdp"]) is None else "socket"


@pytest.fixture(scope="module")
def session_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "s.itch"
    itchgen.write_session(str(path), N_MSGS, 80, 41)
    book = Book()
    book.feed(np.fromfile(path, np.uint8))
    return path, book.digest()


def _cfg(labcfg, tmp_path) -> str:
    return write_config(labcfg, tmp_path / "sim.toml")


def _run(labcfg, mode, tmp_path, session_file, *faults, rate="500000", extra=(), run_extra=""):
    """The session through the appliance with ``faults``; (run, sim, sim's record)."""
    args = [
        "--session",
        str(session_file[0]),
        "--rate",
        rate,
        "--eos-for",
        "3",
        "--heartbeat",
        "0.1",
        "--record",
        str(tmp_path / "rec.json"),
        *extra,
    ]
    for f in faults:
        args += ["--fault", f]
    s, sim = run_session(labcfg, tmp_path, mode, *args, run_extra=run_extra)
    return s, sim, json.loads((tmp_path / "rec.json").read_text())


def _whole(s, digest):
    assert s["ended"] == "stopped" and not s["stale"] and not s["halted"]
    assert s["taken"] == N_MSGS and s["next_seq"] == N_MSGS + 1
    assert s["unrecoverable_messages"] == 0 and s["unrecoverable_gaps"] == 0
    assert s["digest"] == digest and s["check"] is None
    assert s["book"]["dup_add"] == 0 and s["book"]["unknown_ref"] == 0


def test_line_a_cut_mid_session_continues_from_b(labcfg, mode, session_file, tmp_path):
    # data is due from 0 to 120 ms (120,000 messages at 1M/s); the cut opens at 80 ms and
    # outlasts the data, so whatever A had left to send when it opened is cut
    s, sim, rec = _run(labcfg, mode, tmp_path, session_file, "A:cut=2000@80", rate="1000000")
    _whole(s, session_file[1])
    cut = [e for e in rec["lines"]["A"]["events"] if e["fault"] == "cut" and "packet" in e]
    assert cut, "the cut hit nothing: A sent its last data packet after the window"
    cut_messages = sum(e["count"] for e in cut)
    assert s["lines"]["A"]["messages"] == N_MSGS - cut_messages  # what A carried, exactly
    assert s["gaps_declared"] == 0  # B had everything: nothing to recover
    assert s["lines"]["B"]["first"] >= cut_messages


def test_same_range_dropped_on_both_lines_is_recovered(labcfg, mode, session_file, tmp_path):
    s, sim, rec = _run(labcfg, mode, tmp_path, session_file, "AB:drop=50000-50999")
    _whole(s, session_file[1])
    assert s["gaps_declared"] >= 1 and s["gap_declared_messages"] >= 1000
    assert s["lines"]["recovery"]["first"] >= 1000
    r = s["recovery"]
    # within the SLO: a gap older than its SLO is given up (unrecoverable), never filled
    assert r["filled"] >= 1 and r["unrecoverable"] == 0
    assert sim["rerequest"]["answered"] >= 1 and sim["rerequest"]["messages"] >= 1000
    assert s["recovery_latency_ns"]["count"] == r["filled"]  # one latency per gap filled


def test_random_loss_on_both_lines_with_reordering(labcfg, mode, session_file, tmp_path):
    s, sim, rec = _run(
        labcfg,
        mode,
        tmp_path,
        session_file,
        "A:loss=0.01",
        "B:loss=0.01",
        "A:reorder=4@0.05",
        "B:reorder=4@0.05",
        extra=["--seed", "9"],
    )
    _whole(s, session_file[1])
    lost = {
        ln: {e["packet"] for e in rec["lines"][ln]["events"] if e["fault"] == "loss"} for ln in "AB"
    }
    assert lost["A"] and lost["B"]
    both = lost["A"] & lost["B"]
    if both:  # packets neither line carried came from the re-request server
        assert s["lines"]["recovery"]["first"] > 0


def test_loss_at_the_end_of_a_burst_is_seen_through_heartbeats(
    labcfg, mode, session_file, tmp_path
):
    s, sim, rec = _run(labcfg, mode, tmp_path, session_file, f"AB:drop={N_MSGS - 40}-{N_MSGS}")
    _whole(s, session_file[1])
    assert s["gaps_declared"] >= 1 and s["lines"]["recovery"]["first"] >= 40


def _publish_losing_both_lines(labcfg, tmp_path, path) -> None:
    """The session, with sequences 30000..30999 lost on both lines and no re-request
    server to fill them: an unrecoverable gap."""
    run_sim(
        _cfg(labcfg, tmp_path),
        "--session",
        str(path),
        "--rate",
        "500000",
        "--eos-for",
        "0.5",
        "--heartbeat",
        "0.1",
        "--no-rerequest",
        "--fault",
        "AB:drop=30000-30999",
    )


def test_server_down_makes_gaps_unrecoverable_and_books_stale(labcfg, mode, session_file, tmp_path):
    from host.appliance import status

    path, digest = session_file
    app = Appliance(
        labcfg,
        tmp_path,
        mode,
        until_eos=False,
        run_extra="recovery_retries = 2\nrecovery_timeout_ms = 20\n",
    )
    try:
        _publish_losing_both_lines(labcfg, tmp_path, path)
        app.wait_counters(lambda c: c["stale"], "books stale")
        c = app.wait_counters(lambda c: c["next_seq"] > N_MSGS, "the whole session seen")
        assert c["stale"] and c["unrecoverable_gaps"] >= 1 and c["unrecoverable_messages"] >= 1000
        # every sequence: taken or declared
        assert c["taken"] + c["unrecoverable_messages"] == N_MSGS
        assert c["unrecoverable_messages"] < 1000 + 2 * 100, c  # whole packets around the range
        st = status.collect(app.channel)
        assert st["recovery"]["counters"]["unrecoverable"] >= 1
        assert "BOOKS STALE" in status.text(st)
        s = app.finish(terminate=True)
    finally:
        app.kill()
    assert s["stale"] and s["digest"] != digest  # never served as healthy


def test_halt_policy_stops_before_the_gap(labcfg, mode, session_file, tmp_path):
    path, _ = session_file
    app = Appliance(
        labcfg,
        tmp_path,
        mode,
        until_eos=False,
        run_extra='policy = "halt"\nrecovery_retries = 1\nrecovery_timeout_ms = 20\n',
    )
    try:
        _publish_losing_both_lines(labcfg, tmp_path, path)
        s = app.finish(timeout=60, rc=3)
    finally:
        app.kill()
    assert s["ended"] == "halted" and s["halted"] and s["stale"]
    assert s["taken"] < 30000 + 1 and s["next_seq"] <= 30000


# --- the same, with the faults injected by BPF on the wire (bpf/fault.c, TC egress) ---------
@pytest.mark.needs("bcc", "bpffs")
def test_bpf_cut_of_line_a_mid_session(labcfg, mode, session_file, tmp_path):
    from host.exchange import wirefaults as faults

    path, digest = session_file
    app = Appliance(labcfg, tmp_path, mode)
    with faults.WireFaults(labcfg.lab, "AB") as wire:
        try:
            sim = SimProcess(
                _cfg(labcfg, tmp_path),
                "--session",
                str(path),
                "--rate",
                "200000",
                "--eos-for",
                "2",
                "--heartbeat",
                "0.1",
            )
            app.wait_taken(20_000)  # mid-session
            # A goes dark until it has lost a good part of the session, then comes back
            wire.cut(600_000, line="A")
            cut = wait_for(
                lambda: (st := wire.stats("A"))["dropped_messages"] > 1000 and st,
                60,
                "1000 messages cut on A",
                lambda: wire.stats("A"),
            )
            wire.clear(line="A")
            sim.finish()
            s = app.finish()
        finally:
            app.kill()
    _whole(s, digest)
    assert cut["dropped_cut"] > 10 and cut["dropped_messages"] > 1000
    # line B carried what A lost: on a loaded machine the arbitration window may run out
    # on a hole before B's copy comes, and recovery then fills no more than was declared
    rec = s["lines"]["recovery"]["first"]
    assert s["lines"]["B"]["first"] + rec >= cut["dropped_messages"]
    assert rec <= s["gap_declared_messages"] and s["unrecoverable_messages"] == 0


@pytest.mark.needs("bcc", "bpffs")
def test_bpf_same_range_dropped_on_both_lines(labcfg, mode, session_file, tmp_path):
    from host.exchange import wirefaults as faults

    path, digest = session_file
    with faults.WireFaults(labcfg.lab, "AB") as wire:
        wire.drop_range(70_000, 70_999)
        s, sim, _ = _run(labcfg, mode, tmp_path, session_file)
        st = wire.stats()
    _whole(s, digest)
    for letter in "AB":
        assert st[letter]["dropped_range"] > 0 and st[letter]["dropped_messages"] >= 1000
    assert s["lines"]["recovery"]["first"] >= 1000 and s["recovery"]["filled"] >= 1


def test_bench_failover_reports_and_cleans_up(mode):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "host.cli",
            "bench",
            "failover",
            "--messages",
            "60000",
            "--rate",
            "100000",
            "--mode",
            mode,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)["result"]
    assert r["failover_ms"] is not None and r["failover_ms"] >= 0
    assert r["failover_digest_ok"] and r["failover_cut_packets"] > 0
    for size in ("1", "100", "10000"):
        g = r["gap_fill"][size]
        assert g["whole"] and g["recovered"] >= g["dropped_messages"] >= int(size)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tbf" not in listed
