"""The feed server (``host.appliance.feed``), its ``tw-v1`` codec and its client: codec round
trips, the subscription query, tokens, TLS, heartbeats, eviction of a slow client, the
retention window's cursor error; clients that end with ``tickwire book``'s digest; the
``world`` channel (a real ``WorldView`` behind its gRPC service, fed by hand); ``tickwire
serve`` as a process, its metrics endpoint scraped. In the lab: the issue's done-means -- a
client joining mid-session by snapshot and one whose connection the server's side destroys
both end with ``tickwire book``'s digest, across the lab's network."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from picows import WSListener, ws_connect
from prometheus_client import generate_latest

from dataplane import events as ev
from dataplane import shm
from dataplane.book import Book
from host import config as hc
from host.appliance import feed
from host.appliance import feedclient as fc
from host.appliance import feedwire as fw
from host.appliance import worldview as wv
from host.exchange import itchgen
from tests.helpers import free_port, wait_for

I64 = st.integers(-(2**63), 2**63 - 1)
U32 = st.integers(0, 2**32 - 1)


def _events(raw: np.ndarray) -> np.ndarray:
    out = np.zeros(len(raw), ev.EVENT)
    out.view(np.uint8).reshape(len(raw), 64)[:] = raw
    out["version"] = 0
    out["_pad"] = 0
    return out


@settings(max_examples=60, deadline=None)
@given(
    raw=hnp.arrays(np.uint8, st.tuples(st.integers(0, 40), st.just(64))),
    seq=I64,
    span=st.integers(0, 10_000),
)
def test_events_round_trip(raw, seq, span):
    recs = _events(raw)
    end = seq + span if seq + span < 2**63 else seq
    f = fw.decode(fw.events(seq, end, recs))
    assert (f.type, f.count, f.seq, f.end) == (fw.EVENTS, len(recs), seq, end)
    assert f.body.dtype == ev.EVENT
    assert f.body.tobytes() == recs.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    seq=I64,
    end=I64,
    g=I64,
    oldest=I64,
    hb=U32,
    kinds=U32,
    name=st.text(max_size=32),
    code=st.integers(0, 65535),
    reason=st.text(max_size=100),
)
def test_control_frames_round_trip(seq, end, g, oldest, hb, kinds, name, code, reason):
    f = fw.decode(fw.hello(seq, end, g, oldest, hb, kinds, name))
    assert (f.type, f.seq, f.end) == (fw.HELLO, seq, end)
    assert f.body == {
        "generation": g,
        "oldest": oldest,
        "heartbeat_ms": hb,
        "kinds": kinds,
        "channel": name,
    }
    f = fw.decode(fw.heartbeat(seq, end, g))
    assert (f.type, f.seq, f.end, f.body) == (fw.HEARTBEAT, seq, end, {"server_ns": g})
    f = fw.decode(fw.error(seq, code, reason))
    assert (f.type, f.seq, f.body) == (fw.ERROR, seq, {"code": code, "reason": reason})
    f = fw.decode(fw.end(seq, oldest))
    assert (f.type, f.seq, f.body) == (fw.END, seq, {"next_seq": oldest})


@settings(max_examples=40, deadline=None)
@given(
    seq=I64,
    last=I64,
    eos=I64,
    stale=st.booleans(),
    lines=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    rows=hnp.arrays(
        np.int64,
        st.tuples(st.integers(0, 50), st.just(5)),
        elements=st.integers(0, 2**31 - 1),
    ),
    stocks=hnp.arrays(fw.STOCK_REC, st.integers(0, 20)),
)
def test_snapshot_frames_round_trip(seq, last, eos, stale, lines, rows, stocks):
    rows[:, 0] &= 0xFFFF
    rows[:, 1] &= 1
    f = fw.decode(fw.snap_begin(seq, last, eos, stale, lines, len(rows), len(stocks)))
    assert (f.type, f.seq) == (fw.SNAP_BEGIN, seq)
    assert f.body == {
        "last_seq": last,
        "eos": eos,
        "stale": stale,
        "lines": lines,
        "levels": len(rows),
        "stocks": len(stocks),
    }
    f = fw.decode(fw.snap_levels(seq, rows))
    assert (f.type, f.count, f.seq) == (fw.SNAP_LEVELS, len(rows), seq)
    assert (fw.level_rows(f.body) == rows).all()
    f = fw.decode(fw.snap_stocks(seq, stocks))
    assert f.body.tobytes() == stocks.tobytes()
    f = fw.decode(fw.snap_end(seq, len(rows)))
    assert (f.type, f.count, f.seq) == (fw.SNAP_END, len(rows), seq)


def test_decode_refuses_what_is_not_a_frame():
    good = fw.heartbeat(1, 2, 3)
    with pytest.raises(fw.WireError, match="shorter than"):
        fw.decode(good[:10])
    with pytest.raises(fw.WireError, match="version 2"):
        fw.decode(bytes([2]) + good[1:])
    with pytest.raises(fw.WireError, match="unknown frame type 77"):
        fw.decode(good[:1] + bytes([77]) + good[2:])
    ok = fw.events(0, 2, np.zeros(2, ev.EVENT))
    with pytest.raises(fw.WireError, match="body of"):
        fw.decode(ok[:-1])


def test_wire_event_is_the_ring_record_without_its_version():
    assert fw.WIRE_EVENT.names == ev.EVENT.names[1:]
    for name in fw.WIRE_EVENT.names:
        assert fw.WIRE_EVENT.fields[name][1] == ev.EVENT.fields[name][1] - 8


@pytest.mark.parametrize(
    "target, sub",
    [
        ("/feed", fw.Subscription("", (), fw.K_ALL, False, None)),
        (
            "/feed?channel=bx&symbols=aapl,MSFT&kinds=bbo,trades&snapshot=1",
            fw.Subscription("bx", ("AAPL", "MSFT"), fw.K_BBO | fw.K_TRADES, True, None),
        ),
        ("/feed?from_seq=0", fw.Subscription("", (), fw.K_ALL, False, 0)),
        ("/feed?snapshot=0&from_seq=12", fw.Subscription("", (), fw.K_ALL, False, 12)),
    ],
)
def test_query_parses(target, sub):
    assert fw.parse_query(target) == sub
    assert fw.parse_query(fw.query(sub)) == sub


@pytest.mark.parametrize(
    "target, reason",
    [
        ("/other", "the feed is at /feed"),
        ("/feed?chanel=x", "unknown parameter 'chanel'"),
        ("/feed?channel=a&channel=b", "'channel' given twice"),
        ("/feed?snapshot=1&from_seq=3", "exclude each other"),
        ("/feed?from_seq=-1", "from_seq: '-1'"),
        ("/feed?from_seq=x", "from_seq: 'x'"),
        ("/feed?kinds=bbo,quotes", "kinds: 'quotes'"),
        ("/feed?snapshot=yes", "snapshot: 'yes'"),
        ("/feed?symbols=AAPL,,MSFT", "symbols: ''"),
        ("/feed?channel=", "channel: empty"),
        ("/feed?junk", "query 'junk'"),
        ("/feed?channel=world&from_seq=3", "world channel is conflated"),
        ("/feed?channel=world&kinds=bbo", "consolidated quotes only"),
        ("/feed?channel=world&symbols=AAPL,12", "tickers, not locates"),
    ],
)
def test_query_rejects(target, reason):
    with pytest.raises(fw.WireError, match=reason.replace("?", r"\?")):
        fw.parse_query(target)


# --- the server and the client, on a real event ring in private shared memory ----------------
# The producer below is the consumer's publishing path (``events.apply_stream`` + ``finish``
# on the production book) without the network; the server and the clients are the real ones.


N_MSGS = 60_000
CLI = [sys.executable, "-m", "host.cli"]


class Producer:
    """A channel's event ring fed with an ITCH session, as the consumer publishes it."""

    def __init__(self, root, channel: str, buf: np.ndarray, slots: int = 1 << 18):
        shm.create(channel, root)
        self.ring = ev.Ring.create(channel, slots, root=root, tsc_hz=0)
        self.book = Book()
        self.buf = buf
        self.offs = [0]
        p = 0
        while p < len(buf):
            p += 2 + (int(buf[p]) << 8 | int(buf[p + 1]))
            self.offs.append(p)
        self.done = 0  # messages published
        self.seq = 1

    @property
    def total(self) -> int:
        return len(self.offs) - 1

    def publish(self, n: int, per_packet: int = 20) -> None:
        r = self.ring
        stop = min(self.total, self.done + n)
        while self.done < stop:
            k = min(per_packet, stop - self.done)
            pos, end = self.offs[self.done], self.offs[self.done + k]
            while True:
                status, pos = ev.apply_stream(
                    self.buf, pos, end, self.seq, 1, *self.book.arrays(), r.ring, r.hdr
                )
                ev.finish(r.ring, r.hdr, r.clk, r.ts, 0)
                if status in (0,) or pos >= end:
                    break
                self.book.grow(status)
            self.done += k
            self.seq += k

    def end_of_session(self) -> None:
        r = self.ring
        ev.channel_event(
            r.ring, r.hdr, r.clk, r.ts, ev.CH_END_OF_SESSION, ev.NO_SIDE, self.seq - 1, self.seq, 0
        )


