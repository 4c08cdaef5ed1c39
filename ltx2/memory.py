"""LTX-2 peak-memory estimate: what one denoising step of the LTX-2 audio+video DiT needs on the device.

API:

- :func:`estimate_ltx2_memory` — the estimate for an :class:`~cinetune.ltx2.dit.LTX2DiT` (loaded, or on the meta
  device: only shapes and dtypes are read) at a video size, frame rate, block swap and compute dtype;
  :func:`estimate_ltx2_memory_from_config` — the same for an :class:`~cinetune.ltx2.config.LTX2TransformerConfig`
  and the weight dtype of a published file (described on the meta device: nothing is allocated). Both return an
  :class:`LTX2MemoryEstimate`: a :class:`~cinetune.core.memory.MemoryEstimate` (bytes) that also holds the peak for
  every ``blocks_to_swap``.
- :func:`format_ltx2_estimate` — the short text users see; :func:`smallest_fitting_swap` — the least block swap
  that fits a budget; :func:`ltx2_tokens` — video and audio token counts; :func:`ltx2_block_peak` — one block alone;
  :func:`describe_ltx2`, :func:`meta_ltx2_model` — the weights.

Units: bytes everywhere (GB = 10⁹ bytes in texts). The estimate predicts the allocator peak
(``torch.cuda.max_memory_allocated``), not ``nvidia-smi``: the CUDA context (0.3–0.6 GB), cuBLAS/cuDNN workspaces
and the caching allocator's fragmentation come on top (``overhead_bytes``). It covers the DiT sampling stage only:
Gemma, the text connectors, the VAEs and the vocoder run at other times.

**Tokens** (reference ltx2.md §6): video Nv = F'·H'·W' with F' = (F − 1)/8 + 1, H' = H/32, W' = W/32 (patch size
1); audio Na = round(F/fps·25) (:func:`cinetune.ltx2.audio.audio_latent_frames`); text L = 1024 per modality (the
connectors' output length). 768×512×121 at 24 fps → 16·16·24 = 6,144 video and 126 audio tokens.

**What is counted** — a step of :func:`cinetune.ltx2.pipeline.generate` after the first (the largest: the previous
step's predictions are still held), i.e. :func:`cinetune.ltx2.sampling.sample_av` with its ``denoise``. Up to four
forward passes run one after the other, each with batch 1 — conditional, negative prompt, STG-perturbed,
modality-isolated (official dev guidance, reference ltx2.md §7.4); ``cfg_passes`` = n runs the first n of these.
So the activations are those of one pass; what stays alive across passes is float32 sampler state of
``[N, 128]`` per modality: the initial, clean and current tokens, one x0 prediction per pass (the previous step's
until each is replaced), the guidance and Euler temporaries, plus RoPE positions, denoise masks and the prompts'
connector outputs ``[1, L, caption_channels]`` per modality (two prompts with guidance, in the compute dtype). On
the CPU ``generate``'s noise tokens share the memory too. The isolated pass builds no audio↔video RoPE tables and
runs no cross-modal attention; the STG pass drops the self-attention of one block, which does not lower the peak
over the blocks, so it counts as a full pass.

**How the peak is computed.** Rather than closed formulas, the step is replayed tensor by tensor on a byte counter
(``_Tape``) — every allocation and release of ``generate``'s ``denoise``, ``sample_av``, ``multimodal_guidance``,
``LTX2DiT.forward``, ``rope_frequencies``, ``LTX2Block.forward`` (``_cross_modal``, ``Attention``, ``FeedForward``)
in program order, each tensor released where its last Python reference goes — and the counter's maximum is the
peak. The block code keeps few tensors: without autograd every residual is written into its branch output, the
scale-shift into the normed tensor, GELU in place, and the q/k RMSNorm in place on the CPU. Kernel facts (torch
2.14.1, checked with :func:`cinetune.core.memory.measure_cpu_peak`; s = bytes of the compute dtype, W = width):

- RMSNorm (``_rms``; CUDA ``F.rms_norm``, a fused kernel; CPU ``x·rsqrt(mean(x²))`` with a float32 ``[T, 1]``
  reduction): its output only, s·W per token. LayerNorm, GELU: their output only.
- RoPE (``_rotate``): float32 runs write the rotation into one new tensor (s·W); other dtypes go through
  ``apply_rope``: float copies of x and of both tables and four half-width float32 products, (2·4 + 8)·W = 16·W
  bytes per token on top of its input (8 × s·W in bf16) — the largest transient of a bf16 block.
- attention: output s·W per query token and a float32 log-sum-exp (4·H per query token); CPU
  ``_scaled_dot_product_flash_attention_for_cpu`` adds per-thread tiles
  threads·((qSplit·kvSplit + 2·qSplit + qSplit·hd)·4 + qSplit·kvSplit·[s ≠ 4]·s), qSplit ≤ 256, kvSplit ≤ 512
  (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``); CUDA flash / memory-efficient kernels hold no scores.
- Linear layers whose weight is stored in another dtype cast it per call (``CastLinear``: one copy of in·out·s
  bytes; ``FP8Linear``: two while it dequantises, one during the matmul); per block from the model's layers.
- ``FeedForward`` without autograd runs in slices of ``FF_CHUNK_TOKENS`` (4096) tokens: above that the 4·D-wide
  hidden tensor is a constant 4096·4D·s.

The replay is handed to :func:`cinetune.core.memory.estimate_peak_memory` as one
:class:`~cinetune.core.memory.BlockActivations` per block, per video token: ``hidden`` = s·D (the block input) and
``forward`` = the largest replayed total while that block runs (over the passes) less its input, or of the phases
outside the blocks (embeddings, RoPE tables, heads, x0, guidance, Euler update) when larger; the core estimate adds
the weights as stored, the block-swap ring and the swapped blocks' host bytes.

Numbers (19B, 768×512×121 at 24 fps, 4 passes, CUDA, bf16; units of s·D = 8,192 bytes per video token): a block
adds 12 on top of its inputs, at the RoPE of the video self-attention — normed input, q, k, v (4) and the
``apply_rope`` transient (8); the RoPE of the v2a keys (8) and the feed-forward (7 unsliced, ≤ 4,096 tokens; 3 +
a constant above) stay below. With the block input, the video RoPE tables (1), the audio↔video tables (0.5) and
the text and sampler state, the step peaks at ≈ 15.9 s·D per video token (0.80 GB of activations beside 37.8 GB of
bf16 weights; 15.2 at 1536×1024×121: 3.1 GB). With fp8 weights short videos peak at a feed-forward Linear instead
(two dequantised copies of a 16384×4096 weight: 0.27 GB). In float32 on the CPU the feed-forward peaks (7 s·D for
a block of ≤ 4,096 tokens).

Validation (tests/unit/test_ltx2_memory.py, the numbers in its docstring): a real ``LTX2Block`` under
``inference_mode`` against the block replay (tiny and medium widths, fp32 and bf16, with and without the
cross-modal attention, weights cast per call, a sliced feed-forward): within 0.6 %, most equal to the byte; and
``generate`` run for two steps (tiny and medium DiTs, fp32 and bf16, 1, 2 and 4 passes, with and without block
swap) against the CPU allocator's peak (``core.memory.measure_cpu_peak``, plus the weights and prompts that exist
before): within 0.5 % (asserted: 15 %). Re-run them when ``ltx2/dit.py``, ``ltx2/rope.py``, ``ltx2/sampling.py`` or
``ltx2/pipeline.py`` change. CUDA kernels are not measured.

Assumptions: one device, batch 1, text-to-video (image conditioning gives per-token modulation tensors
``[Nv, D]``, not modelled), the prompts in the compute dtype, no unmerged LoRA, the allocator reuses freed memory
exactly; the modulation vectors and per-call tensors of a few rows are ignored (< 1 MB), and so are the oneDNN
per-thread buffers of bf16/fp16 matmuls on the CPU (0.04–1.7 MB per thread, growing with the layer).

Sources: ``ltx2/dit.py``, ``ltx2/rope.py``, ``ltx2/sampling.py``, ``ltx2/pipeline.py``, ``core/quant.py``
(``CastLinear``, ``FP8Linear``), ``core/attention.py``; torch 2.14.1 kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..core.memory import GB, BlockActivations, MemoryEstimate, ModelDescription, describe_module, estimate_peak_memory
from ..core.quant import FP8Linear, quantize_linear_weights_fp8
from .audio import audio_latent_frames
from .config import LTX2TransformerConfig, ltx2_fp8_keep_high_precision
from .dit import FF_CHUNK_TOKENS, LTX2DiT
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


@dataclass(frozen=True)
class _Run:
    """Sizes and kernel rules of one replayed step (tokens of one sample; batch 1)."""

    config: LTX2TransformerConfig
    Nv: int
    Na: int
    L: int
    s: int
    device_type: str
    threads: int

    @property
    def u(self) -> int:
        """Bytes of the float32 copies kernels make of non-float32 inputs (0 in float32)."""
        return FP32 if self.s != FP32 else 0

    def attention_scratch(self, q_len: int, kv_len: int, head_dim: int, heads: int) -> float:
        """Kernel buffers of one attention call besides its output: the float32 log-sum-exp, and on the CPU the
        per-thread tiles."""
        lse = FP32 * heads * q_len
        if self.device_type == "cuda":
            return lse
        qs = min(256 if q_len >= 768 else 64 if q_len >= 192 else 32, q_len)
        kvs = min(512, kv_len)
        reduced = self.s if self.s != FP32 else 0
        return lse + self.threads * ((qs * kvs + 2 * qs + qs * head_dim) * FP32 + qs * kvs * reduced)


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
    """``_rms(x)`` (and ``_modulated``, whose scale-shift writes into it): one new row per token."""
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


def _feed_forward(t: _Tape, r: _Run, tokens: int, width: int, cast: int) -> float:
    """``FeedForward.forward`` without autograd: GELU in place, slices of ``FF_CHUNK_TOKENS`` for longer inputs."""
    chunked = tokens > FF_CHUNK_TOKENS
    n = FF_CHUNK_TOKENS if chunked else tokens
    out = t.alloc(r.s * width * tokens) if chunked else 0.0
    hidden = _linear(t, r, n, width, FF_MULT * width, cast)
    y = _linear(t, r, n, FF_MULT * width, width, cast)
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


def _rope_tables(t: _Tape, r: _Run, tokens: int, width: int, axes: int) -> float:
    """``rope_frequencies`` → (cos, sin) in the compute dtype, s·W/2 each per token; returns their bytes."""
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
    if r.s != FP32:
        tables = t.alloc(2 * r.s * slots * tokens)
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


# ---------------------------------------------------------------------------------------------------------------
# Weights


def describe_ltx2(model: LTX2DiT) -> ModelDescription:
    """:class:`~cinetune.core.memory.ModelDescription` of an LTX-2 DiT as it is (stored dtypes, fp8 layers with their
    scales; any device, meta included — only shapes and dtypes are read). Blocks: ``transformer_blocks``.

    Raises:
        TypeError: not an :class:`~cinetune.ltx2.dit.LTX2DiT`.
    """
    _check_model(model)
    return describe_module(model, list(model.transformer_blocks))


def _check_model(model) -> None:
    if not isinstance(model, LTX2DiT):
        raise TypeError(f"model must be an LTX2DiT (cinetune.ltx2.dit), got {type(model).__name__}")


def meta_ltx2_model(config: LTX2TransformerConfig, weight_dtype: str = "bf16") -> LTX2DiT:
    """An LTX-2 DiT on the meta device with the tensor dtypes of a published file: every tensor in
    ``weight_dtype``, or for "fp8_e4m3fn" the Linear weights of blocks 1–42 in float8 with a float32 scale each and
    everything else in bf16 (the official fp8 files: :func:`~cinetune.ltx2.config.ltx2_fp8_keep_high_precision`).
    Cached: treat it as read-only.

    Raises:
        TypeError: config is not an LTX2TransformerConfig.
        ValueError: unknown ``weight_dtype``.
    """
    if not isinstance(config, LTX2TransformerConfig):
        raise TypeError(f"config must be an LTX2TransformerConfig, got {type(config).__name__}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    return _meta_model(config, weight_dtype)


@functools.lru_cache(maxsize=8)
def _meta_model(config: LTX2TransformerConfig, weight_dtype: str) -> LTX2DiT:
    with torch.device("meta"):
        model = LTX2DiT(config).to(_DTYPES.get(weight_dtype, torch.bfloat16))
    if weight_dtype == "fp8_e4m3fn":
        quantize_linear_weights_fp8(model, keep=ltx2_fp8_keep_high_precision)
    return model.requires_grad_(False)


@functools.lru_cache(maxsize=8)
def _meta_description(config: LTX2TransformerConfig, weight_dtype: str) -> ModelDescription:
    return describe_ltx2(meta_ltx2_model(config, weight_dtype))


def _weight_cast(modules, dtype: torch.dtype) -> int:
    """Weight copies a Linear call in ``modules`` makes: 2 with fp8 layers, 1 with weights of another dtype, else 0."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, (nn.Linear, FP8Linear))]
    if any(isinstance(m, FP8Linear) for m in layers):
        return 2
    return int(any(m.weight.dtype != dtype for m in layers))


