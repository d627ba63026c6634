"""A remote client of the feed server (``FeedClient``) and ``tickwire client``.

It subscribes with a snapshot (``snapshot=1``), a cursor (``from_seq``) or live, and keeps
its own copy of the levels with ``dataplane.subscriber``'s numba functions (``_load_rows``,
``apply_events``, ``digest_of``), so ``digest()`` is ``tickwire book``'s digest of what it
rebuilt. Every ``EVENTS`` frame must start where the previous one ended (``feedwire``): a
frame that starts later is a gap, one that starts earlier a duplicate -- both raise
``StreamError``, never pass silently. When the connection drops (or the server evicts it for
being slow) it reconnects with ``from_seq`` = the next event it expects (``last + 1``) and
checks the server resumed exactly there, in the same generation of the ring. A reconnect the
server refuses with 503 (the channel not ready yet -- the server restarted and has not
attached to the ring or the world view -- or ``max_clients`` reached for a moment), or that
finds no server, is tried again with a backoff (``retry_s`` doubling up to 2 s) for
``reconnect_timeout`` seconds from the loss, then fails naming the last refusal; any other
refusal (400, 401, 404) fails at once, and so does a first connection refused with 503 (the
subscription was never served: say so now). A connection that goes silent -- no frame, not
even the server's heartbeat, for ``silence_s`` (default: five heartbeat intervals as ``HELLO``
gives them, at least 3 s) -- is dead whatever TCP thinks (a peer gone without a reset, a
stuck server): it is cut and counted in ``silences``, and the client reconnects as after any
drop.

On the ``world`` channel (``channel=world``) it keeps the consolidated quotes instead
(``quotes``: symbol -> ``worldview.Quote``, ``on_quote`` for each one received); a symbol's
``update`` must grow from one quote to the next (a repeat raises ``StreamError``). That
stream is conflated and has no cursor: after a drop it joins again as it first did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from picows import WSError, WSListener, WSMsgType, ws_connect

from dataplane import book as bk
from dataplane import events as ev
from dataplane import subscriber as sb
from host.appliance import feedwire as fw

log = logging.getLogger("tickwire.client")

# errors after which reconnecting with the cursor cannot help
FATAL = (fw.E_BAD_QUERY, fw.E_CURSOR_OLD, fw.E_CURSOR_AHEAD, fw.E_RESTARTED, fw.E_LAPPED)
LINE_NAMES = {0: "unknown", 1: "up", 2: "stale", 3: "down"}
RETRY_MAX_S = 2.0  # the reconnect backoff's ceiling
SILENT_BEATS = 5  # heartbeat intervals without a frame after which a connection is dead
SILENT_MIN_S = 3.0  # ... but never less than this
SILENT_PRE_HELLO_S = 10.0  # the limit before HELLO has said the heartbeat interval
UNAVAILABLE = 503  # a refusal a reconnect waits out (the channel not ready, the cap reached)


class FeedError(RuntimeError):
    """The server refused the subscription or ended it with an error frame."""


class Refused(FeedError):
    """The server refused the upgrade: ``status`` (HTTP; None: no answer) and its reason."""

    def __init__(self, why: str, status: int | None = None):
        super().__init__(why)
        self.status = status


class StreamError(RuntimeError):
    """The stream broke its contract: a gap, a duplicate, a resume at the wrong place."""


class _Listener(WSListener):
    def __init__(self, client: FeedClient):
        self.client = client

    def on_ws_connected(self, transport) -> None:
        # known before any frame is handled: frames that came with the upgrade's answer are
        # handled before ws_connect returns, and one of them may stop or fail the client
        self.client._transport = transport

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.client._frame(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


class FeedClient:
    """Follow one subscription: ``url`` (``ws[s]://host:port/feed?...``), ``token`` (sent as
    ``Authorization: Bearer``), ``snapshot`` / ``from_seq`` (override the URL's)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        snapshot: bool | None = None,
        from_seq: int | None = None,
        cafile: str | None = None,
        reconnect: bool = True,
        retry_s: float = 0.2,
        on_event=None,
        on_quote=None,
        reconnect_timeout: float = 30.0,
        silence_s: float | None = None,
    ):
        if not reconnect_timeout >= 0:
            raise ValueError(f"reconnect_timeout {reconnect_timeout}: must be 0 or more")
        if silence_s is not None and not silence_s > 0:
            raise ValueError(f"silence_s {silence_s}: must be more than 0")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"{url}: not a ws:// or wss:// URL")
        target = parts.path + ("?" + parts.query if parts.query else "")
        sub = fw.parse_query(target or fw.PATH)
        if snapshot is not None or from_seq is not None:
            sub = sub._replace(snapshot=bool(snapshot), from_seq=from_seq)
        if sub.snapshot and sub.from_seq is not None:
            raise ValueError("--snapshot and --from-seq exclude each other")
        fw.parse_query(fw.query(sub))  # what the server would refuse (the world's from_seq)
        self.sub = sub
        self.base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.token = token
        self.ssl = None
        if parts.scheme == "wss":
            self.ssl = ssl.create_default_context(cafile=cafile)
        self.reconnect, self.retry_s, self.on_event = reconnect, retry_s, on_event
        # how long a joined client keeps trying to reconnect (503, no server) after a loss
        self.reconnect_timeout = reconnect_timeout
        self.silence_s = silence_s  # None: from HELLO's heartbeat interval
        self.world = sub.channel == fw.WORLD
        self.on_quote = on_quote
        self.venues: list[str] = []  # the world channel's venues (its VENUES frame)
        self.quotes: dict = {}  # the world channel: symbol -> its latest worldview.Quote
        self.image_quotes = 0  # quotes received in snapshot images
        self.expected: int | None = None  # the next event number
        self.generation = 0
        self.joined = False  # has a whole image or a cursor to resume from
        self.done = False  # END seen (or the image is past the end of session)
        self.next_seq = 0  # END's: the session's announced end
        self.snapshot_seq = 0  # the last MoldUDP64 sequence in the image (0: no snapshot)
        self.frames = self.events = self.reconnects = self.heartbeats = 0
        self.silences = 0  # connections cut for saying nothing (see silence_limit)
        self._heard = 0.0  # monotonic time of the last frame on this connection
        self.evicted: list[str] = []  # eviction reasons received
        self.error: Exception | None = None
        self.hello: dict = {}
        self.follow = np.ones(bk.N_LOCATES, np.uint8)  # the server filters
        self.wanted = np.zeros(0, np.uint64)
        self.stocks = np.zeros(bk.N_LOCATES, bk.STOCK)
        self.bbo_table = np.zeros((bk.N_LOCATES, 2, 2), np.int64)
        self.state = np.zeros(sb.STATE_LEN, np.int64)
        self.lines = {"A": "unknown", "B": "unknown"}
        self._snap_rows: list[np.ndarray] = []
        self._clear(1 << 12)
        self._transport = None
        self._ended = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # run's

    # --- the copy -------------------------------------------------------------------------
    def _clear(self, cap: int) -> None:
        self.keys = np.zeros(cap, np.int64)
        self.vals = np.zeros((cap, 2), np.int64)
        self.meta = np.zeros(2, np.int64)

    def _grow(self) -> None:
        keys, vals = self.keys, self.vals
        self._clear(2 * len(keys))
        for i in np.nonzero(keys)[0]:
            sb.depth_set(self.keys, self.vals, self.meta, keys[i], vals[i, 0], vals[i, 1])

    def rows(self) -> np.ndarray:
        out = np.zeros((int(self.meta[sb.D_COUNT]), 5), np.int64)
        sb._export(self.keys, self.vals, out)
        return out[np.lexsort((out[:, 2], out[:, 1], out[:, 0]))]

    def digest(self) -> str:
        """``tickwire book``'s digest of the levels rebuilt."""
        return sb.digest_of(self.rows())

    @property
    def last_seq(self) -> int:
        """The MoldUDP64 sequence of the last event applied."""
        return int(self.state[sb.S_LAST_SEQ])

    def symbol(self, locate: int) -> str:
        st = self.stocks[locate]
        return bk._symbol(int(st["symbol"])) if st["named"] else ""

    # --- frames ---------------------------------------------------------------------------
    def _fail(self, e: Exception) -> None:
        if self.error is None:
            self.error = e
        self._ended.set()
        if self._transport is not None:
            self._transport.disconnect(False)

    def silence_limit(self) -> float:
        """Seconds without a frame after which this connection counts as dead."""
        if self.silence_s is not None:
            return self.silence_s
        hb_ms = self.hello.get("heartbeat_ms") if self.hello else None
        if not hb_ms:
            return SILENT_PRE_HELLO_S
        return max(SILENT_BEATS * hb_ms / 1000, SILENT_MIN_S)

    def _frame(self, payload: bytes) -> None:
        self._heard = time.monotonic()
        try:
            self._handle(fw.decode(payload, len(self.venues)))
        except (fw.WireError, StreamError, FeedError) as e:
            self._fail(e)

    def _handle(self, f: fw.Frame) -> None:
        self.frames += 1
        if self.world and f.type in (fw.HELLO, fw.VENUES, fw.QUOTES, fw.SNAP_END):
            self._world(f)
        elif f.type == fw.HELLO:
            self.hello = f.body
            if self.joined:
                if f.body["generation"] != self.generation:
                    raise StreamError(
                        "the consumer restarted (a new event ring): the cursor means nothing"
                    )
                if f.seq != self.expected:
                    raise StreamError(f"resumed at event {f.seq}, asked for {self.expected}")
            self.generation = f.body["generation"]
            self.expected = f.seq
            if not self.sub.snapshot or self.joined:
                self.joined = True
        elif f.type == fw.SNAP_BEGIN:
            self._snap = f.body
            self.snapshot_seq = f.body["last_seq"]
            self._snap_rows = []
            self.stocks[:] = 0
        elif f.type == fw.SNAP_STOCKS:
            r = f.body
            loc = r["locate"].astype(np.int64)
            self.stocks["symbol"][loc] = r["symbol"]
            self.stocks["state"][loc] = r["state"]
            self.stocks["regsho"][loc] = r["regsho"]
            self.stocks["named"][loc] = 1
        elif f.type == fw.SNAP_LEVELS:
            self._snap_rows.append(fw.level_rows(f.body))
        elif f.type == fw.SNAP_END:
            rows = np.concatenate(self._snap_rows) if self._snap_rows else np.zeros((0, 5))
            rows = rows.astype(np.int64)
            self._clear(max(1 << 12, 1 << (2 * len(rows) + 1).bit_length()))
            self.bbo_table[:] = 0
            while sb._load_rows(
                rows, self.follow, self.keys, self.vals, self.meta, self.bbo_table
            ) < len(rows):
                self._grow()
            s = self._snap
            self.state[:] = 0
            self.state[sb.S_LAST_SEQ] = s["last_seq"]
            self.state[sb.S_EOS] = s["eos"]
            self.state[sb.S_STALE] = int(s["stale"])
            self.lines = {"A": LINE_NAMES[s["lines"][0]], "B": LINE_NAMES[s["lines"][1]]}
            self.joined = True
            if s["eos"]:  # the image is past the end of session: nothing more will come
                self.done = True
                self.next_seq = s["eos"]
                self._ended.set()
        elif f.type == fw.EVENTS:
            if f.seq != self.expected:
                what = "gap" if f.seq > self.expected else "duplicate"
                raise StreamError(
                    f"{what}: expected event {self.expected}, the frame covers [{f.seq}, {f.end})"
                )
            self.expected = f.end
            self._apply(f.body)
        elif f.type == fw.HEARTBEAT:
            self.heartbeats += 1
            if f.seq != self.expected:
                raise StreamError(f"heartbeat at event {f.seq}, expected {self.expected}")
        elif f.type == fw.ERROR:
            code, reason = f.body["code"], f.body["reason"]
            if code in fw.EVICTIONS:
                self.evicted.append(fw.ERROR_NAMES[code])
            if code in FATAL or not self.reconnect:
                raise FeedError(f"{fw.ERROR_NAMES.get(code, code)}: {reason}")
        elif f.type == fw.END:
            self.done = True
            self.next_seq = f.body["next_seq"]
            self._ended.set()

    def _world(self, f: fw.Frame) -> None:
        """The world channel's frames: its venues, then quotes."""
        if f.type == fw.HELLO:
            self.hello = f.body
            if f.body["generation"] != self.generation:  # the server's link to the world view
                self.quotes.clear()
            self.generation = f.body["generation"]
            self.expected = f.seq
            self.venues = []
            self.joined = not self.sub.snapshot
        elif f.type == fw.VENUES:
            self.venues = f.body
        elif f.type == fw.QUOTES:
            if f.seq < self.expected:
                raise StreamError(f"world seq went back from {self.expected} to {f.seq}")
            self.expected = f.seq
            for q in fw.to_quotes(f.body, self.venues):
                old = self.quotes.get(q.symbol)
                if old is not None and q.update <= old.update and not f.flags & fw.F_IMAGE:
                    raise StreamError(
                        f"duplicate: {q.symbol} update {q.update} after update {old.update}"
                    )
                self.quotes[q.symbol] = q
                self.events += 1
                if self.on_quote is not None:
                    self.on_quote(q)
            if f.flags & fw.F_IMAGE:
                self.image_quotes += f.count
        elif f.type == fw.SNAP_END:
            self.joined = True

    def _apply(self, recs: np.ndarray) -> None:
        n = len(recs)
        k = 0
        while True:
            k, st = sb.apply_events(
                recs,
                k,
                n,
                self.follow,
                self.wanted,
                self.keys,
                self.vals,
                self.meta,
                self.bbo_table,
                self.stocks,
                self.state,
            )
            if st != sb.NEED_GROW:
                break
            self._grow()
        self.events += n
        chan = recs[recs["kind"] == ev.CHANNEL]
        for e in chan:
            if ev.CH_LINE_UP <= e["code"] <= ev.CH_LINE_DOWN and e["side"] < 2:
                self.lines["AB"[e["side"]]] = sb.LINE_NAMES[int(e["code"])]
        if self.on_event is not None:
            for e in recs:
                self.on_event(self.decode(e))

    def decode(self, e) -> sb.Event:
        """An ``EVENT`` record as ``Subscriber.decode`` gives it."""
        return sb.decode_event(e, self.symbol)

    # --- connecting -----------------------------------------------------------------------
    def url(self) -> str:
        """The URL of the next connection: the cursor once joined, else the subscription."""
        sub = self.sub
        if self.joined and self.expected is not None and not self.world:
            sub = sub._replace(snapshot=False, from_seq=self.expected)
        return self.base + fw.query(sub)

    async def _connect_once(self) -> None:
        self.hello = {}
        self._heard = time.monotonic()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            t, _ = await ws_connect(
                lambda: _Listener(self),
                self.url(),
                ssl_context=self.ssl,
                extra_headers=headers,
                max_frame_size=1 << 26,
            )
        except WSError as e:
            body = getattr(e, "raw_body", None)
            why = body.decode(errors="replace").strip() if body else str(e)
            status = getattr(getattr(e, "response", None), "status", None)
            status = int(status) if status else None
            raise Refused(f"refused ({status}): {why}" if status else why, status) from None
        self._transport = t
        if self.done or self.error is not None:  # stopped or failed during the upgrade
            t.disconnect(False)
        sock = t.underlying_transport.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        gone = asyncio.ensure_future(t.wait_disconnected())
        try:
            while not gone.done():
                limit = self.silence_limit()
                left = self._heard + limit - time.monotonic()
                if left > 0:
                    await asyncio.wait((gone,), timeout=min(left, 1.0))
                    continue
                # a process stalled past the limit wakes with its timers before its socket:
                # let the loop read what is waiting before deciding
                await asyncio.wait((gone,), timeout=0.05)
                if gone.done() or time.monotonic() - self._heard < limit:
                    continue
                # nothing, not even a heartbeat: dead whatever TCP says; reconnect
                self.silences += 1
                log.warning("%s: no frame for %g s: reconnecting", self.base, limit)
                t.disconnect(False)
                await gone
            gone.result()
        finally:
            gone.cancel()
            self._transport = None

    async def run(self, until_eos: bool = True, timeout: float | None = None) -> None:
        """Follow until the end of session (``until_eos``), an error, or ``timeout``;
        reconnecting with the cursor after a drop (a 503 or no server: again, with a
        backoff, for ``reconnect_timeout``). Raises the error that stopped it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._loop = asyncio.get_running_loop()
        pause = self.retry_s
        lost_at = time.monotonic()  # when the last connection ended
        while True:
            failed: Exception | None = None  # this reconnect's refusal, to wait out
            try:
                await self._connect_once()
            except Refused as e:  # refused at the upgrade: the HTTP answer's reason
                if e.status == UNAVAILABLE and self.joined and self.reconnect:
                    failed = e
                else:
                    self.error = self.error or e
            except FeedError as e:
                self.error = self.error or e
            except OSError as e:
                e = FeedError(f"{self.base}: {e}")
                if self.joined and self.reconnect:
                    failed = e
                else:
                    self.error = self.error or e
            if self.error is not None:
                raise self.error
            if self.done or not (until_eos or self.reconnect):
                return
            if not self.reconnect:
                raise FeedError("the server closed the connection before the end of session")
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TimeoutError("no end of session before the deadline")
            if failed is None:  # it was connected: try again soon
                pause, lost_at = self.retry_s, now
            else:
                left = lost_at + self.reconnect_timeout - now
                if left <= 0:
                    raise FeedError(
                        f"not reconnected within {self.reconnect_timeout:g} s "
                        f"(reconnect_timeout); the last try: {failed}"
                    )
                pause = min(max(pause * 2, self.retry_s), max(RETRY_MAX_S, self.retry_s), left)
            with contextlib.suppress(TimeoutError):  # stop() ends the wait
                await asyncio.wait_for(self._ended.wait(), pause)
            if self.error is not None:
                raise self.error
            if self.done:
                return
            self.reconnects += 1

    def stop(self) -> None:
        """End ``run`` now (as done: no reconnect); from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                mine = asyncio.get_running_loop() is loop
            except RuntimeError:
                mine = False
            if not mine:
                loop.call_soon_threadsafe(self.stop)
                return
        self.done = True
        self._ended.set()
        if self._transport is not None:
            self._transport.disconnect(False)

    def drop(self) -> bool:
        """Cut the connection now (the client reconnects with its cursor); False when there
        was none to cut."""
        t, self._transport = self._transport, None
        if t is None or t.is_disconnected:
            return False
        t.disconnect(False)
        return True