class Server:
    """A FeedServer on a loop of its own thread (``port`` 0: any)."""

    def __init__(self, root, channels, port: int = 0, **cfg):
        self.cfg = hc.FeedServerConfig(listen="127.0.0.1", port=port, **cfg)
        self.root, self.channels = root, channels
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(30), "the server did not start"

    def _run(self, ready) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop_ev = asyncio.Event()
            self.server = feed.FeedServer(self.cfg, self.channels, root=self.root)
            self.port = await self.server.start()
            ready.set()
            await self.stop_ev.wait()
            await self.server.stop()

        uvloop.run(main())

    def url(self, query: str = "", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/feed{query}"

    def metrics(self) -> str:
        fut = asyncio.run_coroutine_threadsafe(_text(feed.registry(self.server)), self.loop)
        return fut.result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_ev.set)
        self.thread.join(10)


async def _text(reg) -> str:
    return generate_latest(reg).decode()


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in the metrics")


class ClientThread:
    """A FeedClient running on a loop of its own thread."""

    def __init__(self, client: fc.FeedClient, timeout: float = 120):
        self.client, self.exc = client, None
        self.thread = threading.Thread(target=self._run, args=(timeout,), daemon=True)
        self.thread.start()

    def _run(self, timeout) -> None:
        try:
            fc.run(self.client, until_eos=True, timeout=timeout)
        except Exception as e:  # reported by result()
            self.exc = e

    def result(self, timeout: float = 120) -> fc.FeedClient:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the client did not finish"
        if self.exc is not None:
            raise self.exc
        return self.client


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def session_buf(tmp_path_factory):
    path = tmp_path_factory.mktemp("feed") / "s.itch"
    itchgen.write_session(str(path), N_MSGS, 40, 11)
    buf = np.fromfile(path, np.uint8)
    ref = Book()
    ref.feed(buf)
    return buf, ref.digest()


@pytest.fixture
def chan(tmp_path, session_buf):
    name = f"fd{abs(hash(tmp_path.name)) % 10**6}"
    prod = Producer(tmp_path, name, session_buf[0])
    yield prod, name, tmp_path
    shm.remove(name, tmp_path)