# ---------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class LTX2MemoryEstimate(MemoryEstimate):
    """A :class:`~cinetune.core.memory.MemoryEstimate` with the settings and the alternatives
    :func:`format_ltx2_estimate` shows.

    Attributes (besides the inherited ones; bytes):
        totals_by_swap: the device peak (``total``) for ``blocks_to_swap`` = 0, 1, …, the number of blocks.
        host_by_swap: the swapped blocks' bytes in CPU memory for each of those.
        blocks_to_swap: the setting this estimate is for.
        device_type: "cuda" or "cpu" (on the CPU the swapped blocks live in the same memory).
        width, height, frames, fps, video_tokens, audio_tokens, passes, compute_dtype: the settings.
    """

    totals_by_swap: tuple[int, ...] = ()
    host_by_swap: tuple[int, ...] = ()
    blocks_to_swap: int = 0
    device_type: str = "cuda"
    width: int = 0
    height: int = 0
    frames: int = 0
    fps: float = 0.0
    video_tokens: int = 0
    audio_tokens: int = 0
    passes: int = 1
    compute_dtype: str = ""


def estimate_ltx2_memory(model: LTX2DiT, *, width: int, height: int, frames: int, fps: float, blocks_to_swap: int,
                         device_type: str, compute_dtype: str | torch.dtype, cfg_passes: int = 4,
                         ring_size: int = 2, text_tokens: int = TEXT_TOKENS, overhead_bytes: int = 0,
                         cpu_threads: int | None = None) -> LTX2MemoryEstimate:
    """Peak device memory (bytes) of one denoising step of ``model`` (module docstring: what is counted and how).

    The weights are those the model holds (:func:`describe_ltx2`: stored dtypes, fp8 layers), resident except the
    last ``blocks_to_swap`` blocks, which the block-swap ring of ``ring_size`` slots streams from CPU memory
    (``host_bytes``); the activations are the replayed step, with weight casts per block from its Linear dtypes.

    Args:
        model: the DiT, loaded or on the meta device.
        width, height: pixels, multiples of 32. frames: 8k+1. fps: frames per second (sets the audio length).
        blocks_to_swap, ring_size: :class:`~cinetune.core.offload.BlockSwap` over ``transformer_blocks``.
        device_type: "cuda" or "cpu" (kernels differ; on "cpu" the swapped blocks share the memory: the process
            needs ``total + host_bytes``).
        compute_dtype: activation dtype ("bf16" on CUDA), a name or a torch dtype.
        cfg_passes: forward passes per step, 1–4: 1 distilled / stage 2 / no guidance, 2 text CFG, 3 + STG,
            4 + modality guidance (the official dev settings).
        ring_size: block-swap ring slots. text_tokens: text tokens per modality (1024).
        overhead_bytes: CUDA context, workspaces, allocator reserve — added as is.
        cpu_threads: threads of the CPU attention kernel (default ``torch.get_num_threads()``).

    Returns:
        :class:`LTX2MemoryEstimate`; ``total`` is the device peak, ``host_bytes`` the swapped weights in CPU memory.

    Raises:
        TypeError: ``model`` is not an LTX2DiT.
        ValueError: size not valid (the nearest valid values named), fps ≤ 0, ``blocks_to_swap`` out of range (the
            maximum named), ``cfg_passes`` outside 1–4, unknown dtype or device type.
    """
    _check_model(model)
    dtype = _compute_dtype(compute_dtype)
    blocks = list(model.transformer_blocks)
    outside = [m for name, m in model.named_children() if name != "transformer_blocks"]
    return _estimate(model.config, describe_ltx2(model), tuple(_weight_cast([b], dtype) for b in blocks),
                     _weight_cast(outside, dtype), width=width, height=height, frames=frames, fps=fps,
                     blocks_to_swap=blocks_to_swap, device_type=device_type, compute_dtype=dtype,
                     cfg_passes=cfg_passes, ring_size=ring_size, text_tokens=text_tokens,
                     overhead_bytes=overhead_bytes, cpu_threads=cpu_threads)


