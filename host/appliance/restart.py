"""Restart without losing the day: a consumer that starts in a session it has journaled
begins from the newest valid snapshot, replays the journal past it, and takes the rest from
the feed and the re-request server like any gap.

``restore`` runs in the consumer process before its loop:

1. the newest snapshot of ``<snapshot.dir>/<channel>/<session>/`` that loads (its digest
   checked; a damaged one is said and skipped) when ``[snapshot] enabled``, else an empty
   book;
2. the journal of ``<journal.dir>/<channel>/<session>/`` after the snapshot's sequence, when
   ``[journal] enabled`` and it exists: every message in order, holes skipped as the books
   that wrote them skipped them (the restored books are then stale, as those were);
3. the arbiter's next sequence is the one after the last restored: what the feed sends
   from there is taken live; what lies between (sent while the consumer was down) is a gap,
   declared and asked for like any other, and filled or declared unrecoverable.

Each message is applied once: the snapshot holds ``1..S``, the journal gives ``S+1..J``,
the arbiter takes ``J+1..`` and drops anything at or below ``J`` as a duplicate; the journal
writer, finding ``1..J`` already written, goes on at ``J+1``.

What was restored is written to ``restored.json`` in the channel's shared memory directory
(``tickwire run``'s summary shows it).
"""

from __future__ import annotations

import json
import time

import numpy as np

from dataplane import shm
from dataplane.book import Book


def restore(cfg, maps: dict, log) -> tuple[Book, dict | None]:
    """The consumer's book for ``cfg`` (one channel), restored when there is anything to
    restore; sets the arbiter's next sequence and the counters to match."""
    from dataplane import arbiter
    from host.appliance import journalwriter, replay, snapshot

    run, ctr = cfg.run, maps["counters"]
    book_ctr = ctr[shm.BOOK_BASE :]
    session = cfg.feed.session
    t0 = time.monotonic()
    snap = None
    if cfg.snapshot.enabled:
        d = snapshot.snapshot_dir(cfg.snapshot.dir, run.channel, session)
        snap = snapshot.newest(d, log=log)
    jdir = journalwriter.journal_dir(cfg.journal, run.channel, session)
    has_journal = cfg.journal.enabled and any(jdir.glob("*.twj"))
    if snap is None and not has_journal:
        return Book.for_capacity(run.orders, counters=book_ctr), None
    if snap is not None:
        book, info = snap
        book.counters = book_ctr
        seq, taken = info["seq"], info["taken"]
    else:
        book, info = Book.for_capacity(run.orders, counters=book_ctr), None
        seq, taken = 0, 0
    n, holes = 0, []
    if has_journal:
        seq, n, holes = replay.journal_into(book, seq, [jdir])
    lost = sum(h["count"] for h in holes if h["why"] == "unrecoverable")
    ctr[shm.A_NEXT] = seq + 1
    ctr[shm.A_DECLARED_TO] = seq + 1
    ctr[shm.A_TAKEN] = taken + n
    ctr[shm.A_UNRECOVERABLE_MSGS] = lost
    if holes:
        maps["control"][shm.C_STALE] = 1  # the books that were journaled skipped these
    t = time.monotonic_ns()
    sides = book.sides.reshape(-1, 2)
    for loc in np.nonzero((sides["count"] > 0).any(axis=1))[0]:  # the BBO table, whole
        arbiter.publish_bbo(maps["bbo"], book.sides, int(loc), seq, t)
    out = {
        "snapshot": info["path"] if info else None,
        "snapshot_seq": info["seq"] if info else None,
        "journal": str(jdir) if has_journal else None,
        "journal_messages": n,
        "holes": holes,
        "seq": seq,
        "seconds": time.monotonic() - t0,
    }
    (shm.channel_dir(run.channel) / "restored.json").write_text(json.dumps(out))
    log(
        f"restored to seq {seq:,} in {out['seconds']:.2f} s: "
        + (f"snapshot at {info['seq']:,}" if info else "no snapshot")
        + (f" + {n:,} journal messages" if has_journal else "")
        + (f" ({len(holes)} hole(s): books stale)" if holes else "")
    )
    return book, out


def restored(channel: str) -> dict | None:
    try:
        return json.loads((shm.channel_dir(channel) / "restored.json").read_text())
    except (OSError, ValueError):
        return None
