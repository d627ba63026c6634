"""One fault grammar (host/exchange/faultplan.py) for the simulator (``tickwire sim
--fault``) and the wire (``tickwire lab fault``, host/exchange/wirefaults.py): every
spelling means the same in both, the wire's options are spellings of the same specs, and a
bad spec is one error that names it. No root, no lab."""

from __future__ import annotations

import argparse

import pytest

from host.exchange import faultplan
from host.exchange import wirefaults as wire
from host.exchange.faultplan import SIM, WIRE, FaultSpecError, parse_fault

SHARED = {  # spec: (kind, the fields that carry its meaning)
    "A:cut=200@1000": ("cut", {"ms": 200.0, "at_ms": 1000.0}),
    "B:cut=0.5@0": ("cut", {"ms": 0.5, "at_ms": 0.0}),
    "B:loss=1%": ("loss", {"prob": 0.01}),
    "B:loss=0.01": ("loss", {"prob": 0.01}),
    "A:loss=0": ("loss", {"prob": 0.0}),
    "AB:loss=100%": ("loss", {"prob": 1.0}),
    "AB:drop=100-199": ("drop", {"first": 100, "last": 199}),
    "A:drop=7": ("drop", {"first": 7, "last": 7}),
    "ba:drop=1-18446744073709551615": ("drop", {"first": 1, "last": (1 << 64) - 1}),
}


@pytest.mark.parametrize("spec", SHARED)
def test_a_spelling_means_the_same_in_the_simulator_and_on_the_wire(spec):
    kind, fields = SHARED[spec]
    sim, wire_faults = parse_fault(spec, SIM), parse_fault(spec, WIRE)
    assert sim == wire_faults
    letters = spec.split(":")[0].upper()
    assert [f.line for f in sim] == sorted(letters)
    for f in sim:
        assert f.kind == kind and f.spec == spec
        assert {k: getattr(f, k) for k in fields} == pytest.approx(fields)


def test_percent_and_fraction_are_one_probability():
    for a, b in (
        ("A:loss=1%", "A:loss=0.01"),
        ("A:loss=50%", "A:loss=0.5"),
        ("A:dup=10%", "A:dup=0.1"),
    ):
        assert parse_fault(a)[0].prob == pytest.approx(parse_fault(b)[0].prob)


def _cli(argv: list[str]) -> tuple[str, str | None, dict[str, dict]]:
    """``tickwire lab fault ARGV``'s parse, as host/exchange/cli.py hands it on."""
    p = argparse.ArgumentParser(exit_on_error=False)
    wire.add_cli_arguments(p)
    a = p.parse_args(argv)
    return wire.cli_faults(
        a.fault_args, cut=a.cut, drop_range=a.drop_range, loss=a.loss, drop_all=a.drop_all
    )


@pytest.mark.parametrize(
    ("options", "specs", "want"),
    [
        (["A", "--cut", "200"], ["A:cut=200"], {"A": {"cut": (200.0, 0.0)}}),
        (["B", "--cut", "100@500"], ["B:cut=100@500"], {"B": {"cut": (100.0, 500.0)}}),
        (
            ["A", "--drop-range", "1000-1999"],
            ["A:drop=1000-1999"],
            {"A": {"drop_range": (1000, 1999)}},
        ),
        (["AB", "--loss", "0.01"], ["AB:loss=1%"], {"A": {"loss": 0.01}, "B": {"loss": 0.01}}),
        (["A", "--drop-all"], ["A:drop=all"], {"A": {"drop_all": True}}),
        (["--loss", "5%"], ["loss=0.05"], {"A": {"loss": 0.05}, "B": {"loss": 0.05}}),
        (
            ["B", "--cut", "50@60000", "--loss", "0.25"],
            ["B", "cut=50@60000", "loss=25%"],
            {"B": {"cut": (50.0, 60000.0), "loss": 0.25}},
        ),
    ],
)
def test_the_wire_options_are_spellings_of_the_specs(options, specs, want):
    assert _cli(options)[1:] == (None, want)
    assert _cli(specs)[1:] == (None, want)


def test_the_wire_maps_a_spec_to_the_program_configuration():
    cfg = dict.fromkeys(wire.CFG_FIELDS, 0)
    ((letter, kw),) = wire.settings(parse_fault("A:loss=1%", WIRE)).items()
    new = wire._fault_fields(cfg, **kw)
    assert letter == "A" and new["loss_threshold"] == round(0.01 * (1 << 32))
    assert new["flags"] == wire.FF_LOSS
    ((_, kw),) = wire.settings(parse_fault("B:drop=5-9", WIRE)).items()
    new = wire._fault_fields(cfg, **kw)
    assert (new["seq_first"], new["seq_last"], new["flags"]) == (5, 9, wire.FF_RANGE)


