"""RetrievalIndex: the interface every top-k index kind implements.

An index holds candidate embeddings and their identifiers and answers "the k candidates with
the highest dot product with each query". The interface follows TFRS' ``TopK`` layers
(``index``, ``index_from_dataset``, ``call(queries, k)``, ``is_exact``) with three additions
that a serving signature needs:

* ``k`` may be a scalar int32 tensor, so a SavedModel signature can take it as an input; it is
  never frozen at trace time, and ``k_max`` (a constructor argument) bounds it.
* ``exclude`` removes given identifiers (e.g. the user's history) from each row's results, for
  every kind: the base class over-fetches ``k + E`` candidates from the subclass and masks them.
* Rows with fewer than k results are padded, with score ``-inf`` and ``padding_identifier``, so
  outputs always have exactly k columns.

Index state lives in non-trainable ``tf.Variable``s created by ``index()`` with unknown
dimensions: a SavedModel carries the index, and re-indexing with another catalogue size assigns
new values to the same variables, so functions traced before still answer from the new index
(ScaNN's searcher excepted: such a function fails, saying to trace it again). A ``.keras`` file
carries the index too, by name (``save_own_variables``).

Threads: querying while another thread re-indexes is safe, and every answer comes wholly from
one catalogue (see ``RetrievalIndex``).
"""

from __future__ import annotations

import abc
import contextlib
import json
import threading
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from tfx_xmatch.arguments import is_integer

TensorLike = Union[tf.Tensor, np.ndarray, Sequence]
Identifier = Union[int, str]

