#!/usr/bin/python3
"""Tune one feed interface with ethtool: channel count, ring sizes, offloads off, ntuple
flow-steering rules.

Contract: every setting is read first and written only when it differs, so a second run
changes nothing (``changed`` is false) and check mode reports what a run would do without
doing it. A setting the NIC cannot take (no channel or ring parameters, a count above the
NIC's maximum) fails with a message naming the interface, the setting and the NIC's
answer. Offloads the interface does not have are skipped; offloads it has but cannot
change (``[fixed]``) are reported, and a fixed-on one is a warning. ntuple: when the NIC
refuses the feature or a rule, the task fails when ``ntuple_required`` and otherwise warns
and carries on (the feed's groups then land on whatever queue RSS picks).

The same file is the boot-time re-apply script (ethtool settings do not survive a reboot
or a driver reset): ``python3 tickwire_nic.py --boot /etc/tickwire/nic.json`` applies a
JSON list of this module's parameter sets, one per interface, with no Ansible installed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys

DOCUMENTATION = r"""
module: tickwire_nic
short_description: Channels, rings, offloads and ntuple rules of one feed interface
description:
  - Reads the interface's state with ethtool and changes only what differs.
options:
  interface: {description: Interface name., type: str, required: true}
  channels:
    description: Channel count, combined if the NIC has those, else rx and tx (0 = leave).
    type: int
    default: 0
  rx_ring: {description: RX ring entries (0 = leave)., type: int, default: 0}
  tx_ring: {description: TX ring entries (0 = leave)., type: int, default: 0}
  offloads_off:
    description: ethtool -k feature names to turn off.
    type: list
    elements: str
    default: []
  ntuple: {description: Enable ntuple and install I(flows)., type: bool, default: false}
  ntuple_required:
    description: Fail (rather than warn) when the NIC refuses ntuple.
    type: bool
    default: false
  flows:
    description: UDP/IPv4 rules steering a group and port to a receive queue.
    type: list
    elements: dict
    default: []
    suboptions:
      interface: {description: Ignored (the role filters flows by interface)., type: str}
      group: {description: Destination (multicast) address., type: str, required: true}
      port: {description: Destination UDP port., type: int, required: true}
      queue: {description: Receive queue., type: int, required: true}
  sys_root: {description: Where sysfs is mounted (tests)., type: str, default: /sys}
"""

RETURN = r"""
changes: {description: What was (or in check mode would be) changed., type: list}
offloads_fixed:
  description: "Requested-off offloads the NIC cannot change, as name: on|off."
  type: dict
