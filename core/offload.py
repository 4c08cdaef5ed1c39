"""Model placement for inference and training: a whole model on the compute device with its last blocks streamed
by block swap (:func:`model_on_device`), and musubi-tuner's per-list split of a swap count
(:func:`split_blocks_to_swap`).

Block swap itself lives in its own modules, whose public names are gathered here:

- :mod:`cinetune.core.block_swap`: :class:`BlockSwap`, the schedule (its docstring holds the mechanism, the
  training invariant and the decisions).
- :mod:`cinetune.core.offload_transfer`: the transfer backends (:class:`Transfer`, :class:`SyncTransfer`,
  :class:`CudaTransfer`, :func:`default_transfer`).
- :mod:`cinetune.core.offload_host`: host masters (pinned or pageable buffers, :func:`host_tensors`,
  :data:`ALIGN_BYTES`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .block_swap import BlockSwap
from .offload_host import ALIGN_BYTES, host_tensors
from .offload_transfer import CudaTransfer, SyncTransfer, Transfer, default_transfer

__all__ = ["ALIGN_BYTES", "BlockSwap", "CudaTransfer", "SyncTransfer", "Transfer", "default_transfer", "host_tensors",
           "model_on_device", "split_blocks_to_swap"]


def split_blocks_to_swap(n_text: int, n_visual: int, blocks_to_swap: int) -> tuple[int, int]:
    """musubi-tuner's split of one ``blocks_to_swap`` between the K5 text and visual block lists (k5.md §8).

    ``text = min(n_text // 2, N // 4)``, ``visual = min(N − text, n_visual − 2)`` (at least 1 when N ≥ 1), so at most
    ``n_text // 2 + n_visual − 2`` blocks: 31 for Lite (2 + 32 blocks), 60 for Pro (4 + 60). Cinetune itself swaps
    the last N of the combined list with one :class:`BlockSwap`; use this to reproduce musubi-tuner's numbers with one
    BlockSwap per list.

    Args:
        n_text, n_visual: block counts (≥ 0; n_visual ≥ 3 when N ≥ 1). blocks_to_swap: N ≥ 0.

    Returns:
        ``(text_to_swap, visual_to_swap)``, summing to N.

    Raises:
        ValueError: negative counts, or N above the maximum (the message gives it).
    """
    for name, v in (("n_text", n_text), ("n_visual", n_visual), ("blocks_to_swap", blocks_to_swap)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int ≥ 0, got {v!r}")
    if blocks_to_swap == 0:
        return 0, 0
    maximum = n_text // 2 + max(n_visual - 2, 0)
    if blocks_to_swap > maximum:
        raise ValueError(f"blocks_to_swap={blocks_to_swap} exceeds musubi-tuner's maximum {maximum} for {n_text} "
                         f"text + {n_visual} visual blocks (half the text blocks + all visual blocks but 2)")
    text = min(n_text // 2, blocks_to_swap // 4)
    visual = max(1, blocks_to_swap - text)
    return text, visual


@contextmanager
def model_on_device(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device | str, *,
                    blocks_to_swap: int = 0, pin_memory: bool | None = None, ring_size: int = 2,
                    offload_device: torch.device | str = "cpu"):
    """Run ``model`` on ``device`` with its last ``blocks_to_swap`` blocks streamed by a :class:`BlockSwap`.

    Everything outside ``blocks`` (embeddings, norms, output layer) moves to ``device`` as is; the blocks are
    placed by :class:`BlockSwap`. On exit the swap is closed and the model is back on ``offload_device``, also
    when the body raises (an interrupt, an out-of-memory error).

    Args:
        model: the whole network. blocks: its blocks in execution order (each also inside ``model``).
        blocks_to_swap, pin_memory, ring_size: as :class:`BlockSwap`.
        offload_device: where the model is left on exit; blocks go to the CPU instead when ``blocks_to_swap > 0``.

    Yields:
        The :class:`BlockSwap`.

    Raises:
        ValueError: as :class:`BlockSwap` (e.g. blocks_to_swap above the block count, with the maximum).
        FP8DeviceError: the model holds fp8 weights and ``device`` cannot cast float8 (the message says to load
            with weight_dtype bf16).
    """
    if any(t.dtype == torch.float8_e4m3fn for t in model.parameters()):
        from .quant import check_fp8_device

        check_fp8_device(device)
    in_blocks = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}

    def move_rest(dev) -> None:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in in_blocks:
                    p.data = p.data.to(dev)
            for name, b in module._buffers.items():
                if b is not None and id(b) not in in_blocks:
                    module._buffers[name] = b.to(dev)

    # Callers may run under inference mode (ComfyUI executes nodes in it); tensors created there would become
    # inference tensors for good and a later training run on the same model could not use them.
    with torch.inference_mode(False):
        swap = BlockSwap(blocks, blocks_to_swap, device=device, ring_size=ring_size, pin_memory=pin_memory)
    try:
        with torch.inference_mode(False):
            move_rest(device)
        yield swap
    finally:
        with torch.inference_mode(False):
            # Swapped blocks go back to the CPU even when the host parks idle models on the GPU (ComfyUI
            # --highvram): a model that needed block swap does not fit there.
            swap.close(device=offload_device if blocks_to_swap == 0 else "cpu")
            move_rest(offload_device)
