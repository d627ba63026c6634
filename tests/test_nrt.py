"""The hot path allocates nothing and touches no Python object per message.

Compiles the hot functions in a fresh process (numba will not show IR for cached code) and
reads their LLVM IR: outside the CPython/cfunc wrappers, which run once per call and not
per message, no function may call the NRT allocator, refcounting or any Python C-API.
A negative control proves the checker sees an allocation when there is one.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r"""
    import json
    import numpy as np
    from dataplane import book, itch

    from tests.irscan import allocating_control, scan

    b = book.Book(orders=16, levels=16, ladder=16)
    b.feed(np.zeros(0, np.uint8))
    c = itch.new_counters()
    itch.walk_checksum(np.zeros(0, np.uint8), 0, 0, c)

    allocates = allocating_control()

    # the consumer's loops: compiled for the types the appliance passes, not run
    import numba
    from dataplane import consumer, shm, xsk
    from dataplane import events as ev
    from dataplane import arbiter, msgring
    m = {n: np.zeros(shape, dt) for n, (dt, shape) in shm.REGIONS.items() if n != "levels"}
    arb = (m["counters"], *arbiter.new_hold(4), m["gaps"], m["control"], m["recov"],
           m["recov_meta"])
    bk_ = (*b.arrays(), m["bbo"], np.zeros(256, np.int64), m["latency"], *ev.Ring.off(),
           *msgring.off())
    session, ts = np.zeros(10, np.uint8), np.zeros(2, np.int64)
    rbuf, _iov, mm = consumer.socket_buffers(4)
    sock_args = (np.zeros(2, np.int64), mm, rbuf, np.zeros(8, np.int64), 0, session, arb, bk_,
                 ts)
    xdp_args = (np.zeros((2, xsk.RI_LEN), np.int64), np.zeros(64, np.uint8),
                np.zeros(64, np.uint8), np.zeros(8, np.int64),
                np.zeros((4, consumer.X_COLS), np.int64), 0, session, arb, bk_, ts)
    for fn, args in ((consumer.socket_loop, sock_args), (consumer.xdp_loop, xdp_args)):
        fn.compile(tuple(numba.typeof(a) for a in args))

    result = {}
    for name, fn in (("apply_stream", book.apply_stream), ("walk_checksum", itch.walk_checksum),
                     ("socket_loop", consumer.socket_loop), ("xdp_loop", consumer.xdp_loop),
                     ("control", allocates)):
        calls, text = scan(fn)
        result[name] = {"calls": calls, "bswap": "llvm.bswap" in text, "rdtscp": "rdtscp" in text}
    print(json.dumps(result))
    """
)


def test_hot_path_llvm_has_no_allocation_or_python_calls(tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the checker works: an allocating function is caught
    assert any(
        k.startswith("NRT_MemInfo") or k.startswith("NRT_Allocate")
        for k in result["control"]["calls"]
    ), result["control"]
    # and it really read the hot functions (their byte loads are bswaps)
    assert result["apply_stream"]["bswap"] and result["walk_checksum"]["bswap"]
    assert result["apply_stream"]["calls"] == {}
    assert result["walk_checksum"]["calls"] == {}
    # the consumer loops (MoldUDP64, sequencing, book, BBO, rings) inline the book
    # and publish every book change on the event ring (its TSC stamps are in the code)
    for loop in ("socket_loop", "xdp_loop"):
        assert result[loop]["bswap"], loop
        assert result[loop]["rdtscp"], loop
        assert result[loop]["calls"] == {}, (loop, result[loop])
