"""Top-k retrieval indexes behind one interface (``RetrievalIndex``), and a registry of kinds.

Kinds:
  * ``brute_force``: exact, stock TF ops (runs on stock TF Serving, CPU or GPU).
  * ``partitioned``: approximate k-means partitioned index, stock TF ops only.
  * ``scann``: approximate ScaNN index; needs the ScaNN ops to save, load and serve.
  * ``sparse_code``: inverted index of code-item scores for SparCode-style discrete-code queries
    (candidates = the [N, C] code-score table, queries = [B, C] code weights); exact unless a
    cache budget prunes the posting lists; stock TF ops only.
  * ``soft_search``: SPARC's K searches per user (one per interest vector, queries [B, K, d])
    over a base kind, merged by interest probability; as portable as its base kind.

Example:
  >>> index = make_index("partitioned", num_partitions=32, num_probes=4, k_max=10)
  >>> scores, ids = index.index(tf.random.normal([1000, 16]))(tf.random.normal([2, 16]), k=5)
"""

from __future__ import annotations

import inspect

from tfx_xmatch.index.brute_force_index import BruteForceIndex
from tfx_xmatch.index.partitioned_index import PartitionedIndex
from tfx_xmatch.index.retrieval_index import RetrievalIndex
from tfx_xmatch.index.scann_index import ScaNNIndex
from tfx_xmatch.index.soft_search_index import SoftSearchIndex
from tfx_xmatch.index.sparse_code_index import SparseCodeIndex

INDEX_KINDS: dict[str, type[RetrievalIndex]] = {
    "brute_force": BruteForceIndex,
    "partitioned": PartitionedIndex,
    "scann": ScaNNIndex,
    "sparse_code": SparseCodeIndex,
    "soft_search": SoftSearchIndex,
}


def make_index(kind: str, **kwargs) -> RetrievalIndex:
    """Creates an index of a registered kind.

    Args:
      kind: A key of ``INDEX_KINDS`` ("brute_force", "partitioned", "scann", "sparse_code" or
        "soft_search").
      **kwargs: Constructor arguments of that kind, e.g. ``k_max=100``. For "soft_search",
        ``base`` names the kind searched per interest (default "brute_force") and
        ``base_options`` holds its arguments; ``k_max`` applies to both.

    Returns:
      A new, not yet indexed, ``RetrievalIndex``.

    Raises:
      ValueError: If ``kind`` is not registered, or an option is not one that kind takes (the
        message lists the ones it does).

    Example:
      >>> index = make_index("brute_force", k_max=10).index(tf.random.normal([50, 8]))
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {sorted(INDEX_KINDS)}")
    if kind == "soft_search":
        base_kind = kwargs.pop("base", "brute_force")
        if base_kind not in INDEX_KINDS:
            raise ValueError(f"unknown soft_search base {base_kind!r}; expected brute_force, partitioned or scann")
        if base_kind in ("soft_search", "sparse_code"):
            raise ValueError(f"soft_search needs a dense-vector base kind, got base={base_kind!r}")
        base_options = dict(kwargs.pop("base_options", None) or {})
        base_options.setdefault("k_max", kwargs.get("k_max", 100))
        _check_options(kind, kwargs)
        return SoftSearchIndex(make_index(base_kind, **base_options), **kwargs)
    _check_options(kind, kwargs)
    return INDEX_KINDS[kind](**kwargs)


# Keras layer arguments every kind passes on.
_LAYER_OPTIONS = ("name", "dtype", "trainable")


def _check_options(kind: str, options: dict) -> None:
    # Keras would refuse a misspelt option with a bare "Keyword argument not understood".
    accepted = set(_LAYER_OPTIONS)
    for cls in INDEX_KINDS[kind].__mro__:
        if issubclass(cls, RetrievalIndex):
            # By kind, not name: an index kind of one's own may spell them **kw or *args.
            accepted |= {name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                         if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)} - {"self", "base"}
    if kind == "soft_search":
        accepted |= {"base", "base_options"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"index kind {kind!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(sorted(accepted - set(_LAYER_OPTIONS)))}")


__all__ = [
    "INDEX_KINDS",
    "BruteForceIndex",
    "PartitionedIndex",
    "RetrievalIndex",
    "ScaNNIndex",
    "SoftSearchIndex",
    "SparseCodeIndex",
    "make_index",
]
