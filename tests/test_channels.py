"""Several channels, several cores: ``[[channel]]`` tables (each channel its lines, core,
queue, session and shared memory, the rest inherited from ``[run]``), what channels may
not share, the lab's channels (groups + k, queue k, re-request port + k) and, in a private
lab, three channels published at once by one simulator and received by one
``tickwire run``, each exact and each on its own queue."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from host import config

# a host with two feed NICs, channels steered to queues 2 and 3 of each (one core each)
TWO = """
[run]
policy = "halt"
[run.line_a]
interface = "ens1f0"
[run.line_b]
interface = "ens1f1"

[[channel]]
name = "totalview"
core = 2
[channel.line_a]
queue = 2
group = "233.54.12.111"
port = 26477
[channel.line_b]
queue = 2
group = "233.49.196.111"
port = 26477

[[channel]]
name = "bx"
session = "BX01"
core = 3
policy = "stale"
[channel.line_a]
queue = 3
group = "233.54.12.112"
port = 26477
[channel.line_b]
queue = 3
group = "233.49.196.112"
port = 26477
"""


def _load(text: str) -> config.Config:
    return config.from_dict(tomllib.loads(text))


def _refused(text: str, why: str) -> None:
    with pytest.raises(config.ConfigError, match=why):
        _load(text)


# --- [[channel]] tables ------------------------------------------------------------------------
def test_each_channel_is_a_one_channel_config_inheriting_run():
    cfg = _load(TWO)
    a, b = config.channel_configs(cfg)
    assert (a.run.channel, a.feed.session, a.run.core) == ("totalview", "TICKWIRE01", 2)
    assert (b.run.channel, b.feed.session, b.run.core) == ("bx", "BX01", 3)
    assert a.run.policy == "halt" and b.run.policy == "stale"  # inherited / its own
    # a line's keys one by one: the interface from [run.line_a], the rest the channel's
    assert (a.run.line_a.interface, a.run.line_a.queue) == ("ens1f0", 2)
    assert (b.run.line_b.interface, b.run.line_b.queue) == ("ens1f1", 3)
    assert b.run.line_a.group == "233.54.12.112"
    for c in (a, b):
        assert c.channel == () and config.channel_configs(c) == [c]
        config.require_lines(c.run)
    assert config.require_channel_lines(cfg) == [a, b]


def test_without_channel_tables_the_config_is_one_channel_as_before():
    cfg = config.load(None)
    assert cfg.channel == () and config.channel_configs(cfg) == [cfg]
    assert config.for_lab(cfg).channel == ()


def test_the_keys_a_channel_may_set_are_runs_but_the_process_wide_ones():
    keys = set(config.channel_keys())
    run = {f for f in config.RunConfig.__dataclass_fields__}
    assert keys == (run - config.PROCESS_KEYS) | {"name", "session"}
    assert {"core", "line_a", "recovery", "orders", "policy", "window_ms"} <= keys
    assert not keys & {"netns", "rx_mode", "xdp_mode", "metrics", "start_timeout_s"}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (('policy = "stale"', "corr = 1"), r"^channel\[1\]\.corr: unknown key \(known: .*core"),
        (
            ('policy = "stale"', 'metrics = "127.0.0.1:1"'),
            r"^channel\[1\]\.metrics: belongs to the whole process, not to one channel",
        ),
        (('policy = "stale"', 'channel = "x"'), r"^channel\[1\]\.channel: belongs to the whole"),
        (('name = "bx"', ""), r"^channel\[1\]\.name: not set"),
        (('name = "bx"', 'name = "b x"'), r"^channel\[1\]\.name: 'b x' must be letters"),
        (('name = "bx"', "name = 7"), r"^channel\[1\]\.name: expected a string"),
        (('session = "BX01"', 'session = "WAY-TOO-LONG"'), r"^channel\[1\]\.session: .*1-10"),
        (('policy = "stale"', 'policy = "x"'), r"^channel\[1\]\.policy: 'x' is not one of"),
        (('policy = "stale"', 'window_ms = "x"'), r"^channel\[1\]\.window_ms: expected a number"),
        (("core = 3", "core = -2"), r"^channel\[1\]\.core: -2 is not a CPU"),
        (
            ('"233.54.12.112"', '"233.54.12.112"\nfoo = 1'),
            r"^channel\[1\]\.line_a\.foo: unknown",
        ),
        (('"233.54.12.112"', '"10.1.1.1"'), r"^channel\[1\]\.line_a\.group: .* not a multicast"),
    ],
)
def test_a_bad_channel_table_names_its_key(change, why):
    old, new = change
    assert TWO.count(old) == 1
    _refused(TWO.replace(old, new), why)


def _second(old: str, new: str) -> str:
    """TWO with ``old`` replaced in the second channel's table."""
    head, tail = TWO.split('name = "bx"')
    return head + 'name = "bx"' + tail.replace(old, new, 1)


