"""The world view: the consolidation (against a brute-force recomputation from each venue's
BBOs, hypothesis), a venue out while halted, stale or without lines and back when that
ends, the conflating watch, the gRPC service on loopback (``GetBBO``, ``WatchBBO``,
``GetVenues``) and the ``[world_view]`` table; in the lab, three venues' sessions
published at once end in the world view computed offline from their three books, and a
venue halted mid-session leaves the quote."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import book as bk
from dataplane import events as ev
from dataplane.subscriber import pack_symbol
from host.appliance import worldview as wv


def rec(kind, locate=0, side=0, code=0, price=0, n=0, value=0, seq=1, itch_ns=0, rx_ns=0):
    """One hand-made ``EVENT`` record."""
    e = np.zeros(1, ev.EVENT)
    for k, x in dict(
        kind=kind,
        locate=locate,
        side=side,
        code=code,
        price=price,
        n=n,
        value=value,
        seq=seq,
        itch_ns=itch_ns,
        rx_ns=rx_ns,
    ).items():
        e[k] = x
    return e


def directory(loc, sym):
    return rec(ev.INSTRUMENT, loc, ev.NO_SIDE, ord("R"), value=pack_symbol(sym))


def action(loc, state):
    return rec(ev.INSTRUMENT, loc, ev.NO_SIDE, ord("H"), n=ord(state))


def bbo(loc, side, px, qty, rx_ns=0):
    return rec(ev.BBO, loc, 0 if side == "B" else 1, price=px, value=qty, rx_ns=rx_ns)


def channel(code, line=ev.NO_SIDE):
    return rec(ev.CHANNEL, 0, line, code)


def view3():
    v = wv.WorldView(["nq", "bx", "px"])
    for venue, loc in (("nq", 5), ("bx", 17), ("px", 300)):  # one ticker, three locates
        v.apply(venue, directory(loc, "AAPL"))
    return v


# --- the consolidation --------------------------------------------------------------------
def test_one_ticker_on_three_venues_is_one_symbol_with_the_best_of_each_side():
    v = view3()
    v.apply("nq", np.concatenate([bbo(5, "B", 1000, 100), bbo(5, "S", 1010, 50)]))
    v.apply("bx", np.concatenate([bbo(17, "B", 1001, 30), bbo(17, "S", 1010, 70)]))
    v.apply("px", np.concatenate([bbo(300, "B", 1001, 20), bbo(300, "S", 1012, 5)]))
    q = v.quote("aapl")
    assert (q.bid_px, q.bid_qty, q.bids) == (1001, 50, (("bx", 30), ("px", 20)))
    assert (q.ask_px, q.ask_qty, q.asks) == (1010, 120, (("nq", 50), ("bx", 70)))
    assert q.excluded == () and v.known() == ["AAPL"]
    # an emptied side leaves; the next best takes the top
    v.apply("bx", bbo(17, "B", 0, 0))
    q = v.quote("AAPL")
    assert (q.bid_px, q.bid_qty, q.bids) == (1001, 20, (("px", 20),))
    assert v.quote("MSFT") is None


def test_every_change_is_counted_and_stamped_and_no_change_is_not():
    v = view3()
    first = v.apply("nq", bbo(5, "B", 1000, 100, rx_ns=77))
    assert [(q.update, q.seq, q.rx_ns) for q in first] == [(2, 2, 77)]  # the first R, the bid
    assert first[0].world_ns > 0
    assert v.apply("bx", bbo(17, "B", 999, 10)) == []  # below the best: the quote is the same
    assert v.apply("nq", rec(ev.LEVEL, 5, 0, price=1000, n=1, value=100)) == []  # not read
    q = v.apply("bx", bbo(17, "B", 1000, 10))[0]
    assert (q.update, q.seq, q.bid_qty) == (3, 3, 110)


def test_a_halted_venue_leaves_the_quote_until_it_trades_again():
    v = view3()
    for venue, loc, px in (("nq", 5, 1000), ("bx", 17, 1002), ("px", 300, 1001)):
        v.apply(venue, bbo(loc, "B", px, 10))
    assert v.quote("AAPL").bids == (("bx", 10),)
    for state, why in (("H", "halted"), ("P", "paused"), ("Q", "quotation_only")):
        q = v.apply("bx", action(17, state))[0]
        assert (q.bid_px, q.bids, q.excluded) == (1001, (("px", 10),), (("bx", why),))
    # its book still moves while halted; it is in again with it once it trades
    v.apply("bx", bbo(17, "B", 1003, 4))
    assert v.quote("AAPL").bid_px == 1001
    q = v.apply("bx", action(17, "T"))[0]
    assert (q.bid_px, q.bids, q.excluded) == (1003, (("bx", 4),), ())


def test_a_stale_venue_leaves_every_quote_until_a_snapshot_says_it_is_whole():
    v = view3()
    v.apply("nq", directory(6, "MSFT"))
    v.apply("nq", np.concatenate([bbo(5, "B", 1005, 1), bbo(6, "S", 2000, 1)]))
    v.apply("bx", bbo(17, "B", 1000, 1))
    changed = v.apply("nq", channel(ev.CH_BOOKS_STALE))
    assert {q.symbol for q in changed} == {"AAPL", "MSFT"}
    assert v.quote("AAPL").bids == (("bx", 1),) and v.quote("MSFT").asks == ()
    assert v.quote("MSFT").excluded == (("nq", "stale"),)
    # a gap declared unrecoverable is the same thing
    v.apply("bx", channel(ev.CH_GAP_UNRECOVERABLE))
    assert v.quote("AAPL").bids == ()
    # the consumer restarted: a new ring, a snapshot that is whole
    tab = np.zeros((bk.N_LOCATES, 2, 2), np.int64)
    tab[5, 0] = (1004, 9)
    stocks = np.zeros(bk.N_LOCATES, bk.STOCK)
    stocks[5] = (pack_symbol("AAPL"), 1, ord("T"), 0)
    v.load("nq", tab, stocks, stale=False, lines={"A": "up", "B": "up"}, seq=10)
    assert v.quote("AAPL").bids == (("nq", 9),)
    assert v.quote("AAPL").excluded == (("bx", "stale"),)
    assert v.quote("MSFT") is None  # nq's new directory has no MSFT, and nobody else has it


def test_a_venue_without_lines_leaves_until_a_line_is_up_but_not_at_its_end_of_session():
    v = view3()
    v.apply("nq", bbo(5, "B", 1005, 1))
    v.apply("bx", bbo(17, "B", 1000, 1))
    v.apply("nq", channel(ev.CH_LINE_DOWN, 0))
    assert v.quote("AAPL").bids == (("nq", 1),)  # one line left
    v.apply("nq", channel(ev.CH_LINE_DOWN, 1))
    assert v.quote("AAPL").excluded == (("nq", "lines_down"),)
    v.apply("nq", channel(ev.CH_LINE_UP, 1))
    assert v.quote("AAPL").bids == (("nq", 1),)
    # after its end of session, silent lines are the normal state: its final book stays
    v.apply("nq", channel(ev.CH_END_OF_SESSION))
    v.apply("nq", np.concatenate([channel(ev.CH_LINE_DOWN, 0), channel(ev.CH_LINE_DOWN, 1)]))
    assert v.quote("AAPL").bids == (("nq", 1),) and v.venues["nq"].ended


def test_a_locate_renamed_moves_its_book_to_the_new_ticker():
    v = view3()
    v.apply("nq", bbo(5, "S", 1010, 3))
    changed = v.apply("nq", directory(5, "AMZN"))
    assert {q.symbol for q in changed} == {"AAPL", "AMZN"}
    assert v.quote("AMZN").asks == (("nq", 3),) and v.quote("AAPL").asks == ()


def test_only_the_chosen_symbols_are_kept():
    v = wv.WorldView(["a", "b"], symbols=["aapl"])
    v.apply("a", np.concatenate([directory(1, "AAPL"), directory(2, "MSFT")]))
    v.apply("a", np.concatenate([bbo(1, "B", 5, 5), bbo(2, "B", 6, 6)]))
    assert v.known() == ["AAPL"]


def test_bad_venues_and_symbols_are_refused():
    with pytest.raises(ValueError, match="at least one venue"):
        wv.WorldView([])
    with pytest.raises(ValueError, match="a venue twice"):
        wv.WorldView(["a", "a"])
    with pytest.raises(ValueError, match="1-8 ASCII"):
        wv.WorldView(["a"]).quote("TOOLONGSYM")


# --- against a brute-force recomputation --------------------------------------------------
VENUES = ("v0", "v1", "v2")
TICKERS = ("AA", "BB", "CC")
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("bbo"),
            st.integers(0, 2),
            st.integers(0, 2),
            st.sampled_from("BS"),
            st.integers(1, 4),
            st.integers(0, 3),
        ),
        st.tuples(st.just("halt"), st.integers(0, 2), st.integers(0, 2), st.sampled_from("TTHPQ")),
        st.tuples(st.just("stale"), st.integers(0, 2)),
        st.tuples(st.just("line"), st.integers(0, 2), st.integers(0, 1), st.booleans()),
        st.tuples(st.just("resnap"), st.integers(0, 2)),
    ),
    max_size=60,
)


def brute(books, states, stale, lines, symbol):
    """The consolidated quote from scratch: every venue in, every side, max / min."""
    cands = {0: [], 1: []}
    for v in VENUES:
        if symbol not in books[v]:
            continue
        if stale[v] or lines[v] == [False, False] or states[v].get(symbol, "T") != "T":
            continue
        for side in (0, 1):
            px, qty = books[v][symbol][side]
            if qty:
                cands[side].append((px, v, qty))
    out = []
    for side, pick in ((0, max), (1, min)):
        if not cands[side]:
            out += [0, 0, ()]
            continue
        best = pick(px for px, _, _ in cands[side])
        at = tuple((v, q) for px, v, q in cands[side] if px == best)
        out += [best, sum(q for _, q in at), at]
    return out


@settings(max_examples=150, deadline=None)
@given(ops, st.permutations(range(1, 10)))
def test_the_world_view_is_the_brute_force_consolidation_after_any_events(steps, locs):
    view = wv.WorldView(list(VENUES))
    # each venue its own locates for the same tickers
    loc_of = {v: {t: locs[3 * i + k] for k, t in enumerate(TICKERS)} for i, v in enumerate(VENUES)}
    books = {v: {} for v in VENUES}
    states = {v: {} for v in VENUES}
    stale = dict.fromkeys(VENUES, False)
    lines = {v: [True, True] for v in VENUES}
    for v in VENUES:
        for t in TICKERS:
            view.apply(v, directory(loc_of[v][t], t))
            books[v][t] = [(0, 0), (0, 0)]
    for op in steps:
        v = VENUES[op[1]]
        if op[0] == "bbo":
            t, side, px, qty = TICKERS[op[2]], op[3], 100 + op[4], op[5]
            view.apply(v, bbo(loc_of[v][t], side, px if qty else 0, qty))
            books[v][t][0 if side == "B" else 1] = (px if qty else 0, qty)
        elif op[0] == "halt":
            t = TICKERS[op[2]]
            view.apply(v, action(loc_of[v][t], op[3]))
            states[v][t] = op[3]
        elif op[0] == "stale":
            view.apply(v, channel(ev.CH_BOOKS_STALE))
            stale[v] = True
        elif op[0] == "line":
            code = ev.CH_LINE_UP if op[3] else ev.CH_LINE_DOWN
            view.apply(v, channel(code, op[2]))
            lines[v][op[2]] = op[3]
        else:  # a new snapshot of what the venue's books hold now, whole
            tab = np.zeros((bk.N_LOCATES, 2, 2), np.int64)
            stocks = np.zeros(bk.N_LOCATES, bk.STOCK)
            for t in TICKERS:
                loc = loc_of[v][t]
                tab[loc] = books[v][t]
                stocks[loc] = (pack_symbol(t), 1, ord(states[v].get(t, "T")), 0)
            ab = {"A": "up" if lines[v][0] else "down", "B": "up" if lines[v][1] else "down"}
            view.load(v, tab, stocks, stale=False, lines=ab)
            stale[v] = False
        for t in TICKERS:
            q = view.quote(t)
            got = [q.bid_px, q.bid_qty, q.bids, q.ask_px, q.ask_qty, q.asks]
            assert got == brute(books, states, stale, lines, t), (op, t)
    # the counters: one world sequence, each quote's latest number on it
    seqs = sorted(view.quote(t).seq for t in TICKERS)
    assert len(set(seqs)) == 3 and seqs[-1] == view.seq


# --- watching -----------------------------------------------------------------------------
def test_a_watch_gets_the_image_then_each_symbols_latest_change_conflated():
    v = view3()
    v.apply("nq", directory(6, "MSFT"))
    v.apply("nq", bbo(5, "B", 1000, 1))
    with v.watch(["AAPL"]) as w:
        first = w.get(timeout=0)
        assert [(q.symbol, q.bid_qty) for q in first] == [("AAPL", 1)]
        for qty in (2, 3, 4):
            v.apply("nq", bbo(5, "B", 1000, qty))
        v.apply("nq", bbo(6, "B", 5, 5))  # not watched
        got = w.get(timeout=0)
        assert [(q.symbol, q.bid_qty) for q in got] == [("AAPL", 4)]
        assert got[0].update - first[0].update == 3 and w.conflated == 2
        assert w.get(timeout=0) == []
    assert v._watches == []  # closed: no longer offered anything


# --- gRPC on loopback ---------------------------------------------------------------------
@pytest.fixture
def served():
    """A world view with a quote, served on a free loopback port."""
    v = view3()
    v.apply("nq", np.concatenate([bbo(5, "B", 1000, 100), bbo(5, "S", 1010, 50)]))
    v.apply("bx", np.concatenate([bbo(17, "B", 1000, 30), action(17, "T")]))
    v.apply("px", action(300, "H"))
    server, service, port = wv.start_server(v, "127.0.0.1:0", max_watchers=4)
    try:
        with wv.Client(f"127.0.0.1:{port}") as client:
            yield v, client
    finally:
        wv.stop_server(server, service)


def test_get_bbo_answers_the_quote_over_grpc(served):
    view, client = served
    q = client.get("aapl")
    assert q == view.quote("AAPL")  # every field, counters and stamps too
    assert (q.bid_px, q.bid_qty, q.bids) == (1000, 130, (("nq", 100), ("bx", 30)))
    assert q.excluded == (("px", "halted"),)
    with pytest.raises(KeyError, match="MSFT: no venue"):
        client.get("MSFT")
    with pytest.raises(ValueError, match="1-8 ASCII"):
        client.get("")


def test_get_venues_says_what_each_venue_is(served):
    _, client = served
    got = client.venues()
    assert [v["name"] for v in got["venues"]] == ["nq", "bx", "px"]
    assert all(v["symbols"] == "1" and not v["joined"] for v in got["venues"])  # uint64: text


def test_watch_bbo_streams_the_image_then_the_changes_over_grpc(served):
    import queue
    import threading

    view, client = served
    got: queue.Queue = queue.Queue()

    def reader():
        for q in client.watch(["AAPL"]):
            got.put(q)
            if q.bid_px == 1003:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    first = got.get(timeout=30)
    assert first == view.quote("AAPL")
    # the stream is registered once the image is out: each change comes after it
    view.apply("nq", bbo(5, "B", 1001, 1))
    view.apply("px", action(300, "T"))
    view.apply("bx", bbo(17, "B", 1003, 2))
    seen = [got.get(timeout=30)]
    while seen[-1].bid_px != 1003:
        seen.append(got.get(timeout=30))
    t.join(timeout=30)
    assert seen[-1] == view.quote("AAPL") and seen[-1].bids == (("bx", 2),)
    assert [q.update for q in seen] == sorted({q.update for q in seen})  # in order, no repeat
    assert seen[0].update > first.update


def test_watch_bbo_marks_the_end_of_the_image_after_exactly_its_quotes(served):
    """``on_image_end`` comes after the image's quotes -- every watched symbol's, no more --
    and before the first change; an empty image is the marker alone (on the wire: a Quote
    with ``image_end`` and no symbol, ``seq`` the view's); a reader that does not ask for
    it (``tickwire world --watch``) never sees it."""
    import queue
    import threading

    from host.appliance import worldview_pb2 as pb

    view, client = served
    for venue, loc in (("nq", 6), ("bx", 18)):
        view.apply(venue, np.concatenate([directory(loc, "MSFT"), bbo(loc, "S", 2000, 3)]))
    view.apply("nq", np.concatenate([directory(7, "AMZN"), bbo(7, "B", 3000, 1)]))
    image = dict(view.quotes)
    assert len(image) == 3
    got: queue.Queue = queue.Queue()

    def reader():
        for q in client.watch(on_image_end=lambda: got.put("end")):
            got.put(q)
            if q.bid_px == 1005:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    first = [got.get(timeout=30) for _ in range(4)]
    assert first[-1] == "end" and {q.symbol: q for q in first[:-1]} == image
    view.apply("nq", bbo(5, "B", 1005, 2))
    change = got.get(timeout=30)
    t.join(timeout=30)
    assert change == view.quote("AAPL") and change.seq > max(q.seq for q in image.values())
    # the wire: an empty image is the marker alone; without asking, no marker at all
    stream = client.stub.WatchBBO(pb.WatchRequest(symbols=["ZZZZ"], image_end=True))
    try:
        m = next(stream)
        assert m.image_end and m.symbol == "" and m.seq == view.seq and m.world_ns > 0
    finally:
        stream.cancel()
    stream = client.stub.WatchBBO(pb.WatchRequest(symbols=["AAPL"]))
    try:
        assert wv.from_pb(next(stream)) == view.quote("AAPL")
        view.apply("bx", bbo(17, "B", 1006, 1))
        m = next(stream)
        assert not m.image_end and wv.from_pb(m) == view.quote("AAPL")
    finally:
        stream.cancel()


def test_a_watch_never_gives_a_quote_twice():
    """A change the image already holds (the view had it before its offer came: the
    aggregator sets a quote, then offers it) is dropped, not sent again; a newer one of
    the same symbol replaces the image's own until the image is taken."""
    v = view3()
    v.apply("nq", bbo(5, "B", 1000, 1))
    with v.watch(["AAPL"]) as w:
        q = v.quote("AAPL")
        assert w.image_seq == v.seq == q.seq
        w.offer(q)  # the late offer of what the image holds
        assert w.image() == [q] and w.get(timeout=0) == [] and w.image() == []
        newer = v.apply("nq", bbo(5, "B", 1000, 2))
        w.offer(newer[0])  # offered twice: given once
        assert w.get(timeout=0) == newer and w.conflated == 0
    with v.watch(["AAPL"]) as w:
        newer = v.apply("nq", bbo(5, "B", 1000, 3))
        assert w.image() == newer and w.conflated == 1  # the image holds the latest


# --- metrics ------------------------------------------------------------------------------
def _scrape(port: int) -> dict[str, float]:
    """The metrics page at ``port`` over HTTP, as {'name{labels}': value}, the labels
    sorted by name."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for ln in text.splitlines():
        if ln and not ln.startswith("#"):
            key, value = ln.rsplit(" ", 1)
            name, _, labels = key.partition("{")
            pairs = sorted(re.findall(r'(\w+)="([^"]*)"', labels))
            if pairs:
                name += "{" + ",".join(f'{k}="{x}"' for k, x in pairs) + "}"
            out[name] = float(value)
    return out


def _snapshot(loc: int, sym: str):
    tab = np.zeros((bk.N_LOCATES, 2, 2), np.int64)
    stocks = np.zeros(bk.N_LOCATES, bk.STOCK)
    stocks[loc] = (pack_symbol(sym), 1, ord("T"), 0)
    return tab, stocks


def test_the_metrics_endpoint_shows_the_venues_quotes_exclusions_and_watchers():
    """``tickwire_world_*`` scraped over HTTP: what was fed in, counted -- events read and
    snapshots per venue, quote changes, symbols, a halted venue excluded with reason
    ``halted``, a stale venue out of every quote, a line down -- and the ``WatchBBO``
    streams served and the one refused past ``max_watchers``."""
    from host.appliance import worldview_pb2 as pb
    from tests.helpers import free_port, wait_for

    v = wv.WorldView(["nq", "bx", "px"])
    up = {"A": "up", "B": "up"}
    for venue, loc in (("nq", 5), ("bx", 17), ("px", 300)):
        v.load(venue, *_snapshot(loc, "AAPL"), lines=up)
    fed = {
        "nq": [directory(6, "MSFT"), bbo(5, "B", 1000, 10), bbo(6, "S", 2000, 5)],
        "bx": [bbo(17, "B", 1001, 4), rec(ev.LEVEL, 17, 0, price=1001, n=1, value=4)],
        "px": [action(300, "H"), channel(ev.CH_LINE_DOWN, 0)],
    }
    for venue, recs in fed.items():
        v.apply(venue, np.concatenate(recs[:1]))
        v.apply(venue, np.concatenate(recs[1:]))
    server, service, port = wv.start_server(v, "127.0.0.1:0", max_watchers=1)
    httpd, mport = wv.start_metrics(f"127.0.0.1:{free_port()}", v, service)
    try:
        m = _scrape(mport)
        assert m["tickwire_world_venues"] == 3
        for venue, recs in fed.items():
            assert m[f'tickwire_world_events_total{{venue="{venue}"}}'] == len(recs)
            assert m[f'tickwire_world_snapshots_total{{venue="{venue}"}}'] == 1
            assert m[f'tickwire_world_venue_joined{{venue="{venue}"}}'] == 1
            assert m[f'tickwire_world_venue_in{{venue="{venue}"}}'] == 1
            assert m[f'tickwire_world_venue_stale{{venue="{venue}"}}'] == 0
        assert m['tickwire_world_venue_symbols{venue="nq"}'] == 2
        assert m['tickwire_world_venue_line_state{line="A",venue="px"}'] == 2  # down
        assert m['tickwire_world_venue_line_state{line="B",venue="px"}'] == 0  # up
        assert m["tickwire_world_quote_changes_total"] == v.seq > 0
        assert m["tickwire_world_symbols"] == 2
        assert m['tickwire_world_exclusions{reason="halted"}'] == 1  # px out of AAPL
        assert v.quote("AAPL").excluded == (("px", "halted"),)
        for why in ("paused", "quotation_only", "stale", "lines_down"):
            assert m[f'tickwire_world_exclusions{{reason="{why}"}}'] == 0
        assert m["tickwire_world_watchers"] == m["tickwire_world_watchers_refused_total"] == 0
        # nq's books go stale: out of both its symbols
        v.apply("nq", channel(ev.CH_BOOKS_STALE))
        m = _scrape(mport)
        assert m['tickwire_world_venue_in{venue="nq"}'] == 0
        assert m['tickwire_world_venue_stale{venue="nq"}'] == 1
        assert m['tickwire_world_exclusions{reason="stale"}'] == 2
        assert m['tickwire_world_events_total{venue="nq"}'] == len(fed["nq"]) + 1
        # one watcher served; a second is one past max_watchers
        with wv.Client(f"127.0.0.1:{port}") as client:
            stream = client.stub.WatchBBO(pb.WatchRequest(symbols=["AAPL"]))
            try:
                next(stream)  # its image: the stream is being served
                assert _scrape(mport)["tickwire_world_watchers"] == 1
                with pytest.raises(ConnectionError, match="RESOURCE_EXHAUSTED: too many watch"):
                    next(client.watch(["MSFT"]))
            finally:
                stream.cancel()
            m = wait_for(
                lambda: (m := _scrape(mport))["tickwire_world_watchers"] == 0 and m,
                30,
                "the cancelled watcher to leave",
            )
            assert m["tickwire_world_watchers_refused_total"] == 1
            # a place is free again
            stream = client.stub.WatchBBO(pb.WatchRequest(symbols=["AAPL"]))
            try:
                assert next(stream).symbol == "AAPL"
            finally:
                stream.cancel()
    finally:
        httpd.shutdown()
        httpd.server_close()
        wv.stop_server(server, service)


def test_serve_starts_its_metrics_endpoint_and_closes_it_at_the_end():
    """``serve(metrics=...)`` (``tickwire world``): its endpoint answers while it runs
    (venues it cannot follow yet: not joined), and is gone once ``stop`` ends it."""
    import os
    import threading

    from tests.helpers import free_port, wait_for

    names = [f"wm{os.getpid()}a", f"wm{os.getpid()}b"]
    rpc, mport = free_port(), free_port()
    stop = threading.Event()
    said: list[str] = []
    out: dict = {}

    def run():
        out["status"] = wv.serve(
            names, f"127.0.0.1:{rpc}", stop=stop, log=said.append, metrics=f"127.0.0.1:{mport}"
        )

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:

        def scraped():
            try:
                return _scrape(mport)
            except OSError:
                assert t.is_alive(), said
                return None

        m = wait_for(scraped, 30, "the metrics endpoint", lambda: said)
        assert m["tickwire_world_venues"] == 2 and m["tickwire_world_watchers"] == 0
        for name in names:
            assert m[f'tickwire_world_venue_joined{{venue="{name}"}}'] == 0
            assert m[f'tickwire_world_events_total{{venue="{name}"}}'] == 0
        assert f"; metrics on http://127.0.0.1:{mport}/metrics" in said[0]
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and [v["name"] for v in out["status"]["venues"]] == names
    with pytest.raises(OSError):
        _scrape(mport)


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"metrics": "nope"}, r"^world_view\.metrics: 'nope' must be host:port"),
        ({"metrics": "127.0.0.1:0"}, r"^world_view\.metrics: port 0 is outside"),
        ({"metrics": "127.0.0.1:50551"}, r"^world_view\.metrics: port 50551 is world_view\.listen"),
    ],
)
def test_the_metrics_key_is_checked_naming_it(table, why):
    from host import config as hc

    assert hc.from_dict({}).world_view.metrics == ""  # none unless asked for
    cfg = hc.from_dict({"world_view": {"metrics": "127.0.0.1:9466"}})
    assert cfg.world_view.metrics == "127.0.0.1:9466"
    with pytest.raises(hc.ConfigError, match=why):
        hc.from_dict({"world_view": table})


def test_the_generated_modules_are_what_the_proto_generates(tmp_path):
    """The committed ``worldview_pb2*.py`` match ``worldview.proto`` (grpcio-tools, the
    dev extra, regenerates them)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("grpc_tools", reason="needs grpcio-tools (the dev extra)")
    root = Path(__file__).resolve().parents[1]
    proto = "host/appliance/worldview.proto"
    (tmp_path / "host/appliance").mkdir(parents=True)
    shutil.copy(root / proto, tmp_path / proto)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--python_out=.",
            "--grpc_python_out=.",
            proto,
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in ("worldview_pb2.py", "worldview_pb2_grpc.py"):
        new = (tmp_path / "host/appliance" / name).read_text()
        assert new == (root / "host/appliance" / name).read_text(), name


# --- the lab: three venues at once ----------------------------------------------------------
N_MSGS = 30_000
SEEDS = (41, 42, 43)
HALT_AT = 0.6  # venue 2's halts come this far into its session


def _frames(buf: np.ndarray) -> list[int]:
    """The offset of each message's 2-byte length in a session file."""
    out, p = [], 0
    while p < len(buf):
        out.append(p)
        p += 2 + (int(buf[p]) << 8 | int(buf[p + 1]))
    return out


def _venue_sessions(tmp_path) -> tuple[list, list[str], dict]:
    """Three sessions (seeds 41, 42, 43) whose directories list the same tickers, each
    venue at its own locates (the first one's tickers, permuted by locate), and the third
    with trading halts spliced in part-way for stocks it quotes at the end and never
    resumes. Returns (paths, tickers, {ticker: its locate on the third venue} halted)."""
    from dataplane.book import Book
    from host.exchange import itchgen

    bufs = [itchgen.generate(N_MSGS, 60, seed) for seed in SEEDS]
    offs = [_frames(b) for b in bufs]
    r_at = [[p for p in o if b[p + 2] == ord("R")] for b, o in zip(bufs, offs, strict=True)]
    tickers = [bytes(bufs[0][p + 13 : p + 21]) for p in r_at[0]]
    for k, (b, rs) in enumerate(zip(bufs, r_at, strict=True)):
        perm = np.roll(np.arange(len(rs))[:: (-1) ** k], k)  # venue k: its own permutation
        for i, p in enumerate(rs):
            b[p + 13 : p + 21] = np.frombuffer(tickers[perm[i]], np.uint8)
    # venue 2: halt stocks part-way that it still quotes at the end and that no later H
    # message of its own resumes
    b, o = bufs[2], offs[2]
    cut = o[int(len(o) * HALT_AT)]
    later_h = {int(b[p + 3]) << 8 | int(b[p + 4]) for p in o if p >= cut and b[p + 2] == ord("H")}
    book = Book()
    book.feed(b.copy())
    names = {(int(b[p + 3]) << 8 | int(b[p + 4])): bytes(b[p + 13 : p + 21]) for p in r_at[2]}
    quoted = [loc for loc in sorted(names) if loc not in later_h and any(book.bbo(loc)[1::2])]
    halted = quoted[:5]
    assert len(halted) == 5
    ts = bytes(b[o[o.index(cut) - 1] + 7 : o[o.index(cut) - 1] + 13])  # the previous time
    msgs = b""
    for loc in halted:
        msg = b"H" + loc.to_bytes(2, "big") + b"\0\0" + ts + names[loc] + b"H T1  "
        assert len(msg) == 25
        msgs += len(msg).to_bytes(2, "big") + msg
    bufs[2] = np.concatenate([b[:cut], np.frombuffer(msgs, np.uint8), b[cut:]])
    paths = []
    for k, buf in enumerate(bufs):
        path = tmp_path / f"venue{k}.itch"
        buf.tofile(path)
        paths.append(path)
    syms = [t.decode().rstrip() for t in tickers]
    return paths, syms, {names[loc].decode().rstrip(): loc for loc in halted}


def _offline_world(paths, venues) -> dict:
    """The world view from each session's ``tickwire book`` result (the production book,
    offline): per ticker, each venue's BBO unless its trading state is not T."""
    from dataplane.book import Book

    per = []
    for path in paths:
        book = Book()
        book.feed(np.fromfile(path, np.uint8))
        locs = {
            bk._symbol(int(book.stocks["symbol"][loc])): int(loc)
            for loc in np.nonzero(book.stocks["named"])[0]
        }
        per.append((book, locs))
    out = {}
    for sym in per[0][1]:
        cands, excluded = {0: [], 1: []}, []
        for venue, (book, locs) in zip(venues, per, strict=True):
            loc = locs[sym]
            state = int(book.stocks["state"][loc])
            if state and state != ord("T"):
                excluded.append((venue, wv.STATE_REASONS[state]))
                continue
            bpx, bq, apx, aq = book.bbo(loc)
            if bq:
                cands[0].append((bpx, venue, bq))
            if aq:
                cands[1].append((apx, venue, aq))
        row = []
        for side, pick in ((0, max), (1, min)):
            if not cands[side]:
                row += [0, 0, ()]
                continue
            best = pick(px for px, _, _ in cands[side])
            at = tuple((v, q) for px, v, q in cands[side] if px == best)
            row += [best, sum(q for _, q in at), at]
        out[sym] = (*row, tuple(excluded))
    return out


@pytest.mark.lab
@pytest.mark.timeout(1500)  # three consumers may each compile on a cold numba cache
def test_three_venues_at_once_end_in_the_offline_world_view_and_a_halt_removes_one(tmp_path):
    """One ``tickwire run --lab`` receives three venues (channels) whose directories list
    the same tickers at different locates; ``tickwire world`` follows the three rings and
    serves gRPC. At the end of the three sessions, published at once, ``GetBBO`` of every
    symbol is the consolidation of the three ``tickwire book`` results; the five stocks the
    third venue halted part-way show it excluded though its book still quotes them."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from dataplane import shm
    from host.appliance import runner
    from tests.helpers import free_port, wait_for
    from tests.labnet import built, private_lab, run_sim, write_config

    paths, syms, halted = _venue_sessions(tmp_path)
    names = [f"w{os.getpid()}v{k}" for k in range(3)]
    want = _offline_world(paths, names)
    assert set(want) == set(syms)
    for sym in halted:  # offline too: the halted venue is out, and it had a quote
        assert want[sym][6] == ((names[2], "halted"),)
    cfg = private_lab("wv", channels=3)
    port, rpc = free_port(), free_port()
    cfg_path = tmp_path / "run.toml"
    with built(cfg):
        write_config(cfg, cfg_path)
        with open(cfg_path, "a") as f:
            f.write(f'[run]\nmetrics = "127.0.0.1:{port}"\ncore = -1\n')
            f.write(f'[world_view]\nlisten = "127.0.0.1:{rpc}"\n')
            for name in names:
                f.write(f'[[channel]]\nname = "{name}"\n')
        cli = [sys.executable, "-m", "host.cli"]
        run = subprocess.Popen(
            [*cli, "run", "--config", str(cfg_path), "--lab", "--mode", "socket", "--json"]
            + ["--until-eos"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        world = None
        try:
            for name in names:
                runner.wait_consumer(name, run, timeout=1200)
            world = subprocess.Popen(
                [*cli, "world", "--config", str(cfg_path), "--lab"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            client = wv.Client(f"127.0.0.1:{rpc}")

            def venues():
                try:
                    return client.venues()["venues"]
                except ConnectionError:
                    assert world.poll() is None, world.stderr.read()
                    return None

            def all_(key):
                got = venues()
                return got if got and all(v[key] for v in got) else None

            joined = wait_for(lambda: all_("joined"), 300, "the world view joined every venue")
            assert [v["name"] for v in joined] == names
            run_sim(
                str(cfg_path),
                *(a for p in paths for a in ("--session", str(p))),
                "--rate",
                "300000",
                "--eos-for",
                "1",
                timeout=300,
            )
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err
            ended = wait_for(lambda: all_("ended"), 60, "every venue's end of session", venues)
            got = {s: client.get(s) for s in syms}
            client.close()
            world.send_signal(signal.SIGTERM)
            wout, werr = world.communicate(timeout=60)
            assert world.returncode == 0, werr
        finally:
            for p in (run, world):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=60)
            for name in names:
                shm.remove(name)
    assert all(not v["stale"] and v["snapshots"] == "1" for v in ended)
    for sym in syms:
        q = got[sym]
        assert (q.bid_px, q.bid_qty, q.bids, q.ask_px, q.ask_qty, q.asks, q.excluded) == want[
            sym
        ], sym
    for sym in halted:  # the halted venue is out of the quote
        assert names[2] not in dict(got[sym].bids) and names[2] not in dict(got[sym].asks)
    # the consolidation mixes the venues: each of them is at some best
    assert {v for q in got.values() for v, _ in q.bids + q.asks} == set(names)
    st = json.loads(wout)
    assert [v["name"] for v in st["venues"]] == names and all(v["ended"] for v in st["venues"])
