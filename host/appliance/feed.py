"""The feed server (``tickwire serve``): a channel's event ring over WebSocket to remote
clients, in ``tw-v1`` frames (``feedwire``), on picows and uvloop.

One process, one asyncio loop, beside the consumer (never inside it: it reads the rings
through ``dataplane.subscriber.Subscriber`` like any local client). Per channel served, a
pump keeps:

- a ``Subscriber`` that joined the ring with a snapshot and applies every event since to its
  own copy of the levels and the stock directory: the server's image of the channel at the
  pump's position ``pos`` (the next event number it will read);
- the retention window: the last ``retention_events`` events read, by event number
  (``[oldest, pos)``), from which ``from_seq`` cursors replay. A cursor older than
  ``oldest`` gets ``ERROR E_CURSOR_OLD``, never a silent skip. (The window starts at event 0
  when the ring still holds every event since the consumer created it -- the server then
  reads them all -- else where the server joined with a snapshot: a server started late in
  a long session cannot replay what came before it.)

A ``snapshot=1`` client is registered at ``pos`` and served the pump's image at ``pos`` in the
same step of the loop (no event can come in between: the loop is single-threaded), so the
first event it gets after the image is event ``pos``: no gap, nothing twice.

Each client has a cursor. While it is behind the pump (a replay, or a slow start) it pulls
chunks from the retention window as fast as its socket takes them; once level with the pump
it is live, and every batch the pump reads is filtered for it (kinds, symbols) and queued.
Its send queue is bounded: the socket's buffer (``pause_writing``) plus ``queue_frames``
frames. A client whose queue fills, or whose socket takes nothing for ``stall_timeout_s``, is
evicted with ``ERROR E_QUEUE_FULL`` / ``E_STALLED`` and counted; nothing it does can slow the
pump, the other clients or the consumer. Idle clients get a heartbeat every ``heartbeat_s``.

Refused before any frame (an HTTP answer with a one-line reason): a bad query (400), a missing
or wrong token (401), an unknown channel (404), one past ``max_clients`` (503). Sockets get
``TCP_NODELAY``; TLS when ``tls_cert``/``tls_key`` are configured.

The ``world`` channel (``feed_server.world``: the address of ``tickwire world``): a
``WorldPump`` follows the world view's ``WatchBBO`` stream over gRPC (``grpc.aio`` on the same
loop) and keeps each symbol's latest consolidated quote; its clients get ``QUOTES`` frames
(``feedwire``), ``snapshot=1`` first the current quotes. The stream is conflated, so
``from_seq`` is refused for it. When the world view goes away (or the server reconnects to
it) its clients get ``ERROR E_WORLD`` and join again; new connections are refused (503)
until it is back.

Metrics (``tickwire_feed_*``, a collector over the server's counters, on ``metrics``'s own
endpoint): clients, frames and bytes out, evictions by reason, refusals by reason, each
client's lag in events behind the ring's head (``world``: in world view ``seq``), the pump's
position and window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import signal
import socket
import ssl
import sys
import time
from http import HTTPStatus

import numpy as np
from picows import (
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from dataplane import book as bk
from dataplane import events as ev
from dataplane import subscriber as sb
from host import config as hc
from host.appliance import feedwire as fw

log = logging.getLogger("tickwire.feed")
CHUNK = 4096  # events a replay frame covers at most
SNAP_ROWS = 4096  # level rows a snapshot frame holds at most
POLL_IDLE_S = 0.0002  # the pump's sleep when the ring had nothing new
WRITE_HIGH = 1 << 20  # the socket buffer past which the transport asks us to pause
LINE_CODES = {"unknown": 0, "up": 1, "stale": 2, "down": 3}


class Pump:
    """One channel: its reader, image, retention window and clients."""

    def __init__(self, server: FeedServer, name: str):
        self.server, self.name = server, name
        self.sub: sb.Subscriber | None = None
        self.ret = np.zeros(server.cfg.retention_events, ev.EVENT)
        self.mask = len(self.ret) - 1
        self.start = self.pos = 0
        self.generation = 0
        self.clients: set[Client] = set()
        self.frames = self.bytes = 0  # of clients gone (the live ones count their own)
        self.evictions = {fw.ERROR_NAMES[c]: 0 for c in fw.EVICTIONS}
        self.task: asyncio.Task | None = None
        self.error = "not started"
        self._whole: tuple[int, int, bytes] | None = None  # this batch's whole frame

    # --- the ring -------------------------------------------------------------------------
    def attach(self) -> None:
        """Join the ring: from event 0 while the ring holds all of it, else by a snapshot of
        every stock; the window starts there."""
        sub = sb.Subscriber(self.name, root=self.server.root, batch=CHUNK)
        hdr = sub.ring.hdr
        if int(hdr[ev.H_BASE_SEQ]) == 0 and int(hdr[ev.H_WRITE]) <= len(sub.ring.ring) // 2:
            # the ring still holds every event since the consumer began with an empty book:
            # an empty copy that reads them all from event 0 is the whole image, and the
            # window starts at 0 (half the ring's margin: the consumer keeps writing); books
            # restored or joined mid-session (H_BASE_SEQ not 0) need the snapshot
            sub.join_live()
            sub.cursor[0] = 0
        else:
            sub.snapshot()
        if self.sub is not None:
            self.sub.close()
        self.sub = sub
        self.start = self.pos = int(sub.cursor[0])
        self.generation = int(sub.ring.hdr[ev.H_CREATED_NS])
        self.error = ""
        log.info("%s: joined the event ring at event %d", self.name, self.pos)

    @property
    def oldest(self) -> int:
        return max(self.start, self.pos - len(self.ret))

    @property
    def head(self) -> int:
        """The ring's newest event + 1 (what the consumer has published)."""
        return int(self.sub.ring.hdr[ev.H_WRITE]) if self.sub else self.pos

    def window(self, a: int, b: int) -> np.ndarray:
        """Events ``[a, b)`` from the retention window (``oldest <= a <= b <= pos``)."""
        i, j = a & self.mask, b & self.mask
        if b - a == 0:
            return self.ret[:0]
        if i < j:
            return self.ret[i:j]
        return np.concatenate((self.ret[i:], self.ret[:j]))

    async def run(self) -> None:
        while True:
            if self.sub is None:
                try:
                    self.attach()
                except (OSError, RuntimeError, TimeoutError, ValueError) as e:
                    self.error = str(e)
                    await asyncio.sleep(0.5)
                    continue
            try:
                got = self.sub.poll()
            except ev.Lapped as e:
                # the server itself fell a ring behind, or the consumer restarted: its clients'
                # streams cannot continue; the window starts again
                restarted = "restarted" in str(e)
                code = fw.E_RESTARTED if restarted else fw.E_LAPPED
                for c in list(self.clients):
                    c.fail(code, f"{self.name}: {e}")
                self.sub = None
                continue
            n = len(got)
            if n:
                a = self.pos
                i = a & self.mask
                k = min(n, len(self.ret) - i)
                self.ret[i : i + k] = got[:k]
                if k < n:
                    self.ret[: n - k] = got[k:]
                self.pos = a + n
                recs = self.window(a, self.pos)
                self._whole = None
                for c in list(self.clients):
                    if c.live:
                        c.guarded(c.deliver, a, self.pos, recs)
            if n < CHUNK:
                await asyncio.sleep(POLL_IDLE_S if not n else 0)

    def whole_frame(self, a: int, b: int, recs: np.ndarray) -> bytes:
        """Events ``[a, b)`` unfiltered, as one ``EVENTS`` frame: encoded once a batch for
        every client that takes the whole channel."""
        w = self._whole
        if w is None or w[0] != a or w[1] != b:
            w = self._whole = (a, b, fw.events(a, b, recs))
        return w[2]

    # --- the image ------------------------------------------------------------------------
    def image(self, follow: np.ndarray | None) -> tuple[dict, np.ndarray, np.ndarray]:
        """The pump's copy at ``pos``: snapshot fields, level rows and stock records of the
        followed locates (every one when ``follow`` is None)."""
        s = self.sub
        rows = s.rows()
        stocks = s.stocks
        named = np.nonzero(stocks["named"])[0]
        if follow is not None:
            rows = rows[follow[rows[:, 0]] != 0]
            named = named[follow[named] != 0]
        recs = np.zeros(len(named), fw.STOCK_REC)
        recs["locate"] = named
        recs["symbol"] = stocks["symbol"][named]
        recs["state"] = stocks["state"][named]
        recs["regsho"] = stocks["regsho"][named]
        fields = {
            "last_seq": s.last_seq,
            "eos": int(s.state[sb.S_EOS]),
            "stale": s.stale,
            "lines": (LINE_CODES[s.lines["A"]], LINE_CODES[s.lines["B"]]),
        }
        return fields, rows, recs

    def resolve(self, symbols: tuple[str, ...]) -> tuple[np.ndarray | None, np.ndarray]:
        """The follow mask (None: every stock) and the wanted packed tickers of a query."""
        if not symbols:
            return None, np.zeros(0, np.uint64)
        follow = np.zeros(bk.N_LOCATES, np.uint8)
        wanted = []
        for s in symbols:
            if s.isdigit():
                if int(s) < bk.N_LOCATES:
                    follow[int(s)] = 1
            else:
                wanted.append(sb.pack_symbol(s))
        wanted_a = np.array(sorted(set(wanted)), np.uint64)
        st = self.sub.stocks
        follow[np.isin(st["symbol"], wanted_a) & (st["named"] != 0)] = 1
        return follow, wanted_a


