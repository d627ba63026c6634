#!/usr/bin/python3
"""The run-time half of CPU isolation: the sysfs settings of tuned's cpu-partitioning
profile (and the latency-performance profile it builds on), applied, kept and undone.

Contract (``state: present``): the unbound-workqueue cpumask
(``/sys/devices/virtual/workqueue/cpumask``) and the writeback workqueue's
(``/sys/bus/workqueue/devices/writeback/cpumask``) hold ``workqueue_cpus``; KSM is stopped
with its pages unmerged (``/sys/kernel/mm/ksm/run`` 2; 0 already counts as off); transparent
hugepages are ``transparent_hugepage`` (``always``/``madvise``/``never``); every cpufreq
policy runs ``governor``; and each CPU of ``idle_latency_cpus`` carries the PM QoS resume
latency limit ``idle_latency_us`` (``power/pm_qos_resume_latency_us``: cpuidle picks no
C-state slower to leave; 0 means polling only, shown by the kernel as "n/a"). An empty
value (or -1, or false) leaves that setting alone. Each file is read first and written
only when it differs, so a second run changes nothing; check mode writes nothing. A file
the kernel does not have (no KSM, no cpufreq driver in a VM) is a note, not a failure.

Before a file is first changed its value is recorded (``record``, JSON); ``state:
absent`` writes the recorded values back and removes the record, so undo returns the
kernel's own settings, whatever they were.

The same file is the boot-time script (none of this survives a reboot):
``python3 tickwire_cpu_tuning.py --boot --workqueue-cpus 0-1 --ksm-off ...`` applies the
same settings with no Ansible installed (``--help`` lists the flags).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Callable

DOCUMENTATION = r"""
module: tickwire_cpu_tuning
short_description: Workqueue masks, KSM, transparent hugepages, governor, idle latency
options:
  state:
    description: present applies; absent writes the recorded values back.
    type: str
    default: present
  workqueue_cpus:
    description: "Cpulist for the unbound and writeback workqueues ('' = leave)."
    type: str
    default: ""
  ksm_off: {description: Stop KSM and unmerge its pages., type: bool, default: false}
  transparent_hugepage:
    description: "always, madvise or never ('' = leave)."
    type: str
    default: ""
  governor:
    description: "The cpufreq governor of every policy ('' = leave)."
    type: str
    default: ""
  idle_latency_cpus:
    description: "Cpulist that gets the idle latency limit ('' = none)."
    type: str
    default: ""
  idle_latency_us:
    description: "PM QoS resume latency limit in us (-1 = leave, 0 = poll only)."
    type: int
    default: -1
  record: {description: JSON file of the values found before the first change., type: str}
  sys_root: {description: Where sysfs is mounted (tests)., type: str, default: /sys}
"""

RETURN = r"""
changes: {description: What was (or in check mode would be) changed., type: list}
notes: {description: Settings this kernel does not have., type: list}
"""

RECORD = "/var/lib/tickwire-cpu-isolation/originals.json"
THP_MODES = ("always", "madvise", "never")


class TuningError(Exception):
    """A setting the kernel refused; the message names the file and the value."""


def cpulist(text: str) -> list[int]:
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"{part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def cpumask(cpus: list[int]) -> str:
    """A kernel hex cpumask in 32-bit words ("00000000,00000003")."""
    value = sum(1 << c for c in cpus)
    words = []
    while True:
        words.append(f"{value & 0xFFFFFFFF:08x}")
        value >>= 32
        if not value:
            break
    return ",".join(reversed(words))


def _mask(text: str) -> int:
    return int(text.strip().replace(",", "") or "0", 16)


def _selected(text: str) -> str:
    """The bracketed choice of a sysfs selector ("always madvise [never]" -> "never")."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


# (sysfs path relative to sys_root, value to write, does the current text already hold it?)
Setting = tuple[str, str, Callable[[str], bool]]


