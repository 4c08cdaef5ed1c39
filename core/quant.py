"""Weights stored in a dtype other than the compute dtype: cast-at-use Linear, weight-only fp8 Linear, and the
scaled-fp8 checkpoint formats (reading and writing).

- :class:`CastLinear` is ``nn.Linear`` whose weight and bias may be stored in any float dtype (bf16 weights with an fp32
  input, fp32 modulation weights in a bf16 model, plain fp8 weights); they are cast to the input's dtype per call.
- :class:`FP8Linear` stores the weight as ``float8_e4m3fn`` with float32 scales and dequantises it per call
  (weight-only: activations stay in the compute dtype). The scale is a buffer named ``scale_weight``, the name
  ComfyUI's "scaled fp8" checkpoints and kohya-ss/musubi-tuner ``src/musubi_tuner/modules/fp8_optimization_utils.py``
  use for the same role, so the state-dict keys stay the official ones (``<layer>.weight``) with the scale beside
  them (``<layer>.scale_weight``). Scale layouts, for a weight ``W [out, in]`` and its fp8 codes ``q [out, in]``:

  ==================  ==================================  ================================================
  ``scale_weight``    meaning                             ``W ≈``
  ==================  ==================================  ================================================
  ``[]`` or ``[1]``   one scale per tensor                ``q · s``
  ``[out, 1]``        one scale per output row            ``q[o, :] · s[o]``
  ``[out, nb, 1]``    one scale per block of              ``q[o, b·B:(b+1)·B] · s[o, b]``, ``B = in / nb``
  or ``[out, nb]``    ``B`` consecutive input features
  ==================  ==================================  ================================================

  Scales are made as ``amax(|W|) / 448`` over the tensor / row / block (448 = largest finite e4m3fn value, OCP 8-bit
  floating point specification v1.0), so each group uses the whole fp8 range; smaller groups give a smaller error
  (one outlier only coarsens its own block).

Checkpoint formats read by :func:`find_scaled_fp8` and written by :func:`save_fp8_checkpoint`:

- **musubi-tuner** (``optimize_state_dict_with_fp8`` / ``load_safetensors_with_fp8_optimization``): chosen Linear
  weights in float8_e4m3fn with ``<layer>.scale_weight`` in float32 (bf16 in older versions) of shape ``[]``/``[1]``
  (per tensor), ``[out, 1]`` (per channel) or ``[out, in / block, 1]`` (block-wise; block 64 by default, callers
  pick others such as 16; a layer whose ``in`` is not a multiple of the block falls back to per tensor, per channel
  in older versions). Newer versions split a block scale in two levels, ``<layer>.scale_weight`` (per block,
  divided by the largest) times ``<layer>.scale_weight_tensor`` (0-d); the product is the scale the weight was
  quantised with, and the reader folds it into one. No marker tensor: a file is pre-quantised when it holds any
  ``.scale_weight`` key. For Kandinsky 5 it quantises every ``.weight`` under ``text_transformer_blocks`` /
  ``visual_transformer_blocks`` or containing ``out_layer``, except norms.
- **ComfyUI scaled fp8** (``comfy/ops.py`` ``scaled_fp8_ops``; detection in ``comfy/model_detection.py``, writing in
  ``comfy/model_base.py`` of ComfyUI 0.3.75): a marker tensor ``scaled_fp8`` (empty, its dtype names the fp8 format;
  float32 means e4m3fn; two elements switch ComfyUI's fp8 matmul off), fp8 Linear weights with a per-tensor float32
  0-d ``<layer>.scale_weight``, optionally ``<layer>.scale_input`` (activation scale for ComfyUI's fp8 matmul; this
  pack dequantises the weight and never quantises activations, so it is ignored).
- Not read: float8_e5m2 weights, and ComfyUI's newer mixed-precision files (``<layer>.weight_scale`` with
  ``_quantization_metadata``); both are refused with a message naming the tensors.

Numerics: quantisation divides by the scale in float32, clamps to ±448 and casts with round-to-nearest-even (relative
error ≤ 2⁻⁴ per element for normal values: 3 mantissa bits). Dequantisation multiplies in the requested dtype (see
:func:`dequantize_fp8`).

Device rule (fallback): weight-only fp8 needs only a *cast* from float8 on the device (no fp8 matmul), which PyTorch
has on CPU and on CUDA of any compute capability (a plain elementwise kernel; fp8 *matmuls* need SM 8.9+, unused). A device that cannot even cast float8 (see :func:`fp8_supported`) cannot
hold fp8 weights; :func:`check_fp8_device` says so and points to ``weight_dtype="bf16"``, which dequantises fp8
files on load.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, save_file_atomic

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0

SCALE_SUFFIX = ".scale_weight"
#: musubi-tuner's second-level (per tensor) factor of a block scale.
TENSOR_SCALE_SUFFIX = ".scale_weight_tensor"
#: ComfyUI's activation scale for its fp8 matmul; ignored (weight-only fp8).
INPUT_SCALE_SUFFIX = ".scale_input"
#: ComfyUI's marker tensor of a scaled-fp8 checkpoint (relative to the model prefix).
COMFYUI_MARKER = "scaled_fp8"
#: musubi-tuner's default block size (``--fp8_scaled`` without the fast mode).
MUSUBI_BLOCK_SIZE = 64
FP8_LAYOUTS = ("musubi", "comfyui")


class FP8DeviceError(RuntimeError):
    """The device cannot hold float8 tensors; the message says to load with ``weight_dtype="bf16"`` instead."""


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


# ---------------------------------------------------------------------------------------------------------------
# Quantisation and dequantisation


def fp8_scale_problem(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> str | None:
    """Why ``scale_shape`` is not a valid scale layout for a weight of ``weight_shape``, or None when it is.

    Valid (see the module docstring): ``[]``, ``[1]`` (per tensor); ``[out, nb]`` or ``[out, nb, 1]`` with ``nb``
    dividing ``in`` (per block of ``in / nb`` features; ``nb = 1`` is per output channel). The weight must be 2-D.
    """
    weight_shape, scale_shape = tuple(weight_shape), tuple(scale_shape)
    if len(weight_shape) != 2:
        return f"scaled fp8 is for 2-D Linear weights [out, in], got a weight of shape {list(weight_shape)}"
    out, inp = weight_shape
    if scale_shape in ((), (1,)):
        return None
    if len(scale_shape) in (2, 3) and scale_shape[0] == out and (len(scale_shape) == 2 or scale_shape[2] == 1):
        nb = scale_shape[1]
        if nb >= 1 and inp % nb == 0:
            return None
    return (f"scale of shape {list(scale_shape)} does not fit a weight [{out}, {inp}]: expected [] or [1] (per "
            f"tensor), [{out}, 1] (per channel) or [{out}, nb, 1] / [{out}, nb] with nb dividing {inp} (block-wise)")


def quantize_fp8(weight: torch.Tensor, *, block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled float8_e4m3fn quantisation of a weight, per tensor or per block of input features.

    ``scale = amax(|W|) / 448`` over the whole tensor (``block_size=None``) or over each block
    ``W[o, b·B:(b+1)·B]`` (``B = block_size``); a group that is all zero gets scale 1.0. Then
    ``q = clamp(W / scale, ±448).to(float8_e4m3fn)``, computed in float32, round-to-nearest-even on the cast: relative
    error per element ≤ 2⁻⁴ for normal values (3 mantissa bits), at most half the subnormal step ``2⁻¹⁰·scale``
    near zero.

    Args:
        weight: any float tensor, any device; ``[out, in]`` with ``in`` a multiple of ``block_size`` when given.
        block_size: None for one scale per tensor, else the block length ``B`` along the input features.

    Returns:
        ``(q, scale)``: ``q`` float8_e4m3fn of ``weight``'s shape; ``scale`` float32 on the same device, 0-d (per
        tensor) or ``[out, in / B, 1]`` (musubi-tuner's block layout).

    Raises:
        ValueError: the weight holds NaN or infinity (the checkpoint is damaged); a bad ``block_size`` or a weight
            that is not 2-D with ``in`` a multiple of it.
    """
    w = weight.detach().float()
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        if w.ndim != 2 or w.shape[1] % block_size:
            raise ValueError(f"block-wise fp8 needs a 2-D weight [out, in] with in a multiple of the block size "
                             f"{block_size}; got shape {list(w.shape)}. Use block_size=None (one scale per tensor) "
                             f"or a block size dividing {w.shape[-1] if w.ndim else 0}.")
        w = w.reshape(w.shape[0], w.shape[1] // block_size, block_size)
        amax = w.abs().amax(dim=-1, keepdim=True) if w.numel() else torch.zeros(w.shape[:2] + (1,), device=w.device)
        finite = bool(torch.isfinite(amax).all())
    else:
        amax = w.abs().max() if w.numel() else torch.zeros((), device=w.device)
        finite = bool(torch.isfinite(amax))
    if not finite:
        raise ValueError("Cannot quantise a weight holding NaN or infinity to fp8; the checkpoint is damaged.")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(weight.shape), scale


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    s = scale.to(dtype)
    if s.ndim >= 2:
        out, nb = s.shape[0], s.shape[1]
        return (w.reshape(out, nb, -1) * s.reshape(out, nb, 1)).reshape(weight.shape)
    return w * s.reshape(())


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The real weight of fp8 codes and their scales: ``W = q · s`` per tensor, row or block (module docstring).

    Computed in ``dtype``: both factors are cast to it and multiplied once (exact for float32 up to one rounding of
    the product; for bf16 the scale is rounded to bf16 first, ≤ 2⁻⁹ relative, well below fp8's 2⁻⁴). To get a bf16
    weight with a single rounding, dequantise in float32 and cast (the loader does).

    Args:
        weight: float8 ``[out, in]`` (any float8 dtype; a float weight works too).
        scale: float scale in one of the layouts of :func:`fp8_scale_problem`.
        dtype: result dtype.

    Returns:
        ``[out, in]`` in ``dtype`` on ``weight``'s device.

    Raises:
        ValueError: the scale layout does not fit the weight.
    """
    problem = fp8_scale_problem(tuple(weight.shape), tuple(scale.shape))
    if problem:
        raise ValueError(problem)
    return _dequantize(weight, scale.to(weight.device), dtype)


# ---------------------------------------------------------------------------------------------------------------
# The layer


class FP8Linear(nn.Module):
    """Linear layer with a float8_e4m3fn weight and float32 scales (weight-only fp8).

    Attributes (state-dict keys):
        weight: float8_e4m3fn ``[out, in]`` (no gradient).
        scale_weight: float32 buffer, per tensor (``[]``/``[1]``), per channel (``[out, 1]``) or block-wise
            (``[out, in / B, 1]``, also ``[out, in / B]``); the real weight is :meth:`dequantized_weight`.
            Loading a state dict adopts the stored scale layout when it fits the weight (so one model class reads
            every file) and stores the scale as float32 (bf16/fp16 scales of older files convert exactly).
        bias: ``[out]`` in high precision (its stored dtype) or None.

    ``forward(x)``: ``x [..., in]`` → ``[..., out]`` in ``x.dtype``, computed as
    ``F.linear(x, dequantized_weight(x.dtype), bias.to(x.dtype))``.

    LoRA merging (``cinetune.core.lora.merge_lora``) reads :meth:`dequantized_weight` (block-aware), adds the delta in
    float32 and requantises with one scale per tensor (:func:`quantize_fp8`), copying that scale into every element
    of ``scale_weight``: the layout (shape) stays, so the state dict still matches the file, but a merged block-wise
    layer has per-tensor precision. :meth:`requantize_` keeps the block layout instead.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        device: where the empty parameters go (``"meta"`` to fill with ``load_state_dict(..., assign=True)``).
        bias_dtype: dtype of the bias.
        block_size: None for a per-tensor scale, else the block length ``B`` (must divide ``in_features``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32,
                 block_size: int | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1 or in_features % block_size):
            raise ValueError(f"block_size must be a positive int dividing in_features={in_features}, "
                             f"got {block_size!r}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        scale_shape = () if block_size is None else (out_features, in_features // block_size, 1)
        self.register_buffer("scale_weight", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block_size: int | None = None) -> FP8Linear:
        """Quantise an ``nn.Linear`` (see :func:`quantize_fp8`; ``block_size`` None = one scale per tensor). A
        meta-device layer gives a meta-device FP8Linear (shapes and dtypes only; fill it with
        ``load_state_dict(..., assign=True)``). The bias keeps its dtype."""
        w = linear.weight
        has_bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, has_bias, device="meta",
                    bias_dtype=linear.bias.dtype if has_bias else torch.float32, block_size=block_size)
        if w.device.type == "meta":
            return layer
        q, scale = quantize_fp8(w, block_size=block_size)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.scale_weight = scale
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @property
    def block_size(self) -> int | None:
        """Input features per scale: None for a per-tensor scale, ``in_features`` per channel, else ``in / nb``."""
        s = self.scale_weight
        return None if s.ndim < 2 else self.in_features // s.shape[1]

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` as ``dtype``: ``weight.to(dtype) · scale.to(dtype)``, the scale broadcast over its
        tensor, row or block (:func:`dequantize_fp8`)."""
        return _dequantize(self.weight, self.scale_weight, dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> FP8Linear:
        """Store a new high-precision weight ``[out, in]`` in place, quantised with this layer's own scale layout
        (per tensor stays per tensor; a ``[out, nb, 1]`` / ``[out, nb]`` / ``[out, 1]`` layout keeps its blocks)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must be [{self.out_features}, {self.in_features}], got {list(weight.shape)}")
        q, scale = quantize_fp8(weight, block_size=self.block_size)
        self.weight.copy_(q)
        self.scale_weight.copy_(scale.reshape(self.scale_weight.shape))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.dtype != FP8_DTYPE:
            error_msgs.append(f"{prefix}weight: FP8Linear needs a float8_e4m3fn weight (with its scale), got "
                              f"{w.dtype}; quantise it with FP8Linear.from_linear / quantize_fp8, or load the model in "
                              "high precision.")
            return
        key = prefix + "scale_weight"
        s = state_dict.get(key)
        if isinstance(s, torch.Tensor):
            problem = fp8_scale_problem((self.out_features, self.in_features), tuple(s.shape))
            if problem:
                error_msgs.append(f"{key}: {problem}")
                return
            if not s.is_floating_point():
                error_msgs.append(f"{key}: the scale must be a float tensor, got {s.dtype}")
                return
            if s.dtype != torch.float32:
                state_dict[key] = s = s.float()  # exact for bf16/fp16 scales
            if tuple(s.shape) != tuple(self.scale_weight.shape):  # adopt the stored layout
                self.scale_weight = torch.empty(s.shape, dtype=torch.float32, device=self.scale_weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), b)

    def extra_repr(self) -> str:
        bs = self.block_size
        layout = "per-tensor" if bs is None else ("per-channel" if bs == self.in_features else f"block {bs}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8_e4m3fn {layout}")


def quantize_linear_weights_fp8(model: nn.Module, *, keep: Callable[[str], bool],
                                block_size: int | None = None) -> int:
    """Replace every ``nn.Linear`` in ``model`` whose qualified name is not kept by an :class:`FP8Linear`.

    Works on real weights (quantised now) and on meta-device models (structure only, for loading with ``assign=True``).

    Args:
        model: any module; replaced in place.
        keep: ``keep(name) -> True`` keeps the Linear at ``name`` (e.g. ``"out_layer.out_layer"``) in high precision.
        block_size: None for one scale per tensor; else block-wise scales of this many input features for layers
            whose ``in_features`` it divides, and one scale per tensor for the others (musubi-tuner's fallback).

    Returns:
        Number of Linear layers replaced.
    """
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not keep(name)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        bs = block_size if block_size is not None and linear.in_features % block_size == 0 else None
        setattr(parent, child, FP8Linear.from_linear(linear, block_size=bs))
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

    This rule decides what *this pack* quantises on load; layers a pre-quantised file stores in fp8 stay fp8 (see
    :func:`cinetune.k5.dit.load_k5_dit`).

    Args:
        name: qualified module name inside the DiT, e.g. ``"visual_transformer_blocks.3.self_attention.to_query"``.

    Returns:
        True to keep the layer in high precision.
    """
    full = name + "."
    return full.startswith(_K5_HIGH_PRECISION_PREFIXES) or "modulation" in name or "norm" in name


# ---------------------------------------------------------------------------------------------------------------
# Devices


@functools.cache
def _can_cast_fp8(device: str) -> str | None:
    """None when ``device`` can create a float8_e4m3fn tensor and cast it to float32, else the error text."""
    try:
        torch.zeros(1, dtype=FP8_DTYPE, device=device).float()
    except Exception as e:  # noqa: BLE001 - backends raise RuntimeError, TypeError or NotImplementedError
        return f"{type(e).__name__}: {e}"
    return None


def fp8_supported(device: torch.device | str) -> bool:
    """Whether ``device`` can hold fp8 weights for weight-only dequantisation: the probe is
    ``torch.zeros(1, dtype=torch.float8_e4m3fn, device=device).float()`` (True on CPU and CUDA; no fp8 matmul is
    needed). The answer is cached per device."""
    return _can_cast_fp8(str(torch.device(device))) is None


def check_fp8_device(device: torch.device | str) -> None:
    """Raise :class:`FP8DeviceError` when ``device`` cannot hold fp8 weights (see :func:`fp8_supported`).

    The fallback rule: fp8 weights work wherever torch can cast float8 (dequantised per layer); elsewhere load
    with ``weight_dtype="bf16"``, which dequantises pre-quantised fp8 files on load (twice the weight memory).
    """
    problem = _can_cast_fp8(str(torch.device(device)))
    if problem is not None:
        raise FP8DeviceError(
            f"The device {device} cannot hold float8 weights (torch {torch.__version__} cannot cast float8_e4m3fn "
            f"there: {problem}). Set weight_dtype to 'bf16' (fp8 checkpoints are then dequantised on load, using "
            "twice the weight memory) or run on CUDA or the CPU.")


# ---------------------------------------------------------------------------------------------------------------
# Reading pre-quantised checkpoints


def is_fp8_dtype(dtype: object) -> bool:
    """True for an fp8 dtype given as a safetensors code (``"F8_E4M3"``), ``str(torch.dtype)`` or a torch dtype."""
    text = str(dtype).upper()
    return text.startswith("F8_") or "FLOAT8" in text


def _is_e4m3fn_code(dtype: object) -> bool:
    return str(dtype).upper() in ("F8_E4M3", "TORCH.FLOAT8_E4M3FN")


def _shape(info) -> tuple[int, ...]:
    return tuple(info.shape) if hasattr(info, "shape") else tuple(info[0])


def _dtype(info) -> str:
    return str(info.dtype) if hasattr(info, "dtype") else str(info[1])


def _few(items, n: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


@dataclass(frozen=True)
class ScaledFP8Checkpoint:
    """What :func:`find_scaled_fp8` found in a checkpoint's tensor list (names relative to the model prefix).

    Attributes:
        layout: ``"comfyui"`` (marker ``scaled_fp8`` present), ``"musubi"`` (``.scale_weight`` keys, no marker) or
            None (not pre-quantised: nothing below applies).
        layers: module names whose ``<layer>.weight`` is stored float8_e4m3fn with ``<layer>.scale_weight``.
        scale_shapes: ``{layer: stored scale shape}``.
        tensor_scales: layers that also hold musubi's two-level ``<layer>.scale_weight_tensor``.
        auxiliary: every name that is not a model tensor: the marker, the scales, ignored ``.scale_input`` keys.
    """

    layout: str | None
    layers: tuple[str, ...] = ()
    scale_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    tensor_scales: tuple[str, ...] = ()
    auxiliary: frozenset[str] = frozenset()


def find_scaled_fp8(infos: Mapping[str, object], *, source: str = "checkpoint") -> ScaledFP8Checkpoint:
    """Detect a pre-quantised (scaled fp8) checkpoint from its tensor names, dtypes and shapes — no data read.

    A checkpoint is pre-quantised when it holds the ComfyUI marker ``scaled_fp8`` or any ``<layer>.scale_weight``.
    Then every float8 tensor must be a ``<layer>.weight`` with a scale beside it, and every scale must sit beside a
    float8_e4m3fn ``<layer>.weight`` in a layout :func:`fp8_scale_problem` accepts; ``<layer>.scale_input`` is
    ignored. A checkpoint without marker and scales is not pre-quantised (plain float8 weights there are cast
    without a scale, as ComfyUI does).

    Args:
        infos: name → :class:`~cinetune.core.checkpoint.TensorInfo` (or ``(shape, dtype)``), prefix stripped.
        source: the file, for messages.

    Returns:
        :class:`ScaledFP8Checkpoint`.

    Raises:
        CheckpointError: an fp8 weight without scale, a scale without weight (or beside a weight that is not fp8),
            a scale of the wrong shape or dtype, a float8 format other than e4m3fn — each message names the keys.
    """
    marker = infos.get(COMFYUI_MARKER)
    scale_keys = [k for k in infos if k.endswith(SCALE_SUFFIX)]
    if marker is None and not scale_keys:
        return ScaledFP8Checkpoint(layout=None)
    layout = "comfyui" if marker is not None else "musubi"
    problems: list[str] = []
    if marker is not None and not (_is_e4m3fn_code(_dtype(marker)) or _dtype(marker).upper() in ("F32",
                                                                                                 "TORCH.FLOAT32")):
        problems.append(f"the marker {COMFYUI_MARKER!r} declares fp8 format {_dtype(marker)}; only float8_e4m3fn "
                        "is supported")
    layers: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    aux = {COMFYUI_MARKER} if marker is not None else set()
    for key in sorted(scale_keys):
        layer = key[: -len(SCALE_SUFFIX)]
        wkey = layer + ".weight"
        aux.add(key)
        if wkey not in infos:
            problems.append(f"{key} is a scale without a weight (no {wkey})")
            continue
        if not is_fp8_dtype(_dtype(infos[wkey])):
            problems.append(f"{key} scales {wkey}, which is stored as {_dtype(infos[wkey])}, not float8")
            continue
        if not _is_e4m3fn_code(_dtype(infos[wkey])):
            problems.append(f"{wkey} is {_dtype(infos[wkey])}; only float8_e4m3fn weights are supported")
            continue
        if _dtype(infos[key]).upper() not in ("F32", "BF16", "F16", "TORCH.FLOAT32", "TORCH.BFLOAT16",
                                              "TORCH.FLOAT16"):
            problems.append(f"{key} is stored as {_dtype(infos[key])}; a scale must be float32, bf16 or fp16")
            continue
        problem = fp8_scale_problem(_shape(infos[wkey]), _shape(infos[key]))
        if problem:
            problems.append(f"{key}: {problem}")
            continue
        layers.append(layer)
        shapes[layer] = _shape(infos[key])
    tensor_scales = []
    for key in sorted(k for k in infos if k.endswith(TENSOR_SCALE_SUFFIX)):
        layer = key[: -len(TENSOR_SCALE_SUFFIX)]
        aux.add(key)
        if layer + SCALE_SUFFIX not in infos:
            problems.append(f"{key} has no block scale {layer + SCALE_SUFFIX} beside it")
        elif len(_shape(infos[key])) > 1 or (_shape(infos[key]) and _shape(infos[key])[0] != 1):
            problems.append(f"{key} must hold one number, got shape {list(_shape(infos[key]))}")
        else:
            tensor_scales.append(layer)
    for key in infos:
        if key.endswith(INPUT_SCALE_SUFFIX) and key[: -len(INPUT_SCALE_SUFFIX)] + ".weight" in infos:
            aux.add(key)
    scaled = {layer + ".weight" for layer in layers}
    unscaled = [k for k, v in infos.items() if k not in aux and is_fp8_dtype(_dtype(v)) and k not in scaled
                and not (k.endswith(".weight") and k[: -len(".weight")] + SCALE_SUFFIX in infos)]
    if unscaled:
        problems.append(f"{len(unscaled)} float8 tensors have no scale: {_few(unscaled)} (a scaled fp8 checkpoint "
                        "stores '<layer>.scale_weight' beside each float8 '<layer>.weight')")
    if problems:
        raise CheckpointError(
            f"{source}: damaged or unsupported scaled fp8 checkpoint ({layout} layout): " + "; ".join(problems)
            + ". Re-download or re-convert the file, or use the bf16 file.")
    return ScaledFP8Checkpoint(layout=layout, layers=tuple(layers), scale_shapes=shapes,
                               tensor_scales=tuple(tensor_scales), auxiliary=frozenset(aux))


def combine_fp8_scales(scale: torch.Tensor, tensor_scale: torch.Tensor | None = None, *,
                       name: str = "scale_weight") -> torch.Tensor:
    """The float32 scale to store in :class:`FP8Linear`: ``scale`` (any float dtype, converted exactly), times
    musubi-tuner's second-level ``tensor_scale`` (0-d or ``[1]``) when given — the product is the scale the
    weight was quantised with (musubi: ``total_scale = block_scale · tensor_scale``). The shape of ``scale`` stays.

    Raises:
        CheckpointError: a scale holds NaN or infinity (named by ``name``).
    """
    s = scale.float()
    if tensor_scale is not None:
        s = s * tensor_scale.float().reshape(())
    if not bool(torch.isfinite(s).all()):
        raise CheckpointError(f"{name} holds NaN or infinity; the checkpoint is damaged, fetch it again.")
    return s


# ---------------------------------------------------------------------------------------------------------------
# Writing pre-quantised checkpoints


def save_fp8_checkpoint(model: nn.Module, path: str | os.PathLike, *, layout: str = "musubi",
                        block_size: int | None = None, keep: Callable[[str], bool] | None = None, prefix: str = "",
                        metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as a pre-quantised (scaled fp8) safetensors checkpoint, atomically.

    Every :class:`FP8Linear` is written as it is (``<layer>.weight`` float8_e4m3fn, ``<layer>.scale_weight`` float32,
    bits unchanged). With ``keep`` given, every ``nn.Linear`` whose name ``keep`` does not keep is quantised for the
    file (the model is not changed); every other tensor is written in its stored dtype under its state-dict name.

    Layouts:
        ``"musubi"``: no marker; new quantisations are block-wise (``block_size``, default
            :data:`MUSUBI_BLOCK_SIZE` = 64; scale ``[out, in / B, 1]``), per tensor (0-d scale) for a layer whose
            ``in_features`` the block does not divide.
        ``"comfyui"``: marker ``scaled_fp8`` = empty float8_e4m3fn tensor (as ComfyUI 0.3.75 ``model_base.py``
            saves it), per-tensor 0-d scales only, no ``scale_input``.

    Args:
        model: the network, without LoRA wrappers (merge or remove them first).
        path: the file to write.
        layout: ``"musubi"`` or ``"comfyui"``.
        block_size: musubi only (see above).
        keep: ``keep(name) -> True`` keeps a high-precision Linear as it is (e.g.
            :func:`k5_fp8_keep_high_precision`); None quantises nothing more.
        prefix: prepended to every key (and to the marker), e.g. ``"model.diffusion_model."``.
        metadata: safetensors metadata (str → str).

    Returns:
        The written path.

    Raises:
        ValueError: unknown layout; ``block_size`` with the ComfyUI layout or not a positive int; a block-wise
            FP8Linear in the ComfyUI layout (per-tensor only there — requantising would round twice); no fp8 layer
            at all; meta tensors or LoRA wrappers in the model.
    """
    if layout not in FP8_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(FP8_LAYOUTS)}, got {layout!r}")
    if layout == "comfyui" and block_size is not None:
        raise ValueError("ComfyUI scaled fp8 checkpoints hold one scale per tensor; block_size is for the musubi "
                         "layout only (leave it None).")
    if layout == "musubi":
        block_size = MUSUBI_BLOCK_SIZE if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    tensors = dict(model.state_dict())
    lora = [k for k in tensors if ".lora_down" in k or ".lora_up" in k]
    if lora:
        raise ValueError(f"the model holds LoRA layers ({lora[0]}); merge them (merge_lora) or remove them "
                         "(remove_lora) before saving an fp8 checkpoint.")
    meta = [k for k, v in tensors.items() if v.is_meta]
    if meta:
        raise ValueError(f"the model has {len(meta)} tensors without data (meta device), e.g. {meta[0]}; load its "
                         "weights first.")
    n_fp8 = 0
    for name, module in model.named_modules():
        key = f"{name}." if name else ""
        if isinstance(module, FP8Linear):
            if layout == "comfyui" and module.scale_weight.numel() != 1:
                raise ValueError(f"{name} has block-wise scales {list(module.scale_weight.shape)}; the ComfyUI "
                                 "layout holds one scale per tensor. Save with layout='musubi', or from the "
                                 "high-precision model with keep=... .")
            n_fp8 += 1
        elif isinstance(module, nn.Linear) and keep is not None and not keep(name):
            bs = block_size if layout == "musubi" and module.in_features % block_size == 0 else None
            try:
                q, scale = quantize_fp8(module.weight, block_size=bs)
            except ValueError as e:
                raise ValueError(f"{name}.weight: {e}") from e
            tensors[key + "weight"] = q
            tensors[key + "scale_weight"] = scale
            n_fp8 += 1
    if n_fp8 == 0:
        raise ValueError("no Linear layer of the model is fp8: pass keep=... (e.g. k5_fp8_keep_high_precision) to "
                         "quantise while saving, or quantise first with quantize_linear_weights_fp8.")
    out = {prefix + k: v.detach() for k, v in tensors.items()}
    if layout == "comfyui":
        out[prefix + COMFYUI_MARKER] = torch.empty(0, dtype=FP8_DTYPE)
    return save_file_atomic({k: v.to("cpu") for k, v in out.items()}, path, metadata)
