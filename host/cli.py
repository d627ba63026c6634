"""The ``tickwire`` command: one entry point, a verb per job.

Errors raised by the project (``ValueError``/``OSError`` subclasses) become one line on
stderr and a non-zero exit; ``--help`` works on every verb.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from host import netns

EPILOG_BOOK = """examples:
  tickwire book 01302019.NASDAQ_ITCH50          JSON: messages, rate, digest, per-stock BBO
  tickwire book session.itch --summary           short human summary instead of JSON
"""
EPILOG_GEN = """examples:
  tickwire gen session.itch                      1M messages, 100 stocks, seed 1
  tickwire gen big.itch --messages 5000000 --stocks 9000 --seed 7
"""
EPILOG_LAB = """examples:
  tickwire lab up                                namespaces tw-exch and tw-appl, lines A and B
  tickwire lab status --json
  tickwire lab up --prefix t2 --config lab.toml  a second, independent lab
  tickwire lab down                              remove the namespaces (and their veths)
"""
EPILOG_SIM = """examples:
  tickwire lab up && tickwire sim --session s.itch       1M msgs/s on both lines, then EOS
  tickwire sim --generate 2000000 --max --json           as fast as possible, JSON summary
  tickwire sim --session s.itch --speed 100 --start-phase Q
  tickwire sim --session s.itch --fault A:drop=1000-1999 --fault B:cut=50@200 --record r.json
"""
EPILOG_RUN = """examples:
  tickwire run --lab                             AF_XDP in the lab (kernel sockets if no XDP)
  tickwire run --lab --mode socket --until-eos --json
  tickwire run --config /etc/tickwire/tickwire.toml
  tickwire run --lab --skip-preflight            start even if a required stage fails
"""
EPILOG_STATUS = """examples:
  tickwire status                                counters of the running consumer
  tickwire status --netns tw-appl --json
"""
EPILOG_WARM = """examples:
  NUMBA_CACHE_DIR=/var/cache/tickwire/numba tickwire warm --config /etc/tickwire/tickwire.toml
  tickwire warm --lab --json

The cache is per CPU model and per installed Tickwire: Ansible's tickwire role warms it
(as the service user) after every install on a booted host; an image root is not warmed,
so the appliance image's first start compiles (about a minute, logged as it goes).
"""
EPILOG_PREFLIGHT = """examples:
  tickwire preflight --config /etc/tickwire/tickwire.toml    every stage; exit 0 when ready
  tickwire preflight --lab --json                the lab's namespace; runtime checks only
  tickwire preflight --stage nic --stage irq_affinity        just these (they must be OK)

stages: runtime (what run always needs), hugepages, cpu_isolation, irq_affinity, nic,
sysctl, ptp, service -- one Ansible role each; a stage [host] promises nothing for is
SKIPPED. Exit status: 0 ready, 1 a required stage is not OK, 2 usage or config error.
"""
EPILOG_BENCH = """examples:
  tickwire bench book                            5M messages on 100 and on 9,000 stocks
  tickwire bench book --messages 1000000 --json
  tickwire bench book --session 01302019.NASDAQ_ITCH50
  tickwire bench sim                             publisher rate, 5M messages, private lab
  tickwire bench rx                              AF_XDP vs sockets vs XDP_DROP, latency, jitter
  tickwire bench failover                        line cut -> other line; gap-fill latency