def estimate_ltx2_memory_from_config(config: LTX2TransformerConfig, *, width: int, height: int, frames: int,
                                     fps: float = 24.0, weight_dtype: str = "bf16", blocks_to_swap: int = 0,
                                     device_type: str = "cuda", compute_dtype: str | torch.dtype = "bf16",
                                     cfg_passes: int = 4, ring_size: int = 2, text_tokens: int = TEXT_TOKENS,
                                     overhead_bytes: int = 0, cpu_threads: int | None = None) -> LTX2MemoryEstimate:
    """:func:`estimate_ltx2_memory` for a config, with the tensor dtypes of a published file: ``weight_dtype``
    "bf16" (the official files), "fp16", "fp32", or "fp8_e4m3fn" (the official fp8 files, see
    :func:`meta_ltx2_model`). Nothing is allocated; descriptions are cached per (config, weight_dtype).

    Raises:
        TypeError: config is not an LTX2TransformerConfig.
        ValueError: as :func:`estimate_ltx2_memory`; unknown ``weight_dtype``.
    """
    model = meta_ltx2_model(config, weight_dtype)
    dtype = _compute_dtype(compute_dtype)
    outside = [m for name, m in model.named_children() if name != "transformer_blocks"]
    return _estimate(config, _meta_description(config, weight_dtype),
                     tuple(_weight_cast([b], dtype) for b in model.transformer_blocks), _weight_cast(outside, dtype),
                     width=width, height=height, frames=frames, fps=fps, blocks_to_swap=blocks_to_swap,
                     device_type=device_type, compute_dtype=dtype, cfg_passes=cfg_passes, ring_size=ring_size,
                     text_tokens=text_tokens, overhead_bytes=overhead_bytes, cpu_threads=cpu_threads)


