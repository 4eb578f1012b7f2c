"""``xmatch pipeline run``: prepare -> train -> build index -> export -> evaluate -> publish.

One run configuration (the same YAML ``xmatch train`` reads) drives every stage:

1. **prepare** (Beam): the configured dataset file -> split TFRecords, vocabulary, statistics
   and dead letters under ``OUTPUT/prepared``.
2. **train**: the model trains on those records with model selection on the validation
   records (``OUTPUT/run``, the same layout as ``xmatch train``).
3. **build index** (Beam): catalogue embeddings (and SparCode posting lists) in item x code
   shards under ``OUTPUT/index``.
4. **export**: a SavedModel whose index is filled from step 3, staged under
   ``OUTPUT/staging/<version>``.
5. **evaluate** (Beam): the staged export ranks every test user's next item through its
   ``top_k`` signature (``OUTPUT/evaluation.json``).
6. **publish**: the evaluated version is copied into ``MODEL_BASE_PATH/<version>`` under a
   hidden name and renamed, so ``xmatch serve`` (or TF Serving) polling the base path picks it
   up whole. Nothing is published when an earlier stage fails.

Each stage prints its progress and wall time; ``OUTPUT/pipeline_summary.json`` records them
with the headline metrics. A run that an interruption or a failed stage stopped goes on with
the same command and ``--resume``: the stages it finished are kept, and an unfinished training
resumes from its last finished epoch.

    xmatch pipeline run --config configs/ml1m_sasrec.yaml --set data.data_dir=../shared/data \\
        --output-dir runs/ml1m-pipeline --model-base-path /models/xmatch
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

from tfx_xmatch.config import ConfigError, RunConfig, load_config
from tfx_xmatch.data.registry import DATASETS
from tfx_xmatch.data.tfrecord import shard_pattern
from tfx_xmatch.io_utils import (
    absolute_unless_url, check_checkpoint_directory, check_output_location, write_json_atomic,
)
from tfx_xmatch.pipelines.beam_utils import split_arguments
from tfx_xmatch.pipelines.prepare import PrepareSpec, match_inputs, run_prepare

STAGES = ("prepare", "train", "build_index", "export", "evaluate", "publish")
DENSE_KINDS = ("brute_force", "partitioned", "scann", "soft_search")


def prepare_spec(config: RunConfig, output_dir: str, num_shards: int = 1) -> PrepareSpec:
    """The ``prepare`` spec of a run configuration's data section.

    Raises:
      ConfigError: If the data cannot be prepared by the pipeline (generated or TFDS data,
        MovieLens side features, or a file path without ``data.format``).
    """
    data = config.data
    if data.side_info:
        raise ConfigError("data.side_info=true is not supported by the Beam prepare pipeline (it writes no user "
                          "features); set data.side_info=false")
    common = dict(split=data.split, split_options=dict(data.split_options), num_shards=num_shards)
    info = DATASETS.get(data.dataset)
    if info is not None and info.kind != "file":
        raise ConfigError(f"data.dataset={data.dataset!r} is generated, not read from files; the pipeline prepares "
                          f"files (a dataset name like 'ml-1m', or a path with data.format); write it to a file first")
    if info is not None:
        data_dir = data.data_dir or os.environ.get("XMATCH_DATA_DIR", ".")
        return PrepareSpec.for_dataset(data.dataset, data_dir, output_dir, **common)
    if not data.format:
        raise ConfigError(f"data.dataset={data.dataset!r} is a path, so data.format is needed "
                          "(pairs, sequences, ratings or table)")
    return PrepareSpec(inputs=(data.dataset,), format=data.format, output_dir=output_dir,
                       name=pathlib.Path(data.dataset).stem, **common)


def _stage(number: int, name: str, timings: dict, work: Callable[[], Any]) -> Any:
    print(f"[{number}/{len(STAGES)}] {name} ...", flush=True)
    started = time.perf_counter()
    result = work()
    timings[name] = round(time.perf_counter() - started, 2)
    print(f"[{number}/{len(STAGES)}] {name} done in {timings[name]:.1f} s", flush=True)
    return result


REQUEST_FILE = "pipeline_request.json"


def _request(config: RunConfig, spec: PrepareSpec, index_kind: str, index_options: dict, k_max: int,
             num_shards: int, item_shards: int, code_shards: int, padding_id) -> dict:
    """What a run in an output directory was asked to do, inputs (paths, sizes) included: what
    a resumed run must match, since its finished stages are kept."""
    import tensorflow as tf

    return json.loads(json.dumps({
        "config": config.to_dict(), "index_kind": index_kind, "index_options": index_options, "k_max": k_max,
        "num_shards": num_shards, "item_shards": item_shards, "code_shards": code_shards,
        "padding_id": padding_id,
        "inputs": {path: tf.io.gfile.stat(path).length for path in match_inputs(spec.inputs)},
    }))


def _check_same_request(path: pathlib.Path, request: dict) -> None:
    if not path.is_file():
        raise ConfigError(f"{str(path.parent)!r} holds no pipeline run to resume (no {REQUEST_FILE}); use a new "
                          "directory, or --overwrite to delete what is there")
    stored = json.loads(path.read_text())
    for key in sorted(request.keys() | stored.keys()):
        if request.get(key) != stored.get(key):
            if key in ("config", "inputs"):
                inner = request.get(key) or {}, stored.get(key) or {}
                key = next((f"{key}.{name}" for name in sorted(inner[0].keys() | inner[1].keys())
                            if inner[0].get(name) != inner[1].get(name)), key)
            raise ConfigError(f"the run in {str(path.parent)!r} was started with other settings or inputs, so its "
                              f"finished stages do not fit this one: {key} differs (use a new directory, or "
                              "--overwrite)")


def _finished(marker: pathlib.Path, run: Callable[[], Any], key: Optional[str] = None,
              summary: Optional[pathlib.Path] = None) -> Any:
    """The result a stage wrote last to ``marker`` (its ``key`` if given) when a resumed run had
    finished that stage, else ``run()``. A ``summary`` the stage writes after its marker (with
    more in it, e.g. its wall time) is read instead when it exists."""
    if marker.is_file():
        print(f"    finished before: {marker} kept")
        result = json.loads((summary if summary is not None and summary.is_file() else marker).read_text())
        return result if key is None else result[key]
    return run()


def _staged_version(staging: pathlib.Path) -> Optional[pathlib.Path]:
    """The export a resumed run staged before (exports appear whole, by rename), or None."""
    versions = sorted((path for path in staging.glob("*") if path.name.isdigit()), key=lambda path: int(path.name))
    if versions:
        print(f"    finished before: {versions[-1]} kept")
        return versions[-1]
    return None


def _filled_index(model, index_dir: pathlib.Path, kind: str, options: dict, k_max: int):
    """The serving index of ``kind`` filled from the build_index outputs (not recomputed)."""
    import tensorflow as tf

    from tfx_xmatch.index import make_index
    from tfx_xmatch.pipelines.build_index import load_item_embeddings, load_sparse_code_index

    if kind == "sparse_code":
        return load_sparse_code_index(index_dir, k_max=k_max)
    if kind == "soft_search":
        options = {"num_interests": model.serving_interests, "temperature": model.temperature, **options}
    index = make_index(kind, k_max=k_max, **options)
    embeddings = load_item_embeddings(index_dir)
    return index.index(tf.constant(embeddings[1:]), tf.range(1, len(embeddings), dtype=tf.int64))


def publish(staged_version: pathlib.Path, model_base_path: str) -> pathlib.Path | str:
    """Copies a staged export into the next free version of ``model_base_path``, as
    ``xmatch export`` publishes (:func:`~tfx_xmatch.export.publish_new_version`): never over a
    version another process published meanwhile, and never seen half-copied by a server."""
    from tfx_xmatch.export import publish_new_version

    return publish_new_version(
        model_base_path, lambda directory: shutil.copytree(staged_version, directory, dirs_exist_ok=True))


def run_pipeline(config: RunConfig, output_dir: str, model_base_path: str, *, index_kind: str = "brute_force",
                 index_options: Optional[dict] = None, k_max: int = 100, num_shards: int = 1, item_shards: int = 8,
                 code_shards: int = 4, beam_args: Sequence[str] = (), overwrite: bool = False,
                 padding_id=None, resume: bool = False) -> dict:
    """Runs every stage; returns (and writes to ``OUTPUT/pipeline_summary.json``) the summary.

    Args:
      config: The run configuration (data, model, training, evaluation cutoffs).
      output_dir: Working directory of the run (prepared data, run, index, staging, evaluation).
      model_base_path: Where the evaluated export is published as a new version.
      index_kind: Serving index: brute_force, partitioned, scann, sparse_code (SparCode) or
        soft_search (SPARC).
      index_options: Constructor arguments of the index (SparCode budgets: max_items_per_code,
        cache_fraction).
      k_max: Largest k a request may ask for; at least the largest ``eval.ks``.
      num_shards: TFRecord shards per part.
      item_shards: Item shards of the index build.
      code_shards: Code shards of SparCode's posting lists.
      beam_args: Beam runner flags for the Beam stages.
      overwrite: Clear ``output_dir`` first; without it (or ``resume``) a non-empty
        ``output_dir`` is refused (a run there would mix with the earlier one).
      resume: Go on with the run in ``output_dir`` that an interruption or a failed stage
        stopped: the stages it finished are kept (prepare, build_index, export, evaluate), an
        unfinished training resumes from its last finished epoch, and the rest runs. Refused
        when the run there had other settings or inputs (``pipeline_request.json`` records
        them), naming the first difference. A run that had published returns its summary.
      padding_id: The id that pads request histories (``export.resolve_padding_id``; default 0
        or ""), checked against the prepared vocabulary before training.

    Raises:
      ConfigError: If the configuration cannot run as a pipeline (see ``prepare_spec``), the
        index kind does not fit the model, ``k_max`` is below the largest evaluation cutoff,
        ``output_dir`` is not empty (without ``overwrite`` or ``resume``), or ``resume`` meets
        a run with other settings or inputs.
      ValueError: If the input has malformed lines and ``data.skip_bad_lines`` is false.
      ValueError, FileNotFoundError: From the stages, before anything is published.
    """
    from tfx_xmatch import training
    from tfx_xmatch.data.vocabulary import Vocabulary
    from tfx_xmatch.export import SPARSE_CODE_BUDGET, check_export_settings, export_retrieval_model, resolve_padding_id
    from tfx_xmatch.pipelines.build_index import STATS_FILE, SUMMARY_FILE, run_build_index
    from tfx_xmatch.pipelines.evaluate import run_evaluate
    from tfx_xmatch.pipelines.record_training import train_on_records

    index_options = dict(index_options or {})
    if max(config.eval.ks) > k_max:
        raise ConfigError(f"k_max={k_max} is below the largest evaluation cutoff eval.ks={list(config.eval.ks)}")
    if index_kind not in (*DENSE_KINDS, "sparse_code"):
        raise ConfigError(f"index_kind must be one of {(*DENSE_KINDS, 'sparse_code')}, got {index_kind!r}")
    try:  # now, not at the train or export stage: a misspelt option would waste the stages before
        training.model_arguments(config)
        check_export_settings(config.model.name, index_kind, index_options, k_max)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if "://" in str(output_dir):  # pathlib would quietly make it a local "gs:/..." directory
        raise ConfigError(f"output_dir {str(output_dir)!r} is a URL; the run's working files (records, training "
                          "run, index) are written with local I/O: give a local or mounted directory "
                          "(--model-base-path may be a gs:// URL)")
    # Checked now, not at the publish or a stage's first write, after the work of the stages before.
    check_output_location(output_dir, "output_dir", directory=True)
    check_output_location(model_base_path, "model_base_path", directory=True)
    check_checkpoint_directory(output_dir, "output_dir")  # the run's checkpoints go below it
    output = pathlib.Path(output_dir)
    prepared, run_dir, index_dir = output / "prepared", output / "run", output / "index"
    spec = prepare_spec(config, str(prepared), num_shards)
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other: one deletes the run that the other goes on with")
    # Checked before an overwrite deletes anything: a typo in the data path keeps the old run.
    request = _request(config, spec, index_kind, index_options, k_max, num_shards, item_shards, code_shards,
                       padding_id)
    request_path = output / REQUEST_FILE
    resuming = output.exists() and any(output.iterdir())
    if resuming and resume:
        _check_same_request(request_path, request)
        summary_path = output / "pipeline_summary.json"
        if summary_path.is_file():
            print(f"the run in {str(output)!r} had finished and published; nothing to do")
            return json.loads(summary_path.read_text())
    elif resuming:
        if not overwrite:
            raise ConfigError(f"output directory {str(output)!r} is not empty; a run there would mix with the "
                              "earlier one (use a new directory, pass --resume to go on with an interrupted run "
                              "there, or --overwrite to delete it first)")
        shutil.rmtree(output)
    if not request_path.is_file():
        output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(request_path, request)
    timings: dict[str, float] = {}

    statistics = _stage(1, "prepare", timings, lambda: _finished(
        prepared / "statistics.json", lambda: run_prepare(spec, beam_args)))
    print(f"    {statistics['dataset']['users']} users, {statistics['num_items']} items, examples "
          f"{statistics['examples']}, {statistics['malformed_lines']} malformed line(s)")
    if statistics["malformed_lines"] and not config.data.skip_bad_lines:
        raise ValueError(f"{statistics['malformed_lines']} malformed line(s) in the input (see "
                         f"{prepared / 'dead_letter.jsonl'}); set data.skip_bad_lines=true to train without them")
    vocab = Vocabulary.load(prepared / "item_vocab.json")
    try:  # before training: item ids that include the default padding id would fail the export
        padding_id = resolve_padding_id(vocab, padding_id)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    model, train_metrics = _stage(2, "train", timings, lambda: train_on_records(
        config, shard_pattern(str(prepared), "train"), shard_pattern(str(prepared), "validation"), vocab, run_dir))
    print(f"    {train_metrics['epochs']} epochs, best {train_metrics['best_epoch']}, validation "
          f"{config.train.monitor} {train_metrics['validation'][config.train.monitor]:.4f}")
    budget = {key: index_options.get(key) for key in SPARSE_CODE_BUDGET} \
        if index_kind == "sparse_code" else {}
    index_stats = _stage(3, "build_index", timings, lambda: _finished(index_dir / STATS_FILE, lambda: run_build_index(
        run_dir, index_dir, beam_args=beam_args, item_shards=item_shards, code_shards=code_shards, **budget),
        summary=index_dir / SUMMARY_FILE))
    model = training.load_model(run_dir / "model")
    staged = _stage(4, "export", timings, lambda: _staged_version(output / "staging") or export_retrieval_model(
        model, vocab, output / "staging", index_kind=index_kind, k_max=k_max, padding_id=padding_id,
        index=_filled_index(model, index_dir, index_kind, {k: v for k, v in index_options.items() if k not in budget},
                            k_max)))
    metrics = _stage(5, "evaluate", timings, lambda: _finished(output / "evaluation.json", lambda: run_evaluate(
        str(staged), str(prepared), split="test", ks=tuple(config.eval.ks), output_path=str(output / "evaluation.json"),
        beam_args=beam_args), key="metrics"))
    published = _stage(6, "publish", timings, lambda: publish(staged, model_base_path))

    summary = {
        "config": config.to_dict(), "index_kind": index_kind, "index_options": index_options, "k_max": k_max,
        "stage_seconds": timings, "total_seconds": round(sum(timings.values()), 2),
        "dataset": statistics["dataset"], "examples": statistics["examples"],
        "malformed_lines": statistics["malformed_lines"],
        "training": {key: train_metrics[key] for key in ("epochs", "best_epoch", "train_seconds")},
        # The budget built, which may be the model's serving_cache_fraction rather than index_options.
        "index": {key: index_stats.get(key) for key in ("num_items", "postings", "max_items_per_code",
                                                        "cache_fraction", "wall_seconds") if key in index_stats},
        "test": metrics, "published": str(published),
    }
    write_json_atomic(output / "pipeline_summary.json", summary)
    print("\nstage          seconds")
    for name, seconds in timings.items():
        print(f"  {name:<12} {seconds:8.1f}")
    print(f"  {'total':<12} {summary['total_seconds']:8.1f}")
    shown = [key for key in ("HR@10", "NDCG@10", "Recall@50") if key in metrics]
    print("test (full ranking through the export): " + ", ".join(f"{key} {metrics[key]:.4f}" for key in shown))
    print(f"published {published}  (serve it: xmatch serve --model_name=xmatch "
          f"--model_base_path={absolute_unless_url(model_base_path)})")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmatch pipeline run", description=__doc__.split("\n\n")[0],
        epilog="Other flags are Beam pipeline options for the Beam stages, e.g. --runner=FlinkRunner.")
    parser.add_argument("--config", help="YAML or JSON run configuration (as for xmatch train)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--output-dir", required=True, help="working directory of the run")
    parser.add_argument("--model-base-path", required=True, help="MODEL_BASE_PATH the export is published to")
    parser.add_argument("--index", default="brute_force", choices=(*DENSE_KINDS, "sparse_code"))
    parser.add_argument("--index-option", action="append", default=[], metavar="NAME=VALUE",
                        help="index argument, e.g. num_partitions=64 or cache_fraction=0.01 (repeatable)")
    parser.add_argument("--k-max", type=int, default=100)
    parser.add_argument("--num-shards", type=int, default=1, help="TFRecord shards per part")
    parser.add_argument("--item-shards", type=int, default=8)
    parser.add_argument("--code-shards", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true", help="clear a non-empty --output-dir first")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the interrupted run in --output-dir, keeping the stages it finished")
    parser.add_argument("--padding-id", help='the id that pads request histories (default 0 for integer item ids, '
                                             '"" for strings); needed when 0 is a real item id, e.g. --padding-id=-1')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tfx_xmatch.pipelines.prepare import parse_options

    args, beam_args = split_arguments(build_parser(), argv)
    config = load_config(args.config, args.set)
    run_pipeline(config, args.output_dir, args.model_base_path, index_kind=args.index,
                 index_options=parse_options(args.index_option, "--index-option"), k_max=args.k_max,
                 num_shards=args.num_shards, item_shards=args.item_shards, code_shards=args.code_shards,
                 beam_args=beam_args, overwrite=args.overwrite, padding_id=args.padding_id,
                 resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
