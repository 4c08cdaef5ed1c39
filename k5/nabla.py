"""NABLA: adaptive block-sparse self-attention for the Kandinsky 5 visual blocks.

Method: NABLA, arXiv 2507.13546 (§3); Kandinsky 5 implementation in kandinskylab/kandinsky-5
``kandinsky/models/utils.py`` (``fractal_flatten``, ``fast_sta_nabla``, ``nablaT_v2``) and
``kandinsky/models/nn.py`` (``MultiheadSelfAttentionDec.nabla``).

1. Tokens of the (T, Ht, Wt) grid are put in *fractal* order: every 64 consecutive tokens are one 8x8 spatial tile
   of one latent frame (:func:`fractal_permutation`).
2. Queries and keys are mean-pooled over each 64-token block; ``softmax(q̄ k̄ᵀ / sqrt(D))`` over key blocks gives a
   block attention map per head.
3. Top-CDF: in each row keep the blocks whose ascending cumulative mass is >= 1 − P (:func:`topcdf_block_mask`).
4. OR with a sliding-tile (STA) window over the block grid (:func:`sta_block_mask`).
5. Block-sparse attention with that mask (:func:`..core.attention.block_sparse_attention`): compiled FlexAttention
   on CUDA, else the gathered path (each query block attends only its kept key blocks, in plain PyTorch, forward and
   backward; :mod:`..core.block_sparse`), so the dropped blocks are skipped on every device.

Decisions where this module differs from, or pins down, the official code:

- **Precision of the map.** The official code computes the block means, the map and its softmax in the activation
  dtype (bfloat16 in inference). Here they are computed in float32, and the cumulative sum and its comparison with
  1 − P in float64. So a block whose cumulative mass lies within bfloat16 rounding of 1 − P can be kept here and
  dropped officially (or the reverse); the mask is otherwise identical, and it no longer depends on the device's
  float32 scan order, so CPU and CUDA agree.
- **Ties.** The official code sorts with ``torch.sort`` (not stable): among blocks of exactly equal probability the
  order, and hence which of them falls below the threshold, is unspecified (it differs between CPU and CUDA and with
  the row length). Here the sort is stable: among equal probabilities the block with the *lower* key-block index
  comes first in ascending order and is the one dropped. Exact ties occur only for degenerate rows, e.g. a query
  block with zero mean, whose map row is uniform.
- **Resolution.** The token grid height and width must be multiples of 8, i.e. pixel sizes multiples of 128
  (:func:`check_nabla_grid`); no resizing is done here.
- **STA window and switch.** The official window (wT, wH, wW) = (11, 3, 3) is the default. A ComfyUI variant with
  NABLA hard-codes wW = 11 (``comfy/ldm/kandinsky5/utils_nabla.py`` @ 0c84b76), which looks like a slip and is not
  followed. diffusers always ORs the STA mask; here ``NablaConfig.sta`` switches it, as the official ``add_sta``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..core.attention import block_sparse_attention

BLOCK = 64  # tokens per NABLA block: one 8x8 tile of one latent frame
_TILE = 8
# Map elements (per slice of heads) processed at once by the top-CDF step; bounds its transient memory (~0.4 GiB).
_MAP_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class NablaConfig:
    """NABLA settings (kandinskylab/kandinsky-5 ``configs/*.yaml`` ``attention`` section).

    Attributes:
        P: top-CDF threshold in (0, 1]: each query block keeps the key blocks carrying the top P of its block
            attention mass. Official: 0.9 (Lite 10 s, Pro 10 s SD), 0.8 (Pro 5 s HD), 0.7 (Pro 10 s HD).
        window: STA window (wT, wH, wW): a block sees blocks within |Δt| <= wT//2 latent frames and |Δh| <= wH//2,
            |Δw| <= wW//2 tiles of 8x8 tokens. Official (11, 3, 3).
        sta: OR the STA window into the mask (official ``add_sta=True``).

    Raises:
        ValueError: P outside (0, 1], or window not three positive ints.
    """

    P: float = 0.9
    window: tuple[int, int, int] = (11, 3, 3)
    sta: bool = True

    def __post_init__(self) -> None:
        _check_P(self.P)
        object.__setattr__(self, "window", _check_window(self.window))


def _check_P(P: float) -> None:
    if isinstance(P, bool) or not isinstance(P, (int, float)) or not 0.0 < P <= 1.0:
        raise ValueError(f"NABLA threshold P must be a number in (0, 1] (official 0.7–0.9); got {P!r}.")


def _check_window(window) -> tuple[int, int, int]:
    w = tuple(window) if isinstance(window, (tuple, list)) else (window,)
    if len(w) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in w):
        raise ValueError(f"STA window must be three positive ints (wT, wH, wW), e.g. (11, 3, 3); got {window!r}.")
    return w  # type: ignore[return-value]


def _nearest_px(tokens: int) -> str:
    px = tokens * 16  # token = 2 latent pixels = 16 image pixels
    lo, hi = (px // 128) * 128, -(-px // 128) * 128
    return f"{hi}" if lo == 0 else f"{lo} or {hi}"


def check_nabla_grid(T: int, Ht: int, Wt: int) -> None:
    """Check that a token grid can be tiled into NABLA blocks.

    Args:
        T: latent frames (temporal patch size is 1 for K5 video).
        Ht, Wt: token grid height and width (latent H/2, W/2; pixel size / 16).

    Raises:
        ValueError: a size is not a positive int, or Ht or Wt is not a multiple of 8 (pixel height/width not a
            multiple of 128); the message names the nearest valid pixel sizes.
    """
    for name, n in (("T", T), ("Ht", Ht), ("Wt", Wt)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Token grid size {name} must be a positive int; got {n!r}.")
    bad = [(label, n) for label, n in (("height", Ht), ("width", Wt)) if n % _TILE]
    if bad:
        fixes = "; ".join(f"{label} {n * 16} px -> use {_nearest_px(n)} px" for label, n in bad)
        raise ValueError(
            f"NABLA attention tiles each latent frame into 8x8-token blocks, so pixel height and width must be "
            f"multiples of 128; got token grid {Ht}x{Wt} ({Ht * 16}x{Wt * 16} px). Nearest valid sizes: {fixes}. "
            f"Resize the video, or turn NABLA off."
        )


def fractal_permutation(
    T: int, Ht: int, Wt: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token permutation from row-major (t, h, w) order to NABLA fractal order, and its inverse.

    Fractal index of token (t, h, w): ``((t·(Ht/8) + h//8)·(Wt/8) + w//8)·64 + (h%8)·8 + w%8``
    (kandinskylab/kandinsky-5 ``kandinsky/models/utils.py`` ``fractal_flatten`` / ``local_merge``).

    Args:
        T, Ht, Wt: token grid; Ht and Wt multiples of 8.
        device: device of the returned index tensors.

    Returns:
        ``(perm, inv)``, int64 [S] with S = T·Ht·Wt: ``tokens_fractal = tokens_rowmajor[:, perm]`` and
        ``tokens_rowmajor = tokens_fractal[:, inv]`` for tokens [B, S, ...].

    Raises:
        ValueError: as :func:`check_nabla_grid`.
    """
    check_nabla_grid(T, Ht, Wt)
    rowmajor = torch.arange(T * Ht * Wt, device=device).view(T, Ht // _TILE, _TILE, Wt // _TILE, _TILE)
    perm = rowmajor.permute(0, 1, 3, 2, 4).reshape(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, inv


def sta_block_mask(
    T: int, Hb: int, Wb: int, window: tuple[int, int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Sliding-tile (STA) block mask over the NABLA block grid.

    Block (t, h, w), flattened as ``(t·Hb + h)·Wb + w``, may attend block (t', h', w') iff ``|t − t'| <= wT//2``,
    ``|h − h'| <= wH//2`` and ``|w − w'| <= wW//2`` (kandinskylab/kandinsky-5 ``kandinsky/models/utils.py``
    ``fast_sta_nabla``).

    Args:
        T: latent frames; Hb, Wb: blocks per frame along height and width (Ht/8, Wt/8).
        window: (wT, wH, wW), positive ints.
        device: device of the result.

    Returns:
        bool [Nb, Nb], Nb = T·Hb·Wb; True = may attend.

    Raises:
        ValueError: a size is not a positive int, or the window is not three positive ints.
    """
    wT, wH, wW = _check_window(window)
    for name, n in (("T", T), ("Hb", Hb), ("Wb", Wb)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Block grid size {name} must be a positive int; got {n!r}.")
    idx = torch.arange(T * Hb * Wb, device=device)
    t, h, w = idx // (Hb * Wb), (idx // Wb) % Hb, idx % Wb

    def near(c: torch.Tensor, width: int) -> torch.Tensor:
        return (c[:, None] - c[None, :]).abs() <= width // 2

    return near(t, wT) & near(h, wH) & near(w, wW)


@functools.lru_cache(maxsize=8)
def _sta_cached(T: int, Hb: int, Wb: int, window: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    return sta_block_mask(T, Hb, Wb, window, device)


def _check_qk(q: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or q.shape != k.shape:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (q, k)]
        raise ValueError(f"q and k must be tensors of one shape [B, H, S, D]; got {shapes[0]} and {shapes[1]}.")
    if not q.is_floating_point() or not k.is_floating_point():
        raise ValueError(f"q and k must be floating point; got {q.dtype} and {k.dtype}.")
    if not isinstance(block_size, int) or block_size < 1 or q.shape[2] % block_size:
        raise ValueError(
            f"Sequence length {q.shape[2]} must be a multiple of block_size {block_size!r}; with NABLA, tokens are "
            f"T*Ht*Wt with Ht and Wt multiples of 8."
        )


@torch.no_grad()
def topcdf_block_mask(q: torch.Tensor, k: torch.Tensor, P: float, block_size: int = 64) -> torch.Tensor:
    """Top-CDF block mask from block-averaged queries and keys.

    Per batch b and head h: ``q̄_i`` = mean of query block i, ``k̄_j`` = mean of key block j (float32);
    ``p_i = softmax_j(q̄_i · k̄_j / sqrt(D))``; sort ``p_i`` ascending (stable), cumulative sum (float64); keep a block
    iff its cumulative sum is >= 1 − P; scatter back to key-block order. The blocks dropped are the least probable
    ones whose total mass is < 1 − P. NABLA arXiv 2507.13546 §3; kandinskylab/kandinsky-5
    ``kandinsky/models/utils.py`` ``nablaT_v2``. Precision and tie decisions: see the module docstring.

    Args:
        q, k: [B, H, S, D] float (any float dtype), S a multiple of ``block_size``; q, k in fractal order for NABLA.
        P: threshold in (0, 1]; P = 1 keeps every block.
        block_size: tokens per block.

    Returns:
        bool [B, H, S/block_size, S/block_size]; True = query block attends key block. Not differentiable.

    Raises:
        ValueError: shapes, dtype, P or block_size invalid.
    """
    _check_P(P)
    _check_qk(q, k, block_size)
    B, H, S, D = q.shape
    nb = S // block_size
    qa = q.reshape(B, H, nb, block_size, D).mean(dim=-2, dtype=torch.float32)
    ka = k.reshape(B, H, nb, block_size, D).mean(dim=-2, dtype=torch.float32)
    mask = torch.empty(B, H, nb, nb, dtype=torch.bool, device=q.device)
    heads_per_slice = max(1, _MAP_ELEMENTS // (B * nb * nb))
    for h0 in range(0, H, heads_per_slice):
        h1 = min(H, h0 + heads_per_slice)
        probs = torch.softmax(qa[:, h0:h1] @ ka[:, h0:h1].transpose(-1, -2) / math.sqrt(D), dim=-1)
        vals, order = torch.sort(probs, dim=-1, stable=True)
        keep = torch.cumsum(vals, dim=-1, dtype=torch.float64) >= 1.0 - P
        mask[:, h0:h1] = torch.zeros_like(keep).scatter_(-1, order, keep)
    return mask


def _check_grid(q: torch.Tensor, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise ValueError(f"grid must be the token grid (T, Ht, Wt); got {grid!r}.")
    T, Ht, Wt = grid
    check_nabla_grid(T, Ht, Wt)
    if q.dim() != 4 or q.shape[2] != T * Ht * Wt:
        raise ValueError(
            f"q {tuple(q.shape)} must be [B, H, S, D] with S = T*Ht*Wt = {T * Ht * Wt} for grid {tuple(grid)}."
        )
    return T, Ht, Wt


def nabla_block_mask(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], cfg: NablaConfig) -> torch.Tensor:
    """NABLA block mask: top-CDF mask OR (if ``cfg.sta``) the STA window mask.

    Args:
        q, k: [B, H, S, D] in fractal order (:func:`fractal_permutation`), S = T·Ht·Wt.
        grid: token grid (T, Ht, Wt), Ht and Wt multiples of 8.
        cfg: :class:`NablaConfig`.

    Returns:
        bool [B, H, Nb, Nb], Nb = S/64 = T·(Ht/8)·(Wt/8).

    Raises:
        ValueError: grid invalid or not matching S; q/k invalid (see :func:`topcdf_block_mask`).
    """
    T, Ht, Wt = _check_grid(q, grid)
    mask = topcdf_block_mask(q, k, cfg.P, BLOCK)
    if cfg.sta:
        mask |= _sta_cached(T, Ht // _TILE, Wt // _TILE, cfg.window, q.device)
    return mask


def nabla_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], cfg: NablaConfig
) -> torch.Tensor:
    """NABLA self-attention: :func:`..core.attention.block_sparse_attention` with :func:`nabla_block_mask`.

    Args:
        q, k, v: [B, H, S, D] already in fractal order, one dtype and device; S = T·Ht·Wt.
        grid: token grid (T, Ht, Wt), Ht and Wt multiples of 8.
        cfg: :class:`NablaConfig`.

    Returns:
        [B, H, S, D] in fractal order, dtype of q. Differentiable in q, k, v through the attention (the mask itself
        is a non-differentiable selection, as in the official code).

    Raises:
        ValueError: grid, shapes or dtypes invalid.
    """
    return block_sparse_attention(q, k, v, nabla_block_mask(q, k, grid, cfg), block_size=BLOCK)
