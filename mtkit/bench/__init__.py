"""``mtkit bench`` and ``mtkit run --plan``: the pytest-benchmark runner (``runner``), the operator counter of the
CPU-side speed proxies (``ops``), the stage projection (``plan``) and the trend plot (``trend``)."""
