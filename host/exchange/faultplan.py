"""The simulator's fault plan (``tickwire sim --fault``, ``--faults plan.toml``): per-line
faults on whole packets, parsed and validated once, applied by the publisher's schedule.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

LINES = ("A", "B")


class SimError(ValueError):
    """A session, pacing or fault plan the simulator cannot use."""


# --- fault plan ---------------------------------------------------------------------------
FAULT_KINDS = {
    "drop": "drop=FIRST-LAST: drop every packet carrying a sequence in FIRST..LAST",
    "loss": "loss=P: drop each packet with probability P",
    "cut": "cut=MS@T: send nothing (data or heartbeats) for MS ms from T ms after start",
    "dup": "dup=FIRST-LAST or dup=P: send packets twice (a range, or with probability P)",
    "reorder": "reorder=W[@P]: with probability P (0.05) move a packet up to W-1 later",
    "delay": "delay=MS: send this line MS ms after its nominal time",
}


@dataclass(frozen=True)
class Fault:
    line: str  # "A" or "B"
    kind: str
    first: int = 0
    last: int = 0
    prob: float = 0.0
    window: int = 0
    ms: float = 0.0
    at_ms: float = 0.0
    spec: str = ""


def _range(text: str, spec: str) -> tuple[int, int]:
    a, sep, b = text.partition("-")
    try:
        first, last = int(a), int(b if sep else a)
    except ValueError:
        raise SimError(f"fault {spec!r}: expected a sequence range like 100-199") from None
    if first < 1 or last < first:
        raise SimError(f"fault {spec!r}: sequence range must be 1 <= FIRST <= LAST")
    return first, last


def _prob(text: str, spec: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise SimError(f"fault {spec!r}: expected a probability, got {text!r}") from None
    if not 0.0 <= p <= 1.0:
        raise SimError(f"fault {spec!r}: probability must be within 0..1")
    return p


def _ms(text: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise SimError(f"fault {spec!r}: expected milliseconds, got {text!r}") from None
    if v < 0:
        raise SimError(f"fault {spec!r}: milliseconds must not be negative")
    return v


def parse_fault(spec: str) -> list[Fault]:
    """``LINE:KIND=ARGS`` with LINE ``A``, ``B`` or ``AB``; see ``FAULT_KINDS``."""
    where, sep, rest = spec.partition(":")
    kind, eq, arg = rest.partition("=")
    lines = where.strip().upper()
    if not sep or not eq or lines not in ("A", "B", "AB") or kind not in FAULT_KINDS:
        raise SimError(f"fault {spec!r}: expected LINE:KIND=ARGS, LINE A, B or AB, KIND one of "
                       f"{', '.join(FAULT_KINDS)}")  # fmt: skip
    kw: dict = {}
    if kind == "drop":
        kw["first"], kw["last"] = _range(arg, spec)
    elif kind == "loss":
        kw["prob"] = _prob(arg, spec)
    elif kind == "cut":
        dur, at, when = arg.partition("@")
        if not at:
            raise SimError(f"fault {spec!r}: expected cut=MS@T")
        kw["ms"], kw["at_ms"] = _ms(dur, spec), _ms(when, spec)
    elif kind == "dup":
        if "-" in arg or arg.isdigit():
            kw["first"], kw["last"] = _range(arg, spec)
        else:
            kw["prob"] = _prob(arg, spec)
    elif kind == "reorder":
        w, at, p = arg.partition("@")
        try:
            kw["window"] = int(w)
        except ValueError:
            raise SimError(f"fault {spec!r}: expected reorder=W[@P]") from None
        if kw["window"] < 2:
            raise SimError(f"fault {spec!r}: the reorder window must be at least 2 packets")
        kw["prob"] = _prob(p, spec) if at else 0.05
    elif kind == "delay":
        kw["ms"] = _ms(arg, spec)
    return [Fault(line=ln, kind=kind, spec=spec, **kw) for ln in lines]


def load_faults(path: str) -> tuple[list[Fault], int | None]:
    """A fault file: TOML with ``faults = ["A:drop=10-20", ...]`` and optional ``seed``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SimError(f"{path}: no such fault plan") from None
    except tomllib.TOMLDecodeError as e:
        raise SimError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - {"faults", "seed"}
    if unknown:
        raise SimError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: faults, seed)")
    specs = data.get("faults", [])
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise SimError(f"{path}: faults must be a list of strings like \"A:drop=10-20\"")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SimError(f"{path}: seed must be an integer")
    return [f for s in specs for f in parse_fault(s)], seed


