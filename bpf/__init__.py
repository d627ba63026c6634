"""The BPF C sources (XDP steering, TC fault injection, the bench packet generator and
``common.h``), shipped as package data so an installed appliance compiles them with bcc
where ``host/loader.py`` looks: beside the ``host`` package."""
