"""Restart without losing the day (issue 18 §3): the consumer is SIGKILLed mid-session
under loss on both lines; ``tickwire run`` fails saying so; started again, it restores the
newest snapshot, replays the journal past it, recovers the rest from the re-request server
and ends with ``tickwire book``'s digest -- each message applied once, the journal whole."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from dataplane.book import Book
from host.appliance import journal
from host.exchange import itchgen
from tests.helpers import free_port, wait_for

N = 120_000


@pytest.mark.lab
@pytest.mark.timeout(1500)
def test_sigkill_then_restart_under_loss_ends_with_the_offline_digest(labcfg, tmp_path):
    from tests.labnet import Appliance, SimProcess, write_config

    path = tmp_path / "s.itch"
    itchgen.write_session(str(path), N, 40, 23)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    # the restarted consumer asks for everything sent while it was down as one gap: the
    # recovery SLO must cover a restart on a loaded machine (the default 2 s gives it up)
    extra = (
        "recovery_slo_ms = 60000\n"
        f'[journal]\nenabled = true\ndir = "{tmp_path / "j"}"\n'
        f'[snapshot]\nenabled = true\ndir = "{tmp_path / "s"}"\ninterval_s = 0.5\n'
    )
    channel = f"trst{os.getpid()}"
    first = Appliance(labcfg, tmp_path, "socket", run_extra=extra, channel=channel)
    second = sim = None
    try:
        sim = SimProcess(
            write_config(labcfg, tmp_path / "sim.toml"),
            *("--session", str(path), "--rate", "20000", "--eos-for", "120"),
            *("--fault", "A:loss=0.01", "--fault", "B:loss=0.01"),
        )
        c = first.wait_taken(N // 3, timeout=120)
        snaps = list((tmp_path / "s" / channel).rglob("*.twsnap.npz"))
        assert snaps, "no timed snapshot before the kill"
        os.kill(c["pid"], signal.SIGKILL)
        _, err = first.proc.communicate(timeout=120)
        assert first.proc.returncode == 1 and "killed by signal 9 (SIGKILL)" in err
        second = Appliance(labcfg, tmp_path, "socket", run_extra=extra, channel=channel)
        summary = second.finish(timeout=600)
        sim.finish(terminate=True)
    finally:
        if sim is not None:
            sim.kill()
        for app in (second, first):
            if app is not None:
                app.kill()
    st = summary["start"]
    assert st["began"] == "restored", st
    r = st["restored"]
    assert r["snapshot_seq"] is not None and r["seq"] >= r["snapshot_seq"] >= 1
    assert st["seq"] == r["seq"] >= N // 3 - 1 and not r["holes"]
    assert summary["unrecoverable_messages"] == 0, summary["recovery"]
    assert not summary["stale"], summary
    assert summary["digest"] == ref.digest()
    assert summary["next_seq"] == N + 1
    # what the restarted consumer took is exactly the rest: no message applied twice
    assert summary["taken"] == N
    j = summary["journal"]
    assert j["last_seq"] == N and not j["holes"] and j["already"] == 0
    (jd,) = (tmp_path / "j" / channel).iterdir()
    seqs = [r[0] for r in journal.Reader(jd).records() if not isinstance(r, journal.Hole)]
    assert seqs == list(range(1, N + 1))


def _glimpse_lab(labcfg):
    """The lab's config with the simulator's snapshot service on a free port."""
    return dataclasses.replace(
        labcfg, lab=dataclasses.replace(labcfg.lab, glimpse_port=free_port())
    )


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("late") / "s.itch"
    itchgen.write_session(str(path), N, 40, 29)
    ref = Book()
    ref.feed(np.fromfile(path, np.uint8))
    return path, ref.digest()


@pytest.mark.lab
@pytest.mark.timeout(900)
def test_an_appliance_started_at_half_the_session_joins_by_the_spin_and_ends_exact(
    labcfg, session, tmp_path
):
    """Late join: the simulator publishes with its snapshot service; once the service's
    spin is past half the session (asked by the test itself), ``tickwire run --lab``
    starts: it logs in, builds its books from the spin, takes the multicast from the
    snapshot's sequence (what arrived meanwhile waited in its receive rings) and ends
    with ``tickwire book``'s digest. The run's summary says where it joined and how long
    the join took."""
    from tests.labnet import Appliance, SimProcess, write_config

    path, digest = session
    cfg = _glimpse_lab(labcfg)
    lab = cfg.lab
    sim = app = None
    try:
        sim = SimProcess(
            write_config(cfg, tmp_path / "sim.toml"),
            *("--session", str(path), "--rate", "5000", "--eos-for", "120"),
        )

        probe = (
            "import sys\nfrom host.appliance import glimpse\n"
            "try:\n"
            f"    s = glimpse.fetch({lab.line_a.exchange_ip!r}, {lab.glimpse_port}, "
            f"{lab.glimpse_user!r}, {lab.glimpse_password!r}, timeout=10)\n"
            "except glimpse.GlimpseError as e:\n"
            "    sys.exit(str(e))\n"
            "print(s.seq)\n"
        )

        def past_half():  # the spin's sequence, asked from the appliance's namespace
            p = subprocess.run(
                ["ip", "netns", "exec", lab.appliance_ns, sys.executable, "-c", probe],
                capture_output=True,
                text=True,
                timeout=60,
            )
            seq = int(p.stdout) if p.returncode == 0 else 0  # not listening yet: 0
            return seq if seq >= N // 2 else None

        seq = wait_for(past_half, 120, "the spin past half the session")
        assert seq < N, "the session ended before the appliance started"
        app = Appliance(cfg, tmp_path, "xdp")
        summary = app.finish(timeout=600)
        sim.finish(terminate=True)
    finally:
        if sim is not None:
            sim.kill()
        if app is not None:
            app.kill()
    st = summary["start"]
    assert st["began"] == "joined", st
    assert N // 2 <= st["seq"] < N and st["join"]["attempts"] == 1 and not st["join"]["errors"]
    assert summary["unrecoverable_messages"] == 0 and not summary["stale"], summary
    assert summary["digest"] == digest
    assert summary["next_seq"] == N + 1
    assert summary["taken"] == N - st["seq"]  # only what followed the snapshot, each once


@pytest.mark.lab
@pytest.mark.timeout(900)
def test_a_refused_login_and_a_drop_mid_spin_are_retried_and_show_stale_until_joined(
    labcfg, session, tmp_path
):
    """The service refuses the first two logins, then drops the first spin it starts:
    the consumer says each, tries again with a backoff, and while it does its books are
    stale in ``tickwire status`` (joining) and the metrics; the fourth login's spin is
    taken and the books end exact."""
    from host.appliance import status
    from tests.labnet import Appliance, SimProcess, write_config

    path, digest = session
    cfg = _glimpse_lab(labcfg)
    sim = app = None
    try:
        sim = SimProcess(
            write_config(cfg, tmp_path / "sim.toml"),
            *("--session", str(path), "--rate", "10000", "--eos-for", "120"),
            *("--glimpse-refuse", "2", "--glimpse-drop-after", "20"),
        )
        wait_for(lambda: _listening(cfg.lab), 60, "the snapshot service listening")
        app = Appliance(cfg, tmp_path, "socket", wait=False)

        def joining():
            try:
                st = status.collect(app.channel)
            except FileNotFoundError:
                return None
            c = st.get("consumer") or {}
            return st if c.get("began") == "joining" and c.get("join_tries", 0) >= 2 else None

        seen = wait_for(joining, 120, "the consumer retrying the snapshot service")
        assert seen["consumer"]["stale"] and not seen["consumer"]["running"]
        text = status.text(seen)
        assert "BOOKS STALE: joining by the snapshot service, try" in text, text
        assert "(last try: " in text, text
        metrics = app.scrape()
        assert _metric(metrics, "tickwire_books_stale", app.channel) == 1
        assert _metric(metrics, "tickwire_consumer_joining", app.channel) == 1
        app.wait_running()
        summary = app.finish(timeout=600)
        sim.finish(terminate=True)
    finally:
        if sim is not None:
            sim.kill()
        if app is not None:
            app.kill()
    st = summary["start"]
    assert st["began"] == "joined" and st["join"]["attempts"] == 4, st["join"]
    errors = st["join"]["errors"]
    assert len(errors) == 3 and "session not available" in errors[0], errors
    assert "before the snapshot message" in errors[2], errors
    assert summary["unrecoverable_messages"] == 0 and not summary["stale"], summary
    assert summary["digest"] == digest


def _metric(text: str, name: str, channel: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{channel="{channel}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {channel} not in the metrics")


def _listening(lab) -> bool:
    """The snapshot service accepts connections (a connection without a login is not
    one of the logins its faults count)."""
    import socket

    from host import netns

    try:
        with netns.entered(lab.appliance_ns):
            socket.create_connection((lab.line_a.exchange_ip, lab.glimpse_port), 5).close()
    except OSError:
        return False
    return True
