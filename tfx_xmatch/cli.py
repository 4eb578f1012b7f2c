"""The ``xmatch`` command: train, evaluate, export, serve, query, Beam pipelines, the benchmark suite
and a self-contained quickstart."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile
import time
from typing import Optional, Sequence

QUICKSTART_OVERRIDES = (
    "data.dataset=synthetic",
    "data.synthetic={num_users: 1000, num_items: 300, min_length: 20, max_length: 60, noise: 0.15}",
    "model.embedding_dim=32",
    "model.max_length=50",
    "model.dropout=0.1",
    "train.epochs=20",
    "train.batch_size=64",
    "train.learning_rate=0.003",
    "train.early_stopping_patience=4",
    "train.verbose=2",
)
METRIC_NAMES = ("HR", "NDCG", "MRR", "P", "TailRecall", "Coverage")


def format_metrics(title: str, metrics: dict) -> str:
    """A text table of ranking metrics: one row per metric, one column per cutoff K."""
    ks = sorted({int(key.split("@")[1]) for key in metrics if "@" in key})
    lines = [title, "  " + f"{'':<12}" + "".join(f"{'@' + str(k):>9}" for k in ks)]
    for name in METRIC_NAMES:
        if f"{name}@{ks[0]}" in metrics:
            lines.append("  " + f"{name:<12}" + "".join(f"{metrics[f'{name}@{k}']:>9.4f}" for k in ks))
    return "\n".join(lines)


def _command_train(args: argparse.Namespace) -> int:
    from tfx_xmatch import training
    from tfx_xmatch.config import load_config

    overrides = [*args.set, *([f"train.strategy={args.strategy}"] if args.strategy else [])]
    config = load_config(args.config, overrides)
    metrics = training.train(config, args.run_dir)
    print(format_metrics(f"validation ({metrics['split']}, best epoch {metrics['best_epoch']})", metrics["validation"]))
    print(format_metrics("test", metrics["test"]))
    print(f"run directory: {args.run_dir}")
    return 0


def _run_config(run_dir, overrides: Sequence[str], command: str):
    """A run directory's config, with only eval.* and data.data_dir overridable, and
    data.dataset when the run read a file (a relative path only resolves from where it trained)."""
    from tfx_xmatch import training
    from tfx_xmatch.config import apply_overrides
    from tfx_xmatch.data.registry import DATASETS

    config = training.load_run_config(run_dir)
    movable = ("eval.", "data.data_dir=") + (("data.dataset=",) if config.data.dataset not in DATASETS else ())
    for override in overrides:
        # The data and model must stay those the model was trained on; only how it is
        # evaluated (and where the data lives) may change.
        if not override.startswith(movable):
            allowed = "eval.*, data.data_dir" + (" and data.dataset (the file's path)" if len(movable) > 2 else "")
            raise ValueError(f"only {allowed} may be overridden, got {override!r}")
    return apply_overrides(config, overrides)


def _split_of_the_runs(run_dirs: Sequence, config):
    """The runs' split, refused when the data read is not the data their models were trained on
    (a moved file given by path must hold the same items)."""
    from tfx_xmatch import training

    split = training.prepare_split(config)
    for run_dir in run_dirs:
        vocab_path = pathlib.Path(run_dir) / "model" / "item_vocab.json"
        if vocab_path.exists() and training.load_item_vocab(vocab_path.parent) != split.dataset.item_vocab:
            raise ValueError(f"{config.data.dataset} does not hold the items the model in {run_dir} was trained "
                             "on (its item vocabulary differs)")
    return split


def _check_output(output: Optional[str], run_dirs: Sequence[str]) -> None:
    """Refuses an ``--output`` the command could only write after its work, or that would
    replace a file of a run it reads (``--output RUN/config.json`` once did, with exit 0)."""
    if output is None:
        return
    from tfx_xmatch.io_utils import check_output_location
    from tfx_xmatch.training import replaces_run_file

    path = pathlib.Path(output).resolve()
    for run_dir in run_dirs:
        if replaces_run_file(path, run_dir):
            raise ValueError(f"--output {output!r} would replace a file of the run {run_dir!r} (its config.json, "
                             "metrics.json, model, ...); write it elsewhere, or under a new name")
    # A directory, a file on the way, or a read-only place failed only after the evaluation.
    check_output_location(output, "--output", directory=False)


def _command_evaluate(args: argparse.Namespace) -> int:
    from tfx_xmatch import training
    from tfx_xmatch.io_utils import write_json_atomic

    _check_output(args.output, [args.run_dir])
    config = _run_config(args.run_dir, args.set, "evaluate")
    split = _split_of_the_runs([args.run_dir], config)
    model = training.load_model(pathlib.Path(args.run_dir) / "model")
    result = training.evaluate(model, split, args.split, config)
    print(format_metrics(f"{args.split} ({split.dataset.name}, {split.name}, full ranking)", result))
    if args.output:
        write_json_atomic(args.output, result)
    return 0


def _command_compare(args: argparse.Namespace) -> int:
    from tfx_xmatch import training
    from tfx_xmatch.evaluation import check_metric, compare_metrics, compare_run_groups, is_tail_target
    from tfx_xmatch.io_utils import write_json_atomic

    if args.run_dir and (args.runs_a or args.runs_b):
        raise ValueError("give either two --run-dir (A, then B) or --runs-a and --runs-b, not both")
    grouped = bool(args.runs_a or args.runs_b)
    if args.run_dir:
        if len(args.run_dir) != 2:
            raise ValueError(f"give exactly two --run-dir (A, then B), got {len(args.run_dir)}: "
                             f"{args.run_dir}")
        groups = [args.run_dir[:1], args.run_dir[1:]]
    elif grouped:
        for flag, runs in (("--runs-a", args.runs_a), ("--runs-b", args.runs_b)):
            if not runs:
                raise ValueError(f"{flag} is missing: give the training runs of both models")
            resolved = [pathlib.Path(run).resolve() for run in runs]
            repeated = sorted({str(run) for run, path in zip(runs, resolved) if resolved.count(path) > 1})
            if repeated:
                raise ValueError(f"{flag} names the same run more than once: {repeated}")
        groups = [args.runs_a, args.runs_b]
    else:
        raise ValueError("give two --run-dir (A, then B), or --runs-a A1 [A2 ...] and "
                         "--runs-b B1 [B2 ...] (training runs of each model, e.g. one per seed)")
    if not 0.0 < args.confidence < 1.0:
        raise ValueError(f"--confidence must be in (0, 1), e.g. 0.95, got {args.confidence!r}")
    _check_output(args.output, [run for group in groups for run in group])
    for metric in args.metric:
        check_metric(metric)
    run_dirs = [run_dir for group in groups for run_dir in group]
    configs = [_run_config(run_dir, args.set, "compare") for run_dir in run_dirs]
    # Every run must rank the same users the same way: same data, same history masking.
    settings = [{**{f"data.{key}": value for key, value in config.to_dict()["data"].items() if key != "data_dir"},
                 "eval.mask_history": config.eval.mask_history} for config in configs]
    for run_dir, setting in zip(run_dirs[1:], settings[1:]):
        differing = sorted(key for key in settings[0].keys() | setting.keys()
                           if settings[0].get(key) != setting.get(key))
        if differing:
            raise ValueError(f"{run_dirs[0]} and {run_dir} do not rank the same examples the same "
                             "way: " + ", ".join(f"{key} = {settings[0].get(key)!r} vs {setting.get(key)!r}"
                                                 for key in differing))
    split = _split_of_the_runs(run_dirs, configs[0])
    for metric in args.metric:
        check_metric(metric, num_items=split.dataset.num_items)
    ranks = [training.evaluate(training.load_model(pathlib.Path(run_dir) / "model"), split, args.split, config,
                               return_ranks=True)[1] for run_dir, config in zip(run_dirs, configs)]
    examples = getattr(split, args.split)
    is_tail = is_tail_target(examples.targets, split.item_popularity())
    names = [[pathlib.Path(run_dir).name or str(run_dir) for run_dir in group] for group in groups]
    heading = f"{args.split} ({split.dataset.name}, {split.name}, full ranking, {len(examples):,} users)"
    width = max(len(metric) for metric in args.metric)
    if not grouped:
        paired = compare_metrics(ranks[0], ranks[1], args.metric, is_tail, confidence=args.confidence)
        _print_paired(heading, names, paired, width, args.confidence)
        report = {"split": args.split, "run_a": str(run_dirs[0]), "run_b": str(run_dirs[1]), "metrics": paired}
    else:
        results = compare_run_groups(ranks[:len(groups[0])], ranks[len(groups[0]):], args.metric, is_tail,
                                     confidence=args.confidence)
        _print_grouped(heading, names, results, width, args.confidence)
        report = {"split": args.split, "runs_a": [str(r) for r in groups[0]], "runs_b": [str(r) for r in groups[1]],
                  "metrics": results}
    if args.output:
        from tfx_xmatch.bench.environment import header

        # When, where and with which code it ran, as every benchmark result says: the numbers
        # depend on the test's version (the sign tests came after t-tests).
        write_json_atomic(args.output, {**header("compare", getattr(args, "argv", None), program="xmatch"),
                                        **report})
    return 0


def _print_paired(heading: str, names: list, paired: dict, width: int, confidence: float) -> None:
    from tfx_xmatch.evaluation import format_difference

    print(f"{heading}: A = {names[0][0]}, B = {names[1][0]}; A - B with a {confidence:.0%} interval, paired test")
    for metric, result in paired.items():
        verdict = (("A better" if result["difference"] > 0 else "B better")
                   if result["p_value"] < 1 - confidence else "no significant difference")
        print(f"  {metric:<{width}}  A {result['mean_a']:.4f}  B {result['mean_b']:.4f}  "
              f"{format_difference(result)}  {verdict}"
              # A test without an interval already names itself.
              + (f"  ({result['test']})" if result.get("ci_low") is not None else ""))
    print("  (the test covers the choice of users, not of training runs: retrain both with other seeds and "
          "compare with --runs-a/--runs-b before calling a difference a model's)")


def _print_grouped(heading: str, names: list, grouped: dict, width: int, confidence: float) -> None:
    from tfx_xmatch.evaluation import format_difference

    print(f"{heading}: A = {', '.join(names[0])}; B = {', '.join(names[1])}; A - B with {confidence:.0%} intervals")
    for metric, result in grouped.items():
        runs = len(result["pairings"])
        across = result["across_runs"]
        across_text = f"over runs {format_difference(across)}" if across else "over runs: needs 2+ runs a side"
        print(f"  {metric:<{width}}  A runs {' '.join(f'{v:.4f}' for v in result['runs_a'])}  "
              f"B runs {' '.join(f'{v:.4f}' for v in result['runs_b'])}")
        print(f"  {'':<{width}}  over users (runs averaged) {format_difference(result['averaged'])}; {across_text}")
        print(f"  {'':<{width}}  pairings significant: {result['significant_for_a']} of {runs} for A, "
              f"{result['significant_for_b']} of {runs} for B -> {result['verdict']}")
    print("  (a verdict needs the test over users and the test over runs to agree; with two or three runs a "
          "side the test over runs has little power)")


def _command_export(args: argparse.Namespace) -> int:
    import yaml

    from tfx_xmatch import export, training
    from tfx_xmatch.io_utils import check_output_location

    model_dir = pathlib.Path(args.run_dir) / "model"
    base = pathlib.Path(args.export_base_path).resolve()
    if base in (pathlib.Path(args.run_dir).resolve(), model_dir.resolve()):
        raise ValueError(f"--export-base-path {args.export_base_path!r} is the run's own directory: the numbered "
                         "versions would mix with the run's files; give a directory of its own (e.g. models/NAME)")
    check_output_location(args.export_base_path, "--export-base-path", directory=True)
    options = {}
    for item in args.index_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--index-option {item!r} must look like name=value")
        options[key] = yaml.safe_load(value)
    model = training.load_model(model_dir)
    path = export.export_retrieval_model(
        model, training.load_item_vocab(model_dir), args.export_base_path,
        version=args.version, index_kind=args.index, index_options=options, k_max=args.k_max,
        default_k=args.default_k, exclude_history=not args.keep_history, model_name=args.model_name,
        jit_compile=args.jit_compile, padding_id=args.padding_id,
    )
    unexpected = export.non_stock_ops(path)
    portability = ("stock TensorFlow ops only: serves on stock TF Serving (CPU or GPU)" if not unexpected
                   else f"needs ops outside stock TensorFlow: {sorted(unexpected)}")
    if export.xla_compiled(path):
        portability += "; XLA-compiled user side: on CPU, TF Serving needs --xla_cpu_compilation_enabled=true"
    index = args.index
    if index == "sparse_code":  # the budget may be the model's own: say which one was built
        budget = export.sparse_code_budget(model, options)
        index += " " + (", ".join(f"{k}={v}" for k, v in budget.items()) if budget else "without a budget (exact)")
    print(f"exported {path} (index {index}, k_max {args.k_max}); {portability}")
    return 0


def _command_quickstart(args: argparse.Namespace) -> int:
    from tfx_xmatch import training
    from tfx_xmatch.config import load_config

    started = time.time()
    run_dir = pathlib.Path(args.run_dir or tempfile.mkdtemp(prefix="xmatch-quickstart-"))
    config = load_config(None, QUICKSTART_OVERRIDES)
    split = training.prepare_split(config)
    stats = split.dataset.statistics()
    print(f"synthetic data: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions "
          f"(planted next-item structure)")
    metrics = training.train(config, run_dir, split=split)
    model = training.load_model(run_dir / "model")
    print(format_metrics(f"test, full ranking over all {split.num_items} items (best epoch {metrics['best_epoch']})",
                         metrics["test"]))
    print(planted_oracle_summary(split, config))
    print(show_top_items(model, split, config, user_row=int(split.test.user_rows[0]), k=10))
    print(f"artifacts (config, history, metrics, curves, model): {run_dir}")
    print(f"quickstart finished in {time.time() - started:.0f} s")
    return 0


def planted_oracle_summary(split, config) -> str:
    """HR@1/HR@10 of the generator's ground truth (next = planted successor of the last item).

    The synthetic walks follow the planted successor with probability 1 - noise, so this is
    about the best any model can do; it puts the model's numbers in context.
    """
    import numpy as np

    from tfx_xmatch.evaluation import evaluate_full_ranking

    successor = np.asarray(split.dataset.metadata["successor"])

    def oracle_scores(histories, user_rows):
        scores = np.zeros((len(histories), split.num_items + 1), np.float32)
        scores[np.arange(len(histories)), successor[histories[:, -1]]] = 1.0
        return scores

    oracle = evaluate_full_ranking(oracle_scores, split.test, num_items=split.num_items,
                                   max_length=1, ks=(1,), mask_history=config.eval.mask_history,
                                   tie_policy="pessimistic")
    return (f"ground truth of the generator (planted successor of the last item): "
            f"HR@1 {oracle['HR@1']:.4f} on the same test examples")


def show_top_items(model, split, config, user_row: int, k: int = 10) -> str:
    """Text listing one test user's recent history and the model's top-k unseen items."""
    import numpy as np

    from tfx_xmatch.data.dataset import pad_histories
    from tfx_xmatch.training import model_inputs

    example = int(np.flatnonzero(split.test.user_rows == user_row)[0])
    history = split.test.histories[example]
    target = int(split.test.targets[example])
    inputs = model_inputs(model, split.dataset, pad_histories([history], config.model.max_length), np.array([user_row]))
    scores = model.score_all(inputs).numpy()[0]
    scores[0] = -np.inf
    scores[np.setdiff1d(history, [target])] = -np.inf
    top = np.argsort(-scores)[:k]
    vocab = split.dataset.item_vocab
    lines = [f"user {split.dataset.user_ids[user_row]}: last items {vocab.ids(history[-5:]).tolist()}",
             f"  held-out next item: {vocab.ids([target])[0]}", f"  top-{k} retrieved:"]
    for rank, item in enumerate(top, start=1):
        mark = "  <- the held-out next item" if item == target else ""
        lines.append(f"   {rank:>2}. item {vocab.ids([item])[0]}  score {scores[item]:.3f}{mark}")
    return "\n".join(lines)


# `serve` and `query` keep TF Serving's own flag names, so their arguments pass straight through.
PASSTHROUGH_COMMANDS = {
    "serve": ("tfx_xmatch.serving.server", "serve exports over TF Serving's gRPC/REST protocol"),
    "query": ("tfx_xmatch.serving.client", "query a TF-Serving-protocol server (ours or tensorflow/serving)"),
    "bench": ("tfx_xmatch.bench.cli", "run the benchmark suite and write REPORT.md with plots"),
    "pipeline": ("tfx_xmatch.pipelines.cli", "Beam pipelines: prepare, build-index, evaluate, and run (end to end)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmatch", description=__doc__)
    parser.add_argument("--log-level", type=_log_level, default="WARNING",
                        help="Python logging level (default WARNING)")
    # Also after the subcommand, where error messages suggest it; SUPPRESS keeps the value given
    # before the subcommand when it is not repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS,
                        help="Python logging level (default WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in PASSTHROUGH_COMMANDS.items():
        commands.add_parser(name, help=f"{help_text} (`xmatch {name} --help` for its flags)", add_help=False)

    train = commands.add_parser("train", parents=[common],
                                help="train a model, select it on validation, report test metrics")
    train.add_argument("--config", help="YAML or JSON run configuration")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set train.epochs=5")
    train.add_argument("--run-dir", required=True, help="run directory; re-running resumes an interrupted run")
    train.add_argument("--strategy", choices=("default", "mirrored", "multi_worker"),
                       help="tf.distribute strategy (sets train.strategy); multi_worker reads the cluster from "
                            "TF_CONFIG, and every worker runs the same command with the same --run-dir")
    train.set_defaults(handler=_command_train)

    evaluate = commands.add_parser("evaluate", parents=[common], help="evaluate a trained run with full ranking")
    evaluate.add_argument("--run-dir", required=True, help="a run directory written by `xmatch train`")
    evaluate.add_argument("--split", choices=("validation", "test"), default="test")
    evaluate.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                          help="override an evaluation setting, e.g. --set eval.mask_history=false")
    evaluate.add_argument("--output", help="also write the metrics to this JSON file")
    evaluate.set_defaults(handler=_command_evaluate)

    compare = commands.add_parser("compare", parents=[common],
                                  help="is model A better than model B? paired tests on the same users, "
                                                  "over one or several training runs of each")
    compare.add_argument("--run-dir", action="append", default=[], metavar="RUN_DIR",
                         help="a run directory of `xmatch train`; give exactly two (A, then B) trained on the same data")
    compare.add_argument("--runs-a", nargs="+", action="extend", default=[], metavar="RUN_DIR",
                         help="instead of --run-dir: training runs of model A (e.g. one per seed)")
    compare.add_argument("--runs-b", nargs="+", action="extend", default=[], metavar="RUN_DIR",
                         help="training runs of model B")
    compare.add_argument("--split", choices=("validation", "test"), default="test")
    compare.add_argument("--metric", nargs="+", default=["HR@10", "NDCG@10", "MRR@20", "Recall@50", "TailRecall@50"],
                         help="HR@K, Recall@K, NDCG@K, MRR@K, P@K or TailRecall@K (default: %(default)s)")
    compare.add_argument("--confidence", type=float, default=0.95, help="level of the intervals (default 0.95)")
    compare.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                         help="an evaluation setting applied to both runs, e.g. --set eval.mask_history=false")
    compare.add_argument("--output", help="also write the differences to this JSON file")
    compare.set_defaults(handler=_command_compare)

    export = commands.add_parser("export", parents=[common],
                                 help="export a trained run as a SavedModel with a baked-in index")
    export.add_argument("--run-dir", required=True, help="a run directory written by `xmatch train`")
    export.add_argument("--export-base-path", required=True, help="MODEL_BASE_PATH; the version goes below it")
    export.add_argument("--index", default="brute_force",
                        choices=("brute_force", "partitioned", "scann", "sparse_code", "soft_search"),
                        help="index kind; sparse_code needs a SparCode run, soft_search a SPARC run "
                             "(e.g. --index-option num_interests=4 --index-option base=scann)")
    export.add_argument("--index-option", action="append", default=[], metavar="NAME=VALUE",
                        help="index constructor argument, e.g. num_partitions=64 (repeatable)")
    export.add_argument("--k-max", type=int, default=100, help="largest k a request may ask for")
    export.add_argument("--default-k", type=int, help="k of serving_default (default: k-max)")
    export.add_argument("--version", type=int, help="version number (default: next free)")
    export.add_argument("--keep-history", action="store_true", help="do not remove history items from results")
    export.add_argument("--padding-id", help='the id that pads histories (default 0 for integer item ids, "" for '
                                             "strings); needed when 0 is a real item id, e.g. --padding-id=-1")
    export.add_argument("--model-name", default="xmatch", help="model name for the warm-up requests")
    export.add_argument("--jit-compile", action="store_true",
                        help="compile the user side with XLA (fast for T2Diff's sampler; on CPU, TF Serving "
                             "then needs --xla_cpu_compilation_enabled=true)")
    export.set_defaults(handler=_command_export)

    quickstart = commands.add_parser("quickstart", parents=[common],
                                     help="train and evaluate on built-in synthetic data (under a minute)")
    quickstart.add_argument("--run-dir", help="where to keep the run (default: a new temporary directory)")
    quickstart.set_defaults(handler=_command_quickstart)
    return parser


def _log_level(value: str) -> str:
    """A Python logging level name; logging.basicConfig raised "Unknown level" in a traceback."""
    if not isinstance(logging.getLevelName(value.upper()), int):
        raise argparse.ArgumentTypeError(f"unknown logging level {value!r}: give DEBUG, INFO, WARNING, ERROR "
                                         "or CRITICAL")
    return value


def _split_log_level(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """A leading ``--log-level LEVEL`` (or ``--log-level=LEVEL``) and the arguments after it."""
    if argv and argv[0] == "--log-level" and len(argv) > 1:
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--log-level="):
        return argv[0].split("=", 1)[1], argv[1:]
    return None, argv


# What to do after an interruption, where there is something to say.
AFTER_AN_INTERRUPTION = {"train": "run the same command again to resume from the last finished epoch"}
# Where each command writes: what a file system error that names no file (a full disk) is about.
OUTPUT_FLAGS = {"train": "run_dir", "quickstart": "run_dir", "evaluate": "output", "compare": "output",
                "export": "export_base_path"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tfx_xmatch.interrupts import run_interruptibly

    command = next((arg for arg in _split_log_level(argv)[1] if not arg.startswith("-")), None)
    name = "xmatch" if command is None else f"xmatch {command}"
    return run_interruptibly(name, lambda: _run(argv), AFTER_AN_INTERRUPTION.get(command, ""))


def _run(argv: list) -> int:
    level, command = _split_log_level(argv)
    if (level or "").upper() != "DEBUG" and not any(arg.upper() in ("DEBUG", "--LOG-LEVEL=DEBUG") for arg in argv):
        # TensorFlow's C++ start-up notes (oneDNN, CUDA drivers, CPU instructions) otherwise
        # land in the middle of every command's output, --help included. Set before TF loads;
        # a value the user exported wins.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if command and command[0] in PASSTHROUGH_COMMANDS:
        import importlib

        import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

        if level is not None:
            try:
                _log_level(level)
            except argparse.ArgumentTypeError as error:
                print(f"xmatch: error: argument --log-level: {error}", file=sys.stderr)
                return 2
            logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
        return importlib.import_module(PASSTHROUGH_COMMANDS[command[0]][0]).main(command[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a written result records as its command
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.log_level.upper() == "WARNING":  # the default: what a warm start carried over is said too
        logging.getLogger("tfx_xmatch.warm_start").setLevel(logging.INFO)
    import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
    from tfx_xmatch.config import ConfigError
    from tfx_xmatch.data import DataFormatError
    from tfx_xmatch.interrupts import interruption
    from tfx_xmatch.user_errors import os_error_text, user_error_text

    handled = (ConfigError, DataFormatError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError, ValueError, KeyError, RuntimeError)
    try:
        return args.handler(args)
    except Exception as error:
        if interruption(error) is not None:
            raise
        flag = OUTPUT_FLAGS.get(args.command)
        text = os_error_text(error, getattr(args, flag, None) if flag else None) or user_error_text(error, handled)
        if text is None or logging.getLogger().isEnabledFor(logging.DEBUG):
            raise  # not a usage or data error, or --log-level DEBUG: the full traceback
        print(f"xmatch {args.command}: error: {text} (--log-level DEBUG shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
