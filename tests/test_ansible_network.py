"""The network roles, ``nic`` and ``irq_affinity`` (ansible/roles/), applied for real.

Unit tier (no root): the roles' modules against a simulated ntuple-capable NIC (the paths
a veth cannot take: combined channels, rings, ntuple rules added, kept, replaced, deleted
when no longer wanted, and the undo of all of it from the record of the original) and
IRQ discovery, placement and its undo against fake sysfs/procfs trees in each driver's
naming; the undo plans (``rule_plan``, ``readd_plan``, ``restore_plan``) as pure functions.

Lab tier (root, a private netns lab): ``provision.yml --tags network`` runs inside the
lab's appliance namespace against its veths (``ip netns exec NS ansible-playbook -c
local``), twice: the first run changes things and the second changes nothing; the
namespace then holds the channels, offloads and RPS/XPS masks the variables asked for;
veth's refusal of ntuple is a clear warning, or a clear failure when ntuple is required;
the boot-time re-apply scripts the roles install restore drifted settings; and ``tickwire
preflight`` reports the nic and irq_affinity stages not OK before and OK after. A second
lab takes the undo (``nic_state``/``irq_affinity_state: absent``) after an apply that
started from non-default settings (feed-b on 3 channels, receive aggregation on, an RPS
mask set): the undo puts those back, deletes the records and the boot-time units, and a
second undo changes nothing (veth has no rings or ntuple: those are the unit tier's).
Nothing outside the lab namespace is touched: the roles' install paths point into the test's
temporary directory, no packages are installed, irqbalance is left alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labnet import built, private_lab

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE = ROOT / "ansible"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK = VENV_BIN / "ansible-playbook"
TICKWIRE = VENV_BIN / "tickwire"

OFFLOADS_OFF = [
    "generic-receive-offload",
    "large-receive-offload",
    "rx-gro-hw",
    "rx-gro-list",
    "rx-udp-gro-forwarding",
]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


nicmod = _load("tickwire_nic", ANSIBLE / "roles/nic/library/tickwire_nic.py")
irqmod = _load("tickwire_irq", ANSIBLE / "roles/irq_affinity/library/tickwire_irq.py")


# --- unit: the nic module against a simulated NIC ---------------------------------------------
class FakeNic:
    """ethtool's view of an ntuple-capable NIC with combined channels (an ixgbe-like one)."""

    def __init__(self):
        self.combined, self.combined_max = 8, 16
        self.rings = {"rx": 512, "tx": 512}
        self.features = {
            "generic-receive-offload": [True, False],
            "large-receive-offload": [False, True],
            "rx-gro-hw": [True, True],
            "ntuple-filters": [False, False],
        }
        self.rules: dict[int, tuple[str, int, int]] = {}
        self.writes: list[list[str]] = []
        self.prints_id = True  # ethtool prints "Added rule with ID N" when it picks N

    def __call__(self, argv):
        flag, args = argv[1], argv[3:]
        if flag == "-l":
            return (
                0,
                (
                    f"Channel parameters for x:\nPre-set maximums:\nRX:\t\tn/a\nTX:\t\tn/a\n"
                    f"Other:\t\t1\nCombined:\t{self.combined_max}\nCurrent hardware "
                    f"settings:\nRX:\t\tn/a\nTX:\t\tn/a\nOther:\t\t1\nCombined:\t"
                    f"{self.combined}\n"
                ),
                "",
            )
        if flag == "-g":
            return (
                0,
                (
                    "Ring parameters for x:\nPre-set maximums:\nRX:\t\t4096\nRX Mini:\tn/a\n"
                    "RX Jumbo:\tn/a\nTX:\t\t4096\nCurrent hardware settings:\n"
                    f"RX:\t\t{self.rings['rx']}\nRX Mini:\tn/a\nRX Jumbo:\tn/a\n"
                    f"TX:\t\t{self.rings['tx']}\n"
                ),
                "",
            )
        if flag == "-k":
            return (
                0,
                "Features for x:\n"
                + "".join(
                    f"{n}: {'on' if on else 'off'}{' [fixed]' if fixed else ''}\n"
                    for n, (on, fixed) in self.features.items()
                ),
                "",
            )
        if flag == "-n":
            text = f"16 RX rings available\nTotal {len(self.rules)} rules\n\n"
            for loc, (ip, port, q) in sorted(self.rules.items()):
                text += (
                    f"Filter: {loc}\n\tRule Type: UDP over IPv4\n\tSrc IP addr: 0.0.0.0 "
                    f"mask: 255.255.255.255\n\tDest IP addr: {ip} mask: 0.0.0.0\n\tTOS: "
                    f"0x0 mask: 0xff\n\tSrc port: 0 mask: 0xffff\n\tDest port: {port} "
                    f"mask: 0x0\n\tAction: Direct to queue {q}\n\n"
                )
            return 0, text, ""
        self.writes.append(argv[1:])
        if flag == "-L":
            self.combined = int(args[1])
        elif flag == "-G":
            for kind, n in zip(args[::2], args[1::2], strict=True):
                self.rings[kind] = int(n)
        elif flag == "-K":
            for name, value in zip(args[::2], args[1::2], strict=True):
                if not self.features[name][1]:
                    self.features[name][0] = value == "on"
        elif flag == "-N" and args[0] == "delete":
            del self.rules[int(args[1])]
        elif flag == "-N":
            if not self.features["ntuple-filters"][0]:
                return 1, "", "rmgr: Cannot insert RX class rule: Operation not supported"
            if "loc" in args:
                loc = int(args[args.index("loc") + 1])
                if loc in self.rules:
                    return 1, "", "rmgr: Cannot insert RX class rule: Device or resource busy"
            else:
                loc = min(self.rules, default=1024) - 1
            self.rules[loc] = (args[3], int(args[5]), int(args[7]))
            if self.prints_id and "loc" not in args:
                return 0, f"Added rule with ID {loc}\n", ""
        return 0, "", ""


