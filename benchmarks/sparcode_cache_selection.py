"""Which entries a small SparCode cache should hold: selection rules at one budget (not a test).

A ``SparseCodeIndex`` with ``cache_fraction=f`` keeps the ``ceil(f * C * N)`` largest entries of
the trained [C codes x N items] score table. Issue 3 asks a 1% cache to keep 90% of the full
cache's Recall@50; the quality model keeps far less. This benchmark asks whether a different
choice of entries, at the same budget and on the same trained weights, would close that gap:

  * ``largest scores``: the index's own rule (its kept set is checked against a built index);
  * ``per-code top-L``: every code keeps its ``L = budget // C`` best items (``max_items_per_code``);
  * ``usage-weighted``: entries ranked by score x sqrt(how often queries use the code);
  * ``item baseline + residuals``: each item gets a dense baseline, the usage-weighted mean of
    its scores within each codebook, summed over codebooks (N entries of the budget); the rest
    of the budget holds the residuals (score - mean) with the largest usage x residual^2, of
    either sign, so an item missing from a list is read as its mean rather than as 0.

Code usage is counted from the validation queries (histories of training interactions only);
the test users are ranked. Every row ranks all items from the cut table (items absent score 0,
ties count against the target, history masked), paired user by user with the full table.

Writes ``results/<output>.md`` and ``results/<output>.json``.

    python benchmarks/sparcode_cache_selection.py
    python benchmarks/sparcode_cache_selection.py --run sparcode_chunks_served1pct-sparcode --fraction 0.1
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import RESULTS_DIR, header, load_finished_run, markdown_header, write_results  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.data.dataset import pad_histories  # noqa: E402
from tfx_xmatch.evaluation import (compare_metrics, describe_recorded_tests, evaluate_full_ranking,  # noqa: E402
                                   format_recorded_difference, is_tail_target)
from tfx_xmatch.index import SparseCodeIndex  # noqa: E402
from tfx_xmatch.index.sparse_code_index import cache_budget  # noqa: E402

DEFAULT_RUN = "sparcode_chunks_continued-sparcode"
REPORTED = ("HR@10", "NDCG@10", "Recall@50")
FULL = "full table (cache 100%)"


def query_codes(model, split, examples, max_length: int, batch_size: int = 512) -> np.ndarray:
    """Each example's query codes, int32 [E, K]."""
    codes = tf.function(model.query_codes, reduce_retracing=True)
    return np.concatenate([
        codes(training.model_inputs(model, split.dataset, pad_histories(examples.histories[start:start + batch_size],
                                                                        max_length),
                                    examples.user_rows[start:start + batch_size])).numpy()
        for start in range(0, len(examples.targets), batch_size)])