class Client(WSListener):
    """One connection: its subscription, cursor and bounded send queue."""

    ids = itertools.count(1)

    def __init__(self, pump: Pump, sub: fw.Subscription, peer: str):
        self.pump, self.q, self.peer = pump, sub, peer
        self.id = next(Client.ids)
        self.t: WSTransport | None = None
        self.cursor = self.covered = 0  # next event to examine / to be told about
        self.live = False
        self.closed = False
        self.paused_since = 0.0
        self.queue: list[bytes] = []
        self.last_sent = time.monotonic()
        self.frames = self.bytes = 0
        self.kind_ok = (fw.KIND_NEEDS == 0) | ((fw.KIND_NEEDS & sub.kinds) != 0)
        self.follow, self.wanted = pump.resolve(sub.symbols)
        self.whole = self.follow is None and bool(self.kind_ok.all())  # every event

    # --- connection -----------------------------------------------------------------------
    def _setup(self, transport: WSTransport) -> None:
        self.t = transport
        tr = transport.underlying_transport
        sock = tr.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tr.set_write_buffer_limits(high=WRITE_HIGH)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._setup(transport)
        p = self.pump
        if p.sub is None:  # the ring went away between the upgrade and now
            self.fail(fw.E_RESTARTED, f"{p.name}: {p.error}")
            return
        p.clients.add(self)
        q = self.q
        if q.snapshot:
            start = p.pos
        elif q.from_seq is not None:
            start = q.from_seq
        else:
            start = p.pos
        self.cursor = self.covered = start
        srv = self.pump.server
        self.send(
            fw.hello(
                start,
                p.pos,
                p.generation,
                p.oldest,
                int(srv.cfg.heartbeat_s * 1000),
                q.kinds,
                p.name,
            )
        )
        if q.from_seq is not None:
            if start < p.oldest:
                self.fail(
                    fw.E_CURSOR_OLD,
                    f"from_seq {start} is older than the retention window "
                    f"[{p.oldest}, {p.pos}) of {p.name}: snapshot=1 to join again",
                )
                return
            if start > p.head:
                self.fail(
                    fw.E_CURSOR_AHEAD,
                    f"from_seq {start} is past the newest event of {p.name} ({p.head - 1})",
                )
                return
        if q.snapshot:  # the image at pos, in this same step: event pos is the next one
            fields, rows, stocks = p.image(self.follow)
            self.send(fw.snap_begin(start, **fields, levels=len(rows), stocks=len(stocks)))
            for i in range(0, len(stocks), SNAP_ROWS):
                self.send(fw.snap_stocks(start, stocks[i : i + SNAP_ROWS]), force=True)
            for i in range(0, len(rows), SNAP_ROWS):
                self.send(fw.snap_levels(start, rows[i : i + SNAP_ROWS]), force=True)
            self.send(fw.snap_end(start, len(rows)), force=True)
        self.catch_up()

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._gone()

    def guarded(self, step, *args) -> None:
        """``step(*args)`` for this client from the pump or the timer: whatever it raises
        ends this connection (logged, counted in ``server.client_errors``), never the pump
        that serves the others."""
        try:
            step(*args)
        except Exception:
            srv = self.pump.server
            srv.client_errors += 1
            log.exception(
                "%s: client %d (%s) dropped after an error", self.pump.name, self.id, self.peer
            )
            self.queue.clear()
            self._gone()
            if self.t is not None:
                with contextlib.suppress(Exception):
                    self.t.disconnect(False)

    def _gone(self) -> None:
        if not self.closed:
            self.closed = True
            self.live = False
        p = self.pump
        if self in p.clients:
            p.clients.discard(self)
            p.frames += self.frames
            p.bytes += self.bytes
        self.pump.server.conns.discard(self)

    def pause_writing(self) -> None:
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused_since = 0.0
        while self.queue and not self.paused_since and not self.closed:
            self._write(self.queue.pop(0))
        if not self.queue:
            self.catch_up()

    # --- sending --------------------------------------------------------------------------
    def _write(self, frame: bytes) -> None:
        self.t.send(WSMsgType.BINARY, frame)
        self.frames += 1
        self.bytes += len(frame)
        self.last_sent = time.monotonic()

    def send(self, frame: bytes, force: bool = False) -> None:
        """Write now, or queue while the socket is full (``force``: the snapshot image,
        bounded by the book's size, goes to the socket's buffer whatever it holds)."""
        if self.closed:
            return
        if force or (not self.paused_since and not self.queue):
            self._write(frame)
            return
        if len(self.queue) >= self.pump.server.cfg.queue_frames:
            self.evict(fw.E_QUEUE_FULL, f"send queue full ({len(self.queue)} frames)")
            return
        self.queue.append(frame)

    def _filter(self, recs: np.ndarray) -> np.ndarray:
        keep = self.kind_ok[recs["kind"]]
        if self.follow is not None:
            if len(self.wanted):
                named = (recs["kind"] == ev.INSTRUMENT) & (recs["code"] == 82)
                if named.any():
                    r = recs[named]
                    hit = np.isin(r["value"].view(np.uint64), self.wanted)
                    self.follow[r["locate"][hit]] = 1
            keep &= (self.follow[recs["locate"]] != 0) | (recs["kind"] == ev.CHANNEL)
        return recs if keep.all() else recs[keep]

    def deliver(self, a: int, b: int, recs: np.ndarray) -> None:
        """Events ``[a, b)`` (``recs``), filtered, as one frame (the part past the cursor)."""
        lo = max(a, self.cursor)
        if lo >= b or self.closed:
            return
        if self.whole and lo == a == self.covered and self.live:
            self.cursor = self.covered = b
            self.send(self.pump.whole_frame(a, b, recs))
            self._check_end(recs)
            return
        mine = self._filter(recs[lo - a :])
        self.cursor = b
        if not len(mine):
            return
        self.send(fw.events(self.covered, b, mine))
        self.covered = b
        self._check_end(mine)

    def _check_end(self, mine: np.ndarray) -> None:
        """After the frame holding the end of session: ``END``, then close."""
        eos = mine[(mine["kind"] == ev.CHANNEL) & (mine["code"] == ev.CH_END_OF_SESSION)]
        if len(eos) and not self.closed:
            self.send(fw.end(self.covered, int(eos[-1]["value"])))
            self.closed = True
            self.live = False
            self.t.send_close()
            self.t.disconnect()

    def catch_up(self) -> None:
        """Replay from the window while the socket takes it; live once level with the pump."""
        p = self.pump
        while not self.live and not self.closed and not self.paused_since:
            if self.cursor >= p.pos:
                self.live = True
                return
            if self.cursor < p.oldest:
                self.evict(
                    fw.E_CURSOR_OLD,
                    f"fell out of the retention window of {p.name} replaying (at event "
                    f"{self.cursor}, window [{p.oldest}, {p.pos}))",
                    "retention",
                )
                return
            b = min(p.pos, self.cursor + CHUNK)
            self.deliver(self.cursor, b, p.window(self.cursor, b))

    # --- ends -----------------------------------------------------------------------------
    def fail(self, code: int, reason: str) -> None:
        """An error frame, then close (after what is queued)."""
        if self.closed or self.t is None:
            self._gone()
            return
        for f in self.queue:
            self._write(f)
        self.queue.clear()
        self.t.send(WSMsgType.BINARY, fw.error(self.covered, code, reason))
        self.closed = True
        self.live = False
        self.t.send_close()
        self.t.disconnect()
        self._gone()
        # a peer that reads nothing never completes the close: cut it after a grace
        asyncio.get_running_loop().call_later(
            self.pump.server.cfg.stall_timeout_s, self.t.disconnect, False
        )

    def evict(self, code: int, reason: str, label: str | None = None) -> None:
        """Disconnect a client that fell behind, counted under ``label`` (the code's name)."""
        label = label or fw.ERROR_NAMES[code]
        p = self.pump
        p.evictions[label] = p.evictions.get(label, 0) + 1
        log.warning("%s: client %d (%s) evicted: %s", p.name, self.id, self.peer, reason)
        self.fail(code, f"evicted: {reason}")

    def tick(self, now: float) -> None:
        """Stall check and heartbeat (the server's timer)."""
        if self.closed:
            return
        cfg = self.pump.server.cfg
        if self.paused_since and now - self.paused_since > cfg.stall_timeout_s:
            self.evict(fw.E_STALLED, f"socket took nothing for {cfg.stall_timeout_s:g} s")
        elif now - self.last_sent >= cfg.heartbeat_s and not self.queue:
            self.send(fw.heartbeat(self.covered, self.pump.pos, time.monotonic_ns()))