"""


def _cmd_book(args: argparse.Namespace) -> int:
    from host.appliance import replay

    book, result = replay.replay_file(args.file, progress=replay.terminal_progress("book"))
    if args.summary:
        print(replay.summary_text(book, result, top=args.top))
    else:
        json.dump(replay.result_json(book, result), sys.stdout, indent=args.indent)
        print()
    return 0


def _cmd_gen(args: argparse.Namespace) -> int:
    from host.exchange import itchgen

    info = itchgen.write_session(args.out, args.messages, args.stocks, args.seed)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {args.out}: {info['messages']:,} messages, {info['bytes']:,} bytes, "
              f"{args.stocks} stocks, seed {args.seed}")  # fmt: skip
    return 0


def _cmd_lab(args: argparse.Namespace) -> int:
    from host import config
    from host.exchange import lab
    from host.exchange import wirefaults as faults

    cfg = config.load(args.config, prefix=args.prefix).lab
    if args.action == "fault":
        return faults.run_cli(cfg, args)
    if faults.fault_options_given(args):
        raise ValueError(f"lab {args.action} takes no LINE or fault options")
    say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    if args.action == "up":
        st = lab.up(cfg, say=say)
    elif args.action == "down":
        for what in faults.remove_all(cfg):
            say(f"removed {what}")
        removed = lab.down(cfg, say=say)
        if args.json:
            print(json.dumps({"prefix": cfg.prefix, "removed": removed}))
        elif not removed:
            print(f"lab {cfg.prefix}: nothing to remove")
        return 0
    else:
        st = lab.status(cfg)
    print(json.dumps(st) if args.json else lab.status_text(st, cfg))
    return 0 if st["up"] or args.action == "status" else 1


def _cmd_sim(args: argparse.Namespace) -> int:
    from host import config
    from host.exchange import faultplan, lab, rerequest
    from host.exchange import publisher as sim

    cfg = config.load(args.config, prefix=args.prefix)
    if args.session and args.generate:
        raise faultplan.SimError("give --session FILE or --generate N, not both")
    if args.session:
        session = sim.Session.from_file(args.session)
    else:
        from host.exchange import itchgen

        n = args.generate or 1_000_000
        print(f"sim: generating {n:,} messages on {args.stocks} stocks (seed {args.gen_seed})",
              file=sys.stderr)  # fmt: skip
        session = sim.Session.from_buffer(itchgen.generate(n, args.stocks, args.gen_seed))
    if args.max:
        pacing = sim.Pacing(mode="max")
    elif args.speed is not None:
        pacing = sim.Pacing(mode="realtime", speed=args.speed)
    else:
        pacing = sim.Pacing(mode="rate", rate=args.rate)
    faults, seed = [], args.seed
    if args.faults:
        faults, file_seed = faultplan.load_faults(args.faults)
        seed = file_seed if file_seed is not None and args.seed is None else seed
    for spec in args.fault:
        faults += faultplan.parse_fault(spec)
    start = args.start_seq
    if args.start_phase:
        start = session.phase_seq(args.start_phase)
    opts = sim.SimOptions(
        session_name=args.session_name or cfg.feed.session, payload=args.payload,
        pacing=pacing, start_seq=start, heartbeat=args.heartbeat, eos_for=args.eos_for,
        preroll=args.preroll, faults=faults, seed=1 if seed is None else seed,
        serve=not args.no_rerequest,
        server=rerequest.ServerConfig(port=cfg.lab.rerequest_port, window=args.rr_window,
                                max_messages=args.rr_max_messages,
                                max_bytes=args.rr_max_bytes, rate=args.rr_rate,
                                workers=args.rr_workers),
    )  # fmt: skip
    sim.validate_options(opts)
    simulator = sim.Simulator(session, cfg.lab, opts)
    if not args.no_netns:
        if os.geteuid() != 0:
            raise lab.LabError(1, "tickwire sim enters the lab's exchange namespace: run it "
                               "as root, or pass --no-netns")  # fmt: skip
        netns.enter(cfg.lab.exchange_ns)
    sim.install_signal_handlers(simulator)
    progress = None
    if sys.stderr.isatty() and not args.json:
        progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    stats = simulator.run(progress=progress)
    if args.record:
        sim.write_record(simulator, args.record)
    print(json.dumps(stats) if args.json else sim.summary_text(stats), flush=True)
    return 0


def _run_config(args: argparse.Namespace):
    """The configuration a run-side verb works on: ``--config``/``--prefix``, with ``[run]``
    pointed at the lab when ``--lab``."""
    from host import config

    cfg = config.load(args.config, prefix=args.prefix)
    return config.for_lab(cfg) if args.lab else cfg


def _cmd_run(args: argparse.Namespace) -> int:
    from host import config
    from host.appliance import runner as appliance

    cfg = _run_config(args)
    if args.mode:
        import dataclasses

        cfg = config.validate(dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, rx_mode=args.mode)))  # fmt: skip
    if args.skip_preflight:
        appliance._log("preflight skipped (--skip-preflight)")
    else:
        from host.appliance import preflight

        preflight.require(cfg, appliance._log)
    app = appliance.Appliance(cfg)
    signal.signal(signal.SIGTERM, app.stop)
    signal.signal(signal.SIGINT, app.stop)
    s = app.run(until_eos=args.until_eos, duration=args.duration)
    print(json.dumps(s) if args.json else appliance.summary_text(s), flush=True)
    if s.get("ended") == "halted":
        print("tickwire: halted by policy at an unrecoverable gap (run.policy = \"halt\")",
              file=sys.stderr)  # fmt: skip
        return 3
    return 0


def _cmd_warm(args: argparse.Namespace) -> int:
    import os

    from host.appliance import runner as appliance

    def log(msg: str) -> None:
        print(f"tickwire warm: {msg}", file=sys.stderr, flush=True)

    cfg = _run_config(args)
    modes = ("xdp", "socket") if args.mode == "all" else (args.mode,)
    where = os.environ.get("NUMBA_CACHE_DIR", "numba's default cache (__pycache__)")
    log(f"into {where}")
    out = appliance.warm_consumer(cfg, modes, log=log)
    if args.json:
        print(json.dumps({"cache": where, "modes": out}))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from host.appliance import status

    st = status.collect(args.channel, args.netns)
    print(json.dumps(st) if args.json else status.text(st))
    return 0


def _cmd_preflight(args: argparse.Namespace) -> int:
    from host import config
    from host.appliance import preflight

    try:
        for name in args.stage:
            if name not in preflight.ALL_STAGES:
                raise config.ConfigError(f"--stage {name}: not a stage "
                                         f"({', '.join(preflight.ALL_STAGES)})")  # fmt: skip
        cfg = _run_config(args)
    except ValueError as e:
        print(f"tickwire: {e}", file=sys.stderr)
        return 2
    with preflight.Host.live(cfg.run.netns) as host:
        report = preflight.check(cfg, host, args.stage or None)
    print(json.dumps(report.as_json()) if args.json else preflight.text(report))
    return 0 if report.ready else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    import host.bench as bench

    return bench.main(args)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from host.appliance import clock

    return clock.main(args, _run_config(args))


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _verb(sub, name: str, text: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire",
        description="Tickwire: ITCH 5.0 / MoldUDP64 feed handler with L3 books.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    b = _verb(sub, "book", "decode an ITCH 5.0 file into books; print JSON", EPILOG_BOOK)
    b.add_argument("file", metavar="FILE", help="Nasdaq binary ITCH 5.0 file (2-byte lengths)")
    b.add_argument("--summary", action="store_true", help="human summary instead of JSON")
    b.add_argument("--top", type=_positive, default=5, help="symbols in the summary (5)")
    b.add_argument("--indent", type=int, default=None, help="indent the JSON")
    b.set_defaults(func=_cmd_book)

    g = _verb(sub, "gen", "generate a deterministic ITCH 5.0 session file", EPILOG_GEN)
    g.add_argument("out", metavar="OUT", help="file to write")
    g.add_argument("--messages", type=_positive, default=1_000_000, help="messages (1000000)")
    g.add_argument("--stocks", type=_positive, default=100, help="stocks (100)")
    g.add_argument("--seed", type=int, default=1, help="random seed (1)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=_cmd_gen)

    from host.exchange import wirefaults as faults

    la = _verb(sub, "lab", "build, inspect or remove the network-namespace lab; inject faults "
               "on its lines", EPILOG_LAB + faults.EPILOG)  # fmt: skip
    la.add_argument("action", choices=["up", "down", "status", "fault"], help="what to do")
    la.add_argument("--config", metavar="FILE", help="TOML configuration ([lab] table)")
    la.add_argument("--prefix", help="lab name prefix, overrides the config (tw)")
    la.add_argument("--json", action="store_true", help="machine-readable output")
    faults.add_cli_arguments(la)
    la.set_defaults(func=_cmd_lab)

    si = _verb(sub, "sim", "publish an ITCH session as MoldUDP64 on lines A and B, serve "
               "re-requests", EPILOG_SIM)  # fmt: skip
    src = si.add_argument_group("session")
    src.add_argument("--session", metavar="FILE", help="ITCH 5.0 file to publish")
    src.add_argument("--generate", type=_positive, metavar="N",
                     help="publish a generated session of N messages (default 1M)")
    src.add_argument("--stocks", type=_positive, default=100, help="stocks when generating")
    src.add_argument("--gen-seed", type=int, default=1, help="generator seed (1)")
    src.add_argument("--session-name", help="MoldUDP64 session, <= 10 chars (config feed.session)")
    src.add_argument("--start-seq", type=_positive, default=1, help="first sequence to send (1)")
    src.add_argument("--start-phase", metavar="CODE",
                     help="start at the first system event S with this code (e.g. Q)")
    pace = si.add_argument_group("pacing (default: --rate 1000000)")
    pm = pace.add_mutually_exclusive_group()
    pm.add_argument("--speed", type=_positive_float, help="real time x SPEED from timestamps")
    pm.add_argument("--rate", type=_positive_float, default=1_000_000.0,
                    help="fixed messages per second")
    pm.add_argument("--max", action="store_true", help="as fast as possible")
    pace.add_argument("--payload", type=_positive, default=1400, help="UDP payload limit (1400)")
    pace.add_argument("--heartbeat", type=_positive_float, default=1.0,
                      help="idle heartbeat interval, s (1)")
    pace.add_argument("--eos-for", type=float, default=2.0,
                      help="send end-of-session packets for this long, s (2)")
    pace.add_argument("--preroll", type=float, default=0.0,
                      help="heartbeats only for this long before data, s (0)")
    fl = si.add_argument_group("faults (every fault applied is recorded)")
    fl.add_argument("--fault", action="append", default=[], metavar="SPEC",
                    help="LINE:KIND=ARGS, e.g. A:drop=100-199, B:loss=0.01, A:cut=200@1000, "
                         "AB:dup=0.001, B:reorder=4@0.1, B:delay=5")
    fl.add_argument("--faults", metavar="FILE", help='TOML: faults = ["A:drop=1-9"], seed = 7')
    fl.add_argument("--seed", type=int, default=None, help="fault randomness seed (1)")
    fl.add_argument("--record", metavar="FILE",
                    help="write what each line sent and every fault applied (JSON)")
    rr = si.add_argument_group("re-request server")
    rr.add_argument("--rr-window", type=_positive, default=1_000_000,
                    help="messages retained (1000000)")
    rr.add_argument("--rr-max-messages", type=_positive, default=1000,
                    help="messages per answer (1000)")
    rr.add_argument("--rr-max-bytes", type=_positive, default=64_000,
                    help="bytes per answer (64000)")
    rr.add_argument("--rr-rate", type=_positive_float, default=100_000.0,
                    help="messages/s per requester (100000)")
    rr.add_argument("--rr-workers", type=_positive, default=2, help="server threads (2)")
    rr.add_argument("--no-rerequest", action="store_true", help="do not serve re-requests")
    si.add_argument("--config", metavar="FILE", help="TOML configuration ([lab], [feed])")
    si.add_argument("--prefix", help="lab prefix, overrides the config (tw)")
    si.add_argument("--no-netns", action="store_true",
                    help="stay in the current network namespace")
    si.add_argument("--json", action="store_true", help="machine-readable summary")
    si.set_defaults(func=_cmd_sim)

    ru = _verb(sub, "run", "run the appliance: receive lines A and B into books", EPILOG_RUN)
    ru.add_argument("--config", metavar="FILE", help="TOML configuration ([run], [feed])")
    ru.add_argument("--lab", action="store_true",
                    help="run in the lab's appliance namespace on its lines")
    ru.add_argument("--prefix", help="lab prefix with --lab (tw)")
    ru.add_argument("--mode", choices=["auto", "xdp", "socket"], help="override run.rx_mode")
    ru.add_argument("--until-eos", action="store_true",
                    help="stop once the end of session is seen and every sequence taken")
    ru.add_argument("--duration", type=_positive_float, help="stop after this many seconds")
    ru.add_argument("--json", action="store_true", help="machine-readable summary")
    ru.add_argument("--skip-preflight", action="store_true",
                    help="start even when a required preflight stage fails")
    ru.set_defaults(func=_cmd_run)

    wa = _verb(sub, "warm", "compile the consumer into numba's cache, so that the next "
               "run starts in a second instead of compiling for about a minute",
               EPILOG_WARM)  # fmt: skip
    wa.add_argument("--config", metavar="FILE", help="TOML configuration ([run], [feed])")
    wa.add_argument("--lab", action="store_true", help="the lab's configuration")
    wa.add_argument("--prefix", help="lab prefix with --lab (tw)")
    wa.add_argument("--mode", choices=["all", "xdp", "socket"], default="all",
                    help="which receive path's loop (all)")
    wa.add_argument("--json", action="store_true", help="machine-readable report")
    wa.set_defaults(func=_cmd_warm)

    pf = _verb(sub, "preflight", "check the host against what provisioning promised: OK, "
               "PARTIAL, NOT CONFIGURED or SKIPPED per stage", EPILOG_PREFLIGHT)  # fmt: skip
    pf.add_argument("--config", metavar="FILE", help="TOML configuration ([host], [run])")
    pf.add_argument("--lab", action="store_true", help="the lab's appliance namespace and lines")
    pf.add_argument("--prefix", help="lab prefix with --lab (tw)")
    pf.add_argument("--stage", action="append", default=[], metavar="NAME",
                    help="check only this stage (repeatable); the listed stages must be OK")
    pf.add_argument("--json", action="store_true", help="machine-readable report")
    pf.set_defaults(func=_cmd_preflight)

    stt = _verb(sub, "status", "what runs: consumer counters, attached XDP programs",
                EPILOG_STATUS)  # fmt: skip
    stt.add_argument("--channel", default="totalview", help="channel (totalview)")
    stt.add_argument("--netns", help="also list XDP programs attached in this namespace")
    stt.add_argument("--json", action="store_true", help="machine-readable output")
    stt.set_defaults(func=_cmd_status)

    ca = _verb(sub, "calibrate", "measure feed PHC offsets (or say timestamps are software) "
               "and the TSC frequency; store them for the latency metrics", """examples:
  tickwire calibrate --lab                       the lab's feed interfaces (software stamps)
  tickwire calibrate --config /etc/tickwire/tickwire.toml --json
  tickwire calibrate --lab --duration 1 --samples 10