def _nic_params(**kw):
    p = {
        "interface": "lo",
        "channels": 4,
        "rx_ring": 2048,
        "tx_ring": 0,
        "offloads_off": [
            "generic-receive-offload",
            "large-receive-offload",
            "rx-gro-hw",
            "no-such-offload",
        ],
        "ntuple": True,
        "ntuple_required": True,
        "flows": [
            {"group": "233.54.12.1", "port": 26477, "queue": 2},
            {"group": "233.54.12.2", "port": 26478, "queue": 3},
        ],
    }
    p.update(kw)
    return p


def test_nic_module_sets_what_differs_then_nothing():
    nic = FakeNic()
    nic.rules[1023] = ("233.54.12.2", 26478, 0)  # steers line B to the wrong queue
    first = nicmod.apply(_nic_params(), nic, check=False)
    assert first["changed"] and first["ntuple_status"] == "installed"
    assert ["-L", "lo", "combined", "4"] in nic.writes and ["-G", "lo", "rx", "2048"] in nic.writes
    assert ["-K", "lo", "generic-receive-offload", "off"] in nic.writes
    assert ["-N", "lo", "delete", "1023"] in nic.writes
    assert sorted(nic.rules.values()) == [("233.54.12.1", 26477, 2), ("233.54.12.2", 26478, 3)]
    assert first["offloads_fixed"] == {"large-receive-offload": "off", "rx-gro-hw": "on"}
    assert first["offloads_absent"] == ["no-such-offload"]
    assert any("rx-gro-hw is on and fixed" in w for w in first["warnings"])
    nic.writes.clear()
    second = nicmod.apply(_nic_params(), nic, check=False)
    assert not second["changed"] and second["changes"] == [] and nic.writes == []


def test_nic_module_check_mode_writes_nothing():
    nic = FakeNic()
    res = nicmod.apply(_nic_params(), nic, check=True)
    assert res["changed"] and nic.writes == []


def test_nic_module_names_what_the_nic_cannot_take():
    nic = FakeNic()
    with pytest.raises(
        nicmod.NicError, match="nic_channels=32 is above the NIC's maximum of 16 combined"
    ):
        nicmod.apply(_nic_params(channels=32), nic, check=False)
    nic.features["ntuple-filters"] = [False, True]
    with pytest.raises(
        nicmod.NicError,
        match=r"lo refuses ntuple flow steering \(ntuple-filters: "
        r"off \[fixed\]\).*nic_ntuple_required is true",
    ):
        nicmod.apply(_nic_params(), nic, check=False)
    res = nicmod.apply(_nic_params(ntuple_required=False), nic, check=False)
    assert res["ntuple_status"] == "refused" and "lo refuses ntuple" in res["ntuple_message"]
    with pytest.raises(nicmod.NicError, match="nic_flows"):
        nicmod.apply(
            _nic_params(flows=[{"group": "not-an-ip", "port": 1, "queue": 0}]), nic, check=False
        )


# --- unit: the nic module's record of the original, and its undo ------------------------------
LINE_A, LINE_B = ("233.54.12.1", 26477, 2), ("233.54.12.2", 26478, 3)


def _nic_state(nic: FakeNic) -> tuple:
    feats = {n: on for n, (on, _) in nic.features.items()}
    return nic.combined, dict(nic.rings), feats, dict(nic.rules)


def test_nic_records_the_original_once_and_undo_restores_it(tmp_path):
    nic = FakeNic()
    nic.features["generic-receive-offload"][0] = True
    nic.features["ntuple-filters"][0] = True
    nic.rules[1000] = ("233.54.12.9", 30000, 5)  # someone else's rule, for another feed
    nic.rules[1023] = ("233.54.12.2", 26478, 0)  # someone else's, steering line B wrongly
    before = _nic_state(nic)
    p = _nic_params(state_dir=str(tmp_path))
    first = nicmod.apply(p, nic, check=False)
    assert first["changed"]
    record = json.loads((tmp_path / "nic-lo.json").read_text())
    assert record["original"] == {
        "channels": {"combined": 8},
        "rings": {"rx": 512},
        "features": {"generic-receive-offload": True},
    }
    assert sorted(r["location"] for r in record["rules"]) == sorted(
        loc for loc, rule in nic.rules.items() if rule in (LINE_A, LINE_B)
    )
    assert record["replaced"] == [
        {"location": 1023, "group": "233.54.12.2", "port": 26478, "queue": 0}
    ]
    # a later apply with other values changes the NIC but never the recorded original
    again = nicmod.apply(dict(p, channels=6, rx_ring=1024), nic, check=False)
    assert again["changed"] and nic.combined == 6
    later = json.loads((tmp_path / "nic-lo.json").read_text())
    assert later["original"] == record["original"]
    nic.writes.clear()
    check = nicmod.apply(dict(p, state="absent"), nic, check=True)
    assert check["changed"] and nic.writes == [] and (tmp_path / "nic-lo.json").exists()
    undo = nicmod.apply(dict(p, state="absent"), nic, check=False)
    assert undo["changed"] and undo["changes"] == check["changes"]
    assert _nic_state(nic) == before  # someone else's rules back where they were
    assert not (tmp_path / "nic-lo.json").exists()
    nic.writes.clear()
    assert not nicmod.apply(dict(p, state="absent"), nic, check=False)["changed"]
    assert nic.writes == []


def test_nic_turns_ntuple_off_again_on_undo(tmp_path):
    nic = FakeNic()  # ntuple-filters off: the role turns it on, the undo off again
    p = _nic_params(state_dir=str(tmp_path), channels=0, rx_ring=0, offloads_off=[])
    nicmod.apply(p, nic, check=False)
    assert nic.features["ntuple-filters"][0] and len(nic.rules) == 2
    nicmod.apply(dict(p, state="absent"), nic, check=False)
    assert not nic.features["ntuple-filters"][0] and nic.rules == {}