def test_channel_tables_must_be_tables():
    with pytest.raises(config.ConfigError, match=r"^channel: expected \[\[channel\]\] tables"):
        config.from_dict({"channel": {"name": "x"}})


# --- what channels may not share ---------------------------------------------------------------
def test_two_channels_on_one_core_are_refused():
    _refused(
        _second("core = 3", "core = 2"),
        r"^channel\[1\]\.core: channels totalview and bx are both pinned to core 2",
    )


def test_unpinned_channels_may_share_the_cpus():
    text = TWO.replace("core = 2", "core = -1").replace("core = 3", "core = -1")
    assert [c.run.core for c in config.channel_configs(_load(text))] == [-1, -1]


def test_two_channels_on_one_queue_are_refused():
    _refused(
        _second("queue = 3\ngroup", "queue = 2\ngroup"),
        r"^channel\[1\]\.line_a: channels totalview \(line A\) and bx \(line A\) both arrive "
        r"on ens1f0 queue 2",
    )
    # the same queue number on another interface is another queue
    text = _second("queue = 3\ngroup", 'queue = 2\ninterface = "ens2f0"\ngroup')
    assert config.channel_configs(_load(text))[1].run.line_a.queue == 2


def test_two_channels_on_one_group_are_refused():
    _refused(
        _second('"233.49.196.112"', '"233.49.196.111"'),
        r"^channel\[1\]\.line_b: channels totalview \(line B\) and bx \(line B\) both use "
        r"233\.49\.196\.111:26477",
    )
    # another port on the same group is another feed
    assert _load(_second("port = 26477\n[channel.line_b]", "port = 26478\n[channel.line_b]"))


def test_two_channels_of_one_name_are_refused():
    _refused(
        TWO.replace('name = "bx"', 'name = "totalview"'),
        r"^channel\[1\]\.name: 'totalview' is channel\[0\]'s name too",
    )


def test_a_channel_still_needs_its_lines():
    text = TWO.replace('interface = "ens1f1"\n', "")
    cfg = _load(text)  # loads: a lab or a sim needs no lines
    with pytest.raises(config.ConfigError, match=r"^channel\[0\]\.line_b\.interface: not set"):
        config.require_channel_lines(cfg)


# --- more cores than the host has (checked where the consumers start) -------------------------
def test_pinned_cores_must_be_cpus_this_host_offers():
    cfgs = config.channel_configs(_load(TWO))  # cores 2 and 3
    config.check_cores(cfgs, {0, 1, 2, 3})
    with pytest.raises(
        config.ConfigError,
        match=r"^channel totalview: core 2 is not a CPU this host offers "
        r"\(CPUs 0-1\)",
    ):
        config.check_cores(cfgs, {0, 1})
    with pytest.raises(config.ConfigError, match=r"^channel bx: core 3 is not .*\(CPUs 2,4-5\)"):
        config.check_cores(cfgs, {2, 4, 5})
    one = config.from_dict({"run": {"core": 7}})
    with pytest.raises(config.ConfigError, match=r"^run\.core: 7 is not a CPU this host offers"):
        config.check_cores([one], {0, 1})


