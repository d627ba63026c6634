"""The world view: one consolidated best bid and offer per symbol across several venues.

A venue is a channel (its consumer, its event ring). The aggregator follows each venue's
ring with a ``Subscriber`` (a snapshot, then every event after it) in a process of its own
-- never inside a consumer -- and keeps, per symbol, the best bid and best offer across
the venues, the venues at each, and each one's size at that price.

A symbol is a ticker: the same ticker on several venues is one symbol, whatever locate
each venue gives it (each venue's stock directory, its ``R`` events, maps locates to
tickers). From each venue's events the core (``WorldView``) keeps:

- ``BBO``: the venue's best level of each side of the locate (price, shares; 0 and 0 for
  an empty side);
- ``INSTRUMENT`` ``R`` (the directory) and ``H`` (trading action: ``T`` trading, ``H``
  halted, ``P`` paused, ``Q`` quotation only);
- ``CHANNEL``: books stale (a gap was not recovered: ``books_stale`` or
  ``gap_unrecoverable``), lines up / stale / down, end of session.

What takes a venue out of a symbol's consolidated quote (``Quote.excluded`` says why):
``halted`` / ``paused`` / ``quotation_only`` (its trading action for that symbol is not
``T``; no action seen yet counts as trading), ``stale`` (its books are not whole), and
``lines_down`` (both its lines are down before its end of session: its quote has stopped
moving, however old it is). It comes back when that ends: a ``T`` action, both lines or
one up again, a new snapshot that is not stale (a consumer that restarted: a new ring).
A venue at its end of session stays in with its final books -- at the end of a session the
world view is the consolidation of the venues' final books.

The consolidated quote (``Quote``): best bid = the highest bid price among the venues in,
``bids`` each venue at it with its size (in the configured venue order), ``bid_qty`` their
sum; the offer likewise with the lowest price. Prices are ITCH Price(4) raw integers; an
empty side is price 0, size 0, no venues. A quote may be locked or crossed (one venue's bid
at or above another's offer): that is what the venues say, and it is shown as it is.

Every change of a symbol's quote bumps its ``update`` counter and the world view's ``seq``
(one counter over every symbol: a stream's sequence). Stamps: ``itch_ns`` and ``rx_ns``
(the receive stamp, ring clock = CLOCK_MONOTONIC scale) of the event that made the change,
``world_ns`` (CLOCK_MONOTONIC) when the world view computed it: ``world_ns - rx_ns`` is
wire to world view. A quote made from a snapshot has ``rx_ns`` 0.

Served by ``tickwire world`` over gRPC (``worldview.proto``; ``Service``, ``serve``,
``Client``). Other consumers in the same process -- the WebSocket feed server, say -- use
``WorldView.watch``: a thread-safe, conflating subscription (a slow watcher gets each
symbol's latest quote, never a backlog, and never slows the aggregator; ``update`` shows
what it skipped); one in another process uses ``aio_watch`` (asyncio) or ``Client.watch``
(the gRPC stream), which yield the same ``Quote``s. A watch starts with the image (each
watched symbol's quote when it began, or a newer one) and then the changes; a reader that
must know where the image ends (the feed server, before it serves a snapshot) passes
``on_image_end``: called once the image is out, also when it is empty (``WatchBBO``'s
image-end marker). No quote comes twice: a change the image already holds is not sent again.

Metrics (``tickwire_world_*``, ``[world_view] metrics``): a collector (``WorldCollector``)
reads the view and the service at scrape time -- venues and each one's state, events and
snapshots read per venue, quote changes, symbols quoted, watchers served and refused
(``max_watchers``), and the venue exclusions in force by reason.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataplane import events as ev
from host.appliance import linehealth

N_LOCATES = 1 << 16
TRADING = ord("T")
STATE_REASONS = {ord("H"): "halted", ord("P"): "paused", ord("Q"): "quotation_only"}
STALE = "stale"
LINES_DOWN = "lines_down"
REASONS = (*STATE_REASONS.values(), STALE, LINES_DOWN)  # Quote.excluded's reasons
KINDS = np.array([ev.BBO, ev.INSTRUMENT, ev.CHANNEL], np.uint8)  # what the world view reads
# EVENT fields by position (records as tuples: ``tolist`` is the fast way through a batch)
_F = {name: i for i, name in enumerate(ev.EVENT.names)}
_SEQ, _ITCH, _RX, _LOC = _F["seq"], _F["itch_ns"], _F["rx_ns"], _F["locate"]
_KIND, _SIDE, _CODE = _F["kind"], _F["side"], _F["code"]
_PRICE, _N, _VALUE = _F["price"], _F["n"], _F["value"]


def check_symbol(text: str) -> str:
    """A ticker as the world view keys it: 1-8 printable ASCII characters, upper case."""
    s = text.strip().upper()
    if not (1 <= len(s) <= 8 and s.isascii() and s.isprintable() and " " not in s):
        raise ValueError(f"symbol {text!r}: 1-8 ASCII characters, no spaces")
    return s


@dataclass(frozen=True)
class Quote:
    """One symbol's consolidated quote (see the module's docstring)."""

    symbol: str
    bid_px: int = 0
    bid_qty: int = 0
    ask_px: int = 0
    ask_qty: int = 0
    bids: tuple[tuple[str, int], ...] = ()  # (venue, size) at the best bid, venue order
    asks: tuple[tuple[str, int], ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()  # (venue, reason): has the symbol, is out
    update: int = 0
    seq: int = 0
    itch_ns: int = 0
    rx_ns: int = 0
    world_ns: int = 0

    def same_book(self, other: Quote | None) -> bool:
        """Same prices, sizes, venues and exclusions (counters and stamps aside)."""
        return other is not None and self._book() == other._book()

    def _book(self) -> tuple:
        return (
            self.bid_px,
            self.bid_qty,
            self.ask_px,
            self.ask_qty,
            self.bids,
            self.asks,
            self.excluded,
        )

    def as_dict(self) -> dict:
        return {
            "symbol": self.symbol,
            "bid_px": self.bid_px,
            "bid_qty": self.bid_qty,
            "ask_px": self.ask_px,
            "ask_qty": self.ask_qty,
            "bids": {v: n for v, n in self.bids},
            "asks": {v: n for v, n in self.asks},
            "excluded": {v: why for v, why in self.excluded},
            "update": self.update,
            "seq": self.seq,
            "stamps_ns": {"itch": self.itch_ns, "rx": self.rx_ns, "world": self.world_ns},
        }


@dataclass
class Venue:
    """What the world view knows of one venue (a channel)."""

    name: str
    bbo: np.ndarray = field(default_factory=lambda: np.zeros((N_LOCATES, 2, 2), np.int64))
    state: np.ndarray = field(default_factory=lambda: np.zeros(N_LOCATES, np.uint8))
    symbol: dict[int, str] = field(default_factory=dict)  # locate -> ticker
    locate: dict[str, int] = field(default_factory=dict)  # ticker -> locate
    stale: bool = False
    lines: dict[str, str] = field(default_factory=lambda: {"A": "unknown", "B": "unknown"})
    ended: bool = False
    joined: bool = False
    last_seq: int = 0
    events: int = 0  # events read (all kinds)
    snapshots: int = 0

    def venue_out(self) -> str | None:
        """Why this venue is out of every quote (``stale``, ``lines_down``), or None."""
        if self.stale:
            return STALE
        if not self.ended and self.lines["A"] == "down" and self.lines["B"] == "down":
            return LINES_DOWN
        return None

    def out(self, loc: int) -> str | None:
        """Why this venue is out of ``loc``'s consolidated quote, or None when it is in."""
        why = self.venue_out()
        if why is not None:
            return why
        st = int(self.state[loc])
        if st and st != TRADING:
            return STATE_REASONS.get(st, f"state_{chr(st)}")
        return None

    def status(self) -> dict:
        return {
            "name": self.name,
            "joined": self.joined,
            "stale": self.stale,
            "ended": self.ended,
            "lines": dict(self.lines),
            "last_seq": self.last_seq,
            "events": self.events,
            "snapshots": self.snapshots,
            "symbols": len(self.locate),
        }