_DEFAULT_INT_PADDING = -1
_DEFAULT_STRING_PADDING = ""
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RetrievalIndex(tf.keras.layers.Layer, abc.ABC):
    """Abstract top-k dot-product index over candidate embeddings.

    Writing an index kind. Where a TFRS ``TopK`` subclass overrides ``index`` and ``call``, a
    subclass here implements three methods and inherits the public ones (``index``,
    ``index_from_dataset``, ``call``), so identifiers, ``k`` checks, exclusion, padding, thread
    safety and saving behave the same for every kind:

    * ``_index(candidates)``: builds the state from a float32 [N, d] tensor (slow work such as
      clustering goes here) and returns a function that stores it, e.g.
      ``functools.partial(self._assign_states, {"candidates": candidates})``. Store state only
      through ``_assign_states`` / ``_assign_state``: they keep it in non-trainable variables
      of unknown dimensions that a SavedModel and a ``.keras`` file carry and a re-index assigns
      in place. State held otherwise (a plain ``tf.Variable`` made anew, a Python list) is not
      saved, and a function traced before a re-index keeps answering from the old one.
    * ``_top_k(queries, k)``: reads the stored variables (attributes of the names given to
      ``_assign_states``) and returns best-first float32 scores and int row positions, [B, at
      most k] each, position -1 marking an empty slot; stock TF ops only, so TF Serving loads it.
    * ``is_exact()``: whether ``_top_k`` finds the true top k.

    Python values that ``index()`` derives beside the variables (e.g. a partition count) are
    listed by ``_saved_attributes`` so a ``.keras`` file keeps them. Register the class with
    ``tf.keras.utils.register_keras_serializable`` to reload ``.keras`` files, and add it to
    ``tfx_xmatch.index.INDEX_KINDS`` to make it by name (``make_index``, ``export_retrieval_model``'s
    ``index_kind``); or pass a filled instance as the export's ``index``. ``BruteForceIndex`` is
    the smallest complete example.

    Differences from TFRS ``TopK`` that a switch-over meets:

    * An index takes query embeddings, not raw queries: it holds no query model. Serve one with
      ``tfx_xmatch.export.export_retrieval_model``, which puts the model's user side in front.
    * It is a Keras layer, not a model: ``tf.saved_model.save(index, path)`` writes its state but
      no call function (the reloaded object fails with "Found zero restored functions"). Save it
      inside a ``tf.keras.Model`` that calls it, or export as above.
    * Where TFRS ``BruteForce`` refuses a k past the catalogue, empty slots here hold ``-inf``
      (a k past the catalogue, or an approximate kind whose probed partitions hold fewer than k
      items). TFRS ``FactorizedTopK`` does not expect them: by scores, ``tf.math.in_top_k``
      counts a row holding ``-inf`` as a miss, so the metrics read 0; by candidate ids, two
      empty slots in a row make a NaN difference, failing it with "Top-K predictions must be
      sorted". Give those metrics a ``BruteForceIndex`` and k within the catalogue, or measure
      with ``tfx_xmatch.evaluation`` (full ranking over every item, no index).

    Threads. Queries may run while another thread calls ``index()`` (a live catalogue refresh);
    each answer comes wholly from the old catalogue or wholly from the new one. ``index()``
    builds the new state first (k-means, ScaNN's training) while queries go on, then stores it
    in one short write:

    * Eager calls (and tracing) hold a per-index lock, which the write holds too: they wait for
      it, and eager calls of one index from several threads run one at a time.
    * Traced functions (``tf.function``, ``model.predict``, a SavedModel) read a write counter
      before and after the state (a seqlock: odd while a write is under way). A call that
      overlapped a write fails with ``tf.errors.InvalidArgumentError``: run it again. Mostly
      the check's error, saying the index was rewritten while the query read it; sometimes an
      op the half-read state broke first (a gather index out of range), which fails before the
      check runs. Under XLA (``jit_compile``), which drops assertions, the check is not made.
      A ScaNN function traced before a re-index fails always (see ``ScaNNIndex``).
    * Two ``index()`` calls on one index store one after the other; the last one wins.
    * Not guarded: Keras' ``set_weights`` / ``load_weights`` while queries run.

    Args:
      k_max: Largest k a call may ask for (int >= 1, default 100). Approximate kinds size their
        search for it.
      k: Number of results when ``call`` gets no ``k`` (int in [1, k_max], default k_max).
      padding_identifier: Identifier returned in empty result slots (when fewer than k
        candidates remain). Default -1 for integer identifiers, "" for string identifiers.
      exclude_padding: Value in ``exclude`` rows that stands for "no identifier" (so padded
        exclusion lists do not remove a real candidate). Default: the padding identifier.
      **kwargs: Passed to ``tf.keras.layers.Layer`` (e.g. ``name``).

    Returns:
      Called as ``index(queries, k=None, exclude=None)`` (see ``call``): ``(scores,
      identifiers)``, float32 [B, k] dot products, best first, and the [B, k] identifiers given
      to ``index()`` (int64 row positions when none were). Empty slots hold ``-inf`` and
      ``padding_identifier``.

    Raises:
      ValueError: If ``k_max`` or ``k`` is out of range.

    Example:
      >>> index = BruteForceIndex(k_max=10).index(tf.random.normal([100, 8]))
      >>> scores, ids = index(tf.random.normal([2, 8]), k=3)  # float32 [2, 3], int64 [2, 3]
    """

    def __init__(
        self,
        k_max: int = 100,
        k: Optional[int] = None,
        padding_identifier: Optional[Identifier] = None,
        exclude_padding: Optional[Identifier] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not is_integer(k_max) or k_max < 1:
            raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
        self.k_max = int(k_max)
        if k is None:
            k = self.k_max
        if not is_integer(k) or not 1 <= k <= self.k_max:
            raise ValueError(f"k must be an integer in [1, k_max={self.k_max}], got {k!r}")
        self.k = int(k)
        self.padding_identifier = _plain_identifier(padding_identifier, "padding_identifier")
        self.exclude_padding = _plain_identifier(exclude_padding, "exclude_padding")
        # Held by writes of the state and by eager calls (see the class docstring, Threads).
        # object.__setattr__: Keras' tracking would keep a reference that copies meet, and a
        # lock cannot be copied (__getstate__ leaves it out).
        object.__setattr__(self, "_state_lock", threading.RLock())
        self._writes = _WriteCounter()
        # Set by index(); None means "not indexed yet".
        self._awaiting_catalogue = False
        self.identifiers: Optional[tf.Variable] = None
        self.num_candidates: Optional[int] = None
        self.dimension: Optional[int] = None

    # ------------------------------------------------------------------ indexing
    def index(
        self, candidates: TensorLike, identifiers: Optional[TensorLike] = None
    ) -> "RetrievalIndex":
        """Builds the index, replacing any previous one.

        Runs eagerly (approximate kinds train their partitions here), so call it outside
        ``tf.function``.

        Args:
          candidates: float [N, d] candidate embeddings, N >= 1 (cast to float32).
          identifiers: [N] identifiers returned by searches, any integer dtype (stored as
            int64) or string. Default ``0..N-1`` (int64).

        Returns:
          self, so that ``index = BruteForceIndex().index(embeddings)`` works.

        Raises:
          ValueError: If shapes are wrong, N is 0, or N differs between the two arguments.
          TypeError: If dtypes are not float / integer-or-string, ``padding_identifier`` does
            not match the identifiers' dtype, or the index holds identifiers of another dtype.
          RuntimeError: If called inside ``tf.function``.
        """
        self._require_eager("index()")
        candidates = self._checked_candidates(candidates)
        num_candidates, dimension = int(candidates.shape[0]), int(candidates.shape[1])
        identifiers = self._checked_identifiers(identifiers, num_candidates)
        store = self._index(candidates)
        with self._writing():
            store()
            self._set_catalogue(identifiers, num_candidates, dimension)
        return self

    def _index_positions(self, candidates: tf.Tensor) -> Callable[[], None]:
        """Builds this index over checked candidates under their positions 0..N-1, for a
        composite index that maps positions to its own identifiers (the base's padding values
        are never returned); returns the function that stores it (the composite's ``_index``)."""
        store = self._index(candidates)
        num_candidates, dimension = int(candidates.shape[0]), int(candidates.shape[1])

        def store_positions() -> None:
            with self._writing():  # the base may be queried on its own too
                store()
                self._set_catalogue(tf.range(num_candidates, dtype=tf.int64), num_candidates, dimension)

        return store_positions

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The scope of a write of the index state: eager calls wait for it (the lock), and
        traced ones that read the state meanwhile fail (the write counter is odd during it)."""
        with self._state_lock:
            self._writes.count.assign_add(1)
            try:
                yield
            finally:
                self._writes.count.assign_add(1)

    def index_from_dataset(self, dataset: tf.data.Dataset) -> "RetrievalIndex":
        """Builds the index from a dataset, like TFRS' ``TopK.index_from_dataset``.

        Args:
          dataset: Batches of float [n, d] embeddings, or of ``(identifiers [n],
            embeddings [n, d])`` tuples.

        Returns:
          self.

        Raises:
          ValueError: If the elements are neither tensors nor 2-tuples, the dataset is empty, or
            it is not batched (its embeddings are not [n, d]).
        """
        is_pair = self._dataset_is_pair(dataset)
        batches = list(dataset)
        if not batches:
            raise ValueError("the candidate dataset is empty")
        if is_pair:
            identifiers = tf.concat([ids for ids, _ in batches], axis=0)
            return self.index(tf.concat([embeddings for _, embeddings in batches], axis=0), identifiers)
        return self.index(tf.concat(batches, axis=0))

    # ------------------------------------------------------------------ querying
    def call(
        self,
        queries: tf.Tensor,
        k: Optional[Union[int, tf.Tensor]] = None,
        exclude: Optional[tf.Tensor] = None,
    ) -> Tuple[tf.Tensor, tf.Tensor]:
        """Returns the k best candidates of each query, best first.

        Args:
          queries: float [B, d] query embeddings.
          k: Number of results, a Python int or a scalar integer tensor in [1, k_max]. Default
            the constructor's ``k``. A tensor is not frozen when traced, so one traced function
            serves every k.
          exclude: Optional [B, E] identifiers (same dtype as the index's) to remove from each
            row's results, e.g. the user's history; entries equal to ``exclude_padding`` are
            ignored.

        Returns:
          ``(scores, identifiers)``: float32 [B, k] dot products, best first, and the matching
          [B, k] identifiers. Slots beyond the available candidates (catalogue smaller than k,
          a partition probe with too few members, or exclusions) hold score ``-inf`` and
          ``padding_identifier``.

        Raises:
          ValueError: If ``index()`` was not called, shapes are wrong, or a Python / eager k is
            out of range. A k tensor only known at run time fails a ``tf.debugging`` assertion
            instead (``tf.errors.InvalidArgumentError``), whose message names the value.
          TypeError: If dtypes are wrong (float queries, integer k, exclude of the index's
            identifier dtype).
          tf.errors.InvalidArgumentError: A query row is not finite (NaN or inf), naming it; or,
            in a traced function, ``index()`` rewrote the index while this call read it (run it
            again; see Threads in the class docstring). Neither is checked under XLA
            (``jit_compile``), which drops assertions.
        """
        with self._state_lock:  # eagerly, the whole search; when tracing, the Python state read
            if tf.executing_eagerly():
                return self._search(queries, k, exclude)
            return self._search_between_writes(lambda: self._search(queries, k, exclude))

    def _search_between_writes(
        self, search: Callable[[], Tuple[tf.Tensor, tf.Tensor]]
    ) -> Tuple[tf.Tensor, tf.Tensor]:
        """Runs a traced ``search`` between two reads of the write counter (a seqlock), failing
        if a write of the state overlapped it (the counter was odd, or changed).

        The first read comes before every state read (a control dependency), the second after
        the results, so an answer that passed the check read one catalogue only. Costs two
        scalar reads and an assertion per call; the lock is no use here, as a traced function
        runs without Python.
        """
        before = self._writes.count.read_value()
        with tf.control_dependencies([before]):
            scores, identifiers = search()
        with tf.control_dependencies([scores, identifiers]):
            after = self._writes.count.read_value()
        with tf.control_dependencies([self._writes_check(before, after)]):
            return tf.identity(scores), tf.identity(identifiers)

    def _writes_check(self, before: tf.Tensor, after: tf.Tensor) -> tf.Operation:
        """The assertion that no write of the state overlapped a traced search: the counter,
        even (no write under way) before it, is unchanged after it."""
        unchanged = tf.logical_and(tf.equal(before % 2, 0), tf.equal(before, after))
        return tf.debugging.Assert(unchanged, [
            f"{type(self).__name__}.index() rewrote the index while this query read it; run the query "
            "again (write counter before and after the query:", before, after, ")"])

    def _search(
        self,
        queries: tf.Tensor,
        k: Optional[Union[int, tf.Tensor]] = None,
        exclude: Optional[tf.Tensor] = None,
    ) -> Tuple[tf.Tensor, tf.Tensor]:
        """``call``'s search, unguarded."""
        self._raise_unless_indexed()
        queries = tf.convert_to_tensor(queries)
        if not queries.dtype.is_floating:
            raise TypeError(f"queries must be a float tensor, got dtype {queries.dtype.name}")
        queries = tf.cast(queries, tf.float32)
        if queries.shape.rank != 2:
            raise ValueError(f"queries must be a [B, d] matrix, got shape {queries.shape}")
        columns = queries.shape[1]
        if columns is not None and self.dimension is not None and columns != self.dimension:
            raise ValueError(
                f"queries have {columns} columns but the indexed candidates have {self.dimension}"
            )
        if columns is None and self.dimension is not None:
            # Known only when the function runs: SparCode's inverted index reads only the
            # columns a query has and would answer a narrower one as if the rest were 0.
            check = tf.debugging.assert_equal(
                tf.shape(queries)[1], self.dimension,
                message=f"queries must have as many columns as the indexed candidates ({self.dimension})")
            with tf.control_dependencies([check]):
                queries = tf.identity(queries)
        with tf.control_dependencies([self._finiteness_check(queries)]):
            queries = tf.identity(queries)
        static_k, k = self._checked_k(k)

        id_dtype = self.identifiers.dtype
        padding = self._resolved_padding(id_dtype, self.padding_identifier, "padding_identifier")
        if exclude is None:
            scores, positions = self._top_k(queries, k)  # at most k columns
        else:
            exclude = self._checked_exclude(exclude, id_dtype, queries)
            scores, positions, valid = self._top_k_excluding(queries, k, exclude)
            masked = tf.where(valid, scores, tf.constant(-np.inf, tf.float32))
            scores, order = tf.math.top_k(masked, k=tf.minimum(k, tf.shape(masked)[1]))
            positions = tf.where(tf.gather(valid, order, batch_dims=1),
                                 tf.gather(positions, order, batch_dims=1), tf.constant(-1, positions.dtype))

        # Pad to exactly k columns so a signature's output shape does not depend on the data.
        # Every op here runs on every query, so the tail is kept short: one pad per output, the
        # identifier lookup, and the masking of empty slots.
        missing = k - tf.shape(scores)[1]
        positions = tf.pad(positions, [[0, 0], [0, missing]], constant_values=-1)
        valid = positions >= 0
        scores = tf.where(valid, tf.pad(scores, [[0, 0], [0, missing]]), tf.constant(-np.inf, tf.float32))
        identifiers = tf.where(valid, tf.gather(self.identifiers, tf.maximum(positions, 0)),
                               tf.constant(padding, id_dtype))
        if static_k is not None:
            scores.set_shape([queries.shape[0], static_k])
            identifiers.set_shape([queries.shape[0], static_k])
        return scores, identifiers

    def _top_k_excluding(self, queries: tf.Tensor, k: tf.Tensor,
                         exclude: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Best-first (scores, positions, valid) from which the caller keeps the k best valid.

        Over-fetches so that k results remain after removing up to E excluded ones; ``valid`` is
        False at empty slots and excluded candidates.
        """
        scores, positions = self._top_k(queries, k + tf.shape(exclude)[1])
        return scores, positions, tf.logical_and(positions >= 0, tf.logical_not(self._excluded(positions, exclude)))

    def _excluded(self, positions: tf.Tensor, exclude: tf.Tensor) -> tf.Tensor:
        """bool [B, m]: whether the candidate at each position is in its row's ``exclude`` [B, E]
        (``exclude_padding`` entries match nothing)."""
        id_dtype = self.identifiers.dtype
        identifiers = tf.gather(self.identifiers, tf.maximum(positions, 0))
        ignored = self._resolved_padding(id_dtype, self._exclude_padding_or_default(), "exclude_padding")
        if id_dtype != tf.string:
            # A binary search in each sorted row: memory B * m, where comparing every pair takes
            # B * m * E (gigabytes for a batch of histories thousands of items long). The extra
            # padding column keeps a row with E = 0 searchable; padding never matches.
            # The same column on the candidates keeps an empty batch searchable: searchsorted
            # cannot reshape a [0, 0] tensor, which is what a kind's top-k returns for no rows.
            padding_column = tf.fill([tf.shape(exclude)[0], 1], tf.constant(ignored, id_dtype))
            sorted_exclude = tf.sort(tf.concat([exclude, padding_column], axis=1), axis=1)
            candidates = tf.concat([identifiers, padding_column], axis=1)
            slots = tf.searchsorted(sorted_exclude, candidates, side="left")
            found = tf.gather(sorted_exclude, tf.minimum(slots, tf.shape(sorted_exclude)[1] - 1), batch_dims=1)
            return tf.logical_and(tf.equal(found, candidates), tf.not_equal(candidates, ignored))[:, :-1]
        real_exclusions = tf.not_equal(exclude, ignored)[:, tf.newaxis, :]
        matches = tf.equal(identifiers[:, :, tf.newaxis], exclude[:, tf.newaxis, :])
        return tf.reduce_any(tf.logical_and(matches, real_exclusions), axis=-1)

    @abc.abstractmethod
    def is_exact(self) -> bool:
        """Whether results equal an exhaustive dot-product search (up to float rounding; among
        candidates with equal scores, which come first, and which make the cut at k, may differ
        by kind: a partitioned index meets them in partition order, not in row order).

        Returns:
          True for exact kinds and for approximate kinds configured to search everything.
        """

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def _index(self, candidates: tf.Tensor) -> Callable[[], None]:
        """Builds the kind's state from float32 [N, d] candidates (eagerly), leaving the index
        as it is, and returns the function that stores it.

        ``index()`` runs that function in a short write that no query overlaps, so the slow part
        (k-means, ScaNN's training) goes here and queries answer from the old state meanwhile.
        """

    @abc.abstractmethod
    def _top_k(self, queries: tf.Tensor, k: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """Best-first (scores float32 [B, m], positions int32 [B, m]) with m <= k.

        Positions index the rows given to ``index()``; -1 marks an empty slot (its score is
        ignored). ``k`` is a scalar int32 tensor that may exceed the number of candidates.
        """

    # ------------------------------------------------------------------ helpers
    def _require_eager(self, method: str) -> None:
        """Raises RuntimeError inside ``tf.function``: building an index makes variables."""
        if not tf.executing_eagerly():
            raise RuntimeError(
                f"{type(self).__name__}.{method} builds variables and must run eagerly; call it "
                "outside tf.function"
            )

    def _finiteness_check(self, queries: tf.Tensor) -> tf.Operation:
        """The assertion that every query row is finite (XLA drops it, as it drops every Assert).

        A NaN query scored NaN against every candidate and came back as a top-k of the first
        identifiers; in the inverted index NaN scores pushed real results out.
        """
        finite_rows = tf.reduce_all(tf.math.is_finite(queries), axis=1)
        return tf.debugging.Assert(tf.reduce_all(finite_rows), [
            "queries must be finite (no NaN or inf); first row that is not (from 0):",
            tf.where(tf.logical_not(finite_rows))[:1, 0]])

    @staticmethod
    def _checked_candidates(candidates: TensorLike) -> tf.Tensor:
        """Validates float [N, d] candidates (N, d >= 1); returns them as float32."""
        candidates = tf.convert_to_tensor(candidates)
        if not candidates.dtype.is_floating:
            raise TypeError(f"candidates must be a float tensor, got dtype {candidates.dtype.name}")
        candidates = tf.cast(candidates, tf.float32)
        if candidates.shape.rank != 2:
            raise ValueError(f"candidates must be a [N, d] matrix, got shape {candidates.shape}")
        if int(candidates.shape[0]) < 1:
            raise ValueError(f"candidates must hold at least one row, got shape {candidates.shape}")
        if int(candidates.shape[1]) < 1:
            raise ValueError(
                f"candidates must have at least one column, got shape {candidates.shape}"
            )
        finite = tf.math.is_finite(candidates)
        if not bool(tf.reduce_all(finite)):
            # A NaN ranks first in every brute-force search, makes k-means build one partition
            # (silently exhaustive) and aborts ScaNN's C++ training with the process.
            row, column = (int(value) for value in tf.where(tf.logical_not(finite))[0])
            raise ValueError(f"candidates must be finite; row {row} holds {float(candidates[row, column])} "
                             f"in column {column}")
        # Finite, but with squared norms beyond float32: k-means' distances overflowed to NaN
        # (one partition, silently exhaustive) and ScaNN's training aborted the process.
        squared_norms = tf.reduce_sum(tf.square(tf.cast(candidates, tf.float64)), axis=1)
        largest = int(tf.argmax(squared_norms))
        if float(squared_norms[largest]) > _FLOAT32_MAX:
            raise ValueError(f"candidates are too large: row {largest} has norm {float(squared_norms[largest]) ** 0.5:.3g}, "
                             f"whose square overflows float32 (above {_FLOAT32_MAX ** 0.5:.3g}); scale the embeddings")
        return candidates

    def _checked_identifiers(
        self, identifiers: Optional[TensorLike], num_candidates: int
    ) -> tf.Tensor:
        """Validates [N] identifiers (default ``0..N-1``); integers become int64.

        Also checks that the configured padding values suit the identifiers' dtype, failing
        early rather than inside a serving call, and that an indexed index keeps its dtype.
        """
        if identifiers is None:
            identifiers = tf.range(num_candidates, dtype=tf.int64)
        identifiers = tf.convert_to_tensor(identifiers)
        if identifiers.dtype == tf.uint64 and tf.executing_eagerly():
            values = identifiers.numpy().ravel()
            too_large = values[values > np.iinfo(np.int64).max]
            if too_large.size:
                # The cast would wrap it to a negative id, returned in its place.
                raise ValueError(f"identifiers are stored as int64; {int(too_large[0])} does not fit "
                                 f"(largest {np.iinfo(np.int64).max})")
        if identifiers.dtype.is_integer:
            identifiers = tf.cast(identifiers, tf.int64)
        elif identifiers.dtype != tf.string:
            raise TypeError(
                f"identifiers must be integers or strings, got dtype {identifiers.dtype.name}"
            )
        if isinstance(self.identifiers, tf.Variable) and self.identifiers.dtype != identifiers.dtype:
            # Another dtype needs another variable, and functions traced before (SavedModels
            # too) would go on reading the old one: old identifiers for new positions, silently.
            raise TypeError(f"identifiers are {identifiers.dtype.name} but this index holds "
                            f"{self.identifiers.dtype.name} ones; make a new index for identifiers of another dtype")
        if identifiers.shape.rank != 1 or int(identifiers.shape[0]) != num_candidates:
            raise ValueError(
                f"identifiers must be a vector with one entry per candidate ([{num_candidates}]), "
                f"got shape {identifiers.shape}"
            )
        for name, configured in (("padding_identifier", self.padding_identifier),
                                 ("exclude_padding", self._exclude_padding_or_default())):
            padding = self._resolved_padding(identifiers.dtype, configured, name)
            if bool(tf.reduce_any(tf.equal(identifiers, padding))):
                # Returned, it would read as an empty slot; excluded, it could never be.
                raise ValueError(f"identifier {padding!r} is also the {name}; give the index another "
                                 f"{name} (a value no candidate has)")
        if identifiers.shape[0]:
            unique, _, counts = tf.unique_with_counts(identifiers)
            if int(tf.reduce_max(counts)) > 1:
                # An exclusion over-fetches one row per excluded id; a repeated id would take more
                # rows and leave empty slots, and a top-k listing one item twice is no top-k.
                repeated = unique[int(tf.argmax(counts))].numpy()
                repeated = repeated.decode() if isinstance(repeated, bytes) else repeated.item()
                raise ValueError(f"identifiers must be unique; {repeated!r} appears "
                                 f"{int(tf.reduce_max(counts))} times")
        return identifiers

    def _exclude_padding_or_default(self) -> Optional[Identifier]:
        """``exclude_padding``, defaulting to ``padding_identifier`` as documented."""
        return self.padding_identifier if self.exclude_padding is None else self.exclude_padding

    def _set_catalogue(self, identifiers: tf.Tensor, num_candidates: int, dimension: Optional[int]) -> None:
        """Stores checked identifiers and the catalogue shape once the kind's state is built."""
        self.identifiers = self._assign_state("identifiers", identifiers)
        self.num_candidates = num_candidates
        self.dimension = dimension
        self._awaiting_catalogue = False

    @staticmethod
    def _dataset_is_pair(dataset: tf.data.Dataset) -> bool:
        """True for ``(identifiers, embeddings)`` elements, False for plain embeddings.

        Raises:
          ValueError: For other elements, or embeddings that are not batched [n, d].
        """
        spec = dataset.element_spec
        is_pair = isinstance(spec, tuple) and len(spec) == 2
        if not (is_pair or isinstance(spec, tf.TensorSpec)):
            raise ValueError(
                "the dataset must yield embeddings or (identifiers, embeddings) tuples, got "
                f"elements {spec}"
            )
        embedding_spec = spec[1] if is_pair else spec
        if embedding_spec.shape.rank != 2:
            # Concatenating unbatched [d] rows would flatten the catalogue into one vector.
            raise ValueError(f"the candidate dataset must yield batches of [n, d] embeddings"
                             f"{' with [n] identifiers' if is_pair else ''}, got elements of shape "
                             f"{embedding_spec.shape}; call .batch(...) on it first")
        return is_pair

    def _assign_states(self, state: dict) -> None:
        """Stores each {name: value} of ``state`` with ``_assign_state``, in that order (the order
        of first creation is the order of the Keras weights)."""
        for name, value in state.items():
            self._assign_state(name, value)

    def _assign_state(self, name: str, value: TensorLike) -> tf.Variable:
        """Stores ``value`` in the non-trainable variable attribute ``name``.

        Variables have unknown dimensions (known rank) so that re-indexing with another size
        assigns in place: functions traced before keep reading the same variables. A new
        variable is made only on first use or when dtype or rank change.
        """
        value = tf.convert_to_tensor(value)
        existing = getattr(self, name, None)
        if (
            isinstance(existing, tf.Variable)
            and existing.dtype == value.dtype
            and existing.shape.rank == value.shape.rank
        ):
            existing.assign(value)
            return existing
        # Under the index's name: a soft search and the index it wraps both hold "identifiers",
        # and an .h5 weight file keeps one dataset per variable name ("name already exists").
        with tf.name_scope(self.name):
            variable = tf.Variable(
                value, trainable=False, shape=tf.TensorShape([None] * value.shape.rank), name=name
            )
        setattr(self, name, variable)
        return variable

    def _checked_k(self, k: Optional[Union[int, tf.Tensor]]) -> Tuple[Optional[int], tf.Tensor]:
        """Validates k; returns (its Python value if static, else None; k as int32 scalar)."""
        if k is None:
            k = self.k
        if is_integer(k):
            self._raise_if_bad_k(int(k))
            return int(k), tf.constant(int(k), tf.int32)
        k = tf.convert_to_tensor(k)
        if not k.dtype.is_integer:
            raise TypeError(f"k must be an integer, got dtype {k.dtype.name}")
        if k.shape.rank != 0:
            raise ValueError(f"k must be a scalar, got shape {k.shape}")
        k = tf.cast(k, tf.int32)
        static = tf.get_static_value(k)
        if static is not None:
            self._raise_if_bad_k(int(static))
            return int(static), k
        check = tf.debugging.Assert(
            tf.logical_and(k >= 1, k <= self.k_max),
            [f"k must be in [1, k_max={self.k_max}], got k =", k],
        )
        with tf.control_dependencies([check]):
            return None, tf.identity(k)

    def _raise_if_bad_k(self, k: int) -> None:
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k must be in [1, k_max={self.k_max}], got k = {k}")

    def _checked_exclude(
        self, exclude: TensorLike, id_dtype: tf.DType, queries: tf.Tensor
    ) -> tf.Tensor:
        """Validates exclude ([B, E], the index's identifier dtype); integers become int64."""
        exclude = tf.convert_to_tensor(exclude)
        kind = "string" if id_dtype == tf.string else "integer"
        if (kind == "string") != (exclude.dtype == tf.string) or not (
            exclude.dtype == tf.string or exclude.dtype.is_integer
        ):
            raise TypeError(
                f"exclude must hold {kind} identifiers like the index, got dtype {exclude.dtype.name}"
            )
        if kind == "integer":
            exclude = tf.cast(exclude, tf.int64)
        if exclude.shape.rank != 2:
            raise ValueError(f"exclude must be a [B, E] matrix, got shape {exclude.shape}")
        rows, batch = exclude.shape[0], queries.shape[0]
        if rows is not None and batch is not None and rows != batch:
            raise ValueError(f"exclude has {rows} rows but there are {batch} queries")
        check = tf.debugging.assert_equal(
            tf.shape(exclude)[0],
            tf.shape(queries)[0],
            message="exclude must have one row per query",
        )
        with tf.control_dependencies([check]):
            return tf.identity(exclude)

    @staticmethod
    def _resolved_padding(dtype: tf.DType, value: Optional[Identifier], name: str) -> Identifier:
        """The padding value for identifiers of ``dtype``: the configured one or the default."""
        if dtype == tf.string:
            if value is None:
                return _DEFAULT_STRING_PADDING
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string for string identifiers, got {value!r}")
            return value
        if value is None:
            return _DEFAULT_INT_PADDING
        if not is_integer(value):
            raise TypeError(f"{name} must be an integer for integer identifiers, got {value!r}")
        return int(value)

    # ------------------------------------------------------------------ .keras files
    def _raise_unless_indexed(self) -> None:
        if self.identifiers is None:
            raise ValueError(f"{type(self).__name__}.index() must be called before querying it")
        if self._awaiting_catalogue and tf.executing_eagerly() and int(tf.size(self.identifiers)) == 0:
            raise ValueError(f"{type(self).__name__} was rebuilt from its config alone: call index(), or load "
                             "the model's weights, which hold its catalogue")

    def _state_variables(self) -> dict:
        """{name: variable} of the index state (what ``index()`` made), in Keras' weight order.

        get_weights, set_weights and .h5 weight files go by that position, and ``get_config``
        hands this order to ``from_config``, which makes the state in it: a rebuilt index takes
        weights copied from the original (it once made them in name order, and took another
        variable's value), and .h5 files written before still load.
        """
        names = {id(value): name for name, value in vars(self).items() if isinstance(value, tf.Variable)}
        return {names[id(weight)]: weight for weight in self.non_trainable_weights if id(weight) in names}

    @classmethod
    def from_config(cls, config: dict) -> "RetrievalIndex":
        config = dict(config)
        state = config.pop("state", None)
        index = cls(**config)
        index._expect_state(state)
        return index

    def _expect_state(self, state: Optional[dict]) -> None:
        """Empty state variables of the saved index's dtypes and ranks.

        Keras rebuilds a model from its config by calling each layer before it loads the
        weights (``load_own_variables``, which fills these), and an index's call needs its state
        variables to exist; an eager call before they are filled raises.
        """
        for name, (dtype, rank) in (state or {}).items():
            self._assign_state(name, tf.zeros([0] * rank, dtype))
        self._awaiting_catalogue = bool(state)

    def save_own_variables(self, store) -> None:
        """Writes the index into a ``.keras`` file's weight store.

        Keras' own version writes the layer's variables by position and reloads them into the
        variables a layer rebuilt from its config has: an index has none until ``index()``
        (their sizes are the catalogue's), so its catalogue was lost. Here every state variable
        is stored by name, with the Python values that go with it (``_saved_attributes``).
        """
        if self.identifiers is None:
            return
        names = list(self._state_variables())
        metadata = {"state": names, "dtypes": {name: getattr(self, name).dtype.name for name in names},
                    **{name: getattr(self, name) for name in self._saved_attributes()}}
        text = json.dumps(metadata, default=lambda value: value.item())  # NumPy scalars
        store["metadata.json"] = np.frombuffer(text.encode("utf-8"), np.uint8)
        for name in names:
            value = getattr(self, name).numpy()
            if value.dtype == object:  # strings: HDF5 holds no Python objects, nor bytes with NULs
                pieces = [bytes(piece) for piece in value.ravel()]
                store[f"{name}.bytes"] = np.frombuffer(b"".join(pieces), np.uint8)
                store[f"{name}.ends"] = np.cumsum([len(piece) for piece in pieces], dtype=np.int64)
                store[f"{name}.shape"] = np.asarray(value.shape, np.int64)
            elif value.dtype == tf.bfloat16.as_numpy_dtype:  # HDF5 would keep it as opaque bytes
                store[name] = value.view(np.uint16)
            else:
                store[name] = value

    def load_own_variables(self, store) -> None:
        """Restores what :meth:`save_own_variables` wrote (nothing, if the index was empty)."""
        if "metadata.json" not in store:
            return
        metadata = json.loads(bytes(np.asarray(store["metadata.json"])).decode("utf-8"))
        dtypes = metadata.pop("dtypes")
        for name in metadata.pop("state"):
            if name in store:
                value = np.asarray(store[name])
                if dtypes[name] == "bfloat16":
                    value = value.view(tf.bfloat16.as_numpy_dtype)
            else:
                data, ends = bytes(np.asarray(store[f"{name}.bytes"])), np.asarray(store[f"{name}.ends"])
                starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
                value = np.array([data[start:end] for start, end in zip(starts, ends)], dtype=object)
                value = value.reshape(tuple(np.asarray(store[f"{name}.shape"])))
            self._assign_state(name, value)
        for name, value in metadata.items():
            setattr(self, name, value)
        self._awaiting_catalogue = False

    def _saved_attributes(self) -> tuple:
        """Python attributes that ``index()`` sets beside the variables (JSON values)."""
        return ("num_candidates", "dimension")

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle, as Keras does for its own lock: a lock cannot be copied.
        state = super().__getstate__()
        state.pop("_state_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state["_state_lock"] = threading.RLock()
        super().__setstate__(state)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            k_max=self.k_max,
            k=self.k,
            padding_identifier=self.padding_identifier,
            exclude_padding=self.exclude_padding,
        )
        if self.identifiers is not None:  # the state's dtypes and ranks, not its values
            config["state"] = {name: [variable.dtype.name, variable.shape.rank]
                               for name, variable in self._state_variables().items()}
        return config


class _WriteCounter(tf.Module):
    """The number of writes of an index's state begun and ended: odd while one is under way.

    A module of the index, so SavedModels carry it (their functions read it), but not a Keras
    weight: get_weights, set_weights and .h5 weight files go by position, and one weight more
    would make files written before fail to load.
    """

    def __init__(self):
        super().__init__()
        self.count = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="write_count")

    # Keras lists the variables of a layer's modules among its weights.
    @property
    def variables(self) -> tuple:
        return ()

    trainable_variables = non_trainable_variables = variables


def _plain_identifier(value, name: str) -> Optional[Identifier]:
    """Normalises a configured identifier to None, int or str (bytes decoded) for get_config."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    if is_integer(value):
        return int(value)
    raise TypeError(f"{name} must be an integer or a string, got {value!r}")
