"""``tickwire tail``: a channel's stream, read from its event ring by a ``Subscriber``.

Four ways to show it:

- lines (the default): one readable line per BBO change, trade, trading-state change and
  channel event of the followed symbols, in feed order -- ``HH:MM:SS.nnnnnnnnn`` (the ITCH
  time; a channel event shows the last one seen), sequence, symbol, kind, details. Level
  and per-order events are not printed (``--json`` has them). With ``--snapshot``, first
  each followed symbol's BBO as of the snapshot (``snapshot`` in the time column).
- ``--json``: every event the client receives for the followed symbols (and every channel
  event), one ``Event.as_dict()`` object a line; with ``--snapshot`` the snapshot first, as
  ``{"kind": "snapshot", "seq", "lines", "stale", "ended", "columns", "levels"}``.
- ``--ladder SYMBOL``: a full-screen depth ladder of one symbol (curses, redrawn at most 20
  times a second) with the per-stage latency of its last update.
- ``--digest`` (with ``--snapshot --until-eos``): nothing until the end of session, then one
  JSON object whose ``digest`` is ``tickwire book``'s digest of the levels the client
  rebuilt -- equal to the appliance's when the stream was complete.

Joining. The client always joins through a snapshot (``Subscriber.snapshot``: the followed
symbols' levels and the stock directory, consistent with a ring position) and reads every
event after it, so tickers resolve in a session joined after its ``R`` messages and a BBO
line's other side is right from the first line. ``--snapshot`` decides what is shown: the
snapshot's state first, then the changes; without it, only the changes after it (the
"live" join: from about now). ``--after SEQ`` gets ready first (shared memory mapped,
numba code warm) and joins once the channel has taken SEQ messages: a join at a chosen
point of a session, as ``make demo`` and the tests do. Joining from the ring's head
instead (``join_live``) would leave the directory unknown and each symbol's first BBO line
half known.

Lapped (the writer overtook the client: the events it missed are gone, ``events.Lapped``):
said once on stderr per lap and counted, and the client joins again through a new
snapshot. The new snapshot replaces the client's copy wholesale at a ring position, so from
there on the copy is the book's again and a digest at the end of session is still a proof
of completeness; what was lost is only the *printed* stream between the lap and the new
snapshot (with ``--snapshot`` the new snapshot's state is printed again), which ``lapped``
in the digest object reports. ``--digest`` needs ``--snapshot`` (the proof starts from a
snapshot by definition). A lapped run whose new snapshot fails (the consumer has stopped)
exits non-zero.

Exit status: 0 when done (``--until-eos``: the end of session seen; ``--count``,
``--seconds``, ``q`` or Ctrl-C), 1 when the stream stopped short (the consumer stopped
before the end of session, ``--digest`` without the end of session, a failed
re-snapshot), 2 for a usage error or a channel that cannot be followed (no such channel,
its consumer not running, the ring off). A closed pipe (``| head``) ends it quietly.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from dataplane import events as ev
from dataplane import shm

TRADING_STATES = {"H": "halted", "P": "paused", "Q": "quotation only", "T": "trading"}
SYSTEM_EVENTS = {
    "O": "start of messages",
    "S": "start of system hours",
    "Q": "start of market hours",
    "M": "end of market hours",
    "E": "end of system hours",
    "C": "end of messages",
}
REDRAW_S = 0.05  # the ladder is redrawn at most 20 times a second
IDLE_S = 0.0005  # sleep when the ring has nothing new
CHECK_S = 0.5  # while idle, how often to look whether the consumer still runs
LINE_KINDS = np.array([ev.BBO, ev.TRADE, ev.INSTRUMENT, ev.CHANNEL], np.uint8)  # line mode's


class TailError(ValueError):
    """A channel that cannot be followed, or options that do not go together."""


@dataclass(frozen=True)
class Options:
    channel: str
    symbols: tuple[str, ...] = ()  # tickers or locates; () follows every stock
    json: bool = False
    ladder: str | None = None
    levels: int = 10
    snapshot: bool = False
    until_eos: bool = False
    digest: bool = False
    core: int | None = None
    count: int | None = None  # events printed (--digest: read) before exiting
    seconds: float | None = None
    after: int = 0  # join once the channel has taken this many messages (0: at once)
    root: Path | None = None  # shared memory root (tests); None: /dev/shm/tickwire

    def check(self) -> None:
        if self.digest and not (self.snapshot and self.until_eos):
            raise TailError(
                "--digest needs --snapshot and --until-eos: only levels rebuilt from a "
                "snapshot to the end of session are the book's"
            )
        if self.ladder is not None and (self.json or self.digest or self.symbols):
            raise TailError("--ladder shows one symbol: no SYMBOL, --json or --digest with it")


# --- formatting -----------------------------------------------------------------------------
def price_text(raw: int) -> str:
    """An ITCH Price(4) as dollars with 4 decimals (``123400`` -> ``12.3400``)."""
    return f"{raw // 10_000}.{raw % 10_000:04d}"


def clock_text(itch_ns: int) -> str:
    """ITCH nanoseconds since midnight as ``HH:MM:SS.nnnnnnnnn``."""
    s, ns = divmod(int(itch_ns), 1_000_000_000)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{s:02d}.{ns:09d}"


def side_text(px: int, qty: int) -> str:
    return f"{qty}@{price_text(px)}" if qty else "--"


def bbo_text(bid_px: int, bid_qty: int, ask_px: int, ask_qty: int) -> str:
    return f"bid {side_text(bid_px, bid_qty)} x {side_text(ask_px, ask_qty)} ask"


def channel_text(e, line: int) -> str:
    """What a channel event says (``line``: the raw ``side`` field, 0 A, 1 B)."""
    code = e.code
    if code.startswith("line_"):
        return f"line {'AB'[line] if line in (0, 1) else '?'} {code[5:]}"
    if code.startswith("gap_"):
        last = e.value + e.n - 1
        return f"gap {code[4:]} {e.value}..{last}"
    if code == "books_stale":
        return "books stale (a gap was not recovered)"
    if code == "end_of_session":
        return "end of session"
    if code == "system":
        c = chr(e.n) if e.n else "?"
        return f"system event {c}" + (f" ({SYSTEM_EVENTS[c]})" if c in SYSTEM_EVENTS else "")
    return code


def describe(e, line: int = ev.NO_SIDE, top: tuple | None = None) -> tuple[str, str] | None:
    """``(KIND, details)`` of the readable line for event ``e`` (a ``subscriber.Event``), or
    None when line mode does not print it. ``top``: the symbol's ``(bid_px, bid_qty,
    ask_px, ask_qty)`` after a BBO event; ``line``: the raw ``side`` of a channel event."""
    if e.kind == "bbo":
        return "BBO", bbo_text(*top)
    if e.kind == "trade":
        if e.side is not None:
            where = f"{'buy' if e.side == 'B' else 'sell'} side resting"
        else:
            where = "cross" if e.code == "Q" else "side unknown"
        if e.flags & ev.F_NON_PRINTABLE:
            where += ", non-printable"
        return "TRADE", f"{e.value} @ {price_text(e.price)} ({where})"
    if e.kind == "channel":
        return "CHANNEL", channel_text(e, line)
    if e.kind == "instrument" and e.code == "H":
        c = chr(e.n) if e.n else "?"
        return "STATE", TRADING_STATES.get(c, f"trading action {c}")
    if e.kind == "instrument" and e.code == "Y":
        return "REGSHO", f"short sale restriction {chr(e.n) if e.n else '?'}"
    return None


def line_text(itch_ns: int | str, seq: int, symbol: str, kind: str, details: str) -> str:
    """One readable line (``itch_ns`` a time, or a word in its column)."""
    when = itch_ns if isinstance(itch_ns, str) else clock_text(itch_ns)
    return f"{when:<18} {seq:>10} {symbol:<8} {kind:<7} {details}"


def event_json(e) -> str:
    return json.dumps(e.as_dict(), separators=(",", ":"))


def snapshot_json(snap, sub) -> str:
    rows = [
        [int(r[0]), sub.symbol(int(r[0])), "BS"[int(r[1])], int(r[2]), int(r[3]), int(r[4])]
        for r in snap.rows
    ]
    return json.dumps(
        {
            "kind": "snapshot",
            "seq": snap.seq,
            "lines": snap.lines,
            "stale": snap.stale,
            "ended": bool(snap.eos),
            "columns": ["locate", "symbol", "side", "price", "shares", "orders"],
            "levels": rows,
        },
        separators=(",", ":"),
    )


# --- following ------------------------------------------------------------------------------
def consumer_running(sub) -> bool:
    """The channel's consumer loop runs (its flag is up and its process alive)."""
    c = sub.m["counters"]
    if not int(c[shm.S_RUNNING]):
        return False
    pid = int(c[shm.S_PID])
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Stream:
    """A ``Subscriber`` kept joined: ``poll`` returns the next events and, after a lap,
    joins again through a new snapshot and returns that."""

    def __init__(self, sub, err: TextIO):
        self.sub, self.err = sub, err
        self.laps = 0
        self.read = 0  # events read from the ring
        self.snapshots: list[int] = []  # the sequence of each snapshot taken
        self.top = np.zeros_like(sub.bbo_table)  # (bid, ask) x (price, shares) as printed
        self.itch_ns = 0  # the last ITCH time seen (channel events have none)

    def join(self):
        """Join (again) through a snapshot; the BBO lines start from its top of book."""
        snap = self.sub.snapshot()
        self.snapshots.append(snap.seq)
        self.top[:] = self.sub.bbo_table
        return snap

    def poll(self):
        """``(events, snapshot)``: the events ready, and the new snapshot when a lap made
        the client join again (then the events are none)."""
        try:
            got = self.sub.poll()
        except ev.Lapped as e:
            self.laps += 1
            print(
                f"tickwire tail: {e} -- taking one now; the events in between are not shown",
                file=self.err,
                flush=True,
            )
            try:
                return self.sub.out[:0], self.join()
            except (OSError, ValueError, RuntimeError) as why:
                raise Stopped(f"lapped, and could not join again: {why}") from None
        self.read += len(got)
        return got, None

    def wanted(self, got: np.ndarray) -> np.ndarray:
        """The events of the followed symbols and the channel's."""
        keep = (got["kind"] == ev.CHANNEL) | (self.sub.follow[got["locate"]] != 0)
        return got[keep]

    def lines(self, got: np.ndarray) -> list[str]:
        """The readable lines of a batch (it keeps each symbol's top as printed)."""
        out = []
        sub, top = self.sub, self.top
        got = got[np.isin(got["kind"], LINE_KINDS)]
        for rec in self.wanted(got):
            e = sub.decode(rec)
            if e.itch_ns:
                self.itch_ns = e.itch_ns
            t = None
            if e.kind == "bbo":
                s = 0 if e.side == "B" else 1
                top[e.locate, s, 0], top[e.locate, s, 1] = e.price, e.value
                b = top[e.locate]
                t = (int(b[0, 0]), int(b[0, 1]), int(b[1, 0]), int(b[1, 1]))
            what = describe(e, int(rec["side"]), t)
            if what is not None:
                out.append(line_text(self.itch_ns, e.seq, e.symbol, *what))
        return out

    def snapshot_lines(self, snap) -> list[str]:
        """Each followed symbol's BBO as of the snapshot, by locate."""
        b = self.top
        locs = np.nonzero(self.sub.follow & ((b[:, 0, 1] != 0) | (b[:, 1, 1] != 0)))[0]
        return [
            line_text(
                "snapshot",
                snap.seq,
                self.sub.symbol(int(loc)),
                "BBO",
                bbo_text(*(int(x) for x in b[loc].ravel())),
            )
            for loc in locs
        ]

    def jsons(self, got: np.ndarray) -> list[str]:
        sub = self.sub
        return [event_json(sub.decode(rec)) for rec in self.wanted(got)]


