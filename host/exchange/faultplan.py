"""The fault grammar of the simulator (``tickwire sim --fault``, ``--faults plan.toml``)
and of the wire (``tickwire lab fault``): per-line faults on whole packets, parsed and
validated once, here. The publisher's schedule applies the simulator's; the wire's go to
the BPF program through ``host.exchange.wirefaults``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

LINES = ("A", "B")


class SimError(ValueError):
    """A session, pacing or fault plan the simulator cannot use."""


# --- the fault grammar ----------------------------------------------------------------------
# One grammar for the simulator's faults (``tickwire sim --fault``, fault files) and the
# wire's (``tickwire lab fault``, host.exchange.wirefaults): ``[LINE:]KIND=ARGS``, LINE one
# of A, B, AB. A spelling means the same in both; a kind one of them cannot do is refused
# with an error that says where it works.
SIM, WIRE = "sim", "wire"
TARGETS = {SIM: "the simulator (tickwire sim --fault)", WIRE: "the wire (tickwire lab fault)"}
FAULT_KINDS = {
    "drop": "drop=FIRST-LAST (or drop=N): drop every data packet carrying a sequence in "
    "FIRST..LAST; drop=all: every packet, heartbeats too (wire only)",
    "loss": "loss=P (0.01) or loss=P% (1%): drop each data packet with probability P",
    "cut": "cut=MS@T: send nothing, heartbeats included, for MS ms from T ms on -- after the "
    "simulator starts (T required), or after the command (wire; T defaults to 0)",
    "dup": "dup=FIRST-LAST or dup=P: send packets twice (a range, or with probability P)",
    "reorder": "reorder=W[@P]: with probability P (0.05) move a packet up to W-1 later",
    "delay": "delay=MS: send this line MS ms after its nominal time",
}
KINDS = {
    SIM: ("drop", "loss", "cut", "dup", "reorder", "delay"),
    WIRE: ("drop", "drop_all", "loss", "cut"),
}


class FaultSpecError(ValueError):
    """A fault spec that does not parse, or that its target cannot do; the message names
    the spec."""


@dataclass(frozen=True)
class Fault:
    line: str  # "A" or "B"
    kind: str  # drop, drop_all, loss, cut, dup, reorder, delay
    first: int = 0
    last: int = 0
    prob: float = 0.0
    window: int = 0
    ms: float = 0.0
    at_ms: float = 0.0
    spec: str = ""


def _fail(spec: str, why: str) -> FaultSpecError:
    return FaultSpecError(f"fault {spec!r}: {why}")


# The checks of each value, shared by the parsers below and by the Python API of the wire
# faults (WireFaults.cut, .drop_range, .loss); ``spec`` names the fault in the error.
def check_range(first: int, last: int, spec: str) -> tuple[int, int]:
    if not 1 <= first <= last < 1 << 64:
        raise _fail(spec, "a sequence range must be 1 <= FIRST <= LAST")
    return first, last


def check_prob(p: float, spec: str) -> float:
    if not 0.0 <= p <= 1.0:
        raise _fail(spec, "a probability must be within 0..1 (0%..100%)")
    return p


def check_ms(v: float, spec: str) -> float:
    if not v >= 0:  # NaN too
        raise _fail(spec, "milliseconds must not be negative")
    return v


def check_cut(ms: float, at_ms: float, spec: str) -> tuple[float, float]:
    if not ms > 0:
        raise _fail(spec, "a cut lasts more than 0 ms")
    return ms, check_ms(at_ms, spec)


def parse_range(text: str, spec: str) -> tuple[int, int]:
    """``FIRST-LAST`` or ``N``: sequence numbers, 1 <= FIRST <= LAST < 2^64."""
    a, sep, b = text.strip().partition("-")
    try:
        first, last = int(a), int(b if sep else a)
    except ValueError:
        raise _fail(spec, "expected a sequence range like 100-199") from None
    return check_range(first, last, spec)


def parse_prob(text: str, spec: str) -> float:
    """``0.01`` or ``1%``: a probability within 0..1."""
    t = text.strip()
    try:
        p = float(t.removesuffix("%")) / (100 if t.endswith("%") else 1)
    except ValueError:
        raise _fail(spec, f"expected a probability (0.01 or 1%), got {text!r}") from None
    return check_prob(p, spec)


def parse_ms(text: str, spec: str) -> float:
    """Milliseconds, not negative."""
    try:
        v = float(text)
    except ValueError:
        raise _fail(spec, f"expected milliseconds, got {text!r}") from None
    return check_ms(v, spec)


def parse_cut(text: str, spec: str, target: str = SIM) -> tuple[float, float]:
    """``MS@T`` (``MS``: T = 0, on the wire only): (ms, at_ms), MS > 0."""
    dur, at, when = text.partition("@")
    if not at and target == SIM:
        raise _fail(
            spec,
            "the simulator's cut is relative to its start: give the time, "
            f"cut={dur}@T (T ms after the simulator starts)",
        )
    return check_cut(parse_ms(dur, spec), parse_ms(when, spec) if at else 0.0, spec)


def _args(kind: str, arg: str, spec: str, target: str) -> tuple[str, dict]:
    """(kind, the Fault fields of ARGS), the kind refined (``drop=all``)."""
    kw: dict = {}
    if kind == "drop" and arg.strip().lower() == "all":
        kind = "drop_all"
    elif kind == "drop":
        kw["first"], kw["last"] = parse_range(arg, spec)
    elif kind == "loss":
        kw["prob"] = parse_prob(arg, spec)
    elif kind == "cut":
        kw["ms"], kw["at_ms"] = parse_cut(arg, spec, target)
    elif kind == "dup":
        if "-" in arg or arg.strip().isdigit():
            kw["first"], kw["last"] = parse_range(arg, spec)
        else:
            kw["prob"] = parse_prob(arg, spec)
    elif kind == "reorder":
        w, at, p = arg.partition("@")
        try:
            kw["window"] = int(w)
        except ValueError:
            raise _fail(spec, "expected reorder=W[@P]") from None
        if kw["window"] < 2:
            raise _fail(spec, "the reorder window must be at least 2 packets")
        kw["prob"] = parse_prob(p, spec) if at else 0.05
    elif kind == "delay":
        kw["ms"] = parse_ms(arg, spec)
    if kind not in KINDS[target]:
        other = WIRE if target == SIM else SIM
        alt = (
            "; the simulator silences a line with cut=MS@T"
            if kind == "drop_all"
            else "; the wire only drops packets: it cannot duplicate, reorder or delay them"
        )
        raise _fail(
            spec,
            f"{'drop=all' if kind == 'drop_all' else kind} is a fault of "
            f"{TARGETS[other]}, not of {TARGETS[target]}{alt}",
        )
    return kind, kw


def parse_fault(spec: str, target: str = SIM, lines: str | None = None) -> list[Fault]:
    """``[LINE:]KIND=ARGS`` as one Fault per line; LINE is A, B or AB, and may be left out
    when ``lines`` gives the default. ``target``: SIM or WIRE (see ``FAULT_KINDS``, and
    ``KINDS`` for what each can do)."""
    if target not in TARGETS:
        raise ValueError(f"fault target {target!r}: expected {SIM!r} or {WIRE!r}")
    form = "LINE:KIND=ARGS" if lines is None else "[LINE:]KIND=ARGS"
    where, sep, rest = spec.partition(":") if ":" in spec else ("", "", spec)
    kind, eq, arg = rest.partition("=")
    kind = kind.strip().lower()
    letters = where.strip().upper() if sep else (lines or "").upper()
    if letters == "BA":
        letters = "AB"
    if not eq or letters not in ("A", "B", "AB") or kind not in FAULT_KINDS:
        raise _fail(
            spec,
            f"expected {form}, LINE A, B or AB, KIND one of "
            f"{', '.join(k for k in FAULT_KINDS if k in KINDS[target])}",
        )
    kind, kw = _args(kind, arg, spec, target)
    return [Fault(line=ln, kind=kind, spec=spec, **kw) for ln in letters]


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
        raise SimError(f'{path}: faults must be a list of strings like "A:drop=10-20"')
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SimError(f"{path}: seed must be an integer")
    return [f for s in specs for f in parse_fault(s)], seed
