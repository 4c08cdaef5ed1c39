"""Kandinsky 5 peak-memory estimate: what one sampler step or one LoRA training step of a K5 DiT needs on the device.

API:

- :func:`estimate_k5_memory` — the estimate (:class:`~cinetune.core.memory.MemoryEstimate`, bytes) for a
  :class:`~cinetune.k5.config.K5Config`, a video size and the run settings. It describes the weights from a
  meta-device model (nothing is allocated: Pro 19B takes milliseconds) and calls
  :func:`cinetune.core.memory.estimate_peak_memory` with the K5 block numbers below.
- :func:`k5_block_activations` — activation bytes per token of every K5 text and visual block
  (:class:`~cinetune.core.memory.BlockActivations`), from formulas derived from ``k5/blocks.py``'s forward
  (:mod:`cinetune.k5.memory_blocks`, where the block formulas and the attention workspace per device are).
- :func:`format_k5_estimate` — the short text users see (:mod:`cinetune.k5.memory_report`). :func:`k5_tokens`,
  :func:`describe_k5` — helpers.

Units: bytes everywhere (GB = 10⁹ bytes in texts). The estimate predicts the allocator peak
(``torch.cuda.max_memory_allocated``), not ``nvidia-smi``: the CUDA context (0.3–0.6 GB), cuBLAS/cuDNN workspaces
and the caching allocator's fragmentation come on top (``overhead_bytes``). It covers the DiT step only: the text
encoders and the VAE run at other times.

Notation: as in :mod:`cinetune.k5.memory_blocks` (D = model_dim, s = bytes of the compute dtype, u = 4 when it is not
float32, r = LoRA rank, S = visual and L = text tokens per sample, B = batch, m = B·tokens).

**Tokens** (``k5.pipeline.latent_shape``, patch (1, 2, 2)): S = T·(H/16)·(W/16) with T = (frames − 1)/4 + 1, e.g.
768×512×121 frames → 31·32·48 = 47,616.

**Outside the blocks** (``_extras``, folded into the block numbers so ``activations`` is the whole activation peak):
the sampler's or trainer's latents, the RoPE table (complex64, 4·hd per token), text states, the MSE loss storage.

Assumptions: one device, blocks run in order, no activation offload, the allocator reuses freed memory exactly;
the optimizer step is not a peak (activations are freed; only LoRA-sized temporaries); every LoRA gradient is counted
at the peak (conservative: only those of the blocks already back-propagated exist); the modulation parameters
(9D float32 per sample and block) and other per-call vectors are ignored (< 1 MB).

Validation (tests/unit/test_k5_memory.py): the estimate against the CPU allocator's peak of the real sampler step
and of a training step written as the trainer runs it — tiny and medium DiTs, fp32 and bf16, two token counts, with
and without block swap, CFG, NABLA, fp8 — agrees within 5 % (asserted: 15 %). GPU kernels are not measured.

Sources: ``k5/dit.py``, ``k5/blocks.py``, ``core/lora.py`` (``LoRALinear.forward``), ``core/quant.py``
(``CastLinear``, ``FP8Linear``), ``core/attention.py`` (masked dense NABLA), ``k5/pipeline.py`` (``sample``),
``k5/train.py`` (``flow_matching_loss``) and ``training/trainer.py`` (``gradient_checkpointing``); torch 2.14.1 CPU kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..core.memory import MemoryEstimate, ModelDescription, describe_module, estimate_peak_memory
from .config import K5Config
from .dit import k5_fp8_keep_high_precision
from .family import K5_LORA_TARGETS
from .memory_blocks import (DEVICE_TYPES, FP32, _check_device, _check_int, _compute_bytes, default_nabla_path,
                            k5_block_activations, nabla_keeps_every_block)
from .memory_report import format_k5_estimate
from .nabla import NablaConfig

__all__ = ["DEVICE_TYPES", "WEIGHT_DTYPES", "default_nabla_path", "describe_k5", "estimate_k5_memory",
           "format_k5_estimate", "k5_block_activations", "k5_tokens", "nabla_keeps_every_block",
           "smallest_fitting_swap"]

#: Values of ``weight_dtype``: stored dtypes, a recast as ``load_k5_dit`` does, or weight-only fp8.
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn")
_WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3fn": 1}
_CORE_WEIGHT_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp8_e4m3fn": "fp8"}


# ---------------------------------------------------------------------------------------------------------------
# Weights


def _k5_blocks(model) -> list:
    return [*model.text_transformer_blocks, *model.visual_transformer_blocks]


@functools.lru_cache(maxsize=16)
def describe_k5(config: K5Config, stored_modulation_dtype: str = "fp32") -> ModelDescription:
    """:class:`~cinetune.core.memory.ModelDescription` of a K5 DiT file as published, built on the meta device.

    Stored dtypes (k5.md §2 marks them UNVERIFIED; decision): every tensor bf16 except the modulation layers
    (``*modulation*``), in ``stored_modulation_dtype`` — "fp32" after the one reading of the Lite file on record
    (≈ 4.6 GB instead of 4.0); pass "bf16" for a uniform file, or give :func:`estimate_k5_memory` the loaded model.

    Raises:
        ValueError: unknown ``stored_modulation_dtype``.
    """
    from .dit import Kandinsky5DiT

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if stored_modulation_dtype not in dtypes:
        raise ValueError(f"stored_modulation_dtype must be one of {', '.join(dtypes)}, "
                         f"got {stored_modulation_dtype!r}")
    with torch.device("meta"):
        model = Kandinsky5DiT(config).to(torch.bfloat16)
        for name, module in model.named_modules():
            if name.endswith("modulation"):
                module.to(dtypes[stored_modulation_dtype])
    return describe_module(model, _k5_blocks(model))


def _describe_loaded(model) -> ModelDescription:
    """Describe a loaded K5 DiT (its stored dtypes, fp8 layers included) for the estimate.

    Raises:
        TypeError: not a K5 DiT (no ``text_transformer_blocks``/``visual_transformer_blocks``).
        ValueError: LoRA layers are injected (their base layers would not match the LoRA targets).
    """
    from ..core.lora import LoRALinear

    if not (hasattr(model, "text_transformer_blocks") and hasattr(model, "visual_transformer_blocks")):
        raise TypeError(f"model must be a Kandinsky 5 DiT (text_transformer_blocks, visual_transformer_blocks), "
                        f"got {type(model).__name__}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model holds LoRA layers: describe it before injecting LoRA (or after remove_lora); "
                         "the estimate adds the LoRA of lora_rank itself")
    return describe_module(model, _k5_blocks(model))


def _weight_sizes(desc: ModelDescription, modulation: bool) -> set[int]:
    """Stored bytes per element of the block Linear weights (modulation layers or the others)."""
    return {round(lin.weight_bytes / (lin.in_features * lin.out_features))
            for b in desc.blocks for lin in b.linears if ("modulation" in lin.name) == modulation}


def _weight_casts(desc: ModelDescription, weight_dtype: str, s: int) -> tuple[int, bool]:
    """(copies a block projection makes of its weight per call, whether the modulation weights are cast)."""
    if weight_dtype in _WEIGHT_BYTES:
        size = _WEIGHT_BYTES[weight_dtype]
        projections = {size}
        modulation = {size} if weight_dtype != "fp8_e4m3fn" else _weight_sizes(desc, True)
    else:
        projections, modulation = _weight_sizes(desc, False), _weight_sizes(desc, True)
    cast = 2 if 1 in projections else (0 if projections <= {s} else 1)
    return cast, bool(modulation - {FP32})


# ---------------------------------------------------------------------------------------------------------------
# The estimate


def k5_tokens(width: int, height: int, frames: int, *, nabla: bool = False,
              patch_size: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Visual tokens of one sample: T·(H/8/ph)·(W/8/pw), T = (frames − 1)/4 + 1 latent frames (HunyuanVideo VAE ×8
    spatial, ×4 temporal); patch (1, 2, 2) ⇒ T·(H/16)·(W/16), e.g. 768×512×121 → 47,616.

    Raises:
        SizeError (a ValueError): the size is not valid for K5 (``k5.pipeline.validate_video_size``: pixel sizes
            multiples of 16, or 128 with NABLA; frames 4k+1); the message gives the nearest valid values.
    """
    from .pipeline import latent_shape, validate_video_size

    validate_video_size(width, height, frames, nabla=nabla)
    _, t, h, w = latent_shape(width, height, frames)
    pt, ph, pw = patch_size
    return (t // pt) * (h // ph) * (w // pw)


def _extras(config: K5Config, s: int, *, S: int, L: int, batch: int, training: bool, cfg: bool, nabla: bool,
            device_type: str, lora_rank: int) -> tuple[float, float]:
    """Bytes outside the blocks alive while the visual blocks run: (during their forwards, during a block backward).

    Per voxel (a token is pt·ph·pw = 4 voxels), C = 16 latent channels, C_in = 33 input channels:

    - inference (``k5.pipeline.sample``, one step): the float32 latent x (4C), its cast ``noisy`` (s·C, none in
      fp32), conditioning + mask (s·(C + 1)) and the concatenated model input (s·C_in) for video checkpoints; with
      CFG the conditional velocity (4C, float32) kept during the unconditional forward. The prompt embeddings on
      the device: s·L·in_text_dim (twice with CFG).
    - training forward (``flow_matching_loss`` as the trainer feeds it): x0, noise, x_σ and target (4C each),
      conditioning + mask (4(C + 1)), the model input (4·C_in) and its cast (s·C_in, none in fp32); on CPU also the
      stacked cached latent (4C; on CUDA it stays in host memory); the padded text s·L·in_text_dim.
    - training backward: the MSE loss's storage (4C: torch 2.14's 0-d ``mse_loss`` result keeps the storage of its
      unreduced difference while the trainer holds ``loss``), the text states' gradient (s·L·D).
    - inside the DiT, always: RoPE rotations (complex64, 4·hd per token), text states (s·L·D), NABLA's permutations
      (2·8 per token); the cross-attention keys/values of the text per visual block call: L·(2·s·D + u·D + R) in
      inference, L·(4D + 4H + 4·s·D + 2·s·r) in training (saved + gradients).
    """
    C, Cin, vox = config.out_visual_dim, config.visual_embed_dim, config.patch_volume
    D, H, hd, Q = config.model_dim, config.num_heads, config.head_dim, config.in_text_dim
    u = FP32 if s != FP32 else 0
    video = config.visual_cond
    inner = batch * L * s * D + 4 * hd * S * batch + (16 * S * batch if nabla else 0)
    if not training:
        per_voxel = (C * FP32 + (C * s if u else 0) + ((C + 1) * s + Cin * s if video else 0)
                     + (C * FP32 if cfg else 0))
        kv = L * (2 * s * D + u * D + (8 * D if device_type == "cpu" else 4 * D))
        fwd = batch * (S * vox * per_voxel + L * Q * s * (2 if cfg else 1) + kv) + inner
        return fwd, fwd
    per_voxel = 4 * C * FP32 + ((C + 1) * FP32 + Cin * FP32 if video else 0) + (Cin * s if u else 0)
    if device_type == "cpu":
        per_voxel += C * FP32
    kv = L * (4 * D + 4 * H + 4 * s * D + 2 * s * lora_rank)
    fwd = batch * (S * vox * per_voxel + L * Q * s + kv) + inner
    bwd = batch * (S * vox * C * FP32 + L * s * D + kv) + inner
    return fwd, bwd


def estimate_k5_memory(config: K5Config, *, width: int, height: int, frames: int, text_tokens: int = 256,
                       batch: int = 1, cfg: bool = True, blocks_to_swap: int = 0, ring_size: int = 2,
                       weight_dtype: str = "bf16", compute_dtype: str | torch.dtype = "bf16",
                       training: bool = False, gradient_checkpointing: bool = True, lora_rank: int = 0,
                       lora_dtype: str | None = None, optimizer: str = "adamw", device_type: str = "cuda",
                       nabla: bool | NablaConfig | None = False, math_attention: bool = False, model=None,
                       stored_modulation_dtype: str = "fp32", overhead_bytes: int = 0,
                       cpu_threads: int | None = None, nabla_path: str | None = None) -> MemoryEstimate:
    """Peak device memory (bytes) of one sampler step (inference) or one LoRA training step of a K5 DiT.

    ``core.memory.estimate_peak_memory`` sums the weights (resident blocks + non-block tensors, the block-swap ring;
    swapped blocks in ``host_bytes``), LoRA, its gradients and optimizer state, and the activation peak over the
    blocks with the K5 numbers of :func:`k5_block_activations`; the tensors outside the blocks that are alive then
    (``_extras``: latents, RoPE table, text states, the trainer's noise/target/loss) are folded into the per-block
    numbers, so ``activations`` is the whole activation peak. Nothing is allocated (meta-device description).

    Tokens: S = T·(H/16)·(W/16) visual tokens per sample (:func:`k5_tokens`), L = ``text_tokens``.

    Inference is ``k5.pipeline.sample``: with CFG the conditional and the unconditional forward run one after the
    other with batch 1 each (not as a batch of 2), so CFG adds no second set of activations — only the conditional
    velocity (a float32 latent) held during the second forward and the negative prompt's embeddings.
    Training is ``training.trainer.train_lora``: LoRA on ``K5_LORA_TARGETS``, per-block checkpointing
    (``gradient_checkpointing``; required with block swap), ``flow_matching_loss``, AdamW-style optimizer state.

    Args:
        config: the DiT (``LITE_CONFIG``, ``PRO_CONFIG``, a detected or custom :class:`K5Config`).
        width, height, frames: pixels (multiples of 16; 128 with NABLA) and frames (4k+1).
        text_tokens: Qwen tokens per prompt (≤ 256 after the official template crop; padded prompts count padding).
        batch: samples per forward (the sampler generates one video at a time).
        cfg: classifier-free guidance (inference only).
        blocks_to_swap, ring_size: :class:`~cinetune.core.offload.BlockSwap` over ``[*text, *visual]`` blocks, the
            last N swapped.
        weight_dtype: "default" — the stored dtypes (``model``'s, else the published layout of
            :func:`describe_k5`); "bf16", "fp16", "fp32" — every float tensor recast as ``load_k5_dit`` does;
            "fp8_e4m3fn" — block projection weights 1 byte + a float32 scale, the rest as stored
            (:func:`~cinetune.k5.dit.k5_fp8_keep_high_precision`).
        compute_dtype: activation dtype ("bf16" on CUDA; Cinetune's CPU paths compute in fp32).
        training, gradient_checkpointing: a training step; per-block checkpointing.
        lora_rank, lora_dtype: LoRA rank (0 = none; in inference an unmerged LoRA) and dtype (default "fp32" in
            training as ``TrainConfig.lora_dtype``, "bf16" in inference as saved LoRA files).
        optimizer: "adamw" (8 bytes/param), "adamw8bit" (2), "sgd"/"none" (0).
        device_type: "cuda" or "cpu". On "cpu" the block-swap masters live in the same memory: the process needs
            ``total + host_bytes``.
        nabla: NABLA attention in the visual blocks: a :class:`~cinetune.k5.nabla.NablaConfig`, True (the default
            config) or False/None (full attention). Its P and STA window only decide whether every mask keeps every
            block at this size (:func:`nabla_keeps_every_block`). math_attention: SDPA's math path (scores
            materialised).
        model: optional loaded DiT (any device, meta included) to describe instead of the assumed stored dtypes;
            pass it before LoRA injection.
        stored_modulation_dtype: dtype of the modulation layers in the file (see :func:`describe_k5`).
        overhead_bytes: CUDA context, workspaces, allocator reserve — added as is.
        cpu_threads: CPU attention threads (device_type "cpu"; default ``torch.get_num_threads()``).
        nabla_path: the block-sparse path NABLA runs on (``core.attention.block_sparse_path(device)`` in a running
            process); None: :func:`default_nabla_path` of ``device_type``.

    Returns:
        :class:`~cinetune.core.memory.MemoryEstimate`, bytes; ``total`` is the device peak, ``host_bytes`` the
        swapped block weights in CPU memory.

    Raises:
        SizeError (a ValueError): invalid video size; the message gives the nearest valid values.
        ValueError: a setting out of range (the message names the valid values), training without LoRA,
            ``blocks_to_swap`` above the block count, block swap in training without checkpointing.
        TypeError: config is not a K5Config.
    """
    if not isinstance(config, K5Config):
        raise TypeError(f"config must be a K5Config, got {type(config).__name__}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    _check_device(device_type)
    s = _compute_bytes(compute_dtype)
    _check_int("text_tokens", text_tokens, 1)
    _check_int("batch", batch, 1)
    _check_int("lora_rank", lora_rank, 0)
    if training and lora_rank == 0:
        raise ValueError("training needs lora_rank ≥ 1: Cinetune trains LoRA adapters, never the base weights")
    if nabla is not None and not isinstance(nabla, (bool, NablaConfig)):
        raise ValueError(f"nabla must be a NablaConfig, True/False or None, got {type(nabla).__name__}")
    nabla_cfg = NablaConfig() if nabla is True else (nabla or None)
    nabla = nabla_cfg is not None
    S = k5_tokens(width, height, frames, nabla=nabla, patch_size=config.patch_size)
    every_block_kept = nabla and nabla_keeps_every_block(nabla_cfg, width, height, frames, config.patch_size)
    L = text_tokens
    if lora_dtype is None:
        lora_dtype = "fp32" if training else "bf16"

    if model is not None:
        desc = _describe_loaded(model)
    else:
        desc = describe_k5(config, stored_modulation_dtype)
    cast, modulation_cast = _weight_casts(desc, weight_dtype, s)
    acts = k5_block_activations(config, compute_dtype=compute_dtype, training=training, nabla=nabla,
                                lora_rank=lora_rank, device_type=device_type, text_tokens=L, visual_tokens=S,
                                batch=batch, weight_cast=cast, modulation_cast=modulation_cast,
                                math_attention=math_attention, cpu_threads=cpu_threads, nabla_path=nabla_path,
                                nabla_every_block_kept=every_block_kept)
    fwd_extra, bwd_extra = _extras(config, s, S=S, L=L, batch=batch, training=training, cfg=cfg and not training,
                                   nabla=nabla, device_type=device_type, lora_rank=lora_rank)
    n_text = config.num_text_blocks
    tokens = [L] * n_text + [S] * config.num_visual_blocks
    folded = []
    for i, (a, t) in enumerate(zip(acts, tokens)):
        m = batch * t
        # the embedded visual tokens exist already while the text blocks run
        f_extra = fwd_extra + (batch * S * s * config.model_dim if i < n_text else 0)
        backward = a.backward + bwd_extra / m
        if training and not gradient_checkpointing and i == len(acts) - 1:
            # without checkpointing the end of the forward can peak: every block's saved tensors, the trainer's
            # tensors, the out layer's float32 LayerNorm input, the prediction (+ its float32 copy) and the loss
            u = 0 if s == FP32 else FP32
            vox_c = config.patch_volume * config.out_visual_dim
            end = fwd_extra + batch * S * (u * config.model_dim + 8 + vox_c * (s + u + FP32))
            backward = max(backward, end / m - a.hidden)
        folded.append(dataclasses.replace(a, forward=a.forward + f_extra / m, backward=backward))
    return estimate_peak_memory(
        desc, folded, tokens=tokens, batch=batch, blocks_to_swap=blocks_to_swap, ring_size=ring_size,
        weight_dtype=None if weight_dtype == "default" else _CORE_WEIGHT_DTYPE[weight_dtype],
        fp8_keep=k5_fp8_keep_high_precision, training=training, gradient_checkpointing=gradient_checkpointing,
        lora_rank=lora_rank, lora_targets=K5_LORA_TARGETS, lora_dtype=lora_dtype, optimizer=optimizer,
        overhead_bytes=overhead_bytes)


# ---------------------------------------------------------------------------------------------------------------
# The least block swap that fits


def smallest_fitting_swap(config: K5Config, available_bytes: int, *, blocks_to_swap: int = 0,
                          **settings) -> tuple[int, MemoryEstimate] | None:
    """The least ``blocks_to_swap`` (at least the given one) whose estimated peak fits ``available_bytes``.

    Scans N upwards with :func:`estimate_k5_memory` (formulas only, no allocation). The peak is not strictly
    monotone in N: swapping the first blocks adds ring slots as it removes resident blocks (ring of 2), so the scan
    does not stop early.

    Args:
        config: the DiT. available_bytes: free device memory (bytes, ≥ 0).
        blocks_to_swap: where the scan starts (the current setting).
        settings: every other keyword of :func:`estimate_k5_memory` (size, dtypes, training, model, ...).

    Returns:
        ``(N, estimate at N)``, or ``None`` when even every block swapped does not fit.

    Raises:
        As :func:`estimate_k5_memory` (evaluated at the starting N first).
    """
    if isinstance(available_bytes, bool) or not isinstance(available_bytes, int) or available_bytes < 0:
        raise ValueError(f"available_bytes must be an int ≥ 0, got {available_bytes!r}")
    n_blocks = config.num_text_blocks + config.num_visual_blocks
    for n in range(blocks_to_swap, n_blocks + 1):
        est = estimate_k5_memory(config, blocks_to_swap=n, **settings)
        if est.total <= available_bytes:
            return n, est
    return None
