"""``tickwire bench recovery``: how long a restart takes to be live again, against where in
the session the consumer died and how often it takes snapshots (issue 18 §3). Root; a
private lab; nothing asserted, everything reported.

For each snapshot interval and each kill position: the real appliance (``tickwire run
--lab --until-eos`` with ``[journal]`` and ``[snapshot] interval_s`` on, fresh directories)
takes a session ``tickwire sim`` publishes at ``rate`` (end-of-session heartbeats kept up
long after, as an exchange's feed keeps going); once ``position`` of it is taken, the
consumer is SIGKILLed; ``tickwire run`` then exits 1 and is started again at once (as
systemd would). Reported, from the second start:

- ``running_s``: until its consumer runs -- process start, snapshot load, journal replay
  (``restored``: the snapshot's sequence and the journal messages after it), compile or
  cache load;
- ``live_s``: until it has caught up with the feed (its next sequence at or past the
  highest one the feed announced, the messages sent while it was down recovered from the
  re-request server) -- the restart-to-live time;
- ``down_s``: from the kill to live;
- and that it ended with ``tickwire book``'s digest, every message taken once.

The baseline in the same run is a restart with nothing to restore (journal and snapshots
off): everything from sequence 1 comes from the re-request server. With ``glimpse`` (the
default) one more restart has nothing to restore but the simulator's snapshot service: it
joins by the spin (``tickwire run``'s late join). Every run's ``recovery_slo_ms`` is 60 s,
so the re-request server's answers are measured, not cut off by the default 2 s SLO.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dataplane import shm
from dataplane.book import Book
from host.bench.publish import BenchError, stop_procs

ROOT = Path(__file__).resolve().parents[2]
GLIMPSE_PORT = 26600  # the snapshot service's, in the bench's own lab namespaces


@dataclasses.dataclass(frozen=True)
class RecoveryBenchOptions:
    messages: int = 300_000
    stocks: int = 100
    seed: int = 1
    session: str | None = None
    rate: int = 50_000
    positions: tuple[float, ...] = (0.25, 0.5, 0.75)
    intervals: tuple[float, ...] = (0.5, 2.0)
    baseline: bool = True
    glimpse: bool = True
    mode: str = "socket"
    prefix: str | None = None


def say(msg: str) -> None:
    print(f"bench recovery: {msg}", file=sys.stderr, flush=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", *args]


def _run(cfg: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        _cli("run", "--config", str(cfg), "--lab", "--mode", mode, "--json", "--until-eos"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _one(
    o: RecoveryBenchOptions, lab_prefix: str, session: Path, n: int, pos: float, interval, tmp
):
    """One kill and restart; ``interval`` None: the baseline (nothing to restore), "spin":
    nothing to restore but the snapshot service."""
    from host.appliance import runner

    tag = {None: "base", "spin": "spin"}.get(interval) or f"{interval:g}".replace(".", "p")
    channel = f"{lab_prefix}r{tag}{int(pos * 100)}"
    cfg = tmp / f"{channel}.toml"
    text = f'[lab]\nprefix = "{lab_prefix}"\n'
    # the first run begins with the session, before the simulator and its service are up:
    # only the simulator and the restart are told of the snapshot service
    first_cfg = tmp / f"{channel}-first.toml"
    if interval == "spin":
        text += f"glimpse_port = {GLIMPSE_PORT}\n"
    text += f'[run]\nchannel = "{channel}"\nmetrics = ""\nrecovery_slo_ms = 60000\n'
    if isinstance(interval, float):
        text += f'[journal]\nenabled = true\ndir = "{tmp / "j"}"\nsync = "none"\n'
        text += f'[snapshot]\nenabled = true\ndir = "{tmp / "s"}"\ninterval_s = {interval}\n'
    cfg.write_text(text)
    first_cfg.write_text(text.replace(f"glimpse_port = {GLIMPSE_PORT}\n", ""))
    shm.remove(channel)
    first = second = sim = None
    try:
        first = _run(first_cfg, o.mode)
        reader = runner.wait_consumer(channel, first, timeout=620)
        sim = subprocess.Popen(
            _cli("sim", "--config", str(cfg), "--session", str(session))
            + ["--rate", str(o.rate), "--eos-for", "600", "--heartbeat", "0.05", "--json"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        c = reader.m["counters"]
        deadline = time.monotonic() + 600
        while int(c[shm.A_TAKEN]) < pos * n:
            if first.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the first run ended early: {first.stderr.read()[-300:]}")
            time.sleep(0.001)
        killed_at_seq = int(c[shm.A_NEXT]) - 1
        os.kill(int(c[shm.S_PID]), signal.SIGKILL)
        t_kill = time.monotonic()
        first.communicate(timeout=120)
        t0 = time.monotonic()
        second = _run(cfg, o.mode)
        reader = runner.wait_consumer(channel, second, timeout=620)
        t_running = time.monotonic()
        c = reader.m["counters"]
        while not (c[shm.A_ANNOUNCED] and c[shm.A_NEXT] >= c[shm.A_ANNOUNCED]):
            if second.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.0005)
        t_live = time.monotonic()
        out, err = second.communicate(timeout=600)
        if second.returncode != 0:
            raise BenchError(f"the restarted run failed: {err.strip()[-300:]}")
    finally:
        stop_procs(sim, second, first)
        shm.remove(channel)
    s = json.loads(out)
    start = s.get("start") or {}
    r = start.get("restored") or {}
    return {
        "interval_s": interval if isinstance(interval, float) else None,
        "began": start.get("began", "empty"),
        "began_seq": start.get("seq", 0),
        "join_s": (start.get("join") or {}).get("spin_seconds"),
        "position": pos,
        "killed_at_seq": killed_at_seq,
        "snapshot_seq": r.get("snapshot_seq"),
        "journal_messages": r.get("journal_messages", 0),
        "restore_s": start.get("seconds") if r else None,
        "running_s": t_running - t0,
        "live_s": t_live - t0,
        "down_s": t_live - t_kill,
        "recovered": s.get("lines", {}).get("recovery", {}).get("first"),
        "taken": s.get("taken"),
        "next_seq": s.get("next_seq"),
        "unrecoverable_messages": s.get("unrecoverable_messages"),
        "digest": s.get("digest"),
    }


def bench_recovery(o: RecoveryBenchOptions = RecoveryBenchOptions()) -> dict:
    from host import config
    from host.bench.book import cache_dir, generated_session
    from host.exchange import lab

    if os.geteuid() != 0:
        raise PermissionError("tickwire bench recovery builds a lab and runs the appliance: root")
    if not all(0 < p < 1 for p in o.positions):
        raise ValueError(f"--positions {o.positions}: each between 0 and 1")
    if o.session:
        session = Path(o.session)
    else:
        generated_session(o.messages, o.stocks, o.seed)
        session = cache_dir() / f"session-{o.messages}-{o.stocks}-{o.seed}.itch"
    buf = np.fromfile(session, np.uint8)
    ref = Book()
    ref.feed(buf)
    n = _count(buf)
    prefix = o.prefix or f"tbr{os.getpid() % 100000:05d}"
    cfg = config.with_lab(prefix=prefix)
    t0 = time.monotonic()
    runs = []
    plan = [(None, p) for p in (o.positions[:1] if o.baseline else ())]
    plan += [("spin", p) for p in (o.positions[:1] if o.glimpse else ())]
    plan += [(float(i), p) for i in o.intervals for p in o.positions]
    say(f"lab {prefix}: {n:,} messages at {o.rate:,} msgs/s, {len(plan)} kills and restarts")
    lab.up(cfg.lab)
    try:
        with tempfile.TemporaryDirectory(prefix="tw-benchrec-") as tmp:
            for interval, pos in plan:
                r = _one(o, prefix, session, n, pos, interval, Path(tmp))
                runs.append(r)
                say("  " + _line(r))
    finally:
        lab.down(cfg.lab)
    return {
        "messages": n,
        "rate": o.rate,
        "mode": o.mode,
        "digest": ref.digest(),
        "runs": runs,
        # exact: the book's digest, every sequence taken (a join's from its spin on)
        "all_exact": all(
            r["digest"] == ref.digest()
            and r["next_seq"] == n + 1
            and r["unrecoverable_messages"] == 0
            for r in runs
        ),
        "seconds": time.monotonic() - t0,
    }


def _count(buf: np.ndarray) -> int:
    from dataplane import moldudp64 as mold

    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    k, bad = mold.index_messages(buf, offsets)
    if bad >= 0:
        raise ValueError(f"session truncated at byte {bad}")
    return int(k)


def _line(r: dict) -> str:
    if r["began"] == "joined":
        what = f"joined by the spin at {r['began_seq']:,} (spin {r['join_s'] or 0:.2f} s)"
    elif r["interval_s"] is None:
        what = "nothing to restore: all from the re-request server"
    else:
        what = (
            f"snapshots every {r['interval_s']:g} s: restored {r['snapshot_seq'] or 0:,} "
            f"+ {r['journal_messages']:,} journal in {r['restore_s'] or 0:.2f} s"
        )
    return (
        f"killed at {100 * r['position']:.0f} % (seq {r['killed_at_seq']:,}), {what}; "
        f"running {r['running_s']:.2f} s, live {r['live_s']:.2f} s after the restart "
        f"({r['down_s']:.2f} s down), {r['recovered'] or 0:,} recovered"
    )


def recovery_text(r: dict) -> str:
    lines = [f"{r['messages']:,} messages at {r['rate']:,} msgs/s, {r['mode']} mode:"]
    lines += ["  " + _line(x) for x in r["runs"]]
    lines.append(
        f"  every restart ended with tickwire book's digest, each message once: "
        f"{'yes' if r['all_exact'] else 'NO'} ({r['seconds']:.0f} s in all)"
    )
    return "\n".join(lines)
