"""dataplane/sysabi.py against the C compiler: the numpy records of ``struct iovec``,
``struct msghdr`` and ``struct mmsghdr`` have the sizes and field offsets of the real
headers (``<sys/uio.h>``, ``<sys/socket.h>``), and ``LIBC`` resolves the calls made
through it. Unit tier: needs a C compiler, no root."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dataplane import sysabi

# numpy record -> (C struct, {numpy field: C member}); fields starting "_" are padding
RECORDS = {
    "IOVEC": ("iovec", {"base": "iov_base", "len": "iov_len"}),
    "MSGHDR": (
        "msghdr",
        {
            "name": "msg_name",
            "namelen": "msg_namelen",
            "iov": "msg_iov",
            "iovlen": "msg_iovlen",
            "control": "msg_control",
            "controllen": "msg_controllen",
            "flags": "msg_flags",
        },
    ),
    "MMSGHDR": ("mmsghdr", {"hdr": "msg_hdr", "len": "msg_len"}),
}
CONSTANTS = (
    "SO_RCVBUFFORCE",
    "SO_TIMESTAMPING",
    "SCM_TIMESTAMPING",
    "SOL_SOCKET",
    "SOF_TIMESTAMPING_RX_SOFTWARE",
    "SOF_TIMESTAMPING_SOFTWARE",
)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    """``sizeof``/``offsetof`` of every mirrored struct and member, from the compiler."""
    cc = shutil.which("gcc")
    lines = [
        "#define _GNU_SOURCE",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <sys/socket.h>",
        "#include <sys/uio.h>",
        "#include <linux/errqueue.h>",
        "#include <linux/net_tstamp.h>",
        '#define P(k, v) printf("\\"%s\\": %lld,\\n", k, (long long)(v))',
        "int main(void) {",
        'printf("{\\n");',
    ]
    for struct, members in RECORDS.values():
        lines.append(f'P("sizeof {struct}", sizeof(struct {struct}));')
        for member in members.values():
            lines.append(f'P("{struct}.{member}", offsetof(struct {struct}, {member}));')
            lines.append(f'P("{struct}.{member} size", sizeof(((struct {struct} *)0)->{member}));')
    for name in CONSTANTS:
        lines.append(f'P("{name}", {name});')
    # one control message of struct scm_timestamping, as CMSG_TS lays it out
    lines.append('P("CMSG_SPACE ts", CMSG_SPACE(sizeof(struct scm_timestamping)));')
    lines.append('P("CMSG_LEN ts", CMSG_LEN(sizeof(struct scm_timestamping)));')
    lines.append('P("cmsghdr.cmsg_level", offsetof(struct cmsghdr, cmsg_level));')
    lines.append('P("cmsghdr.cmsg_type", offsetof(struct cmsghdr, cmsg_type));')
    lines.append('P("cmsg data", CMSG_LEN(0));')
    lines += ['printf("\\"end\\": 0}\\n");', "return 0;", "}"]
    build = tmp_path_factory.mktemp("sysabi")
    (build / "abi.c").write_text("\n".join(lines))
    subprocess.run(
        [cc, "-Wall", "-Werror", "-o", str(build / "abi"), str(build / "abi.c")],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(build / "abi")], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("record", sorted(RECORDS))
@pytest.mark.needs("gcc")
def test_record_matches_the_c_struct(c_layout, record):
    dt = getattr(sysabi, record)
    struct, members = RECORDS[record]
    assert dt.itemsize == c_layout[f"sizeof {struct}"], record
    assert {f for f in dt.names if not f.startswith("_")} == set(members), record
    for field, member in members.items():
        fdt, off = dt.fields[field][:2]
        assert off == c_layout[f"{struct}.{member}"], (record, field)
        assert fdt.itemsize == c_layout[f"{struct}.{member} size"], (record, field)


@pytest.mark.needs("gcc")
def test_socket_constants_match_the_headers(c_layout):
    for name in CONSTANTS:
        assert getattr(sysabi, name) == c_layout[name], name


@pytest.mark.needs("gcc")
def test_the_timestamp_control_message_matches_the_c_layout(c_layout):
    ts = sysabi.CMSG_TS
    assert ts.itemsize == c_layout["CMSG_SPACE ts"]
    assert ts.fields["level"][1] == c_layout["cmsghdr.cmsg_level"]
    assert ts.fields["type"][1] == c_layout["cmsghdr.cmsg_type"]
    assert ts.fields["sw_sec"][1] == c_layout["cmsg data"]  # ts[0] starts the data


def test_records_nest_and_pack_like_the_kernel_expects():
    # sendmmsg/recvmmsg walk an array of mmsghdr: its stride is the record's itemsize,
    # and its msg_hdr is a whole msghdr
    assert sysabi.MMSGHDR.fields["hdr"][0] == sysabi.MSGHDR
    mm = np.zeros(3, sysabi.MMSGHDR)
    assert mm.strides == (sysabi.MMSGHDR.itemsize,)


def test_libc_resolves_the_calls_made_through_it():
    for name in ("sendmmsg", "recvmmsg", "__errno_location", "clock_gettime"):
        assert callable(getattr(sysabi.LIBC, name))  # AttributeError if not exported


def test_libc_is_opened_in_one_place():
    root = Path(__file__).resolve().parents[1]
    opened = sorted(
        str(p.relative_to(root))
        for d in ("host", "dataplane")
        for p in (root / d).rglob("*.py")
        if "CDLL(None" in p.read_text()
    )
    assert opened == ["dataplane/sysabi.py"], "use dataplane.sysabi.LIBC"
