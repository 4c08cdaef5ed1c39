"""Model files as tensor collections: :func:`open_checkpoint` gives a :class:`Checkpoint` (headers, shards, prefix
selections, tensor-by-tensor loads with dtype policies and fp8 handling); whole-file helpers (:func:`load_state_dict`,
:func:`read_tensor_infos`, :func:`strip_prefix`, :func:`hf_model_folder`); the registry of checkpoint kinds used in
error messages (:func:`describe_checkpoint`); and filling meta-device models (:func:`assign_state_dict`).

This is the entry point for model-file I/O: it re-exports the format layer (:mod:`cinetune.core.safetensors_io`:
dtype codes, headers, :func:`save_file_atomic`, :func:`atomic_path`) and the fp8 layouts
(:mod:`cinetune.core.fp8_layouts`), so every name in ``__all__`` imports from here.

Reading: only headers are read at open (pickles are loaded whole); each tensor is then read with positional reads
straight into its destination, or into one reused staging buffer when it is converted, never through a memory map
(why: :mod:`cinetune.core.safetensors_io`). Host memory while loading is the loaded tensors plus one tensor in its
stored dtype (the staging buffer) plus a few MiB of conversion workspace (float32 slices,
:data:`~cinetune.core.quant.CHUNK_ELEMENTS`).

Loading (:meth:`Checkpoint.load`) converts each tensor to the dtype a *policy* names for it (keep the stored dtype,
cast, or quantise to fp8 with one scale per tensor); an fp8 layer is either kept as stored with its float32 scale
under ``L.scale_weight`` (the buffer of :class:`~cinetune.core.quant.FP8Linear`) or dequantised, ``W = q·s`` in float32
rounded once to the target dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from .fp8_layouts import (COMFY_QUANT_SUFFIX, COMFYUI_MARKER, INPUT_SCALE_SUFFIXES, QUANT_METADATA_KEY, SCALE_SUFFIX,
                          TENSOR_SCALE_SUFFIX, WEIGHT_SCALE_SUFFIX, FP8Layer, FP8Scheme, _combine_scales,
                          _decode_config, _find_fp8, fp8_scale_problem, scale_key)
from .safetensors_io import (_PICKLE_SUFFIXES, FP8_CODES, CheckpointError, TensorInfo, _Entry, _empty, _few,
                             _load_pickle, _parse_header, _Reader, _Staging, atomic_path, dtype_code, is_fp8_code,
                             read_safetensors_header, save_file_atomic, torch_dtype, write_json_atomic)

__all__ = [
    # files and loads
    "Allocator", "Checkpoint", "CheckpointError", "Policy", "Target", "TensorInfo", "hf_model_folder",
    "load_state_dict", "open_checkpoint", "read_tensor_infos", "strip_prefix",
    # format layer (safetensors_io)
    "FP8_CODES", "atomic_path", "dtype_code", "is_fp8_code", "read_safetensors_header", "save_file_atomic",
    "torch_dtype", "write_json_atomic",
    # fp8 layouts (fp8_layouts)
    "COMFY_QUANT_SUFFIX", "COMFYUI_MARKER", "FP8Layer", "FP8Scheme", "INPUT_SCALE_SUFFIXES", "QUANT_METADATA_KEY",
    "SCALE_SUFFIX", "TENSOR_SCALE_SUFFIX", "WEIGHT_SCALE_SUFFIX", "fp8_scale_problem", "scale_key",
    # what a file is; filling meta-device models
    "CheckpointKind", "assign_state_dict", "check_materialised", "describe_checkpoint", "register_checkpoint_kind",
]


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


def read_tensor_infos(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names → shape/dtype (safetensors codes) for a safetensors file (header only) or a pickle (loaded).

    Raises:
        CheckpointError: unreadable file (see :func:`open_checkpoint`).
    """
    return dict(open_checkpoint(path).infos)


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