def largest(values: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` largest entries of ``values``."""
    mask = np.zeros(values.size, bool)
    count = min(count, values.size)
    if count > 0:
        mask[np.argpartition(-values.ravel(), count - 1)[:count]] = True
    return mask.reshape(values.shape)


def selections(table: np.ndarray, usage: np.ndarray, num_codebooks: int, budget: int, codes_per_codebook: int = 1):
    """(name, cut table [C, N + 1], dense item baseline [N + 1] or None, entries held) per rule;
    the baseline rule only when its N dense entries fit in the budget. A query reads
    ``codes_per_codebook`` codes of each codebook (SparCode's default: all K from one), so its
    baseline counts that many times."""
    positive = table > 0
    kept = largest(np.where(positive, table, -np.inf), budget) & positive
    yield "largest scores (the index's rule)", np.where(kept, table, 0.0), None, int(kept.sum())

    per_code = budget // table.shape[0]
    order = np.argsort(-table, axis=1, kind="stable")[:, :per_code]
    kept = np.zeros_like(positive)
    np.put_along_axis(kept, order, True, axis=1)
    kept &= positive
    yield f"per-code top-{per_code}", np.where(kept, table, 0.0), None, int(kept.sum())

    weighted = np.where(positive, table * np.sqrt(usage)[:, None], -np.inf)
    kept = largest(weighted, budget) & positive
    yield "usage-weighted (score x sqrt usage)", np.where(kept, table, 0.0), None, int(kept.sum())

    num_items = table.shape[1] - 1  # column 0 is padding
    if budget < num_items:  # the dense baseline alone would overrun the budget
        return
    books = table.reshape(num_codebooks, -1, table.shape[1])
    weights = usage.reshape(num_codebooks, -1) + 1e-3  # an unused code still gets a sliver of weight
    weights /= weights.sum(axis=1, keepdims=True)
    means = np.einsum("bc,bcn->bn", weights, books)
    residuals = (books - means[:, None, :]).reshape(table.shape)
    residuals[:, 0] = 0.0
    kept = largest(residuals ** 2 * (usage[:, None] + 1e-3), budget - num_items)
    baseline = means.sum(axis=0) * codes_per_codebook
    baseline[0] = 0.0
    yield "item baseline + residuals", np.where(kept, residuals, 0.0), baseline, int(kept.sum()) + num_items


def check_index_rule(table: np.ndarray, cut: np.ndarray, fraction: float) -> None:
    """The 'largest scores' cut holds exactly what a SparseCodeIndex with this budget stores."""
    index = SparseCodeIndex(k_max=10, cache_fraction=fraction).index(
        tf.constant(table[:, 1:].T), identifiers=tf.range(1, table.shape[1], dtype=tf.int64))
    lengths = index.posting_list_lengths()
    codes = np.repeat(np.arange(len(lengths)), lengths)
    stored = np.zeros_like(table, bool)
    stored[codes, index.posting_items.numpy() + 1] = True
    if not np.array_equal(stored, cut > 0):
        raise AssertionError(f"the index stores {stored.sum()} entries, the 'largest scores' cut {(cut > 0).sum()}; "
                             f"{(stored != (cut > 0)).sum()} differ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--run", default=DEFAULT_RUN, help="a finished SparCode run under --runs-dir")
    parser.add_argument("--fraction", type=float, default=0.01, help="cache budget, a fraction of all C x N scores")
    parser.add_argument("--output", default="sparcode_cache_selection")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    loaded = load_finished_run(pathlib.Path(args.runs_dir) / args.run, "benchmarks/sparcode.py")
    if loaded is None:
        return 0
    config, split, model = loaded
    if not getattr(model, "quantize", False):
        parser.error(f"--run must be a quantized SparCode run, got a {type(model).__name__} run")
    max_length = config.model.max_length
    table = model.code_item_scores().numpy()
    usage = np.bincount(query_codes(model, split, split.validation, max_length).ravel(),
                        minlength=model.num_codes).astype(np.float64)
    test_codes = query_codes(model, split, split.test, max_length)
    budget = cache_budget(args.fraction, model.num_codes, split.num_items)

    def evaluate(cut: np.ndarray, baseline):
        position = {"next": 0}

        def score_fn(histories, user_rows):
            start = position["next"]
            position["next"] += len(user_rows)
            scores = cut[test_codes[start:start + len(user_rows)]].sum(axis=1)
            return scores if baseline is None else scores + baseline

        return evaluate_full_ranking(
            score_fn, split.test, num_items=split.num_items, max_length=max_length,
            batch_size=config.eval.batch_size, ks=(10, 50), mask_history=config.eval.mask_history,
            item_popularity=split.item_popularity(), return_ranks=True)

    is_tail = is_tail_target(split.test.targets, split.item_popularity())
    full_metrics, full_ranks = evaluate(table, None)
    result = header("sparcode_cache_selection")
    # DESIGN's row keys: where the numbers come from, then the rule as the variant.
    where = {"dataset": pathlib.Path(str(config.data.dataset)).name, "split": config.data.split, "model": "sparcode"}
    result.update(run=args.run, fraction=args.fraction, budget=budget, num_codes=model.num_codes,
                  num_codebooks=model.num_codebooks, num_items=split.num_items,
                  positive_entries=int((table[:, 1:] > 0).sum()), test_users=len(split.test.targets),
                  codes_used=int((usage > 0).sum()),
                  rows=[{**where, "variant": "cache=100%", "rule": FULL, "entries": int((table[:, 1:] > 0).sum()),
                         **{key: round(full_metrics[key], 4) for key in REPORTED}}])
    print(result["rows"][-1], flush=True)
    codes_per_codebook = model.num_query_tokens // model.num_codebooks
    for name, cut, baseline, entries in selections(table, usage, model.num_codebooks, budget, codes_per_codebook):
        if name.startswith("largest"):
            check_index_rule(table, cut, args.fraction)
        started = time.perf_counter()
        metrics, ranks = evaluate(cut, baseline)
        result["rows"].append({
            **where, "variant": f"cache={args.fraction:.0%},{name}", "rule": name, "entries": entries,
            **{key: round(metrics[key], 4) for key in REPORTED},
            "recall_kept": round(metrics["Recall@50"] / full_metrics["Recall@50"], 4),
            "eval_seconds": round(time.perf_counter() - started, 1),
            "vs_full": compare_metrics(ranks, full_ranks, REPORTED, is_tail)})
        print({key: value for key, value in result["rows"][-1].items() if key != "vs_full"}, flush=True)
    write_results(result, args.output, to_markdown, echo=True, results_dir=pathlib.Path(args.results_dir))
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "which entries a small SparCode cache should hold") + [
        f"- run: `{result['run']}`: {result['num_codebooks']} codebooks, {result['num_codes']:,} codes x "
        f"{result['num_items']:,} items, {result['positive_entries']:,} positive scores; "
        f"{result['codes_used']:,} codes used by the validation queries",
        f"- budget: {result['fraction']:.0%} of all scores = {result['budget']:,} entries (a dense item baseline "
        f"counts as {result['num_items']:,} of them); test users {result['test_users']:,}, all items ranked, "
        "history masked, items a cut table does not hold score 0 and ties count against the target",
        "- Δ: paired over the same users, 95% interval, p-value of "
        + describe_recorded_tests([row["vs_full"][metric] for row in result["rows"] if "vs_full" in row
                                   for metric in ("Recall@50", "HR@10")]),
        "",
        "| rule | entries held | HR@10 | NDCG@10 | Recall@50 | Recall@50 kept | ΔRecall@50 vs full | ΔHR@10 vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["rule"] == FULL:
            lines.append(f"| {FULL} | {row['entries']:,} | {row['HR@10']} | {row['NDCG@10']} | {row['Recall@50']} "
                         "| 100% | | |")
            continue
        paired = row["vs_full"]
        lines.append(f"| {row['rule']} | {row['entries']:,} | {row['HR@10']} | {row['NDCG@10']} | "
                     f"{row['Recall@50']} | {row['recall_kept']:.1%} | {format_recorded_difference(paired['Recall@50'])} | "
                     f"{format_recorded_difference(paired['HR@10'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
