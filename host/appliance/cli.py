"""The appliance's verbs: ``book``, ``run``, ``warm``, ``status``, ``preflight``,
``calibrate``, ``journal verify``, and the others below. ``add_parsers`` declares them on
``tickwire``'s verb list; each verb's function turns its arguments into calls of the typed
functions of this room."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from host import config
from host.cli import positive, positive_float, verb

EPILOG_BOOK = """examples:
  tickwire book 01302019.NASDAQ_ITCH50          JSON: messages, rate, digest, per-stock BBO
  tickwire book session.itch --summary           short human summary instead of JSON
"""
EPILOG_RUN = """examples:
  tickwire run --lab                             AF_XDP in the lab (kernel sockets if no XDP)
  tickwire run --config host.toml                every [[channel]] of it, one consumer each
  tickwire run --lab --mode socket --until-eos --json
  tickwire run --config /etc/tickwire/tickwire.toml
  tickwire run --lab --skip-preflight            start even if a required stage fails

[run] has no lines of its own: the config gives [run.line_a] and [run.line_b] (interface,
queue, group, port), or --lab uses the lab's.
"""
EPILOG_WARM = """examples:
  NUMBA_CACHE_DIR=/var/cache/tickwire/numba tickwire warm --config /etc/tickwire/tickwire.toml
  tickwire warm --lab --json

The cache is per CPU model and per installed Tickwire: Ansible's tickwire role warms it
(as the service user) after every install on a booted host; an image root is not warmed,
so the appliance image's first start compiles (about a minute, logged as it goes).
"""
EPILOG_STATUS = """examples:
  tickwire status                                every channel's consumer counters
  tickwire status --channel bx                   one channel's
  tickwire status --netns tw-appl --json
"""
EPILOG_PREFLIGHT = """examples:
  tickwire preflight --config /etc/tickwire/tickwire.toml    every stage; exit 0 when ready
  tickwire preflight --lab --json                the lab's namespace; runtime checks only
  tickwire preflight --stage nic --stage irq_affinity        just these (they must be OK)

stages: runtime (what run always needs), hugepages, cpu_isolation, irq_affinity, nic,
sysctl, ptp, service -- one Ansible role each; a stage [host] promises nothing for is
SKIPPED. Exit status: 0 ready, 1 a required stage is not OK, 2 usage or config error.
"""
EPILOG_CALIBRATE = """examples:
  tickwire calibrate --lab                       the lab's feed interfaces (software stamps)
  tickwire calibrate --config /etc/tickwire/tickwire.toml --json
  tickwire calibrate --lab --duration 1 --samples 10
  tickwire calibrate --config /etc/tickwire/tickwire.toml --wait-ptp 900
                                                 first wait until PTP is locked (preflight's
                                                 ptp stage), as tickwire-calibrate.service does
"""
EPILOG_FIRSTBOOT = """examples:
  tickwire firstboot                             what tickwire-firstboot.service runs
  tickwire firstboot --force                     apply the ESP's tickwire.toml again

Exit status 0: configured (tickwire.service may start); 1: the message says what to fix.
"""
EPILOG_AGENT = """examples:
  tickwire agent --once state                    the answer to "state", here, on stdout
  tickwire agent                                 serve org.tickwire.agent (tickwire-agent.service)

requests: state, preflight, digest (image/README.md)
"""
EPILOG_SNAPSHOT = """examples:
  tickwire snapshot                              the totalview consumer's book, now
  tickwire snapshot --channel feed2 --json

The consumer forks between packets; the child writes <snapshot.dir>/<channel>/<session>/
<seq>.twsnap.npz with the sequence and the book's digest. Needs [snapshot] enabled.
"""
EPILOG_REPLAY = """examples:
  tickwire replay --snapshot /var/lib/tickwire/snapshots/totalview/S/...twsnap.npz \
      --journal /var/lib/tickwire/journal/totalview/S

Loads the snapshot (its digest checked), applies the journal's messages after its
sequence (holes skipped, as the live books skipped them) and prints the digest, the same
definition as tickwire book.
"""
EPILOG_JOURNAL = """examples:
  tickwire journal verify /var/lib/tickwire/journal/totalview    every segment of a journal
"""
EPILOG_JOURNAL_VERIFY = """examples:
  tickwire journal verify /var/lib/tickwire/journal/totalview    every segment, in order
  tickwire journal verify 00000000000000000001.twj --json        one segment, JSON

