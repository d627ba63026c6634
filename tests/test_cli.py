"""`tickwire book` end to end on generated sessions it has never seen, against two
independent references (the dict model in tests/reference.py and the itch-book C++ book),
plus the command's error paths; and the CLI itself: every verb and sub-verb has --help with
an example, SIGTERM/SIGINT become a stop request."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from host import cli, signals
from host.appliance import replay
from host.exchange import itchgen
from tests.reference import ReferenceBook, frames

SESSIONS = [(120_000, 50, 11), (80_000, 2_000, 12)]


def tickwire(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=600
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module", params=SESSIONS, ids=lambda p: f"{p[0]}msgs-{p[1]}stocks")
def session(request, tmp_path_factory):
    n, stocks, seed = request.param
    path = tmp_path_factory.mktemp("sessions") / f"s{seed}.itch"
    itchgen.write_session(str(path), n, stocks, seed)
    return path


def test_book_json_matches_the_reference_model(session):
    doc = json.loads(tickwire("book", str(session)).stdout)
    ref = ReferenceBook().replay(session.read_bytes())
    assert doc["messages"] == ref.counters["messages"]
    assert doc["digest"] == ref.digest()
    assert doc["stocks"] == ref.stocks()
    assert set(doc) >= {"messages", "seconds", "msgs_per_s", "digest", "stocks"}
    assert doc["msgs_per_s"] > 0 and doc["seconds"] > 0
    assert all(v == 0 for v in doc["counters"].values())


def test_book_bbo_matches_itch_book(session):
    itch_book = pytest.importorskip("itch_book", reason="itch-book (bench extra) not installed")
    buf = np.fromfile(session, np.uint8)
    s = itch_book.Session(tables=["bbo"], depth=0, symbols=[])
    s.feed(buf)
    rows = s.take_bbo()
    cols = [rows[k].tolist() for k in ("locate", "bid_px", "bid_sz", "ask_px", "ask_sz")]
    theirs = {loc: bbo for loc, *bbo in zip(*cols, strict=True)}  # last row per locate wins
    book, _ = replay.replay_file(str(session))
    assert len(theirs) > 10
    for locate, bbo in theirs.items():
        assert book.bbo(locate) == tuple(bbo), locate
    assert s.stats()["live_orders"] == book.live_orders


def test_invariants_hold_and_no_book_is_crossed(session):
    book, result = replay.replay_file(str(session))
    assert book.check(allow_crossed=False) is None
    assert result.messages == len(list(frames(session.read_bytes())))


def test_summary_is_short_and_human(session):
    out = tickwire("book", str(session), "--summary").stdout
    assert "M msg/s" in out and "top of book" in out and "digest" in out
    assert len(out.splitlines()) <= 12


def test_missing_file_is_one_clear_line(tmp_path):
    done = tickwire("book", str(tmp_path / "nope.itch"), check=False)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"tickwire: no such file: {tmp_path / 'nope.itch'}"]


def test_truncated_file_reports_the_offset(session, tmp_path):
    data = session.read_bytes()
    cut = tmp_path / "cut.itch"
    cut.write_bytes(data[: len(data) - 5])
    done = tickwire("book", str(cut), check=False)
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    last = 0
    for pos, _ in frames(data):
        last = pos
    assert f"byte offset {last}" in line and "truncated" in line


def test_empty_file_is_an_empty_session(tmp_path):
    empty = tmp_path / "empty.itch"
    empty.write_bytes(b"")
    doc = json.loads(tickwire("book", str(empty)).stdout)
    assert doc["messages"] == 0 and doc["stocks"] == {}


def _verbs(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``parser``'s own path, then every verb and sub-verb under it, as their words."""
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _verbs(sub, (*path, name))


def test_every_verb_and_sub_verb_has_help_with_an_example(capsys):
    paths = list(_verbs(cli.build_parser()))
    assert {("run",), ("lab", "fault"), ("bench", "failover"), ("calibrate",)} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as e:
            cli.main([*path, "--help"])
        assert e.value.code == 0, path
        out = capsys.readouterr().out
        words = " ".join(("tickwire", *path))
        assert out.startswith(f"usage: {words} "), path
        examples = out[out.index("examples") :]
        assert re.search(rf"^  (\S+=\S+ )?{re.escape(words)}\b", examples, re.M), path


def test_help_from_the_entry_point():
    assert tickwire("--help").stdout.startswith("usage: tickwire ")


def test_signals_call_stop_inside_the_block_only():
    calls = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with signals.stopping(lambda: calls.append("stop")):
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        with signals.stopping(lambda: calls.append("inner")):  # over another handler
            signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
    assert calls == ["stop", "stop", "inner", "stop"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_fork_inside_the_block_dies_of_the_signal_instead_of_calling_stop():
    """pyroute2 forks helpers to create namespaces; one signalled must not run the owner's
    stop() (which raised in the child and ran the rest of a test session twice)."""
    import os

    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    with signals.stopping(lambda: os.write(w, b"stop")):
        pid = os.fork()
        if pid == 0:  # the child: say it runs (a signal before that is lost), then wait
            os.write(ready_w, b"r")
            signal.pause()
            os._exit(3)  # a handler ran and returned: what the old stopping() did
        assert os.read(ready_r, 1) == b"r"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    for fd in (w, ready_r, ready_w):
        os.close(fd)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert os.read(r, 16) == b""  # the owner's stop() never ran, in either process
    os.close(r)


def test_lab_fault_takes_its_line_after_the_options():
    args = cli.build_parser().parse_args(["lab", "fault", "--cut", "200@50", "A", "--json"])
    assert (args.fault_args, args.cut, args.json) == (["A"], (200.0, 50.0), True)
    with pytest.raises(SystemExit):  # fault options belong to lab fault only
        cli.build_parser().parse_args(["lab", "up", "--cut", "200"])


def test_gen_then_book_round_trip(tmp_path):
    out = tmp_path / "g.itch"
    info = json.loads(
        tickwire(
            "gen", str(out), "--messages", "5000", "--stocks", "20", "--seed", "3", "--json"
        ).stdout
    )
    assert info["messages"] == 5000 and out.stat().st_size == info["bytes"]
    doc = json.loads(tickwire("book", str(out)).stdout)
    assert doc["messages"] == 5000
    assert doc["digest"] == ReferenceBook().replay(out.read_bytes()).digest()


def test_bad_arguments_are_one_line(tmp_path):
    done = tickwire("gen", str(tmp_path / "x"), "--messages", "10", check=False)
    assert done.returncode != 0 and "n_messages" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")
