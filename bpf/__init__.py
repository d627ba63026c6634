"""The BPF C sources (XDP steering, TC fault injection, the bench packet generator and
their shared headers), shipped as package data so an installed appliance compiles them
with bcc. ``DIR`` is where they are, for ``BPF(src_file=...)`` and ``-I``."""

from pathlib import Path

DIR = Path(__file__).resolve().parent
