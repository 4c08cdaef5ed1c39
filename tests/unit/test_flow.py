"""Flow-matching math: shift, schedules (incl. token-count shift), Euler, x0/velocity, CFG, noising,
training sigmas."""

from __future__ import annotations

import math

import pytest
import torch

from cinetune.core.flow import (
    add_noise,
    apply_cfg,
    euler_step,
    exponential_time_shift,
    logit_normal_sigmas,
    shift_sigmas,
    sigma_schedule,
    stretch_to_terminal,
    token_count_shift,
    token_shift_sigmas,
    velocity_from_x0,
    velocity_target,
    x0_from_velocity,
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


# --- token-count shift schedule (LTX-2 LTX2Scheduler / ComfyUI LTXVScheduler) ---------------------------------


def _diffusers_ltx2_sigmas(steps: int, mu: float) -> torch.Tensor:
    """Sigmas of diffusers' LTX-2 pipeline: its scheduler config, fed ``linspace(1, 1/steps, steps)`` and ``mu``."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("steps", [2, 8, 20, 40])
def test_token_shift_sigmas_match_diffusers_at_the_official_fixed_shift(steps):
    # diffusers evaluates only the nonzero grid points (linspace(1, 1/steps, steps)) and appends the final 0
    # itself, so both grids are linspace(1, 0, steps + 1); diffusers computes in float32, we in float64.
    ref = _diffusers_ltx2_sigmas(steps, mu=2.05)
    ours = token_shift_sigmas(steps)
    assert ours.shape == ref.shape == (steps + 1,) and ours.dtype == torch.float32
    assert ours[-1].item() == ref[-1].item() == 0.0
    rel = ((ours[:-1].double() - ref[:-1].double()).abs() / ref[:-1].double()).max().item()
    assert rel < 1e-5


@pytest.mark.parametrize("tokens", [256, 1024, 3570, 6144])
def test_token_shift_sigmas_with_tokens_match_diffusers_dynamic_shift(tokens):
    from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

    mu = calculate_shift(tokens, 1024, 4096, 0.95, 2.05)
    assert token_count_shift(tokens) == pytest.approx(mu, rel=1e-12)
    ref = _diffusers_ltx2_sigmas(12, mu=mu)
    ours = token_shift_sigmas(12, tokens=tokens)
    assert ((ours[:-1].double() - ref[:-1].double()).abs() / ref[:-1].double()).max().item() < 1e-5


@pytest.mark.parametrize("tokens, steps, terminal", [(1, 5, 0.1), (2000, 9, 0.1), (24576, 16, 0.25)])
def test_token_shift_sigmas_equal_formula_computed_independently(tokens, steps, terminal):
    slope = (2.05 - 0.95) / (4096 - 1024)
    mu = tokens * slope + 0.95 - slope * 1024
    shifted = [0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in
               (1 - i / steps for i in range(steps + 1))]
    last = shifted[-2]
    expected = [0.0 if s == 0 else 1 - (1 - s) / ((1 - last) / (1 - terminal)) for s in shifted]
    ours = token_shift_sigmas(steps, tokens=tokens, terminal=terminal)
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert ours[-2].item() == pytest.approx(terminal, abs=1e-7)
    unstretched = token_shift_sigmas(steps, tokens=tokens, stretch=False)
    torch.testing.assert_close(unstretched, torch.tensor(shifted, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def test_token_shift_sigmas_quoted_official_values():
    # values quoted for LTX2Scheduler.execute(40) / execute(20) with no latent (fixed shift 2.05)
    s40 = token_shift_sigmas(40).tolist()
    assert s40[:3] == pytest.approx([1.0, 0.9964, 0.9927], abs=1e-4)
    assert s40[-6:] == pytest.approx([0.4884, 0.4207, 0.3378, 0.2339, 0.1, 0.0], abs=1e-4)
    s20 = token_shift_sigmas(20).tolist()
    assert s20[:2] == pytest.approx([1.0, 0.9915], abs=1e-4)
    assert s20[-5:] == pytest.approx([0.5690, 0.4652, 0.3194, 0.1, 0.0], abs=1e-4)
    assert s40[0] == 1.0 and s40[-1] == 0.0 and all(a > b for a, b in zip(s40, s40[1:]))


def test_token_count_shift_line_and_none_means_max_tokens():
    assert token_count_shift(1024) == pytest.approx(0.95)
    assert token_count_shift(4096) == pytest.approx(2.05)
    assert token_count_shift(2560) == pytest.approx(1.5)
    assert token_count_shift(10, base_tokens=0, max_tokens=20, base_shift=1.0, max_shift=3.0) == pytest.approx(2.0)
    assert torch.equal(token_shift_sigmas(10), token_shift_sigmas(10, tokens=4096))
    assert not torch.equal(token_shift_sigmas(10), token_shift_sigmas(10, tokens=1024))


def test_exponential_time_shift_is_the_flow_shift_with_k_exp_mu():
    sigmas = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    out = exponential_time_shift(sigmas, 1.3)
    expected = [0.0] + [math.exp(1.3) / (math.exp(1.3) + 1 / s - 1) for s in (0.1, 0.5, 0.9, 1.0)]
    assert out.tolist() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(exponential_time_shift(sigmas, 0.0), sigmas)
    with pytest.raises(ValueError, match="mu"):
        exponential_time_shift(sigmas, math.nan)


def test_stretch_to_terminal_keeps_one_and_zeros():
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.0, 0.0], dtype=torch.float64)
    out = stretch_to_terminal(sigmas, 0.2)
    # 1 − σ scaled by (1 − 0.2)/(1 − 0.6) = 2: 0.8 → 0.6, 0.6 → 0.2
    assert out.tolist() == pytest.approx([1.0, 0.6, 0.2, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=1), "2 steps"),
    (dict(steps=4, terminal=0.0), "terminal"),
    (dict(steps=4, terminal=1.0), "terminal"),
    (dict(steps=4, tokens=0), "tokens"),
    (dict(steps=4, base_tokens=7, max_tokens=7), "differ"),
    (dict(steps=0), "steps"),
])
def test_token_shift_sigmas_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_shift_sigmas(**kwargs)


def test_token_shift_sigmas_one_step_without_stretch():
    assert token_shift_sigmas(1, stretch=False).tolist() == [1.0, 0.0]


def test_x0_velocity_round_trip_with_per_token_sigma():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    sigma = torch.rand(2, 5, 1, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    x = (1 - sigma) * x0 + sigma * noise
    torch.testing.assert_close(x0_from_velocity(x, noise - x0, sigma), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(velocity_from_x0(x, x0, sigma), noise - x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_from_velocity(x, noise - x0, 0.0), x)
    with pytest.raises(ValueError, match="nonzero"):
        velocity_from_x0(x, x0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        x0_from_velocity(x, noise[:, :4], sigma)
