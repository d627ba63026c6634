"""Benchmarks (``tickwire bench ...``): rates measured in one run, reported as ratios
against a baseline measured in the same run on the same input. Nothing here asserts.

``bench book``: for each session (generated, or ``--session FILE``), after JIT warm-up:
- decode only: ``itch.walk_checksum`` over the book-relevant fields of every message;
- decode + book: ``book.apply_stream`` into a ``Book`` presized from a warm-up pass
  (growth is measured separately by the replay path), and into the book ``tickwire run``
  allocates by default (``run.orders`` = 1,048,576: a large order index, mostly cold);
- baseline: ``itch_book.Session`` (C++23, PyPI) on the same buffer, with no tables (parse +
  full book apply, its fastest mode) and with the ``bbo`` table (top-of-book tracking on,
  which is what our book always maintains).
``--repeat`` rounds each time every contender once: rates are each one's best round,
ratios the median over rounds of the paired times (and their range).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from dataplane import itch
from dataplane.book import Book
from host.config import RunConfig

APPLIANCE_ORDERS = RunConfig.__dataclass_fields__["orders"].default  # run.orders' default


def cache_dir() -> Path:
    d = Path(os.environ.get("TICKWIRE_CACHE", Path.home() / ".cache" / "tickwire"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def generated_session(messages: int, stocks: int, seed: int) -> np.ndarray:
    from host.exchange import itchgen

    path = cache_dir() / f"session-{messages}-{stocks}-{seed}.itch"
    if not path.exists():
        say(f"  generating {messages:,} messages on {stocks:,} stocks (seed {seed}) ...")
        tmp = path.with_suffix(".tmp")
        itchgen.write_session(str(tmp), messages, stocks, seed)
        tmp.rename(path)
    return np.fromfile(path, np.uint8)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_buffer(name: str, buf: np.ndarray, repeat: int) -> dict:
    """Every contender once per round, ``repeat`` rounds. Rates are each contender's best
    round; a ratio is the median over rounds of the two contenders' times in that round
    (paired: a slow spell of the VM hits both sides of a ratio alike), with its range."""
    counters = itch.new_counters()
    itch.walk_checksum(buf, 0, 0, counters)  # JIT warm-up
    status, _, _ = itch.walk_checksum(buf, 0, len(buf), counters)
    if status != itch.OK:
        raise ValueError(f"{name}: truncated input")
    messages = int(counters[itch.C_MESSAGES])

    warm = Book()
    warm.feed(buf)  # warm-up pass: JIT, page faults, learn the sizes
    digest = warm.digest()

    def into(make):  # a fresh book per round, allocated outside the timed part
        return lambda: _timed(make().feed, buf)

    contenders = {
        "decode": lambda: _timed(itch.walk_checksum, buf, 0, len(buf), itch.new_counters()),
        "book": into(lambda: Book.sized_like(warm)),
        "appliance_book": into(lambda: Book.for_capacity(APPLIANCE_ORDERS)),
    }
    try:
        import itch_book
    except ImportError:
        itch_book = None
    baselines = {"itch_book": [], "itch_book_bbo": ["bbo"]} if itch_book else {}
    stats = {}
    for label, tables in baselines.items():

        def run(tables=tables, label=label):
            s = itch_book.Session(tables=tables, depth=0, symbols=[])
            s.feed(buf)
            stats[label] = s.stats()

        run()  # warm-up
        contenders[label] = lambda run=run: _timed(run)
    times = {k: [] for k in contenders}
    for _ in range(repeat):
        for k, fn in contenders.items():
            times[k].append(fn())

    def rate(k):
        return messages / min(times[k])

    out = {
        "session": name,
        "messages": messages,
        "rounds": repeat,
        "decode_msgs_per_s": rate("decode"),
        "decode_ns_per_msg": 1e9 * min(times["decode"]) / messages,
        "book_msgs_per_s": rate("book"),
        "book_ns_per_msg": 1e9 * min(times["book"]) / messages,
        "appliance_book_msgs_per_s": rate("appliance_book"),
        "appliance_book_ns_per_msg": 1e9 * min(times["appliance_book"]) / messages,
        "digest": digest,
        "live_orders": warm.live_orders,
    }
    if not baselines:
        out["baseline"] = "itch-book not installed (pip install tickwire[bench])"
        return out
    for label in baselines:
        out[f"{label}_msgs_per_s"] = rate(label)
        out[f"{label}_messages"] = int(stats[label].get("messages", 0))
        for ours, prefix in (("book", "ratio_vs_"), ("appliance_book", "appliance_ratio_vs_")):
            paired = sorted(t / o for t, o in zip(times[label], times[ours], strict=True))
            out[f"{prefix}{label}"] = float(np.median(paired))
            out[f"{prefix}{label}_range"] = [paired[0], paired[-1]]
            out[f"{prefix}{label}_best"] = rate(ours) / rate(label)
    return out


def _ratio(r: dict, key: str) -> str:
    lo, hi = r[f"{key}_range"]
    return f"{r[key]:.2f}x [{lo:.2f}-{hi:.2f}]"


def _row(r: dict) -> str:
    lines = [
        f"{r['session']}: {r['messages']:,} messages",
        f"  decode only      {r['decode_msgs_per_s'] / 1e6:7.1f} M msg/s  "
        f"{r['decode_ns_per_msg']:6.1f} ns/msg",
        f"  decode + book    {r['book_msgs_per_s'] / 1e6:7.1f} M msg/s  "
        f"{r['book_ns_per_msg']:6.1f} ns/msg   (book presized from a warm-up pass)",
        f"  decode + book    {r['appliance_book_msgs_per_s'] / 1e6:7.1f} M msg/s  "
        f"{r['appliance_book_ns_per_msg']:6.1f} ns/msg   (the appliance's default book)",
    ]
    if "itch_book_msgs_per_s" in r:
        lines += [
            f"  itch-book        {r['itch_book_msgs_per_s'] / 1e6:7.1f} M msg/s   "
            f"(parse + book, no tables)   ratio {_ratio(r, 'ratio_vs_itch_book')}",
            f"  itch-book + bbo  {r['itch_book_bbo_msgs_per_s'] / 1e6:7.1f} M msg/s   "
            f"(top-of-book tracking on)   ratio {_ratio(r, 'ratio_vs_itch_book_bbo')}",
            f"  appliance's default book vs itch-book: "
            f"{_ratio(r, 'appliance_ratio_vs_itch_book')}, vs itch-book + bbo: "
            f"{_ratio(r, 'appliance_ratio_vs_itch_book_bbo')}",
            f"  (ratios: median of {r['rounds']} rounds, each timing every contender once; "
            "range in brackets)",
        ]
    else:
        lines.append(f"  baseline: {r['baseline']}")
    return "\n".join(lines)


def bench_book(
    session: str | None = None,
    messages: int = 5_000_000,
    stocks: tuple[int, ...] = (100, 9000),
    repeat: int = 7,
    seed: int = 1,
    print_rows: bool = False,
) -> list[dict]:
    """``bench_buffer`` on the ITCH file ``session``, else on a generated session of
    ``messages`` per count of ``stocks``; ``print_rows``: each result's line as it comes."""
    if session:
        sessions = [(session, lambda: np.fromfile(session, np.uint8))]
    else:
        sessions = [
            (
                f"generated {messages:,} msgs / {n:,} stocks",
                lambda n=n: generated_session(messages, n, seed),
            )
            for n in stocks
        ]
    results = []
    for name, load in sessions:
        say(f"bench book: {name}")
        buf = load()
        results.append(bench_buffer(name, buf, repeat))
        if print_rows:
            print(_row(results[-1]), flush=True)
    return results
