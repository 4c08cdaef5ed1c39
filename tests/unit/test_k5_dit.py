"""Kandinsky 5 DiT: parity with diffusers' Kandinsky5Transformer3DModel, patch orders, time embedding, masks, NABLA,
precision, input validation."""

from __future__ import annotations

import math

import fused_check
import pytest
import torch
import torch.nn.functional as F
from diffusers import Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel
from diffusers.models.transformers import transformer_kandinsky as dk

from cinetune.core.quant import CastLinear
from cinetune.k5.blocks import _rotate_pairs_real
from cinetune.k5.config import K5Config
from cinetune.k5.dit import (
    Kandinsky5DiT,
    apply_rope,
    patchify,
    rope_1d,
    rope_3d,
    timestep_sinusoid,
    unpatchify,
)
from cinetune.k5.nabla import NablaConfig

TINY = K5Config(model_dim=64, ff_dim=128, time_dim=32, num_text_blocks=2, num_visual_blocks=2, axes_dims=(8, 12, 12),
                in_text_dim=48, in_text_dim2=24)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the official init zeroes the modulations, which would make every block a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.ndim > 1 else 16))
    return model


def tiny_model(cfg: K5Config = TINY, seed: int = 0) -> Kandinsky5DiT:
    return randomize(Kandinsky5DiT(cfg), seed).eval()


def reference(model: Kandinsky5DiT) -> Kandinsky5Transformer3DModel:
    """diffusers' implementation with the same weights."""
    cfg = model.config
    ref = Kandinsky5Transformer3DModel(
        in_visual_dim=cfg.in_visual_dim, in_text_dim=cfg.in_text_dim, in_text_dim2=cfg.in_text_dim2,
        time_dim=cfg.time_dim, out_visual_dim=cfg.out_visual_dim, patch_size=cfg.patch_size,
        model_dim=cfg.model_dim, ff_dim=cfg.ff_dim, num_text_blocks=cfg.num_text_blocks,
        num_visual_blocks=cfg.num_visual_blocks, axes_dims=cfg.axes_dims, visual_cond=cfg.visual_cond)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


class _TorchWithoutBf16Rounding:
    """Stands in for ``torch`` inside diffusers' module: diffusers rounds rotated q/k to bfloat16 even for float32
    inputs (copied from the bf16-only official code); mapping ``torch.bfloat16`` to float32 there removes only that
    rounding, so float32 parity can be checked tightly."""

    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


@pytest.fixture
def exact_diffusers(monkeypatch):
    monkeypatch.setattr(dk, "torch", _TorchWithoutBf16Rounding())


