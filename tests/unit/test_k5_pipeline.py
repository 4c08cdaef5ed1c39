"""Kandinsky 5 sampling pipeline with small fake models: sampler math, CFG, I2V, sizes, start images."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cinetune.k5.conditioning import K5TextEmbeds
from cinetune.k5.pipeline import (
    SizeError,
    latent_shape,
    normalize_first_frames,
    prepare_start_image,
    sample,
    validate_video_size,
)

# Small video: 32×16 px, 17 frames → latent [1, 16, 5, 2, 4]
W, H, FRAMES = 32, 16, 17
LATENT = (1, 16, 5, 2, 4)
TEXT_DIM = 8


@pytest.fixture
def scaling_factor(monkeypatch):
    """The model-space scale from ``k5/vae.py``, or a stand-in with the documented value while it is absent."""
    try:
        from cinetune.k5.vae import SCALING_FACTOR
    except ModuleNotFoundError as exc:
        if exc.name != "cinetune.k5.vae":
            raise
        SCALING_FACTOR = 0.476986  # HunyuanVideo VAE config scaling_factor
        stub = types.ModuleType("cinetune.k5.vae")
        stub.SCALING_FACTOR = SCALING_FACTOR
        monkeypatch.setitem(sys.modules, "cinetune.k5.vae", stub)
    return SCALING_FACTOR


def embeds(seed: int, length: int = 3) -> K5TextEmbeds:
    gen = torch.Generator().manual_seed(seed)
    return K5TextEmbeds(torch.randn(1, length, TEXT_DIM, generator=gen), torch.ones(1, length, dtype=torch.bool),
                        torch.randn(1, 768, generator=gen))


class FakeDiT:
    """Records every call; ``velocity(x, text, pooled, sigma)`` gives the output."""

    def __init__(self, velocity, visual_embed_dim: int = 33):
        self.config = SimpleNamespace(visual_embed_dim=visual_embed_dim)
        self.velocity = velocity
        self.calls: list[dict] = []

    def __call__(self, x, text, pooled, timestep, *, text_mask=None, rope_scale=None, attention_backend=None,
                 nabla=None):
        self.calls.append(dict(x=x.clone(), text=text, pooled=pooled, timestep=timestep.clone(), text_mask=text_mask,
                               rope_scale=rope_scale, attention_backend=attention_backend, nabla=nabla))
        sigma = timestep.double() / 1000.0
        return self.velocity(x, text, pooled, sigma.view(-1, 1, 1, 1, 1)).to(x.dtype)


def oracle(x0: torch.Tensor) -> FakeDiT:
    """Exact velocity towards a fixed clean latent: on the path x = (1−σ)x0 + σε, (x − x0)/σ = ε − x0."""
    return FakeDiT(lambda x, text, pooled, sigma: (x[:, :16].double() - x0.double()) / sigma)


def run(model, **overrides):
    kwargs = dict(width=W, height=H, frames=FRAMES, seed=11, steps=4, guidance=1.0, scheduler_scale=5.0)
    kwargs.update(overrides)
    positive = kwargs.pop("positive", embeds(1))
    negative = kwargs.pop("negative", embeds(2, length=5))
    return sample(model, positive, negative, **kwargs)


# ---------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("w, h, f, nabla", [(768, 512, 121, False), (512, 768, 241, True), (1280, 768, 1, True),
                                            (16, 16, 5, False)])
def test_valid_sizes_pass(w, h, f, nabla):
    validate_video_size(w, h, f, nabla=nabla)


@pytest.mark.parametrize(
    "w, h, f, nabla, message",
    [
        (500, 512, 121, False, "width 500 is not a multiple of 16: use 496 or 512"),
        (768, 520, 121, False, "height 520 is not a multiple of 16: use 512 or 528"),
        (8, 512, 121, False, "width 8 is too small: use 16 or more"),
        (700, 512, 121, True, "width 700 is not a multiple of 128 (NABLA attention needs multiples of 128): "
                              "use 640 or 768"),
        (768, 496, 121, True, "height 496 is not a multiple of 128"),
        (768, 512, 10, False, "frames 10 is not of the form 4k+1: use 9 or 13"),
        (768, 512, 120, False, "use 117 or 121"),
        (768, 512, 0, False, "frames 0 is too small"),
    ],
)
def test_size_errors_name_nearest_valid_values(w, h, f, nabla, message):
    with pytest.raises(SizeError) as info:
        validate_video_size(w, h, f, nabla=nabla)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_size_error_lists_every_problem():
    with pytest.raises(SizeError) as info:
        validate_video_size(500, 250, 10, nabla=False)
    text = str(info.value)
    assert "width 500" in text and "height 250" in text and "frames 10" in text


def test_size_must_be_integer():
    with pytest.raises(SizeError, match="width must be an integer"):
        validate_video_size(768.0, 512, 121, nabla=False)


def test_latent_shape_of_official_sizes():
    # official K5: 5 s = 121 frames = 31 latent frames; 10 s = 241 frames = 61 latent frames; VAE ×8 spatial
    assert latent_shape(768, 512, 121) == (16, 31, 64, 96)
    assert latent_shape(512, 768, 241) == (16, 61, 96, 64)
    assert latent_shape(512, 512, 1) == (16, 1, 64, 64)


# ---------------------------------------------------------------------------------------------------- start image


def test_prepare_start_image_covers_then_center_crops():
    # 100×200 (H×W) image, left half black, right half white; target 64×64: scaled to 64×128, crop columns 32..95
    image = torch.zeros(100, 200, 3)
    image[:, 100:] = 1.0
    out = prepare_start_image(image, 64, 64)
    assert out.shape == (1, 3, 1, 64, 64) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.allclose(out[..., :30], torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(out[..., 34:], torch.tensor(1.0), atol=1e-6)
    # the edge sits in the middle of the crop
    assert out[0, 0, 0, 0, 31] < 0 < out[0, 0, 0, 0, 32]


def test_prepare_start_image_uses_first_of_batch_and_keeps_values():
    batch = torch.stack([torch.full((16, 24, 3), 0.25), torch.full((16, 24, 3), 0.75)])
    out = prepare_start_image(batch, 24, 16)
    torch.testing.assert_close(out, torch.full((1, 3, 1, 16, 24), -0.5))


def test_prepare_start_image_channel_order_and_upscale():
    image = torch.zeros(10, 10, 3)
    image[..., 0] = 1.0  # pure red
    out = prepare_start_image(image, 48, 32)
    assert out.shape == (1, 3, 1, 32, 48)
    torch.testing.assert_close(out[0, :, 0, 16, 24], torch.tensor([1.0, -1.0, -1.0]))


@pytest.mark.parametrize("shape", [(10, 10, 4), (10, 10), (2, 3, 10, 10, 3), (0, 10, 10, 3)])
def test_prepare_start_image_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="the image"):
        prepare_start_image(torch.zeros(shape), 64, 64)


# ---------------------------------------------------------------------------------------------------- first frames


def reference_normalize(latent: np.ndarray) -> np.ndarray:
    """The official formula written directly, per sample, on the official [T, H, W, C] layout (float64)."""
    out = latent.copy()
    for b in range(latent.shape[0]):
        frames = np.transpose(latent[b], (1, 2, 3, 0))  # [T, H, W, C]
        ref = frames[4:9]
        ref_mean, ref_std = ref.mean(), ref.std(ddof=1)
        for t in range(4):
            frame = frames[t]
            mean, std = frame.mean(), frame.std(ddof=1)
            target_mean = min(max(ref_mean, mean - 0.05), mean + 0.10)
            target_std = min(max(ref_std, std - 0.10), std + 0.25)
            new = (frame - mean) / std * target_std + target_mean
            out[b, :, t] = np.transpose(new, (2, 0, 1))
    return out


@pytest.mark.parametrize("frames", [5, 7, 12])
def test_normalize_first_frames_matches_formula(frames):
    gen = torch.Generator().manual_seed(frames)
    latent = torch.randn(2, 16, frames, 3, 4, generator=gen, dtype=torch.float64)
    # first frames: sample 0 close to the reference stats (no clamping), sample 1 far away (clamps active)
    latent[0, :, :4] = latent[0, :, :4] * 1.05 + 0.02
    latent[1, :, :4] = latent[1, :, :4] * 3.0 - 2.0
    out = normalize_first_frames(latent)
    expected = reference_normalize(latent.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    assert torch.equal(out[:, :, 4:], latent[:, :, 4:])
    assert not torch.equal(out[:, :, :4], latent[:, :, :4])


def test_normalize_first_frames_clamps_limit_the_change():
    latent = torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    latent[:, :, :4] += 5.0  # reference mean ≈ 0, far below: the mean may drop by at most 0.05
    out = normalize_first_frames(latent)
    before = latent[0, :, :4].mean(dim=(0, 2, 3))
    after = out[0, :, :4].mean(dim=(0, 2, 3))
    torch.testing.assert_close(after, before - 0.05, rtol=0, atol=1e-10)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_normalize_first_frames_leaves_short_latents_unchanged(frames):
    latent = torch.randn(1, 16, frames, 2, 2)
    assert torch.equal(normalize_first_frames(latent), latent)


def test_normalize_first_frames_keeps_dtype_and_input():
    latent = torch.randn(1, 16, 6, 2, 2).to(torch.bfloat16)
    copy = latent.clone()
    out = normalize_first_frames(latent)
    assert out.dtype == torch.bfloat16 and torch.equal(latent, copy)


# ---------------------------------------------------------------------------------------------------- sampling


def target_latent() -> torch.Tensor:
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(99))


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (4, 5.0), (9, 10.0)])
def test_oracle_model_recovers_target(scaling_factor, steps, shift):
    x0 = target_latent()
    model = oracle(x0)
    out = run(model, steps=steps, scheduler_scale=shift, guidance=4.0)
    assert out.shape == LATENT and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, x0 / scaling_factor, rtol=0, atol=1e-5)


def test_model_inputs_for_text_to_video(scaling_factor):
    model = FakeDiT(lambda x, text, pooled, sigma: torch.zeros_like(x[:, :16]))
    positive = embeds(1)
    run(model, steps=3, scheduler_scale=5.0, positive=positive, dtype=torch.float64,
        rope_scale=(1.0, 3.16, 3.16), attention_backend="flex")
    assert len(model.calls) == 3
    grid = [1.0, 2 / 3, 1 / 3]
    for call, s in zip(model.calls, grid):
        x = call["x"]
        assert x.shape == (1, 33, 5, 2, 4) and x.dtype == torch.float64
        assert torch.count_nonzero(x[:, 16:]) == 0  # cond channels and mask are zero for T2V
        assert call["timestep"].shape == (1,)
        assert call["timestep"].item() == pytest.approx(1000 * 5 * s / (1 + 4 * s), rel=1e-6)
        assert call["text"].dtype == torch.float64 and torch.equal(call["text"], positive.text.double())
        assert call["rope_scale"] == (1.0, 3.16, 3.16) and call["attention_backend"] == "flex"
        assert call["nabla"] is None and call["text_mask"].dtype == torch.bool


def test_noise_comes_from_cpu_generator(scaling_factor):
    # a zero velocity leaves the initial noise untouched
    model = FakeDiT(lambda x, text, pooled, sigma: torch.zeros_like(x[:, :16]))
    out = run(model, seed=1234)
    noise = torch.randn(LATENT, generator=torch.Generator("cpu").manual_seed(1234), dtype=torch.float32)
    torch.testing.assert_close(out, noise / scaling_factor, rtol=1e-6, atol=0)


def test_seed_determinism(scaling_factor):
    def model():
        return FakeDiT(lambda x, text, pooled, sigma: 0.3 * x[:, :16] + text.mean())

    a = run(model(), seed=5, guidance=3.0)
    b = run(model(), seed=5, guidance=3.0)
    c = run(model(), seed=6, guidance=3.0)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_cfg_matches_manual_combination(scaling_factor):
    positive, negative = embeds(1), embeds(2, length=5)

    def velocity(x, text, pooled, sigma):
        return 0.2 * x[:, :16] + text.mean() * 3.0 + pooled[:, :16].mean() - sigma.float()

    model = FakeDiT(velocity)
    steps, guidance, shift, seed = 5, 4.5, 3.0, 21
    out = run(model, positive=positive, negative=negative, steps=steps, guidance=guidance, scheduler_scale=shift,
              seed=seed)
    assert len(model.calls) == 2 * steps
    assert all(torch.equal(c["text"], (positive if i % 2 == 0 else negative).text) for i, c in enumerate(model.calls))

    x = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed)).double()
    grid = [shift * s / (1 + (shift - 1) * s) for s in np.linspace(1.0, 0.0, steps + 1)]
    for i in range(steps):
        sig = torch.tensor(grid[i], dtype=torch.float64)
        v_c = velocity(x, positive.text.double(), positive.pooled.double(), sig).double()
        v_u = velocity(x, negative.text.double(), negative.pooled.double(), sig).double()
        x = x + (grid[i + 1] - grid[i]) * (v_u + guidance * (v_c - v_u))
    torch.testing.assert_close(out.double(), x / scaling_factor, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 1.0 + 5e-7])
def test_guidance_one_makes_one_call_per_step(scaling_factor, guidance):
    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :16] * 0.1)
    run(model, steps=6, guidance=guidance, negative=None)
    assert len(model.calls) == 6


def test_cfg_without_negative_is_an_error(scaling_factor):
    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :16])
    with pytest.raises(ValueError, match="negative prompt"):
        run(model, guidance=5.0, negative=None)
    assert model.calls == []


def test_callback_reports_every_step(scaling_factor):
    seen = []
    run(FakeDiT(lambda x, text, pooled, sigma: x[:, :16]), steps=7, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 7) for i in range(1, 8)]


@pytest.mark.parametrize("guidance, stop_at, expected_calls", [(1.0, 3, 2), (5.0, 4, 3), (5.0, 1, 0)])
def test_check_interrupt_stops_immediately(scaling_factor, guidance, stop_at, expected_calls):
    class Interrupted(Exception):
        pass

    checks = []

    def check():
        checks.append(1)
        if len(checks) == stop_at:
            raise Interrupted

    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :16])
    with pytest.raises(Interrupted):
        run(model, steps=10, guidance=guidance, check_interrupt=check)
    assert len(model.calls) == expected_calls


def test_image_to_video_conditioning(scaling_factor):
    x0 = target_latent()
    start_raw = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(5))
    clean = start_raw[:, :, :1] * scaling_factor
    model = oracle(x0)
    out = run(model, start_latent=start_raw, steps=5, guidance=3.0)
    assert len(model.calls) == 10
    for call in model.calls:
        x = call["x"]
        torch.testing.assert_close(x[:, :16, :1], clean, rtol=0, atol=1e-6)
        assert not torch.equal(x[:, :16, 1:2], x0[:, :, 1:2])  # later frames are still noisy inputs
        assert torch.count_nonzero(x[:, 16:32]) == 0
        mask = x[:, 32]
        assert bool((mask[:, 0] == 1).all()) and torch.count_nonzero(mask[:, 1:]) == 0
    expected = x0.clone()
    expected[:, :, :1] = clean
    torch.testing.assert_close(out, normalize_first_frames(expected) / scaling_factor, rtol=0, atol=1e-5)


def test_image_to_video_cond_channels_option(scaling_factor):
    start_raw = torch.randn(1, 16, 1, 2, 4, generator=torch.Generator().manual_seed(5))
    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :16])
    run(model, start_latent=start_raw, i2v_cond_channels=True, steps=2)
    for call in model.calls:
        x = call["x"]
        torch.testing.assert_close(x[:, 16:32, :1], start_raw * scaling_factor)
        torch.testing.assert_close(x[:, :16, :1], start_raw * scaling_factor)
        assert torch.count_nonzero(x[:, 16:32, 1:]) == 0


def test_bad_start_latent_is_rejected(scaling_factor):
    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :16])
    with pytest.raises(ValueError, match=r"start_latent must be a raw VAE latent \[1, 16, ≥1, 2, 4\]"):
        run(model, start_latent=torch.zeros(1, 16, 1, 4, 4))


def test_size_is_checked_before_sampling(scaling_factor):
    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :16])
    with pytest.raises(SizeError, match="use 16 or 32"):
        run(model, width=24)
    with pytest.raises(SizeError, match="width 32 is too small: use 128 or more"):
        run(model, nabla=object())
    assert model.calls == []


def test_wrong_model_output_shape_is_reported(scaling_factor):
    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :8])
    with pytest.raises(ValueError, match="model returned shape"):
        run(model)


def test_prompt_batch_must_be_one(scaling_factor):
    two = K5TextEmbeds(torch.zeros(2, 3, TEXT_DIM), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 768))
    with pytest.raises(ValueError, match="batch 1"):
        run(FakeDiT(lambda x, text, pooled, sigma: x[:, :16]), positive=two)


def test_model_without_cond_channels_gets_latent_only(scaling_factor):
    model = FakeDiT(lambda x, text, pooled, sigma: torch.zeros_like(x), visual_embed_dim=16)
    run(model, steps=2)
    assert model.calls[0]["x"].shape == LATENT
    with pytest.raises(ValueError, match="image-to-video needs"):
        run(model, start_latent=torch.zeros(1, 16, 1, 2, 4))


def test_low_precision_model_dtype_returns_float32(scaling_factor):
    model = FakeDiT(lambda x, text, pooled, sigma: x[:, :16] * 0.5)
    out = run(model, dtype=torch.bfloat16, steps=2, guidance=2.0)
    assert all(c["x"].dtype == torch.bfloat16 and c["text"].dtype == torch.bfloat16 for c in model.calls)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------- on_step


def test_on_step_reports_the_clean_estimate_as_a_raw_latent(scaling_factor):
    x0 = target_latent()  # model space
    seen = []
    run(oracle(x0), steps=5, guidance=4.0, on_step=lambda i, n, latent: seen.append((i, n, latent.clone())))
    assert [(i, n) for i, n, _ in seen] == [(i, 5) for i in range(1, 6)]
    for _, _, latent in seen:  # the exact velocity predicts the target at every step
        assert latent.shape == LATENT and latent.dtype == torch.float32
        torch.testing.assert_close(latent, x0 / scaling_factor, rtol=0, atol=1e-5)


def test_on_step_estimate_is_x_minus_sigma_velocity(scaling_factor):
    seen = []
    # v = x: the estimate x − σ·v is (1 − σ)·x, all zeros at the first sigma (σ = 1).
    run(FakeDiT(lambda x, text, pooled, sigma: x[:, :16]), steps=3, on_step=lambda i, n, latent: seen.append(latent))
    assert len(seen) == 3
    assert torch.count_nonzero(seen[0]) == 0
    assert torch.count_nonzero(seen[1]) > 0


def test_on_step_holds_the_start_frame_in_image_to_video(scaling_factor):
    start_raw = torch.randn(1, 16, 1, 2, 4, generator=torch.Generator().manual_seed(5))
    seen = []
    run(FakeDiT(lambda x, text, pooled, sigma: x[:, :16]), start_latent=start_raw, steps=3,
        on_step=lambda i, n, latent: seen.append(latent))
    for latent in seen:
        torch.testing.assert_close(latent[:, :, :1], start_raw, rtol=0, atol=1e-6)
