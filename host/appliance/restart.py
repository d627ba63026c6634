"""How a consumer's books begin: empty at the start of a session, restored after a restart,
or joined late from the exchange's snapshot service.

``begin`` runs in the consumer process after its sockets are open -- what the feed sends
from then on waits in their receive rings (the AF_XDP rx ring, the socket's buffer) -- and
before its loop:

1. **Restore** (``restore``) when the session has been journaled here: the newest snapshot
   of ``<snapshot.dir>/<channel>/<session>/`` that loads (its digest checked; a damaged one
   is said and skipped), then the journal of ``<journal.dir>/<channel>/<session>/`` past it,
   every message in order (holes skipped as the books that wrote them skipped them: the
   restored books are then stale, as those were). The books hold ``1..J``.
2. **Join** when ``[glimpse] address`` names the exchange's snapshot service (GLIMPSE 5.0
   over SoupBinTCP 4.0, ``host.appliance.glimpse``): log in, take the spin, build books
   from it; they hold ``1..N``, N the spin's snapshot sequence. A refused login, a drop
   mid-spin or no answer is said, counted and tried again after a doubling backoff, up to
   ``attempts``; meanwhile the consumer's state is ``joining`` and ``tickwire status`` and
   the metrics show its books stale. The spin is taken when nothing was restored, or when
   the restored books are more than ``prefer_over`` messages behind it (the re-request
   server would have to send all of that, within its window, caps and the recovery SLO);
   otherwise the restored books stay and the re-request server fills ``J+1..N``.
3. The arbiter's next sequence is the one after the books' last: the receive rings' older
   messages are dropped as already reflected, the rest taken live; what the rings could not
   hold is a gap, asked for like any other.

Each message is applied once: the books hold ``1..S``, the arbiter drops anything at or
below ``S``; the journal writer, finding ``1..J`` already written, goes on at ``J+1`` (a
spin past the journal's end leaves a hole there, said as such). After a join the spin's
books are written as a snapshot at once (with ``[snapshot] enabled``), so a restart finds
them. The event ring's header says the sequence its first event follows
(``events.H_BASE_SEQ``): a reader of a restored or joined consumer's ring needs a snapshot.

What happened is written to ``start.json`` in the channel's shared memory directory (as it
goes: ``tickwire status`` shows a join in progress) and shown in ``tickwire run``'s
summary as ``began``.
"""

from __future__ import annotations

import time

import numpy as np

from dataplane import events, shm
from dataplane.book import Book

BACKOFF_MAX_S = 5.0


def start_file(channel: str):
    return shm.channel_dir(channel) / "start.json"


def started(channel: str) -> dict | None:
    """What ``start.json`` says (None: nothing yet)."""
    return shm.read_json(start_file(channel))


def _say(channel: str, out: dict) -> None:
    shm.write_json(start_file(channel), out)


def restore(cfg, log) -> tuple[Book, dict] | None:
    """The books of the newest snapshot and the journal past it (None: nothing to restore),
    and what was used: ``snapshot``, ``snapshot_seq``, ``taken`` (messages the snapshot's
    consumer had taken), ``journal``, ``journal_messages``, ``holes``, ``seq``."""
    from host.appliance import journalwriter, replay, snapshot

    run, session = cfg.run, cfg.feed.session
    snap = None
    if cfg.snapshot.enabled:
        snap = snapshot.newest(
            snapshot.snapshot_dir(cfg.snapshot.dir, run.channel, session), log=log
        )
    jdir = journalwriter.journal_dir(cfg.journal, run.channel, session)
    has_journal = cfg.journal.enabled and any(jdir.glob("*.twj"))
    if snap is None and not has_journal:
        return None
    if snap is not None:
        book, info = snap
        seq, taken = info["seq"], info["taken"]
    else:
        book, info = Book.for_capacity(run.orders), None
        seq, taken = 0, 0
    n, holes = 0, []
    if has_journal:
        try:
            seq, n, holes = replay.journal_into(book, seq, [jdir])
        except ValueError as e:  # a journal that does not go on from the snapshot
            log(f"nothing restored: {e}")
            return None
        if any(h["why"] == journalwriter.JOINED for h in holes):
            log("nothing restored: the journal crosses a late join with no snapshot after it")
            return None
    return book, {
        "snapshot": info["path"] if info else None,
        "snapshot_seq": info["seq"] if info else None,
        "taken": taken + n,
        "journal": str(jdir) if has_journal else None,
        "journal_messages": n,
        "holes": holes,
        "seq": seq,
    }


