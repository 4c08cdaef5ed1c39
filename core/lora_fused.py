"""LoRA-wrapped Linear layers that read the same input, trained with fewer and larger GEMMs.

An attention's ``to_q``, ``to_k`` and ``to_v`` (or the ``to_k`` / ``to_v`` of a cross-attention) read the same
tokens. Run one by one, each LoRA layer adds a rank-r down-projection (a GEMM with r output columns, which uses the
hardware poorly) and, in the backward, two more GEMMs of depth or width r over the input, and autograd sums the
layers' input gradients with extra passes. :func:`fused_projections` computes the same values with one GEMM for all
the down-projections and one buffer for the input gradient:

forward, for ``x [N, in]`` and layers i with weight ``W_i [out_i, in]``, bias ``b_i``, LoRA ``A_i [r_i, in]``,
``B_i [out_i, r_i]`` and scale ``c_i = multiplier · alpha / rank`` (Hu et al. 2021, arXiv:2106.09685, eq. 3)::

    H = x [A_1; A_2; …]ᵀ                          one GEMM for every down-projection, [N, Σ r_i]
    y_i = x W_iᵀ + b_i + c_i · (H_i ⊙ M_i) B_iᵀ   M_i: the dropout masks (1 without dropout); the update is
                                                  accumulated into the base output by the GEMM (addmm_)

backward, with the output gradients ``g_i`` and ``G_i = c_i · (g_i B_i) ⊙ M_i``::

    ∂x = Σ g_i W_i + [G_1, G_2, …] [A_1; A_2; …]  accumulated GEMM by GEMM into one buffer, the LoRA part as one
                                                  GEMM of depth Σ r_i
    ∂[A_1; A_2; …] = [G_1, G_2, …]ᵀ x             one GEMM
    ∂B_i = c_i · g_iᵀ (H_i ⊙ M_i),   ∂W_i = g_iᵀ x,   ∂b_i = Σ_rows g_i   (the last two only when they train)

Decisions:

- **The base projections stay separate GEMMs.** One GEMM over the concatenated weights ``x [W_q; W_k; W_v]ᵀ`` was
  measured on the CPU (the attentions of the LTX-2 training-step benchmark, float32, 1 and 2 threads) and was no
  faster than the separate GEMMs, while it needs a concatenated copy of the weights per call (100 MB per attention
  of the 19B in bf16) and leaves the outputs as strided column views. Kept: the shared down-projection and the
  one-buffer input gradient.
- **Nothing more is kept for the backward** than the layers keep when run one by one: ``x``, the layers' own
  parameters, ``H`` and the dropout masks.
- **Dropouts draw exactly what the layers draw one by one** (:class:`~cinetune.core.lora.LoRALinear`): per layer in
  order, the module-dropout draw, the dropout mask (``F.dropout`` of ones of the down-projection's shape: the same
  draws and the same factor 1/(1−p)) and the rank mask, so a fused and a separate run from the same generator state
  give the same result, and ``torch.utils.checkpoint`` recomputes the same masks.
- **Fused only under autograd and only when nothing can tell the difference** (:func:`can_fuse`). Without a graph
  (sampling) the layers are called one by one: the gain is in the backward. Every layer must be a plain
  ``nn.Linear`` / :class:`~cinetune.core.quant.CastLinear` (exact type: no fp8 layer, no subclass with its own
  forward) or a :class:`~cinetune.core.lora.LoRALinear` directly over one, at least one with an adapter, weights in
  the input's dtype on its device, and no forward or backward hooks on the layers or globally (a hook must see each
  call). Block swap hooks whole blocks and does not prevent it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from .lora import LoRALinear
from .quant import CastLinear

__all__ = ["can_fuse", "fused_projections"]

_PLAIN_LINEARS = (nn.Linear, CastLinear)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _split(layer: nn.Module) -> tuple[nn.Module, LoRALinear | None] | None:
    """(plain base Linear, adapter or None) of a layer the fused path can run, else None."""
    lora = None
    if type(layer) is LoRALinear:
        if _has_hooks(layer):
            return None
        lora, layer = layer, layer.base
    if type(layer) not in _PLAIN_LINEARS or _has_hooks(layer):
        return None
    return layer, lora


def can_fuse(x: torch.Tensor, layers: Sequence[nn.Module]) -> bool:
    """Whether :func:`fused_projections` may run ``layers`` on ``x`` fused (module notes): at least two layers, each
    a plain Linear (exact ``nn.Linear`` / ``CastLinear`` type) or a ``LoRALinear`` directly over one, at least one
    ``LoRALinear``, weights and biases in ``x.dtype`` on ``x.device``, ``in_features == x.shape[-1]``, no module or
    global hooks. fp8 layers, stacked adapters and weights cast at use are not fused."""
    if len(layers) < 2 or x.ndim < 1 or _global_hooks():
        return False
    adapters = 0
    for layer in layers:
        parts = _split(layer)
        if parts is None:
            return False
        base, lora = parts
        adapters += lora is not None
        if base.in_features != x.shape[-1]:
            return False
        for t in (base.weight, base.bias):
            if t is not None and (t.dtype != x.dtype or t.device != x.device):
                return False
    return adapters > 0


@dataclass(frozen=True)
class _Layer:
    """One layer of a fused call: its adapter for this call — rank 0 = no adapter (none, multiplier 0, or skipped by
    module dropout) — with the scale c including the rank-dropout factor, and whether a dropout mask applies."""

    rank: int = 0
    scale: float = 0.0
    masked: bool = False


def _adapter_call(lora: LoRALinear | None, x2d: torch.Tensor, lead: torch.Size
                  ) -> tuple[_Layer, torch.Tensor | None]:
    """The adapter's settings for this call and its mask ``[N, r]`` (or None), drawing the random numbers in
    :meth:`LoRALinear.forward`'s order: module dropout, dropout, rank dropout."""
    if lora is None or lora.multiplier * lora.scale == 0.0:
        return _Layer(), None
    c = lora.multiplier * lora.scale
    if not (lora.training and (lora.dropout or lora.rank_dropout or lora.module_dropout)):
        return _Layer(lora.rank, c), None
    if lora.module_dropout and torch.rand(()) < lora.module_dropout:
        return _Layer(), None
    mask = None
    N, r = x2d.shape[0], lora.rank
    if lora.dropout:
        mask = F.dropout(x2d.new_ones(N, r), lora.dropout, training=True)
    if lora.rank_dropout:
        shape = (lead[0],) + (1,) * (len(lead) - 1) + (r,) if lead else (r,)
        keep = (torch.rand(shape, device=x2d.device) > lora.rank_dropout).to(x2d.dtype)
        keep = keep.expand(*lead, r).reshape(N, r) if lead else keep.expand(N, r)
        mask = keep if mask is None else mask * keep
        c = c / (1.0 - lora.rank_dropout)
    return _Layer(r, c, mask is not None), mask


