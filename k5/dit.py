"""Kandinsky 5 video DiT (Lite 2B / Pro 19B / Image Lite 6B) and its checkpoint loader.

Architecture and numerics: kandinskylab/kandinsky-5 ``kandinsky/models/dit.py`` and ``kandinsky/models/nn.py``; the
same network as diffusers ``Kandinsky5Transformer3DModel`` (``diffusers/models/transformers/transformer_kandinsky.py``),
against which the tests check parity.

Data flow for latents ``[B, C, T, H, W]`` (C = 33 = noisy 16 | conditioning 16 | mask 1):

1. patchify (1, 2, 2) with feature order (pt, ph, pw, C) → Linear → tokens ``[B, S, D]``, S = T·(H/2)·(W/2);
2. text: Linear(3584 → D) → LayerNorm; time: sinusoid of size D (cos first, timestep = 1000·σ) → MLP, plus pooled
   CLIP (Linear → LayerNorm) = conditioning vector ``c [B, time_dim]``;
3. text blocks: modulated self-attention (1-D RoPE, key padding mask) + FFN;
4. visual blocks: modulated self-attention (3-D RoPE, full or NABLA) + cross-attention to text (no RoPE) + FFN;
5. modulated LayerNorm → Linear(D → 64) → unpatchify with feature order (C, pt, ph, pw) → velocity
   ``[B, 16, T, H, W]``.

Precision (the official casts: ``apply_scale_shift_norm``, ``apply_gate_sum``, ``apply_rotary``, ``Modulation`` and
``TimeEmbeddings`` under float32 autocast): the time embedding, every modulation, LayerNorm/RMSNorm, RoPE and the
residual update run in float32; the residual stream, attention and Linear layers run in the input dtype (bf16
officially). Weights may be stored in any float dtype (each is cast at use), so a checkpoint with fp32
modulation and bf16 elsewhere runs as stored.

Decisions:

- **Text padding**: a key padding mask (``text_mask``) in text self-attention and cross-attention, as the current
  official code (``text_token_padding=True``); equivalent, for the valid tokens, to dropping the padding
  (older official code, diffusers, musubi-tuner). Text RoPE positions are 0..L−1 either way.
- **RoPE rounding**: the official code rounds rotated q/k to bfloat16 unconditionally (it always runs in bf16);
  diffusers copies that even for float32 inputs. Here rotated q/k are cast to the compute dtype, which is the
  official behaviour in bf16 and exact float32 in float32.
- **RoPE tables**: angles are computed per call (no buffers, so meta-device loading needs no re-initialisation);
  positions are not capped at the official table sizes (1024 text tokens, 128 per visual axis).
- **Batch**: B > 1 is supported (per-sample modulation), unlike the batch-1 official code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import attention, check_backend
from ..core.checkpoint import CheckpointError, TensorInfo, open_checkpoint
from ..core.quant import CastLinear
from ..core.weights import check_weight_dtype, load_weights
from . import detect  # noqa: F401 - registers the Kandinsky 5 checkpoint kind
from .config import EXPECTED_FILE, MARKER_KEY, K5Config, NotK5CheckpointError, detect_config
from .nabla import NablaConfig, check_nabla_grid, fractal_permutation, nabla_attention

MAX_PERIOD = 10000.0  # time embedding and RoPE base
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default, used by the official code
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) on float32 input
# Tokens per feed-forward slice without autograd: bounds the FFN hidden activations (Lite bf16: 4096·7168·2 B = 56 MiB
# per tensor instead of 1.3 GiB for a 10 s 768×512 video) while each GEMM stays large enough to run at full speed.
FF_CHUNK_TOKENS = 4096


# ---------------------------------------------------------------------------------------------------------------
# Functional pieces


def sinusoid_frequencies(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``f_i = exp(−ln(10000)·i/n)``, i = 0..n−1, float32 ``[n]`` (kandinskylab/kandinsky-5
    ``kandinsky/models/utils.py`` ``get_freqs``; used by the time embedding with n = D/2 and RoPE with n = dim/2)."""
    return torch.exp(-math.log(MAX_PERIOD) * torch.arange(n, dtype=torch.float32, device=device) / n)


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal time features ``[cos(t·f), sin(t·f)]`` (cos first), f = :func:`sinusoid_frequencies` (dim/2).

    Args:
        timestep: ``[B]`` float, = 1000·σ. dim: even feature size (the model_dim for K5, not time_dim).

    Returns:
        float32 ``[B, dim]``.
    """
    args = timestep.float()[:, None] * sinusoid_frequencies(dim // 2, timestep.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _rotations(args: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers ``cos(a) + i·sin(a)`` for rotation angles ``a`` (complex64, same shape)."""
    return torch.polar(torch.ones_like(args), args)