class WorldPump:
    """The ``world`` channel: the world view's quotes from ``address`` (gRPC ``WatchBBO``),
    each symbol's latest, and the clients following them. It is ``ready`` (connections are
    served, not refused with 503) once the stream's image is whole: at ``WatchBBO``'s
    image-end marker, so a ``snapshot=1`` client never gets a part of the image."""

    name = fw.WORLD
    oldest = 0

    def __init__(self, server: FeedServer, address: str, retry_s: float = 0.5):
        self.server, self.address, self.retry_s = server, address, retry_s
        self.quotes: dict = {}  # symbol -> worldview.Quote
        self.venues: list[str] = []
        self.seq = 0  # the highest world view seq received
        self.applied = 0  # quotes received on this connection (a client's join point)
        self.generation = 0
        self.ready = False
        self.error = f"not connected to the world view at {address} yet"
        self.clients: set[WorldClient] = set()
        self.frames = self.bytes = 0
        self.evictions = {fw.ERROR_NAMES[c]: 0 for c in fw.EVICTIONS}
        self.task: asyncio.Task | None = None
        self._pending: list[tuple[int, object]] = []  # (applied index, quote) not yet sent
        self._flush_at: asyncio.Handle | None = None

    @property
    def pos(self) -> int:
        return self.seq

    head = pos

    def resolve(self, symbols: tuple[str, ...]) -> tuple[None, np.ndarray]:
        return None, np.zeros(0, np.uint64)  # a world client filters by ticker itself

    async def run(self) -> None:
        import grpc

        from host.appliance import worldview as wv
        from host.appliance import worldview_pb2 as pb
        from host.appliance import worldview_pb2_grpc as pbg

        loop = asyncio.get_running_loop()
        while True:
            why = "the world view ended its stream"
            try:
                async with grpc.aio.insecure_channel(self.address) as ch:
                    stub = pbg.WorldViewStub(ch)
                    got = await stub.GetVenues(pb.VenuesRequest(), timeout=5)
                    stream = stub.WatchBBO(pb.WatchRequest(image_end=True))
                    self.venues = [v.name for v in got.venues]
                    self.quotes.clear()
                    self.seq = self.applied = 0
                    self.generation = time.monotonic_ns()
                    self.error = f"the world view at {self.address}: its image is not whole yet"
                    async for m in stream:
                        if m.image_end:  # the image is whole: clients may join
                            self.seq = max(self.seq, m.seq)
                            self.ready, self.error = True, ""
                            log.info(
                                "world: following the world view at %s (%d quotes)",
                                self.address,
                                len(self.quotes),
                            )
                            continue
                        q = wv.from_pb(m)
                        self.quotes[q.symbol] = q
                        self.seq = max(self.seq, q.seq)
                        self.applied += 1
                        if not self.ready:  # the image: no client yet
                            continue
                        self._pending.append((self.applied, q))
                        if self._flush_at is None:  # one frame for what came in this step
                            self._flush_at = loop.call_soon(self.flush)
            except grpc.aio.AioRpcError as e:
                why = f"the world view at {self.address}: {e.code().name}: {e.details()}"
            except (OSError, RuntimeError, ValueError) as e:  # not a world view, say
                why = f"the world view at {self.address}: {e}"
            was = self.ready
            self.ready, self.error = False, why
            self.flush()
            for c in list(self.clients):
                c.fail(fw.E_WORLD, f"{why}: join again with snapshot=1")
            if was:
                log.warning("world: %s", why)
            await asyncio.sleep(self.retry_s)

    def flush(self) -> None:
        self._flush_at = None
        batch, self._pending = self._pending, []
        if batch:
            for c in list(self.clients):
                c.deliver_quotes(batch)


