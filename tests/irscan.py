"""Reading numba's LLVM IR for calls the hot path must never make (used by the IR tests,
inside a fresh interpreter: numba shows no IR for code loaded from its cache).

``scan(dispatcher)`` returns the forbidden calls -- NRT allocation or refcounting, the
Python C-API, numba's raise and GIL helpers -- made outside the CPython and cfunc
wrappers (which run once per call, not per message), and the whole IR text for further
checks. ``allocating_control()`` is a function that does allocate: the negative control
proving the scan sees an allocation when there is one.
"""

from __future__ import annotations

import re

import numpy as np
from numba import njit

FORBIDDEN = re.compile(r"^(NRT_|Py|_Py|numba_unpickle|numba_do_raise|numba_gil)")


def scan(dispatcher) -> tuple[dict[str, int], str]:
    calls: dict[str, int] = {}
    texts = []
    for ir in dispatcher.inspect_llvm().values():
        texts.append(ir)
        current = None
        for line in ir.splitlines():
            m = re.match(r'^define [^@]*@"?([^"(\s]+)', line)
            if m:
                current = m.group(1)
                continue
            if current is None or "cpython" in current or current.startswith("cfunc"):
                continue
            for callee in re.findall(r'call [^@]*@"?([\w.$]+)', line):
                if FORBIDDEN.match(callee):
                    calls[callee] = calls.get(callee, 0) + 1
    return calls, "\n".join(texts)


def allocating_control():
    @njit
    def allocates(n):
        a = np.empty(n, np.int64)
        a[:] = 1
        return a.sum()

    allocates(3)
    return allocates
