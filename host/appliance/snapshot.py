"""Book snapshots: the consumer's whole L3 book at a message boundary, written with the
sequence it corresponds to and its digest, for restart (snapshot + journal + recovery) and
for ``tickwire replay``.

Taken without holding the consumer for more than a copy: when one is asked for
(``request``: ``tickwire snapshot``, or ``[snapshot] interval_s``), the consumer -- between
packets, where its loop hands back to Python at least every 50 ms -- forks. The child holds
the book as it was at that instant (the kernel copies pages only as the parent writes
them: copy-on-write), writes it and exits; the parent goes straight back to its loop. What
the consumer pays is ``fork`` itself (its page tables), measured and kept in
``last.json`` as ``fork_us``.

A snapshot is ``<dir>/<channel>/<session>/<seq:020d>.twsnap.npz`` (numpy's npz,
uncompressed): the book's arrays (``orders``, ``levels``, ``sides``, ``ladder``, ``htab``,
``stocks``, ``meta``) and ``info``, a JSON text: ``format`` ("tw-snap-1"), ``channel``,
``session``, ``seq`` (every message up to it is in the book, none after), ``digest``
(``tickwire book``'s, of these levels), ``taken``, ``max_orders``, ``created`` (UTC). It is
written to a temporary name, synced, then renamed: a snapshot file is whole or absent. On
load the digest is computed again from the arrays and must match (``SnapshotError``
otherwise); ``newest`` is the newest one that loads.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from dataplane import shm
from dataplane.book import Book

FORMAT = "tw-snap-1"
SUFFIX = ".twsnap.npz"
ARRAYS = ("orders", "levels", "sides", "ladder", "htab", "stocks", "meta")


class SnapshotError(ValueError):
    """A snapshot file that is not one, or whose book does not match its digest."""


def snapshot_dir(directory: str | os.PathLike, channel: str, session: str) -> Path:
    return Path(directory) / channel / session.strip()


def write(directory: Path, channel: str, session: str, seq: int, book: Book, taken: int) -> dict:
    """Write ``book`` (every message up to ``seq``) into ``directory``; its info."""
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "channel": channel,
        "session": session.strip(),
        "seq": int(seq),
        "digest": book.digest(),
        "taken": int(taken),
        "max_orders": int(book.max_orders),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    path = directory / f"{int(seq):020d}{SUFFIX}"
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(
            f,
            info=np.array(json.dumps(info)),
            **{name: getattr(book, name) for name in ARRAYS},
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    info["path"] = str(path)
    return info


def load(path: str | os.PathLike) -> tuple[Book, dict]:
    """The book of a snapshot file and its info; ``SnapshotError`` when the file is not a
    whole snapshot or its book does not give its digest."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            arrays = {name: z[name] for name in ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise SnapshotError(f"{path}: not a readable snapshot ({e})") from None
    if info.get("format") != FORMAT:
        raise SnapshotError(f"{path}: format {info.get('format')!r}, not {FORMAT}")
    book = Book(orders=16, levels=16, ladder=16, max_orders=int(info["max_orders"]))
    for name, a in arrays.items():
        setattr(book, name, np.ascontiguousarray(a))
    got = book.digest()
    if got != info["digest"]:
        raise SnapshotError(f"{path}: its book's digest {got[:12]} is not {info['digest'][:12]}")
    info["path"] = str(path)
    return book, info


def listing(directory: Path) -> list[Path]:
    """The snapshot files of a directory, oldest sequence first."""
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return []


def newest(directory: Path, log=None) -> tuple[Book, dict] | None:
    """The newest snapshot of ``directory`` that loads (a bad one is said and skipped)."""
    for path in reversed(listing(directory)):
        try:
            return load(path)
        except SnapshotError as e:
            if log:
                log(f"snapshot skipped: {e}")
    return None


# --- taking one, in the consumer --------------------------------------------------------------
def request(channel: str, timeout: float = 60.0, root: Path | None = None) -> dict:
    """Ask the consumer of ``channel`` for a snapshot and wait for it; its info."""
    m = shm.attach(channel, root)
    ctl = m["control"]
    if not m["counters"][shm.S_RUNNING]:
        raise RuntimeError(f"channel {channel}: the consumer is not running")
    want = int(ctl[shm.C_BOOKSNAP_REQ]) + 1
    ctl[shm.C_BOOKSNAP_REQ] = want
    deadline = time.monotonic() + timeout
    last = shm.channel_dir(channel, root) / "snapshot.json"
    while int(ctl[shm.C_BOOKSNAP_DONE]) < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"channel {channel}: no snapshot within {timeout:g} s")
        time.sleep(0.01)
    info = json.loads(last.read_text())
    if info.get("error"):
        raise RuntimeError(f"channel {channel}: snapshot failed: {info['error']}")
    return info


class Taker:
    """In the consumer process: forks a child per request; the child writes the snapshot
    and ``snapshot.json`` (its info, or the error), then the parent, reaping it, marks the
    request done. At most one child at a time (a request meanwhile waits for it)."""

    def __init__(self, channel: str, session: str, cfg, maps: dict):
        self.channel, self.session = channel, session
        self.dir = snapshot_dir(cfg.dir, channel, session)
        self.keep, self.interval = cfg.keep, cfg.interval_s
        self.next_timed = time.monotonic() + self.interval
        self.ctl, self.ctr = maps["control"], maps["counters"]
        self.last = shm.channel_dir(channel) / "snapshot.json"
        self.child = 0
        self.serving = 0

    def poll(self, book: Book) -> None:
        """Between packets: reap a finished child; fork for a new request."""
        if self.child:
            pid, status = os.waitpid(self.child, os.WNOHANG)
            if not pid:
                return
            self.child = 0
            if status != 0 and not self.last.exists():
                self._say({"error": f"the snapshot child ended with status {status}"})
            self.ctl[shm.C_BOOKSNAP_DONE] = self.serving
        if self.interval and time.monotonic() >= self.next_timed:
            self.next_timed = time.monotonic() + self.interval
            if int(self.ctl[shm.C_BOOKSNAP_REQ]) <= int(self.ctl[shm.C_BOOKSNAP_DONE]):
                self.ctl[shm.C_BOOKSNAP_REQ] += 1
        want = int(self.ctl[shm.C_BOOKSNAP_REQ])
        if want <= int(self.ctl[shm.C_BOOKSNAP_DONE]):
            return
        seq, taken = int(self.ctr[shm.A_NEXT]) - 1, int(self.ctr[shm.A_TAKEN])
        self.last.unlink(missing_ok=True)
        t0 = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:  # the child: the book as it was at the fork
            code = 0
            try:
                fork_us = (time.perf_counter_ns() - t0) / 1e3
                info = write(self.dir, self.channel, self.session, seq, book, taken)
                for old in listing(self.dir)[: -self.keep]:
                    old.unlink(missing_ok=True)
                self._say({**info, "fork_us": fork_us})
            except BaseException as e:  # noqa: BLE001 - said to the requester
                code = 1
                self._say({"error": f"{type(e).__name__}: {e}"})
            finally:
                os._exit(code)
        self.child, self.serving = pid, want

    def finish(self) -> None:
        """Wait for a child still writing (the consumer is stopping)."""
        if self.child:
            os.waitpid(self.child, 0)
            self.child = 0
            self.ctl[shm.C_BOOKSNAP_DONE] = self.serving

    def _say(self, doc: dict) -> None:
        tmp = self.last.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.last)