def test_snapshot_join_and_cursor_reconnect_end_with_the_books_digest(chan, session_buf):
    prod, name, root = chan
    srv = Server(root, [name])
    try:
        prod.publish(prod.total // 3)
        _wait(lambda: srv.server.pumps[name].pos == prod.ring.write_pos, "the pump")
        joiner = ClientThread(fc.FeedClient(srv.url(f"?channel={name}&snapshot=1")))
        dropped = []

        def drop_twice(e):
            if len(dropped) < 2 and dropper.events > 5_000 * (len(dropped) + 1) and dropper.drop():
                dropped.append(dropper.expected)

        dropper = fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0, on_event=drop_twice)
        drop_t = ClientThread(dropper)
        _wait(lambda: joiner.client.joined, "the snapshot")
        prod.publish(prod.total)
        prod.end_of_session()
        a, b = joiner.result(), drop_t.result()
        assert a.digest() == b.digest() == session_buf[1]
        assert a.done and b.done and a.next_seq == b.next_seq == N_MSGS + 1
        assert a.last_seq == b.last_seq == N_MSGS
        assert len(dropped) == 2 and b.reconnects == 2  # resumed with its cursor, twice
        assert a.expected == b.expected == prod.ring.write_pos
        text = srv.metrics()
        assert _metric(text, "tickwire_feed_frames_total", channel=name) >= a.frames + b.frames
        assert _metric(text, "tickwire_feed_position_events", channel=name) == prod.ring.write_pos
    finally:
        srv.close()


def test_kinds_and_symbols_filter_and_frames_stay_contiguous(chan, session_buf):
    prod, name, root = chan
    srv = Server(root, [name])
    try:
        prod.publish(2000)
        seen = []
        c = fc.FeedClient(
            srv.url(f"?channel={name}&kinds=bbo&snapshot=1"), on_event=lambda e: seen.append(e)
        )
        t = ClientThread(c)
        _wait(lambda: c.joined, "the snapshot")
        prod.publish(prod.total)
        prod.end_of_session()
        t.result()
        kinds = {e.kind for e in seen}
        assert "bbo" in kinds and not kinds & {"level", "trade"}
        assert c.expected == prod.ring.write_pos  # every event covered, filtered or sent
        sym = next(e.symbol for e in seen if e.kind == "bbo")
        only = []
        c2 = fc.FeedClient(
            srv.url(f"?channel={name}&symbols={sym}"), from_seq=0, on_event=only.append
        )
        ClientThread(c2).result()
        assert {e.symbol for e in only if e.kind != "channel"} == {sym}
        assert c2.expected == prod.ring.write_pos
    finally:
        srv.close()


def _refusal(url: str, token: str | None = None) -> str:
    c = fc.FeedClient(url, token=token, reconnect=False)
    with pytest.raises(fc.FeedError) as e:
        fc.run(c, timeout=10)
    return str(e.value)


def test_bad_queries_tokens_and_the_cap_are_refused_before_any_frame(chan, tmp_path):
    prod, name, root = chan
    tf = tmp_path / "tokens"
    tf.write_text("# clients\nfrom-file\n")
    srv = Server(root, [name], tokens=("s3cret",), token_file=str(tf), max_clients=1)
    try:
        status, why = uvloop.run(_raw(srv.url("?channel=x&channel=y"), "s3cret"))
        assert (status, why) == (400, "bad query: parameter 'channel' given twice")
        status, why = uvloop.run(_raw(srv.url("?snapshot=1&from_seq=2"), "s3cret"))
        assert status == 400 and "exclude each other" in why
        with pytest.raises(fw.WireError, match="exclude"):
            fc.FeedClient(srv.url("?snapshot=1&from_seq=2"))
        assert "refused (401)" in _refusal(srv.url(f"?channel={name}"))
        assert "refused (401)" in _refusal(srv.url(f"?channel={name}"), "wrong")
        assert "refused (404)" in _refusal(srv.url("?channel=nosuch"), "s3cret")
        # a good token: served; a second connection is one past max_clients
        frames = []

        class L(WSListener):
            def on_ws_frame(self, t, f):
                frames.append(fw.decode(f.get_payload_as_bytes()))

        async def two():
            hdr = {"Authorization": "Bearer from-file"}
            t, _ = await ws_connect(L, srv.url(f"?channel={name}"), extra_headers=hdr)
            try:
                while not frames:
                    await asyncio.sleep(0.01)
                return await _refusal_async(srv.url(f"?channel={name}"), "s3cret")
            finally:
                t.disconnect()

        why = uvloop.run(two())
        assert frames[0].type == fw.HELLO and frames[0].body["channel"] == name
        assert "refused (503)" in why and "max_clients" in why
        text = srv.metrics()
        assert _metric(text, "tickwire_feed_refused_total", reason="token") == 2
        assert _metric(text, "tickwire_feed_refused_total", reason="bad_query") == 2
        assert _metric(text, "tickwire_feed_refused_total", reason="max_clients") == 1
    finally:
        srv.close()


async def _raw(url: str, token: str) -> tuple[int, str]:
    """The HTTP status and body of a refused upgrade."""
    from picows import WSHandshakeError

    try:
        t, _ = await ws_connect(WSListener, url, extra_headers={"Authorization": f"Bearer {token}"})
    except WSHandshakeError as e:
        return int(e.response.status), e.raw_body.decode().strip()
    t.disconnect()
    raise AssertionError("not refused")


async def _refusal_async(url: str, token: str) -> str:
    c = fc.FeedClient(url, token=token, reconnect=False)
    with pytest.raises(fc.FeedError) as e:
        await c.run(timeout=10)
    return str(e.value)


def _self_signed(tmp_path) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    c, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(c), str(k)


