"""The feed server (``host.appliance.feed``), its ``tw-v1`` codec and its client: codec round
trips, the subscription query, tokens, TLS, heartbeats, eviction of a slow client, the
retention window's cursor error; clients that end with ``tickwire book``'s
digest."""

from __future__ import annotations

import asyncio
import json
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
from host.exchange import itchgen

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
    ],
)
def test_query_rejects(target, reason):
    with pytest.raises(fw.WireError, match=reason.replace("?", r"\?")):
        fw.parse_query(target)


# --- the server and the client, on a real event ring in private shared memory ----------------
# The producer below is the consumer's publishing path (``events.apply_stream`` + ``finish``
# on the production book) without the network; the server and the clients are the real ones.


N_MSGS = 60_000


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
    """A FeedServer on a loop of its own thread."""

    def __init__(self, root, channels, **cfg):
        self.cfg = hc.FeedServerConfig(listen="127.0.0.1", port=0, **cfg)
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
        assert good.result().digest() == session_buf[1]

        def evicted():
            text = srv.metrics()
            return sum(
                _metric(text, "tickwire_feed_evictions_total", channel=name, reason=r)
                for r in ("queue_full", "stalled")
            )

        _wait(lambda: evicted() == 1, "the slow client's eviction")
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
