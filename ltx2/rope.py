"""LTX-2 rotary position embeddings: token positions (video, audio, audio↔video, text connectors), the frequency
tables, and their application to queries and keys.

Sources: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/model/transformer/rope.py`` (frequency grid, split and
interleaved layouts), ``transformer_args.py`` (which positions, widths and normalisers each attention uses),
``components/patchifiers.py`` (``get_patch_grid_bounds``, ``get_pixel_coords``, ``AudioPatchifier``), ``tools.py``
(time ÷ fps), ``text_encoders/gemma/embeddings_connector.py`` (connector positions).

Positions are ``[B, n_axes, T, 2]`` float32 tensors of per-token ``[start, end)`` bounds: video axes (t seconds,
y px, x px), audio and cross-modal axis (t seconds). With ``use_middle`` (19B) a token sits at the middle of its
bounds. Each axis is normalised by its ``max_pos`` to ``p / max_pos ∈ [0, 1]`` and mapped to ``[−1, 1]``:

    angle[k, axis] = base_k · (2 · p_axis / max_pos_axis − 1),     base_k = (π/2) · θ^(k / (N − 1)),  k < N

with ``N = dim // (2 · n_axes)`` frequencies per axis, geometric from π/2 to θ·π/2 (not the usual
``1/θ^(2k/d)`` of integer positions). The angles are laid out frequency-major (``[f0·t, f0·y, f0·x, f1·t, …]``).

- **split** (LTX-2 19B): the ``dim/2`` rotary slots are the angles with ``dim/2 − n_axes·N`` identity slots
  (cos 1, sin 0) in front; they are cut into one contiguous chunk per head (heads get different frequencies), and
  each head rotates its first half against its second half: ``x1' = x1·cos − x2·sin``, ``x2' = x2·cos + x1·sin``.
- **interleaved** (official code default, not used by 19B): every angle is repeated for a pair ``(x[2i], x[2i+1])``,
  ``dim mod (2·n_axes)`` identity entries in front, over the whole width (no per-head layout).

Decisions:

- **Positions stay float32.** The January/February official inference code cast positions to the model dtype
  (bf16) before building the tables; bf16 cannot even represent pixel positions above 256 exactly (spacing 2–8 px at
  512–2048), so this implementation keeps them float32, as the current official code does. The frequency grid is
  built in float64 when ``double_precision`` (``frequencies_precision == "float64"``) and rounded once to float32,
  as officially; angles, cos and sin are float32.
- **Rotation in float32**: :func:`apply_rope` multiplies in float32 and rounds the result once to the input dtype
  (the official code multiplies in the model dtype; diffusers in float32). Identical in float32.
- **Table layout**: split tables are returned token-major ``[B, T, H, dim/(2H)]`` (the official layout is
  ``[B, H, T, …]``) so they apply to ``[B, T, H·head_dim]`` projections without transposes.
- **Backward of the split rotation** is written by hand: the gradient is rotated by the same angles the other way
  (a rotation's Jacobian is its transpose), four products into one buffer, keeping only the tables. Autograd over
  the formula needs about three times the passes, its half-width selects zero-filling full-size buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Video VAE down-scaling (time, height, width): latent → pixel bounds.
VIDEO_SCALE_FACTORS: tuple[int, int, int] = (8, 32, 32)
#: Audio latent timing: 16 kHz audio, mel hop 160 samples, 4 mel frames per latent (25 latents per second).
AUDIO_SAMPLE_RATE = 16000
AUDIO_HOP_LENGTH = 160
AUDIO_LATENT_DOWNSAMPLE = 4
#: First-frame causal offset of the VAEs (the first latent frame covers one pixel frame / one mel frame).
CAUSAL_OFFSET = 1
#: RoPE normaliser of the text connectors' positions (``connector_positional_embedding_max_pos``).
CONNECTOR_MAX_POS = 4096


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Positions


def video_positions(frames: int, height: int, width: int, *, fps: float, batch_size: int = 1,
                    frame_offset: float = 0.0, causal_fix: bool = True,
                    scale_factors: Sequence[int] = VIDEO_SCALE_FACTORS,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Positions of the video tokens of a latent grid, in (f h w) token order.

    Latent voxel (f, h, w) has latent bounds ``[f, f+1) × [h, h+1) × [w, w+1)``, scaled to pixel bounds by
    ``scale_factors`` (8, 32, 32). With ``causal_fix`` the time bounds become ``max(0, t + 1 − 8)`` (the causal VAE
    encodes the first pixel frame alone into latent frame 0: frame 0 → [0, 1), frame f → [8f − 7, 8f + 1)).
    ``frame_offset`` pixel frames are then added to the time bounds (keyframe conditioning tokens), and time is
    divided by ``fps`` → seconds. Lightricks/LTX-2 ``components/patchifiers.py`` (``get_patch_grid_bounds``,
    ``get_pixel_coords``), ``tools.py`` (``VideoLatentTools``), ``conditioning/types/keyframe_cond.py``.

    Args:
        frames, height, width: latent grid F', H', W'.
        fps: frame rate the video is generated / was recorded at (24 official pipelines, 25 ComfyUI).
        batch_size: B. frame_offset: pixel frames added to the time bounds. causal_fix: apply the first-frame fix.
        scale_factors: (time, height, width) VAE down-scaling. device: where the tensor goes.

    Returns:
        float32 ``[B, 3, F'·H'·W', 2]``: (t seconds, y px, x px) × (start, end).

    Raises:
        ValueError: non-positive sizes, fps or scale factors.
    """
    for name, v in (("frames", frames), ("height", height), ("width", width), ("batch_size", batch_size)):
        _check_count(name, v)
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    scale = tuple(int(s) for s in scale_factors)
    if len(scale) != 3 or min(scale) < 1:
        raise ValueError(f"scale_factors must be three positive ints (time, height, width), got {scale_factors!r}")
    dev = _device(device)
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=dev) for n in (frames, height, width)),
                          indexing="ij")
    starts = torch.stack([g.reshape(-1) for g in grid])                      # [3, N]
    bounds = torch.stack([starts, starts + 1], dim=-1)                       # [3, N, 2] latent bounds
    bounds = bounds * torch.tensor(scale, dtype=torch.float32, device=dev).view(3, 1, 1)
    if causal_fix:
        bounds[0] = (bounds[0] + CAUSAL_OFFSET - scale[0]).clamp(min=0)
    bounds[0] = (bounds[0] + frame_offset) / fps
    return bounds.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()


