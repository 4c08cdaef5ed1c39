"""Attention dispatch: dense attention over three kernels, and block-sparse attention.

Dense attention (:func:`attention`) runs on one of :data:`BACKENDS`:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (always available, supports masks and autograd).
- ``"sageattention"``: ``sageattention.sageattn`` (thu-ml/SageAttention README, ``tensor_layout="HND"``). Quantized
  kernels, forward only.
- ``"flash-attn"``: ``flash_attn.flash_attn_func`` (Dao-AILab/flash-attention README, layout [B, S, H, D]).

Fallbacks to ``"sdpa"`` (each warned once per process) happen when the chosen kernel cannot run the call:
the tensors are not on CUDA, the dtype is not float16/bfloat16, a ``key_padding_mask`` is given (neither kernel's
plain entry point takes a mask), or, for SageAttention only, gradients are needed (it has no backward:
SageAttention issues #60, #229, #317).

Block-sparse attention (:func:`block_sparse_attention`) computes softmax attention in which query block i sees key
block j only where ``block_mask[..., i, j]`` is True. Three paths give the same result (:data:`BLOCK_SPARSE_PATHS`);
:func:`block_sparse_path` says which one runs on a device, in this order of preference:

- ``"flex compiled"`` (CUDA, when ``torch.compile`` can build the kernel): ``torch.nn.attention.flex_attention``
  run through ``torch.compile`` with a ``BlockMask`` whose selected blocks are all *full* blocks (no per-element
  mask), as in kandinskylab/kandinsky-5 ``kandinsky/models/utils.py`` ``nablaT_v2``. Only the compiled kernel skips
  unselected blocks; eager FlexAttention with such a mask silently computes dense attention, so it is never called
  eagerly here. The compiled function is built once per process with ``torch.compile``'s default mode (the official
  code uses ``mode="max-autotune-no-cudagraphs"``, which only tunes kernel tiles and compiles much longer). A
  compile failure (no Triton, an old driver) switches the process to the next path, with a warning. Sequences that
  are not a whole number of blocks take the next path too (the compiled kernel is not used for a short last block).
- ``"gathered"`` (everywhere else: CPU, CUDA without a working compiler, other devices): each query block attends
  the key/value blocks it keeps, gathered into one sequence, through SDPA's fused kernels, with a custom backward
  (on CPU by key block: each key block against the query blocks that keep it; :mod:`cinetune.core.block_sparse`). Dropped blocks cost nothing but their gathers are memory traffic, so the
  speed-up over dense attention is below 1 / kept fraction, and on GPUs (far more FLOPs than bandwidth) may vanish.
- ``"masked dense"`` (only where the gathered path fails on a device, and as a reference): the block mask is expanded
  to a token-level mask and fed to SDPA, a slice of query rows at a time so the expanded mask stays bounded
  (``_DENSE_MASK_ELEMENTS``); under autograd each slice is recomputed in backward instead of keeping its expanded
  mask. The expanded mask is additive (0 / -inf in the query dtype) because SDPA converts a bool mask to that form
  internally anyway. Exact, but it does the full dense work plus the mask traffic: slower than dense attention.

FlexAttention is not used on CPU: it has no backward there, and the all-full-blocks mask fails to compile (measured
with torch 2.14.1). The path a device uses is logged once per process (logger ``cinetune.core.attention``).
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .block_sparse import gathered_attention

BACKENDS = ("sdpa", "sageattention", "flash-attn")

_INSTALL_HINTS = {
    "sageattention": "pip install sageattention",
    "flash-attn": "pip install flash-attn --no-build-isolation",
}
_MODULES = {"sageattention": "sageattention", "flash-attn": "flash_attn"}
_FUNCTIONS = {"sageattention": "sageattn", "flash-attn": "flash_attn_func"}

# Elements of one expanded token mask slice in the masked dense path (2**26: 256 MiB as a float32 additive mask).
_DENSE_MASK_ELEMENTS = 1 << 26

#: Implementations of :func:`block_sparse_attention`, in order of preference.
BLOCK_SPARSE_PATHS = ("flex compiled", "gathered", "masked dense")

_log = logging.getLogger(__name__)
_warned: set[str] = set()
_logged: set[tuple[str, str]] = set()
_kernels: dict[str, Callable | BaseException] = {}
_flex_state: dict[str, object] = {}
_gathered_broken: set[str] = set()  # device types where the gathered path failed


class AttentionBackendError(RuntimeError):
    """An attention backend name is unknown, or the backend's package is not installed or does not import."""


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_kernel(name: str) -> Callable | BaseException:
    """Import a backend's kernel once; return the function, or the import error."""
    if name not in _kernels:
        try:
            module = importlib.import_module(_MODULES[name])
            _kernels[name] = getattr(module, _FUNCTIONS[name])
        except Exception as e:  # a broken CUDA extension raises OSError/RuntimeError, not only ImportError
            _kernels[name] = e
    return _kernels[name]


