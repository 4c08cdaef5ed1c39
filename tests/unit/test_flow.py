"""Flow-matching math: shift, schedule, Euler, CFG, noising, training sigmas."""

from __future__ import annotations

import math

import pytest
import torch

from cinetune.core.flow import (
    add_noise,
    apply_cfg,
    euler_step,
    logit_normal_sigmas,
    shift_sigmas,
    sigma_schedule,
    velocity_target,
)


@pytest.mark.parametrize(
    "shift, sigma, expected",
    [
        (3.0, 0.5, 0.75),  # 1.5 / 2
        (5.0, 0.2, 1.0 / 1.8),  # 1.0 / (1 + 0.8)
        (10.0, 0.1, 1.0 / 1.9),  # 1.0 / (1 + 0.9)
        (0.5, 0.5, 1.0 / 3.0),  # 0.25 / 0.75
        (1.0, 0.37, 0.37),  # identity
        (7.0, 0.0, 0.0),
        (7.0, 1.0, 1.0),
    ],
)
def test_shift_matches_hand_computed_values(shift, sigma, expected):
    out = shift_sigmas(torch.tensor([sigma], dtype=torch.float64), shift)
    assert out.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shift", [5.0, 10.0])
def test_sigma_schedule_four_steps(shift):
    grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    expected = torch.tensor([shift * s / (1.0 + (shift - 1.0) * s) for s in grid], dtype=torch.float32)
    sigmas = sigma_schedule(4, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (5,)
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-7)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0


def test_sigma_schedule_shift_five_spot_values():
    # 5·0.75/(1+4·0.75) = 3.75/4, 5·0.5/3, 5·0.25/2
    assert sigma_schedule(4, 5.0)[1:4].tolist() == pytest.approx([0.9375, 2.5 / 3.0, 0.625], abs=1e-7)


@pytest.mark.parametrize("shift", [0.1, 1.0, 3.3, 7.0, 12.5])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_sigma_schedule_endpoints_exact_and_strictly_decreasing(steps, shift):
    sigmas = sigma_schedule(steps, shift)
    assert sigmas.shape == (steps + 1,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_sigma_schedule_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        sigma_schedule(steps, 5.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan, math.inf])
def test_shift_rejects_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        sigma_schedule(4, shift)


@pytest.mark.parametrize("steps", [1, 2, 5, 16])
def test_euler_with_constant_velocity_reaches_x0_exactly(steps):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    v = noise - x0  # the straight path has constant velocity
    sigmas = sigma_schedule(steps, 3.0).double()
    x = noise.clone()
    for i in range(steps):
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        # every intermediate point lies on the path x_σ = (1−σ)x0 + σε
        torch.testing.assert_close(x, (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


def test_euler_step_formula_and_per_sample_sigmas():
    x = torch.ones(2, 3)
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = euler_step(x, v, torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.0]))
    # sample 0: dt = −0.25; sample 1: dt = −0.5
    expected = torch.tensor([[0.75, 0.5, 0.25], [-1.0, -1.5, -2.0]])
    torch.testing.assert_close(out, expected)
    assert euler_step(x, v, 0.5, 0.25).sub(1 - 0.25 * v).abs().max() < 1e-7


def test_euler_step_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        euler_step(torch.zeros(2, 3), torch.zeros(2, 4), 1.0, 0.5)
    with pytest.raises(ValueError, match="per sample"):
        euler_step(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 1.0, 1.0]), 0.5)


def test_apply_cfg():
    vc = torch.tensor([1.0, 2.0, -3.0])
    vu = torch.tensor([0.5, -1.0, 1.0])
    torch.testing.assert_close(apply_cfg(vc, vu, 1.0), vc)
    torch.testing.assert_close(apply_cfg(vc, vu, 0.0), vu)
    torch.testing.assert_close(apply_cfg(vc, vu, 5.0), torch.tensor([3.0, 14.0, -19.0]))
    with pytest.raises(ValueError, match="same shape"):
        apply_cfg(vc, vu[:2], 5.0)
    with pytest.raises(ValueError, match="finite"):
        apply_cfg(vc, vu, math.nan)


def test_add_noise_endpoints_and_per_sample_sigma():
    x0 = torch.full((3, 2, 2), 2.0)
    noise = torch.full((3, 2, 2), -1.0)
    torch.testing.assert_close(add_noise(x0, noise, 0.0), x0)
    torch.testing.assert_close(add_noise(x0, noise, 1.0), noise)
    out = add_noise(x0, noise, torch.tensor([0.0, 0.25, 1.0]))
    assert out[0].unique().tolist() == [2.0]
    assert out[1].unique().tolist() == [0.75 * 2.0 - 0.25]
    assert out[2].unique().tolist() == [-1.0]


def test_velocity_target_is_derivative_of_noising_path():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    h = 1e-6
    numeric = (add_noise(x0, noise, 0.4 + h) - add_noise(x0, noise, 0.4 - h)) / (2 * h)
    torch.testing.assert_close(velocity_target(x0, noise), numeric, rtol=0, atol=1e-8)
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)


def test_logit_normal_sigmas_distribution_and_shift():
    a = logit_normal_sigmas(20000, generator=torch.Generator().manual_seed(3))
    b = logit_normal_sigmas(20000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (20000,)
    assert bool(((a > 0) & (a < 1)).all())
    # sigmoid(N(0,1)) has median sigmoid(0) = 0.5; the shift maps the median through the shift formula
    assert a.median().item() == pytest.approx(0.5, abs=0.02)
    shifted = logit_normal_sigmas(20000, shift=3.0, generator=torch.Generator().manual_seed(4))
    assert shifted.median().item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.02)
    with pytest.raises(ValueError, match="batch"):
        logit_normal_sigmas(0)
    with pytest.raises(ValueError, match="std"):
        logit_normal_sigmas(4, std=0.0)
