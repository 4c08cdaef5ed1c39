"""Loading LTX-2 from the files people have: the official combined checkpoint, ComfyUI's split files, a diffusers
snapshot folder.

Where each part lives (reference ltx2.md §1.2, §10; Lightricks/LTX-2 ``ltx_core/model/*/model_configurator.py``;
huggingface/diffusers ``scripts/convert_ltx2_to_diffusers.py``):

===========================================  ==================================================  ==================
part                                         combined / ComfyUI split file                       diffusers snapshot
===========================================  ==================================================  ==================
DiT                                          ``model.diffusion_model.*`` (an official DiT-only   ``transformer/``
                                             file: the same names without the prefix)
video / audio text connectors                ``model.diffusion_model.{video,audio}_embeddings_   ``connectors/``
                                             connector.*``
text projection (``aggregate_embed``)        ``text_embedding_projection.*``                     ``connectors/``
video VAE                                    ``vae.*`` (a split VAE file: also without prefix)   ``vae/``
audio VAE / vocoder                          ``audio_vae.*`` / ``vocoder.*``                     ``audio_vae/``,
                                                                                                 ``vocoder/``
===========================================  ==================================================  ==================

ComfyUI's split files hold one part each under the combined file's names: the DiT (``model.diffusion_model.*``, with
or without the connectors), Kijai's ``*_embeddings_connector_*`` file (``text_embedding_projection.aggregate_embed.
weight`` and the two connectors: 59 tensors), the video VAE, and the audio VAE with its vocoder.

Configs: every part's config comes from the file's ``config`` metadata (its ``transformer``, ``vae``, ``audio_vae``,
``vocoder`` entries) when present, from a diffusers ``config.json``, or else from the tensor shapes — never from code
defaults alone (the official configurator defaults differ from the 19B checkpoint, see :mod:`cinetune.ltx2.config`).
Files are read tensor by tensor (:func:`cinetune.core.checkpoint.open_checkpoint`), each part only its own tensors,
so a 43 GB combined file loads on a host with less memory than the file.

Decisions:

- The connectors stored under ``model.diffusion_model.`` belong to the text side (the official builder loads the DiT
  with ``strict=False`` and drops them silently): :func:`load_ltx2_dit` leaves them, :func:`load_ltx2_text_encoder`
  reads them together with ``text_embedding_projection``.
- diffusers snapshots: the DiT (``transformer/``, keys renamed by
  :func:`cinetune.ltx2.config.diffusers_to_official_key`) and the video VAE (``vae/``) load; the ``connectors/``,
  ``audio_vae/`` and ``vocoder/`` folders are refused with a message naming the file to use instead, because
  :mod:`cinetune.ltx2.connectors` and :mod:`cinetune.ltx2.audio` read only the official key layout.
- The Gemma model is checked against the text projection it feeds, not against a fixed size: ``aggregate_embed``
  takes hidden size × (layers + 1) features, 3840 × 49 = 188160 for Gemma 3 12B and the published checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.checkpoint import Checkpoint, CheckpointError, TensorInfo, describe_checkpoint, is_fp8_code, open_checkpoint
from ..core.weights import check_weight_dtype, load_weights
from .audio import AUDIO_VAE_PREFIX, VOCODER_PREFIX, LTX2AudioVAE, LTX2Vocoder
from .config import (BLOCK_LIST, CONNECTOR_PREFIXES, DIT_PREFIX, EXPECTED_FILE, MARKER_KEY, LTX2TransformerConfig,
                     LTX2Variant, NotLTX2CheckpointError, UnsupportedLTX2Error, check_supported, count_blocks,
                     detect_variant, diffusers_to_official_key, dit_shapes, ltx2_fp8_keep_high_precision)
from .dit import LTX2DiT
from .text import (GEMMA3_12B_TEXT_CONFIG, GEMMA3_SIZES, LTX2TextEncoder, gemma_text_prefix, load_gemma_text_model,
                   load_gemma_tokenizer, load_text_projection)
from .vae import LTX2VideoVAE

__all__ = ["LTX2Variant", "LoadedLTX2DiT", "LTX2VAEs", "check_gemma_fits", "file_config", "file_parts", "gemma_size",
           "load_ltx2_dit", "load_ltx2_text_encoder", "load_ltx2_vae"]

VAE_PREFIX = "vae."
PROJECTION_PREFIX = "text_embedding_projection."
AGGREGATE_EMBED = PROJECTION_PREFIX + "aggregate_embed.weight"
#: ComfyUI single-file Gemma: the SentencePiece model as a uint8 tensor (ComfyUI ``comfy/sd.py`` passes it to
#: ``comfy/text_encoders/lt.py`` ``Gemma3_12BTokenizer`` as ``tokenizer_data["spiece_model"]``).
SPIECE_KEY = "spiece_model"
#: Gemma 3 12B: hidden size, layers, and the features per token ``aggregate_embed`` takes (3840 × 49).
GEMMA3_12B_HIDDEN = GEMMA3_12B_TEXT_CONFIG["hidden_size"]
GEMMA3_12B_LAYERS = GEMMA3_12B_TEXT_CONFIG["num_hidden_layers"]
GEMMA3_12B_FEATURES = GEMMA3_12B_HIDDEN * (GEMMA3_12B_LAYERS + 1)

_CONNECTORS = tuple(DIT_PREFIX + c for c in CONNECTOR_PREFIXES)
_NOT_DIT = (VAE_PREFIX, AUDIO_VAE_PREFIX, VOCODER_PREFIX, PROJECTION_PREFIX, *CONNECTOR_PREFIXES, *_CONNECTORS)
_VAE_EXPECTED = ("the LTX-2 video VAE: ltx-2-19b-dev.safetensors (its vae.* tensors), a split LTX-2 video VAE file, "
                 "or a diffusers snapshot's vae/ folder")
_AUDIO_EXPECTED = ("the LTX-2 audio VAE and vocoder: ltx-2-19b-dev.safetensors (its audio_vae.* and vocoder.* "
                   "tensors) or a split LTX-2 audio VAE file holding both")
_TEXT_EXPECTED = ("the LTX-2 checkpoint the DiT comes from (ltx-2-19b-dev.safetensors: its text_embedding_projection.* "
                  "and model.diffusion_model.*_embeddings_connector.* tensors) or ComfyUI's split embeddings-connector "
                  "file (ltx-2-19b-embeddings_connector_*.safetensors)")
# diffusers class names of the snapshot folders (their config.json "_class_name").
_DIFFUSERS_DIT = "LTX2VideoTransformer3DModel"
_DIFFUSERS_VAE = "AutoencoderKLLTX2Video"
_DIFFUSERS_AUDIO = ("AutoencoderKLLTX2Audio", "LTX2Vocoder", "LTX2VocoderWithBWE")
_DIFFUSERS_CONNECTORS = "LTX2TextConnectors"


def file_config(ckpt: Checkpoint) -> dict[str, Any]:
    """The file's ``config`` metadata as a dict (``{}`` when absent); see :meth:`Checkpoint.config`."""
    return ckpt.config()


