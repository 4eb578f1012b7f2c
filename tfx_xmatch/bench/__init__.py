"""The benchmark suite behind ``xmatch bench`` and ``benchmarks/run_all.py``: every model on
every available dataset, quality and speed side by side, and ``REPORT.md`` with plots."""
