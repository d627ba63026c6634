"""PTP as the appliance runs it: ``tickwire preflight``'s ptp stage, which asks ptp4l over
its own management socket (pmc) for the port's state and the offset from the master, and
``tickwire calibrate --wait-ptp``, the provisioned step that waits for it.

pmc's output is parsed from answers real ptp4l instances gave (linuxptp 3.1.1); the stage
runs against fake /proc and /etc trees with pmc's answer injected; then for real: a
grandmaster and a client ptp4l with software timestamps on a veth pair between two network
namespaces, and timemaster running the ptp role's own configuration over two such pairs.
The client ptp4l instances run without CAP_SYS_TIME: their servo locks (the port goes
SLAVE) while every adjustment of the clock they share with this machine is refused, so no
test moves the machine's clock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from dataplane import ethtool
from host import config
from host.appliance import clock, preflight
from host.appliance.preflight import NOT_CONFIGURED, OK, PARTIAL, SKIPPED

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent

# --- pmc's answers, as real ptp4l 3.1.1 instances gave them ---------------------------------
# (pmc ends each response's head line with a space: \x20)
# `pmc -u -b 0 -s SOCKET -d 7 'GET PORT_PROPERTIES_NP' 'GET PORT_DATA_SET'
#  'GET CURRENT_DATA_SET' 'GET TIME_STATUS_NP'` to a client locked to a grandmaster
SLAVE = """\
sending: GET PORT_PROPERTIES_NP
sending: GET PORT_DATA_SET
\t5ee8d7.fffe.f9ed7a-1 seq 0 RESPONSE MANAGEMENT PORT_PROPERTIES_NP\x20
\t\tportIdentity            5ee8d7.fffe.f9ed7a-1
\t\tportState               SLAVE
\t\ttimestamping            SOFTWARE
\t\tinterface               twptps0
sending: GET CURRENT_DATA_SET
sending: GET TIME_STATUS_NP
\t5ee8d7.fffe.f9ed7a-1 seq 1 RESPONSE MANAGEMENT PORT_DATA_SET\x20
\t\tportIdentity            5ee8d7.fffe.f9ed7a-1
\t\tportState               SLAVE
\t\tlogMinDelayReqInterval  0
\t\tpeerMeanPathDelay       0
\t\tlogAnnounceInterval     1
\t\tannounceReceiptTimeout  3
\t\tlogSyncInterval         0
\t\tdelayMechanism          1
\t\tlogMinPdelayReqInterval 0
\t\tversionNumber           2
\t5ee8d7.fffe.f9ed7a-0 seq 2 RESPONSE MANAGEMENT CURRENT_DATA_SET\x20
\t\tstepsRemoved     1
\t\toffsetFromMaster -35.0
\t\tmeanPathDelay    2189.0
\t5ee8d7.fffe.f9ed7a-0 seq 3 RESPONSE MANAGEMENT TIME_STATUS_NP\x20
\t\tmaster_offset              -35
\t\tingress_time               1796408448195126549
\t\tcumulativeScaledRateOffset +0.000000000
\t\tscaledLastGmPhaseChange    0
\t\tgmTimeBaseIndicator        0
\t\tlastGmPhaseChange          0x0000'0000000000000000.0000
\t\tgmPresent                  true
\t\tgmIdentity                 e6b477.fffe.021bd8
"""
# the same questions to the grandmaster (priority1 10)
MASTER = """\
sending: GET PORT_PROPERTIES_NP
sending: GET PORT_DATA_SET
sending: GET CURRENT_DATA_SET
sending: GET TIME_STATUS_NP
\te6b477.fffe.021bd8-1 seq 0 RESPONSE MANAGEMENT PORT_PROPERTIES_NP\x20
\t\tportIdentity            e6b477.fffe.021bd8-1
\t\tportState               MASTER
\t\ttimestamping            SOFTWARE
\t\tinterface               twptpm0
\te6b477.fffe.021bd8-1 seq 1 RESPONSE MANAGEMENT PORT_DATA_SET\x20
\t\tportIdentity            e6b477.fffe.021bd8-1
\t\tportState               MASTER
\t\tlogMinDelayReqInterval  0
\t\tpeerMeanPathDelay       0
\t\tlogAnnounceInterval     1
\t\tannounceReceiptTimeout  3
\t\tlogSyncInterval         0
\t\tdelayMechanism          1
\t\tlogMinPdelayReqInterval 0
\t\tversionNumber           2
\te6b477.fffe.021bd8-0 seq 2 RESPONSE MANAGEMENT CURRENT_DATA_SET\x20
\t\tstepsRemoved     0
\t\toffsetFromMaster 0.0
\t\tmeanPathDelay    0.0
\te6b477.fffe.021bd8-0 seq 3 RESPONSE MANAGEMENT TIME_STATUS_NP\x20
\t\tmaster_offset              0
\t\tingress_time               0
\t\tcumulativeScaledRateOffset +0.000000000
\t\tscaledLastGmPhaseChange    0
\t\tgmTimeBaseIndicator        0
\t\tlastGmPhaseChange          0x0000'0000000000000000.0000
\t\tgmPresent                  false
\t\tgmIdentity                 e6b477.fffe.021bd8
"""
# one ptp4l serving two interfaces (as timemaster groups interfaces that share a PHC),
# hearing no master on either
TWO_PORTS = """\
sending: GET PORT_PROPERTIES_NP
sending: GET PORT_DATA_SET
sending: GET CURRENT_DATA_SET
sending: GET TIME_STATUS_NP
\t3a1d59.fffe.3ce368-1 seq 0 RESPONSE MANAGEMENT PORT_PROPERTIES_NP\x20
\t\tportIdentity            3a1d59.fffe.3ce368-1
\t\tportState               LISTENING
\t\ttimestamping            SOFTWARE
\t\tinterface               twptpx1
\t3a1d59.fffe.3ce368-2 seq 0 RESPONSE MANAGEMENT PORT_PROPERTIES_NP\x20
\t\tportIdentity            3a1d59.fffe.3ce368-2
\t\tportState               LISTENING
\t\ttimestamping            SOFTWARE
\t\tinterface               twptpx2
\t3a1d59.fffe.3ce368-1 seq 1 RESPONSE MANAGEMENT PORT_DATA_SET\x20
\t\tportIdentity            3a1d59.fffe.3ce368-1
\t\tportState               LISTENING
\t\tlogMinDelayReqInterval  0
\t\tpeerMeanPathDelay       0
\t\tlogAnnounceInterval     1
\t\tannounceReceiptTimeout  3
\t\tlogSyncInterval         0
\t\tdelayMechanism          1
\t\tlogMinPdelayReqInterval 0
\t\tversionNumber           2
\t3a1d59.fffe.3ce368-2 seq 1 RESPONSE MANAGEMENT PORT_DATA_SET\x20
\t\tportIdentity            3a1d59.fffe.3ce368-2
\t\tportState               LISTENING
\t\tlogMinDelayReqInterval  0
\t\tpeerMeanPathDelay       0
\t\tlogAnnounceInterval     1
\t\tannounceReceiptTimeout  3
\t\tlogSyncInterval         0
\t\tdelayMechanism          1
\t\tlogMinPdelayReqInterval 0
\t\tversionNumber           2
\t3a1d59.fffe.3ce368-0 seq 2 RESPONSE MANAGEMENT CURRENT_DATA_SET\x20
\t\tstepsRemoved     0
\t\toffsetFromMaster 0.0
\t\tmeanPathDelay    0.0
\t3a1d59.fffe.3ce368-0 seq 3 RESPONSE MANAGEMENT TIME_STATUS_NP\x20
\t\tmaster_offset              0
\t\tingress_time               0
\t\tcumulativeScaledRateOffset +0.000000000
\t\tscaledLastGmPhaseChange    0
\t\tgmTimeBaseIndicator        0
\t\tlastGmPhaseChange          0x0000'0000000000000000.0000
\t\tgmPresent                  false
\t\tgmIdentity                 3a1d59.fffe.3ce368
"""
# what pmc prints when nobody answers: no ptp4l at the socket, or one in another domain
NO_ANSWER = """\
sending: GET PORT_PROPERTIES_NP
sending: GET PORT_DATA_SET
sending: GET CURRENT_DATA_SET
sending: GET TIME_STATUS_NP
"""


# --- parsing ------------------------------------------------------------------------------
def test_parse_pmc_reads_each_response_and_its_fields():
    replies = preflight.parse_pmc(SLAVE)
    assert [r.tlv for r in replies] == [
        "PORT_PROPERTIES_NP",
        "PORT_DATA_SET",
        "CURRENT_DATA_SET",
        "TIME_STATUS_NP",
    ]
    assert [r.port for r in replies] == ["5ee8d7.fffe.f9ed7a-1"] * 2 + ["5ee8d7.fffe.f9ed7a-0"] * 2
    assert replies[1].fields["portState"] == "SLAVE"
    assert replies[1].fields["versionNumber"] == "2"  # the "sending" lines end nothing early
    assert replies[2].fields == {
        "stepsRemoved": "1",
        "offsetFromMaster": "-35.0",
        "meanPathDelay": "2189.0",
    }
    assert replies[3].fields["lastGmPhaseChange"] == "0x0000'0000000000000000.0000"
    assert preflight.parse_pmc(NO_ANSWER) == []


def test_pmc_port_of_a_client_a_master_and_nobody():
    port = preflight.pmc_port(preflight.parse_pmc(SLAVE), "twptps0")
    assert port == preflight.PtpPort(
        port="5ee8d7.fffe.f9ed7a-1",
        interface="twptps0",
        state="SLAVE",
        offset_ns=-35.0,
        gm_present=True,
        gm_identity="e6b477.fffe.021bd8",
    )
    gm = preflight.pmc_port(preflight.parse_pmc(MASTER), "twptpm0")
    assert (gm.state, gm.offset_ns, gm.gm_present) == ("MASTER", 0.0, False)
    assert preflight.pmc_port(preflight.parse_pmc(SLAVE), "eno1") is None  # not its port
    assert preflight.pmc_port(preflight.parse_pmc(NO_ANSWER), "twptps0") is None


def test_pmc_port_picks_the_interface_among_several_ports():
    replies = preflight.parse_pmc(TWO_PORTS)
    second = preflight.pmc_port(replies, "twptpx2")
    assert (second.port, second.state, second.gm_present) == (
        "3a1d59.fffe.3ce368-2",
        "LISTENING",
        False,
    )
    assert preflight.pmc_port(replies, "twptpx1").port == "3a1d59.fffe.3ce368-1"


def _without(text: str, tlv: str) -> str:
    """pmc's output ``text`` without the responses carrying ``tlv``."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("\t\t"):
            pass
        elif line.startswith("\t"):
            skipping = line.split()[-1] == tlv
        else:
            skipping = False
        if not skipping:
            out.append(line)
    return "".join(out)