class WorldClient(Client):
    """A connection to the ``world`` channel."""

    def __init__(self, pump: WorldPump, sub: fw.Subscription, peer: str):
        super().__init__(pump, sub, peer)
        self.symbols = frozenset(sub.symbols) or None
        self.after = 0  # the pump's applied count when it joined: later quotes are its

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._setup(transport)
        p = self.pump
        if not p.ready:
            self.fail(fw.E_WORLD, p.error)
            return
        p.clients.add(self)
        self.after, self.covered = p.applied, p.seq
        hb = int(p.server.cfg.heartbeat_s * 1000)
        self.send(fw.hello(p.seq, p.seq, p.generation, 0, hb, 0, p.name))
        self.send(fw.venues(p.seq, p.venues))
        if self.q.snapshot:
            qs = [q for s, q in sorted(p.quotes.items()) if self._wants(s)]
            for i in range(0, len(qs), SNAP_ROWS):
                self.send(fw.quotes(p.seq, p.venues, qs[i : i + SNAP_ROWS], True), force=True)
            self.send(fw.snap_end(p.seq, len(qs)), force=True)
        self.live = True

    def _wants(self, symbol: str) -> bool:
        return self.symbols is None or symbol in self.symbols

    def deliver_quotes(self, batch: list) -> None:
        if self.closed:
            return
        mine = [q for i, q in batch if i > self.after and self._wants(q.symbol)]
        if mine:
            p = self.pump
            for i in range(0, len(mine), SNAP_ROWS):
                self.send(fw.quotes(p.seq, p.venues, mine[i : i + SNAP_ROWS]))
            self.covered = p.seq

    def catch_up(self) -> None:
        pass  # a conflated stream: nothing to replay