class Stopped(RuntimeError):
    """The stream stopped short (exit status 1)."""


def _loop(stream: Stream, opts: Options, on_batch, err: TextIO) -> None:
    """Poll until done: ``on_batch(events, snapshot)`` returns how many events it counted
    toward ``--count``; returns at the end of session (``--until-eos``), ``--count`` or
    ``--seconds``; raises ``Stopped`` when the consumer stops first."""
    sub = stream.sub
    t0 = time.monotonic()
    counted = 0
    next_check = t0 + CHECK_S
    while True:
        got, snap = stream.poll()
        if len(got) or snap is not None:
            counted += on_batch(got, snap)
            if opts.count is not None and counted >= opts.count:
                return
        if opts.until_eos and sub.ended:  # (or the snapshot was past the end already)
            return
        now = time.monotonic()
        if opts.seconds is not None and now - t0 >= opts.seconds:
            return
        if len(got) or snap is not None:
            continue
        if now >= next_check:
            next_check = now + CHECK_S
            if not consumer_running(sub):
                got, snap = stream.poll()  # what it published before stopping
                if len(got) or snap is not None:
                    counted += on_batch(got, snap)
                    continue
                if opts.until_eos and not sub.ended:
                    raise Stopped("the consumer stopped before the end of session")
                print("tickwire tail: the consumer stopped", file=err, flush=True)
                return
        time.sleep(IDLE_S)


