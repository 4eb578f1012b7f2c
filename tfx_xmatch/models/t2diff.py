"""T2Diff: a two-tower model whose user tower sees a diffusion-generated next item.

For a user whose most recent item is x_n, the window of the last ``session_length +
history_length`` items (default 10 + 40) is split into the session (the last 10) and the long
history (the 40 before). A diffusion module learns the drift z0 = x_{n+1} - x_n between the next
and the current item embedding (``diffuse="raw"``: the next embedding itself, the ablation):
forward noising with a ``NoiseSchedule`` (exponential beta_s = 0.01 exp(4.5 s / T), T = 50), and
a ``DriftDenoiser`` conditioned on the session that predicts z0 from z_s. The reconstructed next
item x_hat = x_n + z0_hat joins the session in ``MixedAttention`` (self-attention over
[session ; x_hat], pooled, then target attention over the long history), which gives the user
vector; items are scored by dot product with the item tower, so any dense index serves them.

Stop-gradient (``stop_gradient=True``, the paper's decoupling): the diffusion loss sees the item
embeddings and the session only through stop-gradient, so it does not train the towers; the
towers see z0_hat only through stop-gradient, so the retrieval loss does not train the denoiser.

Training: up to ``max_loss_positions`` random history positions t per batch (the window ending
at t) predict the next item, with a softmax over items. The tower sees the one-shot denoised
z0_hat of a random diffusion step, as in the paper; since at small steps that prediction nearly
restates the answer while serving starts from pure noise, a share ``prior_drift_rate`` of the
positions (our addition) gets instead the denoiser's prediction from z_T = 0 at s = T (serving's
first DDIM step). Loss = retrieval + ``diffusion_weight`` (0.1) x MSE(z0_hat, z0); both logged.

Backbone (``backbone="sasrec"``, our addition): the two-tower's SASRec encoder reads the whole
history and its state h_t after the most recent item is the base of the user vector, to which
the mixed-attention vector is added through a zero-initialised projection (training starts from
the two-tower). The backbone also learns the two-tower's own loss, a softmax over items at every
history position (up to ``max_loss_positions`` of them with ``loss="sampled_softmax"``; weight
``backbone_loss_weight``), while the T2Diff branch trains on its
``max_loss_positions`` sampled positions; the diffusion and its stop-gradients are unchanged.
With ``condition_on_backbone`` the denoiser also reads the (stop-gradient) state h_t, as one more
position after the session, so the predicted next item draws on the whole history.
With ``detach_branch`` the branch's retrieval loss trains only the branch (mixed attention and
projection): it sees the backbone state and the item embeddings through stop-gradient, so the
backbone and the item table learn exactly the two-tower's loss and the branch is a learned
correction on top of them, never a pull on the shared representation.

Serving: the reverse process from z_T, by ``sampler``: "ddim" (``sampling_steps`` <= T steps,
``eta`` = 0 is deterministic) or "ddpm" (all T ancestral steps, with noise). DDIM with eta = 0
and ``initial_noise="zeros"`` (the default) has no randomness at all, so a request gets the same
answer whatever batch it is served in; "random" draws z_T. Any sampling with noise is
reproducible with a ``seed``, but a row's draws then depend on its position in the batch.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers import DriftDenoiser, MixedAttention, NoiseSchedule, SASRecEncoder
from tfx_xmatch.layers.mixed_attention import POOLINGS
from tfx_xmatch.layers.noise_schedule import SCHEDULES
from tfx_xmatch.models.base import RetrievalModel
from tfx_xmatch.models.history_encoding import (
    LossDraws, dot_product_softmax_loss, encode_history, frozen_tower, history_indices, last_position_state,
    training_targets, user_feature_values,
)

LOSSES = ("full_softmax", "sampled_softmax")
SAMPLERS = ("ddim", "ddpm")
BACKBONES = ("none", "sasrec")


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class T2Diff(RetrievalModel):
    """Diffusion-based cross-interaction in a two-tower model (T2Diff, arXiv 2502.20687).

    Args:
      num_items: Number of real items (indices 1..num_items; 0 is padding).
      embedding_dim: Width of item and user vectors (int, default 64).
      user_tower: Must be "mixed_attention" (the only T2Diff user tower).
      max_length: Width L of the padded histories the model is fed (int, default 200); the
        model reads the last ``session_length + history_length`` of each window (a warning says
        when that is more than L: the long history then holds fewer items than configured).
      num_blocks: Self-attention blocks over [session ; x_hat] (int, default 1).
      num_heads: Attention heads (int, default 1).
      dropout: Dropout of the attentions (float, default 0.2).
      loss, temperature, num_sampled_negatives, max_loss_positions: Retrieval softmax, as in
        ``SPARC`` (defaults "full_softmax", 1.0, 1024, 4096).
      item_feature_dims, item_feature_tables, user_feature_cardinalities, item_hidden_units, l2:
        Item and user features, as in ``TwoTower`` (user features are added to the user vector).
      session_length: Session items S (int, default 10).
      history_length: Long-history items H before the session (int, default 40).
      diffusion_steps: T (int, default 50).
      schedule: "exponential", "linear" or "cosine" (default "exponential").
      denoiser: "unet" or "mlp" (default "unet").
      denoiser_units: Denoiser widths (default (64, 128)).
      diffuse: "drift" (z0 = x_{n+1} - x_n) or "raw" (z0 = x_{n+1}; the ablation) (default "drift").
      stop_gradient: Decouple the diffusion and retrieval losses (bool, default True).
      diffusion_weight: Weight of the diffusion loss (float >= 0, default 0.1).
      prior_drift_rate: Share of training positions whose tower input is the prediction from
        z_T = 0 at s = T rather than from a noised drift (float in [0, 1], default 0.5).
      sampler: "ddim" or "ddpm" for serving and evaluation (default "ddim").
      sampling_steps: DDIM steps (int in [1, T], default 10).
      eta: DDIM eta (float >= 0, default 0.0: deterministic).
      initial_noise: "zeros" or "random" z_T (default "zeros").
      session_pooling: How ``MixedAttention`` pools [session ; x_hat]: "mean" or "predicted"
        (the output at the x_hat position) (default "mean").
      backbone: "none" (the paper's tower: the mixed-attention vector is the user vector) or
        "sasrec" (the user vector is the SASRec state plus the projected mixed-attention vector)
        (default "none").
      backbone_blocks: Causal self-attention blocks of the SASRec backbone (int, default 2).
      backbone_loss_weight: Weight of the backbone's all-position softmax (float >= 0, default 1.0).
      condition_on_backbone: With a backbone, the denoiser also sees the backbone state h_t
        (through stop-gradient with ``stop_gradient``), as one more position after the session:
        the whole history, not just the last 10 items, informs the predicted next item
        (bool, default False; our addition).
      detach_branch: With a backbone, the T2Diff branch's retrieval loss reaches only the mixed
        attention and its projection, not the backbone encoder or the item table (bool, default
        False; our addition).

    Inputs (a dict): "history" int32 [B, L] left-padded item indices; for training also
    "next_items" int32 [B, L]; one int32 [B] entry per user feature.

    Raises:
      ValueError: on invalid hyperparameters (the message quotes the value).

    Example:
      >>> model = T2Diff(num_items=100, embedding_dim=16, max_length=20, session_length=5,
      ...                history_length=15, denoiser="mlp")
      >>> scores = model.score_all({"history": tf.ones([2, 20], tf.int32)})  # [2, 101]
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        user_tower: str = "mixed_attention",
        max_length: int = 200,
        num_blocks: int = 1,
        num_heads: int = 1,
        dropout: float = 0.2,
        loss: str = "full_softmax",
        temperature: float = 1.0,
        num_sampled_negatives: int = 1024,
        max_loss_positions: int = 4096,
        item_feature_dims: Optional[dict[str, int]] = None,
        item_feature_tables: Optional[dict[str, np.ndarray]] = None,
        user_feature_cardinalities: Optional[dict[str, int]] = None,
        item_hidden_units: Sequence[int] = (),
        l2: float = 0.0,
        session_length: int = 10,
        history_length: int = 40,
        diffusion_steps: int = 50,
        schedule: str = "exponential",
        denoiser: str = "unet",
        denoiser_units: Sequence[int] = (64, 128),
        diffuse: str = "drift",
        stop_gradient: bool = True,
        diffusion_weight: float = 0.1,
        prior_drift_rate: float = 0.5,
        sampler: str = "ddim",
        sampling_steps: int = 10,
        eta: float = 0.0,
        initial_noise: str = "zeros",
        session_pooling: str = "mean",
        backbone: str = "none",
        backbone_blocks: int = 2,
        backbone_loss_weight: float = 1.0,
        condition_on_backbone: bool = False,
        detach_branch: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if user_tower != "mixed_attention":
            raise ValueError(f"T2Diff's user tower is 'mixed_attention', got user_tower={user_tower!r}; "
                             "set model.user_tower: mixed_attention")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if denoiser not in ("unet", "mlp"):
            raise ValueError(f"denoiser must be 'unet' or 'mlp', got {denoiser!r}")
        prior_drift_rate = arguments.real("prior_drift_rate", prior_drift_rate, 0.0, 1.0)
        if diffuse not in ("drift", "raw"):
            raise ValueError(f"diffuse must be 'drift' or 'raw', got {diffuse!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if session_pooling not in POOLINGS:
            raise ValueError(f"session_pooling must be one of {POOLINGS}, got {session_pooling!r}")
        if initial_noise not in ("zeros", "random"):
            raise ValueError(f"initial_noise must be 'zeros' or 'random', got {initial_noise!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        stop_gradient = arguments.boolean("stop_gradient", stop_gradient)
        condition_on_backbone = arguments.boolean("condition_on_backbone", condition_on_backbone)
        detach_branch = arguments.boolean("detach_branch", detach_branch)
        if condition_on_backbone and backbone == "none":
            raise ValueError("condition_on_backbone=True needs a backbone; got backbone='none'")
        if detach_branch and backbone == "none":
            raise ValueError("detach_branch=True needs a backbone; got backbone='none'")
        for name, value in (("diffusion_weight", diffusion_weight), ("eta", eta),
                            ("backbone_loss_weight", backbone_loss_weight)):
            arguments.real(name, value, 0.0)
        if detach_branch and backbone_loss_weight <= 0:
            raise ValueError("detach_branch=True needs backbone_loss_weight > 0 (nothing else would train the "
                             f"encoder and the item table); got backbone_loss_weight={backbone_loss_weight!r}")
        backbone_blocks = arguments.integer("backbone_blocks", backbone_blocks, 1)
        session_length = arguments.integer("session_length", session_length, 1)
        history_length = arguments.integer("history_length", history_length, 1)
        diffusion_steps = arguments.integer("diffusion_steps", diffusion_steps, 1)
        sampling_steps = arguments.integer("sampling_steps", sampling_steps, 1)
        if sampling_steps > diffusion_steps:
            raise ValueError(f"sampling_steps must be in [1, diffusion_steps={diffusion_steps}], got {sampling_steps!r}")
        self._set_shared_hyperparameters(
            num_items=num_items, embedding_dim=embedding_dim, user_tower=user_tower, max_length=max_length,
            num_blocks=num_blocks, num_heads=num_heads, dropout=dropout, loss=loss, temperature=temperature,
            num_sampled_negatives=num_sampled_negatives, max_loss_positions=max_loss_positions,
            item_feature_dims=item_feature_dims, user_feature_cardinalities=user_feature_cardinalities,
            item_hidden_units=item_hidden_units, l2=l2,
        )
        self.session_length = session_length
        self.history_length = history_length
        if self.window > self.max_length:
            warnings.warn(
                f"T2Diff reads session_length + history_length = {self.window} items, but is fed histories of "
                f"max_length = {self.max_length}: its long history holds at most "
                f"{max(self.max_length - self.session_length, 0)} items, not history_length = {self.history_length}",
                stacklevel=2)
        self.diffusion_steps = diffusion_steps
        self.schedule_kind = schedule
        self.denoiser_kind = denoiser
        self.denoiser_units = arguments.widths("denoiser_units", denoiser_units, allow_empty=False)
        if denoiser == "unet" and len(self.denoiser_units) != 2:
            raise ValueError(f"denoiser='unet' has two levels: denoiser_units needs two widths, got {denoiser_units!r}")
        self.diffuse = diffuse
        self.stop_gradient = stop_gradient
        self.diffusion_weight = float(diffusion_weight)
        self.prior_drift_rate = prior_drift_rate
        self.sampler = sampler
        self.sampling_steps = sampling_steps
        self.eta = float(eta)
        self.initial_noise = initial_noise
        self.session_pooling = session_pooling
        self.backbone = backbone
        self.backbone_blocks = backbone_blocks
        self.backbone_loss_weight = float(backbone_loss_weight)
        self.condition_on_backbone = condition_on_backbone
        self.detach_branch = detach_branch

        self._build_shared_layers(item_feature_tables, sequence_encoder=False)
        if self.backbone == "sasrec":
            self.encoder = SASRecEncoder(self.max_length, self.backbone_blocks, self.num_heads, self.dropout,
                                         name="sasrec_encoder", dtype=self.dtype_policy)
            # Zero-initialised: training starts from the backbone's (the two-tower's) user vector.
            self.mixed_projection = tf.keras.layers.Dense(self.embedding_dim, kernel_initializer="zeros",
                                                          name="mixed_projection", dtype=self.light_layer_dtype)
        self.schedule = NoiseSchedule(schedule, self.diffusion_steps)
        self.denoiser = DriftDenoiser(denoiser, self.denoiser_units, name="denoiser", dtype=self.dtype_policy)
        self.mixed_attention = MixedAttention(self.num_heads, self.num_blocks, self.dropout,
                                              max_session_length=self.session_length, pooling=self.session_pooling,
                                              name="mixed_attention", dtype=self.dtype_policy)
        tracked = ("retrieval_loss", "diffusion_loss") + (("backbone_loss",) if self.backbone != "none" else ())
        self.trackers = {name: tf.keras.metrics.Mean(name=name) for name in tracked}

    @property
    def window(self) -> int:
        """Items the user tower reads: session_length + history_length."""
        return self.session_length + self.history_length

    # ---------------------------------------------------------------- user side
    def _split_window(self, windows: tf.Tensor):
        """Item windows int [N, window] -> (session, mask, history, mask, last item x_n) embeddings."""
        embedded = self.item_tower(windows)
        present = windows > 0
        session, session_mask = embedded[:, -self.session_length:], present[:, -self.session_length:]
        history, history_mask = embedded[:, :-self.session_length], present[:, :-self.session_length]
        return session, session_mask, history, history_mask, session[:, -1, :]

    def _last_window(self, inputs: dict) -> tf.Tensor:
        """The most recent ``window`` columns of left-padded histories (padded if shorter)."""
        history = history_indices(inputs)
        missing = tf.maximum(self.window - tf.shape(history)[1], 0)
        return tf.pad(history, [[0, 0], [missing, 0]])[:, -self.window:]

    def _user_vector(self, session, session_mask, predicted, history, history_mask, inputs, rows=None,
                     base=None, training=False) -> tf.Tensor:
        """The mixed-attention vector, plus the backbone state ``base`` (which already holds the
        user features) when there is a backbone, else plus the user-feature embeddings."""
        users = self.full_precision(
            self.mixed_attention(session, session_mask, predicted, history, history_mask, training=training))
        if self.backbone != "none":
            return base + self.mixed_projection(users)
        for name, embedding in self.user_feature_embeddings.items():
            values = user_feature_values(name, inputs, list(self.user_feature_embeddings))
            users += embedding(values if rows is None else tf.gather(values, rows))
        return users

    def sample_drift(self, session: tf.Tensor, session_mask: tf.Tensor, sampler: Optional[str] = None,
                     steps: Optional[int] = None, eta: Optional[float] = None,
                     initial_noise: Optional[str] = None, seed: Optional[int] = None) -> tf.Tensor:
        """Runs the reverse process for each session: the predicted z0, float [B, d].

        Args:
          session, session_mask: Session embeddings [B, S, d] and mask [B, S].
          sampler, steps, eta, initial_noise: Override the model's serving settings.
          seed: Seed of the random draws (initial noise "random", DDPM, eta > 0); None uses the
            global generator.

        Raises:
          ValueError: unknown sampler or steps outside [1, T].
        """
        sampler = sampler or self.sampler
        eta = self.eta if eta is None else arguments.real("eta", eta, 0.0)
        initial_noise = initial_noise or self.initial_noise
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if initial_noise not in ("zeros", "random"):
            raise ValueError(f"initial_noise must be 'zeros' or 'random', got {initial_noise!r}")
        if sampler == "ddpm" and steps not in (None, self.diffusion_steps):
            raise ValueError(f"ddpm runs all T={self.diffusion_steps} steps; got steps={steps!r} (use sampler='ddim')")
        # The batch size comes from the mask, not the embeddings: under XLA with an unknown batch,
        # draws shaped by a Keras Embedding's output (measured: 38.6% of users kept their rank)
        # differed from the plain graph's for the same seed.
        batch = tf.shape(session_mask)[0]
        shape = tf.stack([batch, self.embedding_dim])
        draws = iter(range(1, 10**6))

        def normal():
            # Stateless draws with a seed reproduce; without one, the usual seeded-op randomness.
            # Philox by name: the automatic choice is Philox on CPU but another generator under
            # XLA, so a compiled export would draw other noise for the same seed.
            if seed is None:
                return tf.random.normal(shape)
            return tf.random.stateless_normal(shape, seed=[int(seed), next(draws)], alg="philox")

        def noises(count):
            # Drawn before the loop that uses them: XLA's stateless draw inside a loop, its seed a
            # loop value, gave other noise than the plain graph's for the same seed.
            return tf.stack([normal() for _ in range(count)]) if count else None

        def denoised(z, step):
            return self.full_precision(self.denoiser(z, tf.fill([batch], step), session, session_mask))

        def loop(count, step_function, z):
            # z after step_function(i, z) for i = 0 .. count - 1, as one graph loop. Unrolled, every
            # traced signature held T copies of the denoiser: a DDPM-50 export of the ML-1M model
            # took 108 s, 17.5 MiB and 22 s to load, against 23.5 s, 5.9 MiB and 4.1 s as a loop
            # (benchmarks/results/t2diff_export*.md), for the same serving latency.
            if count == 0:
                return z
            any_batch = tf.TensorShape([None]).concatenate(z.shape[1:])  # a step may lose the known batch
            _, z = tf.while_loop(lambda i, z: i < count, lambda i, z: (i + 1, step_function(i, z)),
                                 (tf.constant(0), z), shape_invariants=(tf.TensorShape([]), any_batch),
                                 maximum_iterations=count)
            return z

        z = normal() if initial_noise == "random" else tf.zeros(shape)
        if sampler == "ddpm":
            last = self.diffusion_steps
            noise = noises(last - 1)

            def ancestral_step(i, z):  # s = T - i > 1, with noise
                step = last - i
                return self.schedule.ddpm_step(z, denoised(z, step), tf.fill([batch], step), noise[i])

            z = loop(last - 1, ancestral_step, z)
            return self.schedule.ddpm_step(z, denoised(z, 1), tf.fill([batch], 1), tf.zeros(shape))
        visited = self.schedule.ddim_timesteps(self.sampling_steps if steps is None else steps)
        visited_steps = tf.constant(visited, tf.int32)
        noise = noises(len(visited) - 1) if eta > 0 else None

        def ddim_step(i, z):  # visited[i] -> visited[i + 1]
            step, previous = tf.fill([batch], visited_steps[i]), tf.fill([batch], visited_steps[i + 1])
            return self.schedule.ddim_step(z, denoised(z, visited_steps[i]), step, previous, eta,
                                           None if noise is None else noise[i])

        # The last step goes to 0, where DDIM's z is the prediction itself.
        return denoised(loop(len(visited) - 1, ddim_step, z), visited[-1])

    def user_embedding(self, inputs: dict, training: bool = False, **sampling) -> tf.Tensor:
        """User vectors after the most recent history item: float [B, d].

        Args:
          inputs: The model inputs.
          training: Unused at serving (dropout off).
          **sampling: ``sampler``, ``steps``, ``eta``, ``initial_noise``, ``seed`` overrides of
            ``sample_drift``.
        """
        windows = self._last_window(inputs)
        session, session_mask, history, history_mask, last = self._split_window(windows)
        base = last_position_state(self.encode_sequence, inputs) if self.backbone != "none" else None
        drift = self.sample_drift(*self._denoiser_condition(session, session_mask, base), **sampling)
        predicted = last + drift if self.diffuse == "drift" else drift
        return self._user_vector(session, session_mask, predicted, history, history_mask, inputs, base=base)

    def _denoiser_condition(self, session: tf.Tensor, session_mask: tf.Tensor, base: Optional[tf.Tensor]):
        """What the denoiser is conditioned on: the session, then the backbone state if asked."""
        if not self.condition_on_backbone:
            return session, session_mask
        present = tf.ones_like(session_mask[:, :1])
        return tf.concat([session, base[:, tf.newaxis, :]], 1), tf.concat([session_mask, present], 1)

    def encode_sequence(self, inputs: dict, training: bool = False,
                        last_position_only: bool = False) -> tf.Tensor:
        """The backbone's state at every history position: float [B, L, d].

        Raises:
          ValueError: the model has no backbone.
        """
        if self.backbone == "none":
            raise ValueError("encode_sequence needs a backbone; this T2Diff has backbone='none'")
        return encode_history(self.item_tower, self.encoder, self.user_feature_embeddings, inputs, training,
                              last_position_only)

    def score_all(self, inputs: dict, **sampling) -> tf.Tensor:
        """Scores of every item index: float [B, num_items + 1] (column 0 = padding)."""
        return tf.matmul(self.user_embedding(inputs, **sampling), self.item_embeddings(), transpose_b=True)

    def call(self, inputs: dict, training: bool = False) -> tf.Tensor:
        return self.user_embedding(inputs)

    # ---------------------------------------------------------------- training
    def _sg(self, tensor: tf.Tensor) -> tf.Tensor:
        return tf.stop_gradient(tensor) if self.stop_gradient else tensor

    def compute_loss(self, inputs: dict, training: bool = False) -> tf.Tensor:
        if isinstance(inputs, (tuple, list)):
            inputs = inputs[0]
        history = history_indices(inputs)
        next_items = training_targets(inputs, self.num_items)
        # The window ending at every position t: columns t - window + 1 .. t of the history.
        padded = tf.pad(history, [[0, 0], [self.window - 1, 0]])
        offsets = tf.range(tf.shape(history)[1])[:, tf.newaxis] + tf.range(self.window)[tf.newaxis, :]
        # A random subset of the positions: each one runs the denoiser and the user tower.
        draws = LossDraws(training)
        where = draws.shuffle(tf.where(next_items > 0))[: self.max_loss_positions]
        windows = tf.gather(tf.gather(padded, where[:, 0]), tf.gather(offsets, where[:, 1]), batch_dims=1)
        targets = tf.gather_nd(next_items, where)
        session, session_mask, long_history, history_mask, last = self._split_window(windows)
        target = self.item_tower(targets)

        softmax = {**self._softmax_settings(), "draws": draws}
        base, backbone = None, 0.0
        if self.backbone != "none":
            states = self.encode_sequence(inputs, training=training)
            base = tf.gather_nd(states, where)
            every = tf.where(next_items > 0)
            backbone = dot_product_softmax_loss(tf.gather_nd(states, every), tf.gather_nd(next_items, every),
                                                self.item_tower, **softmax)
            self.track(self.trackers["backbone_loss"], backbone)

        branch_items = self.item_tower
        if self.detach_branch:
            # The branch reads the representations the backbone loss learns but does not move them.
            session, long_history, last, target, base = (
                tf.stop_gradient(t) for t in (session, long_history, last, target, base))
            branch_items = frozen_tower(self.item_tower)
        clean = target - last if self.diffuse == "drift" else target
        clean = self._sg(clean)
        condition, condition_mask = self._denoiser_condition(self._sg(session), session_mask,
                                                             None if base is None else self._sg(base))
        steps = draws.uniform(tf.shape(targets), 1, self.diffusion_steps + 1, dtype=tf.int32)
        noisy = self.schedule.q_sample(clean, steps, draws.normal(tf.shape(clean)))
        z0_hat = self.full_precision(self.denoiser(noisy, steps, condition, condition_mask))
        diffusion = tf.reduce_mean(tf.square(z0_hat - clean))

        prior = self.full_precision(self.denoiser(tf.zeros_like(clean), tf.fill(tf.shape(steps), self.diffusion_steps),
                                                  condition, condition_mask))
        use_prior = draws.uniform(tf.shape(steps)) < self.prior_drift_rate
        drift = self._sg(tf.where(use_prior[:, tf.newaxis], prior, z0_hat))
        predicted = last + drift if self.diffuse == "drift" else drift
        users = self._user_vector(session, session_mask, predicted, long_history, history_mask, inputs,
                                  rows=where[:, 0], base=base, training=training)
        retrieval = dot_product_softmax_loss(users, targets, branch_items, **softmax)
        self.track(self.trackers["retrieval_loss"], retrieval)
        self.track(self.trackers["diffusion_loss"], diffusion)
        return retrieval + self.diffusion_weight * diffusion + self.backbone_loss_weight * backbone

    # ---------------------------------------------------------------- config
    def get_config(self) -> dict:
        return {
            **self._shared_config(),
            "session_length": self.session_length,
            "history_length": self.history_length,
            "diffusion_steps": self.diffusion_steps,
            "schedule": self.schedule_kind,
            "denoiser": self.denoiser_kind,
            "denoiser_units": list(self.denoiser_units),
            "diffuse": self.diffuse,
            "stop_gradient": self.stop_gradient,
            "diffusion_weight": self.diffusion_weight,
            "prior_drift_rate": self.prior_drift_rate,
            "sampler": self.sampler,
            "sampling_steps": self.sampling_steps,
            "eta": self.eta,
            "initial_noise": self.initial_noise,
            "session_pooling": self.session_pooling,
            "backbone": self.backbone,
            "backbone_blocks": self.backbone_blocks,
            "backbone_loss_weight": self.backbone_loss_weight,
            "condition_on_backbone": self.condition_on_backbone,
            "detach_branch": self.detach_branch,
        }
