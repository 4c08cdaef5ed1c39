"""Weights stored in a dtype other than the compute dtype: cast-at-use Linear and weight-only fp8 Linear.

- :class:`CastLinear` is ``nn.Linear`` whose weight and bias may be stored in any float dtype (bf16 weights with an fp32
  input, fp32 modulation weights in a bf16 model, plain fp8 weights); they are cast to the input's dtype per call.
- :class:`FP8Linear` stores the weight as ``float8_e4m3fn`` with one float32 scale per tensor
  (``scale = amax(|W|) / 448``, 448 = largest finite e4m3fn value, OCP 8-bit floating point specification v1.0)
  and dequantises it per call: ``W ≈ weight.to(dtype) · scale``. Weight-only: activations stay in the compute
  dtype. The scale is a buffer named ``scale_weight``, the name ComfyUI's "scaled fp8" checkpoints and
  kohya-ss/musubi-tuner ``src/musubi_tuner/modules/fp8_optimization_utils.py`` use for the same role, so the
  state-dict keys of the weight stay the official ones (``….weight``) and the scale sits beside them
  (``….scale_weight``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


class CastLinear(nn.Linear):
    """``nn.Linear`` that casts its weight and bias to the input dtype at use.

    Same parameters and state-dict keys as ``nn.Linear`` (``weight [out, in]``, ``bias [out]``); each may be stored in
    any float dtype (including float8 without a scale). Input ``[..., in]`` in the compute dtype; output
    ``[..., out]`` in the input dtype. Casting a tensor to its own dtype is free, so a uniform-dtype model pays nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled float8_e4m3fn quantisation of a weight.

    ``scale = amax(|W|) / 448`` (1.0 for an all-zero weight), ``q = clamp(W / scale, ±448).to(float8_e4m3fn)``,
    computed in float32. Round-to-nearest-even on the cast; relative error per element ≤ 2⁻⁴ for normal values
    (3 mantissa bits).

    Args:
        weight: any float tensor (typically [out, in]), any device.

    Returns:
        ``(q, scale)``: ``q`` float8_e4m3fn of ``weight``'s shape; ``scale`` float32 0-d tensor, same device.

    Raises:
        ValueError: the weight holds NaN or infinity (the checkpoint is damaged).
    """
    w = weight.detach().float()
    amax = w.abs().max() if w.numel() else torch.zeros((), device=w.device)
    if not torch.isfinite(amax):
        raise ValueError("Cannot quantise a weight holding NaN or infinity to fp8; the checkpoint is damaged.")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


class FP8Linear(nn.Module):
    """Linear layer with a float8_e4m3fn weight and a per-tensor float32 scale (weight-only fp8).

    Attributes (state-dict keys):
        weight: float8_e4m3fn ``[out, in]`` (no gradient).
        scale_weight: float32 0-d buffer; the real weight is ``weight · scale_weight``.
        bias: ``[out]`` in high precision (its stored dtype) or None.

    ``forward(x)``: ``x [..., in]`` → ``[..., out]`` in ``x.dtype``, computed as
    ``F.linear(x, weight.to(x.dtype) · scale, bias.to(x.dtype))``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantise an ``nn.Linear`` (see :func:`quantize_fp8`). A meta-device layer gives a meta-device FP8Linear
        (shapes and dtypes only; fill it with ``load_state_dict(..., assign=True)``). The bias keeps its dtype."""
        w = linear.weight
        has_bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, has_bias, device="meta",
                    bias_dtype=linear.bias.dtype if has_bias else torch.float32)
        if w.device.type == "meta":
            return layer
        q, scale = quantize_fp8(w)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.scale_weight = scale
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` as ``dtype``: ``weight.to(dtype) · scale`` (rounded once to ``dtype``)."""
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8_e4m3fn")


def quantize_linear_weights_fp8(model: nn.Module, *, keep: Callable[[str], bool]) -> int:
    """Replace every ``nn.Linear`` in ``model`` whose qualified name is not kept by an :class:`FP8Linear`.

    Works on real weights (quantised now) and on meta-device models (structure only, for loading with ``assign=True``).

    Args:
        model: any module; replaced in place.
        keep: ``keep(name) -> True`` keeps the Linear at ``name`` (e.g. ``"out_layer.out_layer"``) in high precision.

    Returns:
        Number of Linear layers replaced.
    """
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not keep(name)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(getattr(parent, child)))
    return len(targets)


_K5_HIGH_PRECISION_PREFIXES = ("time_embeddings.", "text_embeddings.", "pooled_text_embeddings.",
                               "visual_embeddings.", "out_layer.")


def k5_fp8_keep_high_precision(name: str) -> bool:
    """Kandinsky 5 rule for weight-only fp8: which Linear layers stay in high precision.

    Kept: the time, text, pooled-text and visual embeddings, every modulation (``*modulation*``: they compute shift,
    scale and gate in float32 for every block), norms, and the final ``out_layer.*`` (it produces the velocity
    directly). Quantised: the attention projections and both feed-forward layers of every text and visual block —
    86 % of the Lite parameters (88 % of Pro); the modulations hold most of the rest (14 % / 12 %).

    Sources and choice: the official fp8 recipe (ai-forever ``create_fp8_full.py``, torchao dynamic-activation fp8)
    keeps the embeddings and the out layer in high precision; kohya-ss/musubi-tuner (``kandinsky5``, ``--fp8_scaled``)
    quantises only keys under the text/visual blocks and the out layer, never norms. Here the embeddings and the out
    layer are kept as officially, and the modulations too although both sources quantise them: their output (shift,
    scale and gate of every block, computed in float32 on purpose) acts on every token, so fp8 there would trade
    accuracy in every block for 14 % of the weight memory. The
    official recipe also keeps every ``feed_forward.out_layer`` because it quantises *activations* and the GELU output
    has a long tail; with weight-only fp8 (activations stay in the compute dtype) that reason does not apply, so those
    layers are quantised here, as in musubi-tuner.

    Args:
        name: qualified module name inside the DiT, e.g. ``"visual_transformer_blocks.3.self_attention.to_query"``.

    Returns:
        True to keep the layer in high precision.
    """
    full = name + "."
    return full.startswith(_K5_HIGH_PRECISION_PREFIXES) or "modulation" in name or "norm" in name
