"""The headers shared by the BPF programs and Python (bpf/fault.h, bpf/pktgen.h) against
their Python mirrors (host/exchange/wirefaults.py, host/exchange/pktgen.py), compiled by
gcc: every constant, struct size and field offset. And the kernel interfaces defined once:
the XDP attach flags read from <linux/if_link.h>, no bpf(2) syscall-number table, no
second libc handle, no SIOCETHTOOL by number.
(bpf/common.h and dataplane/xdpabi.py: tests/test_steer.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dataplane import xdpabi
from host.exchange import pktgen
from host.exchange import wirefaults as faults

ROOT = Path(__file__).resolve().parents[1]
BPF = ROOT / "bpf"


def _defines(header: Path) -> list[str]:
    """The TW_ constants a header defines (values come from the compiler, not a regex)."""
    return re.findall(r"^#define\s+(TW_\w+)\s+\S", header.read_text(), re.M)


def _compiled(tmp_path: Path, header: Path, structs: dict[str, np.dtype]) -> dict[str, int]:
    """Every TW_ constant of ``header`` and the size and field offsets and sizes of
    ``structs``, as gcc sees them."""
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        f'#include "{header.name}"',
        '#define P(k, v) printf("\\"%s\\": %lld,\\n", k, (long long)(v))',
        "int main(void) {",
        'printf("{\\n");',
    ]
    for name in _defines(header):
        lines.append(f'P("{name}", {name});')
    for s, dt in structs.items():
        lines.append(f'P("sizeof {s}", sizeof(struct {s}));')
        for f in dt.names:
            lines.append(f'P("{s}.{f}", offsetof(struct {s}, {f}));')
            lines.append(f'P("{s}.{f} size", sizeof(((struct {s} *)0)->{f}));')
    lines += ['printf("\\"end\\": 0}\\n");', "return 0;", "}"]
    (tmp_path / "abi.c").write_text("\n".join(lines))
    subprocess.run(
        [
            shutil.which("gcc"),
            "-Wall",
            "-Werror",
            f"-I{BPF}",
            "-o",
            str(tmp_path / "abi"),
            str(tmp_path / "abi.c"),
        ],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _check_structs(got: dict[str, int], structs: dict[str, np.dtype]) -> None:
    for s, dt in structs.items():
        assert got[f"sizeof {s}"] == dt.itemsize, s
        for f in dt.names:
            fdt, off = dt.fields[f][:2]
            assert (got[f"{s}.{f}"], got[f"{s}.{f} size"]) == (off, fdt.itemsize), (s, f)


def _declared(source: Path) -> tuple[set[str], set[str]]:
    """(maps, programs) a bcc source declares."""
    text = source.read_text()
    maps = set(re.findall(r"^BPF_\w+\((tw_\w+)", text, re.M))
    progs = set(re.findall(r"^int (tw_\w+)\(struct (?:xdp_md|__sk_buff) \*\w+\)", text, re.M))
    return maps, progs


# --- bpf/fault.h -------------------------------------------------------------------------------
@pytest.mark.needs("gcc")
def test_fault_mirror_matches_the_compiled_header(tmp_path):
    structs = {"tw_fault_cfg": faults.FAULT_CFG}
    got = _compiled(tmp_path, BPF / "fault.h", structs)
    names = _defines(BPF / "fault.h")
    assert len(names) == 17  # lines, loss one, 4 flags, 11 counter indices
    for name in names:
        assert getattr(faults, name.removeprefix("TW_")) == got[name], name
    _check_structs(got, structs)
    assert faults.FAULT_CFG.names == faults.CFG_FIELDS
    assert all(faults.FAULT_CFG[f] == np.uint64 for f in faults.CFG_FIELDS)
    # the counters' names follow their indices
    indices = {
        n.removeprefix("TW_FC_").lower(): got[n]
        for n in names
        if n.startswith("TW_FC_") and n != "TW_FC_LEN"
    }
    assert [indices[c] for c in faults.COUNTERS] == list(range(faults.FC_LEN))


def test_fault_program_uses_the_header_and_its_names():
    text = (BPF / "fault.c").read_text()
    assert '#include "fault.h"' in text
    assert not re.search(r"^#define\s+TW_(FF|FC|FAULT)_", text, re.M)  # only in the header
    assert _declared(BPF / "fault.c") == ({faults.MAP_CFG, faults.MAP_STATS}, {faults.PROG_NAME})
    assert re.search(
        rf"^BPF_ARRAY\({faults.MAP_CFG}, struct tw_fault_cfg, TW_FAULT_LINES\)", text, re.M
    )
    assert re.search(
        rf"^BPF_PERCPU_ARRAY\({faults.MAP_STATS}, __u64, TW_FAULT_LINES \* "
        r"TW_FC_LEN\)",
        text,
        re.M,
    )
    assert " -w" not in text and "XDP_" not in text


# --- bpf/pktgen.h ------------------------------------------------------------------------------
# frame offsets the program alone uses; Python builds the frames through dataplane.moldudp64
PKTGEN_KERNEL_ONLY = {"TW_PG_SEQ", "TW_PG_COUNT", "TW_PG_MOLD_END", "TW_PG_TS"}


def _pktgen_mirror(name: str) -> int:
    if name == "TW_PG_MOLD":
        return pktgen.MOLD_AT
    if name == "TW_PG_STATE_LEN":
        return pktgen.STATE_LEN
    return getattr(pktgen, "ST_" + name.removeprefix("TW_PG_"))


@pytest.mark.needs("gcc")
def test_pktgen_mirror_matches_the_compiled_header(tmp_path):
    got = _compiled(tmp_path, BPF / "pktgen.h", {})
    names = [n for n in _defines(BPF / "pktgen.h") if n not in PKTGEN_KERNEL_ONLY]
    assert len(names) == 13
    for name in names:
        assert _pktgen_mirror(name) == got[name], name
    slots = {n: v for n, v in vars(pktgen).items() if n.startswith("ST_")}
    assert sorted(slots.values()) == list(range(len(slots)))
    assert max(slots.values()) < pktgen.STATE_LEN


def test_pktgen_program_uses_the_header_and_its_names():
    text = (BPF / "pktgen.c").read_text()
    assert '#include "pktgen.h"' in text
    assert not re.search(r"^#define\s+TW_PG_", text, re.M)
    assert _declared(BPF / "pktgen.c") == (
        {pktgen.MAP_STATE, pktgen.MAP_SINK_STATS},
        {pktgen.PROG_GEN, pktgen.PROG_SINK},
    )
    assert re.search(rf"^BPF_ARRAY\({pktgen.MAP_STATE}, __u64, TW_PG_STATE_LEN\)", text, re.M)


# --- kernel interfaces, defined once -----------------------------------------------------------
def _python_sources() -> dict[str, str]:
    """The product's Python (tests may spell the numbers they check)."""
    return {
        str(p.relative_to(ROOT)): p.read_text()
        for top in ("dataplane", "host")
        for p in (ROOT / top).rglob("*.py")
    }


