"""LTX-2 DiT: parity with diffusers' LTX2VideoTransformer3DModel (same weights through the official ↔ diffusers key
map, float32) of the outputs and of the training gradients, the hand-written backwards (CPU RMSNorm, split RoPE),
RoPE tables and positions, STG and modality isolation, video-only, gradient checkpointing, the official state-dict
layout, reduced-precision weights, LoRA targets, input validation."""

from __future__ import annotations

import copy
import dataclasses
import math

import fused_check
import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed
from diffusers.pipelines.ltx2.connectors import LTX2RotaryPosEmbed1d
from test_ltx2_config import reference_shapes

from cinetune.core.lora import inject_lora
from cinetune.core.quant import FP8Linear, quantize_linear_weights_fp8
from cinetune.ltx2.config import (
    CONNECTOR_PREFIXES,
    DIT_PREFIX,
    LTX2_19B,
    LTX2_BLOCK_PREFIXES,
    LTX2_LORA_TARGETS,
    LTX2TransformerConfig,
    diffusers_to_official,
    ltx2_fp8_keep_high_precision,
    official_to_diffusers,
    tiny_transformer_metadata,
)
from cinetune.ltx2.dit import LTX2DiT, patchify_audio, patchify_video, unpatchify_audio, unpatchify_video
from cinetune.ltx2.rope import (
    CONNECTOR_MAX_POS,
    apply_rope,
    audio_positions,
    connector_positions,
    cross_modal_positions,
    rope_frequencies,
    video_positions,
)

TINY = LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())
# Video and audio head counts differ: the video side of the audio↔video RoPE is cut into video heads.
UNEQUAL_HEADS = dataclasses.replace(TINY, num_attention_heads=4, attention_head_dim=8)
# The official code defaults a stripped file would get (legacy RoPE, float32 grid, gate factor 1/1000).
CODE_DEFAULTS = dataclasses.replace(TINY, rope_type="interleaved", frequencies_precision="float32",
                                    av_ca_timestep_scale_multiplier=1.0)
GRID = (3, 2, 3)  # latent F', H', W'
AUDIO_TOKENS = 7
TEXT_TOKENS = 5


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, q/k norm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.ndim > 1 else 16))
    return model


def tiny_model(cfg: LTX2TransformerConfig = TINY, seed: int = 0) -> LTX2DiT:
    return randomize(LTX2DiT(cfg), seed).eval()


