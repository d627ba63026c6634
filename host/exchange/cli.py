"""The exchange in a box's verbs: ``gen`` (a session file), ``lab up|down|status|fault``
(the namespaces and their wire faults) and ``sim`` (the publisher, the re-request
server and the snapshot service). ``add_parsers`` declares them on ``tickwire``'s verb list."""

from __future__ import annotations

import argparse
import json
import os
import sys

from host import config, netns, signals
from host.cli import positive, positive_float, verb

EPILOG_GEN = """examples:
  tickwire gen session.itch                      1M messages, 100 stocks, seed 1
  tickwire gen big.itch --messages 5000000 --stocks 9000 --seed 7
"""
EPILOG_LAB = """examples:
  tickwire lab up                                namespaces tw-exch and tw-appl, lines A and B
  tickwire lab status --json
  tickwire lab up --prefix t2 --config lab.toml  a second, independent lab
  tickwire lab down                              remove the namespaces (and their veths)
  tickwire lab fault A --cut 200                 line A silent for 200 ms from now
"""
EPILOG_LAB_UP = """examples:
  tickwire lab up                                namespaces tw-exch and tw-appl, lines A and B
  tickwire lab up --prefix t2 --config lab.toml  a second, independent lab
"""
EPILOG_LAB_DOWN = """examples:
  tickwire lab down                              remove the namespaces (and their veths)
  tickwire lab down --prefix t2 --json
"""
EPILOG_LAB_STATUS = """examples:
  tickwire lab status                            namespaces, interfaces, addresses
  tickwire lab status --prefix t2 --json
"""
EPILOG_SIM = """examples:
  tickwire lab up && tickwire sim --session s.itch       1M msgs/s on both lines, then EOS
  tickwire sim --generate 2000000 --max --json           as fast as possible, JSON summary
  tickwire sim --session s.itch --speed 100 --start-phase Q
  tickwire sim --session s.itch --fault A:drop=1000-1999 --fault B:cut=50@200 --record r.json
  tickwire sim --session s.itch --glimpse-port 26600 --glimpse-refuse 2   snapshot service
"""


