#!/usr/bin/python3
"""Place a feed interface's queue IRQs on CPUs and set its RPS/XPS masks.

Contract: each listed queue's IRQs go to the queue's consumer CPU (``placement:
consumer``) or to the housekeeping cpulist (``placement: housekeeping``); every receive
queue of the interface gets ``rps_mask`` and every transmit queue ``xps_mask`` (hex
cpumasks, "" = leave alone, "0" = off). Everything is read first and written only when it
differs, so a second run changes nothing; check mode writes nothing.

IRQ discovery: the interface's own IRQs are the MSI vectors of its device
(``/sys/class/net/IF/device/msi_irqs/``, or the parent PCI function's for virtio), and a
queue's IRQs are those whose ``/proc/interrupts`` name carries the queue number in one of
the drivers' conventions: ``IF-TxRx-Q``/``IF-rx-Q``/``IF-tx-Q`` (ixgbe, i40e, ice, igb,
bnxt; also with a driver prefix or an older interface name), ``IF-fp-Q`` (qede), ``IF-Q``
(sfc), ``mlx5_compQ@pci:…`` (mlx5), ``virtioN-input.Q``/``-output.Q`` (virtio-net). A
virtual interface (veth, bridge: no ``device`` link) has no IRQs: that is reported, not an
error. A physical interface whose queue has no recognisable IRQ fails, listing the IRQ
names it does have. An IRQ the kernel manages itself refuses a new affinity: that fails
with the IRQ's number and name.

Undo: before it first changes an IRQ's affinity or a queue's mask, the module records the
value in ``STATE_DIR/irq-IF.json`` (with the IRQ's name); a value already recorded is never
recorded again, so the record keeps what the host had before Tickwire's first change.
``state: absent`` writes the recorded values back and deletes the record; an IRQ that is
gone or now serves something else (a driver reset or a channel change re-creates a NIC's
IRQs) and a queue that is gone are skipped with a note. Without a record it changes
nothing.

The same file is the boot-time re-apply script (IRQ affinity and RPS/XPS do not survive a
reboot or a driver reset): ``python3 tickwire_irq.py --boot /etc/tickwire/irq_affinity.json``
applies a JSON list of this module's parameter sets with no Ansible installed.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import sys

DOCUMENTATION = r"""
module: tickwire_irq
short_description: IRQ affinity and RPS/XPS masks of one feed interface's queues
options:
  interface: {description: Interface name., type: str, required: true}
  queues:
    description: The interface's feed queues and the CPU that consumes each.
    type: list
    elements: dict
    default: []
    suboptions:
      interface: {description: Ignored (the role filters queues by interface)., type: str}
      queue: {description: Queue number., type: int, required: true}
      cpu: {description: Consumer CPU., type: int, required: true}
  placement: {description: consumer or housekeeping., type: str, default: consumer}
  housekeeping_cpus: {description: Cpulist for placement housekeeping., type: str, default: ""}
  rps_mask:
    description: "Hex cpumask for every rx queue ('' = leave, '0' = off)."
    type: str
    default: ""
  xps_mask:
    description: "Hex cpumask for every tx queue ('' = leave, '0' = off)."
    type: str
    default: ""
  sys_root: {description: Where sysfs is mounted (tests)., type: str, default: /sys}
  state:
    description: present places; absent restores the recorded original and deletes the record.
    type: str
    choices: [present, absent]
    default: present
  state_dir:
    description: Where the record of the original values (irq-IF.json) is kept.
    type: path
    default: /var/lib/tickwire
  proc_root: {description: Where procfs is mounted (tests)., type: str, default: /proc}
