"""The GLIMPSE-style snapshot service over SoupBinTCP: the codec (round trips, malformed
input), the service and the appliance's client on 127.0.0.1 (the spin at N is the book at
N, order by order and queue by queue, and the multicast after N completes it), logins
refused, the fault hooks, heartbeats and silence, the client's errors, and
``tickwire sim``'s options. No root needed."""

from __future__ import annotations

import dataclasses
import re
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import itch
from dataplane import soupbintcp as soup
from dataplane.book import Book
from host import cli, config
from host.appliance import glimpse as client
from host.exchange import faultplan, glimpse, itchgen
from host.exchange import publisher as sim
from host.exchange.cli import glimpse_configs
from tests import itchbytes as ib
from tests.helpers import free_port, wait_for

N_MSGS = 200_000
USER, PASSWORD = "tw", "tickwire"


# --- the codec ------------------------------------------------------------------------------
_alpha = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=6)
_seq = st.integers(0, 10**20 - 1)
_payload = st.binary(max_size=300)


def _packets():
    """(wire bytes, the Packet a splitter must give back) of every type."""
    return st.one_of(
        st.builds(lambda t: (soup.debug(t), soup.Packet("+", t.encode())), _alpha),
        st.builds(
            lambda s, n: (
                soup.login_accepted(s, n),
                soup.Packet("A", soup.login_accepted(s, n)[3:]),
            ),
            _alpha,
            _seq,
        ),
        st.sampled_from("AS").map(lambda c: (soup.login_rejected(c), soup.Packet("J", c.encode()))),
        _payload.map(lambda m: (soup.sequenced(m), soup.Packet("S", m))),
        _payload.map(lambda m: (soup.unsequenced(m), soup.Packet("U", m))),
        st.sampled_from(
            [
                (soup.SERVER_HEARTBEAT_PACKET, soup.Packet("H", b"")),
                (soup.END_OF_SESSION_PACKET, soup.Packet("Z", b"")),
                (soup.CLIENT_HEARTBEAT_PACKET, soup.Packet("R", b"")),
                (soup.LOGOUT_PACKET, soup.Packet("O", b"")),
            ]
        ),
        st.builds(
            lambda u, p, s, n: (
                soup.login_request(u, p, s, n),
                soup.Packet("L", soup.login_request(u, p, s, n)[3:]),
            ),
            _alpha,
            _alpha,
            _alpha,
            _seq,
        ),
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(_packets(), max_size=40), st.lists(st.integers(0, 4000), max_size=20))
def test_a_stream_cut_anywhere_splits_into_the_same_packets(packets, cuts):
    wire = b"".join(w for w, _ in packets)
    split = soup.Splitter()
    got = []
    start = 0
    for cut in sorted(c for c in cuts if c <= len(wire)) + [len(wire)]:
        got += split.feed(wire[start:cut])
        start = cut
    assert got == [p for _, p in packets]
    assert split.pending == 0 and split.packets == len(packets)


@settings(max_examples=200, deadline=None)
@given(_alpha, _alpha.map(lambda s: s + "xyzw"[: max(0, 10 - len(s))]), _alpha, _seq)
def test_login_fields_round_trip(user, password, session, seq):
    [p] = soup.Splitter(soup.CLIENT_TYPES).feed(soup.login_request(user, password, session, seq))
    assert soup.parse_login_request(p) == (user, password, session, seq)
    [a] = soup.Splitter(soup.SERVER_TYPES).feed(soup.login_accepted(session, seq))
    assert soup.parse_login_accepted(a) == (session, seq)
    for code in "AS":
        [j] = soup.Splitter(soup.SERVER_TYPES).feed(soup.login_rejected(code))
        assert soup.parse_login_rejected(j) == code


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_the_snapshot_message_round_trips(seq):
    msg = soup.snapshot_message(seq)
    assert len(msg) == soup.SNAPSHOT_LEN and msg[:1] == b"M"
    assert soup.is_snapshot_message(msg) and soup.parse_snapshot_message(msg) == seq


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=60), max_size=50), st.integers(0, 5))
def test_sequenced_stream_is_the_packets_one_by_one(messages, lead):
    framed = b"\xee" * lead + b"".join(struct.pack(">H", len(m)) + m for m in messages)
    offsets = np.cumsum([lead] + [2 + len(m) for m in messages])
    stream, starts = soup.sequenced_stream(np.frombuffer(framed, np.uint8), offsets)
    assert stream.tobytes() == b"".join(soup.sequenced(m) for m in messages)
    assert starts[0] == 0 and starts[-1] == len(stream) and len(starts) == len(messages) + 1


