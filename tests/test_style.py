"""The tree is linted and formatted by ruff (``make lint``), so CI holds the one layout
rule: ``ruff format``, with no per-line opt-outs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    try:
        import ruff  # noqa: F401 - the dev extra, installed by make setup
    except ImportError:
        pytest.skip("needs ruff (the dev extra: make setup installs it)")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_check_passes():
    done = _ruff("check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    done = _ruff("format", "--check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_file_opts_out_of_the_formatter():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    marked = [
        f
        for f in tracked
        if "fmt: " + "skip" in (ROOT / f).read_text() or "fmt: " + "off" in (ROOT / f).read_text()
    ]
    assert not marked, marked