"""

RETURN = r"""
changes: {description: What was (or in check mode would be) changed., type: list}
irqs: {description: "Queue IRQs found, as {irq, name, queues, cpus}.", type: list}
notes: {description: What is worth knowing but no failure (no IRQs on a veth)., type: list}
"""


class IrqError(Exception):
    """What cannot be placed; the message names interface, queue or IRQ, and why."""


STATE_DIR = "/var/lib/tickwire"


# --- the record of what Tickwire changed ---------------------------------------------------
def empty_record(ifname: str) -> dict:
    """``original``: {"irqs": {irq: {"name", "cpus"}}, "rps_cpus"|"xps_cpus": {queue: mask}}
    as they were before Tickwire first changed them."""
    return {"interface": ifname, "original": {}}


def remember(rec: dict, section: str, key: str, value) -> None:
    """Record ``value`` as the original of ``section``/``key`` unless one is recorded."""
    rec["original"].setdefault(section, {}).setdefault(key, value)


def record_path(state_dir: str, ifname: str) -> str:
    return os.path.join(state_dir or STATE_DIR, f"irq-{ifname}.json")


def load_record(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise IrqError(f"{path}: cannot read the record of the original values: {e}") from None
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


def restore_plan(
    ifname: str, original: dict, current: dict
) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """What brings ``current`` back to ``original``: ([(section, key, value, what)], notes).
    ``current``: {"irqs": {irq: (names, cpus)}, "rps_cpus"|"xps_cpus": {queue: mask}},
    with what is gone left out."""
    writes: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    have_irqs = current.get("irqs", {})
    for irq, was in sorted(original.get("irqs", {}).items(), key=lambda kv: int(kv[0])):
        names, cpus = have_irqs.get(irq, ([], ""))
        if was["name"] not in names:
            notes.append(
                f"IRQ {irq} ({was['name']}) is gone or serves something else now (a driver "
                "reset or a channel change re-creates the IRQs): left as the kernel set it"
            )
        elif cpulist(cpus) != cpulist(was["cpus"]):
            writes.append(
                (
                    "irqs",
                    irq,
                    was["cpus"],
                    f"IRQ {irq} ({was['name']}): CPUs {cpus} -> {was['cpus']}",
                )
            )
    for leaf in ("rps_cpus", "xps_cpus"):
        have = current.get(leaf, {})
        for q, mask in sorted(original.get(leaf, {}).items()):
            if q not in have:
                notes.append(
                    f"{ifname} {q} is gone (fewer channels now): its {leaf} is not restored"
                )
            elif mask_value(have[q]) != mask_value(mask):
                writes.append(
                    (
                        leaf,
                        q,
                        mask,
                        f"{ifname} {q}: {leaf} {mask_value(have[q]):x} -> {mask_value(mask):x}",
                    )
                )
    return writes, notes


# --- cpu lists and masks -------------------------------------------------------------------
def cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"{part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return cpus


def cpulist_text(cpus: set[int]) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def mask_value(text: str) -> int:
    """A kernel hex cpumask ("00000000,00000003", "3") as an integer."""
    return int(text.strip().replace(",", "") or "0", 16)


def mask_text(value: int) -> str:
    """An integer as a kernel cpumask: hex in comma-separated 32-bit words ("1,00000000")."""
    digits = f"{value:x}"
    words = [digits[max(0, i - 8) : i] for i in range(len(digits), 0, -8)]
    return ",".join(reversed(words))


# --- discovery -----------------------------------------------------------------------------
_TRIGGER = re.compile(r"^\d*-?(edge|level|fasteoi|edge-?\w*|level-?\w*)$", re.I)


def parse_interrupts(text: str) -> dict[int, list[str]]:
    """``/proc/interrupts``: {irq: [action names]} for the numbered IRQs."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    out: dict[int, list[str]] = {}
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        fields = rest.split()[ncpu:]  # chip, hwirq-trigger, names
        names_at = next((i + 1 for i, f in enumerate(fields) if _TRIGGER.match(f)), None)
        tail = fields[names_at:] if names_at is not None else fields[-1:]
        out[int(head)] = [n.strip() for n in " ".join(tail).split(",") if n.strip()]
    return out


def queue_of(name: str, ifname: str, devname: str, own: bool) -> int | None:
    """The queue number an IRQ named ``name`` serves, or None. ``own``: the IRQ is known
    to belong to the interface's device, so driver-prefixed and renamed forms count."""
    i = re.escape(ifname)
    patterns = [rf"(?:^|-){i}-(?:TxRx|txrx|rx|tx|Rx|Tx|fp|comb|combined)-(\d+)$", rf"^{i}-(\d+)$"]
    if own:
        patterns += [r"^mlx\d_comp(\d+)@", r"-(?:TxRx|txrx|rx|tx|fp)-(\d+)$"]
        if devname:
            patterns.append(rf"^{re.escape(devname)}-(?:input|output)\.(\d+)$")
    for pat in patterns:
        m = re.search(pat, name)
        if m:
            return int(m[1])
    return None