@pytest.mark.parametrize(
    ("wire", "types", "why"),
    [
        (b"\x00\x00", soup.SERVER_TYPES, "packet length 0"),
        (b"\x00\x01Q", soup.SERVER_TYPES, "unknown packet type 'Q'"),
        (b"\x00\x01L", soup.SERVER_TYPES, "unknown packet type 'L'"),  # a client's, at a client
        (b"\x00\x01S", soup.CLIENT_TYPES, "unknown packet type 'S'"),
        (b"\x00\x05A1234", soup.SERVER_TYPES, "Login Accepted payload is 30 bytes, not 4"),
        (b"\x00\x02Hx", soup.SERVER_TYPES, "Server Heartbeat payload is 0 bytes, not 1"),
        (b"\x00\x01J", soup.SERVER_TYPES, "Login Rejected payload is 1 bytes, not 0"),
        (b"\x01\x00L" + b" " * 10, soup.CLIENT_TYPES, "Login Request payload is 46 bytes, not 255"),
    ],
)
def test_malformed_streams_raise_soup_error_saying_why(wire, types, why):
    with pytest.raises(soup.SoupError, match=why):
        soup.Splitter(types).feed(wire)


def test_malformed_fields_and_values_raise_soup_error_saying_why():
    bad_seq = soup.Packet("L", soup.login_request("u", "p")[3:-20] + b"12a".rjust(20))
    cases = [
        (lambda: soup.parse_login_request(bad_seq), "requested sequence number"),
        (lambda: soup.parse_login_accepted(soup.Packet("A", b"S" * 30)), "sequence number"),
        (lambda: soup.parse_login_rejected(soup.Packet("J", b"Q")), "reject reason 'Q'"),
        (lambda: soup.parse_login_accepted(soup.Packet("J", b"A")), "expected a Login Accepted"),
        (lambda: soup.parse_snapshot_message(b"M" + b"\x00" * 7), "not b'M' and 8"),
        (lambda: soup.parse_snapshot_message(b"A" + b"\x00" * 8), "type 'M'"),
        (lambda: soup.login_request("seven77", "p"), "username 'seven77'"),
        (lambda: soup.login_request("u", "p\x01"), "password"),
        (lambda: soup.login_accepted("S", -1), "sequence number -1"),
        (lambda: soup.login_rejected("X"), "reject reason 'X'"),
        (lambda: soup.pack("H", b"x"), "Server Heartbeat payload is 0 bytes"),
        (lambda: soup.pack("Q"), "unknown SoupBinTCP packet type"),
        (lambda: soup.snapshot_message(2**64), "does not fit"),
    ]
    for call, why in cases:
        with pytest.raises(soup.SoupError, match=why):
            call()


# --- the service and the client on 127.0.0.1 ------------------------------------------------
@pytest.fixture(scope="module")
def session():
    return sim.Session.from_buffer(itchgen.generate(N_MSGS, 40, 11))


@pytest.fixture(scope="module")
def full_digest(session):
    b = Book()
    b.feed(session.buf)
    return b.digest()


class Position:
    """The publisher's position, as the test sets it."""

    def __init__(self, n: int = 0):
        self.n = n

    def __call__(self) -> int:
        return self.n


@pytest.fixture
def serve(session):
    """``serve(**ServerConfig fields) -> (server, position)``, each stopped at the end."""
    started = []

    def make(position: int = 0, **kw):
        pos = Position(position)
        srv = glimpse.GlimpseServer(
            session, "TICKWIRE01", pos, glimpse.ServerConfig(port=0, **kw), bind_ip="127.0.0.1"
        )
        srv.start()
        started.append(srv)
        return srv, pos

    yield make
    for srv in started:
        srv.stop()


def _fetch(srv, **kw) -> client.Spin:
    kw.setdefault("timeout", 60.0)
    return client.fetch(
        "127.0.0.1", srv.port, kw.pop("user", USER), kw.pop("password", PASSWORD), **kw
    )