def reference(model: LTX2DiT) -> LTX2VideoTransformer3DModel:
    """diffusers' implementation with the same weights (official names → diffusers names, strict)."""
    ref = LTX2VideoTransformer3DModel(**model.config.diffusers_kwargs())
    ref.load_state_dict(official_to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def make_inputs(cfg: LTX2TransformerConfig, *, batch: int = 2, sigma=(0.9, 0.35), seed: int = 1,
                fps: float = 24.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    F, H, W = GRID
    Nv = F * H * W
    return dict(
        video=torch.randn(batch, Nv, cfg.in_channels, generator=g),
        audio=torch.randn(batch, AUDIO_TOKENS, cfg.audio_in_channels, generator=g),
        video_sigma=torch.tensor(sigma)[:, None].expand(batch, Nv).clone(),
        audio_sigma=torch.tensor(sigma)[:, None].expand(batch, AUDIO_TOKENS).clone(),
        video_context=torch.randn(batch, TEXT_TOKENS, cfg.caption_channels, generator=g),
        audio_context=torch.randn(batch, TEXT_TOKENS, cfg.caption_channels, generator=g),
        video_positions=video_positions(F, H, W, fps=fps, batch_size=batch),
        audio_positions=audio_positions(AUDIO_TOKENS, batch_size=batch),
    )


def run(model: LTX2DiT, inp: dict, **kw):
    with torch.no_grad():
        return model(inp["video"], inp["audio"], **{k: v for k, v in inp.items() if k not in ("video", "audio")},
                     **kw)


def run_reference(ref: LTX2VideoTransformer3DModel, inp: dict, *, use_cross_timestep: bool = False,
                  isolate: bool = False, mask: torch.Tensor | None = None):
    """diffusers forward; its ``timestep`` inputs are σ·1000 per token (and σ·1000 per sample for the newer
    cross-timestep mode)."""
    with torch.no_grad():
        return ref(inp["video"], inp["audio"], inp["video_context"], inp["audio_context"],
                   timestep=inp["video_sigma"] * 1000, audio_timestep=inp["audio_sigma"] * 1000,
                   sigma=inp["video_sigma"].amax(1) * 1000, audio_sigma=inp["audio_sigma"].amax(1) * 1000,
                   video_coords=inp["video_positions"], audio_coords=inp["audio_positions"],
                   encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                   use_cross_timestep=use_cross_timestep, isolate_modalities=isolate, return_dict=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers. Always with use_cross_timestep=False: diffusers' "legacy LTX-2.0 behavior" (each modality's
# own per-token timesteps feed its audio↔video AdaLNs), which is the 19B model's; diffusers' LTX-2 pipelines default
# to use_cross_timestep=True, the setting of the later LTX-2.3 models.


@pytest.mark.parametrize("cfg", [TINY, UNEQUAL_HEADS, CODE_DEFAULTS], ids=["tiny", "unequal_heads", "code_defaults"])
def test_text_to_video_parity(cfg):
    model = tiny_model(cfg)
    inp = make_inputs(cfg)
    ours = run(model, inp)
    theirs = run_reference(reference(model), inp)
    assert ours[0].shape == (2, math.prod(GRID), cfg.out_channels) and ours[1].shape == (2, AUDIO_TOKENS, 128)
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5


def test_image_to_video_parity_with_per_token_sigma():
    model = tiny_model()
    ref = reference(model)
    inp = make_inputs(TINY)
    frame = GRID[1] * GRID[2]
    inp["video_sigma"][:, :frame] = 0.0  # the conditioning frame is clean
    ours = run(model, inp)
    theirs = run_reference(ref, inp)
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5
    newer = run_reference(ref, inp, use_cross_timestep=True)  # the other-modality σ of LTX-2.3
    assert rel(newer[0], theirs[0]) > 1e-3


def test_parity_with_a_different_sigma_for_every_token():
    model = tiny_model()
    inp = make_inputs(TINY, seed=3)
    g = torch.Generator().manual_seed(4)
    inp["video_sigma"] = torch.rand(inp["video_sigma"].shape, generator=g)
    inp["audio_sigma"] = torch.rand(inp["audio_sigma"].shape, generator=g)
    ours = run(model, inp)
    theirs = run_reference(reference(model), inp)
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5


def test_context_mask_parity():
    model = tiny_model()
    inp = make_inputs(TINY)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.bool)
    mask[0, :2] = False
    ours = run(model, inp, context_mask=mask)
    theirs = run_reference(reference(model), inp, mask=mask.float())
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5
    assert rel(ours[0], run(model, inp)[0]) > 1e-3


def test_modality_isolation_parity_and_video_only():
    model = tiny_model()
    inp = make_inputs(TINY)
    ours = run(model, inp, skip_cross_modal=True)
    theirs = run_reference(reference(model), inp, isolate=True)
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5
    assert rel(ours[0], run(model, inp)[0]) > 1e-3
    video_only = run(model, dict(inp, audio=None, audio_sigma=None, audio_context=None, audio_positions=None))
    assert video_only[1] is None
    assert rel(video_only[0], theirs[0]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# STG, gradient checkpointing


def test_stg_drops_only_the_self_attention_residuals_of_the_chosen_blocks():
    model = tiny_model()
    inp = make_inputs(TINY)
    plain = run(model, inp)
    skipped = run(model, inp, skip_self_attn_blocks=[1])
    without = copy.deepcopy(model)
    with torch.no_grad():
        for attn in (without.transformer_blocks[1].attn1, without.transformer_blocks[1].audio_attn1):
            attn.to_out[0].weight.zero_()
            attn.to_out[0].bias.zero_()
    expected = run(without, inp)
    assert rel(skipped[0], expected[0]) < 1e-6 and rel(skipped[1], expected[1]) < 1e-6
    assert rel(skipped[0], plain[0]) > 1e-3 and rel(skipped[1], plain[1]) > 1e-3
    assert rel(run(model, inp, skip_self_attn_blocks=[0])[0], skipped[0]) > 1e-3


def test_inference_buffers_match_the_autograd_path_and_leave_inputs_alone():
    # Without autograd the blocks reuse their temporaries as output buffers; with autograd they run out of place.
    model = tiny_model()
    inp = make_inputs(TINY)
    inp["video_sigma"][:, :3] = 0.0  # per-token modulation rows as well
    before = {k: v.clone() for k, v in inp.items()}
    block_args = {}
    handle = model.transformer_blocks[1].register_forward_pre_hook(
        lambda module, args: block_args.setdefault("args", tuple(a.clone() if torch.is_tensor(a) else a for a in args)))
    fast = run(model, inp, skip_self_attn_blocks=[0])
    handle.remove()
    assert all(torch.equal(inp[k], before[k]) for k in inp)
    video = inp["video"].clone().requires_grad_(True)
    graph = model(video, inp["audio"], **{k: v for k, v in inp.items() if k not in ("video", "audio")},
                  skip_self_attn_blocks=[0])
    assert rel(fast[0], graph[0].detach()) < 1e-6 and rel(fast[1], graph[1].detach()) < 1e-6
    vx, ax, inputs, _ = block_args["args"]
    kept = vx.clone(), ax.clone()
    with torch.no_grad():
        model.transformer_blocks[1](vx, ax, inputs)
    assert torch.equal(vx, kept[0]) and torch.equal(ax, kept[1])


def test_gradient_checkpointing_gives_identical_gradients():
    model = randomize(LTX2DiT(TINY)).train()
    inp = make_inputs(TINY)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        video = inp["video"].clone().requires_grad_(True)
        v, a = model(video, inp["audio"], **{k: t for k, t in inp.items() if k not in ("video", "audio")})
        ((v ** 2).mean() + (a ** 2).mean()).backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        out["input"] = video.grad.clone()
        return out

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)


def parameter_gradients(model, inp: dict, *, diffusers: bool) -> dict[str, torch.Tensor]:
    """Gradients of every parameter and of the video input (key "input") under a loss of both outputs, keyed by
    official names."""
    model.zero_grad(set_to_none=True)
    video = inp["video"].clone().requires_grad_(True)
    with torch.enable_grad():
        if diffusers:
            v, a = model(video, inp["audio"], inp["video_context"], inp["audio_context"],
                         timestep=inp["video_sigma"] * 1000, audio_timestep=inp["audio_sigma"] * 1000,
                         video_coords=inp["video_positions"], audio_coords=inp["audio_positions"],
                         use_cross_timestep=False, return_dict=False)
        else:
            v, a = model(video, inp["audio"], **{k: t for k, t in inp.items() if k not in ("video", "audio")})
        ((v ** 2).mean() + (a ** 2).mean()).backward()
    out = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if diffusers:
        out = diffusers_to_official(out)
    out["input"] = video.grad
    return out


@pytest.mark.parametrize("cfg", [TINY, UNEQUAL_HEADS, CODE_DEFAULTS], ids=["tiny", "unequal_heads", "code_defaults"])
def test_gradients_match_diffusers(cfg):
    # The CPU RMSNorm and the split RoPE have hand-written backwards; diffusers runs autograd over its formulas.
    model = tiny_model(cfg).train()
    ref = reference(model).train()
    inp = make_inputs(cfg)
    ours, theirs = parameter_gradients(model, inp, diffusers=False), parameter_gradients(ref, inp, diffusers=True)
    assert ours.keys() == theirs.keys() and any(".q_norm." in k for k in ours)
    for name in ours:
        assert rel(ours[name], theirs[name]) < 1e-5, name


def test_hand_written_backwards_match_autograd():
    from cinetune.ltx2.modulation import CPURMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=g).requires_grad_(True)
    weight = (1 + 0.2 * torch.randn(16, dtype=torch.float64, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: CPURMSNorm.apply(x, w, 1e-6), (x, weight))
    assert torch.autograd.gradcheck(lambda x: CPURMSNorm.apply(x, None, 1e-6), (x,))
    # as an AdaLN modulation: per-token 1 + scale and shift
    scale = torch.randn(2, 5, 16, dtype=torch.float64, generator=g).requires_grad_(True)
    shift = torch.randn(2, 1, 16, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, s, b: CPURMSNorm.apply(x, 1 + s, 1e-6, b), (x, scale, shift))
    # RoPE: the gradient is the inverse rotation, as autograd through the formula gives it (float32 and bf16 inputs)
    cos, sin = rope_frequencies(video_positions(*GRID, fps=24.0), 32, 2, (20, 2048, 2048))
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, cos.shape[1], 32, generator=g).to(dtype).requires_grad_(True)
        grad_out = torch.randn(q.shape, generator=g).to(dtype)
        (ours,) = torch.autograd.grad(apply_rope(q, cos, sin), q, grad_out)
        q5 = q.float().view(1, -1, 2, 2, 8)
        x1, x2 = q5[..., 0, :], q5[..., 1, :]
        formula = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-2).reshape(q.shape).to(dtype)
        (reference_grad,) = torch.autograd.grad(formula, q, grad_out)
        assert ours.dtype == dtype
        assert rel(ours, reference_grad) < (1e-6 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------------------------
# Layout


def test_full_size_state_dict_equals_the_official_listing():
    listing = reference_shapes()
    official = {k[len(DIT_PREFIX):]: v for k, v in listing.items()
                if k.startswith(DIT_PREFIX) and not k[len(DIT_PREFIX):].startswith(CONNECTOR_PREFIXES)}
    with torch.device("meta"):
        model = LTX2DiT(LTX2_19B)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == 3510
    assert set(ours) == set(official)
    assert {k for k in ours if ours[k] != official[k]} == set()
    assert sum(p.numel() for p in model.parameters()) == 18_876_174_592
    assert model.blocks is model.transformer_blocks and len(model.blocks) == 48


def test_every_linear_is_a_plain_linear_at_its_official_path():
    model = LTX2DiT(TINY)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = {k[: -len(".weight")] for k, v in model.state_dict().items() if k.endswith(".weight") and v.ndim == 2}
    assert linears == weights


def test_patchify_layouts():
    latent = torch.randn(2, 128, 3, 4, 5)
    tokens = patchify_video(latent)
    assert tokens.shape == (2, 60, 128)
    assert torch.equal(tokens[1, (2 * 4 + 1) * 5 + 3], latent[1, :, 2, 1, 3])  # (f h w) token order
    assert torch.equal(unpatchify_video(tokens, 3, 4, 5), latent)
    audio = torch.randn(2, 8, 7, 16)
    a_tokens = patchify_audio(audio)
    assert a_tokens.shape == (2, 7, 128)
    assert a_tokens[1, 4, 3 * 16 + 5] == audio[1, 3, 4, 5]  # channel-major (c f) features
    assert torch.equal(unpatchify_audio(a_tokens), audio)


# ---------------------------------------------------------------------------------------------------------------
# Positions and RoPE


def test_video_positions_values_and_diffusers():
    pos = video_positions(3, 2, 2, fps=24.0, batch_size=2)
    mid = pos.mean(-1)
    # Latent frame 0 covers pixel frame [0, 1) → 0.5; frame f covers [8f − 7, 8f + 1) → 8f − 3 (ltx2.md §2.7).
    assert torch.allclose(mid[0, 0].view(3, 4)[:, 0], torch.tensor([0.5, 5.0, 13.0]) / 24)
    assert torch.equal(mid[0, 1].view(3, 2, 2)[0, :, 0], torch.tensor([16.0, 48.0]))
    rope = LTX2AudioVideoRotaryPosEmbed(dim=32, modality="video")
    assert torch.equal(pos, rope.prepare_video_coords(2, 3, 2, 2, torch.device("cpu"), fps=24.0))
    shifted = video_positions(1, 1, 1, fps=25.0, frame_offset=16, causal_fix=False)
    assert torch.allclose(shifted[0, 0, 0], torch.tensor([16.0, 24.0]) / 25)


def test_audio_positions_values_and_diffusers():
    pos = audio_positions(4, batch_size=2)
    assert torch.allclose(pos[0, 0, :3], torch.tensor([[0.0, 0.01], [0.01, 0.05], [0.05, 0.09]]))
    rope = LTX2AudioVideoRotaryPosEmbed(dim=16, modality="audio", scale_factors=[4])
    assert torch.equal(pos, rope.prepare_audio_coords(2, 4, torch.device("cpu")))


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("double", [True, False])
def test_rope_tables_match_diffusers(split, double):
    rope_type = "split" if split else "interleaved"
    v_pos = video_positions(*GRID, fps=25.0, batch_size=2)
    a_pos = audio_positions(AUDIO_TOKENS, batch_size=2)
    cases = [  # (positions, dim, heads, max_pos, diffusers module)
        (v_pos, 64, 2, (20, 2048, 2048), LTX2AudioVideoRotaryPosEmbed(
            dim=64, modality="video", rope_type=rope_type, double_precision=double, num_attention_heads=2)),
        (a_pos, 32, 4, (20,), LTX2AudioVideoRotaryPosEmbed(
            dim=32, modality="audio", rope_type=rope_type, double_precision=double, num_attention_heads=4)),
        (cross_modal_positions(v_pos), 32, 2, (20,), LTX2AudioVideoRotaryPosEmbed(
            dim=32, modality="video", base_num_frames=20, rope_type=rope_type, double_precision=double,
            num_attention_heads=2)),
    ]
    for positions, dim, heads, max_pos, theirs in cases:
        cos, sin = rope_frequencies(positions, dim, heads, max_pos, split=split, double_precision=double)
        ref_cos, ref_sin = theirs(positions)
        if split:  # diffusers lays the split tables out [B, H, T, r]
            ref_cos, ref_sin = ref_cos.transpose(1, 2), ref_sin.transpose(1, 2)
        torch.testing.assert_close(cos, ref_cos, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin, rtol=1e-6, atol=1e-6)


def test_connector_rope_matches_diffusers():
    length, dim, heads = 11, 48, 4
    cos, sin = rope_frequencies(connector_positions(length), dim, heads, (CONNECTOR_MAX_POS,), use_middle=False)
    ref_cos, ref_sin = LTX2RotaryPosEmbed1d(dim, CONNECTOR_MAX_POS, rope_type="split", num_attention_heads=heads)(
        1, length, torch.device("cpu"))
    torch.testing.assert_close(cos, ref_cos.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_split_rope_rotates_each_head_by_its_own_angles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, generator=g)  # 2 heads × 4 (2 pairs each)
    angles = torch.randn(1, 3, 2, 2, generator=g)
    out = apply_rope(x, angles.cos(), angles.sin())
    halves = x.view(1, 3, 2, 2, 2)
    z = torch.complex(halves[..., 0, :], halves[..., 1, :]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.stack((z.real, z.imag), dim=-2).reshape(1, 3, 8)
    torch.testing.assert_close(out, expected)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# Reduced precision, LoRA


def test_bf16_and_fp8_weights_stay_close_to_float32():
    model = tiny_model()
    inp = make_inputs(TINY)
    exact = run(model, inp)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    out = run(bf16, {k: v.to(torch.bfloat16) if k in ("video", "audio") else v for k, v in inp.items()})
    assert out[0].dtype == torch.bfloat16 and rel(out[0], exact[0]) < 5e-2 and rel(out[1], exact[1]) < 5e-2
    fp8 = copy.deepcopy(model)
    assert quantize_linear_weights_fp8(fp8, keep=ltx2_fp8_keep_high_precision) == 28  # block 1 only
    assert isinstance(fp8.transformer_blocks[1].ff.net[2], FP8Linear)
    assert not isinstance(fp8.transformer_blocks[0].attn1.to_q, FP8Linear)
    out = run(fp8, inp)
    assert rel(out[0], exact[0]) < 0.1 and rel(out[1], exact[1]) < 0.1


def test_lora_targets_wrap_every_attention_projection():
    model = tiny_model()
    inp = make_inputs(TINY)
    before = run(model, inp)
    modules = inject_lora(model, rank=2, alpha=2.0, targets=LTX2_LORA_TARGETS, within=LTX2_BLOCK_PREFIXES)
    assert len(modules) == TINY.num_layers * 6 * 4
    assert "transformer_blocks.1.audio_to_video_attn.to_out.0" in modules
    after = run(model, inp)  # fresh adapters (B = 0) change nothing
    assert rel(after[0], before[0]) < 1e-6


def lora_gradients(model: LTX2DiT, inp: dict, monkeypatch, *, fused: bool) -> dict[str, torch.Tensor]:
    """LoRA and video-input gradients of a training-mode forward, projections fused or one by one."""
    import cinetune.ltx2.dit as dit

    def loss(video):
        v, a = model(video, inp["audio"], **{k: t for k, t in inp.items() if k not in ("video", "audio")})
        return (v ** 2).mean() + (a ** 2).mean()

    return fused_check.lora_gradients(model, dit, loss, inp["video"], monkeypatch, fused=fused)


@pytest.mark.parametrize("dropouts", [{}, dict(dropout=0.2, rank_dropout=0.25, module_dropout=0.2)],
                         ids=["no-dropout", "dropouts"])
def test_fused_lora_projections_give_the_one_by_one_gradients(monkeypatch, dropouts):
    model = tiny_model().train()
    modules = inject_lora(model, rank=2, alpha=2.0, targets=LTX2_LORA_TARGETS, within=LTX2_BLOCK_PREFIXES,
                          **dropouts)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.normal_(0.0, 0.1)
    inp = make_inputs(TINY)
    fused = lora_gradients(model, inp, monkeypatch, fused=True)
    separate = lora_gradients(model, inp, monkeypatch, fused=False)
    # per block: attn1 (q, k, v), and k/v of attn2, audio_attn1, audio_attn2, and both audio↔video attentions
    assert fused.pop("fused calls") == TINY.num_layers * 6 and separate.pop("fused calls") == 0
    assert len(fused) == 1 + 2 * len(modules) if not dropouts else 1 < len(fused) < 1 + 2 * len(modules)
    fused_check.assert_same_gradients(fused, separate)


def test_fp8_and_bf16_weight_projections_are_not_fused(monkeypatch):
    model = tiny_model().train()
    quantize_linear_weights_fp8(model, keep=lambda name: "transformer_blocks.1." not in name)
    inject_lora(model, rank=2, alpha=2.0, targets=LTX2_LORA_TARGETS, within=LTX2_BLOCK_PREFIXES)
    inp = make_inputs(TINY)
    assert lora_gradients(model, inp, monkeypatch, fused=True)["fused calls"] == 6  # block 0 only
    model.to(torch.bfloat16)  # weights cast to the float32 compute dtype at use
    assert lora_gradients(model, inp, monkeypatch, fused=True)["fused calls"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("change,match", [
    (dict(video=torch.randn(2, 18, 64)), "video must be"),
    (dict(video_sigma=torch.rand(2, 17)), "video_sigma"),
    (dict(video_positions=torch.zeros(2, 3, 18)), "video_positions"),
    (dict(audio_positions=torch.zeros(2, 1, 6, 2)), "audio_positions"),
    (dict(audio_context=None), "audio_context must be given"),
    (dict(video_context=torch.randn(2, 5, 7)), "video_context"),
])
def test_bad_inputs_are_refused(change, match):
    model = LTX2DiT(TINY)
    with pytest.raises(ValueError, match=match):
        run(model, dict(make_inputs(TINY), **change))


def test_bad_options_are_refused():
    model = LTX2DiT(TINY)
    inp = make_inputs(TINY)
    with pytest.raises(ValueError, match="block indices"):
        run(model, inp, skip_self_attn_blocks=[2])
    with pytest.raises(ValueError, match="context_mask"):
        run(model, inp, context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no attended"):
        run(model, inp, context_mask=torch.zeros(2, TEXT_TOKENS, dtype=torch.bool))


def test_per_sample_sigma_is_accepted():
    model = tiny_model()
    inp = make_inputs(TINY)
    per_sample = dict(inp, video_sigma=inp["video_sigma"][:, 0], audio_sigma=inp["audio_sigma"][:, 0])
    assert torch.equal(run(model, per_sample)[0], run(model, inp)[0])
