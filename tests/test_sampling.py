"""Paired sampler with churn: exact closed-form checks in float64."""

import math

import pytest
import torch

from fdfo.sampling import churn_schedule, churn_step, prior_churn, sample_deterministic, sample_pairs


def _coefficients(t, s, gamma):
    """Data weight and total noise std of churn_step applied to x_t = (1−t)·x0 + t·ε with the exact v."""
    x0 = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    # Data part: ε = 0 and no fresh noise; the exact velocity for a single data point is (x − x0)/t.
    x = (1 - t) * x0
    data_w = churn_step(x, (x - x0) / t, t, s, gamma, zero)
    # Noise parts: x0 = 0, ε = 1, v = ε − x0 = 1; then the fresh-noise coefficient alone.
    eps_w = churn_step(t * x0, x0, t, s, gamma, zero)
    fresh_w = churn_step(zero, zero, t, s, gamma, x0) - churn_step(zero, zero, t, s, gamma, zero)
    return float(data_w), math.hypot(float(eps_w), float(fresh_w))


@pytest.mark.parametrize("seed", range(5))
def test_churn_step_lands_on_sigma_s_marginal(seed):
    g = torch.Generator().manual_seed(seed)
    t = float(torch.rand(1, generator=g)) * 0.9 + 0.1
    s = t * float(torch.rand(1, generator=g))
    gamma = float(torch.rand(1, generator=g)) * 0.5
    data_w, noise_std = _coefficients(t, s, gamma)
    assert data_w == pytest.approx(1 - s, abs=1e-12)
    assert noise_std == pytest.approx(s, abs=1e-12)


def test_churn_step_is_euler_at_gamma_zero():
    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    out = churn_step(x, v, 0.7, 0.4, 0.0, noise)
    torch.testing.assert_close(out, x + (0.4 - 0.7) * v, rtol=0, atol=1e-14)


def test_churn_step_per_row_tensors_match_floats():
    g = torch.Generator().manual_seed(2)
    x, v, noise = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.8, 0.5, 0.3], dtype=torch.float64)
    s = t - 0.1
    gamma = torch.rand(4, generator=g, dtype=torch.float64)
    out = churn_step(x, v, t, s, gamma, noise)
    for i in range(4):
        ref = churn_step(x[i:i + 1], v[i:i + 1], float(t[i]), float(s[i]), float(gamma[i]), noise[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-12, atol=1e-12)


def test_prior_churn_keeps_unit_variance():
    gamma = 0.37
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    a = float(prior_churn(one, gamma, zero))
    b = float(prior_churn(zero, gamma, one))
    assert a**2 + b**2 == pytest.approx(1.0, abs=1e-12)
    assert a == pytest.approx(1 / (1 + gamma))


def test_prior_churn_statistics():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    out = prior_churn(x, 0.5, torch.randn(200_000, generator=g, dtype=torch.float64))
    assert float(out.var()) == pytest.approx(1.0, abs=0.01)
    assert float(torch.corrcoef(torch.stack([x, out]))[0, 1]) == pytest.approx(1 / 1.5, abs=0.01)


def test_churn_schedules():
    sigmas = torch.linspace(1, 0, 6)
    prior, steps = churn_schedule("raw", 0.0025, sigmas, rows=4)
    assert steps.shape == (5, 4) and torch.all(steps[:-1] == 0.0025) and torch.all(steps[-1] == 0)
    assert torch.all(prior == 0.0025)
    prior, steps = churn_schedule("first", 0.01, sigmas, rows=4)
    assert torch.all(steps[0] == 0.01) and torch.all(steps[1:] == 0) and torch.all(prior == 0.01)
    g = torch.Generator().manual_seed(0)
    prior, steps = churn_schedule("logit_normal", 0.05, sigmas, rows=6, generator=g)
    assert torch.all((steps > 0).sum(0) <= 1) and torch.all(steps[-1] == 0)
    torch.testing.assert_close(steps[:, 0::2], steps[:, 1::2])  # both rows of a pair churn at the same time
    with pytest.raises(ValueError, match="valid: raw, first, logit_normal"):
        churn_schedule("nope", 0.1, sigmas, rows=2)


def _linear_velocity(x, t):
    # A fixed affine "model": deterministic, depends on x and t.
    return -0.5 * x + t.view(-1, 1, 1, 1)


def test_paired_rows_start_equal_up_to_churn_noise():
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    sigmas = torch.linspace(1, 0, 5, dtype=torch.float64)
    prior, steps = churn_schedule("raw", 0.0, sigmas, rows=6)
    traj = sample_pairs(_linear_velocity, latents, sigmas, prior, steps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(traj.xs[0::2], traj.xs[1::2], rtol=0, atol=0)  # no churn: identical pairs
    prior, steps = churn_schedule("raw", 0.0025, sigmas, rows=6)
    traj = sample_pairs(_linear_velocity, latents, sigmas, prior, steps, torch.Generator().manual_seed(0))
    gap = (traj.xs[0::2, 0] - traj.xs[1::2, 0]).std()
    expected = math.sqrt(2) * math.sqrt(1.0025**2 - 1) / 1.0025  # two independent prior-churn draws
    assert 0.5 * expected < float(gap) < 1.5 * expected
    assert traj.xs.shape == (6, 4, 2, 4, 4) and traj.vs.shape == (6, 4, 2, 4, 4) and traj.x0.shape == (6, 2, 4, 4)
    # The stored velocities are the model's velocities at the stored states.
    torch.testing.assert_close(traj.vs[:, 2], _linear_velocity(traj.xs[:, 2], sigmas[2].expand(6)))


def test_deterministic_sampler_is_plain_euler():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0], dtype=torch.float64)
    ref = x.clone()
    for k in range(3):
        ref = ref + (sigmas[k + 1] - sigmas[k]) * _linear_velocity(ref, sigmas[k].expand(2))
    torch.testing.assert_close(sample_deterministic(_linear_velocity, x, sigmas), ref, rtol=1e-6, atol=1e-6)
