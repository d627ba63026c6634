"""Configuration that is the host's own: the one ``host:port`` parser, ``[run]`` lines that
never default to the lab's, the lab writing its own, and the README's examples."""

import re
import tomllib
from pathlib import Path

import pytest

from host import cli, config
from host.appliance import runner

ROOT = Path(__file__).resolve().parents[1]


# --- host:port ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("10.77.1.1:1", ("10.77.1.1", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("feed.example:26500", ("feed.example", 26500)),
    ],
)
def test_host_port_splits_good_forms(text, want):
    assert config.host_port(text, "run.metrics") == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("localhost", "must be host:port"),
        (":9108", "must be host:port"),
        ("127.0.0.1:", "must be host:port"),
        ("127.0.0.1:http", "must be host:port"),
        ("127.0.0.1:-1", "must be host:port"),
        ("127.0.0.1:0", "port 0 is outside 1..65535"),
        ("127.0.0.1:65536", "port 65536 is outside 1..65535"),
    ],
)
def test_host_port_names_the_key_of_a_bad_form(text, why):
    with pytest.raises(config.ConfigError, match=f"^run.recovery: .*{re.escape(why)}"):
        config.host_port(text, "run.recovery")


@pytest.mark.parametrize("key", ["metrics", "recovery"])
def test_endpoints_are_checked_at_load(key):
    assert config.from_dict({"run": {key: "10.0.0.1:80"}})
    with pytest.raises(config.ConfigError, match=f"run.{key}: .*must be host:port"):
        config.from_dict({"run": {key: "10.0.0.1"}})
    with pytest.raises(config.ConfigError, match=f"run.{key}: not an IPv4 address"):
        config.from_dict({"run": {key: "feed.example:80"}})


# --- [run] lines: the host's, never the lab's ----------------------------------------------
LINES = {
    "line_a": {"interface": "ens1f0", "queue": 2, "group": "233.54.12.111", "port": 26477},
    "line_b": {"interface": "ens1f0", "queue": 3, "group": "233.49.196.111", "port": 26477},
}


def test_run_lines_default_to_nothing_of_the_lab():
    run = config.load(None).run
    lab = config.LabConfig()
    names = {lab.line_a.appliance_if, lab.line_b.appliance_if, lab.line_a.group}
    for line in run.lines.values():
        assert line == config.RxLineConfig()
        assert not names & {line.interface, line.group}


@pytest.mark.parametrize(
    ("run", "key"),
    [
        ({}, "run.line_a.interface"),
        ({"line_a": {"interface": "ens1f0"}}, "run.line_a.group"),
        ({"line_a": {"interface": "ens1f0", "group": "233.54.12.111"}}, "run.line_a.port"),
        ({"line_a": LINES["line_a"]}, "run.line_b.interface"),
    ],
)
def test_a_run_without_its_lines_names_the_key(run, key):
    cfg = config.from_dict({"run": run})  # loads: a lab or a sim needs no [run] lines
    with pytest.raises(config.ConfigError, match=f"^{re.escape(key)}: not set"):
        config.require_lines(cfg.run)


def test_a_run_with_its_lines_is_complete():
    cfg = config.from_dict({"run": LINES})
    config.require_lines(cfg.run)
    assert cfg.run.line_b.queue == 3


def test_set_line_values_are_still_checked_at_load():
    with pytest.raises(config.ConfigError, match="run.line_a.group: 10.0.0.1 is not a multicast"):
        config.from_dict({"run": {"line_a": {"group": "10.0.0.1"}}})
    with pytest.raises(config.ConfigError, match="run.line_b: lines A and B both arrive"):
        config.from_dict({"run": {"line_a": {"interface": "x0"}, "line_b": {"interface": "x0"}}})