Checks each segment's header, record framing, CRCs and sequence continuity (within it and
from segment to segment); one line per file, then a summary. Holes (messages the journal
says it lacks: a gap, a full disk) are listed and are not corruption. Exit status: 0
clean, 1 corruption or a torn tail (a crash mid-write; the writer cuts it on open),
2 bad arguments.
"""
LINE_KEYS = ("interface", "group", "port")  # what receiving a line needs
LINE_STAGES = ("runtime", "irq_affinity", "nic")  # the preflight stages that look at lines


def add_parsers(sub) -> None:
    b = verb(sub, "book", "decode an ITCH 5.0 file into books; print JSON", EPILOG_BOOK)
    b.add_argument("file", metavar="FILE", help="Nasdaq binary ITCH 5.0 file (2-byte lengths)")
    b.add_argument("--summary", action="store_true", help="human summary instead of JSON")
    b.add_argument("--top", type=positive, default=5, help="symbols in the summary (5)")
    b.add_argument("--indent", type=int, default=None, help="indent the JSON")
    b.set_defaults(func=_book)

    ru = verb(sub, "run", "run the appliance: receive lines A and B into books", EPILOG_RUN)
    _config_options(ru, "[run], [feed]", "run in the lab's appliance namespace on its lines")
    ru.add_argument("--mode", choices=["auto", "xdp", "socket"], help="override run.rx_mode")
    ru.add_argument(
        "--until-eos",
        action="store_true",
        help="stop once the end of session is seen and every sequence taken",
    )
    ru.add_argument("--duration", type=positive_float, help="stop after this many seconds")
    ru.add_argument("--json", action="store_true", help="machine-readable summary")
    ru.add_argument(
        "--skip-preflight",
        action="store_true",
        help="start even when a required preflight stage fails",
    )
    ru.set_defaults(func=_run)

    wa = verb(
        sub,
        "warm",
        "compile the consumer into numba's cache, so that the next run "
        "starts in a second instead of compiling for about a minute",
        EPILOG_WARM,
    )
    _config_options(wa, "[run], [feed]", "the lab's configuration")
    wa.add_argument(
        "--mode",
        choices=["all", "xdp", "socket"],
        default="all",
        help="which receive path's loop (all)",
    )
    wa.add_argument("--json", action="store_true", help="machine-readable report")
    wa.set_defaults(func=_warm)

    pf = verb(
        sub,
        "preflight",
        "check the host against what provisioning promised: OK, "
        "PARTIAL, NOT CONFIGURED or SKIPPED per stage",
        EPILOG_PREFLIGHT,
    )
    _config_options(pf, "[host], [run]", "the lab's appliance namespace and lines")
    pf.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="NAME",
        help="check only this stage (repeatable); the listed stages must be OK",
    )
    pf.add_argument("--json", action="store_true", help="machine-readable report")
    pf.set_defaults(func=_preflight)

    st = verb(sub, "status", "what runs: consumer counters, attached XDP programs", EPILOG_STATUS)
    st.add_argument(
        "--channel",
        action="append",
        help="this channel only (repeatable; default: every channel in /dev/shm/tickwire, "
        "or totalview when there is none)",
    )
    st.add_argument("--netns", help="also list XDP programs attached in this namespace")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    ca = verb(
        sub,
        "calibrate",
        "measure feed PHC offsets (or say timestamps are software) "
        "and the TSC frequency; store them for the latency metrics",
        EPILOG_CALIBRATE,
    )
    _config_options(ca, "[run], [host]", "the lab's appliance namespace and lines")
    ca.add_argument(
        "--duration", type=positive_float, default=0.2, help="seconds of TSC sampling (0.2)"
    )
    ca.add_argument(
        "--samples", type=positive, default=25, help="PHC samples per interface, 1..25 (25)"
    )
    ca.add_argument(
        "--wait-ptp",
        type=positive_float,
        metavar="SECONDS",
        help="first wait, at most SECONDS, until PTP is locked (the ptp stage of "
        "tickwire preflight passes); fail if it does not",
    )
    ca.add_argument("--json", action="store_true", help="machine-readable output")
    ca.set_defaults(func=_calibrate)

    fb = verb(
        sub,
        "firstboot",
        "configure this host from the tickwire.toml on the ESP (the appliance image's first boot)",
        EPILOG_FIRSTBOOT,
    )
    fb.add_argument("--esp", default="/boot/efi", help="where the ESP is mounted (/boot/efi)")
    fb.add_argument(
        "--force", action="store_true", help="apply again though the config is unchanged"
    )
    fb.add_argument("--json", action="store_true", help="print the recorded state as JSON")
    fb.set_defaults(func=_firstboot)

    ag = verb(
        sub,
        "agent",
        "answer read-only state queries on a virtio-serial port (the image under qemu)",
        EPILOG_AGENT,
    )
    ag.add_argument(
        "--port", default="/dev/virtio-ports/org.tickwire.agent", help="the port's device"
    )
    ag.add_argument("--once", metavar="REQUEST", help="answer one request on stdout and exit")
    ag.set_defaults(func=_agent)

    ta = verb(
        sub,
        "tail",
        "follow a channel's live stream: BBO changes, trades, channel state",
        """examples:
  tickwire tail                                  every stock of run.channel, readable lines
  tickwire tail AAPL MSFT --channel bx           two symbols of channel bx
  tickwire tail AAPL --json --snapshot           snapshot, then every event, one JSON a line
  tickwire tail --ladder AAPL --levels 8         a refreshing depth ladder (q quits)
  tickwire tail --snapshot --until-eos --digest  the session's end: the rebuilt levels' digest