# ------------------------------------------------------------------------------------------------ what a file holds

#: Parts of the combined file by key prefix (connectors before the DiT: they share its prefix), with their names.
_PARTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("connectors", _CONNECTORS, "the text connectors (model.diffusion_model.*_embeddings_connector.*)"),
    ("dit", (DIT_PREFIX,), "the DiT (model.diffusion_model.*)"),
    ("text_projection", (PROJECTION_PREFIX,), "the text projection (text_embedding_projection.*)"),
    ("vae", (VAE_PREFIX,), "the video VAE (vae.*)"),
    ("audio_vae", (AUDIO_VAE_PREFIX,), "the audio VAE (audio_vae.*)"),
    ("vocoder", (VOCODER_PREFIX,), "the vocoder (vocoder.*)"),
)


def file_parts(names) -> dict[str, int]:
    """How many tensors of each LTX-2 part a file holds, by the combined file's prefixes.

    Args:
        names: the file's tensor names (any iterable, e.g. ``Checkpoint.infos``).
    Returns:
        part → tensor count for the parts present, among ``"dit"``, ``"connectors"``, ``"text_projection"``,
        ``"vae"``, ``"audio_vae"``, ``"vocoder"``, and ``"other"`` for names without any of these prefixes.
    """
    counts: dict[str, int] = {}
    for name in names:
        part = next((p for p, prefixes, _ in _PARTS if name.startswith(prefixes)), "other")
        counts[part] = counts.get(part, 0) + 1
    return counts


