"""``tw-v1``: the feed server's binary WebSocket frames -- the one codec of the server
(``feed``), the client (``feedclient``) and the tests -- and the subscription query.

The stream's sequence is the channel's **event number**: the position of an event in the
channel's event ring (0, 1, 2, ... since the consumer created the ring; ``dataplane.events``).
Every change of the books is exactly one event number, so a cursor names a point of the
stream exactly, even between two events caused by the same ITCH message. Each event record
also carries the MoldUDP64 sequence of the message that caused it (``seq``). A ring belongs to
one run of the consumer: ``generation`` (in ``HELLO``) names it, and a cursor is only
meaningful within one generation.

Subscription (the WebSocket URL's query; each parameter at most once, no others)::

    ws[s]://host:port/feed?channel=C&symbols=AAPL,MSFT&kinds=bbo,levels,trades,orders&snapshot=1
    ws[s]://host:port/feed?channel=C&from_seq=N

- ``channel``: the channel's name (default: the server's first channel);
- ``symbols``: tickers or locates, comma-separated (default: every stock);
- ``kinds``: any of ``bbo`` (BBO events), ``levels`` (LEVEL), ``trades`` (TRADE), ``orders``
  (ORDER_*; only when the consumer publishes them) -- default all; channel events and the
  instrument events (stock directory, trading action, Reg SHO) of the followed stocks always
  come;
- ``snapshot=1``: the followed stocks' levels and directory first, then every event after the
  image with no gap; ``from_seq=N``: every event from event number N on, replayed from the
  server's retention window (``ERROR`` ``E_CURSOR_OLD`` when N is older than the window);
  neither: live from the server's current position. Both together: rejected.

The token, when the server wants one, goes in the ``Authorization: Bearer <token>`` header.
The server refuses a bad query (HTTP 400), a missing or wrong token (401), an unknown channel
or one without an event ring (404), and a connection past ``max_clients`` (503), each with a
one-line reason as the body, before any frame.

Every frame is one binary WebSocket message: a 24-byte header, then the type's body. All
integers little-endian.

==========  ======  ========================================================================
header      bytes   field
==========  ======  ========================================================================
version     u8      ``VERSION`` (1): a frame of another version is refused by the decoder
type        u8      one of the frame types below
flags       u16     ``F_IMAGE`` (1) on the ``QUOTES`` frames of a ``world`` image, else 0
count       u32     records in the body (``EVENTS``, ``SNAP_*``), else 0
seq         i64     the channel's event number at this frame (per type, below)
end         i64     a second event number (per type, below), else 0
==========  ======  ========================================================================

Frame types, in the order a connection sees them:

``HELLO`` (1)
    first frame. ``seq``: the event number the stream starts at (the snapshot's position,
    ``from_seq``, or the server's position for a live join); ``end``: the newest event the
    server has read. Body: ``generation`` i64 (the ring's creation stamp: a new value means
    the consumer restarted and older cursors mean nothing), ``oldest`` i64 (the first event
    number still in the retention window), ``heartbeat_ms`` u32, ``kinds`` u32 (the ``K_*``
    bits granted), then the channel's name (UTF-8, the rest of the body).
``SNAP_BEGIN`` (2)
    ``snapshot=1`` only. ``seq``: the ring position right after the image (the first event
    that follows it). Body: ``last_seq`` i64 (the last MoldUDP64 sequence in the image),
    ``eos`` i64 (the end of session's next sequence when the image is past it, else 0),
    ``stale`` u8, ``line_a`` u8, ``line_b`` u8 (0 unknown, 1 up, 2 stale, 3 down), 5 bytes
    padding, ``levels`` u32, ``stocks`` u32 (rows to come in ``SNAP_LEVELS``/``SNAP_STOCKS``).
``SNAP_STOCKS`` (3)
    ``count`` ``STOCK_REC`` records (12 bytes): ``locate`` u16, ``state`` u8 (trading state
    byte, 0 unknown), ``regsho`` u8, ``symbol`` u64 (8 ASCII bytes, space padded, as the
    book stores it: ``dataplane.subscriber.pack_symbol``). ``seq`` as ``SNAP_BEGIN``.
``SNAP_LEVELS`` (4)
    ``count`` ``LEVEL_REC`` records (20 bytes): ``locate`` u16, ``side`` u8 (0 bid, 1 ask),
    pad u8, ``price`` u32 (ITCH's raw price), ``shares`` i64 (the level's aggregate),
    ``orders`` u32. Rows sorted as ``tickwire book``'s digest; ``seq`` as ``SNAP_BEGIN``.
``SNAP_END`` (5)
    ``seq`` as ``SNAP_BEGIN``; ``count``: the level rows sent in all.
``EVENTS`` (6)
    ``count`` ``WIRE_EVENT`` records (56 bytes each: ``dataplane.events.EVENT`` without its
    8-byte seqlock version, same fields and offsets minus 8): ``seq`` i64 (MoldUDP64),
    ``itch_ns`` i64, ``rx_ns`` i64, ``apply_dt`` u32, ``pub_dt`` u32, ``locate`` u16, ``kind``
    u8, ``side`` u8, ``code`` u8, ``flags`` u8, reserved u16, ``price`` u32, ``n`` u32,
    ``value`` i64 -- meanings per kind in ``dataplane.events``. The frame covers event numbers
    ``[seq, end)``: its records are the subscribed ones among them, in order; the others were
    filtered out. ``seq`` always equals the previous ``EVENTS`` frame's ``end`` (or
    ``HELLO``'s ``seq``): a client checks that and so sees any gap or duplicate.
``HEARTBEAT`` (7)
    sent after ``heartbeat_ms`` without a frame. ``seq``: the end of the last ``EVENTS`` frame
    (the client's next expected number); ``end``: the server's newest event read. Body:
    ``server_ns`` i64 (the server's CLOCK_MONOTONIC).
``ERROR`` (8)
    then the server closes. ``seq``: the client's next expected number. Body: ``code`` u16
    (``E_*``), then the reason (UTF-8). ``E_QUEUE_FULL`` and ``E_STALLED`` are evictions of a
    client that fell behind: it may reconnect with ``from_seq = seq``.
``END`` (9)
    the session ended (after the ``EVENTS`` frame holding the end-of-session channel event);
    the server then closes normally. ``seq``: the next event number. Body: ``next_seq`` i64,
    the MoldUDP64 sequence the exchange announced as the session's end.

The ``world`` channel (``channel=world``, when the server is given a world view:
``feed_server.world``) is the cross-venue consolidated quote of ``host.appliance.worldview``,
one quote per symbol, as the world view's ``WatchBBO`` streams it to the server over gRPC.
Its sequence is the world view's ``seq`` (its count of quote changes, every symbol), not an
event number. The stream is **conflated**: a symbol's quote is its latest, changes in
between may be skipped (``update`` shows how many), so there is nothing to replay:
``from_seq`` and ``kinds`` are refused (400); ``symbols`` (tickers) filters;
``snapshot=1`` sends every followed symbol's current quote first (the quotes the server
holds: in the moment after it connected to the world view, the rest of the world view's
own image may still be on its way, and comes as live quotes). A connection sees:

``HELLO`` (1)
    ``seq`` and ``end``: the world view's ``seq`` when the client joined; ``generation``: the
    server's connection to the world view (a new value after it reconnected: the world
    view's ``seq`` may have started again); ``oldest`` 0; ``kinds`` 0; channel ``world``.
``VENUES`` (10)
    ``count`` venues, the body their names (UTF-8, one a line, ``\n`` between): the world
    view's venue order, which the ``QUOTES`` records' per-venue arrays follow.
``QUOTES`` (11)
    ``count`` ``quote_dtype(venues)`` records (72 + 17 x venues bytes): ``symbol`` 8 ASCII
    bytes (space padded), ``bid_px`` u32, ``ask_px`` u32 (ITCH Price(4); 0: empty side),
    ``bid_qty`` i64, ``ask_qty`` i64 (the shares at the best price, every venue at it),
    ``update`` u64 (this symbol's changes so far), ``seq`` u64 (the world view's ``seq`` at
    this change), ``itch_ns`` i64, ``rx_ns`` i64, ``world_ns`` i64 (the stamps of
    ``worldview.Quote``), then per venue, in ``VENUES`` order: ``bid`` i64 x venues (its size at
    the best bid; 0: not at it), ``ask`` i64 x venues, ``out`` u8 x venues (0: in, or it does
    not list the symbol; else why it is out of the quote: 1 halted, 2 paused, 3
    quotation_only, 4 stale, 5 lines_down, another value: the trading state's ASCII letter).
    ``seq``: the highest world ``seq`` the server has seen; a symbol's ``update`` only grows.
    ``flags`` ``F_IMAGE``: the quotes of the ``snapshot=1`` image (then ``SNAP_END``, ``seq``
    the image's world ``seq``, ``count`` the quotes in it); live changes follow, each newer
    than the image.
``HEARTBEAT`` (7), ``ERROR`` (8)
    as above, ``seq`` the world ``seq`` last sent. ``E_WORLD``: the server lost the world
    view (or reconnected to it): join again with ``snapshot=1``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from dataplane import events as ev

VERSION = 1
NAME = "tw-v1"

HELLO = 1
SNAP_BEGIN = 2
SNAP_STOCKS = 3
SNAP_LEVELS = 4
SNAP_END = 5
EVENTS = 6
HEARTBEAT = 7
ERROR = 8
END = 9
VENUES = 10
QUOTES = 11
TYPE_NAMES = {
    HELLO: "hello",
    SNAP_BEGIN: "snap_begin",
    SNAP_STOCKS: "snap_stocks",
    SNAP_LEVELS: "snap_levels",
    SNAP_END: "snap_end",
    EVENTS: "events",
    HEARTBEAT: "heartbeat",
    ERROR: "error",
    END: "end",
    VENUES: "venues",
    QUOTES: "quotes",
}
F_IMAGE = 1  # header flag: QUOTES of a snapshot image

# error codes
E_BAD_QUERY = 1
E_CURSOR_OLD = 2  # from_seq older than the retention window
E_CURSOR_AHEAD = 3  # from_seq past the newest event the channel published
E_QUEUE_FULL = 4  # eviction: the client's send queue filled
E_STALLED = 5  # eviction: a write stalled past stall_timeout_s
E_RESTARTED = 6  # the consumer restarted (a new ring): cursors of the old one are void
E_LAPPED = 7  # the server's own reader was lapped by the ring: its stream has a hole
E_SHUTDOWN = 8  # the server is stopping
E_SNAPSHOT = 9  # the consumer did not answer the snapshot request
E_WORLD = 10  # the server lost (or reconnected to) the world view
ERROR_NAMES = {
    E_BAD_QUERY: "bad_query",
    E_CURSOR_OLD: "cursor_old",
    E_CURSOR_AHEAD: "cursor_ahead",
    E_QUEUE_FULL: "queue_full",
    E_STALLED: "stalled",
    E_RESTARTED: "restarted",
    E_LAPPED: "lapped",
    E_SHUTDOWN: "shutdown",
    E_SNAPSHOT: "snapshot",
    E_WORLD: "world",
}
EVICTIONS = (E_QUEUE_FULL, E_STALLED)

# kinds a subscription may ask for
K_BBO = 1
K_LEVELS = 2
K_TRADES = 4
K_ORDERS = 8
K_ALL = K_BBO | K_LEVELS | K_TRADES | K_ORDERS
KIND_BITS = {"bbo": K_BBO, "levels": K_LEVELS, "trades": K_TRADES, "orders": K_ORDERS}
# the K_* bit an event kind needs (0: always sent -- channel and instrument events)
KIND_NEEDS = np.zeros(256, np.uint32)
KIND_NEEDS[ev.BBO] = K_BBO
KIND_NEEDS[ev.LEVEL] = K_LEVELS
KIND_NEEDS[ev.TRADE] = K_TRADES
for _k in (ev.ORDER_ADD, ev.ORDER_EXEC, ev.ORDER_CANCEL, ev.ORDER_DELETE):
    KIND_NEEDS[_k] = K_ORDERS

HEADER = struct.Struct("<BBHIqq")
_HELLO = struct.Struct("<qqII")
_SNAP = struct.Struct("<qqBBB5xII")
_I64 = struct.Struct("<q")
_U16 = struct.Struct("<H")

WIRE_EVENT = np.dtype(
    {
        "names": [n for n in ev.EVENT.names if n != "version"],
        "formats": [ev.EVENT.fields[n][0].newbyteorder("<") for n in ev.EVENT.names[1:]],
        "offsets": [ev.EVENT.fields[n][1] - 8 for n in ev.EVENT.names[1:]],
        "itemsize": ev.EVENT.itemsize - 8,
    }
)
assert WIRE_EVENT.itemsize == 56 and ev.EVENT.names[0] == "version"
STOCK_REC = np.dtype(
    [("locate", "<u2"), ("state", "u1"), ("regsho", "u1"), ("symbol", "<u8")], align=False
)
LEVEL_REC = np.dtype(
    [
        ("locate", "<u2"),
        ("side", "u1"),
        ("_pad", "u1"),
        ("price", "<u4"),
        ("shares", "<i8"),
        ("orders", "<u4"),
    ],
    align=False,
)
assert STOCK_REC.itemsize == 12 and LEVEL_REC.itemsize == 20


class WireError(ValueError):
    """Bytes that are not a ``tw-v1`` frame, or a query that is not a subscription."""


class Frame(NamedTuple):
    """A decoded frame: ``type`` (a frame type), the header's ``count``, ``seq``, ``end``,
    and ``body``: the type's fields as a dict, or a record array (``EVENTS``: ``EVENT``
    records with version 0; ``SNAP_STOCKS``: ``STOCK_REC``; ``SNAP_LEVELS``: ``LEVEL_REC``;
    ``VENUES``: a list of names; ``QUOTES``: ``quote_dtype`` records), and the header's
    ``flags``."""

    type: int
    count: int
    seq: int
    end: int
    body: object
    flags: int = 0


def _frame(
    t: int, seq: int, end: int = 0, count: int = 0, body: bytes = b"", flags: int = 0
) -> bytes:
    return HEADER.pack(VERSION, t, flags, count, seq, end) + body


def hello(
    seq: int, end: int, generation: int, oldest: int, heartbeat_ms: int, kinds: int, channel: str
) -> bytes:
    body = _HELLO.pack(generation, oldest, heartbeat_ms, kinds) + channel.encode()
    return _frame(HELLO, seq, end, 0, body)


def snap_begin(
    seq: int, last_seq: int, eos: int, stale: bool, lines: tuple[int, int], levels: int, stocks: int
) -> bytes:
    body = _SNAP.pack(last_seq, eos, int(stale), lines[0], lines[1], levels, stocks)
    return _frame(SNAP_BEGIN, seq, 0, 0, body)


def snap_stocks(seq: int, recs: np.ndarray) -> bytes:
    recs = np.ascontiguousarray(recs, STOCK_REC)
    return _frame(SNAP_STOCKS, seq, 0, len(recs), recs.tobytes())


def snap_levels(seq: int, rows: np.ndarray) -> bytes:
    """``rows``: (locate, side, price, shares, orders) int rows, as a snapshot gives them."""
    rows = np.asarray(rows, np.int64).reshape(-1, 5)
    recs = np.zeros(len(rows), LEVEL_REC)
    for i, name in enumerate(("locate", "side", "price", "shares", "orders")):
        recs[name] = rows[:, i]
    return _frame(SNAP_LEVELS, seq, 0, len(recs), recs.tobytes())


def snap_end(seq: int, levels: int) -> bytes:
    return _frame(SNAP_END, seq, 0, levels)


def events(seq: int, end: int, records: np.ndarray) -> bytes:
    """An ``EVENTS`` frame covering event numbers ``[seq, end)`` with ``records`` (``EVENT``
    records: their version is dropped on the wire)."""
    n = len(records)
    buf = bytearray(HEADER.size + n * WIRE_EVENT.itemsize)
    HEADER.pack_into(buf, 0, VERSION, EVENTS, 0, n, seq, end)
    if n:
        dst = np.frombuffer(buf, np.uint8, offset=HEADER.size).reshape(n, WIRE_EVENT.itemsize)
        dst[:] = np.ascontiguousarray(records).view(np.uint8).reshape(n, ev.EVENT.itemsize)[:, 8:]
    return bytes(buf)


def heartbeat(seq: int, end: int, server_ns: int) -> bytes:
    return _frame(HEARTBEAT, seq, end, 0, _I64.pack(server_ns))


def error(seq: int, code: int, reason: str) -> bytes:
    return _frame(ERROR, seq, 0, 0, _U16.pack(code) + reason.encode())


def end(seq: int, next_seq: int) -> bytes:
    return _frame(END, seq, 0, 0, _I64.pack(next_seq))


def _records(buf, dtype: np.dtype, count: int) -> np.ndarray:
    if len(buf) - HEADER.size != count * dtype.itemsize:
        raise WireError(
            f"frame of {count} records of {dtype.itemsize} bytes has a body of "
            f"{len(buf) - HEADER.size} bytes"
        )
    return np.frombuffer(buf, dtype, count=count, offset=HEADER.size)


def to_events(wire: np.ndarray) -> np.ndarray:
    """``WIRE_EVENT`` records as ``EVENT`` records (version 0)."""
    out = np.zeros(len(wire), ev.EVENT)
    if len(wire):
        raw = np.ascontiguousarray(wire).view(np.uint8).reshape(len(wire), WIRE_EVENT.itemsize)
        out.view(np.uint8).reshape(len(wire), ev.EVENT.itemsize)[:, 8:] = raw
    return out


def decode(buf, venues: int = 0) -> Frame:
    """One frame (``venues``: the ``world`` stream's venue count, from its ``VENUES``
    frame, which ``QUOTES`` records need). Raises ``WireError`` on a short frame, another
    version, an unknown type or a body that does not match its header."""
    buf = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    if len(buf) < HEADER.size:
        raise WireError(f"frame of {len(buf)} bytes: shorter than the {HEADER.size}-byte header")
    version, t, flags, count, seq, end_ = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        raise WireError(f"frame version {version}: this client speaks {NAME} (version {VERSION})")
    body_len = len(buf) - HEADER.size
    o = HEADER.size
    try:
        if t == HELLO:
            g, oldest, hb, kinds = _HELLO.unpack_from(buf, o)
            name = bytes(buf[o + _HELLO.size :]).decode()
            body = {
                "generation": g,
                "oldest": oldest,
                "heartbeat_ms": hb,
                "kinds": kinds,
                "channel": name,
            }
        elif t == SNAP_BEGIN:
            if body_len != _SNAP.size:
                raise WireError(f"snap_begin body of {body_len} bytes, not {_SNAP.size}")
            last, eos, stale, la, lb, levels, stocks = _SNAP.unpack_from(buf, o)
            body = {
                "last_seq": last,
                "eos": eos,
                "stale": bool(stale),
                "lines": (la, lb),
                "levels": levels,
                "stocks": stocks,
            }
        elif t == SNAP_STOCKS:
            body = _records(buf, STOCK_REC, count)
        elif t == SNAP_LEVELS:
            body = _records(buf, LEVEL_REC, count)
        elif t == EVENTS:
            body = to_events(_records(buf, WIRE_EVENT, count))
        elif t in (SNAP_END,):
            body = None
        elif t == HEARTBEAT:
            body = {"server_ns": _I64.unpack_from(buf, o)[0]}
        elif t == ERROR:
            (code,) = _U16.unpack_from(buf, o)
            body = {"code": code, "reason": bytes(buf[o + 2 :]).decode(errors="replace")}
        elif t == END:
            body = {"next_seq": _I64.unpack_from(buf, o)[0]}
        elif t == VENUES:
            text = bytes(buf[o:]).decode()
            body = text.split("\n") if count else []
            if len(body) != count:
                raise WireError(f"venues frame of {count} venues names {len(body)}")
        elif t == QUOTES:
            if not venues:
                raise WireError("a quotes frame before the venues frame")
            body = _records(buf, quote_dtype(venues), count)
        else:
            raise WireError(f"unknown frame type {t}")
    except struct.error as e:
        raise WireError(f"{TYPE_NAMES.get(t, t)} frame: {e}") from None
    return Frame(t, count, seq, end_, body, flags)


def level_rows(recs: np.ndarray) -> np.ndarray:
    """``LEVEL_REC`` records as (locate, side, price, shares, orders) int64 rows."""
    out = np.zeros((len(recs), 5), np.int64)
    for i, name in enumerate(("locate", "side", "price", "shares", "orders")):
        out[:, i] = recs[name]
    return out


# --- the world channel ------------------------------------------------------------------------
WORLD = "world"  # the channel name of the consolidated quotes
OUT_CODES = {"halted": 1, "paused": 2, "quotation_only": 3, "stale": 4, "lines_down": 5}
OUT_NAMES = {v: k for k, v in OUT_CODES.items()}


def quote_dtype(venues: int) -> np.dtype:
    """The ``QUOTES`` record of a world view of ``venues`` venues (72 + 17 x venues bytes)."""
    return np.dtype(
        [
            ("symbol", "S8"),
            ("bid_px", "<u4"),
            ("ask_px", "<u4"),
            ("bid_qty", "<i8"),
            ("ask_qty", "<i8"),
            ("update", "<u8"),
            ("seq", "<u8"),
            ("itch_ns", "<i8"),
            ("rx_ns", "<i8"),
            ("world_ns", "<i8"),
            ("bid", "<i8", (venues,)),
            ("ask", "<i8", (venues,)),
            ("out", "u1", (venues,)),
        ]
    )


def venues(seq: int, names: list[str]) -> bytes:
    for n in names:
        if not n or "\n" in n:
            raise WireError(f"venue name {n!r}: empty or with a newline")
    return _frame(VENUES, seq, 0, len(names), "\n".join(names).encode())


def _out_code(reason: str) -> int:
    if reason in OUT_CODES:
        return OUT_CODES[reason]
    if reason.startswith("state_") and len(reason) == 7 and " " < reason[6] <= "~":
        return ord(reason[6])
    raise WireError(f"exclusion reason {reason!r} has no code")


def quotes(seq: int, names: list[str], qs, image: bool = False) -> bytes:
    """A ``QUOTES`` frame of ``worldview.Quote``s; ``names``: the venues, in ``VENUES``
    order; ``image``: the frame belongs to a ``snapshot=1`` image."""
    index = {n: i for i, n in enumerate(names)}
    recs = np.zeros(len(qs), quote_dtype(len(names)))
    for r, q in zip(recs, qs, strict=True):
        r["symbol"] = q.symbol.encode("ascii").ljust(8)
        for k in ("bid_px", "ask_px", "bid_qty", "ask_qty", "update", "seq"):
            r[k] = getattr(q, k)
        r["itch_ns"], r["rx_ns"], r["world_ns"] = q.itch_ns, q.rx_ns, q.world_ns
        for v, n in q.bids:
            r["bid"][index[v]] = n
        for v, n in q.asks:
            r["ask"][index[v]] = n
        for v, why in q.excluded:
            r["out"][index[v]] = _out_code(why)
    return _frame(QUOTES, seq, 0, len(recs), recs.tobytes(), F_IMAGE if image else 0)


def to_quotes(recs: np.ndarray, names: list[str]) -> list:
    """``QUOTES`` records as ``worldview.Quote``s (``names``: the ``VENUES`` frame's)."""
    from host.appliance.worldview import Quote

    out = []
    for r in recs:
        bid, ask, why = r["bid"], r["ask"], r["out"]
        out.append(
            Quote(
                r["symbol"].decode("ascii").rstrip(" "),
                int(r["bid_px"]),
                int(r["bid_qty"]),
                int(r["ask_px"]),
                int(r["ask_qty"]),
                tuple((names[i], int(bid[i])) for i in np.nonzero(bid)[0]),
                tuple((names[i], int(ask[i])) for i in np.nonzero(ask)[0]),
                tuple(
                    (names[i], OUT_NAMES.get(int(why[i]), f"state_{chr(why[i])}"))
                    for i in np.nonzero(why)[0]
                ),
                int(r["update"]),
                int(r["seq"]),
                int(r["itch_ns"]),
                int(r["rx_ns"]),
                int(r["world_ns"]),
            )
        )
    return out


# --- the subscription query ---------------------------------------------------------------------
QUERY_KEYS = ("channel", "symbols", "kinds", "snapshot", "from_seq")
PATH = "/feed"


class Subscription(NamedTuple):
    channel: str  # "" = the server's first channel
    symbols: tuple[str, ...]  # () = every stock
    kinds: int  # K_* bits
    snapshot: bool
    from_seq: int | None


def parse_query(target: str) -> Subscription:
    """The subscription a request target (``/feed?...``) asks for. Raises ``WireError`` with
    the reason: another path, an unknown or repeated parameter, a bad value, ``snapshot=1``
    with ``from_seq``."""
    parts = urlsplit(target)
    if parts.path != PATH:
        raise WireError(f"path {parts.path!r}: the feed is at {PATH}")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise WireError(f"query {parts.query!r}: {e}") from None
    seen: dict[str, str] = {}
    for k, v in pairs:
        if k not in QUERY_KEYS:
            raise WireError(f"unknown parameter {k!r} (known: {', '.join(QUERY_KEYS)})")
        if k in seen:
            raise WireError(f"parameter {k!r} given twice")
        seen[k] = v
    channel = seen.get("channel", "")
    if "channel" in seen and not channel:
        raise WireError("channel: empty")
    symbols: tuple[str, ...] = ()
    if "symbols" in seen:
        symbols = tuple(s.strip().upper() for s in seen["symbols"].split(","))
        for s in symbols:
            if not s or len(s) > 8 or not s.isascii() or not s.isprintable() or " " in s:
                raise WireError(f"symbols: {s!r} is not a ticker or locate (1-8 characters)")
    kinds = K_ALL
    if "kinds" in seen:
        kinds = 0
        for k in seen["kinds"].split(","):
            if k not in KIND_BITS:
                raise WireError(f"kinds: {k!r} is not one of {', '.join(KIND_BITS)}")
            kinds |= KIND_BITS[k]
    snapshot = False
    if "snapshot" in seen:
        if seen["snapshot"] not in ("0", "1"):
            raise WireError(f"snapshot: {seen['snapshot']!r} must be 0 or 1")
        snapshot = seen["snapshot"] == "1"
    from_seq = None
    if "from_seq" in seen:
        v = seen["from_seq"]
        if not v.isdigit():
            raise WireError(f"from_seq: {v!r} is not an event number (a whole number >= 0)")
        from_seq = int(v)
    if snapshot and from_seq is not None:
        raise WireError("snapshot=1 and from_seq exclude each other: a snapshot or a cursor")
    if channel == WORLD:
        if from_seq is not None:
            raise WireError(
                "from_seq: the world channel is conflated (each symbol's latest quote), "
                "it has no replay: snapshot=1 to join"
            )
        if "kinds" in seen:
            raise WireError("kinds: the world channel carries consolidated quotes only")
        for s in symbols:
            if s.isdigit():
                raise WireError(f"symbols: {s!r}: the world channel takes tickers, not locates")
    return Subscription(channel, symbols, kinds, snapshot, from_seq)


def query(sub: Subscription) -> str:
    """The request target of a subscription (``parse_query``'s inverse)."""
    q = []
    if sub.channel:
        q.append(f"channel={sub.channel}")
    if sub.symbols:
        q.append("symbols=" + ",".join(sub.symbols))
    if sub.kinds != K_ALL:
        q.append("kinds=" + ",".join(k for k, b in KIND_BITS.items() if sub.kinds & b))
    if sub.snapshot:
        q.append("snapshot=1")
    if sub.from_seq is not None:
        q.append(f"from_seq={sub.from_seq}")
    return PATH + ("?" + "&".join(q) if q else "")