def test_tls_serves_wss_and_heartbeats_come_when_idle(chan, session_buf, tmp_path):
    prod, name, root = chan
    cert, key = _self_signed(tmp_path)
    srv = Server(root, [name], tls_cert=cert, tls_key=key, heartbeat_s=0.05)
    try:
        prod.publish(1000)
        c = fc.FeedClient(srv.url(f"?channel={name}&snapshot=1", "wss"), cafile=cert)
        t = ClientThread(c)
        _wait(lambda: c.heartbeats >= 3, "heartbeats of an idle stream")
        prod.publish(prod.total)
        prod.end_of_session()
        assert t.result().digest() == session_buf[1]
        # a client that does not trust the certificate is not served
        bad = fc.FeedClient(srv.url(f"?channel={name}", "wss"), reconnect=False)
        with pytest.raises((fc.FeedError, ssl.SSLError, OSError)):
            fc.run(bad, timeout=10)
    finally:
        srv.close()


def test_a_slow_client_is_evicted_and_counted_while_another_continues(chan, session_buf):
    prod, name, root = chan
    srv = Server(root, [name], queue_frames=4, stall_timeout_s=0.5)
    try:
        got = []

        class Slow(WSListener):
            def on_ws_connected(self, t):
                t.underlying_transport.pause_reading()  # reads nothing from here on

            def on_ws_frame(self, t, f):
                got.append(f)

        async def slow_then_wait():
            t, _ = await ws_connect(Slow, srv.url(f"?channel={name}"))
            sock = t.underlying_transport.get_extra_info("socket")
            import socket as so

            sock.setsockopt(so.SOL_SOCKET, so.SO_RCVBUF, 4096)
            return t

        loop = asyncio.new_event_loop()
        slow_t = loop.run_until_complete(slow_then_wait())
        good = ClientThread(fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0))
        prod.publish(prod.total)
        r = prod.ring
        pump = srv.server.pumps[name]
        for _ in range(15):  # more than any socket buffers hold (~17 MB of frames)
            for _ in range(20_000):
                ev.channel_event(r.ring, r.hdr, r.clk, r.ts, ev.CH_SYSTEM, ev.NO_SIDE, 0, 0, 79)
            _wait(lambda: pump.pos == r.write_pos, "the pump")  # the ring never laps it
        prod.end_of_session()
        fed = good.result()
        assert fed.digest() == session_buf[1]

        def evicted():
            text = srv.metrics()
            return sum(
                _metric(text, "tickwire_feed_evictions_total", channel=name, reason=r)
                for r in ("queue_full", "stalled")
            )

        # the slow client once; the good one only if a loaded machine starved it past its
        # 4 frames (it then resumed with its cursor, and its digest says it lost nothing)
        _wait(lambda: evicted() == 1 + len(fed.evicted), "the slow client's eviction")
        assert len(srv.server.pumps[name].clients) == 0
        slow_t.disconnect(False)
        loop.close()
    finally:
        srv.close()


def test_a_cursor_older_than_the_window_is_an_error_not_a_skip(chan):
    prod, name, root = chan
    srv = Server(root, [name], retention_events=4096)
    try:
        prod.publish(5000)  # far more than 4096 events
        _wait(lambda: srv.server.pumps[name].pos == prod.ring.write_pos, "the pump")
        old = fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0)
        with pytest.raises(fc.FeedError, match="cursor_old: from_seq 0 is older"):
            fc.run(old, timeout=10)
        ahead = fc.FeedClient(srv.url(f"?channel={name}"), from_seq=prod.ring.write_pos + 10)
        with pytest.raises(fc.FeedError, match="cursor_ahead"):
            fc.run(ahead, timeout=10)
        oldest = srv.server.pumps[name].oldest
        ok = fc.FeedClient(srv.url(f"?channel={name}"), from_seq=oldest)
        t = ClientThread(ok)
        _wait(lambda: ok.joined, "the replay's hello")
        prod.end_of_session()
        assert t.result().done and ok.expected == prod.ring.write_pos
    finally:
        srv.close()


def test_a_server_started_mid_session_replays_from_event_0_while_the_ring_holds_it(
    chan, session_buf
):
    prod, name, root = chan
    prod.publish(prod.total // 3)  # well under half the ring's slots
    srv = Server(root, [name])
    try:
        assert srv.server.pumps[name].oldest == 0
        t = ClientThread(fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0))
        prod.publish(prod.total)
        prod.end_of_session()
        c = t.result()
        assert c.digest() == session_buf[1] and c.snapshot_seq == 0
    finally:
        srv.close()


