"""Wire fault injection (bpf/fault.c, host/exchange/wirefaults.py): the CLI's values, the
program itself on crafted frames (BPF_PROG_RUN), and the faults on the
lab's real lines -- the simulator publishing, plain kernel sockets receiving both lines in
the appliance namespace, line B (or A) as the witness of what was sent."""

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dataplane import moldudp64 as mold
from host import netns
from host.appliance import bpfsys
from host.exchange import itchgen, lab
from host.exchange import wirefaults as faults
from tests.helpers import wait_for
from tests.labnet import (
    Receiver,
    SimProcess,
    built,
    private_lab,
    run_sim,
    sent_counts,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]
N_MSGS = 30_000
RATE = "200000"
TC_ACT_OK, TC_ACT_SHOT = 0, 2


# --- values (no root; the mirror of bpf/fault.h: tests/test_bpfabi.py) ---------------------
# (the CLI's spellings: tests/test_faultgrammar.py)
def test_lines():
    assert faults.lines_of("ab") == ["A", "B"] and faults.lines_of(["B"]) == ["B"]
    with pytest.raises(faults.FaultError, match="unknown line 'C'"):
        faults.lines_of("C")


def test_fault_values_are_checked():
    cfg = dict.fromkeys(faults.CFG_FIELDS, 0)
    assert faults._fault_fields(cfg, loss=1.0)["loss_threshold"] == 1 << 32
    assert faults._fault_fields(cfg, loss=0)["flags"] == 0
    new = faults._fault_fields(cfg, drop_range=(5, 9), drop_all=True)
    assert new["flags"] == faults.FF_RANGE | faults.FF_ALL and new["seq_last"] == 9
    for bad in (
        {"loss": 1.5},
        {"drop_range": (9, 5)},
        {"drop_range": (0, 5)},
        {"cut": (0, 0)},
        {"cut": (10, -1)},
    ):
        with pytest.raises(ValueError):
            faults._fault_fields(cfg, **bad)


def test_errors_are_one_line_without_a_lab():
    cfg = private_lab("fnl")
    assert not netns.exists(cfg.lab.exchange_ns)
    with pytest.raises(faults.FaultError, match=f"lab {cfg.lab.prefix} is not up"):
        faults.attach(cfg, "A")
    st = faults.status(cfg)
    assert st["pinned"] is None and not st["lab_up"]
    assert faults.remove_all(cfg) == []
    for args, text in (
        (["C", "--cut", "10"], "unknown line, fault or action 'C'"),
        (["A", "--cut", "10"], f"lab {cfg.lab.prefix} is not up"),
        (["A:loss=1%"], f"lab {cfg.lab.prefix} is not up"),
        (["A:reorder=4"], "reorder is a fault of the simulator"),
        (["clear", "--loss", "0.1"], "takes no fault options"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "host.cli", "lab", "fault", "--prefix", cfg.lab.prefix, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and text in done.stderr, done.stderr


# --- the program on crafted frames (root, bcc; no lab) -------------------------------------
def _frame(
    seq: int,
    count: int,
    *,
    group="239.77.1.1",
    port=26477,
    vlan=False,
    ihl=5,
    frag=0,
    truncate=0,
    ethertype=0x0800,
) -> bytes:
    mold_hdr = b"TICKWIRE01" + struct.pack("!QH", seq, count)
    payload = mold_hdr + (b"\x00\x05hello" * (count if 0 < count < 0xFFFF else 0))
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    opts = b"\x01" * (4 * (ihl - 5))
    ip = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            4 * ihl + len(udp),
            1,
            frag,
            1,
            17,
            0,
            socket.inet_aton("10.77.1.1"),
            socket.inet_aton(group),
        )
        + opts
        + udp
    )
    eth = b"\x01\x00\x5e\x4d\x01\x01" + b"\x02\x00\x00\x00\x00\x01"
    eth += (struct.pack("!HH", 0x8100, 7) if vlan else b"") + struct.pack("!H", ethertype)
    data = eth + ip
    return data[: len(data) - truncate] if truncate else data


def _run(prog_fd: int, data: bytes) -> int:
    return bpfsys.prog_run(prog_fd, data, data_out=bytearray(4096)).retval


