"""Saga overhead against plain Celery: ``python -m bench.run`` (``make bench``).

``bench.app`` is the Celery app the benchmark's worker runs; ``bench.run`` drives it and
writes ``bench/results/latest.json`` and the results table in ``bench/RESULTS.md``.
"""
