"""``tickwire bench feed``: the network feed (``tickwire serve``) under 1, 10 and 100
remote clients in a private lab (root). Nothing here asserts; it measures and reports.

Each run is the real appliance in the lab: ``tickwire run --lab --until-eos`` (events on,
consumer pinned to ``consumer_core``, the last CPU by default), ``tickwire serve --lab`` in
the appliance namespace, and ``host.bench.feedload`` in the exchange namespace holding the
run's clients -- ``N`` WebSocket connections across the lab's line A, each subscribed to the
whole channel (every kind, every symbol), live from where it joined. Then ``tickwire sim``
publishes the session at ``rate`` msgs/s on both lines. The server, the clients and the
simulator share the other CPUs (pinned there, off the consumer's core), as an appliance's
housekeeping cores would.

Per run:

- ``events_per_s``: events delivered to all clients together, from the first one any client
  got to the last (the fan-out's output);
- ring-to-client latency p50/p99/p99.9: each event's publish stamp (the moment the consumer
  put it in the ring) to the moment the client process handed its frame to the listener, on
  the ring's clock (one host: one clock). It includes the server's polling (the pump sleeps
  200 us when the ring is idle), its send, the lab's veth, and the client process's own
  queueing -- with 100 connections in one client process on a shared core, much of the tail
  is the clients';
- the consumer's messages/s (its counters, first message to last, as ``bench publish --lab``)
  and the simulator's achieved rate; gaps declared; the consumer's own receive-to-book p99;
- evictions (the server's metrics, scraped before it stops) and whether every live client
  ended at the end of session with a contiguous stream.

Runs: ``none`` (the server up, no client), each of ``clients``, ``stall_with`` clients plus
one that stops reading (it must be evicted; the others' p99 is compared with the run of
``stall_with`` clients alone: the issue's budget is within 2x), then ``none`` again: the two
``none`` runs' difference is the noise the 100-client run's consumer rate is judged against.

``libraries``: the WebSocket library comparison the feed server's choice rests on -- the same
fan-out (``host.bench.fanout``: one frame a millisecond to every connection, no ring) on
picows and on websockets, both on uvloop, 10 and 100 connections: server CPU per frame sent,
and the clients' latency from the frame's build to its arrival.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from dataplane import moldudp64 as mold
from dataplane import shm
from dataplane.book import Book
from host.bench.publish import BenchError, finish_runs, follow_taken, stop_procs

ROOT = Path(__file__).resolve().parents[2]
STALL_BUDGET = 2.0  # the others' p99 with a stalled client / without it
STALL_TIMEOUT_S = 0.5  # [feed_server] stall_timeout_s: the stalled client goes mid-session
LIBS = ("picows", "websockets")


@dataclasses.dataclass(frozen=True)
class FeedBenchOptions:
    """What ``bench_feed`` measures (``tickwire bench feed``'s options)."""

    messages: int = 200_000
    stocks: int = 100
    seed: int = 1
    session: str | None = None
    rate: int = 50_000  # msgs/s tickwire sim publishes
    clients: tuple[int, ...] = (1, 10, 100)
    stall_with: int = 10  # clients beside the one that stops reading
    mode: str = "xdp"  # the consumer's receive path
    consumer_core: int = -1  # -1: the last CPU
    libraries: bool = True
    lib_clients: tuple[int, ...] = (10, 100)
    lib_rate: int = 20_000  # events/s to each connection in the library comparison
    lib_seconds: float = 3.0
    prefix: str | None = None


def say(msg: str) -> None:
    print(f"bench feed: {msg}", file=sys.stderr, flush=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", *args]


def _in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _pinned(cpus: set[int]):
    return lambda: os.sched_setaffinity(0, cpus)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(ns: str, address: str) -> dict[str, float]:
    """``tickwire_feed_*`` samples of the server's metrics page, fetched inside ``ns``."""
    from prometheus_client.parser import text_string_to_metric_families

    from host import netns

    with netns.entered(ns), urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("tickwire_feed_evictions") and s.name.endswith("_total"):
                out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + s.value
    return out


def _line(p: subprocess.Popen, stream, what: str, timeout: float = 300) -> str:
    """The first line of ``stream`` (a pipe of ``p``), or BenchError when ``p`` ends first."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(0.5):
            got = stream.readline()
            if got:
                return got
        if p.poll() is not None:
            break
    raise BenchError(f"{what} did not start: {p.stderr.read()[-400:] if p.stderr else ''}")


def _run(name: str, n_clients: int, stalled: int, ctx: dict) -> dict:
    """One appliance run with ``n_clients`` (+ ``stalled``) clients attached."""
    from host.appliance import runner

    o: FeedBenchOptions = ctx["o"]
    lc, tmp, channel = ctx["lab"], ctx["tmp"], ctx["channel"]
    port, mport = _free_port(), _free_port()
    cfg = tmp / f"run-{name}.toml"
    cfg.write_text(
        f'[lab]\nprefix = "{ctx["prefix"]}"\n'
        f'[run]\nchannel = "{channel}"\nmetrics = ""\ncore = {ctx["consumer_core"]}\n'
        "events = true\n"
        f'[feed_server]\nport = {port}\nmetrics = "127.0.0.1:{mport}"\n'
        f"stall_timeout_s = {STALL_TIMEOUT_S}\nmax_clients = {max(64, n_clients + stalled)}\n"
    )
    shm.remove(channel)
    others = ctx["others"]
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], pin: bool = True, **kw) -> subprocess.Popen:
        p = subprocess.Popen(
            cmd, cwd=ROOT, text=True, preexec_fn=_pinned(others) if pin else None, **kw
        )
        procs.append(p)
        return p

    err = open(tmp / f"run-{name}.err", "w+")
    try:
        run = start(
            _cli("run", "--config", str(cfg), "--lab", "--mode", o.mode, "--json", "--until-eos"),
            pin=False,  # the consumer pins itself to run.core
            stdout=subprocess.PIPE,
            stderr=err,
        )
        reader = runner.wait_consumer(channel, run, timeout=620)
        serve = start(
            _cli("serve", "--config", str(cfg), "--lab"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _line(serve, serve.stdout, "tickwire serve")
        load = None
        if n_clients + stalled:
            url = f"ws://{lc.line_a.appliance_ip}:{port}/feed?channel={channel}"
            load = start(
                _in_ns(
                    lc.exchange_ns,
                    [sys.executable, "-m", "host.bench.feedload", url]
                    + ["--clients", str(n_clients), "--stalled", str(stalled)]
                    + ["--channel", channel, "--seconds", "600"],
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            _line(load, load.stderr, "the clients")
        sim = start(
            _cli("sim", "--config", str(cfg), "--session", str(ctx["session"]))
            + ["--rate", str(o.rate), "--eos-for", "1", "--heartbeat", "0.05", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        first, last = follow_taken(reader, run, ctx["messages"])
        sim_out, out = finish_runs(sim, run, err)
        clients = None
        if load is not None:
            lout, lerr = load.communicate(timeout=660)
            if load.returncode != 0:
                raise BenchError(f"the clients failed: {lerr.strip()[-400:]}")
            clients = json.loads(lout.strip().splitlines()[-1])
        evictions = _scrape(lc.appliance_ns, f"127.0.0.1:{mport}")
    finally:
        stop_procs(*procs)
        err.close()
        shm.remove(channel)
    summary, s = json.loads(out), json.loads(sim_out)
    seconds = last[0] - first[0] if first and last and last[0] > first[0] else None
    r = {
        "name": name,
        "clients": n_clients,
        "stalled": stalled,
        "consumer_msgs_per_s": (last[1] - first[1]) / seconds if seconds else None,
        "sim_msgs_per_s": s.get("msgs_per_s"),
        "taken": summary.get("taken"),
        "gaps_declared": summary.get("gaps_declared"),
        "consumer_p99_ns": (summary.get("latency_ns") or {}).get("p99"),
        "digest": summary.get("digest"),
        "evictions": {k: int(v) for k, v in evictions.items() if v},
    }
    if clients is not None:
        conns = clients.pop("conns")
        r.update(
            per_client_events=[c["events"] for c in conns if not c["stalled"]],
            events=clients["events"],
            events_per_s=clients["events_per_s"],
            latency_ns=clients["latency_ns"],
            breaks=clients["breaks"],
            ended=clients["ended"],
            stalled_ended=clients["stalled_ended"],
            client_cpu_s=clients["cpu_s"],
        )
    return r


def _libraries(ctx: dict) -> list[dict]:
    o: FeedBenchOptions = ctx["o"]
    lc, out = ctx["lab"], []
    for n in o.lib_clients:
        for lib in LIBS:
            port = _free_port()
            procs: list[subprocess.Popen] = []
            try:
                srv = subprocess.Popen(
                    _in_ns(
                        lc.appliance_ns,
                        [sys.executable, "-m", "host.bench.fanout", "--lib", lib]
                        + ["--port", str(port), "--clients", str(n), "--rate", str(o.lib_rate)]
                        + ["--seconds", str(o.lib_seconds)],
                    ),
                    cwd=ROOT,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    preexec_fn=_pinned({ctx["consumer_core"]}),  # the server has a core
                )
                procs.append(srv)
                _line(srv, srv.stderr, f"the {lib} fan-out")
                load = subprocess.Popen(
                    _in_ns(
                        lc.exchange_ns,
                        [sys.executable, "-m", "host.bench.feedload"]
                        + [f"ws://{lc.line_a.appliance_ip}:{port}/fanout"]
                        + ["--clients", str(n), "--seconds", str(o.lib_seconds + 60)],
                    ),
                    cwd=ROOT,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    preexec_fn=_pinned(ctx["others"]),
                )
                procs.append(load)
                lout, lerr = load.communicate(timeout=o.lib_seconds + 120)
                sout, serr = srv.communicate(timeout=60)
                if load.returncode or srv.returncode:
                    raise BenchError(f"{lib} fan-out failed: {(lerr + serr).strip()[-400:]}")
            finally:
                stop_procs(*procs)
            c = json.loads(lout.strip().splitlines()[-1])
            s = json.loads(sout.strip().splitlines()[-1])
            sent = s["frames"] * n
            out.append(
                {
                    "lib": lib,
                    "clients": n,
                    "events_per_s_each": o.lib_rate,
                    "frames_sent": sent,
                    "server_cpu_s": s["cpu_s"],
                    "server_us_per_frame": 1e6 * s["cpu_s"] / sent if sent else None,
                    "late_ticks": s["late_ticks"],
                    "events_received": c["events"],
                    "events_sent": s["events"] * n,
                    "latency_ns": c["latency_ns"],
                }
            )
            v = out[-1]
            say(
                f"  {lib:<10} {n:>3} clients: {v['server_us_per_frame']:.2f} us server CPU a "
                f"frame, p99 {_t(v['latency_ns']['p99'])}"
            )
    return out


def bench_feed(o: FeedBenchOptions = FeedBenchOptions()) -> dict:
    """The whole benchmark (see the module doc); returns the result dict."""
    from host import config
    from host.bench.book import cache_dir, generated_session
    from host.exchange import lab

    if os.geteuid() != 0:
        raise PermissionError("tickwire bench feed builds a lab and runs the appliance: root")
    if o.mode not in ("xdp", "socket"):
        raise ValueError(f"--mode {o.mode!r}: xdp or socket")
    cpus = sorted(os.sched_getaffinity(0))
    core = cpus[-1] if o.consumer_core < 0 else o.consumer_core
    if core not in cpus:
        raise ValueError(f"--consumer-core {core}: not a CPU this process may use ({cpus})")
    others = set(cpus) - {core} or {core}
    t0 = time.monotonic()
    if o.session:
        session = Path(o.session)
        name = o.session
    else:
        generated_session(o.messages, o.stocks, o.seed)
        session = cache_dir() / f"session-{o.messages}-{o.stocks}-{o.seed}.itch"
        name = f"generated {o.messages:,} msgs / {o.stocks:,} stocks"
    buf = np.fromfile(session, np.uint8)
    offsets = np.zeros(len(buf) // 2 + 2, np.int64)
    messages, bad = mold.index_messages(buf, offsets)
    if bad >= 0 or not messages:
        raise ValueError(f"{session}: not a whole ITCH session (truncated at byte {bad})")
    ref = Book()
    ref.feed(buf)
    prefix = o.prefix or f"tbf{os.getpid() % 100000:05d}"
    cfg = config.with_lab(prefix=prefix)
    plan = [("none", 0, 0)]
    plan += [(str(n), n, 0) for n in sorted({*o.clients, o.stall_with})]
    plan += [(f"{o.stall_with}+stalled", o.stall_with, 1), ("none again", 0, 0)]
    result: dict = {
        "session": name,
        "messages": messages,
        "rate": o.rate,
        "mode": o.mode,
        "machine": {"cpus": os.cpu_count(), "usable": cpus, "kernel": platform.release()},
        "consumer_core": core,
        "other_cores": sorted(others),
        "digest": ref.digest(),
    }
    say(f"lab {prefix}: {name} at {o.rate:,} msgs/s; consumer on core {core}")
    lab.up(cfg.lab)
    try:
        with tempfile.TemporaryDirectory(prefix="tw-benchfeed-") as tmp:
            ctx = {
                "o": o,
                "lab": cfg.lab,
                "tmp": Path(tmp),
                "prefix": prefix,
                "channel": f"{prefix}f",
                "consumer_core": core,
                "others": others,
                "session": session,
                "messages": messages,
            }
            runs = []
            for name_, n, k in plan:
                say(f"run {name_}: {n} clients" + (f" + {k} that stops reading" if k else ""))
                runs.append(_run(name_, n, k, ctx))
                say("  " + _run_line(runs[-1]))
            result["runs"] = runs
            if o.libraries:
                say(f"libraries: picows vs websockets, {o.lib_rate:,} events/s to each client")
                result["libraries"] = _libraries(ctx)
    finally:
        lab.down(cfg.lab)
    result["verdicts"] = _verdicts(result, o)
    result["seconds"] = time.monotonic() - t0
    return result


def _by(runs: list[dict], name: str) -> dict | None:
    return next((r for r in runs if r["name"] == name), None)


def _verdicts(r: dict, o: FeedBenchOptions) -> dict:
    runs = r["runs"]
    v: dict = {}
    alone, stalled = _by(runs, str(o.stall_with)), _by(runs, f"{o.stall_with}+stalled")
    if alone and stalled and alone.get("latency_ns") and stalled.get("latency_ns"):
        a, b = alone["latency_ns"]["p99"], stalled["latency_ns"]["p99"]
        v["stalled_evicted"] = sum(stalled["evictions"].values()) >= 1
        v["p99_with_stalled_vs_without"] = b / a if a and b else None
        v["p99_within_2x"] = None if not (a and b) else b / a <= STALL_BUDGET
        v["others_unharmed"] = stalled.get("ended") == ["end"] and stalled.get("breaks") == 0
    none1, none2 = _by(runs, "none"), _by(runs, "none again")
    most = _by(runs, str(max(o.clients))) if o.clients else None
    if none1 and none2 and most:
        rates = [x["consumer_msgs_per_s"] for x in (none1, none2)]
        if all(rates) and most["consumer_msgs_per_s"]:
            base = sum(rates) / 2
            noise = abs(rates[0] - rates[1]) / base
            ratio = most["consumer_msgs_per_s"] / base
            v["consumer_none_noise"] = noise
            v["consumer_most_vs_none"] = ratio
            v["consumer_within_noise"] = abs(1 - ratio) <= max(noise, 0.01)
    v["same_digest"] = all(x["digest"] == r["digest"] for x in runs)
    v["every_client_ended_whole"] = all(
        x.get("ended", ["end"]) == ["end"] and not x.get("breaks") for x in runs
    )
    return v


# --- text -------------------------------------------------------------------------------------
def _t(ns: float | None) -> str:
    if ns is None:
        return "n/a"
    return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.0f} us"


def _run_line(x: dict) -> str:
    c = x["consumer_msgs_per_s"]
    line = (
        f"consumer {'n/a' if c is None else f'{c / 1e3:,.0f} k'} msgs/s "
        f"(sim {x['sim_msgs_per_s'] / 1e3:,.0f} k), rx->book p99 {_t(x['consumer_p99_ns'])}, "
        f"{x['gaps_declared']} gaps"
    )
    if "events_per_s" in x:
        lat = x["latency_ns"]
        eps = x["events_per_s"]
        line += (
            f"; out {'n/a' if eps is None else f'{eps / 1e3:,.0f} k'} events/s, "
            f"ring->client p50 {_t(lat['p50'])} p99 {_t(lat['p99'])}"
        )
    if x["evictions"]:
        line += "; evicted: " + ", ".join(f"{k} {v}" for k, v in x["evictions"].items())
    return line


def _yes(b) -> str:
    return "n/a" if b is None else ("yes" if b else "NO")


def feed_text(r: dict) -> str:
    """The human report of ``bench_feed``'s result."""
    m = r["machine"]
    lines = [
        f"{r['session']}: {r['messages']:,} messages at {r['rate']:,} msgs/s, {r['mode']}; "
        f"consumer on core {r['consumer_core']}, server + clients + sim on "
        f"{','.join(map(str, r['other_cores']))} ({m['cpus']} CPUs)",
    ]
    for x in r["runs"]:
        lines.append(f"  {x['name']:<12} {_run_line(x)}")
    v = r["verdicts"]
    if "p99_within_2x" in v:
        ratio = v["p99_with_stalled_vs_without"]
        lines.append(
            f"  a client that stops reading: evicted {_yes(v['stalled_evicted'])}; the others' "
            f"p99 {'n/a' if ratio is None else f'{ratio:.2f}x'} of the run without it "
            f"(budget <= {STALL_BUDGET:g}x: {_yes(v['p99_within_2x'])}); others whole: "
            f"{_yes(v['others_unharmed'])}"
        )
    if "consumer_most_vs_none" in v:
        lines.append(
            f"  consumer with the most clients / none: {v['consumer_most_vs_none']:.3f}x "
            f"(none vs none again: {100 * v['consumer_none_noise']:.1f} % apart; within "
            f"noise: {_yes(v['consumer_within_noise'])})"
        )
    lines.append(
        f"  every run's book is tickwire book's: {_yes(v['same_digest'])}; every client "
        f"ended at the end of session, its stream contiguous: "
        f"{_yes(v['every_client_ended_whole'])}"
    )
    if r.get("libraries"):
        lines.append("  WebSocket libraries, the same fan-out (one frame/ms to each client):")
        for x in r["libraries"]:
            lines.append(
                f"    {x['lib']:<10} {x['clients']:>3} clients: server "
                f"{x['server_us_per_frame']:.2f} us CPU/frame, p50 {_t(x['latency_ns']['p50'])} "
                f"p99 {_t(x['latency_ns']['p99'])}, received {x['events_received']:,} of "
                f"{x['events_sent']:,} events"
            )
    lines.append(f"  ({r['seconds']:.0f} s in all)")
    return "\n".join(lines)