@pytest.mark.needs("root", "bcc", "bpffs")  # no lab: BPF_PROG_TEST_RUN on loopback
def test_program_rules_on_crafted_frames():
    prefix = f"tfltu{os.getpid() % 100000:05d}"
    maps = faults.FaultMaps.create(prefix)
    try:
        # BPF_PROG_TEST_RUN hands the program an skb on this namespace's loopback (ifindex 1)
        base = dict(ifindex=1, group=0xEF4D0101, port=26477)
        maps.set_config("A", **base, flags=faults.FF_RANGE, seq_first=100, seq_last=199)
        expect = [
            (_frame(95, 5), TC_ACT_OK),  # 95..99
            (_frame(96, 5), TC_ACT_SHOT),  # 96..100
            (_frame(199, 3), TC_ACT_SHOT),  # 199..201
            (_frame(200, 10), TC_ACT_OK),
            (_frame(150, 0), TC_ACT_OK),  # heartbeat
            (_frame(150, 0xFFFF), TC_ACT_OK),  # end of session
            (_frame(150, 2, port=26478), TC_ACT_OK),  # another port
            (_frame(150, 2, group="239.77.2.1"), TC_ACT_OK),  # another group
            (_frame(150, 2, truncate=3), TC_ACT_OK),  # header cut short
            (_frame(150, 2, frag=0x2000), TC_ACT_OK),  # a fragment
            (_frame(150, 2, ethertype=0x0806), TC_ACT_OK),  # not IPv4
            (_frame(150, 2)[:38], TC_ACT_OK),  # UDP header cut short
            (_frame(150, 2, vlan=True), TC_ACT_SHOT),  # one 802.1Q tag
            (_frame(150, 2, ihl=7), TC_ACT_SHOT),  # IP options
        ]
        got = [_run(maps.prog_fd, data) for data, _ in expect]
        assert got == [want for _, want in expect]
        c = maps.counters("A")
        assert c["seen"] == len(expect) and c["passed"] + c["dropped"] == c["seen"]
        assert c["dropped_range"] == 4 == c["dropped"] and c["feed"] == 8
        assert (c["first_dropped_seq"], c["last_dropped_seq"]) == (96, 201)
        assert c["dropped_messages"] == 5 + 3 + 2 + 2

        maps.reset_counters("A")
        maps.set_config("A", flags=faults.FF_ALL)
        assert _run(maps.prog_fd, _frame(1, 0)) == TC_ACT_SHOT  # heartbeats too
        assert _run(maps.prog_fd, _frame(1, 0xFFFF)) == TC_ACT_SHOT
        assert _run(maps.prog_fd, _frame(1, 3, port=9)) == TC_ACT_OK  # not the feed
        maps.set_config("A", group=0, port=0)  # any group, any port: the feed after all
        assert _run(maps.prog_fd, _frame(1, 3, port=9, group="239.1.1.1")) == TC_ACT_SHOT
        maps.set_config("A", group=base["group"], port=base["port"])
        now = time.monotonic_ns()
        maps.set_config(
            "A", flags=faults.FF_CUT, cut_start_ns=now - 10**9, cut_end_ns=now + 10 * 10**9
        )
        assert _run(maps.prog_fd, _frame(1, 0)) == TC_ACT_SHOT
        maps.set_config("A", cut_end_ns=now)  # the window is over
        assert _run(maps.prog_fd, _frame(1, 3)) == TC_ACT_OK
        maps.set_config("A", flags=faults.FF_LOSS, loss_threshold=faults.LOSS_ONE)
        assert _run(maps.prog_fd, _frame(1, 3)) == TC_ACT_SHOT
        assert _run(maps.prog_fd, _frame(4, 0)) == TC_ACT_OK  # heartbeats never random
        maps.set_config("A", loss_threshold=0)
        assert _run(maps.prog_fd, _frame(1, 3)) == TC_ACT_OK
        c = maps.counters("A")
        assert (c["dropped_all"], c["dropped_cut"], c["dropped_random"]) == (3, 1, 1)
        assert c["seen"] == 9 and c["passed"] == 4

        maps.reset_counters("A")
        maps.set_config("A", ifindex=0, flags=faults.FF_ALL)  # slot unused: untouched
        maps.set_config("B", **base, flags=0)
        assert _run(maps.prog_fd, _frame(1, 3)) == TC_ACT_OK
        assert maps.counters("A")["seen"] == 0 and maps.counters("B")["seen"] == 1
    finally:
        maps.close()
        faults._unpin(prefix)
    assert not os.path.exists(f"{faults.PIN_ROOT}/{prefix}")


