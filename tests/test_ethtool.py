"""One reading of a NIC, two readers: ``tickwire preflight`` asks the kernel (the SIOCETHTOOL
ioctl through ``dataplane.ethtool``), the nic Ansible role's module parses the ``ethtool``
binary's text on the target (it must stay self-contained there). Both must see the same
interface the same way, so this module runs both on the same live interfaces -- a private
lab's veths, in states set with ``ethtool -K/-L`` -- and compares: channels (``-l``),
features under ``ethtool -k``'s names (``-k``), timestamping (``-T``), and that both refuse
what a veth does not have (rings ``-g``, flow rules ``-n``).
"""

from __future__ import annotations

import errno
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from dataplane import ethtool
from host import netns
from host.appliance import preflight

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "tickwire_nic", ROOT / "ansible/roles/nic/library/tickwire_nic.py"
)
nicmod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nicmod)

pytestmark = pytest.mark.lab


def _ethtool_text(cfg, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", cfg.lab.appliance_ns, "ethtool", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _kernel(cfg, what: str, ifname: str):
    with netns.entered(cfg.lab.appliance_ns):
        return getattr(ethtool, what)(ifname)


def _interfaces(cfg) -> list[str]:
    return [line.appliance_if for line in cfg.lab.lines.values()]


def _set(cfg, *args: str) -> None:
    done = _ethtool_text(cfg, *args)
    assert done.returncode == 0, done.stderr


def test_channels_read_the_same(labcfg):
    for ifname in _interfaces(labcfg):
        for count in (1, labcfg.lab.queues):
            _set(labcfg, "-L", ifname, "rx", str(count), "tx", str(count))
            text = nicmod.parse_channels(_ethtool_text(labcfg, "-l", ifname).stdout)
            ch = _kernel(labcfg, "channels", ifname)
            maxima = {
                "rx": ch.max_rx,
                "tx": ch.max_tx,
                "other": ch.max_other,
                "combined": ch.max_combined,
            }
            current = preflight.current_channels(ch)
            assert text == {
                "max": {k: v or None for k, v in maxima.items()},  # ethtool: n/a
                "current": {k.lower(): v for k, v in current.items()},
            }, ifname
            assert text["current"]["rx"] == count


@pytest.mark.parametrize(
    "changes",
    [
        (),  # as the lab leaves them
        ("generic-receive-offload", "on", "rx-gro-list", "on"),
        (
            "rx-checksumming",
            "off",
            "tx-checksum-ip-generic",
            "off",
            "tcp-segmentation-offload",
            "off",
        ),
        ("generic-receive-offload", "off", "rx-checksumming", "on", "tx-checksumming", "on"),
    ],
)
def test_features_read_the_same(labcfg, changes):
    """Every name ``ethtool -k`` prints, with its on/off and [fixed], including the old
    flags that fold several kernel features (tx-checksumming, scatter-gather, ...)."""
    for ifname in _interfaces(labcfg):
        if changes:
            _set(labcfg, "-K", ifname, *changes)
        text = nicmod.parse_features(_ethtool_text(labcfg, "-k", ifname).stdout)
        kernel = preflight.shown_features(_kernel(labcfg, "features", ifname))
        assert kernel == text, ifname
        for name, value in zip(changes[::2], changes[1::2], strict=True):
            assert kernel[name][0] == (value == "on"), name


def test_timestamping_reads_the_same(labcfg):
    for ifname in _interfaces(labcfg):
        out = _ethtool_text(labcfg, "-T", ifname).stdout
        shown = out.split("Capabilities:", 1)[1].split("PTP Hardware Clock:", 1)[0]
        names = set(re.findall(r"^\s+([a-z-]+)", shown, re.M))
        ts = _kernel(labcfg, "ts_info", ifname)
        assert names == {
            n for n, bit in ethtool.SOF_TIMESTAMPING.items() if ts.so_timestamping & bit
        }, ifname
        phc = re.search(r"PTP Hardware Clock: (\S+)", out).group(1)
        assert phc == ("none" if ts.phc_index < 0 else str(ts.phc_index))
        got = preflight.Timestamping.of(ts)
        assert (got.hardware, got.software) == (False, True)


@pytest.mark.parametrize("what,flag", [("rings", "-g"), ("flow_rules", "-n")])
def test_both_refuse_what_a_veth_lacks(labcfg, what, flag):
    for ifname in _interfaces(labcfg):
        done = _ethtool_text(labcfg, flag, ifname)
        assert done.returncode != 0 and "Operation not supported" in done.stderr
        with pytest.raises(ethtool.EthtoolError) as e:
            _kernel(labcfg, what, ifname)
        assert e.value.errno == errno.EOPNOTSUPP


def test_the_kernel_reader_names_the_missing_interface(labcfg):
    with pytest.raises(ethtool.EthtoolError) as e:
        _kernel(labcfg, "features", "nosuch0")
    assert e.value.errno == errno.ENODEV