def test_nic_deletes_only_its_own_rules_once_unwanted(tmp_path):
    nic = FakeNic()
    nic.features["ntuple-filters"][0] = True
    nic.prints_id = False  # an ethtool that does not say where: the listing tells
    nic.rules[1000] = ("233.54.12.9", 30000, 5)
    p = _nic_params(state_dir=str(tmp_path))
    nicmod.apply(p, nic, check=False)
    ours = {rule: loc for loc, rule in nic.rules.items()}
    assert LINE_A in ours and LINE_B in ours
    one = dict(p, flows=[p["flows"][0]])  # line B's rule removed from the configuration
    res = nicmod.apply(one, nic, check=True)
    assert res["changes"] == [
        f"lo: delete rule {ours[LINE_B]} (233.54.12.2:26478 -> queue 3): no longer wanted"
    ]
    nicmod.apply(one, nic, check=False)
    assert sorted(nic.rules.values()) == [LINE_A, ("233.54.12.9", 30000, 5)]
    assert not nicmod.apply(one, nic, check=False)["changed"]
    nicmod.apply(dict(p, ntuple=False), nic, check=False)  # no flows wanted at all
    assert list(nic.rules.values()) == [("233.54.12.9", 30000, 5)]
    record = json.loads((tmp_path / "nic-lo.json").read_text())
    assert record["rules"] == []


def test_rule_plan_keeps_wanted_deletes_unwanted_and_forgets_vanished():
    tracked = [
        {"location": 1, "group": "233.0.0.1", "port": 1, "queue": 0},
        {"location": 2, "group": "233.0.0.2", "port": 2, "queue": 1},
        {"location": 3, "group": "233.0.0.3", "port": 3, "queue": 2},  # gone (reboot)
        {"location": 4, "group": "233.0.0.4", "port": 4, "queue": 3},  # 4 holds another now
    ]
    listed = [
        {"location": 1, "dst_ip": "233.0.0.1", "dst_port": 1, "queue": 0},
        {"location": 2, "dst_ip": "233.0.0.2", "dst_port": 2, "queue": 1},
        {"location": 4, "dst_ip": "233.0.0.9", "dst_port": 9, "queue": 3},
    ]
    delete, keep = nicmod.rule_plan(tracked, listed, {("233.0.0.1", 1, 0)})
    assert [r["location"] for r in delete] == [2] and [r["location"] for r in keep] == [1]
    replaced = [
        {"location": 7, "group": "233.0.0.1", "port": 1, "queue": 5},  # its flow still ours
        {"location": 8, "group": "233.0.0.2", "port": 2, "queue": 5},  # free again: re-add
        {"location": 9, "group": "233.0.0.9", "port": 9, "queue": 5},  # re-added by others
    ]
    readd, still = nicmod.readd_plan(replaced, listed[:1] + listed[2:], {("233.0.0.1", 1, 0)})
    assert [r["location"] for r in readd] == [8] and [r["location"] for r in still] == [7]


def test_restore_plan_puts_back_only_what_differs_and_can_change():
    original = {
        "channels": {"combined": 8},
        "rings": {"rx": 512, "tx": None},
        "features": {"generic-receive-offload": True, "rx-gro-hw": True, "gone": True},
    }
    current = {
        "channels": {"combined": 4},
        "rings": {"rx": 512, "tx": 256},
        "features": {"generic-receive-offload": (False, False), "rx-gro-hw": (False, True)},
    }
    assert nicmod.restore_plan("ens1", original, current) == [
        (
            ["-K", "ens1", "generic-receive-offload", "on"],
            "ens1: restore generic-receive-offload on",
        ),
        (["-L", "ens1", "combined", "8"], "ens1: restore combined channels 4 -> 8"),
    ]
    current["channels"]["combined"] = 8
    current["features"]["generic-receive-offload"] = (True, False)
    assert nicmod.restore_plan("ens1", original, current) == []


# --- unit: IRQ discovery in each driver's naming ----------------------------------------------
INTERRUPTS = """\
  CPU0  CPU1  CPU2  CPU3
  24:  1  0  0  0  IO-APIC  5-edge  ACPI:Ged
 100:  0  0  0  0  IR-PCI-MSIX-0000:3b:00.0  0-edge  i40e-0000:3b:00.0:misc
 101:  900  0  0  0  IR-PCI-MSIX-0000:3b:00.0  1-edge  i40e-feed0-TxRx-0
 102:  0  900  0  0  IR-PCI-MSIX-0000:3b:00.0  2-edge  i40e-feed0-TxRx-1
 103:  0  0  900  0  IR-PCI-MSIX-0000:3b:00.0  3-edge  i40e-feed0-TxRx-2
 110:  0  0  0  0  IR-PCI-MSIX-0000:5e:00.0  0-edge  mlx5_async@pci:0000:5e:00.0
 111:  0  0  0  0  IR-PCI-MSIX-0000:5e:00.0  1-edge  mlx5_comp0@pci:0000:5e:00.0
 112:  0  0  0  0  IR-PCI-MSIX-0000:5e:00.0  2-edge  mlx5_comp1@pci:0000:5e:00.0
 120:  0  0  0  0  PCI-MSIX-0000:00:03.0  1-edge  virtio2-input.0
 121:  0  0  0  0  PCI-MSIX-0000:00:03.0  2-edge  virtio2-output.0
 122:  0  0  0  0  PCI-MSIX-0000:00:03.0  3-edge  virtio2-input.1
NMI:  0  0  0  0  Non-maskable interrupts
"""