class Watch:
    """A subscription to quote changes (``WorldView.watch``): conflating, thread-safe.
    ``image`` returns the image (the quotes when the watch began; a symbol that changed
    since: its latest), once; ``get`` returns the changed quotes pending (each symbol's
    latest, in the order the symbols first changed since the last ``get``), the image
    first if ``image`` was not called. A quote is given once: a change offered after the
    image already held it is dropped (``seq`` tells)."""

    def __init__(self, view: WorldView, symbols: frozenset[str] | None):
        self.view, self.symbols = view, symbols
        self._cond = threading.Condition()
        self._image: dict[str, Quote] | None = None  # the image, until taken
        self._pending: dict[str, Quote] = {}
        self._seen: dict[str, int] = {}  # symbol -> seq of the latest quote image or pending
        self.image_seq = 0  # the world view's seq when the image was taken
        self.closed = False
        self.conflated = 0  # quotes replaced by a newer one before they were taken

    def _start(self, image: Iterable[Quote], seq: int) -> None:
        """The image (``WorldView.watch``, under the view's lock)."""
        with self._cond:
            self._image = {}
            self.image_seq = seq
            for q in image:
                self._image[q.symbol] = q
                self._seen[q.symbol] = q.seq

    def offer(self, q: Quote) -> None:
        if self.symbols is not None and q.symbol not in self.symbols:
            return
        with self._cond:
            if q.seq <= self._seen.get(q.symbol, 0):
                return  # the image took it from the view before its offer came
            self._seen[q.symbol] = q.seq
            into = self._image if self._image is not None and q.symbol in self._image else None
            if into is None:
                into = self._pending
            if q.symbol in into:
                self.conflated += 1
            into[q.symbol] = q
            self._cond.notify_all()

    def image(self) -> list[Quote]:
        """The image (empty: no watched symbol had a quote), once; later calls: []."""
        with self._cond:
            out = list(self._image.values()) if self._image else []
            self._image = None
            return out

    def get(self, timeout: float | None = None) -> list[Quote]:
        """The quotes pending (the image first, if ``image`` did not take it); waits up to
        ``timeout`` for one (an empty list: none came, or the watch was closed)."""
        with self._cond:
            if not self._image and not self._pending and not self.closed:
                self._cond.wait(timeout)
            out = list(self._image.values()) if self._image else []
            out += self._pending.values()
            self._image = None
            self._pending.clear()
            return out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self.view._unwatch(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorldView:
    """The aggregation, pure Python: ``apply(venue, events)`` with a venue's ``EVENT``
    records (one or a batch), ``load`` with a venue's snapshot; ``quote(symbol)``."""

    def __init__(self, venues: Sequence[str], symbols: Iterable[str] | None = None):
        if not venues:
            raise ValueError("a world view needs at least one venue")
        if len(set(venues)) != len(venues):
            raise ValueError(f"venues {list(venues)}: a venue twice")
        self.venues = {name: Venue(name) for name in venues}
        self.order = list(venues)
        self.symbols = frozenset(check_symbol(s) for s in symbols) if symbols else None
        self.quotes: dict[str, Quote] = {}
        self.seq = 0
        self._lock = threading.Lock()  # the watchers' list
        self._watches: list[Watch] = []

    # --- reading ---
    def quote(self, symbol: str) -> Quote | None:
        """The symbol's consolidated quote; None when no venue's directory names it."""
        return self.quotes.get(check_symbol(symbol))

    def known(self) -> list[str]:
        return sorted(self.quotes)

    def status(self) -> dict:
        return {"seq": self.seq, "venues": [self.venues[n].status() for n in self.order]}

    def watch(self, symbols: Iterable[str] | None = None, image: bool = True) -> Watch:
        """Follow the quote changes of ``symbols`` (None: all); ``image``: the current
        quotes of those symbols are pending at once (a snapshot, then the changes)."""
        syms = frozenset(check_symbol(s) for s in symbols) if symbols else None
        w = Watch(self, syms)
        with self._lock:
            self._watches.append(w)
            if image:
                names = sorted(syms) if syms is not None else self.known()
                w._start((q for q in map(self.quotes.get, names) if q is not None), self.seq)
        return w

    def _unwatch(self, w: Watch) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._watches.remove(w)

    # --- changing ---
    def load(
        self,
        venue: str,
        bbo: np.ndarray,
        stocks: np.ndarray,
        stale: bool = False,
        lines: dict | None = None,
        ended: bool = False,
        seq: int = 0,
    ) -> list[Quote]:
        """Replace what the world view knows of ``venue`` with a snapshot: ``bbo``
        (locate, side, (price, shares)) and ``stocks`` (``book.STOCK`` per locate: the
        directory and trading states). Returns the quotes that changed."""
        v = self.venues[venue]
        before = set(v.locate)
        v.bbo[:] = bbo
        v.state[:] = stocks["state"]
        v.symbol.clear()
        v.locate.clear()
        for loc in np.nonzero(stocks["named"])[0]:
            self._name(v, int(loc), ev.symbol_text(int(stocks["symbol"][loc])))
        v.stale, v.ended, v.last_seq = bool(stale), bool(ended), int(seq)
        v.lines = dict(lines or {"A": "unknown", "B": "unknown"})
        v.joined = True
        v.snapshots += 1
        return self._recompute(before | set(v.locate), {})

    def leave(self, venue: str) -> list[Quote]:
        """Forget ``venue`` (it cannot be followed any more): out of every quote."""
        v = self.venues[venue]
        before = set(v.locate)
        v.bbo[:] = 0
        v.state[:] = 0
        v.symbol.clear()
        v.locate.clear()
        v.joined = False
        return self._recompute(before, {})

    def _name(self, v: Venue, loc: int, sym: str) -> str | None:
        if self.symbols is not None and sym not in self.symbols:
            return None
        old = v.symbol.get(loc)
        if old is not None and v.locate.get(old) == loc:
            del v.locate[old]
        v.symbol[loc] = sym
        v.locate[sym] = loc
        return old

    def apply(self, venue: str, events: np.ndarray) -> list[Quote]:
        """Apply ``venue``'s events (``EVENT`` records, in ring order); returns the quotes
        that changed (each symbol once, its latest)."""
        v = self.venues[venue]
        events = np.atleast_1d(events)
        v.events += len(events)
        if not len(events):
            return []
        v.last_seq = int(events["seq"][-1])
        recs = events[np.isin(events["kind"], KINDS)]
        touched: set[str] = set()
        stamps: dict[str, tuple[int, int]] = {}
        whole = False  # a venue-wide change: every symbol of the venue
        for r in recs.tolist():
            kind, loc = r[_KIND], r[_LOC]
            if kind == ev.BBO:
                sym = v.symbol.get(loc)
                if sym is None:
                    continue
                side = r[_SIDE] & 1
                v.bbo[loc, side, 0] = r[_PRICE]
                v.bbo[loc, side, 1] = r[_VALUE]
                touched.add(sym)
                stamps[sym] = (r[_ITCH], r[_RX])
            elif kind == ev.INSTRUMENT:
                code = r[_CODE]
                if code == 82:  # R: the directory
                    sym = ev.symbol_text(r[_VALUE])
                    if v.symbol.get(loc) != sym:
                        old = self._name(v, loc, sym)
                        if old is not None:
                            touched.add(old)
                        if v.symbol.get(loc) == sym:
                            touched.add(sym)
                            stamps[sym] = (r[_ITCH], r[_RX])
                elif code == 72:  # H: trading action
                    v.state[loc] = r[_N]
                    sym = v.symbol.get(loc)
                    if sym is not None:
                        touched.add(sym)
                        stamps[sym] = (r[_ITCH], r[_RX])
            elif kind == ev.CHANNEL:
                code = r[_CODE]
                if code in (ev.CH_BOOKS_STALE, ev.CH_GAP_UNRECOVERABLE):
                    whole |= not v.stale
                    v.stale = True
                elif ev.CH_LINE_UP <= code <= ev.CH_LINE_DOWN and r[_SIDE] < 2:
                    v.lines["AB"[r[_SIDE]]] = ("up", "stale", "down")[code - ev.CH_LINE_UP]
                    whole = True
                elif code == ev.CH_END_OF_SESSION:
                    whole |= not v.ended
                    v.ended = True
        if whole:
            touched |= set(v.locate)
        return self._recompute(touched, stamps)

    def _consolidate(self, sym: str) -> Quote:
        best = [0, 0]  # bid: highest price; ask: lowest
        at: list[list[tuple[str, int]]] = [[], []]
        excluded = []
        for name in self.order:
            v = self.venues[name]
            loc = v.locate.get(sym)
            if loc is None:
                continue
            why = v.out(loc)
            if why is not None:
                excluded.append((name, why))
                continue
            for side in (0, 1):
                px, qty = int(v.bbo[loc, side, 0]), int(v.bbo[loc, side, 1])
                if qty <= 0:
                    continue
                better = not at[side] or (px > best[side] if side == 0 else px < best[side])
                if better:
                    best[side], at[side] = px, [(name, qty)]
                elif px == best[side]:
                    at[side].append((name, qty))
        return Quote(
            sym,
            best[0],
            sum(n for _, n in at[0]),
            best[1],
            sum(n for _, n in at[1]),
            tuple(at[0]),
            tuple(at[1]),
            tuple(excluded),
        )

    def _recompute(self, symbols: Iterable[str], stamps: dict) -> list[Quote]:
        changed = []
        now = time.monotonic_ns()
        for sym in sorted(symbols):
            q = self._consolidate(sym)
            old = self.quotes.get(sym)
            if not any(self.venues[n].locate.get(sym) is not None for n in self.order):
                if old is not None:  # no venue names it any more
                    del self.quotes[sym]
                continue
            if q.same_book(old):
                continue
            self.seq += 1
            itch, rx = stamps.get(sym, (0, 0))
            q = Quote(
                **{
                    **q.__dict__,
                    "update": (old.update if old else 0) + 1,
                    "seq": self.seq,
                    "itch_ns": itch,
                    "rx_ns": rx,
                    "world_ns": now,
                }
            )
            self.quotes[sym] = q
            changed.append(q)
        if changed and self._watches:
            with self._lock:
                for w in self._watches:
                    for q in changed:
                        w.offer(q)
        return changed


# --- the process loop: follow the venues' rings -------------------------------------------------
class Aggregator:
    """Follows each venue's event ring with a ``Subscriber`` and feeds ``view``. A venue
    that cannot be followed yet (no channel, its consumer not running) is tried again
    every ``retry_s``; a lapped one (or a restarted consumer) joins again by a snapshot."""

    def __init__(
        self,
        view: WorldView,
        root: Path | None = None,
        retry_s: float = 0.5,
        log=None,
    ):
        self.view, self.root, self.retry_s = view, root, retry_s
        self.log = log or (lambda msg: None)
        self.subs: dict = {}
        self._next_try = dict.fromkeys(view.order, 0.0)
        self._said: set[str] = set()  # venues whose "not followed yet" was logged
        self.laps = dict.fromkeys(view.order, 0)

    def _join(self, name: str) -> None:
        from dataplane.subscriber import Subscriber

        sub = self.subs.get(name)
        if sub is None:
            sub = Subscriber(name, sorted(self.view.symbols) if self.view.symbols else None)
            self.subs[name] = sub
        snap = sub.snapshot()
        self.view.load(
            name, sub.bbo_table, sub.stocks, snap.stale, snap.lines, bool(snap.eos), snap.seq
        )
        self.log(f"venue {name}: joined at sequence {snap.seq}")

    def _try_join(self, name: str, now: float) -> None:
        if now < self._next_try[name]:
            return
        try:
            self._join(name)
        except (OSError, RuntimeError, ValueError, TimeoutError, ev.Lapped) as e:
            self._next_try[name] = now + self.retry_s
            if self.view.venues[name].joined:  # it was followed: out until it is again
                self.view.leave(name)
            if name not in self._said:
                self.log(f"venue {name}: not followed ({e}); trying again")
                self._said.add(name)
            sub = self.subs.pop(name, None)
            if sub is not None:
                sub.close()
        else:
            self._said.discard(name)

    def step(self) -> int:
        """Poll every venue once; returns the events read."""
        n = 0
        now = time.monotonic()
        for name in self.view.order:
            if not self.view.venues[name].joined:
                self._try_join(name, now)
                continue
            sub = self.subs[name]
            try:
                got = sub.poll()
            except ev.Lapped as e:
                self.laps[name] += 1
                self.log(f"venue {name}: {e}")
                self._next_try[name] = 0.0
                self._try_join(name, now)  # a new snapshot replaces the venue wholesale
                continue
            if len(got):
                n += len(got)
                self.view.apply(name, got)
        return n

    def run(self, stop: threading.Event, idle_s: float = 0.0005) -> None:
        while not stop.is_set():
            if not self.step():
                time.sleep(idle_s)

    def close(self) -> None:
        for sub in self.subs.values():
            sub.close()
        self.subs.clear()


# --- gRPC ---------------------------------------------------------------------------------------
def to_pb(q: Quote):
    from host.appliance import worldview_pb2 as pb

    return pb.Quote(
        symbol=q.symbol,
        bid_price=q.bid_px,
        bid_size=q.bid_qty,
        ask_price=q.ask_px,
        ask_size=q.ask_qty,
        bids=[pb.VenueSize(venue=v, size=n) for v, n in q.bids],
        asks=[pb.VenueSize(venue=v, size=n) for v, n in q.asks],
        excluded=[pb.Exclusion(venue=v, reason=why) for v, why in q.excluded],
        update=q.update,
        seq=q.seq,
        itch_ns=q.itch_ns,
        rx_ns=q.rx_ns,
        world_ns=q.world_ns,
    )


def from_pb(m) -> Quote:
    return Quote(
        m.symbol,
        m.bid_price,
        m.bid_size,
        m.ask_price,
        m.ask_size,
        tuple((x.venue, x.size) for x in m.bids),
        tuple((x.venue, x.size) for x in m.asks),
        tuple((x.venue, x.reason) for x in m.excluded),
        m.update,
        m.seq,
        m.itch_ns,
        m.rx_ns,
        m.world_ns,
    )


def _servicer_base():
    from host.appliance import worldview_pb2_grpc as pbg

    return pbg.WorldViewServicer


class Service(_servicer_base()):
    """The ``WorldView`` service over a ``WorldView`` (its methods run in gRPC's threads;
    the aggregator's thread changes the view: quotes are immutable, read whole). At most
    ``max_watchers`` ``WatchBBO`` streams at once; one more is refused (RESOURCE_EXHAUSTED)
    and counted."""

    def __init__(self, view: WorldView, poll_s: float = 0.2, max_watchers: int = 64):
        self.view, self.poll_s, self.max_watchers = view, poll_s, max_watchers
        self.stopping = threading.Event()
        self._count_lock = threading.Lock()
        self.watchers = 0  # WatchBBO streams being served
        self.refused = 0  # WatchBBO streams refused (max_watchers)

    def _admit(self) -> bool:
        with self._count_lock:
            if self.watchers >= self.max_watchers:
                self.refused += 1
                return False
            self.watchers += 1
            return True

    def _left(self) -> None:
        with self._count_lock:
            self.watchers -= 1

    def _symbol(self, text: str, context) -> str:
        import grpc

        try:
            return check_symbol(text)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def GetBBO(self, request, context):  # noqa: N802 - the .proto's names
        import grpc

        sym = self._symbol(request.symbol, context)
        q = self.view.quotes.get(sym)
        if q is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{sym}: no venue's directory names it")
        return to_pb(q)

    def WatchBBO(self, request, context):  # noqa: N802
        import grpc

        from host.appliance import worldview_pb2 as pb

        syms = [self._symbol(s, context) for s in request.symbols] or None
        if not self._admit():
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many watchers ({self.max_watchers}, world_view.max_watchers)",
            )
        once = threading.Lock()  # the RPC's end and the generator's may both come

        def left() -> None:
            if once.acquire(blocking=False):
                self._left()

        if not context.add_callback(left):  # already over
            left()
            return
        try:
            with self.view.watch(syms) as w:
                context.add_callback(w.close)
                for q in w.image():
                    yield to_pb(q)
                if request.image_end:
                    yield pb.Quote(image_end=True, seq=w.image_seq, world_ns=time.monotonic_ns())
                while context.is_active() and not self.stopping.is_set():
                    for q in w.get(self.poll_s):
                        yield to_pb(q)
        finally:
            left()

    def GetVenues(self, request, context):  # noqa: N802
        from host.appliance import worldview_pb2 as pb

        st = self.view.status()
        return pb.Venues(
            seq=st["seq"],
            venues=[
                pb.Venue(
                    name=v["name"],
                    joined=v["joined"],
                    stale=v["stale"],
                    ended=v["ended"],
                    line_a=v["lines"]["A"],
                    line_b=v["lines"]["B"],
                    last_seq=v["last_seq"],
                    events=v["events"],
                    snapshots=v["snapshots"],
                    symbols=v["symbols"],
                )
                for v in st["venues"]
            ],
        )


