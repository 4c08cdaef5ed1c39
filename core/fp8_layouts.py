"""fp8 checkpoint layouts: which tensors of a file are fp8 Linear weights, where their scales are, and the checks
that refuse damaged or unsupported quantised files. :class:`~cinetune.core.checkpoint.Checkpoint` reports a
selection's layers as :attr:`~cinetune.core.checkpoint.Checkpoint.fp8` (an :class:`FP8Scheme`) and loads them.

Every fp8 Linear weight of a file is reported with its scale, in these layouts (names relative to the selection):

===================  =======================================================================================
layout               tensors of one quantised layer ``L``
===================  =======================================================================================
``musubi``           ``L.weight`` fp8, ``L.scale_weight`` (per tensor ``[]``/``[1]``, per row ``[out, 1]``, block
                     ``[out, in/B, 1]``; float32, bf16 in older files), optionally ``L.scale_weight_tensor`` (0-d,
                     the second level of a block scale; the product is the scale). No marker.
                     kohya-ss/musubi-tuner ``src/musubi_tuner/modules/fp8_optimization_utils.py``.
``comfyui``          marker tensor ``scaled_fp8`` (empty; 2 elements = no fp8 matmul), ``L.weight`` fp8,
                     ``L.scale_weight`` 0-d float32, optionally ``L.scale_input`` (activation scale, ignored).
                     ComfyUI ``comfy/ops.py`` ``scaled_fp8_ops``, ``comfy/utils.py`` ``convert_old_quants``.
``comfyui_mixed``    per layer ``L.comfy_quant`` (uint8 tensor holding UTF-8 JSON ``{"format": ...}``) or the header
                     metadata ``_quantization_metadata`` (JSON ``{"format_version", "layers": {L: {"format": ...}}}``,
                     layer names as stored in the file); fp8 formats ``float8_e4m3fn`` / ``float8_e5m2`` with
                     ``L.weight_scale`` (0-d float32) and optional ``L.input_scale`` (ignored). Layers without a
                     config are plain tensors (an fp8 weight there is a plain cast, scale 1). ComfyUI
                     ``comfy/ops.py`` ``MixedPrecisionOps``, ``comfy/quant_ops.py`` ``QUANT_ALGOS``, QUANTIZATION.md.
``weight_scale``     ``L.weight`` fp8 with ``L.weight_scale`` (0-d float32) and ``L.input_scale``, no marker and no
                     metadata: the official LTX-2 fp8 checkpoints (Lightricks/LTX-2 ``ltx_core/quantization/
                     fp8_scaled_mm.py``).
``unscaled``         fp8 weights without any scale (a plain cast): scale 1.
===================  =======================================================================================

In ``musubi``, ``comfyui`` and ``weight_scale`` files every fp8 weight must have its scale (a missing one means a
damaged file); ``input_scale``/``scale_input`` are ignored everywhere (weight-only fp8 never quantises activations).
Layers in 4-bit or other formats (NVFP4: ``comfy_quant`` format ``nvfp4``, or a uint8 weight with ``weight_scale`` and
``weight_scale_2``; MXFP8; int8; safetensors ``F4``/``F6_*`` tensors) are recognised and refused with a message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .safetensors_io import CheckpointError, TensorInfo, _few, is_fp8_code


#: Output key suffix of an fp8 layer's float32 scale (the buffer of ``FP8Linear``); also musubi/ComfyUI's key.
SCALE_SUFFIX = ".scale_weight"
#: musubi-tuner's second-level (per tensor) factor of a block scale.
TENSOR_SCALE_SUFFIX = ".scale_weight_tensor"
#: ComfyUI mixed-precision and official LTX-2 key of a weight scale.
WEIGHT_SCALE_SUFFIX = ".weight_scale"
#: Activation scales (ComfyUI old / new and LTX-2 names); ignored: weight-only fp8.
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
#: ComfyUI's per-layer quantisation config tensor.
COMFY_QUANT_SUFFIX = ".comfy_quant"
#: ComfyUI's marker tensor of a scaled-fp8 checkpoint (relative to the model prefix).
COMFYUI_MARKER = "scaled_fp8"
#: Header metadata key of ComfyUI's per-layer quantisation configs.
QUANT_METADATA_KEY = "_quantization_metadata"
_FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
_STRICT_LAYOUTS = ("musubi", "comfyui", "weight_scale")
_SCALE_CODES = ("F32", "BF16", "F16")


def fp8_scale_problem(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> str | None:
    """Why ``scale_shape`` is not a valid scale layout for a weight of ``weight_shape``, or None when it is.

    Valid: ``[]``, ``[1]`` (per tensor); ``[out, nb]`` or ``[out, nb, 1]`` with ``nb`` dividing ``in`` (per block of
    ``in / nb`` features; ``nb = 1`` is per output row). The weight must be 2-D ``[out, in]``.
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


