"""``tickwire bench book|sim|rx|failover|publish|feed``: ``add_parsers`` declares the verb and its
sub-verbs on ``tickwire``'s verb list; each sub-verb calls its benchmark's typed function
and prints the report (``--json``: the result as JSON)."""

from __future__ import annotations

import argparse
import json
import os

from host.cli import positive, positive_float, verb

EPILOG = """examples:
  tickwire bench book                            5M messages on 100 and on 9,000 stocks
  tickwire bench sim                             publisher rate, 5M messages, private lab
  tickwire bench rx                              AF_XDP vs sockets vs XDP_DROP, latency, jitter,
                                                 event ring on vs off
  tickwire bench failover                        line cut -> other line; gap-fill latency
  tickwire bench publish                         event ring on vs off; publish-to-reader latency
  tickwire bench feed                            the network feed: 1, 10, 100 clients (root)
  tickwire bench recovery                        kill, restart: time to live again (root)
"""
EPILOG_BOOK = """examples:
  tickwire bench book                            5M messages on 100 and on 9,000 stocks
  tickwire bench book --messages 1000000 --json
  tickwire bench book --session 01302019.NASDAQ_ITCH50
"""
EPILOG_SIM = """examples:
  tickwire bench sim                             5M messages, private lab, best of 3
  tickwire bench sim --session s.itch --repeat 5 --json
"""
EPILOG_RX = """examples:
  tickwire bench rx                              both paths, 1 s per step (root)
  tickwire bench rx --modes xdp --duration 2 --json
  tickwire bench rx --sender-core 0 --consumer-core 3
"""
EPILOG_FAILOVER = """examples:
  tickwire bench failover                        AF_XDP, 300,000 messages at 200,000/s (root)
  tickwire bench failover --mode socket --cut-ms 500 --json
"""
EPILOG_PUBLISH = """examples:
  tickwire bench publish                         2M messages offline, best of 5; latency
  tickwire bench publish --messages 100000 --repeat 1 --json
  tickwire bench publish --pace 2000000 --reader-core 1
  tickwire bench publish --lab                   also the appliance, events off vs on (root)
"""
EPILOG_FEED = """examples:
  tickwire bench feed                            200k messages at 50k/s; 1, 10, 100 clients
  tickwire bench feed --clients 1,10 --no-libraries --json
  tickwire bench feed --rate 20000 --mode socket
"""


EPILOG_RECOVERY = """examples:
  tickwire bench recovery                        3 positions x 2 intervals, a baseline
                                                 and a join by the snapshot service
  tickwire bench recovery --positions 0.5 --intervals 1 --json
"""


