"""NoiseSchedule: schedule quantities against a NumPy reference, one DDPM and one DDIM step by
hand, DDIM determinism and its step grid."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.layers import NoiseSchedule
from tfx_xmatch.layers.noise_schedule import make_betas


def test_exponential_schedule_is_the_papers_formula():
    betas = make_betas("exponential", 50)
    np.testing.assert_allclose(betas, [0.01 * math.exp(4.5 * s / 50) for s in range(1, 51)])


def test_linear_and_cosine_schedules_are_their_published_formulas():
    # DDPM's linear betas, 1e-4 .. 0.02 over 1,000 steps, rescaled to T = 20 steps.
    np.testing.assert_allclose(make_betas("linear", 20)[[0, 10, 19]],
                               [0.005, 0.005 + 10 * (1.0 - 0.005) / 19, 0.999], rtol=1e-12)
    # Nichol & Dhariwal's cosine schedule: abar(s) = f(s) / f(0), f(s) = cos^2((s/T + 0.008) / 1.008 * pi/2).
    f = [math.cos((s / 20 + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(21)]
    expected = [min(1 - f[s] / f[s - 1], 0.999) for s in range(1, 21)]
    np.testing.assert_allclose(make_betas("cosine", 20), expected, rtol=1e-12)
    np.testing.assert_allclose(np.cumprod(1 - make_betas("cosine", 20))[:19], [f[s] / f[0] for s in range(1, 20)],
                               rtol=1e-9)


@pytest.mark.parametrize("kind", ["exponential", "linear", "cosine"])
def test_alpha_bar_and_posterior_match_numpy(kind):
    schedule = NoiseSchedule(kind, 20)
    betas = make_betas(kind, 20)
    alpha_bars = np.cumprod(1 - betas)
    np.testing.assert_allclose(schedule.alpha_bars.numpy()[1:], alpha_bars, rtol=1e-5)
    assert 0 < alpha_bars[-1] < alpha_bars[0] < 1
    rng = np.random.default_rng(0)
    z0, zs = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    steps = np.array([1, 7, 20])
    mean, variance = schedule.posterior(tf.constant(z0), tf.constant(zs), tf.constant(steps))
    for row, s in enumerate(steps):
        abar, abar_prev = alpha_bars[s - 1], (alpha_bars[s - 2] if s > 1 else 1.0)
        beta = betas[s - 1]
        expected_mean = (beta * np.sqrt(abar_prev) / (1 - abar)) * z0[row] + (
            (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)) * zs[row]
        np.testing.assert_allclose(mean.numpy()[row], expected_mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(variance.numpy()[row, 0], beta * (1 - abar_prev) / (1 - abar), rtol=1e-4, atol=1e-9)


def test_q_sample_and_one_ddpm_step_by_hand():
    schedule = NoiseSchedule("linear", 20)  # betas 0.005 .. 1.0 (capped at 0.999)
    betas = make_betas("linear", 20)
    assert betas[1] < 0.1  # the step checked below is far from the cap
    z0, noise = tf.constant([[2.0, -1.0]]), tf.constant([[0.5, 0.5]])
    abar_2 = (1 - betas[0]) * (1 - betas[1])
    np.testing.assert_allclose(schedule.q_sample(z0, tf.constant([2]), noise).numpy(),
                               np.sqrt(abar_2) * z0.numpy() + np.sqrt(1 - abar_2) * noise.numpy(), rtol=1e-5)
    zs, z0_hat, step_noise = tf.constant([[1.0, 0.0]]), tf.constant([[0.5, 0.25]]), tf.constant([[1.0, -1.0]])
    abar_1 = 1 - betas[0]
    coef_z0 = betas[1] * np.sqrt(abar_1) / (1 - abar_2)
    coef_zs = (1 - abar_1) * np.sqrt(1 - betas[1]) / (1 - abar_2)
    sigma = np.sqrt(betas[1] * (1 - abar_1) / (1 - abar_2))
    expected = coef_z0 * z0_hat.numpy() + coef_zs * zs.numpy() + sigma * step_noise.numpy()
    np.testing.assert_allclose(schedule.ddpm_step(zs, z0_hat, tf.constant([2]), step_noise).numpy(), expected,
                               rtol=1e-5)
    # At s = 1 the posterior variance is 0: the last DDPM step adds no noise.
    np.testing.assert_allclose(schedule.posterior_variance.numpy()[1], 0.0, atol=1e-12)


def test_one_ddim_step_by_hand_and_eta_zero_is_deterministic():
    schedule = NoiseSchedule("cosine", 10)
    abar = schedule.alpha_bars.numpy()
    zs, z0_hat = tf.constant([[0.3, -0.7]]), tf.constant([[1.0, 2.0]])
    eps = (zs.numpy() - np.sqrt(abar[8]) * z0_hat.numpy()) / np.sqrt(1 - abar[8])
    expected = np.sqrt(abar[4]) * z0_hat.numpy() + np.sqrt(1 - abar[4]) * eps
    out = schedule.ddim_step(zs, z0_hat, tf.constant([8]), tf.constant([4]), eta=0.0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    again = schedule.ddim_step(zs, z0_hat, tf.constant([8]), tf.constant([4]), eta=0.0)
    np.testing.assert_array_equal(out.numpy(), again.numpy())
    # eta = 1 with zero noise: the deterministic part shrinks by the stochastic share.
    sigma = np.sqrt((1 - abar[4]) / (1 - abar[8])) * np.sqrt(1 - abar[8] / abar[4])
    expected_eta = np.sqrt(abar[4]) * z0_hat.numpy() + np.sqrt(1 - abar[4] - sigma ** 2) * eps
    np.testing.assert_allclose(schedule.ddim_step(zs, z0_hat, tf.constant([8]), tf.constant([4]), 1.0,
                                                  tf.zeros([1, 2])).numpy(), expected_eta, rtol=1e-5)
    # Stepping to 0 returns the prediction itself.
    np.testing.assert_allclose(schedule.ddim_step(zs, z0_hat, tf.constant([8]), tf.constant([0])).numpy(),
                               z0_hat.numpy(), rtol=1e-5)


def test_ddim_visits_evenly_spaced_steps_and_checks_the_count():
    schedule = NoiseSchedule("exponential", 50)
    assert schedule.ddim_timesteps(10) == [50, 45, 40, 35, 30, 25, 20, 15, 10, 5]
    assert schedule.ddim_timesteps(50) == list(range(50, 0, -1))
    with pytest.raises(ValueError, match=r"sampling steps must be in \[1, T=50\], got 51"):
        schedule.ddim_timesteps(51)
    with pytest.raises(ValueError, match="schedule must be one of"):
        NoiseSchedule("quadratic", 10)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        NoiseSchedule("linear", 0)


@pytest.mark.parametrize("kind, num_steps", [("exponential", 50), ("linear", 1000)])
@pytest.mark.parametrize("dtype", [tf.float64, tf.float16])
def test_every_step_keeps_its_inputs_dtype_and_float32_values(dtype, kind, num_steps):
    # float64 callers and mixed-precision (float16) towers used to hit a float32-only table; and
    # float16 arithmetic would round 1 - abar to 0 at linear's first steps (beta_1 = 1e-4): NaN.
    schedule = NoiseSchedule(kind, num_steps)
    rng = np.random.default_rng(0)
    z0, zs, noise = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    steps, previous = tf.constant([1, 20, num_steps]), tf.constant([0, 10, num_steps - 10])
    calls = {
        "q_sample": lambda cast: schedule.q_sample(cast(z0), steps, cast(noise)),
        "posterior mean": lambda cast: schedule.posterior(cast(z0), cast(zs), steps)[0],
        "ddpm_step": lambda cast: schedule.ddpm_step(cast(zs), cast(z0), steps, cast(noise)),
        "ddim_step": lambda cast: schedule.ddim_step(cast(zs), cast(z0), steps, previous),
    }
    tolerance = 5e-5 if dtype == tf.float64 else 2e-2  # float64 computes more exactly than the float32 reference
    for name, call in calls.items():
        expected = call(lambda x: tf.constant(x, tf.float32))
        got = call(lambda x: tf.constant(x, dtype))
        assert got.dtype == dtype, name
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), expected.numpy(), atol=tolerance, rtol=tolerance,
                                   err_msg=name)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_stays_finite_where_alpha_bar_underflows_in_float32(eta):
    """The exponential schedule's abar reaches float32's 0 from T of a few hundred: the DDIM
    step computed abar / abar_prev = 0 / 0, and sigma = eta * NaN was NaN even at eta = 0, so a
    T2Diff with diffusion_steps=1000 served NaN user vectors."""
    schedule = NoiseSchedule("exponential", 1000)
    assert schedule.alpha_bars.numpy()[900] == 0.0 and schedule.alpha_bars.numpy()[1000] == 0.0
    zs, z0_hat, noise = tf.constant([[0.3, -0.7]]), tf.constant([[1.0, 2.0]]), tf.constant([[0.2, 0.1]])
    out = schedule.ddim_step(zs, z0_hat, tf.constant([1000]), tf.constant([900]), eta=eta, noise=noise).numpy()
    # In float64, abar_900 and abar_1000 are tiny but not 0: the step is (almost) zs itself, the
    # stochastic share (1 - abar / abar_prev, near 1) taking eta^2 of its variance.
    log_abar = np.cumsum(np.log1p(-schedule.betas_np[1:]))
    ratio = np.exp(log_abar[999] - log_abar[899])
    sigma = eta * np.sqrt(1 - ratio)
    expected = np.sqrt(max(1 - sigma ** 2, 0.0)) * zs.numpy() + sigma * noise.numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # And the whole deterministic chain from T to 0 ends at the last prediction.
    z = tf.zeros([1, 2])
    for step, previous in zip(schedule.ddim_timesteps(10), schedule.ddim_timesteps(10)[1:] + [0]):
        z = schedule.ddim_step(z, z0_hat, tf.constant([step]), tf.constant([previous]))
        assert np.isfinite(z.numpy()).all(), step
    np.testing.assert_allclose(z.numpy(), z0_hat.numpy(), rtol=1e-6)
