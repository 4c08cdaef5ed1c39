"""LTX-2 peak-memory estimate: what one denoising step, or one LoRA training step, of the LTX-2 audio+video DiT needs
on the device.

API:

- :func:`estimate_ltx2_memory` — the estimate for an :class:`~cinetune.ltx2.dit.LTX2DiT` (loaded, or on the meta
  device: only shapes and dtypes are read) at a video size, frame rate, block swap and compute dtype, for sampling
  or (``training=True``, with LoRA rank, optimizer, checkpointing, audio and first-frame conditioning) training;
  :func:`estimate_ltx2_memory_from_config` — the same for an :class:`~cinetune.ltx2.config.LTX2TransformerConfig`
  and the weight dtype of a published file (described on the meta device: nothing is allocated). Both return an
  :class:`LTX2MemoryEstimate`: a :class:`~cinetune.core.memory.MemoryEstimate` (bytes) that also holds the peak for
  every ``blocks_to_swap``.
- :func:`format_ltx2_estimate` — the short text users see; :func:`smallest_fitting_swap` — the least block swap
  that fits a budget; :func:`ltx2_tokens` — video and audio token counts; :func:`ltx2_block_peak` — one block alone;
  :func:`describe_ltx2`, :func:`meta_ltx2_model` — the weights.

Units: bytes everywhere (GB = 10⁹ bytes in texts). The estimate predicts the allocator peak
(``torch.cuda.max_memory_allocated``), not ``nvidia-smi``: the CUDA context (0.3–0.6 GB), cuBLAS/cuDNN workspaces
and the caching allocator's fragmentation come on top (``overhead_bytes``). Sampling: the DiT stage only (Gemma, the
text connectors, the VAEs and the vocoder run at other times). Training: the step of ``training.trainer`` — text
connectors, DiT, LoRA, gradients and optimizer state (below, "Training").

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

**Training** (``training=True``): one optimizer step of :func:`cinetune.training.trainer.train_lora` with
:class:`~cinetune.ltx2.train.LTX2TrainingAdapter`, one micro-batch of one sample — ``load_batch`` (stacked float32
latents), ``loss`` (patchified tokens and noise, left-padded float32 caption features of ``text_tokens`` tokens, both
frozen connectors without autograd, RoPE positions, x_σ per modality, the DiT forward with autograd, the float32
video MSE, or the masked mean under first-frame conditioning, plus the audio MSE), the backward, gradient clipping and
the AdamW update. LoRA (float32, ``TrainConfig.lora_dtype``) on ``to_q``/``to_k``/``to_v``/``to_out.0`` of every
attention that runs (:func:`~cinetune.ltx2.train.ltx2_lora_targets`); the whole model frozen. On the device
besides the DiT: the text connectors with ``aggregate_embed`` (the adapter moves the whole
:class:`~cinetune.ltx2.connectors.LTX2TextProjection` there; 19B, bf16: 2.86 GB, of which ``aggregate_embed`` 1.45
GB is not used by a training step), the LoRA, its gradients and the optimizer state (core estimate: AdamW 8 bytes
per parameter, 8-bit AdamW 2).

The step is replayed on a byte counter that also knows what autograd keeps (``_GradTape``: a tensor lives while
Python or a saved-tensor slot holds it), in program order as above; ``_StepPeaks`` gives the peak while each block
runs forward and backward and outside the blocks, folded into per-block ``BlockActivations`` (``_fold``) whose core
training formula reproduces the replayed peak. Per-block checkpointing (``training.adapter.gradient_checkpointing``,
non-reentrant): the first forward keeps nothing but every block's inputs (and the RoPE tables and texts it is handed);
the backward of each block recomputes its forward with its saved tensors, then runs. Without checkpointing every
block keeps its saved tensors to the end of the forward. Autograd facts (torch 2.14.1, checked with
:func:`cinetune.core.memory.measure_cpu_peak` and saved-tensor hooks; s = bytes of the compute dtype):

- what one block keeps per video token, beyond its input (19B widths, bf16): the modulated or normed input of each
  attention (kept by its LoRA ``down``), the q/k projections before their RMSNorm and after RoPE, v, the attention
  output and its float32 log-sum-exp (SDPA), the stream before each later sublayer (kept by its RMSNorm, with float32
  statistics), the 4·D-wide GELU input, the rank-r LoRA ``down`` outputs, below float32 the float32 copies of the
  RoPE tables (8·W bytes per rotated width) and of the LoRA weights — 30.4 s·D; with first-frame conditioning the
  per-token ``1 + scale`` and gate tensors add 7 (37.4); with cast weights (fp8, or bf16 weights in float32) every
  Linear keeps its cast weight (19B block in bf16: 0.77 GB). Text-attention keys and values are kept per text token.
- the backward of a block peaks at its video feed-forward: the GELU output's and input's gradients (8·s·D per token)
  while everything the block keeps (less the audio feed-forward's) and the stream gradients are alive; attention
  backwards allocate the gradients of their output, q, k and v (+ the CPU kernel's tiles), after the feed-forward's
  tensors are gone.
- the head keeps its LayerNorm input and statistics; ``mse_loss`` keeps its float32 input and target, and its 0-d
  result the storage of the unreduced squares until the step ends; the masked mean keeps the difference.
- gradient clipping and the AdamW update run after the activations are gone and allocate LoRA-sized temporaries
  only: never the peak, not replayed. Every LoRA gradient is counted at the peak (conservative).

Numbers (19B, 768×512×121 at 24 fps, CUDA, bf16 compute, rank 32, AdamW, audio and video, first-frame conditioning,
checkpointing; units of s·D·Nv = 50 MB): 48 block inputs (48.5), one block recomputed (37.4) and its backward with
the gradients and what the step still holds (10.8) → 96.7, 4.9 GB of activations; with 37.8 GB of DiT weights, 2.9 GB of connectors and
3.4 GB of LoRA, gradients and AdamW state: 48.9 GB. fp8 weights: 33.1 GB (the peak moves to block 42, the last fp8
block, whose recomputation keeps its dequantised weights). Without checkpointing: 137 GB (bf16). At 1536×1024×121:
63.2 GB. ltx-trainer sizes its standard LoRA configuration for 80 GB GPUs and its int8 configuration for 32 GB.

Validation (tests/unit/test_ltx2_memory.py): a real training step written as the trainer runs it (tiny and medium
DiTs with their text connectors, fp32 and bf16, with and without checkpointing, audio+video and video only, with and
without first-frame conditioning, fp8 and bf16 weights in float32 compute, one block swapped) against the CPU
allocator's peak plus the weights, connectors, LoRA and AdamW state: within 4 % (asserted: 15 %). CUDA kernels
(fused RMSNorm, flash attention with its float32 backward accumulators) are not measured.

Sources: ``ltx2/dit.py``, ``ltx2/rope.py``, ``ltx2/sampling.py``, ``ltx2/pipeline.py``, ``ltx2/connectors.py``,
``ltx2/train.py``, ``core/quant.py`` (``CastLinear``, ``FP8Linear``), ``core/lora.py`` (``LoRALinear``),
``core/attention.py``, ``training/trainer.py``; torch 2.14.1 kernels.
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
from ..core.checkpoint import CheckpointError
from .connectors import LTX2TextProjection, TextProjectionConfig, text_projection_config
from .dit import FF_CHUNK_TOKENS, LTX2DiT
from .family import LTX2_LATENT_FORMAT
from .train import ltx2_lora_targets

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


# ---------------------------------------------------------------------------------------------------------------
# The training replay


class _T:
    """A tensor of a replayed training step: its bytes, whether autograd keeps it for the backward and whether
    Python still refers to it. It is freed when neither does."""

    __slots__ = ("nbytes", "kept", "alive")

    def __init__(self, nbytes: float) -> None:
        self.nbytes = nbytes
        self.kept = False
        self.alive = True


class _GradTape(_Tape):
    """A :class:`_Tape` for a step with autograd. :meth:`new` allocates a tensor, :meth:`save` records that an op
    keeps it for the backward (into a list that :meth:`release` empties in the backward), :meth:`drop` removes the
    Python reference. With ``recording`` off (a checkpointed forward: its saved tensors are discarded at once)
    :meth:`save` does nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = True

    def new(self, nbytes: float) -> _T:
        self.alloc(nbytes)
        return _T(nbytes)

    def save(self, saved: list, *tensors: _T | None) -> None:
        if not self.recording:
            return
        for x in tensors:
            if x is not None and not x.kept:
                x.kept = True
                saved.append(x)

    def drop(self, *tensors: _T | None) -> None:
        for x in tensors:
            if x is not None and x.alive:
                x.alive = False
                if not x.kept:
                    self.free(x.nbytes)

    def release(self, saved: list) -> None:
        for x in saved:
            x.kept = False
            if not x.alive:
                self.free(x.nbytes)
        saved.clear()

    def new_saved(self, saved: list, nbytes: float) -> None:
        """A new tensor that only autograd refers to (e.g. a norm's statistics)."""
        x = self.new(nbytes)
        self.save(saved, x)
        self.drop(x)


