"""Kandinsky 5 block activation model behind :mod:`cinetune.k5.memory`: the bytes per token every K5 text and visual
block holds, phase by phase (forward, saved for autograd, backward), and the attention workspace per device and
NABLA path. :func:`k5_block_activations` gives them as :class:`~cinetune.core.memory.BlockActivations`.

Notation: D = model_dim, F = ff_dim, H = heads, hd = head_dim = D/H, Tm = time_dim, s = bytes of the compute dtype
(bf16/fp16 2, fp32 4), u = 4 when the compute dtype is not float32 (the blocks then make float32 *copies*) and 0 in
float32 (``x.float()`` returns ``x``), [u] = 1 when u > 0, r = LoRA rank, S = visual and L = text tokens per sample,
B = batch, m = B·tokens.

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
  down-projection output s·r. The GELU output is kept only by the recompute of a checkpointed block: a plain
  forward keeps its input instead and recomputes it in the backward (``core.recompute.mlp``; ``recomputed`` s·F). With cast weights (fp8, or fp32 weights with bf16 compute) ``F.linear`` keeps the
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


Sources: ``k5/blocks.py`` (the forwards counted), ``core/lora.py`` (``LoRALinear.forward``), ``core/quant.py``
(``CastLinear``, ``FP8Linear``), ``core/attention.py`` (masked dense NABLA), ``core/block_sparse.py`` (gathered
NABLA); torch 2.14.1 CPU kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.memory import BlockActivations
from .blocks import FF_CHUNK_TOKENS
from .config import K5Config
from .nabla import NablaConfig

FP32 = 4  # bytes of a float32 element
DEVICE_TYPES = ("cuda", "cpu")
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
      the kernel output for them; CPU kernel tiles. Kept for the backward: the bool block-mask rows and the gathered
      row indices. In the backward: the output gradient made contiguous (s·D per token); on CPU (by key block) three
      query-row buffers and one query-gradient buffer per call, and while its plan is built up to 24 bytes per kept
      pair for at most 2^20 pairs (or one head) at a time; elsewhere the workspace again with three query-sized
      buffers (query rows, output gradient, output) and the kernel's key/value/query gradients of one call. With
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
        SizeError (a ValueError): invalid video size (see :func:`~cinetune.k5.memory.k5_tokens`).
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

    Analytic (module docstring), not calibrated: every term is a tensor of ``k5/blocks.py``'s forward, so the numbers
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

    # the GELU output the out_layer adapter reads: recomputed from the GELU input unless under checkpointing
    recomputed = float(s * config.ff_dim) if training and lora_rank else 0.0

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
        saved = max(model.saved.at(m) / m, 0.0)
        return BlockActivations(hidden=model.hidden, forward=max(model.forward_at(m)[1] / m, 0.0), saved=saved,
                                backward=max(model.backward_at(m)[1] / m, 0.0), quadratic=quadratic,
                                recomputed=min(recomputed, saved))

    return ([one("text", text_tokens) for _ in range(config.num_text_blocks)]
            + [one("visual", visual_tokens) for _ in range(config.num_visual_blocks)])