class FeedServer:
    """``tickwire serve``: ``channels`` served per ``cfg`` ([feed_server]), and the world
    view's quotes as the channel ``world`` when ``cfg.world`` names it."""

    def __init__(self, cfg: hc.FeedServerConfig, channels: list[str], root=None):
        if not channels and not cfg.world:
            raise hc.ConfigError("feed_server.channels: no channel to serve")
        if fw.WORLD in channels and cfg.world:
            raise hc.ConfigError(
                "feed_server.channels: 'world' is the world view's channel (feed_server.world)"
            )
        self.cfg, self.root = cfg, root
        self.tokens = hc.feed_server_tokens(cfg)
        self.pumps = {name: Pump(self, name) for name in channels}
        self.world = WorldPump(self, cfg.world) if cfg.world else None
        self.conns: set[Client] = set()
        self.refused: dict[str, int] = {}
        self.server: asyncio.Server | None = None
        self._timer: asyncio.Task | None = None
        self.client_errors = 0  # connections dropped after an error serving them
        self.crashed = ""  # why a pump or the timer ended (serve exits 1 with it)
        self.on_crash = None  # called once when one does

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise hc.ConfigError(f"feed_server.tls_cert: {self.cfg.tls_cert}: {e}") from None
        return ctx

    def _refuse(self, status: int, label: str, reason: str) -> WSUpgradeResponseWithListener:
        self.refused[label] = self.refused.get(label, 0) + 1
        resp = WSUpgradeResponse.create_error_response(status, (reason + "\n").encode())
        return WSUpgradeResponseWithListener(resp, None)

    def _token_ok(self, request: WSUpgradeRequest) -> bool:
        if not self.tokens:
            return True
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in self.tokens)

    def listener(self, request: WSUpgradeRequest):
        try:
            q = fw.parse_query(request.path.decode("latin-1"))
        except fw.WireError as e:
            return self._refuse(HTTPStatus.BAD_REQUEST, "bad_query", f"bad query: {e}")
        if not self._token_ok(request):
            return self._refuse(
                HTTPStatus.UNAUTHORIZED, "token", "no or wrong token (Authorization: Bearer)"
            )
        name = q.channel or next(iter(self.pumps), fw.WORLD)
        pump = self.world if name == fw.WORLD else self.pumps.get(name)
        if pump is None:
            served = [*self.pumps, *([fw.WORLD] if self.world else [])]
            return self._refuse(
                HTTPStatus.NOT_FOUND,
                "channel",
                f"channel {name!r} is not served (served: {', '.join(served)})",
            )
        if not (pump.ready if pump is self.world else pump.sub is not None):
            return self._refuse(
                HTTPStatus.SERVICE_UNAVAILABLE, "channel", f"channel {name}: {pump.error}"
            )
        if len(self.conns) >= self.cfg.max_clients:
            return self._refuse(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "max_clients",
                f"too many clients ({self.cfg.max_clients}, feed_server.max_clients)",
            )
        kind = WorldClient if pump is self.world else Client
        c = kind(pump, q, request.headers.get("Host", ""))
        self.conns.add(c)
        return c

    async def start(self) -> int:
        """Listen (and start the pumps); returns the bound port."""
        for p in self.pumps.values():
            with contextlib.suppress(OSError, RuntimeError, TimeoutError, ValueError):
                p.attach()  # now when the ring is there, so the first clients find it
            p.task = self._watch(p.run(), f"channel {p.name}'s pump")
        if self.world is not None:
            self.world.task = self._watch(self.world.run(), "the world channel's pump")
        self.server = await ws_create_server(
            self.listener,
            self.cfg.listen,
            self.cfg.port,
            ssl=self.ssl_context(),
            max_frame_size=1 << 16,
            logger_name="feed",
        )
        self._timer = self._watch(self._ticks(), "the heartbeat timer")
        return self.server.sockets[0].getsockname()[1]

    def _watch(self, coro, what: str) -> asyncio.Task:
        """A task that never ends on its own: if it does, the server cannot serve (its
        clients would get heartbeats and no events): say why and stop."""
        task = asyncio.create_task(coro)

        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                return
            e = t.exception()
            why = f"{what} ended: {type(e).__name__}: {e}" if e else f"{what} ended"
            if e is not None:
                log.error("%s", why, exc_info=e)
            if not self.crashed:
                self.crashed = why
                if self.on_crash is not None:
                    self.on_crash()

        task.add_done_callback(done)
        return task

    async def _ticks(self) -> None:
        step = min(self.cfg.heartbeat_s, self.cfg.stall_timeout_s) / 4
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            for p in self._all():
                for c in list(p.clients):
                    c.guarded(c.tick, now)

    def _all(self) -> list:
        """The pumps, the world's last."""
        return [*self.pumps.values(), *([self.world] if self.world else [])]

    async def stop(self) -> None:
        for p in self._all():
            for c in list(p.clients):
                c.fail(fw.E_SHUTDOWN, "the server is stopping")
            if p.task:
                p.task.cancel()
        if self._timer:
            self._timer.cancel()
        if self.server:
            self.server.close()
        for p in self.pumps.values():
            if p.sub is not None:
                p.sub.close()

    def stats(self) -> dict:
        """What the metrics show, per channel."""
        out = {}
        for p in self._all():
            name, head = p.name, p.head
            out[name] = {
                "clients": len(p.clients),
                "frames": p.frames + sum(c.frames for c in p.clients),
                "bytes": p.bytes + sum(c.bytes for c in p.clients),
                "evictions": dict(p.evictions),
                "lag": {str(c.id): max(0, head - c.covered) for c in p.clients},
                "position": p.pos,
                "oldest": p.oldest,
            }
        return out


