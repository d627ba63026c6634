"""``tickwire status`` from a consumer's shared memory: what the consumer's counters say."""

from dataplane import shm
from host.appliance import status

S = 1_000_000_000
NOW = 100 * S


def test_status_shows_stale_and_down_lines(tmp_path, monkeypatch):
    """One look at the counters: line A last heard 2 s ago is stale, B 10 s ago down (an
    observer starting at "unknown" showed both "unknown", however long they were silent)."""
    monkeypatch.setattr(shm, "SHM_ROOT", tmp_path)
    m = shm.create("tst")
    c = m["counters"]
    c[shm.L_RX_NS] = NOW - 2 * S
    c[shm.LINE_STRIDE + shm.L_RX_NS] = NOW - 10 * S
    st = status.collect("tst", now_ns=NOW)
    lines = st["consumer"]["lines"]
    assert (lines["A"]["state"], lines["A"]["silence_s"]) == ("stale", 2.0)
    assert (lines["B"]["state"], lines["B"]["silence_s"]) == ("down", 10.0)
    text = status.text(st)
    assert "line A [stale]:" in text and "line B [down]:" in text


def test_status_names_unrecoverable_messages_as_such(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SHM_ROOT", tmp_path)
    m = shm.create("tsu")
    c = m["counters"]
    c[shm.A_GAPS_DECLARED], c[shm.A_GAP_DECLARED_MSGS] = 3, 300
    c[shm.A_UNRECOVERABLE_GAPS], c[shm.A_UNRECOVERABLE_MSGS] = 1, 40
    m["control"][shm.C_STALE] = 1
    text = status.text(status.collect("tsu", now_ns=NOW))
    assert "unrecoverable 40" in text and "gaps declared 3 (300 messages)" in text
    assert "BOOKS STALE: 1 unrecoverable gap(s), 40 messages missing" in text
    assert "line A [unknown]:" in text  # never heard
