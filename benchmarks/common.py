"""What every benchmark records beside its numbers: machine, versions, date, command."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Callable, Optional

from tfx_xmatch.bench.environment import header, machine_info, versions  # noqa: F401  (the benchmarks' import)
from tfx_xmatch.bench.schema import check_rows

from conform_results import conform  # the benchmarks directory is on the path of every importer

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def default_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XMATCH_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def run_split(config):
    """The split a finished run was trained on, or None (printed as skipped) when its data is
    absent here: the loader's own lookup decides, and its message names the path it tried."""
    from tfx_xmatch import training

    try:
        return training.prepare_split(config)
    except FileNotFoundError as error:
        print(f"skipped: the run's data is absent ({error})", file=sys.stderr)
        return None


def load_finished_run(run_dir: pathlib.Path, trained_by: str = ""):
    """(config, split, model) of a finished run, or None (printed as skipped) when the run or its
    data is absent; ``trained_by`` names the script that trains it, for the message."""
    from tfx_xmatch import training

    if not (run_dir / "model").is_dir():
        hint = f" (train it with {trained_by})" if trained_by else ""
        print(f"skipped: no trained run at {run_dir}{hint}", file=sys.stderr)
        return None
    config = training.load_run_config(run_dir)
    split = run_split(config)
    if split is None:
        return None
    return config, split, training.load_model(run_dir / "model")


def write_results(result: dict, output: str, to_markdown: Callable[[dict], str], echo: bool = False,
                  results_dir: pathlib.Path = RESULTS_DIR, partial: bool = False) -> None:
    """Writes ``result`` as ``results_dir/<output>.json`` and its page ``<output>.md``, printing
    the page when ``echo``. Neither is replaced before both are written, so a run cut short
    leaves the previous complete pair.

    Args:
      partial: The progress of a run that goes on (``<output>.partial.json`` / ``.md``): an
        interrupted run must not put a subset in the place of the last complete results. The
        complete write removes it.

    Raises:
      ValueError: ``result`` does not follow DESIGN's schema (``check_rows``); nothing is written.
    """
    from tfx_xmatch.io_utils import json_text, write_texts_atomic

    check_rows(result, output)
    results_dir.mkdir(parents=True, exist_ok=True)
    page = to_markdown(result)
    stem = f"{output}.partial" if partial else output
    write_texts_atomic({results_dir / f"{stem}.json": json_text(result), results_dir / f"{stem}.md": page})
    if not partial:
        for suffix in (".json", ".md"):
            (results_dir / f"{output}.partial{suffix}").unlink(missing_ok=True)
    if echo:
        print(page)


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (argparse names the flag and the value otherwise)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def markdown_header(result: dict, title: str) -> list[str]:
    """The first lines of every results page: title, command, date, machine, versions, and the
    datasets and splits its rows measured (every quality number names them)."""
    machine, versions = result["machine"], result["versions"]

    def described(machine: dict) -> str:
        return f"{machine['cpu']} ({machine['cpu_count']} cores, {machine['memory_gib']} GiB, no GPU)"

    def also(more: dict) -> str:
        elsewhere = more.get("machine") not in (None, machine)
        return f"- also: `{more['command']}` ({more['date']}" + (
            f"; machine: {described(more['machine'])})" if elsewhere else ")")

    data = sorted({(str(row["dataset"]), str(row.get("split", "-"))) for row in result.get("rows", [])
                   if row.get("dataset")})
    return [
        f"# {result['benchmark']}: {title}",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- machine: {described(machine)}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ] + [also(more) for more in result.get("more_commands", [])] + (
        ["- data: " + "; ".join(f"{dataset} (split: {split})" for dataset, split in data)] if data else [])


def read_results(path: pathlib.Path, benchmark: str) -> dict:
    """The results file of ``benchmark`` at ``path``.

    Raises:
      ValueError: the file is not JSON, or not a results file of that benchmark (names the file).
    """
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error}); move it away or choose another --output") from None
    if (not isinstance(results, dict) or results.get("benchmark") != benchmark
            or not isinstance(results.get("rows"), list)):
        raise ValueError(f"{path}: not a {benchmark!r} results file; choose another --output")
    return results