def _stat_bytes(r: _Run) -> int:
    """Bytes per token an RMSNorm keeps for its backward beside its input: on the CPU the float32 norm and inverse
    (and the inverse in the compute dtype when that is not float32), on CUDA the float32 rstd."""
    if r.device_type == "cuda":
        return FP32
    return 2 * FP32 + (r.s if r.s != FP32 else 0)


def _g_rms(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, grad: bool) -> _T:
    """``_rms(x)`` with autograd: a new tensor; keeps x and its statistics when x needs a gradient (``grad``)."""
    out = t.new(r.s * width * tokens)
    if grad:
        t.save(saved, x)
        t.new_saved(saved, _stat_bytes(r) * tokens)
    return out


def _g_takes(t: _GradTape, r: _Run, tokens: int, width: int, per_token: bool) -> list[_T]:
    """``AdaValues.take`` of a shift and a scale: ``[B, T, W]`` tensors when the timestep varies per token
    (first-frame conditioning), else vectors (ignored)."""
    return [t.new(r.s * width * tokens), t.new(r.s * width * tokens)] if per_token else []


def _g_scale_shift(t: _GradTape, r: _Run, saved: list, normed: _T, tokens: int, width: int, grad: bool,
                   per_token: bool, takes: list[_T] | None = None) -> _T:
    """``addcmul(shift, normed, 1 + scale)``; it keeps ``1 + scale`` (a per-token tensor under first-frame
    conditioning)."""
    takes = _g_takes(t, r, tokens, width, per_token) if takes is None else takes
    one = t.new(r.s * width * tokens) if per_token else None
    out = t.new(r.s * width * tokens)
    if grad:
        t.save(saved, one)
    t.drop(*takes, one)
    return out


def _g_residual(t: _GradTape, r: _Run, saved: list, update: _T, tokens: int, width: int, gate: bool,
                per_token: bool) -> _T:
    """``x + update·gate`` (``x + update``): a new stream; keeps the gate (a per-token tensor under first-frame
    conditioning)."""
    g = t.new(r.s * width * tokens) if gate and per_token else None
    out = t.new(r.s * width * tokens)
    t.save(saved, g)
    t.drop(update, g)
    return out


def _g_linear(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, fan_in: int, fan_out: int, cast: int,
              lora: bool, grad: bool) -> _T:
    """A frozen Linear (its weight cast per call: ``cast`` copies, kept when the input ``x`` needs a gradient:
    ``grad``), with an unmerged LoRA ``y + c·up(down(x))`` (``core.lora.LoRALinear``: keeps x, the rank-r down
    output and, outside float32, the compute-dtype copies of the adapter weights)."""
    s = r.s
    w = None
    if cast:
        weight = s * fan_in * fan_out
        if cast == 2:
            t.touch(2 * weight)
        w = t.new(weight)
    y = t.new(s * fan_out * tokens)
    if grad:
        t.save(saved, w)
    t.drop(w)
    if not lora:
        return y
    if s != FP32:  # the adapters cast to the compute dtype per call: the copies are kept
        for features, needed in ((fan_in, grad), (fan_out, True)):
            copy = t.new(s * r.rank * features)
            if needed:
                t.save(saved, copy)
            t.drop(copy)
    down = t.new(s * r.rank * tokens)
    up = t.new(s * fan_out * tokens)
    t.save(saved, x, down)
    scaled = t.new(s * fan_out * tokens)
    out = t.new(s * fan_out * tokens)
    t.drop(y, up, scaled, down)
    return out


def _g_qk_norm(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, grad: bool) -> _T:
    """``Attention._norm``: keeps the projection output; on the CPU two products (one temporary)."""
    if grad:
        t.save(saved, x)
        t.new_saved(saved, _stat_bytes(r) * tokens)
    if r.device_type == "cpu":
        first = t.new(r.s * width * tokens)
        out = t.new(r.s * width * tokens)
        t.drop(first)
        return out
    return t.new(r.s * width * tokens)


