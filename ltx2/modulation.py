"""The elementwise layers of the LTX-2 DiT block: the AdaLN modulation values per distinct timestep, parameter-free
and weighted RMSNorm (with the CPU path and its hand-written backward), the scale/shift modulation, and the gated
residual.

RMSNorm: ``y = x · ρ · w`` with ``ρ = 1/sqrt(mean(x²) + eps)`` over the last dim (Zhang & Sennrich 2019, "Root Mean
Square Layer Normalization", arXiv:1910.07467, eq. 4); modulation ``normed · (1 + scale) + shift`` and residual
``x + update · gate`` as the official ``BasicAVTransformerBlock`` (Lightricks/LTX-2
``packages/ltx-core/src/ltx_core/model/transformer/transformer.py``).

Decisions:

- **Modulation per distinct timestep**: the AdaLNs run once per distinct σ (:class:`TokenTimesteps`) and each token
  picks its row (:meth:`AdaValues.take`); see :mod:`cinetune.ltx2.dit`.
- **RMSNorm on the CPU** is computed as one float32-accumulated reduction and one product (``F.rms_norm`` has no
  fused CPU kernel and runs as five passes there); other devices use ``F.rms_norm``. Same values up to rounding.
  Under autograd it has a hand-written backward (:class:`CPURMSNorm`) that keeps only its input and 1/RMS, with the
  AdaLN modulation folded in.
- **Temporaries reused without autograd**: when no graph is recorded, :func:`scale_shift` and :func:`residual` write
  into buffers that only they hold (:func:`owned`); with autograd the same formulas run out of place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TokenTimesteps", "AdaValues", "owned", "inv_rms", "CPURMSNorm", "rms", "scale_shift", "modulated",
           "residual"]


@dataclass(frozen=True)
class TokenTimesteps:
    """The σ of every token of one modality, stored once per distinct value.

    Attributes:
        rows: float32 ``[R]`` distinct σ values.
        index: long ``[B, T]`` row of each token, or None when every token of sample b uses row b (R = B).
    """

    rows: torch.Tensor
    index: torch.Tensor | None

    @staticmethod
    def from_sigma(sigma: torch.Tensor) -> TokenTimesteps:
        """``sigma`` float ``[B, T]`` → rows + index (one host synchronisation)."""
        sigma = sigma.float()
        if bool((sigma == sigma[:, :1]).all()):
            return TokenTimesteps(sigma[:, 0].contiguous(), None)
        rows, index = torch.unique(sigma, return_inverse=True)
        return TokenTimesteps(rows, index)


@dataclass(frozen=True)
class AdaValues:
    """Output of an AdaLN for the distinct timesteps of a :class:`TokenTimesteps`.

    Attributes:
        values: ``[R, k·D]`` in the compute dtype (k = rows of modulation).
        index: as :attr:`TokenTimesteps.index`.
    """

    values: torch.Tensor
    index: torch.Tensor | None

    def take(self, table_row: torch.Tensor, i: int) -> torch.Tensor:
        """Modulation vector ``table_row + values[:, i]`` for every token: ``[B, T, D]``, or ``[B, 1, D]`` when all
        tokens of a sample share their timestep. table_row ``[D]`` (any float dtype)."""
        D = table_row.shape[-1]
        v = self.values.view(self.values.shape[0], -1, D)[:, i]
        row = table_row.to(v.dtype) + v
        return row.unsqueeze(1) if self.index is None else row[self.index]



def owned(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as the ``out=`` buffer of an elementwise op when no autograd graph is recorded, else None (a new
    tensor). Only for temporaries nothing else holds."""
    return None if torch.is_grad_enabled() else t


def inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1/sqrt(mean(x²) + eps)`` over the last dim: ``[..., 1]`` in ``x.dtype`` (accumulated in float32, or
    float64 for float64 x)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return (norm.square() / x.shape[-1] + eps).rsqrt().to(x.dtype)


class CPURMSNorm(torch.autograd.Function):
    """``y = x·ρ·w (+ shift)`` with ``ρ = 1/sqrt(mean(x²) + eps)`` over the last dim (Zhang & Sennrich 2019, "Root
    Mean Square Layer Normalization", arXiv:1910.07467, eq. 4) and a hand-written backward, for the CPU under
    autograd. ``w`` is a norm weight, or ``1 + scale`` of an AdaLN modulation (then with its shift).

    Backward, with ``u = g·w`` and D the width: ``∂L/∂x = ρ·u − x·ρ³·(u·x)/D`` (the chain rule through the mean of
    squares), ``∂L/∂w = Σ g·x·ρ`` and ``∂L/∂shift = Σ g`` over the broadcast dims. Four passes and one reduction,
    keeping x, ρ and w; autograd over the forward formula keeps the norm too and runs about twice as many passes
    (the norm's backward adds a ``masked_fill``) with more full-size temporaries.

    x ``[..., D]`` any float dtype; w and shift broadcastable to x (``[D]``, ``[B, 1, D]`` or ``[B, T, D]``) in x's
    dtype, or None; returns ``[..., D]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        rho = inv_rms(x, eps)
        y = torch.mul(x, rho)
        if shift is not None:
            torch.addcmul(shift, y, weight, out=y)
        elif weight is not None:
            y.mul_(weight)
        ctx.save_for_backward(x, rho, weight)
        ctx.shift_shape = None if shift is None else shift.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rho, weight = ctx.saved_tensors
        grad_weight = grad_shift = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (grad * x * rho).sum_to_size(weight.shape)
        if ctx.shift_shape is not None and ctx.needs_input_grad[3]:
            grad_shift = grad.sum_to_size(ctx.shift_shape)
        u = grad if weight is None else grad * weight
        if x.dtype in (torch.float32, torch.float64):  # a batched dot product: no full-size temporary
            dot = torch.einsum("...d,...d->...", u, x).unsqueeze(-1)
        else:
            dot = torch.sum(u * x, dim=-1, keepdim=True, dtype=torch.float32)
        coefficient = (rho.to(dot.dtype).pow(3) * dot / x.shape[-1]).to(x.dtype)
        grad_x = torch.mul(u, rho, out=None if weight is None else u)
        return grad_x.addcmul_(x, coefficient, value=-1), grad_weight, None, grad_shift


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type != "cpu":
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    if torch.is_grad_enabled():
        return CPURMSNorm.apply(x, None, eps)
    # On the CPU F.rms_norm runs as five elementwise passes; one reduction and one product do the same.
    return x * inv_rms(x, eps)


def scale_shift(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, reuse: bool) -> torch.Tensor:
    """``normed·(1 + scale) + shift``; ``reuse``: written into ``normed``'s buffer when no graph is recorded."""
    return torch.addcmul(shift, normed, 1 + scale, out=owned(normed) if reuse else None)


def modulated(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type == "cpu" and torch.is_grad_enabled():
        return CPURMSNorm.apply(x, 1 + scale, eps, shift)
    return scale_shift(rms(x, eps), scale, shift, reuse=True)


def residual(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``x + update·gate`` (``x + update`` without a gate) in one pass; when no graph is recorded the sum goes into
    ``update``'s buffer (a module output nothing else holds), so the stream is never modified in place."""
    out = owned(update)
    return torch.add(x, update, out=out) if gate is None else torch.addcmul(x, update, gate, out=out)
