"""NoiseSchedule: the forward process of a diffusion model and its DDPM / DDIM reverse steps."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments

SCHEDULES = ("exponential", "linear", "cosine")


def make_betas(kind: str, num_steps: int) -> np.ndarray:
    """Noise variances beta_1..beta_T (float64 [T]).

    * ``exponential``: beta_s = 0.01 exp(4.5 s / T) (T2Diff), capped at 0.999;
    * ``linear``: DDPM's 1e-4..0.02 over 1,000 steps, rescaled to T steps (Nichol & Dhariwal);
    * ``cosine``: alpha_bar(s) = cos^2((s/T + 0.008) / 1.008 * pi/2) (Nichol & Dhariwal), betas
      capped at 0.999.

    Raises:
      ValueError: unknown ``kind`` or ``num_steps`` < 1.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    num_steps = arguments.integer("num_steps", num_steps, 1)
    steps = np.arange(1, num_steps + 1, dtype=np.float64)
    if kind == "exponential":
        betas = 0.01 * np.exp(4.5 * steps / num_steps)
    elif kind == "linear":
        scale = 1000.0 / num_steps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_steps)
    else:
        def alpha_bar(s):
            return np.cos((s / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = 1.0 - alpha_bar(steps) / alpha_bar(steps - 1)
    return np.clip(betas, 1e-8, 0.999)


class NoiseSchedule(tf.Module):
    """Forward noising q(z_s | z_0) and the reverse steps of a denoiser that predicts z_0.

    Steps are numbered 1..T (s = 0 is clean data). With alpha_s = 1 - beta_s and
    abar_s = prod_{r <= s} alpha_r (abar_0 = 1):

    * ``q_sample``: z_s = sqrt(abar_s) z_0 + sqrt(1 - abar_s) eps;
    * ``posterior``: q(z_{s-1} | z_s, z_0) has mean
      beta_s sqrt(abar_{s-1}) / (1 - abar_s) z_0 + (1 - abar_{s-1}) sqrt(alpha_s) / (1 - abar_s) z_s
      and variance beta_s (1 - abar_{s-1}) / (1 - abar_s);
    * ``ddpm_step``: a draw from that posterior with z_0 replaced by the prediction (no noise at
      s = 1);
    * ``ddim_step``: Song et al.'s update from s to any earlier t,
      z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t - sigma^2) eps_hat + sigma noise, with
      eps_hat = (z_s - sqrt(abar_s) z0) / sqrt(1 - abar_s) and
      sigma = eta sqrt((1 - abar_t) / (1 - abar_s)) sqrt(1 - abar_s / abar_t); eta = 0 is
      deterministic.

    Args:
      kind: "exponential", "linear" or "cosine" (default "exponential").
      num_steps: T (int >= 1, default 50).
      name: Name of the ``tf.Module`` (str, default the class name).

    Raises:
      ValueError: Unknown ``kind``, or ``num_steps`` not an integer >= 1.

    Example:
      >>> schedule = NoiseSchedule("exponential", 50)
      >>> noisy = schedule.q_sample(tf.ones([2, 4]), tf.constant([1, 50]), tf.zeros([2, 4]))
    """

    def __init__(self, kind: str = "exponential", num_steps: int = 50, name: Optional[str] = None):
        super().__init__(name=name)
        betas = make_betas(kind, num_steps)
        self.kind = kind
        self.num_steps = int(num_steps)  # make_betas checked it
        alphas = 1.0 - betas
        alpha_bars = np.cumprod(alphas)
        previous = np.concatenate([[1.0], alpha_bars[:-1]])
        # Index s holds step s; index 0 is the clean data (abar_0 = 1, no noise).
        self.betas_np = np.concatenate([[0.0], betas])
        self.alpha_bars_np = np.concatenate([[1.0], alpha_bars])
        # abar underflows to 0 in float32 from T of a few hundred (exponential), and a ratio of
        # two such zeros was NaN; its logarithm stays finite. Summed, not log(cumprod), which
        # underflows in float64 too.
        self.log_alpha_bars_np = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
        self.posterior_variance_np = np.concatenate([[0.0], betas * (1.0 - previous) / (1.0 - alpha_bars)])
        self.posterior_z0_coef_np = np.concatenate([[1.0], betas * np.sqrt(previous) / (1.0 - alpha_bars)])
        self.posterior_zs_coef_np = np.concatenate([[0.0], (1.0 - previous) * np.sqrt(alphas) / (1.0 - alpha_bars)])
        self.alpha_bars = tf.constant(self.alpha_bars_np, tf.float32)
        self.posterior_variance = tf.constant(self.posterior_variance_np, tf.float32)
        self.posterior_z0_coef = tf.constant(self.posterior_z0_coef_np, tf.float32)
        self.posterior_zs_coef = tf.constant(self.posterior_zs_coef_np, tf.float32)

    def _check_steps(self, name: str, steps, lowest: int) -> None:
        """Refuses steps outside ``lowest``..T, when their values are known while tracing or eagerly.

        Only known values are checked: a runtime assert would have to be carried by the sampling
        loops XLA compiles and the SavedModels export. Unchecked, a step past T gathered out of
        the tables ("indices[1] = 11 is not in [0, 11) [Op:GatherV2]") on CPU, and read a 0 on GPU.

        Raises:
          ValueError: A known step outside ``lowest``..T.
        """
        if isinstance(steps, tf.Tensor) and tf.executing_eagerly() and "CPU" not in steps.device:
            # Reading an accelerator's tensor waits for the device: once per step of an eager
            # sampling loop, whose steps are in range by construction.
            return
        values = tf.get_static_value(steps)
        if values is None:
            return
        values = np.asarray(values)
        outside = values[(values < lowest) | (values > self.num_steps)]
        if outside.size:
            raise ValueError(f"{name} must be in [{lowest}, T={self.num_steps}], got {outside.ravel()[0].item()!r}")

    @staticmethod
    def _per_row(table: np.ndarray, steps: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
        """table[steps] in ``like``'s dtype, shaped to broadcast over ``like`` (steps: int [B] or scalar)."""
        values = tf.gather(tf.constant(table, like.dtype), tf.cast(steps, tf.int32))
        if values.shape.rank == 0:
            return values
        return tf.reshape(values, tf.concat([tf.shape(values), tf.ones([tf.rank(like) - 1], tf.int32)], 0))

    @staticmethod
    def _computed(*tensors: tf.Tensor) -> tuple:
        """The tensors in the dtype the schedule computes in, and the dtype to answer in: float64
        stays float64, anything narrower (float16, bfloat16) is computed in float32, where
        1 - abar near 1 does not round to 0, and cast back."""
        dtype = tf.convert_to_tensor(tensors[0]).dtype
        compute = tf.float64 if dtype == tf.float64 else tf.float32
        return tuple(None if t is None else tf.cast(t, compute) for t in tensors), dtype

    def q_sample(self, z0: tf.Tensor, steps: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        """z_s for clean z0 [B, ...], steps int [B] in 1..T and standard normal noise.

        Raises:
          ValueError: A step outside 1..T, when the steps are known (eagerly, or constants).
        """
        self._check_steps("steps", steps, 1)
        (z0, noise), dtype = self._computed(z0, noise)
        abar = self._per_row(self.alpha_bars_np, steps, z0)
        return tf.cast(tf.sqrt(abar) * z0 + tf.sqrt(1.0 - abar) * noise, dtype)

    def posterior(self, z0: tf.Tensor, zs: tf.Tensor, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean and variance of q(z_{s-1} | z_s, z_0), for steps int [B] in 1..T.

        Raises:
          ValueError: A step outside 1..T, when the steps are known (eagerly, or constants).
        """
        self._check_steps("steps", steps, 1)
        (z0, zs), dtype = self._computed(z0, zs)
        mean, variance = self._posterior(z0, zs, steps)
        return tf.cast(mean, dtype), tf.cast(variance, dtype)

    def _posterior(self, z0: tf.Tensor, zs: tf.Tensor, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        mean = (self._per_row(self.posterior_z0_coef_np, steps, z0) * z0
                + self._per_row(self.posterior_zs_coef_np, steps, zs) * zs)
        return mean, self._per_row(self.posterior_variance_np, steps, zs)

    def ddpm_step(self, zs: tf.Tensor, z0_hat: tf.Tensor, steps: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        """One ancestral step s -> s - 1 (the posterior mean at s = 1), for steps int [B] in 1..T.

        Raises:
          ValueError: A step outside 1..T, when the steps are known (eagerly, or constants).
        """
        self._check_steps("steps", steps, 1)
        (zs, z0_hat, noise), dtype = self._computed(zs, z0_hat, noise)
        mean, variance = self._posterior(z0_hat, zs, steps)
        return tf.cast(mean + tf.sqrt(variance) * noise, dtype)

    def ddim_step(self, zs: tf.Tensor, z0_hat: tf.Tensor, steps: tf.Tensor, previous_steps: tf.Tensor,
                  eta: float = 0.0, noise: Optional[tf.Tensor] = None) -> tf.Tensor:
        """One DDIM step s -> t < s (t = 0 returns z0_hat); ``noise`` is needed when eta > 0.

        Raises:
          ValueError: ``eta`` > 0 without noise, or (when they are known, eagerly or as
            constants) a step outside 1..T or a previous step outside 0..T.
        """
        if eta > 0 and noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        self._check_steps("steps", steps, 1)
        self._check_steps("previous_steps", previous_steps, 0)
        (zs, z0_hat, noise), dtype = self._computed(zs, z0_hat, noise)
        abar = self._per_row(self.alpha_bars_np, steps, zs)
        abar_prev = self._per_row(self.alpha_bars_np, previous_steps, zs)
        eps_hat = (zs - tf.sqrt(abar) * z0_hat) / tf.sqrt(tf.maximum(1.0 - abar, 1e-12))
        out = tf.sqrt(abar_prev) * z0_hat
        if eta > 0:
            # abar / abar_prev = exp(log abar - log abar_prev), finite where both abar are 0.
            ratio = tf.exp(self._per_row(self.log_alpha_bars_np, steps, zs)
                           - self._per_row(self.log_alpha_bars_np, previous_steps, zs))
            sigma = eta * tf.sqrt((1.0 - abar_prev) / tf.maximum(1.0 - abar, 1e-12)) * tf.sqrt(1.0 - ratio)
            out += tf.sqrt(tf.maximum(1.0 - abar_prev - tf.square(sigma), 0.0)) * eps_hat + sigma * noise
        else:  # deterministic: no sigma to compute
            out += tf.sqrt(1.0 - abar_prev) * eps_hat
        return tf.cast(out, dtype)

    def ddim_timesteps(self, num_sampling_steps: int) -> list[int]:
        """Evenly spaced steps T = s_n > ... > s_1 >= 1 that DDIM visits (then 0).

        Raises:
          ValueError: ``num_sampling_steps`` not an integer in [1, T].
        """
        # The type first: 2.5 passed the range check, then failed in numpy naming no argument.
        arguments.integer("num_sampling_steps", num_sampling_steps)
        if not 1 <= num_sampling_steps <= self.num_steps:
            raise ValueError(f"sampling steps must be in [1, T={self.num_steps}], got {num_sampling_steps!r}")
        steps = np.round(np.linspace(self.num_steps, 0, num_sampling_steps + 1)).astype(int)
        return [int(s) for s in steps[:-1]]