""")  # fmt: skip
    ca.add_argument("--config", metavar="FILE", help="TOML configuration ([run], [host])")
    ca.add_argument("--lab", action="store_true", help="the lab's appliance namespace and lines")
    ca.add_argument("--prefix", help="lab prefix with --lab (tw)")
    ca.add_argument("--duration", type=_positive_float, default=0.2,
                    help="seconds of TSC sampling (0.2)")
    ca.add_argument("--samples", type=_positive, default=25,
                    help="PHC samples per interface, 1..25 (25)")
    ca.add_argument("--json", action="store_true", help="machine-readable output")
    ca.set_defaults(func=_cmd_calibrate)

    be = _verb(sub, "bench", "benchmarks, as ratios against a baseline in the same run",
               EPILOG_BENCH)  # fmt: skip
    bsub = be.add_subparsers(dest="what", metavar="WHAT", required=True)
    bb = bsub.add_parser("book", help="decode and decode+book rates against itch-book")
    bb.add_argument("--messages", type=_positive, default=5_000_000, help="per session (5M)")
    bb.add_argument("--stocks", default="100,9000", help="sessions to generate (100,9000)")
    bb.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    bb.add_argument("--repeat", type=_positive, default=7,
                    help="rounds, each timing every contender once (7)")
    bb.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    bb.add_argument("--json", action="store_true", help="machine-readable output")
    bs = bsub.add_parser("sim", help="publisher rate (both lines) against per-packet sends")
    bs.add_argument("--messages", type=_positive, default=5_000_000, help="session size (5M)")
    bs.add_argument("--stocks", type=_positive, default=100, help="stocks (100)")
    bs.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    bs.add_argument("--repeat", type=_positive, default=3, help="timed runs, best kept (3)")
    bs.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    bs.add_argument("--json", action="store_true", help="machine-readable output")
    br = bsub.add_parser("rx", help="receive path: AF_XDP and kernel sockets against the "
                         "XDP_DROP ceiling (private lab, root)")  # fmt: skip
    br.add_argument("--duration", type=_positive_float, default=1.0, help="seconds per step (1)")
    br.add_argument("--steps", type=int, default=6, help="bisection steps per loss-free search (6)")
    br.add_argument("--latency-rate", type=_positive_float, default=100_000.0,
                    help="packets/s of the latency phases (100000)")
    br.add_argument("--latency-seconds", type=_positive_float, default=2.0,
                    help="seconds per latency phase (2)")
    br.add_argument("--jitter-seconds", type=_positive_float, default=2.0,
                    help="jitter probe length (2)")
    br.add_argument("--sender-core", type=int, default=0, help="CPU of the packet generator (0)")
    br.add_argument("--consumer-core", type=int, default=-1,
                    help="CPU of the consumer and the jitter probe (-1: last)")
    br.add_argument("--modes", default="xdp,socket", help="paths to measure (xdp,socket)")
    br.add_argument("--prefix", help="lab prefix (tbrx<pid>)")
    br.add_argument("--json", action="store_true", help="machine-readable output")
    bf = bsub.add_parser("failover", help="line cut -> other line, and gap-fill latency "
                         "(private lab, root)")  # fmt: skip
    bf.add_argument("--messages", type=_positive, default=300_000, help="session size (300000)")
    bf.add_argument("--rate", type=_positive, default=200_000, help="msgs/s published (200000)")
    bf.add_argument("--cut-ms", type=_positive_float, default=200.0, help="line A cut (200)")
    bf.add_argument("--mode", choices=["xdp", "socket"], default="xdp", help="receive path")
    bf.add_argument("--json", action="store_true", help="machine-readable output")
    be.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("tickwire: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        print(f"tickwire: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
