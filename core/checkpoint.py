"""Model-file I/O: safetensors read tensor by tensor, fp8 checkpoint layouts, key subsets, atomic writes, and the
registry of checkpoint kinds used in error messages.

Formats: safetensors (8-byte little-endian header length, JSON header, raw little-endian data; see
https://github.com/huggingface/safetensors README "Format"), and PyTorch pickles (``.pt``/``.pth``/``.bin``/``.ckpt``)
read with ``torch.load(weights_only=True)``.

Reading (:func:`open_checkpoint` → :class:`Checkpoint`): the header is parsed here (no safetensors call, so any
safetensors version works) and each tensor is read with positional reads (``os.preadv``; seek + ``readinto`` where
the OS lacks it) straight into its destination memory, or into one reused staging buffer when it is converted. The
file is never memory-mapped: Linux refuses a private mapping larger than RAM + swap (a 38.6 GB Kandinsky 5 Pro file
on a 24 GB host fails with ``unable to mmap … Cannot allocate memory`` under safetensors' ``load_file``), and mapped
pages of a file read once only crowd the page cache into the process. Host memory while loading is the loaded
tensors plus one tensor in its stored dtype (the staging buffer) plus a few MiB of conversion workspace (float32 slices, :data:`~cinetune.core.quant.CHUNK_ELEMENTS`).

fp8 files (:attr:`Checkpoint.fp8`, :class:`FP8Scheme`): every fp8 Linear weight of a file is reported with its scale,
in these layouts (names relative to the selection):

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

Loading (:meth:`Checkpoint.load`) converts each tensor to the dtype a *policy* names for it (keep the stored dtype,
cast, or quantise to fp8 with one scale per tensor); an fp8 layer is either kept as stored with its float32 scale
under ``L.scale_weight`` (the buffer of :class:`~cinetune.core.quant.FP8Linear`) or dequantised, ``W = q·s`` in float32
rounded once to the target dtype.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch


class CheckpointError(ValueError):
    """A model file cannot be read or is not what was expected. The message says what and how to fix it."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and stored dtype of one tensor, read from a file header without loading the data."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16", "F32", "F8_E4M3"

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data (``numel · bits / 8``, rounded up for sub-byte codes)."""
        bits = _DTYPES[self.dtype][1] if self.dtype in _DTYPES else 8
        return (math.prod(self.shape) * bits + 7) // 8


_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_READ_CHUNK = 1 << 30  # bytes per read call (Linux returns at most 2 GiB − 4 KiB per call anyway)

# safetensors dtype code → (torch dtype or None when this torch lacks it, bits per element)
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8), "U8": (torch.uint8, 8), "I8": (torch.int8, 8), "I16": (torch.int16, 16),
    "U16": (getattr(torch, "uint16", None), 16), "I32": (torch.int32, 32), "U32": (getattr(torch, "uint32", None), 32),
    "I64": (torch.int64, 64), "U64": (getattr(torch, "uint64", None), 64), "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16), "F32": (torch.float32, 32), "F64": (torch.float64, 64),
    "C64": (torch.complex64, 64),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    "F4": (None, 4), "F6_E2M3": (None, 6), "F6_E3M2": (None, 6),
}
_CODES: dict[torch.dtype, str] = {dt: code for code, (dt, _) in _DTYPES.items() if dt is not None}
FP8_CODES = ("F8_E4M3", "F8_E5M2")
_SCALE_CODES = ("F32", "BF16", "F16")


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` → ``"BF16"``).

    Raises:
        ValueError: the dtype has no safetensors code (e.g. complex128).
    """
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file") from None


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code (``"F8_E4M3"`` → ``torch.float8_e4m3fn``).

    Raises:
        CheckpointError: an unknown code, a sub-byte float (``F4``/``F6_*``: NVFP4/MXFP4 data) or a dtype this torch
            lacks.
    """
    if code not in _DTYPES:
        raise CheckpointError(f"unknown safetensors dtype {code!r}; the file is damaged or newer than this reader.")
    dt, bits = _DTYPES[code]
    if bits < 8:
        raise CheckpointError(f"{bits}-bit float tensors ({code}, e.g. NVFP4/MXFP4 weights) are not supported; use the "
                              "fp8 or bf16 version of the model file.")
    if dt is None:
        raise CheckpointError(f"this torch ({torch.__version__}) has no dtype for safetensors {code}; upgrade torch.")
    return dt


def is_fp8_code(code: str) -> bool:
    """True for the safetensors codes of fp8 weights (``F8_E4M3``, ``F8_E5M2``)."""
    return code in FP8_CODES


# ---------------------------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are: a safetensors file range, or a tensor already in memory (pickles)."""

    info: TensorInfo
    path: Path
    stored: str  # the tensor's name in the file
    begin: int = 0  # absolute file offsets
    end: int = 0
    tensor: torch.Tensor | None = None


