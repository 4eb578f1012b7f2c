"""SavedModel export with the retrieval index baked in, ready for TensorFlow Serving.

``export_retrieval_model`` writes ``EXPORT_BASE_PATH/<version>/`` holding:

  * ``serving_default(history)``: top ``default_k`` items for each padded history;
  * ``top_k(history, k)``: the same with ``k`` chosen per request (1 <= k <= k_max), because a
    TF Serving signature cannot have optional inputs and ``k`` must not be frozen at export.
    ``k`` is a scalar (one k for every row) or holds one value per history row: TF Serving's
    ``--enable_batching`` concatenates every input of the requests it merges along the first
    axis and refuses scalars, and its REST row format (``{"instances": [{"history": [...],
    "k": 5}]}``) stacks ``k`` into one value per row. The answer is ``[batch, max k]``; a row's
    slots past its own k hold the padding id with score ``-inf``, as unfilled slots do;
  * ``user_embedding(history)`` and ``item_embeddings(item_ids)``.

A model trained with user features (``data.side_info``) takes each feature as one more input of
``serving_default``, ``top_k`` and ``user_embedding``, named after the feature: int64 [batch],
the value's index in the prepared data's feature vocabulary (0 = unknown).

Outputs are named (``item_ids``, ``scores``, ``user_embedding``, ``item_embeddings``), item ids
are the dataset's raw ids (strings or integers, vocabulary inside the graph), and histories may
be left- or right-padded, longer or shorter than the model's window. Every signature is defined
with an explicit input signature, so nothing depends on a warm-up call; warm-up requests for
TF Serving are still written to ``assets.extra/tf_serving_warmup_requests``, and the model's
description to ``assets.extra/xmatch_model.json`` (so the SavedModel can warm-start a new run,
as TFX's ``base_model``; TF Serving ignores the file). The version is
written to a hidden temporary directory and renamed into place, so a server polling the base
path never sees half a model, and never over an existing version: exporters running at once
into one base path each get a number of their own (``publish_new_version``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import tempfile
import uuid
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.arguments import is_integer
from tfx_xmatch.data.dataset import check_user_feature_names
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.index import RetrievalIndex, SoftSearchIndex, SparseCodeIndex, make_index
from tfx_xmatch.io_utils import (
    INT64_MAX, atomic_directory, copy_directory_or_nothing, locked_temporary_directory, remove_abandoned_temporaries,
    rename_no_replace, restore_moved_aside, version_number,
)
from tfx_xmatch.models import MODELS
from tfx_xmatch.training import SERVING_MODEL_DESCRIPTION, configured_model_class, model_description, model_kind

log = logging.getLogger("tfx_xmatch.export")

SCANN_NAMESPACE = "Scann"


class RetrievalServingModule(tf.Module):
    """A trained model, its vocabulary and a filled index, with serving signatures.

    Args:
      model: A model with ``user_embedding(inputs)``, ``item_embeddings()`` and ``max_length``.
      index: A ``RetrievalIndex`` filled with item embeddings under item indices 1..N.
      item_vocab: Maps raw item ids to the model's item indices.
      padding_id: The raw id that marks an empty history slot (``build_serving_module`` picks
        0 or "" by the vocabulary's id type).
      exclude_history: Whether items already in the history are removed from the results.
      default_k: How many items ``serving_default`` returns.
      jit_compile: Compile the user side (user vector, or SPARC's interest vectors) with XLA.
        Default False. See ``build_serving_module``.
    """

    def __init__(self, model, index, item_vocab: Vocabulary, padding_id, exclude_history: bool, default_k: int,
                 jit_compile: bool = False):
        super().__init__(name="retrieval")
        self.model = model
        self.index = index
        self.max_length = int(model.max_length)
        self.exclude_history = bool(exclude_history)
        self.default_k = int(default_k)
        raw_ids = item_vocab.ids(np.arange(1, item_vocab.num_items + 1))
        self.id_dtype = tf.string if item_vocab.id_type == "str" else tf.int64
        # From the list of ids: .astype(str) would build a fixed-width copy sized for the longest id.
        keys = tf.constant(raw_ids.tolist(), self.id_dtype, shape=[item_vocab.num_items])
        indices = tf.range(1, item_vocab.num_items + 1, dtype=tf.int64)
        self.id_to_index = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, indices), -1)
        # Index 0 (padding) maps back to the padding id, so empty result slots are recognisable.
        self.index_to_id = tf.Variable(
            tf.concat([tf.constant([padding_id], self.id_dtype), keys], axis=0), trainable=False, name="index_to_id"
        )
        self.padding_id = tf.constant(padding_id, self.id_dtype)
        self.jit_compile = bool(jit_compile)
        # One function for the user side, which every signature calls: each signature traced it
        # anew, and the SavedModel held T2Diff's sampler three times (5.9 MiB for DDPM-50, 5.6
        # with one; export time within the spread between runs). The index stays
        # outside XLA: its top-k with a per-request exclusion list has shapes that change with
        # every request, which would recompile on each call.
        compiled = lambda fn: tf.function(fn, jit_compile=True if self.jit_compile else None)
        self._user_vectors = compiled(lambda inputs: self.model.user_embedding(inputs))
        if isinstance(index, SoftSearchIndex):
            self._interest_vectors = compiled(
                lambda inputs: self.model.interest_vectors(inputs, self.index.num_interests))
        # A model trained with user features takes each as one more input of every user-side
        # signature: int64 [batch], the value's index in the feature vocabulary of the prepared
        # data (0 = unknown), as the model was trained on.
        self.user_features = dict(sorted(getattr(model, "user_feature_cardinalities", {}).items()))
        check_user_feature_names(self.user_features)  # as our models do: any other fails here, by name
        feature_specs = [tf.TensorSpec([None], tf.int64, name=name) for name in self.user_features]

        history_spec = tf.TensorSpec([None, None], self.id_dtype, name="history")
        self.serving_default = tf.function(self._serve_default, input_signature=[history_spec, *feature_specs])
        # Unknown rank: a scalar k, or one k per row (what TF Serving's batching and row format send).
        self.top_k = tf.function(
            self._serve_top_k, input_signature=[history_spec, tf.TensorSpec(None, tf.int32, name="k"), *feature_specs]
        )
        self.user_embedding = tf.function(self._serve_user_embedding, input_signature=[history_spec, *feature_specs])
        self.item_embeddings = tf.function(
            self._serve_item_embeddings, input_signature=[tf.TensorSpec([None], self.id_dtype, name="item_ids")]
        )

    # ------------------------------------------------------------------ input handling
    def _to_indices(self, raw_ids: tf.Tensor, what: str) -> tf.Tensor:
        """Raw ids -> item indices (0 for padding); unknown ids fail with the offending id."""
        is_padding = tf.equal(raw_ids, self.padding_id)
        indices = self.id_to_index.lookup(raw_ids)
        unknown = tf.logical_and(indices < 0, tf.logical_not(is_padding))
        first_unknown = tf.boolean_mask(raw_ids, unknown)[:1]
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(unknown)),
            [f"{what} contains item ids outside the vocabulary, e.g.", first_unknown],
            summarize=1,
        )
        # The check must run before any lookup can fail on the -1 with a less helpful message.
        with tf.control_dependencies([check]):
            return tf.where(is_padding, tf.zeros_like(indices), indices)

    def _window(self, history: tf.Tensor) -> tf.Tensor:
        """Right-aligns each row's items (whatever the client's padding) into [B, max_length]."""
        indices = self._to_indices(history, "history")
        is_item = indices > 0
        has_item = tf.reduce_any(is_item, axis=1)
        check = tf.debugging.Assert(
            tf.reduce_all(has_item),
            ["history has a row without any item (empty history); every row needs at least one item id; "
             "first empty row (from 0):", tf.where(tf.logical_not(has_item))[:1, 0]],
        )
        with tf.control_dependencies([check]):
            is_item = tf.identity(is_item)
        width = tf.shape(indices)[1]
        positions = tf.range(width)[tf.newaxis, :]
        # Stable sort on (padding first, then items in their original order) right-aligns items.
        order = tf.argsort(tf.where(is_item, positions, -1), axis=1, stable=True)
        aligned = tf.gather(indices, order, batch_dims=1)
        aligned = aligned[:, tf.maximum(width - self.max_length, 0):]
        missing = tf.maximum(self.max_length - tf.shape(aligned)[1], 0)
        return tf.cast(tf.pad(aligned, [[0, 0], [missing, 0]]), tf.int32)

    def _model_inputs(self, history: tf.Tensor, features: tuple) -> dict:
        """The model's inputs: the right-aligned window and each user feature, checked (one value
        per history row, within the feature's vocabulary)."""
        inputs = {"history": self._window(history)}
        rows = tf.shape(history, out_type=tf.int64)[0]
        for (name, cardinality), values in zip(self.user_features.items(), features):
            out_of_range = f"user feature {name} must be in [0, {cardinality}] (0 = unknown)"
            checks = [
                tf.debugging.assert_equal(tf.shape(values, out_type=tf.int64)[0], rows,
                                          message=f"user feature {name} needs one value per history row"),
                tf.debugging.assert_less_equal(tf.reduce_max(tf.concat([values, [0]], 0)),
                                               tf.constant(cardinality, tf.int64), message=out_of_range),
                tf.debugging.assert_non_negative(values, message=out_of_range),
            ]
            with tf.control_dependencies(checks):
                inputs[name] = tf.cast(values, tf.int32)
        return inputs

    def _retrieve(self, history: tf.Tensor, k, features: tuple = ()) -> dict:
        inputs = self._model_inputs(history, features)
        exclude = tf.cast(self._to_indices(history, "history"), tf.int64) if self.exclude_history else None
        if isinstance(self.index, SoftSearchIndex):
            vectors, log_probs = self._interest_vectors(inputs)
            scores, indices = self.index(vectors, k=k, exclude=exclude, log_weights=log_probs)
        else:
            user = self._user_vectors(inputs)
            scores, indices = self.index(user, k=k, exclude=exclude)
        return {"item_ids": tf.gather(self.index_to_id, tf.maximum(indices, 0)), "scores": scores}

    # ------------------------------------------------------------------ signatures
    def _checked_shapes(self, history: tf.Tensor, features: tuple) -> tuple[tf.Tensor, tuple]:
        """The inputs, checked at run time against the signature's shapes.

        TF Serving feeds a request's tensors as they come, whatever the signature declares, and
        the graph is built for the declared rank: a one-row history sent as [items] failed deep
        inside with "Invalid reduction dimension". EnsureShape names the input instead (its op
        name is what the error shows)."""
        history = tf.ensure_shape(history, [None, None], name="history_must_be_batch_by_items")
        # An op name takes [A-Za-z0-9_.-/] only, and not a leading "_": "user_feature_" and the
        # feature's name with anything else replaced (a feature may be called "_age" or "âge").
        features = tuple(tf.ensure_shape(values, [None], name="user_feature_" + re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
                                         + "_must_be_one_value_per_row")
                         for name, values in zip(self.user_features, features))
        return history, features

    def _serve_default(self, history, *features):
        history, features = self._checked_shapes(history, features)
        return self._retrieve(history, self.default_k, features)

    def _serve_top_k(self, history, k, *features):
        history, features = self._checked_shapes(history, features)
        row_k, largest = self._row_k(k, tf.shape(history)[0])
        # One search for the batch at its largest k; each row then keeps its own k.
        results = self._retrieve(history, largest, features)
        keep = tf.range(tf.shape(results["scores"])[1])[tf.newaxis, :] < row_k[:, tf.newaxis]
        return {"item_ids": tf.where(keep, results["item_ids"], self.padding_id),
                "scores": tf.where(keep, results["scores"], tf.constant(-np.inf, tf.float32))}

    def _row_k(self, k: tf.Tensor, rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(each history row's k, int32 [rows], and the largest k asked), from one k (a scalar or a
        single value) or one k per row; checked. An empty batch still answers [0, k]."""
        values = tf.reshape(k, [-1])
        size = tf.size(values)
        shape_check = tf.debugging.Assert(
            tf.logical_and(tf.logical_or(tf.equal(size, 1), tf.equal(size, rows)), tf.rank(k) <= 2),
            ["k must be a scalar or hold one value per history row; history rows:", rows, "k shape:", tf.shape(k)],
        )
        out_of_range = tf.logical_or(values < 1, values > self.index.k_max)
        range_check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(out_of_range)),
            [f"k must be in [1, k_max={self.index.k_max}], got k =", tf.boolean_mask(values, out_of_range)[:1]],
        )
        with tf.control_dependencies([shape_check, range_check]):
            # A single k applies to every row; [1] keeps the maximum defined for an empty k.
            return tf.broadcast_to(values, [rows]), tf.reduce_max(tf.concat([values, [1]], 0))

    def _serve_user_embedding(self, history, *features):
        history, features = self._checked_shapes(history, features)
        return {"user_embedding": self._user_vectors(self._model_inputs(history, features))}

    def _serve_item_embeddings(self, item_ids):
        item_ids = tf.ensure_shape(item_ids, [None], name="item_ids_must_be_a_list_of_ids")
        indices = self._to_indices(item_ids, "item_ids")
        check = tf.debugging.Assert(tf.reduce_all(indices > 0), ["item_ids must not contain the padding id"])
        with tf.control_dependencies([check]):
            indices = tf.identity(indices)
        # Only the requested items: a model whose item side is a network (SparCode's code-score
        # columns) would otherwise compute the whole catalogue on every request.
        return {"item_embeddings": self.model.item_embeddings(tf.cast(indices, tf.int32))}

    def signatures(self) -> dict:
        return {
            "serving_default": self.serving_default,
            "top_k": self.top_k,
            "user_embedding": self.user_embedding,
            "item_embeddings": self.item_embeddings,
        }


def _check_item_index_identifiers(index: RetrievalIndex, num_items: int) -> None:
    """A given index must answer with item indices in 1..num_items (an index holds each once):
    the vocabulary maps those to item ids. Filled TFRS-style, without identifiers, an index numbers
    its rows from 0, and every item id it served was its neighbour's."""
    identifiers = tf.convert_to_tensor(index.identifiers)
    refill = (f"fill it with index(item_embeddings[1:], identifiers=tf.range(1, {num_items} + 1)), or pass "
              "index_kind instead")
    what = f"the given {type(index).__name__}"
    if not identifiers.dtype.is_integer:
        raise ValueError(f"{what} holds {identifiers.dtype.name} identifiers, but the export needs the item indices "
                         f"1..{num_items}, which its vocabulary maps to item ids; {refill}")
    values = identifiers.numpy()
    outside = values[(values < 1) | (values > num_items)]
    if outside.size:
        raise ValueError(f"{what} holds identifiers outside the item indices 1..{num_items}: {outside.size:,} of "
                         f"{values.size:,}, e.g. {outside[0]} (filled without identifiers, an index numbers its rows "
                         f"from 0); {refill}")


def _check_model_serves(model, kind: Optional[str], what: str) -> None:
    if kind == "sparse_code" and not hasattr(model, "build_index"):
        raise ValueError(f"{what} needs a SparCode model (code-score columns), got "
                         f"{type(model).__name__}; use brute_force, partitioned or scann")
    if kind == "soft_search" and not hasattr(model, "interest_vectors"):
        raise ValueError(f"{what} needs a multi-interest model (SPARC), got "
                         f"{type(model).__name__}; use brute_force, partitioned or scann")


# Index arguments the export sets itself, and where the user sets them instead.
EXPORT_OWNED_OPTIONS = {
    "k_max": "give k_max (xmatch export --k-max)",
    "k": "a request chooses k (1 <= k <= k_max)",
    "exclude_padding": "the export always keeps the padding id out of results",
    "padding_identifier": "the export pads history exclusions with item index 0 (padding_id sets the id)",
}


# Index kinds that only one kind of model serves (its config name).
MODEL_OF_INDEX_KIND = {"sparse_code": "sparcode", "soft_search": "sparc"}


def _check_owned_options(index_options: dict) -> None:
    owned = sorted(set(index_options) & set(EXPORT_OWNED_OPTIONS))
    if owned:
        # padding_identifier=7 once made the export serve item 7 from the history first, and k
        # was silently ignored.
        raise ValueError(f"index option {owned[0]!r} is set by the export, not by index options: "
                         f"{EXPORT_OWNED_OPTIONS[owned[0]]}")


def resolve_padding_id(item_vocab: Vocabulary, padding_id=None):
    """The raw id that pads histories in requests, checked against the catalogue.

    Args:
      item_vocab: The served items' vocabulary.
      padding_id: None for the default (0 for integer item ids, "" for string ids), or an id of
        the items' type; a string holding an integer (as a command line gives it) is read as
        one for integer ids.

    Returns:
      The padding id (int or str).

    Raises:
      ValueError: If it is of another type than the item ids, or is a real item id.
    """
    string_ids = item_vocab.id_type == "str"
    if padding_id is None:
        padding_id = "" if string_ids else 0
    elif not string_ids and isinstance(padding_id, str):
        try:
            padding_id = int(padding_id)
        except ValueError:
            raise ValueError(f"padding_id {padding_id!r}: the item ids are integers, so the padding id must be "
                             "one too (e.g. -1)") from None
    if (not isinstance(padding_id, str)) if string_ids else (isinstance(padding_id, bool) or not is_integer(padding_id)):
        raise ValueError(f"padding_id must be {'a string' if string_ids else 'an integer'} like the item ids, "
                         f"got {padding_id!r}")
    if not string_ids and not -2 ** 63 <= padding_id < 2 ** 63:
        # Integer ids are served as int64: TensorFlow's "out-of-range integer" named no setting.
        raise ValueError(f"padding_id {padding_id!r} is outside the range of int64, the served item ids' type")
    if padding_id in item_vocab:
        raise ValueError(f"padding_id {padding_id!r} is also a real item id; choose another one, e.g. "
                         f"{'-1' if not string_ids else repr('<pad>')} (xmatch export / xmatch pipeline run "
                         "--padding-id, or the TFX trainer's custom_config['export']['padding_id'])")
    return padding_id


def check_export_settings(model_name: str, index_kind: str = "brute_force", index_options: Optional[dict] = None,
                          k_max: int = 100) -> None:
    """Checks export settings from the settings alone, so that a pipeline refuses them before it
    trains rather than after: ``k_max``, that the index kind serves ``model_name``, and every
    index option's name and value (an index of that kind is constructed, not built).

    Args:
      model_name: The config's ``model.name`` ("two_tower", "sparcode", "sparc", "t2diff").
      index_kind, index_options, k_max: As ``build_serving_module`` takes them.

    Raises:
      ValueError: Naming the setting and value that ``build_serving_module`` would refuse.
    """
    k_max = arguments.integer("k_max", k_max, 1)
    served = MODEL_OF_INDEX_KIND.get(index_kind)
    if served is not None and not issubclass(configured_model_class(model_name), MODELS[served]):
        raise ValueError(f"index kind {index_kind!r} serves model.name={served!r} only, got {model_name!r} (a "
                         f"subclass of {MODELS[served].__name__} is served too)")
    index_options = dict(index_options or {})
    _check_owned_options(index_options)
    make_index(index_kind, k_max=k_max, **index_options)


SPARSE_CODE_BUDGET = ("max_items_per_code", "cache_fraction")


def sparse_code_budget(model, index_options: Optional[dict] = None) -> dict:
    """The budget a "sparse_code" index of ``model`` is built with: the ``max_items_per_code`` /
    ``cache_fraction`` of ``index_options`` that are not None, else the model's
    ``serving_cache_fraction`` (the cache it was selected on), else none (every positive score).
    ``cache_fraction=1`` asks for the whole table whatever the model says."""
    budget = {key: (index_options or {})[key] for key in SPARSE_CODE_BUDGET
              if (index_options or {}).get(key) is not None}
    if not budget and getattr(model, "serving_cache_fraction", None) is not None:
        budget["cache_fraction"] = model.serving_cache_fraction
    return budget


def build_serving_module(
    model,
    item_vocab: Vocabulary,
    *,
    index_kind: str = "brute_force",
    index_options: Optional[dict] = None,
    k_max: int = 100,
    default_k: Optional[int] = None,
    exclude_history: bool = True,
    padding_id=None,
    index=None,
    jit_compile: bool = False,
) -> RetrievalServingModule:
    """Fills an index of ``index_kind`` with the model's item embeddings and wraps it for serving.

    Args:
      model: A trained model (``user_embedding``, ``item_embeddings``, ``max_length``).
      item_vocab: The training vocabulary (raw item id <-> item index).
      index_kind: "brute_force", "partitioned", "scann", "sparse_code" (SparCode: the inverted
        index over its code-score columns; pass e.g. ``{"cache_fraction": 0.01}``; without a
        budget, the model's ``serving_cache_fraction`` if set: see ``sparse_code_budget``) or
        "soft_search" (SPARC: one search per interest over a base kind, merged; pass e.g.
        ``{"num_interests": 4, "base": "scann"}``). SPARC with any other kind is hard search.
      index_options: Constructor arguments of that index kind (e.g. num_partitions).
      k_max: Largest k a request may ask for.
      default_k: k of ``serving_default`` (default ``k_max``).
      exclude_history: Remove items already in the history from the results (default True).
      padding_id: Raw id that marks empty history slots: 0 for integer ids, "" for strings.
      index: An index of ``index_kind`` already filled with the item embeddings under item
        indices 1..N (e.g. by the Beam ``build_index`` pipeline); None builds one here.
      jit_compile: Compile the user side with XLA (default False). It pays off where the user
        side is many small ops: T2Diff's sampler runs its denoiser once per step. Results agree
        with the plain export up to float rounding. Stock TF Serving runs such a SavedModel on
        CPU only with ``--xla_cpu_compilation_enabled=true``. XLA compiles once per batch size,
        so give the server fixed ``allowed_batch_sizes`` (ours pads to them as TF Serving does).
        The default export needs no XLA.

    Raises:
      ValueError: A bad k, an unknown index kind, an index kind (or a given ``index``) the model
        cannot serve, a vocabulary of another size than the model's, an unquantized SparCode, a
        padding id that is also a real item id, a given ``index`` that is empty, whose
        ``k_max`` differs from ``k_max`` or whose identifiers are not item indices 1..N, or a
        model that is neither a built-in one nor a registered subclass (``model_kind``).
      TypeError: A given ``index`` that is not a tfx_xmatch index (e.g. a TFRS ``TopK``).
    """
    model_kind(model)  # one the SavedModel could not describe fails now, not after the index is built
    k_max = arguments.integer("k_max", k_max, 1)
    if k_max > item_vocab.num_items:
        log.warning("k_max=%d exceeds the catalogue's %d items: the slots past it hold the padding id "
                    "with score -inf", k_max, item_vocab.num_items)
    if item_vocab.num_items != model.num_items:
        raise ValueError(f"the vocabulary has {item_vocab.num_items} items but the model was built for "
                         f"{model.num_items}")
    if not getattr(model, "quantize", True):
        raise ValueError("an unquantized SparCode (quantize=False) scores every item with its interaction "
                         "network and cannot be served from an index; export a quantized SparCode")
    if index is not None:
        if not isinstance(index, RetrievalIndex):
            raise TypeError(f"index must be a tfx_xmatch index (tfx_xmatch.index, e.g. BruteForceIndex) filled with the "
                            f"item embeddings, got {type(index).__module__}.{type(index).__qualname__}; a TFRS TopK "
                            "layer embeds queries with its own query model, which the export takes from the model")
        # A given index is checked as its kind would be, and now: a misfit would otherwise
        # fail only at the first request, inside a traced function.
        given_kind = ("soft_search" if isinstance(index, SoftSearchIndex)
                      else "sparse_code" if isinstance(index, SparseCodeIndex) else None)
        _check_model_serves(model, given_kind, f"the given {type(index).__name__}")
        if index.identifiers is None:
            raise ValueError(f"the given {type(index).__name__} is empty: call its index() (or "
                             "index_from_dataset()) with the item embeddings first, or pass index_kind instead")
        _check_item_index_identifiers(index, model.num_items)
    else:
        _check_model_serves(model, index_kind, f"index_kind {index_kind!r}")
    default_k = k_max if default_k is None else int(default_k)
    if not 1 <= default_k <= k_max:
        raise ValueError(f"default_k must be in [1, k_max={k_max}], got {default_k!r}")
    padding_id = resolve_padding_id(item_vocab, padding_id)
    index_options = dict(index_options or {})
    _check_owned_options(index_options)
    # The model's own serving settings unless the caller overrides them.
    if index_kind == "soft_search":
        index_options.setdefault("num_interests", model.serving_interests)
        index_options.setdefault("temperature", model.temperature)
    if index_kind == "sparse_code":
        index_options = {**{k: v for k, v in index_options.items() if k not in SPARSE_CODE_BUDGET},
                         **sparse_code_budget(model, index_options)}
    elif getattr(model, "serving_cache_fraction", None) is not None:
        log.warning("the model was selected through a %g cache (serving_cache_fraction), but index kind %r "
                    "serves its whole code-score table", model.serving_cache_fraction, index_kind)
    if index is not None:
        if int(index.k_max) != int(k_max):
            raise ValueError(f"the given index has k_max={index.k_max}, the export asks for k_max={k_max}")
        _check_interests(model, index)
        if not hasattr(model, "build_index"):  # e.g. the pipeline's index, filled from build-index
            _warn_if_underfilled(type(index).__name__, index, model.item_embeddings()[1:], k_max)
        return RetrievalServingModule(model, index, item_vocab, padding_id, exclude_history, default_k,
                                      jit_compile)
    index = make_index(index_kind, k_max=k_max, **index_options)
    _check_interests(model, index)  # before the index is built: SPARC only finds out while tracing
    if hasattr(model, "build_index"):
        model.build_index(index)  # streamed in item chunks, with a progress bar
    else:
        embeddings = model.item_embeddings()[1:]
        index.index(embeddings, tf.range(1, item_vocab.num_items + 1, dtype=tf.int64))
        _warn_if_underfilled(index_kind, index, embeddings, k_max)
    return RetrievalServingModule(model, index, item_vocab, padding_id, exclude_history, default_k, jit_compile)


def _warn_if_underfilled(index_kind: str, index, embeddings: tf.Tensor, k_max: int) -> None:
    """Warns when an approximate dense index cannot fill k_max slots.

    A partitioned or ScaNN index returns only the items of the partitions (leaves) it probes; with
    many partitions for the catalogue, a top-k_max search comes back mostly padding, and nothing
    else would tell the user. Probed with item vectors, which sit where queries look.
    """
    dense = index.base if isinstance(index, SoftSearchIndex) else index
    if dense.is_exact():
        return
    num_items = int(embeddings.shape[0])
    wanted = min(k_max, num_items)
    rows = np.unique(np.linspace(0, num_items - 1, num=min(num_items, 32)).astype(np.int64))
    scores, _ = dense(tf.gather(embeddings, rows), k=wanted)
    found = int(np.isfinite(scores.numpy()).sum(axis=1).min())
    if found < wanted:
        log.warning("index kind %r: a top-%d search returned only %d items for one of %d probe queries (item "
                    "vectors), so requests get padding slots (score -inf); search more of the index (num_probes, "
                    "num_leaves_to_search) or split it into fewer partitions/leaves (%s)",
                    index_kind, wanted, found, len(rows), _options_text(dense))


def _options_text(index) -> str:
    names = ("num_partitions", "num_probes", "num_leaves", "num_leaves_to_search")
    return ", ".join(f"{name}={getattr(index, name)}" for name in names if hasattr(index, name))


def _check_interests(model, index) -> None:
    """A soft search asks for at most as many interests as SPARC has level-1 codes."""
    num_codes = getattr(model, "num_codewords", None)
    if isinstance(index, SoftSearchIndex) and num_codes is not None and index.num_interests > num_codes:
        raise ValueError(f"num_interests={index.num_interests} exceeds the model's {num_codes} interest codes "
                         f"(level-1 codewords); give num_interests in [1, {num_codes}]")


def export_retrieval_model(
    model,
    item_vocab: Vocabulary,
    export_base_path: str | os.PathLike,
    *,
    version: Optional[int] = None,
    index_kind: str = "brute_force",
    index_options: Optional[dict] = None,
    k_max: int = 100,
    default_k: Optional[int] = None,
    exclude_history: bool = True,
    padding_id=None,
    model_name: str = "xmatch",
    warmup_histories: Optional[list] = None,
    index=None,
    jit_compile: bool = False,
) -> pathlib.Path | str:
    """Exports ``model`` with a baked-in index as ``export_base_path/<version>/``.

    Args:
      model, item_vocab, index_kind, index_options, k_max, default_k, exclude_history,
        padding_id, index, jit_compile: See ``build_serving_module``.
      export_base_path: The ``MODEL_BASE_PATH`` a server watches: a local path, or a URL that
        ``tf.io.gfile`` writes (``gs://``, ``s3://``...).
      version: Version number; default one more than the largest existing version.
      model_name: Model name used in the warm-up requests.
      warmup_histories: Histories (lists of raw ids) for the warm-up requests; default the
        first items of the vocabulary.

    Returns:
      The version directory: a ``pathlib.Path``, or a string for a URL such as ``gs://``.

    Raises:
      FileExistsError: ``version`` already exists, under any spelling (``007`` for 7), checked
        before the build and again when publishing (versions are immutable once served). With
        ``version`` None a number another exporter takes meanwhile is skipped instead.
      NotADirectoryError: ``export_base_path`` is a file.
      ValueError: ``version`` outside 1 to int64's largest, or what ``build_serving_module``
        refuses.
    """
    base = str(export_base_path)
    _check_base_path(base)
    if version is not None:
        version = _unused_version(base, version)
    module = build_serving_module(
        model, item_vocab, index_kind=index_kind, index_options=index_options, k_max=k_max,
        default_k=default_k, exclude_history=exclude_history, padding_id=padding_id, index=index,
        jit_compile=jit_compile,
    )
    histories = _warmup_histories(item_vocab, warmup_histories)
    return publish_new_version(base, lambda directory: _write_saved_model(module, directory, model_name, histories),
                               version)


def _check_base_path(base: str) -> None:
    """Refuses a base path that is a file before the (slow) build, naming it."""
    if tf.io.gfile.exists(base) and not tf.io.gfile.isdir(base):
        raise NotADirectoryError(f"export base path {base} is a file, not a directory of versions")


def _unused_version(base: str, version) -> int:
    """``version`` as an int, checked: a number TF Serving reads (1 to int64's largest) and not
    taken under any spelling (``7`` beside ``007`` would be two directories of one version)."""
    number = int(version)
    if not 1 <= number <= INT64_MAX:
        raise ValueError(f"version must be a positive integer of at most {INT64_MAX} (int64, as TF Serving "
                         f"reads version names), got {version!r}")
    taken = _versions_by_number(base)
    if number in taken:
        raise FileExistsError(f"{_join(base, taken[number])} already exists (version {number}); versions are "
                              "immutable, export a new one")
    return number


def _versions_by_number(base: str) -> dict[int, str]:
    """{version: entry name} of the entries under ``base`` whose name a server reads as a
    version (:func:`~tfx_xmatch.io_utils.version_number`); {} without ``base``."""
    if not tf.io.gfile.isdir(base):
        return {}
    found = {}
    for name in tf.io.gfile.listdir(base):
        number = version_number(name.rstrip("/"))
        if number is not None:
            found.setdefault(number, name.rstrip("/"))
    return found


def next_version(base_path: str) -> int:
    """One more than the largest version under ``base_path`` (any ``tf.io.gfile`` path), 1 if
    there is none or no ``base_path`` yet; names are read as the server reads them (ASCII
    digits within int64). Creates nothing: an export that fails leaves no empty base directory
    behind."""
    number = max(_versions_by_number(base_path), default=0) + 1
    if number > INT64_MAX:
        raise ValueError(f"{base_path} already holds version {INT64_MAX}, the largest TF Serving reads")
    return number


def publish_new_version(base: str, write: Callable[[pathlib.Path], None],
                        version: Optional[int] = None) -> pathlib.Path | str:
    """Writes a new version directory with ``write(directory)`` and publishes it as
    ``base/<version>/`` without ever replacing an existing version.

    ``write`` fills a hidden temporary (servers ignore names that are not numbers), which is
    renamed into place only when complete, so a server polling ``base`` never sees half a
    model. A number taken meanwhile (another exporter into the same ``base``) is never
    replaced: with ``version`` None the next free number is taken, with an explicit
    ``version`` FileExistsError names the path.

    Args:
      base: The model base path: a local path, or a URL ``tf.io.gfile`` writes (``gs://``...).
      write: Fills a local directory (a ``pathlib.Path``) with the SavedModel.
      version: The version number; default one more than the largest present.

    Returns:
      The version directory: a ``pathlib.Path``, or a string for a URL.
    """
    if "://" in base:
        with tempfile.TemporaryDirectory() as local:
            write(pathlib.Path(local))
            return _upload_new_version(local, base, version)
    base_dir = pathlib.Path(base)
    base_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(base_dir)
    with locked_temporary_directory(base_dir) as temporary:
        write(temporary)
        while True:
            final = base_dir / str(_number_to_publish(base, version))
            try:
                rename_no_replace(temporary, final)
                return final
            except FileExistsError:
                if version is not None:
                    raise FileExistsError(f"{final} already exists; versions are immutable, export a new one") from None
                # Another exporter published this number since it was read: the next one.


def _number_to_publish(base: str, version: Optional[int]) -> int:
    """The next free number, or ``version`` checked again just before publishing: a ``007``
    created during the build counts as taking 7."""
    return next_version(base) if version is None else _unused_version(base, version)


def _upload_new_version(local: str, base: str, version: Optional[int]) -> str:
    """Publishes a complete local SavedModel as a new version under the URL ``base``.

    An object store has no atomic directory rename, nor one that refuses to replace: the
    SavedModel is uploaded beside the versions first, then moved in file by file (server-side
    copies) with ``overwrite=False``, ``saved_model.pb`` last, so a polling server finds no
    SavedModel until the rest is there. The first file moved claims the number: if it exists
    already, another exporter took that version, and nothing of this one is in it.

    Not atomic, unlike the local rename: ``tf.io.gfile.rename(overwrite=False)`` checks, then
    copies, so two exporters moving their first file into one number in the same instant both
    go on, and the second one to find a file of the other's there fails naming the version,
    which then holds files of both. Publish to one object-store base path from one process at
    a time (a pipeline's publish step, a CI job).
    """
    staging = f"{base.rstrip('/')}/.export.{uuid.uuid4().hex}.tmp"
    copy_directory_or_nothing(local, staging)
    files = sorted((os.path.relpath(os.path.join(directory, name), local)
                    for directory, _, names in os.walk(local) for name in names),
                   key=lambda name: (name == "saved_model.pb", name))
    try:
        while True:
            final = _join(base, str(_number_to_publish(base, version)))
            try:
                if tf.io.gfile.exists(final):
                    raise FileExistsError(final)
                _move_files(staging, final, files)
                return final
            except FileExistsError:
                if version is not None:
                    raise FileExistsError(f"{final} already exists; versions are immutable, export a new one") from None
    finally:
        with contextlib.suppress(tf.errors.NotFoundError):
            tf.io.gfile.rmtree(staging)


def _move_files(staging: str, final: str, files: list[str]) -> None:
    """Renames ``files`` (relative names, in order) from ``staging`` into ``final``, none over an
    existing file. FileExistsError when the first file is there already: ``final`` is another
    exporter's, and nothing of this one is in it. Any other failure removes ``final`` again (it
    did not exist when the move began): servers would fail to load what was moved, and later
    exports skip a number that exists.

    Raises:
      RuntimeError: A later file was there already: another exporter moved into ``final`` at the
        same instant (see ``_upload_new_version``); it is left for the operator, as it holds
        files of both.
    """
    moved = 0
    try:
        for name in files:
            target = f"{final}/{name}"
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            try:
                tf.io.gfile.rename(f"{staging}/{name}", target, overwrite=False)
            except tf.errors.AlreadyExistsError:
                if not moved:
                    raise FileExistsError(final) from None
                raise RuntimeError(f"{target} was written by another export publishing into {final} at the same "
                                   f"time; {final} holds files of both: delete it, then export again") from None
            moved += 1
    except (FileExistsError, RuntimeError):
        raise
    except BaseException:
        with contextlib.suppress(tf.errors.OpError):
            tf.io.gfile.rmtree(final)
        raise


def save_serving_module(module: RetrievalServingModule, directory: str | os.PathLike, item_vocab: Vocabulary, *,
                        model_name: str = "xmatch", warmup_histories: Optional[list] = None,
                        overwrite: bool = False) -> pathlib.Path | str:
    """Saves ``module`` as a SavedModel (with warm-up requests) at ``directory``, atomically.

    The SavedModel is written to a hidden sibling (servers ignore names that are not version
    numbers) and renamed into place, so a reader never sees half of it. This is also the TFX
    Trainer's ``serving_model_dir`` layout (the SavedModel directly in the directory).

    Args:
      overwrite: Replace an existing ``directory`` (a retried TFX Trainer writes to the same
        place), only once the new SavedModel is complete: locally by two renames (a crash
        between them leaves the old one as ``.NAME.old``, which the next save restores); on
        an object store the new one is uploaded beside it first, then the old one is deleted
        and the new one renamed into its place within the store (``saved_model.pb`` last).
        Default False.

    Raises:
      FileExistsError: ``directory`` already exists and ``overwrite`` is False.
    """
    final = _join(str(directory))
    if not isinstance(final, str):
        restore_moved_aside(final)  # an earlier overwrite killed between its two renames
    exists = tf.io.gfile.exists(str(final))
    if exists and not overwrite:
        raise FileExistsError(f"{final} already exists; write the SavedModel to a new directory")
    histories = _warmup_histories(item_vocab, warmup_histories)
    if isinstance(final, str):  # a remote path (gs://, s3://...): written through tf.io.gfile
        with tempfile.TemporaryDirectory() as local:
            _write_saved_model(module, pathlib.Path(local), model_name, histories)
            # saved_model.pb last: a server looking during the copy finds no SavedModel rather
            # than a graph whose variables are half written (object stores have no atomic rename).
            if not exists:
                copy_directory_or_nothing(local, final, last="saved_model.pb")
                return final
            # Uploaded beside the old export first, so a failed upload leaves that one whole.
            parent, name = final.rstrip("/").rsplit("/", 1)
            staging = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
            copy_directory_or_nothing(local, staging)
        _replace_by_renames(staging, final)
        return final
    # A temporary beside it, renamed into place when complete; the old one (if any) is moved
    # aside under a name the next save restores should a crash come between the two renames.
    with atomic_directory(final, replace=overwrite) as temporary:
        _write_saved_model(module, temporary, model_name, histories)
    return final


def _warmup_histories(item_vocab: Vocabulary, histories: Optional[list]) -> list:
    return histories or [list(item_vocab.ids(np.arange(1, min(item_vocab.num_items, 5) + 1)))]


def _write_saved_model(module: RetrievalServingModule, directory: pathlib.Path, model_name: str,
                       histories: list) -> None:
    """The SavedModel with its ``assets.extra`` into the local ``directory``."""
    uses_scann = any(type(layer).__name__ == "ScaNNIndex" for layer in (module.index, getattr(module.index, "base", None)))
    options = tf.saved_model.SaveOptions(namespace_whitelist=[SCANN_NAMESPACE] if uses_scann else None)
    tf.saved_model.save(module, str(directory), signatures=module.signatures(), options=options)
    _write_extras(directory, module, model_name, histories)


def _replace_by_renames(staging: str, final: str) -> None:
    """Swaps a complete uploaded SavedModel in for the one at ``final``, within the store.

    Renames, not a second upload: on GCS or S3 a directory's rename is a server-side copy per
    object, so no client connection can drop half-way; ``saved_model.pb`` moves last, so a
    server polling ``final`` meanwhile finds no SavedModel rather than a half-moved one.
    """
    entries = sorted((entry.rstrip("/") for entry in tf.io.gfile.listdir(staging)),
                     key=lambda entry: entry == "saved_model.pb")
    try:
        tf.io.gfile.rmtree(final)
        tf.io.gfile.makedirs(final)
        for entry in entries:
            tf.io.gfile.rename(f"{staging}/{entry}", f"{final}/{entry}")
    except BaseException as error:
        error.add_note(f"what was not moved yet of the new SavedModel is at {staging}")
        raise
    tf.io.gfile.rmtree(staging)


def _join(base: str, *parts: str):
    """A local path as a ``pathlib.Path``; a URL (``gs://``...) as a string, which pathlib would
    turn into a local ``gs:/`` path."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return pathlib.Path(base, *parts)


def _write_extras(saved_model_dir: pathlib.Path, module: RetrievalServingModule, model_name: str,
                  histories: list) -> None:
    """``assets.extra``: TF Serving's warm-up requests, and the model's description, which lets
    the SavedModel warm-start a new run (``train.warm_start``, TFX's ``base_model``)."""
    write_warmup_requests(saved_model_dir, model_name, histories, module.id_dtype, module.user_features,
                          top_k=module.default_k)
    padding_id = module.padding_id.numpy()
    # What a client needs to build a request: the id that pads a history, the window a history
    # should be left-padded to (TF Serving's batching pads at the end), and the bounds of k.
    serving = {"padding_id": padding_id.decode() if isinstance(padding_id, bytes) else int(padding_id),
               "max_length": int(module.max_length), "k_max": int(module.index.k_max),
               "default_k": int(module.default_k)}
    description = saved_model_dir / SERVING_MODEL_DESCRIPTION
    description.write_text(json.dumps({**model_description(module.model), "serving": serving}), encoding="utf-8")


def write_warmup_requests(saved_model_dir: pathlib.Path, model_name: str, histories: list, id_dtype: tf.DType,
                          user_features=(), top_k: Optional[int] = None) -> None:
    """Writes TF Serving warm-up PredictionLogs for ``serving_default`` (one per history; each
    of ``user_features`` unknown, 0, since TF Serving refuses a version whose warm-up fails) and,
    with ``top_k``, for ``top_k`` with that k given once per row, the form TF Serving's batching
    accepts, so the first real ``top_k`` request does not pay for its initialisation."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    directory = saved_model_dir / "assets.extra"
    directory.mkdir(parents=True, exist_ok=True)
    signatures = ["serving_default"] + (["top_k"] if top_k is not None else [])
    with tf.io.TFRecordWriter(str(directory / "tf_serving_warmup_requests")) as writer:
        for signature in signatures:
            for history in histories:
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
                )
                values = np.asarray([history]).astype(str if id_dtype == tf.string else np.int64)
                request.inputs["history"].CopyFrom(tf.make_tensor_proto(values))
                if signature == "top_k":
                    request.inputs["k"].CopyFrom(tf.make_tensor_proto(np.asarray([top_k], np.int32)))
                for name in user_features:
                    request.inputs[name].CopyFrom(tf.make_tensor_proto(np.zeros(1, np.int64)))
                log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString(deterministic=True))


def _saved_model_proto(saved_model_dir: str | os.PathLike):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    # tf.io.gfile: the directory may be a URL (gs://, file://) that export_retrieval_model returned.
    with tf.io.gfile.GFile(f"{str(saved_model_dir).rstrip('/')}/saved_model.pb", "rb") as file:
        proto.ParseFromString(file.read())
    return proto


def saved_model_ops(saved_model_dir: str | os.PathLike) -> set[str]:
    """Every op type used by a SavedModel's graphs, including its function library."""
    ops = set()
    for meta_graph in _saved_model_proto(saved_model_dir).meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def xla_compiled(saved_model_dir: str | os.PathLike) -> bool:
    """Whether a SavedModel has functions that must be compiled with XLA (``jit_compile``)."""
    return any(function.attr["_XlaMustCompile"].b for meta_graph in _saved_model_proto(saved_model_dir).meta_graphs
               for function in meta_graph.graph_def.library.function)


def non_stock_ops(saved_model_dir: str | os.PathLike) -> set[str]:
    """Ops of a SavedModel that stock TensorFlow (and so stock TF Serving) does not register."""
    stock = {name for name in dir(tf.raw_ops) if not name.startswith("_")}
    return {op for op in saved_model_ops(saved_model_dir) if op not in stock}