def scale_key(weight_name: str) -> str:
    """Output key of the scale of fp8 weight ``weight_name``: ``"a.b.weight"`` → ``"a.b.scale_weight"``."""
    return weight_name[: -len(".weight")] + SCALE_SUFFIX


@dataclass(frozen=True)
class FP8Layer:
    """One fp8 Linear weight of a file and the tensors that give its real values ``W = q · scale``.

    Attributes:
        weight: name of the fp8 codes, ``"<layer>.weight"``, shape ``[out, in]``.
        dtype: ``"F8_E4M3"`` or ``"F8_E5M2"``.
        scale: name of the stored scale (``<layer>.scale_weight`` or ``<layer>.weight_scale``), None for scale 1.
        tensor_scale: musubi's second-level factor ``<layer>.scale_weight_tensor`` (multiplied in), or None.
        scale_shape: shape of the scale as loaded (``[]`` when there is none).
    """

    weight: str
    dtype: str
    scale: str | None = None
    tensor_scale: str | None = None
    scale_shape: tuple[int, ...] = ()

    @property
    def layer(self) -> str:
        """The module name, ``weight`` without ``.weight``."""
        return self.weight[: -len(".weight")]


@dataclass(frozen=True)
class FP8Scheme:
    """The fp8 layers of a selection (see the module docstring for the layouts).

    Attributes:
        layout: ``"musubi"``, ``"comfyui"``, ``"comfyui_mixed"``, ``"weight_scale"``, ``"unscaled"`` or None (no fp8
            weight at all).
        layers: weight name → :class:`FP8Layer`, every 2-D fp8 ``*.weight``.
        auxiliary: names that are not model tensors: scales, activation scales, configs, the marker.
    """

    layout: str | None = None
    layers: Mapping[str, FP8Layer] = field(default_factory=dict)
    auxiliary: frozenset[str] = frozenset()