def _parse_header(path: Path) -> tuple[dict[str, _Entry], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file; re-download it.")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: not a safetensors file (bad header length {n}); expected a .safetensors model file.")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e}); check the disk and the file's permissions.") from e
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is damaged.") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is damaged.")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries: dict[str, _Entry] = {}
    end = 0
    for name, item in header.items():
        try:
            shape = tuple(int(s) for s in item["shape"])
            code = str(item["dtype"])
            begin, stop = (int(o) for o in item["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: header entry {name!r} is malformed ({e}); the file is damaged.") from e
        info = TensorInfo(shape, code)
        if code in _DTYPES and (stop - begin != info.nbytes or begin < 0):
            raise CheckpointError(f"{path}: header entry {name!r} claims {stop - begin} bytes for a {code} tensor "
                                  f"of shape {list(shape)} ({info.nbytes} bytes); the file is damaged.")
        entries[name] = _Entry(info, path, name, start + begin, start + stop)
        end = max(end, stop)
    if start + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {start + end} bytes but the file has {size}. "
            "The download or copy was interrupted; fetch the file again.")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read tensor names, shapes and dtypes (and ``__metadata__``) from a safetensors header.

    Returns:
        ``(tensors, metadata)``: ``tensors[name] = TensorInfo(shape, dtype)``; metadata as stored (str → str).
    Raises:
        CheckpointError: the file is missing, not safetensors, or truncated (data shorter than the header says).
    """
    entries, metadata = _parse_header(Path(path))
    return {k: e.info for k, e in entries.items()}, metadata


def _load_pickle(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise CheckpointError(f"{path}: cannot read this PyTorch file ({e}); it may be truncated.") from e
    for wrapper in ("state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names → shape/dtype (safetensors codes) for a safetensors file (header only) or a pickle (loaded).

    Raises:
        CheckpointError: unreadable file (see :func:`open_checkpoint`).
    """
    return dict(open_checkpoint(path).infos)


# ---------------------------------------------------------------------------------------------------------------
# fp8 layouts

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


