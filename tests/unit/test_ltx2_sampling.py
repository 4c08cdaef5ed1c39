"""LTX-2 sampling: constants, guidance params, multimodal guider, the audio-video Euler loop with denoise
masks, noise and conditioning helpers. The DiT is replaced by analytic denoisers."""

from __future__ import annotations

import math

import pytest
import torch

from cinetune.core.flow import token_shift_sigmas
from cinetune.ltx2.sampling import (
    DISTILLED_SIGMAS,
    STAGE_2_DISTILLED_SIGMAS,
    STAGE_2_NOISE_SIGMA,
    GuidanceParams,
    condition_tokens,
    initial_noise,
    ltx2_sigmas,
    multimodal_guidance,
    noise_tokens,
    renoise_for_stage_2,
    sample_av,
)

B, NV, NA, C = 2, 12, 5, 8  # 3 latent frames of 2×2 video tokens; tiny feature size


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- constants and schedules ---------------------------------------------------------------------------------


def test_distilled_sigmas_match_diffusers_constants():
    from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES

    # diffusers stores the nonzero sigmas only (its scheduler appends the 0)
    assert list(DISTILLED_SIGMAS) == [*DISTILLED_SIGMA_VALUES, 0.0] and len(DISTILLED_SIGMAS) == 9
    assert list(STAGE_2_DISTILLED_SIGMAS) == [*STAGE_2_DISTILLED_SIGMA_VALUES, 0.0]
    assert STAGE_2_NOISE_SIGMA == 0.909375


def test_ltx2_sigmas_are_the_official_dev_schedule():
    assert torch.equal(ltx2_sigmas(40), token_shift_sigmas(40))
    assert torch.equal(ltx2_sigmas(20, tokens=6144), token_shift_sigmas(20, tokens=6144))
    assert ltx2_sigmas(40)[-2].item() == pytest.approx(0.1)


# --- guidance params -----------------------------------------------------------------------------------------


def test_guidance_presets_are_the_official_19b_values():
    v, a, n = GuidanceParams.dev_video(), GuidanceParams.dev_audio(), GuidanceParams.none()
    assert (v.cfg, v.stg, v.stg_blocks, v.rescale, v.modality) == (3.0, 1.0, (29,), 0.7, 3.0)
    assert (a.cfg, a.stg, a.stg_blocks, a.rescale, a.modality) == (7.0, 1.0, (29,), 0.7, 3.0)
    assert GuidanceParams() == v
    assert v.uses_cfg and v.uses_stg and v.uses_modality
    assert not (n.uses_cfg or n.uses_stg or n.uses_modality)
    assert GuidanceParams(stg_blocks=[3, 5]).stg_blocks == (3, 5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg=math.nan), "cfg"),
    (dict(rescale="0.7"), "rescale"),
    (dict(stg_blocks=(-1,)), "stg_blocks"),
    (dict(stg_blocks=29), "stg_blocks"),
    (dict(stg=1.0, stg_blocks=()), "needs at least one block"),
])
def test_guidance_params_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceParams(**kwargs)


# --- multimodal guider ---------------------------------------------------------------------------------------


def _guided_reference(c, u, p, i, cfg, stg, mod, r):
    c, u, p, i = (t.double() for t in (c, u, p, i))
    pred = c + (cfg - 1) * (c - u) + stg * (c - p) + (mod - 1) * (c - i)
    if r:
        pred = pred * (r * c.std() / pred.std() + 1 - r)
    return pred


@pytest.mark.parametrize("cfg, stg, mod, r", [(3.0, 1.0, 3.0, 0.7), (7.0, 1.0, 3.0, 0.7), (4.0, 0.0, 1.0, 0.0),
                                              (2.5, 0.5, 1.5, 1.0)])
