"""Where a single-query ``partitioned`` lookup spends its time (not a test).

Builds one PartitionedIndex on the synthetic catalogue of ``serving.py`` (same generator, seed
and queries) and times the one-query path stage by stage, each stage a traced function called
through its concrete function like a SavedModel signature, cumulatively:

1. ``dispatch``: a signature that returns its input (the floor of any call from Python);
2. ``probes``: + choosing the partitions (parent and sub-partition centroids, top-k);
3. ``rows``: + the row ranges of the probed partitions as one flat list;
4. ``gather``: + copying those candidate rows out of the table;
5. ``score``: + the [1, d] x [d, M] mat-mul and the top-k (the index's own ``_top_k``);
6. ``lookup``: + the ``RetrievalIndex`` call around it (k check, padding, identifiers).

Two more columns call that same lookup another way, to show how much of it is the calling path:

7. ``saved``: exported as a SavedModel, reloaded, called through its ``serving_default``;
8. ``session``: the same SavedModel loaded into a ``tf.compat.v1.Session`` and called through
   ``make_callable`` on the signature's tensor names, the way TF Serving runs a signature
   (``Session::Run`` on the loaded MetaGraph).

With ``--scoring float32 int8`` (or ``bfloat16``), each further scoring dtype gets its own
index with the same seed, hence the same partitions, and its ``dispatch``, ``lookup``,
``saved`` and ``session`` stages (stages 2 to 5 read the float32 table) are timed interleaved
with the float32 ones (see ``time_stages``): an A/B comparison that the drift of a shared
virtual machine hits alike (runs of the same setting minutes apart differ by up to 30% here).
``--soar-lambda`` adds a spilled copy of each (same partitions, every item also listed in a
second one) probing ``--spilled-probes`` partitions, timed the same way.

The difference between consecutive stages (1 to 6) is what a stage adds. The gather's bandwidth is the
bytes it copies per query (rows x d x 4) over its time. TF's thread pools are fixed when the
runtime starts, so ``--intra-op-threads`` applies to one run; ``--merge`` adds a run's rows to
the existing results.

Writes ``results/partitioned_profile.md`` and ``.json``.

    python benchmarks/partitioned_profile.py
    python benchmarks/partitioned_profile.py --intra-op-threads 1 --merge
    python benchmarks/partitioned_profile.py --subpartitions 32 --parent-probes 64 --probes 256 320 --merge
    python benchmarks/partitioned_profile.py --subpartitions 64 --parent-probes 48 --probes 384 512 --merge
    python benchmarks/partitioned_profile.py --probes 224 --merge
    python benchmarks/partitioned_profile.py --probes 224 --intra-op-threads 1 --merge
    python benchmarks/partitioned_profile.py --probes 224 256 --intra-op-threads 1 --scoring float32 int8 \
        --reorder 150 --merge
    python benchmarks/partitioned_profile.py --probes 224 --intra-op-threads 1 --scoring float32 int8 \
        --reorder 100 --soar-lambda 1 --spilled-probes 80 --merge
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (  # noqa: E402
    RESULTS_DIR, header, markdown_header, merge_rows, non_negative_int, positive_int, write_results,
)
from serving import DIMENSION, K, exact_top_k, recall, search_module, synthetic_embeddings  # noqa: E402

import numpy as np  # noqa: E402

STAGES = ("dispatch", "probes", "rows", "gather", "score", "lookup", "saved", "session")
ROW_KEY = ("n_items", "subpartitions", "parent_probes", "probes", "intra_op_threads", "scoring", "num_reordering_candidates",
           "soar_lambda")
# Stages that do not read the float32 table directly: timed for every scoring dtype.
LOOKUP_STAGES = ("dispatch", "lookup", "saved", "session")


def stage_functions(index, export_dir: pathlib.Path, threads: int, tf) -> tuple:
    """One function of (query tensor, query array) per stage (see the module docstring), and
    the Session behind ``session``, for the caller to close (it holds a copy of the index).
    An index with a compact first pass gets the ``LOOKUP_STAGES`` only."""
    spec = [tf.TensorSpec([1, DIMENSION], tf.float32)]

    def probe_rows(query):
        probes = index._probes(query, True)[0]
        offsets = index.partition_offsets
        entries = tf.ragged.range(tf.gather(offsets, probes), tf.gather(offsets, probes + 1)).flat_values
        # Spilled partitions list entries, which name candidate rows.
        return entries if index.listed_rows is None else tf.gather(index.listed_rows, entries)

    # Each stage returns a few values of its last result, so that what it computed is needed
    # (nothing is pruned) while copying the output back costs the same in every stage.
    functions = {
        "dispatch": lambda query: query[0, :3],
        "probes": lambda query: tf.cast(index._probes(query, True)[0, :3], tf.float32),
        "rows": lambda query: tf.cast(probe_rows(query)[:3], tf.float32),
        "gather": lambda query: tf.gather(index.candidates, probe_rows(query))[0, :3],
        "score": lambda query: index._top_k(query, tf.constant(K))[0][0, :3],
    }
    if index.scoring_dtype != "float32":
        functions = {name: fn for name, fn in functions.items() if name in LOOKUP_STAGES}
    traced = {name: tf.function(fn, input_signature=spec).get_concrete_function() for name, fn in functions.items()}
    stages = {name: (lambda query, _, fn=fn: fn(query)) for name, fn in traced.items()}
    module = search_module(index, (DIMENSION,), tf)
    lookup = module.search.get_concrete_function()
    k = tf.constant(K, tf.int32)
    # Its whole [1, k] output: slicing the result here would add an eager op (~0.1 ms) to the time.
    stages["lookup"] = lambda query, _: lookup(query, k)["scores"]

    tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.search})
    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    stages["saved"] = lambda query, _: signature(queries=query, k=k)["scores"]
    graph = tf.Graph()
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
    session = tf.compat.v1.Session(graph=graph, config=config)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(export_dir))
    signature_def = meta_graph.signature_def["serving_default"]
    call = session.make_callable(signature_def.outputs["scores"].name,
                                 feed_list=[signature_def.inputs["queries"].name, signature_def.inputs["k"].name])
    k_array = np.array(K, np.int32)
    stages["session"] = lambda _, array: call(array, k_array)
    return stages, session


def time_stages(stages: dict, queries: np.ndarray, warmup: int, tf) -> dict:
    """p50 ms of every stage over all queries, stages interleaved so that drift hits them alike.

    Stage j handles query (i + j * stride) at round i, so consecutive calls never read the same
    partitions: a stage that followed another on the same query would find its rows in the CPU
    cache (4.7 MB at 224 probes fits in L3) and look up to 0.3 ms faster than a real lookup.
    Every stage still sees every query once.
    """
    arrays = [queries[i : i + 1] for i in range(len(queries))]
    tensors = [tf.constant(array) for array in arrays]
    for tensor, array in list(zip(tensors, arrays))[:warmup]:
        for fn in stages.values():
            np.asarray(fn(tensor, array))
    count = len(queries)
    stride = max(1, count // max(1, len(stages)))
    latencies = {name: [] for name in stages}
    for round_ in range(count):
        for position, (name, fn) in enumerate(stages.items()):
            query = (round_ + position * stride) % count
            started = time.perf_counter()
            np.asarray(fn(tensors[query], arrays[query]))  # a tensor's copy to NumPy, as .numpy() does
            latencies[name].append((time.perf_counter() - started) * 1000.0)
    return {name: float(np.percentile(values, 50)) for name, values in latencies.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=positive_int, default=1_000_000)
    parser.add_argument("--queries", type=positive_int, default=1000)
    parser.add_argument("--warmup", type=non_negative_int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partitions", type=int, default=1000)
    parser.add_argument("--subpartitions", type=int, default=16)
    parser.add_argument("--parent-probes", type=int, default=48)
    parser.add_argument("--probes", type=positive_int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="TF intra-op (and inter-op) threads; 0: TF's default (all cores)")
    parser.add_argument("--scoring", nargs="+", default=["float32"], choices=["float32", "int8", "bfloat16"],
                        help="scoring_dtype values compared (float32 is always included)")
    parser.add_argument("--reorder", type=int, default=None,
                        help="num_reordering_candidates of the int8 / bfloat16 indexes (default: 4 x k_max)")
    parser.add_argument("--soar-lambda", type=float, default=None,
                        help="also build every scoring dtype spilled (each item in a second, SOAR-chosen "
                             "partition, see PartitionedIndex) and time it interleaved with the others")
    parser.add_argument("--spilled-probes", type=int, nargs="+", default=None,
                        help="with --soar-lambda: the spilled indexes' probes, one per --probes value (they "
                             "need fewer for the same recall); default: the same as --probes")
    parser.add_argument("--merge", action="store_true", help="add this run's rows to the existing results")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--output", default="partitioned_profile", help="results file stem under --results-dir")
    args = parser.parse_args()
    for name in ("items", "queries", "partitions", "subpartitions", "parent_probes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.intra_op_threads < 0:
        parser.error(f"--intra-op-threads must be >= 0, got {args.intra_op_threads}")
    if args.soar_lambda is not None and args.soar_lambda < 0:
        parser.error(f"--soar-lambda must be >= 0, got {args.soar_lambda}")
    if args.spilled_probes is not None and (args.soar_lambda is None or len(args.spilled_probes) != len(args.probes)):
        parser.error(f"--spilled-probes needs --soar-lambda and one value per --probes value ({len(args.probes)}), "
                     f"got {args.spilled_probes}")
    spilled_probes = args.spilled_probes or args.probes

    import tensorflow as tf

    if args.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.intra_op_threads)
    from tfx_xmatch.index import PartitionedIndex

    result = header("partitioned_profile")
    items, queries = synthetic_embeddings(args.items, args.queries, DIMENSION, args.seed)
    exact = exact_top_k(items, queries, K)
    scorings = ["float32"] + [dtype for dtype in dict.fromkeys(args.scoring) if dtype != "float32"]
    # Variants: every scoring dtype, then each of them spilled; same seed, so the same partitions.
    variants = [(scoring, None) for scoring in scorings]
    if args.soar_lambda is not None:
        variants += [(scoring, args.soar_lambda) for scoring in scorings]
    indexes, build_seconds = {}, {}
    for variant in variants:
        scoring, soar_lambda = variant
        indexes[variant] = PartitionedIndex(
            num_partitions=args.partitions, subpartitions=args.subpartitions, parent_probes=args.parent_probes,
            num_probes=max(args.probes + spilled_probes), k_max=K, scoring_dtype=scoring, soar_lambda=soar_lambda,
            num_reordering_candidates=None if scoring == "float32" else args.reorder)
        started = time.perf_counter()
        indexes[variant].index(tf.constant(items))
        build_seconds[variant] = time.perf_counter() - started
    rows = []
    for probes, probes_if_spilled in zip(args.probes, spilled_probes):
        found, stages, sessions = {}, {}, []
        with tempfile.TemporaryDirectory(prefix="partitioned-profile-") as workdir:
            try:
                for number, (variant, each) in enumerate(indexes.items()):
                    each.num_probes = probes if variant[1] is None else probes_if_spilled  # read when tracing
                    # Blocks of queries: the batch path gathers [B, rows, d] at once.
                    found[variant] = np.concatenate([each(tf.constant(queries[start : start + 100]), k=K)[1].numpy()
                                                     for start in range(0, len(queries), 100)])
                    functions, session = stage_functions(each, pathlib.Path(workdir) / str(number),
                                                         args.intra_op_threads, tf)
                    sessions.append(session)
                    stages.update({(variant, name): fn for name, fn in functions.items()})
                p50 = time_stages(stages, queries, args.warmup, tf)
            finally:
                for session in sessions:
                    session.close()
        for variant, each in indexes.items():
            scoring, soar_lambda = variant
            sizes = np.diff(each.partition_offsets.numpy())  # list entries: spilled items count twice
            chosen = each._probes(tf.constant(queries), False).numpy()
            scanned = float(np.mean(np.where(chosen >= 0, sizes[np.maximum(chosen, 0)], 0).sum(axis=1)))
            bytes_per_value = {"float32": 4, "bfloat16": 2, "int8": 1}[scoring]
            megabytes = scanned * DIMENSION * bytes_per_value / 1e6
            gather_ms = p50.get((variant, "gather"), 0.0) - p50.get((variant, "rows"), 0.0)
            rows.append({
                "dataset": "synthetic", "split": "-", "model": "partitioned", "n_items": args.items, "subpartitions": args.subpartitions, "parent_probes": args.parent_probes,
                "probes": each.num_probes, "intra_op_threads": args.intra_op_threads or "default",
                "scoring": scoring, "soar_lambda": soar_lambda,
                "num_reordering_candidates": None if scoring == "float32" else args.reorder or 4 * K,
                "build_seconds": round(build_seconds[variant], 1),
                "mean_partition_rows": round(float(sizes.mean()), 1),
                "recall_vs_exact": round(recall(found[variant], exact), 4), "rows_scanned": round(scanned),
                "megabytes_gathered": round(megabytes, 2),
                "gather_gb_per_s": round(megabytes / gather_ms, 2) if gather_ms > 0 else None,
                **{f"{name}_ms": round(value, 3) for (owner, name), value in p50.items() if owner == variant},
            })
            print(rows[-1], flush=True)
    result.update(settings={"partitions": args.partitions, "subpartitions": args.subpartitions,
                            "parent_probes": args.parent_probes, "queries": args.queries, "warmup": args.warmup,
                            "seed": args.seed},
                  rows=rows)
    results_dir = pathlib.Path(args.results_dir)
    if args.merge:
        result = merge_rows(result, results_dir / f"{args.output}.json", ROW_KEY)
    write_results(result, args.output, to_markdown, results_dir=results_dir)
    print(f"wrote {results_dir / args.output}.json and .md")
    return 0


def to_markdown(result: dict) -> str:
    settings = result["settings"]
    lines = markdown_header(result, "where a single-query partitioned lookup spends its time") + [
        f"- index: {settings['partitions']} k-means partitions, each split into `sub` sub-partitions; the probes are "
        "chosen among the sub-partitions of the `parents` best partitions",
        f"- data: `serving.py`'s synthetic catalogue and held-out queries (d = {DIMENSION}, seed {settings['seed']}), "
        f"{settings['queries']} queries, top-{K}, {settings['warmup']} warm-up calls; p50 of each cumulative stage "
        "(see the script's docstring); the stages are interleaved, each on a different query at a time (rows "
        "from before 2026-11-25 ran every stage on the same query in turn, which left the later stages' rows in "
        "the CPU cache: their lookup column is up to 0.3 ms optimistic)",
        "",
        "| items | sub | parents | mean rows per sub | probes | intra-op threads | scoring | recall@100 | rows scanned | "
        "MB gathered | " + " | ".join(f"{stage} ms" for stage in STAGES) + " | gather GB/s |",
        "|" + "---|" * (11 + len(STAGES)),
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['n_items']:,} | {row['subpartitions']} | {row['parent_probes']} | {row['mean_partition_rows']} | "
            f"{row['probes']} | "
            f"{row['intra_op_threads']} | {_scoring(row)} | {row['recall_vs_exact']:.4f} | "
            f"{row['rows_scanned']:,} | {row['megabytes_gathered']} | "
            # Rows from before the saved / session columns existed have none.
            + " | ".join("–" if row.get(f"{stage}_ms") is None else f"{row[f'{stage}_ms']:.3f}" for stage in STAGES)
            + f" | {row['gather_gb_per_s'] or '–'} |")
    return "\n".join(lines) + "\n"


def _scoring(row: dict) -> str:
    """float32, or the compact dtype with its reordering count (rows before the column: float32)."""
    scoring = row.get("scoring", "float32")
    text = scoring if scoring == "float32" else f"{scoring}, reorder {row['num_reordering_candidates']}"
    return text if row.get("soar_lambda") is None else f"{text}, SOAR λ={row['soar_lambda']:g}"


if __name__ == "__main__":
    raise SystemExit(main())