def test_a_joined_client_waits_out_503s_while_a_restarted_server_attaches(
    chan, session_buf, monkeypatch
):
    """The server stops and another starts on its port, whose pump cannot attach to the
    ring until the test lets it: a joined client's reconnects are refused (503) and it keeps
    trying, then resumes with its cursor and ends with the book's digest; one whose
    ``reconnect_timeout`` passes first fails naming the refusal; a new client refused with
    503 on its first connection fails at once."""
    prod, name, root = chan
    srv = Server(root, [name])
    port = srv.port
    url = srv.url(f"?channel={name}")
    patient = ClientThread(fc.FeedClient(url, from_seq=0))
    brief = ClientThread(fc.FeedClient(url, from_seq=0, reconnect_timeout=3))
    prod.publish(prod.total // 4)  # the new server's window starts at 0 again (half a ring)
    _wait(
        lambda: patient.client.expected == brief.client.expected == prod.ring.write_pos,
        "both clients level with the ring",
    )
    gate = threading.Event()
    attach = feed.Pump.attach

    def gated(pump):
        if not gate.is_set():
            raise OSError("the test holds the ring back")
        attach(pump)

    monkeypatch.setattr(feed.Pump, "attach", gated)
    srv.close()  # its clients get ERROR E_SHUTDOWN and reconnect
    srv = Server(root, [name], port=port)
    try:
        with pytest.raises(fc.FeedError) as e:
            brief.result(60)
        assert "not reconnected within 3 s (reconnect_timeout); the last try: refused (503)" in (
            str(e.value)
        )
        assert f"channel {name}: the test holds the ring back" in str(e.value)
        assert brief.client.reconnects >= 1
        fresh = fc.FeedClient(url)
        with pytest.raises(fc.FeedError, match=r"^refused \(503\): channel ") as e:
            fc.run(fresh, timeout=10)
        assert srv.server.refused["channel"] >= 2 and patient.thread.is_alive()
        gate.set()
        prod.publish(prod.total)
        prod.end_of_session()
        c = patient.result()
        assert c.digest() == session_buf[1] and c.done and c.last_seq == N_MSGS
        assert c.reconnects >= 1 and c.snapshot_seq == 0 and c.expected == prod.ring.write_pos
    finally:
        srv.close()


def test_a_silent_connection_is_cut_and_the_client_resumes_with_its_cursor(chan, session_buf):
    """A server that sends nothing -- no events, no heartbeat (``heartbeat_s`` 60) -- for
    longer than the client's ``silence_s``: the client counts the silence, cuts, reconnects
    with its cursor, and still ends with the book's digest. Without ``silence_s`` the limit
    comes from HELLO's heartbeat interval."""
    prod, name, root = chan
    srv = Server(root, [name], heartbeat_s=60.0)
    try:
        prod.publish(prod.total // 3)
        t = ClientThread(fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0, silence_s=0.3))
        _wait(lambda: t.client.expected == prod.ring.write_pos, "the client level with the ring")
        _wait(lambda: t.client.silences >= 2, "two silent connections cut")
        prod.publish(prod.total)
        prod.end_of_session()
        c = t.result()
        assert c.digest() == session_buf[1] and c.done and c.last_seq == N_MSGS
        assert c.reconnects >= c.silences >= 2 and c.snapshot_seq == 0
        plain = fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0)
        assert plain.silence_limit() == fc.SILENT_PRE_HELLO_S
        plain.hello = {"heartbeat_ms": 1000}
        assert plain.silence_limit() == fc.SILENT_BEATS * 1.0
        plain.hello = {"heartbeat_ms": 100}
        assert plain.silence_limit() == fc.SILENT_MIN_S
    finally:
        srv.close()


def test_an_error_serving_one_client_drops_it_and_the_pump_serves_the_rest(chan, session_buf):
    """Whatever the server raises while serving one connection (here injected into one
    client's ``deliver``) ends that connection only -- logged and counted in
    ``tickwire_feed_client_errors_total`` -- and the pump goes on: the other client is not
    disturbed, and the dropped one resumes with its cursor; both end with the digest."""
    prod, name, root = chan
    srv = Server(root, [name])
    try:
        pump = srv.server.pumps[name]
        victim = ClientThread(fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0))
        _wait(lambda: len(pump.clients) == 1, "the first client")
        (served,) = pump.clients

        def boom(*args):
            del served.deliver  # once
            raise RuntimeError("injected: the transport broke")

        srv.loop.call_soon_threadsafe(setattr, served, "deliver", boom)
        other = ClientThread(fc.FeedClient(srv.url(f"?channel={name}"), from_seq=0))
        _wait(lambda: len(pump.clients) == 2, "the second client")
        prod.publish(prod.total)
        prod.end_of_session()
        a, b = victim.result(), other.result()
        assert a.digest() == b.digest() == session_buf[1] and a.done and b.done
        assert a.reconnects == 1 and b.reconnects == 0
        assert srv.server.client_errors == 1 and not srv.server.crashed
        assert _metric(srv.metrics(), "tickwire_feed_client_errors_total") == 1
    finally:
        srv.close()


def test_a_pump_that_ends_stops_the_server_saying_why():
    """A pump or the timer is never meant to end: one that does (an error outside any one
    client) makes the server say what ended and why, and call ``on_crash`` (``tickwire
    serve`` then exits 1 for its supervisor to restart it)."""
    server = feed.FeedServer(hc.FeedServerConfig(), ["x"])
    called = []
    server.on_crash = lambda: called.append(1)

    async def main():
        async def broken():
            raise ValueError("bad ring")

        async def forever():
            await asyncio.sleep(3600)

        t = server._watch(broken(), "channel x's pump")
        quiet = server._watch(forever(), "the heartbeat timer")
        with pytest.raises(ValueError):
            await t
        quiet.cancel()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert server.crashed == "channel x's pump ended: ValueError: bad ring"
    assert called == [1]


