"""``tickwire run`` end to end in a private lab: the simulator publishes a generated session
on both lines, the appliance receives it (AF_XDP, or kernel sockets) and its books end
exactly where ``tickwire book`` ends on the same file."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dataplane import shm
from dataplane.book import Book
from host import netns
from host.exchange import itchgen
from tests.labnet import Appliance, built, private_lab, run_session, run_sim, write_config

N_MSGS = 60_000
# [run] lines of a host that is not the lab (no such interfaces here either)
HOST_LINES = (
    '[run.line_a]\ninterface = "nope0"\ngroup = "239.1.1.1"\nport = 26477\n'
    '[run.line_b]\ninterface = "nope1"\ngroup = "239.1.1.2"\nport = 26477\n'
)
# the AF_XDP receive path: an XDP program on the lab's links and AF_XDP sockets
MODES = ["socket", pytest.param("xdp", marks=pytest.mark.needs("xdp", "afxdp"))]


@pytest.fixture(scope="module")
def session_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sessions") / "s.itch"
    itchgen.write_session(str(path), N_MSGS, 60, 31)
    book = Book()
    book.feed(np.fromfile(path, np.uint8))
    return path, book.digest()


def _sim_cfg(cfg, tmp_path) -> str:
    return write_config(cfg, tmp_path / "sim.toml")


def _run_session(cfg, tmp_path, path, mode: str, **kw) -> dict:
    """One run in ``mode`` (``Appliance`` keywords ``kw``) of the session at ``path``,
    published once at 400k msg/s with no re-requests; returns the run's summary."""
    return run_session(
        cfg,
        tmp_path,
        mode,
        "--session",
        str(path),
        "--rate",
        "400000",
        "--eos-for",
        "1",
        "--no-rerequest",
        **kw,
    )[0]


@pytest.mark.lab
@pytest.mark.parametrize("mode", MODES)
def test_books_end_with_the_offline_digest(labcfg, session_file, tmp_path, mode):
    path, digest = session_file
    s = _run_session(labcfg, tmp_path, path, mode)
    assert s["mode"] == mode
    assert s["taken"] == N_MSGS and s["next_seq"] == N_MSGS + 1 and s["unrecoverable_messages"] == 0
    assert s["digest"] == digest and s["check"] is None
    for letter in "AB":  # both lines delivered everything; each sequence taken once
        assert s["lines"][letter]["messages"] == N_MSGS
    assert s["lines"]["A"]["first"] + s["lines"]["B"]["first"] == N_MSGS
    assert s["lines"]["A"]["duplicates"] + s["lines"]["B"]["duplicates"] == N_MSGS
    assert s["latency_ns"]["count"] > 0


# what Ansible's tickwire unit grants (AmbientCapabilities=), plus CAP_SYS_ADMIN to enter the
# lab's namespace (a host's feed interfaces are in the service's own)
UNIT_CAPS = "+bpf,+net_admin,+net_raw,+ipc_lock,+sys_nice,+perfmon,+sys_admin"
NOBODY = 65534


@pytest.mark.lab
@pytest.mark.needs("setpriv")
@pytest.mark.parametrize("mode", MODES)
def test_runs_unprivileged_with_the_units_capabilities(labcfg, session_file, tmp_path, mode):
    """The provisioned service runs as its own user with six capabilities, not as root: the
    same run, as ``nobody`` with exactly those, ends with the offline digest."""
    path, digest = session_file
    # pytest's tmp_path sits under a root-only directory: the run's config and numba cache
    # go where nobody can reach them, as /etc/tickwire and /var/cache/tickwire are
    work = Path(tempfile.mkdtemp(prefix="twcaps"))
    work.chmod(0o755)
    cache = work / "numba"
    cache.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    wrap = (
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        f"--inh-caps={UNIT_CAPS}",
        f"--ambient-caps={UNIT_CAPS}",
        f"--bounding-set=-all,{UNIT_CAPS}",
        "env",
        f"HOME={cache}",
        f"NUMBA_CACHE_DIR={cache}",
    )
    runs = []
    try:
        # the first run finds the service's cache empty and compiles the consumer; the
        # second, a restart, loads it from what the first left there
        for _ in range(2):
            app = Appliance(labcfg, work, mode, wrap=wrap, owner=NOBODY)
            runs.append(app)
            run_sim(
                _sim_cfg(labcfg, tmp_path),
                "--session",
                str(path),
                "--rate",
                "400000",
                "--eos-for",
                "1",
                "--no-rerequest",
            )
            s = app.finish()
            assert shm.channel_dir(app.channel).stat().st_uid == NOBODY
            assert s["mode"] == mode and s["taken"] == N_MSGS and s["digest"] == digest
            app.summary = s
    finally:
        for app in runs:
            app.kill()
        shutil.rmtree(work)
    cold, warm = (app.summary["start"] for app in runs)
    assert cold["how"] == "compiled" and warm["how"] == "cache", (cold, warm)
    assert "(compiled)" in runs[0].stderr and "(from numba's cache)" in runs[1].stderr


