"""The ``tickwire`` command: one entry point, a verb per job. Each room declares its verbs
beside its code (``add_parsers`` in ``host/appliance/cli.py``, ``host/exchange/cli.py``,
``host/bench/cli.py``); this module lists the rooms and runs the verb.

Errors raised by the project (``ValueError``/``OSError`` subclasses) become one line on
stderr and a non-zero exit; ``--help`` works on every verb and sub-verb, with examples.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  tickwire lab up && tickwire run --lab          the appliance in the lab, on its lines
  tickwire sim --session s.itch                  publish a session on lines A and B
  tickwire book s.itch                           decode a file into books, offline
  tickwire VERB --help                           each verb's options and examples
"""


def positive(text: str) -> int:
    """An argparse type: a whole number above zero (``1_000`` allowed)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def verb(sub, name: str, text: str, epilog: str) -> argparse.ArgumentParser:
    """A verb (or sub-verb) on ``sub``, its help ending in ``epilog``'s examples."""
    return sub.add_parser(
        name,
        help=text,
        description=text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    from host.appliance import cli as appliance
    from host.bench import cli as bench
    from host.exchange import cli as exchange
    from host.image import cli as image

    p = argparse.ArgumentParser(
        prog="tickwire",
        description="Tickwire: ITCH 5.0 / MoldUDP64 feed handler with L3 books.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    appliance.add_parsers(sub)  # book, run, warm, preflight, status, calibrate
    exchange.add_parsers(sub)  # gen, lab, sim
    bench.add_parsers(sub)  # bench
    image.add_parsers(sub)  # image build|boot|config
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
