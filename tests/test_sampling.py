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


# --------------------------------------------------------------------------- churn schedules (docs/algorithm.md §1.4)


def _grid(g: torch.Generator, T: int) -> torch.Tensor:
    """A shifted σ grid 1 = σ_0 > … > σ_T = 0, as the SD3 scheduler makes them (float32)."""
    shift = 0.5 + 3 * float(torch.rand((), generator=g))
    t = torch.linspace(1, 0, T + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


@pytest.mark.parametrize("seed", range(3))
def test_raw_schedule(seed):
    g = torch.Generator().manual_seed(seed)
    T, rows = int(torch.randint(2, 30, (), generator=g)), 2 * int(torch.randint(1, 8, (), generator=g))
    weight = float(torch.rand((), generator=g)) * 0.1
    prior, steps = churn_schedule("raw", weight, _grid(g, T), rows)
    assert prior.dtype == steps.dtype == torch.float64 and prior.device.type == steps.device.type == "cpu"
    assert prior.shape == (rows,) and steps.shape == (T, rows)
    assert torch.all(prior == weight) and torch.all(steps[:-1] == weight) and torch.all(steps[-1] == 0)


@pytest.mark.parametrize("weight, weight_sigma", [(0.1, 1.0), (0.37, 0.4)])
def test_prior_schedule_draws_log_normal_weights(weight, weight_sigma):
    pairs = 20_000
    prior, steps = churn_schedule("prior", weight, _grid(torch.Generator().manual_seed(0), 12), 2 * pairs,
                                  torch.Generator().manual_seed(11), weight_sigma=weight_sigma)
    assert steps.shape == (12, 2 * pairs) and torch.all(steps == 0)  # churn at the prior only
    torch.testing.assert_close(prior[0::2], prior[1::2], rtol=0, atol=0)  # both rows of a pair
    # γ₀ = exp(w) − 1 with w = weight·exp(weight_sigma·z): log(log(1 + γ₀)/weight) = weight_sigma·z ~ N(0, σ²).
    z = torch.tensor([math.log(math.log1p(float(gp)) / weight) for gp in prior[0::2]], dtype=torch.float64)
    assert abs(float(z.mean())) < 5 * weight_sigma / math.sqrt(pairs)
    assert float(z.std()) == pytest.approx(weight_sigma, abs=5 * weight_sigma / math.sqrt(2 * pairs))
    assert abs(float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])) < 5 / math.sqrt(pairs)  # independent


def test_prior_schedule_without_spread_is_exp_weight_minus_one():
    g = torch.Generator().manual_seed(12)
    weight = float(torch.rand((), generator=g)) * 0.5
    prior, steps = churn_schedule("prior", weight, _grid(g, 7), 9, g, weight_sigma=0.0)  # odd rows: last pair cut
    assert prior.shape == (9,) and torch.all(steps == 0)
    assert all(float(gp) == pytest.approx(math.exp(weight) - 1, rel=1e-14, abs=0) for gp in prior)
    prior, _ = churn_schedule("prior", 0.0, _grid(g, 7), 4, g, weight_sigma=1.0)
    assert torch.all(prior == 0)


def _interval_reference(sigmas: list[float], c: float, w: float, soft_sigma: float) -> list[float]:
    """γ at every grid σ: w × the logit-normal density (location c, scale soft_sigma), 0 at σ = 0 and σ = 1,
    normalised to sum 1 over the grid; γ = exp(value) − 1 (as expm1: exact also for tiny values)."""
    density = []
    for s in sigmas:
        if 0 < s < 1:
            logit = math.log(s / (1 - s))
            density.append(math.exp(-(logit - c) ** 2 / (2 * soft_sigma**2))
                           / (soft_sigma * math.sqrt(2 * math.pi) * s * (1 - s)))
        else:
            density.append(0.0)
    total = sum(density)
    return [math.expm1(w * d / total) for d in density]