@pytest.fixture
def fake_host(tmp_path):
    """A sysfs and procfs with an i40e (feed0), an mlx5 (feed1), a virtio-net (eth0) and a
    veth (feed-a), every IRQ on CPU 0-3."""
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    devices = {
        "feed0": ("pci0000:3a/0000:3b:00.0", range(100, 104), 3),
        "feed1": ("pci0000:5d/0000:5e:00.0", range(110, 113), 2),
        "eth0": ("pci0000:00/0000:00:03.0/virtio2", range(120, 123), 2),
        "feed-a": (None, (), 2),
    }
    for ifname, (dev, irqs, nq) in devices.items():
        net = sys_root / "class/net" / ifname
        for q in range(nq):
            for kind, leaf in (("rx", "rps_cpus"), ("tx", "xps_cpus")):
                (net / "queues" / f"{kind}-{q}").mkdir(parents=True)
                (net / "queues" / f"{kind}-{q}" / leaf).write_text("00000000,00000000\n")
        if dev is None:
            continue
        devdir = sys_root / "devices" / dev
        msi = (devdir.parent if dev.endswith("virtio2") else devdir) / "msi_irqs"
        msi.mkdir(parents=True, exist_ok=True)
        devdir.mkdir(parents=True, exist_ok=True)
        for irq in irqs:
            (msi / str(irq)).write_text("msix\n")
        (net / "device").symlink_to(devdir)
    for line in INTERRUPTS.splitlines()[1:]:
        head = line.split(":")[0].strip()
        if head.isdigit():
            (proc_root / "irq" / head).mkdir(parents=True)
            (proc_root / "irq" / head / "smp_affinity_list").write_text("0-3\n")
    (proc_root / "interrupts").write_text(INTERRUPTS)
    return str(sys_root), str(proc_root)


@pytest.mark.parametrize(
    ("ifname", "queues", "want"),
    [
        ("feed0", [0, 2], {0: [(101, "i40e-feed0-TxRx-0")], 2: [(103, "i40e-feed0-TxRx-2")]}),
        ("feed1", [1], {1: [(112, "mlx5_comp1@pci:0000:5e:00.0")]}),
        ("eth0", [0], {0: [(120, "virtio2-input.0"), (121, "virtio2-output.0")]}),
    ],
)
def test_queue_irqs_are_found_in_each_drivers_naming(fake_host, ifname, queues, want):
    found, seen = irqmod.queue_irqs(ifname, queues, *fake_host)
    assert found == want and seen


def test_irq_module_places_queues_then_changes_nothing(fake_host):
    sys_root, proc_root = fake_host
    p = {
        "interface": "feed0",
        "queues": [{"queue": 0, "cpu": 2}, {"queue": 1, "cpu": 3}],
        "placement": "consumer",
        "rps_mask": "0",
        "xps_mask": "c",
        "sys_root": sys_root,
        "proc_root": proc_root,
    }
    res = irqmod.apply(p, check=False)
    assert res["changed"] and {(i["irq"], i["cpus"]) for i in res["irqs"]} == {
        (101, "2"),
        (102, "3"),
    }
    assert Path(proc_root, "irq/101/smp_affinity_list").read_text().strip() == "2"
    assert Path(proc_root, "irq/103/smp_affinity_list").read_text().strip() == "0-3"  # not listed
    assert Path(sys_root, "class/net/feed0/queues/tx-2/xps_cpus").read_text().strip() == "c"
    assert not irqmod.apply(p, check=False)["changed"]
    hk = dict(p, placement="housekeeping", housekeeping_cpus="0-1")
    assert irqmod.apply(hk, check=True)["changed"]
    assert Path(proc_root, "irq/101/smp_affinity_list").read_text().strip() == "2"  # check mode
    irqmod.apply(hk, check=False)
    assert Path(proc_root, "irq/102/smp_affinity_list").read_text().strip() == "0-1"


def test_irq_module_records_the_original_once_and_undo_restores_it(fake_host, tmp_path):
    sys_root, proc_root = fake_host
    Path(sys_root, "class/net/feed0/queues/rx-1/rps_cpus").write_text("00000000,00000002\n")
    p = {
        "interface": "feed0",
        "queues": [{"queue": 0, "cpu": 2}],
        "rps_mask": "1",
        "xps_mask": "",
        "sys_root": sys_root,
        "proc_root": proc_root,
        "state_dir": str(tmp_path / "state"),
    }
    assert irqmod.apply(p, check=False)["changed"]
    record_file = tmp_path / "state/irq-feed0.json"
    record = json.loads(record_file.read_text())
    assert record["original"] == {
        "irqs": {"101": {"name": "i40e-feed0-TxRx-0", "cpus": "0-3"}},
        "rps_cpus": {"rx-0": "0", "rx-1": "2", "rx-2": "0"},
    }
    irqmod.apply(dict(p, queues=[{"queue": 0, "cpu": 3}], rps_mask="f"), check=False)
    assert json.loads(record_file.read_text()) == record  # the original stays the original
    undo = dict(p, state="absent")
    assert irqmod.apply(undo, check=True)["changed"]
    assert Path(proc_root, "irq/101/smp_affinity_list").read_text().strip() == "3"
    assert irqmod.apply(undo, check=False)["changed"]
    assert Path(proc_root, "irq/101/smp_affinity_list").read_text().strip() == "0-3"
    rps = {
        q: Path(sys_root, f"class/net/feed0/queues/{q}/rps_cpus").read_text()
        for q in record["original"]["rps_cpus"]
    }
    assert {q: irqmod.mask_value(v) for q, v in rps.items()} == {"rx-0": 0, "rx-1": 2, "rx-2": 0}
    assert not record_file.exists()
    assert not irqmod.apply(undo, check=False)["changed"]


