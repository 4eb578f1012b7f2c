"""DESIGN.md's schema of a benchmark's machine-readable results (``benchmarks/results/<name>.json``)."""

from __future__ import annotations

# DESIGN.md "Benchmarks": every row names its dataset, split and model, and latency is spelled
# p50_ms / p99_ms (rows written before this rule used the keys on the left).
ROW_IDENTITY = ("dataset", "split", "model")
RENAMED_KEYS = {"latency_ms_p50": "p50_ms", "latency_ms_p99": "p99_ms"}


def design_model_name(config) -> str:
    """A run's model as DESIGN names it: ``two_tower_mean`` / ``two_tower_sasrec``,
    ``sparcode_all_to_all`` for an unquantized SparCode, else the config's ``model.name``."""
    name = config.model.name
    if name == "two_tower":
        return f"two_tower_{config.model.user_tower}"
    if name == "sparcode" and config.model.options.get("quantize") is False:
        return "sparcode_all_to_all"
    return name


def check_rows(result: dict, output: str) -> None:
    """Checks that the ``rows`` of ``result`` follow DESIGN's results schema: each names its
    dataset, split and model, with latency spelled ``p50_ms`` / ``p99_ms``.

    Raises:
      ValueError: naming the file, the first offending row and what it lacks or misspells.
    """
    rows = result.get("rows")
    if not isinstance(rows, list):
        raise ValueError(f"{output}.json: 'rows' must be a list, got {type(rows).__name__}")
    for position, row in enumerate(rows):
        missing = [key for key in ROW_IDENTITY if key not in row]
        renamed = [f"{key} (DESIGN: {RENAMED_KEYS[key]})" for key in RENAMED_KEYS if key in row]
        if missing or renamed:
            problems = ([f"lacks {missing}"] if missing else []) + ([f"spells {', '.join(renamed)}"] if renamed else [])
            raise ValueError(f"{output}.json row {position} (model {row.get('model')!r}): {'; '.join(problems)}")