def _print_lines(stream: Stream, opts: Options, out: TextIO, err: TextIO) -> int:
    remaining = [opts.count if opts.count is not None else -1]

    def emit(texts: list[str]) -> int:
        if remaining[0] >= 0:
            texts = texts[: remaining[0]]
            remaining[0] -= len(texts)
        if texts:
            out.write("\n".join(texts) + "\n")
            out.flush()
        return len(texts)

    def on_batch(got, snap) -> int:
        n = 0
        if snap is not None:
            if opts.json and opts.snapshot:
                out.write(snapshot_json(snap, stream.sub) + "\n")
                out.flush()
            elif opts.snapshot:
                texts = stream.snapshot_lines(snap)
                if texts:
                    out.write("\n".join(texts) + "\n")
                    out.flush()
        if len(got):
            n = emit(stream.jsons(got) if opts.json else stream.lines(got))
        return n

    on_batch(stream.sub.out[:0], stream.join())
    try:
        _loop(stream, opts, on_batch, err)
    except Stopped as e:
        print(f"tickwire tail: {e}", file=err, flush=True)
        return 1
    return 0


def _print_digest(stream: Stream, opts: Options, out: TextIO, err: TextIO) -> int:
    sub = stream.sub
    t0 = time.monotonic()
    stream.join()
    status = 0
    try:
        _loop(stream, opts, lambda got, snap: len(got), err)
    except Stopped as e:
        print(f"tickwire tail: {e}", file=err, flush=True)
        status = 1
    if not sub.ended:
        status = 1
    doc = {
        "channel": opts.channel,
        "digest": sub.digest(),
        "seq": sub.last_seq,
        "events": stream.read,
        "lapped": stream.laps,
        "snapshots": len(stream.snapshots),
        "snapshot_seq": stream.snapshots[0],
        "levels": len(sub.rows()),
        "symbols": list(opts.symbols) or "all",
        "ended": sub.ended,
        "stale": sub.stale,
        "lines": sub.lines,
        "seconds": round(time.monotonic() - t0, 3),
    }
    out.write(json.dumps(doc) + "\n")
    out.flush()
    return status


