"""Build hook for Tickwire's compiled part: the cffi binding of libxdp (``dataplane._xsk``,
built from ``dataplane/_xsk_build.py`` at install time) and of the PTP clock ioctls and
the TSC (``host.appliance._clock``, from ``host/appliance/_clock_build.py``). Everything
else about the package is declared in ``pyproject.toml``."""

from setuptools import setup

setup(
    cffi_modules=["dataplane/_xsk_build.py:ffibuilder", "host/appliance/_clock_build.py:ffibuilder"]
)
