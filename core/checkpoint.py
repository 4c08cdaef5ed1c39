"""Checkpoint I/O: safetensors headers, state dicts in their stored dtypes, prefixes, atomic writes.

Formats: safetensors (header = 8-byte little-endian length + JSON, see
https://github.com/huggingface/safetensors README "Format"), and PyTorch pickles (``.pt``/``.pth``/``.bin``)
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A model file cannot be read or is not what was expected. The message says what and how to fix it."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and stored dtype of one tensor, read from a file header without loading the data."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16", "F32", "F8_E4M3"


_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read tensor names, shapes and dtypes (and ``__metadata__``) from a safetensors header.

    Returns:
        ``(tensors, metadata)``: ``tensors[name] = TensorInfo(shape, dtype)``; metadata as stored (str → str).
    Raises:
        CheckpointError: the file is missing, not safetensors, or truncated (data shorter than the header says).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file; re-download it.")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
            raise CheckpointError(
                f"{path}: not a safetensors file (bad header length {n}); expected a .safetensors model file."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is damaged.") from e
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, info in header.items():
        tensors[name] = TensorInfo(tuple(info["shape"]), info["dtype"])
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {8 + n + end} bytes but the file has {size}. "
            "The download or copy was interrupted; fetch the file again."
        )
    return tensors, metadata


def read_tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names → shape/dtype for a safetensors file (header only) or a pickle (loaded).

    Raises:
        CheckpointError: unreadable file (see :func:`load_state_dict`).
    """
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        sd = load_state_dict(path)
        return {k: TensorInfo(tuple(v.shape), str(v.dtype)) for k, v in sd.items()}
    return read_safetensors_header(path)[0]


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint, each in its stored dtype.

    Safetensors files are validated with :func:`read_safetensors_header` first. Pickles are loaded with
    ``weights_only=True``; a top-level ``"state_dict"`` or ``"module"`` wrapper is unwrapped.

    Raises:
        CheckpointError: missing, truncated or foreign file, or a pickle that holds no tensors.
    """
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
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
    read_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors data ({e}).") from e


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the first prefix in ``prefixes`` that most keys carry.

    A prefix is stripped from the keys that have it when at least half of the keys carry it; keys without it
    are kept unchanged (ComfyUI full checkpoints mix ``model.diffusion_model.`` with VAE/TE keys).

    Returns:
        ``(new_state_dict, prefix_used)``; ``prefix_used`` is ``""`` when nothing was stripped.
    """
    keys = list(sd.keys())
    for p in prefixes:
        hits = [k for k in keys if k.startswith(p)]
        if keys and len(hits) * 2 >= len(keys):
            return {k[len(p):]: sd[k] for k in hits}, p
    return dict(sd), ""


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync, then rename.

    Readers never see a half-written file; an interrupted write leaves the previous file intact.
    Tensors are made contiguous; metadata values must be strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