def device_irqs(ifname: str, sys_root: str) -> tuple[str, set[int] | None] | None:
    """None for a virtual interface; else (device name, its MSI IRQs or None if unknown)."""
    dev = os.path.join(sys_root, "class/net", ifname, "device")
    if not os.path.exists(dev):
        return None
    real = os.path.realpath(dev)
    for d in (real, os.path.dirname(real)):  # virtio-net: the vectors are the PCI parent's
        msi = os.path.join(d, "msi_irqs")
        if os.path.isdir(msi):
            return os.path.basename(real), {int(n) for n in os.listdir(msi) if n.isdigit()}
    return os.path.basename(real), None


def queue_irqs(
    ifname: str, queues: list[int], sys_root: str, proc_root: str
) -> tuple[dict[int, list[tuple[int, str]]] | None, list[str]]:
    """{queue: [(irq, name)]} for the wanted queues, or None for a virtual interface;
    plus the names of the device's IRQs (for the error when a queue has none)."""
    found = device_irqs(ifname, sys_root)
    if found is None:
        return None, []
    devname, msi = found
    with open(os.path.join(proc_root, "interrupts"), encoding="utf-8") as f:
        table = parse_interrupts(f.read())
    out: dict[int, list[tuple[int, str]]] = {q: [] for q in queues}
    seen = []
    for irq, names in sorted(table.items()):
        own = msi is not None and irq in msi
        if msi is not None and not own:
            continue
        for name in names:
            if own:
                seen.append(name)
            q = queue_of(name, ifname, devname, own)
            if q in out:
                out[q].append((irq, name))
                break
    return out, seen


# --- the work ------------------------------------------------------------------------------
def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text + "\n")


def _irq_affinity(
    irq: int,
    name: str,
    cpus: set[int],
    proc_root: str,
    check: bool,
    changes: list[str],
    rec: dict,
) -> None:
    path = os.path.join(proc_root, "irq", str(irq), "smp_affinity_list")
    try:
        have = cpulist(_read(path))
    except OSError as e:
        raise IrqError(f"IRQ {irq} ({name}): cannot read {path}: {e.strerror}") from None
    if have == cpus:
        return
    changes.append(f"IRQ {irq} ({name}): CPUs {cpulist_text(have)} -> {cpulist_text(cpus)}")
    remember(rec, "irqs", str(irq), {"name": name, "cpus": cpulist_text(have)})
    if check:
        return
    try:
        _write(path, cpulist_text(cpus))
    except OSError as e:
        why = (
            "the kernel manages this IRQ's affinity itself (managed IRQ); it cannot be moved"
            if e.errno == errno.EIO
            else e.strerror
        )
        raise IrqError(f"IRQ {irq} ({name}): cannot set CPUs {cpulist_text(cpus)}: {why}") from None


def _masks(
    ifname: str,
    kind: str,
    mask: str,
    sys_root: str,
    check: bool,
    changes: list[str],
    notes: list[str],
    rec: dict,
) -> None:
    """``kind`` "rx" (rps_cpus) or "tx" (xps_cpus) on every queue of that direction."""
    if not mask:
        return
    leaf = "rps_cpus" if kind == "rx" else "xps_cpus"
    qdir = os.path.join(sys_root, "class/net", ifname, "queues")
    queues = sorted(
        (d for d in os.listdir(qdir) if d.startswith(kind + "-")),
        key=lambda d: int(d.split("-")[1]),
    )
    want = mask_value(mask)
    for q in queues:
        path = os.path.join(qdir, q, leaf)
        try:
            have = mask_value(_read(path))
        except FileNotFoundError:
            notes.append(f"{ifname}: no {leaf} (kernel without {'RPS' if kind == 'rx' else 'XPS'})")
            return
        except OSError as e:
            if e.errno == errno.ENOENT and kind == "tx":
                notes.append(f"{ifname}: single transmit queue: XPS does not apply")
                return
            raise IrqError(f"{ifname}: cannot read {q}/{leaf}: {e.strerror}") from None
        if have == want:
            continue
        changes.append(f"{ifname} {q}: {leaf} {have:x} -> {want:x}")
        remember(rec, leaf, q, mask_text(have))
        if check:
            continue
        try:
            _write(path, mask_text(want))
        except OSError as e:
            raise IrqError(
                f"{ifname}: cannot set {q}/{leaf} to {mask}: {e.strerror} (a mask "
                "naming CPUs this host does not have?)"
            ) from None