def join(cfg, maps: dict, out: dict, log):
    """The snapshot service's spin (``glimpse.Spin``), tried ``attempts`` times with a
    doubling backoff; None when every try failed (each error is in ``out``)."""
    from host.appliance import glimpse
    from host.config import host_port

    g, ctr = cfg.glimpse, maps["counters"]
    host, port = host_port(g.address, "glimpse.address")
    tries = out["join"] = {"address": g.address, "attempts": 1, "errors": []}
    ctr[shm.S_JOIN_TRIES] = 1

    def failed(attempt: int, e: Exception, last: bool = False) -> None:
        tries["errors"].append(str(e))
        log(f"snapshot service {g.address}: {e} (try {attempt} of {g.attempts})")
        if not last:
            tries["attempts"] = attempt + 1
            ctr[shm.S_JOIN_TRIES] = attempt + 1
        _say(cfg.run.channel, out)

    try:
        spin = glimpse.fetch_retrying(
            host,
            port,
            g.user,
            g.password,
            cfg.feed.session,
            timeout=g.timeout_s,
            attempts=g.attempts,
            backoff_s=g.backoff_s,
            max_backoff_s=BACKOFF_MAX_S,
            on_retry=failed,
        )
    except glimpse.GlimpseError as e:  # the last try, or one retrying cannot mend
        failed(tries["attempts"], e, last=True)
        return None
    tries.update(seq=spin.seq, messages=spin.count, spin_seconds=spin.seconds)
    return spin


def begin(cfg, maps: dict, book: Book, log) -> dict:
    """Set ``book`` (in place) and the arbiter's next sequence for this start (see the
    module docstring); returns what ``start.json`` says."""
    from dataplane import arbiter

    run, ctr = cfg.run, maps["counters"]
    t0 = time.monotonic()
    out: dict = {"began": "starting", "seq": 0}
    _say(run.channel, out)
    restored = restore(cfg, log)
    seq, how, holes = 0, shm.BEGIN_EMPTY, []
    if restored is not None:
        out["restored"] = restored[1]
    spin = None
    if cfg.glimpse.address:
        ctr[shm.S_BEGIN] = shm.BEGIN_JOINING
        out["began"] = "joining"
        _say(run.channel, out)
        spin = join(cfg, maps, out, log)
    behind = spin.seq - restored[1]["seq"] if (spin and restored) else 0
    if spin is not None and spin.seq > 0 and (restored is None or behind > cfg.glimpse.prefer_over):
        joined = Book.for_capacity(run.orders)
        joined.feed(spin.messages)
        book.take(joined)
        seq, how = spin.seq, shm.BEGIN_JOINED
        ctr[shm.A_TAKEN] = 0
        if cfg.snapshot.enabled:
            from host.appliance import snapshot

            snapshot.write(cfg.snapshot.dir, run.channel, cfg.feed.session, seq, book, 0)
    elif restored is not None:
        book.take(restored[0])
        info = restored[1]
        seq, how, holes = info["seq"], shm.BEGIN_RESTORED, info["holes"]
        ctr[shm.A_TAKEN] = info["taken"]
        ctr[shm.A_UNRECOVERABLE_MSGS] = sum(
            h["count"] for h in holes if h["why"] == "unrecoverable"
        )
        if holes:
            maps["control"][shm.C_STALE] = 1  # the books that were journaled skipped these
    elif cfg.glimpse.address and spin is None:
        how = shm.BEGIN_JOIN_FAILED  # empty books; the re-request server is asked for all
    ctr[shm.A_NEXT] = seq + 1
    ctr[shm.A_DECLARED_TO] = seq + 1
    ctr[shm.S_BEGIN_SEQ] = seq
    if "ring" in maps:
        maps["ring"][1][events.H_BASE_SEQ] = seq
    if seq:
        t = time.monotonic_ns()
        sides = book.sides.reshape(-1, 2)
        for loc in np.nonzero((sides["count"] > 0).any(axis=1))[0]:  # the BBO table, whole
            arbiter.publish_bbo(maps["bbo"], book.sides, int(loc), seq, t)
    ctr[shm.S_BEGIN] = how
    out.update(began=shm.BEGIN_NAMES[how], seq=seq, seconds=time.monotonic() - t0)
    _say(run.channel, out)
    if how != shm.BEGIN_EMPTY:
        log(
            f"began {out['began']} at seq {seq:,} in {out['seconds']:.2f} s"
            + (f" ({len(holes)} journal hole(s): books stale)" if holes else "")
        )
    return out