def test_tickwire_client_prints_the_digest_of_its_levels(chan, session_buf):
    prod, name, root = chan
    srv = Server(root, [name])
    try:
        prod.publish(prod.total // 2)
        cmd = [sys.executable, "-m", "host.cli", "client", srv.url(f"?channel={name}")]
        p = subprocess.Popen(
            [*cmd, "--snapshot", "--until-eos", "--digest", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait(lambda: len(srv.server.pumps[name].clients) == 1, "the client", 60)
        prod.publish(prod.total)
        prod.end_of_session()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        rep = json.loads(out)
        assert rep["digest"] == session_buf[1] and rep["ended"] and rep["last_seq"] == N_MSGS
        bad = subprocess.run([*cmd, "--digest"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.strip() == (
            "tickwire client: --digest needs --until-eos"
        )
    finally:
        srv.close()


# --- the world channel ----------------------------------------------------------------------------
VENUE_NAMES = ("nq", "bx", "px")
REASONS = ("halted", "paused", "quotation_only", "stale", "lines_down", "state_Z")


@st.composite
def quotes(draw):
    sym = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ.", min_size=1, max_size=8))
    sides = []
    for _ in range(2):
        at = draw(st.lists(st.sampled_from(VENUE_NAMES), unique=True))
        sides.append(tuple((v, draw(st.integers(1, 2**60))) for v in VENUE_NAMES if v in at))
    out = draw(st.lists(st.sampled_from(VENUE_NAMES), unique=True))
    excluded = tuple((v, draw(st.sampled_from(REASONS))) for v in VENUE_NAMES if v in out)
    u64, i64 = st.integers(0, 2**63 - 1), st.integers(-(2**63), 2**63 - 1)
    return wv.Quote(
        sym,
        draw(U32),
        sum(n for _, n in sides[0]),
        draw(U32),
        sum(n for _, n in sides[1]),
        sides[0],
        sides[1],
        excluded,
        draw(u64),
        draw(u64),
        draw(i64),
        draw(i64),
        draw(i64),
    )


@settings(max_examples=60, deadline=None)
@given(qs=st.lists(quotes(), max_size=20), seq=I64, image=st.booleans())
def test_quotes_round_trip(qs, seq, image):
    names = list(VENUE_NAMES)
    f = fw.decode(fw.venues(seq, names))
    assert (f.type, f.count, f.seq, f.body) == (fw.VENUES, 3, seq, names)
    f = fw.decode(fw.quotes(seq, names, qs, image), venues=3)
    assert (f.type, f.count, f.seq, f.flags) == (fw.QUOTES, len(qs), seq, int(image))
    assert f.body.itemsize == 72 + 17 * 3
    assert fw.to_quotes(f.body, names) == qs
    with pytest.raises(fw.WireError, match="before the venues frame"):
        fw.decode(fw.quotes(seq, names, qs))


def _rec(kind, locate=0, side=0, code=0, price=0, n=0, value=0, rx_ns=0):
    e = np.zeros(1, ev.EVENT)
    e["kind"], e["locate"], e["side"], e["code"] = kind, locate, side, code
    e["price"], e["n"], e["value"], e["rx_ns"] = price, n, value, rx_ns
    return e


def _directory(loc, sym):
    from dataplane.subscriber import pack_symbol

    return _rec(ev.INSTRUMENT, loc, ev.NO_SIDE, ord("R"), value=pack_symbol(sym))


def _bbo(loc, side, px, qty):
    return _rec(ev.BBO, loc, 0 if side == "B" else 1, price=px, value=qty, rx_ns=px)


class World:
    """A real ``WorldView`` behind its gRPC service on loopback, fed by hand: three venues
    quoting AAPL (at three locates) and MSFT."""

    def __init__(self, port: int = 0):
        self.view = wv.WorldView(list(VENUE_NAMES))
        for venue, loc in (("nq", 5), ("bx", 17), ("px", 300)):
            self.view.apply(
                venue, np.concatenate([_directory(loc, "AAPL"), _directory(loc + 1, "MSFT")])
            )
            self.view.apply(
                venue, np.concatenate([_bbo(loc, "B", 1000 + loc, 10), _bbo(loc, "S", 2000, 5)])
            )
        self.server, self.service, self.port = wv.start_server(self.view, f"127.0.0.1:{port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        wv.stop_server(self.server, self.service, grace=0)


@pytest.fixture
def world():
    w = World()
    yield w
    w.close()


def test_the_world_channel_serves_the_world_views_quotes_image_then_changes(chan, world):
    _prod, name, root = chan
    srv = Server(root, [name], world=world.address, heartbeat_s=0.05)
    try:
        pump = srv.server.world
        _wait(lambda: pump.quotes == world.view.quotes, "the server to hold the world view")
        full = fc.FeedClient(srv.url("?channel=world&snapshot=1"), reconnect_timeout=1)
        t_full = ClientThread(full)
        _wait(lambda: full.joined, "the world image")
        assert full.venues == list(VENUE_NAMES)
        assert full.quotes == world.view.quotes  # the image: every quote as the view has it
        assert full.image_quotes == 2
        got_msft = []
        live = fc.FeedClient(
            srv.url("?channel=world&symbols=msft"), on_quote=got_msft.append, reconnect_timeout=1
        )
        t_live = ClientThread(live)
        _wait(lambda: live.joined and len(srv.server.world.clients) == 2, "the live client")
        _wait(lambda: live.heartbeats >= 2, "heartbeats of an idle world stream")
        # changes: a better AAPL bid on bx, px halts MSFT, nq's MSFT offer improves
        v = world.view
        seq0 = v.seq
        v.apply("bx", _bbo(17, "B", 1400, 7))
        v.apply("px", _rec(ev.INSTRUMENT, 301, ev.NO_SIDE, ord("H"), n=ord("H")))
        v.apply("nq", _bbo(6, "S", 1990, 3))
        want = dict(v.quotes)
        _wait(lambda: full.quotes == want, "the changes at the full client")
        q = full.quotes["AAPL"]
        assert (q.bid_px, q.bids) == (1400, (("bx", 7),))
        m = live.quotes["MSFT"]
        assert m == want["MSFT"] and m.excluded == (("px", "halted"),)
        assert (m.ask_px, m.asks) == (1990, (("nq", 3),))
        assert set(live.quotes) == {"MSFT"} and {q.symbol for q in got_msft} == {"MSFT"}
        assert got_msft and all(q.seq > seq0 for q in got_msft)  # changes since it joined
        ups = [q.update for q in got_msft]
        assert ups == sorted(set(ups))
        text = srv.metrics()
        assert _metric(text, "tickwire_feed_clients", channel="world") == 2
        assert _metric(text, "tickwire_feed_position_events", channel="world") == v.seq
        # the world view goes away: its clients are told (E_WORLD), new ones refused (503)
        world.close()
        with pytest.raises(fc.FeedError, match="world"):
            t_full.result(60)
        with pytest.raises(fc.FeedError, match="world"):
            t_live.result(60)
        _wait(lambda: not srv.server.world.ready, "the server to lose the world view")
        assert "refused (503)" in _refusal(srv.url("?channel=world&snapshot=1"))
        # a world view back on the same address: followed again, a new generation
        gen = full.generation
        back = World(world.port)
        try:
            _wait(lambda: pump.quotes == back.view.quotes, "the server to follow it again")
            again = fc.FeedClient(srv.url("?channel=world&snapshot=1"))
            t_again = ClientThread(again)
            _wait(lambda: again.quotes == back.view.quotes, "the new world view's image")
            assert again.generation != gen
            again.stop()
            t_again.result(30)
        finally:
            back.close()
    finally:
        srv.close()


def test_a_world_client_served_as_soon_as_the_server_says_ready_gets_the_whole_image(tmp_path):
    """The server's world channel is ready only at ``WatchBBO``'s image-end marker: a
    ``snapshot=1`` client that tries from the moment the server starts (refused with 503
    while the pump takes the image in) and is first served gets every quote of a large
    image, and then the changes."""
    n = 4000
    view = wv.WorldView(list(VENUE_NAMES))
    recs = [_directory(loc, f"S{loc}") for loc in range(1, n + 1)]
    recs += [_bbo(loc, "B", 100 + loc, 1) for loc in range(1, n + 1)]
    view.apply("nq", np.concatenate(recs))
    assert len(view.quotes) == n
    server, service, port = wv.start_server(view, "127.0.0.1:0")
    srv = Server(tmp_path, [], world=f"127.0.0.1:{port}")
    try:

        async def first_served() -> tuple[fc.FeedClient, list[str]]:
            refusals = []
            deadline = time.monotonic() + 60
            while True:
                c = fc.FeedClient(srv.url("?channel=world&snapshot=1"))
                task = asyncio.create_task(c.run(until_eos=False))
                while not (c.joined or task.done()):
                    assert time.monotonic() < deadline, f"never served: {refusals[-1:]}"
                    await asyncio.sleep(0.001)
                if c.joined:
                    c.stop()
                    await task
                    return c, refusals
                refusals.append(str(task.exception()))

        c, refusals = uvloop.run(first_served())
        assert all(r.startswith("refused (503): channel world: ") for r in refusals), refusals
        assert c.image_quotes == n and c.quotes == view.quotes
        assert srv.server.world.ready and srv.server.world.applied == n
    finally:
        srv.close()
        wv.stop_server(server, service, grace=0)


def test_the_world_channel_refuses_a_cursor_and_is_404_without_a_world_view(chan, world):
    _prod, name, root = chan
    srv = Server(root, [name])
    try:
        status, why = uvloop.run(_raw(srv.url("?channel=world&from_seq=0"), ""))
        assert status == 400 and "conflated" in why and "snapshot=1" in why
        assert "refused (404)" in _refusal(srv.url("?channel=world"))
        with pytest.raises(ValueError, match="conflated"):
            fc.FeedClient(srv.url("?channel=world"), from_seq=3)
    finally:
        srv.close()
    with pytest.raises(hc.ConfigError, match="'world' is the world view's channel"):
        feed.FeedServer(hc.FeedServerConfig(world=world.address), ["world"])


@pytest.mark.parametrize(
    "table, why",
    [
        ({"world": "nope"}, r"^feed_server\.world: 'nope' must be host:port"),
        ({"world": "127.0.0.1:0"}, r"^feed_server\.world: port 0"),
        (
            {"world": "127.0.0.1:50551", "channels": ["world"]},
            r"^feed_server\.channels: 'world' is the world view's channel",
        ),
    ],
)
def test_feed_server_world_is_checked_naming_the_key(table, why):
    assert hc.from_dict({"feed_server": {"world": "10.0.0.5:50551"}}).feed_server.world
    with pytest.raises(hc.ConfigError, match=why):
        hc.from_dict({"feed_server": table})


def test_tickwire_serve_metrics_are_scraped_and_sigterm_ends_it(chan, session_buf, world, tmp_path):
    """``tickwire serve`` as a process (its channel in a private shared-memory root, the
    world view's address): its metrics endpoint scraped over HTTP before and after a client
    followed the session to its end; the world channel's quotes printed by ``tickwire
    client --count``; SIGTERM: exit status 0."""
    import os
    import urllib.request

    prod, name, root = chan
    port, mport = free_port(), free_port()
    cfg = tmp_path / "serve.toml"
    cfg.write_text(
        f'[feed_server]\nlisten = "127.0.0.1"\nport = {port}\nchannels = ["{name}"]\n'
        f'metrics = "127.0.0.1:{mport}"\nworld = "{world.address}"\n'
    )
    env = {**os.environ, "TICKWIRE_SHM": str(root)}
    serve = subprocess.Popen(
        [*CLI, "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        said = serve.stdout.readline()
        assert said.startswith(
            f"tickwire serve: ws://127.0.0.1:{port}/feed serving {name}, world"
        ), said

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                return r.read().decode()

        text = wait_for(lambda: _try(scrape), 60, "the metrics endpoint")
        assert _metric(text, "tickwire_feed_clients", channel=name) == 0
        assert _metric(text, "tickwire_feed_frames_total", channel=name) == 0
        url = f"ws://127.0.0.1:{port}/feed?channel={name}"
        c = ClientThread(fc.FeedClient(url, snapshot=True))
        wait_for(
            lambda: _metric(scrape(), "tickwire_feed_clients", channel=name) == 1, 60, "the client"
        )
        prod.publish(prod.total)
        prod.end_of_session()
        got = c.result()
        assert got.digest() == session_buf[1]
        text = scrape()
        assert _metric(text, "tickwire_feed_position_events", channel=name) == prod.ring.write_pos
        assert _metric(text, "tickwire_feed_frames_total", channel=name) == got.frames
        assert _metric(text, "tickwire_feed_bytes_total", channel=name) > 0
        assert (
            _metric(text, "tickwire_feed_evictions_total", channel=name, reason="queue_full") == 0
        )
        wurl = f"ws://127.0.0.1:{port}/feed?channel=world"
        out = subprocess.run(
            [*CLI, "client", wurl, "--snapshot", "--json", "--count", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        docs = [json.loads(ln) for ln in out.stdout.splitlines()]
        assert {d["symbol"] for d in docs} == {"AAPL", "MSFT"}
        assert docs[0] == world.view.quotes["AAPL"].as_dict()
        bad = subprocess.run(
            [*CLI, "client", wurl, "--until-eos"], capture_output=True, text=True, timeout=60
        )
        assert bad.returncode == 2 and "no end of session" in bad.stderr
        assert _metric(scrape(), "tickwire_feed_frames_total", channel="world") >= 4
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def _try(f):
    try:
        return f()
    except OSError:
        return None


# --- in the lab -----------------------------------------------------------------------------------
LAB_MSGS = 300_000


@pytest.fixture(scope="module")
def lab_session(tmp_path_factory):
    path = tmp_path_factory.mktemp("feedlab") / "s.itch"
    itchgen.write_session(str(path), LAB_MSGS, 40, 13)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    return path, ref.digest()


def _in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _conns(ns: str, port: int, peer: str) -> list[tuple[str, str]]:
    """The established TCP connections of ``ns`` with ``port`` at the ``peer`` end (``sport``
    or ``dport``), as (local, remote) address:port pairs."""
    out = subprocess.run(
        _in_ns(ns, "ss", "-tnH", "state", "established", f"( {peer} = :{port} )"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [tuple(ln.split()[-2:]) for ln in out.splitlines() if ln.strip()]


def _scrape(ns: str, address: str) -> str:
    """The metrics page at ``address``, fetched from inside namespace ``ns``."""
    import urllib.request

    from host import netns

    with netns.entered(ns), urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.mark.lab
@pytest.mark.timeout(1200)  # the appliance may compile its consumer on a cold numba cache
def test_in_the_lab_a_snapshot_joiner_and_a_cut_client_end_with_the_books_digest(
    labcfg, lab_session, tmp_path
):
    """The issue's done-means for the feed: the appliance (``tickwire run --lab``) and
    ``tickwire serve --lab`` in the appliance namespace; two ``tickwire client`` processes in
    the exchange namespace, across the lab's line A (appliance_ip). One follows from event 0
    and has its TCP connection destroyed by the server's side (``ss -K``) a quarter through:
    it resumes with its cursor. The other joins with ``snapshot=1`` once a third of the
    session is taken. Both end with ``tickwire book``'s digest; the server's metrics are
    scraped from its endpoint; SIGTERM ends the server with status 0."""
    from tests.labnet import Appliance, SimProcess, write_config

    path, digest = lab_session
    lc = labcfg.lab
    app = Appliance(labcfg, tmp_path, "socket", run_extra="event_slots = 1048576\n")
    port, mport = free_port(), free_port()
    scfg = tmp_path / "serve.toml"
    write_config(labcfg, scfg)
    with open(scfg, "a") as f:
        f.write(f'[run]\nchannel = "{app.channel}"\n')
        f.write(f'[feed_server]\nport = {port}\nmetrics = "127.0.0.1:{mport}"\n')
    procs: list[subprocess.Popen] = []
    sim = None

    def start(*cmd: str) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    try:
        serve = start(*CLI, "serve", "--config", str(scfg), "--lab")
        said = serve.stdout.readline()
        assert said.startswith(f"tickwire serve: ws://0.0.0.0:{port}/feed serving "), (
            said + serve.stderr.read() * (serve.poll() is not None)
        )
        url = f"ws://{lc.line_a.appliance_ip}:{port}/feed?channel={app.channel}"
        client = [*_in_ns(lc.exchange_ns, *CLI, "client", url), "--until-eos", "--digest", "--json"]
        cut = start(*client, "--from-seq", "0")
        wait_for(lambda: _conns(lc.appliance_ns, port, "sport"), 120, "the first client")
        sim = SimProcess(
            write_config(labcfg, tmp_path / "sim.toml"),
            "--session",
            str(path),
            "--rate",
            "20000",  # about 15 s
            "--eos-for",
            "1",
            "--no-rerequest",
        )
        app.wait_taken(LAB_MSGS // 4)
        ((server_end, client_end),) = _conns(lc.appliance_ns, port, "sport")
        assert server_end.rsplit(":", 1)[0] == lc.line_a.appliance_ip  # over the lab's line
        cport = client_end.rsplit(":", 1)[1]
        killed = subprocess.run(
            _in_ns(lc.appliance_ns, "ss", "-K", "-tnH", "state", "established")
            + [f"( sport = :{port} and dport = :{cport} )"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert killed.stdout.strip(), "ss -K destroyed no socket"
        taken = app.wait_taken(LAB_MSGS // 3)["taken"]
        assert taken < LAB_MSGS, "the session ended before the second client joined"
        joiner = start(*client, "--snapshot")
        reps = []
        for p in (cut, joiner):
            try:
                out, err = p.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                for q in (cut, joiner, serve):
                    q.kill()
                said = {
                    n: q.communicate()[1][-2000:]
                    for n, q in (("cut", cut), ("joiner", joiner), ("serve", serve))
                }
                raise AssertionError(f"a client did not end: stderr {said}") from None
            assert p.returncode == 0, err
            reps.append(json.loads(out))
        a, b = reps
        assert a["digest"] == b["digest"] == digest
        assert a["ended"] and b["ended"] and a["last_seq"] == b["last_seq"] == LAB_MSGS
        assert a["reconnects"] >= 1 and a["snapshot_seq"] == 0  # resumed with its cursor
        assert LAB_MSGS // 3 <= b["snapshot_seq"] < LAB_MSGS  # joined mid-session
        sim.finish()
        assert app.finish()["digest"] == digest
        text = _scrape(lc.appliance_ns, f"127.0.0.1:{mport}")
        assert _metric(text, "tickwire_feed_clients", channel=app.channel) == 0
        pos = _metric(text, "tickwire_feed_position_events", channel=app.channel)
        assert pos >= max(a["next_event"], b["next_event"])  # the server read all they got
        assert _metric(text, "tickwire_feed_frames_total", channel=app.channel) >= (
            a["frames"] + b["frames"]
        )
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, serve.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if sim is not None:
            sim.kill()
        app.kill()
