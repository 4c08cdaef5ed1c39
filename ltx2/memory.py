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
  LoRA weights — 24.3 s·D; with first-frame conditioning the per-token ``1 + scale`` and gate tensors add 7 (31.3); with cast weights (fp8, or bf16 weights in float32) every
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
checkpointing; units of s·D·Nv = 50 MB): 48 block inputs (48.5), one block recomputed (31.3) and its backward with
the gradients and what the step still holds (10.8) → 90.6, 4.6 GB of activations; with 37.8 GB of DiT weights, 1.4 GB of text connectors (the
aggregate embedding stays off the device: captions are cached after it) and 3.4 GB of LoRA, gradients and AdamW
state: 47.2 GB. fp8 weights: 31.3 GB (the peak moves to block 42, the last fp8
block, whose recomputation keeps its dequantised weights). Without checkpointing: 121 GB (bf16). At 1536×1024×121:
60.5 GB. ltx-trainer sizes its standard LoRA configuration for 80 GB GPUs and its int8 configuration for 32 GB.

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
from .config import LTX2TransformerConfig, ltx2_fp8_keep_high_precision
from ..core.checkpoint import CheckpointError
from .connectors import LTX2TextProjection, TextProjectionConfig, text_projection_config
from .dit import LTX2DiT
from .family import LTX2_LATENT_FORMAT
from .train import ltx2_lora_targets
from .memory_replay import (PASSES, TEXT_TOKENS, WEIGHT_DTYPES, _DTYPES, _NAMES, _Run, _Tape, _block, _check_int,
                            _compute_dtype, _make_run, _step, ltx2_block_peak, ltx2_tokens)
from .memory_training import _StepPeaks, _train_step

__all__ = ["TEXT_TOKENS", "PASSES", "WEIGHT_DTYPES", "LTX2MemoryEstimate", "describe_ltx2", "estimate_ltx2_memory",
           "estimate_ltx2_memory_from_config", "format_ltx2_estimate", "ltx2_block_peak", "ltx2_tokens",
           "meta_ltx2_model", "smallest_fitting_swap"]




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
        text_projection_bytes: the text connectors' weights (the aggregate embedding is not needed: captions are
            cached after it), part of ``resident_weights`` in training.
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
        nbytes = sum(t.numel() * t.element_size()
                     for c in (text_projection.video_embeddings_connector, text_projection.audio_embeddings_connector)
                     for t in [*c.parameters(), *c.buffers()])
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
    connectors = (module.video_embeddings_connector, module.audio_embeddings_connector)
    return sum(t.numel() * t.element_size() for c in connectors for t in c.parameters())


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
