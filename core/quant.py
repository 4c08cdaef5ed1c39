"""Weights stored in a dtype other than the compute dtype: cast-at-use Linear, weight-only fp8 Linear, fp8
quantisation, and writing pre-quantised (scaled fp8) checkpoints.

- :class:`CastLinear` is ``nn.Linear`` whose weight and bias may be stored in any float dtype (bf16 weights with an fp32
  input, fp32 modulation weights in a bf16 model); they are cast to the input's dtype per call.
- :class:`FP8Linear` stores the weight as float8 (``float8_e4m3fn``; ``float8_e5m2`` as some files store it) with
  float32 scales and dequantises it per call (weight-only: activations stay in the compute dtype). The scale is a
  buffer named ``scale_weight``, the name ComfyUI's "scaled fp8" checkpoints and kohya-ss/musubi-tuner
  ``src/musubi_tuner/modules/fp8_optimization_utils.py`` use for the same role, so the state-dict keys stay the
  official ones (``<layer>.weight``) with the scale beside them (``<layer>.scale_weight``). Scale layouts, for a
  weight ``W [out, in]`` and its fp8 codes ``q [out, in]``:

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

Which Linear layers a family quantises is the family's rule, passed in as ``keep(name) -> bool`` (this module names
no model). Reading the fp8 layouts of checkpoint files (musubi-tuner, ComfyUI scaled fp8 and mixed precision, the
official LTX-2 fp8 files) is :mod:`cinetune.core.checkpoint`'s job; :func:`save_fp8_checkpoint` writes two of them:

- **musubi-tuner**: chosen Linear weights in float8_e4m3fn with ``<layer>.scale_weight`` in float32 of shape ``[]``
  (per tensor) or ``[out, in / block, 1]`` (block-wise; block 64 by default), no marker tensor.
- **ComfyUI scaled fp8** (``comfy/ops.py`` ``scaled_fp8_ops``, ``comfy/model_base.py`` of ComfyUI 0.3.75): a marker
  tensor ``scaled_fp8`` (empty float8_e4m3fn), fp8 Linear weights with a per-tensor float32 0-d
  ``<layer>.scale_weight``.

Numerics: quantisation divides by the scale in float32 and casts with round-to-nearest-even (relative
error ≤ 2⁻⁴ per element for normal values: 3 mantissa bits). Dequantisation multiplies in the requested dtype (see
:func:`dequantize_fp8`). Both work through the tensor in slices of :data:`CHUNK_ELEMENTS` elements, so their float32
temporaries stay a few MiB whatever the tensor size (results are identical to the whole-tensor formula).

Device rule (fallback): weight-only fp8 needs only a *cast* from float8 on the device (no fp8 matmul), which PyTorch
has on CPU and on CUDA of any compute capability (a plain elementwise kernel; fp8 *matmuls* need SM 8.9+, unused). A
device that cannot even cast float8 (see :func:`fp8_supported`) cannot hold fp8 weights; :func:`check_fp8_device`
says so and points to ``weight_dtype="bf16"``, which dequantises fp8 files on load.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (  # noqa: F401 - SCALE_SUFFIX / TENSOR_SCALE_SUFFIX re-exported for callers
    COMFYUI_MARKER,
    SCALE_SUFFIX,
    TENSOR_SCALE_SUFFIX,
    fp8_scale_problem,
    save_file_atomic,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
#: musubi-tuner's default block size (``--fp8_scaled`` without the fast mode).
MUSUBI_BLOCK_SIZE = 64
FP8_LAYOUTS = ("musubi", "comfyui")
#: Elements per slice in :func:`quantize_fp8` / :func:`dequantize_fp8`: float32 temporaries of 4 MiB, small enough to
#: stay in cache between the passes of a slice (4× faster than 16 MiB slices on a 2-core CPU).
CHUNK_ELEMENTS = 1 << 20


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


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")


def quantize_fp8(weight: torch.Tensor, *, block_size: int | None = None,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled float8_e4m3fn quantisation of a weight, per tensor or per block of input features.

    ``scale = amax(|W|) / 448`` over the whole tensor (``block_size=None``) or over each block
    ``W[o, b·B:(b+1)·B]`` (``B = block_size``); a group that is all zero gets scale 1.0. Then
    ``q = (W / scale).to(float8_e4m3fn)`` (``|W / scale| ≤ 448`` by construction, so clamping to ±448 changes
    nothing), computed in float32, round-to-nearest-even on the cast: relative
    error per element ≤ 2⁻⁴ for normal values (3 mantissa bits), at most half the subnormal step ``2⁻¹⁰·scale``
    near zero. Computed in slices of :data:`CHUNK_ELEMENTS` elements (whole rows for block scales), so the float32
    temporaries stay small; the result equals the whole-tensor formula bit for bit.

    Args:
        weight: any float tensor, any device; ``[out, in]`` with ``in`` a multiple of ``block_size`` when given.
        block_size: None for one scale per tensor, else the block length ``B`` along the input features.
        out: optional contiguous float8_e4m3fn tensor of ``weight``'s shape and device to write the codes into.

    Returns:
        ``(q, scale)``: ``q`` float8_e4m3fn of ``weight``'s shape (``out`` when given); ``scale`` float32 on the same
        device, 0-d (per tensor) or ``[out, in / B, 1]`` (musubi-tuner's block layout).

    Raises:
        ValueError: the weight holds NaN or infinity (the checkpoint is damaged); a bad ``block_size`` or a weight
            that is not 2-D with ``in`` a multiple of it; an ``out`` of another shape, dtype or device.
    """
    w = weight.detach()
    if block_size is not None:
        _check_block_size(block_size)
        if w.ndim != 2 or w.shape[1] % block_size:
            raise ValueError(f"block-wise fp8 needs a 2-D weight [out, in] with in a multiple of the block size "
                             f"{block_size}; got shape {list(w.shape)}. Use block_size=None (one scale per tensor) "
                             f"or a block size dividing {w.shape[-1] if w.ndim else 0}.")
    if out is None:
        out = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    elif out.shape != w.shape or out.dtype != FP8_DTYPE or out.device != w.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float8_e4m3fn tensor {list(w.shape)} on {w.device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    # |W| / scale ≤ 448 up to one rounding (scale = amax / 448), inside e4m3fn's rounding range: no clamp needed.
    # torch.div with a float32 scale of ≥ 1 dims computes in float32 (bf16/fp16 inputs upcast exactly on load) and
    # rounds once into the fp8 output: the bits of (W.float() / scale).to(float8_e4m3fn), in one pass.
    if block_size is None:
        flat, q = w.reshape(-1), out.view(-1)
        steps = range(0, flat.numel(), CHUNK_ELEMENTS)
        amax = torch.zeros((), device=w.device)
        for i in steps:
            lo, hi = torch.aminmax(flat[i:i + CHUNK_ELEMENTS])
            amax = torch.maximum(amax, torch.maximum(-lo, hi).float())
        if not bool(torch.isfinite(amax)):
            raise ValueError("Cannot quantise a weight holding NaN or infinity to fp8; the checkpoint is damaged.")
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
        for i in steps:
            torch.div(flat[i:i + CHUNK_ELEMENTS], scale.reshape(1), out=q[i:i + CHUNK_ELEMENTS])
        return out, scale
    rows, nb = w.shape[0], w.shape[1] // block_size
    step = max(1, CHUNK_ELEMENTS // max(w.shape[1], 1))
    amax = torch.zeros(rows, nb, 1, device=w.device)
    for r in range(0, rows, step):
        lo, hi = torch.aminmax(w[r:r + step].reshape(-1, nb, block_size), dim=-1, keepdim=True)
        amax[r:r + step] = torch.maximum(-lo, hi).float()
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("Cannot quantise a weight holding NaN or infinity to fp8; the checkpoint is damaged.")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    for r in range(0, rows, step):
        block = w[r:r + step].reshape(-1, nb, block_size)
        torch.div(block, scale[r:r + step], out=out[r:r + step].view(-1, nb, block_size))
    return out, scale


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = weight.to(dtype)
    s = scale.to(dtype)
    if s.ndim >= 2:
        out, nb = s.shape[0], s.shape[1]
        return (w.reshape(out, nb, -1) * s.reshape(out, nb, 1)).reshape(weight.shape)
    return w * s.reshape(())


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The real weight of fp8 codes and their scales: ``W = q · s`` per tensor, row or block (module docstring).

    Computed in ``dtype``: both factors are cast to it and multiplied once (exact for float32 up to one rounding of
    the product; for bf16 the scale is rounded to bf16 first, ≤ 2⁻⁹ relative, well below fp8's 2⁻⁴). To get a bf16
    weight with a single rounding, dequantise in float32 into a bf16 ``out`` (the checkpoint reader does).

    Args:
        weight: float8 ``[out, in]`` (any float8 dtype; a float weight works too).
        scale: float scale in one of the layouts of :func:`~cinetune.core.checkpoint.fp8_scale_problem`.
        dtype: the dtype the product is computed in (the result's dtype when ``out`` is None).
        out: optional tensor ``[out, in]`` (any float dtype) on ``weight``'s device to write the result into,
            computed in row slices of at most :data:`CHUNK_ELEMENTS` elements (small temporaries).

    Returns:
        ``[out, in]`` in ``dtype`` (or ``out``) on ``weight``'s device.

    Raises:
        ValueError: the scale layout does not fit the weight; ``out`` of another shape.
    """
    problem = fp8_scale_problem(tuple(weight.shape), tuple(scale.shape))
    if problem:
        raise ValueError(problem)
    scale = scale.to(weight.device)
    if out is None:
        return _dequantize(weight, scale, dtype)
    if out.shape != weight.shape:
        raise ValueError(f"out has shape {list(out.shape)}, the weight {list(weight.shape)}")
    step = max(1, CHUNK_ELEMENTS // max(weight.shape[1], 1))
    for r in range(0, weight.shape[0], step):
        s = scale[r:r + step] if scale.ndim >= 2 else scale
        out[r:r + step].copy_(_dequantize(weight[r:r + step], s, dtype))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The layer


class FP8Linear(nn.Module):
    """Linear layer with a float8 weight and float32 scales (weight-only fp8).

    Attributes (state-dict keys):
        weight: float8_e4m3fn ``[out, in]`` (no gradient); loading a state dict also accepts float8_e5m2 codes (kept
            as stored; :meth:`requantize_` then rounds its e4m3fn codes to e5m2, one more rounding).
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
        if isinstance(w, torch.Tensor) and w.dtype not in FP8_DTYPES:
            error_msgs.append(f"{prefix}weight: FP8Linear needs a float8 weight (with its scale), got "
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
                f"bias={self.bias is not None}, {str(self.weight.dtype).replace('torch.', '')} {layout}")


def quantize_linear_weights_fp8(model: nn.Module, *, keep: Callable[[str], bool],
                                block_size: int | None = None) -> int:
    """Replace every ``nn.Linear`` in ``model`` whose qualified name is not kept by an :class:`FP8Linear`.

    Works on real weights (quantised now) and on meta-device models (structure only, for loading with ``assign=True``).

    Args:
        model: any module; replaced in place.
        keep: ``keep(name) -> True`` keeps the Linear at ``name`` (e.g. ``"out_layer.out_layer"``) in high precision:
            the model family's rule, passed in by the caller.
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


def is_fp8_dtype(dtype: object) -> bool:
    """True for an fp8 dtype given as a safetensors code (``"F8_E4M3"``), ``str(torch.dtype)`` or a torch dtype."""
    text = str(dtype).upper()
    return text.startswith("F8_") or "FLOAT8" in text


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
        keep: ``keep(name) -> True`` keeps a high-precision Linear as it is (the family's fp8 rule); None
            quantises nothing more.
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
        raise ValueError("no Linear layer of the model is fp8: pass keep=... (the family's fp8 rule) to "
                         "quantise while saving, or quantise first with quantize_linear_weights_fp8.")
    out = {prefix + k: v.detach() for k, v in tensors.items()}
    if layout == "comfyui":
        out[prefix + COMFYUI_MARKER] = torch.empty(0, dtype=FP8_DTYPE)
    return save_file_atomic({k: v.to("cpu") for k, v in out.items()}, path, metadata)
