"""The journal writer: a process of its own, beside the consumer, that copies every message
the consumer took from the channel's message ring (``dataplane.msgring``) into the journal
(``host.appliance.journal``). The consumer never waits on it or on the disk.

``tickwire run`` starts one per channel when ``[journal] enabled`` (``start``: a spawned
process, so nothing of the supervisor's threads comes along) once the consumer runs, and
stops it after the consumer has stopped: it then reads the ring to its end, closes the
journal (synced unless ``sync = "none"``) and exits. The journal of a channel's session is
``<journal.dir>/<channel>/<session>/``: a restart in the same session appends to it, a new
session starts another.

Exactly once: the ring carries each sequence the consumer took once, in order; a message
the journal already holds (a consumer that started again from the beginning of the
session, say) is skipped and counted (``already``), never written twice. Unrecoverable
ranges the consumer skipped are written as holes ("unrecoverable"). If the writer falls a
whole ring behind (``Lapped``) it cannot know what it missed: the journal gets a hole
("journal writer lapped") from its next sequence up to the first one it reads again, and
``lapped`` counts it. A full disk is the journal's own business (a counted hole once
writing works again); the books never notice.

Its counters (``stats``: the writer's, plus ``already``, ``lapped``, ``ring_pos``) are
written every ``STATS_S`` to ``journal.json`` in the channel's shared memory directory,
where ``tickwire status`` and the metrics read them, and once more at exit.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from pathlib import Path

import numpy as np

from dataplane import msgring, shm

JOINED = "joined past it"  # a hole's reason: the books began from a spin beyond the journal
STATS_S = 0.5
IDLE_S = 0.001


def journal_dir(jcfg, channel: str, session: str) -> Path:
    """Where ``channel``'s journal of ``session`` lives."""
    return Path(jcfg.dir) / channel / session.strip()


def run(channel: str, jcfg, session: str, root: Path | None = None, stop=None) -> dict:
    """Journal ``channel`` until SIGTERM (or ``stop()``), then drain the ring and return
    the stats."""
    from host.appliance import journal

    stopping = []
    if stop is None:
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides

        def stop():
            return bool(stopping)

    reader = msgring.Reader.attach(channel, root, cursor=0)
    split = msgring.Split(reader.size)
    out = shm.channel_dir(channel, root) / "journal.json"
    w = journal.Writer(
        journal_dir(jcfg, channel, session), channel, session, **journal.writer_options(jcfg)
    )
    extra = {"already": 0, "lapped": 0, "ring_pos": 0, "running": True}
    lapped = False
    next_stats = 0.0
    try:
        while True:
            done = stop()  # asked before the last read: whatever came before is written
            try:
                chunk = reader.poll()
            except msgring.Lapped:
                extra["lapped"] += 1
                lapped = True
                continue
            if len(chunk):
                seqs, buf, offs, holes = split.messages(chunk, reader.start)
                lapped = _write(w, seqs, buf, offs, holes, extra, lapped)
            else:
                w.tick()
            extra["ring_pos"] = reader.cursor
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_S
                shm.write_json(out, {**w.stats(), **extra})
            if done and not len(chunk):
                break
            if not len(chunk):
                time.sleep(IDLE_S)
    finally:
        w.close()
        extra["running"] = False
        st = {**w.stats(), **extra}
        shm.write_json(out, st)
    return st


def _write(w, seqs, buf, offs, holes, extra: dict, lapped: bool) -> bool:
    """The messages (and holes) of one chunk, in order, skipping what the journal holds;
    returns whether a lap is still to be recorded."""
    a = 0
    cuts = [(int(h[2]), int(h[0]), int(h[1])) for h in holes] + [(len(seqs), 0, 0)]
    for idx, first, count in cuts:
        if idx > a:
            a, lapped = _messages(w, seqs, buf, offs, a, idx, extra, lapped)
        if count:
            nxt = w.next_seq
            if nxt is not None and first + count <= nxt:
                continue  # the journal has it (holes and messages alike)
            if nxt is not None and first < nxt:
                count -= nxt - first
                first = nxt
            if lapped:
                nxt = 1 if nxt is None else nxt
                if first > nxt:
                    w.hole(nxt, first - nxt, "journal writer lapped")
            lapped = False
            w.hole(first, count, "unrecoverable")
    return lapped


def _messages(w, seqs, buf, offs, a: int, b: int, extra: dict, lapped: bool):
    nxt = w.next_seq
    if nxt is not None:
        k = int(np.searchsorted(seqs[a:b], nxt)) + a  # seqs are consecutive, ascending
        extra["already"] += k - a
        a = k
    if a < b:
        first = int(seqs[a])
        if lapped:
            nxt = 1 if nxt is None else nxt  # an empty journal: the consumer began at 1
            if first > nxt:
                w.hole(nxt, first - nxt, "journal writer lapped")
        elif nxt is not None and first > nxt:
            # the consumer began past the journal's end: its books were joined by the
            # snapshot service (host.appliance.restart), which held these
            w.hole(nxt, first - nxt, JOINED)
        w.append_many(seqs[a:b], buf, offs[a : b + 1])
        lapped = False
    return b, lapped


def _main(channel: str, jcfg, session: str) -> None:
    try:
        run(channel, jcfg, session)
    except BaseException as e:  # noqa: BLE001 - said in the file the supervisor reads
        out = shm.channel_dir(channel) / "journal.json"
        shm.write_json(out, {"running": False, "error": f"{type(e).__name__}: {e}"})
        raise SystemExit(1) from None


def start(channel: str, jcfg, session: str):
    """The writer of ``channel`` as a spawned process (started); ``stop`` ends it."""
    (shm.channel_dir(channel) / "journal.json").unlink(missing_ok=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_main, args=(channel, jcfg, session), name=f"tickwire-journal-{channel}"
    )
    proc.start()
    return proc


def stop(proc, timeout: float = 60.0) -> int | None:
    """SIGTERM, wait for it to drain and exit; its exit code (None: killed after
    ``timeout``)."""
    if proc.is_alive():
        proc.terminate()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def read_stats(channel: str, root: Path | None = None) -> dict | None:
    """The writer's last ``journal.json`` (None: no journal writer on this channel)."""
    return shm.read_json(shm.channel_dir(channel, root) / "journal.json")
