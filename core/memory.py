"""Peak device-memory estimate for running or training a block-stacked model, with a breakdown users can read.

The estimate predicts what the allocator hands out (``torch.cuda.max_memory_allocated``), not what ``nvidia-smi``
shows: the CUDA context (typically 0.3–0.6 GB), library workspaces and allocator caching/fragmentation come on top;
pass them as ``overhead_bytes`` when known. Bytes everywhere; :meth:`MemoryEstimate.format` shows GB (10⁹ bytes).

Inputs:

- :class:`ModelDescription` — bytes of every block and of the rest, and the block ``nn.Linear`` layers (for fp8 and
  LoRA); :func:`describe_module` derives it from an ``nn.Module``. Describe the base model, before LoRA injection.
- :class:`BlockActivations` — a block's activation bytes per token, either from :func:`transformer_block_activations`
  (formulas for a reference pre-norm block) or measured on the real block with :func:`measure_block_activations`.
- tokens per sample (e.g. latent voxels after patchify for video blocks, text tokens for text blocks; pass one
  count per block when they differ), batch, ``blocks_to_swap`` / ring size, weight dtype, inference or training
  (with or without per-block gradient checkpointing), LoRA rank/targets and optimizer.

Formulas (b = batch, t_i = tokens of block i, A_i = its :class:`BlockActivations`, all per-token terms × b·t_i):

- **resident weights** = non-block tensors + the blocks not swapped (their stored bytes, or recast, see
  ``weight_dtype``); **swap ring** = min(ring_size, N) × the largest swapped block (:mod:`.offload`); swapped
  blocks' masters are host memory (``host_bytes``).
- **LoRA** = Σ_targets r·(in + out) × bytes of the LoRA dtype; **gradients** (training) = the same count in the LoRA
  dtype; **optimizer** = AdamW 8 bytes/param (two fp32 moments), 8-bit AdamW 2 bytes/param (two 1-byte states;
  its per-block quantisation scales are ignored, < 1 %), SGD 0.
- **activations, inference**: the caller keeps one hidden state alive per block call, so
  ``max_i (hidden_i + forward_i)``.
- **activations, training with per-block checkpointing**: every block input is kept by the checkpoint until that
  block's backward; the backward of block i recomputes its forward, so it holds what block i saves, the block's
  output and its incoming gradient: ``max_i ( Σ_{j≤i} hidden_j + max(forward_i, 2·hidden_i + saved_i +
  backward_i) )`` — the maximum is at the last block.
- **activations, training without checkpointing**: every block's input and saved tensors stay until its
  backward, less what the block recomputes in its backward (``recomputed``, :mod:`.recompute`), which exists again
  while that backward runs: ``max_i max( Σ_{j<i}(hidden_j + saved_j − recomputed_j) + hidden_i + forward_i,
  Σ_{j≤i}(hidden_j + saved_j − recomputed_j) + 2·hidden_i + recomputed_i + backward_i )``.
- **attention workspace**: ``quadratic × b·t_i²`` at the block that peaks, doubled in a backward (saved
  probabilities and their gradient); 0 for flash-style kernels, whose per-token buffers (log-sum-exp) are in the
  linear terms.
- ``extra_activation_bytes``: activations outside the blocks (embeddings, text states, the latent, the loss) — the
  caller's number, added as is.

Real DiT blocks (modulated, with float32 norm/RoPE copies and cross-attention) save several times what the reference
block saves: measure them with :func:`measure_block_activations` or give them their own formulas in the family's
package, rather than use :func:`transformer_block_activations`; re-measure when the block code changes.

Assumptions: the blocks run one after the other on one device; no activation offload; weights frozen except LoRA;
the allocator reuses freed memory exactly (no fragmentation). CPU validation (tests/unit/test_memory.py): the estimate
is compared with allocator peaks measured by :func:`measure_cpu_peak` for a tiny and a medium block stack, inference
and training, within 15 %.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

GB = 1e9

_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1,
                "fp8_e4m3fn": 1, "float8_e4m3fn": 1}
_OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "adamw_8bit": 2, "sgd": 0, "none": 0}
FP8_SCALE_BYTES = 4  # one float32 scale per fp8 Linear weight (core.quant.FP8Linear)


def _dtype_bytes(dtype: str | torch.dtype, what: str) -> int:
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    key = str(dtype).lower()
    if key not in _DTYPE_BYTES:
        raise ValueError(f"{what} must be one of {', '.join(sorted(_DTYPE_BYTES))} or a torch.dtype, got {dtype!r}")
    return _DTYPE_BYTES[key]


# ---------------------------------------------------------------------------------------------------------------
# Model description


@dataclass(frozen=True)
class LinearInfo:
    """One ``nn.Linear``-like layer inside a block: qualified name in the model, features, stored weight bytes."""

    name: str
    in_features: int
    out_features: int
    weight_bytes: int


@dataclass(frozen=True)
class BlockInfo:
    """Stored size of one block.

    Attributes:
        tensor_bytes: bytes of all its parameters and buffers as stored.
        float_bytes, float_elements: the floating-point part of those (what a dtype cast changes).
        linears: its Linear layers (2-D ``weight`` with ``in_features``/``out_features``).
    """

    tensor_bytes: int
    float_bytes: int
    float_elements: int
    linears: tuple[LinearInfo, ...] = ()


@dataclass(frozen=True)
class ModelDescription:
    """What the estimate needs to know about a model's weights.

    Attributes:
        blocks: one :class:`BlockInfo` per block, in execution order (the order :class:`~.offload.BlockSwap` uses).
        other_bytes, other_float_bytes, other_float_elements: the tensors outside the blocks (embeddings, output
            layers), same meaning as in :class:`BlockInfo`.
    """

    blocks: tuple[BlockInfo, ...]
    other_bytes: int = 0
    other_float_bytes: int = 0
    other_float_elements: int = 0


def _tensor_stats(tensors: Iterable[torch.Tensor]) -> tuple[int, int, int]:
    total = fbytes = felems = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        total += n
        if t.is_floating_point():
            fbytes += n
            felems += t.numel()
    return total, fbytes, felems


def describe_module(model: nn.Module, blocks: Sequence[nn.Module]) -> ModelDescription:
    """Describe ``model``'s weights for :func:`estimate_peak_memory`.

    Args:
        model: the whole model (parameters and buffers of any dtype, any device, meta included).
        blocks: its blocks in execution order, e.g. ``[*dit.text_blocks, *dit.video_blocks]``; every other tensor
            of ``model`` counts as non-block.

    Returns:
        :class:`ModelDescription`. Tensors shared between places are counted once, in the first block holding them.

    Raises:
        ValueError: a block is not a submodule of ``model``.
    """
    names = {id(m): n for n, m in model.named_modules()}
    seen: set[int] = set()
    infos = []
    for k, block in enumerate(blocks):
        if id(block) not in names:
            raise ValueError(f"blocks[{k}] is not a submodule of the model; pass the model's own block modules")
        prefix = names[id(block)]
        tensors = []
        for t in [*block.parameters(), *block.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
        linears = tuple(
            LinearInfo(f"{prefix}.{n}" if n else prefix, int(m.in_features), int(m.out_features),
                       m.weight.numel() * m.weight.element_size())
            for n, m in block.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
            and hasattr(m, "in_features") and hasattr(m, "out_features"))
        infos.append(BlockInfo(*_tensor_stats(tensors), linears=linears))
    rest = []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            rest.append(t)
    return ModelDescription(tuple(infos), *_tensor_stats(rest))


# ---------------------------------------------------------------------------------------------------------------
# Activations per block


@dataclass(frozen=True)
class BlockActivations:
    """Activation bytes of one block per token of one sample (multiply by batch·tokens).

    Attributes:
        hidden: the block's input (= output) hidden state, D·bytes: what a checkpoint keeps per block.
        forward: the most bytes live at once during one forward of the block beyond its input (no grad, or under
            checkpointing, which saves nothing).
        saved: bytes autograd keeps from one block forward for its backward, beyond the input, where no other
            saved-tensor hooks are in force (the recompute of a checkpointed block).
        backward: the most bytes live during the block's backward beyond the saved tensors, its output and the
            incoming gradient (gradients of intermediate tensors).
        quadratic: bytes per token² per sample of an attention kernel that materialises scores (math attention:
            heads·bytes); 0 for flash-style kernels.
        recomputed: the part of ``saved`` that a plain forward with autograd does not keep but recomputes when
            the backward needs it (:func:`~cinetune.core.recompute.mlp`: an activation kept as its input); ≤ saved.
    """

    hidden: float
    forward: float
    saved: float
    backward: float
    quadratic: float = 0.0
    recomputed: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hidden", "forward", "saved", "backward", "quadratic", "recomputed"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"BlockActivations.{name} must be a finite number ≥ 0, got {v!r}")
        if self.recomputed > self.saved:
            raise ValueError(f"BlockActivations.recomputed ({self.recomputed!r}) is part of saved ({self.saved!r}) "
                             "and cannot exceed it")


def transformer_block_activations(hidden: int, ff_hidden: int, heads: int, *, compute_dtype: str | torch.dtype = "bf16",
                                  lora_rank: int = 0, attention: str = "flash") -> BlockActivations:
    """Formulas for the reference pre-norm transformer block (D = ``hidden``, F = ``ff_hidden``, H = ``heads``)::

        h = LayerNorm(x); qkv = Linear(D, 3D)(h); q, k, v = split heads (views of qkv)
        a = attention(q, k, v).transpose(1, 2).reshape(B, N, D)          # attention output + one copy
        x = x + Linear(D, D)(a); h = LayerNorm(x); x = x + Linear(F, D)(GELU(Linear(D, F)(h)))

    optionally with unmerged LoRA ``base(x) + up(down(x))`` on all four Linear layers (rank r), base weights frozen.
    Counting the tensors alive at each point (elements per token, s = compute bytes; checked against the CPU
    allocator with :func:`measure_cpu_peak`):

    - hidden = D·s.
    - forward: the peak is in the feed-forward: qkv 3D, the attention copy D, the residual D and the norm output D
      are still referenced, plus fc1's output F and GELU's output F → (6D + 2F)·s; with LoRA fc1 holds its base
      output, the LoRA output and their sum → (6D + 3F)·s.
    - saved: qkv 3D (q, k, v views), attention output D, LayerNorm input D, GELU input F → (5D + F)·s, plus float32
      per token: LayerNorm mean and rstd (2 × 2 × 4 bytes) and the attention log-sum-exp (4·H bytes). LoRA also saves
      the inputs of the Linear layers whose weights now need a gradient and the down outputs → (7D + 2F + 4r)·s.
    - backward: GELU backward holds the gradients of its output and input → 2F·s.
    - quadratic: 0 for ``attention="flash"``; ``"math"`` materialises scores and probabilities, H·s per token² in a
      forward (the estimate doubles it in a backward).

    Other blocks (modulated blocks with float32 norms, cross-attention, RoPE copies — real DiT blocks) hold more;
    measure them with :func:`measure_block_activations`.

    Args:
        hidden, ff_hidden, heads: widths (ints ≥ 1). compute_dtype: activation dtype ("bf16", "fp16", "fp32" or a
            torch.dtype). lora_rank: r ≥ 0 (0 = no LoRA). attention: "flash" or "math".

    Returns:
        :class:`BlockActivations`, bytes per token.

    Raises:
        ValueError: a width is not a positive int, unknown dtype or attention kind.
    """
    for name, v in (("hidden", hidden), ("ff_hidden", ff_hidden), ("heads", heads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int ≥ 1, got {v!r}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int ≥ 0, got {lora_rank!r}")
    if attention not in ("flash", "math"):
        raise ValueError(f"attention must be 'flash' or 'math', got {attention!r}")
    s = _dtype_bytes(compute_dtype, "compute_dtype")
    D, F, r = hidden, ff_hidden, lora_rank
    stats = 2 * 2 * 4 + 4 * heads
    if r:
        forward, saved = (6 * D + 3 * F) * s, (7 * D + 2 * F + 4 * r) * s + stats
    else:
        forward, saved = (6 * D + 2 * F) * s, (5 * D + F) * s + stats
    return BlockActivations(hidden=D * s, forward=forward, saved=saved, backward=2 * F * s,
                            quadratic=heads * s if attention == "math" else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Measuring on CPU


@dataclass(frozen=True)
class CpuPeak:
    """Result of :func:`measure_cpu_peak`: ``peak`` = most bytes allocated at once beyond the level at the start,
    ``end`` = bytes still allocated at the end beyond that level (may be negative); ``result`` = ``fn()``'s value."""

    peak: int
    end: int
    result: Any = field(default=None, repr=False)