def test_pmc_port_without_port_properties_and_with_an_error_status():
    # a ptp4l that does not know PORT_PROPERTIES_NP: one port answering PORT_DATA_SET is it
    only_data = _without(SLAVE, "PORT_PROPERTIES_NP")
    replies = preflight.parse_pmc(only_data)
    assert [r.tlv for r in replies] == ["PORT_DATA_SET", "CURRENT_DATA_SET", "TIME_STATUS_NP"]
    port = preflight.pmc_port(replies, "twptps0")
    assert (port.interface, port.state, port.offset_ns) == (None, "SLAVE", -35.0)
    # pmc.c prints an error status as the head line alone
    err = "\t5ee8d7.fffe.f9ed7a-1 seq 0 RESPONSE MANAGEMENT_ERROR_STATUS \n"
    (reply,) = preflight.parse_pmc(err)
    assert (reply.port, reply.tlv, reply.fields) == ("5ee8d7.fffe.f9ed7a-1", None, {})
    assert preflight.pmc_port([reply], "twptps0") is None


# --- the ptp stage against fake trees ---------------------------------------------------------
SOF = ethtool.SOF_TIMESTAMPING
SOFTWARE_TS = ethtool.TsInfo(
    phc_index=-1,
    so_timestamping=SOF["software-transmit"]
    | SOF["software-receive"]
    | SOF["software-system-clock"],
    tx_types=0,
    rx_filters=0,
)
HARDWARE_TS = ethtool.TsInfo(
    phc_index=3,
    so_timestamping=sum(SOF.values()) - SOF["hardware-legacy-clock"],
    tx_types=3,
    rx_filters=3,
)