def model_name(row: dict) -> str:
    """A result row's model, and its training seed (``train_seed``) when it is not the default 0."""
    seed = row.get("train_seed", 0)
    return f"{row['model']} (seed {seed})" if seed else row["model"]


def add_seed_and_merge_arguments(parser, model: str, replaced: str) -> None:
    """The ``--train-seed`` and ``--merge`` options of the quality benchmarks.

    Args:
      parser: The script's ``argparse.ArgumentParser``.
      model: The compared model, as the help names it (e.g. "SPARC").
      replaced: Which rows a merged re-run replaces (e.g. "dataset, model and seed").
    """
    parser.add_argument("--train-seed", type=int, default=0,
                        help="training seed (train.seed) of every model; a non-zero seed trains its own runs "
                             f"(names ending -seed<N>), {model} compared with the two-tower of the same seed")
    parser.add_argument("--merge", action="store_true",
                        help=f"add the rows to the results already under --output (rows of the same {replaced} "
                             "replaced) instead of starting the file afresh")


def seeded_run_dir(runs_dir, name: str, train_seed: int = 0) -> pathlib.Path:
    """The run directory ``name`` under ``runs_dir``; a non-zero training seed has its own (``-seed<N>``)."""
    return pathlib.Path(runs_dir) / (name + (f"-seed{train_seed}" if train_seed else ""))


def merge_rows(result: dict, path: pathlib.Path, key: tuple[str, ...], defaults: Optional[dict] = None) -> dict:
    """``result`` folded into the results already at ``path`` (JSON), so runs of separate variants add up.

    Rows of ``result`` replace earlier rows with the same ``key`` fields and the others are kept in
    their order; the earlier header stays and this run's command is listed under ``more_commands``.
    Without a file at ``path`` the result is returned as it is. ``defaults`` gives the value of a
    key field that rows written before the field existed lack.

    Raises:
      ValueError: if the file at ``path`` is not a results file of the same benchmark.
    """
    if not path.exists():
        return result
    # Rows written before DESIGN's schema was enforced are conformed (keys and names only).
    earlier = conform(read_results(path, result["benchmark"]))
    defaults = defaults or {}

    def row_key(row: dict) -> tuple:
        return tuple(row.get(field, defaults.get(field)) for field in key)

    fresh = {row_key(row) for row in result["rows"]}
    kept = [row for row in earlier["rows"] if row_key(row) not in fresh]
    # Every command once, with the date and the machine it last ran on: the header's machine is
    # its first command's, and merged rows were measured elsewhere as often as not.
    more = [m for m in earlier.get("more_commands", []) if m["command"] != result["command"]]
    header = {k: v for k, v in earlier.items() if k not in ("rows", "more_commands")}
    if earlier["command"] == result["command"]:  # the first command again: its rows are this run's
        header.update({k: result[k] for k in ("date", "machine", "versions", "source") if k in result})
    else:
        more.append({"command": result["command"], "date": result["date"],
                     **({"machine": result["machine"]} if "machine" in result else {})})
    return {**result, **header, "more_commands": more, "rows": kept + result["rows"]}


def training_budgets(parser, minutes_args: list, defaults: dict) -> dict:
    """``--minutes MODEL=MINUTES`` arguments applied over ``defaults`` (parser errors name the bad one)."""
    budgets = dict(defaults)
    for item in minutes_args:
        name, _, minutes = item.partition("=")
        if name not in defaults:
            parser.error(f"--minutes: unknown model {name!r}; known: {list(defaults)}")
        try:
            budgets[name] = float(minutes)
        except ValueError:
            parser.error(f"--minutes: {item!r} is not MODEL=MINUTES")
        if not budgets[name] > 0:  # NaN included
            parser.error(f"--minutes: {item!r} needs a number of minutes > 0")
    return budgets


def training_overrides(dataset: str, data_dir, epochs: int, patience: int, minutes: float) -> list[str]:
    """The config overrides every quality benchmark trains with (leave-one-out, budget, logging)."""
    return [
        f"data.dataset={dataset}", f"data.data_dir={data_dir}", "data.split=leave_one_out",
        f"train.epochs={epochs}", f"train.early_stopping_patience={patience}",
        f"train.max_train_seconds={minutes * 60}", "train.verbose=2",
    ]