def test_xdp_flags_come_from_the_kernel_header_once():
    from dataplane._xsk import lib

    for name in ("UPDATE_IF_NOEXIST", "SKB_MODE", "DRV_MODE", "HW_MODE", "REPLACE"):
        assert getattr(xdpabi, "XDP_FLAGS_" + name) == getattr(lib, "XDP_FLAGS_" + name)
    assert (xdpabi.XDP_FLAGS_SKB_MODE, xdpabi.XDP_FLAGS_DRV_MODE) == (2, 4)  # uapi: stable
    defining = sorted(
        p for p, text in _python_sources().items() if re.search(r"^XDP_FLAGS_\w+\s*=", text, re.M)
    )
    assert defining == ["dataplane/xdpabi.py"]


def test_no_hand_rolled_kernel_calls():
    """bpf(2) by syscall number with hand-packed attributes, libbpf through ctypes,
    SIOCETHTOOL or ethtool commands by number: libbpf and the ethtool ioctl go through
    the cffi module (host.appliance.bpfsys, dataplane.ethtool). (One libc handle:
    tests/test_sysabi.py.)"""
    rules = {
        r"\bNR_BPF\b|syscall\(\s*(321|280)\b|BPF_OBJ_PIN\s*=|ctypes\.Structure": (
            "a bpf(2) syscall table or a hand-packed struct"
        ),
        r"find_library\(\s*[\"']bpf|CDLL\([\"']libbpf": "libbpf through ctypes",
        r"0x8946|SIOCETHTOOL\s*=\s*\d|ETHTOOL_\w+\s*=\s*(0x)?\d": "an ethtool number",
    }
    found = [
        (path, what)
        for path, text in _python_sources().items()
        for pattern, what in rules.items()
        if re.search(pattern, text)
    ]
    assert found == []
