"""Kandinsky 5 peak-memory estimate: what one sampler step or one LoRA training step of a K5 DiT needs on the device.

API:

- :func:`estimate_k5_memory` — the estimate (:class:`~cinetune.core.memory.MemoryEstimate`, bytes) for a
  :class:`~cinetune.k5.config.K5Config`, a video size and the run settings. It describes the weights from a
  meta-device model (nothing is allocated: Pro 19B takes milliseconds) and calls
  :func:`cinetune.core.memory.estimate_peak_memory` with the K5 block numbers below.
- :func:`k5_block_activations` — activation bytes per token of every K5 text and visual block
  (:class:`~cinetune.core.memory.BlockActivations`), from formulas derived from ``k5/dit.py``'s forward.
- :func:`format_k5_estimate` — the short text users see. :func:`k5_tokens`, :func:`describe_k5` — helpers.

Units: bytes everywhere (GB = 10⁹ bytes in texts). The estimate predicts the allocator peak
(``torch.cuda.max_memory_allocated``), not ``nvidia-smi``: the CUDA context (0.3–0.6 GB), cuBLAS/cuDNN workspaces
and the caching allocator's fragmentation come on top (``overhead_bytes``). It covers the DiT step only: the text
encoders and the VAE run at other times.

Notation: D = model_dim, F = ff_dim, H = heads, hd = head_dim = D/H, Tm = time_dim, s = bytes of the compute dtype
(bf16/fp16 2, fp32 4), u = 4 when the compute dtype is not float32 (the blocks then make float32 *copies*) and 0 in
float32 (``x.float()`` returns ``x``), [u] = 1 when u > 0, r = LoRA rank, S = visual and L = text tokens per sample,
B = batch, m = B·tokens.

**Tokens** (``k5.pipeline.latent_shape``, patch (1, 2, 2)): S = T·(H/16)·(W/16) with T = (frames − 1)/4 + 1, e.g.
768×512×121 frames → 31·32·48 = 47,616.

**Block formulas** (bytes per token, counted tensor by tensor from ``TextBlock.forward`` / ``VisualBlock.forward``;
every sub-layer output is consumed inline, so the block holds at most one extra residual). The blocks keep float32
copies around every norm, RoPE and gated residual (the official casts) — why the reference-block formulas of
``core/memory.py`` under-estimate them ~2.5×.

- hidden = s·D (the block input).
- forward = the largest of the phases (beyond the input; no autograd, or a checkpointed forward):

  * ``modulate`` (LayerNorm in float32 · (1 + scale) + shift): float copy u·D, normalised 4D, ``addcmul`` 4D,
    cast [u]·s·D → max(u·D + 4D, 8D + [u]·s·D);
  * q, k, v projections, each output s·D, while the modulated input and the earlier projections are held; the
    per-head RMSNorm makes a float copy u·D plus, on CPU (torch 2.14's composite ``_fused_rms_norm``), x·rsqrt and
    ·weight (8D), on CUDA (fused kernel) its output (4D);
  * RoPE of q then of k (float copy u·D, complex product 4D, cast [u]·s·D) with the modulated input, q, k, v and
    the rotated q alive: 5·s·D + u·D + 4D + [u]·s·D — 20D bytes in bf16, the inference peak of long sequences;
  * attention output and ``out_layer`` while q, k, v are still referenced: 6·s·D (+ CPU kernel tiles);
  * gated residual ``x + gate·o`` in float32: o s·D, float copies 2·u·D, ``addcmul`` 4D, cast [u]·s·D;
  * feed-forward: residual s·D, modulated input s·D and the two F-wide tensors 2·s·F. Without autograd and with
    more than ``FF_CHUNK_TOKENS`` (4096) tokens ``FeedForward`` runs in slices: residual, input and output buffer
    3·s·D per token plus one slice's F-wide tensors (a constant);
  * unmerged LoRA ``base(x) + c·up(down(x))`` on a layer with n outputs: the up-projection is accumulated into the
    base output in place (``core.lora._add_up_projection``), so only the down-projection output s·r comes on top;
  * weights stored in another dtype than the compute dtype are cast per call (``CastLinear``: one copy;
    ``FP8Linear``: cast and scale, two copies of in·out·s while the cast happens, one while the output is made).

  CUDA, bf16, F = 4D: 20D (RoPE of k; FFN 20D too when not sliced); fp32: 40D (FFN); LoRA training (FFN
  ``in_layer``): 36D bf16, 72D fp32.
- saved (autograd; under per-block checkpointing, what the recompute keeps): the float32 LayerNorm inputs (3 in a
  visual block, 2 in a text block; in fp32 the first one is the block input itself) 4D each + mean/rstd 8 bytes
  each; the float32 RMSNorm inputs (self q, k; cross q) 4D + rstd 4H each; self-attention q, k (rotated), v and
  output 4·s·D + log-sum-exp 4H; cross-attention q and output 2·s·D + 4H; the GELU input s·F. Visual:
  12D − [fp32]·4D + 12D + 6·s·D + s·F + 20H + 24 (bf16 36D + 2F + 20H + 24; fp32 44D + 4F + 20H + 24); text:
  8D − [fp32]·4D + 8D + 4·s·D + s·F + 12H + 16. Trainable LoRA also keeps the inputs of its layers that nothing
  else keeps (visual: three modulated inputs and the GELU output, 3·s·D + s·F; text 2·s·D + s·F) and each
  down-projection output s·r. With cast weights (fp8, or fp32 weights with bf16 compute) ``F.linear`` keeps the
  cast weight of every projection of the block for the input gradient: s·(8D² + 2DF) visual, s·(4D² + 2DF) text.
- backward (beyond what is saved and the incoming gradient; the block's own output has been released by then —
  the next block's backward freed it — so ``s·D`` is taken off the core estimate's 2·hidden): the largest of the
  GELU backward (gradients of its output and input 2·s·F + the residual gradient's cast [u]·s·D; with LoRA the
  GELU output its ``out_layer`` adapter saved is freed first, and the ``out_layer`` backward peaks instead: the
  float32 branch gradient 4D + its cast + s·F), the end of the
  recompute (every saved tensor together with the final gated residual: [u]·s·D + s·D + u·D + 4D) and the
  attention backwards (query/key/value gradients 5·s·D, less the feed-forward and cross-attention tensors already
  freed, + CPU kernel tiles).

These per-token numbers are checked against the CPU allocator on real K5 blocks at two widths, fp32 and bf16, with
and without LoRA (tests/unit/test_k5_memory.py); they agree to ~1 %. For scale: a ``VisualBlock`` (F = 4D, as Lite
and Pro) measured with ``core.memory.measure_block_activations`` in bf16 on CPU without LoRA holds hidden 1, forward
10, saved 22.2, backward 9 (units of D·2 bytes per token; in fp32: 1, 10, 15.1, 8).

**Attention workspace per device** (``F.scaled_dot_product_attention``):

- cuda: flash / memory-efficient / cuDNN kernels — no [B,H,S,S] scores, only the float32 log-sum-exp (4H bytes per
  token, in ``saved``): ``quadratic = 0``. Kernels whose output is not [B,S,H,hd]-contiguous (cuDNN) add one s·D
  copy before ``out_layer`` (not modelled).
- cpu: torch (2.14.1, checked with the profiler) runs SDPA as the fused ``_scaled_dot_product_flash_attention_for_cpu``
  for fp32/bf16, with or without the boolean key mask and in backward — no scores either, only
  per-thread tiles: forward threads·(qSplit·kvSplit + 2·qSplit + qSplit·hd)·4 (+ qSplit·kvSplit·s in bf16),
  backward threads·2·qSplit·kvSplit·(4 + s) (+ ~0.2 MB oneDNN scratch per thread in bf16), qSplit ≤ 256,
  kvSplit ≤ 512 (``FlashAttentionKernel.cpp``). The math path, which materialises [B,H,S,S] scores and
  probabilities, runs only when the fused kernel cannot (dropout, other dtypes): ``math_attention=True`` models it
  with ``quadratic = 2·H·s`` per token² (doubled in backward by the core estimate).
- NABLA (``nabla=True``): see :func:`_nabla_terms`, one model per block-sparse path (``nabla_path``; default
  compiled FlexAttention on CUDA, the gathered path on CPU). The CPU paths are validated against the allocator; the
  FlexAttention tables and the gathered path's CUDA workspace are not.

**Outside the blocks** (``_extras``, folded into the block numbers so ``activations`` is the whole activation peak):
the sampler's or trainer's latents, the RoPE table (complex64, 4·hd per token), text states, the MSE loss storage.

Assumptions: one device, blocks run in order, no activation offload, the allocator reuses freed memory exactly;
the optimizer step is not a peak (activations are freed; only LoRA-sized temporaries); every LoRA gradient is counted
at the peak (conservative: only those of the blocks already back-propagated exist); the modulation parameters
(9D float32 per sample and block) and other per-call vectors are ignored (< 1 MB).

Validation (tests/unit/test_k5_memory.py): the estimate against the CPU allocator's peak of the real sampler step
and of a training step written as the trainer runs it — tiny and medium DiTs, fp32 and bf16, two token counts, with
and without block swap, CFG, NABLA, fp8 — agrees within 5 % (asserted: 15 %). GPU kernels are not measured.

Sources: ``k5/dit.py``, ``core/lora.py`` (``LoRALinear.forward``), ``core/quant.py`` (``CastLinear``,
``FP8Linear``), ``core/attention.py`` (masked dense NABLA), ``k5/pipeline.py`` (``sample``),
``k5/train.py`` (``flow_matching_loss``) and ``training/trainer.py`` (``gradient_checkpointing``); torch 2.14.1 CPU kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..core.memory import (
    GB,
    BlockActivations,
    MemoryEstimate,
    ModelDescription,
    describe_module,
    estimate_peak_memory,
)
from .config import K5Config
from .dit import FF_CHUNK_TOKENS, k5_fp8_keep_high_precision
from .family import K5_LORA_TARGETS
from .nabla import NablaConfig

FP32 = 4  # bytes of a float32 element
DEVICE_TYPES = ("cuda", "cpu")
#: Values of ``weight_dtype``: stored dtypes, a recast as ``load_k5_dit`` does, or weight-only fp8.
WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp32", "fp8_e4m3fn")
_WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3fn": 1}
_CORE_WEIGHT_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp8_e4m3fn": "fp8"}
_COMPUTE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
_NABLA_BLOCK = 64  # tokens per NABLA block (k5.nabla.BLOCK)
# oneDNN scratch of the CPU flash-attention backward in bf16/fp16, per thread: measured 30–230 kB (torch 2.14.1);
# the upper part of that range is used.
_CPU_BRGEMM_SCRATCH = 200_000


def _compute_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype.itemsize
    key = str(dtype).lower()
    if key not in _COMPUTE_BYTES:
        raise ValueError(f"compute_dtype must be 'bf16', 'fp16', 'fp32' or a torch dtype, got {dtype!r}")
    return _COMPUTE_BYTES[key]


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {v!r}")
    return v


def _check_device(device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {', '.join(DEVICE_TYPES)}, got {device_type!r} (the attention "
                         "and norm kernels of other devices are not modelled)")


# ---------------------------------------------------------------------------------------------------------------
# One block, phase by phase


@dataclass(frozen=True)
class _Cost:
    """``per_token · m + const`` bytes (m = batch · tokens)."""

    per_token: float
    const: float = 0.0

    def at(self, m: int) -> float:
        return self.per_token * m + self.const


@dataclass(frozen=True)
class _BlockModel:
    """Named phases of one block: forward (bytes beyond the block input), saved, backward (bytes beyond the saved
    tensors and the incoming gradient, less the block output counted by the core estimate; parts of the saved
    tensors already freed enter negatively)."""

    hidden: float
    forward: tuple[tuple[str, _Cost], ...]
    saved: _Cost
    backward: tuple[tuple[str, _Cost], ...]

    def forward_at(self, m: int) -> tuple[str, float]:
        return max(((name, c.at(m)) for name, c in self.forward), key=lambda p: p[1])

    def backward_at(self, m: int) -> tuple[str, float]:
        return max(((name, c.at(m)) for name, c in self.backward), key=lambda p: p[1])


def _cpu_sdpa_scratch(q_len: int, kv_len: int, head_dim: int, s: int, threads: int, backward: bool) -> int:
    """Per-call scratch of torch's CPU flash attention (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``), bytes:
    per thread float32 tiles of qSplit × kvSplit scores (+ row max/sum and a qSplit × head_dim output tile in the
    forward; scores and their gradient in the backward) and, in bf16/fp16, the same tiles in the compute dtype
    (+ oneDNN scratch in the backward). qSplit = 256 (q ≥ 768), 64 (q ≥ 192) or 32, capped at q; kvSplit =
    min(512, kv)."""
    qs = min(256 if q_len >= 768 else 64 if q_len >= 192 else 32, q_len)
    kvs = min(512, kv_len)
    red = s if s != FP32 else 0
    if backward:
        return threads * (2 * qs * kvs * (FP32 + red) + (_CPU_BRGEMM_SCRATCH if red else 0))
    return threads * ((qs * kvs + 2 * qs + qs * head_dim) * FP32 + qs * kvs * red)


@dataclass(frozen=True)
class _NablaTerms:
    """What NABLA adds to one visual self-attention call (bytes): during the forward call (``per_token`` per token
    + ``const``), kept for the backward (``saved``), and during the attention backward (``backward_per_token`` per
    token + ``backward_const``)."""

    per_token: float = 0.0
    const: float = 0.0
    saved: float = 0.0
    backward_per_token: float = 0.0
    backward_const: float = 0.0


def _nabla_terms(config: K5Config, s: int, *, device_type: str, batch: int, tokens: int, grad: bool,
                 path: str, every_block_kept: bool = False, threads: int = 1) -> _NablaTerms:
    """Bytes NABLA adds to one visual self-attention call of ``batch`` samples with ``tokens`` tokens on ``path``
    (one of ``core.attention.BLOCK_SPARSE_PATHS``); nb = tokens/64 blocks per sample, R = B·H·nb query-block rows,
    pairs = R·nb.

    - Block map (``k5.nabla.topcdf_block_mask``), every path: pooled q̄, k̄ in float32 (2·4·D/64 per token); per
      slice of ≤ ``_MAP_ELEMENTS`` map elements, scores, softmax, sorted values, int64 order, float64 cumsum and
      masks (≈ 31 bytes per element); the bool block mask (1 byte per pair).
    - ``"flex compiled"``: the ``BlockMask`` index tables (int32 kv indices, transposed q indices) and the argsort
      scratch that builds them ≈ 32 bytes per pair during the call, 12 kept for the backward. An assumption from
      the code; not validated on a GPU.
    - ``"gathered"`` (``core.block_sparse``): contiguous copies of q, k, v (3·s·D per token; K5 hands transposes);
      the plan — per row int64 counts, keys and order (≤ 32·R bytes), the kept pairs of partially kept rows as
      int64 pairs (≤ 24 bytes each while built; kept: int32 key indices padded by up to ``_PADDING``, and the bool
      block rows of the rows attended in place); the workspace — gathered keys and values, each
      ``core.block_sparse.gather_budget`` elements (or the whole key lists of one row per CPU thread, or all kept
      keys if fewer), a call's additive key mask, and
      the gathered query rows (as many as keys, or one head's rows S·hd for the rows that keep every block) with
      the kernel output for them; CPU kernel tiles. Kept for the backward: the int32 keys and the row order. In the
      backward: the output gradient made contiguous (s·D per token), the workspace again with three query-sized
      buffers (query rows, output gradient, output), and the kernel's key/value/query gradients of one call. With
      ``every_block_kept`` (the STA window covers the whole grid) no row is partial: nothing is gathered but the
      query rows. Worst case otherwise (every row keeps all but one block). Validated against the CPU allocator.
    - ``"masked dense"`` (``core.attention._masked_dense``): the additive mask of one slice of query blocks,
      materialised in the compute dtype — B·H·64·S elements per query block, as many query blocks as fit in
      ``_DENSE_MASK_ELEMENTS`` (at least one); the zeroed-rows product s·D per token. In training the attention node
      keeps its slice's mask for the backward.
    """
    from ..core.attention import _DENSE_MASK_ELEMENTS
    from ..core.block_sparse import gather_budget
    from .nabla import _MAP_ELEMENTS

    H, D, hd = config.num_heads, config.model_dim, config.head_dim
    nb = max(1, tokens // _NABLA_BLOCK)
    R = batch * H * nb
    pairs = R * nb
    per_token = 2 * FP32 * D / _NABLA_BLOCK
    topcdf = 31 * min(_MAP_ELEMENTS, pairs) + pairs
    if path == "flex compiled":
        # kept for the backward: FlexAttention's int32 block lists, key-major (kv_indices) and the two query-major
        # tables from_kv_blocks derives (q_indices, full_q_indices): 12 bytes per block pair
        return _NablaTerms(per_token, topcdf + 32 * pairs, 12 * pairs if grad else 0.0)
    if path == "gathered":
        from ..core.block_sparse import _PADDING

        partial = 0 if every_block_kept else pairs - R  # kept pairs of the partially kept rows
        budget = gather_budget(device_type)
        rows = (threads if device_type == "cpu" else 1) * (nb - 1) * _NABLA_BLOCK * hd  # the fewest rows per call
        kv = s * min(max(budget, rows), (1 + _PADDING) * partial * _NABLA_BLOCK * hd)  # each of keys and values
        mask = (s + 2) * kv / (s * hd)  # a call's additive key mask and the bool rows it is made from
        queries = s * min(R * _NABLA_BLOCK * hd, max(budget if partial else 0, tokens * hd))
        plan = 8 * R + 4 * (1 + _PADDING) * partial + (pairs if partial else 0)  # order, int32 keys, kept rows
        call = plan + 2 * kv + mask + 2 * queries  # workspace, mask, kernel output
        forward = topcdf + max(32 * R + 24 * partial, call)
        backward = 4 * kv + mask + 4 * queries  # workspace (kv, 3 query buffers), mask, the kernel's gradients
        return _NablaTerms(per_token + 3 * s * D, forward, plan if grad else 0.0, s * D, backward)
    row = batch * H * _NABLA_BLOCK * tokens
    dense = s * row * min(nb, max(1, _DENSE_MASK_ELEMENTS // row))
    return _NablaTerms(per_token + s * D, topcdf + dense, dense + pairs if grad else 0.0)


def _block_model(kind: str, config: K5Config, s: int, *, lora_rank: int, device_type: str, grad: bool,
                 chunked: bool, cast: int, modulation_cast: bool = False, nabla: bool = False, q_tokens: int = 0,
                 kv_tokens: int = 0, threads: int = 1, batch: int = 1, nabla_path: str = "gathered",
                 nabla_every_block_kept: bool = False) -> _BlockModel:
    """Phases of a text (``kind="text"``) or visual block (the module docstring explains each term).

    ``cast``: compute-dtype copies a block projection makes of its weight per call (0 stored in the compute dtype,
    1 another float dtype, 2 fp8). ``modulation_cast``: the modulation weights are not float32 (their input is), so
    each block call makes a float32 copy (Tm·n·4 bytes) at its start. ``chunked``: the FFN runs in slices.
    ``q_tokens``/``kv_tokens``: tokens of one sample in this block / in the text (cross-attention keys), for the
    per-call constants (CPU attention tiles with ``threads`` threads, NABLA); 0 leaves them out.
    """
    D, F, H, hd, r = config.model_dim, config.ff_dim, config.num_heads, config.head_dim, lora_rank
    u = FP32 if s != FP32 else 0
    cs = s if u else 0
    sD = s * D
    M = max(u * D + 4 * D, 8 * D + cs * D)  # modulate
    R = u * D + (8 * D if device_type == "cpu" else 4 * D)  # RMSNorm, above its input
    P = u * D + 4 * D + cs * D  # RoPE, above its input
    G = 2 * u * D + 4 * D + cs * D  # gated residual, above x and the branch output

    def proj(name: str, alive: float, n: int, w: int, per: int = 1) -> list[tuple[str, _Cost]]:
        """Phases of a projection with ``n`` outputs and ``w`` weight elements while ``alive`` bytes/token are
        held; ``per`` > 1: one FFN slice of ``per`` tokens (its per-token parts become constants)."""
        def cost(tok: float, const: float) -> _Cost:
            return _Cost(alive + tok, const) if per == 1 else _Cost(alive, tok * per + const)
        out = []
        if cast:
            out += [(f"{name} (weight cast)", cost(0.0, cast * s * w)), (name, cost(s * n, s * w))]
        else:
            out.append((name, cost(s * n, 0.0)))
        if r:
            out.append((f"{name} (LoRA)", cost(s * n + s * r, 0.0)))
        return out

    def scratch(q: int, kv: int, backward: bool) -> float:
        if device_type != "cpu" or q <= 0 or kv <= 0:
            return 0.0
        return _cpu_sdpa_scratch(q, kv, hd, s, threads, backward)

    n_mod = 9 if kind == "visual" else 6
    nt = _NablaTerms()
    if nabla and kind == "visual" and q_tokens > 0:
        nt = _nabla_terms(config, s, device_type=device_type, batch=batch, tokens=q_tokens, grad=grad,
                          path=nabla_path, every_block_kept=nabla_every_block_kept, threads=threads)
    DD, DF = D * D, D * F
    phases = [
        ("modulation (weight cast)", _Cost(0.0, FP32 * config.time_dim * n_mod * D if modulation_cast else 0.0)),
        ("modulate (self-attention)", _Cost(M)),
        *proj("query", sD, D, DD), ("query RMSNorm", _Cost(2 * sD + R)),
        *proj("key", 2 * sD, D, DD), ("key RMSNorm", _Cost(3 * sD + R)),
        *proj("value", 3 * sD, D, DD),
        ("RoPE of q", _Cost(4 * sD + P)),
        ("RoPE of k", _Cost(5 * sD + P)),
        ("self-attention", _Cost(5 * sD + nt.per_token, scratch(q_tokens, q_tokens, False) + nt.const)),
        *proj("self-attention out_layer", 5 * sD, D, DD),
        ("gated residual (self-attention)", _Cost(sD + G)),
    ]
    if kind == "visual":
        phases += [
            ("modulate (cross-attention)", _Cost(sD + M)),
            *proj("cross query", 2 * sD, D, DD), ("cross query RMSNorm", _Cost(3 * sD + R)),
            ("cross-attention", _Cost(4 * sD, scratch(q_tokens, kv_tokens, False))),
            *proj("cross-attention out_layer", 4 * sD, D, DD),
            ("gated residual (cross-attention)", _Cost(2 * sD + G)),
        ]
    phases.append(("modulate (feed-forward)", _Cost(sD + M)))
    if chunked:
        C = FF_CHUNK_TOKENS
        phases += [*proj("feed-forward in_layer (slice)", 3 * sD, F, DF, per=C),
                   ("GELU (slice)", _Cost(3 * sD, C * 2 * s * F)),
                   *[(n, dataclasses.replace(c, const=c.const + C * s * F))
                     for n, c in proj("feed-forward out_layer (slice)", 3 * sD, D, DF, per=C)]]
    else:
        phases += [*proj("feed-forward in_layer", 2 * sD, F, DF),
                   ("GELU", _Cost(2 * sD + 2 * s * F)),
                   *proj("feed-forward out_layer", 2 * sD + s * F, D, DF)]
    phases.append(("gated residual (feed-forward)", _Cost(2 * sD + G)))

    # saved, by sub-layer
    sa = (4 * D if u else 0) + 8 + 2 * (4 * D + 4 * H) + 4 * sD + 4 * H
    ca = (4 * D + 8) + (4 * D + 4 * H) + 2 * sD + 4 * H if kind == "visual" else 0
    ff = (4 * D + 8) + s * F
    if r:
        sa += sD + 4 * s * r
        ff += sD + s * F + 2 * s * r
        if kind == "visual":
            ca += sD + 2 * s * r
    cast_saved = s * ((8 if kind == "visual" else 4) * DD + 2 * DF) if (cast and grad) else 0.0
    saved = _Cost(sa + ca + ff, cast_saved + nt.saved)

    if r:
        # the GELU output the out_layer adapter saved is freed by the out_layer backward, before the GELU backward;
        # that out_layer backward holds the float32 branch gradient of the gated residual (4D, its cast) and the
        # input gradients of the base layer and the adapter (2·s·F) less the freed GELU output
        ffn_backward = [("feed-forward out_layer backward", _Cost(4 * D + cs * D + s * F - sD)),
                        ("feed-forward backward", _Cost(cs * D + s * F - sD))]
    else:
        ffn_backward = [("feed-forward backward", _Cost(cs * D + 2 * s * F - sD))]
    backward = [
        *ffn_backward,
        ("recompute (final gated residual)", _Cost(cs * D + sD + u * D + 4 * D - sD)),
    ]
    if kind == "visual":
        backward.append(("cross-attention backward", _Cost(3 * sD - ff - sD, scratch(q_tokens, kv_tokens, True))))
    backward.append(("self-attention backward", _Cost(5 * sD - ff - ca - sD + nt.backward_per_token,
                                                      scratch(q_tokens, q_tokens, True) + nt.backward_const)))
    return _BlockModel(hidden=sD, forward=tuple(phases), saved=saved, backward=tuple(backward))


def default_nabla_path(device_type: str) -> str:
    """The block-sparse path NABLA is assumed to run on when none is given: ``"flex compiled"`` on CUDA, the
    ``"gathered"`` path on CPU (``core.attention.block_sparse_path`` gives the one a process really uses)."""
    _check_device(device_type)
    return "flex compiled" if device_type == "cuda" else "gathered"


def _check_nabla_path(path: str | None, device_type: str) -> str:
    from ..core.attention import BLOCK_SPARSE_PATHS

    if path is None:
        return default_nabla_path(device_type)
    if path not in BLOCK_SPARSE_PATHS or (path == "flex compiled" and device_type != "cuda"):
        valid = [p for p in BLOCK_SPARSE_PATHS if device_type == "cuda" or p != "flex compiled"]
        raise ValueError(f"nabla_path must be one of {', '.join(valid)} on {device_type}, got {path!r}")
    return path


def nabla_keeps_every_block(nabla: NablaConfig, width: int, height: int, frames: int,
                            patch_size: tuple[int, int, int] = (1, 2, 2)) -> bool:
    """Whether every NABLA mask at this video size keeps every block: P = 1, or the STA window spans the whole
    block grid (T latent frames, (H/8/ph/8) × (W/8/pw/8) tiles per frame).

    Raises:
        SizeError (a ValueError): invalid video size (see :func:`k5_tokens`).
    """
    from .pipeline import latent_shape, validate_video_size

    validate_video_size(width, height, frames, nabla=True)
    _, t, h, w = latent_shape(width, height, frames)
    pt, ph, pw = patch_size
    grid = (t // pt, h // ph // 8, w // pw // 8)
    covered = all(n - 1 <= win // 2 for n, win in zip(grid, nabla.window))
    return nabla.P >= 1.0 or (nabla.sta and covered)


def k5_block_activations(config: K5Config, *, compute_dtype: str | torch.dtype, training: bool,
                         nabla: bool = False, lora_rank: int = 0, device_type: str = "cuda",
                         text_tokens: int | None = None, visual_tokens: int | None = None, batch: int = 1,
                         weight_cast: int = 0, modulation_cast: bool = False, math_attention: bool = False,
                         cpu_threads: int | None = None, nabla_path: str | None = None,
                         nabla_every_block_kept: bool = False) -> list[BlockActivations]:
    """Activation bytes per token of every block of a K5 DiT, in execution order (text blocks, then visual blocks).

    Analytic (module docstring), not calibrated: every term is a tensor of ``k5/dit.py``'s forward, so the numbers
    hold for any :class:`K5Config` (Lite, Pro, custom) and are computed without allocating anything.

    Args:
        config: the DiT dims.
        compute_dtype: activation dtype: "bf16", "fp16", "fp32" or a torch dtype.
        training: the forward runs with autograd (a checkpointed forward or its recompute), so the FFN is never
            sliced; False: inference (``no_grad``/``inference_mode``).
        nabla: NABLA sparse self-attention in the visual blocks (needs ``visual_tokens`` to count anything).
        lora_rank: rank of the unmerged LoRA on ``K5_LORA_TARGETS`` (0 = none); trainable when ``training``.
        device_type: "cuda" or "cpu" (RMSNorm and attention kernels differ, see the module docstring).
        text_tokens, visual_tokens: tokens of one sample in the text / visual blocks. When given, per-call constants
            (CPU attention tiles, the FFN slice of a long inference sequence, weight casts, NABLA tables) are folded
            in, so the numbers are exact at that count only; when None they are left out (pure per-token
            coefficients, FFN never sliced).
        batch: samples per forward.
        weight_cast: compute-dtype copies a block projection makes of its weight per call: 0 (stored in the compute
            dtype), 1 (another float dtype, ``CastLinear``), 2 (fp8: cast, then scale, ``FP8Linear``).
        modulation_cast: the modulation weights are not stored in float32 (each block call casts them).
        math_attention: SDPA's math path (scores materialised): ``quadratic = 2·H·s`` per token².
        cpu_threads: threads of the CPU attention kernel (default ``torch.get_num_threads()``).
        nabla_path: the block-sparse attention path NABLA runs on (``core.attention.BLOCK_SPARSE_PATHS``); None:
            :func:`default_nabla_path` of ``device_type``.
        nabla_every_block_kept: the NABLA masks keep every block (the STA window covers the token grid, or P = 1),
            so the gathered path gathers nothing.

    Returns:
        ``num_text_blocks + num_visual_blocks`` :class:`BlockActivations` (bytes per token of that block's tokens).

    Raises:
        TypeError: config is not a K5Config.
        ValueError: unknown dtype or device type, bad counts.
    """
    if not isinstance(config, K5Config):
        raise TypeError(f"config must be a K5Config, got {type(config).__name__}")
    s = _compute_bytes(compute_dtype)
    _check_device(device_type)
    _check_int("lora_rank", lora_rank, 0)
    _check_int("batch", batch, 1)
    if weight_cast not in (0, 1, 2):
        raise ValueError(f"weight_cast must be 0, 1 or 2 weight copies per call, got {weight_cast!r}")
    for name, t in (("text_tokens", text_tokens), ("visual_tokens", visual_tokens)):
        if t is not None:
            _check_int(name, t, 1)
    threads = torch.get_num_threads() if cpu_threads is None else _check_int("cpu_threads", cpu_threads, 1)
    quadratic = 2.0 * config.num_heads * s if math_attention else 0.0
    nabla_path = _check_nabla_path(nabla_path, device_type)

    def one(kind: str, tokens: int | None) -> BlockActivations:
        t = tokens or 0
        kv = (text_tokens or 0) if kind == "visual" else t
        model = _block_model(kind, config, s, lora_rank=lora_rank, device_type=device_type, grad=training,
                             chunked=not training and t > FF_CHUNK_TOKENS, cast=weight_cast,
                             modulation_cast=modulation_cast, nabla=nabla, q_tokens=t, kv_tokens=kv,
                             threads=threads, batch=batch, nabla_path=nabla_path,
                             nabla_every_block_kept=nabla_every_block_kept)
        m = batch * t if tokens else 1
        if not tokens:  # coefficients only: drop the per-call constants
            model = dataclasses.replace(
                model, forward=tuple((n, _Cost(c.per_token)) for n, c in model.forward),
                saved=_Cost(model.saved.per_token),
                backward=tuple((n, _Cost(c.per_token)) for n, c in model.backward))
        return BlockActivations(hidden=model.hidden, forward=max(model.forward_at(m)[1] / m, 0.0),
                                saved=max(model.saved.at(m) / m, 0.0),
                                backward=max(model.backward_at(m)[1] / m, 0.0), quadratic=quadratic)

    return ([one("text", text_tokens) for _ in range(config.num_text_blocks)]
            + [one("visual", visual_tokens) for _ in range(config.num_visual_blocks)])


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
# Text for users


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


_NOT_SCANNED = object()  # format_k5_estimate without a block-swap search
_NABLA_PATH_TEXT = {
    "flex compiled": "compiled FlexAttention (dropped blocks skipped)",
    "gathered": "gathered block-sparse path, no compiler needed (dropped blocks skipped)",
    "masked dense": "masked dense path (exact, but slower than full attention)",
}


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def format_k5_estimate(est: MemoryEstimate, *, available_bytes: int | None = None,
                       fitting_swap: tuple[int, MemoryEstimate] | None | object = _NOT_SCANNED, **settings) -> str:
    """Short text for users: the peak and its parts on the first line, then what block swap keeps in CPU memory,
    the settings, and whether it fits ``available_bytes``, e.g.::

        Estimated peak GPU memory: 21.3 GB (weights 9.6 GB resident + 1.2 GB swap ring, activations 9.8 GB,
        LoRA + gradients + optimizer 0.7 GB)
        Block swap keeps 17.2 GB of weights in CPU memory.
        Settings: Pro, 512×512, 49 frames (13,312 tokens), fp8_e4m3fn weights, training, 40 blocks swapped.

    Args:
        est: from :func:`estimate_k5_memory`.
        available_bytes: free device memory (e.g. ``torch.cuda.mem_get_info()[0]``); adds a fits / does not fit line.
        fitting_swap: the result of :func:`smallest_fitting_swap` when the estimate does not fit: the line then
            names the ``blocks_to_swap`` that would fit, or (None) says that no block swap is enough.
        settings: shown on the settings line: ``model`` (a name), ``width``, ``height``, ``frames``, ``tokens``,
            ``weight_dtype``, ``training``, ``cfg``, ``blocks_to_swap``, ``lora_rank``, ``device_type``; other keys
            as ``key=value``. ``nabla_path`` (a ``core.attention.BLOCK_SPARSE_PATHS`` name, or None without NABLA)
            adds a line saying how NABLA attention runs.

    Returns:
        Lines joined by ``\\n`` (GB = 10⁹ bytes, one decimal).
    """
    cpu = settings.get("device_type") == "cpu"
    weights = f"weights {_gb(est.resident_weights)} resident"
    if est.swap_ring:
        weights += f" + {_gb(est.swap_ring)} swap ring"
    parts = [weights, f"activations {_gb(est.activations + est.attention_workspace)}"]
    if est.lora or est.gradients or est.optimizer_state:
        label = "LoRA + gradients + optimizer" if est.training else "LoRA"
        parts.append(f"{label} {_gb(est.lora + est.gradients + est.optimizer_state)}")
    if est.overhead:
        parts.append(f"other {_gb(est.overhead)}")
    where = "memory (CPU)" if cpu else "GPU memory"
    lines = [f"Estimated peak {where}: {_gb(est.total)} ({', '.join(parts)})"]
    if est.host_bytes:
        line = f"Block swap keeps {_gb(est.host_bytes)} of weights in CPU memory"
        lines.append(line + (f" (the same memory here: {_gb(est.total + est.host_bytes)} in all)." if cpu else "."))
    shown = []
    s = dict(settings)
    s.pop("device_type", None)
    nabla_path = s.pop("nabla_path", None)
    if "model" in s:
        shown.append(str(s.pop("model")))
    if "width" in s and "height" in s:
        shown.append(f"{s.pop('width')}×{s.pop('height')}")
    if "frames" in s:
        frames = s.pop("frames")
        tok = s.pop("tokens", None)
        shown.append(f"{frames} frames" + (f" ({tok:,} tokens)" if isinstance(tok, int) else ""))
    if "weight_dtype" in s:
        shown.append(f"{s.pop('weight_dtype')} weights")
    if "training" in s:
        training = s.pop("training")
        cfg = s.pop("cfg", None)
        shown.append("training" if training else ("inference with CFG (two forwards in turn)" if cfg
                                                  else "inference"))
    if s.get("lora_rank"):
        shown.append(f"LoRA rank {s.pop('lora_rank')}")
    s.pop("lora_rank", None)
    if s.get("blocks_to_swap"):
        shown.append(f"{s.pop('blocks_to_swap')} blocks swapped")
    s.pop("blocks_to_swap", None)
    shown += [f"{k}={v}" for k, v in s.items()]
    if shown:
        lines.append("Settings: " + ", ".join(shown) + ".")
    if nabla_path is not None:
        lines.append(f"NABLA attention: {_NABLA_PATH_TEXT.get(nabla_path, nabla_path)}.")
    if available_bytes is not None:
        if est.total <= available_bytes:
            lines.append(f"Fits in the {_gb(available_bytes)} available.")
        else:
            short = f"Does not fit in the {_gb(available_bytes)} available (short by {_gb(est.total - available_bytes)})"
            if isinstance(fitting_swap, tuple):
                n, fitting = fitting_swap
                lines.append(f"{short}: set blocks_to_swap to {n} or more on the model loader (estimated peak "
                             f"{_gb(fitting.total)}, {_gb(fitting.host_bytes)} of weights in CPU memory).")
            elif fitting_swap is None:
                lines.append(f"{short}, even with every block swapped: load fp8 weights, or lower the resolution or "
                             "frame count.")
            else:
                lines.append(f"{short}: swap more blocks, load fp8 weights, or lower the resolution or frame count.")
    if not cpu and not est.overhead:
        lines.append("Add about 0.5 GB for the CUDA context and kernel workspaces.")
    return "\n".join(lines)
