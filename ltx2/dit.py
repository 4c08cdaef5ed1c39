"""LTX-2 19B audio+video diffusion transformer (DiT), with the official module and parameter names.

Architecture and numerics: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/model/transformer/`` (``model.py``,
``transformer.py`` ``BasicAVTransformerBlock``, ``transformer_args.py``, ``attention.py``, ``adaln.py``,
``timestep_embedding.py``, ``text_projection.py``, ``feed_forward.py``), February 2026 (the 19B release line). The
same network as diffusers ``LTX2VideoTransformer3DModel`` (``diffusers/models/transformers/transformer_ltx2.py``)
with ``use_cross_timestep=False``, against which the tests check parity. ``state_dict()`` keys are the official keys
without ``model.diffusion_model.`` (text connectors excluded: they live in ``ltx2/text.py``).

Data flow (video width D = 4096, audio width Da = 2048 for 19B):

1. tokens: video ``[B, Nv, 128]`` → ``patchify_proj`` → ``[B, Nv, D]``; audio ``[B, Na, 128]`` →
   ``audio_patchify_proj`` → ``[B, Na, Da]``;
2. text: each connector output ``[B, L, 3840]`` → its caption projection (Linear, GELU-tanh, Linear) → ``[B, L, D]``
   / ``[B, L, Da]``;
3. time: per-token σ·1000 → sinusoid(256, cos first) → ``linear_1`` → SiLU → ``linear_2`` = embedded timestep →
   SiLU → ``linear`` = modulation (6 rows per block for each stream; 4 + 1 rows for the audio↔video
   cross-attentions, whose gate AdaLN sees σ·``av_ca_timestep_scale_multiplier``);
4. 48 dual-stream blocks (order below);
5. head: LayerNorm (no affine) · (1 + scale) + shift with (shift, scale) = ``scale_shift_table`` + embedded
   timestep, then ``proj_out`` → velocity ``[B, Nv, 128]`` (and ``audio_proj_out`` → ``[B, Na, 128]``).

Block (``BasicAVTransformerBlock.forward``; rms = parameter-free RMSNorm, eps 1e-6; modulation rows of
``scale_shift_table``: 0 shift, 1 scale, 2 gate of self-attention, 3 shift, 4 scale, 5 gate of the feed-forward)::

    v += attn1(rms(v)·(1+scale)+shift, rope=video) · gate          # skipped for STG blocks
    v += attn2(rms(v), text_v)                                      # no modulation, no gate
    a += audio_attn1(…) · gate ;  a += audio_attn2(rms(a), text_a)
    vn, an = rms(v), rms(a)                                         # both before either cross update
    v += audio_to_video_attn(vn·(1+sc)+sh, an·(1+sc')+sh', rope=(video time, audio time)) · gate_a2v
    a += video_to_audio_attn(an·(1+sc)+sh, vn·(1+sc')+sh', rope=(audio time, video time)) · gate_v2a
    v += ff(rms(v)·(1+scale)+shift) · gate ;  a += audio_ff(…) · gate

The 5-row ``scale_shift_table_a2v_ca_{video,audio}`` tables hold (scale a2v, shift a2v, scale v2a, shift v2a, gate).
Attention: q/k RMSNorm over the whole width (learnable weight), RoPE on q and k (:mod:`cinetune.ltx2.rope`), softmax
attention through :func:`cinetune.core.attention.attention`, ``to_out.0``.

Precision: as the official code, everything runs in the compute dtype (the dtype of the ``video`` input; weights of
any float dtype are cast at use by :class:`~cinetune.core.quant.CastLinear`), except the timestep sinusoid, the RoPE
angles and the rotation itself (float32, rounded once; see :mod:`cinetune.ltx2.rope`).

Decisions:

- **Audio↔video AdaLN timesteps**: each modality's own per-token timesteps feed its cross-attention scale/shift
  and gate AdaLNs (the 19B "legacy" behaviour of the official January/February code, ComfyUI, and diffusers with
  ``use_cross_timestep=False``). Later official code takes the other modality's σ; that is another model's setting.
- **Modulation per distinct timestep**: the AdaLNs run once per distinct σ of a forward pass (usually one per
  sample, or two for image-to-video: the conditioned first frame at σ = 0 and the rest) and each token picks its
  row, instead of running them for every token as the official code does. Same values; for a 24 576-token video it
  avoids the ``[B, T, 6·D]`` modulation tensors (1.2 GB in bf16) and their per-block copies.
- **STG** (``skip_self_attn_blocks``) drops the self-attention residual of both streams in those blocks, as the
  official ``SKIP_VIDEO_SELF_ATTN`` / ``SKIP_AUDIO_SELF_ATTN`` perturbations do (diffusers' ``perturbed_attn``
  instead replaces attention by its values: not the 19B behaviour).
- **Video-only** (``audio=None``): the audio stream and both cross-modal attentions are skipped, as in the official
  model when no audio modality is given.
- **Feed-forward without autograd** runs in slices of :data:`FF_CHUNK_TOKENS` tokens (it is per token), so the
  ``[B, T, 4·D]`` hidden activations never exist at full length.
- **Temporaries reused without autograd**: when no graph is recorded, elementwise steps write into buffers that only
  they hold (each residual sum into the sublayer's output, the modulation into the normed copy, q/k norm and GELU
  into the projection's output, RoPE into one fresh buffer), so each step is one pass and allocates nothing. The
  token streams passed to a block are never modified. With autograd the same formulas run out of place.
- **RMSNorm, modulation and residuals** live in :mod:`cinetune.ltx2.modulation` (the CPU RMSNorm with its hand-written
  backward); the split RoPE has one too (:func:`cinetune.ltx2.rope.apply_rope`).
- **LoRA projections that read the same tokens train fused** (:func:`cinetune.core.lora_fused.fused_projections`):
  ``to_q``/``to_k``/``to_v`` of a self-attention, ``to_k``/``to_v`` of a cross-attention share one down-projection
  GEMM and one input-gradient buffer under autograd, where they are plain Linear layers in the compute dtype
  (otherwise, and without autograd, one by one). Same values up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.attention import attention, check_backend
from ..core.lora_fused import fused_projections
from ..core.quant import CastLinear
from ..core.recompute import mlp
from .config import LTX2TransformerConfig
from .modulation import (AdaValues, CPURMSNorm, TokenTimesteps, inv_rms, modulated, owned, residual, rms,
                         scale_shift)
from .rope import apply_rope, cross_modal_positions, rope_frequencies

#: Width of the sinusoidal timestep features (official ``Timesteps(num_channels=256)``).
TIMESTEP_FEATURES = 256
MAX_PERIOD = 10000.0
#: Tokens per feed-forward slice when no gradient is recorded.
FF_CHUNK_TOKENS = 4096
Rope = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Token layout helpers


def patchify_video(latent: torch.Tensor) -> torch.Tensor:
    """Video latent ``[B, C, F, H, W]`` → tokens ``[B, F·H·W, C]`` in (f h w) order (patch size 1; Lightricks/LTX-2
    ``components/patchifiers.py`` ``VideoLatentPatchifier``)."""
    if latent.ndim != 5:
        raise ValueError(f"video latent must be [B, C, F, H, W], got {list(latent.shape)}")
    return latent.flatten(2).transpose(1, 2).contiguous()


def unpatchify_video(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Tokens ``[B, F·H·W, C]`` → video latent ``[B, C, F, H, W]`` (inverse of :func:`patchify_video`)."""
    B, N, C = tokens.shape
    if N != frames * height * width:
        raise ValueError(f"{N} tokens do not fill a {frames}×{height}×{width} latent grid")
    return tokens.transpose(1, 2).reshape(B, C, frames, height, width)