def _book_at(session, n: int) -> Book:
    b = Book()
    b.feed(session.buf, 0, int(session.offsets[n]))
    return b


def _queues(book: Book) -> dict:
    """Every level's references in time priority."""
    return {
        (int(loc), int(side), int(px)): book.queue(int(loc), int(side), int(px))
        for loc, side, px, _, _ in book.levels_table()
    }


def test_the_spin_at_n_is_the_book_at_n_and_the_feed_after_n_completes_it(
    serve, session, full_digest
):
    srv, pos = serve()
    for n in (0, 1, 1_500, N_MSGS // 3, N_MSGS // 2, N_MSGS):
        pos.n = n
        spin = _fetch(srv)
        assert spin.seq == n and spin.session == "TICKWIRE01"
        at_n = _book_at(session, n)
        book = Book()
        assert book.feed(spin.messages) == len(spin.messages)
        assert book.digest() == at_n.digest(), n
        assert book.live_orders == at_n.live_orders
        assert _queues(book) == _queues(at_n), n  # references, shares and time priority
        assert book.stocks_summary() == at_n.stocks_summary()
        # the strongest check: the multicast from N + 1 on, applied to the spin's book
        book.feed(session.buf, int(session.offsets[n]))
        assert book.digest() == full_digest, n
        assert not any(book.anomalies().values()), (n, book.anomalies())
    assert srv.counters["spins"] == 6 and srv.counters["logins_accepted"] == 6


def _reference_spin(session, n: int) -> list[dict]:
    """The spin at ``n`` by a plain Python model over the decoded messages (the generated
    session has no anomalies): dicts as ``itch.decode`` gives them."""
    msgs = itch.decode(session.buf[: int(session.offsets[n])])
    events, last, orders = [], {"R": {}, "H": {}, "Y": {}}, {}
    for m in msgs:
        t = m["type"]
        if t == "S":
            events.append(m)
        elif t in last:
            last[t][m["locate"]] = m
        elif t in "AF":
            orders[m["order_ref"]] = {"origin": m, "placed": m, "shares": m["shares"]}
            orders[m["order_ref"]]["price"] = m["price"]
        elif t in "ECX":
            o = orders[m["order_ref"]]
            o["shares"] -= m["shares"]
            if o["shares"] == 0:
                del orders[m["order_ref"]]
        elif t == "D":
            del orders[m["order_ref"]]
        elif t == "U":
            o = orders.pop(m["order_ref"])  # the new reference goes to the back
            orders[m["new_order_ref"]] = {
                "origin": o["origin"],
                "placed": m,
                "shares": m["shares"],
                "price": m["price"],
            }
    out = events + [last[t][loc] for t in "RHY" for loc in sorted(last[t])]
    for ref, o in orders.items():
        origin, placed = o["origin"], o["placed"]
        add = {
            "type": origin["type"],
            "locate": origin["locate"],
            "tracking": placed["tracking"],
            "timestamp": placed["timestamp"],
            "order_ref": ref,
            "side": origin["side"],
            "shares": o["shares"],
            "stock": origin["stock"],
            "price": o["price"],
        }
        if origin["type"] == "F":
            add["attribution"] = origin["attribution"]
        out.append(add)
    return out


def test_the_spin_holds_what_glimpse_promises_in_its_order(serve, session):
    n = N_MSGS // 2
    srv, _ = serve(position=n)
    spin = _fetch(srv)
    got = itch.decode(spin.messages)
    assert len(got) == spin.count
    want = _reference_spin(session, n)
    assert got == want
    kinds = [m["type"] for m in got]
    assert "F" in kinds and "A" in kinds and "Y" in kinds  # attribution kept, Reg SHO sent
    assert srv.counters["messages"] == spin.count + 1  # and the Snapshot message


def test_the_spin_follows_the_book_through_anomalies(serve):
    h = {"locate": 7}
    msgs = [
        ib.S("O"),
        ib.R("ZZZ", locate=7),
        ib.H("ZZZ", "H", **h),
        ib.header("Y", **h) + ib.alpha("ZZZ") + b"1",
        ib.H("ZZZ", "T", **h),
        ib.A(10, "B", 100, 5000, "ZZZ", **h),
        ib.F(11, "B", 200, 5000, "ZZZ", "VIRT", **h),
        ib.A(10, "S", 300, 5100, "ZZZ", **h),  # a live reference: not added
        ib.A(12, "X", 100, 5000, "ZZZ", **h),  # bad side
        ib.A(13, "S", 0, 5100, "ZZZ", **h),  # zero shares
        ib.E(99, 10, **h),  # unknown reference
        ib.X(10, 0, **h),  # zero shares
        ib.E(10, 30, **h),  # keeps its place
        ib.A(14, "B", 50, 5000, "ZZZ", **h),
        ib.U(11, 15, 70, 5000, **h),  # 15 goes behind 14, as an F of VIRT
        ib.U(15, 14, 10, 5000, **h),  # onto a live reference: 15 goes, nothing comes
        ib.C(14, 80, 5000, **h),  # over-execution: removed
        ib.D(10, **h),
        ib.A(10, "S", 40, 5200, "ZZZ", **h),  # the reference again, after its delete
        ib.F(16, "S", 60, 5200, "ZZZ", "GSCO", **h),
        ib.X(10, 50, **h),  # over-cancel: removed
        ib.A(17, "B", 25, 4900, "ZZZ", **h),
        ib.U(17, 17, 35, 4950, **h),  # replaced onto its own reference
    ]
    s = sim.Session.from_buffer(np.frombuffer(ib.framed(*msgs), np.uint8))
    pos = Position()
    srv = glimpse.GlimpseServer(s, "TICKWIRE01", pos, glimpse.ServerConfig(), "127.0.0.1")
    srv.start()
    try:
        for n in range(s.n + 1):
            pos.n = n
            spin = _fetch(srv)
            at_n, book = _book_at(s, n), Book()
            book.feed(spin.messages)
            assert book.digest() == at_n.digest() and _queues(book) == _queues(at_n), n
            assert not any(book.anomalies().values()), n
        assert book.stocks_summary() == at_n.stocks_summary()
        adds = [m for m in itch.decode(spin.messages) if m["type"] in "AF"]
        assert [(m["type"], m["order_ref"], m.get("attribution")) for m in adds] == [
            ("F", 16, "GSCO"),
            ("A", 17, None),
        ]
    finally:
        srv.stop()


def test_a_wrong_login_is_refused_naming_the_reason(serve):
    srv, _ = serve()
    for kw, why in (
        ({"password": "nope"}, "login refused: not authorized (reject code A)"),
        ({"user": "root"}, "login refused: not authorized (reject code A)"),
        ({"session": "OTHER"}, "login refused: session not available (reject code S)"),
    ):
        where = re.escape(f"127.0.0.1:{srv.port}: {why}")
        with pytest.raises(client.GlimpseError, match=where) as e:
            _fetch(srv, **kw)
        assert e.value.reason == "refused"
    assert _fetch(srv, session="TICKWIRE01").seq == 0  # its own name, as well as spaces
    c = srv.counters
    assert (c["rejected_auth"], c["rejected_session"], c["logins_rejected"]) == (2, 1, 3)


def test_refused_logins_are_retried_until_the_service_takes_one(serve, session):
    srv, _ = serve(position=5_000, refuse=2)
    seen = []
    spin = client.fetch_retrying(
        "127.0.0.1",
        srv.port,
        USER,
        PASSWORD,
        attempts=4,
        backoff_s=0.01,
        on_retry=lambda k, e: seen.append((k, e)),
    )
    assert [k for k, _ in seen] == [1, 2]
    assert all("session not available" in str(e) and e.reason == "refused" for _, e in seen)
    book = Book()
    book.feed(spin.messages)
    assert spin.seq == 5_000 and book.digest() == _book_at(session, 5_000).digest()
    assert (srv.counters["refused"], srv.counters["logins_accepted"]) == (2, 1)


def test_retrying_gives_up_with_the_last_error_and_never_retries_bad_credentials(serve):
    srv, _ = serve(refuse=5)
    seen = []

    def retried(attempt, error):
        seen.append(attempt)

    with pytest.raises(client.GlimpseError, match="session not available"):
        client.fetch_retrying(
            "127.0.0.1", srv.port, USER, PASSWORD, attempts=3, backoff_s=0.01, on_retry=retried
        )
    assert seen == [1, 2] and srv.counters["refused"] == 3
    with pytest.raises(client.GlimpseError, match="not authorized"):
        client.fetch_retrying(
            "127.0.0.1", srv.port, USER, "wrong", attempts=3, backoff_s=0.01, on_retry=retried
        )
    assert seen == [1, 2] and srv.counters["rejected_auth"] == 1


def test_a_spin_dropped_midway_is_an_error_naming_where(serve, session):
    srv, _ = serve(position=N_MSGS // 2, drop_after=100)
    with pytest.raises(
        client.GlimpseError,
        match=r"connection dropped after 100 messages, before the snapshot message",
    ) as e:
        _fetch(srv)
    assert e.value.reason == "dropped" and e.value.messages == 100
    assert srv.counters["drops"] == 1
    spin = _fetch(srv)  # only the first connection is cut
    assert spin.seq == N_MSGS // 2 and srv.counters["spins"] == 1


def test_a_drop_after_more_than_the_spin_still_cuts_before_the_snapshot_message(serve):
    srv, _ = serve(position=1_000, drop_after=10**9)
    with pytest.raises(client.GlimpseError, match="before the snapshot message") as e:
        _fetch(srv)
    assert e.value.messages == srv.counters["messages"] and e.value.messages > 0


def test_a_held_spin_heartbeats_both_ways_and_still_ends(serve, session):
    srv, _ = serve(position=N_MSGS // 2, hold_after=50)
    got = {}
    t = threading.Thread(target=lambda: got.update(spin=_fetch(srv)))
    t.start()
    try:
        wait_for(
            lambda: srv.counters["heartbeats"] >= 2 and srv.counters["client_heartbeats"] >= 1,
            what="heartbeats from both ends while the spin is held",
            detail=lambda: srv.counters,
        )
        assert srv.counters["messages"] == 50 and "spin" not in got
    finally:
        srv.release()
        t.join(60)
    spin = got["spin"]
    assert spin.heartbeats >= 2 and spin.seq == N_MSGS // 2
    book = Book()
    book.feed(spin.messages)
    assert book.digest() == _book_at(session, N_MSGS // 2).digest()


def test_the_client_drops_a_silent_service(serve):
    srv, _ = serve(position=N_MSGS, hold_after=10, heartbeat_s=3600.0)
    with pytest.raises(
        client.GlimpseError, match=r"silent for 0\.3 s after 10 messages, before the snapshot"
    ) as e:
        _fetch(srv, silence_s=0.3)
    assert e.value.reason == "silent"


def test_the_service_drops_a_silent_client_and_one_that_breaks_the_protocol(serve):
    srv, _ = serve(silence_s=0.3)
    with socket.create_connection(("127.0.0.1", srv.port)) as quiet:
        wait_for(lambda: srv.counters["silent_clients"] == 1, what="the silent client dropped")
        quiet.settimeout(10)
        assert quiet.recv(100) == b""
    for wire in (b"\x00\x01Q", soup.CLIENT_HEARTBEAT_PACKET + soup.debug("hi")):
        with socket.create_connection(("127.0.0.1", srv.port)) as rude:
            rude.sendall(wire)
            rude.settimeout(10)
            assert rude.recv(100) == b""
    assert srv.counters["malformed"] == 2 and srv.counters["logins_accepted"] == 0


def test_a_service_that_is_not_there_is_connection_refused():
    with pytest.raises(client.GlimpseError, match="connection refused") as e:
        client.fetch("127.0.0.1", free_port(), USER, PASSWORD, timeout=10)
    assert e.value.reason == "connect"


class FakeService:
    """A listener that takes one login and answers with ``answer`` bytes, then closes its
    side; ``None``: never answers."""

    def __init__(self, answer: bytes | None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.sock.accept()
        with conn:
            split = soup.Splitter(soup.CLIENT_TYPES)
            while not split.feed(conn.recv(100)):
                pass
            if self.answer is not None:
                conn.sendall(self.answer)
                conn.shutdown(socket.SHUT_WR)
            conn.settimeout(30)
            try:
                while conn.recv(100):  # until the client closes
                    pass
            except OSError:
                pass
        self.done.set()

    def close(self):
        self.done.wait(30)
        self.sock.close()


_ACCEPT = soup.login_accepted("TICKWIRE01", 1)
_ADD = ib.A(1, "B", 100, 5000)


@pytest.mark.parametrize(
    ("answer", "reason", "why"),
    [
        (_ACCEPT + b"\x00\x01Q", "malformed", "malformed packet after 0 messages: unknown packet"),
        (
            _ACCEPT + soup.sequenced(_ADD) + soup.sequenced(b"A123"),
            "malformed",
            r"sequenced message 2 \(type 'A', 4 bytes\) is neither an ITCH 5.0 message",
        ),
        (_ACCEPT + soup.sequenced(b""), "malformed", "type \\(empty\\)"),
        (soup.sequenced(_ADD), "malformed", "unexpected Sequenced Data packet before the login"),
        (
            _ACCEPT + soup.sequenced(soup.snapshot_message(5)) + soup.sequenced(_ADD),
            "malformed",
            "unexpected Sequenced Data packet after the snapshot message",
        ),
        (_ACCEPT + _ACCEPT, "malformed", "unexpected Login Accepted packet after 0 messages"),
        (
            _ACCEPT.replace(b" " * 18 + b" 1", b" " * 18 + b" 7"),
            "malformed",
            "accepted from sequence 7",
        ),
        (
            _ACCEPT + soup.sequenced(_ADD) + soup.END_OF_SESSION_PACKET,
            "dropped",
            "ended the session after 1 messages without a snapshot message",
        ),
        (b"", "dropped", "closed the connection before answering the login"),
        (
            _ACCEPT + soup.sequenced(_ADD) * 3,
            "dropped",
            "connection dropped after 3 messages, before the snapshot message",
        ),
        (None, "timeout", r"timed out after 0\.3 s, before answering the login"),
    ],
    ids=[
        "unknown-type",
        "bad-itch-length",
        "empty-message",
        "data-before-login",
        "data-after-snapshot",
        "second-accept",
        "accepted-from-7",
        "end-without-snapshot",
        "closed-at-login",
        "closed-mid-spin",
        "no-answer",
    ],
)
def test_the_client_names_each_failure(answer, reason, why):
    fake = FakeService(answer)
    try:
        with pytest.raises(client.GlimpseError, match=why) as e:
            client.fetch(
                "127.0.0.1", fake.port, USER, PASSWORD, timeout=0.3 if answer is None else 30
            )
        assert e.value.reason == reason
        assert str(e.value).startswith(f"snapshot service 127.0.0.1:{fake.port}: ")
    finally:
        fake.close()


def test_a_snapshot_message_then_a_close_is_a_whole_spin():
    snap = soup.sequenced(soup.snapshot_message(42))
    fake = FakeService(_ACCEPT + soup.sequenced(_ADD) + soup.SERVER_HEARTBEAT_PACKET + snap)
    try:
        spin = client.fetch("127.0.0.1", fake.port, USER, PASSWORD, timeout=30)
    finally:
        fake.close()
    assert (spin.seq, spin.count, spin.heartbeats) == (42, 1, 1)
    assert spin.messages.tobytes() == ib.framed(_ADD)


# --- tickwire sim ---------------------------------------------------------------------------
def test_the_service_runs_inside_the_simulator_at_its_position(session, full_digest):
    """The simulator's own position on loopback (no lab: both lines from 127.0.0.1)."""
    lab = config.LabConfig()
    lines = {  # groups and ports of this test's own, so no lab test's receiver sees them
        k: dataclasses.replace(
            ln,
            exchange_ip="127.0.0.1",
            group=f"239.193.77.{i + 1}",
            port=free_port(socket.SOCK_DGRAM),
        )
        for i, (k, ln) in enumerate(lab.lines.items())
    }
    opts = sim.SimOptions(
        pacing=sim.Pacing(mode="rate", rate=N_MSGS / 2),
        eos_for=0.1,
        serve=False,
        glimpse=glimpse.ServerConfig(port=0),
    )
    s = sim.Simulator(session, lab, opts, lines=lines)
    t = threading.Thread(target=sim.Exchange([s]).run)
    t.start()
    try:
        wait_for(lambda: s.glimpse is not None and s.position() > N_MSGS // 4, what="publishing")
        spin = client.fetch("127.0.0.1", s.glimpse.port, USER, PASSWORD, timeout=60)
    finally:
        t.join(120)
    assert 0 < spin.seq < N_MSGS
    book = Book()
    book.feed(spin.messages)
    assert book.digest() == _book_at(session, spin.seq).digest()
    book.feed(session.buf, int(session.offsets[spin.seq]))
    assert book.digest() == full_digest
    assert s.stats["glimpse"]["spins"] == 1
    assert "snapshot service" in sim.summary_text(s.stats)


def _args(*argv: str):
    return cli.build_parser().parse_args(["sim", *argv])


def test_sim_glimpse_options_reach_each_channels_service(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[lab]\nchannels = 2\nglimpse_user = "joe"\nglimpse_password = "s3cret"\n'
    )
    cfg = config.load(tmp_path / "c.toml")
    assert glimpse_configs(_args(), cfg, 2) == [None, None]
    got = glimpse_configs(
        _args("--glimpse-port", "26600", "--glimpse-refuse", "2", "--glimpse-drop-after", "0"),
        cfg,
        2,
    )
    assert [(g.port, g.user, g.password, g.refuse, g.drop_after) for g in got] == [
        (26600, "joe", "s3cret", 2, 0),
        (26601, "joe", "s3cret", 2, 0),
    ]
    on = config.with_lab(glimpse_port=27000)
    assert [g.port for g in glimpse_configs(_args(), on, 1)] == [27000]
    assert glimpse_configs(_args("--glimpse-port", "0"), on, 1) == [None]
    assert glimpse_configs(_args("--glimpse-port", "5"), on, 1)[0].drop_after == -1
    with pytest.raises(faultplan.SimError, match="channel 2's snapshot service would listen"):
        glimpse_configs(_args("--glimpse-port", "65534"), cfg, 3)


@pytest.mark.parametrize(
    ("argv", "toml", "why"),
    [
        (["--glimpse-refuse", "2"], "", "--glimpse-refuse: there is no snapshot service"),
        (["--glimpse-drop-after", "0"], "", "--glimpse-drop-after: there is no snapshot"),
        (
            ["--glimpse-refuse", "1", "--glimpse-drop-after", "9", "--glimpse-port", "0"],
            "[lab]\nglimpse_port = 26600\n",
            "--glimpse-refuse and --glimpse-drop-after: there is no snapshot service",
        ),
        ([], "[lab]\nglimpse_port = 70000\n", "lab.glimpse_port: port 70000 is outside"),
        ([], "[lab]\nglimpse_port = -2\n", "lab.glimpse_port: port -2 is outside"),
        (
            [],
            "[lab]\nglimpse_port = 65535\nchannels = 2\n",
            "lab.glimpse_port: channel 1's snapshot service would listen on 65536",
        ),
        ([], '[lab]\nglimpse_user = "seven77"\n', "lab.glimpse_user: 'seven77' must be 1-6"),
        ([], '[lab]\nglimpse_password = "has space"\n', "lab.glimpse_password: 'has space'"),
        ([], '[lab]\nglimpse_password = ""\n', "lab.glimpse_password: '' must be 1-10"),
        ([], "[lab]\nglimpse_port = true\n", "lab.glimpse_port: expected an integer"),
    ],
)
def test_sim_glimpse_errors_are_one_line(tmp_path, capsys, argv, toml, why):
    f = tmp_path / "s.itch"
    f.write_bytes(ib.framed(ib.S("O")))
    (tmp_path / "c.toml").write_text(toml)
    base = ["sim", "--session", str(f), "--no-netns", "--config", str(tmp_path / "c.toml")]
    assert cli.main([*base, *argv]) == 1
    err = capsys.readouterr().err
    assert why in err and err.strip().count("\n") == 0, err


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--glimpse-port", "70000"], "port 70000 is outside 1..65535"),
        (["--glimpse-port", "x"], "not a whole number"),
        (["--glimpse-refuse", "-1"], "must not be negative"),
        (["--glimpse-drop-after", "-5"], "must not be negative"),
    ],
)
def test_sim_glimpse_option_values_are_checked_by_the_parser(capsys, argv, why):
    with pytest.raises(SystemExit) as e:
        cli.main(["sim", *argv])
    assert e.value.code == 2 and why in capsys.readouterr().err
