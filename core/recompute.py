"""Elementwise activations that autograd keeps as their input and recomputes in the backward.

A feed-forward layer ``out(act(h))`` with a trainable LoRA adapter on ``out`` keeps two ``[tokens, F]`` tensors for
its backward: ``h``, which the activation's own backward needs, and ``act(h)``, the input of the adapter's
down-projection (its weight gradient ``∂A = ∂Hᵀ · act(h)``). ``act(h)`` is one cheap elementwise function of ``h``,
so it need not be kept: :func:`mlp` keeps ``h`` in its place and evaluates ``act(h)`` again when the
backward asks for it — selective activation recomputation (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", arXiv 2205.05198, §4.2). The saving is ``tokens · F`` elements per
feed-forward layer for as long as the block's saved tensors live (training without per-block checkpointing: from
the block's forward to its backward); the cost is one activation forward per layer in the backward.

The recomputed tensor is bitwise the one the forward made (the same elementwise kernel on the same input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["mlp"]


@dataclass(frozen=True)
class _Recipe:
    """A saved view of ``activation(source)``: its size, stride and storage offset relative to the full output."""

    activation: Callable[[torch.Tensor], torch.Tensor]
    source: torch.Tensor
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def make(self) -> torch.Tensor:
        full = self.activation(self.source)
        return full.as_strided(self.size, self.stride, full.storage_offset() + self.offset)


def _other_hooks_active() -> bool:
    """Whether saved-tensor hooks are already in force (a checkpointed forward or its recompute, activation
    offloading): those own the saved tensors then, so nothing is replaced. True where torch cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    try:
        return top(False) is not None
    except (RuntimeError, TypeError):
        return True


def mlp(x: torch.Tensor, first: Callable[[torch.Tensor], torch.Tensor],
        activation: Callable[[torch.Tensor], torch.Tensor],
        second: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``second(activation(first(x)))``; where autograd saves the activation's output ``a = activation(h)`` (or a
    view of it) for ``second``'s backward, it keeps ``h = first(x)`` instead and recomputes ``a`` when the
    backward unpacks it.

    Args:
        x: the input, any shape and dtype ``first`` takes.
        first, second: the layers around the activation (e.g. Linear or LoRA layers); ``second`` must not modify
            its input in place.
        activation: an elementwise, deterministic function (e.g. ``F.gelu``) whose output has its input's layout.

    Returns:
        ``second(activation(first(x)))``, the same values and gradients as without recomputation.

    Without autograd, when ``h`` needs no gradient, or while other saved-tensor hooks are in force (per-block
    checkpointing saves nothing in its forward and recomputes the whole block; offloading hooks own every saved
    tensor), this is the plain composition, with ``h`` released before ``second`` runs.
    """
    h = first(x)
    a = activation(h)
    if not (torch.is_grad_enabled() and h.requires_grad and a.numel()) or _other_hooks_active():
        del h
        return second(a)
    # the hooks stay referenced by every tensor they packed: they must not hold the activation itself
    storage, base, dtype, device = a.untyped_storage().data_ptr(), a.storage_offset(), a.dtype, a.device

    def pack(t: torch.Tensor):
        if t.dtype == dtype and t.device == device and t.numel() and t.untyped_storage().data_ptr() == storage:
            return _Recipe(activation, h, tuple(t.shape), tuple(t.stride()), t.storage_offset() - base)
        return t

    def unpack(saved):
        return saved.make() if isinstance(saved, _Recipe) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return second(a)