Exit status: 0 done, 1 the stream stopped short (consumer stopped, no end of session),
2 usage error or a channel that cannot be followed.
""",
    )
    ta.add_argument(
        "symbols", nargs="*", metavar="SYMBOL", help="tickers or locates (default: every stock)"
    )
    ta.add_argument("--channel", help="the channel (default: run.channel of --config)")
    ta.add_argument("--config", metavar="FILE", help="TOML configuration ([run] channel)")
    ta.add_argument("--json", action="store_true", help="every event, one JSON object a line")
    ta.add_argument("--ladder", metavar="SYMBOL", help="a full-screen depth ladder of SYMBOL")
    ta.add_argument("--levels", type=positive, default=10, help="ladder levels a side (10)")
    ta.add_argument(
        "--snapshot",
        action="store_true",
        help="print the book as of joining first (else only the changes after it)",
    )
    ta.add_argument("--until-eos", action="store_true", help="exit at the end of session")
    ta.add_argument(
        "--digest",
        action="store_true",
        help="with --snapshot --until-eos: print only one JSON object, the digest of the "
        "rebuilt levels (tickwire book's)",
    )
    ta.add_argument(
        "--after",
        type=positive,
        default=0,
        metavar="SEQ",
        help="get ready, then join once the channel has taken SEQ messages",
    )
    ta.add_argument("--core", type=int, metavar="N", help="pin this process to CPU N")
    ta.add_argument("--count", type=positive, metavar="N", help="exit after N events")
    ta.add_argument("--seconds", type=positive_float, metavar="S", help="exit after S seconds")
    ta.set_defaults(func=_tail)

    se = verb(
        sub,
        "serve",
        "serve the event rings to remote clients over WebSocket (tw-v1 frames)",
        """examples:
  tickwire serve --lab                           the lab's channels, in its appliance namespace
  tickwire serve --config /etc/tickwire/tickwire.toml

[feed_server] sets the address, port, tokens, TLS, limits and channels; it runs until
SIGTERM or SIGINT. Clients: tickwire client ws://HOST:PORT/feed?channel=C&snapshot=1
""",
    )
    _config_options(se, "[feed_server], [run]", "the lab's channels, in its appliance namespace")
    se.set_defaults(func=_serve)

    cl = verb(
        sub,
        "client",
        "follow a feed server's stream: events, or the digest of the rebuilt levels",
        """examples:
  tickwire client 'ws://10.0.0.5:8765/feed?channel=totalview&symbols=AAPL' --snapshot
  tickwire client ws://10.0.0.5:8765/feed --snapshot --until-eos --digest --json
  tickwire client 'ws://10.0.0.5:8765/feed?kinds=bbo,trades' --from-seq 120000 --json
  tickwire client wss://feed.example:8765/feed --cafile ca.pem --token "$TOKEN"
  tickwire client 'ws://10.0.0.5:8765/feed?channel=world&symbols=AAPL' --snapshot --json
                                                the world view's consolidated quotes