def add_parsers(sub) -> None:
    from host.exchange import wirefaults

    g = verb(sub, "gen", "generate a deterministic ITCH 5.0 session file", EPILOG_GEN)
    g.add_argument("out", metavar="OUT", help="file to write")
    g.add_argument("--messages", type=positive, default=1_000_000, help="messages (1000000)")
    g.add_argument("--stocks", type=positive, default=100, help="stocks (100)")
    g.add_argument("--seed", type=int, default=1, help="random seed (1)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=_gen)

    la = verb(
        sub,
        "lab",
        "build, inspect or remove the network-namespace lab; inject faults on its lines",
        EPILOG_LAB,
    )
    actions = la.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text, epilog, func in (
        ("up", "build the lab (idempotent)", EPILOG_LAB_UP, _lab_up),
        ("down", "remove the lab, its processes and its wire faults", EPILOG_LAB_DOWN, _lab_down),
        ("status", "what of the lab exists", EPILOG_LAB_STATUS, _lab_status),
        (
            "fault",
            "arm, show or clear BPF wire faults on the lab's lines",
            wirefaults.EPILOG,
            _lab_fault,
        ),
    ):
        a = verb(actions, name, text, epilog)
        a.add_argument("--config", metavar="FILE", help="TOML configuration ([lab] table)")
        a.add_argument("--prefix", help="lab name prefix, overrides the config (tw)")
        a.add_argument("--json", action="store_true", help="machine-readable output")
        a.set_defaults(func=func)
    wirefaults.add_cli_arguments(actions.choices["fault"])

    si = verb(
        sub,
        "sim",
        "publish an ITCH session as MoldUDP64 on lines A and B, serve re-requests",
        EPILOG_SIM,
    )
    src = si.add_argument_group("session")
    src.add_argument(
        "--session",
        metavar="FILE",
        action="append",
        default=[],
        help="ITCH 5.0 file to publish; repeat it for several channels (channel k: the k-th)",
    )
    src.add_argument(
        "--generate",
        type=positive,
        metavar="N",
        help="publish a generated session of N messages (default 1M)",
    )
    src.add_argument("--stocks", type=positive, default=100, help="stocks when generating")
    src.add_argument("--gen-seed", type=int, default=1, help="generator seed (1; channel k: + k)")
    src.add_argument(
        "--channels",
        type=positive,
        metavar="N",
        help="publish N channels at once, each on its groups (the lab's lab.channels; "
        "default: one per --session FILE, else lab.channels); those without a FILE are "
        "generated",
    )
    src.add_argument("--session-name", help="MoldUDP64 session, <= 10 chars (config feed.session)")
    src.add_argument("--start-seq", type=positive, default=1, help="first sequence to send (1)")
    src.add_argument(
        "--start-phase",
        metavar="CODE",
        help="start at the first system event S with this code (e.g. Q)",
    )
    pace = si.add_argument_group("pacing (default: --rate 1000000)")
    pm = pace.add_mutually_exclusive_group()
    pm.add_argument("--speed", type=positive_float, help="real time x SPEED from timestamps")
    pm.add_argument(
        "--rate", type=positive_float, default=1_000_000.0, help="fixed messages per second"
    )
    pm.add_argument("--max", action="store_true", help="as fast as possible")
    pace.add_argument("--payload", type=positive, default=1400, help="UDP payload limit (1400)")
    pace.add_argument(
        "--heartbeat", type=positive_float, default=1.0, help="idle heartbeat interval, s (1)"
    )
    pace.add_argument(
        "--eos-for",
        type=float,
        default=2.0,
        help="send end-of-session packets for this long, s (2)",
    )
    pace.add_argument(
        "--preroll",
        type=float,
        default=0.0,
        help="heartbeats only for this long before data, s (0)",
    )
    fl = si.add_argument_group("faults (every fault applied is recorded)")
    fl.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="LINE:KIND=ARGS, e.g. A:drop=100-199, B:loss=0.01, A:cut=200@1000, "
        "AB:dup=0.001, B:reorder=4@0.1, B:delay=5",
    )
    fl.add_argument("--faults", metavar="FILE", help='TOML: faults = ["A:drop=1-9"], seed = 7')
    fl.add_argument("--seed", type=int, default=None, help="fault randomness seed (1)")
    fl.add_argument(
        "--record", metavar="FILE", help="write what each line sent and every fault applied (JSON)"
    )
    rr = si.add_argument_group("re-request server")
    rr.add_argument(
        "--rr-window", type=positive, default=1_000_000, help="messages retained (1000000)"
    )
    rr.add_argument(
        "--rr-max-messages", type=positive, default=1000, help="messages per answer (1000)"
    )
    rr.add_argument(
        "--rr-max-bytes", type=positive, default=64_000, help="bytes per answer (64000)"
    )
    rr.add_argument(
        "--rr-rate",
        type=positive_float,
        default=100_000.0,
        help="messages/s per requester (100000)",
    )
    rr.add_argument("--rr-workers", type=positive, default=2, help="server threads (2)")
    rr.add_argument("--no-rerequest", action="store_true", help="do not serve re-requests")
    gl = si.add_argument_group(
        "snapshot service (GLIMPSE 5.0-style over SoupBinTCP; login: lab.glimpse_user, "
        "lab.glimpse_password)"
    )
    gl.add_argument(
        "--glimpse-port",
        type=_port_or_zero,
        metavar="PORT",
        help="serve snapshots on this TCP port, channel k on PORT + k (default "
        "lab.glimpse_port; 0: no service)",
    )
    gl.add_argument(
        "--glimpse-refuse",
        type=_count,
        default=0,
        metavar="K",
        help="fault: refuse the first K logins (Login Rejected S) (0)",
    )
    gl.add_argument(
        "--glimpse-drop-after",
        type=_count,
        metavar="M",
        help="fault: cut the first accepted connection after M messages of its spin",
    )
    si.add_argument("--config", metavar="FILE", help="TOML configuration ([lab], [feed])")
    si.add_argument("--prefix", help="lab prefix, overrides the config (tw)")
    si.add_argument("--no-netns", action="store_true", help="stay in the current network namespace")
    si.add_argument("--json", action="store_true", help="machine-readable summary")
    si.set_defaults(func=_sim)