def available_backends() -> list[str]:
    """Names from :data:`BACKENDS` whose package imports in this Python environment; ``"sdpa"`` is always listed.

    Importability says nothing about the device: the CUDA kernels are still only used on CUDA tensors.
    """
    return ["sdpa"] + [name for name in BACKENDS[1:] if not isinstance(_load_kernel(name), BaseException)]


def check_backend(name: str) -> None:
    """Raise unless ``name`` is a usable attention backend.

    Raises:
        AttentionBackendError: ``name`` is not one of :data:`BACKENDS` (the message lists them), or its package is not
            installed (the message gives the ``pip install`` command), or it is installed but fails to import (the
            message carries the import error).
    """
    if name not in BACKENDS:
        raise AttentionBackendError(
            f"Unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}."
        )
    if name == "sdpa":
        return
    kernel = _load_kernel(name)
    if isinstance(kernel, ModuleNotFoundError) and kernel.name == _MODULES[name]:  # not a missing dependency
        raise AttentionBackendError(
            f"Attention backend {name!r} is not installed. Install it with `{_INSTALL_HINTS[name]}`, "
            f"or choose 'sdpa'."
        )
    if isinstance(kernel, BaseException):
        raise AttentionBackendError(
            f"Attention backend {name!r} is installed but fails to import ({type(kernel).__name__}: {kernel}). "
            f"Reinstall it for this torch/CUDA build (`{_INSTALL_HINTS[name]}`), or choose 'sdpa'."
        )


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{label} must be a 4-D tensor [B, H, S, D]; got {shape}.")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them first.")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}.")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in [B, H, Sk]; got k {tuple(k.shape)} and v {tuple(v.shape)}.")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch B, heads H and head size D."
        )