offloads_absent: {description: Requested-off offloads the interface lacks., type: list}
ntuple_status: {description: "off, installed or refused.", type: str}
ntuple_message: {description: Why ntuple was refused (empty otherwise)., type: str}
"""


class NicError(Exception):
    """A setting the interface cannot take; the message names interface, setting, reason."""


# --- parsers of ethtool's text output (pure; the unit tests feed them captured text) -----
def _num(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None  # "n/a" -> None


def parse_sections(text: str, keys: tuple[str, ...]) -> dict[str, dict[str, int | None]]:
    """``ethtool -l`` / ``-g``: {"max": {key: n}, "current": {key: n}}, None for n/a."""
    out: dict[str, dict[str, int | None]] = {"max": {}, "current": {}}
    section = None
    for line in text.splitlines():
        low = line.strip().lower()
        if low.startswith("pre-set maximums"):
            section = "max"
        elif low.startswith("current hardware settings"):
            section = "current"
        elif section and ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in keys and key not in out[section]:
                out[section][key] = _num(value)
    return out


def parse_channels(text: str) -> dict[str, dict[str, int | None]]:
    return parse_sections(text, ("rx", "tx", "other", "combined"))


def parse_rings(text: str) -> dict[str, dict[str, int | None]]:
    return parse_sections(text, ("rx", "rx mini", "rx jumbo", "tx"))


_FEATURE = re.compile(r"^\s*([A-Za-z0-9_-]+):\s+(on|off)(\s+\[fixed\])?")


def parse_features(text: str) -> dict[str, tuple[bool, bool]]:
    """``ethtool -k``: {name: (on, fixed)}."""
    out = {}
    for line in text.splitlines():
        m = _FEATURE.match(line)
        if m:
            out[m[1]] = (m[2] == "on", bool(m[3]))
    return out


def parse_rules(text: str) -> list[dict]:
    """``ethtool -n``: one dict per rule: location, type, dst_ip, dst_port, queue (None
    when the action is not a queue)."""
    rules: list[dict] = []
    rule: dict | None = None
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"^Filter:\s*(\d+)", s)
        if m:
            rule = {
                "location": int(m[1]),
                "type": "",
                "dst_ip": "",
                "dst_port": None,
                "queue": None,
            }
            rules.append(rule)
            continue
        if rule is None:
            continue
        if s.startswith("Rule Type:"):
            rule["type"] = s.split(":", 1)[1].strip()
        elif s.startswith("Dest IP addr:"):
            rule["dst_ip"] = s.split(":", 1)[1].split()[0]
        elif s.startswith("Dest port:"):
            rule["dst_port"] = _num(s.split(":", 1)[1].split()[0])
        elif s.startswith("Action:"):
            m = re.search(r"queue (\d+)", s)
            rule["queue"] = int(m[1]) if m else None
    return rules


# --- running ethtool -----------------------------------------------------------------------
class Ethtool:
    """``ethtool`` on one interface; ``runner(argv) -> (rc, stdout, stderr)``."""

    def __init__(self, ifname: str, runner, binary: str = "ethtool"):
        self.ifname, self.runner, self.binary = ifname, runner, binary

    def run(self, *args: str) -> tuple[int, str, str]:
        return self.runner([self.binary, *args])

    def read(self, flag: str, what: str) -> str:
        rc, out, err = self.run(flag, self.ifname)
        if rc != 0:
            raise NicError(
                f"{self.ifname}: cannot read {what} (ethtool {flag}: {_reason(err, out)})"
            )
        return out


def _reason(err: str, out: str = "") -> str:
    lines = [ln.strip() for ln in (err or out).splitlines() if ln.strip()]
    return "; ".join(lines[-2:]) or "no output"


# --- the work ------------------------------------------------------------------------------
def _channels(eth: Ethtool, want: int, check: bool, changes: list[str]) -> None:
    rc, out, err = eth.run("-l", eth.ifname)
    if rc != 0:
        raise NicError(
            f"{eth.ifname}: nic_channels={want}, but the NIC does not expose channel "
            f"counts (ethtool -l: {_reason(err, out)}); set nic_channels: 0"
        )
    ch = parse_channels(out)
    mx, cur = ch["max"], ch["current"]
    if mx.get("combined"):
        kinds = ["combined"]
    elif mx.get("rx"):
        kinds = ["rx"] + (["tx"] if mx.get("tx") else [])
    else:
        raise NicError(
            f"{eth.ifname}: nic_channels={want}, but the NIC reports no combined "
            "or rx channels to set"
        )
    args = []
    for kind in kinds:
        if want > (mx[kind] or 0):
            raise NicError(
                f"{eth.ifname}: nic_channels={want} is above the NIC's maximum of "
                f"{mx[kind]} {kind} channels"
            )
        if cur.get(kind) != want:
            args += [kind, str(want)]
            changes.append(f"{eth.ifname}: {kind} channels {cur.get(kind)} -> {want}")
    if args and not check:
        rc, out, err = eth.run("-L", eth.ifname, *args)
        if rc != 0:
            raise NicError(
                f"{eth.ifname}: the NIC refused {' '.join(args)} channels "
                f"(ethtool -L: {_reason(err, out)})"
            )


def _rings(eth: Ethtool, want: dict[str, int], check: bool, changes: list[str]) -> None:
    want = {k: v for k, v in want.items() if v}
    if not want:
        return
    rc, out, err = eth.run("-g", eth.ifname)
    what = ", ".join(f"nic_{k}_ring={v}" for k, v in want.items())
    if rc != 0:
        raise NicError(
            f"{eth.ifname}: {what}, but the NIC does not expose ring sizes "
            f"(ethtool -g: {_reason(err, out)}); set them to 0"
        )
    rings = parse_rings(out)
    args = []
    for kind, n in want.items():
        top = rings["max"].get(kind)
        if not top or n > top:
            raise NicError(
                f"{eth.ifname}: nic_{kind}_ring={n} is above the NIC's maximum of "
                f"{top or 0} {kind} ring entries"
            )
        if rings["current"].get(kind) != n:
            args += [kind, str(n)]
            changes.append(f"{eth.ifname}: {kind} ring {rings['current'].get(kind)} -> {n}")
    if args and not check:
        rc, out, err = eth.run("-G", eth.ifname, *args)
        if rc != 0:
            raise NicError(
                f"{eth.ifname}: the NIC refused ring sizes {' '.join(args)} "
                f"(ethtool -G: {_reason(err, out)})"
            )


def _offloads(
    eth: Ethtool, names: list[str], check: bool, changes: list[str], warnings: list[str]
) -> tuple[dict[str, str], list[str]]:
    if not names:
        return {}, []
    feats = parse_features(eth.read("-k", "offload features"))
    fixed: dict[str, str] = {}
    absent, turn_off = [], []
    for name in names:
        if name not in feats:
            absent.append(name)
            continue
        on, is_fixed = feats[name]
        if is_fixed:
            fixed[name] = "on" if on else "off"
            if on:
                warnings.append(f"{eth.ifname}: {name} is on and fixed: the NIC cannot turn it off")
        elif on:
            turn_off.append(name)
    if turn_off:
        changes.append(f"{eth.ifname}: offloads off: {', '.join(turn_off)}")
        if not check:
            args = [a for name in turn_off for a in (name, "off")]
            rc, out, err = eth.run("-K", eth.ifname, *args)
            now = parse_features(eth.read("-k", "offload features"))
            still = [n for n in turn_off if now.get(n, (False,))[0]]
            if still:
                raise NicError(
                    f"{eth.ifname}: the NIC kept {', '.join(still)} on (ethtool -K: "
                    f"{_reason(err, out)})"
                )
    return fixed, absent


def _ntuple(eth: Ethtool, flows: list[dict], check: bool, changes: list[str]) -> tuple[str, str]:
    """Enable ntuple and add the missing rules: ("installed", "") or ("refused", why)."""
    feats = parse_features(eth.read("-k", "offload features"))
    on, fixed = feats.get("ntuple-filters", (False, True))
    if "ntuple-filters" not in feats:
        return "refused", f"{eth.ifname} has no ntuple-filters feature"
    if not on and fixed:
        return "refused", (
            f"{eth.ifname} refuses ntuple flow steering (ntuple-filters: off "
            "[fixed]): the driver has no flow-steering rules"
        )
    if not on:
        changes.append(f"{eth.ifname}: ntuple-filters on")
        if check:
            return "installed", ""  # rules cannot be listed before the feature is on
        rc, out, err = eth.run("-K", eth.ifname, "ntuple-filters", "on")
        if not parse_features(eth.read("-k", "offload features")).get("ntuple-filters", (False,))[
            0
        ]:
            return "refused", (
                f"{eth.ifname} refused ntuple-filters on (ethtool -K: {_reason(err, out)})"
            )
    rc, out, err = eth.run("-n", eth.ifname)
    if rc != 0:
        return "refused", (
            f"{eth.ifname} cannot list its flow-steering rules (ethtool -n: {_reason(err, out)})"
        )
    rules = [r for r in parse_rules(out) if "UDP over IPv4" in r["type"]]
    for flow in flows:
        group, port, queue = str(flow["group"]), int(flow["port"]), int(flow["queue"])
        same = [r for r in rules if r["dst_ip"] == group and r["dst_port"] == port]
        if any(r["queue"] == queue for r in same):
            continue
        for r in same:  # a rule for this flow that steers elsewhere: replace it
            changes.append(
                f"{eth.ifname}: delete rule {r['location']} ({group}:{port} -> queue {r['queue']})"
            )
            if not check:
                rc, out, err = eth.run("-N", eth.ifname, "delete", str(r["location"]))
                if rc != 0:
                    return "refused", (
                        f"{eth.ifname} refused to delete rule {r['location']} "
                        f"(ethtool -N: {_reason(err, out)})"
                    )
        changes.append(f"{eth.ifname}: rule udp4 {group}:{port} -> queue {queue}")
        if not check:
            rc, out, err = eth.run(
                "-N",
                eth.ifname,
                "flow-type",
                "udp4",
                "dst-ip",
                group,
                "dst-port",
                str(port),
                "action",
                str(queue),
            )
            if rc != 0:
                return "refused", (
                    f"{eth.ifname} refused the rule udp4 dst-ip {group} "
                    f"dst-port {port} action {queue} (ethtool -N: "
                    f"{_reason(err, out)})"
                )
    return "installed", ""


def validate(p: dict) -> None:
    for key in ("channels", "rx_ring", "tx_ring"):
        if not 0 <= int(p.get(key) or 0) <= 1 << 20:
            raise NicError(f"nic_{key}: {p[key]} is outside 0..1048576")
    for flow in p.get("flows") or []:
        try:
            group = ipaddress.IPv4Address(str(flow["group"]))
            port, queue = int(flow["port"]), int(flow["queue"])
        except (KeyError, ValueError, TypeError):
            raise NicError(
                f"nic_flows: {flow!r} needs interface, group (IPv4), port and queue"
            ) from None
        if not 1 <= port <= 65535 or queue < 0:
            raise NicError(f"nic_flows: {flow!r}: port must be 1..65535 and queue >= 0")
        del group  # parsed only to validate it


def apply(p: dict, runner, check: bool) -> dict:
    """Bring interface ``p["interface"]`` to ``p``; returns the module's result fields.
    Raises NicError for what the NIC cannot do (and for refused ntuple when required)."""
    validate(p)
    ifname = p["interface"]
    if not os.path.isdir(os.path.join(p.get("sys_root") or "/sys", "class/net", ifname)):
        raise NicError(f"{ifname}: no such interface (listed in nic_interfaces)")
    eth = Ethtool(ifname, runner)
    changes: list[str] = []
    warnings: list[str] = []
    if p.get("channels"):
        _channels(eth, int(p["channels"]), check, changes)
    _rings(
        eth, {"rx": int(p.get("rx_ring") or 0), "tx": int(p.get("tx_ring") or 0)}, check, changes
    )
    fixed, absent = _offloads(eth, list(p.get("offloads_off") or []), check, changes, warnings)
    status, why = "off", ""
    if p.get("ntuple"):
        status, why = _ntuple(eth, list(p.get("flows") or []), check, changes)
        if status == "refused":
            if p.get("ntuple_required"):
                raise NicError(f"ntuple flow steering refused: {why} (nic_ntuple_required is true)")
            warnings.append(
                f"ntuple flow steering refused, continuing without it: {why}; "
                "the feed's groups land on the queue RSS picks (set "
                "nic_ntuple: false to silence this, or nic_ntuple_required: "
                "true to fail)"
            )
    return {
        "changed": bool(changes),
        "changes": changes,
        "warnings": warnings,
        "offloads_fixed": fixed,
        "offloads_absent": absent,
        "ntuple_status": status,
        "ntuple_message": why,
    }


# --- entry points --------------------------------------------------------------------------
def _subprocess_runner(argv: list[str]) -> tuple[int, str, str]:
    binary = shutil.which(argv[0]) or argv[0]
    try:
        done = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: not found (install ethtool)"
    return done.returncode, done.stdout, done.stderr


def boot(path: str) -> int:
    """Re-apply every interface of the JSON file ``path``; 1 if any failed."""
    with open(path, encoding="utf-8") as f:  # the template's header is # comments
        sets = json.loads("".join(ln for ln in f if not ln.lstrip().startswith("#")))
    rc = 0
    for p in sets:
        try:
            res = apply(p, _subprocess_runner, check=False)
        except NicError as e:
            print(f"tickwire-nic: {e}", file=sys.stderr)
            rc = 1
            continue
        for line in res["changes"] or [f"{p['interface']}: already as configured"]:
            print(f"tickwire-nic: {line}")
        for line in res["warnings"]:
            print(f"tickwire-nic: warning: {line}", file=sys.stderr)
    return rc


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    flow = {
        "interface": {"type": "str"},
        "group": {"type": "str", "required": True},
        "port": {"type": "int", "required": True},
        "queue": {"type": "int", "required": True},
    }
    module = AnsibleModule(
        argument_spec={
            "interface": {"type": "str", "required": True},
            "channels": {"type": "int", "default": 0},
            "rx_ring": {"type": "int", "default": 0},
            "tx_ring": {"type": "int", "default": 0},
            "offloads_off": {"type": "list", "elements": "str", "default": []},
            "ntuple": {"type": "bool", "default": False},
            "ntuple_required": {"type": "bool", "default": False},
            "flows": {"type": "list", "elements": "dict", "default": [], "options": flow},
            "sys_root": {"type": "str", "default": "/sys"},
        },
        supports_check_mode=True,
    )
    binary = module.get_bin_path("ethtool", required=True)

    def runner(argv):
        return module.run_command([binary, *argv[1:]])

    try:
        res = apply(module.params, runner, module.check_mode)
    except NicError as e:
        module.fail_json(msg=str(e))
    for w in res.pop("warnings"):
        module.warn(w)
    module.exit_json(**res)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--boot":
        sys.exit(boot(sys.argv[2]))
    main()