def _decode_config(raw: torch.Tensor) -> dict:
    conf = json.loads(bytes(raw.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    if not isinstance(conf, dict):
        raise ValueError("not a JSON object")
    return conf


def _find_fp8(infos: Mapping[str, TensorInfo], confs: Mapping[str, dict], config_problems: list[str],
              source: str) -> FP8Scheme:
    """Detect the fp8 layers from names, dtypes and shapes plus ComfyUI's per-layer configs (already decoded)."""
    marker = COMFYUI_MARKER in infos
    aux = {COMFYUI_MARKER} if marker else set()
    aux.update(k for k in infos if k.endswith(INPUT_SCALE_SUFFIXES + (COMFY_QUANT_SUFFIX,)))
    scale_suffixes = (SCALE_SUFFIX, WEIGHT_SCALE_SUFFIX, TENSOR_SCALE_SUFFIX, ".weight_scale_2")
    candidates = set(confs)
    for k, info in infos.items():
        for suffix in scale_suffixes:
            if k.endswith(suffix):
                candidates.add(k[: -len(suffix)])
                aux.add(k)
        if k.endswith(".weight") and is_fp8_code(info.dtype) and len(info.shape) == 2:
            candidates.add(k[: -len(".weight")])
    if confs:
        layout = "comfyui_mixed"
    elif marker:
        layout = "comfyui"
    elif any(k.endswith(SCALE_SUFFIX) for k in infos):
        layout = "musubi"
    elif any(k.endswith(WEIGHT_SCALE_SUFFIX) for k in infos):
        layout = "weight_scale"
    elif candidates:
        layout = "unscaled"
    else:
        layout = None
    problems = list(config_problems)
    unsupported: list[str] = []
    layers: dict[str, FP8Layer] = {}
    for layer in sorted(candidates):
        w = layer + ".weight"
        conf = confs.get(layer)
        fmt = conf.get("format") if conf is not None else None
        if conf is not None and fmt not in _FP8_FORMATS:
            unsupported.append(f"{layer} ({fmt})")
            continue
        winfo = infos.get(w)
        if layer + ".weight_scale_2" in infos or (winfo is not None and winfo.dtype in ("U8", "F4")
                                                  and layer + WEIGHT_SCALE_SUFFIX in infos):
            unsupported.append(f"{layer} (nvfp4)")
            continue
        present = [k for k in (layer + SCALE_SUFFIX, layer + WEIGHT_SCALE_SUFFIX) if k in infos]
        tensor_scale = layer + TENSOR_SCALE_SUFFIX if layer + TENSOR_SCALE_SUFFIX in infos else None
        if winfo is None:
            what = present[0] if present else (tensor_scale or f"the quantisation config of {layer}")
            problems.append(f"{what} is a scale without a weight (no {w})")
            continue
        if not is_fp8_code(winfo.dtype):
            if present:
                problems.append(f"{present[0]} scales {w}, which is stored as {winfo.dtype}, not float8")
            elif conf is not None:
                problems.append(f"the quantisation config of {layer} says {fmt}, but {w} is stored as {winfo.dtype}")
            elif tensor_scale:
                problems.append(f"{tensor_scale} scales {w}, which is stored as {winfo.dtype}, not float8")
            continue
        if fmt is not None and _FP8_FORMATS[fmt] != winfo.dtype:
            problems.append(f"the quantisation config of {layer} says {fmt}, but {w} is stored as {winfo.dtype}")
            continue
        if len(present) > 1:
            problems.append(f"{layer} has two scales ({', '.join(present)}); keep one")
            continue
        scale = present[0] if present else None
        shape: tuple[int, ...] = ()
        if scale is not None:
            if infos[scale].dtype not in _SCALE_CODES:
                problems.append(f"{scale} is stored as {infos[scale].dtype}; a scale must be float32, bf16 or fp16")
                continue
            problem = fp8_scale_problem(winfo.shape, infos[scale].shape)
            if problem:
                problems.append(f"{scale}: {problem}")
                continue
            shape = infos[scale].shape
        elif len(winfo.shape) != 2:
            continue  # a plain fp8 tensor that is not a Linear weight: cast like any other tensor
        if tensor_scale is not None:
            if scale != layer + SCALE_SUFFIX:
                problems.append(f"{tensor_scale} has no block scale {layer + SCALE_SUFFIX} beside it")
                continue
            if math.prod(infos[tensor_scale].shape) != 1 or len(infos[tensor_scale].shape) > 1:
                problems.append(f"{tensor_scale} must hold one number, got shape {list(infos[tensor_scale].shape)}")
                continue
        layers[w] = FP8Layer(w, winfo.dtype, scale, tensor_scale, shape)
    if unsupported:
        raise CheckpointError(
            f"{source}: {len(unsupported)} layers use a quantisation format this pack cannot run: {_few(unsupported)}. "
            "NVFP4 / 4-bit, MXFP8 and int8 layers are not supported (fp8 e4m3fn/e5m2 with per-tensor, per-row or "
            "block scales is); use the fp8 or bf16 version of the model file.")
    if layout in _STRICT_LAYOUTS:
        unscaled = [k for k, v in infos.items() if k not in aux and is_fp8_code(v.dtype)
                    and (k not in layers or layers[k].scale is None)]
        if unscaled:
            key = "'<layer>.weight_scale'" if layout == "weight_scale" else "'<layer>.scale_weight'"
            problems.append(f"{len(unscaled)} float8 tensors have no scale: {_few(unscaled)} (a scaled fp8 checkpoint "
                            f"stores {key} beside each float8 '<layer>.weight')")
    if problems:
        raise CheckpointError(
            f"{source}: damaged or unsupported scaled fp8 checkpoint ({layout} layout): " + "; ".join(problems)
            + ". Re-download or re-convert the file, or use the bf16 file.")
    return FP8Scheme(layout, layers, frozenset(aux))


def _combine_scales(scale: torch.Tensor, tensor_scale: torch.Tensor | None, name: str) -> torch.Tensor:
    """Float32 scale (exact for bf16/fp16 inputs) times musubi's second level; refuses NaN/inf."""
    s = scale.float()
    if tensor_scale is not None:
        s = s * tensor_scale.float().reshape(())
    if not bool(torch.isfinite(s).all()):
        raise CheckpointError(f"{name} holds NaN or infinity; the checkpoint is damaged, fetch it again.")
    return s

