"""``xmatch bench``: run the benchmark suite and write ``REPORT.md`` with its plots.

    xmatch bench                      # full suite (benchmarks/suite.yaml), hours on 2 cores
    xmatch bench --quick              # ML-100K at small budgets, under 10 minutes
    xmatch bench --suite my.yaml --data-dir ../shared/data --output-dir report/
    xmatch bench --resume             # reuse the finished trainings of an interrupted run

Without ``--resume`` every model is trained again: the default runs directory
(``benchmarks/runs/bench-full|quick``) is cleared first, and a ``--runs-dir`` given explicitly
must be empty. The defaults are the source checkout's ``benchmarks/`` (the suite names the
checkout's ``configs/``); an installed package has none, so there ``--suite``, ``--output-dir``
and ``--runs-dir`` are required. While it runs, ``bench[_quick].partial.json`` is rewritten after every model, so
a long run that fails or is stopped keeps what it measured; ``bench[_quick].json`` and
``REPORT.md`` are replaced together only when the suite completes. A model that fails is listed
in the report and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
from typing import Optional, Sequence

from tfx_xmatch.bench.environment import source_checkout
from tfx_xmatch.bench.schema import check_rows
from tfx_xmatch.io_utils import json_text, write_json_atomic

# None for an installed package: the defaults below would point into site-packages.
REPO_ROOT = source_checkout()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmatch bench", description=__doc__.split("\n\n")[0])
    in_checkout = REPO_ROOT is not None
    parser.add_argument("--suite", default=str(REPO_ROOT / "benchmarks" / "suite.yaml") if in_checkout else None,
                        help="suite file (default: the checkout's benchmarks/suite.yaml)")
    parser.add_argument("--quick", action="store_true", help="the suite's quick section: a smoke run in minutes")
    parser.add_argument("--data-dir", default=os.environ.get(
        "XMATCH_DATA_DIR", str((REPO_ROOT or pathlib.Path.cwd()).parent / "shared" / "data")))
    parser.add_argument("--runs-dir", help="training runs (default: the checkout's benchmarks/runs/bench-full|quick)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished trainings in the runs directory (the report marks them)")
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "benchmarks" / "results") if in_checkout else None,
                        help="where REPORT.md, bench.json and the plots go (default: the checkout's benchmarks/results)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [flag for flag, value in (("--suite", args.suite), ("--output-dir", args.output_dir),
                                        ("--runs-dir", args.runs_dir or REPO_ROOT)) if value is None]
    if missing:
        print(f"xmatch bench: error: an installed tfx_xmatch has no benchmarks/ directory to default to: give "
              f"{', '.join(missing)} (the suite file and the configs it names come with the source checkout)",
              file=sys.stderr)
        return 2
    import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
    from tfx_xmatch.bench.environment import header
    from tfx_xmatch.bench.report import write_report
    from tfx_xmatch.bench.suite import available_datasets, load_suite, run_suite

    from tfx_xmatch.config import ConfigError

    try:
        suite = load_suite(args.suite, quick=args.quick)
        if not available_datasets(suite, pathlib.Path(args.data_dir)):
            raise ConfigError(f"none of the suite's datasets {list(suite.datasets)} is under {args.data_dir!r} "
                              "(pass --data-dir)")
    except ConfigError as error:
        print(f"xmatch bench: error: {error}", file=sys.stderr)
        return 2
    output = pathlib.Path(args.output_dir)
    mode = "quick" if args.quick else "full"
    default_runs = REPO_ROOT / "benchmarks" / "runs" / f"bench-{mode}"
    runs_dir = pathlib.Path(args.runs_dir) if args.runs_dir else default_runs
    if runs_dir.exists() and any(runs_dir.iterdir()) and not args.resume:
        if args.runs_dir:
            print(f"xmatch bench: error: the runs directory {str(runs_dir)!r} is not empty; pass --resume to "
                  "reuse its finished trainings, or give an empty directory", file=sys.stderr)
            return 2
        shutil.rmtree(runs_dir)  # our own cache: a plain `xmatch bench` measures everything afresh
    stem = "bench_quick" if args.quick else "bench"
    result = {**header("bench", argv, program="xmatch bench"),
              "quick": args.quick, "suite": args.suite, "resume": args.resume, "complete": False,
              "budgets": {name: spec["budget_minutes"] for name, spec in suite.datasets.items()}}

    # Progress goes to its own file: the last complete result and its report stay a pair until
    # a new run completes (a run killed after one model once left a one-row bench.json).
    progress = output / f"{stem}.partial.json"

    def save(partial: dict) -> None:
        check_rows({**result, **partial}, stem)
        write_json_atomic(progress, {**result, **partial})

    result.update(run_suite(suite, args.data_dir, runs_dir, on_progress=save))
    result["complete"] = True
    check_rows(result, stem)
    report = write_report(result, output / "quick" if args.quick else output,
                          together_with={output / f"{stem}.json": json_text(result)})
    progress.unlink(missing_ok=True)
    print(f"report: {report} ({result['wall_seconds'] / 60:.1f} min)")
    for failure in result["failures"]:
        print(f"xmatch bench: FAILED {failure['dataset']} / {failure['model']} / seed {failure['seed']}: "
              f"{failure['error']}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