def _g_rope(t: _GradTape, r: _Run, saved: list, tokens: int, width: int, table: _T) -> _T:
    """``apply_rope`` with autograd: float32 halves (four products, two sums, a stack), which keep the tables
    (``table``, the DiT's, in float32; outside float32 a copy of x and float32 copies of both tables)."""
    xf = None
    if r.s == FP32:
        t.save(saved, table)
    else:
        xf = t.new(FP32 * width * tokens)
        tables = t.new(FP32 * width * tokens)
        t.save(saved, tables)
        t.drop(tables)
    half = 2 * width * tokens  # a float32 product over half the width
    a, b = t.new(half), t.new(half)
    first = t.new(half)
    t.drop(a, b)
    a, b = t.new(half), t.new(half)
    second = t.new(half)
    t.drop(a, b)
    out = t.new(2 * half)
    t.drop(first, second)
    if r.s == FP32:
        return out
    res = t.new(r.s * width * tokens)
    t.drop(out, xf)
    return res


def _g_attention(t: _GradTape, r: _Run, saved: list, x: _T, context: _T, *, q_tokens: int, kv_tokens: int,
                 q_width: int, kv_width: int, heads: int, head_dim: int, out_width: int, rope: _T | None,
                 cast: int, lora: bool, x_grad: bool, context_grad: bool) -> _T:
    """``Attention.forward`` with autograd; returns the ``to_out`` output. ``rope``: the RoPE tables (None: no
    RoPE). SDPA keeps q, k, v, its output and the float32 log-sum-exp."""
    inner = heads * head_dim
    q0 = _g_linear(t, r, saved, x, q_tokens, q_width, inner, cast, lora, x_grad)
    q = _g_qk_norm(t, r, saved, q0, q_tokens, inner, x_grad or lora)
    t.drop(q0)
    k0 = _g_linear(t, r, saved, context, kv_tokens, kv_width, inner, cast, lora, context_grad)
    k = _g_qk_norm(t, r, saved, k0, kv_tokens, inner, context_grad or lora)
    t.drop(k0)
    v = _g_linear(t, r, saved, context, kv_tokens, kv_width, inner, cast, lora, context_grad)
    if rope is not None:
        rotated = _g_rope(t, r, saved, q_tokens, inner, rope)
        t.drop(q)
        q = rotated
        rotated = _g_rope(t, r, saved, kv_tokens, inner, rope)
        t.drop(k)
        k = rotated
    o = t.new(r.s * inner * q_tokens)
    lse = t.new(FP32 * heads * q_tokens)
    t.touch(r.attention_tiles(q_tokens, kv_tokens, head_dim))
    t.save(saved, q, k, v, o, lse)
    out = _g_linear(t, r, saved, o, q_tokens, inner, out_width, cast, lora, True)
    t.drop(q, k, v, o, lse)
    return out


def _g_feed_forward(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, cast: int) -> _T:
    """``FeedForward`` with autograd (never sliced): GELU keeps its 4·W-wide input."""
    hidden = _g_linear(t, r, saved, x, tokens, width, FF_MULT * width, cast, False, True)
    gelu = t.new(r.s * FF_MULT * width * tokens)
    t.save(saved, hidden)
    t.drop(hidden)
    out = _g_linear(t, r, saved, gelu, tokens, FF_MULT * width, width, cast, False, True)
    t.drop(gelu)
    return out


@dataclass
class _Inputs:
    """The block inputs of a replayed training forward: projected texts and RoPE tables."""

    video_context: _T
    audio_context: _T | None
    video_rope: _T
    audio_rope: _T | None
    cross_ropes: _T | None

    def all(self) -> list[_T]:
        return [x for x in (self.video_context, self.audio_context, self.video_rope, self.audio_rope,
                            self.cross_ropes) if x is not None]


#: Sublayers of a block in backward order (the reverse of the forward).
_SUBLAYERS = ("audio_ff", "ff", "cross", "audio_attn2", "audio_attn1", "attn2", "attn1")


def _g_block(t: _GradTape, r: _Run, video: _T, audio: _T | None, x: _Inputs, *, first: bool, cast: int
             ) -> tuple[_T, _T | None, dict[str, list]]:
    """``LTX2Block.forward`` with autograd and LoRA on every attention that runs. ``first``: block 0, whose inputs
    need no gradient. Returns the new streams and, per sublayer, what autograd keeps."""
    c = r.config
    D, Da, Nv, Na, L = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.L
    lora = r.rank > 0
    b: dict[str, list] = {name: [] for name in _SUBLAYERS}
    grad = not first

    def self_attention(saved, stream, tokens, width, heads, head_dim, rope, per_token):
        takes = _g_takes(t, r, tokens, width, per_token)
        normed = _g_rms(t, r, saved, stream, tokens, width, grad)
        m = _g_scale_shift(t, r, saved, normed, tokens, width, grad, per_token, takes)
        t.drop(normed)
        update = _g_attention(t, r, saved, m, m, q_tokens=tokens, kv_tokens=tokens, q_width=width, kv_width=width,
                              heads=heads, head_dim=head_dim, out_width=width, rope=rope, cast=cast, lora=lora,
                              x_grad=grad, context_grad=grad)
        t.drop(m)
        return _g_residual(t, r, saved, update, tokens, width, True, per_token)

    def text_attention(saved, stream, context, tokens, width, context_width, heads, head_dim):
        normed = _g_rms(t, r, saved, stream, tokens, width, True)
        update = _g_attention(t, r, saved, normed, context, q_tokens=tokens, kv_tokens=L, q_width=width,
                              kv_width=context_width, heads=heads, head_dim=head_dim, out_width=width, rope=None,
                              cast=cast, lora=lora, x_grad=True, context_grad=False)
        t.drop(normed)
        out = _g_residual(t, r, saved, update, tokens, width, False, False)
        t.drop(stream)
        return out

    def feed_forward(saved, stream, tokens, width, per_token):
        takes = _g_takes(t, r, tokens, width, per_token)
        normed = _g_rms(t, r, saved, stream, tokens, width, True)
        m = _g_scale_shift(t, r, saved, normed, tokens, width, True, per_token, takes)
        t.drop(normed)
        update = _g_feed_forward(t, r, saved, m, tokens, width, cast)
        t.drop(m)
        out = _g_residual(t, r, saved, update, tokens, width, True, per_token)
        t.drop(stream)
        return out

    v = self_attention(b["attn1"], video, Nv, D, c.num_attention_heads, c.attention_head_dim, x.video_rope, r.i2v)
    v = text_attention(b["attn2"], v, x.video_context, Nv, D, c.cross_attention_dim, c.num_attention_heads,
                       c.attention_head_dim)
    a = None
    if audio is not None:
        a = self_attention(b["audio_attn1"], audio, Na, Da, c.audio_num_attention_heads, c.audio_attention_head_dim,
                           x.audio_rope, False)
        a = text_attention(b["audio_attn2"], a, x.audio_context, Na, Da, c.audio_cross_attention_dim,
                           c.audio_num_attention_heads, c.audio_attention_head_dim)
        if x.cross_ropes is not None:
            v, a = _g_cross_modal(t, r, b["cross"], v, a, x.cross_ropes, cast)
    v = feed_forward(b["ff"], v, Nv, D, r.i2v)
    if a is not None:
        a = feed_forward(b["audio_ff"], a, Na, Da, False)
    return v, a, b


