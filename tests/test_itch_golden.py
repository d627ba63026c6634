"""Golden decoder tests: bytes in (built with struct), expected fields out, every type."""

import struct

import numpy as np
import pytest

from dataplane import itch
from tests.itchbytes import alpha, framed, header

pytestmark = pytest.mark.golden

TS = 0x0000_3F12_3456_789A  # 6-byte timestamp with every byte distinct
H = dict(locate=65535, tracking=513, ts=TS)
COMMON = {"locate": 65535, "tracking": 513, "timestamp": TS}
BIG_REF = 2**32 + 12345  # order references exceed 2^32
BIG_PX = 3_000_000_000  # Price(4) of a $300,000 stock exceeds 2^31

CASES = [
    ("S", header("S", **H) + b"Q", {"event_code": "Q"}),
    (
        "R",
        header("R", **H)
        + alpha("BRK A")
        + b"NN"
        + struct.pack(">I", 100)
        + b"NC"
        + b"Z "
        + b"PNN1N"
        + struct.pack(">I", 3)
        + b"Y",
        {
            "stock": "BRK A   ",
            "market_category": "N",
            "financial_status": "N",
            "round_lot_size": 100,
            "round_lots_only": "N",
            "issue_classification": "C",
            "issue_subtype": 0x5A20,
            "authenticity": "P",
            "short_sale_threshold": "N",
            "ipo_flag": "N",
            "luld_tier": "1",
            "etp_flag": "N",
            "etp_leverage": 3,
            "inverse": "Y",
        },
    ),
    (
        "H",
        header("H", **H) + alpha("AAPL") + b"H" + b" " + b"LUDP",
        {
            "stock": "AAPL    ",
            "trading_state": "H",
            "reserved": " ",
            "reason": int.from_bytes(b"LUDP", "big"),
        },
    ),
    ("Y", header("Y", **H) + alpha("AAPL") + b"1", {"stock": "AAPL    ", "reg_sho_action": "1"}),
    (
        "L",
        header("L", **H) + b"GSCO" + alpha("MSFT") + b"YNA",
        {
            "attribution": "GSCO",
            "stock": "MSFT    ",
            "primary_mm": "Y",
            "mm_mode": "N",
            "participant_state": "A",
        },
    ),
    (
        "V",
        header("V", **H) + struct.pack(">QQQ", 2**40 + 1, 2**41 + 2, 2**42 + 3),
        {"level1": 2**40 + 1, "level2": 2**41 + 2, "level3": 2**42 + 3},
    ),
    ("W", header("W", **H) + b"2", {"breached_level": "2"}),
    (
        "K",
        header("K", **H) + alpha("IPOX") + struct.pack(">IcI", 34200, b"A", 250000),
        {"stock": "IPOX    ", "release_time": 34200, "release_qualifier": "A", "price": 250000},
    ),
    (
        "J",
        header("J", **H) + alpha("AAPL") + struct.pack(">IIII", 1500000, 1650000, 1350000, 2),
        {
            "stock": "AAPL    ",
            "price": 1500000,
            "upper_price": 1650000,
            "lower_price": 1350000,
            "extension": 2,
        },
    ),
    (
        "h",
        header("h", **H) + alpha("AAPL") + b"QH",
        {"stock": "AAPL    ", "market_code": "Q", "halt_action": "H"},
    ),
    (
        "A",
        header("A", **H) + struct.pack(">QcI8sI", BIG_REF, b"S", 70000, alpha("BRK A"), BIG_PX),
        {"order_ref": BIG_REF, "side": "S", "shares": 70000, "stock": "BRK A   ", "price": BIG_PX},
    ),
    (
        "F",
        header("F", **H)
        + struct.pack(">QcI8sI4s", BIG_REF, b"B", 100, alpha("AAPL"), 1234500, b"GSCO"),
        {
            "order_ref": BIG_REF,
            "side": "B",
            "shares": 100,
            "stock": "AAPL    ",
            "price": 1234500,
            "attribution": "GSCO",
        },
    ),
    (
        "E",
        header("E", **H) + struct.pack(">QIQ", BIG_REF, 65536, 2**50 + 7),
        {"order_ref": BIG_REF, "shares": 65536, "match": 2**50 + 7},
    ),
    (
        "C",
        header("C", **H) + struct.pack(">QIQcI", BIG_REF, 10, 99, b"N", BIG_PX),
        {"order_ref": BIG_REF, "shares": 10, "match": 99, "printable": "N", "price": BIG_PX},
    ),
    (
        "X",
        header("X", **H) + struct.pack(">QI", BIG_REF, 4_000_000_000),
        {"order_ref": BIG_REF, "shares": 4_000_000_000},
    ),
    ("D", header("D", **H) + struct.pack(">Q", 2**64 - 1), {"order_ref": 2**64 - 1}),
    (
        "U",
        header("U", **H) + struct.pack(">QQII", BIG_REF, BIG_REF + 1, 300, 2_500_000_000),
        {"order_ref": BIG_REF, "new_order_ref": BIG_REF + 1, "shares": 300, "price": 2_500_000_000},
    ),
    (
        "P",
        header("P", **H) + struct.pack(">QcI8sIQ", 0, b"B", 100, alpha("AAPL"), 1234500, 77),
        {
            "order_ref": 0,
            "side": "B",
            "shares": 100,
            "stock": "AAPL    ",
            "price": 1234500,
            "match": 77,
        },
    ),
    (
        "Q",
        header("Q", **H) + struct.pack(">Q8sIQc", 2**33, alpha("AAPL"), 1234500, 78, b"C"),
        {"shares": 2**33, "stock": "AAPL    ", "price": 1234500, "match": 78, "cross_type": "C"},
    ),
    ("B", header("B", **H) + struct.pack(">Q", 79), {"match": 79}),
    (
        "I",
        header("I", **H)
        + struct.pack(
            ">QQc8sIIIcc", 5000, 2**35, b"B", alpha("AAPL"), 1230000, 1231000, 1232000, b"O", b"L"
        ),
        {
            "paired_shares": 5000,
            "imbalance_shares": 2**35,
            "imbalance_direction": "B",
            "stock": "AAPL    ",
            "far_price": 1230000,
            "near_price": 1231000,
            "price": 1232000,
            "cross_type": "O",
            "variation": "L",
        },
    ),
    ("N", header("N", **H) + alpha("AAPL") + b"A", {"stock": "AAPL    ", "interest_flag": "A"}),
    (
        "O",
        header("O", **H)
        + alpha("DLCR")
        + struct.pack(">cIIIQII", b"Y", 100000, 200000, 150000, 2**36, 90000, 210000),
        {
            "stock": "DLCR    ",
            "open_eligibility": "Y",
            "price": 100000,
            "upper_price": 200000,
            "near_price": 150000,
            "near_time": 2**36,
            "lower_price": 90000,
            "extension": 210000,
        },
    ),
]