def validate(p: dict) -> None:
    if (p.get("state") or "present") not in ("present", "absent"):
        raise IrqError(f"irq_affinity_state: {p['state']!r} is not one of present, absent")
    if p.get("placement", "consumer") not in ("consumer", "housekeeping"):
        raise IrqError(
            f"irq_affinity_placement: {p['placement']!r} is not one of consumer, housekeeping"
        )
    for key in ("rps_mask", "xps_mask"):
        text = p.get(key) or ""
        if text and not re.match(r"^[0-9a-fA-F]+(,[0-9a-fA-F]+)*$", text):
            raise IrqError(f'irq_affinity_{key}: {text!r} is not a hex cpumask (e.g. "0", "c")')
    try:
        hk = cpulist(p.get("housekeeping_cpus") or "")
    except ValueError as e:
        raise IrqError(f"irq_affinity_housekeeping_cpus: not a cpulist: {e}") from None
    if p.get("placement") == "housekeeping" and p.get("queues") and not hk:
        raise IrqError(
            "irq_affinity_placement is housekeeping but irq_affinity_housekeeping_cpus is empty"
        )
    for q in p.get("queues") or []:
        if int(q["queue"]) < 0 or int(q["cpu"]) < 0:
            raise IrqError(f"irq_affinity_queues: {q!r}: queue and cpu must be >= 0")


def apply(p: dict, check: bool) -> dict:
    """Bring interface ``p["interface"]`` to ``p`` (or, with ``state: absent``, back to its
    recorded original); returns the module's result fields."""
    validate(p)
    if (p.get("state") or "present") == "absent":
        return undo(p, check)
    ifname = p["interface"]
    sys_root, proc_root = p.get("sys_root") or "/sys", p.get("proc_root") or "/proc"
    if not os.path.isdir(os.path.join(sys_root, "class/net", ifname)):
        raise IrqError(f"{ifname}: no such interface (listed in irq_affinity_queues)")
    changes: list[str] = []
    notes: list[str] = []
    irqs: list[dict] = []
    path = record_path(p.get("state_dir") or STATE_DIR, ifname)
    stored = load_record(path)
    rec = copy.deepcopy(stored) if stored else empty_record(ifname)
    try:  # whatever was changed before a failure is recorded, so undo can restore it
        irqs = _place(p, ifname, sys_root, proc_root, check, changes, notes, rec)
        _masks(ifname, "rx", p.get("rps_mask") or "", sys_root, check, changes, notes, rec)
        _masks(ifname, "tx", p.get("xps_mask") or "", sys_root, check, changes, notes, rec)
    finally:
        if not check and rec != (stored or empty_record(ifname)):
            save_record(path, rec)
    return {"changed": bool(changes), "changes": changes, "irqs": irqs, "notes": notes}


def _place(
    p: dict,
    ifname: str,
    sys_root: str,
    proc_root: str,
    check: bool,
    changes: list[str],
    notes: list[str],
    rec: dict,
) -> list[dict]:
    irqs: list[dict] = []
    queues = p.get("queues") or []
    if not queues:
        return irqs
    wanted = [int(q["queue"]) for q in queues]
    by_queue, seen = queue_irqs(ifname, wanted, sys_root, proc_root)
    if by_queue is None:
        notes.append(f"{ifname} is a virtual interface (no device): it has no IRQs to place")
        return irqs
    missing = [q for q in wanted if not by_queue[q]]
    if missing:
        raise IrqError(
            f"{ifname}: no IRQ found for queue(s) "
            f"{', '.join(map(str, missing))}; the device's IRQs are named: "
            f"{', '.join(seen) or 'none (no MSI vectors)'}"
        )
    target: dict[int, tuple[str, set[int], list[int]]] = {}
    hk = cpulist(p.get("housekeeping_cpus") or "")
    for q in queues:
        cpus = hk if p.get("placement") == "housekeeping" else {int(q["cpu"])}
        for irq, name in by_queue[int(q["queue"])]:
            # an IRQ serving several listed queues goes to all their CPUs
            _, have, qs = target.setdefault(irq, (name, set(), []))
            have |= cpus
            qs.append(int(q["queue"]))
    for irq, (name, cpus, qs) in sorted(target.items()):
        _irq_affinity(irq, name, cpus, proc_root, check, changes, rec)
        irqs.append({"irq": irq, "name": name, "queues": qs, "cpus": cpulist_text(cpus)})
    return irqs