@pytest.mark.lab
@pytest.mark.parametrize("mode", MODES)
def test_duplicates_never_reach_the_book_twice(labcfg, session_file, tmp_path, mode):
    path, digest = session_file
    record = tmp_path / "rec.json"
    s, _ = run_session(
        labcfg,
        tmp_path,
        mode,
        "--session",
        str(path),
        "--rate",
        "300000",
        "--fault",
        "A:dup=0.2",
        "--fault",
        "B:dup=0.3",
        "--seed",
        "4",
        "--record",
        str(record),
        "--eos-for",
        "1",
        "--no-rerequest",
    )
    rec = json.loads(record.read_text())
    sent = {ln: sum(rec["packets"][k][1] for k in rec["lines"][ln]["sent"]) for ln in "AB"}
    assert all(e["fault"] == "dup" for ln in "AB" for e in rec["lines"][ln]["events"])
    assert sent["A"] > N_MSGS and sent["B"] > N_MSGS  # the lines really carried copies
    assert s["digest"] == digest and s["taken"] == N_MSGS
    assert s["lines"]["A"]["messages"] == sent["A"] and s["lines"]["B"]["messages"] == sent["B"]
    dups = s["lines"]["A"]["duplicates"] + s["lines"]["B"]["duplicates"]
    assert dups == sent["A"] + sent["B"] - N_MSGS  # every copy but the first dropped


@pytest.mark.lab
@pytest.mark.parametrize("mode", MODES)
def test_metrics_snapshot_and_status_while_running(labcfg, session_file, tmp_path, mode):
    path, digest = session_file
    app = Appliance(labcfg, tmp_path, mode, until_eos=False)
    try:
        run_sim(
            _sim_cfg(labcfg, tmp_path),
            "--session",
            str(path),
            "--rate",
            "400000",
            "--eos-for",
            "0.3",
            "--no-rerequest",
        )
        c = app.wait_taken(N_MSGS)
        assert app.reader.digest() == digest  # a live snapshot of every level
        with netns.entered(labcfg.lab.appliance_ns):
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{app.port}/metrics", timeout=10)
                .read()
                .decode()
            )
        metrics = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                metrics[name] = float(value)
        ch = app.channel
        assert metrics[f'tickwire_messages_taken_total{{channel="{ch}"}}'] == N_MSGS
        assert metrics[f'tickwire_sequence_next{{channel="{ch}"}}'] == N_MSGS + 1
        for letter in "AB":
            lab_ = f'channel="{ch}",line="{letter}"'
            assert metrics[f"tickwire_line_messages_total{{{lab_}}}"] == N_MSGS
            assert (
                metrics[f"tickwire_line_packets_total{{{lab_}}}"] == c["lines"][letter]["packets"]
            )
        assert metrics[f'tickwire_consumer_up{{channel="{ch}"}}'] == 1
        assert metrics[f'tickwire_receive_to_book_seconds_count{{channel="{ch}"}}'] > 0
        if mode == "xdp":
            assert (
                sum(v for k, v in metrics.items() if k.startswith("tickwire_xdp_packets_total"))
                >= 2 * 1000
            )
        bid_px, _, ask_px, _ = app.reader.bbo(1)
        book = Book()
        book.feed(np.fromfile(path, np.uint8))
        assert (bid_px, ask_px) == (book.bbo(1)[0], book.bbo(1)[2])
        # the kernel still gets everything else: ping across line A while steering runs
        ping = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                labcfg.lab.exchange_ns,
                "ping",
                "-c",
                "2",
                "-W",
                "3",
                labcfg.lab.line_a.appliance_ip,
            ],
            capture_output=True,
            text=True,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        st = subprocess.run(
            [sys.executable, "-m", "host.cli", "status", "--channel", ch, "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        status = json.loads(st.stdout)
        assert status["consumer"]["taken"] == N_MSGS and status["consumer"]["running"]
        s = app.finish(terminate=True)
        assert s["digest"] == digest
        if mode == "xdp":
            from host.appliance import loader

            assert s["xdp"]["passed"]["no_socket"] == 0
            assert loader.attached(labcfg.lab.appliance_ns) == []  # detached on SIGTERM
    finally:
        app.kill()


@pytest.mark.lab
@pytest.mark.parametrize("mode", MODES)
def test_malformed_packets_are_counted_and_harmless(labcfg, session_file, tmp_path, mode):
    path, digest = session_file
    app = Appliance(labcfg, tmp_path, mode)
    try:
        line = labcfg.lab.line_a
        with netns.entered(labcfg.lab.exchange_ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(line.exchange_ip))
        junk = [
            b"",
            b"x" * 7,
            b"TICKWIRE01" + (1).to_bytes(8, "big") + (3).to_bytes(2, "big"),
            b"TICKWIRE01" + (1).to_bytes(8, "big") + (1).to_bytes(2, "big") + b"\x00\x40ab",
        ]
        for j in junk:
            s.sendto(j, (line.group, line.port))
        s.sendto(
            b"OTHERSESS1" + (1).to_bytes(8, "big") + (0).to_bytes(2, "big"), (line.group, line.port)
        )
        s.close()
        app.wait_counters(lambda c: c["lines"]["A"]["malformed"] >= 4, "4 malformed on A")
        run_sim(
            _sim_cfg(labcfg, tmp_path),
            "--session",
            str(path),
            "--rate",
            "400000",
            "--eos-for",
            "1",
            "--no-rerequest",
        )
        out = app.finish()
    finally:
        app.kill()
    assert out["lines"]["A"]["malformed"] == 4 and out["lines"]["A"]["other_session"] == 1
    assert out["digest"] == digest and out["taken"] == N_MSGS


def test_run_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nrx_mode = "dpdk"\n')
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "run.rx_mode" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    ok = tmp_path / "ok.toml"
    ok.write_text('[run]\nnetns = "no-such-ns-here"\n' + HOST_LINES)
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "run", "--config", str(ok)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert ("no-such-ns-here does not exist" in done.stderr) or ("root" in done.stderr)


@pytest.mark.lab
def test_socket_mode_needs_its_interfaces(tmp_path):
    cfg = private_lab("nif")
    with built(cfg):
        path = tmp_path / "c.toml"
        write_config(cfg, path)
        with open(path, "a") as f:
            f.write('[run]\nchannel = "nif"\nmetrics = ""\n' + HOST_LINES)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "host.cli",
                "run",
                "--config",
                str(path),
                "--mode",
                "socket",
                "--duration",
                "1",
            ],
            capture_output=True,
            text=True,
        )
        # without --lab the run stays in this namespace, where nope0 does not exist either
        assert done.returncode == 1 and "nope0 does not exist" in done.stderr


