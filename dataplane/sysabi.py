"""The C ABI of the socket calls the hot loops make (x86-64 Linux): ``struct iovec``,
``struct msghdr`` and ``struct mmsghdr`` as numpy records, for ``recvmmsg`` (the
consumer's kernel-socket path) and ``sendmmsg`` (the publisher), and the one process-wide
handle on libc for calls made through ctypes off the hot path, and the socket option
constants Python's ``socket`` module lacks.

``tests/test_sysabi.py`` checks the records' sizes and offsets against the C compiler's.
"""

import ctypes

import numpy as np

IOVEC = np.dtype([("base", np.uint64), ("len", np.uint64)])
MSGHDR = np.dtype(
    [
        ("name", np.uint64),
        ("namelen", np.uint32),
        ("_p0", np.uint32),
        ("iov", np.uint64),
        ("iovlen", np.uint64),
        ("control", np.uint64),
        ("controllen", np.uint64),
        ("flags", np.int32),
        ("_p1", np.int32),
    ],
)
MMSGHDR = np.dtype([("hdr", MSGHDR), ("len", np.uint32), ("_p", np.uint32)])

# <asm-generic/socket.h>: Python's socket module does not export it (checked against the
# compiler by tests/test_sysabi.py). Needs CAP_NET_ADMIN; past net.core.rmem_max.
SO_RCVBUFFORCE = 33
# the kernel's receive timestamps (SO_TIMESTAMPING_OLD: 64-bit timespecs on x86-64); the
# control message type of the stamps is the option's number
SO_TIMESTAMPING = 37
SCM_TIMESTAMPING = SO_TIMESTAMPING
SOL_SOCKET = 1
SOF_TIMESTAMPING_RX_SOFTWARE = 1 << 3
SOF_TIMESTAMPING_SOFTWARE = 1 << 4
# one control message carrying struct scm_timestamping (three timespecs; [0] is the
# software stamp, CLOCK_REALTIME): struct cmsghdr (len, level, type), then the data
CMSG_TS = np.dtype(
    [
        ("len", np.uint64),
        ("level", np.int32),
        ("type", np.int32),
        ("sw_sec", np.int64),
        ("sw_nsec", np.int64),
        ("_ts", np.int64, 4),
    ]
)

LIBC = ctypes.CDLL(None, use_errno=True)  # libc, once: every ctypes call goes through it
