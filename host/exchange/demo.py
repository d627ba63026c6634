"""`make demo`: the whole appliance, end to end, on this machine.

Lab up -> the appliance runs in the lab's appliance namespace (AF_XDP when it can attach
XDP, else kernel sockets, said once) -> the simulator publishes a generated session on
lines A and B -> the appliance's books must end with the same digest as ``tickwire book``
on the same file, and so must a local client (``tickwire tail --snapshot --until-eos
--digest``) that joins a third of the way in and rebuilds the levels from a snapshot and the
event ring -> a human summary -> lab down, whatever happened.

Without root (no namespaces) it says so and runs the offline part only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dataplane import shm
from host import config
from host.appliance import replay
from host.appliance import runner as appliance
from host.exchange import itchgen, lab

MESSAGES = 2_000_000
STOCKS = 100
SEED = 1
RATE = 1_000_000
PREFIX = "twdemo"
CHANNEL = "demo"
STEPS = 6


def _step(n: int, text: str) -> None:
    print(f"[{n}/{STEPS}] {text}", flush=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", *args]


def _pin(cpu: int):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def main() -> int:
    root = Path(__file__).resolve().parents[2]  # the repository: host/exchange/demo.py
    out = root / "out"
    out.mkdir(exist_ok=True)
    session = out / f"demo-{MESSAGES}-{STOCKS}-{SEED}.itch"
    if session.exists():
        _step(1, f"session {session.name} already generated")
    else:
        _step(1, f"generating {MESSAGES:,} ITCH 5.0 messages on {STOCKS} stocks (seed {SEED})")
        t0 = time.perf_counter()
        info = itchgen.write_session(str(session), MESSAGES, STOCKS, SEED)
        print(
            f"      {info['bytes'] / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s "
            f"-> {session.relative_to(root)}"
        )
    _step(2, "offline reference: decode and build every book (tickwire book)")
    book, res = replay.replay_file(str(session), progress=replay.terminal_progress("book"))
    result = replay.result_json(book, res)
    print(
        f"      {result['messages']:,} messages at {result['msgs_per_s'] / 1e6:.1f}M msgs/s, "
        f"digest {result['digest'][:16]}…"
    )
    if os.geteuid() != 0:
        print(
            "the live pipeline needs root (network namespaces, XDP): run `sudo make demo`;"
            " stopping after the offline part"
        )
        return 0
    cfg_path = out / "demo.toml"
    cfg_path.write_text(
        f'[lab]\nprefix = "{PREFIX}"\n[run]\nchannel = "{CHANNEL}"\n'
        f'metrics = "127.0.0.1:9108"\ncore = {_last_cpu()}\n'
    )
    cfg = config.load(cfg_path)
    _step(3, f"lab up: namespaces {cfg.lab.exchange_ns} and {cfg.lab.appliance_ns}, lines A and B")
    lab.up(cfg.lab)
    app = sim = client = None
    shm.remove(CHANNEL)  # a stale "running" flag from an earlier run must not fool us
    try:
        _step(4, "appliance: tickwire run (AF_XDP if XDP attaches, else kernel sockets)")
        app = subprocess.Popen(
            _cli("run", "--config", str(cfg_path), "--lab", "--until-eos", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        appliance.wait_consumer(CHANNEL, app)
        client = _local_client()
        client.stderr.readline()  # "ready" (its code warm), or nothing if it failed
        _step(
            5,
            f"simulator: {MESSAGES:,} messages on A and B at {RATE:,} msgs/s; a local client"
            " (tickwire tail) joins a third of the way in",
        )
        sim = subprocess.Popen(
            _cli(
                "sim",
                "--config",
                str(cfg_path),
                "--session",
                str(session),
                "--rate",
                str(RATE),
                "--eos-for",
                "1",
                "--json",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_pin(0),
        )
        sim_out, sim_err = sim.communicate(timeout=300)
        if sim.returncode != 0:
            print(f"simulator failed: {sim_err.strip()}")
            return 1
        sim_s = json.loads(sim_out)
        tail_s = _client_result(client)
        stdout, stderr = app.communicate(timeout=300)
        if app.returncode != 0:
            print(f"appliance failed: {stderr.strip()}")
            return 1
        s = json.loads(stdout)
        for line in stderr.splitlines():
            print(f"      {line}")
        _step(6, "summary")
        ok = _summary(s, sim_s, result, book, tail_s)
    finally:
        for proc in (app, sim, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        lab.down(cfg.lab)
        shm.remove(CHANNEL)
        print(f"      lab {PREFIX} and the demo's shared memory removed")
    return 0 if ok else 1


def _local_client() -> subprocess.Popen:
    """A local client that gets ready, snapshots the book once a third of the session is
    taken, follows the event ring to the end of session and prints the digest of the levels
    it rebuilt (``tickwire tail --snapshot --until-eos --digest --after N``)."""
    after = str(MESSAGES // 3)
    return subprocess.Popen(
        _cli(
            "tail", "--channel", CHANNEL, "--snapshot", "--until-eos", "--digest", "--after", after
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_pin(0),
    )


def _client_result(client: subprocess.Popen | None) -> dict | None:
    if client is None:
        return None
    out, err = client.communicate(timeout=120)
    if client.returncode != 0:
        print(f"      local client failed: {err.strip()}")
        return None
    return json.loads(out)


def _last_cpu() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1] if len(cpus) > 1 else -1


def _summary(s: dict, sim_s: dict, ref: dict, book, client: dict | None) -> bool:
    secs = sim_s["seconds"]
    print(f"  receive path      {s['mode']}")
    print(
        f"  messages          {s['taken']:,} taken of {sim_s['last_seq']:,} published, "
        f"{s['taken'] / secs / 1e6:.2f}M msgs/s over {secs:.1f} s"
    )
    recovered = s["lines"]["recovery"]["first"]
    print(
        f"  gaps              {s['gaps_declared']:,} declared, {recovered:,} messages "
        f"recovered, {s['unrecoverable_messages']:,} unrecoverable"
        + ("  BOOKS STALE" if s["stale"] else "")
    )
    for letter, ln in s["lines"].items():
        if letter == "recovery":
            continue
        print(
            f"  line {letter}            {ln['packets']:,} packets, {ln['first']:,} messages "
            f"first, {ln['duplicates']:,} duplicates dropped, {ln['malformed']} malformed"
        )
    lat = s["latency_ns"]
    if lat.get("count"):
        what = "XDP stamp" if s["mode"] == "xdp" else "kernel's receive stamp"
        print(
            f"  receive -> book   p50 {lat['p50'] / 1e3:.1f} us  p99 {lat['p99'] / 1e3:.1f} us"
            f"  p99.9 {lat['p99.9'] / 1e3:.1f} us  (from the {what}, "
            f"{lat['count']:,} packets)"
        )
    reader = shm.Reader(CHANNEL)
    stocks = book.stocks_summary()
    busiest = sorted(stocks.items(), key=lambda kv: -kv[1]["orders"])[:5]
    print("  top of book       symbol     bid            ask")
    for loc, info in busiest:
        bp, bq, ap, aq = reader.bbo(int(loc))
        print(
            f"                    {info['symbol']:<8} {bq:>6} @ {bp / 1e4:<10.4f} "
            f"{aq:>6} @ {ap / 1e4:.4f}"
        )
    same = s.get("digest") == ref["digest"]
    print(
        f"  books             digest {s.get('digest', '?')[:16]}… "
        + (
            "== tickwire book: every level identical"
            if same
            else f"!= tickwire book {ref['digest'][:16]}…: BOOKS DIFFER"
        )
    )
    client_ok = client is not None and client["digest"] == ref["digest"]
    if client is None:
        print("  local client      did not finish: NO DIGEST")
    else:
        print(
            f"  local client      joined at seq {client['snapshot_seq']:,}, read "
            f"{client['events']:,} events, lapped {client['lapped']}, digest "
            f"{client['digest'][:16]}… "
            + ("== tickwire book" if client_ok else "!= tickwire book: CLIENT DIFFERS")
        )
    return same and client_ok and s["taken"] == sim_s["last_seq"]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, RuntimeError) as e:
        print(f"demo: {e}", file=sys.stderr)
        sys.exit(1)
