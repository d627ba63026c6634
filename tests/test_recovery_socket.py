"""The recovery client's receive buffer: answers come in bursts (max_inflight x
max_per_request messages), so with CAP_NET_ADMIN it takes 8 MiB past net.core.rmem_max
through SO_RCVBUFFORCE (a branch that never ran while the option was looked up in
Python's socket module, which does not export it)."""

import socket
from pathlib import Path

import pytest

from dataplane import shm
from host.appliance.recovery import RecoveryClient, RecoveryConfig


@pytest.mark.needs("root")  # CAP_NET_ADMIN, for SO_RCVBUFFORCE
def test_receive_buffer_is_forced_past_rmem_max(tmp_path):
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    if rmem_max >= 8 << 20:
        pytest.skip(f"net.core.rmem_max is {rmem_max}: SO_RCVBUF alone would reach 8 MiB")
    maps = shm.create("rcvbuf", root=tmp_path)
    cfg = RecoveryConfig(server_host="127.0.0.1", server_port=9, session="TEST")
    client = RecoveryClient(cfg, maps, bind_ip="127.0.0.1", log=lambda m: None)
    client.open()
    try:
        got = client._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        client.stop()
    assert got >= 2 * (8 << 20), got  # the kernel doubles what it was given
