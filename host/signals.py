"""SIGTERM and SIGINT as a stop request: the one place a Tickwire process turns them into a
call of its ``stop()`` (the appliance, the simulator), for as long as a ``with`` block runs.

Only the main thread may set signal handlers; elsewhere ``stopping`` changes nothing. A
process forked inside the block (and not yet exec'd) dies of the signal instead of running
the owner's ``stop()``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stopping(stop: Callable[[], object]) -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT call ``stop()`` (and nothing else); on leaving
    it, the handlers before it are back. Nests: an inner block (e.g. over handlers a library
    installed meanwhile) restores what it found."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum: int, frame) -> None:
        if os.getpid() != owner:
            # a fork that has not exec'd yet (pyroute2's netns helpers fork): it must not
            # run the owner's stop() -- it dies of the signal, as it would have without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, prev in previous.items():  # None: set outside Python, the default then
            signal.signal(sig, signal.SIG_DFL if prev is None else prev)