def patchify_audio(latent: torch.Tensor) -> torch.Tensor:
    """Audio latent ``[B, C, T, M]`` (8 channels × T steps × 16 mel bins) → tokens ``[B, T, C·M]``, features
    channel-major ``(c m)`` (Lightricks/LTX-2 ``AudioPatchifier.patchify``)."""
    if latent.ndim != 4:
        raise ValueError(f"audio latent must be [B, C, T, M], got {list(latent.shape)}")
    B, C, T, M = latent.shape
    return latent.permute(0, 2, 1, 3).reshape(B, T, C * M)


def unpatchify_audio(tokens: torch.Tensor, channels: int = 8, mel_bins: int = 16) -> torch.Tensor:
    """Tokens ``[B, T, C·M]`` → audio latent ``[B, C, T, M]`` (inverse of :func:`patchify_audio`)."""
    B, T, features = tokens.shape
    if features != channels * mel_bins:
        raise ValueError(f"audio tokens have {features} features, expected channels·mel_bins = {channels * mel_bins}")
    return tokens.reshape(B, T, channels, mel_bins).permute(0, 2, 1, 3).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Timesteps and modulation


def timestep_sinusoid(timestep: torch.Tensor, dim: int = TIMESTEP_FEATURES) -> torch.Tensor:
    """``[cos(t·f), sin(t·f)]`` with ``f_i = exp(−ln(10000)·i/(dim/2))`` (official ``get_timestep_embedding`` with
    ``flip_sin_to_cos=True, downscale_freq_shift=0``). timestep ``[N]`` (= 1000·σ) → float32 ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``linear_2(SiLU(linear_1(features)))``: ``[N, 256]`` → ``[N, D]`` (official ``TimestepEmbedding``)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = CastLinear(in_features, dim)
        self.linear_2 = CastLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _CombinedTimestepEmbeddings(nn.Module):
    """Holds ``timestep_embedder`` (official ``PixArtAlphaCombinedTimestepSizeEmbeddings`` without size terms)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_FEATURES, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))