def _g_cross_modal(t: _GradTape, r: _Run, saved: list, video: _T, audio: _T, ropes: _T, cast: int
                   ) -> tuple[_T, _T]:
    """``LTX2Block._cross_modal`` with autograd: the modulated copies are new tensors (kept as LoRA inputs)."""
    c = r.config
    D, Da, Nv, Na = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na
    kw = dict(heads=c.audio_num_attention_heads, head_dim=c.audio_attention_head_dim, rope=ropes, cast=cast,
              lora=r.rank > 0, x_grad=True, context_grad=True)
    vn = _g_rms(t, r, saved, video, Nv, D, True)
    an = _g_rms(t, r, saved, audio, Na, Da, True)
    vm = _g_scale_shift(t, r, saved, vn, Nv, D, True, r.i2v)
    am = _g_scale_shift(t, r, saved, an, Na, Da, True, False)
    update = _g_attention(t, r, saved, vm, am, q_tokens=Nv, kv_tokens=Na, q_width=D, kv_width=Da, out_width=D, **kw)
    t.drop(vm, am)
    new_video = _g_residual(t, r, saved, update, Nv, D, True, r.i2v)
    t.drop(video)
    am = _g_scale_shift(t, r, saved, an, Na, Da, True, False)
    vm = _g_scale_shift(t, r, saved, vn, Nv, D, True, r.i2v)
    update = _g_attention(t, r, saved, am, vm, q_tokens=Na, kv_tokens=Nv, q_width=Da, kv_width=D, out_width=Da, **kw)
    t.drop(am, vm)
    new_audio = _g_residual(t, r, saved, update, Na, Da, True, False)
    t.drop(audio, vn, an)
    return new_video, new_audio


def _g_block_backward(t: _GradTape, r: _Run, b: dict[str, list]) -> None:
    """The backward of one block, sublayer by sublayer in reverse order: each allocates its gradients while all
    it keeps is alive, then releases what it kept. Transients (s = compute bytes): feed-forward the gradients of
    the GELU output and input (2·4·W); attention the gradients of its output, q, k and v (+ CPU kernel tiles)."""
    c = r.config
    D, Da, Nv, Na, L, s = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.L, r.s
    H, Ha = c.num_attention_heads, c.audio_num_attention_heads
    hd, hda = c.attention_head_dim, c.audio_attention_head_dim
    sizes = {  # (query tokens, key tokens, width, inner width, head dim)
        "attn1": (Nv, Nv, D, H * hd, hd), "attn2": (Nv, L, D, H * hd, hd),
        "audio_attn1": (Na, Na, Da, Ha * hda, hda), "audio_attn2": (Na, L, Da, Ha * hda, hda),
    }
    for name in _SUBLAYERS:
        if not b[name]:
            continue
        if name in ("ff", "audio_ff"):
            tokens, width = (Nv, D) if name == "ff" else (Na, Da)
            t.touch(2 * FF_MULT * s * width * tokens)
        elif name == "cross":
            inner = Ha * hda
            t.touch(s * (2 * D + 3 * inner) * Nv + s * 3 * inner * Na
                    + r.attention_tiles(Nv, Na, hda, backward=True))
        else:
            q, kv, width, inner, head_dim = sizes[name]
            t.touch(s * (width + inner) * q + s * inner * (q + 2 * kv)
                    + r.attention_tiles(q, kv, head_dim, backward=True))
        t.release(b[name])


def _connector_rms(t: _Tape, r: _Run, tokens: int, width: int) -> float:
    """``F.rms_norm`` without autograd: on the CPU below float32 through two float32 buffers first."""
    if r.device_type == "cpu" and r.s != FP32:
        t.touch(2 * FP32 * width * tokens)
    return t.alloc(r.s * width * tokens)