@pytest.mark.parametrize(
    ("spec", "target", "text"),
    [
        ("C:drop=1-2", SIM, "LINE:KIND=ARGS"),
        ("loss=0.1", SIM, "LINE:KIND=ARGS"),  # the simulator has no default line
        ("A:boom=1", WIRE, "[LINE:]KIND=ARGS"),
        ("A:drop", SIM, "KIND=ARGS"),
        ("A:drop=5-1", WIRE, "1 <= FIRST <= LAST"),
        ("A:drop=0-3", SIM, "1 <= FIRST <= LAST"),
        ("A:drop=a-b", WIRE, "sequence range like 100-199"),
        ("A:loss=2", SIM, "within 0..1"),
        ("A:loss=150%", WIRE, "within 0..1"),
        ("A:loss=p", WIRE, "expected a probability"),
        ("A:cut=0@5", WIRE, "more than 0 ms"),
        ("A:cut=10@-1", WIRE, "must not be negative"),
        ("A:cut=x@1", SIM, "expected milliseconds"),
        ("A:cut=100", SIM, "the simulator's cut is relative to its start"),
        ("A:reorder=4", WIRE, "reorder is a fault of the simulator"),
        ("A:dup=0.5", WIRE, "dup is a fault of the simulator"),
        ("B:delay=5", WIRE, "delay is a fault of the simulator"),
        ("A:drop=all", SIM, "drop=all is a fault of the wire"),
        ("A:reorder=1", SIM, "at least 2 packets"),
        ("A:delay=-3", SIM, "must not be negative"),
    ],
)
def test_a_bad_spec_is_one_error_naming_it(spec, target, text):
    with pytest.raises(FaultSpecError) as e:
        parse_fault(spec, target, lines=None if target == SIM else "AB")
    assert str(e.value).startswith(f"fault {spec!r}: ") and "\n" not in str(e.value)
    assert text in str(e.value)


def test_a_bad_option_value_is_the_same_error():
    p = argparse.ArgumentParser(exit_on_error=False)
    wire.add_cli_arguments(p)
    for argv, text in (
        (["--cut", "0"], "fault 'cut=0': a cut lasts more than 0 ms"),
        (["--loss", "1.5"], "fault 'loss=1.5': a probability must be within"),
        (["--drop-range", "9-3"], "fault 'drop=9-3': a sequence range must"),
    ):
        with pytest.raises(argparse.ArgumentError, match=text):
            p.parse_args(argv)


def test_the_python_api_checks_values_with_the_same_rules():
    cfg = dict.fromkeys(wire.CFG_FIELDS, 0)
    for kw, text in (
        ({"loss": 1.5}, "fault 'loss=1.5': a probability"),
        ({"drop_range": (9, 5)}, "fault 'drop=9-5': a sequence range"),
        ({"cut": (0, 0)}, "fault 'cut=0@0': a cut lasts"),
    ):
        with pytest.raises(FaultSpecError, match=text):
            wire._fault_fields(cfg, **kw)


def test_contradictions_on_the_wire_are_refused():
    with pytest.raises(FaultSpecError, match="line A has one loss fault at a time"):
        _cli(["A:loss=1%", "A:loss=2%"])
    with pytest.raises(FaultSpecError, match="'B:loss=1%' is not on line A"):
        _cli(["A", "B:loss=1%"])
    with pytest.raises(FaultSpecError, match="--loss and a fault spec"):
        _cli(["A", "loss=0.2", "--loss", "0.1"])
    with pytest.raises(ValueError, match="takes no fault options"):
        _cli(["clear", "A:loss=1%"])


def test_fault_files_use_the_grammar(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text('faults = ["A:loss=1%", "AB:drop=10-20"]\nseed = 7\n')
    faults, seed = faultplan.load_faults(str(plan))
    assert seed == 7 and [(f.line, f.kind) for f in faults] == [
        ("A", "loss"),
        ("A", "drop"),
        ("B", "drop"),
    ]
    assert faults[0].prob == 0.01
    plan.write_text('faults = ["A:drop=all"]\n')
    with pytest.raises(FaultSpecError, match="'A:drop=all': drop=all is a fault of the wire"):
        faultplan.load_faults(str(plan))
