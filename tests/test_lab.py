"""The netns lab and the configuration it is built from."""

import json
import os
import socket
import subprocess
import sys

import pytest

from host import config, netns
from host.exchange import lab
from tests.helpers import wait_for
from tests.labnet import Receiver, built, private_lab


# --- configuration (no root needed) -------------------------------------------------------
def test_defaults_are_a_valid_lab():
    cfg = config.load(None)
    assert cfg.lab.exchange_ns == "tw-exch" and cfg.lab.appliance_ns == "tw-appl"
    assert cfg.lab.line_a.group != cfg.lab.line_b.group


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[lab]\nprefx = 'x'\n", "lab.prefx: unknown key"),
        ("[lab]\nmtu = 'big'\n", "lab.mtu: expected an integer"),
        ("[lab.line_b]\ngroup = '10.0.0.1'\n", "lab.line_b.group: 10.0.0.1 is not a multicast"),
        ("[lab]\nprefix = 'Bad-Prefix'\n", "lab.prefix"),
        ("[lab.line_a]\nappliance_ip = '10.99.0.2'\n", "lab.line_a: exchange_ip and appliance_ip"),
        ("[lab.line_b]\ngroup = '239.77.1.1'\nport = 26477\n", "different group/port"),
        ("[feed]\nsession = 'MUCH-TOO-LONG'\n", "feed.session"),
        ("[nope]\n", "nope: unknown key"),
        (
            "[run.line_a]\ninterface = 'feed-a'\n[run.line_b]\ninterface = 'feed-a'\n",
            "run.line_b: lines A and B both arrive",
        ),
        ("[run]\nring_size = 1000\n", "run.ring_size"),
        ("[run]\nmetrics = 'localhost'\n", "run.metrics"),
        ("[lab\n", "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        config.load(path)


def test_config_file_overrides_defaults(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text("[lab]\nprefix = 'abc'\nmtu = 9000\n[lab.line_b]\nport = 30000\n")
    cfg = config.load(path)
    assert (cfg.lab.prefix, cfg.lab.mtu, cfg.lab.line_b.port) == ("abc", 9000, 30000)
    assert cfg.lab.line_a.port == config.LabConfig().line_a.port


def test_lab_cli_bad_config_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[lab]\nqueues = 99\n")
    done = subprocess.run(
        [sys.executable, "-m", "host.cli", "lab", "status", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "lab.queues" in done.stderr


# --- the lab itself (root) ------------------------------------------------------------------
def _root_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


@pytest.mark.lab
def test_up_is_idempotent_and_down_removes_only_its_own():
    a = private_lab("ida")
    b = private_lab("idb", mtu=1400, queues=2)
    root_before = _root_links()
    with built(b):
        try:
            st = lab.up(a.lab)
            assert st["up"], st
            first = {
                ns: [(i["name"], i["addresses"]) for i in info["interfaces"]]
                for ns, info in st["namespaces"].items()
            }
            again = lab.up(a.lab)  # second run: same interfaces, same addresses
            assert {
                ns: [(i["name"], i["addresses"]) for i in info["interfaces"]]
                for ns, info in again["namespaces"].items()
            } == first
            exch = st["namespaces"][a.lab.exchange_ns]
            names = {i["name"]: i for i in exch["interfaces"]}
            assert names["ex-a"]["addresses"] == ["10.77.1.1/30"]
            assert names["ex-a"]["mtu"] == 1500 and names["ex-a"]["state"] == "up"
            assert {r["group"]: r["dev"] for r in exch["group_routes"]} == {
                "239.77.1.1": "ex-a",
                "239.77.2.1": "ex-b",
            }
            sb = lab.status(b.lab)
            feed = {i["name"]: i for i in sb["namespaces"][b.lab.appliance_ns]["interfaces"]}
            assert feed["feed-b"]["mtu"] == 1400 and feed["feed-b"]["queues"] == 2
            assert _root_links() == root_before  # nothing in the root namespace
        finally:
            removed = lab.down(a.lab)
        assert removed == [a.lab.exchange_ns, a.lab.appliance_ns]
        assert not netns.exists(a.lab.exchange_ns) and not netns.exists(a.lab.appliance_ns)
        assert lab.status(b.lab)["up"]  # the other lab is untouched
        assert lab.down(a.lab) == []  # nothing left to remove


@pytest.mark.lab
def test_down_stops_processes_left_in_the_lab():
    cfg = private_lab("prc")
    with built(cfg):
        proc = subprocess.Popen(["ip", "netns", "exec", cfg.lab.exchange_ns, "sleep", "300"])
        try:
            wait_for(
                lambda: (
                    proc.pid in lab.status(cfg.lab)["namespaces"][cfg.lab.exchange_ns]["processes"]
                ),
                10,
                "the process seen in the lab",
            )
            lab.down(cfg.lab)
            assert proc.wait(timeout=10) != 0
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.lab
def test_lab_cli_up_status_down_json():
    prefix = f"tc{os.getpid() % 100000:05d}"
    cli = [sys.executable, "-m", "host.cli", "lab"]
    try:
        up = subprocess.run(
            [*cli, "up", "--prefix", prefix, "--json"], capture_output=True, text=True, check=True
        )
        assert json.loads(up.stdout)["up"] is True
        st = subprocess.run(
            [*cli, "status", "--prefix", prefix], capture_output=True, text=True, check=True
        )
        assert f"lab {prefix}: up" in st.stdout and "feed-a" in st.stdout
    finally:
        down = subprocess.run(
            [*cli, "down", "--prefix", prefix, "--json"], capture_output=True, text=True
        )
    assert json.loads(down.stdout)["removed"] == [f"{prefix}-exch", f"{prefix}-appl"]
    st = subprocess.run(
        [*cli, "status", "--prefix", prefix, "--json"], capture_output=True, text=True
    )
    assert json.loads(st.stdout)["up"] is False


@pytest.mark.lab
def test_traffic_stays_in_the_lab():
    """A multicast sent on line A reaches the appliance end and nothing in the root ns."""
    cfg = private_lab("trf")
    with built(cfg):
        rx = Receiver(cfg)
        try:
            with netns.entered(cfg.lab.exchange_ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(
                socket.IPPROTO_IP,
                socket.IP_MULTICAST_IF,
                socket.inet_aton(cfg.lab.line_a.exchange_ip),
            )
            s.sendto(b"hello", (cfg.lab.line_a.group, cfg.lab.line_a.port))
            s.close()
            rx.wait_packets({"A": 1})
            assert [p.data for p in rx.line("A")] == [b"hello"]
            assert rx.line("B") == []
        finally:
            rx.close()