def test_cases_cover_every_spec_type():
    assert sorted(t for t, _, _ in CASES) == sorted(itch.MSG_LENGTHS)


@pytest.mark.parametrize("t,msg,fields", CASES, ids=[c[0] for c in CASES])
def test_golden(t, msg, fields):
    assert len(msg) == itch.MSG_LENGTHS[t]
    counters = itch.new_counters()
    (got,) = itch.decode(framed(msg), counters)
    assert got == {"type": t, **COMMON, **fields}
    assert counters[ord(t)] == 1 and counters[itch.C_MESSAGES] == 1


def test_stream_of_all_types_keeps_order():
    data = framed(*(m for _, m, _ in CASES))
    got = itch.decode(data)
    assert [g["type"] for g in got] == [t for t, _, _ in CASES]


@pytest.mark.parametrize("t,msg,fields", CASES, ids=[c[0] for c in CASES])
def test_wrong_length_is_counted_and_skipped(t, msg, fields):
    good = header("D", 1) + struct.pack(">Q", 5)
    counters = itch.new_counters()
    got = itch.decode(framed(msg[:-1], msg + b"\0", good), counters)
    assert [g["type"] for g in got] == ["D"]
    assert counters[itch.C_BAD_LENGTH] == 2
    assert counters[itch.C_MESSAGES] == 3


def test_unknown_type_and_empty_message_are_counted_and_skipped():
    good = header("D", 1) + struct.pack(">Q", 5)
    counters = itch.new_counters()
    got = itch.decode(framed(b"Z" + b"\0" * 20, b"", good), counters)
    assert [g["order_ref"] for g in got] == [5]
    assert counters[itch.C_UNKNOWN_TYPE] == 1
    assert counters[itch.C_BAD_LENGTH] == 1


@pytest.mark.parametrize("cut", [1, 2, 3, 20])
def test_truncation_reports_the_offset_of_the_broken_message(cut):
    first = framed(header("D", 1) + struct.pack(">Q", 5))
    second = framed(header("D", 1) + struct.pack(">Q", 6))
    data = first + second[: len(second) - cut]
    with pytest.raises(itch.TruncatedInput) as e:
        itch.decode(data)
    assert e.value.offset == len(first)
    assert f"byte offset {len(first)}" in str(e.value)


def test_random_garbage_never_crashes_and_is_fully_accounted():
    rng = np.random.default_rng(7)
    for _ in range(200):
        data = rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8)
        counters = itch.new_counters()
        out = np.zeros(len(data) + 1, itch.RECORD)
        status, pos, n = itch.decode_stream(data, 0, len(data), out, counters)
        assert status in (itch.OK, itch.TRUNCATED)
        assert 0 <= pos <= len(data)
        valid = int(counters[:256].sum())
        assert valid == n
        assert (
            counters[itch.C_MESSAGES]
            == valid + counters[itch.C_UNKNOWN_TYPE] + counters[itch.C_BAD_LENGTH]
        )
