"""The whole benchmark suite in one command (not a test): ``xmatch bench`` from a checkout.

Every model on ML-1M, ML-100K, Beauty and LastFM (whichever exist under --data-dir), quality
and speed side by side, written to ``results/REPORT.md`` with plots (``--quick``:
``results/quick/REPORT.md``). The suite is ``benchmarks/suite.yaml``.

    python benchmarks/run_all.py --quick
    python benchmarks/run_all.py --data-dir ../shared/data
"""

import sys

import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tfx_xmatch.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