def measure_cpu_peak(fn: Callable[[], Any]) -> CpuPeak:
    """Run ``fn()`` and return the peak of CPU tensor memory it allocated, from the allocator's own records.

    Method: ``torch.profiler`` with ``profile_memory=True`` makes the CPU allocator report every allocation and
    free (size, pointer, time) while profiling; the running sum of those sizes in time order is the live-byte
    count, its maximum the peak. Exact to the byte for tensor storages (kernels' internal scratch buffers included);
    memory allocated before the call and freed inside it is not reported (the result is then slightly high); memory
    that is not a torch allocation (Python objects, library caches) is not seen. ``tracemalloc`` does not see torch
    allocations and ``ru_maxrss`` includes the interpreter and allocator caching, which is why this method is used.
    It reads the profiler's event tree (``kineto_results.experimental_event_tree()``, an experimental API).

    Args:
        fn: a callable without arguments.

    Returns:
        :class:`CpuPeak` (bytes).

    Raises:
        RuntimeError: this torch build's profiler does not expose allocation events.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as e:
        raise RuntimeError("measure_cpu_peak needs torch.profiler allocation events (kineto_results."
                           "experimental_event_tree), which this torch build lacks") from e
    events = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        extra = node.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
            events.append((node.start_time_ns, extra.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    level = peak = 0
    for _, size in events:
        level += size
        peak = max(peak, level)
    return CpuPeak(peak, level, result)


def measure_block_activations(block: nn.Module, make_inputs: Callable[[int], tuple[tuple, dict]], *,
                              tokens: tuple[int, int] = (256, 512)) -> BlockActivations:
    """Measure a block's :class:`BlockActivations` on CPU at two token counts (slope of a line, so per-call
    constants such as modulation vectors drop out).

    For each token count ``t``: ``make_inputs(t)`` gives ``(args, kwargs)`` for one sample (batch 1) — the first
    positional argument must be the hidden state ``[1, t, D]``; make it require grad, or give the block trainable
    parameters, so that a backward exists. Then, each under :func:`measure_cpu_peak`: an inference forward under
    ``torch.no_grad`` (→ ``forward``; its output size → ``hidden``), a forward with autograd inside a pass-through
    saved-tensor hook pair, as a checkpointed block's recompute runs (bytes kept → ``saved``), the backward of that
    output with a random gradient (peak → ``backward``), and a plain forward with autograd (``saved`` less the bytes
    it keeps → ``recomputed``).

    The result is as exact as the CPU kernels: saved tensors are the same on every device; a CPU kernel's scratch
    buffers may differ from its CUDA counterpart's (e.g. CPU flash attention's per-thread blocks). Measure in the
    compute dtype you will run (bf16 blocks that upcast to float32 hold float32 copies that fp32 runs do not).
    Scale a width-reduced copy linearly in D if the real block is too large for the CPU.

    Args:
        block: the block (its weights on CPU; trainable parameters = LoRA).
        make_inputs: ``t -> (args, kwargs)``.
        tokens: two different token counts.

    Returns:
        :class:`BlockActivations` with ``quadratic = 0`` (use a flash-style kernel, or fit the quadratic yourself).

    Raises:
        ValueError: bad token counts; the block output is not a tensor.
    """
    t1, t2 = tokens
    if not (isinstance(t1, int) and isinstance(t2, int) and 0 < t1 < t2):
        raise ValueError(f"tokens must be two increasing positive ints, got {tokens!r}")
    rows = []
    for t in (t1, t2):
        args, kwargs = make_inputs(t)

        def infer():
            with torch.no_grad():
                return block(*args, **kwargs)

        fwd = measure_cpu_peak(infer)
        if not isinstance(fwd.result, torch.Tensor):
            raise ValueError(f"the block returned {type(fwd.result).__name__}; measure_block_activations needs a "
                             "tensor")
        out_bytes = fwd.result.numel() * fwd.result.element_size()

        def keeping_all():
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                return block(*args, **kwargs)

        with_grad = measure_cpu_peak(keeping_all)
        out = with_grad.result
        if not out.requires_grad:
            raise ValueError("the block output does not require grad: make the hidden state require grad or give the "
                             "block trainable parameters, so that its backward can be measured")
        grad = torch.randn_like(out)
        bwd = measure_cpu_peak(functools.partial(out.backward, grad))
        del out
        plain = measure_cpu_peak(lambda: block(*args, **kwargs))
        rows.append((out_bytes, fwd.peak, with_grad.end - out_bytes, bwd.peak, plain.end - out_bytes))
        del fwd, with_grad, plain, grad
    (h1, f1, s1, b1, p1), (h2, f2, s2, b2, p2) = rows
    dt = t2 - t1
    saved = max(0.0, (s2 - s1) / dt)
    return BlockActivations(hidden=max(0.0, (h2 - h1) / dt), forward=max(0.0, (f2 - f1) / dt), saved=saved,
                            backward=max(0.0, (b2 - b1) / dt),
                            recomputed=min(saved, max(0.0, saved - (p2 - p1) / dt)))


def _keep(t):
    return t


# ---------------------------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak device memory, in bytes, by component (see the module docstring for each formula).

    Attributes:
        resident_weights: blocks kept on the device + non-block tensors.
        swap_ring: block-swap ring slots.
        activations: hidden states, saved tensors and gradients of activations at the peak.
        attention_workspace: materialised attention scores at the peak (0 for flash-style kernels).
        lora: LoRA parameters. gradients: their gradients (training). optimizer_state: optimizer moments (training).
        overhead: the caller's ``overhead_bytes``.
        host_bytes: swapped blocks' weights in CPU memory (not part of :attr:`total`).
        peak_block: index of the block during which the peak occurs.
        training: whether this is a training estimate.
    """

    resident_weights: int
    swap_ring: int
    activations: int
    attention_workspace: int
    lora: int
    gradients: int
    optimizer_state: int
    overhead: int
    host_bytes: int
    peak_block: int
    training: bool

    @property
    def total(self) -> int:
        """Sum of the device components, bytes."""
        return (self.resident_weights + self.swap_ring + self.activations + self.attention_workspace + self.lora
                + self.gradients + self.optimizer_state + self.overhead)

    def format(self) -> str:
        """Multi-line text for users, GB (10⁹ bytes) with one decimal, e.g. ``"Estimated peak GPU memory: 23.4 GB"``
        followed by one line per non-zero component and the CPU memory the swapped blocks take."""
        rows = [("weights on the GPU", self.resident_weights), ("block-swap ring", self.swap_ring),
                ("activations", self.activations), ("attention workspace", self.attention_workspace),
                ("LoRA", self.lora), ("LoRA gradients", self.gradients), ("optimizer state", self.optimizer_state),
                ("other (CUDA context, workspaces)", self.overhead)]
        what = "training" if self.training else "inference"
        lines = [f"Estimated peak GPU memory ({what}): {self.total / GB:.1f} GB"]
        width = max(len(r[0]) for r in rows)
        lines += [f"  {name:<{width}}  {value / GB:6.1f} GB" for name, value in rows if value]
        if self.host_bytes:
            lines.append(f"  swapped block weights in CPU memory: {self.host_bytes / GB:.1f} GB")
        return "\n".join(lines)


