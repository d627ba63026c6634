"""The appliance's control plane: the process tree (``tickwire run``, ``warm``), the XDP
steering loader, the recovery client, metrics, line health, status, preflight, clock
calibration and the offline book (``tickwire book``).

It imports ``dataplane`` and ``host``'s top (``config``, ``netns``, ``signals``; its verbs,
``cli.py``, take ``host.cli``'s argument types), never the exchange in a box
(``host.exchange``) or the benchmarks (``host.bench``): ``tests/test_layout.py`` holds that.
"""