def test_multimodal_guidance_matches_direct_recomputation(cfg, stg, mod, r):
    c, u, p, i = (_rand(B, NV, C, seed=s) for s in range(4))
    params = GuidanceParams(cfg=cfg, stg=stg, stg_blocks=(1,) if stg else (), rescale=r, modality=mod)
    out = multimodal_guidance(c, u, p, i, params)
    assert out.dtype == torch.float32 and out.shape == c.shape
    torch.testing.assert_close(out.double(), _guided_reference(c, u, p, i, cfg, stg, mod, r), rtol=1e-5, atol=1e-5)
    if r == 1.0:  # full rescale restores the conditional prediction's global std
        assert out.std().item() == pytest.approx(c.std().item(), rel=1e-5)


def test_multimodal_guidance_skips_vanishing_terms():
    c, u = _rand(1, 4, 3, seed=1), _rand(1, 4, 3, seed=2)
    assert torch.equal(multimodal_guidance(c, None, None, None, GuidanceParams.none()), c)
    # rescale without any active term leaves the prediction untouched
    only_rescale = GuidanceParams(cfg=1.0, stg=0.0, stg_blocks=(), rescale=0.7, modality=1.0)
    assert torch.equal(multimodal_guidance(c, None, None, None, only_rescale), c)
    cfg_only = GuidanceParams(cfg=4.0, stg=0.0, stg_blocks=(), rescale=0.0, modality=1.0)
    torch.testing.assert_close(multimodal_guidance(c, u, None, None, cfg_only), c + 3.0 * (c - u))
    with pytest.raises(ValueError, match="uncond_text"):
        multimodal_guidance(c, None, None, None, cfg_only)
    with pytest.raises(ValueError, match="shape"):
        multimodal_guidance(c, u[:, :3], None, None, cfg_only)


# --- sampler -------------------------------------------------------------------------------------------------


class TrueVelocity:
    """Analytic denoiser: the velocity that points straight at a known x0 from the current point.

    On the path ``x_σ = (1 − σ)x0 + σε`` this is ``ε − x0``; the Euler loop then follows the path exactly
    for any step sizes. Records every call."""

    def __init__(self, video_x0, audio_x0=None, outputs=None):
        self.x0 = (video_x0, audio_x0)
        self.calls = []
        self.outputs = outputs  # optional: context/kind → velocity offsets, to tell passes apart

    def __call__(self, vx, ax, vs, as_, *, context, skip_video_self_attn_blocks, skip_audio_self_attn_blocks,
                 skip_cross_modal):
        self.calls.append(dict(vx=vx.clone(), ax=None if ax is None else ax.clone(), vs=vs.clone(),
                               as_=None if as_ is None else as_.clone(), context=context,
                               skip_v=skip_video_self_attn_blocks, skip_a=skip_audio_self_attn_blocks,
                               cross=skip_cross_modal))
        out = []
        for x, s, x0 in ((vx, vs, self.x0[0]), (ax, as_, self.x0[1])):
            if x is None:
                out.append(None)
                continue
            s = s.unsqueeze(-1)
            v = torch.where(s > 0, (x - x0) / s.clamp_min(1e-30), torch.zeros_like(x))
            out.append(v.to(torch.bfloat16).float() if self.outputs == "bf16" else v)
        return tuple(out)


@pytest.mark.parametrize("sigmas", [DISTILLED_SIGMAS, STAGE_2_DISTILLED_SIGMAS, "dev12"])
def test_sampler_follows_the_straight_path_and_lands_on_x0(sigmas):
    sigmas = ltx2_sigmas(12) if sigmas == "dev12" else torch.tensor(sigmas)
    x0v, x0a = _rand(B, NV, C, seed=1), _rand(B, NA, C, seed=2)
    ev, ea = _rand(B, NV, C, seed=3), _rand(B, NA, C, seed=4)
    s0 = sigmas[0].item()
    video, audio = noise_tokens(x0v, ev, s0), noise_tokens(x0a, ea, s0)
    den = TrueVelocity(x0v, x0a)
    seen = []
    out_v, out_a = sample_av(den, video, audio, sigmas, progress=lambda i, n: seen.append((i, n)))
    steps = len(sigmas) - 1
    assert len(den.calls) == steps and seen == [(i + 1, steps) for i in range(steps)]
    # the state fed to the model at step i lies on the path at sigmas[i]
    for call, s in zip(den.calls, sigmas.tolist()):
        torch.testing.assert_close(call["vx"], (1 - s) * x0v + s * ev, rtol=0, atol=2e-6)
        torch.testing.assert_close(call["ax"], (1 - s) * x0a + s * ea, rtol=0, atol=2e-6)
    torch.testing.assert_close(out_v, x0v, rtol=0, atol=2e-6)
    torch.testing.assert_close(out_a, x0a, rtol=0, atol=2e-6)
    assert out_v.dtype == out_a.dtype == torch.float32


