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

Undo: before it first changes a setting, the module records the setting's value in
``STATE_DIR/nic-IF.json`` (a setting already recorded is never recorded again, so the
record keeps the value from before Tickwire's first change however often the role runs),
and it records the location of every ntuple rule it adds and every rule it replaces.
``state: absent`` deletes the rules it added, re-adds the ones it replaced, restores the
recorded settings and deletes the record; without a record it changes nothing. With
``state: present``, rules Tickwire added that no flow asks for any more are deleted (and
a rule they replaced comes back); rules Tickwire did not add are left alone unless they
steer a wanted group and port to another queue. Settings no longer asked for (channels
back to 0, an offload dropped from the list) are left as they are until the undo.

The same file is the boot-time re-apply script (ethtool settings do not survive a reboot
or a driver reset): ``python3 tickwire_nic.py --boot /etc/tickwire/nic.json`` applies a
JSON list of this module's parameter sets, one per interface, with no Ansible installed.
"""

from __future__ import annotations

import copy
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
  state:
    description: present tunes; absent restores the recorded original and deletes the record.
    type: str
    choices: [present, absent]
    default: present
  state_dir:
    description: Where the record of the original settings (nic-IF.json) is kept.
    type: path
    default: /var/lib/tickwire
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


STATE_DIR = "/var/lib/tickwire"


# --- the record of what Tickwire changed ---------------------------------------------------
def empty_record(ifname: str) -> dict:
    """``original``: {"channels"|"rings": {kind: n}, "features": {name: on}} as they were
    before Tickwire first changed them; ``rules``: the ntuple rules Tickwire added;
    ``replaced``: rules it deleted to make room for its own (re-added on undo)."""
    return {"interface": ifname, "original": {}, "rules": [], "replaced": []}


def remember(rec: dict, section: str, key: str, value) -> None:
    """Record ``value`` as the original of ``section``/``key`` unless one is recorded."""
    rec["original"].setdefault(section, {}).setdefault(key, value)


def record_path(state_dir: str, ifname: str) -> str:
    return os.path.join(state_dir or STATE_DIR, f"nic-{ifname}.json")


def load_record(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NicError(f"{path}: cannot read the record of the original settings: {e}") from None
    base = empty_record(rec.get("interface", ""))
    base.update(rec)
    return base


def save_record(path: str, rec: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)  # a crash leaves the old record or the new one, never half


def rule_key(rule: dict) -> tuple[str, int | None, int | None]:
    """(group, port, queue) of a tracked rule or of a flow."""
    return str(rule["group"]), rule["port"], rule["queue"]


def listed_key(rule: dict) -> tuple[str, int | None, int | None]:
    """(group, port, queue) of a rule as ``parse_rules`` lists it."""
    return rule["dst_ip"], rule["dst_port"], rule["queue"]


def rule_plan(
    tracked: list[dict], listed: list[dict], wanted: set[tuple]
) -> tuple[list[dict], list[dict]]:
    """Which rules Tickwire added to delete now: (delete, keep). A tracked rule whose
    location no longer holds it (a reboot, a driver reset, someone deleted it) is in
    neither: it is forgotten. ``wanted``: (group, port, queue) of the flows asked for."""
    at = {r["location"]: listed_key(r) for r in listed}
    delete, keep = [], []
    for t in tracked:
        if at.get(t["location"]) != rule_key(t):
            continue
        (keep if rule_key(t) in wanted else delete).append(t)
    return delete, keep


def readd_plan(
    replaced: list[dict], listed: list[dict], wanted: set[tuple]
) -> tuple[list[dict], list[dict]]:
    """Which rules Tickwire replaced to put back now: (readd, still replaced). One whose
    group and port a wanted flow still takes stays replaced; one whose group and port
    are steered again by someone else's rule is forgotten."""
    taken = {(g, p) for g, p, _ in wanted}
    there = {(r["dst_ip"], r["dst_port"]) for r in listed}
    readd, still = [], []
    for r in replaced:
        gp = (str(r["group"]), r["port"])
        if gp in taken:
            still.append(r)
        elif gp not in there:
            readd.append(r)
    return readd, still


def restore_plan(ifname: str, original: dict, current: dict) -> list[tuple[list[str], str]]:
    """The ethtool calls that bring ``current`` back to ``original``: [(argv, what)].
    ``current``: {"channels"|"rings": {kind: n}, "features": {name: (on, fixed)}}.
    Features go first (ntuple-filters off once the rules are gone), channels last."""
    steps: list[tuple[list[str], str]] = []
    feats = current.get("features", {})
    args, what = [], []
    for name, on in sorted(original.get("features", {}).items()):
        have = feats.get(name)
        if have is None or have[1] or have[0] == on:  # gone, fixed, or already so
            continue
        args += [name, "on" if on else "off"]
        what.append(f"{name} {'on' if on else 'off'}")
    if args:
        steps.append((["-K", ifname, *args], f"{ifname}: restore {', '.join(what)}"))
    for section, flag, noun in (("rings", "-G", "ring"), ("channels", "-L", "channels")):
        args, what = [], []
        have = current.get(section, {})
        for kind, n in sorted(original.get(section, {}).items()):
            if n is None or have.get(kind) is None or have.get(kind) == n:
                continue
            args += [kind, str(n)]
            what.append(f"{kind} {noun} {have.get(kind)} -> {n}")
        if args:
            steps.append(([flag, ifname, *args], f"{ifname}: restore {', '.join(what)}"))
    return steps


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
def _channels(eth: Ethtool, want: int, check: bool, changes: list[str], rec: dict) -> None:
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
            remember(rec, "channels", kind, cur.get(kind))
            changes.append(f"{eth.ifname}: {kind} channels {cur.get(kind)} -> {want}")
    if args and not check:
        rc, out, err = eth.run("-L", eth.ifname, *args)
        if rc != 0:
            raise NicError(
                f"{eth.ifname}: the NIC refused {' '.join(args)} channels "
                f"(ethtool -L: {_reason(err, out)})"
            )


def _rings(eth: Ethtool, want: dict[str, int], check: bool, changes: list[str], rec: dict) -> None:
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
            remember(rec, "rings", kind, rings["current"].get(kind))
            changes.append(f"{eth.ifname}: {kind} ring {rings['current'].get(kind)} -> {n}")
    if args and not check:
        rc, out, err = eth.run("-G", eth.ifname, *args)
        if rc != 0:
            raise NicError(
                f"{eth.ifname}: the NIC refused ring sizes {' '.join(args)} "
                f"(ethtool -G: {_reason(err, out)})"
            )


def _offloads(
    eth: Ethtool,
    names: list[str],
    check: bool,
    changes: list[str],
    warnings: list[str],
    rec: dict,
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
        for name in turn_off:
            remember(rec, "features", name, True)
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


def _list_rules(eth: Ethtool) -> tuple[list[dict] | None, str]:
    """The UDP/IPv4 rules, or (None, why) when the NIC cannot list them."""
    rc, out, err = eth.run("-n", eth.ifname)
    if rc != 0:
        return None, (
            f"{eth.ifname} cannot list its flow-steering rules (ethtool -n: {_reason(err, out)})"
        )
    return [r for r in parse_rules(out) if "UDP over IPv4" in r["type"]], ""


def _delete_rule(eth: Ethtool, rule: dict, why: str, check: bool, changes: list[str]) -> str:
    """Delete the rule at ``rule["location"]``; the refusal's message, or ""."""
    loc = rule["location"]
    changes.append(
        f"{eth.ifname}: delete rule {loc} ({rule['group']}:{rule['port']} -> queue "
        f"{rule['queue']}){why}"
    )
    if check:
        return ""
    rc, out, err = eth.run("-N", eth.ifname, "delete", str(loc))
    if rc != 0:
        return f"{eth.ifname} refused to delete rule {loc} (ethtool -N: {_reason(err, out)})"
    return ""


def _add_rule(
    eth: Ethtool,
    group: str,
    port: int,
    queue: int | None,
    check: bool,
    changes: list[str],
    loc: int | None = None,
) -> tuple[int | None, str]:
    """Add a udp4 rule: (its location, "") or (None, the refusal). ethtool prints "Added
    rule with ID N" when it picks the location; otherwise the listing shows it."""
    action = str(queue) if queue is not None else "-1"  # -1: drop
    changes.append(
        f"{eth.ifname}: rule udp4 {group}:{port} -> "
        f"{'queue ' + action if queue is not None else 'drop'}"
        + (f" at {loc}" if loc is not None else "")
    )
    if check:
        return None, ""
    before = _list_rules(eth)[0] or []
    argv = ["-N", eth.ifname, "flow-type", "udp4", "dst-ip", group, "dst-port", str(port)]
    argv += ["action", action] + (["loc", str(loc)] if loc is not None else [])
    rc, out, err = eth.run(*argv)
    if rc != 0:
        return None, (
            f"{eth.ifname} refused the rule udp4 dst-ip {group} dst-port {port} action "
            f"{action} (ethtool -N: {_reason(err, out)})"
        )
    m = re.search(r"Added rule with ID (\d+)", out)
    if m:
        return int(m[1]), ""
    if loc is not None:
        return loc, ""
    old = {r["location"] for r in before}
    new = [
        r["location"]
        for r in _list_rules(eth)[0] or []
        if r["location"] not in old and listed_key(r) == (group, port, queue)
    ]
    return (new[0] if new else None), ""


def _forget_rules(
    eth: Ethtool, rec: dict, wanted: set[tuple], check: bool, changes: list[str]
) -> str:
    """Delete the rules Tickwire added that ``wanted`` no longer asks for and re-add what
    they replaced; the first refusal's message, or ""."""
    if not rec["rules"] and not rec["replaced"]:
        return ""
    feats = parse_features(eth.read("-k", "offload features"))
    listed = _list_rules(eth)[0] if feats.get("ntuple-filters", (False,))[0] else None
    if listed is None:  # ntuple off: the NIC holds no rules (a reset or reboot cleared them)
        rec["rules"], rec["replaced"] = [], []
        return ""
    delete, keep = rule_plan(rec["rules"], listed, wanted)
    rec["rules"] = keep
    for r in delete:
        why = _delete_rule(eth, r, ": no longer wanted", check, changes)
        if why:
            rec["rules"].append(r)
            return why
        listed = [x for x in listed if x["location"] != r["location"]]
    readd, rec["replaced"] = readd_plan(rec["replaced"], listed, wanted)
    for r in readd:
        loc, why = _add_rule(
            eth, str(r["group"]), r["port"], r["queue"], check, changes, loc=r["location"]
        )
        if why:
            rec["replaced"].append(r)
            return why
    return ""


def _ntuple(
    eth: Ethtool, flows: list[dict], check: bool, changes: list[str], rec: dict
) -> tuple[str, str]:
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
        remember(rec, "features", "ntuple-filters", False)
        if check:
            for flow in flows:
                changes.append(
                    f"{eth.ifname}: rule udp4 {flow['group']}:{flow['port']} -> queue "
                    f"{flow['queue']}"
                )
            return "installed", ""  # rules cannot be listed before the feature is on
        rc, out, err = eth.run("-K", eth.ifname, "ntuple-filters", "on")
        if not parse_features(eth.read("-k", "offload features")).get("ntuple-filters", (False,))[
            0
        ]:
            return "refused", (
                f"{eth.ifname} refused ntuple-filters on (ethtool -K: {_reason(err, out)})"
            )
    wanted = {(str(f["group"]), int(f["port"]), int(f["queue"])) for f in flows}
    tracked = {t["location"] for t in rec["rules"]}
    why = _forget_rules(eth, rec, wanted, check, changes)
    if why:
        return "refused", why
    rules, why = _list_rules(eth)
    if rules is None:
        return "refused", why
    if check:  # what _forget_rules would have deleted is still listed
        dropped = tracked - {t["location"] for t in rec["rules"]}
        rules = [r for r in rules if r["location"] not in dropped]
    mine = {r["location"] for r in rec["rules"]}
    for flow in flows:
        group, port, queue = str(flow["group"]), int(flow["port"]), int(flow["queue"])
        same = [r for r in rules if r["dst_ip"] == group and r["dst_port"] == port]
        if any(r["queue"] == queue for r in same):
            continue
        for r in same:  # a rule for this flow that steers elsewhere: replace it
            rule = {"location": r["location"], "group": group, "port": port, "queue": r["queue"]}
            why = _delete_rule(eth, rule, "", check, changes)
            if why:
                return "refused", why
            if r["location"] in mine:
                rec["rules"] = [t for t in rec["rules"] if t["location"] != r["location"]]
            else:
                rec["replaced"].append(rule)
        loc, why = _add_rule(eth, group, port, queue, check, changes)
        if why:
            return "refused", why
        if loc is not None:
            rec["rules"].append({"location": loc, "group": group, "port": port, "queue": queue})
    return "installed", ""


def validate(p: dict) -> None:
    if (p.get("state") or "present") not in ("present", "absent"):
        raise NicError(f"nic_state: {p['state']!r} is not one of present, absent")
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


def _result(changes: list[str], warnings: list[str], **kw) -> dict:
    res = {
        "changed": bool(changes),
        "changes": changes,
        "warnings": warnings,
        "offloads_fixed": {},
        "offloads_absent": [],
        "ntuple_status": "off",
        "ntuple_message": "",
    }
    res.update(kw)
    return res


def _keep_record(path: str, stored: dict | None, rec: dict, check: bool) -> None:
    """Write ``rec`` when it says something ``stored`` did not (never in check mode)."""
    empty = empty_record(rec["interface"])
    if not check and rec != (stored or empty):
        save_record(path, rec)


def apply(p: dict, runner, check: bool) -> dict:
    """Bring interface ``p["interface"]`` to ``p`` (or, with ``state: absent``, back to its
    recorded original); returns the module's result fields. Raises NicError for what the
    NIC cannot do (and for refused ntuple when required)."""
    validate(p)
    if (p.get("state") or "present") == "absent":
        return undo(p, runner, check)
    ifname = p["interface"]
    if not os.path.isdir(os.path.join(p.get("sys_root") or "/sys", "class/net", ifname)):
        raise NicError(f"{ifname}: no such interface (listed in nic_interfaces)")
    eth = Ethtool(ifname, runner)
    changes: list[str] = []
    warnings: list[str] = []
    path = record_path(p.get("state_dir") or STATE_DIR, ifname)
    stored = load_record(path)
    rec = copy.deepcopy(stored) if stored else empty_record(ifname)
    try:  # whatever was changed before a failure is recorded, so undo can restore it
        if p.get("channels"):
            _channels(eth, int(p["channels"]), check, changes, rec)
        rings = {"rx": int(p.get("rx_ring") or 0), "tx": int(p.get("tx_ring") or 0)}
        _rings(eth, rings, check, changes, rec)
        offs = list(p.get("offloads_off") or [])
        fixed, absent = _offloads(eth, offs, check, changes, warnings, rec)
        status, why = "off", ""
        if p.get("ntuple"):
            status, why = _ntuple(eth, list(p.get("flows") or []), check, changes, rec)
        else:
            why = _forget_rules(eth, rec, set(), check, changes)
            if why:
                raise NicError(f"nic_ntuple is false, but {why}")
    finally:
        _keep_record(path, stored, rec, check)
    if status == "refused":
        if p.get("ntuple_required"):
            raise NicError(f"ntuple flow steering refused: {why} (nic_ntuple_required is true)")
        warnings.append(
            f"ntuple flow steering refused, continuing without it: {why}; "
            "the feed's groups land on the queue RSS picks (set "
            "nic_ntuple: false to silence this, or nic_ntuple_required: "
            "true to fail)"
        )
    return _result(
        changes,
        warnings,
        offloads_fixed=fixed,
        offloads_absent=absent,
        ntuple_status=status,
        ntuple_message=why,
    )


def _current(eth: Ethtool, original: dict) -> dict:
    """The interface's settings that ``original`` names, as ``restore_plan`` takes them."""
    cur: dict = {"features": parse_features(eth.read("-k", "offload features"))}
    if original.get("rings"):
        cur["rings"] = parse_rings(eth.read("-g", "ring sizes"))["current"]
    if original.get("channels"):
        cur["channels"] = parse_channels(eth.read("-l", "channel counts"))["current"]
    return cur


def undo(p: dict, runner, check: bool) -> dict:
    """Delete the rules Tickwire added, re-add those it replaced, restore the recorded
    settings and delete the record. No record: nothing to do."""
    ifname = p["interface"]
    path = record_path(p.get("state_dir") or STATE_DIR, ifname)
    stored = load_record(path)
    changes: list[str] = []
    warnings: list[str] = []
    if stored is None:
        return _result(changes, warnings)
    if not os.path.isdir(os.path.join(p.get("sys_root") or "/sys", "class/net", ifname)):
        warnings.append(
            f"{ifname}: no such interface any more: nothing to restore; its record "
            f"{path} is deleted"
        )
    else:
        eth = Ethtool(ifname, runner)
        rec = copy.deepcopy(stored)
        try:
            why = _forget_rules(eth, rec, set(), check, changes)
        finally:
            _keep_record(path, stored, rec, check)
        if why:
            raise NicError(why)
        for argv, what in restore_plan(ifname, rec["original"], _current(eth, rec["original"])):
            changes.append(what)
            if check:
                continue
            rc, out, err = eth.run(*argv)
            if rc != 0:
                raise NicError(f"{what}: the NIC refused (ethtool {argv[0]}: {_reason(err, out)})")
        if not check:
            left = restore_plan(ifname, rec["original"], _current(eth, rec["original"]))
            if left:
                raise NicError(
                    f"{ifname}: the NIC kept its settings ({'; '.join(w for _, w in left)}); "
                    f"the record {path} is kept"
                )
    changes.append(f"{ifname}: forget the recorded original settings ({path})")
    if not check:
        os.unlink(path)
    return _result(changes, warnings)


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
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "state_dir": {"type": "path", "default": STATE_DIR},
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