def test_more_pinned_channels_than_cpus_are_refused():
    # distinct cores, each of them offered, are never more than the CPUs: constructed
    # channel configs that skipped validation still are
    base = config.channel_configs(_load(TWO))[0]
    cfgs = [
        config.dataclasses.replace(base, run=config.dataclasses.replace(base.run, channel=n))
        for n in ("a", "b", "c")
    ]
    with pytest.raises(
        config.ConfigError,
        match=r"^channels a, b, c: 3 pinned consumers, but this host "
        r"offers 1 CPUs \(2\)",
    ):
        config.check_cores(cfgs, {2})


def test_the_cpu_check_defaults_to_this_process_affinity():
    import os

    cpu = max(os.sched_getaffinity(0))
    config.check_cores([config.from_dict({"run": {"core": cpu}})])
    with pytest.raises(config.ConfigError, match="is not a CPU this host offers"):
        config.check_cores([config.from_dict({"run": {"core": 4095}})])


# --- the lab's channels -------------------------------------------------------------------------
def test_a_lab_of_three_channels_writes_three_channel_tables():
    cfg = config.for_lab(config.with_lab(prefix="tq", channels=3))
    chans = config.channel_configs(cfg)
    assert [c.run.channel for c in chans] == ["totalview", "ch1", "ch2"]
    assert [c.feed.session for c in chans] == ["TICKWIRE01", "TICKWIRE02", "TICKWIRE03"]
    for k, c in enumerate(chans):
        assert c.run.netns == "tq-appl"
        assert c.run.recovery == f"10.77.1.1:{26500 + k}"
        assert (c.run.line_a.group, c.run.line_a.port) == (f"239.77.1.{1 + k}", 26477)
        assert (c.run.line_b.group, c.run.line_b.port) == (f"239.77.2.{1 + k}", 26478)
        for letter, line in c.run.lines.items():
            lab = cfg.lab.lines[letter]
            assert (line.interface, line.queue, line.address) == (
                lab.appliance_if,
                k,
                lab.appliance_ip,
            )
    assert cfg.lab.rx_queues == 3  # the lab creates a queue per channel


def test_a_labs_channel_keeps_what_its_table_sets():
    text = (
        '[lab]\nchannels = 2\n[[channel]]\nname = "tv"\ncore = 1\n[[channel]]\nname = "bx"\n'
        'session = "BX01"\n[channel.line_a]\nqueue = 9\n'
    )
    cfg = config.for_lab(_load(text))
    tv, bx = config.channel_configs(cfg)
    assert (tv.run.channel, tv.run.core, tv.feed.session) == ("tv", 1, "TICKWIRE01")
    assert (bx.run.channel, bx.feed.session, bx.run.line_a.queue) == ("bx", "BX01", 1)
    assert [c.name for c in config.lab_channels(_load(text))] == ["tv", "bx"]


def test_a_lab_refuses_more_channel_tables_than_channels():
    text = '[[channel]]\nname = "a"\n[[channel]]\nname = "b"\n'
    with pytest.raises(config.ConfigError, match=r"^channel\[1\]: the lab has 1 channel "):
        config.for_lab(_load(text))


@pytest.mark.parametrize(
    ("lab", "why"),
    [
        ({"channels": 0}, r"^lab\.channels: 0 is outside 1\.\.16"),
        ({"channels": 17}, r"^lab\.channels: 17 is outside 1\.\.16"),
        ({"channels": 3, "rerequest_port": 65534}, r"^lab\.rerequest_port: channel 2's server"),
        (
            {"channels": 2, "line_b": {"group": "239.77.1.2", "port": 26477}},
            r"^lab\.line_a\.group: channel 1 line A and channel 0 line B would share "
            r"239\.77\.1\.2:26477",
        ),
        (
            {"channels": 2, "line_a": {"group": "239.255.255.255"}},
            r"^lab\.channels: channel 1's groups run past|not multicast",
        ),
    ],
)
def test_bad_lab_channels_name_the_key(lab, why):
    with pytest.raises(config.ConfigError, match=why):
        config.from_dict({"lab": lab})