def test_sampler_returns_x0_of_the_last_step_exactly():
    # the last step (σ' = 0) returns the model's x0 estimate x − σ·v itself, not an Euler step that rounds
    n = 250  # enough elements that x + (x − x0)/σ·(0 − σ) differs from x0 in some of them
    x, v = _rand(1, n, C, seed=5), _rand(1, n, C, seed=6)
    out, none = sample_av(lambda vx, ax, vs, as_, **_: (v, None), x, None, [0.9, 0.0])
    assert none is None
    assert torch.equal(out, x - (torch.ones(1, n) * 0.9).unsqueeze(-1) * v)


def test_sampler_partial_schedule_stops_at_last_sigma():
    x0v, ev = _rand(1, NV, C, seed=1), _rand(1, NV, C, seed=2)
    out, _ = sample_av(TrueVelocity(x0v), noise_tokens(x0v, ev, 1.0), None, [1.0, 0.75, 0.5])
    torch.testing.assert_close(out, 0.5 * x0v + 0.5 * ev, rtol=0, atol=1e-6)


def test_frozen_tokens_stay_exactly_clean_and_model_gets_sigma_times_mask():
    tpf = NV // 3
    x0v, x0a = _rand(B, NV, C, seed=1), _rand(B, NA, C, seed=2)
    image = _rand(1, tpf, C, seed=3)
    clean, mask = condition_tokens(torch.zeros(B, NV, C), image, 0, tpf, 1.0)  # frame 0 frozen
    clean, mask = condition_tokens(clean, image * 2, 2, tpf, 0.25, mask)  # frame 2 partially conditioned
    video = noise_tokens(clean, _rand(B, NV, C, seed=4), 1.0, mask)
    audio_mask = torch.ones(B, NA)
    audio_mask[:, :2] = 0.0  # frozen audio tokens (e.g. audio-to-video)
    audio_clean = x0a.clone()
    audio = noise_tokens(audio_clean, _rand(B, NA, C, seed=5), 1.0, audio_mask)

    class RandomVelocity:
        calls = []

        def __call__(self, vx, ax, vs, as_, **kw):
            self.calls.append((vx.clone(), ax.clone(), vs.clone(), as_.clone()))
            g = torch.Generator().manual_seed(len(self.calls))
            return torch.randn(vx.shape, generator=g), torch.randn(ax.shape, generator=g)

    den = RandomVelocity()
    sigmas = torch.tensor(DISTILLED_SIGMAS)
    out_v, out_a = sample_av(den, video, audio, sigmas, video_mask=mask, audio_mask=audio_mask, video_clean=clean,
                             audio_clean=audio_clean, video_params=GuidanceParams.dev_video(),
                             audio_params=GuidanceParams.dev_audio())
    assert len(den.calls) == 4 * (len(sigmas) - 1)
    for k, (vx, ax, vs, as_) in enumerate(den.calls):
        sigma = sigmas[k // 4]
        assert torch.equal(vs, mask * sigma) and torch.equal(as_, audio_mask * sigma)
        assert torch.equal(vx[:, :tpf], clean[:, :tpf].expand(B, -1, -1))
        assert torch.equal(ax[:, :2], audio_clean[:, :2])
    assert mask[:, :tpf].eq(0).all() and mask[:, 2 * tpf:].eq(0.75).all() and mask[:, tpf:2 * tpf].eq(1).all()
    assert torch.equal(out_v[:, :tpf], image.expand(B, -1, -1))
    assert torch.equal(out_a[:, :2], audio_clean[:, :2])
    assert not torch.equal(out_v[:, 2 * tpf:], clean[:, 2 * tpf:])  # partial tokens are denoised


def test_conditioned_image_to_video_lands_on_x0_with_the_frame_kept():
    tpf = NV // 3
    x0v = _rand(1, NV, C, seed=1)
    clean, mask = condition_tokens(torch.zeros(1, NV, C), x0v[:, :tpf], 0, tpf, 1.0)
    video = noise_tokens(clean, _rand(1, NV, C, seed=2), 1.0, mask)
    out, _ = sample_av(TrueVelocity(x0v), video, None, ltx2_sigmas(6), video_mask=mask, video_clean=clean)
    assert torch.equal(out[:, :tpf], x0v[:, :tpf])
    torch.testing.assert_close(out, x0v, rtol=0, atol=2e-6)


@pytest.mark.parametrize("video_params, audio_params, audio, expected", [
    (GuidanceParams.dev_video(), GuidanceParams.dev_audio(), True, ["plain", "uncond", "stg(29,)(29,)", "iso"]),
    (GuidanceParams.none(), GuidanceParams.none(), True, ["plain"]),
    (GuidanceParams.dev_video(), GuidanceParams.none(), False, ["plain", "uncond", "stg(29,)()"]),
    (GuidanceParams(stg=0.0, stg_blocks=()), GuidanceParams(cfg=1.0, stg_blocks=(3, 4), modality=1.0), True,
     ["plain", "uncond", "stg()(3, 4)", "iso"]),
    (GuidanceParams(cfg=1.0, stg=0.0, stg_blocks=(), modality=1.0), GuidanceParams.none(), True, ["plain"]),
    (GuidanceParams.none(), GuidanceParams(cfg=1.0, stg=0.0, stg_blocks=(), modality=2.0), True, ["plain", "iso"]),
])
def test_denoise_calls_per_step(video_params, audio_params, audio, expected):
    x0v, x0a = _rand(B, NV, C, seed=1), _rand(B, NA, C, seed=2)
    den = TrueVelocity(x0v, x0a if audio else None)
    sample_av(den, _rand(B, NV, C, seed=3), _rand(B, NA, C, seed=4) if audio else None, [1.0, 0.5, 0.0],
              video_params=video_params, audio_params=audio_params)

    def kind(call):
        if call["context"] == "uncond":
            assert not (call["skip_v"] or call["skip_a"] or call["cross"])
            return "uncond"
        if call["cross"]:
            assert not (call["skip_v"] or call["skip_a"])
            return "iso"
        if call["skip_v"] or call["skip_a"]:
            return f"stg{call['skip_v']}{call['skip_a']}"
        return "plain"

    assert [kind(c) for c in den.calls] == expected * 2
    assert all((c["ax"] is None) == (not audio) and (c["as_"] is None) == (not audio) for c in den.calls)


def test_one_guided_step_matches_manual_computation():
    """Each pass's velocity must reach the right guidance term, with partial masks and per-token sigmas."""
    vp = GuidanceParams(cfg=3.0, stg=1.5, stg_blocks=(2,), rescale=0.7, modality=2.0)
    ap = GuidanceParams(cfg=5.0, stg=0.5, stg_blocks=(2,), rescale=0.0, modality=3.0)
    xv, xa = _rand(1, NV, C, seed=1), _rand(1, NA, C, seed=2)
    cv, ca = _rand(1, NV, C, seed=3), _rand(1, NA, C, seed=4)
    mv = torch.rand(1, NV, generator=torch.Generator().manual_seed(5))
    ma = torch.ones(1, NA)
    vel = {k: (_rand(1, NV, C, seed=10 + j), _rand(1, NA, C, seed=20 + j))
           for j, k in enumerate(["cond", "uncond", "ptb", "iso"])}

    def denoise(vx, ax, vs, as_, *, context, skip_video_self_attn_blocks, skip_audio_self_attn_blocks,
                skip_cross_modal):
        key = ("uncond" if context == "uncond" else "iso" if skip_cross_modal
               else "ptb" if skip_video_self_attn_blocks else "cond")
        return vel[key]

    sigma, sigma_next = 0.8, 0.3
    out_v, out_a = sample_av(denoise, xv, xa, [sigma, sigma_next], video_mask=mv, audio_mask=ma, video_clean=cv,
                             audio_clean=ca, video_params=vp, audio_params=ap)

    for x, m, clean, p, idx, out in ((xv, mv, cv, vp, 0, out_v), (xa, ma, ca, ap, 1, out_a)):
        x, m, clean = x.double(), m.double().unsqueeze(-1), clean.double()
        x0 = {k: x - sigma * m * v[idx].double() for k, v in vel.items()}
        g = _guided_reference(x0["cond"], x0["uncond"], x0["ptb"], x0["iso"], p.cfg, p.stg, p.modality, p.rescale)
        g = g * m + clean * (1 - m)
        expected = x + (x - g) / sigma * (sigma_next - sigma)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_interrupt_stops_before_the_next_forward_and_propagates():
    class Stop(Exception):
        pass

    den = TrueVelocity(_rand(1, NV, C, seed=1))
    checks = []

    def check():
        checks.append(len(den.calls))
        if len(den.calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        sample_av(den, _rand(1, NV, C, seed=2), None, DISTILLED_SIGMAS, check_interrupt=check)
    assert len(den.calls) == 3 and checks == [0, 1, 2, 3]


def test_bf16_velocities_are_accepted_and_state_stays_float32():
    x0v = _rand(1, NV, C, seed=1)

    def denoise(vx, ax, vs, as_, **_):
        assert vx.dtype == torch.float32 and vs.dtype == torch.float32
        return ((vx - x0v) / vs.unsqueeze(-1)).bfloat16(), None

    out, _ = sample_av(denoise, _rand(1, NV, C, seed=2).bfloat16(), None, [1.0, 0.5, 0.0])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0v, rtol=0, atol=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigmas=[0.5, 0.7, 0.0]), "strictly decreasing"),
    (dict(sigmas=[1.0]), "at least 2"),
    (dict(sigmas=[1.5, 0.0]), r"\[0, 1\]"),
    (dict(video_mask=torch.full((1, NV), 0.5)), "video_clean is None"),
    (dict(video_mask=torch.ones(1, NV - 1)), "video_mask"),
    (dict(video_mask=torch.full((1, NV), 2.0), video_clean=torch.zeros(1, NV, C)), r"\[0, 1\]"),
    (dict(video_clean=torch.zeros(1, NV, C + 1)), "video_clean"),
    (dict(audio=torch.zeros(2, NA, C)), "batch"),
    (dict(video_params={"cfg": 3}), "GuidanceParams"),
    (dict(denoise=lambda *a, **k: (torch.zeros(1, NV, C + 1), None)), "velocity of shape"),
    (dict(denoise=lambda *a, **k: torch.zeros(1, NV, C)), "pair"),
])
def test_sample_av_errors(kwargs, match):
    args = dict(denoise=lambda vx, ax, *a, **k: (torch.zeros_like(vx), None if ax is None else torch.zeros_like(ax)),
                video=torch.zeros(1, NV, C), audio=None, sigmas=[1.0, 0.0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_av(args.pop("denoise"), args.pop("video"), args.pop("audio"), args.pop("sigmas"), **args)


# --- noise and conditioning helpers --------------------------------------------------------------------------


def test_initial_noise_is_cpu_float32_and_deterministic():
    a = initial_noise((1, NV, C), 42)
    assert a.device.type == "cpu" and a.dtype == torch.float32 and a.shape == (1, NV, C)
    assert torch.equal(a, initial_noise([1, NV, C], 42))
    assert torch.equal(a, torch.randn(1, NV, C, generator=torch.Generator("cpu").manual_seed(42)))
    assert not torch.equal(a, initial_noise((1, NV, C), 43))


def test_initial_noise_order_video_then_audio_from_one_generator():
    gen = torch.Generator("cpu").manual_seed(7)
    video = initial_noise((1, NV, C), gen)
    audio = initial_noise((1, NA, C), gen)
    stream = torch.randn(NV * C + NA * C, generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(video.flatten(), stream[:NV * C]) and torch.equal(audio.flatten(), stream[NV * C:])
    assert not torch.equal(audio, initial_noise((1, NA, C), 7))


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_initial_noise_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        initial_noise((2, 3), seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_initial_noise_rejects_device_generators():
    with pytest.raises(ValueError, match="CPU"):
        initial_noise((2, 3), torch.Generator("cuda").manual_seed(0))


def test_noise_tokens_official_formula_with_mask():
    clean, noise = _rand(1, 4, C, seed=1), _rand(1, 4, C, seed=2)
    mask = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    out = noise_tokens(clean, noise, 0.8, mask)
    s = (mask * 0.8).unsqueeze(-1)
    torch.testing.assert_close(out, noise * s + clean * (1 - s), rtol=0, atol=1e-7)
    assert torch.equal(out[:, 0], clean[:, 0])
    assert torch.equal(noise_tokens(clean, noise, 1.0), noise)
    with pytest.raises(ValueError, match="sigma"):
        noise_tokens(clean, noise, 1.2)
    with pytest.raises(ValueError, match="shape"):
        noise_tokens(clean, noise[:, :3], 0.5)


def test_renoise_for_stage_2_uses_0_909375():
    latent, noise = _rand(1, NA, C, seed=1), _rand(1, NA, C, seed=2)
    torch.testing.assert_close(renoise_for_stage_2(latent, noise), noise * 0.909375 + latent * (1 - 0.909375),
                               rtol=0, atol=3e-7)
    mask = torch.ones(1, NA)
    mask[:, 0] = 0
    assert torch.equal(renoise_for_stage_2(latent, noise, mask=mask)[:, 0], latent[:, 0])


def test_condition_tokens_writes_frames_and_mask_without_mutating_inputs():
    tpf = 4
    tokens = _rand(2, 5 * tpf, C, seed=1)
    before = tokens.clone()
    frames = _rand(1, 2 * tpf, C, seed=2)
    out, mask = condition_tokens(tokens, frames, 3, tpf, 0.8)
    assert torch.equal(tokens, before)
    assert torch.equal(out[:, 3 * tpf:], frames.expand(2, -1, -1))
    assert torch.equal(out[:, :3 * tpf], tokens[:, :3 * tpf])
    assert mask.dtype == torch.float32 and mask.shape == (2, 5 * tpf)
    torch.testing.assert_close(mask[:, 3 * tpf:], torch.full((2, 2 * tpf), 0.2))
    assert mask[:, :3 * tpf].eq(1).all()


@pytest.mark.parametrize("frame_index, frame_tokens, tpf, strength, match", [
    (4, (1, 8, C), 4, 1.0, "frame_index"),
    (-1, (1, 4, C), 4, 1.0, "frame_index"),
    (0, (1, 3, C), 4, 1.0, "frame_tokens"),
    (0, (1, 4, C + 1), 4, 1.0, "frame_tokens"),
    (0, (3, 4, C), 4, 1.0, "frame_tokens"),
    (0, (1, 4, C), 3, 1.0, "tokens_per_frame"),
    (0, (1, 4, C), 4, 1.5, "strength"),
])
def test_condition_tokens_errors(frame_index, frame_tokens, tpf, strength, match):
    with pytest.raises(ValueError, match=match):
        condition_tokens(torch.zeros(2, 5 * 4, C), torch.zeros(frame_tokens), frame_index, tpf, strength)