It reconnects after a drop with from_seq = the next event it expects, and stops with an
error on any gap or duplicate (the world channel is conflated: it joins again, and a
symbol's update must grow). A reconnect refused with 503 (the server restarting) or finding
no server is tried again for --reconnect-timeout seconds; a connection silent for --silence
seconds (not even a heartbeat) is cut and reconnected. Exit status: 0 done, 1 the stream
failed or stopped short, 2 usage error.
""",
    )
    cl.add_argument("url", metavar="URL", help="ws[s]://HOST:PORT/feed[?channel=&symbols=&kinds=]")
    cl.add_argument("--snapshot", action="store_true", help="the book first (snapshot=1)")
    cl.add_argument(
        "--from-seq", type=int, metavar="N", help="replay from event number N (from_seq=N)"
    )
    cl.add_argument("--until-eos", action="store_true", help="exit at the end of session")
    cl.add_argument(
        "--digest",
        action="store_true",
        help="with --until-eos: print only the rebuilt levels' digest (tickwire book's)",
    )
    cl.add_argument("--json", action="store_true", help="JSON: one object a line")
    cl.add_argument(
        "--count", type=int, metavar="N", help="exit after N events (or quotes) printed"
    )
    cl.add_argument("--token", help="the server's token (Authorization: Bearer)")
    cl.add_argument("--cafile", metavar="PEM", help="trust this CA (wss:// with a private CA)")
    cl.add_argument(
        "--reconnect-timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="after a drop, keep reconnecting (503, no server) this long (30)",
    )
    cl.add_argument(
        "--silence",
        type=positive_float,
        metavar="S",
        help="a connection with no frame for S seconds is dead: reconnect "
        "(default: five of the server's heartbeat intervals, at least 3)",
    )
    cl.set_defaults(func=_client)

    wo = verb(
        sub,
        "world",
        "the world view: one best bid and offer per symbol across channels (venues), "
        "served over gRPC; or ask a running one (--get, --watch)",
        """examples:
  tickwire world --config host.toml              serve [world_view] (every channel by default)
  tickwire world --lab                           the lab's channels, on world_view.listen
  tickwire world --get AAPL                      one quote from the running world view, JSON
  tickwire world --watch AAPL MSFT --count 10    its quotes, then each change, one JSON a line
  tickwire world --venues                        the venues it follows and their state

Exit status: 0 done, 1 no such symbol or the world view cannot be reached, 2 usage error.
""",
    )
    _config_options(wo, "[world_view], [[channel]]", "aggregate the lab's channels")
    wo.add_argument(
        "--channel",
        action="append",
        metavar="NAME",
        help="a venue to aggregate (repeatable; default world_view.channels)",
    )
    wo.add_argument("--listen", metavar="HOST:PORT", help="serve here (world_view.listen)")
    wo.add_argument("--connect", metavar="HOST:PORT", help="the client's server (listen)")
    how = wo.add_mutually_exclusive_group()
    how.add_argument("--get", metavar="SYMBOL", help="print SYMBOL's quote as JSON and exit")
    how.add_argument(
        "--watch", nargs="*", metavar="SYMBOL", help="print quotes as they change (none: all)"
    )
    how.add_argument("--venues", action="store_true", help="print the venues' state as JSON")
    wo.add_argument("--count", type=positive, metavar="N", help="--watch: exit after N quotes")
    wo.set_defaults(func=_world)

    jo = verb(sub, "journal", "check the message journal's files", EPILOG_JOURNAL)
    jactions = jo.add_subparsers(dest="action", metavar="ACTION", required=True)
    jv = verb(
        jactions,
        "verify",
        "check journal segments: framing, CRCs, sequence continuity",
        EPILOG_JOURNAL_VERIFY,
    )
    jv.add_argument(
        "paths", nargs="+", metavar="FILE", help="segment files (.twj) or journal directories"
    )
    jv.add_argument("--json", action="store_true", help="machine-readable report")
    jv.set_defaults(func=_journal_verify)

    sn = verb(
        sub,
        "snapshot",
        "ask the running consumer for a book snapshot ([snapshot] enabled)",
        EPILOG_SNAPSHOT,
    )
    sn.add_argument("--channel", default="totalview", help="the channel (totalview)")
    sn.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    sn.add_argument("--json", action="store_true", help="machine-readable output")
    sn.set_defaults(func=_snapshot)

    rp = verb(
        sub,
        "replay",
        "rebuild the books from a snapshot and the journal after it; print the digest",
        EPILOG_REPLAY,
    )
    rp.add_argument("--snapshot", required=True, metavar="FILE", help="a .twsnap.npz file")
    rp.add_argument(
        "--journal", nargs="+", required=True, metavar="DIR", help="the journal's directory"
    )
    rp.add_argument("--until", type=int, metavar="SEQ", help="stop after this sequence")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(func=_replay)


def _config_options(p: argparse.ArgumentParser, tables: str, lab_help: str) -> None:
    p.add_argument("--config", metavar="FILE", help=f"TOML configuration ({tables})")
    p.add_argument("--lab", action="store_true", help=lab_help)
    p.add_argument("--prefix", help="lab prefix with --lab (tw)")


def _config(args: argparse.Namespace, lines: tuple[str, ...] = ()) -> config.Config:
    """``--config``/``--prefix``, with ``[run]`` pointed at the lab when ``--lab``; ``lines``:
    the line keys the verb needs set (``ConfigError`` naming the first one unset)."""
    cfg = config.load(args.config, prefix=args.prefix)
    cfg = config.for_lab(cfg) if args.lab else cfg
    if lines:  # every channel's ([run]'s, without [[channel]] tables)
        config.require_channel_lines(cfg, lines)
    return cfg


def _book(args: argparse.Namespace) -> int:
    from host.appliance import replay

    book, result = replay.replay_file(args.file, progress=replay.terminal_progress("book"))
    if args.summary:
        print(replay.summary_text(book, result, top=args.top))
    else:
        json.dump(replay.result_json(book, result), sys.stdout, indent=args.indent)
        print()
    return 0


def _run(args: argparse.Namespace) -> int:
    from host.appliance import preflight, runner

    cfg = _config(args, LINE_KEYS)
    if args.mode:
        cfg = config.validate(
            dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, rx_mode=args.mode))
        )
    cfgs = config.channel_configs(cfg)
    config.check_cores(cfgs)  # before preflight: a core this host lacks is the config's
    if args.skip_preflight:
        runner.log("preflight skipped (--skip-preflight)")
    else:
        for c in cfgs:  # each channel's lines, queues and core
            who = f"channel {c.run.channel}: " if len(cfgs) > 1 else ""
            preflight.require(c, lambda msg, who=who: runner.log(who + msg))
    s = runner.Appliance(cfg).run(until_eos=args.until_eos, duration=args.duration)
    print(json.dumps(s) if args.json else runner.summary_text(s), flush=True)
    halted = [
        c["channel"] for c in s.get("channels", {"": s}).values() if c.get("ended") == "halted"
    ]
    if halted:
        which = f" (channel {', '.join(halted)})" if "channels" in s else ""
        print(
            f'tickwire: halted by policy at an unrecoverable gap{which} (run.policy = "halt")',
            file=sys.stderr,
        )
        return 3
    return 0


def _warm(args: argparse.Namespace) -> int:
    from host.appliance import runner

    def log(msg: str) -> None:
        print(f"tickwire warm: {msg}", file=sys.stderr, flush=True)

    cfg = _config(args)
    modes = ("xdp", "socket") if args.mode == "all" else (args.mode,)
    where = os.environ.get("NUMBA_CACHE_DIR", "numba's default cache (__pycache__)")
    log(f"into {where}")
    out = runner.warm_consumer(cfg, modes, log=log)
    if args.json:
        print(json.dumps({"cache": where, "modes": out}))
    return 0


def _status(args: argparse.Namespace) -> int:
    from host.appliance import status

    names = args.channel or status.channels() or ["totalview"]
    if len(names) == 1:
        st = status.collect(names[0], args.netns)
        print(json.dumps(st) if args.json else status.text(st))
    else:
        st = status.collect_all(names, args.netns)
        print(json.dumps(st) if args.json else status.text_all(st))
    return 0


def _preflight(args: argparse.Namespace) -> int:
    from host.appliance import preflight

    stages = args.stage or list(preflight.ALL_STAGES)
    try:
        for name in stages:
            if name not in preflight.ALL_STAGES:
                raise config.ConfigError(
                    f"--stage {name}: not a stage ({', '.join(preflight.ALL_STAGES)})"
                )
        cfg = _config(args, LINE_KEYS if set(stages) & set(LINE_STAGES) else ())
    except ValueError as e:
        print(f"tickwire: {e}", file=sys.stderr)
        return 2
    reports = {}
    for c in config.channel_configs(cfg):  # each channel's lines, queues and core
        with preflight.Host.live(c.run.netns) as host:
            reports[c.run.channel] = preflight.check(c, host, args.stage or None)
    if len(reports) == 1:
        (report,) = reports.values()
        print(json.dumps(report.as_json()) if args.json else preflight.text(report))
        return 0 if report.ready else 1
    ready = all(r.ready for r in reports.values())
    if args.json:
        chans = {name: r.as_json() for name, r in reports.items()}
        print(json.dumps({"ready": ready, "channels": chans}))
    else:
        print("\n".join(f"channel {n}:\n{preflight.text(r)}" for n, r in reports.items()))
    return 0 if ready else 1


def _calibrate(args: argparse.Namespace) -> int:
    from host.appliance import clock

    cfg = _config(args, ("interface",))
    if args.wait_ptp:
        clock.wait_for_ptp(
            cfg,
            args.wait_ptp,
            log=lambda msg: print(f"tickwire calibrate: {msg}", file=sys.stderr, flush=True),
        )
    for c in config.channel_configs(cfg):  # each channel's interfaces and clock.json
        r = clock.calibrate(c, duration=args.duration, samples=args.samples)
        path = clock.save(r)
        print(
            json.dumps({**r, "path": str(path)}) if args.json else clock.text(r, path), flush=True
        )
    return 0


def _firstboot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from host.appliance import firstboot

    try:
        st = firstboot.run(Path(args.esp), force=args.force)
    except firstboot.FirstBootError as e:
        firstboot.say(f"FAILED: {e}")
        return 1
    if args.json:
        print(json.dumps(st))
    return 0


def _agent(args: argparse.Namespace) -> int:
    from host.appliance import agent

    if args.once:
        print(json.dumps(agent.answer(args.once), default=str))
        return 0
    agent.serve(args.port)
    return 0


def _tail(args: argparse.Namespace) -> int:
    from host.appliance import tail

    return tail.main(args)


def _world(args: argparse.Namespace) -> int:
    from host.appliance import worldview

    cfg = _config(args)  # --lab: the lab's channels, as tickwire run --lab names them
    wcfg = cfg.world_view
    if args.get is None and args.watch is None and not args.venues:
        listen = args.listen or wcfg.listen
        config.host_port(listen, "--listen")
        venues = args.channel or config.world_view_channels(cfg)
        st = worldview.serve(
            venues, listen, wcfg.symbols or None, wcfg.max_watchers, metrics=wcfg.metrics
        )
        print(json.dumps(st), flush=True)
        return 0
    address = args.connect or args.listen or wcfg.listen
    with worldview.Client(address) as client:
        try:
            if args.venues:
                print(json.dumps(client.venues()))
            elif args.get is not None:
                print(json.dumps(client.get(args.get).as_dict()))
            else:
                for n, q in enumerate(client.watch(args.watch), 1):
                    print(json.dumps(q.as_dict()), flush=True)
                    if args.count is not None and n >= args.count:
                        break
        except KeyError as e:
            print(f"tickwire world: {e.args[0]}", file=sys.stderr)
            return 1
        except ConnectionError as e:
            print(f"tickwire world: {address}: {e}", file=sys.stderr)
            return 1
    return 0


def _journal_verify(args: argparse.Namespace) -> int:
    from host.appliance import journal

    try:
        report = journal.verify(args.paths)
    except journal.NotAJournal as e:
        print(f"tickwire journal verify: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else journal.verify_text(report))
    return 0 if report["clean"] else 1


def _snapshot(args: argparse.Namespace) -> int:
    from host.appliance import snapshot

    try:
        info = snapshot.request(args.channel, args.timeout)
    except (FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"tickwire snapshot: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info))
    else:
        print(
            f"{info['path']}: seq {info['seq']:,}, digest {info['digest']}, "
            f"fork {info['fork_us']:.0f} us"
        )
    return 0


def _replay(args: argparse.Namespace) -> int:
    from host.appliance import replay

    try:
        r = replay.snapshot_and_journal(args.snapshot, args.journal, args.until)
    except (OSError, ValueError) as e:
        print(f"tickwire replay: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"snapshot at seq {r['snapshot_seq']:,} + {r['messages']:,} journal messages "
            f"({len(r['holes'])} hole(s)): seq {r['seq']:,}, digest {r['digest']}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from host import netns
    from host.appliance import feed

    cfg = _config(args)
    if cfg.run.netns:
        netns.enter(cfg.run.netns)
    return feed.serve(cfg)


def _client(args: argparse.Namespace) -> int:
    from host.appliance import feedclient

    return feedclient.main(args)