def _estimate(config: LTX2TransformerConfig, desc: ModelDescription, casts: tuple[int, ...], outside_cast: int, *,
              width, height, frames, fps, blocks_to_swap, device_type, compute_dtype: torch.dtype, cfg_passes,
              ring_size, text_tokens, overhead_bytes, cpu_threads) -> LTX2MemoryEstimate:
    if isinstance(cfg_passes, bool) or not isinstance(cfg_passes, int) or not 1 <= cfg_passes <= len(PASSES):
        raise ValueError(f"cfg_passes must be an int from 1 to {len(PASSES)} (forward passes per step: "
                         f"{', '.join(PASSES)}), got {cfg_passes!r}")
    Nv, Na = ltx2_tokens(width, height, frames, fps)
    r = _make_run(config, Nv, Na, text_tokens, compute_dtype, device_type, cpu_threads)
    n = len(desc.blocks)
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or not 0 <= blocks_to_swap <= n:
        raise ValueError(f"blocks_to_swap={blocks_to_swap!r} is out of range: 0 up to the maximum {n} (the block "
                         "count)")
    passes, outside_peak = _step(r, cfg_passes, outside_cast)
    block_peaks: dict[tuple[int, bool], float] = {}
    hidden = r.s * config.inner_dim
    acts = []
    for cast in casts:
        peak = outside_peak
        for level, cross_modal in passes:
            if (cast, cross_modal) not in block_peaks:
                t = _Tape()
                _block(t, r, cross_modal=cross_modal, cast=cast)
                block_peaks[cast, cross_modal] = t.peak
            peak = max(peak, level + block_peaks[cast, cross_modal])
        acts.append(BlockActivations(hidden=hidden, forward=max(peak / Nv - hidden, 0.0), saved=0.0, backward=0.0))
    options = [estimate_peak_memory(desc, acts, tokens=Nv, blocks_to_swap=k, ring_size=ring_size,
                                    overhead_bytes=overhead_bytes) for k in range(n + 1)]
    est = options[blocks_to_swap]
    return LTX2MemoryEstimate(
        **{f.name: getattr(est, f.name) for f in dataclasses.fields(MemoryEstimate)},
        totals_by_swap=tuple(o.total for o in options), host_by_swap=tuple(o.host_bytes for o in options),
        blocks_to_swap=blocks_to_swap, device_type=device_type, width=width, height=height, frames=frames,
        fps=float(fps), video_tokens=Nv, audio_tokens=Na, passes=cfg_passes, compute_dtype=_NAMES[compute_dtype])