def test_irq_restore_plan_skips_irqs_and_queues_that_are_gone():
    original = {
        "irqs": {
            "101": {"name": "i40e-feed0-TxRx-0", "cpus": "0-3"},
            "102": {"name": "i40e-feed0-TxRx-1", "cpus": "0-3"},
            "103": {"name": "i40e-feed0-TxRx-2", "cpus": "0-3"},
        },
        "rps_cpus": {"rx-0": "0", "rx-3": "0"},
    }
    current = {
        "irqs": {
            "101": (["i40e-feed0-TxRx-0"], "2"),
            "102": (["nvme0q1"], "1"),  # re-created: the number serves something else now
            "103": (["i40e-feed0-TxRx-2"], "0-3"),
        },
        "rps_cpus": {"rx-0": "00000000,00000001"},  # rx-3 gone with fewer channels
    }
    writes, notes = irqmod.restore_plan("feed0", original, current)
    assert writes == [
        ("irqs", "101", "0-3", "IRQ 101 (i40e-feed0-TxRx-0): CPUs 2 -> 0-3"),
        ("rps_cpus", "rx-0", "0", "feed0 rx-0: rps_cpus 1 -> 0"),
    ]
    assert "IRQ 102 (i40e-feed0-TxRx-1) is gone or serves something else" in notes[0]
    assert "feed0 rx-3 is gone" in notes[1]


def test_irq_module_reports_veth_and_names_unknown_irqs(fake_host):
    sys_root, proc_root = fake_host
    res = irqmod.apply(
        {
            "interface": "feed-a",
            "queues": [{"queue": 0, "cpu": 1}],
            "rps_mask": "1",
            "sys_root": sys_root,
            "proc_root": proc_root,
        },
        check=False,
    )
    assert res["irqs"] == [] and "feed-a is a virtual interface" in res["notes"][0]
    with pytest.raises(
        irqmod.IrqError,
        match=r"feed1: no IRQ found for queue\(s\) 5; the "
        r"device's IRQs are named: mlx5_async@pci:0000:5e:00.0, mlx5_comp0",
    ):
        irqmod.apply(
            {
                "interface": "feed1",
                "queues": [{"queue": 5, "cpu": 1}],
                "sys_root": sys_root,
                "proc_root": proc_root,
            },
            check=False,
        )


def test_irq_discovery_on_this_hosts_own_nic():
    """Read-only: the first interface of this host with a PCI device and MSI vectors."""
    for ifname in sorted(os.listdir("/sys/class/net")):
        found = irqmod.device_irqs(ifname, "/sys")
        if found and found[1]:
            break
    else:
        pytest.skip("no network interface with MSI vectors in /sys/class/net")
    by_queue, seen = irqmod.queue_irqs(ifname, [0], "/sys", "/proc")
    assert by_queue[0], f"{ifname}: no IRQ recognised for queue 0 among {seen}"


