"""Markers that mean something, and the fixtures every tier shares.

``@pytest.mark.needs("root", "xdp", ...)`` skips a test, before any of its fixtures is
set up, with the reason the first missing capability is missing (``tests/capabilities.py``
probes each for real, once per session). ``@pytest.mark.lab`` marks a test that builds a
private netns lab, and so needs root and network namespaces. An unknown capability name
is a usage error at collection, like an unknown marker under ``--strict-markers``.
"""

from __future__ import annotations

import pytest

from tests import capabilities

LAB_NEEDS = ("root", "netns")


def _needs(item: pytest.Item) -> list[str]:
    names = [n for m in item.iter_markers("needs") for n in m.args]
    if item.get_closest_marker("lab") is not None:
        names = [*LAB_NEEDS, *names]
    return names


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        unknown = sorted(set(_needs(item)) - set(capabilities.CAPABILITIES))
        if unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: unknown capability {unknown} in "
                f"needs(); known: {sorted(capabilities.CAPABILITIES)}"
            )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    why = capabilities.missing(_needs(item))
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="module")
def labcfg(request):
    """A private lab for the module's ``lab`` tests, named after the module, built before
    the first of them and taken down after the last."""
    from tests.labnet import built, private_lab

    cfg = private_lab(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))
    with built(cfg):
        yield cfg