@pytest.mark.lab
@pytest.mark.needs("xdp", "afxdp")
def test_warm_fills_the_cache_each_receive_path_starts_from(labcfg, session_file, tmp_path):
    """``tickwire warm`` compiles the consumer without a network into an empty cache; runs
    in both modes then load their loops from it, and a second warm finds them there."""
    path, digest = session_file
    cache = tmp_path / "numba"
    cache.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    cfg_path = tmp_path / "warm.toml"
    write_config(labcfg, cfg_path)

    def warm():
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "host.cli",
                "warm",
                "--config",
                str(cfg_path),
                "--lab",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    first = warm()
    assert first["cache"] == str(cache)
    assert {m: v["how"] for m, v in first["modes"].items()} == {
        "xdp": "compiled",
        "socket": "compiled",
    }
    assert any(cache.rglob("*.nbi")), "nothing written to the cache"
    for mode in ("socket", "xdp"):
        s = _run_session(labcfg, tmp_path, path, mode, wrap=("env", f"NUMBA_CACHE_DIR={cache}"))
        assert s["digest"] == digest and s["start"]["how"] == "cache", s["start"]
    again = warm()
    assert {m: v["how"] for m, v in again["modes"].items()} == {"xdp": "cache", "socket": "cache"}


@pytest.mark.lab
def test_a_consumer_killed_outright_is_an_error_and_its_books_show_stale(
    labcfg, session_file, tmp_path
):
    """SIGKILL the consumer a quarter of the way in: ``tickwire run`` fails saying how it
    died and where; its shared memory, read by ``tickwire status`` and the metrics
    collector, says the consumer is not running, died, and the books are stale."""
    from host.appliance import metrics, status
    from tests.labnet import SimProcess

    path, _ = session_file
    app = Appliance(labcfg, tmp_path, "socket")
    sim = SimProcess(
        _sim_cfg(labcfg, tmp_path),
        *("--session", str(path), "--rate", "20000", "--eos-for", "1", "--no-rerequest"),
    )
    try:
        c = app.wait_taken(N_MSGS // 4)
        assert c["running"] and not c["died"] and not c["stale"]
        os.kill(c["pid"], signal.SIGKILL)
        out, err = app.proc.communicate(timeout=120)
        assert app.proc.returncode == 1 and not out
        last = err.strip().splitlines()[-1]  # the error, one line, after the run's log
        assert last.startswith("tickwire: channel ") and "books are stale until rebuilt" in last
        assert "the consumer died (killed by signal 9 (SIGKILL)) with no report" in last
        st = status.collect(app.channel)
        cs = st["consumer"]
        assert cs["died"] == "killed by signal 9 (SIGKILL)"
        assert not cs["running"] and cs["stale"] and cs["taken"] >= N_MSGS // 4
        assert "DIED (killed by signal 9 (SIGKILL), no report)" in status.text(st)
        assert "BOOKS STALE: the consumer died" in status.text(st)
        maps = shm.attach(app.channel, writable_control=False)
        fams = {f.name: f for f in metrics.ConsumerCollector(app.channel, maps).collect()}
        for name, want in (("consumer_up", 0), ("consumer_died", 1), ("books_stale", 1)):
            assert fams[f"tickwire_{name}"].samples[0].value == want, name
    finally:
        sim.kill()
        app.kill()
