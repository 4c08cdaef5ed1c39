"""The layers of the Kandinsky 5 video DiT: time, text and visual embeddings, modulation, attention, feed-forward,
the text and visual transformer blocks and the out layer, with the functional pieces they share (sinusoids, RoPE,
patchify, modulated LayerNorm, gated residual). :class:`~cinetune.k5.dit.Kandinsky5DiT` assembles them.

Sources: kandinskylab/kandinsky-5 ``kandinsky/models/nn.py`` and ``kandinsky/models/utils.py``; module attribute
names are the official state-dict names.

Precision (the official casts: ``apply_scale_shift_norm``, ``apply_gate_sum``, ``apply_rotary``, ``Modulation`` and
``TimeEmbeddings`` under float32 autocast): the time embedding, every modulation, LayerNorm/RMSNorm, RoPE and the
residual update run in float32; the residual stream, attention and Linear layers run in the input dtype (bf16
officially). Weights may be stored in any float dtype (each is cast at use), so a checkpoint with fp32
modulation and bf16 elsewhere runs as stored.

Decisions:

- **RoPE rounding**: the official code rounds rotated q/k to bfloat16 unconditionally (it always runs in bf16);
  diffusers copies that even for float32 inputs. Here rotated q/k are cast to the compute dtype, which is the
  official behaviour in bf16 and exact float32 in float32.
- **RoPE tables**: angles are computed per call (no buffers, so meta-device loading needs no re-initialisation);
  positions are not capped at the official table sizes (1024 text tokens, 128 per visual axis).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import attention
from ..core.lora_fused import fused_projections
from ..core.quant import CastLinear
from ..core.recompute import mlp
from .nabla import NablaConfig, nabla_attention

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
    Scale 1/sqrt(head_dim). Official ``MultiheadSelfAttentionEnc/Dec`` and ``MultiheadCrossAttention``. While
    autograd records, LoRA projections that read the same tokens (q/k/v of self-attention, k/v of cross-attention)
    share their down-projection GEMMs (:func:`~cinetune.core.lora_fused.fused_projections`).
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
        if context is None:
            q, k, v = fused_projections(x, (self.to_query, self.to_key, self.to_value))
        else:
            q, (k, v) = self.to_query(x), fused_projections(context, (self.to_key, self.to_value))
        q = _rms_norm(q.view(B, S, self.num_heads, self.head_dim), self.query_norm)
        k = _rms_norm(k.view(B, kv.shape[1], self.num_heads, self.head_dim), self.key_norm)
        v = v.view(B, kv.shape[1], self.num_heads, self.head_dim)
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
    two ``[B, S, F]`` hidden tensors — the largest activations of the model — never exist at full length. With
    autograd the GELU output that a LoRA adapter on ``out_layer`` would keep is recomputed from the GELU input in the
    backward instead (:func:`~cinetune.core.recompute.mlp`).
    """

    def __init__(self, model_dim: int, ff_dim: int) -> None:
        super().__init__()
        self.in_layer = CastLinear(model_dim, ff_dim, bias=False)
        self.out_layer = CastLinear(ff_dim, model_dim, bias=False)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(x, self.in_layer, F.gelu, self.out_layer)

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