# --- the ladder -----------------------------------------------------------------------------
@dataclass
class Update:
    """The last update of the ladder's symbol, with its stamps (ns, the ring's clock)."""

    seq: int = 0
    kind: str = ""
    rx_ns: int = 0
    apply_dt: int = 0
    pub_dt: int = 0
    read_ns: int = 0


def dt_text(ns: int) -> str:
    """A stage's duration: microseconds, or nanoseconds below one."""
    return f"{ns / 1e3:.1f} us" if abs(ns) >= 1000 else f"{ns} ns"


def ladder_lines(
    symbol: str,
    channel: str,
    bids: list[tuple[int, int, int]],
    asks: list[tuple[int, int, int]],
    levels: int,
    last: Update | None,
    seq: int,
    lines: dict,
    stale: bool,
    ended: bool,
    laps: int,
) -> list[str]:
    """The ladder as text: the header, ``levels`` asks (best last) over ``levels`` bids
    (best first), and a footer with the last update's per-stage latency and the channel's
    state."""
    out = [
        f"{symbol}   channel {channel}   seq {seq}   (q quits)",
        f"{'':5}{'price':>14}{'shares':>12}{'orders':>9}",
    ]
    shown = asks[:levels][::-1]
    out += [""] * (levels - len(shown))
    out += [f"{'ask':5}{price_text(p):>14}{s:>12}{n:>9}" for p, s, n in shown]
    if bids and asks:
        out.append(f"{'':5}{'spread ' + price_text(asks[0][0] - bids[0][0]):>14}")
    else:
        out.append(f"{'':5}{'(one side empty)':>14}")
    out += [f"{'bid':5}{price_text(p):>14}{s:>12}{n:>9}" for p, s, n in bids[:levels]]
    out += [""] * (levels - len(bids[:levels]))
    if last is None or not last.rx_ns:
        out += ["last update: none yet", "latency: -"]
    else:
        pub = last.rx_ns + last.apply_dt + last.pub_dt
        out.append(f"last update: seq {last.seq}, {last.kind}")
        out.append(
            f"latency: receive->apply {dt_text(last.apply_dt)}  "
            f"apply->publish {dt_text(last.pub_dt)}  "
            f"publish->read {dt_text(last.read_ns - pub)}"
        )
    state = f"line A {lines.get('A', '?')}, line B {lines.get('B', '?')}"
    state += "; books STALE" if stale else ""
    state += "; end of session" if ended else ""
    state += f"; lapped {laps}x" if laps else ""
    out.append(state)
    return out


