"""``tickwire bench``: decode and book (``book``), the publisher (``sim``), the receive
paths (``rx``) and failover (``failover``), each against a baseline measured in the
same run."""

from __future__ import annotations

import json
import os


def main(args) -> int:
    if args.what == "failover":
        from host.bench import failover

        return failover.main(args)
    if args.what == "rx":
        from host.bench import rx

        return rx.main(args)
    if args.what == "sim":
        from host.bench import sim

        r = sim.bench_sim(args)
        print(json.dumps({"bench": "sim", "cpu": os.cpu_count(), "result": r}, indent=2)
              if args.json else sim.sim_text(r))  # fmt: skip
        return 0
    if args.what == "book":
        from host.bench import book

        results = book.bench_book(args)
        if args.json:
            print(json.dumps({"bench": "book", "cpu": os.cpu_count(), "results": results},
                             indent=2))  # fmt: skip
        return 0
    raise ValueError(f"unknown benchmark {args.what!r}")
