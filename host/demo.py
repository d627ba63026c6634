"""`make demo`: the end-to-end job a newcomer runs first.

Until the live receive path lands, the demo generates a deterministic session, replays it
through the production decoder and book (exactly what ``tickwire book`` does) and prints a
short human summary.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from host import itchgen, replay

MESSAGES = 2_000_000
STOCKS = 100
SEED = 1


def _step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def main() -> int:
    out = Path(__file__).resolve().parents[1] / "out"
    out.mkdir(exist_ok=True)
    session = out / f"demo-{MESSAGES}-{STOCKS}-{SEED}.itch"
    if session.exists():
        _step(1, 3, f"session {session.name} already generated")
    else:
        _step(1, 3, f"generating {MESSAGES:,} ITCH 5.0 messages on {STOCKS} stocks (seed {SEED})")
        t0 = time.perf_counter()
        info = itchgen.write_session(str(session), MESSAGES, STOCKS, SEED)
        print(f"      {info['bytes'] / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s "
              f"-> {session.relative_to(out.parent)}")  # fmt: skip
    _step(2, 3, "decoding and building every L3 book (tickwire book)")
    book, result = replay.replay_file(str(session), progress=replay.terminal_progress("book"))
    _step(3, 3, "summary")
    print(replay.summary_text(book, result))
    problem = book.check()
    print("invariants ok" if problem is None else f"INVARIANT BROKEN: {problem}")
    return 0 if problem is None else 1


if __name__ == "__main__":
    sys.exit(main())