def _ladder(stream: Stream, opts: Options) -> int:
    import curses

    sub, symbol = stream.sub, opts.ladder.upper()

    def screen(win) -> int:
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        win.nodelay(True)
        last: Update | None = None
        drawn, dirty = 0.0, True
        t0 = time.monotonic()
        counted = 0
        stream.join()
        while True:
            got, snap = stream.poll()
            if snap is not None:
                dirty = True
            if len(got):
                read_ns = sub.now_ns()
                try:
                    loc = sub.locate(symbol)
                except KeyError:
                    loc = -1
                mine = got[(got["locate"] == loc) & (got["kind"] != ev.CHANNEL)]
                mine = mine[mine["rx_ns"] != 0]
                if len(mine) or (got["kind"] == ev.CHANNEL).any():
                    dirty = True
                if len(mine):
                    e = mine[-1]
                    last = Update(
                        int(e["seq"]),
                        ev.KIND_NAMES.get(int(e["kind"]), "?"),
                        int(e["rx_ns"]),
                        int(e["apply_dt"]),
                        int(e["pub_dt"]),
                        read_ns,
                    )
                    counted += len(mine)
            now = time.monotonic()
            if now - drawn >= REDRAW_S:
                key = win.getch()
                if key in (ord("q"), ord("Q")):
                    return 0
                if dirty or now - drawn >= 1.0 or key == curses.KEY_RESIZE:
                    _draw(win, stream, symbol, opts, last)
                    drawn, dirty = now, False
            if opts.count is not None and counted >= opts.count:
                return 0
            if opts.seconds is not None and now - t0 >= opts.seconds:
                return 0
            if opts.until_eos and sub.ended:
                _draw(win, stream, symbol, opts, last)
                return 0
            if not len(got):
                time.sleep(IDLE_S)

    return curses.wrapper(screen)