class FakeHost:
    """/proc and /etc under ``root``; ``ts`` is what ETHTOOL_GET_TS_INFO answers."""

    def __init__(self, root: Path):
        self.root = root
        self.ts: dict[str, ethtool.TsInfo] = {}
        for d in ("proc", "sys", "etc"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def process(self, pid: int, *argv: str, parent: int = 1) -> None:
        self.write(f"proc/{pid}/cmdline", "\0".join(argv) + "\0")
        self.write(f"proc/{pid}/status", f"Name:\t{os.path.basename(argv[0])}\nPPid:\t{parent}\n")

    def ethtool(self, what: str, ifname: str):
        if what != "ts_info" or ifname not in self.ts:
            raise ethtool.EthtoolError(errno.ENODEV, f"{ifname}: No such device")
        return self.ts[ifname]

    def host(self) -> preflight.Host:
        r = self.root
        return preflight.Host(proc=r / "proc", sys=r / "sys", etc=r / "etc", ethtool=self.ethtool)


@pytest.fixture
def fake(tmp_path) -> FakeHost:
    return FakeHost(tmp_path)


@pytest.fixture
def pmc(monkeypatch):
    """pmc answers ``pmc.answers[(socket, domain)]`` (nobody answers elsewhere); the calls
    are recorded in ``pmc.asked``."""

    class Pmc:
        answers: dict[tuple[str, int], tuple[str, str]] = {}
        asked: list[tuple[str, int]] = []

    def fake_pmc(uds: str, domain: int) -> tuple[str, str]:
        Pmc.asked.append((uds, domain))
        return Pmc.answers.get((uds, domain), (NO_ANSWER, ""))

    Pmc.answers, Pmc.asked = {}, []
    monkeypatch.setattr(preflight, "_pmc", fake_pmc)
    return Pmc


def cfg_of(**host) -> config.Config:
    return config.from_dict({"host": host})


def ptp_stage(fake: FakeHost, cfg: config.Config) -> preflight.StageResult:
    (stage,) = preflight.check(cfg, fake.host(), ["ptp"]).stages
    return stage


def checks(stage: preflight.StageResult) -> dict[str, preflight.Check]:
    return {c.name: c for c in stage.checks}


PTP4L_CONF = """\
#
# Ansible managed
#
[global]
slaveOnly\t\t1
time_stamping\t\tsoftware
network_transport\tUDPv4
domainNumber\t\t7
uds_address\t\t/var/run/ptp4l-eth1

[eth1]
"""


def one_instance(fake: FakeHost, mode: str = "software") -> None:
    """ptp4l@eth1 as the ptp role runs it: its own configuration, socket and domain."""
    fake.ts["eth1"] = SOFTWARE_TS if mode == "software" else HARDWARE_TS
    fake.write("etc/linuxptp/ptp4l-eth1.conf", PTP4L_CONF.replace("software", mode))
    fake.process(700, "/usr/sbin/ptp4l", "-f", "/etc/linuxptp/ptp4l-eth1.conf", "-m", "-q")


def test_stage_skipped_without_ptp_interfaces(fake, pmc):
    assert ptp_stage(fake, cfg_of()).status == SKIPPED
    assert pmc.asked == []


def test_client_locked_to_a_master_passes(fake, pmc):
    one_instance(fake)
    pmc.answers[("/var/run/ptp4l-eth1", 7)] = (SLAVE.replace("twptps0", "eth1"), "")
    cfg = cfg_of(ptp_interfaces=["eth1"], ptp_phc2sys_interface="eth1")
    stage = ptp_stage(fake, cfg)
    assert stage.status == OK, stage
    # the socket and the domain come from ptp4l's own configuration
    assert pmc.asked == [("/var/run/ptp4l-eth1", 7)]
    c = checks(stage)
    assert c["eth1 port state"].have == "SLAVE, grandmaster e6b477.fffe.021bd8"
    assert c["eth1 offset from master"].have == "-35 ns"
    assert c["eth1 offset from master"].want == "|offset| <= 1,000 ns"
    # software timestamps: ptp4l itself is the one program steering the clock
    assert c["one program steers the system clock"].have == "ptp4l (pid 700)"


def test_offset_beyond_the_configured_bound_fails(fake, pmc):
    one_instance(fake)
    pmc.answers[("/var/run/ptp4l-eth1", 7)] = (SLAVE.replace("twptps0", "eth1"), "")
    stage = ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"], ptp_max_offset_ns=20))
    assert stage.status == PARTIAL
    bad = [c for c in stage.checks if not c.ok]
    assert [c.name for c in bad] == ["eth1 offset from master"]
    assert (bad[0].have, bad[0].want) == ("-35 ns", "|offset| <= 20 ns")
    assert "ptp_max_offset_ns" in bad[0].fix and "journalctl -u ptp4l@eth1" in bad[0].fix


def test_no_master_heard_says_what_to_check_and_run(fake, pmc):
    one_instance(fake)
    listening = TWO_PORTS.replace("twptpx1", "eth1")
    pmc.answers[("/var/run/ptp4l-eth1", 7)] = (listening, "")
    stage = ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"]))
    assert stage.status == PARTIAL
    port = checks(stage)["eth1 port state"]
    assert (port.ok, port.have, port.want) == (False, "LISTENING, no grandmaster", "SLAVE")
    assert "no master heard" in port.fix and "domain 7" in port.fix
    assert "pmc -u -b 0 -s /var/run/ptp4l-eth1 -d 7 'GET PORT_DATA_SET'" in port.fix
    assert "eth1 offset from master" not in checks(stage)  # no master, no offset to judge


def test_a_ptp4l_that_does_not_answer(fake, pmc):
    one_instance(fake)
    stage = ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"]))
    port = checks(stage)["eth1 port state"]
    assert port.have == "no answer from ptp4l (pid 700) at /var/run/ptp4l-eth1 in domain 7"
    assert port.fix.startswith("systemctl status ptp4l@eth1")
    # pmc itself failing (not root: it cannot bind its own socket) is said as such
    pmc.answers[("/var/run/ptp4l-eth1", 7)] = ("", "pmc failed: failed to create pmc (run as root)")
    port = checks(ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"])))["eth1 port state"]
    assert port.have == "pmc failed: failed to create pmc (run as root)"


def test_no_ptp4l_at_all(fake, pmc):
    fake.ts["eth1"] = SOFTWARE_TS
    stage = ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"], ptp_phc2sys_interface="eth1"))
    assert stage.status == NOT_CONFIGURED
    c = checks(stage)
    assert c["ptp4l on eth1"].have == "not running"
    assert c["one program steers the system clock"].have == "none"
    assert pmc.asked == []


def test_timestamping_must_match_what_the_interface_has(fake, pmc):
    # configured for hardware stamps on an interface without a PHC: ptp4l cannot run so
    one_instance(fake, "hardware")
    fake.ts["eth1"] = SOFTWARE_TS
    c = checks(ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"])))["ptp4l on eth1"]
    assert (c.ok, c.have) == (False, "running (pid 700), hardware timestamping")
    assert c.want == "running, software timestamping (eth1 has no hardware timestamping)"
    # -S on the command line wins over the file
    fake.process(700, "/usr/sbin/ptp4l", "-S", "-f", "/etc/linuxptp/ptp4l-eth1.conf")
    c = checks(ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"])))["ptp4l on eth1"]
    assert (c.ok, c.have) == (True, "running (pid 700), software timestamping")


def test_hardware_clock_needs_phc2sys_wired_to_the_same_instance(fake, pmc):
    one_instance(fake, "hardware")
    pmc.answers[("/var/run/ptp4l-eth1", 7)] = (SLAVE.replace("twptps0", "eth1"), "")
    cfg = cfg_of(ptp_interfaces=["eth1"], ptp_phc2sys_interface="eth1")
    # a phc2sys on Debian's defaults (socket /var/run/ptp4l, domain 0) follows nobody here
    fake.process(701, "/usr/sbin/phc2sys", "-s", "eth1", "-w")
    c = checks(ptp_stage(fake, cfg))
    assert not c["phc2sys from eth1"].ok
    assert "(-z /var/run/ptp4l-eth1 -n 7)" in c["phc2sys from eth1"].want
    # the role's phc2sys@eth1: -s IF -c CLOCK_REALTIME -n DOMAIN -z SOCKET
    fake.process(
        701,
        "/usr/sbin/phc2sys",
        *"-s eth1 -c CLOCK_REALTIME -n 7 -z /var/run/ptp4l-eth1 -w -m -q".split(),
    )
    stage = ptp_stage(fake, cfg)
    assert stage.status == OK, stage
    c = checks(stage)
    assert c["phc2sys from eth1"].have == "running (pid 701)"
    assert c["one program steers the system clock"].have == "phc2sys (pid 701)"
    # automatic mode on the same socket and domain, by PHC device name, also follows it
    fake.process(701, "/usr/sbin/phc2sys", "-a", "-r", "-z", "/var/run/ptp4l-eth1", "-n", "7")
    assert ptp_stage(fake, cfg).status == OK
    fake.process(701, "/usr/sbin/phc2sys", "-s", "/dev/ptp3", "-z", "/var/run/ptp4l-eth1", "-n7")
    assert ptp_stage(fake, cfg).status == OK


def test_two_programs_steering_the_clock_fail(fake, pmc):
    one_instance(fake)
    pmc.answers[("/var/run/ptp4l-eth1", 7)] = (SLAVE.replace("twptps0", "eth1"), "")
    fake.process(650, "/lib/systemd/systemd-timesyncd")
    fake.process(651, "/usr/sbin/chronyd", "-x")  # -x: chronyd leaves the clock alone
    stage = ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"], ptp_phc2sys_interface="eth1"))
    steer = checks(stage)["one program steers the system clock"]
    assert not steer.ok
    assert steer.have == "systemd-timesyncd (pid 650), ptp4l (pid 700)"
    assert steer.fix.startswith("stop and disable all but one")
    # PTP that steers nothing leaves the other disciplines alone
    stage = ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"]))
    assert "one program steers the system clock" not in checks(stage)


# timemaster's generated configuration for a software-timestamping interface (as
# `timemaster -n` prints it for the ptp role's timemaster.conf); the second uds_address is
# the one ptp4l uses
TIMEMASTER_PTP4L_CONF = """\
[global]
network_transport UDPv4
delay_mechanism E2E

[global]
slaveOnly 1
domainNumber 24
uds_address /var/run/timemaster/ptp4l.1.socket
message_tag [24:eth2]
clock_servo ntpshm
ntpshm_segment 1
"""


def test_timemaster_instances_are_found_through_their_generated_configuration(fake, pmc):
    fake.ts["eth2"] = SOFTWARE_TS
    fake.process(600, "/usr/sbin/timemaster", "-f", "/etc/linuxptp/timemaster-tickwire.conf")
    fake.process(
        601, "/usr/sbin/chronyd", "-n", "-f", "/var/run/timemaster/chrony.conf", parent=600
    )
    # the file as ptp4l sees it: through its own root
    fake.write("proc/702/root/var/run/timemaster/ptp4l.1.conf", TIMEMASTER_PTP4L_CONF)
    fake.process(
        702,
        "/usr/sbin/ptp4l",
        *"-l 5 -f /var/run/timemaster/ptp4l.1.conf -S -i eth2".split(),
        parent=600,
    )
    uncalibrated = SLAVE.replace("twptps0", "eth2").replace("SLAVE", "UNCALIBRATED")
    pmc.answers[("/var/run/timemaster/ptp4l.1.socket", 24)] = (uncalibrated, "")
    cfg = cfg_of(ptp_interfaces=["eth2"], ptp_phc2sys_interface="eth2")
    stage = ptp_stage(fake, cfg)
    # the ntpshm servo hands samples to chronyd and never locks: UNCALIBRATED is its
    # steady state, and chronyd is the one program steering the clock
    assert stage.status == OK, stage
    c = checks(stage)
    assert "ntpshm servo" in c["eth2 port state"].want
    assert c["one program steers the system clock"].have == "chronyd (pid 601)"
    # failures point at timemaster's unit, not a ptp4l@ one
    pmc.answers.clear()
    port = checks(ptp_stage(fake, cfg))["eth2 port state"]
    assert "in domain 24" in port.have and "systemctl status timemaster" in port.fix


def test_command_line_options_win_over_the_configuration(fake, pmc):
    fake.ts["eth1"] = SOFTWARE_TS
    fake.write("etc/linuxptp/ptp4l.conf", "[global]\ndomainNumber 1\nuds_address /run/a\n")
    fake.process(
        703,
        "/usr/sbin/ptp4l",
        *"-f /etc/linuxptp/ptp4l.conf -i eth1 -S --domainNumber=5 --uds_address /run/b".split(),
    )
    ptp_stage(fake, cfg_of(ptp_interfaces=["eth1"]))
    assert pmc.asked == [("/run/b", 5)]


def test_config_keys_are_validated():
    cfg = config.from_dict({"host": {"ptp_interfaces": ["eno1"]}})
    assert (cfg.host.ptp_phc2sys_interface, cfg.host.ptp_max_offset_ns) == ("", 1000)
    with pytest.raises(config.ConfigError, match="host.ptp_phc2sys_interface: 'eno2'"):
        config.from_dict({"host": {"ptp_interfaces": ["eno1"], "ptp_phc2sys_interface": "eno2"}})
    with pytest.raises(config.ConfigError, match="host.ptp_max_offset_ns: 0 is outside"):
        config.from_dict({"host": {"ptp_max_offset_ns": 0}})


# --- calibrate --wait-ptp ---------------------------------------------------------------------
def _stage(status: str) -> preflight.Report:
    check = preflight.Check(
        "eno1 port state", status == OK, "SLAVE" if status == OK else "LISTENING", "SLAVE"
    )
    return preflight.Report((preflight.StageResult("ptp", status, True, (check,)),))


def test_wait_for_ptp_returns_once_the_stage_passes(monkeypatch):
    answers = iter([NOT_CONFIGURED, PARTIAL, OK])
    monkeypatch.setattr(preflight, "check", lambda cfg, host, stages: _stage(next(answers)))
    said: list[str] = []
    stage = clock.wait_for_ptp(cfg_of(), timeout=30, poll=0.001, log=said.append)
    assert stage.status == OK
    assert said[0].startswith("waiting up to 30 s for PTP to lock") and said[-1].startswith(
        "PTP locked"
    )


def test_wait_for_ptp_gives_up_naming_what_fails(monkeypatch):
    monkeypatch.setattr(preflight, "check", lambda cfg, host, stages: _stage(NOT_CONFIGURED))
    with pytest.raises(
        clock.ClockError, match=r"PTP not locked after 0.05 s \(eno1 port state: LISTENING\)"
    ):
        clock.wait_for_ptp(cfg_of(), timeout=0.05, poll=0.01)


def test_wait_for_ptp_does_not_wait_without_ptp(monkeypatch):
    monkeypatch.setattr(preflight, "check", lambda cfg, host, stages: _stage(SKIPPED))
    assert clock.wait_for_ptp(cfg_of(), timeout=0.001).status == SKIPPED


# --- for real: ptp4l, pmc and timemaster in network namespaces --------------------------------
LINUXPTP = ("ptp4l", "pmc", "timemaster")
REAL = pytest.mark.needs("root", "netns", "setpriv")


def _linuxptp() -> None:
    missing = [p for p in LINUXPTP if not (shutil.which(p) or Path("/usr/sbin", p).exists())]
    if missing:
        pytest.skip(f"needs linuxptp: {', '.join(missing)} not found (apt install linuxptp)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _no_clock_control(ns: str, *argv: str) -> list[str]:
    """``argv`` in namespace ``ns`` without CAP_SYS_TIME (the clock stays the machine's),
    and with a System V IPC namespace of its own (the ntpshm segments stay its own)."""
    return ["ip", "netns", "exec", ns, "unshare", "--ipc"] + [
        "setpriv",
        "--bounding-set=-sys_time",
        *argv,
    ]


class Ptp:
    """Namespaces, veth pairs and linuxptp processes a test starts; ``close`` undoes all."""

    def __init__(self, tag: str):
        self.tag = tag
        self.dir = Path(tempfile.mkdtemp(prefix=f"twptp{tag}-", dir="/tmp"))
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def netns(self, name: str) -> str:
        ns = f"twptp-{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def pair(self, a_ns: str, a: str, b_ns: str, b: str, net: int) -> None:
        _ip("-n", a_ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns)
        for ns, ifname, host in ((a_ns, a, 1), (b_ns, b, 2)):
            _ip("-n", ns, "addr", "add", f"10.99.{net}.{host}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")

    def start(self, ns: str, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 -- closed with the process
        p = subprocess.Popen(
            _no_clock_control(ns, *argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    def log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / f"{name}.log").read_text()[-3000:]
        return ""

    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ptp4l_conf(path: Path, ifname: str, uds: Path, master: bool) -> Path:
    lines = [
        "[global]",
        "domainNumber 7",  # not the default: the preflight must read it from here
        "time_stamping software",
        f"uds_address {uds}",
        "kernel_leap 0",
    ]
    if master:
        lines += ["priority1 10", "free_running 1"]
    else:
        # lock on the second sample; never step
        lines += [
            "slaveOnly 1",
            "pi_integral_const 0.3",
            "first_step_threshold 0",
            "step_threshold 0",
        ]
    path.write_text("\n".join([*lines, f"[{ifname}]", ""]))
    return path


def _poll_stage(cfg: config.Config, done, seconds: float) -> preflight.StageResult:
    """The ptp stage, asked until ``done(stage)`` or the deadline (then the last one)."""
    deadline = time.monotonic() + seconds
    with preflight.Host.live(cfg.run.netns) as host:
        while True:
            (stage,) = preflight.check(cfg, host, ["ptp"]).stages
            if done(stage) or time.monotonic() > deadline:
                return stage
            time.sleep(0.5)


@pytest.fixture(scope="module")
def pair():
    """A grandmaster and a client ptp4l (domain 7, software timestamps, sockets of their
    own) on a veth pair between two namespaces; the client's view as a configuration."""
    _linuxptp()
    tag = str(os.getpid() % 100000)
    ptp = Ptp(tag)
    try:
        gm_ns, ns = ptp.netns("m"), ptp.netns("s")
        gm_if, ifname = f"twpm{tag}", f"twps{tag}"
        ptp.pair(gm_ns, gm_if, ns, ifname, 1)
        gm_conf = _ptp4l_conf(ptp.dir / "gm.conf", gm_if, ptp.dir / "gm.sock", master=True)
        conf = _ptp4l_conf(ptp.dir / "client.conf", ifname, ptp.dir / "client.sock", master=False)
        gm = ptp.start(gm_ns, "gm", "ptp4l", "-f", str(gm_conf), "-m")
        client = ptp.start(ns, "client", "ptp4l", "-f", str(conf), "-m")
        cfg = config.from_dict(
            {
                "run": {
                    "netns": ns,
                    "channel": f"twptp{tag}",
                    "line_a": {"interface": ifname, "queue": 0},
                    "line_b": {"interface": ifname, "queue": 1},
                },
                "host": {
                    "ptp_interfaces": [ifname],
                    "ptp_phc2sys_interface": ifname,
                    "ptp_max_offset_ns": 1_000_000,  # software stamps on a shared clock
                },
            }
        )
        yield {"ptp": ptp, "cfg": cfg, "ifname": ifname, "gm": gm, "client": client}
    finally:
        ptp.close()


@REAL
def test_preflight_asks_a_real_ptp4l_for_its_port_and_offset(pair):
    cfg, ifname, ptp = pair["cfg"], pair["ifname"], pair["ptp"]
    port = f"{ifname} port state"
    stage = _poll_stage(
        cfg, lambda s: checks(s).get(port, preflight.Check("", False, "", "")).ok, 90
    )
    c = checks(stage)
    assert c[port].ok, f"{c.get(port)}\n{ptp.log('client')}\n{ptp.log('gm')}"
    assert c[port].have.startswith("SLAVE, grandmaster ")
    assert c[f"ptp4l on {ifname}"].ok and c[f"ptp4l on {ifname}"].have.endswith(
        "software timestamping"
    )
    offset = c[f"{ifname} offset from master"]
    assert offset.ok, offset
    assert offset.have.endswith(" ns") and abs(int(offset.have[:-3].replace(",", ""))) <= 1_000_000
    # what the stage read is what pmc says to the socket and domain of the configuration
    text, error = preflight._pmc(str(ptp.dir / "client.sock"), 7)
    assert error == "" and preflight.pmc_port(preflight.parse_pmc(text), ifname).state == "SLAVE"
    text, error = preflight._pmc(str(ptp.dir / "client.sock"), 0)  # another domain: silence
    assert error == "" and preflight.parse_pmc(text) == []


@REAL
def test_calibrate_waits_for_ptp_then_stores_the_measurement(pair, tmp_path):
    cfg, ifname = pair["cfg"], pair["ifname"]
    toml = tmp_path / "tickwire.toml"
    toml.write_text(
        f'[run]\nnetns = "{cfg.run.netns}"\nchannel = "{cfg.run.channel}"\n'
        f'[run.line_a]\ninterface = "{ifname}"\nqueue = 0\n'
        f'[run.line_b]\ninterface = "{ifname}"\nqueue = 1\n'
        f'[host]\nptp_interfaces = ["{ifname}"]\nptp_phc2sys_interface = "{ifname}"\n'
        "ptp_max_offset_ns = 1000000\n"
    )
    try:
        r = subprocess.run(
            [
                str(BIN / "tickwire"),
                "calibrate",
                "--config",
                str(toml),
                "--wait-ptp",
                "90",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["interfaces"][ifname]["source"] == "software"
        assert clock.load(cfg.run.channel)["interfaces"] == out["interfaces"]
    finally:
        shutil.rmtree(clock.path_for(cfg.run.channel).parent, ignore_errors=True)


@REAL
def test_preflight_says_when_the_master_is_gone(pair):
    """Last of the pair's tests: it stops the grandmaster."""
    cfg, ifname, ptp = pair["cfg"], pair["ifname"], pair["ptp"]
    ptp.stop(pair["gm"])
    port = f"{ifname} port state"
    stage = _poll_stage(cfg, lambda s: port in checks(s) and not checks(s)[port].ok, 60)
    c = checks(stage)[port]
    assert not c.ok, ptp.log("client")
    assert c.have.split(",")[0] in ("LISTENING", "UNCALIBRATED", "MASTER", "PRE_MASTER"), c
    assert f"-s {ptp.dir / 'client.sock'} -d 7" in c.fix
    # and when ptp4l is gone, the stage says so before asking anything
    ptp.stop(pair["client"])
    stage = _poll_stage(cfg, lambda s: not checks(s)[f"ptp4l on {ifname}"].ok, 30)
    assert checks(stage)[f"ptp4l on {ifname}"].have == "not running"


def _render_timemaster_conf(tmp: Path, interfaces: list[str], domains: dict, steering: str) -> str:
    """The ptp role's timemaster.conf.j2, rendered by Ansible (connection local, no root)."""
    variables = yaml.safe_load((ANSIBLE / "roles/ptp/defaults/main.yml").read_text())
    variables.update(
        ptp_interfaces=interfaces,
        ptp_phc2sys_interface=steering,
        __ptp_domains=domains,
        ansible_connection="local",
        ansible_python_interpreter=sys.executable,
    )
    (tmp / "vars.yml").write_text(yaml.safe_dump(variables))
    out = tmp / "timemaster.conf"
    template = ANSIBLE / "roles/ptp/templates/timemaster.conf.j2"
    task = {"ansible.builtin.template": {"src": str(template), "dest": str(out), "mode": "0644"}}
    (tmp / "render.yml").write_text(
        yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [task]}])
    )
    env = dict(
        os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", ANSIBLE_NOCOLOR="1"
    )
    r = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            "-e",
            f"@{tmp / 'vars.yml'}",
            str(tmp / "render.yml"),
        ],
        stdin=subprocess.DEVNULL,  # Ansible refuses a non-blocking stdin
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ANSIBLE,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out.read_text()


@REAL
def test_timemaster_runs_the_roles_configuration_and_preflight_reads_it(tmp_path):
    """Two interfaces in two domains, each with a grandmaster: timemaster (with a stand-in
    for chronyd) runs the ptp role's configuration; the preflight finds its ptp4l
    instances through their generated configurations and asks each over its socket."""
    _linuxptp()
    tag = str((os.getpid() + 1) % 100000)
    ptp = Ptp(tag)
    try:
        gm_ns, ns = ptp.netns("m"), ptp.netns("s")
        ifs = [f"twpa{tag}", f"twpb{tag}"]
        domains = {ifs[0]: 0, ifs[1]: 24}
        for n, ifname in enumerate(ifs):
            ptp.pair(gm_ns, f"twpg{n}{tag}", ns, ifname, 2 + n)
            gm_conf = ptp.dir / f"gm{n}.conf"
            _ptp4l_conf(gm_conf, f"twpg{n}{tag}", ptp.dir / f"gm{n}.sock", master=True)
            gm_conf.write_text(
                gm_conf.read_text().replace("domainNumber 7", f"domainNumber {domains[ifname]}")
            )
            ptp.start(gm_ns, f"gm{n}", "ptp4l", "-f", str(gm_conf), "-m")
        text = _render_timemaster_conf(tmp_path, ifs, domains, steering=ifs[1])
        # a stand-in for chronyd (not installed here): a process named chronyd that waits
        fake = ptp.dir / "chronyd"
        fake.write_text("#!/bin/bash\nexec -a chronyd sleep infinity\n")
        fake.chmod(0o755)
        rundir = ptp.dir / "run"
        conf = ptp.dir / "timemaster.conf"
        conf.write_text(
            text.replace("path /usr/sbin/chronyd", f"path {fake}").replace(
                "[timemaster]\n", f"[timemaster]\nrundir {rundir}\n"
            )
        )
        timemaster = ptp.start(
            ns,
            "timemaster",
            shutil.which("timemaster") or "/usr/sbin/timemaster",
            "-f",
            str(conf),
            "-m",
        )
        cfg = config.from_dict(
            {
                "run": {"netns": ns},
                "host": {
                    "ptp_interfaces": ifs,
                    "ptp_phc2sys_interface": ifs[1],
                    "ptp_max_offset_ns": 1_000_000,
                },
            }
        )
        names = [f"{i} port state" for i in ifs]
        stage = _poll_stage(
            cfg,
            lambda s: all(checks(s).get(n, preflight.Check("", False, "", "")).ok for n in names),
            90,
        )
        c = checks(stage)
        assert timemaster.poll() is None, ptp.log("timemaster")
        for ifname in ifs:
            assert c[f"{ifname} port state"].ok, (
                f"{c.get(ifname + ' port state')}\n{ptp.log('timemaster')}"
            )
            # software stamps under timemaster: the ntpshm servo, chronyd steers
            assert c[f"{ifname} port state"].have.split(",")[0] in ("SLAVE", "UNCALIBRATED")
            assert c[f"{ifname} offset from master"].ok
        # exactly one source chronyd may select: the steering interface's
        chrony = (rundir / "chrony.conf").read_text().splitlines()
        refclocks = [line for line in chrony if line.startswith("refclock SHM")]
        assert [line.split()[-1] for line in refclocks] == ["noselect", "prefer"]
        sockets = sorted(p.name for p in rundir.glob("ptp4l.*.socket"))
        assert sockets == ["ptp4l.0.socket", "ptp4l.1.socket"]
    finally:
        ptp.close()
