"""``tickwire bench``: decode and book (``book``), the publisher (``sim``), the receive
paths (``rx``) and failover (``failover``), each against a baseline measured in the
same run. The verbs are declared in ``host/bench/cli.py``."""
