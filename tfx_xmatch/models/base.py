"""RetrievalModel: the TFRS base model of every tfx_xmatch model: a train step that is right under
tf.distribute, and the hyperparameters and item-side layers all models share."""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfx_xmatch import arguments
from tfx_xmatch.data.dataset import check_user_feature_names
from tfx_xmatch.models.history_encoding import check_index_dtype, target_frequencies


@contextlib.contextmanager
def light_global_policy(dtype: str):
    """Makes ``dtype`` the global dtype policy while TFRS' ``Retrieval`` task is created and
    called: it takes no ``dtype`` argument and makes its logQ and accidental-hit layers at each
    call, and Keras gives a layer the global policy; under ``mixed_float16`` the task cast its
    queries to float16 and not its candidates."""
    previous = tf.keras.mixed_precision.global_policy()
    if previous.compute_dtype == dtype:
        # Nothing to change, and nothing set: an unset global policy stays unset (it follows
        # tf.keras.backend.floatx(), which restoring its float32 value would pin).
        yield
        return
    tf.keras.mixed_precision.set_global_policy(dtype)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


class RetrievalModel(tfrs.models.Model):
    """``tfrs.models.Model`` whose gradient is the same with one replica or many.

    Keras optimizers sum the gradients of all replicas (``MirroredStrategy``,
    ``MultiWorkerMirroredStrategy``), and TFRS' ``train_step`` differentiates the per-replica
    mean loss as is, so N replicas would apply N times the mean gradient (an N-fold learning
    rate). Here each replica's loss is weighed by its share of the batch's rows (1 / replicas
    for an even split), so the sum is the gradient of the batch's mean; a replica left with no
    rows by a short last batch weighs 0 (``_never_empty``).

    The reported ``loss``, ``regularization_loss`` and ``total_loss`` (of ``fit`` and
    ``evaluate``) are Keras ``Mean`` metrics, as in a model compiled with a Keras loss: the
    running mean over the epoch's steps and replicas weighed by their rows, whatever the number
    of replicas. TFRS' steps return the raw per-replica values instead, which Keras sums over
    replicas (its "auto" reduction outside TPUs): N replicas showed N times the loss. Subclasses
    implement ``compute_loss`` as for TFRS, and log their loss terms with ``track``.

    Mixed precision (``tf.keras.mixed_precision.set_global_policy("mixed_float16")``, or a
    model's own ``dtype="mixed_float16"``): the compute-heavy sublayers (sequence encoders,
    attention, the interaction network, the denoiser) take the model's policy and run in
    float16; the item tower, embeddings, quantizers, projections and the model's own weights
    stay in float32 (``light_layer_dtype``), and so does what the model returns (user and item
    vectors, scores, losses), which is what an index and a softmax need. ``compile`` wraps the
    optimizer in a ``LossScaleOptimizer`` and the train step scales the loss.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # The step's row weight (see _weighing_logs_by) is a tensor of the graph being traced, so
        # it is kept per thread: a call from another thread during fit (an in-process server
        # answering from the model in training) read it and failed ("Tensor ... is out of scope").
        # object.__setattr__: not state Keras should track or save.
        object.__setattr__(self, "_traced_step", threading.local())
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.regularization_loss_tracker = tf.keras.metrics.Mean(name="regularization_loss")
        self.total_loss_tracker = tf.keras.metrics.Mean(name="total_loss")

    @property
    def light_layer_dtype(self) -> str:
        """The dtype of the sublayers and weights kept out of a mixed policy's float16: the
        policy's variable dtype (float32 under ``mixed_float16``)."""
        return self.dtype_policy.variable_dtype

    def full_precision(self, tensor: tf.Tensor) -> tf.Tensor:
        """A compute-heavy sublayer's output cast back to ``light_layer_dtype``."""
        return tf.cast(tensor, self.light_layer_dtype)

    def build_all_variables(self) -> None:
        """Creates every variable with inference calls on one padded history.

        ``self(...)`` marks the model built and records the input spec that ``save`` needs
        (BackupAndRestore skips unbuilt models, silently losing resumption); ``score_all`` also
        builds what only scoring uses. ``fit`` and ``evaluate`` call it first on a model never
        called: their steps compute the loss without ``__call__``, so Keras would otherwise
        refuse ``model.save`` (and a full-model ``ModelCheckpoint``) after training.
        """
        inputs = {"history": tf.zeros((1, self.max_length), tf.int32)}
        for name in self.user_feature_cardinalities:
            inputs[name] = tf.zeros((1,), tf.int32)
        self(inputs)
        self.score_all(inputs)

    def _build_if_never_called(self) -> None:
        if self.save_spec() is None:
            with self.distribute_strategy.scope():
                self.build_all_variables()

    def fit(self, *args, **kwargs):
        # Here, not at the export after training; not in the constructor either, so that a run
        # saved before names were checked still loads, evaluates and warm-starts.
        check_user_feature_names(self.user_feature_cardinalities)
        self._build_if_never_called()
        self._build_optimizer_slots()
        with self._dropped_if_first_trace_fails("train_function"):
            return super().fit(*args, **kwargs)

    def _build_optimizer_slots(self) -> None:
        """Creates the optimizer's variables (Adam's moments) before fit traces its step.

        A tf.function whose first trace creates variables is traced a second time to run: left
        to the first step, the slots made every first fit trace the whole train step twice (a
        tiny model's first one-epoch fit: TwoTower 3.0 s -> 2.4 s, SPARC 6.6 s -> 4.5 s).
        Skipped while a sublayer is unbuilt (a subclass's loss-only head, built by the step
        itself): slots made now would not know its variables. A built optimizer's ``build`` does
        nothing; legacy optimizers build their slots their own way.
        """
        optimizer = getattr(self, "optimizer", None)
        if not isinstance(optimizer, tf.keras.optimizers.Optimizer):
            return
        if any(isinstance(layer, tf.keras.layers.Layer) and not layer.built for layer in self.submodules):
            return
        with self.distribute_strategy.scope():
            optimizer.build(self.trainable_variables)

    def evaluate(self, *args, **kwargs):
        self._build_if_never_called()
        with self._dropped_if_first_trace_fails("test_function"):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._dropped_if_first_trace_fails("predict_function"):
            return super().predict(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        with self._dropped_if_first_trace_fails("train_function"):
            return super().train_on_batch(*args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        with self._dropped_if_first_trace_fails("test_function"):
            return super().test_on_batch(*args, **kwargs)

    def predict_on_batch(self, *args, **kwargs):
        with self._dropped_if_first_trace_fails("predict_function"):
            return super().predict_on_batch(*args, **kwargs)

    @contextlib.contextmanager
    def _dropped_if_first_trace_fails(self, name: str):
        """Forgets the Keras step function that this call made if the call fails. Keras keeps it,
        half traced: after a refused first fit (a string history, sample weights) the corrected
        one failed with "Creating variables on a non-first call to a function decorated with
        tf.function". Keras also keeps a failed fit's validation data (it drops it only when fit
        ends normally), so the next fit validated on it, or was refused again for it."""
        made_here = getattr(self, name, None) is None
        try:
            yield
        except BaseException:
            if made_here:
                setattr(self, name, None)
            if name == "train_function" and getattr(self, "_eval_data_handler", None) is not None:
                self._eval_data_handler = None
            raise

    def save(self, *args, **kwargs):
        # A model used only through score_all / user_embedding was never called: Keras refused
        # the SavedModel ("the input shape is not available") and wrote a .keras file that
        # did not load ("expected 0 variables, but received 1").
        self._build_if_never_called()
        return super().save(*args, **kwargs)

    def train_step(self, inputs):
        inputs, rows = self._never_empty(inputs)
        share = self._share_of_the_batch(rows)
        with self._weighing_logs_by(rows), tf.GradientTape() as tape:
            loss = tf.cast(self.compute_loss(inputs, training=True), tf.float32)
            regularization_loss = self._regularization_loss()
            total_loss = loss + regularization_loss
            scaled = total_loss * share
        # minimize, not tape.gradient + apply_gradients: under a mixed_float16 policy compile wraps
        # the optimizer in a LossScaleOptimizer, whose minimize scales the loss before
        # differentiating (float16 gradients would underflow to zero) and unscales after.
        self.optimizer.minimize(scaled, self.trainable_variables, tape=tape)
        return self._step_logs(loss, regularization_loss, rows)

    def test_step(self, inputs):
        inputs, rows = self._never_empty(inputs)
        with self._weighing_logs_by(rows):
            loss = tf.cast(self.compute_loss(inputs, training=False), tf.float32)
        logs = self._step_logs(loss, self._regularization_loss(), rows)
        # What only a training step measures (the quantizers' dead codes) is left out of
        # evaluate() and the val_ logs rather than reported as an unmeasured 0.
        training_only = self._training_only_metric_names()
        return {name: value for name, value in logs.items() if name not in training_only}

    def _training_only_metric_names(self) -> set:
        return {metric.name for metric in self.metrics if getattr(metric, "training_only", False)}

    @property
    def metrics_names(self) -> list:
        """The metrics' names, those only a training step measures (dead codes) last.

        ``evaluate(return_dict=False)`` leaves those out, and Keras lists its values in this
        order: ``dict(zip(model.metrics_names, model.evaluate(data)))`` pairs every value with
        its own name (in the middle of the list, the dead codes' name took the next metric's
        value), and ``train_on_batch`` lists them all in this order.
        """
        names = super().metrics_names
        training_only = self._training_only_metric_names()
        return [name for name in names if name not in training_only] + [name for name in names if name in training_only]

    @contextlib.contextmanager
    def _weighing_logs_by(self, rows: tf.Tensor):
        """Within the step, ``track`` weighs what the models log by the step's rows."""
        self._traced_step.log_weight = tf.cast(rows, tf.float32)
        try:
            yield
        finally:
            self._traced_step.log_weight = None

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle: a threading.local cannot be copied (as the index's lock).
        state = super().__getstate__()
        state.pop("_traced_step", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state["_traced_step"] = threading.local()
        super().__setstate__(state)

    def _step_log_weight(self) -> Optional[tf.Tensor]:
        """The row weight of the step this thread is tracing, None outside one."""
        return getattr(self._traced_step, "log_weight", None)

    def step_has_rows(self) -> Optional[tf.Tensor]:
        """Within ``fit`` / ``evaluate``: a scalar bool, False when this replica scores only the
        placeholder row of an empty batch. The models hand it to their quantizers as
        ``vector_mask``, so the placeholder moves no codebook and no usage metric. None outside a
        step, and in every thread but the one tracing the step."""
        weight = self._step_log_weight()
        return None if weight is None else weight > 0

    def track(self, tracker: tf.keras.metrics.Metric, value: tf.Tensor) -> None:
        """Logs ``value`` (a loss term, a rate) in ``tracker``, weighed like ``loss``: by the
        step's rows inside ``fit`` / ``evaluate`` (a placeholder row for an empty replica weighs
        nothing), by 1 when ``compute_loss`` is called on its own."""
        weight = self._step_log_weight()
        if weight is None:
            tracker.update_state(value)
        else:
            tracker.update_state(value, sample_weight=weight)

    @staticmethod
    def _never_empty(inputs):
        """(inputs, their number of rows), a batch of no rows replaced by one placeholder row.

        Under a distribution strategy a last batch smaller than the number of replicas leaves
        some replica with no rows, and every loss is a mean over nothing there (a ``model.fit``
        of a dataset whose size is not a multiple of the batch failed at its last step). That
        replica scores one row (history and target: item 1) whose loss counts for nothing: its
        share of the batch and its weight in the logged means are 0, and the quantizers leave
        it out of their state and metrics (``step_has_rows``). A batch of a known, non-zero size
        is returned as it is.
        """
        if isinstance(inputs, (tuple, list)):  # Keras packs `x` alone as (x,) or with y and weights
            if len(inputs) > 2 and inputs[2] is not None:
                # The losses weigh every target position alike, as TFRS's do: the weights were
                # dropped with y, and a run weighted by zeros trained as fully as an unweighted one.
                raise ValueError("sample_weight (or class_weight, which Keras turns into sample weights) is not "
                                 "supported: the retrieval losses weigh every target position alike; drop it, or "
                                 "repeat or subsample examples to weigh them")
            inputs = inputs[0]
        for name in ("history", "next_items"):
            if name in inputs:  # a string history failed in the placeholder below, naming nothing
                check_index_dtype(name, inputs[name])
        rows = tf.shape(inputs["history"])[0]
        shape = tf.TensorShape(getattr(inputs["history"], "shape", None))
        if shape.rank and shape[0]:  # drop_remainder batches keep their static shape
            return inputs, rows

        def placeholder(name, value):
            value = tf.convert_to_tensor(value)
            row = tf.fill(tf.concat([[1], tf.shape(value)[1:]], 0), tf.zeros([], value.dtype))
            if name in ("history", "next_items"):
                row = tf.concat([row[:, :-1], tf.ones_like(row[:, -1:])], 1)
            return tf.cond(rows > 0, lambda: value, lambda: row)

        return {name: placeholder(name, value) for name, value in inputs.items()}, rows

    @staticmethod
    def _share_of_the_batch(rows: tf.Tensor) -> tf.Tensor:
        """This replica's rows over all replicas' rows (1 without a strategy).

        Keras optimizers sum the replicas' gradients; weighing each replica's mean loss by its
        share of the global batch's rows makes the sum the gradient of the mean over the batch
        (exactly when rows hold equal numbers of targets), whatever the split (it was
        1 / replicas each, which gave an empty replica a full vote).
        """
        rows = tf.cast(rows, tf.float32)
        context = tf.distribute.get_replica_context()
        total = rows if context is None else context.all_reduce(tf.distribute.ReduceOp.SUM, rows)
        return tf.math.divide_no_nan(rows, total)

    def _regularization_loss(self) -> tf.Tensor:
        return tf.reduce_sum([tf.reduce_sum(tf.cast(term, tf.float32)) for term in self.losses])

    def _step_logs(self, loss: tf.Tensor, regularization_loss: tf.Tensor, rows: tf.Tensor) -> dict:
        # Weighed by rows, as Keras weighs a compiled loss by the batch size: a short last batch
        # (or replica) counts for what it holds, an empty one for nothing.
        weight = tf.cast(rows, tf.float32)
        self.loss_tracker.update_state(loss, sample_weight=weight)
        self.regularization_loss_tracker.update_state(regularization_loss, sample_weight=weight)
        self.total_loss_tracker.update_state(loss + regularization_loss, sample_weight=weight)
        return {metric.name: metric.result() for metric in self.metrics}

    # ---------------------------------------------------------------- what every model shares
    # The hyperparameters every model takes (a config's model.* fields) and its item side: the
    # item tower, the history encoder, user-feature embeddings and the logQ item frequencies.
    SHARED_CONFIG = ("num_items", "embedding_dim", "user_tower", "max_length", "num_blocks", "num_heads", "dropout",
                     "loss", "temperature", "num_sampled_negatives", "max_loss_positions", "item_feature_dims",
                     "user_feature_cardinalities", "item_hidden_units", "l2")

    def _set_shared_hyperparameters(self, *, num_items, embedding_dim, user_tower, max_length, num_blocks, num_heads,
                                    dropout, loss, temperature, num_sampled_negatives, max_loss_positions,
                                    item_feature_dims, user_feature_cardinalities, item_hidden_units, l2) -> None:
        """Checks the shared hyperparameters and stores them as plain Python values (what
        ``get_config`` returns).

        Raises:
          ValueError: Naming the first invalid one, with its value. Checked here, under the
            model's own argument names, before any sublayer sees them.
        """
        self.num_items = arguments.integer("num_items", num_items, 1)
        # One dimension trained without an error, but ranks every user's items in one of two
        # orders, and the encoders' LayerNormalization over one feature outputs its bias whatever
        # the history: a user vector that ignores the user.
        self.embedding_dim = arguments.integer("embedding_dim", embedding_dim, 2)
        self.user_tower = user_tower
        self.max_length = arguments.integer("max_length", max_length, 1)
        self.num_blocks = arguments.integer("num_blocks", num_blocks, 1)
        self.num_heads = arguments.integer("num_heads", num_heads, 1)
        self.dropout = arguments.real("dropout", dropout, 0.0, 1.0, high_open=True)
        self.loss_name = loss
        # Zero divides the logits (NaN loss); a negative one silently ranks the worst items first.
        self.temperature = arguments.real("temperature", temperature, 0.0, low_open=True)
        self.num_sampled_negatives = arguments.integer("num_sampled_negatives", num_sampled_negatives, 0)
        self.max_loss_positions = arguments.integer("max_loss_positions", max_loss_positions, 1)
        self.item_feature_dims = {str(k): arguments.integer(f"item_feature_dims[{k!r}]", v, 1)
                                  for k, v in (item_feature_dims or {}).items()}
        self.user_feature_cardinalities = {str(k): arguments.integer(f"user_feature_cardinalities[{k!r}]", v, 1)
                                           for k, v in (user_feature_cardinalities or {}).items()}
        self.item_hidden_units = arguments.widths("item_hidden_units", item_hidden_units)
        self.l2 = arguments.real("l2", l2, 0.0)

    def _build_shared_layers(self, item_feature_tables, sequence_encoder: bool = True) -> None:
        """Creates ``item_tower``, ``encoder`` (``sasrec`` or ``mean``, when ``sequence_encoder``),
        ``user_feature_embeddings`` and the non-trainable ``item_frequency`` (uniform until set)."""
        from tfx_xmatch.layers import ItemTower, MeanPoolingEncoder, SASRecEncoder

        self.item_tower = ItemTower(
            self.num_items, self.embedding_dim, feature_dims=self.item_feature_dims,
            feature_tables=item_feature_tables, hidden_units=self.item_hidden_units, l2=self.l2, name="item_tower",
            dtype=self.light_layer_dtype,
        )
        if sequence_encoder:
            if self.user_tower == "sasrec":
                self.encoder = SASRecEncoder(self.max_length, self.num_blocks, self.num_heads, self.dropout,
                                             name="sasrec_encoder", dtype=self.dtype_policy)
            else:
                self.encoder = MeanPoolingEncoder(name="mean_encoder", dtype=self.dtype_policy)
        self.user_feature_embeddings = {
            name: tf.keras.layers.Embedding(cardinality + 1, self.embedding_dim, name=f"user_{name}_embedding",
                                            dtype=self.light_layer_dtype)
            for name, cardinality in sorted(self.user_feature_cardinalities.items())
        }
        # The probability that an item is a training target (the sampled loss' logQ); a
        # non-trainable weight so that it is saved with the model.
        self.item_frequency = self.add_weight(
            name="item_frequency", shape=(self.num_items + 1,),
            initializer=tf.keras.initializers.Constant(1.0 / self.num_items), trainable=False, autocast=False,
        )

    def _shared_config(self) -> dict:
        # ``loss`` is stored as ``loss_name``: Keras models own a ``loss`` attribute.
        config = {name: getattr(self, "loss_name" if name == "loss" else name) for name in self.SHARED_CONFIG}
        config["name"] = self.name
        # As a Keras layer's config does: a model built with its own dtype="mixed_float16" (or
        # under that global policy) reloads with it, whatever the loading process' global policy.
        config["dtype"] = self.dtype_policy.name
        config["item_feature_dims"] = dict(self.item_feature_dims)
        config["user_feature_cardinalities"] = dict(self.user_feature_cardinalities)
        config["item_hidden_units"] = list(self.item_hidden_units)
        return config

    def _softmax_settings(self) -> dict:
        """The keyword arguments ``dot_product_softmax_loss`` takes from the shared hyperparameters."""
        return dict(num_items=self.num_items, loss=self.loss_name, temperature=self.temperature,
                    num_sampled_negatives=self.num_sampled_negatives,
                    max_loss_positions=self.max_loss_positions, item_frequency=self.item_frequency)

    def set_item_frequencies(self, counts: np.ndarray) -> None:
        """Sets the logQ correction from training counts per item index ([num_items + 1])."""
        self.item_frequency.assign(target_frequencies(counts, self.num_items))

    def item_embeddings(self, item_indices: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Item vectors of ``item_indices``: float [I, d]; default every index, padding row 0 included."""
        if item_indices is None:
            return self.item_tower.all_items()
        return self.item_tower(item_indices)

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)