class AdaLayerNormSingle(nn.Module):
    """adaLN-single (PixArt-α, arXiv 2310.00426 §2.3; official ``AdaLayerNormSingle``): timestep →
    ``(linear(SiLU(e)), e)`` with the embedded timestep e.

    Args:
        dim: stream width D. coefficient: modulation rows k (6 blocks, 4 cross scale/shift, 1 cross gate).
    """

    def __init__(self, dim: int, coefficient: int) -> None:
        super().__init__()
        self.emb = _CombinedTimestepEmbeddings(dim)
        self.linear = CastLinear(dim, coefficient * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep float ``[N]`` (= multiplier·σ) → (modulation ``[N, k·D]``, embedded ``[N, D]``) in ``dtype``."""
        embedded = self.emb(timestep, dtype)
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """``linear_2(GELU_tanh(linear_1(x)))``: text ``[B, L, caption_channels]`` → ``[B, L, D]`` (official
    ``PixArtAlphaTextProjection``)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = CastLinear(in_features, dim)
        self.linear_2 = CastLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------------------------
# Layers


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over the whole width, optional RoPE, biased projections (official
    ``Attention``; keys ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``q_norm``, ``k_norm``).

    Args:
        query_dim: width of the queries' stream. context_dim: width of the keys' stream (None = query_dim).
        heads, head_dim: attention heads (inner width = heads · head_dim). eps: q/k RMSNorm epsilon.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.eps = eps
        self.q_norm = nn.RMSNorm(inner, eps=eps)
        self.k_norm = nn.RMSNorm(inner, eps=eps)
        self.to_q = CastLinear(query_dim, inner)
        self.to_k = CastLinear(context_dim, inner)
        self.to_v = CastLinear(context_dim, inner)
        self.to_out = nn.Sequential(CastLinear(inner, query_dim), nn.Identity())

    def _norm(self, x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
        """q/k RMSNorm of a projection output ``x`` (a temporary: reused as the output buffer without autograd)."""
        weight = norm.weight.to(x.dtype)
        if x.device.type != "cpu":
            return F.rms_norm(x, norm.normalized_shape, weight, self.eps)
        if torch.is_grad_enabled():
            return CPURMSNorm.apply(x, weight, self.eps)
        x = torch.mul(x, inv_rms(x, self.eps), out=owned(x))
        return torch.mul(x, weight, out=owned(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, rope: Rope | None = None,
                k_rope: Rope | None = None, key_mask: torch.Tensor | None = None,
                backend: str = "sdpa") -> torch.Tensor:
        """x ``[B, T, query_dim]``; context ``[B, S, context_dim]`` or None (self-attention); rope: (cos, sin) for
        the queries (and keys unless ``k_rope``); key_mask bool ``[B, S]`` (True = attended). Returns
        ``[B, T, query_dim]`` in ``x.dtype``."""
        B, T, _ = x.shape
        if context is None:
            q, k, v = fused_projections(x, (self.to_q, self.to_k, self.to_v))
        else:
            q = self.to_q(x)
            k, v = fused_projections(context, (self.to_k, self.to_v))
        q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *(rope if k_rope is None else k_rope))
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, backend=backend, key_padding_mask=key_mask)
        return self.to_out(out.transpose(1, 2).reshape(B, T, -1))


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


class _GELUProjection(nn.Module):
    """``GELU_tanh(proj(x))`` (official ``GELUApprox``; key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = CastLinear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if torch.is_grad_enabled():
            return _gelu_tanh(h)
        return torch.ops.aten.gelu_(h, approximate="tanh")  # in place: the [B, T, 4·D] activation exists once


class FeedForward(nn.Module):
    """Linear(D → 4D) → GELU-tanh → Linear(4D → D), biases (keys ``net.0.proj``, ``net.2``). ``[B, T, D]`` →
    ``[B, T, D]``; without autograd in slices of :data:`FF_CHUNK_TOKENS` tokens. With autograd the GELU output that a
    LoRA adapter on ``net.2`` would keep is recomputed from the GELU input in the backward
    (:func:`~cinetune.core.recompute.mlp`)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(_GELUProjection(dim, dim * mult), nn.Identity(), CastLinear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if torch.is_grad_enabled():
            return mlp(x, self.net[0].proj, _gelu_tanh, self.net[2])
        if T <= FF_CHUNK_TOKENS:
            return self.net(x)
        out = torch.empty_like(x)
        for start in range(0, T, FF_CHUNK_TOKENS):
            out[:, start:start + FF_CHUNK_TOKENS] = self.net(x[:, start:start + FF_CHUNK_TOKENS])
        return out


def _table(rows: int, dim: int) -> nn.Parameter:
    """A modulation table; random (as diffusers initialises it) so a fresh model is not an identity map."""
    return nn.Parameter(torch.randn(rows, dim) / dim ** 0.5)


@dataclass(frozen=True)
class BlockInputs:
    """Everything a block needs besides the two token streams (built once per forward by :class:`LTX2DiT`).

    Attributes:
        video_context ``[B, L, D]``, audio_context ``[B, L, Da]`` or None: projected text.
        context_mask: bool ``[B, L]`` or None (all attended).
        video_ada, audio_ada: block AdaLN outputs (6 rows). video_cross, audio_cross: cross-modal scale/shift AdaLN
            outputs (4 rows); video_cross_gate, audio_cross_gate: cross-modal gate AdaLN outputs (1 row).
        video_rope, audio_rope, video_cross_rope, audio_cross_rope: (cos, sin) tables.
        cross_modal: run the audio↔video cross-attentions. backend: attention backend.
    """

    video_context: torch.Tensor
    audio_context: torch.Tensor | None
    context_mask: torch.Tensor | None
    video_ada: AdaValues
    audio_ada: AdaValues | None
    video_cross: AdaValues | None
    audio_cross: AdaValues | None
    video_cross_gate: AdaValues | None
    audio_cross_gate: AdaValues | None
    video_rope: Rope
    audio_rope: Rope | None
    video_cross_rope: Rope | None
    audio_cross_rope: Rope | None
    cross_modal: bool
    backend: str


class LTX2Block(nn.Module):
    """One dual-stream block (official ``BasicAVTransformerBlock``; forward order in the module docstring)."""

    def __init__(self, config: LTX2TransformerConfig) -> None:
        super().__init__()
        c = config
        D, Da, eps = c.inner_dim, c.audio_inner_dim, c.norm_eps
        self.eps = eps
        self.attn1 = Attention(D, None, c.num_attention_heads, c.attention_head_dim, eps)
        self.attn2 = Attention(D, c.cross_attention_dim, c.num_attention_heads, c.attention_head_dim, eps)
        self.ff = FeedForward(D)
        self.scale_shift_table = _table(6, D)
        self.audio_attn1 = Attention(Da, None, c.audio_num_attention_heads, c.audio_attention_head_dim, eps)
        self.audio_attn2 = Attention(Da, c.audio_cross_attention_dim, c.audio_num_attention_heads,
                                     c.audio_attention_head_dim, eps)
        self.audio_ff = FeedForward(Da)
        self.audio_scale_shift_table = _table(6, Da)
        self.audio_to_video_attn = Attention(D, Da, c.audio_num_attention_heads, c.audio_attention_head_dim, eps)
        self.video_to_audio_attn = Attention(Da, D, c.audio_num_attention_heads, c.audio_attention_head_dim, eps)
        self.scale_shift_table_a2v_ca_audio = _table(5, Da)
        self.scale_shift_table_a2v_ca_video = _table(5, D)

    def forward(self, video: torch.Tensor, audio: torch.Tensor | None, inputs: BlockInputs,
                skip_self_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """video ``[B, Nv, D]``, audio ``[B, Na, Da]`` or None → the updated streams. ``skip_self_attn``: drop both
        self-attention residuals (STG)."""
        eps, x = self.eps, inputs
        table, ada = self.scale_shift_table, x.video_ada
        if not skip_self_attn:
            update = self.attn1(modulated(video, ada.take(table[0], 0), ada.take(table[1], 1), eps),
                                rope=x.video_rope, backend=x.backend)
            video = residual(video, update, ada.take(table[2], 2))
        update = self.attn2(rms(video, eps), x.video_context, key_mask=x.context_mask, backend=x.backend)
        video = residual(video, update)
        if audio is not None:
            table, ada = self.audio_scale_shift_table, x.audio_ada
            if not skip_self_attn:
                update = self.audio_attn1(modulated(audio, ada.take(table[0], 0), ada.take(table[1], 1), eps),
                                          rope=x.audio_rope, backend=x.backend)
                audio = residual(audio, update, ada.take(table[2], 2))
            update = self.audio_attn2(rms(audio, eps), x.audio_context, key_mask=x.context_mask, backend=x.backend)
            audio = residual(audio, update)
            if x.cross_modal:
                video, audio = self._cross_modal(video, audio, x)
        table, ada = self.scale_shift_table, x.video_ada
        update = self.ff(modulated(video, ada.take(table[3], 3), ada.take(table[4], 4), eps))
        video = residual(video, update, ada.take(table[5], 5))
        if audio is not None:
            table, ada = self.audio_scale_shift_table, x.audio_ada
            update = self.audio_ff(modulated(audio, ada.take(table[3], 3), ada.take(table[4], 4), eps))
            audio = residual(audio, update, ada.take(table[5], 5))
        return video, audio

    def _cross_modal(self, video: torch.Tensor, audio: torch.Tensor,
                     x: BlockInputs) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.eps
        vn, an = rms(video, eps), rms(audio, eps)
        vt, at = self.scale_shift_table_a2v_ca_video, self.scale_shift_table_a2v_ca_audio
        vs, as_ = x.video_cross, x.audio_cross
        # Rows of the 5-row tables: 0 scale a2v, 1 shift a2v, 2 scale v2a, 3 shift v2a, 4 gate. The second use of
        # each normed stream may overwrite it.
        a2v = self.audio_to_video_attn(scale_shift(vn, vs.take(vt[0], 0), vs.take(vt[1], 1), reuse=False),
                                       scale_shift(an, as_.take(at[0], 0), as_.take(at[1], 1), reuse=False),
                                       rope=x.video_cross_rope, k_rope=x.audio_cross_rope, backend=x.backend)
        video = residual(video, a2v, x.video_cross_gate.take(vt[4], 0))
        v2a = self.video_to_audio_attn(scale_shift(an, as_.take(at[2], 2), as_.take(at[3], 3), reuse=True),
                                       scale_shift(vn, vs.take(vt[2], 2), vs.take(vt[3], 3), reuse=True),
                                       rope=x.audio_cross_rope, k_rope=x.video_cross_rope, backend=x.backend)
        audio = residual(audio, v2a, x.audio_cross_gate.take(at[4], 0))
        return video, audio


# ---------------------------------------------------------------------------------------------------------------
# Model


def _tokens(name: str, t, B: int | None, channels: int) -> tuple[int, int]:
    """Check tokens ``[B, N ≥ 1, channels]``; return (B, N)."""
    if (not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point() or t.shape[2] != channels
            or t.shape[1] == 0 or (B is not None and t.shape[0] != B)):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be float tokens [B{'' if B is None else '=' + str(B)}, N ≥ 1, {channels}], "
                         f"got {got}")
    return t.shape[0], t.shape[1]


def _context(name: str, t, B: int, channels: int) -> int:
    """Check a text context ``[B, L ≥ 1, channels]``; return L."""
    if (not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.is_floating_point() or t.shape[0] != B
            or t.shape[2] != channels or t.shape[1] == 0):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor [B={B}, L ≥ 1, {channels}] (the text connector's "
                         f"output), got {got}")
    return t.shape[1]


def _block_indices(indices: Iterable[int], num_layers: int) -> set[int]:
    out = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise ValueError(f"skip_self_attn_blocks holds {i!r}; block indices are ints 0 … {num_layers - 1}")
        out.add(i)
    return out


def _sigma(name: str, sigma, B: int, T: int) -> torch.Tensor:
    if not isinstance(sigma, torch.Tensor) or not sigma.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [B={B}, {T}] (per-token σ in [0, 1]), got "
                         f"{type(sigma).__name__ if not isinstance(sigma, torch.Tensor) else sigma.dtype}")
    if sigma.ndim == 1 and sigma.shape[0] == B:
        return sigma[:, None].expand(B, T)
    if tuple(sigma.shape) != (B, T):
        raise ValueError(f"{name} must be [B={B}, {T}] (one σ per token; [B] for one σ per sample), got "
                         f"{list(sigma.shape)}")
    return sigma


def _positions(name: str, positions, B: int, n_axes: int, T: int) -> torch.Tensor:
    if (not isinstance(positions, torch.Tensor) or positions.ndim != 4 or positions.shape[0] not in (1, B)
            or tuple(positions.shape[1:]) != (n_axes, T, 2) or not positions.is_floating_point()):
        got = list(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"{name} must be float [B={B} or 1, {n_axes}, {T}, 2] [start, end) bounds from "
                         f"cinetune.ltx2.rope, got {got}")
    return positions


class LTX2DiT(nn.Module):
    """The LTX-2 audio+video DiT (official ``LTXModel`` of type AudioVideo), batched, with official key names.

    Blocks live in ``transformer_blocks`` (also exposed as :attr:`blocks`) for block swap, checkpointing and LoRA.
    Set :attr:`gradient_checkpointing` to recompute each block in backward (``torch.utils.checkpoint``,
    ``use_reentrant=False``; only while gradients are recorded) and :attr:`attention_backend` to one of
    :data:`cinetune.core.attention.BACKENDS`.

    Args:
        config: :class:`~cinetune.ltx2.config.LTX2TransformerConfig`.
    """

    def __init__(self, config: LTX2TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, LTX2TransformerConfig):
            raise TypeError(f"config must be an LTX2TransformerConfig, got {type(config).__name__}")
        self.config = config
        c = config
        D, Da = c.inner_dim, c.audio_inner_dim
        self.gradient_checkpointing = False
        self.attention_backend = "sdpa"
        self.patchify_proj = CastLinear(c.in_channels, D)
        self.adaln_single = AdaLayerNormSingle(D, 6)
        self.caption_projection = CaptionProjection(c.caption_channels, D)
        self.scale_shift_table = _table(2, D)
        self.norm_out = nn.LayerNorm(D, eps=c.norm_eps, elementwise_affine=False)
        self.proj_out = CastLinear(D, c.out_channels)
        self.audio_patchify_proj = CastLinear(c.audio_in_channels, Da)
        self.audio_adaln_single = AdaLayerNormSingle(Da, 6)
        self.audio_caption_projection = CaptionProjection(c.caption_channels, Da)
        self.audio_scale_shift_table = _table(2, Da)
        self.audio_norm_out = nn.LayerNorm(Da, eps=c.norm_eps, elementwise_affine=False)
        self.audio_proj_out = CastLinear(Da, c.audio_out_channels)
        self.av_ca_video_scale_shift_adaln_single = AdaLayerNormSingle(D, 4)
        self.av_ca_audio_scale_shift_adaln_single = AdaLayerNormSingle(Da, 4)
        self.av_ca_a2v_gate_adaln_single = AdaLayerNormSingle(D, 1)
        self.av_ca_v2a_gate_adaln_single = AdaLayerNormSingle(Da, 1)
        self.transformer_blocks = nn.ModuleList(LTX2Block(c) for _ in range(c.num_layers))

    @property
    def blocks(self) -> nn.ModuleList:
        """The dual-stream blocks (``transformer_blocks``), in order."""
        return self.transformer_blocks

    def _rope(self, positions: torch.Tensor, dim: int, heads: int, max_pos: Sequence[float], use_middle: bool,
              dtype: torch.dtype) -> Rope:
        c = self.config
        return rope_frequencies(positions, dim, heads, max_pos, c.positional_embedding_theta,
                                split=c.rope_type == "split", double_precision=c.double_precision_rope,
                                use_middle=use_middle, dtype=dtype)

    def _head(self, x: torch.Tensor, embedded: AdaValues, table: torch.Tensor, norm: nn.LayerNorm,
              proj: nn.Linear) -> torch.Tensor:
        shift, scale = embedded.take(table[0], 0), embedded.take(table[1], 0)
        return proj(scale_shift(F.layer_norm(x, norm.normalized_shape, eps=norm.eps), scale, shift, reuse=True))

    def _context_mask(self, mask, B: int, lengths: Iterable[int], device: torch.device) -> torch.Tensor | None:
        if mask is None:
            return None
        L = set(lengths)
        if (not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != B or len(L) != 1
                or mask.shape[1] not in L):
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"context_mask must be [B={B}, L] with the length L of both contexts {sorted(L)} "
                             f"(True/1 = attended), got {got}")
        mask = mask.to(device=device) != 0
        if not bool(mask.any(dim=1).all()):
            raise ValueError("context_mask has a sample with no attended text token; the connectors' output mask "
                             "attends every token (pass None)")
        return None if bool(mask.all()) else mask

    def forward(self, video: torch.Tensor, audio: torch.Tensor | None, *, video_sigma: torch.Tensor,
                audio_sigma: torch.Tensor | None, video_context: torch.Tensor, audio_context: torch.Tensor | None,
                video_positions: torch.Tensor, audio_positions: torch.Tensor | None,
                context_mask: torch.Tensor | None = None, skip_self_attn_blocks: Iterable[int] = (),
                skip_cross_modal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the flow-matching velocities ``v = ε − x0`` of both modalities.

        Args:
            video: video tokens ``[B, Nv, in_channels]`` (:func:`patchify_video` of the normalised latent) in the
                compute dtype (float32, bfloat16 or float16).
            audio: audio tokens ``[B, Na, audio_in_channels]`` (:func:`patchify_audio`), or None for video only.
            video_sigma: per-token σ ∈ [0, 1] ``[B, Nv]`` (σ·denoise mask: 0 for clean conditioning tokens), or
                ``[B]``; the DiT multiplies by ``timestep_scale_multiplier`` (1000).
            audio_sigma: ``[B, Na]`` or ``[B]``; None when ``audio`` is None.
            video_context: video text connector output ``[B, L, caption_channels]`` (projected inside).
            audio_context: audio text connector output ``[B, L, caption_channels]``; None when ``audio`` is None.
            video_positions: float32 ``[B or 1, 3, Nv, 2]`` (:func:`cinetune.ltx2.rope.video_positions`).
            audio_positions: float32 ``[B or 1, 1, Na, 2]`` (:func:`cinetune.ltx2.rope.audio_positions`), or None.
            context_mask: ``[B, L]`` bool (or 0/1) for both contexts, True = attended; None = all (the official
                inference never masks the connectors' output).
            skip_self_attn_blocks: block indices whose video and audio self-attention residuals are dropped (STG).
            skip_cross_modal: skip the audio↔video cross-attentions in every block (modality isolation).

        Returns:
            ``(video_velocity [B, Nv, out_channels], audio_velocity [B, Na, audio_out_channels] or None)`` in the
            compute dtype.

        Raises:
            ValueError: shapes, dtypes or block indices wrong (the message gives the expected form); audio
                arguments given partly.
            AttentionBackendError: :attr:`attention_backend` unknown or not installed.
        """
        c = self.config
        B, Nv = _tokens("video", video, None, c.in_channels)
        dtype, device = video.dtype, video.device
        has_audio = audio is not None
        given = [n for n, v in (("audio_sigma", audio_sigma), ("audio_context", audio_context),
                                ("audio_positions", audio_positions)) if (v is not None) != has_audio]
        if given:
            raise ValueError(f"{', '.join(given)} must be {'given with' if has_audio else 'None without'} audio")
        v_sigma = _sigma("video_sigma", video_sigma, B, Nv)
        video_positions = _positions("video_positions", video_positions, B, 3, Nv).to(device)
        lengths = [_context("video_context", video_context, B, c.caption_channels)]
        if has_audio:
            _, Na = _tokens("audio", audio, B, c.audio_in_channels)
            a_sigma = _sigma("audio_sigma", audio_sigma, B, Na)
            audio_positions = _positions("audio_positions", audio_positions, B, 1, Na).to(device)
            lengths.append(_context("audio_context", audio_context, B, c.caption_channels))
        skip = _block_indices(skip_self_attn_blocks, c.num_layers)
        mask = self._context_mask(context_mask, B, lengths, device)
        check_backend(self.attention_backend)

        v_steps = TokenTimesteps.from_sigma(v_sigma.to(device))
        v_t = v_steps.rows * c.timestep_scale_multiplier
        v_mod, v_emb = self.adaln_single(v_t, dtype)
        vx = self.patchify_proj(video)
        ax = a_ctx = a_ada = a_emb = a_rope = None
        cross: dict = {}
        if has_audio:
            a_steps = TokenTimesteps.from_sigma(a_sigma.to(device))
            a_t = a_steps.rows * c.timestep_scale_multiplier
            a_mod, a_emb_values = self.audio_adaln_single(a_t, dtype)
            a_ada, a_emb = AdaValues(a_mod, a_steps.index), AdaValues(a_emb_values, a_steps.index)
            ax = self.audio_patchify_proj(audio.to(dtype))
            a_ctx = self.audio_caption_projection(audio_context.to(dtype))
            a_rope = self._rope(audio_positions, c.audio_inner_dim, c.audio_num_attention_heads,
                                c.audio_positional_embedding_max_pos, c.use_middle_indices_grid, dtype)
            if not skip_cross_modal:
                cross = self._cross_modal_inputs(v_t, v_steps, video_positions, a_t, a_steps, audio_positions, dtype)
        inputs = BlockInputs(
            video_context=self.caption_projection(video_context.to(dtype)), audio_context=a_ctx, context_mask=mask,
            video_ada=AdaValues(v_mod, v_steps.index), audio_ada=a_ada,
            video_rope=self._rope(video_positions, c.inner_dim, c.num_attention_heads,
                                  c.positional_embedding_max_pos, c.use_middle_indices_grid, dtype),
            audio_rope=a_rope, cross_modal=bool(cross), backend=self.attention_backend,
            **(cross or dict.fromkeys(("video_cross", "audio_cross", "video_cross_gate", "audio_cross_gate",
                                       "video_cross_rope", "audio_cross_rope"))))

        for i, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                vx, ax = checkpoint(block, vx, ax, inputs, i in skip, use_reentrant=False)
            else:
                vx, ax = block(vx, ax, inputs, i in skip)

        video_out = self._head(vx, AdaValues(v_emb, v_steps.index), self.scale_shift_table, self.norm_out,
                               self.proj_out)
        audio_out = None
        if has_audio:
            audio_out = self._head(ax, a_emb, self.audio_scale_shift_table, self.audio_norm_out, self.audio_proj_out)
        return video_out, audio_out

    def _cross_modal_inputs(self, v_t: torch.Tensor, v_steps: TokenTimesteps, video_positions: torch.Tensor,
                            a_t: torch.Tensor, a_steps: TokenTimesteps, audio_positions: torch.Tensor,
                            dtype: torch.dtype) -> dict:
        """AdaLN outputs and RoPE tables of the audio↔video cross-attentions. 19B legacy timestep source: each
        modality's own per-token timesteps feed its scale/shift and gate AdaLNs."""
        c = self.config
        max_pos = (c.cross_modal_max_pos,)
        return dict(
            video_cross=AdaValues(self.av_ca_video_scale_shift_adaln_single(v_t, dtype)[0], v_steps.index),
            audio_cross=AdaValues(self.av_ca_audio_scale_shift_adaln_single(a_t, dtype)[0], a_steps.index),
            video_cross_gate=AdaValues(self.av_ca_a2v_gate_adaln_single(v_t * c.av_ca_factor, dtype)[0],
                                       v_steps.index),
            audio_cross_gate=AdaValues(self.av_ca_v2a_gate_adaln_single(a_t * c.av_ca_factor, dtype)[0],
                                       a_steps.index),
            # The video side is cut into the video head count, the audio side into the audio head count (official).
            video_cross_rope=self._rope(cross_modal_positions(video_positions), c.audio_cross_attention_dim,
                                        c.num_attention_heads, max_pos, True, dtype),
            audio_cross_rope=self._rope(cross_modal_positions(audio_positions), c.audio_cross_attention_dim,
                                        c.audio_num_attention_heads, max_pos, True, dtype))