def run_reference(ref, x, text, pooled, t, scale=(1.0, 2.0, 2.0), sparse_params=None):
    """diffusers is channels-last: [B, T, H, W, C]."""
    B, C, T, H, W = x.shape
    with torch.no_grad():
        out = ref(x.permute(0, 2, 3, 4, 1), text, t, pooled,
                  visual_rope_pos=[torch.arange(T), torch.arange(H // 2), torch.arange(W // 2)],
                  text_rope_pos=torch.arange(text.shape[1]), scale_factor=scale, sparse_params=sparse_params,
                  return_dict=False)
    return out.permute(0, 4, 1, 2, 3)


def inputs(B=1, T=3, H=4, W=6, L=5, cfg=TINY, seed=1, i2v=False):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(B, 16, T, H, W, generator=g)
    cond = torch.zeros(B, 16, T, H, W)
    mask = torch.zeros(B, 1, T, H, W)
    if i2v:
        cond[:, :, 0] = torch.randn(B, 16, H, W, generator=g)
        mask[:, :, 0] = 1.0
    x = torch.cat([noisy, cond, mask], dim=1)
    text = torch.randn(B, L, cfg.in_text_dim, generator=g)
    pooled = torch.randn(B, cfg.in_text_dim2, generator=g)
    t = torch.rand(B, generator=g) * 1000.0
    return x, text, pooled, t


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers


def test_state_dict_names_and_shapes_equal_diffusers():
    model = Kandinsky5DiT(TINY)
    ref_sd = reference(tiny_model()).state_dict()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref_sd.items()}


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("scale", [(1.0, 2.0, 2.0), (1.0, 3.16, 3.16)], ids=["sd", "hd"])
def test_fp32_parity_with_diffusers(exact_diffusers, B, i2v, scale):
    model = tiny_model()
    ref = reference(model)
    x, text, pooled, t = inputs(B=B, i2v=i2v)
    with torch.no_grad():
        ours = model(x, text, pooled, t, rope_scale=scale)
    theirs = run_reference(ref, x, text, pooled, t, scale)
    assert ours.shape == (B, 16, 3, 4, 6) and ours.dtype == torch.float32
    assert rel_err(ours, theirs) < 1e-5


def test_without_the_stand_in_diffusers_differs_by_bf16_rounding_only():
    model = tiny_model()
    x, text, pooled, t = inputs(B=2, i2v=True)
    with torch.no_grad():
        ours = model(x, text, pooled, t)
    err = rel_err(ours, run_reference(reference(model), x, text, pooled, t))
    assert 1e-6 < err < 5e-3  # bf16 has 8 significant bits: q/k rounding moves the output by ~1e-3 at most


def test_i2v_conditioning_changes_the_output():
    model = tiny_model()
    x, text, pooled, t = inputs(i2v=True)
    x_t2v = x.clone()
    x_t2v[:, 16:] = 0
    with torch.no_grad():
        assert rel_err(model(x, text, pooled, t), model(x_t2v, text, pooled, t)) > 1e-3


def _block_mask_sdpa(query, key, value, attn_mask=None, backend=None, parallel_config=None, **_):
    """Dense SDPA with diffusers' NABLA FlexAttention BlockMask expanded to a token mask ([B, S, H, D] layout)."""
    q, k, v = (a.transpose(1, 2) for a in (query, key, value))
    if attn_mask is not None:
        block = attn_mask.BLOCK_SIZE[0]
        dense = attn_mask.to_dense().bool()
        attn_mask = dense.repeat_interleave(block, -2).repeat_interleave(block, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)


@pytest.mark.parametrize("cfg", [NablaConfig(P=0.5, sta=False), NablaConfig(P=0.7, window=(11, 3, 3), sta=True)],
                         ids=["topcdf", "topcdf+sta"])
def test_nabla_parity_with_diffusers(exact_diffusers, monkeypatch, cfg):
    monkeypatch.setattr(dk, "dispatch_attention_fn", _block_mask_sdpa)
    model = tiny_model()
    x, text, pooled, t = inputs(B=1, T=2, H=48, W=48)  # token grid 2×24×24: 3×3 NABLA tiles per frame
    Hb = Wb = 3
    if cfg.sta:
        sta = Kandinsky5T2VPipeline.fast_sta_nabla(2, Hb, Wb, *cfg.window, device="cpu")
    else:
        sta = torch.zeros(2 * Hb * Wb, 2 * Hb * Wb, dtype=torch.bool)
    sparse = {"sta_mask": sta[None, None], "to_fractal": True, "P": cfg.P}
    theirs = run_reference(reference(model), x, text, pooled, t, sparse_params=sparse)
    with torch.no_grad():
        ours = model(x, text, pooled, t, nabla=cfg)
        dense = model(x, text, pooled, t)
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(ours, dense) > 1e-3  # the sparse mask did drop blocks


def test_nabla_with_P1_equals_full_attention():
    model = tiny_model()
    x, text, pooled, t = inputs(B=2, T=2, H=32, W=16)
    with torch.no_grad():
        sparse = model(x, text, pooled, t, nabla=NablaConfig(P=1.0, sta=False))
        dense = model(x, text, pooled, t)
    assert rel_err(sparse, dense) < 1e-5


def test_nabla_rejects_sizes_not_multiple_of_128px():
    model = tiny_model()
    x, text, pooled, t = inputs(T=1, H=24, W=16)  # token grid 12×8
    with pytest.raises(ValueError, match="multiples of 128"):
        model(x, text, pooled, t, nabla=NablaConfig())


# ---------------------------------------------------------------------------------------------------------------
# Patch orders, time embedding (independent formulas)


def test_patchify_feature_order_is_pt_ph_pw_c():
    B, C, T, H, W = 2, 5, 2, 4, 6
    x = torch.randn(B, C, T, H, W)
    tokens = patchify(x, (1, 2, 2))
    assert tokens.shape == (B, T * (H // 2) * (W // 2), 4 * C)
    for b, t, h, w in [(0, 0, 0, 0), (1, 1, 1, 2), (0, 1, 0, 1)]:
        token = (t * (H // 2) + h) * (W // 2) + w  # row-major (t, h, w)
        for ih in range(2):
            for iw in range(2):
                for c in range(C):
                    feature = (ih * 2 + iw) * C + c  # ((it·ph + ih)·pw + iw)·C + c with it = 0
                    assert tokens[b, token, feature] == x[b, c, t, 2 * h + ih, 2 * w + iw]


def test_unpatchify_feature_order_is_c_pt_ph_pw():
    B, C, grid = 2, 3, (2, 3, 2)
    feats = torch.randn(B, math.prod(grid), C * 4)
    out = unpatchify(feats, grid, (1, 2, 2))
    assert out.shape == (B, C, 2, 6, 4)
    for b, t, h, w in [(0, 0, 0, 0), (1, 1, 2, 1), (1, 0, 1, 0)]:
        token = (t * grid[1] + h) * grid[2] + w
        for c in range(C):
            for ih in range(2):
                for iw in range(2):
                    assert out[b, c, t, 2 * h + ih, 2 * w + iw] == feats[b, token, (c * 2 + ih) * 2 + iw]


def test_patchify_unpatchify_roundtrip_with_channel_reorder():
    x = torch.randn(1, 4, 3, 4, 4)
    tokens = patchify(x, (1, 2, 2))  # (ph, pw, C)
    reordered = tokens.view(1, -1, 2, 2, 4).permute(0, 1, 4, 2, 3).reshape(1, -1, 16)  # → (C, ph, pw)
    assert torch.equal(unpatchify(reordered, (3, 2, 2), (1, 2, 2)), x)


def test_apply_rope_rotates_interleaved_pairs():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.rand(5, 1, 4) * 6.0
    out = apply_rope(x, torch.polar(torch.ones_like(angles), angles))
    even, odd, c, s = x[..., 0::2], x[..., 1::2], torch.cos(angles), torch.sin(angles)
    assert torch.allclose(out[..., 0::2], even * c - odd * s, atol=1e-6)
    assert torch.allclose(out[..., 1::2], even * s + odd * c, atol=1e-6)
    real_path = _rotate_pairs_real(x.unflatten(-1, (-1, 2)), torch.polar(torch.ones_like(angles), angles))
    assert torch.allclose(real_path.flatten(-2), out, atol=1e-6)  # the MPS formulation
    assert apply_rope(x.bfloat16(), torch.polar(torch.ones_like(angles), angles)).dtype == torch.bfloat16


def test_rope_3d_angles_concatenate_t_h_w_and_divide_positions_by_scale():
    grid, axes, scale = (2, 3, 4), (4, 6, 6), (1.0, 2.0, 3.16)
    rot = rope_3d(grid, axes, scale)
    assert rot.shape == (24, 1, 8) and rot.dtype == torch.complex64
    for t, h, w in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        token = (t * 3 + h) * 4 + w
        expected = ([t / scale[0] * 10000.0 ** (-i / 2) for i in range(2)]
                    + [h / scale[1] * 10000.0 ** (-i / 3) for i in range(3)]
                    + [w / scale[2] * 10000.0 ** (-i / 3) for i in range(3)])
        for i, a in enumerate(expected):
            assert abs(rot[token, 0, i].real.item() - math.cos(a)) < 1e-5
            assert abs(rot[token, 0, i].imag.item() - math.sin(a)) < 1e-5
    text = rope_1d(7, 8)
    assert abs(text[6, 0, 1].imag.item() - math.sin(6 * 10000.0 ** (-1 / 4))) < 1e-5


def test_time_sinusoid_matches_independent_formula():
    D = 64
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    emb = timestep_sinusoid(t, D)
    assert emb.shape == (4, D) and emb.dtype == torch.float32
    for row, tv in enumerate(t.tolist()):
        for i in range(D // 2):
            angle = tv * 10000.0 ** (-i / (D // 2))
            assert abs(emb[row, i].item() - math.cos(angle)) < 2e-4  # cos first
            assert abs(emb[row, D // 2 + i].item() - math.sin(angle)) < 2e-4


def test_time_embedding_uses_model_dim_sinusoid_and_mlp():
    model = tiny_model()
    te = model.time_embeddings
    assert te.in_layer.in_features == TINY.model_dim and te.out_layer.out_features == TINY.time_dim
    t = torch.tensor([10.0, 700.0])
    expected = F.linear(F.silu(F.linear(timestep_sinusoid(t, TINY.model_dim), te.in_layer.weight, te.in_layer.bias)),
                        te.out_layer.weight, te.out_layer.bias)
    assert torch.allclose(te(t), expected)


# ---------------------------------------------------------------------------------------------------------------
# Batching and text padding


def test_batch_of_two_equals_two_single_calls():
    model = tiny_model()
    x, text, pooled, t = inputs(B=2, i2v=True)
    with torch.no_grad():
        both = model(x, text, pooled, t)
        singles = torch.cat([model(x[i:i + 1], text[i:i + 1], pooled[i:i + 1], t[i:i + 1]) for i in range(2)])
    assert rel_err(both, singles) < 1e-5


def test_padded_text_with_mask_equals_unpadded_text():
    model = tiny_model()
    x, text, pooled, t = inputs(B=2, L=7)
    lengths = [3, 7]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    padded = text.clone()
    padded[0, 3:] = 123.0  # garbage in padding must not leak
    with torch.no_grad():
        masked = model(x, padded, pooled, t, text_mask=mask)
        trimmed = torch.cat([model(x[i:i + 1], text[i:i + 1, :n], pooled[i:i + 1], t[i:i + 1])
                             for i, n in enumerate(lengths)])
        unmasked = model(x, padded, pooled, t)
    assert rel_err(masked, trimmed) < 1e-5
    assert rel_err(unmasked[:1], trimmed[:1]) > 1e-3


def test_scalar_timestep_broadcasts():
    model = tiny_model()
    x, text, pooled, _ = inputs(B=2)
    with torch.no_grad():
        a = model(x, text, pooled, 400.0)
        b = model(x, text, pooled, torch.tensor([400.0, 400.0]))
    assert torch.equal(a, b)


def test_autograd_forward_matches_inference_forward_and_reaches_every_parameter():
    model = tiny_model()
    x, text, pooled, t = inputs(B=2, L=4, i2v=True)
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    with torch.no_grad():
        reference = model(x, text, pooled, t, text_mask=mask)
    out = model(x.requires_grad_(), text, pooled, t, text_mask=mask)
    assert rel_err(out.detach(), reference) < 1e-6
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("dropouts", [{}, dict(dropout=0.2, rank_dropout=0.25, module_dropout=0.2)],
                         ids=["no-dropout", "dropouts"])
def test_fused_lora_projections_give_the_one_by_one_gradients(monkeypatch, dropouts):
    """q/k/v of every self-attention and k/v of every cross-attention run fused while training; the gradients of
    every adapter and of the input equal the layers called one by one."""
    from cinetune.core.lora import inject_lora
    from cinetune.k5 import blocks
    from cinetune.k5.family import K5_FAMILY

    model = tiny_model().train()
    modules = inject_lora(model, rank=2, alpha=2.0, targets=K5_FAMILY.lora_targets, within=K5_FAMILY.lora_within,
                          **dropouts)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.normal_(0.0, 0.1)
    x, text, pooled, t = inputs(B=2, L=4, i2v=True)
    mask = torch.tensor([[True, True, True, False], [True] * 4])

    def loss(video):
        return model(video, text, pooled, t, text_mask=mask).square().mean()

    fused = fused_check.lora_gradients(model, blocks, loss, x, monkeypatch, fused=True)
    separate = fused_check.lora_gradients(model, blocks, loss, x, monkeypatch, fused=False)
    # text blocks: self q/k/v; visual blocks: self q/k/v and cross k/v
    calls = TINY.num_text_blocks + 2 * TINY.num_visual_blocks
    assert fused.pop("fused calls") == calls and separate.pop("fused calls") == 0
    assert len(fused) == 1 + 2 * len(modules) if not dropouts else 1 < len(fused) < 1 + 2 * len(modules)
    fused_check.assert_same_gradients(fused, separate)


def test_feed_forward_in_token_slices_equals_whole(monkeypatch):
    from cinetune.k5 import blocks

    model = tiny_model()
    x, text, pooled, t = inputs(B=2, T=3, H=6, W=6)  # 27 tokens
    with torch.no_grad():
        whole = model(x, text, pooled, t)
        monkeypatch.setattr(blocks, "FF_CHUNK_TOKENS", 8)  # 4 slices, the last one short
        sliced = model(x, text, pooled, t)
    assert rel_err(sliced, whole) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Precision


def test_bf16_mixed_storage_follows_official_casts():
    model = tiny_model()
    x, text, pooled, t = inputs(B=2, i2v=True)
    with torch.no_grad():
        full = model(x, text, pooled, t)
        for name, p in model.named_parameters():
            if "modulation" not in name:  # official files: modulation fp32, the rest bf16
                p.data = p.data.to(torch.bfloat16)
        out = model(x.bfloat16(), text, pooled, t)
        out32 = model(x, text, pooled, t)  # same mixed weights, fp32 compute
    assert out.dtype == torch.bfloat16 and out32.dtype == torch.float32
    assert rel_err(out, full) < 3e-2
    assert rel_err(out32, full) < 3e-2  # only the weight rounding differs
    assert rel_err(out, out32) > 1e-4  # bf16 compute really ran in bf16


def test_modulation_is_computed_in_fp32_from_bf16_input():
    model = tiny_model()
    mod = model.visual_transformer_blocks[0].visual_modulation
    c = torch.randn(2, TINY.time_dim)
    chunks = mod(c.bfloat16())
    assert all(ch.dtype == torch.float32 and ch.shape == (2, 1, TINY.model_dim) for ch in chunks)


def test_all_linear_layers_cast_at_use():
    model = tiny_model()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, CastLinear) for m in linears)


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"][:, :16]}, "33"),
    (lambda a: {**a, "x": a["x"][..., :5]}, "multiple of the patch size"),
    (lambda a: {**a, "text": a["text"][..., :10]}, "Qwen2.5-VL"),
    (lambda a: {**a, "pooled": a["pooled"][:, :3]}, "CLIP pooled"),
    (lambda a: {**a, "timestep": torch.ones(3)}, "timestep"),
    (lambda a: {**a, "text_mask": torch.zeros(1, 5, dtype=torch.bool)}, "no real token"),
    (lambda a: {**a, "text_mask": torch.ones(1, 5)}, "text_mask must be bool"),
    (lambda a: {**a, "rope_scale": (1.0, 0.0, 2.0)}, "rope_scale"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    model = tiny_model()
    x, text, pooled, t = inputs()
    args = change({"x": x, "text": text, "pooled": pooled, "timestep": t, "text_mask": None,
                   "rope_scale": (1.0, 2.0, 2.0)})
    with pytest.raises(ValueError, match=message):
        model(args.pop("x"), args.pop("text"), args.pop("pooled"), args.pop("timestep"), **args)