def _block_bytes(info: BlockInfo, size: int | None, fp8_keep: Callable[[str], bool] | None) -> int:
    if size is None:
        return info.tensor_bytes
    if size == 1:
        quantised = [lin for lin in info.linears if not (fp8_keep is not None and fp8_keep(lin.name))]
        return (info.tensor_bytes - sum(lin.weight_bytes for lin in quantised)
                + sum(lin.in_features * lin.out_features + FP8_SCALE_BYTES for lin in quantised))
    return info.tensor_bytes - info.float_bytes + info.float_elements * size


def _lora_matcher(targets: Sequence[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if targets is None:
        return lambda name: True
    if callable(targets):
        return targets
    if isinstance(targets, str):
        targets = [targets]
    suffixes = tuple(targets)
    return lambda name: any(name == t or name.endswith("." + t) for t in suffixes)


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {v!r}")
    return v


def estimate_peak_memory(model: ModelDescription, activations: BlockActivations | Sequence[BlockActivations], *,
                         tokens: int | Sequence[int], batch: int = 1, blocks_to_swap: int = 0, ring_size: int = 2,
                         weight_dtype: str | torch.dtype | None = None,
                         fp8_keep: Callable[[str], bool] | None = None, training: bool = False,
                         gradient_checkpointing: bool = True, lora_rank: int = 0,
                         lora_targets: Sequence[str] | Callable[[str], bool] | None = None,
                         lora_dtype: str | torch.dtype = "fp32", optimizer: str = "adamw",
                         extra_activation_bytes: int = 0, overhead_bytes: int = 0) -> MemoryEstimate:
    """Estimate peak device memory (bytes) of a forward (inference) or a training step over ``model``'s blocks.

    Args:
        model: :class:`ModelDescription` (:func:`describe_module`).
        activations: one :class:`BlockActivations` for every block, or one per block.
        tokens: tokens per sample, one count or one per block (e.g. latent voxels after patchify for video
            blocks, text tokens for text blocks).
        batch: samples per step (CFG doubles it when both branches run in one batch).
        blocks_to_swap, ring_size: as :class:`~cinetune.core.offload.BlockSwap` (the last N blocks are swapped).
        weight_dtype: None keeps the stored dtypes; "bf16"/"fp16"/"fp32" recast every float tensor; "fp8" stores
            the block Linear weights in 1 byte + a 4-byte scale each (except those ``fp8_keep(name)`` keeps: the
            family's keep-in-high-precision rule) and keeps everything else as stored.
        training: a training step (LoRA gradients and optimizer state; backward activations).
        gradient_checkpointing: per-block checkpointing in training (required with block swap, see core/block_swap.py).
        lora_rank: r ≥ 0; LoRA on ``lora_targets`` (None = every block Linear; names or suffixes such as
            ``"attn.to_q"``; or a predicate on the qualified name).
        lora_dtype: dtype of LoRA parameters and gradients. optimizer: "adamw" (8 B/param), "adamw8bit" (2 B/param),
            "sgd"/"none" (0).
        extra_activation_bytes: activations outside the blocks (embeddings, latent, text states, loss).
        overhead_bytes: CUDA context, library workspaces, allocator reserve — added as is.

    Returns:
        :class:`MemoryEstimate`.

    Raises:
        ValueError: a count out of range (blocks_to_swap above the block count names the maximum), per-block lists
            of the wrong length, unknown dtype or optimizer, block swap in training without checkpointing.
    """
    n = len(model.blocks)
    if n == 0:
        raise ValueError("the model description has no blocks; pass the blocks to describe_module")
    _positive_int("batch", batch)
    _positive_int("ring_size", ring_size)
    _positive_int("lora_rank", lora_rank, 0)
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int) or not 0 <= blocks_to_swap <= n:
        raise ValueError(f"blocks_to_swap={blocks_to_swap!r} is out of range: 0 up to the maximum {n} "
                         "(the block count)")
    if training and blocks_to_swap > ring_size and not gradient_checkpointing:
        raise ValueError("block swap in training needs gradient checkpointing (see cinetune.core.offload); set "
                         "gradient_checkpointing=True or blocks_to_swap ≤ ring_size")
    tok = [tokens] * n if isinstance(tokens, int) else list(tokens)
    if len(tok) != n:
        raise ValueError(f"tokens has {len(tok)} entries for {n} blocks; pass one count or one per block")
    for t in tok:
        _positive_int("tokens", t)
    acts = [activations] * n if isinstance(activations, BlockActivations) else list(activations)
    if len(acts) != n or not all(isinstance(a, BlockActivations) for a in acts):
        raise ValueError(f"activations must be one BlockActivations or {n} of them (one per block)")
    opt = str(optimizer).lower()
    if opt not in _OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZER_BYTES)}, got {optimizer!r}")
    size = None if weight_dtype is None else _dtype_bytes(weight_dtype, "weight_dtype")

    # weights
    block_bytes = [_block_bytes(b, size, fp8_keep) for b in model.blocks]
    swapped = range(n - blocks_to_swap, n)
    other = model.other_bytes
    if size is not None and size > 1:
        other = model.other_bytes - model.other_float_bytes + model.other_float_elements * size
    resident = other + sum(block_bytes[: n - blocks_to_swap])
    ring = min(ring_size, blocks_to_swap) * max((block_bytes[i] for i in swapped), default=0)
    host = sum(block_bytes[i] for i in swapped)

    # LoRA, gradients, optimizer
    match = _lora_matcher(lora_targets)
    lora_params = lora_rank * sum(lin.in_features + lin.out_features
                                  for b in model.blocks for lin in b.linears if match(lin.name))
    lora = lora_params * _dtype_bytes(lora_dtype, "lora_dtype")
    grads = lora if training else 0
    opt_state = lora_params * _OPTIMIZER_BYTES[opt] if training else 0

    # activations: (linear part, quadratic part) of each candidate peak
    best = (-1.0, 0.0, 0)
    prefix = 0.0
    for i, (a, t) in enumerate(zip(acts, tok)):
        m, quad = batch * t, a.quadratic * batch * t * t
        if not training:
            cands = [(a.hidden * m + a.forward * m, quad)]
        elif gradient_checkpointing:
            prefix += a.hidden * m
            cands = [(prefix + a.forward * m, quad), (prefix + (2 * a.hidden + a.saved + a.backward) * m, 2 * quad)]
        else:
            before = prefix
            prefix += (a.hidden + a.saved - a.recomputed) * m + quad
            cands = [(before + (a.hidden + a.forward) * m, quad),
                     (prefix + (2 * a.hidden + a.recomputed + a.backward) * m, quad)]
        for lin, q in cands:
            if lin + q > best[0] + best[1]:
                best = (lin, q, i)
    act_lin, act_quad, peak_block = best
    return MemoryEstimate(resident_weights=int(resident), swap_ring=int(ring),
                          activations=int(round(act_lin)) + int(extra_activation_bytes),
                          attention_workspace=int(round(act_quad)), lora=int(lora), gradients=int(grads),
                          optimizer_state=int(opt_state), overhead=int(overhead_bytes), host_bytes=int(host),
                          peak_block=peak_block, training=bool(training))
