"""The ``tickwire`` command: one entry point, a verb per job.

Errors raised by the project (``ValueError``/``OSError`` subclasses) become one line on
stderr and a non-zero exit; ``--help`` works on every verb.
"""

from __future__ import annotations

import argparse
import json
import sys

EPILOG_BOOK = """examples:
  tickwire book 01302019.NASDAQ_ITCH50          JSON: messages, rate, digest, per-stock BBO
  tickwire book session.itch --summary           short human summary instead of JSON
"""
EPILOG_GEN = """examples:
  tickwire gen session.itch                      1M messages, 100 stocks, seed 1
  tickwire gen big.itch --messages 5000000 --stocks 9000 --seed 7
"""
EPILOG_BENCH = """examples:
  tickwire bench book                            5M messages on 100 and on 9,000 stocks
  tickwire bench book --messages 1000000 --json
  tickwire bench book --session 01302019.NASDAQ_ITCH50
"""


def _cmd_book(args: argparse.Namespace) -> int:
    from host import replay

    book, result = replay.replay_file(args.file, progress=replay.terminal_progress("book"))
    if args.summary:
        print(replay.summary_text(book, result, top=args.top))
    else:
        json.dump(replay.result_json(book, result), sys.stdout, indent=args.indent)
        print()
    return 0


def _cmd_gen(args: argparse.Namespace) -> int:
    from host import itchgen

    info = itchgen.write_session(args.out, args.messages, args.stocks, args.seed)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {args.out}: {info['messages']:,} messages, {info['bytes']:,} bytes, "
              f"{args.stocks} stocks, seed {args.seed}")  # fmt: skip
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from host import bench

    return bench.main(args)


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _verb(sub, name: str, text: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tickwire",
        description="Tickwire: ITCH 5.0 / MoldUDP64 feed handler with L3 books.",
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    b = _verb(sub, "book", "decode an ITCH 5.0 file into books; print JSON", EPILOG_BOOK)
    b.add_argument("file", metavar="FILE", help="Nasdaq binary ITCH 5.0 file (2-byte lengths)")
    b.add_argument("--summary", action="store_true", help="human summary instead of JSON")
    b.add_argument("--top", type=_positive, default=5, help="symbols in the summary (5)")
    b.add_argument("--indent", type=int, default=None, help="indent the JSON")
    b.set_defaults(func=_cmd_book)

    g = _verb(sub, "gen", "generate a deterministic ITCH 5.0 session file", EPILOG_GEN)
    g.add_argument("out", metavar="OUT", help="file to write")
    g.add_argument("--messages", type=_positive, default=1_000_000, help="messages (1000000)")
    g.add_argument("--stocks", type=_positive, default=100, help="stocks (100)")
    g.add_argument("--seed", type=int, default=1, help="random seed (1)")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=_cmd_gen)

    be = _verb(sub, "bench", "benchmarks, as ratios against a baseline in the same run",
               EPILOG_BENCH)  # fmt: skip
    bsub = be.add_subparsers(dest="what", metavar="WHAT", required=True)
    bb = bsub.add_parser("book", help="decode and decode+book rates against itch-book")
    bb.add_argument("--messages", type=_positive, default=5_000_000, help="per session (5M)")
    bb.add_argument("--stocks", default="100,9000", help="sessions to generate (100,9000)")
    bb.add_argument("--session", metavar="FILE", help="use this ITCH file instead")
    bb.add_argument("--repeat", type=_positive, default=3, help="timed runs, best kept (3)")
    bb.add_argument("--seed", type=int, default=1, help="generator seed (1)")
    bb.add_argument("--json", action="store_true", help="machine-readable output")
    be.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("tickwire: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        print(f"tickwire: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