class FeedCollector:
    """``tickwire_feed_*`` from the server's counters at scrape time."""

    def __init__(self, server: FeedServer):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.server.stats()
        clients = GaugeMetricFamily(
            "tickwire_feed_clients", "Clients connected", labels=["channel"]
        )
        frames = CounterMetricFamily(
            "tickwire_feed_frames", "Frames sent to clients", labels=["channel"]
        )
        nbytes = CounterMetricFamily(
            "tickwire_feed_bytes", "Bytes of frames sent to clients", labels=["channel"]
        )
        ev_ = CounterMetricFamily(
            "tickwire_feed_evictions",
            "Clients disconnected for falling behind, by reason",
            labels=["channel", "reason"],
        )
        lag = GaugeMetricFamily(
            "tickwire_feed_client_lag_events",
            "Events the ring has published that a client has not been sent",
            labels=["channel", "client"],
        )
        pos = GaugeMetricFamily(
            "tickwire_feed_position_events", "The next event the server reads", labels=["channel"]
        )
        for name, s in st.items():
            clients.add_metric([name], s["clients"])
            frames.add_metric([name], s["frames"])
            nbytes.add_metric([name], s["bytes"])
            for reason, n in s["evictions"].items():
                ev_.add_metric([name, reason], n)
            for cid, n in s["lag"].items():
                lag.add_metric([name, cid], n)
            pos.add_metric([name], s["position"])
        refused = CounterMetricFamily(
            "tickwire_feed_refused", "Connections refused, by reason", labels=["reason"]
        )
        for reason in ("bad_query", "token", "channel", "max_clients"):
            refused.add_metric([reason], self.server.refused.get(reason, 0))
        errors = CounterMetricFamily(
            "tickwire_feed_client_errors",
            "Connections dropped after an error in serving them (the log has each)",
        )
        errors.add_metric([], self.server.client_errors)
        yield from (clients, frames, nbytes, ev_, lag, pos, refused, errors)