def _draw(win, stream: Stream, symbol: str, opts: Options, last: Update | None) -> None:
    import curses

    sub = stream.sub
    rows, cols = win.getmaxyx()
    levels = max(1, min(opts.levels, (rows - 6) // 2))
    try:
        bids, asks = sub.depth(symbol, "B", levels), sub.depth(symbol, "S", levels)
        name = symbol
    except KeyError:
        bids, asks, name = [], [], f"{symbol} (not in the stock directory yet)"
    text = ladder_lines(
        name,
        opts.channel,
        bids,
        asks,
        levels,
        last,
        sub.last_seq,
        sub.lines,
        sub.stale,
        sub.ended,
        stream.laps,
    )
    win.erase()
    for y, t in enumerate(text[:rows]):
        with contextlib.suppress(curses.error):
            win.addnstr(y, 0, t, cols - 1)
    win.refresh()


# --- entry ----------------------------------------------------------------------------------
def channel_from_config(path: str | None) -> str:
    """``run.channel`` of the configuration (its only ``[[channel]]`` when it has tables)."""
    from host import config

    cfg = config.load(path)
    names = [c.run.channel for c in config.channel_configs(cfg)]
    if len(names) > 1:
        raise TailError(f"the configuration has channels {', '.join(names)}: pick one (--channel)")
    return names[0]


def _wait_taken(sub, n: int) -> bool:
    """Wait (ready, numba code warm) until the channel has taken ``n`` messages: a join at a
    chosen point of the session. False if the consumer stops first."""
    c = sub.m["counters"]
    while int(c[shm.A_NEXT]) - 1 < n:
        if not consumer_running(sub):
            return False
        time.sleep(0.001)
    return True


def _open(opts: Options):
    """The subscriber (errors a user can act on as ``TailError``)."""
    from dataplane.subscriber import Subscriber

    if opts.core is not None:
        try:
            os.sched_setaffinity(0, {opts.core})
        except (OSError, ValueError):
            cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
            raise TailError(
                f"--core {opts.core}: not a CPU this process may use (CPUs {cpus})"
            ) from None
    symbols = [opts.ladder] if opts.ladder else list(opts.symbols) or None
    try:
        sub = Subscriber(
            opts.channel, symbols, root=opts.root, batch=1 << 16 if opts.digest else 4096
        )
    except FileNotFoundError as e:
        raise TailError(f"channel {opts.channel}: {e}") from None
    except (PermissionError, RuntimeError, ValueError) as e:
        raise TailError(f"channel {opts.channel}: {e}") from None
    if not consumer_running(sub):
        sub.close()
        raise TailError(f"channel {opts.channel}: its consumer is not running (tickwire run)")
    return sub


def run(opts: Options, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Follow ``opts.channel`` as ``opts`` says; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        opts.check()
        if opts.ladder is not None and not (out.isatty() and sys.stdin.isatty()):
            raise TailError("--ladder needs a terminal")
        sub = _open(opts)
    except TailError as e:
        print(f"tickwire tail: {e}", file=err)
        return 2
    stream = Stream(sub, err)
    try:
        if opts.after:
            print(f"tickwire tail: ready, joining after {opts.after:,} messages", file=err)
            err.flush()
        if opts.after and not _wait_taken(sub, opts.after):
            print(
                f"tickwire tail: channel {opts.channel}: the consumer stopped before "
                f"{opts.after:,} messages were taken",
                file=err,
            )
            return 1
        if opts.ladder is not None:
            return _ladder(stream, opts)
        if opts.digest:
            return _print_digest(stream, opts, out, err)
        return _print_lines(stream, opts, out, err)
    except (TimeoutError, OverflowError) as e:  # the first snapshot: the consumer's answer
        print(f"tickwire tail: channel {opts.channel}: {e}", file=err)
        return 2 if not stream.read else 1
    except KeyboardInterrupt:
        if opts.digest:
            raise  # an interrupted proof is no proof: the CLI says so
        return 0
    except BrokenPipeError:
        # the reader went away (| head): no traceback, and nothing left to flush at exit
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        return 0
    finally:
        sub.close()


def main(args) -> int:
    """``tickwire tail``'s arguments (``host.appliance.cli``) to ``run``."""
    try:
        channel = args.channel or channel_from_config(args.config)
    except ValueError as e:
        print(f"tickwire tail: {e}", file=sys.stderr)
        return 2
    return run(
        Options(
            channel=channel,
            symbols=tuple(args.symbols),
            json=args.json,
            ladder=args.ladder,
            levels=args.levels,
            snapshot=args.snapshot,
            until_eos=args.until_eos,
            digest=args.digest,
            core=args.core,
            count=args.count,
            seconds=args.seconds,
            after=args.after,
        )
    )