def test_the_lab_writes_its_own_run_lines():
    cfg = config.for_lab(config.load(None, prefix="tq"))
    config.require_lines(cfg.run)
    assert cfg.run.netns == "tq-appl"
    for letter, line in cfg.run.lines.items():
        lab = cfg.lab.lines[letter]
        assert (line.interface, line.group, line.port, line.address) == (
            lab.appliance_if,
            lab.group,
            lab.port,
            lab.appliance_ip,
        )
    assert cfg.run.recovery == f"{cfg.lab.line_a.exchange_ip}:{cfg.lab.rerequest_port}"


def test_the_appliance_refuses_a_run_without_lines_before_touching_anything(tmp_path):
    cfg = config.from_dict({"run": {"netns": "no-such-ns", "channel": "tcfg"}})
    with pytest.raises(config.ConfigError, match="run.line_a.interface: not set"):
        runner.Appliance(cfg).run(duration=1)


def test_tickwire_run_without_lines_is_one_line(tmp_path, capsys):
    path = tmp_path / "host.toml"
    path.write_text('[run]\nchannel = "tcfg"\n')
    assert cli.main(["run", "--config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "tickwire: run.line_a.interface: not set (the interface the line arrives on; --lab "
        "uses the lab's lines)"
    ]


# --- [host] ----------------------------------------------------------------------------------
def test_hugepages_nodes_is_a_nodelist_defaulting_to_the_roles_node_0():
    assert config.Config().host.hugepages_nodes == "0"
    cfg = config.from_dict({"host": {"hugepages_2m": 8, "hugepages_nodes": "0-1,3"}})
    assert config.cpulist(cfg.host.hugepages_nodes) == {0, 1, 3}


@pytest.mark.parametrize(
    "value,why",
    [
        ("", "not a nodelist of at least one NUMA node"),
        ("node0", "not a nodelist"),
        ("1-0", "runs backwards"),
        ("1024", "node 1024 is outside 0..1023"),
        (["0", "1"], "expected a string"),
    ],
)
def test_hugepages_nodes_names_the_key_of_a_bad_value(value, why):
    with pytest.raises(config.ConfigError, match=f"host.hugepages_nodes: .*{why}"):
        config.from_dict({"host": {"hugepages_nodes": value}})


def test_cpu_isolation_promises_default_to_not_checked():
    h = config.Config().host
    assert (h.rcu_nocb_poll, h.nmi_watchdog_off, h.ksm_off) == (False, False, False)
    assert (h.kthread_cpus, h.transparent_hugepage, h.workqueue_cpus, h.cpu_governor) == ("",) * 4
    assert h.idle_latency_us == -1
    promise = {
        "isolated_cpus": "2-3",
        "kthread_cpus": "0-1",
        "workqueue_cpus": "0,1",
        "transparent_hugepage": "never",
        "cpu_governor": "performance",
        "idle_latency_us": 0,
        "ksm_off": True,
    }
    assert config.from_dict({"host": promise}).host.idle_latency_us == 0


@pytest.mark.parametrize(
    "host,why",
    [
        ({"kthread_cpus": "0-"}, "host.kthread_cpus: .* is not a cpulist"),
        ({"workqueue_cpus": "ff"}, "host.workqueue_cpus: .* is not a cpulist"),
        ({"transparent_hugepage": "off"}, "host.transparent_hugepage: 'off' is not one of"),
        ({"cpu_governor": "Perf ormance"}, "host.cpu_governor: .* is not a cpufreq governor"),
        ({"isolated_cpus": "2", "idle_latency_us": -2}, "host.idle_latency_us: -2 is outside"),
        ({"idle_latency_us": 3}, "host.idle_latency_us: applies to host.isolated_cpus"),
        ({"ksm_off": 1}, "host.ksm_off"),
    ],
)
def test_cpu_isolation_promises_name_the_key_of_a_bad_value(host, why):
    with pytest.raises(config.ConfigError, match=why):
        config.from_dict({"host": host})


# --- [world_view] ----------------------------------------------------------------------------
def test_the_world_view_aggregates_every_channel_unless_told_which():
    cfg = config.from_dict({})
    assert cfg.world_view.listen == "127.0.0.1:50551" and cfg.world_view.symbols == ()
    assert config.world_view_channels(cfg) == ["totalview"]
    lab3 = config.for_lab(config.with_lab(prefix="twv", channels=3))
    assert config.world_view_channels(lab3) == ["totalview", "ch1", "ch2"]
    cfg = config.from_dict(
        {"world_view": {"channels": ["nq", "bx"], "symbols": ["AAPL"], "listen": "0.0.0.0:7"}}
    )
    assert config.world_view_channels(cfg) == ["nq", "bx"]
    assert (cfg.world_view.listen, cfg.world_view.symbols) == ("0.0.0.0:7", ("AAPL",))


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"listen": "127.0.0.1"}, r"^world_view\.listen: .*must be host:port"),
        ({"listen": "239.1.1.1:80"}, r"^world_view\.listen: '239\.1\.1\.1' is not a unicast"),
        ({"listen": "feed.example:80"}, r"^world_view\.listen: 'feed\.example' is not a"),
        ({"channels": "nq"}, r"^world_view\.channels: expected a list of strings"),
        ({"channels": ["nq", "nq"]}, r"^world_view\.channels: 'nq' is listed twice"),
        ({"channels": ["n q"]}, r"^world_view\.channels: 'n q' must be letters"),
        ({"symbols": ["TOOLONGSYM"]}, r"^world_view\.symbols: 'TOOLONGSYM' is not a ticker"),
        ({"max_watchers": 0}, r"^world_view\.max_watchers: 0 is outside 1\.\.4096"),
        ({"venues": ["nq"]}, r"^world_view\.venues: unknown key \(known: channels, listen"),
    ],
)
def test_a_bad_world_view_table_names_its_key(table, why):
    with pytest.raises(config.ConfigError, match=why):
        config.from_dict({"world_view": table})