def settings(p: dict) -> list[Setting]:
    out: list[Setting] = []
    if p.get("workqueue_cpus"):
        mask = cpumask(cpulist(p["workqueue_cpus"]))
        for rel in ("devices/virtual/workqueue/cpumask", "bus/workqueue/devices/writeback/cpumask"):
            out.append((rel, mask, lambda t, m=mask: _mask(t) == _mask(m)))
    if p.get("ksm_off"):
        out.append(("kernel/mm/ksm/run", "2", lambda t: t.strip() in ("0", "2")))
    thp = p.get("transparent_hugepage") or ""
    if thp:
        if thp not in THP_MODES:
            raise TuningError(f"transparent_hugepage {thp!r} is not one of {', '.join(THP_MODES)}")
        out.append(("kernel/mm/transparent_hugepage/enabled", thp, lambda t: _selected(t) == thp))
    if p.get("governor"):
        gov = p["governor"]
        out.append(
            ("devices/system/cpu/cpufreq/policy*/scaling_governor", gov, lambda t: t.strip() == gov)
        )
    us = p.get("idle_latency_us", -1)
    if us is not None and us >= 0 and p.get("idle_latency_cpus"):
        value = "n/a" if us == 0 else str(us)  # the kernel reads "0" as "no constraint"
        for cpu in cpulist(p["idle_latency_cpus"]):
            out.append(
                (
                    f"devices/system/cpu/cpu{cpu}/power/pm_qos_resume_latency_us",
                    value,
                    lambda t, v=value: t.strip() == v,
                )
            )
    return out


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(value + "\n")
    except OSError as e:
        raise TuningError(f"{path}: cannot write {value!r}: {e.strerror}") from None


def _load_record(path: str) -> dict[str, str]:
    text = _read(path)
    return json.loads(text) if text else {}


def _save_record(path: str, record: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def apply(p: dict, check: bool) -> dict:
    root = p.get("sys_root") or "/sys"
    record_path = p.get("record") or RECORD
    record = _load_record(record_path)
    changes, notes = [], []
    for rel, value, holds in settings(p):
        paths = sorted(glob.glob(os.path.join(root, rel))) if "*" in rel else [f"{root}/{rel}"]
        paths = [x for x in paths if os.path.exists(x)]
        if not paths:
            notes.append(f"/sys/{rel}: not in this kernel (left alone)")
            continue
        for path in paths:
            text = _read(path) or ""
            if holds(text):
                continue
            shown = "/sys/" + os.path.relpath(path, root)
            changes.append(f"{shown}: {_selected(text) or '?'} -> {value}")
            if check:
                continue
            record.setdefault(shown, _selected(text))
            _save_record(record_path, record)  # before the write: undo must know it
            _write(path, value)
    return {"changed": bool(changes), "changes": changes, "notes": notes}


def restore(p: dict, check: bool) -> dict:
    root = p.get("sys_root") or "/sys"
    record_path = p.get("record") or RECORD
    record = _load_record(record_path)
    changes, notes = [], []
    for shown, value in sorted(record.items()):
        path = os.path.join(root, shown[len("/sys/") :])
        text = _read(path)
        if text is None:
            notes.append(f"{shown}: gone (not restored)")
            continue
        if _selected(text) == value or (value and text.strip() == value):
            continue
        changes.append(f"{shown}: {_selected(text)} -> {value}")
        if not check:
            _write(path, value)
    if record and not check:
        os.unlink(record_path)
    return {"changed": bool(changes) or bool(record), "changes": changes, "notes": notes}


def boot(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tickwire_cpu_tuning.py --boot")
    ap.add_argument("--workqueue-cpus", default="")
    ap.add_argument("--ksm-off", action="store_true")
    ap.add_argument("--transparent-hugepage", default="", choices=("", *THP_MODES))
    ap.add_argument("--governor", default="")
    ap.add_argument("--idle-latency-cpus", default="")
    ap.add_argument("--idle-latency-us", type=int, default=-1)
    ap.add_argument("--record", default=RECORD)
    ap.add_argument("--sys-root", default="/sys")
    ap.add_argument("--restore", action="store_true", help="write the recorded values back")
    args = vars(ap.parse_args(argv))
    try:
        res = restore(args, False) if args.pop("restore") else apply(args, False)
    except TuningError as e:
        print(f"tickwire-cpu-tuning: {e}", file=sys.stderr)
        return 1
    for line in res["changes"] + res["notes"] or ["already tuned"]:
        print(f"tickwire-cpu-tuning: {line}")
    return 0


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "workqueue_cpus": {"type": "str", "default": ""},
            "ksm_off": {"type": "bool", "default": False},
            "transparent_hugepage": {"type": "str", "default": ""},
            "governor": {"type": "str", "default": ""},
            "idle_latency_cpus": {"type": "str", "default": ""},
            "idle_latency_us": {"type": "int", "default": -1},
            "record": {"type": "str", "default": RECORD},
            "sys_root": {"type": "str", "default": "/sys"},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        res = (
            restore(p, module.check_mode) if p["state"] == "absent" else apply(p, module.check_mode)
        )
    except (TuningError, ValueError) as e:
        module.fail_json(msg=str(e))
    module.exit_json(**res)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--boot"]:
        sys.exit(boot(sys.argv[2:]))
    main()