def _few(items, n: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


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


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _byte_view(t: torch.Tensor) -> memoryview:
    """Writable bytes of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Reader:
    """Positional reads from the files of one load, each file opened once."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}

    def _handle(self, path: Path):
        f = self._files.get(path)
        if f is None:
            try:
                f = self._files[path] = open(path, "rb", buffering=0)
            except OSError as e:
                message = f"{path}: cannot open the file ({e}); check that it exists and is readable."
                raise CheckpointError(message) from e
        return f

    def read_into(self, entry: _Entry, dest: torch.Tensor) -> None:
        """Fill ``dest`` (contiguous CPU tensor of exactly the entry's bytes) from the file."""
        total = entry.end - entry.begin
        if total == 0:
            return
        view = _byte_view(dest)
        f = self._handle(entry.path)
        done = 0
        try:
            while done < total:
                part = view[done: done + min(total - done, _READ_CHUNK)]
                if hasattr(os, "preadv"):
                    n = os.preadv(f.fileno(), [part], entry.begin + done)
                else:  # Windows: no positional read call
                    f.seek(entry.begin + done)
                    n = f.readinto(part)
                if not n:
                    raise CheckpointError(
                        f"{entry.path}: truncated: tensor {entry.stored!r} ends at byte {entry.end} but the file "
                        f"ended at {entry.begin + done}. The file was cut or replaced while loading; fetch it again.")
                done += n
        except OSError as e:
            raise CheckpointError(f"{entry.path}: read error in tensor {entry.stored!r} ({e}); the disk or the file "
                                  "is damaged: check the disk, then fetch the file again.") from e

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _empty(shape, dtype: torch.dtype, what: str, source: str) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as e:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raise CheckpointError(
            f"{source}: not enough host memory for {what} ({nbytes / 2**20:.0f} MiB, {e.__class__.__name__}). Free "
            "memory (close other programs or unload other models), or load the model in a smaller dtype (fp8) "
            "or from a smaller file.") from e


class _Staging:
    """One reused byte buffer for tensors that are converted after reading (never more than one tensor)."""

    def __init__(self, source: str) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)
        self.source = source

    def view(self, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        n = info.nbytes
        if self.buf.numel() < n:
            self.buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buf = _empty((n,), torch.uint8, "the staging buffer", self.source)
        return self.buf[:n].view(dtype).view(info.shape)


#: What a policy returns for one tensor: None keeps the stored dtype; a float dtype casts (fp8 layers are
#: dequantised); ``torch.float8_e4m3fn`` quantises a high-precision ``*.weight`` with one scale per tensor (fp8
#: layers stay as stored).
Target = Union[torch.dtype, None]
Policy = Union[Target, Callable[[str, TensorInfo], Target]]
#: ``allocate(name, shape, dtype)`` returns a contiguous CPU tensor to load into, or None for a fresh one.
Allocator = Callable[[str, tuple[int, ...], torch.dtype], Union[torch.Tensor, None]]


@dataclass(frozen=True)
class _Step:
    """How one requested tensor is produced; outputs = [(name, shape, dtype)] (a weight and its scale for fp8)."""

    name: str
    kind: str  # "raw" | "cast" | "fp8" (kept fp8 layer) | "dequant" | "quant"
    outputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


class Checkpoint:
    """The tensors of one or more model files (shards), read tensor by tensor; see the module docstring.

    Build it with :func:`open_checkpoint`; narrow it with :meth:`select`. Nothing but headers is read until
    :meth:`load` / :meth:`read` (and :attr:`fp8`, which reads ComfyUI's small per-layer config tensors).

    Attributes:
        files: the files, in order.
        metadata: safetensors ``__metadata__`` (str → str) of the files, the first file's value winning.
        infos: name → :class:`TensorInfo` of every tensor in the selection, auxiliaries (scales) included.
        source: the path(s), for messages.
    """

    def __init__(self, entries: Mapping[str, _Entry], metadata: Mapping[str, str], files: Sequence[Path],
                 source: str) -> None:
        self._entries = dict(entries)
        self.metadata = dict(metadata)
        self.files = tuple(files)
        self.source = source
        self.infos: dict[str, TensorInfo] = {k: e.info for k, e in self._entries.items()}
        self._fp8: FP8Scheme | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Checkpoint({self.source}, {len(self)} tensors)"

    def config(self) -> dict:
        """The ``config`` entry of the safetensors metadata as a dict (``{}`` when absent): the model config some
        files carry (the LTX-2 combined checkpoint, ComfyUI single-file text encoders).

        Raises:
            CheckpointError: the entry is not a JSON object.
        """
        raw = self.metadata.get("config")
        if raw is None:
            return {}
        try:
            config = json.loads(raw)
        except (TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.source}: the 'config' metadata is not valid JSON ({e}); the file is "
                                  "damaged.") from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.source}: the 'config' metadata is not a JSON object.")
        return config

    def stored_name(self, name: str) -> str:
        """The name in its file of this view's tensor ``name`` (e.g. with the prefix :meth:`select` removed)."""
        return self._entries[name].stored

    def select(self, prefix: str = "", *, exclude: Iterable[str] = (), strip: bool = True) -> "Checkpoint":
        """The tensors whose names start with ``prefix`` and with none of ``exclude`` (prefixes of the same names),
        ``prefix`` removed from the names when ``strip``.

        E.g. the LTX-2 DiT of a combined file: ``ckpt.select("model.diffusion_model.", exclude=(
        "model.diffusion_model.video_embeddings_connector.", "model.diffusion_model.audio_embeddings_connector."))``.
        """
        exclude = tuple(exclude)
        return self.rename(lambda k: (k[len(prefix):] if strip else k)
                           if k.startswith(prefix) and not (exclude and k.startswith(exclude)) else None)

    def rename(self, name_of: Callable[[str], str | None]) -> "Checkpoint":
        """A view with every tensor renamed to ``name_of(name)``; None leaves the tensor out. Map an fp8 weight's
        scales like the weight (same prefix change), so :attr:`fp8` still finds them; the ``scaled_fp8`` marker
        belongs at the top level of the view.

        Raises:
            CheckpointError: two tensors map to one name.
        """
        picked: dict[str, _Entry] = {}
        for k, e in self._entries.items():
            new = name_of(k)
            if new is None:
                continue
            if new in picked:
                raise CheckpointError(f"{self.source}: tensors {picked[new].stored!r} and {e.stored!r} both stand "
                                      f"for {new!r}; the file holds two copies of one tensor.")
            picked[new] = e
        return Checkpoint(picked, self.metadata, self.files, self.source)

    # -- fp8 ----------------------------------------------------------------------------------------------------

    @property
    def fp8(self) -> FP8Scheme:
        """The fp8 layers of this selection (:class:`FP8Scheme`), computed once.

        Raises:
            CheckpointError: a damaged scaled-fp8 layout (an fp8 weight without scale in a scaled file, a scale
                without weight or of the wrong shape/dtype, an unreadable config; each key is named), or layers in
                a format this pack cannot run (NVFP4, MXFP8, int8), with what to do.
        """
        if self._fp8 is None:
            confs: dict[str, dict] = {}
            problems: list[str] = []
            raw = self.metadata.get(QUANT_METADATA_KEY)
            if raw is not None:
                by_stored = {e.stored[: -len(".weight")]: k[: -len(".weight")]
                             for k, e in self._entries.items() if k.endswith(".weight")}
                try:
                    layers = json.loads(raw)["layers"]
                    for stored, conf in layers.items():
                        if stored in by_stored:
                            confs[by_stored[stored]] = dict(conf)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    problems.append(f"the {QUANT_METADATA_KEY} metadata is unreadable ({e})")
            configs = self.read([k for k in self._entries if k.endswith(COMFY_QUANT_SUFFIX)])
            for name, raw_config in configs.items():
                try:
                    confs[name[: -len(COMFY_QUANT_SUFFIX)]] = _decode_config(raw_config)
                except (ValueError, UnicodeDecodeError) as e:
                    problems.append(f"{name} is not a JSON quantisation config ({e})")
            self._fp8 = _find_fp8(self.infos, confs, problems, self.source)
        return self._fp8

    def model_infos(self) -> dict[str, TensorInfo]:
        """:attr:`infos` without the fp8 auxiliaries (scales, configs, marker): the model's own tensors.

        Raises:
            CheckpointError: see :attr:`fp8`.
        """
        aux = self.fp8.auxiliary
        return {k: v for k, v in self.infos.items() if k not in aux}

    # -- plans and loads ----------------------------------------------------------------------------------------

    def _step(self, name: str, target: Target) -> _Step:
        info = self.infos[name]
        stored = torch_dtype(info.dtype)
        layer = self.fp8.layers.get(name)
        if target is not None and not isinstance(target, torch.dtype):
            raise TypeError(f"a load policy must give a torch dtype or None for {name!r}, got {target!r}")
        if layer is not None:
            if target is None or (target.is_floating_point and target.itemsize == 1):
                return _Step(name, "fp8", ((name, info.shape, stored),
                                           (scale_key(name), layer.scale_shape, torch.float32)))
            if not target.is_floating_point:
                raise ValueError(f"{name} is an fp8 weight; the target must be a float dtype, got {target}")
            return _Step(name, "dequant", ((name, info.shape, target),))
        if target is None or target == stored or not stored.is_floating_point or not target.is_floating_point:
            return _Step(name, "raw", ((name, info.shape, stored),))
        if target == torch.float8_e4m3fn and stored.itemsize > 1:
            if not name.endswith(".weight"):
                raise ValueError(f"fp8 quantisation is for '<layer>.weight' tensors (the scale goes to "
                                 f"'<layer>.scale_weight'), not {name!r}; give it a high-precision dtype")
            return _Step(name, "quant", ((name, info.shape, target), (scale_key(name), (), torch.float32)))
        if target.itemsize == 1 and stored.itemsize == 1:  # an fp8 tensor that is not a Linear weight
            return _Step(name, "raw", ((name, info.shape, stored),))
        return _Step(name, "cast", ((name, info.shape, target),))

    def _steps(self, names: Iterable[str] | None, policy: Policy) -> list[_Step]:
        names = list(self.model_infos() if names is None else names)
        missing = [n for n in names if n not in self._entries]
        if missing:
            raise CheckpointError(f"{self.source}: no tensor {_few(missing)} in this file.")
        pick = policy if callable(policy) else (lambda name, info: policy)
        return [self._step(n, pick(n, self.infos[n])) for n in names]

    def plan(self, names: Iterable[str] | None = None, *, dtype: Policy = None
             ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What :meth:`load` with the same arguments returns, without reading: output name → (shape, dtype). An fp8
        layer contributes its weight and ``<layer>.scale_weight`` (float32)."""
        return {name: (shape, dt) for step in self._steps(names, dtype) for name, shape, dt in step.outputs}

    def load(self, names: Iterable[str] | None = None, *, dtype: Policy = None,
             device: str | torch.device = "cpu", allocate: Allocator | None = None) -> dict[str, torch.Tensor]:
        """Read tensors one by one, each converted as the policy says (see :meth:`iter_load`); returns the dict."""
        return dict(self.iter_load(names, dtype=dtype, device=device, allocate=allocate))

    def iter_load(self, names: Iterable[str] | None = None, *, dtype: Policy = None,
                  device: str | torch.device = "cpu", allocate: Allocator | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for each requested tensor (and ``<layer>.scale_weight`` after each fp8 weight).

        Args:
            names: tensors to read (names of this selection); default: :meth:`model_infos` (no auxiliaries).
            dtype: the policy (:data:`Policy`): None (every tensor as stored), a dtype for all, or
                ``policy(name, info) -> dtype | None`` per tensor. Rules: integer/bool tensors are never cast;
                an fp8 layer (:attr:`fp8`) with target None or an fp8 dtype stays as stored and is followed by its
                float32 scale (musubi's two levels multiplied, bf16 scales converted exactly, scale 1 for a plain
                cast) under ``<layer>.scale_weight``; with a float target it is dequantised, ``q·s`` in float32
                rounded once; ``torch.float8_e4m3fn`` on a high-precision ``*.weight`` quantises it with one scale
                per tensor (:func:`~cinetune.core.quant.quantize_fp8`) followed by its scale.
            device: where the tensors go; data is read and converted on the CPU and moved one tensor at a time.
            allocate: optional destination allocator for CPU loads, ``allocate(name, shape, dtype)`` → a
                contiguous CPU tensor of that shape and dtype, or None for a fresh one (e.g. the block buffers
                :func:`~cinetune.core.offload.host_tensors` makes, which block swap then adopts without a copy).

        Host memory: the tensors yielded plus one staging buffer (the largest converted tensor in its stored dtype)
        plus a few MiB of conversion workspace (float32 slices, :data:`~cinetune.core.quant.CHUNK_ELEMENTS`).

        Raises:
            CheckpointError: a tensor is not in the file; the file is truncated, changed or unreadable (I/O error);
                not enough host memory (with what to do); a damaged or unsupported fp8 layout (see :attr:`fp8`); a
                scale holding NaN/inf; a dtype torch cannot hold (4/6-bit floats).
            ValueError: fp8 quantisation asked for a tensor that is not a ``*.weight``, or a NaN/inf weight.
        """
        from .quant import dequantize_fp8, quantize_fp8  # quant builds on this module

        steps = self._steps(names, dtype)
        device = torch.device(device)
        on_cpu = device.type == "cpu"
        reader = _Reader()
        staging = _Staging(self.source)

        def dest(name: str, shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
            t = allocate(name, shape, dt) if (allocate is not None and on_cpu) else None
            if t is None:
                return _empty(shape, dt, f"tensor {name}", self.source)
            if tuple(t.shape) != tuple(shape) or t.dtype != dt or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"allocate({name!r}) returned {t.dtype} {list(t.shape)} on {t.device}; expected a "
                                 f"contiguous CPU tensor {dt} {list(shape)}")
            return t

        def out(t: torch.Tensor) -> torch.Tensor:
            return t if on_cpu else t.to(device)

        def in_memory(name: str) -> torch.Tensor | None:
            """The tensor of a pickle (loaded whole at open), or None for a tensor still in its file."""
            entry = self._entries[name]
            return None if entry.tensor is None else entry.tensor.detach().to("cpu").reshape(entry.info.shape)

        def fill(name: str, target: torch.Tensor) -> None:
            mem = in_memory(name)
            if mem is not None:
                target.copy_(mem)
            else:
                reader.read_into(self._entries[name], target)

        def staged(name: str) -> torch.Tensor:
            mem = in_memory(name)
            if mem is not None:
                return mem
            info = self.infos[name]
            view = staging.view(info, torch_dtype(info.dtype))
            reader.read_into(self._entries[name], view)
            return view

        def small(name: str) -> torch.Tensor:
            info = self.infos[name]
            t = in_memory(name)
            if t is None:
                t = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
                reader.read_into(self._entries[name], t)
            return t

        try:
            for step in steps:
                name, kind = step.name, step.kind
                (_, shape, dt) = step.outputs[0]
                if kind == "raw":
                    t = dest(name, shape, dt)
                    fill(name, t)
                    yield name, out(t)
                elif kind == "cast":
                    t = dest(name, shape, dt)
                    t.copy_(staged(name))
                    yield name, out(t)
                elif kind in ("fp8", "dequant"):
                    layer = self.fp8.layers[name]
                    scale = torch.ones((), dtype=torch.float32) if layer.scale is None else _combine_scales(
                        small(layer.scale), small(layer.tensor_scale) if layer.tensor_scale else None,
                        f"{self.source}: {self.stored_name(layer.scale)}")
                    if kind == "fp8":
                        t = dest(name, shape, dt)
                        fill(name, t)
                        yield name, out(t)
                        s = dest(step.outputs[1][0], tuple(scale.shape), torch.float32)
                        s.copy_(scale)
                        yield step.outputs[1][0], out(s)
                    else:
                        t = dest(name, shape, dt)
                        dequantize_fp8(staged(name), scale, torch.float32, out=t)
                        yield name, out(t)
                else:  # quant
                    t = dest(name, shape, dt)
                    try:
                        _, scale = quantize_fp8(staged(name), out=t)
                    except ValueError as e:
                        raise ValueError(f"{self.source}: tensor {name!r}: {e}") from e
                    yield name, out(t)
                    s = dest(step.outputs[1][0], (), torch.float32)
                    s.copy_(scale)
                    yield step.outputs[1][0], out(s)
        finally:
            reader.close()

    def read(self, names: Iterable[str] | None = None, *, device: str | torch.device = "cpu"
             ) -> dict[str, torch.Tensor]:
        """Tensors exactly as stored (no fp8 handling, auxiliaries included when named); default: every tensor.

        Raises:
            CheckpointError: as :meth:`iter_load`.
        """
        names = list(self._entries if names is None else names)
        missing = [n for n in names if n not in self._entries]
        if missing:
            raise CheckpointError(f"{self.source}: no tensor {_few(missing)} in this file.")
        result: dict[str, torch.Tensor] = {}
        reader = _Reader()
        try:
            for name in names:
                entry = self._entries[name]
                if entry.tensor is not None:
                    t = entry.tensor
                else:
                    t = _empty(entry.info.shape, torch_dtype(entry.info.dtype), f"tensor {name}", self.source)
                    reader.read_into(entry, t)
                result[name] = t.to(device)
        finally:
            reader.close()
        return result


def hf_model_folder(path: str | os.PathLike, model_types: Sequence[str], expected: str) -> Path | None:
    """The Hugging Face model folder ``path`` is or lies in, when its ``config.json`` names one of ``model_types``.

    Args:
        path: a folder, or a file inside one. model_types: accepted ``model_type`` values.
        expected: what the caller wants, for messages (e.g. ``"Gemma 3 12B"``).

    Returns:
        The folder, or None when ``path`` is a file beside no (readable, matching) ``config.json``.

    Raises:
        CheckpointError: ``path`` is a folder without ``config.json``, or one whose ``model_type`` is another.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        if path.is_dir():
            raise CheckpointError(f"{folder}: not a Hugging Face model folder (no config.json); pass the folder that "
                                  "has config.json, or a single .safetensors file.")
        return None
    try:
        model_type = json.loads(cfg.read_text()).get("model_type", "")
    except (OSError, json.JSONDecodeError):
        return None
    if model_type in model_types:
        return folder
    if path.is_dir():
        raise CheckpointError(f"{folder}: config.json says model_type '{model_type}'; expected {expected}.")
    return None


def _index_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        files = {k: path.parent / str(f) for k, f in weight_map.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid shard index (needs a 'weight_map'): {e}") from e
    return sorted(set(files.values())), {k: str(f) for k, f in files.items()}


def open_checkpoint(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Checkpoint:
    """Open model files for tensor-by-tensor reading (headers only; pickles are loaded whole, as before).

    Args:
        paths: one file (``.safetensors``/``.sft``, or a pickle), a shard index (``*.index.json``: its shards are
            opened and every tensor it lists must be in one), or a list of shards of one model.

    Returns:
        :class:`Checkpoint` over all tensors; names as stored.

    Raises:
        CheckpointError: a file is missing, not safetensors, truncated or unreadable; a tensor name appears in two
            shards; an index lists tensors that no shard holds.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [Path(p) for p in paths]
    if not files:
        raise CheckpointError("no model file given.")
    listed: dict[str, str] = {}
    if len(files) == 1 and files[0].name.endswith(".index.json"):
        index = files[0]
        files, listed = _index_files(index)
    entries: dict[str, _Entry] = {}
    metadata: dict[str, str] = {}
    for f in files:
        if f.suffix.lower() in _PICKLE_SUFFIXES:
            file_entries = {k: _Entry(TensorInfo(tuple(v.shape), dtype_code(v.dtype)), f, k, tensor=v)
                            for k, v in _load_pickle(f).items()}
            meta: dict[str, str] = {}
        else:
            file_entries, meta = _parse_header(f)
        for k, v in meta.items():
            metadata.setdefault(k, v)
        twice = [k for k in file_entries if k in entries]
        if twice:
            raise CheckpointError(f"{f}: tensors {_few(twice)} are also in {entries[twice[0]].path.name}; the shards "
                                  "belong to different models or a shard is duplicated.")
        entries.update(file_entries)
    absent = [k for k in listed if k not in entries]
    if absent:
        raise CheckpointError(f"{paths[0]}: the shard index lists {len(absent)} tensors no shard holds: {_few(absent)}; "
                              "a shard is missing or outdated.")
    source = str(paths[0]) if len(paths) == 1 else f"{files[0]} (+{len(files) - 1} shards)"
    return Checkpoint(entries, metadata, files, source)


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint, each in its stored dtype (tensor by tensor, no memory map).

    Pickles are loaded with ``weights_only=True``; a top-level ``"state_dict"`` or ``"module"`` wrapper is unwrapped.

    Raises:
        CheckpointError: missing, truncated or foreign file, or a pickle that holds no tensors.
    """
    return open_checkpoint(path).read(device=device)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the first prefix in ``prefixes`` that most keys carry.

    A prefix is stripped from the keys that have it when at least half of the keys carry it; keys without it
    are dropped (ComfyUI full checkpoints mix ``model.diffusion_model.`` with VAE/TE keys).

    Returns:
        ``(new_state_dict, prefix_used)``; ``prefix_used`` is ``""`` when nothing was stripped.
    """
    keys = list(sd.keys())
    for p in prefixes:
        hits = [k for k in keys if k.startswith(p)]
        if keys and len(hits) * 2 >= len(keys):
            return {k[len(p):]: sd[k] for k in hits}, p
    return dict(sd), ""


# ---------------------------------------------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write to; on success fsync it and rename it over ``path``.

    Readers never see a half-written file and an interrupted write (any exception, Ctrl-C) leaves the previous
    file intact and no temporary file behind. The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Stream a safetensors file, one tensor in memory at a time (its contiguous CPU copy when it needs one).

    Layout as safetensors writes it: tensors ordered by element size (largest first) then name, so each starts at a
    multiple of its element size; the header padded with spaces to a multiple of 8 bytes.
    """
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors needs a little-endian host")
    meta = {str(k): str(v) for k, v in metadata.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name in order:
        t = tensors[name]
        code = dtype_code(t.dtype)
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            t = tensors[name].detach()
            if t.numel():
                f.write(_byte_view(t.to("cpu").contiguous()))


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (:func:`atomic_path`), tensor by tensor: host memory beyond the tensors
    themselves is one tensor's contiguous CPU copy at most (a stride-0 ``expand`` of one value is materialised only
    while it is written). Metadata values must be strings."""
    with atomic_path(path) as tmp:
        _write_safetensors(tensors, tmp, dict(metadata or {}))
    return Path(path)


def write_json_atomic(data, path: str | os.PathLike, *, indent: int = 1) -> Path:
    """Write JSON (UTF-8, sorted keys) atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=indent, sort_keys=True), encoding="utf-8")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# What a file is (for error messages)

#: ``describe(shapes) -> phrase | None``: a model family's recogniser for :func:`describe_checkpoint`.
CheckpointKind = Callable[[Mapping[str, Sequence[int]]], Union[str, None]]
_KINDS: list[CheckpointKind] = []


def register_checkpoint_kind(describe: CheckpointKind) -> CheckpointKind:
    """Register a family's recogniser: ``describe(shapes)`` returns a phrase such as ``"a Kandinsky 5 DiT (goes in
    models/diffusion_models)"`` or None. :func:`describe_checkpoint` asks registered recognisers (in registration
    order) after its LoRA rule and before its generic rules. Registering the same function again does nothing.
    Returns ``describe`` (usable as a decorator)."""
    if describe not in _KINDS:
        _KINDS.append(describe)
    return describe


def _names(names, n: int = 5) -> str:
    return ", ".join(names[:n]) + (" …" if len(names) > n else "") if names else "none"


def describe_checkpoint(shapes: Mapping[str, Sequence[int]]) -> str:
    """Say in words what a state dict looks like, for error messages.

    Args:
        shapes: tensor name → shape (a sequence of ints).
    Returns:
        A short phrase such as ``"a CLIP text encoder"``; the registered family recognisers
        (:func:`register_checkpoint_kind`) are asked first; for unknown layouts, the first tensor names.
    """
    names = list(shapes)

    def has(part: str) -> bool:
        return any(part in n for n in names)

    def starts(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in names)

    if not names:
        return "an empty file (no tensors)"
    if has("lora_up.") or has("lora_A.") or has("lora_down.") or has("lora_B."):
        return "a LoRA (goes in models/loras)"
    for describe in _KINDS:
        phrase = describe(shapes)
        if phrase:
            return phrase
    if starts("model.diffusion_model."):
        return "a ComfyUI diffusion model or full checkpoint (model.diffusion_model.*)"
    if has("text_model.encoder.layers.") or has("embeddings.token_embedding") or (
            has("encoder.layers.0.self_attn.q_proj") and has("final_layer_norm")):
        return "a CLIP text encoder"
    if has("vision_model.encoder.layers."):
        return "a CLIP vision encoder"
    if has("encoder.block.") and has("SelfAttention"):
        return "a T5 text encoder"
    if has(".layers.0.self_attn.q_norm.") or has("post_feedforward_layernorm"):
        return "a Gemma/Qwen3 language model"
    if has("self_attn.k_proj.bias") and has("embed_tokens"):
        return "a Qwen2/Qwen2.5 language model"
    if has("self_attn.k_proj") and has("embed_tokens"):
        return "a Llama/Mistral-style language model"
    if has("decoder.up_blocks.") or has("decoder.up.") or has("decoder.conv_in"):
        conv = [tuple(s) for n, s in shapes.items() if n.startswith("decoder.conv_in") and n.endswith("weight")]
        if conv and len(conv[0]) == 5:
            return f"a 3D video VAE with {conv[0][1]} latent channels"
        if conv:
            return f"a 2D image VAE with {conv[0][1]} latent channels"
        return "a VAE"
    if has("transformer_blocks.") or has("double_blocks.") or has("blocks.0.attn"):
        return "a diffusion transformer of another model family"
    return "an unrecognised model (first tensors: " + ", ".join(names[:4]) + ")"


# ---------------------------------------------------------------------------------------------------------------
# Filling meta-device models


def assign_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load ``state_dict`` (strict) into a model built on the meta device, taking the tensors over (``assign``).

    Non-persistent buffers are not in checkpoints and stay on meta: the caller rebuilds them, then calls
    :func:`check_materialised`.
    Raises:
        CheckpointError: missing or unexpected tensors, or a shape that differs from the model's (named, with
            ``path`` in the message).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the model built from its config: missing {_names(missing)}, "
            f"unexpected {_names(unexpected)}. The file is incomplete or of another model size.")
    for name, t in state_dict.items():
        if tuple(t.shape) != expected[name] and not name.endswith(SCALE_SUFFIX):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the config expects "
                                  f"{expected[name]}.")
    model.load_state_dict(state_dict, strict=True, assign=True)


def check_materialised(model: torch.nn.Module) -> None:
    """Raise ``RuntimeError`` if any parameter or buffer of ``model`` is still on the meta device."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left uninitialised after loading: {left[:5]}")