def audio_positions(num_latents: int, *, batch_size: int = 1, offset: int = 0,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Positions (seconds) of the audio tokens: one token per audio latent step.

    Latent i starts at mel frame ``max(0, 4i + 1 − 4)`` (causal offset), i.e. at ``that · 160 / 16000`` s, and
    ends where latent i+1 starts: i = 0 → [0, 0.01), 1 → [0.01, 0.05), 2 → [0.05, 0.09) … Lightricks/LTX-2
    ``components/patchifiers.py`` ``AudioPatchifier._get_audio_latent_time_in_sec``.

    Args:
        num_latents: audio latent steps T (25 per second). batch_size: B.
        offset: latent index of the first token (a window into a longer sequence).
        device: where the tensor goes.

    Returns:
        float32 ``[B, 1, T, 2]``.

    Raises:
        ValueError: non-positive sizes or a negative offset.
    """
    _check_count("num_latents", num_latents)
    _check_count("batch_size", batch_size)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int ≥ 0, got {offset!r}")
    idx = torch.arange(offset, offset + num_latents + 1, dtype=torch.float32, device=_device(device))
    mel = (idx * AUDIO_LATENT_DOWNSAMPLE + CAUSAL_OFFSET - AUDIO_LATENT_DOWNSAMPLE).clamp(min=0)
    seconds = mel * AUDIO_HOP_LENGTH / AUDIO_SAMPLE_RATE
    bounds = torch.stack([seconds[:-1], seconds[1:]], dim=-1)               # [T, 2]
    return bounds.view(1, 1, num_latents, 2).expand(batch_size, -1, -1, -1).contiguous()


def cross_modal_positions(positions: torch.Tensor) -> torch.Tensor:
    """Positions for the audio↔video cross-attentions: the time axis only (``positions[:, 0:1]``), for video and
    audio tokens alike (Lightricks/LTX-2 ``transformer_args.py`` ``MultiModalTransformerArgsPreprocessor``).

    Args:
        positions: ``[B, n_axes, T, 2]`` (or ``[B, n_axes, T]``).

    Returns:
        ``[B, 1, T, 2]`` (or ``[B, 1, T]``), a view.
    """
    if positions.ndim not in (3, 4):
        raise ValueError(f"positions must be [B, n_axes, T, 2] or [B, n_axes, T], got {list(positions.shape)}")
    return positions[:, 0:1]


def connector_positions(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions of the text-connector tokens: ``0 … L−1`` (no [start, end) bounds, so use ``use_middle=False``
    with :data:`CONNECTOR_MAX_POS`); Lightricks/LTX-2 ``text_encoders/gemma/embeddings_connector.py``.

    Returns:
        float32 ``[1, 1, L]`` (broadcasts over the batch).
    """
    _check_count("length", length)
    return torch.arange(length, dtype=torch.float32, device=_device(device)).view(1, 1, length)


# ---------------------------------------------------------------------------------------------------------------
# Frequency tables


def frequency_grid(n: int, theta: float = 10000.0, *, double_precision: bool = True,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The base frequencies ``(π/2) · θ^(k/(n−1))``, k = 0 … n−1 (geometric from π/2 to θ·π/2), float32 ``[n]``.

    ``double_precision``: computed in float64 and rounded once (official ``generate_freq_grid_np``); else in
    float32 (``generate_freq_grid_pytorch``). Lightricks/LTX-2 ``ltx_core/model/transformer/rope.py``. Computed on
    the CPU (some devices have no float64) and moved to ``device``.
    """
    _check_count("n", n)
    dtype = torch.float64 if double_precision else torch.float32
    exponents = torch.linspace(0.0, 1.0, n, dtype=dtype)
    return (theta ** exponents * math.pi / 2).to(device=_device(device), dtype=torch.float32)


def rope_frequencies(positions: torch.Tensor, dim: int, n_heads: int, max_pos: Sequence[float],
                     theta: float = 10000.0, *, split: bool = True, double_precision: bool = True,
                     use_middle: bool = True, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of the LTX-2 RoPE for the given token positions (module docstring for the formulas).

    Args:
        positions: ``[B, n_axes, T, 2]`` [start, end) bounds, or ``[B, n_axes, T]`` points (any float dtype;
            converted to float32). B may be 1 to broadcast over a batch.
        dim: rotated width (the attention's inner width: 4096 video self, 2048 audio self and audio↔video,
            3840 connectors).
        n_heads: heads the split layout is cut into (ignored by the interleaved layout).
        max_pos: one normaliser per axis, e.g. (20, 2048, 2048).
        theta: RoPE θ. split: split (True, 19B) or interleaved layout. double_precision: float64 frequency grid.
        use_middle: use the middle of [start, end) (19B DiT); False uses the start (or the points as given).
        dtype: dtype of the returned tables.

    Returns:
        ``(cos, sin)``: split ``[B, T, n_heads, dim / (2·n_heads)]``; interleaved ``[B, T, dim]``.

    Raises:
        ValueError: positions of the wrong rank, ``len(max_pos)`` ≠ n_axes, a width too small for the axes, or
            (split) ``dim/2`` not divisible by ``n_heads``; ``use_middle`` without [start, end) bounds.
    """
    if not isinstance(positions, torch.Tensor) or positions.ndim not in (3, 4) or (
            positions.ndim == 4 and positions.shape[-1] != 2):
        shape = list(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be [B, n_axes, T, 2] bounds or [B, n_axes, T] points, got {shape}")
    n_axes = positions.shape[1]
    if len(max_pos) != n_axes:
        raise ValueError(f"max_pos has {len(max_pos)} entries for {n_axes} position axes")
    n_freq = dim // (2 * n_axes)
    if dim % 2 or n_freq < 1:
        raise ValueError(f"dim {dim} is odd or too small for {n_axes} axes")
    if split and (dim // 2) % n_heads:
        raise ValueError(f"split RoPE: dim/2 = {dim // 2} slots are not divisible by {n_heads} heads")
    positions = positions.to(torch.float32)
    if positions.ndim == 4:
        positions = (positions[..., 0] + positions[..., 1]) / 2.0 if use_middle else positions[..., 0]
    elif use_middle:
        raise ValueError("use_middle needs [start, end) bounds [B, n_axes, T, 2]")
    fractions = torch.stack([positions[:, i] / max_pos[i] for i in range(n_axes)], dim=-1)    # [B, T, n_axes]
    base = frequency_grid(n_freq, theta, double_precision=double_precision, device=positions.device)
    angles = (base * (fractions.unsqueeze(-1) * 2 - 1)).transpose(-1, -2).flatten(2)         # [B, T, N·n_axes]
    cos, sin = angles.cos(), angles.sin()
    B, T = angles.shape[:2]
    if split:
        pad = dim // 2 - angles.shape[-1]
        if pad:
            cos = torch.cat([cos.new_ones(B, T, pad), cos], dim=-1)
            sin = torch.cat([sin.new_zeros(B, T, pad), sin], dim=-1)
        cos, sin = cos.view(B, T, n_heads, -1), sin.view(B, T, n_heads, -1)
    else:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        pad = dim % (2 * n_axes)
        if pad:
            cos = torch.cat([cos.new_ones(B, T, pad), cos], dim=-1)
            sin = torch.cat([sin.new_zeros(B, T, pad), sin], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def _rotate_halves(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dst: torch.Tensor, sign: float) -> None:
    """Split rotation of ``src`` into ``dst`` (both ``[B, T, H, 2, r]`` views, any strides; float32):
    ``dst1 = src1·cos − sign·src2·sin``, ``dst2 = src2·cos + sign·src1·sin``. ``sign`` −1 applies the inverse
    (transposed) rotation, which is the backward of the forward one."""
    s1, s2 = src[..., 0, :], src[..., 1, :]
    torch.mul(s1, cos, out=dst[..., 0, :]).addcmul_(s2, sin, value=-sign)
    torch.mul(s2, cos, out=dst[..., 1, :]).addcmul_(s1, sin, value=sign)


def _rotate_split(x5: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
                  sign: float = 1.0) -> torch.Tensor:
    """Split rotation of ``x5 [B, T, H, 2, r]`` (any strides) in float32, rounded once to ``dtype``: a fresh
    ``[B, T, H·2r]``."""
    B, T, H, _, r = x5.shape
    out = torch.empty(B, T, H * 2 * r, dtype=torch.float32, device=x5.device)
    _rotate_halves(x5.float(), cos.float(), sin.float(), out.view(B, T, H, 2, r), sign)
    return out.to(dtype)


class _SplitRotation(torch.autograd.Function):
    """Split RoPE ``[B, T, dim]`` → ``[B, T, dim]`` with the hand-written backward of the module notes (the
    gradient rotated by the inverse rotation); keeps only the tables."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        ctx.save_for_backward(cos, sin)
        return _rotate_split(x.reshape(B, T, *cos.shape[2:3], 2, -1), cos, sin, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        B, T, _ = grad.shape
        return _rotate_split(grad.reshape(B, T, cos.shape[2], 2, -1), cos, sin, grad.dtype, sign=-1.0), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by the tables of :func:`rope_frequencies` (layout chosen by the table rank).

    Split tables ``[B|1, T, H, r]``: ``x`` is viewed as ``[B, T, H, 2, r]`` and each head's halves rotate,
    ``x1' = x1·cos − x2·sin``, ``x2' = x2·cos + x1·sin``. Interleaved tables ``[B|1, T, dim]``: pairs
    ``(x[2i], x[2i+1]) → (x0·cos − x1·sin, x1·cos + x0·sin)``. Computed in float32, rounded once to ``x.dtype``.
    Under autograd the split rotation has a hand-written backward (the inverse rotation of the gradient).

    Args:
        x: ``[B, T, dim]`` (the projection before it is split into attention heads), any float dtype.
        cos, sin: tables for the same T and dim.

    Returns:
        ``[B, T, dim]`` in ``x.dtype``.

    Raises:
        ValueError: the tables do not fit ``x``.
    """
    B, T, dim = x.shape
    if cos.shape != sin.shape or cos.ndim not in (3, 4) or cos.shape[1] != T or cos.shape[0] not in (1, B):
        raise ValueError(f"RoPE tables {list(cos.shape)} do not fit x {list(x.shape)}")
    if cos.ndim == 4 and cos.shape[2] * 2 * cos.shape[3] != dim:
        raise ValueError(f"split RoPE tables of {cos.shape[2]} heads × {cos.shape[3]} slots do not fit width {dim}")
    if cos.ndim == 4:
        if torch.is_grad_enabled() and not (cos.requires_grad or sin.requires_grad):
            return _SplitRotation.apply(x, cos, sin)
        if x.dtype == cos.dtype == sin.dtype == torch.float32 and not torch.is_grad_enabled():
            # Inference in float32: the four half-width products go straight into one buffer (no intermediates).
            return _rotate_split(x.reshape(B, T, cos.shape[2], 2, -1), cos, sin, x.dtype)
    xf = x.float()
    cos, sin = cos.float(), sin.float()
    if cos.ndim == 4:
        H, r = cos.shape[2], cos.shape[3]
        halves = xf.reshape(B, T, H, 2, r)
        x1, x2 = halves[..., 0, :], halves[..., 1, :]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-2)
    else:
        if cos.shape[2] != dim:
            raise ValueError(f"interleaved RoPE tables of width {cos.shape[2]} do not fit width {dim}")
        pairs = xf.reshape(B, T, dim // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((-x1, x0), dim=-1).view(B, T, dim)
        out = xf * cos + rotated * sin
    return out.reshape(B, T, dim).to(x.dtype)