def _offsets(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


class _FusedProjection(torch.autograd.Function):
    """The forward and backward of the module notes.

    ``apply(x [N, in], layout, has_bias, *tensors)``: ``layout`` one :class:`_Layer` per layer, ``has_bias`` one bool
    per layer, ``tensors`` the weights (one per layer), the biases of the layers that have one (in order), then per
    active adapter ``A, B, mask`` (mask ``[N, r]`` or None). Returns ``y_i [N, out_i]``.
    """

    @staticmethod
    def forward(ctx, x, layout, has_bias, *tensors):
        n, n_bias = len(layout), sum(has_bias)
        weights, biases_given, adapters = tensors[:n], iter(tensors[n:n + n_bias]), tensors[n + n_bias:]
        downs, ups, masks = adapters[0::3], adapters[1::3], adapters[2::3]
        ys = [F.linear(x, w, next(biases_given) if b else None) for w, b in zip(weights, has_bias)]
        h = torch.mm(x, torch.cat(downs).t()) if len(downs) > 1 else torch.mm(x, downs[0].t())
        ranks = _offsets([lay.rank for lay in layout if lay.rank])
        for j, i in enumerate(i for i, lay in enumerate(layout) if lay.rank):
            hj = h[:, ranks[j]:ranks[j + 1]]
            if masks[j] is not None:
                hj = hj * masks[j]
            ys[i].addmm_(hj, ups[j].t(), alpha=layout[i].scale)
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.has_bias = layout, has_bias
        needs, first_adapter = ctx.needs_input_grad, 3 + n + n_bias
        keep_x = any(needs[3:3 + n]) or any(needs[first_adapter::3])  # for ∂W_i, ∂A
        keep_h = any(needs[first_adapter + 1::3])  # for ∂B
        ctx.save_for_backward(x if keep_x else None, h if keep_h else None, *weights, *downs, *ups,
                              *(m for m in masks if m is not None))
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        layout, has_bias = ctx.layout, ctx.has_bias
        n, n_bias = len(layout), sum(has_bias)
        active = [i for i, lay in enumerate(layout) if lay.rank]
        k = len(active)
        x, h, *saved = ctx.saved_tensors
        weights, downs, ups, masks = saved[:n], saved[n:n + k], saved[n + k:n + 2 * k], iter(saved[n + 2 * k:])
        needs = ctx.needs_input_grad
        first_bias, first_adapter = 3 + n, 3 + n + n_bias  # positions in needs_input_grad

        grad_x, grad_weights, grad_biases = None, [None] * n, []
        for i, (g, w) in enumerate(zip(grads, weights)):
            if has_bias[i]:
                wanted = g is not None and needs[first_bias + len(grad_biases)]
                grad_biases.append(g.sum(0) if wanted else None)
            if g is None:
                continue
            if needs[3 + i]:
                grad_weights[i] = g.t().mm(x)
            if needs[0]:
                grad_x = g.mm(w) if grad_x is None else grad_x.addmm_(g, w)

        ranks = _offsets([layout[i].rank for i in active])
        rows = next(g.shape[0] for g in grads if g is not None)
        grad_adapters = [[None, None, None] for _ in active]
        g_h = []  # G_j = c_j · (g_j B_j) ⊙ M_j, zeros where an output got no gradient
        for j, i in enumerate(active):
            g, lay = grads[i], layout[i]
            mask = next(masks) if lay.masked else None
            if g is None:
                g_h.append(weights[0].new_zeros(rows, lay.rank))
                continue
            if needs[first_adapter + 3 * j + 1]:
                hj = h[:, ranks[j]:ranks[j + 1]]
                grad_adapters[j][1] = g.t().mm(hj if mask is None else hj * mask).mul_(lay.scale)
            gj = g.mm(ups[j]).mul_(lay.scale)
            g_h.append(gj if mask is None else gj.mul_(mask))
        if any(grads[i] is not None for i in active):
            gh = torch.cat(g_h, dim=1) if k > 1 else g_h[0]
            if needs[0]:
                down = torch.cat(downs) if k > 1 else downs[0]
                grad_x = gh.mm(down) if grad_x is None else grad_x.addmm_(gh, down)
            if any(needs[first_adapter + 3 * j] for j in range(k)):
                grad_down = gh.t().mm(x)
                for j, i in enumerate(active):
                    if needs[first_adapter + 3 * j] and grads[i] is not None:
                        grad_adapters[j][0] = grad_down[ranks[j]:ranks[j + 1]]
        return (grad_x, None, None, *grad_weights, *grad_biases, *(t for a in grad_adapters for t in a))


def fused_projections(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Apply Linear layers that read the same input — each ``nn.Linear`` /
    :class:`~cinetune.core.quant.CastLinear` or a :class:`~cinetune.core.lora.LoRALinear` over one — fused as in the
    module notes while autograd records and :func:`can_fuse` allows, else one by one.

    The result equals ``[layer(x) for layer in layers]`` up to float rounding (the down-projections are one GEMM),
    including the LoRA dropouts and their random draws in training mode, and so do the gradients of ``x``, the
    adapters and any trainable base weight or bias.

    Args:
        x: input ``[..., in]`` in the compute dtype (the layers' weight dtype for fusion).
        layers: the modules, in the order their one-by-one calls would draw random numbers.

    Returns:
        ``[y_i [..., out_i]]`` in ``x.dtype``.

    Raises:
        RuntimeError: (as the layers) the input's last dimension is not the layers' ``in_features``.
    """
    if not (torch.is_grad_enabled() and can_fuse(x, layers)):
        return [layer(x) for layer in layers]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    bases, layout, adapters = [], [], []
    for layer in layers:
        base, lora = _split(layer)
        call, mask = _adapter_call(lora, x2d, lead)
        bases.append(base)
        layout.append(call)
        if call.rank:
            adapters += [lora.lora_down.to(x.dtype), lora.lora_up.to(x.dtype), mask]
    if not adapters:  # every adapter is off for this call (multiplier 0 or module dropout): the base layers only
        return [F.linear(x, base.weight, base.bias) for base in bases]
    has_bias = tuple(base.bias is not None for base in bases)
    outs = _FusedProjection.apply(x2d, tuple(layout), has_bias, *(base.weight for base in bases),
                                  *(base.bias for base in bases if base.bias is not None), *adapters)
    return list(outs) if len(lead) == 1 else [o.view(*lead, o.shape[-1]) for o in outs]