def test_the_simulator_refuses_more_channels_than_the_lab_has(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text('[lab]\nprefix = "tnope"\nchannels = 2\n')
    cases = [
        (["--channels", "3"], "--channels 3: the lab has 2 channels (lab.channels"),
        (["--session-name", "X"], "--session-name names one channel's session"),
    ]
    for args, text in cases:
        done = subprocess.run(
            [sys.executable, "-m", "host.cli", "sim", "--config", str(path), "--no-netns", *args],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1, (args, done.stderr)
        assert text in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


def test_the_readme_shows_two_channel_tables():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[[channel]]" in b]
    assert blocks
    cfgs = config.require_channel_lines(_load(blocks[0]))
    assert len(cfgs) >= 2


# --- the lab's queue steering ------------------------------------------------------------------
def test_the_queue_steering_program_uses_the_common_key_and_sits_before_the_faults():
    from pathlib import Path

    from host.exchange import txsteer, wirefaults

    text = (Path(__file__).resolve().parents[1] / "bpf" / "txsteer.c").read_text()
    assert '#include "common.h"' in text
    maps = set(re.findall(r"^BPF_\w+\((tw_\w+)", text, re.M))
    progs = set(re.findall(r"^int (tw_\w+)\(struct __sk_buff \*\w+\)", text, re.M))
    assert (maps, progs) == ({txsteer.MAP_QUEUES}, {txsteer.PROG_NAME})
    assert re.search(rf"^BPF_HASH\({txsteer.MAP_QUEUES}, struct tw_chan_key, __u32,", text, re.M)
    assert "TC_ACT_UNSPEC" in text and "TC_ACT_OK" not in text  # the filters after it run
    assert txsteer.FILTER_PRIO < wirefaults.FILTER_PRIO
    lab = config.LabConfig(channels=3)
    assert sorted(txsteer.entries(lab)) == sorted(
        (f"239.77.{n}.{1 + k}", 26476 + n, k) for k in range(3) for n in (1, 2)
    )


def _xdp_per_queue(ns: str, ifname: str) -> dict[int, int]:
    """The veth's per-rx-queue count of frames its XDP program ran on (``ethtool -S``)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ethtool", "-S", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(m[1]): int(m[2]) for m in re.finditer(r"rx_queue_(\d+)_xdp_packets: (\d+)", out)}


def _carrying(record: dict, letter: str, first: int, last: int) -> int:
    """Packets line ``letter`` sent (by the simulator's record) carrying a sequence in
    ``first..last``."""
    pk = record["packets"]
    return sum(
        1
        for k in record["lines"][letter]["sent"]
        if pk[k][0] <= last and pk[k][0] + pk[k][1] - 1 >= first
    )


@pytest.mark.lab
@pytest.mark.needs("xdp")
def test_each_channel_arrives_on_its_own_queue_with_wire_faults_on_too(tmp_path):
    """Three channels published at once: on the appliance ends, rx queue k sees exactly
    channel k's packets (the veth's per-queue XDP counters; anything else the XDP program
    saw -- IPv6 link chatter -- is the only excess allowed, and it is counted), while the
    fault program after the steering drops a sequence range on line A of every channel."""
    import json

    from host.appliance import loader
    from host.exchange.wirefaults import WireFaults
    from tests.labnet import built, private_lab, run_sim, sent_counts, write_config

    cfg = private_lab("chq", channels=3)
    lab = cfg.lab
    record = tmp_path / "rec.json"
    with built(cfg):
        path = write_config(cfg, tmp_path / "lab.toml")
        entries = [
            (line.group, line.port, k, letter)
            for k in range(3)
            for letter, line in lab.channel_lines(k).items()
        ]
        ifaces = [line.appliance_if for line in lab.lines.values()]
        with (
            loader.Steering(ifaces, entries, mode="native", netns=lab.appliance_ns) as steer,
            WireFaults(cfg, "A") as wf,
        ):
            wf.drop_range(1000, 1999)
            before = {i: _xdp_per_queue(lab.appliance_ns, i) for i in ifaces}
            s = run_sim(
                path,
                "--channels",
                "3",
                "--generate",
                "20000",
                "--rate",
                "300000",
                "--eos-for",
                "0.3",
                "--no-rerequest",
                "--record",
                str(record),
            )
            after = {i: _xdp_per_queue(lab.appliance_ns, i) for i in ifaces}
            xdp = steer.stats()
            faults = wf.stats()
        rec = json.loads(record.read_text())["channels"]
    assert list(s["channels"]) == [cfg.run.channel, "ch1", "ch2"]
    assert [c["session"] for c in s["channels"].values()] == [
        "TICKWIRE01",
        "TICKWIRE02",
        "TICKWIRE03",
    ]
    sent = {name: sent_counts(c) for name, c in s["channels"].items()}
    dropped = {name: _carrying(rec[name], "A", 1000, 1999) for name in rec}
    assert all(dropped.values())  # the range hit line A of every channel...
    assert faults["dropped_range"] == sum(dropped.values())  # ...and nothing else
    assert faults["feed"] == sum(n["A"] for n in sent.values())  # it saw every channel's
    want = {
        lab.line_a.appliance_if: [sent[n]["A"] - dropped[n] for n in sent],
        lab.line_b.appliance_if: [sent[n]["B"] for n in sent],
    }
    excess = 0
    for ifname, per_channel in want.items():
        got = [after[ifname][q] - before[ifname].get(q, 0) for q in range(3)]
        assert all(g >= w for g, w in zip(got, per_channel, strict=True)), (ifname, got, want)
        excess += sum(got) - sum(per_channel)
    for k, name in enumerate(sent):  # and the XDP program saw each channel's on its line
        for letter in "AB":
            n = sent[name][letter] - (dropped[name] if letter == "A" else 0)
            assert xdp["channels"][(k, letter)]["packets"] == n
    # the excess is link chatter (IPv6) the XDP program passed; it may also have passed some
    # before the per-queue counters were first read, so at most that many
    assert 0 <= excess <= sum(v for k, v in xdp.items() if k != "channels" and k != "no_socket")


# --- one metrics endpoint for every channel ----------------------------------------------------
def test_several_channels_expose_each_family_once_with_every_channels_series():
    import numpy as np
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from dataplane import shm
    from host.appliance import metrics

    def maps(packets: int) -> dict:
        m = {
            name: np.zeros(shape, dtype)
            for name, (dtype, shape) in shm.REGIONS.items()
            if name in ("counters", "latency", "control")
        }
        m["counters"][shm.L_PACKETS] = packets
        return m

    reg = CollectorRegistry(auto_describe=False)
    reg.register(
        metrics.Merged(
            metrics.ConsumerCollector(name, maps(n), now_ns=lambda: 10**11)
            for name, n in (("tv", 5), ("bx", 7), ("psx", 9))
        )
    )
    text = generate_latest(reg).decode()
    types = re.findall(r"^# TYPE (\S+)", text, re.M)
    assert len(types) == len(set(types))  # one HELP/TYPE per family
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(series) == len(set(series))  # no series twice
    for name, n in (("tv", 5), ("bx", 7), ("psx", 9)):
        assert f'tickwire_line_packets_total{{channel="{name}",line="A"}} {n}.0' in text


# --- three channels at once, each exact --------------------------------------------------------
N_MSGS = 50_000
SEEDS = (41, 42, 43)
# this VM has 2 CPUs: three consumers cannot each have a core of their own (core = 2 is
# refused by config.check_cores), so they run unpinned (core = -1) beside the simulator
RUN_MODES = ["socket", pytest.param("xdp", marks=pytest.mark.needs("xdp", "afxdp"))]


@pytest.fixture(scope="module")
def three_sessions(tmp_path_factory):
    """Three generated sessions, different seeds, and the digest ``tickwire book`` gives
    each (the production decoder and book, offline)."""
    import numpy as np

    from dataplane.book import Book
    from host.exchange import itchgen

    out = []
    for seed in SEEDS:
        path = tmp_path_factory.mktemp("sessions") / f"s{seed}.itch"
        itchgen.write_session(str(path), N_MSGS, 60, seed)
        book = Book()
        book.feed(np.fromfile(path, np.uint8))
        out.append((path, book.digest()))
    assert len({d for _, d in out}) == 3  # three different books
    return out


@pytest.fixture(scope="module")
def lab3():
    from tests.labnet import built, private_lab

    cfg = private_lab("ch3", channels=3)
    with built(cfg):
        yield cfg


def _scrape(cfg, port: int) -> str:
    import urllib.request

    from host import netns

    with netns.entered(cfg.lab.appliance_ns):
        url = f"http://127.0.0.1:{port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()


@pytest.mark.lab
@pytest.mark.timeout(1500)  # three consumers may each compile on a cold numba cache
@pytest.mark.parametrize("mode", RUN_MODES)
def test_three_channels_run_at_once_each_exact(lab3, three_sessions, tmp_path, mode):
    """One ``tickwire run --lab`` supervises three channels (three consumers, their own
    shared memory, recovery clients and queues); one ``tickwire sim`` publishes three
    sessions at once on their channels' groups. Each channel ends with its own session's
    ``tickwire book`` digest, every message from both lines and no gap; in AF_XDP mode,
    where channel k's sockets sit on queue k alone, that proves each channel's packets
    arrived on its own queue (a packet on another queue would reach another channel's
    socket and be counted there as another session's)."""
    import json
    import os
    import signal

    from dataplane import shm
    from host.appliance import runner
    from tests.helpers import free_port
    from tests.labnet import run_sim, write_config

    names = [f"t{os.getpid()}{mode[0]}{k}" for k in range(3)]
    port = free_port()
    cfg_path = tmp_path / "run.toml"
    write_config(lab3, cfg_path)
    with open(cfg_path, "a") as f:
        f.write(f'[run]\nmetrics = "127.0.0.1:{port}"\ncore = -1\n')
        for name in names:
            f.write(f'[[channel]]\nname = "{name}"\n')
    cmd = [sys.executable, "-m", "host.cli", "run", "--config", str(cfg_path), "--lab"]
    proc = subprocess.Popen(
        [*cmd, "--mode", mode, "--json", "--until-eos"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for name in names:
            runner.wait_consumer(name, proc, timeout=1200)
        text = _scrape(lab3, port)  # one endpoint: each family once, every channel in it
        types = re.findall(r"^# TYPE (\S+)", text, re.M)
        assert len(types) == len(set(types))
        series = [ln.rsplit(" ", 1)[0] for ln in text.splitlines() if not ln.startswith("#")]
        assert len(series) == len(set(series))
        for name in names:
            assert f'tickwire_sequence_next{{channel="{name}"}} 1.0' in text
        st = subprocess.run(
            [sys.executable, "-m", "host.cli", "status", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        chans = json.loads(st.stdout)["channels"]  # every channel under /dev/shm/tickwire
        assert all(chans[n]["consumer"]["running"] for n in names)
        sim = run_sim(
            str(cfg_path),  # the same [[channel]] names and sessions
            *(a for path, _ in three_sessions for a in ("--session", str(path))),
            "--rate",
            "300000",
            "--eos-for",
            "1",
            timeout=300,
        )
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        for name in names:
            shm.remove(name)
    s = json.loads(out)
    assert list(s) == ["channels"] and list(s["channels"]) == names
    assert list(sim["channels"]) == names  # the simulator's channels are the run's
    for k, (name, (_, digest)) in enumerate(zip(names, three_sessions, strict=True)):
        c = s["channels"][name]
        assert (c["channel"], c["mode"]) == (name, mode)
        assert c["digest"] == digest and c["check"] is None, name
        assert c["taken"] == N_MSGS and c["next_seq"] == N_MSGS + 1
        assert c["gaps_declared"] == 0 and c["unrecoverable_messages"] == 0
        assert sim["channels"][name]["session"] == f"TICKWIRE0{k + 1}"
        for letter in "AB":
            ln = c["lines"][letter]
            assert ln["messages"] == N_MSGS, (name, letter, ln)  # all of it, on its queue
            assert ln["other_session"] == 0 and ln["malformed"] == 0, (name, letter, ln)
        assert c["lines"]["A"]["first"] + c["lines"]["B"]["first"] == N_MSGS
        assert c["lines"]["recovery"]["packets"] == 0
        if mode == "xdp":
            assert c["xdp"]["passed"]["no_socket"] == 0 and c["xdp"]["passed"]["no_slot"] == 0
            for letter in "AB":  # the XDP program's own count of this channel's packets
                assert c["xdp"]["lines"][letter]["packets"] >= c["lines"][letter]["packets"]
    assert "channel " + names[2] + ": consumer pid" in err