def run(client: FeedClient, until_eos: bool = True, timeout: float | None = None) -> FeedClient:
    """``client.run`` on a uvloop of its own; returns the client."""
    import uvloop

    uvloop.run(client.run(until_eos=until_eos, timeout=timeout))
    return client


def main(args) -> int:
    """``tickwire client``."""
    out = sys.stdout
    if args.digest and not args.until_eos:
        print("tickwire client: --digest needs --until-eos", file=sys.stderr)
        return 2

    count = getattr(args, "count", None)
    if count is not None and count < 1:
        print(f"tickwire client: --count {count}: must be 1 or more", file=sys.stderr)
        return 2
    shown = 0

    def show(e) -> None:
        nonlocal shown
        d = e.as_dict()
        if args.json:
            text = json.dumps(d)
        else:
            d.pop("stamps_ns", None)
            text = " ".join(f"{k}={v}" for k, v in d.items())
        out.write(text + "\n")
        shown += 1
        if count is not None and shown >= count:
            c.stop()

    try:
        c = FeedClient(
            args.url,
            token=args.token,
            snapshot=True if args.snapshot else None,
            from_seq=args.from_seq,
            cafile=args.cafile,
            on_event=None if args.digest else show,
            on_quote=show,
            reconnect_timeout=args.reconnect_timeout,
            silence_s=getattr(args, "silence", None),
        )
    except (ValueError, fw.WireError) as e:
        print(f"tickwire client: {e}", file=sys.stderr)
        return 2
    if c.world and (args.until_eos or args.digest):
        print(
            "tickwire client: the world channel has no end of session and no levels "
            "(--until-eos, --digest)",
            file=sys.stderr,
        )
        return 2
    try:
        run(c, until_eos=args.until_eos)
    except (FeedError, StreamError, TimeoutError) as e:
        print(f"tickwire client: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.digest:
        rep = {
            "digest": c.digest(),
            "last_seq": c.last_seq,
            "snapshot_seq": c.snapshot_seq,
            "next_event": c.expected,
            "events": c.events,
            "frames": c.frames,
            "reconnects": c.reconnects,
            "silences": c.silences,
            "evicted": c.evicted,
            "ended": c.done,
        }
        print(json.dumps(rep) if args.json else " ".join(f"{k}={v}" for k, v in rep.items()))
    if count is not None and shown < count:
        return 1
    return 0 if c.done or not args.until_eos else 1