# ---------------------------------------------------------------------------------------------------------------
# Text for users


def smallest_fitting_swap(estimate: LTX2MemoryEstimate, available_bytes: int) -> int | None:
    """The least ``blocks_to_swap`` whose estimated peak fits ``available_bytes``
    (:attr:`LTX2MemoryEstimate.totals_by_swap`; on the CPU the swapped blocks count too, so swapping never makes a
    run fit there), or None when not even every block swapped fits.

    Raises:
        ValueError: ``available_bytes`` is not an int ≥ 0, or the estimate is not from :func:`estimate_ltx2_memory`.
    """
    if isinstance(available_bytes, bool) or not isinstance(available_bytes, int) or available_bytes < 0:
        raise ValueError(f"available_bytes must be an int ≥ 0, got {available_bytes!r}")
    if not isinstance(estimate, LTX2MemoryEstimate) or not estimate.totals_by_swap:
        raise ValueError("smallest_fitting_swap needs an estimate from estimate_ltx2_memory")
    cpu = estimate.device_type == "cpu"
    for n, (total, host) in enumerate(zip(estimate.totals_by_swap, estimate.host_by_swap)):
        if total + (host if cpu else 0) <= available_bytes:
            return n
    return None


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def format_ltx2_estimate(estimate: MemoryEstimate, *, available_bytes: int | None, model: str) -> str:
    """Short text for users, e.g.::

        Estimated peak GPU memory: 38.6 GB (weights 37.8 GB resident, activations 0.8 GB)
        Settings: LTX-2 19B dev, 768×512, 121 frames at 24 fps (6,144 video + 126 audio tokens), 4 forward passes
        per step, bf16 compute.
        Does not fit in the 24.0 GB available (short by 14.6 GB): set blocks_to_swap to 21 or more on the model
        loader (estimated peak 23.9 GB, 16.2 GB of weights in CPU memory).
        Add about 0.5 GB for the CUDA context and kernel workspaces.

    Args:
        estimate: from :func:`estimate_ltx2_memory` (a plain MemoryEstimate works too, without the settings and the
            block-swap advice).
        available_bytes: free device memory (e.g. ``torch.cuda.mem_get_info()[0]``), or None. When the estimate
            exceeds it, the text names the smallest ``blocks_to_swap`` that fits, or says that none does.
        model: the model's name for the settings line.

    Returns:
        Lines joined by ``\\n`` (GB = 10⁹ bytes, one decimal).
    """
    ext = estimate if isinstance(estimate, LTX2MemoryEstimate) and estimate.totals_by_swap else None
    cpu = ext is not None and ext.device_type == "cpu"
    weights = f"weights {_gb(estimate.resident_weights)} resident"
    if estimate.swap_ring:
        weights += f" + {_gb(estimate.swap_ring)} swap ring"
    parts = [weights, f"activations {_gb(estimate.activations + estimate.attention_workspace)}"]
    if estimate.lora:
        parts.append(f"LoRA {_gb(estimate.lora)}")
    if estimate.overhead:
        parts.append(f"other {_gb(estimate.overhead)}")
    lines = [f"Estimated peak {'memory (CPU)' if cpu else 'GPU memory'}: {_gb(estimate.total)} ({', '.join(parts)})"]
    need = estimate.total + (estimate.host_bytes if cpu else 0)
    if estimate.host_bytes:
        line = f"Block swap keeps {_gb(estimate.host_bytes)} of weights in CPU memory"
        lines.append(line + (f" (the same memory here: {_gb(need)} in all)." if cpu else "."))
    if ext is not None:
        passes = f"{ext.passes} forward pass{'es' if ext.passes > 1 else ''} per step"
        swap = f", {ext.blocks_to_swap} blocks swapped" if ext.blocks_to_swap else ""
        lines.append(f"Settings: {model}, {ext.width}×{ext.height}, {ext.frames} frames at {ext.fps:g} fps "
                     f"({ext.video_tokens:,} video + {ext.audio_tokens:,} audio tokens), {passes}, "
                     f"{ext.compute_dtype} compute{swap}.")
    else:
        lines.append(f"Model: {model}.")
    if available_bytes is not None:
        if need <= available_bytes:
            lines.append(f"Fits in the {_gb(available_bytes)} available.")
        else:
            short = f"Does not fit in the {_gb(available_bytes)} available (short by {_gb(need - available_bytes)})"
            fit = None if ext is None or cpu else smallest_fitting_swap(ext, available_bytes)
            if fit is not None:
                lines.append(f"{short}: set blocks_to_swap to {fit} or more on the model loader (estimated peak "
                             f"{_gb(ext.totals_by_swap[fit])}, {_gb(ext.host_by_swap[fit])} of weights in CPU "
                             "memory).")
            elif ext is not None and not cpu:
                lines.append(f"{short}, and no blocks_to_swap fits, not even every block swapped: load fp8 weights, "
                             "or lower the resolution or the frame count.")
            else:
                lines.append(f"{short}: load fp8 weights, or lower the resolution or the frame count.")
    if not cpu and not estimate.overhead:
        lines.append("Add about 0.5 GB for the CUDA context and kernel workspaces.")
    return "\n".join(lines)