# --- lab: the playbook for real in a namespace -------------------------------------------------
def _ns_run(ns: str, argv: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _ns_read(ns: str, path: str) -> str:
    return _ns_run(ns, ["cat", path]).stdout.strip()


class Provision:
    """Runs ``provision.yml --tags network`` in the lab's appliance namespace."""

    def __init__(self, cfg, tmp: Path):
        self.ns, self.tmp = cfg.lab.appliance_ns, tmp
        ncpu = os.cpu_count() or 1
        self.cpu = 1 if ncpu > 1 else 0
        self.inventory = tmp / "inventory.yml"
        self.inventory.write_text(
            json.dumps(
                {
                    "tickwire": {
                        "hosts": {
                            "localhost": {
                                "ansible_connection": "local",
                                "ansible_python_interpreter": sys.executable,
                                "ansible_become": False,
                            }
                        }
                    }
                }
            )
        )
        lines = cfg.lab.lines
        self.vars = {
            "nic_interfaces": ["feed-a", "feed-b"],
            "nic_channels": 2,
            "nic_offloads_off": OFFLOADS_OFF,
            "nic_ntuple": True,
            "nic_ntuple_required": False,
            "nic_flows": [
                {
                    "interface": "feed-a",
                    "group": lines["A"].group,
                    "port": lines["A"].port,
                    "queue": 0,
                },
                {
                    "interface": "feed-b",
                    "group": lines["B"].group,
                    "port": lines["B"].port,
                    "queue": 1,
                },
            ],
            "nic_packages": [],
            "nic_persist_script": str(tmp / "libexec/tickwire_nic.py"),
            "nic_persist_config": str(tmp / "etc/nic.json"),
            "nic_persist_unit_dir": str(tmp / "units"),
            "irq_affinity_queues": [
                {"interface": "feed-a", "queue": 0, "cpu": self.cpu},
                {"interface": "feed-b", "queue": 1, "cpu": self.cpu},
            ],
            "irq_affinity_placement": "consumer",
            "irq_affinity_rps_mask": "1",
            "irq_affinity_xps_mask": "1",
            "irq_affinity_disable_irqbalance": False,
            "irq_affinity_persist_script": str(tmp / "libexec/tickwire_irq.py"),
            "irq_affinity_persist_config": str(tmp / "etc/irq_affinity.json"),
            "irq_affinity_persist_unit_dir": str(tmp / "units"),
            "nic_state_dir": str(tmp / "state"),
            "irq_affinity_state_dir": str(tmp / "state"),
        }

    def run(self, *flags: str, **overrides) -> tuple[subprocess.CompletedProcess, dict, float]:
        varfile = self.tmp / "vars.json"
        varfile.write_text(json.dumps(dict(self.vars, **overrides)))
        env = dict(
            os.environ,
            ANSIBLE_STDOUT_CALLBACK="json",
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_HOME=str(self.tmp / "ansible-home"),
            ANSIBLE_LOCAL_TEMP=str(self.tmp / "ansible-tmp"),
            ANSIBLE_REMOTE_TEMP=str(self.tmp / "ansible-tmp"),
            ANSIBLE_RETRY_FILES_ENABLED="0",
            ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        )
        t0 = time.monotonic()
        done = _ns_run(
            self.ns,
            [
                PLAYBOOK,
                "-i",
                self.inventory,
                "provision.yml",
                "--tags",
                "network",
                "-e",
                f"@{varfile}",
                *flags,
            ],
            cwd=ANSIBLE,
            env=env,
        )
        took = time.monotonic() - t0
        try:
            out = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            raise AssertionError(
                f"no JSON from ansible-playbook:\n{done.stdout}\n{done.stderr}"
            ) from None
        return done, out, took


def _stats(out: dict) -> dict:
    return out["stats"]["localhost"]


def _task(out: dict, name: str) -> dict:
    for play in out["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].split(" : ", 1)[-1] == name:
                return task["hosts"]["localhost"]
    raise AssertionError(f"no task {name!r} in the run")


TUNE = "Tune each feed interface, or restore its recorded original settings"
PLACE = "Place each feed queue's IRQs and set the RPS/XPS masks, or restore the recorded ones"


def _preflight(cfg_path: Path, ns: str, *stages: str) -> dict:
    args = [TICKWIRE, "preflight", "--config", cfg_path, "--json"]
    for s in stages:
        args += ["--stage", s]
    done = _ns_run(ns, args)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


def _stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


def _host_config(cfg, path: Path, cpu: int) -> Path:
    """A config whose [run] is the lab's two lines and whose [host] promises what the
    playbook's variables applied (isolated_cpus only so that preflight checks the queues'
    IRQ placement, which on a veth is "no device IRQs")."""
    a, b = cfg.lab.line_a, cfg.lab.line_b
    offloads = ", ".join(f'"{n}"' for n in OFFLOADS_OFF)
    path.write_text(f"""\
[lab]
prefix = "{cfg.lab.prefix}"
queues = {cfg.lab.queues}

[run]
netns = "{cfg.lab.appliance_ns}"
core = {cpu}

[run.line_a]
interface = "{a.appliance_if}"
queue = 0
group = "{a.group}"
port = {a.port}

[run.line_b]
interface = "{b.appliance_if}"
queue = 1
group = "{b.group}"
port = {b.port}

[host]
isolated_cpus = "{cpu}"
irq_placement = "consumer"
rps_mask = "1"
xps_mask = "1"
channels = 2
offloads_off = [{offloads}]
ntuple = false
""")
    return path


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """The lab, the preflight before provisioning, and the playbook run twice."""
    if shutil.which("ethtool") is None or not PLAYBOOK.exists():
        pytest.skip("needs ethtool and ansible-playbook (pip install -e .[provision])")
    tmp = tmp_path_factory.mktemp("network")
    cfg = private_lab("ans", queues=4)
    with built(cfg):
        ns = cfg.lab.appliance_ns
        for ifname in ("feed-a", "feed-b"):  # a real NIC's defaults: receive aggregation on
            done = _ns_run(
                ns, ["ethtool", "-K", ifname, "generic-receive-offload", "on", "rx-gro-list", "on"]
            )
            assert done.returncode == 0, done.stderr
        prov = Provision(cfg, tmp)
        host_cfg = _host_config(cfg, tmp / "tickwire.toml", prov.cpu)
        before = _preflight(host_cfg, ns, "nic", "irq_affinity")
        check = prov.run("--check")
        checked = {i: _ns_run(ns, ["ethtool", "-l", i]).stdout for i in ("feed-a", "feed-b")}
        runs = [prov.run(), prov.run()]
        yield {
            "cfg": cfg,
            "ns": ns,
            "prov": prov,
            "runs": runs,
            "before": before,
            "host_cfg": host_cfg,
            "check": check,
            "checked": checked,
        }


@pytest.mark.lab
def test_first_run_changes_and_second_changes_nothing(applied):
    (done1, out1, _), (done2, out2, _) = applied["runs"]
    assert done1.returncode == 0, done1.stdout[-3000:]
    assert _stats(out1)["failures"] == 0 and _stats(out1)["changed"] > 0
    assert done2.returncode == 0, done2.stdout[-3000:]
    changed = [
        t["task"]["name"]
        for p in out2["plays"]
        for t in p["tasks"]
        if t["hosts"].get("localhost", {}).get("changed")
    ]
    assert _stats(out2)["failures"] == 0 and _stats(out2)["changed"] == 0, changed


@pytest.mark.lab
def test_check_mode_reports_changes_and_makes_none(applied):
    done, out, _ = applied["check"]
    assert done.returncode == 0 and _stats(out)["changed"] > 0, done.stdout[-3000:]
    for ifname, text in applied["checked"].items():
        assert nicmod.parse_channels(text)["current"]["rx"] == 4, ifname
    tune = _task(out, TUNE)
    assert any("rx channels 4 -> 2" in c for item in tune["results"] for c in item["changes"])


@pytest.mark.lab
def test_the_namespace_holds_what_the_variables_asked_for(applied):
    ns = applied["ns"]
    for ifname in ("feed-a", "feed-b"):
        feats = nicmod.parse_features(_ns_run(ns, ["ethtool", "-k", ifname]).stdout)
        assert not any(feats[n][0] for n in OFFLOADS_OFF), {n: feats[n] for n in OFFLOADS_OFF}
        ch = nicmod.parse_channels(_ns_run(ns, ["ethtool", "-l", ifname]).stdout)
        assert ch["current"]["rx"] == 2 and ch["current"]["tx"] == 2 and ch["max"]["rx"] == 4
        queues = _ns_run(ns, ["ls", f"/sys/class/net/{ifname}/queues"]).stdout.split()
        assert queues == ["rx-0", "rx-1", "tx-0", "tx-1"]
        for q in (0, 1):
            base = f"/sys/class/net/{ifname}/queues"
            assert irqmod.mask_value(_ns_read(ns, f"{base}/rx-{q}/rps_cpus")) == 1
            assert irqmod.mask_value(_ns_read(ns, f"{base}/tx-{q}/xps_cpus")) == 1
    # the root namespace's /sys shows no feed-a: the test ran nothing outside the lab
    assert not os.path.exists("/sys/class/net/feed-a")


@pytest.mark.lab
def test_veth_refusing_ntuple_is_a_clear_warning(applied):
    _, out1, _ = applied["runs"][0]
    tune = _task(out1, TUNE)
    for item in tune["results"]:
        assert item["ntuple_status"] == "refused", item
        assert any(
            f"{item['item']} refuses ntuple flow steering (ntuple-filters: off [fixed])" in w
            and "continuing without it" in w
            for w in tune["warnings"]
        ), tune["warnings"]
        assert item["offloads_fixed"]["large-receive-offload"] == "off"
    active = _task(out1, "Record whether the flow-steering rules are in place")
    assert active["ansible_facts"]["nic_ntuple_active"] is False
    irq = _task(out1, PLACE)
    for item in irq["results"]:
        assert (
            f"{item['item']} is a virtual interface (no device): it has no IRQs" in item["notes"][0]
        )


@pytest.mark.lab
def test_veth_refusing_required_ntuple_fails_clearly(applied):
    done, out, _ = applied["prov"].run(nic_ntuple_required=True)
    assert done.returncode != 0 and _stats(out)["failures"] == 1
    msgs = [item.get("msg", "") for item in _task(out, TUNE)["results"]]
    assert all(
        "ntuple flow steering refused: " in m
        and "refuses ntuple flow steering" in m
        and "nic_ntuple_required is true" in m
        for m in msgs
    ), msgs


@pytest.mark.lab
def test_boot_scripts_restore_drifted_settings(applied):
    """What the roles installed for boot (script, settings; unit) puts back a driver reset."""
    ns, tmp = applied["ns"], applied["prov"].tmp
    units = tmp / "units"
    for unit in ("tickwire-nic.service", "tickwire-irq-affinity.service"):
        text = (units / unit).read_text()
        assert text.startswith("#") and "--boot" in text
        assert r"sys-subsystem-net-devices-feed\x2da.device" in text
        assert (units / "multi-user.target.wants" / unit).resolve() == units / unit
    # drift: a reset NIC comes back with aggregation on, all queues, RPS off
    assert _ns_run(ns, ["ethtool", "-K", "feed-a", "generic-receive-offload", "on"]).returncode == 0
    assert _ns_run(ns, ["ethtool", "-L", "feed-b", "rx", "4", "tx", "4"]).returncode == 0
    _ns_run(ns, ["sh", "-c", "echo 0 > /sys/class/net/feed-a/queues/rx-1/rps_cpus"])
    for script, conf in (("tickwire_nic.py", "nic.json"), ("tickwire_irq.py", "irq_affinity.json")):
        done = _ns_run(ns, [sys.executable, tmp / "libexec" / script, "--boot", tmp / "etc" / conf])
        assert done.returncode == 0, done.stderr
        assert re.search(r"(offloads off|channels|rps_cpus)", done.stdout), done.stdout
    feats = nicmod.parse_features(_ns_run(ns, ["ethtool", "-k", "feed-a"]).stdout)
    assert feats["generic-receive-offload"][0] is False
    channels = nicmod.parse_channels(_ns_run(ns, ["ethtool", "-l", "feed-b"]).stdout)
    assert channels["current"]["rx"] == 2
    assert irqmod.mask_value(_ns_read(ns, "/sys/class/net/feed-a/queues/rx-1/rps_cpus")) == 1
    done, out, _ = applied["prov"].run()  # and Ansible agrees nothing is left to do
    assert done.returncode == 0 and _stats(out)["changed"] == 0


@pytest.mark.lab
def test_preflight_is_not_ok_before_and_ok_after(applied):
    before = applied["before"]
    for stage in ("nic", "irq_affinity"):
        assert _stage(before, stage)["status"] != "OK", _stage(before, stage)
    after = _preflight(applied["host_cfg"], applied["ns"], "nic", "irq_affinity")
    for stage in ("nic", "irq_affinity"):
        assert _stage(after, stage)["status"] == "OK", _stage(after, stage)


# --- lab: the undo, in a lab of its own --------------------------------------------------------
def _nic_now(ns: str, ifname: str) -> tuple[int, int, bool, bool]:
    """(rx channels, tx channels, GRO on, rx-gro-list on) of a lab interface."""
    ch = nicmod.parse_channels(_ns_run(ns, ["ethtool", "-l", ifname]).stdout)["current"]
    feats = nicmod.parse_features(_ns_run(ns, ["ethtool", "-k", ifname]).stdout)
    return ch["rx"], ch["tx"], feats["generic-receive-offload"][0], feats["rx-gro-list"][0]


def _masks_now(ns: str, ifname: str) -> dict[str, int]:
    base = f"/sys/class/net/{ifname}/queues"
    return {
        f"{q}/{leaf}": irqmod.mask_value(_ns_read(ns, f"{base}/{q}/{leaf}"))
        for q in _ns_run(ns, ["ls", base]).stdout.split()
        for leaf in (("rps_cpus",) if q.startswith("rx") else ("xps_cpus",))
    }


def _changed_tasks(out: dict) -> list[str]:
    return [
        t["task"]["name"]
        for p in out["plays"]
        for t in p["tasks"]
        if t["hosts"].get("localhost", {}).get("changed")
    ]


@pytest.fixture(scope="module")
def undone(tmp_path_factory):
    """A lab whose interfaces start away from veth's defaults (feed-b on 3 channels,
    receive aggregation on, feed-a's rx-0 with an RPS mask): what it was, the playbook
    applied twice, what the records said, then undone in check mode, for real, and again."""
    if shutil.which("ethtool") is None or not PLAYBOOK.exists():
        pytest.skip("needs ethtool and ansible-playbook (pip install -e .[provision])")
    tmp = tmp_path_factory.mktemp("network-undo")
    cfg = private_lab("anu", queues=4)
    with built(cfg):
        ns = cfg.lab.appliance_ns
        for argv in (
            ["ethtool", "-K", "feed-a", "generic-receive-offload", "on", "rx-gro-list", "on"],
            ["ethtool", "-K", "feed-b", "generic-receive-offload", "on", "rx-gro-list", "on"],
            ["ethtool", "-L", "feed-b", "rx", "3", "tx", "3"],
            ["sh", "-c", "echo 2 > /sys/class/net/feed-a/queues/rx-0/rps_cpus"],
        ):
            done = _ns_run(ns, argv)
            assert done.returncode == 0, (argv, done.stderr)
        prov = Provision(cfg, tmp)
        ifs = ("feed-a", "feed-b")
        original = {i: (_nic_now(ns, i), _masks_now(ns, i)) for i in ifs}
        applies = [prov.run(), prov.run()]
        applied = {i: (_nic_now(ns, i), _masks_now(ns, i)) for i in ifs}
        state = tmp / "state"
        records = {f.name: json.loads(f.read_text()) for f in sorted(state.glob("*.json"))}
        only_a = {  # feed-b dropped from the configuration: undone on this run
            "nic_interfaces": ["feed-a"],
            "nic_flows": [f for f in prov.vars["nic_flows"] if f["interface"] == "feed-a"],
            "irq_affinity_queues": [
                q for q in prov.vars["irq_affinity_queues"] if q["interface"] == "feed-a"
            ],
        }
        dropped = prov.run(**only_a)
        after_drop = {i: (_nic_now(ns, i), _masks_now(ns, i)) for i in ifs}
        records_after_drop = sorted(f.name for f in state.glob("*.json"))
        assert prov.run()[0].returncode == 0  # and feed-b back in
        absent = {"nic_state": "absent", "irq_affinity_state": "absent"}
        check = prov.run("--check", **absent)
        after_check = {i: (_nic_now(ns, i), _masks_now(ns, i)) for i in ifs}
        undos = [prov.run(**absent), prov.run(**absent)]
        yield {
            "original": original,
            "applied": applied,
            "applies": applies,
            "records": records,
            "dropped": dropped,
            "after_drop": after_drop,
            "records_after_drop": records_after_drop,
            "check": check,
            "after_check": after_check,
            "undos": undos,
            "now": {i: (_nic_now(ns, i), _masks_now(ns, i)) for i in ifs},
            "tmp": tmp,
        }


@pytest.mark.lab
def test_apply_records_the_settings_it_found(undone):
    for done, out, _ in undone["applies"]:
        assert done.returncode == 0 and _stats(out)["failures"] == 0, done.stdout[-3000:]
    assert _stats(undone["applies"][0][1])["changed"] > 0
    assert _stats(undone["applies"][1][1])["changed"] == 0, _changed_tasks(undone["applies"][1][1])
    for ifname in ("feed-a", "feed-b"):
        (rx, tx, *_), _ = undone["applied"][ifname]
        assert (rx, tx) == (2, 2)  # the apply did change the interfaces
    records = undone["records"]
    assert set(records) == {
        "nic-feed-a.json",
        "nic-feed-b.json",
        "irq-feed-a.json",
        "irq-feed-b.json",
    }
    assert records["nic-feed-b.json"]["original"]["channels"] == {"rx": 3, "tx": 3}
    assert records["nic-feed-a.json"]["original"]["channels"] == {"rx": 4, "tx": 4}
    assert records["nic-feed-a.json"]["original"]["features"] == {
        "generic-receive-offload": True,
        "rx-gro-list": True,
    }
    assert records["irq-feed-a.json"]["original"]["rps_cpus"]["rx-0"] == "2"


@pytest.mark.lab
def test_an_interface_dropped_from_the_configuration_is_undone(undone):
    done, out, _ = undone["dropped"]
    assert done.returncode == 0 and _stats(out)["failures"] == 0, done.stdout[-3000:]
    assert undone["after_drop"]["feed-b"] == undone["original"]["feed-b"]
    assert undone["after_drop"]["feed-a"] == undone["applied"]["feed-a"]
    assert undone["records_after_drop"] == ["irq-feed-a.json", "nic-feed-a.json"]


@pytest.mark.lab
def test_undo_in_check_mode_reports_and_changes_nothing(undone):
    done, out, _ = undone["check"]
    assert done.returncode == 0 and _stats(out)["changed"] > 0, done.stdout[-3000:]
    assert undone["after_check"] == undone["applied"]
    changes = [c for item in _task(out, TUNE)["results"] for c in item.get("changes", [])]
    assert "feed-b: restore rx channels 2 -> 3, tx channels 2 -> 3" in changes, changes


@pytest.mark.lab
def test_undo_restores_the_original_and_a_second_undo_changes_nothing(undone):
    (done1, out1, _), (done2, out2, _) = undone["undos"]
    assert done1.returncode == 0 and _stats(out1)["failures"] == 0, done1.stdout[-3000:]
    assert _stats(out1)["changed"] > 0
    assert undone["now"] == undone["original"]
    tmp = undone["tmp"]
    assert list((tmp / "state").glob("*.json")) == []
    assert sorted(p.name for p in (tmp / "units").rglob("*.service")) == []
    assert not (tmp / "etc/nic.json").exists() and not (tmp / "libexec/tickwire_irq.py").exists()
    assert done2.returncode == 0 and _stats(out2)["changed"] == 0, _changed_tasks(out2)
