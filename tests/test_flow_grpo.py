"""Flow-GRPO baseline: the SDE step's log-probability against a closed-form Gaussian, advantages, PPO."""

import math

import pytest
import torch

from fdfo.algorithms.flow_grpo import (gaussian_logp, group_advantages, grpo_loss, sample_sde, sde_coefficients, sde_mean)


def test_sde_coefficients_follow_the_published_formulas():
    # Worked by hand for σ = 0.6, s = 0.45, a = 0.7: σ/(1−σ) = 1.5, σ_t² = 0.49·1.5 = 0.735, dt = −0.15;
    # x_w = 1 + 0.735·(−0.15)/1.2 = 0.908125; v_w = (1 + 0.735·0.4/1.2)·(−0.15) = −0.18675;
    # std = sqrt(0.735·0.15) = sqrt(0.11025).
    sigma, s, a = 0.6, 0.45, 0.7
    dt = s - sigma
    x_w, v_w, std, sigma_t = sde_coefficients(sigma, s, a)
    assert sigma_t == pytest.approx(math.sqrt(0.735), rel=1e-12)
    assert x_w == pytest.approx(0.908125, rel=1e-12)
    assert v_w == pytest.approx(-0.18675, rel=1e-12)
    assert std == pytest.approx(math.sqrt(0.11025), rel=1e-12)
    # At σ = 1 the noise level uses the next grid value instead of an infinite σ/(1−σ).
    assert sde_coefficients(1.0, 0.8, a)[3] == pytest.approx(a * math.sqrt(0.8 / 0.2))
    # With a = 0 the SDE step is the deterministic Euler step.
    assert sde_coefficients(sigma, s, 0.0)[:3] == pytest.approx((1.0, dt, 0.0))


def test_step_logp_equals_closed_form_gaussian():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    mean = sde_mean(x, v, *sde_coefficients(0.7, 0.55, 0.7)[:2])
    std = sde_coefficients(0.7, 0.55, 0.7)[2]
    x_next = mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float64)
    dist = torch.distributions.Normal(mean, std)
    expected = dist.log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_logp(x_next, mean, std).double(), expected, rtol=1e-5, atol=1e-5)


def test_sampler_logps_are_those_of_the_stored_steps():
    g = torch.Generator().manual_seed(1)
    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.0])

    def velocity(x, t):
        return -0.3 * x + t.view(-1, 1, 1, 1)

    traj = sample_sde(velocity, torch.randn(4, 1, 3, 3, generator=g), sigmas, 0.7, g)
    assert traj.xs.shape == (4, 4, 1, 3, 3) and traj.logps.shape == (4, 3)
    for k in range(3):
        s0, s1 = float(sigmas[k]), float(sigmas[k + 1])
        mean = sde_mean(traj.xs[:, k], velocity(traj.xs[:, k], sigmas[k].expand(4)), *sde_coefficients(s0, s1, 0.7)[:2])
        std = sde_coefficients(s0, s1, 0.7)[2]
        torch.testing.assert_close(traj.logps[:, k], gaussian_logp(traj.xs[:, k + 1], mean, std))


def test_ratio_is_one_on_the_first_update_and_ppo_clip():
    g = torch.Generator().manual_seed(2)
    logp_old = torch.randn(8, generator=g)
    adv = torch.randn(8, generator=g)
    logp = logp_old.clone().requires_grad_(True)
    loss, metrics = grpo_loss(logp, logp_old, adv, clip_range=1e-4)
    assert float(metrics["ratio"]) == 1.0 and float(metrics["clipfrac"]) == 0.0
    assert float(loss) == pytest.approx(float(-adv.mean()))
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 8)  # ∂(−A·r)/∂logp at r = 1
    # r far above 1 + ε: for A > 0 the clipped term is the max (no gradient: no further push);
    # for A < 0 the unclipped term is the max, so the gradient still pulls r back down.
    logp2 = (logp_old + 1.0).requires_grad_(True)
    loss2, metrics2 = grpo_loss(logp2, logp_old, adv, clip_range=1e-4)
    loss2.backward()
    assert float(metrics2["clipfrac"]) == 1.0
    assert torch.all(logp2.grad[adv > 0] == 0) and torch.all(logp2.grad[adv < 0] != 0)


def test_group_advantages():
    R = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    adv = group_advantages(R, group_size=3, global_std=2.0, clip=5.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.0, 0.5, -5.0, -5.0, 5.0]))


def test_per_row_mean_equals_per_step_mean():
    """The training loss's per-row SDE mean (one step per element) equals each step's scalar mean."""
    g = torch.Generator().manual_seed(3)
    sig = [1.0, 0.8, 0.5, 0.2, 0.0]
    k = torch.tensor([0, 2, 1, 3, 2])
    x, v = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    coef = torch.tensor([sde_coefficients(sig[i], sig[i + 1], 0.7) for i in range(4)])
    x_w, v_w, _, _ = coef[k].T
    got = sde_mean(x, v, x_w, v_w)
    for row, step in enumerate(k.tolist()):
        c = sde_coefficients(sig[step], sig[step + 1], 0.7)
        torch.testing.assert_close(got[row], x[row] * c[0] + v[row] * c[1])