def _fractions(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated positive numbers ("0.25,0.5")."""
    try:
        out = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers: {text!r}")
    return out


def _counts(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive numbers ("100,9000")."""
    try:
        counts = tuple(positive(x.strip()) for x in text.split(",") if x.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not counts:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}")
    return counts


def add_parsers(sub) -> None:
    from host.bench.publish import PublishOptions
    from host.bench.rx import RxOptions

    be = verb(sub, "bench", "benchmarks, as ratios against a baseline in the same run", EPILOG)
    what = be.add_subparsers(dest="what", metavar="WHAT", required=True)

    bb = verb(what, "book", "decode and decode+book rates against itch-book", EPILOG_BOOK)
    bb.add_argument("--messages", type=positive, default=5_000_000, help="per session (5M)")
    bb.add_argument(
        "--stocks", type=_counts, default=(100, 9000), help="sessions to generate (100,9000)"
    )
    bb.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    bb.add_argument(
        "--repeat", type=positive, default=7, help="rounds, each timing every contender once (7)"
    )
    bb.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    bb.add_argument("--json", action="store_true", help="machine-readable output")
    bb.set_defaults(func=_book)

    bs = verb(what, "sim", "publisher rate (both lines) against per-packet sends", EPILOG_SIM)
    bs.add_argument("--messages", type=positive, default=5_000_000, help="session size (5M)")
    bs.add_argument("--stocks", type=positive, default=100, help="stocks (100)")
    bs.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    bs.add_argument("--repeat", type=positive, default=3, help="timed runs, best kept (3)")
    bs.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    bs.add_argument("--json", action="store_true", help="machine-readable output")
    bs.set_defaults(func=_sim)

    d = RxOptions()
    br = verb(
        what,
        "rx",
        "receive path: AF_XDP and kernel sockets against the XDP_DROP ceiling (private lab, root)",
        EPILOG_RX,
    )
    br.add_argument(
        "--duration", type=positive_float, default=d.duration, help="seconds per step (1)"
    )
    br.add_argument(
        "--steps", type=int, default=d.steps, help="bisection steps per loss-free search (6)"
    )
    br.add_argument(
        "--latency-rate",
        type=positive_float,
        default=d.latency_rate,
        help="packets/s of the latency phases (100000)",
    )
    br.add_argument(
        "--latency-seconds",
        type=positive_float,
        default=d.latency_seconds,
        help="seconds per latency phase (2)",
    )
    br.add_argument(
        "--jitter-seconds",
        type=positive_float,
        default=d.jitter_seconds,
        help="jitter probe length (2)",
    )
    br.add_argument(
        "--sender-core", type=int, default=d.sender_core, help="CPU of the packet generator (0)"
    )
    br.add_argument(
        "--consumer-core",
        type=int,
        default=d.consumer_core,
        help="CPU of the consumer and the jitter probe (-1: last)",
    )
    br.add_argument("--modes", default=d.modes, help="paths to measure (xdp,socket)")
    br.add_argument("--prefix", help="lab prefix (tbrx<pid>)")
    br.add_argument(
        "--publish-messages",
        type=int,
        default=d.publish_messages,
        help="event ring phase: session size (500000; 0: skip)",
    )
    br.add_argument("--json", action="store_true", help="machine-readable output")
    br.set_defaults(func=_rx)

    bf = verb(
        what,
        "failover",
        "line cut -> other line, and gap-fill latency (private lab, root)",
        EPILOG_FAILOVER,
    )
    bf.add_argument("--messages", type=positive, default=300_000, help="session size (300000)")
    bf.add_argument("--rate", type=positive, default=200_000, help="msgs/s published (200000)")
    bf.add_argument("--cut-ms", type=positive_float, default=200.0, help="line A cut (200)")
    bf.add_argument("--mode", choices=["xdp", "socket"], default="xdp", help="receive path")
    bf.add_argument("--json", action="store_true", help="machine-readable output")
    bf.set_defaults(func=_failover)

    p = PublishOptions()
    bp = verb(
        what,
        "publish",
        "consumer messages/s with the event ring on vs off; publish-to-reader latency",
        EPILOG_PUBLISH,
    )
    bp.add_argument("--messages", type=positive, default=p.messages, help="session size (2M)")
    bp.add_argument("--stocks", type=positive, default=p.stocks, help="stocks (100)")
    bp.add_argument("--seed", type=int, default=p.seed, help="generator seed (1)")
    bp.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    bp.add_argument(
        "--repeat", type=positive, default=p.repeat, help="rounds, each timing off, on, order (5)"
    )
    bp.add_argument(
        "--slots", type=positive, default=p.slots, help="ring slots, on and order (run's: 262144)"
    )
    bp.add_argument(
        "--pace", type=positive_float, default=p.pace, help="latency phase msgs/s (1000000)"
    )
    bp.add_argument(
        "--producer-core", type=int, default=p.producer_core, help="CPU of the producer (0)"
    )
    bp.add_argument(
        "--reader-core", type=int, default=p.reader_core, help="CPU of the reader (-1: last)"
    )
    bp.add_argument("--no-latency", action="store_true", help="skip the publish-to-reader phase")
    bp.add_argument(
        "--lab", action="store_true", help="also the appliance in a private lab, events off/on"
    )
    bp.add_argument(
        "--lab-mode", choices=["xdp", "socket"], default=p.lab_mode, help="lab receive path (xdp)"
    )
    bp.add_argument(
        "--lab-rate",
        type=int,
        default=p.lab_rate,
        help="lab sim msgs/s (2000000; 0: as fast as it can)",
    )
    bp.add_argument("--prefix", help="lab prefix (tbp<pid>)")
    bp.add_argument("--json", action="store_true", help="machine-readable output")
    bp.set_defaults(func=_publish)

    from host.bench.feed import FeedBenchOptions

    f = FeedBenchOptions()
    bf = verb(
        what,
        "feed",
        "tickwire serve under 1, 10, 100 clients: events/s out, ring-to-client latency",
        EPILOG_FEED,
    )
    bf.add_argument("--messages", type=positive, default=f.messages, help="session size (200k)")
    bf.add_argument("--stocks", type=positive, default=f.stocks, help="stocks (100)")
    bf.add_argument("--seed", type=int, default=f.seed, help="generator seed (1)")
    bf.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    bf.add_argument("--rate", type=positive, default=f.rate, help="sim msgs/s (50000)")
    bf.add_argument(
        "--clients", type=_counts, default=f.clients, help="client counts, one run each (1,10,100)"
    )
    bf.add_argument(
        "--stall-with", type=positive, default=f.stall_with, help="clients beside the stalled (10)"
    )
    bf.add_argument("--mode", choices=["xdp", "socket"], default=f.mode, help="receive path")
    bf.add_argument(
        "--consumer-core", type=int, default=f.consumer_core, help="consumer's CPU (-1: last)"
    )
    bf.add_argument(
        "--no-libraries", action="store_true", help="skip the picows vs websockets fan-out"
    )
    bf.add_argument(
        "--lib-rate", type=positive, default=f.lib_rate, help="fan-out events/s a client (20000)"
    )
    bf.add_argument("--prefix", help="lab prefix (tbf<pid>)")
    bf.add_argument("--json", action="store_true", help="machine-readable output")
    bf.set_defaults(func=_feed)

    from host.bench.recovery import RecoveryBenchOptions

    r = RecoveryBenchOptions()
    br = verb(
        what,
        "recovery",
        "SIGKILL the consumer, restart: time to live against session position and snapshots",
        EPILOG_RECOVERY,
    )
    br.add_argument("--messages", type=positive, default=r.messages, help="session (300k)")
    br.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    br.add_argument("--rate", type=positive, default=r.rate, help="sim msgs/s (50000)")
    br.add_argument(
        "--positions",
        type=_fractions,
        default=r.positions,
        help="where to kill, fractions of the session (0.25,0.5,0.75)",
    )
    br.add_argument(
        "--intervals",
        type=_fractions,
        default=r.intervals,
        help="snapshot intervals, s (0.5,2)",
    )
    br.add_argument("--no-baseline", action="store_true", help="skip the restart from nothing")
    br.add_argument(
        "--no-glimpse", action="store_true", help="skip the restart that joins by the spin"
    )
    br.add_argument("--mode", choices=["xdp", "socket"], default=r.mode, help="receive path")
    br.add_argument("--prefix", help="lab prefix (tbr<pid>)")
    br.add_argument("--json", action="store_true", help="machine-readable output")
    br.set_defaults(func=_recovery)


def _book(args: argparse.Namespace) -> int:
    from host.bench import book

    results = book.bench_book(
        args.session, args.messages, args.stocks, args.repeat, args.seed, print_rows=not args.json
    )
    if args.json:
        print(json.dumps({"bench": "book", "cpu": os.cpu_count(), "results": results}, indent=2))
    return 0


def _sim(args: argparse.Namespace) -> int:
    from host.bench import sim

    r = sim.bench_sim(args.session, args.messages, args.stocks, args.repeat, args.seed)
    print(
        json.dumps({"bench": "sim", "cpu": os.cpu_count(), "result": r}, indent=2)
        if args.json
        else sim.sim_text(r)
    )
    return 0


def _rx(args: argparse.Namespace) -> int:
    from host.bench import rx

    r = rx.bench_rx(
        rx.RxOptions(
            duration=args.duration,
            steps=args.steps,
            latency_rate=args.latency_rate,
            latency_seconds=args.latency_seconds,
            jitter_seconds=args.jitter_seconds,
            sender_core=args.sender_core,
            consumer_core=args.consumer_core,
            modes=args.modes,
            prefix=args.prefix,
            publish_messages=args.publish_messages,
        )
    )
    print(
        json.dumps({"bench": "rx", "result": r}, indent=2) if args.json else rx.rx_text(r),
        flush=True,
    )
    return 0


def _failover(args: argparse.Namespace) -> int:
    from host.bench import failover

    r = failover.bench_failover(args.messages, args.rate, args.cut_ms, args.mode)
    print(json.dumps({"bench": "failover", "result": r}) if args.json else failover.text(r))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from host.bench import publish

    r = publish.bench_publish(
        publish.PublishOptions(
            messages=args.messages,
            stocks=args.stocks,
            seed=args.seed,
            session=args.session,
            repeat=args.repeat,
            slots=args.slots,
            pace=args.pace,
            producer_core=args.producer_core,
            reader_core=args.reader_core,
            latency=not args.no_latency,
            lab=args.lab,
            lab_mode=args.lab_mode,
            lab_rate=args.lab_rate,
            prefix=args.prefix,
        )
    )
    print(
        json.dumps({"bench": "publish", "result": r}, indent=2)
        if args.json
        else publish.publish_text(r),
        flush=True,
    )
    return 0


def _feed(args: argparse.Namespace) -> int:
    from host.bench import feed

    r = feed.bench_feed(
        feed.FeedBenchOptions(
            messages=args.messages,
            stocks=args.stocks,
            seed=args.seed,
            session=args.session,
            rate=args.rate,
            clients=args.clients,
            stall_with=args.stall_with,
            mode=args.mode,
            consumer_core=args.consumer_core,
            libraries=not args.no_libraries,
            lib_rate=args.lib_rate,
            prefix=args.prefix,
        )
    )
    print(
        json.dumps({"bench": "feed", "result": r}, indent=2) if args.json else feed.feed_text(r),
        flush=True,
    )
    return 0


def _recovery(args: argparse.Namespace) -> int:
    from host.bench import recovery

    r = recovery.bench_recovery(
        recovery.RecoveryBenchOptions(
            messages=args.messages,
            session=args.session,
            rate=args.rate,
            positions=args.positions,
            intervals=args.intervals,
            baseline=not args.no_baseline,
            glimpse=not args.no_glimpse,
            mode=args.mode,
            prefix=args.prefix,
        )
    )
    print(
        json.dumps({"bench": "recovery", "result": r}, indent=2)
        if args.json
        else recovery.recovery_text(r),
        flush=True,
    )
    return 0