def _connector(t: _Tape, r: _Run, tp: TextProjectionConfig) -> float:
    """One ``Embeddings1DConnector`` without autograd (``r.s`` = the connectors' dtype, ``r.L`` tokens): registers
    fill the padding (gather, register rows, select), float32 RoPE tables, the blocks, the final norm. Returns its
    output's bytes."""
    L, W, s = r.L, tp.dim, r.s
    h = 0.0
    if tp.num_registers:
        front, tail = t.alloc(s * W * L), t.alloc(s * W * L)
        h = t.alloc(s * W * L)
        t.free(front, tail)
    tables = _rope_tables(t, r, L, W, 1, dtype_bytes=FP32)
    for _ in range(tp.num_layers):
        for sublayer in ("attention", "feed-forward"):
            normed = _connector_rms(t, r, L, W)
            if sublayer == "attention":
                update = _attention(t, r, q_tokens=L, kv_tokens=L, q_width=W, kv_width=W, heads=tp.heads,
                                    head_dim=tp.head_dim, out_width=W, rope=True, cast=0)
            else:
                update = _feed_forward(t, r, L, W, 0, mult=tp.ff_dim // W)
            t.free(normed)
            new = t.alloc(s * W * L)
            t.free(update, h)
            h = new
    if tp.norm_output:
        out = _connector_rms(t, r, L, W)
        t.free(h)
        h = out
    t.free(tables)
    return h


def _g_connect(t: _GradTape, r: _Run, tp: TextProjectionConfig) -> tuple[_T, _T]:
    """``LTX2TextProjection.connect`` on the float32 features (alive): both connectors, then the float32 contexts."""
    L, W, s = r.L, tp.dim, r.s
    x = t.alloc(s * W * L) if s != FP32 else 0.0
    video = _connector(t, r, tp)
    audio = _connector(t, r, tp)
    masked = t.alloc(video)
    t.free(video)
    if s != FP32:
        video = t.alloc(FP32 * W * L)
        t.free(masked)
        new = t.alloc(FP32 * W * L)
        t.free(audio)
        audio = new
    else:
        video = masked
    t.free(x)
    return _T(video), _T(audio)


def _g_head(t: _GradTape, r: _Run, saved: list, x: _T, tokens: int, width: int, channels: int, cast: int,
            per_token: bool) -> _T:
    """``LTX2DiT._head`` with autograd: LayerNorm (keeps x, float32 mean and rstd), scale-shift, ``proj_out``."""
    takes = _g_takes(t, r, tokens, width, per_token)
    normed = t.new(r.s * width * tokens)
    t.save(saved, x)
    t.new_saved(saved, 2 * FP32 * tokens)
    m = _g_scale_shift(t, r, saved, normed, tokens, width, True, per_token, takes)
    t.drop(normed)
    out = _g_linear(t, r, saved, m, tokens, width, channels, cast, False, True)
    t.drop(m)
    return out


def _g_loss(t: _GradTape, r: _Run, saved: list, pred: _T, channels: int, tokens: int, masked: bool) -> _T:
    """One modality's loss term (``ltx2_flow_matching_loss``): the float32 target, ``mse_loss`` (keeps the
    prediction in float32 and the target; its 0-d result keeps the storage of the unreduced squares) or, with
    conditioning tokens, the masked mean (keeps the difference and the mask). Returns what the loss value holds."""
    n = FP32 * channels * tokens
    target = t.new(n)
    pf = t.new(n) if r.s != FP32 else pred
    if not masked:
        t.save(saved, pf, target)
        value = t.new(n)
        t.touch(n)
    else:
        keep = t.new(FP32 * tokens)
        diff = t.new(n)
        t.save(saved, diff, keep)
        if pf is not pred:
            t.drop(pf)
        square = t.new(n)
        product = t.new(n)
        t.drop(square, product)
        value = None
        t.drop(keep)
    if pf is not pred and pf.alive:
        t.drop(pf)
    t.drop(target)
    return value


def _g_loss_backward(t: _GradTape, r: _Run, loss_saved: list, head_saved: list, tokens: int, width: int,
                     channels: int, masked: bool) -> _T:
    """The loss term's and the head's backward; returns the gradient of the last block's stream."""
    n = FP32 * channels * tokens
    if masked:
        t.touch(2 * n)
    grad = t.new(n)
    t.release(loss_saved)
    if r.s != FP32:
        cast = t.new(r.s * channels * tokens)
        t.drop(grad)
        grad = cast
    for _ in range(3):  # proj_out, scale-shift and LayerNorm backwards
        new = t.new(r.s * width * tokens)
        t.drop(grad)
        grad = new
    t.release(head_saved)
    return grad


@dataclass(frozen=True)
class _StepPeaks:
    """What a replayed training step needs on the device: ``forward[i]`` / ``backward[i]`` the peak while block i
    runs forward / backward (its recomputation included), ``outside`` the peak of everything else (batch, text
    connectors, embeddings, head and loss), ``saved[i]`` what block i's forward adds to what stays alive besides its
    output (without checkpointing: what it keeps for its backward less an input it frees; with it, what its
    recomputation keeps), bytes."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    saved: tuple[float, ...]
    outside: float


def _train_step(r: _Run, rc: _Run, tp: TextProjectionConfig, casts: tuple[int, ...], outside_cast: int, *,
                audio: bool, checkpointing: bool) -> _StepPeaks:
    """One LoRA training step as ``training.trainer`` runs it with :class:`~cinetune.ltx2.train.LTX2TrainingAdapter`
    (micro-batch of one sample): batch and noise, the text connectors (``rc``: their dtype), positions, x_σ, the DiT
    forward with autograd (blocks checkpointed or not), the head, the loss, the backward."""
    c = r.config
    D, Da, Nv, Na, L, s = c.inner_dim, c.audio_inner_dim, r.Nv, r.Na, r.L, r.s
    na = Na if audio else 0
    tokens = FP32 * (c.in_channels * Nv + c.audio_in_channels * na)  # float32 video + audio tokens
    t = _GradTape()
    # load_batch stacks the cached latents, loss() patchifies them and draws the noise: CPU memory (on CUDA only
    # their device copies, at the model call); _left_pad gives the float32 features
    data = [t.new(tokens) for _ in range(3)] if r.device_type == "cpu" else []
    conditioned = t.new(Nv) if r.i2v else None
    features = t.new(FP32 * tp.dim * L)
    contexts = _g_connect(t, rc, tp)
    positions = t.new(FP32 * 2 * (3 * Nv + na))
    if r.device_type != "cpu":
        data = [t.new(tokens), t.new(tokens)]
    # ltx2_flow_matching_loss: per-token σ (conditioning), x_σ per modality, the model inputs in the compute dtype
    sigma = t.new(FP32 * Nv) if r.i2v else None
    noisy = []
    for n in (FP32 * c.in_channels * Nv, FP32 * c.audio_in_channels * na):
        if n:
            a, b = t.new(n), t.new(n)
            noisy.append(t.new(n))
            t.drop(a, b)
    cast_inputs = []
    if s != FP32:
        cast_inputs = [t.new(s * c.in_channels * Nv), t.new(s * tp.dim * L)]
        if audio:
            cast_inputs += [t.new(s * c.audio_in_channels * Na), t.new(s * tp.dim * L)]
    # LTX2DiT.forward up to the blocks (nothing there needs a gradient)
    index = t.new(8 * Nv) if r.i2v else None  # TokenTimesteps.index
    vx = _T(_linear(t, r, Nv, c.in_channels, D, outside_cast))
    ax = actx = arope = cross = None
    if audio:
        ax = _T(_linear(t, r, Na, c.audio_in_channels, Da, outside_cast))
        actx = _T(_caption_projection(t, r, Da, outside_cast))
        arope = _T(_rope_tables(t, r, Na, Da, 1))
        cross = _T(_rope_tables(t, r, Nv, c.audio_cross_attention_dim, 1)
                   + _rope_tables(t, r, Na, c.audio_cross_attention_dim, 1))
    inputs = _Inputs(_T(_caption_projection(t, r, D, outside_cast)), actx, _T(_rope_tables(t, r, Nv, D, 3)), arope,
                     cross)
    outside = t.mark()

    forward, saved, held, buckets = [], [], [], []
    t.recording = not checkpointing
    for i, cast in enumerate(casts):
        before = t.live
        new_v, new_a, b = _g_block(t, r, vx, ax, inputs, first=i == 0, cast=cast)
        buckets.append(b)
        if checkpointing:
            held.append((vx, ax))  # the checkpoint keeps its inputs until the block's backward
        else:
            t.drop(vx, ax)
        saved.append(t.live - before - new_v.nbytes - (new_a.nbytes if new_a is not None else 0))
        vx, ax = new_v, new_a
        forward.append(t.mark())
    t.recording = True
    head_saved, loss_saved = [[], []], [[], []]
    preds = [_g_head(t, r, head_saved[0], vx, Nv, D, c.out_channels, outside_cast, r.i2v)]
    if audio:
        preds.append(_g_head(t, r, head_saved[1], ax, Na, Da, c.audio_out_channels, outside_cast, False))
    t.drop(vx, ax, index, *cast_inputs)
    if not checkpointing:  # the forward returns; what its block inputs are kept for stays
        t.drop(*inputs.all())
    values = [_g_loss(t, r, loss_saved[0], preds[0], c.out_channels, Nv, r.i2v)]
    if audio:
        values.append(_g_loss(t, r, loss_saved[1], preds[1], c.audio_out_channels, Na, False))
    t.drop(*preds)
    # adapter.loss returns: its batch, tokens, noise, features, contexts and positions go
    t.drop(*data, conditioned, features, *contexts, positions, sigma, *noisy)
    outside = max(outside, t.mark())

    grads = [_g_loss_backward(t, r, loss_saved[0], head_saved[0], Nv, D, c.out_channels, r.i2v)]
    if audio:
        grads.append(_g_loss_backward(t, r, loss_saved[1], head_saved[1], Na, Da, c.audio_out_channels, False))
    outside = max(outside, t.mark())
    backward = []
    for i in reversed(range(len(casts))):
        if checkpointing:
            v_in, a_in = held[i]
            before = t.live
            new_v, new_a, b = _g_block(t, r, v_in, a_in, inputs, first=i == 0, cast=casts[i])
            t.drop(new_v, new_a)
            saved[i] = t.live - before
        else:
            b = buckets[i]
        _g_block_backward(t, r, b)
        if i:  # the gradients of the block's inputs replace those of its outputs
            new = [t.new(g.nbytes) for g in grads]
            t.drop(*grads)
            grads = new
        else:
            t.drop(*grads)
        if checkpointing:
            t.drop(*held[i])
        backward.append(t.mark())
    if checkpointing:
        t.drop(*inputs.all())
    t.drop(*values)
    return _StepPeaks(tuple(forward), tuple(reversed(backward)), tuple(saved), outside)


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
        lora_rank, optimizer, gradient_checkpointing, with_audio, first_frame_conditioning: the training settings
            (``training`` True; gradient checkpointing as it runs: on whenever blocks are swapped).
        text_projection_bytes: the text connectors' weights, part of ``resident_weights`` in training.
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
    lora_rank: int = 0
    optimizer: str = ""
    gradient_checkpointing: bool = False
    with_audio: bool = True
    first_frame_conditioning: bool = False
    text_projection_bytes: int = 0


@dataclass(frozen=True)
class _Training:
    """Settings of a training estimate; ``projection`` / ``projection_bytes`` / ``projection_size``: the text
    connectors' config, weight bytes and bytes per element."""

    rank: int
    optimizer: str
    checkpointing: bool
    audio: bool
    conditioning: bool
    projection: TextProjectionConfig
    projection_bytes: int
    projection_size: int


def _training(config: LTX2TransformerConfig, compute_dtype: torch.dtype, *, lora_rank, optimizer,
              gradient_checkpointing, with_audio, first_frame_conditioning, text_projection) -> _Training:
    _check_int("lora_rank", lora_rank, 1)
    if text_projection is None:
        try:
            text_projection = text_projection_config(config)
        except CheckpointError as e:
            raise ValueError(f"the text connectors cannot be derived from this DiT config ({e}); pass "
                             "text_projection (the loaded LTX2TextProjection or its config)") from e
    if isinstance(text_projection, LTX2TextProjection):
        tp = text_projection.config
        nbytes = sum(t.numel() * t.element_size() for t in [*text_projection.parameters(),
                                                           *text_projection.buffers()])
        size = text_projection.video_embeddings_connector.dtype.itemsize
    elif isinstance(text_projection, TextProjectionConfig):
        tp, nbytes, size = text_projection, _projection_bytes(text_projection, compute_dtype), compute_dtype.itemsize
    else:
        raise TypeError(f"text_projection must be an LTX2TextProjection, a TextProjectionConfig or None, got "
                        f"{type(text_projection).__name__}")
    return _Training(lora_rank, str(optimizer), bool(gradient_checkpointing), bool(with_audio),
                     bool(first_frame_conditioning), tp, nbytes, size)


@functools.lru_cache(maxsize=8)
def _projection_bytes(config: TextProjectionConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        module = LTX2TextProjection(config).to(dtype)
    return sum(t.numel() * t.element_size() for t in module.parameters())


def estimate_ltx2_memory(model: LTX2DiT, *, width: int, height: int, frames: int, fps: float, blocks_to_swap: int,
                         device_type: str, compute_dtype: str | torch.dtype, cfg_passes: int = 4,
                         ring_size: int = 2, text_tokens: int = TEXT_TOKENS, overhead_bytes: int = 0,
                         cpu_threads: int | None = None, training: bool = False, lora_rank: int = 32,
                         optimizer: str = "adamw", gradient_checkpointing: bool = True, with_audio: bool = True,
                         first_frame_conditioning: bool = True,
                         text_projection: LTX2TextProjection | TextProjectionConfig | None = None
                         ) -> LTX2MemoryEstimate:
    """Peak device memory (bytes) of one denoising step of ``model``, or of one LoRA training step (module docstring:
    what is counted and how).

    The weights are those the model holds (:func:`describe_ltx2`: stored dtypes, fp8 layers), resident except the
    last ``blocks_to_swap`` blocks, which the block-swap ring of ``ring_size`` slots streams from CPU memory
    (``host_bytes``); the activations are the replayed step, with weight casts per block from its Linear dtypes.

    Args:
        model: the DiT without LoRA layers, loaded or on the meta device.
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
        training: estimate one LoRA training step instead (module docstring, "Training"); the arguments below
            apply then, ``cfg_passes`` does not.
        lora_rank: LoRA rank (≥ 1) on the attention projections (``ltx2.train.ltx2_lora_targets``); the adapters
            are float32 (``TrainConfig.lora_dtype``).
        optimizer: "adamw" (8 bytes per LoRA parameter), "adamw8bit" (2), "sgd" (0).
        gradient_checkpointing: per-block checkpointing (the trainer turns it on whenever blocks are swapped; so
            does the estimate).
        with_audio: audio+video training (the trainer node's default); False trains the video stream alone.
        first_frame_conditioning: some steps condition on the first frame (``i2v`` "first" with a probability
            above 0): the largest step is one of those (per-token modulation tensors).
        text_projection: the text connectors the trainer keeps on the device (an
            :class:`~cinetune.ltx2.connectors.LTX2TextProjection` as loaded, or its config with weights in the
            compute dtype, as the trainer node loads them); None = built from the DiT config.

    Returns:
        :class:`LTX2MemoryEstimate`; ``total`` is the device peak, ``host_bytes`` the swapped weights in CPU memory.

    Raises:
        TypeError: ``model`` is not an LTX2DiT; ``text_projection`` of another type.
        ValueError: size not valid (the nearest valid values named), fps ≤ 0, ``blocks_to_swap`` out of range (the
            maximum named), ``cfg_passes`` outside 1–4, unknown dtype, device type or optimizer, ``lora_rank`` < 1
            in training, no ``text_projection`` for a DiT config the connectors cannot be derived from.
    """
    _check_model(model)
    dtype = _compute_dtype(compute_dtype)
    blocks = list(model.transformer_blocks)
    outside = [m for name, m in model.named_children() if name != "transformer_blocks"]
    train = _training(model.config, dtype, lora_rank=lora_rank, optimizer=optimizer,
                      gradient_checkpointing=gradient_checkpointing, with_audio=with_audio,
                      first_frame_conditioning=first_frame_conditioning,
                      text_projection=text_projection) if training else None
    return _estimate(model.config, describe_ltx2(model), tuple(_weight_cast([b], dtype) for b in blocks),
                     _weight_cast(outside, dtype), width=width, height=height, frames=frames, fps=fps,
                     blocks_to_swap=blocks_to_swap, device_type=device_type, compute_dtype=dtype,
                     cfg_passes=cfg_passes, ring_size=ring_size, text_tokens=text_tokens,
                     overhead_bytes=overhead_bytes, cpu_threads=cpu_threads, training=train)


def estimate_ltx2_memory_from_config(config: LTX2TransformerConfig, *, width: int, height: int, frames: int,
                                     fps: float = 24.0, weight_dtype: str = "bf16", blocks_to_swap: int = 0,
                                     device_type: str = "cuda", compute_dtype: str | torch.dtype = "bf16",
                                     cfg_passes: int = 4, ring_size: int = 2, text_tokens: int = TEXT_TOKENS,
                                     overhead_bytes: int = 0, cpu_threads: int | None = None,
                                     training: bool = False, lora_rank: int = 32, optimizer: str = "adamw",
                                     gradient_checkpointing: bool = True, with_audio: bool = True,
                                     first_frame_conditioning: bool = True,
                                     text_projection: LTX2TextProjection | TextProjectionConfig | None = None
                                     ) -> LTX2MemoryEstimate:
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
    train = _training(config, dtype, lora_rank=lora_rank, optimizer=optimizer,
                      gradient_checkpointing=gradient_checkpointing, with_audio=with_audio,
                      first_frame_conditioning=first_frame_conditioning,
                      text_projection=text_projection) if training else None
    return _estimate(config, _meta_description(config, weight_dtype),
                     tuple(_weight_cast([b], dtype) for b in model.transformer_blocks), _weight_cast(outside, dtype),
                     width=width, height=height, frames=frames, fps=fps, blocks_to_swap=blocks_to_swap,
                     device_type=device_type, compute_dtype=dtype, cfg_passes=cfg_passes, ring_size=ring_size,
                     text_tokens=text_tokens, overhead_bytes=overhead_bytes, cpu_threads=cpu_threads, training=train)


def _estimate(config: LTX2TransformerConfig, desc: ModelDescription, casts: tuple[int, ...], outside_cast: int, *,
              width, height, frames, fps, blocks_to_swap, device_type, compute_dtype: torch.dtype, cfg_passes,
              ring_size, text_tokens, overhead_bytes, cpu_threads, training: _Training | None) -> LTX2MemoryEstimate:
    if isinstance(cfg_passes, bool) or not isinstance(cfg_passes, int) or not 1 <= cfg_passes <= len(PASSES):
        raise ValueError(f"cfg_passes must be an int from 1 to {len(PASSES)} (forward passes per step: "
                         f"{', '.join(PASSES)}), got {cfg_passes!r}")
    Nv, Na = ltx2_tokens(width, height, frames, fps)
    r = _make_run(config, Nv, Na, text_tokens, compute_dtype, device_type, cpu_threads)
    n = len(desc.blocks)
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or not 0 <= blocks_to_swap <= n:
        raise ValueError(f"blocks_to_swap={blocks_to_swap!r} is out of range: 0 up to the maximum {n} (the block "
                         "count)")
    if training is None:
        acts = _sampling_activations(r, casts, outside_cast, cfg_passes)
        options = [estimate_peak_memory(desc, acts, tokens=Nv, blocks_to_swap=k, ring_size=ring_size,
                                        overhead_bytes=overhead_bytes) for k in range(n + 1)]
        extra = {}
    else:
        options = _training_options(r, desc, casts, outside_cast, training, ring_size, overhead_bytes,
                                    LTX2_LATENT_FORMAT.latent_shape(width, height, frames)[1])
        extra = dict(lora_rank=training.rank, optimizer=training.optimizer,
                     gradient_checkpointing=training.checkpointing or blocks_to_swap > 0,
                     with_audio=training.audio, first_frame_conditioning=training.conditioning,
                     text_projection_bytes=training.projection_bytes)
    est = options[blocks_to_swap]
    return LTX2MemoryEstimate(
        **{f.name: getattr(est, f.name) for f in dataclasses.fields(MemoryEstimate)},
        totals_by_swap=tuple(o.total for o in options), host_by_swap=tuple(o.host_bytes for o in options),
        blocks_to_swap=blocks_to_swap, device_type=device_type, width=width, height=height, frames=frames,
        fps=float(fps), video_tokens=Nv, audio_tokens=Na, passes=cfg_passes if training is None else 1,
        compute_dtype=_NAMES[compute_dtype], **extra)


def _sampling_activations(r: _Run, casts: tuple[int, ...], outside_cast: int, cfg_passes: int
                          ) -> list[BlockActivations]:
    """Per block: the block input and the largest replayed total of a sampling step while it runs, less the input."""
    passes, outside_peak = _step(r, cfg_passes, outside_cast)
    block_peaks: dict[tuple[int, bool], float] = {}
    hidden = r.s * r.config.inner_dim
    acts = []
    for cast in casts:
        peak = outside_peak
        for level, cross_modal in passes:
            if (cast, cross_modal) not in block_peaks:
                t = _Tape()
                _block(t, r, cross_modal=cross_modal, cast=cast)
                block_peaks[cast, cross_modal] = t.peak
            peak = max(peak, level + block_peaks[cast, cross_modal])
        acts.append(BlockActivations(hidden=hidden, forward=max(peak / r.Nv - hidden, 0.0), saved=0.0, backward=0.0))
    return acts


def _training_options(r: _Run, desc: ModelDescription, casts: tuple[int, ...], outside_cast: int, train: _Training,
                      ring_size: int, overhead_bytes: int, latent_frames: int) -> list[MemoryEstimate]:
    """The training estimate for every ``blocks_to_swap``: the replayed step (checkpointed whenever blocks are
    swapped, as the trainer does), folded into per-block numbers; the text connectors count as non-block weights.
    Clips of one latent frame are never conditioned."""
    r = dataclasses.replace(r, rank=train.rank, i2v=train.conditioning and latent_frames > 1)
    connectors = dataclasses.replace(r, s=train.projection_size, rank=0, i2v=False)
    desc = dataclasses.replace(desc, other_bytes=desc.other_bytes + train.projection_bytes)
    targets = ltx2_lora_targets(with_audio=train.audio)
    acts: dict[bool, list[BlockActivations]] = {}
    options = []
    for k in range(len(desc.blocks) + 1):
        checkpointing = train.checkpointing or k > 0
        if checkpointing not in acts:
            peaks = _train_step(r, connectors, train.projection, casts, outside_cast, audio=train.audio,
                                checkpointing=checkpointing)
            acts[checkpointing] = _fold(peaks, r, train.audio, checkpointing)
        options.append(estimate_peak_memory(
            desc, acts[checkpointing], tokens=r.Nv, blocks_to_swap=k, ring_size=ring_size, training=True,
            gradient_checkpointing=checkpointing, lora_rank=train.rank, lora_targets=targets, lora_dtype="fp32",
            optimizer=train.optimizer, overhead_bytes=overhead_bytes))
    return options


def _fold(peaks: _StepPeaks, r: _Run, audio: bool, checkpointing: bool) -> list[BlockActivations]:
    """Per-block :class:`~cinetune.core.memory.BlockActivations` (bytes per video token) whose training estimate in
    :func:`~cinetune.core.memory.estimate_peak_memory` is the replayed peak: ``hidden`` the block inputs, ``saved``
    what the block keeps, ``forward`` / ``backward`` the rest of the replayed peaks of its forward and backward
    beyond what the core formula already counts (the peak outside the blocks joins the last block's forward)."""
    c, Nv = r.config, r.Nv
    hidden = r.s * (c.inner_dim * Nv + (c.audio_inner_dim * r.Na if audio else 0)) / Nv
    acts = []
    level = 0.0  # bytes per video token the core formula holds before the block
    last = len(peaks.forward) - 1
    for i, (forward, backward, saved) in enumerate(zip(peaks.forward, peaks.backward, peaks.saved)):
        forward = (max(forward, peaks.outside) if i == last else forward) / Nv
        backward /= Nv
        saved /= Nv
        if checkpointing:
            level += hidden
            fwd, bwd = forward - level, backward - level - 2 * hidden - saved
        else:
            fwd = forward - level - hidden
            level += hidden + saved
            bwd = backward - level - 2 * hidden
        acts.append(BlockActivations(hidden=hidden, forward=max(fwd, 0.0), saved=max(saved, 0.0),
                                     backward=max(bwd, 0.0)))
    return acts


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


_OPTIMIZER_NAMES = {"adamw": "AdamW", "adam": "Adam", "adamw8bit": "8-bit AdamW", "adamw_8bit": "8-bit AdamW",
                    "sgd": "SGD"}


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
    if estimate.training:
        trained = estimate.lora + estimate.gradients + estimate.optimizer_state
        parts.append(f"LoRA + gradients + optimizer {_gb(trained)}")
    elif estimate.lora:
        parts.append(f"LoRA {_gb(estimate.lora)}")
    if estimate.overhead:
        parts.append(f"other {_gb(estimate.overhead)}")
    lines = [f"Estimated peak {'memory (CPU)' if cpu else 'GPU memory'}: {_gb(estimate.total)} ({', '.join(parts)})"]
    need = estimate.total + (estimate.host_bytes if cpu else 0)
    if estimate.host_bytes:
        line = f"Block swap keeps {_gb(estimate.host_bytes)} of weights in CPU memory"
        lines.append(line + (f" (the same memory here: {_gb(need)} in all)." if cpu else "."))
    if ext is not None:
        if ext.training:
            what = (f"LoRA training (rank {ext.lora_rank}, {_OPTIMIZER_NAMES.get(ext.optimizer, ext.optimizer)}), "
                    f"{'audio and video' if ext.with_audio else 'video only'}"
                    f"{', first-frame conditioning' if ext.first_frame_conditioning else ''}, gradient checkpointing "
                    f"{'on' if ext.gradient_checkpointing else 'off'}")
            tokens = f"{ext.video_tokens:,} video + {ext.audio_tokens:,} audio tokens" if ext.with_audio \
                else f"{ext.video_tokens:,} video tokens"
        else:
            what = f"{ext.passes} forward pass{'es' if ext.passes > 1 else ''} per step"
            tokens = f"{ext.video_tokens:,} video + {ext.audio_tokens:,} audio tokens"
        swap = f", {ext.blocks_to_swap} blocks swapped" if ext.blocks_to_swap else ""
        lines.append(f"Settings: {model}, {ext.width}×{ext.height}, {ext.frames} frames at {ext.fps:g} fps "
                     f"({tokens}), {what}, {ext.compute_dtype} compute{swap}.")
        if ext.training and ext.text_projection_bytes:
            lines.append(f"The weights include the text connectors ({_gb(ext.text_projection_bytes)}), which the "
                         "trainer keeps on the device.")
    else:
        lines.append(f"Model: {model}.")
    if available_bytes is not None:
        if need <= available_bytes:
            lines.append(f"Fits in the {_gb(available_bytes)} available.")
        else:
            short = f"Does not fit in the {_gb(available_bytes)} available (short by {_gb(need - available_bytes)})"
            fit = None if ext is None or cpu else smallest_fitting_swap(ext, available_bytes)
            if fit is not None:
                where = "on the model loader or the trainer" if ext.training else "on the model loader"
                lines.append(f"{short}: set blocks_to_swap to {fit} or more {where} (estimated peak "
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