def start_server(view: WorldView, listen: str, max_watchers: int = 64):
    """A gRPC server of ``view`` on ``listen`` ("host:port"; port 0: any), started.
    Returns ``(server, service, port)``; ``stop_server`` ends it."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from host.appliance import worldview_pb2_grpc as pbg

    service = Service(view, max_watchers=max_watchers)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_watchers + 4, thread_name_prefix="world-rpc"),
        maximum_concurrent_rpcs=max_watchers + 4,
    )
    pbg.add_WorldViewServicer_to_server(service, server)
    port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"world_view.listen: cannot listen on {listen}")
    server.start()
    return server, service, port


def stop_server(server, service: Service, grace: float = 1.0) -> None:
    service.stopping.set()
    server.stop(grace).wait()


class Client:
    """A blocking client of a world view (``tickwire world --get/--watch``)."""

    def __init__(self, address: str, timeout: float = 10.0):
        import grpc

        from host.appliance import worldview_pb2_grpc as pbg

        self.timeout = timeout
        self.channel = grpc.insecure_channel(address)
        self.stub = pbg.WorldViewStub(self.channel)

    @staticmethod
    @contextlib.contextmanager
    def _errors():
        """gRPC errors as the project's: ``KeyError`` (NOT_FOUND), ``ValueError``
        (INVALID_ARGUMENT), ``ConnectionError`` (the rest: unreachable, ...)."""
        import grpc

        try:
            yield
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(e.details()) from None
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from None
            raise ConnectionError(f"world view: {e.code().name}: {e.details()}") from None

    def get(self, symbol: str) -> Quote:
        """The symbol's quote; ``KeyError`` when no venue lists it."""
        from host.appliance import worldview_pb2 as pb

        with self._errors():
            return from_pb(self.stub.GetBBO(pb.GetRequest(symbol=symbol), timeout=self.timeout))

    def venues(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        from host.appliance import worldview_pb2 as pb

        with self._errors():
            got = self.stub.GetVenues(pb.VenuesRequest(), timeout=self.timeout)
        return MessageToDict(got, always_print_fields_with_no_presence=True)

    def watch(self, symbols: Iterable[str] | None = None, on_image_end=None):
        """Yield ``Quote``s: the current ones (the image), then every change (conflated);
        ``on_image_end()`` is called once the image is out (before the first change)."""
        from host.appliance import worldview_pb2 as pb

        req = pb.WatchRequest(symbols=list(symbols or ()), image_end=on_image_end is not None)
        stream = self.stub.WatchBBO(req)
        try:
            with self._errors():
                for m in stream:
                    if m.image_end:
                        if on_image_end is not None:
                            on_image_end()
                        continue
                    yield from_pb(m)
        finally:
            stream.cancel()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def aio_watch(address: str, symbols: Iterable[str] | None = None, on_image_end=None):
    """An asyncio stream of ``Quote``s from the world view at ``address`` (the current
    ones, then every change, conflated): what an asyncio server -- the WebSocket feed --
    forwards as a channel of its own (``Quote.seq`` is that channel's sequence).
    ``on_image_end()`` is called once the current ones are out (as ``Client.watch``)."""
    import grpc

    from host.appliance import worldview_pb2 as pb
    from host.appliance import worldview_pb2_grpc as pbg

    req = pb.WatchRequest(symbols=list(symbols or ()), image_end=on_image_end is not None)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pbg.WorldViewStub(channel)
        async for m in stub.WatchBBO(req):
            if m.image_end:
                if on_image_end is not None:
                    on_image_end()
                continue
            yield from_pb(m)


# --- metrics ------------------------------------------------------------------------------------
class WorldCollector:
    """``tickwire_world_*`` from the view's and the service's counters at scrape time."""

    def __init__(self, view: WorldView, service: Service | None = None):
        self.view, self.service = view, service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self.view
        venues = [view.venues[name] for name in view.order]
        n = GaugeMetricFamily("tickwire_world_venues", "Venues (channels) the world view follows")
        n.add_metric([], len(venues))
        yield n

        def per_venue(kind, name: str, doc: str, value):
            m = kind(name, doc, labels=["venue"])
            for v in venues:
                m.add_metric([v.name], value(v))
            return m

        yield per_venue(
            GaugeMetricFamily,
            "tickwire_world_venue_joined",
            "1: the venue is followed (a snapshot taken), 0: not (yet, or no longer)",
            lambda v: int(v.joined),
        )
        yield per_venue(
            GaugeMetricFamily,
            "tickwire_world_venue_in",
            "1: the venue counts in the quotes (followed, books whole, a line up or its "
            "session ended; a symbol's halt aside), 0: out of every quote",
            lambda v: int(v.joined and v.venue_out() is None),
        )
        yield per_venue(
            GaugeMetricFamily,
            "tickwire_world_venue_stale",
            "1: the venue's books are not whole (out of every quote)",
            lambda v: int(v.stale),
        )
        yield per_venue(
            GaugeMetricFamily,
            "tickwire_world_venue_ended",
            "1: the venue's end of session was announced",
            lambda v: int(v.ended),
        )
        lines = GaugeMetricFamily(
            "tickwire_world_venue_line_state",
            "The venue's lines as its events say: 0 up, 1 stale, 2 down, -1 unknown",
            labels=["venue", "line"],
        )
        for v in venues:
            for letter, state in dict(v.lines).items():
                lines.add_metric([v.name, letter], linehealth.STATE_CODE.get(state, -1))
        yield lines
        yield per_venue(
            CounterMetricFamily,
            "tickwire_world_events",
            "Events read from the venue's ring",
            lambda v: v.events,
        )
        yield per_venue(
            CounterMetricFamily,
            "tickwire_world_snapshots",
            "Snapshots of the venue taken (more than one: lapped, or its consumer restarted)",
            lambda v: v.snapshots,
        )
        yield per_venue(
            GaugeMetricFamily,
            "tickwire_world_venue_symbols",
            "Tickers in the venue's directory (those the world view keeps)",
            lambda v: len(v.locate),
        )
        seq = CounterMetricFamily(
            "tickwire_world_quote_changes",
            "Consolidated quote changes, every symbol (the world view's seq)",
        )
        seq.add_metric([], view.seq)
        yield seq
        quotes = list(view.quotes.copy().values())  # the aggregator's thread changes it
        syms = GaugeMetricFamily("tickwire_world_symbols", "Symbols with a consolidated quote")
        syms.add_metric([], len(quotes))
        yield syms
        out = dict.fromkeys(REASONS, 0)
        for q in quotes:
            for _, why in q.excluded:
                out[why] = out.get(why, 0) + 1
        excl = GaugeMetricFamily(
            "tickwire_world_exclusions",
            "Venues out of a symbol's quote now ((symbol, venue) pairs), by reason",
            labels=["reason"],
        )
        for why, k in out.items():
            excl.add_metric([why], k)
        yield excl
        if self.service is not None:
            w = GaugeMetricFamily("tickwire_world_watchers", "WatchBBO streams being served")
            w.add_metric([], self.service.watchers)
            yield w
            r = CounterMetricFamily(
                "tickwire_world_watchers_refused",
                "WatchBBO streams refused: world_view.max_watchers were being served",
            )
            r.add_metric([], self.service.refused)
            yield r


def registry(view: WorldView, service: Service | None = None):
    """A registry of its own holding the world view's collector (nothing process-wide)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(WorldCollector(view, service))
    return reg


def start_metrics(address: str, view: WorldView, service: Service | None = None):
    """The ``tickwire_world_*`` endpoint on ``address`` ("host:port"), started in a
    thread. Returns ``(httpd, port)``; ``httpd.shutdown()`` ends it."""
    from prometheus_client import start_http_server

    from host import config as hc

    host, port = hc.host_port(address, "world_view.metrics")
    httpd, _thread = start_http_server(port, host, registry(view, service))
    return httpd, port


# --- the process --------------------------------------------------------------------------------
def serve(
    venues: Sequence[str],
    listen: str,
    symbols: Iterable[str] | None = None,
    max_watchers: int = 64,
    stop: threading.Event | None = None,
    log=None,
    metrics: str = "",
) -> dict:
    """``tickwire world``: follow ``venues`` and serve their world view on ``listen`` until
    ``stop`` is set (SIGTERM and SIGINT set it), and its metrics on ``metrics`` ("host:port";
    "" none). Returns the venues' final state."""
    import signal
    import sys

    def say(msg: str) -> None:
        print(f"tickwire world: {msg}", file=sys.stderr, flush=True)

    log = log or say
    stop = stop or threading.Event()
    view = WorldView(list(venues), symbols)
    agg = Aggregator(view, log=log)
    server, service, port = start_server(view, listen, max_watchers)
    httpd = None
    if metrics:
        try:
            httpd = start_metrics(metrics, view, service)[0]
        except BaseException:
            stop_server(server, service)
            raise
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: stop.set())
    host = listen.rpartition(":")[0]
    log(
        f"serving the world view of {', '.join(view.order)} on {host}:{port}"
        + (f"; metrics on http://{metrics}/metrics" if httpd else "")
    )
    try:
        agg.run(stop)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        stop_server(server, service)
        agg.close()
    return view.status()