def registry(server: FeedServer):
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(FeedCollector(server))
    return reg


def served_channels(cfg: hc.Config) -> list[str]:
    """``feed_server.channels``, or every channel of ``cfg``."""
    return list(cfg.feed_server.channels) or [c.run.channel for c in hc.channel_configs(cfg)]


def _say(text: str) -> None:
    print(text, flush=True)  # a line a supervisor (or a test) waits on, even through a pipe


def serve(cfg: hc.Config, say=_say) -> int:
    """Run the server until SIGTERM or SIGINT (the CLI's ``tickwire serve``)."""
    import uvloop

    fs = cfg.feed_server
    server = FeedServer(fs, served_channels(cfg))
    server.ssl_context()  # a bad certificate is a configuration error, before listening

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server.on_crash = stop.set
        port = await server.start()
        if fs.metrics:
            from prometheus_client import start_http_server

            host, mport = hc.host_port(fs.metrics, "feed_server.metrics")
            start_http_server(mport, host, registry(server))
        scheme = "wss" if fs.tls_cert else "ws"
        say(
            f"tickwire serve: {scheme}://{fs.listen}:{port}{fw.PATH} serving "
            f"{', '.join(p.name for p in server._all())}"
            + (f"; metrics on http://{fs.metrics}/metrics" if fs.metrics else ""),
        )
        await stop.wait()
        await server.stop()

    uvloop.run(main())
    if server.crashed:
        print(f"tickwire serve: {server.crashed}", file=sys.stderr)
        return 1
    return 0