def _count(text: str) -> int:
    """An argparse type: a whole number, zero or more."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _port_or_zero(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1..65535 (0: no service)")
    return value


def glimpse_configs(args: argparse.Namespace, cfg: config.Config, channels: int) -> list:
    """Each channel's snapshot service (``glimpse.ServerConfig``, channel k on port + k),
    or ``None`` for each when there is none; checks the ``--glimpse-*`` options."""
    from host.exchange import faultplan, glimpse

    port = cfg.lab.glimpse_port if args.glimpse_port is None else args.glimpse_port
    if not port:
        used = ["--glimpse-refuse"] if args.glimpse_refuse else []
        if args.glimpse_drop_after is not None:
            used.append("--glimpse-drop-after")
        if used:
            raise faultplan.SimError(
                f"{' and '.join(used)}: there is no snapshot service to apply "
                f"{'them' if len(used) > 1 else 'it'} to (give --glimpse-port PORT, or "
                "lab.glimpse_port in --config)"
            )
        return [None] * channels
    if port + channels - 1 > 65535:
        raise faultplan.SimError(
            f"--glimpse-port {port}: channel {channels - 1}'s snapshot service would listen "
            f"on {port + channels - 1}, outside 1..65535"
        )
    return [
        glimpse.ServerConfig(
            port=port + k,
            user=cfg.lab.glimpse_user,
            password=cfg.lab.glimpse_password,
            refuse=args.glimpse_refuse,
            drop_after=-1 if args.glimpse_drop_after is None else args.glimpse_drop_after,
        )
        for k in range(channels)
    ]


def _gen(args: argparse.Namespace) -> int:
    from host.exchange import itchgen

    info = itchgen.write_session(args.out, args.messages, args.stocks, args.seed)
    if args.json:
        print(json.dumps(info))
    else:
        print(
            f"wrote {args.out}: {info['messages']:,} messages, {info['bytes']:,} bytes, "
            f"{args.stocks} stocks, seed {args.seed}"
        )
    return 0


def _lab_config(args: argparse.Namespace) -> config.LabConfig:
    return config.load(args.config, prefix=args.prefix).lab


def _say(args: argparse.Namespace):
    return (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))


def _lab_up(args: argparse.Namespace) -> int:
    from host.exchange import lab

    cfg = _lab_config(args)
    st = lab.up(cfg, say=_say(args))
    print(json.dumps(st) if args.json else lab.status_text(st, cfg))
    return 0 if st["up"] else 1


def _lab_status(args: argparse.Namespace) -> int:
    from host.exchange import lab

    cfg = _lab_config(args)
    st = lab.status(cfg)
    print(json.dumps(st) if args.json else lab.status_text(st, cfg))
    return 0


def _lab_down(args: argparse.Namespace) -> int:
    from host.exchange import lab, wirefaults

    cfg, say = _lab_config(args), _say(args)
    for what in wirefaults.remove_all(cfg):
        say(f"removed {what}")
    removed = lab.down(cfg, say=say)
    if args.json:
        print(json.dumps({"prefix": cfg.prefix, "removed": removed}))
    elif not removed:
        print(f"lab {cfg.prefix}: nothing to remove")
    return 0


def _lab_fault(args: argparse.Namespace) -> int:
    from host.exchange import wirefaults

    return wirefaults.run_cli(
        _lab_config(args),
        args.fault_args,
        cut=args.cut,
        drop_range=args.drop_range,
        loss=args.loss,
        drop_all=args.drop_all,
        as_json=args.json,
    )


def _sim_channels(args: argparse.Namespace, cfg: config.Config) -> list:
    """The lab channels to publish (``config.LabChannel``), checked against the options."""
    from host.exchange import faultplan

    lab_chs = config.lab_channels(cfg)
    n = args.channels or (len(args.session) if len(args.session) > 1 else len(lab_chs))
    if n > len(lab_chs):
        raise faultplan.SimError(
            f"--channels {n}: the lab has {len(lab_chs)} channel"
            f"{'s' if len(lab_chs) > 1 else ''} (lab.channels in --config)"
        )
    if len(args.session) > n:
        raise faultplan.SimError(f"{len(args.session)} --session files for {n} channel(s)")
    if args.generate and len(args.session) >= n:
        raise faultplan.SimError("give --session FILE or --generate N, not both")
    if args.session_name and n > 1:
        raise faultplan.SimError(
            "--session-name names one channel's session: with several channels, "
            "name them in the config's [[channel]] tables"
        )
    return lab_chs[:n]


def _sim(args: argparse.Namespace) -> int:
    from host.exchange import faultplan, lab, rerequest
    from host.exchange import publisher as sim

    cfg = config.load(args.config, prefix=args.prefix)
    channels = _sim_channels(args, cfg)
    glimpses = glimpse_configs(args, cfg, len(channels))
    sessions = []
    for k in range(len(channels)):
        if k < len(args.session):
            sessions.append(sim.Session.from_file(args.session[k]))
            continue
        from host.exchange import itchgen

        n, seed = args.generate or 1_000_000, args.gen_seed + k
        print(
            f"sim: generating {n:,} messages on {args.stocks} stocks (seed {seed})",
            file=sys.stderr,
        )
        sessions.append(sim.Session.from_buffer(itchgen.generate(n, args.stocks, seed)))
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
    simulators = []
    for k, (ch, session) in enumerate(zip(channels, sessions, strict=True)):
        start = args.start_seq
        if args.start_phase:
            start = session.phase_seq(args.start_phase)
        opts = sim.SimOptions(
            session_name=args.session_name or ch.session,
            payload=args.payload,
            pacing=pacing,
            start_seq=start,
            heartbeat=args.heartbeat,
            eos_for=args.eos_for,
            preroll=args.preroll,
            faults=faults,  # per line: every channel of the line
            seed=(1 if seed is None else seed) + k,
            serve=not args.no_rerequest,
            server=rerequest.ServerConfig(
                port=ch.rerequest_port,
                window=args.rr_window,
                max_messages=args.rr_max_messages,
                max_bytes=args.rr_max_bytes,
                rate=args.rr_rate,
                workers=args.rr_workers,
            ),
            glimpse=glimpses[k],
        )
        sim.validate_options(opts)
        simulators.append(sim.Simulator(session, cfg.lab, opts, lines=ch.lines))
    exchange = sim.Exchange(simulators)
    if not args.no_netns:
        if os.geteuid() != 0:
            raise lab.LabError(
                1,
                "tickwire sim enters the lab's exchange namespace: run it "
                "as root, or pass --no-netns",
            )
        netns.enter(cfg.lab.exchange_ns)
    progress = None
    if sys.stderr.isatty() and not args.json:
        progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    with signals.stopping(exchange.stop):
        stats = exchange.run(progress=progress)
    names = [ch.name for ch in channels]
    if len(simulators) == 1:
        if args.record:
            sim.write_record(simulators[0], args.record)
        print(json.dumps(stats[0]) if args.json else sim.summary_text(stats[0]), flush=True)
        return 0
    if args.record:
        sim.write_records(dict(zip(names, simulators, strict=True)), args.record)
    summary = sim.channels_summary(dict(zip(names, stats, strict=True)))
    print(json.dumps(summary) if args.json else sim.channels_text(summary), flush=True)
    return 0