# --- the lab -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labcfg():
    cfg = private_lab("flt")
    with built(cfg):
        try:
            yield cfg
        finally:
            faults.remove_all(cfg)
    assert not os.path.exists(faults.pin_dir(cfg))


@pytest.fixture(scope="module")
def files(labcfg, tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    itchgen.write_session(d / "s.itch", N_MSGS, 50, 11)
    itchgen.write_session(d / "long.itch", 150_000, 50, 12)
    return {
        "config": write_config(labcfg, d / "lab.toml"),
        "session": str(d / "s.itch"),
        "long": str(d / "long.itch"),
    }


def _counts(wf) -> Callable[[], dict[str, dict]]:
    """The wire-fault counters of ``wf``'s lines, read when called."""
    return lambda: {letter: wf.stats(letter) for letter in wf.lines}


def _arrive(rx: Receiver, summary: dict, counts, before: dict[str, dict]) -> None:
    """Until every packet the simulator sent has arrived, less what the wire-fault program
    dropped since ``before`` on the lines ``counts()`` reads (its counters are final once
    the sender is done: TC egress runs in the sending call)."""
    want = sent_counts(summary)
    for letter, c in counts().items():
        b = before[letter]
        want[letter] = (c["feed"] - b["feed"]) - (c["dropped"] - b["dropped"])
    rx.wait_packets(want)


def _publish(labcfg, files, counts, *extra: str, session: str = "session"):
    """Run the simulator once; the receiver's record of both lines, once all that the
    wire let through (``counts``: see ``_arrive``) has arrived."""
    rx = Receiver(labcfg)
    try:
        before = counts()
        summary = run_sim(
            files["config"],
            "--session",
            files[session],
            "--rate",
            RATE,
            "--no-rerequest",
            "--eos-for",
            "0.5",
            *extra,
        )
        _arrive(rx, summary, counts, before)
    finally:
        rx.close()
    return rx


def _complete(data: list[tuple[int, int, bytes]], n: int = N_MSGS) -> None:
    seqs = [s for s, _, _ in data]
    assert seqs == sorted(seqs) and seqs[0] == 1
    assert all(s + c == nxt for (s, c, _), nxt in zip(data, seqs[1:], strict=False))
    assert seqs[-1] + data[-1][1] - 1 == n


def _kinds(packets) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in packets:
        st = p.parsed[0]
        out[st] = out.get(st, 0) + 1
    return out


def _tc(labcfg, what: str, ifname: str, *more: str) -> str:
    """``tc -s qdisc|filter show dev IFNAME ...`` in the exchange namespace."""
    return subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            labcfg.lab.exchange_ns,
            "tc",
            "-s",
            what,
            "show",
            "dev",
            ifname,
            *more,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_drop_range_drops_exactly_the_packets_covering_it(labcfg, files):
    first, last = 10_000, 10_999
    with faults.WireFaults(labcfg, "A") as wf:
        wf.drop_range(first, last)
        rx = _publish(labcfg, files, _counts(wf))
        stats = wf.stats()
    a, b = rx.data("A"), rx.data("B")
    _complete(b)
    hit = [(s, c, p) for s, c, p in b if s <= last and s + c - 1 >= first]
    assert len(hit) >= 2 and hit[0][0] < first <= hit[0][0] + hit[0][1] - 1  # straddles
    assert a == [x for x in b if x not in hit]  # the rest, in order, byte for byte
    assert stats["dropped_range"] == stats["dropped"] == len(hit)
    assert stats["dropped_messages"] == sum(c for _, c, _ in hit)
    assert stats["first_dropped_seq"] == hit[0][0]
    assert stats["last_dropped_seq"] == hit[-1][0] + hit[-1][1] - 1
    assert stats["passed"] == stats["seen"] - len(hit)
    assert stats["feed"] == len(rx.line("B"))  # every MoldUDP64 packet of the line
    assert _kinds(rx.line("A"))[mold.P_END] == _kinds(rx.line("B"))[mold.P_END]


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_cut_drops_one_contiguous_block(labcfg, files):
    n = 150_000
    rx = Receiver(labcfg)
    try:
        with faults.WireFaults(labcfg, "B") as wf:
            before = _counts(wf)()
            sim = SimProcess(
                files["config"],
                "--session",
                files["long"],
                "--rate",
                RATE,
                "--no-rerequest",
                "--eos-for",
                "0.5",
            )
            try:
                wait_for(lambda: rx.data("B"), 60, "data on line B")
                # silent from now until the program has cut some data, whatever the pace
                # of a loaded machine (data flows for ~750 ms in all)
                wf.cut(60_000)
                wait_for(lambda: wf.stats()["dropped_messages"] > 0, 60, "data cut on B", wf.stats)
                wf.clear()
                summary = sim.finish()
            finally:
                sim.kill()
            _arrive(rx, summary, _counts(wf), before)
            stats = wf.stats()
    finally:
        rx.close()
    a, b = rx.data("A"), rx.data("B")
    _complete(a, n)
    got = {s for s, _, _ in b}
    missing = [i for i, (s, _, _) in enumerate(a) if s not in got]
    assert missing, "the cut dropped nothing"
    assert missing == list(range(missing[0], missing[-1] + 1))  # one block
    assert 0 < missing[0] and missing[-1] < len(a) - 1  # inside the data, not at its ends
    assert [x for i, x in enumerate(a) if i not in set(missing)] == b
    assert stats["dropped_cut"] == stats["dropped"] == len(missing)
    assert stats["dropped_messages"] == sum(a[i][1] for i in missing)
    assert stats["first_dropped_seq"] == a[missing[0]][0]


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_random_loss_is_counted_exactly(labcfg, files):
    with faults.WireFaults(labcfg, "A") as wf:
        wf.loss(0.05)
        rx = _publish(labcfg, files, _counts(wf))
        stats = wf.stats()
    a, b = rx.data("A"), rx.data("B")
    _complete(b)
    got = {s for s, _, _ in a}
    lost = [(s, c) for s, c, _ in b if s not in got]
    assert stats["dropped_random"] == stats["dropped"] == len(lost)
    assert stats["dropped_messages"] == sum(c for _, c in lost)
    assert 0.01 * len(b) <= len(lost) <= 0.12 * len(b), (len(lost), len(b))
    assert _kinds(rx.line("A"))[mold.P_END] == _kinds(rx.line("B"))[mold.P_END]


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_drop_all_then_clear_restores_the_line(labcfg, files):
    with faults.WireFaults(labcfg, "A") as wf:
        wf.drop_all()
        rx = _publish(labcfg, files, _counts(wf))
        assert rx.line("A") == []
        _complete(rx.data("B"))
        first = wf.stats()
        assert first["dropped_all"] == first["dropped"] == first["feed"] == len(rx.line("B"))
        wf.clear()
        rx = _publish(labcfg, files, _counts(wf))
        assert rx.data("A") == rx.data("B")
        _complete(rx.data("A"))
        assert _kinds(rx.line("A")) == _kinds(rx.line("B"))
        second = wf.stats()
        assert second["dropped"] == first["dropped"]
        assert second["feed"] == first["feed"] + len(rx.line("B"))


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_heartbeats_survive_a_sequence_range_fault(labcfg, files):
    with faults.WireFaults(labcfg, "A") as wf:
        wf.drop_range(1, (1 << 64) - 1)
        rx = _publish(labcfg, files, _counts(wf), "--preroll", "0.5", "--heartbeat", "0.1")
        stats = wf.stats()
    _complete(rx.data("B"))
    assert rx.data("A") == []
    kinds_a = _kinds(rx.line("A"))
    assert kinds_a.get(mold.P_HEARTBEAT, 0) >= 3 and kinds_a.get(mold.P_END, 0) >= 1
    assert set(kinds_a) == {mold.P_HEARTBEAT, mold.P_END}
    assert stats["dropped_range"] == stats["dropped"] == len(rx.data("B"))
    assert stats["feed"] - stats["dropped"] == len(rx.line("A"))


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_detach_leaves_no_qdisc_filter_or_pin(labcfg, files):
    with faults.WireFaults(labcfg, "AB") as wf:
        wf.cut(50, after_ms=10_000)
        wf.loss(0.5, line="B")
        for ifname in ("ex-a", "ex-b"):
            assert "clsact" in _tc(labcfg, "qdisc", ifname)
            assert "tw_fault:" in _tc(labcfg, "filter", ifname, "egress")
        st = faults.status(labcfg)
        assert st["lines"]["A"]["attached"] and st["lines"]["B"]["attached"]
        assert st["lines"]["A"]["faults"]["cut"]["state"] == "pending"
        assert st["lines"]["A"]["faults"]["loss"] is None
        assert st["lines"]["B"]["faults"]["loss"] == 0.5
        assert sorted(os.listdir(faults.pin_dir(labcfg))) == ["cfg", "prog", "stats"]
    for ifname in ("ex-a", "ex-b"):
        assert "clsact" not in _tc(labcfg, "qdisc", ifname)
        assert _tc(labcfg, "filter", ifname, "egress").strip() == ""
    assert not os.path.exists(faults.pin_dir(labcfg))
    assert faults.status(labcfg)["pinned"] is None

    # leaving the block by an exception detaches too
    with pytest.raises(RuntimeError), faults.WireFaults(labcfg, "B"):
        raise RuntimeError("boom")
    assert "clsact" not in _tc(labcfg, "qdisc", "ex-b")
    assert not os.path.exists(faults.pin_dir(labcfg))


def _cli(labcfg, files, *args: str) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "host.cli",
            "lab",
            "fault",
            "--config",
            files["config"],
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_cli_drives_the_pinned_maps_across_processes(labcfg, files):
    first, last = 20_000, 20_499
    try:
        st = _cli(labcfg, files, "A", "--drop-range", f"{first}-{last}")
        assert st["lines"]["A"]["attached"] and not st["lines"]["B"]["attached"]
        assert st["lines"]["A"]["faults"]["drop_range"] == [first, last]
        rx = _publish(
            labcfg, files, lambda: {"A": _cli(labcfg, files, "status")["lines"]["A"]["counters"]}
        )
        b = rx.data("B")
        hit = [s for s, c, _ in b if s <= last and s + c - 1 >= first]
        assert [s for s, _, _ in rx.data("A")] == [s for s, _, _ in b if s not in hit]
        st = _cli(labcfg, files, "status")
        assert st["lines"]["A"]["counters"]["dropped_range"] == len(hit)
        assert st["lines"]["A"]["counters"]["feed"] == len(rx.line("B"))

        st = _cli(labcfg, files, "B:cut=50@60000", "B:loss=25%")  # the simulator's spelling
        assert st["lines"]["B"]["faults"]["cut"]["state"] == "pending"
        assert st["lines"]["B"]["faults"]["loss"] == 0.25
        assert st["lines"]["A"]["faults"]["drop_range"] == [first, last]  # untouched
        st = _cli(labcfg, files, "A", "--drop-all")
        assert st["lines"]["A"]["faults"]["drop_all"]
        assert st["lines"]["A"]["counters"]["dropped_range"] == len(hit)  # kept
        st = _cli(labcfg, files, "clear")
        for letter in "AB":
            f = st["lines"][letter]["faults"]
            assert (f["drop_all"], f["cut"], f["drop_range"], f["loss"]) == (
                False,
                None,
                None,
                None,
            )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "host.cli",
                "lab",
                "fault",
                "--config",
                files["config"],
                "status",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 0 and "line A" in done.stdout and "faults: none" in done.stdout
        assert _cli(labcfg, files, "off") == {"prefix": labcfg.lab.prefix, "detached": ["A", "B"]}
        assert not os.path.exists(faults.pin_dir(labcfg))
        for ifname in ("ex-a", "ex-b"):
            assert "clsact" not in _tc(labcfg, "qdisc", ifname)
    finally:
        faults.remove_all(labcfg)


@pytest.mark.lab
@pytest.mark.needs("bcc", "bpffs")
def test_remove_all_after_the_lab_is_gone(labcfg, files):
    other = private_lab("fgo")
    with built(other):
        faults.attach(other, "B")
        assert os.path.isdir(faults.pin_dir(other))
        lab.down(other.lab)  # as a lab down that does not know about faults would
        st = faults.status(other)
        assert st["pinned"] and not st["lab_up"] and not st["lines"]["B"]["attached"]
        assert "lab not up" in faults.status_text(st)
        assert faults.remove_all(other) == [
            "fault program on line B",
            f"pins in {faults.pin_dir(other)}",
        ]
    assert not os.path.exists(faults.pin_dir(other))
    assert faults.remove_all(other) == []