@pytest.mark.parametrize("seed", range(5))
def test_interval_schedule_matches_the_normalised_logit_normal_density(seed):
    g = torch.Generator().manual_seed(100 + seed)
    T, pairs = int(torch.randint(3, 40, (), generator=g)), int(torch.randint(1, 5, (), generator=g))
    mu = float(torch.rand((), generator=g)) * 4 - 2
    weight = float(torch.rand((), generator=g)) * 2 + 0.05
    soft_sigma = float(torch.rand((), generator=g)) * 0.9 + 0.1
    sigmas = _grid(g, T)
    # sigma = 0 and weight_sigma = 0: the centre is mu and the weight is weight, exactly.
    prior, steps = churn_schedule("interval", weight, sigmas, 2 * pairs, g, weight_sigma=0.0, mu=mu, sigma=0.0,
                                  soft_sigma=soft_sigma)
    ref = _interval_reference([float(s) for s in sigmas.double()], mu, weight, soft_sigma)
    assert ref[0] == 0 and ref[-1] == 0
    assert torch.all(prior == 0) and torch.all(steps[-1] == 0)  # σ_0 = 1 and the last step get none
    for row in range(2 * pairs):
        for k in range(T):  # step k (σ_k → σ_{k+1}) takes the value at σ_{k+1}
            assert float(steps[k, row]) == pytest.approx(ref[k + 1], rel=1e-12, abs=1e-300)
        total = math.log1p(float(prior[row])) + sum(math.log1p(float(gs)) for gs in steps[:, row])
        assert total == pytest.approx(weight, rel=1e-12)


def test_interval_schedule_draws_a_centre_and_weight_per_pair():
    pairs, T, mu, sigma, weight, weight_sigma, soft_sigma = 20_000, 24, 1.0, 1.5, 1.0, 0.3, 0.25
    sigmas = torch.linspace(1, 0, T + 1)
    prior, steps = churn_schedule("interval", weight, sigmas, 2 * pairs, torch.Generator().manual_seed(21),
                                  weight_sigma=weight_sigma, mu=mu, sigma=sigma, soft_sigma=soft_sigma)
    assert torch.all(prior == 0) and torch.all(steps[-1] == 0)
    torch.testing.assert_close(steps[:, 0::2], steps[:, 1::2], rtol=0, atol=0)  # both rows of a pair
    assert not torch.equal(steps[:, 0], steps[:, 2])  # different pairs differ
    values = torch.log1p(steps[:, 0::2])  # [T, pairs]: w × normalised density at σ_1 … σ_T
    # The weight: log(1 + γ) sums to w = weight·exp(weight_sigma·z) over the grid.
    z = torch.log(values.sum(0) / weight)
    assert abs(float(z.mean())) < 5 * weight_sigma / math.sqrt(pairs)
    assert float(z.std()) == pytest.approx(weight_sigma, abs=5 * weight_sigma / math.sqrt(2 * pairs))
    # The centre: log(value) + log(σ(1 − σ)) + l²/(2 soft²) = const + l·c/soft², l = logit(σ); the slope gives c.
    s = sigmas[1:].double().view(-1, 1).expand_as(values)
    logit = torch.log(s / (1 - s))
    ok = (values > 1e-250) & (s > 0)
    y = torch.log(values.clamp_min(1e-300)) + torch.log(s * (1 - s)).nan_to_num(0.0) + logit**2 / (2 * soft_sigma**2)
    n = ok.sum(0)
    assert bool(torch.all(n >= 2))
    lm = torch.where(ok, logit, 0).sum(0) / n
    ym = torch.where(ok, y, 0).sum(0) / n
    slope = torch.where(ok, (logit - lm) * (y - ym), 0).sum(0) / torch.where(ok, (logit - lm) ** 2, 0).sum(0)
    c = slope * soft_sigma**2
    assert float(c.mean()) == pytest.approx(mu, abs=5 * sigma / math.sqrt(pairs))
    assert float(c.std()) == pytest.approx(sigma, abs=5 * sigma / math.sqrt(2 * pairs))


def test_interval_schedule_without_interior_grid_points_is_no_churn():
    prior, steps = churn_schedule("interval", 1.0, torch.tensor([1.0, 0.0]), 4, torch.Generator().manual_seed(0),
                                  mu=1.0, sigma=1.5, soft_sigma=0.25)
    assert torch.all(prior == 0) and torch.all(steps == 0)


def test_unknown_churn_schedule():
    with pytest.raises(ValueError, match="unknown churn schedule 'first'; valid: raw, prior, interval"):
        churn_schedule("first", 0.1, torch.linspace(1, 0, 4), rows=2)


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
