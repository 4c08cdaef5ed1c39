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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

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


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (:func:`atomic_path`). Tensors are made contiguous; metadata values must
    be strings."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
    return Path(path)


def write_json_atomic(data, path: str | os.PathLike, *, indent: int = 1) -> Path:
    """Write JSON (UTF-8, sorted keys) atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=indent, sort_keys=True), encoding="utf-8")
    return Path(path)


def _names(names, n: int = 5) -> str:
    return ", ".join(names[:n]) + (" …" if len(names) > n else "") if names else "none"


def describe_checkpoint(shapes: Mapping[str, Sequence[int]]) -> str:
    """Say in words what a state dict looks like, for error messages.

    Args:
        shapes: tensor name → shape (a sequence of ints).
    Returns:
        A short phrase such as ``"a CLIP text encoder"`` or ``"a Kandinsky 5 DiT"``; for unknown layouts, the
        first tensor names.
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
    if has("visual_transformer_blocks.") and has("cross_attention.key_norm"):
        return "a Kandinsky 5 DiT (goes in models/diffusion_models)"
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
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the config expects "
                                  f"{expected[name]}.")
    model.load_state_dict(state_dict, strict=True, assign=True)


def check_materialised(model: torch.nn.Module) -> None:
    """Raise ``RuntimeError`` if any parameter or buffer of ``model`` is still on the meta device."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left uninitialised after loading: {left[:5]}")