# --- the README's examples -----------------------------------------------------------------
def test_the_readme_configuration_examples_load():
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert any("[run]" in b for b in blocks) and any("[lab]" in b for b in blocks)
    for text in blocks:
        cfg = config.from_dict(tomllib.loads(text))
        if "[[channel]]" in text:  # [run] gives only what the channels share
            assert len(config.require_channel_lines(cfg)) > 1
        elif "[run.line_a]" in text:
            config.require_lines(cfg.run)


def test_feed_server_table_is_validated_naming_the_key(tmp_path):
    from host import config as hc

    fs = hc.from_dict({"feed_server": {"port": 9001, "tokens": ["a1"], "channels": ["bx"]}})
    assert fs.feed_server.port == 9001 and fs.feed_server.retention_events == 1 << 20
    for table, msg in [
        ({"port": 0}, "feed_server.port: port 0 is outside"),
        ({"listen": "239.1.1.1"}, "feed_server.listen:"),
        ({"tls_cert": "c.pem"}, "feed_server.tls_key: TLS needs both"),
        ({"retention_events": 5000}, "feed_server.retention_events: 5000"),
        ({"queue_frames": 0}, "feed_server.queue_frames: 0"),
        ({"stall_timeout_s": 0}, "feed_server.stall_timeout_s: 0"),
        ({"channels": ["a", "a"]}, "feed_server.channels: a channel is listed twice"),
        ({"tokens": ["has space"]}, "feed_server.tokens:"),
        ({"metrics": "nope"}, "feed_server.metrics:"),
        ({"max_client": 3}, "feed_server.max_client: unknown key"),
    ]:
        with pytest.raises(hc.ConfigError, match=msg):
            hc.from_dict({"feed_server": table})
    tf = tmp_path / "tokens"
    tf.write_text("# comment\nt1\n\nt2  # trailing\n")
    cfg = hc.FeedServerConfig(tokens=("t0",), token_file=str(tf))
    assert hc.feed_server_tokens(cfg) == {"t0", "t1", "t2"}
    with pytest.raises(hc.ConfigError, match="feed_server.token_file: .*missing"):
        hc.feed_server_tokens(hc.FeedServerConfig(token_file=str(tmp_path / "missing")))