def _holds(ckpt: Checkpoint) -> str:
    """``"it holds the video VAE (vae.*: 63 tensors), …"``, or what the file looks like when it has no LTX-2 part."""
    parts = file_parts(ckpt.infos)
    named = [f"{what.removesuffix(')')}: {parts[p]} tensors)" for p, _, what in _PARTS if p in parts]
    if not named:
        return f"it looks like {describe_checkpoint({k: v.shape for k, v in ckpt.infos.items()})}"
    return "it holds " + ", ".join(named) + (f" and {parts['other']} other tensors" if "other" in parts else "")


def _require(path: Path, ckpt: Checkpoint, needed: tuple[str, ...], expected: str) -> None:
    """Raise when the file lacks one of the ``needed`` parts (:func:`file_parts`), saying what it holds instead."""
    parts = file_parts(ckpt.infos)
    absent = [what for p, _, what in _PARTS if p in needed and p not in parts]
    if absent:
        raise CheckpointError(f"{path}: {' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} missing: "
                              f"{_holds(ckpt)}. Expected {expected}.")


def _open(path: Path, what: str) -> Checkpoint:
    """Open a file, a shard index, or a folder of ``.safetensors`` shards; header only. Refuses NVFP4 and
    LTX-2.3+ files (:func:`~cinetune.ltx2.config.check_supported`)."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found. Expected {what}.")
    target: Path | list[Path] = path
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        shards = sorted(path.glob("*.safetensors"))
        if not index and not shards:
            raise CheckpointError(f"{path}: a folder without .safetensors files. Expected {what}.")
        target = index[0] if index else shards
    try:
        ckpt = open_checkpoint(target)
    except CheckpointError as e:
        raise CheckpointError(f"{e} Expected {what}.") from e
    try:
        check_supported(ckpt.infos, ckpt.metadata)
    except UnsupportedLTX2Error as e:
        raise UnsupportedLTX2Error(f"{path}: {e}") from None
    return ckpt


def _diffusers_class(folder: Path) -> str | None:
    """The ``_class_name`` of ``folder/config.json`` (a diffusers model folder), or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = config.get("_class_name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def _diffusers_folder(path: Path, subfolder: str, classes: tuple[str, ...] | str) -> Path | None:
    """The diffusers model folder of class ``classes`` that ``path`` names: the snapshot folder (its ``subfolder``),
    the model folder itself, or a weight file inside it. A file at the top of a snapshot (e.g. the combined
    ``ltx-2-19b-dev.safetensors`` beside ``transformer/``) is a file, not the snapshot."""
    if not path.exists():
        return None
    classes = (classes,) if isinstance(classes, str) else classes
    candidates = [path / subfolder, path] if path.is_dir() else [path.parent]
    return next((c for c in candidates if _diffusers_class(c) in classes), None)


def _snapshot_root(path: Path) -> Path | None:
    """The diffusers snapshot folder (``model_index.json`` beside ``transformer/``) that ``path`` is or lies in."""
    if not path.exists():
        return None
    for folder in (path, *path.parents[:2]):
        if folder.is_dir() and (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
            return folder
    return None


# ------------------------------------------------------------------------------------------------------------ DiT


@dataclass
class LoadedLTX2DiT:
    """A loaded LTX-2 DiT.

    Attributes:
        model: the DiT (eval, frozen). config: its config. variant: the released checkpoint it is (dev/distilled,
        bf16/fp8). path: the file or folder given. layout: ``"combined"`` (the DiT among other parts),
        ``"comfyui_split"`` (only ``model.diffusion_model.*``, connectors optional), ``"official_dit"`` (DiT names
        without prefix) or ``"diffusers"``. dtypes: stored dtype code → number of DiT tensors (scales not counted).
        other_parts: the file's non-DiT parts (:func:`file_parts`), left for their own loaders.
    """

    model: LTX2DiT
    config: LTX2TransformerConfig
    variant: LTX2Variant
    path: Path
    layout: str = "combined"
    dtypes: dict[str, int] = field(default_factory=dict)
    other_parts: dict[str, int] = field(default_factory=dict)


def _not_a_dit(path: Path, ckpt: Checkpoint) -> NotLTX2CheckpointError:
    parts = file_parts(ckpt.infos)
    if parts.keys() - {"other"}:
        return NotLTX2CheckpointError(
            f"{path}: this file has no LTX-2 DiT: {_holds(ckpt)}. Load it with the loader of that part (LTX-2 VAE "
            f"loader, LTX-2 text encoder loader). Expected {EXPECTED_FILE}, or a split LTX-2 DiT file.")
    try:
        detect_variant(ckpt.source, ckpt.infos, ckpt.metadata)  # its message says what the file looks like
    except NotLTX2CheckpointError as e:
        return NotLTX2CheckpointError(f"{path}: {e}")
    return NotLTX2CheckpointError(f"{path}: no LTX-2 DiT tensors here. Expected {EXPECTED_FILE}.")


def _dit_from_diffusers(folder: Path) -> tuple[Checkpoint, LTX2TransformerConfig, Checkpoint]:
    ckpt = _open(folder, "the diffusers LTX-2 transformer weights (diffusion_pytorch_model*.safetensors)")
    dit = ckpt.rename(lambda k: diffusers_to_official_key(k.removeprefix("transformer.")))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: config.json is unreadable ({e}).") from e
    return dit, LTX2TransformerConfig.from_diffusers_config(config), ckpt


def _dit_from_file(path: Path) -> tuple[Checkpoint, LTX2TransformerConfig, Checkpoint, str]:
    ckpt = _open(path, EXPECTED_FILE)
    parts = file_parts(ckpt.infos)
    if "dit" in parts:
        dit = ckpt.select(DIT_PREFIX, exclude=_CONNECTORS)
        layout = "combined" if parts.keys() - {"dit", "connectors"} else "comfyui_split"
    else:
        dit = ckpt.rename(lambda k: None if k.startswith(_NOT_DIT) else k)
        layout = "official_dit"
    if MARKER_KEY not in dit.infos:
        raise _not_a_dit(path, ckpt)
    transformer = file_config(ckpt).get("transformer")
    if isinstance(transformer, dict):
        config = LTX2TransformerConfig.from_metadata(transformer)
    else:
        config = LTX2TransformerConfig.from_shapes(dit_shapes(dit.model_infos()))
    return dit, config, ckpt, layout


def _dit_selection(path: Path) -> tuple[Checkpoint, LTX2TransformerConfig, Checkpoint, str, str]:
    """(the DiT's tensors under official names, its config, the whole file, layout, name for the variant)."""
    folder = _diffusers_folder(path, "transformer", _DIFFUSERS_DIT)
    if folder is not None:
        dit, config, ckpt = _dit_from_diffusers(folder)
        if MARKER_KEY not in dit.infos:
            raise _not_a_dit(folder, ckpt)
        root = _snapshot_root(folder) or folder
        return dit, config, ckpt, "diffusers", " ".join(root.parts[-3:])  # dev/distilled from the folder names
    if path.is_dir() and _diffusers_class(path) is not None:
        raise NotLTX2CheckpointError(f"{path}: this is a diffusers {_diffusers_class(path)} folder, not the LTX-2 "
                                     f"transformer. Expected {EXPECTED_FILE}, or a diffusers snapshot's "
                                     "transformer/ folder.")
    return (*_dit_from_file(path), path.name)


def _check_dit_tensors(path: Path, model: LTX2DiT, have: Mapping[str, TensorInfo]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in have]
    extra = [k for k in have if k not in expected]
    if missing or extra:
        raise CheckpointError(
            f"{path}: the LTX-2 DiT tensors do not match a {model.config.num_layers}-block model: "
            f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), {len(extra)} unexpected "
            f"(e.g. {', '.join(extra[:3]) or '-'}). The file is incomplete or of another version; expected "
            f"{EXPECTED_FILE}.")
    wrong = [f"{k} {list(have[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
             if tuple(have[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not fit the config the file describes: "
                              f"{'; '.join(wrong[:3])}.")


def load_ltx2_dit(path: str | os.PathLike, *, weight_dtype: str = "default", variant: str = "auto",
                  device: str | torch.device = "cpu") -> LoadedLTX2DiT:
    """Load the LTX-2 DiT from a combined checkpoint, a ComfyUI split DiT file, an official DiT-only file (no
    prefix), or a diffusers snapshot (the folder, its ``transformer/`` folder or a weight file in it).

    Config: the file's ``config.transformer`` metadata (:meth:`LTX2TransformerConfig.from_metadata`); without
    metadata, the shapes (:meth:`~LTX2TransformerConfig.from_shapes`); diffusers: ``transformer/config.json``
    (:meth:`~LTX2TransformerConfig.from_diffusers_config`). Only the DiT's tensors are read; the text connectors
    stored under ``model.diffusion_model.`` are left for :func:`load_ltx2_text_encoder`.

    fp8 files load as stored (see :mod:`cinetune.core.weights`): with ``weight_dtype="default"`` the official fp8
    layers (float8_e4m3fn ``.weight`` with 0-d float32 ``.weight_scale``; ``.input_scale`` unused) and plain-cast fp8
    weights (scale 1) become :class:`~cinetune.core.quant.FP8Linear` with the stored codes and scales; ``"bf16"`` /
    ``"fp16"`` / ``"fp32"`` dequantise them (``W = q·s`` in float32, rounded once); ``"fp8_e4m3fn"`` also quantises
    the high-precision layers the official fp8 policy quantises
    (:func:`~cinetune.ltx2.config.ltx2_fp8_keep_high_precision`).

    Args:
        path: file or folder. weight_dtype: see :mod:`cinetune.core.weights`. variant: ``"auto"`` (dev/distilled
            from the file name, fp8 from the stored dtypes) or a variant id of :data:`cinetune.ltx2.config.VARIANTS`.
        device: where the weights go.

    Returns:
        :class:`LoadedLTX2DiT`.

    Raises:
        NotLTX2CheckpointError: another kind of file (a Kandinsky 5 DiT, an LTX-2 VAE or connector file, a LoRA, …);
            the message says which.
        UnsupportedLTX2Error: NVFP4 or LTX-2.3/2.5 files (the message says which).
        CheckpointError: missing/truncated/unreadable file, missing or unexpected tensors, wrong shapes, not enough
            host memory — each with what to do.
        ValueError: unknown ``weight_dtype`` or ``variant``, or a variant whose fp8 flag contradicts the file.
    """
    check_weight_dtype(weight_dtype)
    path = Path(path)
    dit, config, ckpt, layout, name = _dit_selection(path)
    found = detect_variant(name, {DIT_PREFIX + k: v for k, v in dit.infos.items()}, ckpt.metadata, variant)
    with torch.device("meta"):
        model = LTX2DiT(config)
    have = dit.model_infos()
    _check_dit_tensors(path, model, have)
    expected = list(model.state_dict())
    blocks = [f"{BLOCK_LIST}.{i}." for i in range(count_blocks(expected))]
    load_weights(model, dit, expected, weight_dtype=weight_dtype, keep=ltx2_fp8_keep_high_precision,
                 block_prefixes=blocks, device=device)
    histogram: dict[str, int] = {}
    for key in expected:
        histogram[have[key].dtype] = histogram.get(have[key].dtype, 0) + 1
    others = {p: n for p, n in file_parts(ckpt.infos).items() if p not in ("dit", "other")}
    return LoadedLTX2DiT(model=model, config=config, variant=found, path=path, layout=layout, dtypes=histogram,
                         other_parts=others)


# ----------------------------------------------------------------------------------------------------------- VAEs


@dataclass
class LTX2VAEs:
    """The LTX-2 video VAE and, when loaded, the audio VAE and its vocoder (decoding audio needs both)."""

    video: LTX2VideoVAE
    audio: LTX2AudioVAE | None = None
    vocoder: LTX2Vocoder | None = None

    def to(self, device) -> "LTX2VAEs":
        """Move every loaded part to ``device``; returns self."""
        for part in (self.video, self.audio, self.vocoder):
            if part is not None:
                part.to(device)
        return self


def _load_part(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """A VAE part's tensors as stored (an fp8 tensor, not expected there, dequantised to float32)."""
    return ckpt.load(ckpt.model_infos(), dtype=lambda name, info: torch.float32 if is_fp8_code(info.dtype) else None)


def _is_bare_video_vae(names) -> bool:
    """True for a split video VAE file without the ``vae.`` prefix (ComfyUI's VAE loader reads this form)."""
    names = set(names)
    return ("per_channel_statistics.mean-of-means" in names and "decoder.conv_in.conv.weight" in names
            and not any(n.startswith(DIT_PREFIX) for n in names))


def _load_video_vae(path: Path, dtype: torch.dtype, tiling: bool) -> LTX2VideoVAE:
    folder = _diffusers_folder(path, "vae", _DIFFUSERS_VAE)
    if folder is not None:
        return LTX2VideoVAE.from_diffusers_folder(folder, dtype=dtype, tiling=tiling)
    ckpt = _open(path, _VAE_EXPECTED)
    if "vae" in file_parts(ckpt.infos):
        part = ckpt.select(VAE_PREFIX)
    elif _is_bare_video_vae(ckpt.infos):
        part = ckpt
    else:
        raise CheckpointError(f"{path}: no LTX-2 video VAE in this file: {_holds(ckpt)}. Expected {_VAE_EXPECTED}.")
    return LTX2VideoVAE.from_official_state_dict(_load_part(part), file_config(ckpt).get("vae"), dtype=dtype,
                                                 source=str(path), tiling=tiling)


def _load_audio(path: Path, dtype: torch.dtype) -> tuple[LTX2AudioVAE, LTX2Vocoder]:
    snapshot = _snapshot_root(path)
    if _diffusers_folder(path, "audio_vae", _DIFFUSERS_AUDIO) is not None or (snapshot is not None and (
            path.is_dir() or path.parent != snapshot)):
        raise CheckpointError(
            f"{path}: diffusers audio_vae/ and vocoder/ folders are not supported (the audio VAE and vocoder are read "
            f"in the official key layout). Expected {_AUDIO_EXPECTED}; the combined file is at the top of the "
            "Lightricks/LTX-2 repository.")
    ckpt = _open(path, _AUDIO_EXPECTED)
    _require(path, ckpt, ("audio_vae", "vocoder"), _AUDIO_EXPECTED)
    config = file_config(ckpt)
    audio = LTX2AudioVAE.from_official_state_dict(_load_part(ckpt.select(AUDIO_VAE_PREFIX)), config.get("audio_vae"),
                                                  dtype=dtype, path=str(path))
    vocoder = LTX2Vocoder.from_official_state_dict(_load_part(ckpt.select(VOCODER_PREFIX)), config.get("vocoder"),
                                                   dtype=dtype, path=str(path))
    return audio, vocoder


def load_ltx2_vae(video_path: str | os.PathLike, audio_path: str | os.PathLike | None = None, *,
                  dtype: torch.dtype = torch.float32, tiling: bool = True) -> LTX2VAEs:
    """Load the video VAE and, from ``audio_path``, the audio VAE and vocoder.

    Video VAE: the ``vae.*`` tensors of the combined checkpoint or of a split file (also without the ``vae.``
    prefix), config from the file's ``config.vae`` metadata and the shapes; or a diffusers snapshot's ``vae/``
    folder (the snapshot folder, ``vae/`` or a file in it). Audio: ``audio_vae.*`` and ``vocoder.*`` of the combined
    checkpoint or of a split file holding both, config from ``config.audio_vae`` / ``config.vocoder`` and the shapes.
    Each part reads only its own tensors.

    Args:
        video_path: file or folder with the video VAE. audio_path: file with the audio VAE and vocoder (None: video
            only; the node passes the video file for "same file").
        dtype: compute dtype of the VAEs. tiling: tiled encode/decode of the video VAE.

    Returns:
        :class:`LTX2VAEs`.

    Raises:
        CheckpointError: a file without the part (the message says what the file holds or looks like), a damaged or
            truncated file, a diffusers ``audio_vae/``/``vocoder/`` folder (not supported: use the combined file).
        UnsupportedLTX2Error: NVFP4 or LTX-2.3+ files (the 2.3 vocoder with bandwidth extension, …).
    """
    video = _load_video_vae(Path(video_path), dtype, tiling)
    if audio_path is None:
        return LTX2VAEs(video)
    return LTX2VAEs(video, *_load_audio(Path(audio_path), dtype))


# --------------------------------------------------------------------------------------------------- text encoder


def _projection_features(path: Path) -> int:
    """Input width of ``aggregate_embed`` of the LTX-2 file (header only), after checking it holds the projection."""
    if _diffusers_folder(path, "connectors", _DIFFUSERS_CONNECTORS) is not None or (
            path.is_dir() and _snapshot_root(path) is not None):
        raise CheckpointError(
            f"{path}: diffusers connectors/ folders are not supported (the text projection and connectors are read in "
            f"the official key layout). Expected {_TEXT_EXPECTED}.")
    ckpt = _open(path, _TEXT_EXPECTED)
    _require(path, ckpt, ("text_projection", "connectors"), _TEXT_EXPECTED)
    shape = ckpt.infos[AGGREGATE_EMBED].shape if AGGREGATE_EMBED in ckpt.infos else None
    if shape is None or len(shape) != 2:
        raise CheckpointError(f"{path}: {AGGREGATE_EMBED} is {'missing' if shape is None else list(shape)}; "
                              f"expected a [width, features] tensor. Expected {_TEXT_EXPECTED}.")
    return int(shape[1])


def _gemma_location(path: Path) -> tuple[Path, Path | None]:
    """(the Gemma file or folder to load, the tokenizer folder of its diffusers snapshot or None)."""
    if path.is_dir() and (path / "model_index.json").is_file() and (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    folder = path if path.is_dir() else path.parent
    tokenizer = folder.parent / "tokenizer"
    snapshot_tokenizer = tokenizer if folder.name == "text_encoder" and tokenizer.is_dir() else None
    return path, snapshot_tokenizer


def _gemma_folder_config(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return folder if model_type in ("gemma3", "gemma3_text") else None


def gemma_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(hidden size, layers) of a Gemma 3 text model from its ``config.json`` (Hugging Face folder) or its tensor
    shapes (single file; header only), or None when ``path`` is not recognisably a Gemma model (the Gemma loader
    then says what it is)."""
    path = Path(path)
    folder = _gemma_folder_config(path)
    if folder is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        text = getattr(config, "text_config", None) or config
        return int(text.hidden_size), int(text.num_hidden_layers)
    if not path.is_file():
        return None
    infos = open_checkpoint(path).infos
    prefix = gemma_text_prefix(infos)
    if prefix is None:
        return None
    layer = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    layers = {int(m.group(1)) for n in infos if (m := layer.match(n))}
    return int(infos[prefix + "embed_tokens.weight"].shape[1]), (max(layers) + 1 if layers else 0)


def check_gemma_fits(hidden: int, layers: int, features: int, gemma: str | os.PathLike,
                     checkpoint: str | os.PathLike) -> None:
    """Raise unless a Gemma with ``hidden`` size and ``layers`` gives the ``features`` per token that the LTX-2
    text projection takes (``aggregate_embed`` input width = hidden × (layers + 1), one block per hidden state;
    ltx2.md §3.2).

    Raises:
        CheckpointError: the sizes do not fit; the message names the Gemma found and the one the checkpoint needs
            (Gemma 3 12B: hidden 3840, 48 layers → 188160 features for every published LTX-2 19B file).
    """
    if hidden * (layers + 1) == features:
        return
    found = GEMMA3_SIZES.get((hidden, layers), "a Gemma model")
    needs = (f"Gemma 3 12B (hidden size {GEMMA3_12B_HIDDEN}, {GEMMA3_12B_LAYERS} layers → {GEMMA3_12B_FEATURES} "
             f"features per token)")
    if features != GEMMA3_12B_FEATURES:
        needs = (f"a Gemma whose hidden size × (layers + 1) is {features} (the published LTX-2 19B checkpoints need "
                 f"{needs})")
    raise CheckpointError(
        f"{gemma}: this is {found} (hidden size {hidden}, {layers} layers → {hidden * (layers + 1)} features per "
        f"token), but the text projection of {Path(checkpoint).name} takes {features}: the LTX-2 checkpoint needs "
        f"{needs}. Use gemma_3_12B_it.safetensors / gemma_3_12B_it_fp8_scaled.safetensors (ComfyUI) or the "
        "google/gemma-3-12b-it-qat-q4_0-unquantized folder.")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_NO_TOKENIZER = ("pass tokenizer= a folder with Gemma 3's tokenizer.json (e.g. the "
                 "google/gemma-3-12b-it-qat-q4_0-unquantized folder), put tokenizer.json beside the file, or use that "
                 "Hugging Face folder as the text encoder")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _tokenizer_from_sentencepiece(data: bytes, source: Path):
    """Gemma tokenizer from the SentencePiece model bytes ComfyUI stores in its single files (``spiece_model``),
    converted by transformers (which needs the ``sentencepiece`` and ``protobuf`` packages for that)."""
    lacking = [package for package, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if not _installed(module)]
    if lacking:
        raise CheckpointError(
            f"{source}: the file embeds Gemma's SentencePiece tokenizer ({SPIECE_KEY}), but converting it needs the "
            f"{' and '.join(lacking)} package (pip install {' '.join(lacking)}). Or {_NO_TOKENIZER}.")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "tokenizer.model").write_bytes(data)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False}))
        try:
            return load_gemma_tokenizer(folder)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: the embedded {SPIECE_KEY} is not a usable Gemma 3 tokenizer "
                                  f"({e}). Instead, {_NO_TOKENIZER}.") from e


def _load_tokenizer(gemma: Path, snapshot_tokenizer: Path | None, explicit: str | os.PathLike | None):
    """The Gemma tokenizer: (a) beside the weights (the Hugging Face folder, tokenizer files next to a single
    file, or the snapshot's ``tokenizer/``), (b) ``explicit``, (c) the ``spiece_model`` inside a ComfyUI file."""
    own = gemma if gemma.is_dir() else gemma.parent
    beside: CheckpointError | None = None
    for folder in (own, snapshot_tokenizer):
        if folder is not None and any((folder / f).is_file() for f in _TOKENIZER_FILES):
            try:
                return load_gemma_tokenizer(folder)
            except CheckpointError as e:  # e.g. another model's tokenizer.json in the same folder
                beside = beside or e
    if explicit is not None:
        return load_gemma_tokenizer(explicit)
    if gemma.is_file():
        ckpt = open_checkpoint(gemma)
        if SPIECE_KEY in ckpt:
            raw = ckpt.read([SPIECE_KEY])[SPIECE_KEY]
            return _tokenizer_from_sentencepiece(raw.reshape(-1).to(torch.uint8).numpy().tobytes(), gemma)
    if beside is not None:
        raise beside
    raise CheckpointError(f"{gemma}: no Gemma tokenizer found beside the model or inside it: {_NO_TOKENIZER}.")


def load_ltx2_text_encoder(gemma_path: str | os.PathLike, ckpt_path: str | os.PathLike, *,
                           dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                           tokenizer: str | os.PathLike | None = None) -> LTX2TextEncoder:
    """Load Gemma 3, its tokenizer, and the text projection and connectors of an LTX-2 checkpoint.

    The projection comes from the LTX-2 file the DiT comes from (the connectors belong to that DiT): the combined
    checkpoint or ComfyUI/Kijai's split connector file (``text_embedding_projection.aggregate_embed.weight`` and
    ``model.diffusion_model.{video,audio}_embeddings_connector.*``, 59 tensors), configured by its
    ``config.transformer`` metadata and the tensor shapes (:func:`cinetune.ltx2.text.load_text_projection`). Before
    any weight is read, the Gemma model is checked against it (:func:`check_gemma_fits`).

    The tokenizer is taken (a) from beside the Gemma weights (Hugging Face folder, ``tokenizer.json`` next to a
    single file, a diffusers snapshot's ``tokenizer/``), else (b) from ``tokenizer``, else (c) from the
    SentencePiece model a ComfyUI single file embeds (``spiece_model``; converting it needs ``protobuf``).

    Args:
        gemma_path: Gemma 3 Hugging Face folder (or a file in it), ComfyUI single file (bf16 or fp8 scaled; fp8
            layers stay fp8), or a diffusers snapshot (its ``text_encoder/``).
        ckpt_path: the LTX-2 checkpoint or split connector file.
        dtype: dtype of Gemma's high-precision weights and of the projection. device: where both go.
        tokenizer: tokenizer folder for a single-file Gemma (used when none is beside it).

    Returns:
        :class:`cinetune.ltx2.text.LTX2TextEncoder`.

    Raises:
        CheckpointError: the LTX-2 file has no text projection (the message says what it holds), is a diffusers
            ``connectors/`` folder (not supported), the Gemma does not fit the projection (names both), no tokenizer
            can be found, or any file is missing, truncated or foreign.
        UnsupportedLTX2Error: an NVFP4 or LTX-2.3+ checkpoint.
    """
    ckpt_path = Path(ckpt_path)
    features = _projection_features(ckpt_path)
    gemma, snapshot_tokenizer = _gemma_location(Path(gemma_path))
    if not gemma.exists():
        raise CheckpointError(f"{gemma}: not found. Expected Gemma 3 12B (gemma_3_12B_it.safetensors in "
                              "models/text_encoders, or the google/gemma-3-12b-it-qat-q4_0-unquantized folder).")
    size = gemma_size(gemma)
    model = None
    if size is None:  # not recognisably Gemma: the Gemma loader says what the file is, before reading weights
        model = load_gemma_text_model(gemma, dtype=dtype, device=device, keep_fp8=True, expect_12b=False)
        size = (model.config.hidden_size, model.config.num_hidden_layers)
    check_gemma_fits(*size, features, gemma, ckpt_path)
    tok = _load_tokenizer(gemma, snapshot_tokenizer, tokenizer)
    if model is None:
        model = load_gemma_text_model(gemma, dtype=dtype, device=device, keep_fp8=True, expect_12b=False)
        check_gemma_fits(model.config.hidden_size, model.config.num_hidden_layers, features, gemma, ckpt_path)
    projection = load_text_projection(ckpt_path, dtype=dtype, device=device)
    return LTX2TextEncoder(model, tok, projection)
