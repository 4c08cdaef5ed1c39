"""The tensor-by-tensor replay of one LTX-2 sampling step behind :mod:`cinetune.ltx2.memory` (what each tensor of
the DiT forward costs and how long it lives); the method and the measured accuracy are in that module's docstring."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .audio import audio_latent_frames
from .config import LTX2TransformerConfig
from .dit import FF_CHUNK_TOKENS
from .family import LTX2_LATENT_FORMAT

#: Text tokens per modality the DiT attends to (the connectors' output length).
TEXT_TOKENS = 1024
#: The forward passes of one dev step, in the order ``sample_av`` runs them.
PASSES = ("conditional", "negative prompt", "STG-perturbed", "modality-isolated")
DEVICE_TYPES = ("cuda", "cpu")
#: Values of ``weight_dtype`` for :func:`estimate_ltx2_memory_from_config` and :func:`meta_ltx2_model`.
WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FP32 = 4  # bytes of a float32 element
FF_MULT = 4  # FeedForward hidden width / model width



def _compute_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES:
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise ValueError(f"compute_dtype must be 'bf16', 'fp16', 'fp32' or a torch dtype, got {dtype!r}")
    return _DTYPES[key]


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {v!r}")
    return v


def ltx2_tokens(width: int, height: int, frames: int, fps: float) -> tuple[int, int]:
    """Video and audio tokens of one LTX-2 sample.

    Video: F'·H'·W' with F' = (frames − 1)/8 + 1, H' = height/32, W' = width/32 (latent grid, patch size 1);
    audio: round(frames/fps·25) (Lightricks/LTX-2 ``ltx_core`` ``AudioLatentShape.from_duration``). E.g.
    768×512×121 at 24 fps → (6144, 126).

    Raises:
        ValueError: width/height not positive multiples of 32 or frames not 8k+1 (the message names the nearest
            valid values); fps not a positive number.
    """
    _, f, h, w = LTX2_LATENT_FORMAT.latent_shape(width, height, frames)
    return f * h * w, audio_latent_frames(frames, fps)


# ---------------------------------------------------------------------------------------------------------------
# The replay


class _Tape:
    """Bytes alive during a replayed run: :meth:`alloc` a tensor, :meth:`free` it, :meth:`touch` a transient."""

    def __init__(self) -> None:
        self.live = 0.0
        self.peak = 0.0

    def alloc(self, nbytes: float) -> float:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return nbytes

    def free(self, *nbytes: float) -> None:
        for n in nbytes:
            self.live -= n

    def touch(self, nbytes: float) -> None:
        """A transient of ``nbytes`` on top of what is alive (kernel internals, freed before the kernel returns)."""
        self.peak = max(self.peak, self.live + nbytes)

    def mark(self) -> float:
        """The peak since the previous mark (or the start); the next one starts from what is alive now."""
        peak, self.peak = self.peak, self.live
        return peak


@dataclass(frozen=True)
class _Run:
    """Sizes and kernel rules of one replayed step (tokens of one sample; batch 1); in training also the LoRA
    ``rank`` and ``i2v`` (first-frame conditioning: per-token timesteps)."""

    config: LTX2TransformerConfig
    Nv: int
    Na: int
    L: int
    s: int
    device_type: str
    threads: int
    rank: int = 0
    i2v: bool = False

    @property
    def u(self) -> int:
        """Bytes of the float32 copies kernels make of non-float32 inputs (0 in float32)."""
        return FP32 if self.s != FP32 else 0

    def attention_scratch(self, q_len: int, kv_len: int, head_dim: int, heads: int) -> float:
        """Kernel buffers of one attention call besides its output: the float32 log-sum-exp, and on the CPU the
        per-thread tiles."""
        return FP32 * heads * q_len + self.attention_tiles(q_len, kv_len, head_dim)

    def attention_tiles(self, q_len: int, kv_len: int, head_dim: int, backward: bool = False) -> float:
        """Per-thread tiles of the CPU flash-attention kernel (0 on CUDA): forward threads·((qSplit·kvSplit +
        2·qSplit + qSplit·hd)·4 + qSplit·kvSplit·[s ≠ 4]·s), backward threads·2·qSplit·kvSplit·(4 + [s ≠ 4]·s)
        (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``)."""
        if self.device_type == "cuda":
            return 0.0
        qs = min(256 if q_len >= 768 else 64 if q_len >= 192 else 32, q_len)
        kvs = min(512, kv_len)
        reduced = self.s if self.s != FP32 else 0
        if backward:
            return self.threads * 2 * qs * kvs * (FP32 + reduced)
        return self.threads * ((qs * kvs + 2 * qs + qs * head_dim) * FP32 + qs * kvs * reduced)


def _linear(t: _Tape, r: _Run, tokens: int, fan_in: int, fan_out: int, cast: int) -> float:
    """A Linear layer's output; ``cast`` = weight copies per call (0 stored in the compute dtype, 1 ``CastLinear``
    of another dtype, 2 ``FP8Linear``)."""
    weight = r.s * fan_in * fan_out
    out = r.s * fan_out * tokens
    if cast == 2:
        t.touch(2 * weight)
    if cast:
        t.touch(weight + out)
    return t.alloc(out)


def _rms(t: _Tape, r: _Run, tokens: int, width: int) -> float:
    """``modulation.rms(x)`` (and ``modulated``, whose scale-shift writes into it): one new row per token."""
    return t.alloc(r.s * width * tokens)


def _qk_norm(t: _Tape, r: _Run, x: float, tokens: int, width: int) -> float:
    """``Attention._norm`` of a projection output: in place on the CPU, a new tensor from the fused CUDA kernel."""
    if r.device_type == "cpu":
        return x
    out = t.alloc(r.s * width * tokens)
    t.free(x)
    return out


def _rotate(t: _Tape, r: _Run, x: float, tokens: int, width: int) -> float:
    """``_rotate``: float32 runs write into one new buffer; otherwise ``apply_rope`` (float32 copies of x and the
    tables, four half-width float32 products)."""
    if r.s != FP32:
        t.touch((2 * r.u + 8) * width * tokens)
    out = t.alloc(r.s * width * tokens)
    t.free(x)
    return out


def _attention(t: _Tape, r: _Run, *, q_tokens: int, kv_tokens: int, q_width: int, kv_width: int, heads: int,
               head_dim: int, out_width: int, rope: bool, cast: int) -> float:
    """``Attention.forward`` with its input(s) alive; returns the ``to_out`` output."""
    inner = heads * head_dim
    q = _qk_norm(t, r, _linear(t, r, q_tokens, q_width, inner, cast), q_tokens, inner)
    k = _qk_norm(t, r, _linear(t, r, kv_tokens, kv_width, inner, cast), kv_tokens, inner)
    v = _linear(t, r, kv_tokens, kv_width, inner, cast)
    if rope:
        q = _rotate(t, r, q, q_tokens, inner)
        k = _rotate(t, r, k, kv_tokens, inner)
    o = t.alloc(r.s * inner * q_tokens)
    t.touch(r.attention_scratch(q_tokens, kv_tokens, head_dim, heads))
    out = _linear(t, r, q_tokens, inner, out_width, cast)
    t.free(q, k, v, o)
    return out


def _feed_forward(t: _Tape, r: _Run, tokens: int, width: int, cast: int, mult: int = FF_MULT) -> float:
    """``FeedForward.forward`` without autograd: GELU in place, slices of ``FF_CHUNK_TOKENS`` for longer inputs."""
    chunked = tokens > FF_CHUNK_TOKENS
    n = FF_CHUNK_TOKENS if chunked else tokens
    out = t.alloc(r.s * width * tokens) if chunked else 0.0
    hidden = _linear(t, r, n, width, mult * width, cast)
    y = _linear(t, r, n, mult * width, width, cast)
    t.free(hidden)
    if chunked:
        t.free(y)
        return out
    return y


def _cross_modal(t: _Tape, r: _Run, cast: int) -> tuple[float, float]:
    """``LTX2Block._cross_modal``: a2v, then v2a on the normed streams modulated in place; returns the new
    streams (the old ones are still held by the caller)."""
    c = r.config
    D, Da, Nv, Na, s = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.s
    kw = dict(heads=c.audio_num_attention_heads, head_dim=c.audio_attention_head_dim, rope=True, cast=cast)
    vn = _rms(t, r, Nv, D)
    an = _rms(t, r, Na, Da)
    q = t.alloc(s * D * Nv)
    kv = t.alloc(s * Da * Na)
    video = _attention(t, r, q_tokens=Nv, kv_tokens=Na, q_width=D, kv_width=Da, out_width=D, **kw)
    t.free(q, kv)
    audio = _attention(t, r, q_tokens=Na, kv_tokens=Nv, q_width=Da, kv_width=D, out_width=Da, **kw)
    t.free(vn, an)
    return video, audio


def _block(t: _Tape, r: _Run, *, cross_modal: bool, cast: int) -> None:
    """``LTX2Block.forward`` (no STG skip) with its two input streams alive on the tape. Every residual is written
    into the branch output, so a stream is the last branch output; the inputs stay (the caller holds them)."""
    c = r.config
    D, Da, Nv, Na, L = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.L

    def sublayer(tokens, width, kv_tokens, heads, head_dim, rope, stream):
        x = _rms(t, r, tokens, width)
        out = _attention(t, r, q_tokens=tokens, kv_tokens=kv_tokens, q_width=width, kv_width=width, heads=heads,
                         head_dim=head_dim, out_width=width, rope=rope, cast=cast)
        t.free(x, stream)
        return out

    video = sublayer(Nv, D, Nv, c.num_attention_heads, c.attention_head_dim, True, 0.0)
    video = sublayer(Nv, D, L, c.num_attention_heads, c.attention_head_dim, False, video)
    audio = sublayer(Na, Da, Na, c.audio_num_attention_heads, c.audio_attention_head_dim, True, 0.0)
    audio = sublayer(Na, Da, L, c.audio_num_attention_heads, c.audio_attention_head_dim, False, audio)
    if cross_modal:
        new_video, new_audio = _cross_modal(t, r, cast)
        t.free(video, audio)
        video, audio = new_video, new_audio
    for tokens, width, stream in ((Nv, D, video), (Na, Da, audio)):
        x = _rms(t, r, tokens, width)
        _feed_forward(t, r, tokens, width, cast)
        t.free(x, stream)


def _rope_tables(t: _Tape, r: _Run, tokens: int, width: int, axes: int, dtype_bytes: int | None = None) -> float:
    """``rope_frequencies`` → (cos, sin) in the compute dtype (or ``dtype_bytes`` per element), s·W/2 each per
    token; returns their bytes."""
    size = r.s if dtype_bytes is None else dtype_bytes
    n = width // (2 * axes)
    slots = width // 2
    middle = t.alloc(FP32 * axes * tokens)
    fractions = t.alloc(FP32 * axes * tokens)
    product = t.alloc(FP32 * axes * n * tokens)
    angles = t.alloc(product) if axes > 1 else product  # transpose + flatten copies unless one axis
    if axes > 1:
        t.free(product)
    cos = t.alloc(FP32 * axes * n * tokens)
    sin = t.alloc(FP32 * axes * n * tokens)
    if slots != axes * n:  # identity slots in front: torch.cat copies
        padded = t.alloc(FP32 * slots * tokens)
        t.free(cos)
        cos = padded
        padded = t.alloc(FP32 * slots * tokens)
        t.free(sin)
        sin = padded
    if size != FP32:
        tables = t.alloc(2 * size * slots * tokens)
        t.free(cos, sin)
    else:
        tables = cos + sin
    t.free(middle, fractions, angles)
    return tables


def _caption_projection(t: _Tape, r: _Run, width: int, cast: int) -> float:
    c = r.config
    hidden = _linear(t, r, r.L, c.caption_channels, width, cast)
    gelu = t.alloc(hidden)
    t.free(hidden)
    out = _linear(t, r, r.L, width, width, cast)
    t.free(gelu)
    return out


def _head(t: _Tape, r: _Run, tokens: int, width: int, channels: int, cast: int) -> float:
    """``LTX2DiT._head``: LayerNorm, scale-shift in place, ``proj_out``."""
    normed = t.alloc(r.s * width * tokens)
    out = _linear(t, r, tokens, width, channels, cast)
    t.free(normed)
    return out


def _dit_pass(t: _Tape, r: _Run, *, cross_modal: bool, cast: int) -> tuple[float, float, float]:
    """``LTX2DiT.forward`` of one pass up to the blocks: returns (bytes alive when the blocks run, block input
    bytes of both streams, everything else the forward built — freed at its end)."""
    c = r.config
    D, Da, Nv, Na = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na
    video = _linear(t, r, Nv, c.in_channels, D, cast)
    audio = _linear(t, r, Na, c.audio_in_channels, Da, cast)
    built = _caption_projection(t, r, Da, cast)
    built += _rope_tables(t, r, Na, Da, 1)
    if cross_modal:
        built += _rope_tables(t, r, Nv, c.audio_cross_attention_dim, 1)
        built += _rope_tables(t, r, Na, c.audio_cross_attention_dim, 1)
    built += _caption_projection(t, r, D, cast)
    built += _rope_tables(t, r, Nv, D, 3)
    return t.live, video + audio, built


def _step(r: _Run, passes: int, outside_cast: int) -> tuple[list[tuple[float, bool]], float]:
    """One step of ``ltx2.pipeline.generate`` (``sample_av`` with its ``denoise``) after the first, with ``passes``
    forward passes. Returns, for every pass, (bytes alive when its blocks start, whether it runs the cross-modal
    attention), and the peak of everything outside the blocks."""
    c = r.config
    Nv, Na, s = r.Nv, r.Na, r.s
    latent = [FP32 * c.in_channels * Nv, FP32 * c.audio_in_channels * Na]  # one float32 token tensor per modality
    t = _Tape()
    # for the whole stage: sample_av's initial tokens, the clean tokens, denoise masks, RoPE positions, prompts
    # (on the CPU also generate's noise, in the same memory)
    copies = 3 if r.device_type == "cpu" else 2
    t.alloc(copies * sum(latent) + FP32 * (Nv + Na) + FP32 * (6 * Nv + 2 * Na))
    t.alloc((1 if passes == 1 else 2) * 2 * s * r.L * c.caption_channels)
    # this step: the sampler's current tokens, the per-token sigmas, and the previous step's x0 predictions, each
    # set released when this step's pass replaces it
    t.alloc(sum(latent) + FP32 * (Nv + Na))
    t.alloc(passes * sum(latent))
    cast_inputs = s != FP32
    blocks = []
    for k in range(passes):
        cross_modal = PASSES[k] != "modality-isolated"
        inputs = t.alloc(sum(latent) * s / FP32 if cast_inputs else 0.0)  # denoise casts the tokens
        level, streams, built = _dit_pass(t, r, cross_modal=cross_modal, cast=outside_cast)
        blocks.append((level, cross_modal))
        # the blocks leave streams of the same size; then the two heads
        outputs = [_head(t, r, Nv, c.inner_dim, c.out_channels, outside_cast),
                   _head(t, r, Na, c.audio_inner_dim, c.audio_out_channels, outside_cast)]
        t.free(streams, built, inputs)
        if cast_inputs:  # denoise returns float32 velocities
            upcasts = [t.alloc(n) for n in latent]
            t.free(*outputs)
            outputs = upcasts
        for n in latent:  # x0 = x − σ·v, one modality after the other
            product = t.alloc(n)
            t.alloc(n)
            t.free(product)
        t.free(*outputs, sum(latent))
    for n in latent:  # multimodal_guidance, clean-token blend and the Euler update, per modality
        pred = 0.0
        for _ in range(passes - 1):
            diff = t.alloc(n)
            scaled = t.alloc(n)
            t.free(diff)
            new = t.alloc(n)
            t.free(scaled, pred)
            pred = new
        if passes > 1:  # std rescale
            new = t.alloc(n)
            t.free(pred)
            pred = new
        masked = t.alloc(n)
        weighted = t.alloc(n)
        blended = t.alloc(n)
        t.free(masked, weighted, pred)
        diff = t.alloc(n)
        velocity = t.alloc(n)
        t.free(diff)
        scaled = t.alloc(n)
        t.alloc(n)  # the new tokens
        t.free(scaled, velocity, blended, n)  # the old tokens go
    return blocks, t.peak


def ltx2_block_peak(config: LTX2TransformerConfig, *, video_tokens: int, audio_tokens: int,
                    text_tokens: int = TEXT_TOKENS, compute_dtype: str | torch.dtype = "bf16",
                    device_type: str = "cuda", cross_modal: bool = True, weight_cast: int = 0,
                    cpu_threads: int | None = None) -> int:
    """Peak bytes one ``LTX2Block`` forward without autograd allocates on top of what is alive when it starts (its
    two input streams ``[1, Nv, D]`` / ``[1, Na, Da]``, the RoPE tables, the projected texts): the block replay of
    the module docstring, alone.

    Args:
        config: the DiT dims. video_tokens, audio_tokens, text_tokens: Nv, Na, L of one sample.
        compute_dtype: "bf16", "fp16", "fp32" or a torch dtype. device_type: "cuda" or "cpu".
        cross_modal: the audio↔video attentions run (False in the modality-isolated pass).
        weight_cast: weight copies per Linear call: 0 stored in the compute dtype, 1 another float dtype, 2 fp8.
        cpu_threads: threads of the CPU attention kernel (default ``torch.get_num_threads()``).

    Returns:
        Bytes.

    Raises:
        TypeError: config is not an LTX2TransformerConfig.
        ValueError: bad counts, dtype, device type or ``weight_cast``.
    """
    r = _make_run(config, video_tokens, audio_tokens, text_tokens, compute_dtype, device_type, cpu_threads)
    if weight_cast not in (0, 1, 2):
        raise ValueError(f"weight_cast must be 0, 1 or 2 weight copies per call, got {weight_cast!r}")
    t = _Tape()
    _block(t, r, cross_modal=cross_modal, cast=weight_cast)
    return int(round(t.peak))


def _make_run(config, video_tokens, audio_tokens, text_tokens, compute_dtype, device_type, cpu_threads) -> _Run:
    if not isinstance(config, LTX2TransformerConfig):
        raise TypeError(f"config must be an LTX2TransformerConfig, got {type(config).__name__}")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {', '.join(DEVICE_TYPES)}, got {device_type!r} (the attention "
                         "and norm kernels of other devices are not modelled)")
    for name, v in (("video_tokens", video_tokens), ("audio_tokens", audio_tokens), ("text_tokens", text_tokens)):
        _check_int(name, v, 1)
    threads = torch.get_num_threads() if cpu_threads is None else _check_int("cpu_threads", cpu_threads, 1)
    s = _compute_dtype(compute_dtype).itemsize
    return _Run(config, video_tokens, audio_tokens, text_tokens, s, device_type, threads)