def _fallback_reason(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool) -> str | None:
    if q.device.type != "cuda":
        return "it runs on CUDA only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16/bfloat16, not {q.dtype}"
    if masked:
        return "it takes no key padding mask"
    if name == "sageattention" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "it has no backward pass (gradients would be wrong)"
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "sdpa",
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention ``softmax(q kᵀ / sqrt(D)) v`` (Vaswani et al. 2017, "Attention Is All You Need", eq. 1).

    Args:
        q: queries [B, H, Sq, D], any float dtype.
        k: keys [B, H, Sk, D], same dtype and device as ``q``.
        v: values [B, H, Sk, Dv], same dtype and device as ``q``.
        backend: one of :data:`BACKENDS`. ``"sageattention"`` and ``"flash-attn"`` run only for CUDA float16/bfloat16
            tensors without a mask (and Sage only when no gradient is needed); otherwise the call falls back to
            ``"sdpa"`` with a one-time warning.
        key_padding_mask: optional bool [B, Sk]; True = real token (attended), False = padding (ignored by every
            query). Every sample needs at least one True: a sample whose keys are all padding has no defined
            softmax (SDPA then returns zeros on CPU; other kernels may return NaN). Not checked, to avoid a host
            sync per call.

    Returns:
        [B, H, Sq, Dv] in the dtype of ``q``. Differentiable with ``"sdpa"`` and ``"flash-attn"``.

    Raises:
        AttentionBackendError: unknown backend, or its package missing (see :func:`check_backend`).
        ValueError: shapes, dtypes or devices of q/k/v or of the mask do not fit together.
    """
    check_backend(backend)
    _check_qkv(q, k, v)
    if key_padding_mask is not None:
        B, Sk = k.shape[0], k.shape[2]
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(
                f"key_padding_mask must be bool [B, Sk] = [{B}, {Sk}] (True = real token); got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}."
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}.")

    if backend != "sdpa":
        reason = _fallback_reason(backend, q, k, v, key_padding_mask is not None)
        if reason is None:
            kernel = _load_kernel(backend)
            if backend == "sageattention":
                return kernel(q, k, v, tensor_layout="HND", is_causal=False)
            out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
            return out.transpose(1, 2)
        _warn_once(f"{backend}:{reason}", f"Attention backend {backend!r} falls back to 'sdpa' here: {reason}.")

    attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# ----------------------------------------------------------------------------------------------------------------
# Block-sparse attention


def _check_block_mask(q: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> int:
    """Validate the block mask against q [B, H, S, D]; return the number of blocks per side, ceil(S / block_size)."""
    B, H, S, _ = q.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}.")
    nb = math.ceil(S / block_size)
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
        desc = f"{block_mask.dtype} {tuple(block_mask.shape)}" if isinstance(block_mask, torch.Tensor) else "no tensor"
        raise ValueError(f"block_mask must be a 4-D bool tensor [B or 1, H or 1, {nb}, {nb}]; got {desc}.")
    b, h, rows, cols = block_mask.shape
    if b not in (1, B) or h not in (1, H) or rows != nb or cols != nb:
        raise ValueError(
            f"block_mask shape {tuple(block_mask.shape)} does not fit q {tuple(q.shape)} with block_size "
            f"{block_size}; expected [{B} or 1, {H} or 1, {nb}, {nb}] (ceil({S} / {block_size}) = {nb} blocks, the "
            f"last one holding the remaining tokens)."
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}.")
    return nb


def _flex_available() -> bool:
    if "flex" not in _flex_state:
        try:
            from torch.nn.attention import flex_attention as flex_module

            _flex_state["flex"] = hasattr(flex_module, "BlockMask") and hasattr(flex_module, "flex_attention")
        except ImportError:
            _flex_state["flex"] = False
    return bool(_flex_state["flex"]) and not _flex_state.get("broken", False)


def block_sparse_path(device: torch.device | str) -> str:
    """Which implementation :func:`block_sparse_attention` uses for tensors on ``device`` (one of
    :data:`BLOCK_SPARSE_PATHS`; shown by the memory-estimate nodes).

    Returns:
        ``"flex compiled"`` on CUDA when FlexAttention is importable and has not failed to compile in this process;
        else ``"gathered"``, unless the gathered path has failed on this device type in this process, then
        ``"masked dense"``.
    """
    kind = torch.device(device).type
    if kind == "cuda" and _flex_available():
        return "flex compiled"
    return "masked dense" if kind in _gathered_broken else "gathered"


def _log_path_once(device: torch.device, path: str) -> None:
    if (device.type, path) not in _logged:
        _logged.add((device.type, path))
        _log.info("Block-sparse (NABLA) attention on %s uses the %s path.", device.type, path)


def flex_block_mask(block_mask: torch.Tensor, block_size: int, *, full_blocks: bool = True):
    """Convert a bool block mask to a FlexAttention ``BlockMask`` that lists exactly the selected blocks.

    Per query block row: count = number of selected key blocks, indices = selected key blocks first, in ascending
    order (stable descending sort of the mask), as kandinskylab/kandinsky-5 ``kandinsky/models/utils.py``
    ``nablaT_v2`` builds them.

    Args:
        block_mask: bool [B or 1, H or 1, Nq, Nk]; True = query block attends key block.
        block_size: tokens per block (both sides).
        full_blocks: True (used on CUDA) lists the blocks as *full* blocks (the kernel skips ``mask_mod`` inside
            them); False lists them as *partial* blocks evaluated with the no-op ``mask_mod``, same result.

    Returns:
        ``torch.nn.attention.flex_attention.BlockMask`` of sequence lengths (Nq·block_size, Nk·block_size).
    """
    from torch.nn.attention.flex_attention import BlockMask

    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    seq_lengths = (block_mask.shape[-2] * block_size, block_mask.shape[-1] * block_size)
    if full_blocks:
        return BlockMask.from_kv_blocks(
            torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=block_size, seq_lengths=seq_lengths
        )
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block_size, seq_lengths=seq_lengths)


def _compiled_flex() -> Callable:
    if "compiled" not in _flex_state:
        from torch.nn.attention.flex_attention import flex_attention

        # dynamic=True as official K5 (kandinsky/models/nn.py): one kernel for every bucket's sequence length.
        _flex_state["compiled"] = torch.compile(flex_attention, dynamic=True)
    return _flex_state["compiled"]  # type: ignore[return-value]


def _masked_dense_rows(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_rows: torch.Tensor,
                       block_size: int) -> torch.Tensor:
    """SDPA for a slice of query blocks. q_rows [B, H, rows, D] (rows ≤ n·bs: the last slice may end with a short
    block); k, v [B, H, S, D]; mask_rows bool [b, h, n, Nb]."""
    b, h, n, nb = mask_rows.shape
    rows, S = q_rows.shape[2], k.shape[2]
    empty = ~mask_rows.any(dim=-1, keepdim=True)  # query blocks that select no key block
    # SDPA turns a bool mask into an additive float mask internally; building the additive mask here (once, from
    # the small block mask) avoids holding both and a conversion pass. A row with no selected key attends
    # everything (a finite softmax, so no NaN reaches the gradients) and is zeroed below, as FlexAttention does.
    bias = torch.zeros(b, h, n, nb, dtype=q_rows.dtype, device=q_rows.device)
    bias.masked_fill_(~(mask_rows | empty), float("-inf"))
    bias = bias[:, :, :, None, :, None].expand(b, h, n, block_size, nb, block_size)
    bias = bias.reshape(b, h, n * block_size, nb * block_size)[:, :, :rows, :S]
    out = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias)
    keep = (~empty).repeat_interleave(block_size, dim=-2)[:, :, :rows].to(out.dtype)
    return out * keep


def _masked_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                  block_size: int) -> torch.Tensor:
    B, H, S, _ = q.shape
    nb = math.ceil(S / block_size)
    rows_per_slice = max(1, _DENSE_MASK_ELEMENTS // (B * H * block_size * S))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs = []
    for r0 in range(0, nb, rows_per_slice):
        r1 = min(nb, r0 + rows_per_slice)
        args = (q[:, :, r0 * block_size : r1 * block_size], k, v, block_mask[:, :, r0:r1], block_size)
        if grad and r1 - r0 < nb:
            outs.append(checkpoint(_masked_dense_rows, *args, use_reentrant=False))
        else:
            outs.append(_masked_dense_rows(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 64,
    path: str | None = None,
) -> torch.Tensor:
    """Block-sparse softmax attention with scale 1/sqrt(D).

    Equals dense attention whose scores are set to -inf wherever ``block_mask[b, h, i // block_size,
    j // block_size]`` is False (query token i, key token j). A query block that selects no key block outputs
    zeros (FlexAttention's convention). NABLA, arXiv 2507.13546, §3; kernel use as in kandinskylab/kandinsky-5
    ``kandinsky/models/nn.py`` ``MultiheadSelfAttentionDec.nabla``.

    Args:
        q, k, v: [B, H, S, D], one dtype and device. S need not be a multiple of ``block_size``: the last block then
            holds the remaining S − (nb − 1)·block_size tokens.
        block_mask: bool [B or 1, H or 1, nb, nb], nb = ceil(S / block_size); True = the query block attends the key
            block.
        block_size: tokens per block (64 for NABLA).
        path: force one of :data:`BLOCK_SPARSE_PATHS` (benchmarks, tests); None (default) takes
            :func:`block_sparse_path` for the device, falling back to the next path when one fails (with a warning).

    Returns:
        [B, H, S, D] in the dtype of ``q``; differentiable on every path.

    Raises:
        ValueError: shapes, dtypes or devices do not fit, or ``path`` is unknown or ``"flex compiled"`` off CUDA.
    """
    _check_qkv(q, k, v)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"block_sparse_attention is self-attention: q, k, v must have one shape [B, H, S, D]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    _check_block_mask(q, block_mask, block_size)
    if path is not None and path not in BLOCK_SPARSE_PATHS:
        raise ValueError(f"Unknown block-sparse path {path!r}; choose one of: {', '.join(BLOCK_SPARSE_PATHS)}.")
    if path == "flex compiled" and (q.device.type != "cuda" or q.shape[2] % block_size):
        raise ValueError("The 'flex compiled' path runs on CUDA tensors whose length is a multiple of block_size; "
                         "choose 'gathered' or 'masked dense'.")
    forced = path is not None
    path = path or block_sparse_path(q.device)
    if path == "flex compiled" and q.shape[2] % block_size:
        path = "gathered"
    if not forced:
        _log_path_once(q.device, path)

    if path == "flex compiled":
        try:
            return _compiled_flex()(q, k, v, block_mask=flex_block_mask(block_mask, block_size))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            # A compile failure (Dynamo/Inductor exceptions) recurs on every call: stop trying in this process. Any
            # other failure falls back for this call only.
            from torch._dynamo.exc import TorchDynamoException

            if forced:
                raise
            compile_failed = isinstance(e, TorchDynamoException)
            if compile_failed:
                _flex_state["broken"] = True
            _warn_once(
                f"flex:{type(e).__name__}",
                f"Compiled FlexAttention failed ({type(e).__name__}: {e}); block-sparse attention "
                f"{'now uses' if compile_failed else 'used'} the gathered path (exact, no compiler; slower than "
                f"compiled FlexAttention).",
            )
            path = "gathered"
    if path == "gathered":
        try:
            return gathered_attention(q, k, v, block_mask, block_size)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:
            # an operation the gathers need is missing on this device: the masked dense path needs only SDPA
            if forced:
                raise
            _gathered_broken.add(q.device.type)
            _warn_once(
                f"gathered:{q.device.type}:{type(e).__name__}",
                f"Gathered block-sparse attention failed on {q.device.type} ({type(e).__name__}: {e}); it now uses "
                f"the masked dense path there, which is exact but slower than dense attention.",
            )
    return _masked_dense(q, k, v, block_mask, block_size)