def rope_1d(length: int, head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE rotations for text positions 0..L−1 over the whole head: angle ``a[p, i] = p·10000^(−i/(hd/2))``
    (kandinskylab/kandinsky-5 ``kandinsky/models/nn.py`` ``RoPE1D``).

    Returns:
        complex64 ``[L, 1, hd/2]`` = ``cos(a) + i·sin(a)`` (broadcast over the heads of ``[B, L, H, hd/2]``).
    """
    pos = torch.arange(length, dtype=torch.float32, device=device)
    return _rotations(torch.outer(pos, sinusoid_frequencies(head_dim // 2, device)))[:, None]


def rope_3d(grid: tuple[int, int, int], axes_dims: tuple[int, int, int], scale: tuple[float, float, float],
            device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE rotations for the visual token grid, row-major (t, h, w) token order.

    Per axis a with positions 0..n_a−1: ``angle = (pos · 10000^(−i/(d_a/2))) / scale_a``, i < d_a/2; the three
    angle sets are concatenated [t | h | w] along the head (kandinskylab/kandinsky-5 ``kandinsky/models/nn.py``
    ``RoPE3D``).

    Args:
        grid: token grid (T', H', W'). axes_dims: (d_t, d_h, d_w). scale: position divisors, e.g. (1, 2, 2).

    Returns:
        complex64 ``[S, 1, hd/2]`` = ``cos(angle) + i·sin(angle)``, S = T'·H'·W'.
    """
    parts = []
    for axis, (n, dim, s) in enumerate(zip(grid, axes_dims, scale)):
        args = torch.outer(torch.arange(n, dtype=torch.float32, device=device), sinusoid_frequencies(dim // 2, device))
        args = args / s
        shape = [1, 1, 1, dim // 2]
        shape[axis] = n
        parts.append(args.view(shape).expand(*grid, dim // 2))
    return _rotations(torch.cat(parts, dim=-1).reshape(-1, 1, sum(axes_dims) // 2))


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by ``[[cos, −sin], [sin, cos]]`` in float32: as a complex product
    ``(x[2i] + i·x[2i+1])·(cos + i·sin)`` (same formula as the official ``apply_rotary``, one fused operation).

    Args:
        x: ``[B, S, H, hd]`` any float dtype. rotations: complex64 ``[S, 1, hd/2]`` (:func:`rope_1d`, :func:`rope_3d`).

    Returns:
        ``[B, S, H, hd]`` in ``x.dtype``.
    """
    pairs = x.float().contiguous().unflatten(-1, (-1, 2))
    if x.device.type == "mps":  # complex support on MPS is incomplete
        out = _rotate_pairs_real(pairs, rotations)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * rotations)
    return out.flatten(-2).to(x.dtype)


def _rotate_pairs_real(pairs: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """The product of :func:`apply_rope` with real tensors: pairs float32 ``[..., n, 2]`` → ``[..., n, 2]``."""
    x0, x1, cos, sin = pairs[..., 0], pairs[..., 1], rotations.real, rotations.imag
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``[B, C, T, H, W]`` → ``[B, S, pt·ph·pw·C]``, tokens row-major (t, h, w), features in (pt, ph, pw, C) order
    (feature index ((it·ph + ih)·pw + iw)·C + c; kandinskylab/kandinsky-5 ``VisualEmbeddings``)."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    x = x.view(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, (T // pt) * (H // ph) * (W // pw), pt * ph * pw * C)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """``[B, S, C·pt·ph·pw]`` → ``[B, C, T, H, W]``; features in (C, pt, ph, pw) order (kandinskylab/kandinsky-5
    ``OutLayer``: different from the input order)."""
    B = x.shape[0]
    Tg, Hg, Wg = grid
    pt, ph, pw = patch
    x = x.view(B, Tg, Hg, Wg, -1, pt, ph, pw)
    C = x.shape[4]
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(B, C, Tg * pt, Hg * ph, Wg * pw)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LayerNorm_noaffine(x)·(1 + scale) + shift`` in float32, cast to ``x.dtype`` (official
    ``apply_scale_shift_norm``). x ``[B, S, D]``; shift, scale float32 ``[B, 1, D]``."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=LAYER_NORM_EPS)
    return torch.addcmul(shift, normed, scale + 1.0).to(x.dtype)


def gated_residual(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate·out`` in float32, cast to ``x.dtype`` (official ``apply_gate_sum``; the residual stream keeps the
    compute dtype). x, out ``[B, S, D]``; gate float32 ``[B, 1, D]``."""
    return torch.addcmul(x.float(), gate, out.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Modules (attribute names = official state-dict names)


class TimeEmbeddings(nn.Module):
    """Sinusoid(model_dim) → Linear → SiLU → Linear, all in float32.

    ``[B]`` timestep → float32 ``[B, time_dim]``.
    """

    def __init__(self, model_dim: int, time_dim: int) -> None:
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = CastLinear(model_dim, time_dim)
        self.out_layer = CastLinear(time_dim, time_dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(timestep_sinusoid(timestep, self.model_dim))))


class TextEmbeddings(nn.Module):
    """Linear → LayerNorm (affine, float32 math, cast back). ``[..., in_dim]`` → ``[..., out_dim]`` in input dtype.
    Used for the Qwen tokens (3584 → D) and the pooled CLIP vector (768 → time_dim)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_layer = CastLinear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_layer(x)
        n = self.norm
        return F.layer_norm(h.float(), n.normalized_shape, n.weight.float(), n.bias.float(), LAYER_NORM_EPS).to(h.dtype)


class VisualEmbeddings(nn.Module):
    """Patchify + Linear(p·C → D). ``[B, C, T, H, W]`` → ``[B, S, D]`` in input dtype."""

    def __init__(self, visual_dim: int, model_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = CastLinear(math.prod(patch_size) * visual_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_layer(patchify(x, self.patch_size))


class Modulation(nn.Module):
    """``Linear(SiLU(c))`` in float32, split into ``num_params`` vectors ``[B, 1, D]`` (shift/scale/gate order as in
    the official ``Modulation``). Zero-initialised like the official code (identity blocks at training start)."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int) -> None:
        super().__init__()
        self.num_params = num_params
        self.out_layer = CastLinear(time_dim, num_params * model_dim)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = self.out_layer(F.silu(c.float()))
        return params.unsqueeze(1).chunk(self.num_params, dim=-1)


def _rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    return F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), RMS_NORM_EPS).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with per-head RMSNorm on q and k (float32), optional RoPE, biased projections.

    Self-attention when ``context`` is None (then RoPE applies), cross-attention otherwise (no RoPE).
    Scale 1/sqrt(head_dim). Official ``MultiheadSelfAttentionEnc/Dec`` and ``MultiheadCrossAttention``.
    """

    def __init__(self, model_dim: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = model_dim // head_dim
        self.head_dim = head_dim
        self.to_query = CastLinear(model_dim, model_dim)
        self.to_key = CastLinear(model_dim, model_dim)
        self.to_value = CastLinear(model_dim, model_dim)
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = CastLinear(model_dim, model_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                rope: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                backend: str = "sdpa", nabla: NablaConfig | None = None,
                grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """x ``[B, S, D]``; context ``[B, L, D]`` or None; rope: complex rotations ``[S, 1, hd/2]``; key_mask bool
        ``[B, Sk]`` (True = real token); nabla + grid: NABLA self-attention on fractal-ordered tokens.
        Returns ``[B, S, D]`` in ``x.dtype``."""
        B, S, D = x.shape
        kv = x if context is None else context
        q = _rms_norm(self.to_query(x).view(B, S, self.num_heads, self.head_dim), self.query_norm)
        k = _rms_norm(self.to_key(kv).view(B, kv.shape[1], self.num_heads, self.head_dim), self.key_norm)
        v = self.to_value(kv).view(B, kv.shape[1], self.num_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if nabla is not None:
            out = nabla_attention(q, k, v, grid, nabla)
        else:
            out = attention(q, k, v, backend=backend, key_padding_mask=key_mask)
        return self.out_layer(out.transpose(1, 2).reshape(B, S, D))


class FeedForward(nn.Module):
    """Linear(D → F, no bias) → exact GELU → Linear(F → D, no bias). ``[B, S, D]`` → ``[B, S, D]``.

    Without autograd, long sequences run in slices of :data:`FF_CHUNK_TOKENS` tokens (the FFN is per token), so the
    two ``[B, S, F]`` hidden tensors — the largest activations of the model — never exist at full length.
    """

    def __init__(self, model_dim: int, ff_dim: int) -> None:
        super().__init__()
        self.in_layer = CastLinear(model_dim, ff_dim, bias=False)
        self.out_layer = CastLinear(ff_dim, model_dim, bias=False)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.shape[1]
        if S <= FF_CHUNK_TOKENS or torch.is_grad_enabled():
            return self._mlp(x)
        out = torch.empty_like(x)
        for start in range(0, S, FF_CHUNK_TOKENS):
            out[:, start:start + FF_CHUNK_TOKENS] = self._mlp(x[:, start:start + FF_CHUNK_TOKENS])
        return out


class TextBlock(nn.Module):
    """Text transformer block (official ``TransformerEncoderBlock``): modulated self-attention with 1-D RoPE, then
    modulated FFN, each with a gated residual. Modulation order: sa shift, scale, gate, ff shift, scale, gate."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int) -> None:
        super().__init__()
        self.text_modulation = Modulation(time_dim, model_dim, 6)
        self.self_attention = Attention(model_dim, head_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor,
                text_mask: torch.Tensor | None = None, backend: str = "sdpa") -> torch.Tensor:
        """x ``[B, L, D]`` text tokens; c float32 ``[B, time_dim]``; rope from :func:`rope_1d`; text_mask bool
        ``[B, L]`` or None. Returns ``[B, L, D]`` in ``x.dtype``."""
        sa_shift, sa_scale, sa_gate, ff_shift, ff_scale, ff_gate = self.text_modulation(c)
        x = gated_residual(
            x, self.self_attention(modulate(x, sa_shift, sa_scale), rope=rope, key_mask=text_mask, backend=backend),
            sa_gate)
        return gated_residual(x, self.feed_forward(modulate(x, ff_shift, ff_scale)), ff_gate)


class VisualBlock(nn.Module):
    """Visual transformer block (official ``TransformerDecoderBlock``): modulated self-attention (3-D RoPE, full or
    NABLA), modulated cross-attention to the text tokens, modulated FFN; gated residuals. Modulation order:
    self-attention, cross-attention, FFN, each (shift, scale, gate)."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int) -> None:
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim, 9)
        self.self_attention = Attention(model_dim, head_dim)
        self.cross_attention = Attention(model_dim, head_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, c: torch.Tensor, rope: torch.Tensor,
                text_mask: torch.Tensor | None = None, backend: str = "sdpa", nabla: NablaConfig | None = None,
                grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """x ``[B, S, D]`` visual tokens (fractal order when ``nabla`` is set); text ``[B, L, D]`` output of the text
        blocks; c float32 ``[B, time_dim]``; rope from :func:`rope_3d` (same token order as x); text_mask bool
        ``[B, L]`` or None; grid (T', H', W') for NABLA. Returns ``[B, S, D]`` in ``x.dtype``."""
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
         ff_shift, ff_scale, ff_gate) = self.visual_modulation(c)
        # Each sub-layer output is consumed inline so no finished activation stays referenced during the next one.
        x = gated_residual(
            x, self.self_attention(modulate(x, sa_shift, sa_scale), rope=rope, backend=backend, nabla=nabla, grid=grid),
            sa_gate)
        x = gated_residual(
            x, self.cross_attention(modulate(x, ca_shift, ca_scale), text, key_mask=text_mask, backend=backend),
            ca_gate)
        return gated_residual(x, self.feed_forward(modulate(x, ff_shift, ff_scale)), ff_gate)


class OutLayer(nn.Module):
    """Modulated LayerNorm (shift, scale) → Linear(D → p·16) → unpatchify.

    ``[B, S, D]`` → ``[B, 16, T, H, W]``.
    """

    def __init__(self, model_dim: int, time_dim: int, visual_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.modulation = Modulation(time_dim, model_dim, 2)
        self.out_layer = CastLinear(model_dim, math.prod(patch_size) * visual_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        shift, scale = self.modulation(c)
        return unpatchify(self.out_layer(modulate(x, shift, scale)), grid, self.patch_size)


def _float_tensor(name: str, t, ndim: int, shape_hint: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or not t.is_floating_point():
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor {shape_hint}, got {got}")
    return t


class Kandinsky5DiT(nn.Module):
    """The Kandinsky 5 diffusion transformer (official ``DiffusionTransformer3D``), batched.

    State-dict keys are exactly the official ones (and diffusers'); text blocks live in ``text_transformer_blocks``,
    visual blocks in ``visual_transformer_blocks`` (one ``nn.Module`` per block, for block swap and checkpointing).

    Args:
        config: :class:`~cinetune.k5.config.K5Config`.
    """

    def __init__(self, config: K5Config) -> None:
        super().__init__()
        if not isinstance(config, K5Config):
            raise TypeError(f"config must be a K5Config, got {type(config).__name__}")
        self.config = config
        D, Tm, Fd, hd = config.model_dim, config.time_dim, config.ff_dim, config.head_dim
        self.time_embeddings = TimeEmbeddings(D, Tm)
        self.text_embeddings = TextEmbeddings(config.in_text_dim, D)
        self.pooled_text_embeddings = TextEmbeddings(config.in_text_dim2, Tm)
        self.visual_embeddings = VisualEmbeddings(config.visual_embed_dim, D, config.patch_size)
        self.text_transformer_blocks = nn.ModuleList(TextBlock(D, Tm, Fd, hd) for _ in range(config.num_text_blocks))
        self.visual_transformer_blocks = nn.ModuleList(
            VisualBlock(D, Tm, Fd, hd) for _ in range(config.num_visual_blocks))
        self.out_layer = OutLayer(D, Tm, config.out_visual_dim, config.patch_size)

    def _check_inputs(self, x, text, pooled, timestep, text_mask, rope_scale):
        cfg = self.config
        _float_tensor("x", x, 5, f"[B, {cfg.visual_embed_dim}, T, H, W]")
        B, C, T, H, W = x.shape
        if C != cfg.visual_embed_dim:
            what = ("noisy latent 16 | conditioning latent 16 | mask 1" if cfg.visual_cond else "latent")
            raise ValueError(f"x has {C} channels; this DiT takes {cfg.visual_embed_dim} ({what})")
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw or min(T, H, W) == 0:
            raise ValueError(f"latent size T×H×W = {T}×{H}×{W} must be a non-zero multiple of the patch size "
                             f"{cfg.patch_size} (latent H and W even, i.e. pixel sizes multiples of 16)")
        _float_tensor("text", text, 3, f"[B, L, {cfg.in_text_dim}]")
        if text.shape[0] != B or text.shape[2] != cfg.in_text_dim or text.shape[1] == 0:
            raise ValueError(f"text must be [B={B}, L≥1, {cfg.in_text_dim}] (Qwen2.5-VL hidden states), "
                             f"got {list(text.shape)}")
        _float_tensor("pooled", pooled, 2, f"[B, {cfg.in_text_dim2}]")
        if tuple(pooled.shape) != (B, cfg.in_text_dim2):
            raise ValueError(f"pooled must be [B={B}, {cfg.in_text_dim2}] (CLIP pooled output), "
                             f"got {list(pooled.shape)}")
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(float(timestep), device=x.device)
        if timestep.numel() not in (1, B) or timestep.ndim > 1:
            raise ValueError(f"timestep must be a scalar or [B={B}] (1000·σ), got shape {list(timestep.shape)}")
        timestep = timestep.reshape(-1).float().expand(B)
        if text_mask is not None:
            if (not isinstance(text_mask, torch.Tensor) or text_mask.dtype != torch.bool
                    or tuple(text_mask.shape) != tuple(text.shape[:2])):
                got = f"{text_mask.dtype} {list(text_mask.shape)}" if isinstance(text_mask, torch.Tensor) else text_mask
                raise ValueError(f"text_mask must be bool [B, L] = {list(text.shape[:2])} (True = real token), "
                                 f"got {got}")
            if not bool(text_mask.any(dim=1).all()):
                raise ValueError("text_mask has a sample with no real token; every prompt needs at least one token")
            if bool(text_mask.all()):
                text_mask = None
        try:
            scale = tuple(float(s) for s in rope_scale)
        except (TypeError, ValueError):
            scale = ()
        if len(scale) != 3 or not all(s > 0 and math.isfinite(s) for s in scale):
            raise ValueError(f"rope_scale must be three positive numbers (t, h, w), e.g. (1, 2, 2); got {rope_scale}")
        return timestep, text_mask, scale

    def forward(self, x: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor | float, *,
                text_mask: torch.Tensor | None = None, rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0),
                attention_backend: str = "sdpa", nabla: NablaConfig | None = None) -> torch.Tensor:
        """Predict the flow-matching velocity ``v = ε − x0``.

        Args:
            x: ``[B, visual_embed_dim, T, H, W]`` latent in the compute dtype (fp32, bf16 or fp16): noisy latent
                (16) | conditioning latent (16) | mask (1) for video checkpoints; H, W latent size (even).
            text: ``[B, L, in_text_dim]`` Qwen2.5-VL hidden states (cast to ``x.dtype``).
            pooled: ``[B, in_text_dim2]`` CLIP-L pooled output (cast to ``x.dtype``).
            timestep: ``[B]`` (or scalar) float, ``1000·σ``.
            text_mask: bool ``[B, L]``, True = real token, or None (all real).
            rope_scale: RoPE position divisors (t, h, w): (1, 2, 2) SD, (1, 3.16, 3.16) HD, (1, 1, 1) image models.
            attention_backend: :mod:`cinetune.core.attention` backend for dense attention.
            nabla: NABLA settings for the visual self-attention, or None for full attention. Tokens are put into
                fractal order (with their RoPE) before the visual blocks and back before the out layer.

        Returns:
            Velocity ``[B, 16, T, H, W]`` in ``x.dtype``.

        Raises:
            ValueError: shapes/dtypes wrong (the message gives the expected shape); with NABLA, latent H/2 or W/2
                not a multiple of 8 (pixel sizes not multiples of 128); bad rope_scale or text_mask.
            AttentionBackendError: unknown or missing attention backend.
        """
        timestep, text_mask, scale = self._check_inputs(x, text, pooled, timestep, text_mask, rope_scale)
        check_backend(attention_backend)
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        perm = inv = None
        if nabla is not None:
            if not isinstance(nabla, NablaConfig):
                raise ValueError(f"nabla must be a NablaConfig or None, got {type(nabla).__name__}")
            if pt != 1:
                raise ValueError(f"NABLA needs temporal patch size 1, this DiT has {pt}")
            check_nabla_grid(*grid)
            perm, inv = fractal_permutation(*grid, device=x.device)
        dtype = x.dtype

        c = self.time_embeddings(timestep) + self.pooled_text_embeddings(pooled.to(dtype)).float()
        txt = self.text_embeddings(text.to(dtype))
        visual = self.visual_embeddings(x)

        text_rope = rope_1d(txt.shape[1], cfg.head_dim, x.device)
        for block in self.text_transformer_blocks:
            txt = block(txt, c, text_rope, text_mask, attention_backend)

        visual_rope = rope_3d(grid, cfg.axes_dims, scale, x.device)
        if perm is not None:
            visual, visual_rope = visual[:, perm], visual_rope[perm]
        for block in self.visual_transformer_blocks:
            visual = block(visual, txt, c, visual_rope, text_mask, attention_backend, nabla, grid)
        if inv is not None:
            visual = visual[:, inv]
        return self.out_layer(visual, c, grid)


# ---------------------------------------------------------------------------------------------------------------
# Loading

# Prefix → layout name. Official files have no prefix; ComfyUI checkpoints nest the DiT under model.diffusion_model.
_PREFIXES = (("model.diffusion_model.", "comfyui"), ("diffusion_model.", "comfyui"), ("transformer.", "diffusers"))
_DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
_BLOCK_LISTS = ("text_transformer_blocks", "visual_transformer_blocks")
_K5_HIGH_PRECISION_PREFIXES = ("time_embeddings.", "text_embeddings.", "pooled_text_embeddings.",
                               "visual_embeddings.", "out_layer.")


def k5_fp8_keep_high_precision(name: str) -> bool:
    """Kandinsky 5 rule for weight-only fp8: which Linear layers stay in high precision (the ``keep`` argument of
    :func:`~cinetune.core.quant.quantize_linear_weights_fp8` and :func:`~cinetune.core.quant.save_fp8_checkpoint`).

    Kept: the time, text, pooled-text and visual embeddings, every modulation (``*modulation*``: they compute shift,
    scale and gate in float32 for every block), norms, and the final ``out_layer.*`` (it produces the velocity
    directly). Quantised: the attention projections and both feed-forward layers of every text and visual block —
    86 % of the Lite parameters (88 % of Pro); the modulations hold most of the rest (14 % / 12 %).

    Sources and choice: the official fp8 recipe (ai-forever ``create_fp8_full.py``, torchao dynamic-activation fp8)
    keeps the embeddings and the out layer in high precision; kohya-ss/musubi-tuner (``kandinsky5``, ``--fp8_scaled``)
    quantises only keys under the text/visual blocks and the out layer, never norms. Here the embeddings and the out
    layer are kept as officially, and the modulations too although both sources quantise them: their output (shift,
    scale and gate of every block, computed in float32 on purpose) acts on every token, so fp8 there would trade
    accuracy in every block for 14 % of the weight memory. The official recipe also keeps every
    ``feed_forward.out_layer`` because it quantises *activations* and the GELU output has a long tail; with
    weight-only fp8 (activations stay in the compute dtype) that reason does not apply, so those layers are
    quantised here, as in musubi-tuner.

    This rule decides what *this pack* quantises on load; layers a pre-quantised file stores in fp8 stay fp8 (see
    :func:`load_k5_dit`).

    Args:
        name: qualified module name inside the DiT, e.g. ``"visual_transformer_blocks.3.self_attention.to_query"``.

    Returns:
        True to keep the layer in high precision.
    """
    full = name + "."
    return full.startswith(_K5_HIGH_PRECISION_PREFIXES) or "modulation" in name or "norm" in name


@dataclass
class LoadedK5DiT:
    """Result of :func:`load_k5_dit`.

    Attributes:
        model: the DiT, in eval mode with ``requires_grad=False``.
        config: detected :class:`K5Config`.
        layout: ``"official"`` (no prefix), ``"comfyui"`` (``model.diffusion_model.`` prefix) or ``"diffusers"``
            (a diffusers transformer folder / shard index, or a ``transformer.`` prefix).
        path: the file or folder loaded.
        dtypes: histogram of the *stored* tensor dtypes of the DiT weights (scales not counted), e.g.
            ``{"BF16": 780, "F32": 34}``.
        fp8_layout: the file's fp8 layout (:class:`~cinetune.core.checkpoint.FP8Scheme`): ``"musubi"``,
            ``"comfyui"``, ``"comfyui_mixed"``, ``"weight_scale"``, ``"unscaled"`` (a plain fp8 cast), or None.
    """

    model: Kandinsky5DiT
    config: K5Config
    layout: str
    path: Path
    dtypes: dict[str, int] = field(default_factory=dict)
    fp8_layout: str | None = None


def _first(items, n: int = 10) -> str:
    items = sorted(items)
    more = f" … (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _resolve_files(path: Path) -> tuple[Path, str | None, dict]:
    """Return (the file or shard index to open, layout hint, diffusers config.json contents)."""
    if path.is_dir():
        for folder in (path, path / "transformer"):
            if (folder / _DIFFUSERS_INDEX).is_file():
                path = folder / _DIFFUSERS_INDEX
                break
            if (folder / _DIFFUSERS_FILE).is_file():
                path = folder / _DIFFUSERS_FILE
                break
        else:
            raise CheckpointError(
                f"{path}: folder holds neither {_DIFFUSERS_FILE} nor {_DIFFUSERS_INDEX} (also looked in transformer/); "
                f"expected {EXPECTED_FILE}, or a diffusers Kandinsky 5 transformer folder.")
    config_json = path.parent / "config.json"
    diffusers_config: dict = {}
    if config_json.is_file() and path.name in (_DIFFUSERS_FILE, _DIFFUSERS_INDEX):
        try:
            diffusers_config = json.loads(config_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_json}: unreadable diffusers config ({e}).") from e
    diffusers = bool(diffusers_config) or path.name.endswith(".index.json")
    return path, ("diffusers" if diffusers else None), diffusers_config


def _select_prefix(infos: Mapping[str, TensorInfo]) -> tuple[str, str]:
    if MARKER_KEY in infos:
        return "", "official"
    for prefix, layout in _PREFIXES:
        if prefix + MARKER_KEY in infos:
            return prefix, layout
    return "", "official"


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _check_keys(path: Path, config: K5Config, found: Mapping[str, TensorInfo],
                expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_first(unexpected)}")
    bad = [f"{k} {list(found[k].shape)} (expected {list(expected[k])})" for k in sorted(set(found) & set(expected))
           if tuple(found[k].shape) != expected[k]]
    if bad:
        problems.append(f"{len(bad)} tensors with wrong shapes: {_first(bad)}")
    if problems:
        family = config.family if config.family != "custom" else "custom-size"
        raise CheckpointError(
            f"{path}: not a complete Kandinsky 5 {family} DiT (model_dim {config.model_dim}, "
            f"{config.num_text_blocks} text + {config.num_visual_blocks} visual blocks): " + "; ".join(problems)
            + f". Expected {EXPECTED_FILE} as published, without extra or missing tensors; re-download the file.")


def load_k5_dit(path: str | os.PathLike, *, weight_dtype: str = "default",
                device: str | torch.device = "cpu") -> LoadedK5DiT:
    """Load a Kandinsky 5 DiT checkpoint, detecting its dims (:func:`~cinetune.k5.config.detect_config`) and layout.

    Accepted: the official ``.safetensors`` (no prefix); ComfyUI checkpoints (``model.diffusion_model.`` prefix,
    other non-DiT tensors never read); diffusers transformer weights — a ``diffusion_pytorch_model.safetensors``
    file, a sharded ``…index.json``, or the folder holding them (or its parent with ``transformer/``). Diffusers 0.42
    ``Kandinsky5Transformer3DModel`` uses the official tensor names, so no renaming is needed; its ``config.json``
    supplies ``axes_dims`` when present. PyTorch pickles (``.pt``/``.pth``/``.bin``) are read too.

    The file is read tensor by tensor (:class:`~cinetune.core.checkpoint.Checkpoint`, never memory-mapped), each
    tensor converted to its target dtype as it arrives, so host memory stays near the loaded model's size plus one
    tensor: a 19B Pro file loads as fp8 on a host with less memory than the file. On the CPU each transformer block
    is read into one buffer of block swap's master layout, which :class:`~cinetune.core.offload.BlockSwap` takes over
    without copying.

    fp8 files (every layout :attr:`~cinetune.core.checkpoint.Checkpoint.fp8` reads: musubi-tuner, ComfyUI scaled fp8
    and mixed precision, ``weight_scale`` files, plain fp8 casts): each layer the file stores in fp8 becomes an
    :class:`~cinetune.core.quant.FP8Linear` holding the stored codes and scales unchanged (scales as float32, an exact
    conversion; scale 1 for a plain cast) — with ``weight_dtype`` ``"default"`` or ``"fp8_e4m3fn"``, whichever layers
    these are (musubi files also quantise the modulations and the out layer). With ``"bf16"``/``"fp16"``/``"fp32"``
    those layers are dequantised on load instead, ``W = q · s`` in float32 rounded once to the dtype (no memory
    saving; the way to run fp8 files on a device that cannot hold float8).

    Args:
        path: file or folder.
        weight_dtype: ``"default"`` keeps each tensor's stored dtype (a file with fp32 modulation and bf16 elsewhere
            stays so; the forward casts at use; pre-quantised layers stay fp8); ``"bf16"``, ``"fp16"``, ``"fp32"``
            cast every float tensor and dequantise pre-quantised layers; ``"fp8_e4m3fn"`` keeps pre-quantised
            layers and stores every other block Linear weight in float8 with a per-tensor scale (see
            :func:`k5_fp8_keep_high_precision`), the rest as stored.
        device: where the weights go.

    Returns:
        :class:`LoadedK5DiT`.

    Raises:
        ValueError: unknown ``weight_dtype``.
        FP8DeviceError: fp8 weights would be kept on a device that cannot cast float8 (use ``weight_dtype="bf16"``).
        NotK5CheckpointError: the file is another kind of model (LTX-2, VAE, text encoder, LoRA, …); the message says
            which and what was expected.
        CheckpointError: missing/truncated/unreadable file, not enough host memory (with what to do), missing or
            unexpected tensors (listed), wrong shapes; in an fp8 file: an fp8 weight without scale where the layout
            requires one, a scale without fp8 weight, a scale of the wrong shape, fp8 on a tensor that is not a
            Linear weight, NVFP4/4-bit layers (each names the key).
    """
    check_weight_dtype(weight_dtype)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found. Expected {EXPECTED_FILE}.")
    target_path, layout_hint, diffusers_config = _resolve_files(path)
    try:
        ckpt = open_checkpoint(target_path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} Expected {EXPECTED_FILE}.") from e

    prefix, layout = _select_prefix(ckpt.infos)
    dit = ckpt.select(prefix)
    try:
        scheme = dit.fp8
    except CheckpointError:
        if MARKER_KEY not in dit.infos:  # another model's fp8 file: say what it is rather than what its scales lack
            try:
                detect_config(dit.infos)
            except NotK5CheckpointError as e:
                raise NotK5CheckpointError(f"{path}: {e}") from e
        raise
    dit_infos = dit.model_infos()
    try:
        config = detect_config(dit_infos)
    except NotK5CheckpointError as e:
        raise NotK5CheckpointError(f"{path}: {e}") from e
    if diffusers_config.get("axes_dims") and tuple(diffusers_config["axes_dims"]) != config.axes_dims:
        axes = tuple(int(a) for a in diffusers_config["axes_dims"])
        try:
            config = dataclasses.replace(config, axes_dims=axes)
        except ValueError as e:
            raise CheckpointError(f"{path}: config.json axes_dims {axes} do not fit the weights: {e}") from e
    if layout_hint is not None and prefix == "":
        layout = layout_hint

    with torch.device("meta"):
        model = Kandinsky5DiT(config)
    expected = _expected_shapes(model)  # FP8Linear and CastLinear share the keys weight/bias; scales come apart
    _check_keys(path, config, dit_infos, expected)
    blocks = [f"{name}.{i}." for name in _BLOCK_LISTS for i in range(len(getattr(model, name)))]
    load_weights(model, dit, list(expected), weight_dtype=weight_dtype, keep=k5_fp8_keep_high_precision,
                 block_prefixes=blocks, device=device)
    histogram: dict[str, int] = {}
    for name in expected:
        histogram[dit_infos[name].dtype] = histogram.get(dit_infos[name].dtype, 0) + 1
    return LoadedK5DiT(model=model, config=config, layout=layout, path=path, dtypes=histogram,
                       fp8_layout=scheme.layout)