def _current(ifname: str, original: dict, sys_root: str, proc_root: str) -> dict:
    """What ``original`` names as the host has it now, as ``restore_plan`` takes it."""
    cur: dict = {"irqs": {}, "rps_cpus": {}, "xps_cpus": {}}
    if original.get("irqs"):
        with open(os.path.join(proc_root, "interrupts"), encoding="utf-8") as f:
            table = parse_interrupts(f.read())
        for irq in original["irqs"]:
            try:
                aff = _read(os.path.join(proc_root, "irq", irq, "smp_affinity_list"))
            except OSError:
                continue
            cur["irqs"][irq] = (table.get(int(irq), []), aff)
    qdir = os.path.join(sys_root, "class/net", ifname, "queues")
    for leaf in ("rps_cpus", "xps_cpus"):
        for q in original.get(leaf, {}):
            try:
                cur[leaf][q] = _read(os.path.join(qdir, q, leaf))
            except OSError:
                continue
    return cur


def undo(p: dict, check: bool) -> dict:
    """Write the recorded original values back and delete the record."""
    ifname = p["interface"]
    sys_root, proc_root = p.get("sys_root") or "/sys", p.get("proc_root") or "/proc"
    path = record_path(p.get("state_dir") or STATE_DIR, ifname)
    stored = load_record(path)
    changes: list[str] = []
    notes: list[str] = []
    if stored is None:
        return {"changed": False, "changes": changes, "irqs": [], "notes": notes}
    writes, notes = restore_plan(
        ifname, stored["original"], _current(ifname, stored["original"], sys_root, proc_root)
    )
    qdir = os.path.join(sys_root, "class/net", ifname, "queues")
    for section, key, value, what in writes:
        changes.append(what)
        if check:
            continue
        if section == "irqs":
            target = os.path.join(proc_root, "irq", key, "smp_affinity_list")
        else:
            target = os.path.join(qdir, key, section)
        try:
            _write(target, value)
        except OSError as e:
            raise IrqError(
                f"{what}: cannot write {target}: {e.strerror}; the record {path} is kept"
            ) from None
    changes.append(f"{ifname}: forget the recorded original values ({path})")
    if not check:
        os.unlink(path)
    return {"changed": True, "changes": changes, "irqs": [], "notes": notes}


# --- entry points --------------------------------------------------------------------------
def boot(path: str) -> int:
    """Re-apply every interface of the JSON file ``path``; 1 if any failed."""
    with open(path, encoding="utf-8") as f:  # the template's header is # comments
        sets = json.loads("".join(ln for ln in f if not ln.lstrip().startswith("#")))
    rc = 0
    for p in sets:
        try:
            res = apply(p, check=False)
        except IrqError as e:
            print(f"tickwire-irq-affinity: {e}", file=sys.stderr)
            rc = 1
            continue
        for line in res["changes"] + res["notes"] or [f"{p['interface']}: already placed"]:
            print(f"tickwire-irq-affinity: {line}")
    return rc


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(
        argument_spec={
            "interface": {"type": "str", "required": True},
            "queues": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {
                    "interface": {"type": "str"},
                    "queue": {"type": "int", "required": True},
                    "cpu": {"type": "int", "required": True},
                },
            },
            "placement": {
                "type": "str",
                "default": "consumer",
                "choices": ["consumer", "housekeeping"],
            },
            "housekeeping_cpus": {"type": "str", "default": ""},
            "rps_mask": {"type": "str", "default": ""},
            "xps_mask": {"type": "str", "default": ""},
            "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
            "state_dir": {"type": "path", "default": STATE_DIR},
            "sys_root": {"type": "str", "default": "/sys"},
            "proc_root": {"type": "str", "default": "/proc"},
        },
        supports_check_mode=True,
    )
    try:
        res = apply(module.params, module.check_mode)
    except IrqError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**res)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--boot":
        sys.exit(boot(sys.argv[2]))
    main()
