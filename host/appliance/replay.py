"""Offline replay of a Nasdaq binary ITCH 5.0 file through the production decoder and book.

``replay_file`` maps the file, feeds it to ``dataplane.book.Book`` in chunks (so progress can
be shown and memory stays flat), and returns the book plus a ``ReplayResult``. The JSON shape
of ``tickwire book`` (``result_json``) is the interface described in ARCHITECTURE.md.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dataplane import itch
from dataplane.book import Book

CHUNK = 32 << 20  # bytes per feed call: progress granularity, never splits a message


class ReplayError(OSError):
    """The input file cannot be replayed (missing, unreadable, truncated)."""


@dataclass(frozen=True)
class ReplayResult:
    messages: int  # framed messages seen, valid or not
    seconds: float  # decode + apply wall time (JIT warm-up excluded)
    bytes: int


def _map(path: str) -> np.ndarray:
    """The file as a read-only uint8 array (released with its last view)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ReplayError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise ReplayError(f"is a directory, not an ITCH file: {path}") from None
    except PermissionError:
        raise ReplayError(f"permission denied: {path}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, np.uint8)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, np.uint8)


def warm_up() -> None:
    """Load (or compile, the first time on a machine) the jitted book path."""
    Book(orders=16, levels=16, ladder=16).feed(np.zeros(0, np.uint8))


def replay_buffer(
    buf: np.ndarray, book: Book | None = None, progress: Callable[[int, int], None] | None = None
) -> tuple[Book, ReplayResult]:
    """Apply a whole framed buffer; raises ``itch.TruncatedInput`` at a broken tail."""
    book = book or Book()
    warm_up()
    end = len(buf)
    pos = 0
    t0 = time.perf_counter()
    while pos < end:
        stop = min(pos + CHUNK, end)
        pos = book.feed(buf, pos, stop, partial_ok=stop < end)
        if progress is not None:
            progress(pos, end)
    seconds = time.perf_counter() - t0
    return book, ReplayResult(int(book.counters[itch.C_MESSAGES]), seconds, end)


def replay_file(
    path: str, progress: Callable[[int, int], None] | None = None
) -> tuple[Book, ReplayResult]:
    buf = _map(path)
    try:
        return replay_buffer(buf, progress=progress)
    except itch.TruncatedInput as e:
        raise ReplayError(f"{path}: {e}") from None


def terminal_progress(label: str) -> Callable[[int, int], None] | None:
    """A stderr progress callback when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(
            f"\r{label}: {100 * done // max(total, 1):3d}% of {total / 1e6:.0f} MB",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    return show


def result_json(book: Book, result: ReplayResult) -> dict:
    counters = book.anomalies()
    counters["unknown_type"] = int(book.counters[itch.C_UNKNOWN_TYPE])
    counters["bad_length"] = int(book.counters[itch.C_BAD_LENGTH])
    return {
        "messages": result.messages,
        "seconds": round(result.seconds, 6),
        "msgs_per_s": round(result.messages / result.seconds) if result.seconds > 0 else 0,
        "digest": book.digest(),
        "stocks": book.stocks_summary(),
        "counters": counters,
    }


def _px(raw: int) -> str:
    return f"{raw / 10000:,.4f}" if raw else "-"


def summary_text(book: Book, result: ReplayResult, top: int = 5) -> str:
    """A short human summary: counts, rate, anomalies, top of book for the busiest symbols."""
    doc = result_json(book, result)
    rate = doc["msgs_per_s"] / 1e6
    lines = [
        f"messages   {doc['messages']:,} in {result.seconds:.3f} s ({rate:.1f} M msg/s)",
        f"books      {len(doc['stocks']):,} stocks, {book.live_orders:,} live orders, "
        f"{len(book.levels_table()):,} price levels",
        "anomalies  " + (", ".join(f"{k} {v}" for k, v in doc["counters"].items() if v) or "none"),
        f"digest     {doc['digest']}",
        f"top of book ({top} busiest symbols):",
    ]
    busiest = sorted(doc["stocks"].items(), key=lambda kv: -kv[1]["orders"])[:top]
    for loc, s in busiest:
        lines.append(
            f"  {s['symbol'] or '?':<8} locate {loc:>5}  "
            f"bid {s['bid_qty']:>8,} @ {_px(s['bid_px']):>12}   "
            f"ask {s['ask_qty']:>8,} @ {_px(s['ask_px']):>12}   {s['orders']:,} orders"
        )
    return "\n".join(lines)


def journal_into(
    book: Book, seq: int, journal_dirs: list, until: int | None = None, chunk: int = 1 << 16
) -> tuple[int, int, list[dict]]:
    """Apply to ``book`` (every message up to ``seq`` in it) the journal's messages after
    ``seq`` (to ``until``), in order; holes are skipped as the live books skipped them.
    Returns ``(seq, messages applied, holes)``; ``ValueError`` when the journal does not go
    on from ``seq`` (a jump no hole accounts for)."""
    from host.appliance import journal

    holes: list[dict] = []
    parts: list[bytes] = []
    n = 0

    def flush() -> None:
        if parts:
            book.feed(np.frombuffer(b"".join(parts), np.uint8))
            parts.clear()

    for d in journal_dirs:
        for r in journal.Reader(d).records(from_seq=seq + 1):
            if until is not None and (r.first if isinstance(r, journal.Hole) else r[0]) > until:
                break
            if isinstance(r, journal.Hole):
                if r.first > seq + 1:
                    raise ValueError(f"{d}: the journal jumps from {seq} to a hole at {r.first}")
                if r.first + r.count - 1 > seq:
                    holes.append({"first": r.first, "count": r.count, "why": r.why})
                seq = max(seq, r.first + r.count - 1)
                continue
            s, payload = r
            if s <= seq:
                continue
            if s != seq + 1:
                raise ValueError(f"{d}: the journal jumps from {seq} to {s}")
            parts.append(len(payload).to_bytes(2, "big") + bytes(payload))
            seq, n = s, n + 1
            if len(parts) >= chunk:
                flush()
    flush()
    return seq, n, holes


def snapshot_and_journal(
    snapshot_path: str, journal_dirs: list[str], until: int | None = None
) -> dict:
    """``tickwire replay --snapshot S --journal J...``: the snapshot's book, then every
    journal message after its sequence (``journal_into``)."""
    from host.appliance import snapshot

    book, info = snapshot.load(snapshot_path)
    seq, n, holes = journal_into(book, info["seq"], journal_dirs, until)
    return {
        "snapshot": info["path"],
        "snapshot_seq": info["seq"],
        "messages": n,
        "holes": holes,
        "seq": seq,
        "digest": book.digest(),
    }
