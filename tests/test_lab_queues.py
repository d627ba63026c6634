"""The lab's veth pairs: no end sends on a queue its peer cannot receive on, also after the
appliance's NIC role lowers the appliance end's channels (the kernel otherwise warns, per
packet: "feed-a received packet on queue 2, but number of RX queues is 2")."""

import subprocess

import pytest

from tests.labnet import built, private_lab

pytestmark = pytest.mark.lab


def _queues(ns: str, ifname: str) -> tuple[int, int]:
    """``(rx, tx)``: the queues the kernel uses now (sysfs, as seen inside ``ns``)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ls", f"/sys/class/net/{ifname}/queues"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sum(q.startswith("rx-") for q in out), sum(q.startswith("tx-") for q in out)


def test_no_end_sends_on_a_queue_its_peer_lacks():
    cfg = private_lab("veq", queues=4)
    lab = cfg.lab
    with built(cfg):
        line = lab.line_a
        # what the nic role does with nic_channels = 2 (tests/test_ansible_network.py)
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                lab.appliance_ns,
                "ethtool",
                "-L",
                line.appliance_if,
                "rx",
                "2",
                "tx",
                "2",
            ],
            check=True,
        )
        for letter, ln in lab.lines.items():
            ex_rx, ex_tx = _queues(lab.exchange_ns, ln.exchange_if)
            ap_rx, ap_tx = _queues(lab.appliance_ns, ln.appliance_if)
            assert ap_rx == (2 if letter == "A" else 4)  # lowered on A, as created on B
            assert ex_tx <= ap_rx, (letter, ex_tx, ap_rx)
            assert ap_tx <= ex_rx, (letter, ap_tx, ex_rx)
