"""Text-encoder and latent caches on disk for LoRA training.

A cache folder holds two sub-folders, each written by one cacher and read by the trainer::

    <cache_dir>/text/<key>.safetensors      "text" [L, D] float32 (valid tokens only), "pooled" [D2] float32
    <cache_dir>/text/manifest.json          what the entries are (caption, template, encoder id)
    <cache_dir>/latents/<key>.safetensors   "latent" [C, F', H', W'] float32 VAE latent as the VAE returns it,
                                            with i2v also "first" and "last" [C, 1, H', W']
    <cache_dir>/latents/<key>.failed.json   a clip whose frames could not be decoded (see below)
    <cache_dir>/latents/manifest.json       what the entries are (item, frame indices, bucket, VAE id)

Typical use (the cacher nodes and the trainer node are thin wrappers around this)::

    ds = scan_folder("dataset/")
    te_id = encoder_identity(*text_encoder_paths, dtype=torch.bfloat16)
    cache_text(ds, text_encoder, "cache/", encoder_id=te_id)
    vae_id = encoder_identity(vae_path, dtype=torch.float32)
    spec = FrameSpec(17, latent_format=fmt)       # fmt: the model family's LatentFormat
    cache_latents(ds, vae, "cache/", vae_id=vae_id, frame_spec=spec)
    samples = load_cached_dataset(ds, "cache/", encoder_id=te_id, vae_id=vae_id, frame_spec=spec)

The latent geometry (channels, down-scaling, frame rule, size multiple) comes from ``frame_spec.latent_format``
(:class:`~cinetune.core.family.LatentFormat`); nothing here is specific to one model.

Decisions (sources: reference k5.md §5 and §8, musubi-tuner's cache scripts, the official Kandinsky 5 training
code):

- **Keys are content hashes of every input**, so a cache folder can be shared by runs with different settings
  and stale entries are never read. A key is the SHA-256 hex digest of the UTF-8 JSON text of a payload, written
  with ``json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)``. Text payload
  ``{"v": CACHE_VERSION, "caption": caption, "template": template, "encoder": encoder_id}``. Latent payload
  ``{"v": CACHE_VERSION, "item": identity, "indices": [source frame indices], "bucket": [width, height],
  "vae": vae_id, "i2v": true|false}``, where ``identity`` is ``["file", absolute path, size, mtime_ns]`` for a
  file, or ``["pixels", [F, H, W, 3], SHA-256 hex of the float32 C-order pixel bytes]`` for in-memory items.
  Frame indices stand for the whole frame selection (count, fps resampling, mode). Moving the dataset folder
  therefore re-encodes its latents; moving model files does not (see :func:`encoder_identity`). The latent format
  is not part of the key: the VAE id already tells VAEs apart. ``CACHE_VERSION`` is bumped when
  decoding/resizing or the file layout changes.
- **Latents as the VAE returns them, float32.** A latent format with a scaling factor is stored unscaled (the
  official Kandinsky 5 trainer caches unscaled latents and scales them in the loop; musubi stores scaled ones —
  we do not); the trainer applies ``LatentFormat.to_model``. So entries equal ComfyUI ``LATENT`` samples.
  float32 keeps exactly what the VAE produced whatever dtype it ran in; the cost is small (a 121-frame 512×512
  clip is 8 MB with 16 channels). Every encoded latent is checked against ``LatentFormat.latent_shape``.
- **I2V**: "first" / "last" are the first / last frame of the clip encoded ALONE as one-frame videos, as the
  official I2V pipeline encodes its conditioning image (not latent frames sliced out of the clip, whose last
  latent frame mixes several frames). For a one-frame clip both equal "latent". (musubi's ``latents_image`` also
  holds first and last frame latents.)
- **Templates**: video items use the prompt template ``"video"``, one-frame items (images) ``"image"``; pass
  ``template_for`` to choose otherwise (musubi-tuner picks one template per dataset: ``"video"`` if any item has
  more than one frame). The empty caption ``""`` is cached for every template in use, for caption dropout
  (:func:`empty_text_path`).
- **One prompt per encoder call**, so an entry never depends on which other captions were encoded with it
  (padding in a batch can change the last bits) and interruption loses at most one entry.
- **Interruption**: every file is written atomically (temporary file + rename), ``check_interrupt()`` is called
  before each entry and ``progress(done, total)`` after it; an interrupted run leaves only complete entries and
  the next run skips them. An existing entry is checked by its header (tensor names, file length); a damaged
  one (truncated, unreadable, not safetensors) is encoded again.
- **Damaged is not missing.** :func:`load_cached_dataset` reports an entry whose file exists but fails that check
  as damaged (and says the cacher re-encodes exactly those), apart from entries that were never written. Each
  :class:`CacheReport` lists the entry files its dataset uses (``entries``), so a caller can tell later whether the
  files on disk are still the ones the cacher left (the cacher nodes re-run when they are not).
- **Problems instead of failures**: too-short videos, items too small for any bucket and files that fail to
  decode are reported in :class:`CacheReport` (with the dataset's own scan problems, so one report lists every
  file left out) and the rest is cached. A clip that failed to decode gets a ``<key>.failed.json`` marker so
  :func:`load_cached_dataset` leaves it out instead of reporting it missing; a later successful run removes it.
  Only when nothing at all can be cached is :class:`~cinetune.training.data.DatasetError` raised.
- **Manifests** (``manifest.json`` in each sub-folder) list every entry with its inputs, for people. They are
  rewritten atomically at the end of each run, interrupted or not, keeping earlier entries whose files still
  exist. The entry files are the truth; a process killed outright can leave the manifest without its last
  entries, and the next run adds them back.

**Families and their layouts** (:class:`CacheLayout`, handed over by the family's nodes as a value). LTX-2, with
``LTX2_CACHE_LAYOUT`` and the readers of :mod:`cinetune.training.samples`::

    entry = padded_text_entries(lambda prompts: encode_prompts(text_encoder, prompts))   # cinetune.ltx2.text
    cache_text(ds, entry, "cache/", encoder_id=weights_identity(gemma, projection), layout=LTX2_CACHE_LAYOUT)
    spec = FrameSpec(49, target_fps=None, latent_format=LTX2_LATENT_FORMAT)               # each clip keeps its fps
    cache_latents(ds, vaes.video, "cache/", vae_id=vae_id, frame_spec=spec, layout=LTX2_CACHE_LAYOUT,
                  audio_vae=vaes.audio)
    samples = ltx2_samples_from_cache(load_cached_dataset(ds, "cache/", encoder_id=..., vae_id=vae_id,
                                                          frame_spec=spec, layout=LTX2_CACHE_LAYOUT, audio=True))

- **The model family is part of every key** of a layout with a ``family``: the text payload gains
  ``"family": <name>``, the latent payload ``"family"``, ``"fps"`` (the clip's frame rate,
  :func:`~cinetune.training.data.clip_fps`) and, with sound, ``"audio": {"sample_rate": …, "channels": …}``. The family and the model ids are
  also written into each entry's metadata (``family``, ``encoder_id`` / ``vae_id``) and each manifest entry, so a
  cache from another family or model version is never read: its keys differ, the read functions refuse a file whose
  ``family`` differs from the layout's, and a missing-entries error counts the files there that other models made
  (naming the family and model id). The default layout (``family`` None) keeps the keys of cache format 1 unchanged,
  so Kandinsky 5 caches written before families were recorded stay valid; those files carry no ``family``.
- **Model ids** come from :func:`encoder_identity` (model files and settings) or :func:`weights_identity` (the loaded
  weights themselves: for model handles that do not remember their files). Either way the id names the weights, so
  two versions of a model never share entries.
- **Text entries** hold the tensors the layout names (``text_tensors``): ``"text"`` ``[L, D]`` float32 always first;
  the default layout keeps the L valid tokens and ``"pooled"`` ``[D2]`` (above); a family whose encoder needs the
  padded sequence stores it whole with a bool ``"text_mask"`` ``[L]`` (LTX-2: ``[1024, 3840]`` projected Gemma
  features, left-padded, as ltx-trainer's ``conditions/*.pt``). The family's encoding is a function
  ``(caption, template) → {name: tensor}`` handed to :func:`cache_text`. A layout with one ``template`` encodes each
  caption once for every item, images included.
- **Sound** (``audio_vae`` given to :func:`cache_latents`, a latent format with ``audio``): each clip's track is
  decoded (:func:`~cinetune.training.data.load_clip_audio`: stereo, the format's rate, trimmed/padded to the clip's
  duration) and encoded by the audio VAE into ``"audio"`` ``[C_a, T, M]`` float32 beside ``"latent"``, T as the audio
  VAE gives it (ltx-trainer's ``audio_latents/*.pt`` keep the encoder's length too). Before anything is encoded, clips
  without an audio stream raise :class:`~cinetune.training.data.NoAudioError` (or get silence with
  ``missing_audio="silence"``; the entry's metadata says ``audio_source`` ``silence``), and ``uniform`` selection is
  refused. A track that fails to decode is a problem like an undecodable video (marker, file left out).
- **Image-to-video for a family whose DiT conditions on the clip's own first latent frame** (LTX-2, a layout without
  ``i2v_frames``) needs no extra tensors: its causal VAE encodes the first latent frame from the first frame alone,
  so ``i2v`` adds nothing to the entries or the keys there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..core.checkpoint import (
    CheckpointError,
    load_state_dict,
    read_safetensors_header,
    save_file_atomic,
    write_json_atomic,
)
from ..core.family import LatentFormat
from ..core.media import MediaError
from .data import (
    AUDIO_CHANNELS,
    Bucket,
    Clip,
    Dataset,
    DatasetError,
    DatasetItem,
    DatasetProblem,
    FrameSpec,
    NoAudioError,
    NoBucketError,
    assign_bucket,
    check_clip_audio,
    clip_audio_span,
    clip_fps,
    has_audio_track,
    load_clip,
    load_clip_audio,
    make_buckets,
    plan_clips,
)

__all__ = [
    "CACHE_VERSION", "CacheError", "CacheLayout", "DEFAULT_LAYOUT", "CachedSample", "CacheReport", "encoder_identity",
    "weights_identity", "default_template", "padded_text_entries", "cache_text", "cache_latents",
    "load_cached_dataset", "read_latent", "read_text", "read_text_entry", "empty_text_path",
]

#: Part of every key: bump when the meaning of a cached file changes (decoding, resizing, layout).
CACHE_VERSION = 1

TEXT_DIR, LATENT_DIR, MANIFEST = "text", "latents", "manifest.json"
_FAILED_SUFFIX = ".failed.json"
_LIST_LIMIT = 10

ProgressFn = Callable[[int, int], None]
InterruptFn = Callable[[], None]
TemplateFn = Callable[[DatasetItem], str]
#: A family's text encoding for :func:`cache_text`: ``(caption, template) → {tensor name: tensor}`` of one entry.
TextEntryFn = Callable[[str, str], Mapping[str, Tensor]]


class TextEncoderLike(Protocol):
    """What :func:`cache_text` needs: ``encode(prompts, template)`` → object with ``text``, ``text_mask``,
    ``pooled`` (the text encoder wrapper of a model family)."""

    def encode(self, prompts: list[str], template: str = "video"): ...


class VAELike(Protocol):
    """What :func:`cache_latents` needs: ``encode(video [B, 3, F, H, W] in [-1, 1])`` → latent
    ``[B, C, F', H', W']`` of the frame spec's latent format (the VAE wrapper of a model family)."""

    def encode(self, video: Tensor) -> Tensor: ...


class AudioVAELike(Protocol):
    """What :func:`cache_latents` needs for sound: ``encode(waveform [B, C, S], sample_rate)`` → latent
    ``[B, C_a, T, M]`` of the latent format's ``audio`` geometry (the family's audio VAE wrapper)."""

    def encode(self, waveform: Tensor, sample_rate: int) -> Tensor: ...


@dataclass(frozen=True)
class CacheLayout:
    """What a model family's cache entries hold and how they are keyed (see the module notes).

    Attributes:
        family: the family's name (:attr:`cinetune.core.family.ModelFamily.name`), written into every key, entry and
            manifest entry; None = the family-less keys of cache format 1 (Kandinsky 5).
        text_tensors: tensor names of a text entry, ``"text"`` first (``[L, D]`` float).
        template: one prompt template for every item (a family without templates); None = per item,
            :func:`default_template` unless ``template_for`` is given.
        i2v_frames: image-to-video training caches the clip's first and last frames encoded alone (``"first"``,
            ``"last"``); False for a family whose DiT conditions on the clip's own first latent frame (LTX-2), where
            ``i2v`` caches nothing more and does not change the keys.

    Raises:
        ValueError: ``text_tensors`` does not start with ``"text"``, or an empty family or template.
    """

    family: str | None = None
    text_tensors: tuple[str, ...] = ("text", "pooled")
    template: str | None = None
    i2v_frames: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_tensors", tuple(self.text_tensors))
        if not self.text_tensors or self.text_tensors[0] != "text":
            raise ValueError(f"CacheLayout: text_tensors must start with 'text', got {self.text_tensors!r}")
        for name in ("family", "template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"CacheLayout: {name} must be a non-empty string or None, got {value!r}")

    def describe(self) -> str:
        """The family for messages: its name, or that the cache has none (format 1, Kandinsky 5)."""
        return f"model family '{self.family}'" if self.family else "no model family (a format-1 Kandinsky 5 cache)"


#: The layout of cache format 1: family-less keys, text entries of valid tokens + pooled vector.
DEFAULT_LAYOUT = CacheLayout()


class CacheError(DatasetError):
    """A cache entry is missing or damaged; the message names the entries and says which cacher to run."""


@dataclass(frozen=True)
class CachedSample:
    """One training sample: one clip of one item in one bucket, with its cached latent and caption embedding.

    Attributes:
        key: latent key (64 hex chars, see the module notes).
        latent_path: safetensors file with "latent" ``[C, F', H', W']`` float32 VAE latent
            (``LatentFormat.latent_shape(bucket width, bucket height, frames)``); with i2v also "first" and "last"
            ``[C, 1, H', W']`` (read with :func:`read_latent`).
        text_key: text key of (caption, template, encoder id).
        text_path: safetensors file with "text" ``[L, D]`` and "pooled" ``[D2]`` float32 (read with :func:`read_text`).
        caption: the caption as encoded.
        item_id: the item's ``source_id``.
        bucket: ``(width, height)`` in pixels.
        frames: video frames in the clip (valid for the latent format; 1 for images).
        kind: ``"video"`` or ``"image"`` (the item's kind).
        repeats: how many times the sample counts per epoch.
        template: the prompt template the caption was encoded with; caption dropout uses
            ``empty_text_path(cache_dir, encoder_id, template, layout=layout)``.
        fps: the clip's frame rate (:func:`~cinetune.training.data.clip_fps`).
        audio: the latent file also holds ``"audio"`` ``[C_a, T, M]``.
        layout: the :class:`CacheLayout` the entries were cached with (its family, its text tensors).
    """

    key: str
    latent_path: Path
    text_key: str
    text_path: Path
    caption: str
    item_id: str
    bucket: tuple[int, int]
    frames: int
    kind: str
    repeats: int
    template: str = "video"
    fps: float | None = None
    audio: bool = False
    layout: CacheLayout = DEFAULT_LAYOUT


@dataclass
class CacheReport:
    """What a cacher did.

    Attributes:
        written: entries encoded and written by this run.
        skipped: entries that were already cached (complete files found).
        problems: files left out: the dataset's scan problems followed by those found while caching.
        cache_dir: the cache folder (the root passed in, holding ``text/`` and ``latents/``).
        entries: every complete entry file the dataset uses after this run (written or already cached), in order.
    """

    written: int
    skipped: int
    problems: list[DatasetProblem] = field(default_factory=list)
    cache_dir: Path = Path(".")
    entries: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """Multi-line text for node outputs and logs: counts, the folder, then one line per problem."""
        head = (f"{self.written} written, {self.skipped} already cached, {len(self.problems)} problems "
                f"in {self.cache_dir}")
        lines = [head]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ identities


def _sha256_json(payload) -> str:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _file_row(path: Path, name: str) -> list:
    st = path.stat()
    return ["file", name, st.st_size, st.st_mtime_ns]


def encoder_identity(*paths_or_strings: str | os.PathLike, dtype: torch.dtype | str | None = None) -> str:
    """A stable id for a set of model files (and settings), for cache keys.

    Each argument is either a path or a plain string:

    - ``os.PathLike`` objects are paths and must exist; a ``str`` naming an existing file or folder is a path too.
      A file contributes its name, size and ``mtime_ns``; a folder contributes every non-hidden file below it
      (relative name, size, ``mtime_ns``), e.g. a Hugging Face snapshot with its tokenizer files. The folder
      location is not used, so moving models keeps their caches; replacing or touching a file changes the id.
    - any other ``str`` is included as it is (e.g. ``"tiling=256/192"`` for settings that change the output).

    Args:
        *paths_or_strings: model files/folders and settings, in a fixed order (order matters).
        dtype: compute dtype the model runs in (included as text), or None.

    Returns:
        32 lowercase hex characters.

    Raises:
        ValueError: no arguments.
        FileNotFoundError: a ``Path`` argument does not exist.
        TypeError: an argument that is neither a string nor a path.
    """
    if not paths_or_strings:
        raise ValueError("encoder_identity needs at least one model path or string")
    rows: list = []
    for part in paths_or_strings:
        if isinstance(part, os.PathLike) or (isinstance(part, str) and part and os.path.exists(part)):
            path = Path(part)
            if not path.exists():
                raise FileNotFoundError(f"model file not found: {path}; check the path given for the model")
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file()
                               and not any(s.startswith(".") for s in p.relative_to(path).parts))
                rows.append(["folder", path.name, [_file_row(p, p.relative_to(path).as_posix()) for p in files]])
            else:
                rows.append(_file_row(path, path.name))
        elif isinstance(part, str):
            rows.append(["text", part])
        else:
            raise TypeError(f"encoder_identity takes paths or strings, got {type(part).__name__}")
    if dtype is not None:
        rows.append(["dtype", str(dtype)])
    return _sha256_json({"v": CACHE_VERSION, "parts": rows})[:32]


_WEIGHT_SAMPLES = 4096


def _tensor_fingerprint(name: str, tensor: Tensor) -> list:
    """Name, shape, dtype and a SHA-256 of up to ``_WEIGHT_SAMPLES`` evenly strided values (their raw bytes)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, -(-flat.numel() // _WEIGHT_SAMPLES))
    picked = flat[::step].contiguous().cpu()
    data = picked.view(torch.uint8) if picked.dtype != torch.bool else picked.to(torch.uint8)
    return [name, list(tensor.shape), str(tensor.dtype), hashlib.sha256(data.numpy().tobytes()).hexdigest()]


def weights_identity(*parts: nn.Module | Mapping[str, Tensor] | str) -> str:
    """A stable id for loaded weights (and settings), for cache keys when the model files are not known.

    Each module (its ``state_dict()``, parameters and buffers) or tensor mapping contributes, per tensor in name
    order, the name, shape, dtype and a SHA-256 of up to 4096 evenly strided values' raw bytes (so gigabytes of
    weights are fingerprinted in well under a second, on any device). Two versions of a model (another checkpoint,
    a fine-tune, another dtype) differ in those values; the same file loaded twice gives the same id, wherever it
    lies. An edit confined to values between the samples would go unnoticed; checkpoints do not differ that way.
    Strings are included as they are (settings that change the output, e.g. ``"tiling=512/64"``).

    Args:
        *parts: modules, tensor mappings and strings, in a fixed order (order matters).

    Returns:
        32 lowercase hex characters.

    Raises:
        ValueError: no arguments, or a module or mapping without tensors.
        TypeError: an argument of another type.
    """
    if not parts:
        raise ValueError("weights_identity needs at least one module, tensor mapping or string")
    rows: list = []
    for part in parts:
        if isinstance(part, str):
            rows.append(["text", part])
            continue
        if isinstance(part, nn.Module):
            tensors = part.state_dict(keep_vars=False)
        elif isinstance(part, Mapping):
            tensors = part
        else:
            raise TypeError(f"weights_identity takes modules, tensor mappings or strings, got {type(part).__name__}")
        named = sorted((k, v) for k, v in tensors.items() if isinstance(v, Tensor))
        if not named:
            raise ValueError(f"weights_identity: the {type(part).__name__} holds no tensors")
        rows.append(["weights", [_tensor_fingerprint(k, v) for k, v in named]])
    return _sha256_json({"v": CACHE_VERSION, "weights": rows})[:32]


def default_template(item: DatasetItem) -> str:
    """Prompt template for an item: ``"video"`` for video items, ``"image"`` for images (see the module notes)."""
    return "video" if item.kind == "video" else "image"


def _text_key(caption: str, template: str, encoder_id: str, layout: CacheLayout = DEFAULT_LAYOUT) -> str:
    payload = {"v": CACHE_VERSION, "caption": caption, "template": template, "encoder": encoder_id}
    if layout.family is not None:
        payload["family"] = layout.family
    return _sha256_json(payload)


def _template_function(layout: CacheLayout, template_for: TemplateFn | None) -> TemplateFn:
    if template_for is not None:
        return template_for
    if layout.template is not None:
        return lambda item: layout.template
    return default_template


def _item_identity(item: DatasetItem, memo: dict[int, list]) -> list:
    """Absolute path + size + mtime_ns, or a digest of in-memory pixels. Raises FileNotFoundError."""
    found = memo.get(id(item))
    if found is not None:
        return found
    if item.pixels is not None:
        data = np.ascontiguousarray(item.pixels.detach().to("cpu", torch.float32).numpy())
        identity = ["pixels", list(data.shape), hashlib.sha256(data.data).hexdigest()]
    elif item.path is not None:
        st = item.path.stat()
        identity = ["file", str(item.path.absolute()), st.st_size, st.st_mtime_ns]
    else:
        raise ValueError(f"{item.source_id}: item has neither a file nor in-memory pixels")
    memo[id(item)] = identity
    return identity


def _latent_key(identity: list, indices: list[int], bucket: Bucket, vae_id: str, i2v: bool,
                extra: Mapping | None = None) -> str:
    payload = {"v": CACHE_VERSION, "item": identity, "indices": indices, "bucket": [bucket.width, bucket.height],
               "vae": vae_id, "i2v": bool(i2v)}
    payload.update(extra or {})
    return _sha256_json(payload)


def empty_text_path(cache_dir: str | os.PathLike, encoder_id: str, template: str | None = None, *,
                    layout: CacheLayout = DEFAULT_LAYOUT) -> Path:
    """Path of the cached empty caption ``""`` for ``template`` (caption dropout).

    :func:`cache_text` writes it for every template its dataset uses. Read it with :func:`read_text` (default
    layout) or :func:`read_text_entry`.

    Args:
        template: the prompt template; None = the layout's ``template``, else ``"video"``.
        layout: the :class:`CacheLayout` of the cache.
    """
    template = template if template is not None else (layout.template or "video")
    return Path(cache_dir) / TEXT_DIR / f"{_text_key('', template, encoder_id, layout)}.safetensors"


# ----------------------------------------------------------------------------------------------- file helpers


def _is_complete(path: Path, names: Iterable[str]) -> bool:
    """The file exists, its header is valid, its data is all there and it holds ``names``."""
    try:
        tensors, _ = read_safetensors_header(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # CheckpointError, or a mangled header
        return False
    return all(name in tensors for name in names)


def _exists(path: Path) -> bool:
    """A file is there, readable or not (an unreadable entry is damaged, not missing)."""
    try:
        return path.is_file()
    except OSError:
        return True


def _subfolder(cache_dir: str | os.PathLike, name: str) -> Path:
    root = Path(cache_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"cache folder {root} is a file; choose a folder for the cache")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _Manifest:
    """The ``manifest.json`` of one sub-folder: earlier entries whose files still exist, plus this run's."""

    def __init__(self, folder: Path, kind: str):
        self.path, self.kind, self.folder = folder / MANIFEST, kind, folder
        self.entries: dict[str, dict] = {}
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and isinstance(old.get("entries"), dict):
                self.entries = old["entries"]
        except (OSError, ValueError):
            pass  # missing or unreadable: rebuilt from this run's entries

    def add(self, key: str, info: dict) -> None:
        self.entries[key] = info

    def save(self) -> None:
        entries = {k: v for k, v in self.entries.items()
                   if isinstance(v, dict) and (self.folder / str(v.get("file", ""))).is_file()}
        write_json_atomic({"format": f"cinetune {self.kind} cache", "version": CACHE_VERSION,
                            "entries": entries}, self.path)

    def other_models(self, id_field: str, family: str | None, model_id: str) -> str:
        """Who made the listed entries whose files exist and whose family or model id differ from ours:
        ``"; 3 of them were made by other models: 2 by no model family …, 1 by model family 'x' (vae_id 0123…)"``,
        or "" when none."""
        makers: dict[tuple, int] = {}
        for info in self.entries.values():
            if not isinstance(info, dict) or not (self.folder / str(info.get("file", ""))).is_file():
                continue
            maker = (info.get("family"), info.get(id_field))
            if maker != (family, model_id):
                makers[maker] = makers.get(maker, 0) + 1
        if not makers:
            return ""
        parts = [f"{n} by {CacheLayout(fam).describe()} ({id_field} {str(mid)[:12]}…)"
                 for (fam, mid), n in sorted(makers.items(), key=lambda kv: -kv[1])]
        return (f"; {sum(makers.values())} of them were made by other models, and a cache is never reused across "
                f"models: {', '.join(parts)}")


def _tick(check_interrupt: InterruptFn | None) -> None:
    if check_interrupt is not None:
        check_interrupt()


def _listed(lines: list[str]) -> str:
    shown = [f"  - {line}" for line in lines[:_LIST_LIMIT]]
    if len(lines) > _LIST_LIMIT:
        shown.append(f"  … and {len(lines) - _LIST_LIMIT} more")
    return "\n".join(shown)


# ------------------------------------------------------------------------------------------------ text cache


def _text_entries(dataset: Dataset, template_for: TemplateFn) -> list[tuple[str, str]]:
    """Distinct (caption, template) pairs in item order, then ("", template) for each template used."""
    pairs: dict[tuple[str, str], None] = {}
    templates: dict[str, None] = {}
    for item in dataset.items:
        template = template_for(item)
        if not isinstance(template, str) or not template:
            raise ValueError(f"template_for returned {template!r} for {item.name}; return a template name "
                             "such as 'video' or 'image'")
        pairs[(item.caption, template)] = None
        templates[template] = None
    for template in templates:
        pairs[("", template)] = None
    return list(pairs)


def cache_text(dataset: Dataset, encoder: TextEncoderLike | TextEntryFn, cache_dir: str | os.PathLike, *,
               encoder_id: str, template_for: TemplateFn | None = None, progress: ProgressFn | None = None,
               check_interrupt: InterruptFn | None = None, layout: CacheLayout = DEFAULT_LAYOUT) -> CacheReport:
    """Encode every distinct caption of a dataset (and the empty caption) once and store the embeddings.

    One entry per distinct (caption, template): template from ``template_for(item)`` (default: the layout's one
    template, else :func:`default_template`: ``"video"`` for videos, ``"image"`` for images), plus ``""`` for each
    template in use. Entries already in ``<cache_dir>/text/`` (same key, complete file) are skipped. Each entry is
    encoded alone and written atomically, on CPU, with the caption, template, encoder id and family in the file's
    metadata:

    - an ``encoder`` object (:class:`TextEncoderLike`, the default layout): ``encoder.encode([caption], template)``,
      stored as ``"text"`` ``[L, D]`` (the L valid tokens, float32) and ``"pooled"`` ``[D2]`` float32;
    - a function ``(caption, template) → {name: tensor}`` (:data:`TextEntryFn`, a family's own encoding): its
      tensors, exactly the layout's ``text_tensors``, ``"text"`` ``[L, D]`` float (stored float32), others as
      returned (float tensors as float32, bool masks as bool).

    Args:
        dataset: from :func:`~cinetune.training.data.scan_folder` or ``from_tensors``.
        encoder: a loaded text encoder wrapper or an entry function (above), on any device; it is not moved.
        cache_dir: cache folder (created if missing); entries go to its ``text/`` sub-folder.
        encoder_id: from :func:`encoder_identity` or :func:`weights_identity` for the text-encoder weights and dtype.
        template_for: ``item → template name``; None = the layout's template or :func:`default_template`.
        progress: called as ``progress(done, total)`` after each entry (total = distinct entries).
        check_interrupt: called before each entry; whatever it raises propagates (complete entries stay).
        layout: the family's :class:`CacheLayout` (its family goes into the keys).

    Returns:
        :class:`CacheReport` (``problems`` = the dataset's scan problems; text encoding adds none).

    Raises:
        DatasetError: the dataset has no items.
        ValueError: ``template_for`` returns something that is not a template name (the encoder raises for unknown
            names), or the encoder returns unexpected tensors or shapes (nothing is written for that entry).
        TypeError: ``encoder`` is neither an encoder object nor a function.
        NotADirectoryError: ``cache_dir`` is a file.
    """
    if not dataset.items:
        raise DatasetError("the dataset has no items; scan a folder with captioned videos or images first")
    encode = _entry_function(encoder, layout)
    entries = _text_entries(dataset, _template_function(layout, template_for))
    folder = _subfolder(cache_dir, TEXT_DIR)
    manifest = _Manifest(folder, "text")
    written = skipped = 0
    paths: list[Path] = []
    try:
        for done, (caption, template) in enumerate(entries, start=1):
            _tick(check_interrupt)
            key = _text_key(caption, template, encoder_id, layout)
            path = folder / f"{key}.safetensors"
            info = {"file": path.name, "caption": caption, "template": template, "encoder_id": encoder_id,
                    "family": layout.family}
            if _is_complete(path, layout.text_tensors):
                skipped += 1
            else:
                save_file_atomic(encode(caption, template), path, metadata=_metadata(
                    "text", layout, caption=caption, template=template, encoder_id=encoder_id))
                written += 1
            manifest.add(key, {**info, "tokens": _shape_of(path, "text")[0]})
            paths.append(path)
            if progress is not None:
                progress(done, len(entries))
    finally:
        manifest.save()
    return CacheReport(written, skipped, list(dataset.problems), Path(cache_dir), paths)


def _metadata(kind: str, layout: CacheLayout, **fields: str) -> dict[str, str]:
    """Entry-file metadata: format, version, the family (when the layout has one) and ``fields``."""
    meta = {"format": f"cinetune {kind} cache", "version": str(CACHE_VERSION), **fields}
    if layout.family is not None:
        meta["family"] = layout.family
    return meta


def _entry_function(encoder, layout: CacheLayout) -> Callable[[str, str], dict[str, Tensor]]:
    """``(caption, template) → checked CPU tensors`` of one text entry, for either kind of ``encoder``."""
    if hasattr(encoder, "encode"):
        if layout.text_tensors != DEFAULT_LAYOUT.text_tensors:
            raise TypeError(f"a text encoder object gives 'text' and 'pooled' entries, but the layout holds "
                            f"{', '.join(layout.text_tensors)}: pass the family's entry function instead")
        return lambda caption, template: _valid_tokens(encoder, caption, template)
    if not callable(encoder):
        raise TypeError(f"encoder must be a text encoder (with encode(prompts, template)) or a function (caption, "
                        f"template) → tensors, got {type(encoder).__name__}")

    def entry(caption: str, template: str) -> dict[str, Tensor]:
        tensors = dict(encoder(caption, template))
        if tuple(sorted(tensors)) != tuple(sorted(layout.text_tensors)):
            raise ValueError(f"the text entry function returned {sorted(tensors)}, but the cache layout holds "
                             f"{list(layout.text_tensors)}")
        text = tensors["text"]
        if not isinstance(text, Tensor) or text.ndim != 2 or not text.is_floating_point():
            got = f"{text.dtype} {list(text.shape)}" if isinstance(text, Tensor) else type(text).__name__
            raise ValueError(f"the text entry function returned 'text' {got}; expected float [L, D]")
        out = {}
        for name, value in tensors.items():
            value = value.detach().to("cpu")
            out[name] = value.float() if value.is_floating_point() else value
        return {k: v.contiguous() for k, v in out.items()}

    return entry


def padded_text_entries(encode: Callable[[list[str]], tuple[Tensor, Tensor]]) -> TextEntryFn:
    """The text-entry function (:data:`TextEntryFn`) of an encoder that returns the whole padded sequence and its
    mask, for layouts with ``text_tensors=("text", "text_mask")`` (LTX-2: ``cinetune.ltx2.text.encode_prompts``).

    Args:
        encode: ``[caption] → (features [1, L, D] float, mask [1, L])`` (mask True = real token), on any device.

    Returns:
        ``(caption, template) → {"text": [L, D] float32, "text_mask": [L] bool}`` on CPU (the template is not used).
        Raises ``ValueError`` when ``encode`` returns other shapes or a mask without a real token.
    """
    def entry(caption: str, template: str) -> dict[str, Tensor]:
        features, mask = encode([caption])
        if (not isinstance(features, Tensor) or not isinstance(mask, Tensor) or features.ndim != 3
                or features.shape[0] != 1 or tuple(mask.shape) != tuple(features.shape[:2])):
            shapes = [list(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (features, mask)]
            raise ValueError(f"the text encoder returned features and mask of shapes {shapes[0]} and {shapes[1]}; "
                             "expected [1, L, D] and [1, L]")
        mask = mask[0].detach().to("cpu").bool()
        if not bool(mask.any()):
            raise ValueError(f"the text encoder's mask for {caption!r} marks no real token")
        return {"text": features[0].detach().to("cpu", torch.float32).contiguous(), "text_mask": mask.contiguous()}

    return entry


def _valid_tokens(encoder: TextEncoderLike, caption: str, template: str) -> dict[str, Tensor]:
    out = encoder.encode([caption], template)
    text, mask, pooled = out.text, out.text_mask, out.pooled
    if text.ndim != 3 or mask.shape != text.shape[:2] or pooled.ndim != 2 or text.shape[0] != 1:
        raise ValueError(f"text encoder returned text {tuple(text.shape)}, mask {tuple(mask.shape)}, pooled "
                         f"{tuple(pooled.shape)}; expected [1, L, D], [1, L], [1, D2]")
    valid = text[0][mask[0].bool()]
    return {"text": valid.detach().to("cpu", torch.float32).contiguous(),
            "pooled": pooled[0].detach().to("cpu", torch.float32).contiguous()}


def _shape_of(path: Path, name: str) -> tuple[int, ...]:
    return read_safetensors_header(path)[0][name].shape


# ---------------------------------------------------------------------------------------------- latent cache


@dataclass(frozen=True)
class _Job:
    clip: Clip
    bucket: Bucket
    key: str
    fps: float


@dataclass(frozen=True)
class _LatentSettings:
    """Everything that makes a latent entry, as the cacher and the loader both take it."""

    vae_id: str
    frame_spec: FrameSpec
    base_resolution: int | tuple[int, int]
    bucket_step: int
    allow_upscale: bool
    i2v: bool
    layout: CacheLayout
    audio: bool
    missing_audio: str

    @property
    def tensors(self) -> tuple[str, ...]:
        return ("latent",) + (("first", "last") if self.i2v else ()) + (("audio",) if self.audio else ())

    def key_extra(self, fps: float) -> dict:
        """Payload fields beyond cache format 1 (none for the default layout without sound)."""
        extra: dict = {}
        if self.layout.family is not None:
            extra.update(family=self.layout.family, fps=fps)
        if self.audio:
            extra["audio"] = {"sample_rate": self.frame_spec.latent_format.audio.sample_rate,
                              "channels": AUDIO_CHANNELS}
        return extra


def _settings(vae_id: str, frame_spec: FrameSpec, base_resolution, bucket_step: int | None, allow_upscale: bool,
              i2v: bool, layout: CacheLayout, audio: bool, missing_audio: str) -> _LatentSettings:
    if not isinstance(layout, CacheLayout):
        raise TypeError(f"layout must be a CacheLayout, got {type(layout).__name__}")
    step = frame_spec.latent_format.size_multiple if bucket_step is None else bucket_step
    return _LatentSettings(vae_id, frame_spec, base_resolution, step, bool(allow_upscale),
                           bool(i2v) and layout.i2v_frames, layout, bool(audio), missing_audio)


def _plan_latents(dataset: Dataset, s: _LatentSettings) -> tuple[list[_Job], list[DatasetProblem]]:
    """Clips with bucket and key (no decoding); problems for too-short, bucketless and vanished items.

    Raises:
        DatasetError: no clip at all. NoAudioError / ValueError: with sound, from ``check_clip_audio``.
    """
    clips, problems = plan_clips(dataset, s.frame_spec)
    if s.audio:
        check_clip_audio(clips, s.frame_spec, s.missing_audio)
    buckets = make_buckets(s.base_resolution, s.frame_spec.latent_format, step=s.bucket_step)
    jobs, memo = [], {}
    for clip in clips:
        item = clip.item
        try:
            bucket = assign_bucket(item.width, item.height, buckets, allow_upscale=s.allow_upscale,
                                   step=s.bucket_step, name=item.name)
            identity = _item_identity(item, memo)
        except NoBucketError as exc:
            problems.append(DatasetProblem(item.path, str(exc)))
            continue
        except FileNotFoundError:
            problems.append(DatasetProblem(item.path, f"{item.name} is gone since the folder was scanned; scan "
                                                      "the folder again"))
            continue
        fps = clip_fps(item, s.frame_spec)
        key = _latent_key(identity, clip.indices, bucket, s.vae_id, s.i2v, s.key_extra(fps))
        jobs.append(_Job(clip, bucket, key, fps))
    # a video in several chunks that is gone or too small is reported once
    unique = {(str(p.path), p.message): p for p in problems}
    return jobs, list(unique.values())


def _nothing_usable(problems: list[DatasetProblem]) -> DatasetError:
    return DatasetError("nothing in the dataset can be cached; fix these files and run again:\n"
                        + _listed([str(p) for p in problems]))


def _encode_clip(vae: VAELike, pixels: Tensor, i2v: bool, latent_format: LatentFormat) -> dict[str, Tensor]:
    """``pixels`` [3, F, H, W] → {"latent" [C, F', H', W'], and with i2v "first"/"last" [C, 1, H', W']}, CPU float32.

    Raises:
        ValueError: the VAE returned another shape than ``latent_format.latent_shape`` (a VAE of another family).
    """
    def encode(video: Tensor) -> Tensor:
        _, frames, height, width = video.shape
        expected = latent_format.latent_shape(width, height, frames)
        latent = vae.encode(video[None])[0].detach().to("cpu", torch.float32)
        if tuple(latent.shape) != expected:
            raise ValueError(f"the VAE encoded a {width}x{height} clip of {frames} frames to a latent of shape "
                             f"{list(latent.shape)}, but latent format {latent_format.name!r} gives "
                             f"{list(expected)} [C, F', H', W']; use the VAE of the model family the cache is for")
        return latent

    out = {"latent": encode(pixels)}
    if i2v:
        if pixels.shape[1] == 1:
            out["first"], out["last"] = out["latent"].clone(), out["latent"].clone()  # no shared storage
        else:
            out["first"] = encode(pixels[:, :1])
            out["last"] = encode(pixels[:, -1:])
    return out


def _encode_audio(audio_vae: AudioVAELike, waveform: Tensor, latent_format: LatentFormat) -> Tensor:
    """``waveform`` [C, S] at the format's rate → audio latent [C_a, T, M] CPU float32.

    Raises:
        ValueError: the audio VAE returned another geometry than the latent format's ``audio``.
    """
    fmt = latent_format.audio
    latent = audio_vae.encode(waveform[None], fmt.sample_rate)[0].detach().to("cpu", torch.float32)
    if latent.ndim != 3 or latent.shape[0] != fmt.channels or latent.shape[2] != fmt.mel_bins or latent.shape[1] < 1:
        raise ValueError(f"the audio VAE encoded {waveform.shape[1] / fmt.sample_rate:.3f} s of sound to a latent of "
                         f"shape {list(latent.shape)}, but latent format {latent_format.name!r} gives "
                         f"[{fmt.channels}, T, {fmt.mel_bins}]; use the audio VAE of the model family the cache is for")
    return latent.contiguous()


def cache_latents(dataset: Dataset, vae: VAELike, cache_dir: str | os.PathLike, *, vae_id: str,
                  frame_spec: FrameSpec, base_resolution: int | tuple[int, int] = 512, bucket_step: int | None = None,
                  allow_upscale: bool = False, i2v: bool = False, progress: ProgressFn | None = None,
                  check_interrupt: InterruptFn | None = None, layout: CacheLayout = DEFAULT_LAYOUT,
                  audio_vae: AudioVAELike | None = None, missing_audio: str = "error") -> CacheReport:
    """Encode every training clip of a dataset with the VAE (and its sound with the audio VAE) and store the latents.

    Clips come from :func:`~cinetune.training.data.plan_clips` with ``frame_spec`` (images give one one-frame
    clip), buckets from ``make_buckets(base_resolution, frame_spec.latent_format, step=bucket_step)`` and
    ``assign_bucket``. Each clip is decoded with ``load_clip`` (centre crop + resize to its bucket), encoded as one
    video, and written atomically to ``<cache_dir>/latents/<key>.safetensors`` as "latent" ``[C, F', H', W']``
    (``frame_spec.latent_format.latent_shape(W, H, F)``) float32, as the VAE returns it; with ``i2v`` the clip's
    first and last frames are also encoded alone into "first" / "last" ``[C, 1, H', W']``; with ``audio_vae`` the
    clip's sound (``load_clip_audio``) is encoded into "audio" ``[C_a, T, M]`` (see the module notes). Clips already
    cached (same key, complete file) are skipped without decoding.

    Args:
        dataset: from ``scan_folder`` or ``from_tensors``.
        vae: a loaded VAE wrapper of the model family (:class:`VAELike`: ``encode(video [B, 3, F, H, W]) →
            [B, C, F', H', W']``), on any device; pixels are handed over on CPU and it moves them.
        cache_dir: cache folder (created if missing); entries go to its ``latents/`` sub-folder.
        vae_id: from :func:`encoder_identity` or :func:`weights_identity` for the VAE weights, dtype and any setting
            that changes latents (tiling); with sound, the audio VAE's too.
        frame_spec: frames per clip, selection mode, fps and the latent format (``FrameSpec``).
        base_resolution: bucket area ≈ ``base_resolution²`` pixels (or ``(width, height)``).
        bucket_step: bucket sides are multiples of this; None = the latent format's ``size_multiple`` (a coarser
            grid, e.g. for sparse attention, must be a multiple of it).
        allow_upscale: enlarge items smaller than their bucket (otherwise a smaller bucket of the same aspect).
        i2v: also cache the first/last frame latents for image-to-video training (only in layouts with
            ``i2v_frames``; otherwise ignored).
        progress: called as ``progress(done, total)`` after each clip (total = clips with a bucket).
        check_interrupt: called before each clip; whatever it raises propagates (complete entries stay).
        layout: the family's :class:`CacheLayout` (its family goes into the keys).
        audio_vae: the family's audio VAE (:class:`AudioVAELike`); None = no sound. Needs a latent format with
            ``audio``.
        missing_audio: with sound, ``"error"`` (clips without an audio stream raise before anything is encoded) or
            ``"silence"`` (they get a silent track).

    Returns:
        :class:`CacheReport`; ``problems`` = the dataset's scan problems, then too-short videos, items too small
        for a bucket, and files whose picture or sound fail to decode (each names the file and the fix).

    Raises:
        DatasetError: no clip could be cached (the message lists every problem).
        NoAudioError: with sound and ``missing_audio="error"``, items without an audio track (nothing is written).
        ValueError: bad ``base_resolution`` / ``bucket_step``, ``uniform`` selection with sound, a format without
            audio given an ``audio_vae``, the VAE rejects a clip shape, or a VAE returns a latent whose shape differs
            from the latent format's.
        NotADirectoryError: ``cache_dir`` is a file.
    """
    s = _settings(vae_id, frame_spec, base_resolution, bucket_step, allow_upscale, i2v, layout, audio_vae is not None,
                  missing_audio)
    try:
        jobs, problems = _plan_latents(dataset, s)
    except NoAudioError:
        raise
    except DatasetError as exc:  # no clip at all: list the scan problems too
        raise _nothing_usable(list(dataset.problems) + [DatasetProblem(None, str(exc))]) from exc
    folder = _subfolder(cache_dir, LATENT_DIR)
    manifest = _Manifest(folder, "latent")
    written = skipped = 0
    paths: list[Path] = []
    failed: dict[str, DatasetProblem] = {}  # one problem per file, however many of its clips fail
    try:
        for done, job in enumerate(jobs, start=1):
            _tick(check_interrupt)
            path = folder / f"{job.key}.safetensors"
            if _is_complete(path, s.tensors):
                skipped += 1
                _record_latent(manifest, folder, job, path, s)
                paths.append(path)
            else:
                error = _write_latent(vae, audio_vae, folder, job, path, s)
                if error is None:
                    written += 1
                    _record_latent(manifest, folder, job, path, s)
                    paths.append(path)
                else:
                    failed.setdefault(job.clip.item.name, error)
            if progress is not None:
                progress(done, len(jobs))
    finally:
        manifest.save()
    problems = list(dataset.problems) + problems + list(failed.values())
    if written + skipped == 0:
        raise _nothing_usable(problems)
    return CacheReport(written, skipped, problems, Path(cache_dir), paths)


def _write_latent(vae: VAELike, audio_vae: AudioVAELike | None, folder: Path, job: _Job, path: Path,
                  s: _LatentSettings) -> DatasetProblem | None:
    """Decode and encode one clip and write its entry; a clip whose picture or sound fails to decode gets a failure
    marker and becomes a problem."""
    item, fmt = job.clip.item, s.frame_spec.latent_format
    try:
        pixels = load_clip(item, job.clip.indices, job.bucket)
    except (MediaError, OSError) as exc:
        return _failed(folder, job, exc, "cannot be decoded", "re-encode the file or remove it from the folder")
    waveform = None
    if audio_vae is not None:
        try:
            waveform = load_clip_audio(item, job.clip.indices, s.frame_spec, missing=s.missing_audio)
        except (MediaError, OSError) as exc:
            return _failed(folder, job, exc, "its audio track cannot be decoded",
                           "re-encode the file's sound (or remove the file from the folder), or turn audio off")
    tensors = _encode_clip(vae, pixels, s.i2v, fmt)
    meta = {"item": item.source_id, "bucket": str(job.bucket), "frames": str(len(job.clip.indices)),
            "fps": repr(job.fps), "vae_id": s.vae_id, "i2v": str(s.i2v).lower(),
            "latent": "VAE latent as encoded (unscaled)"}
    if waveform is not None:
        tensors["audio"] = _encode_audio(audio_vae, waveform, fmt)
        start, duration = clip_audio_span(item, job.clip.indices, s.frame_spec)
        meta.update(audio_start=repr(start), audio_duration=repr(duration),
                    audio_source="track" if has_audio_track(item) else "silence")
    save_file_atomic(tensors, path, metadata=_metadata("latent", s.layout, **meta))
    return None


def _failed(folder: Path, job: _Job, exc: Exception, what: str, fix: str) -> DatasetProblem:
    """Write the failure marker of a clip and return its problem."""
    item = job.clip.item
    message = str(exc).removeprefix(f"{item.path}: ")
    write_json_atomic({"item": item.name, "error": message}, folder / f"{job.key}{_FAILED_SUFFIX}")
    return DatasetProblem(item.path, f"{what}: {message}; {fix}")


def _record_latent(manifest: _Manifest, folder: Path, job: _Job, path: Path, s: _LatentSettings) -> None:
    """Note a complete entry in the manifest and drop a failure marker left by an earlier run."""
    (folder / f"{job.key}{_FAILED_SUFFIX}").unlink(missing_ok=True)
    item = job.clip.item
    info = {"file": path.name, "item": item.source_id, "path": str(item.path) if item.path else None,
            "indices": job.clip.indices, "bucket": [job.bucket.width, job.bucket.height],
            "shape": list(_shape_of(path, "latent")), "vae_id": s.vae_id, "i2v": s.i2v, "family": s.layout.family,
            "fps": job.fps}
    if s.audio:
        info["audio_shape"] = list(_shape_of(path, "audio"))
    manifest.add(job.key, info)


# ----------------------------------------------------------------------------------------------------- reading


def load_cached_dataset(dataset: Dataset, cache_dir: str | os.PathLike, *, encoder_id: str, vae_id: str,
                        frame_spec: FrameSpec, base_resolution: int | tuple[int, int] = 512,
                        bucket_step: int | None = None, allow_upscale: bool = False, i2v: bool = False,
                        template_for: TemplateFn | None = None, layout: CacheLayout = DEFAULT_LAYOUT,
                        audio: bool = False, missing_audio: str = "error") -> list[CachedSample]:
    """The cached training samples of a dataset, found by recomputing the keys (nothing is decoded or encoded).

    Pass the same settings as to :func:`cache_text` and :func:`cache_latents` (the same ``layout``; ``audio`` = an
    ``audio_vae`` was given, with the same ``missing_audio``). Clips the latent cacher reported as problems (too
    short, no bucket, failed to decode) are left out.

    Returns:
        One :class:`CachedSample` per clip, in dataset order (several per video in ``chunks`` mode).

    Raises:
        CacheError: latent or text entries are missing or damaged (also the empty-caption entry used for caption
            dropout); the message lists them (up to 10), counts the files there that other models made (naming
            their family and model id), and says which cacher to run with which settings.
        NoAudioError: with ``audio`` and ``missing_audio="error"``, items without an audio track.
        DatasetError: no clip is usable at all.
    """
    cache_dir = Path(cache_dir)
    s = _settings(vae_id, frame_spec, base_resolution, bucket_step, allow_upscale, i2v, layout, audio, missing_audio)
    template_for = _template_function(layout, template_for)
    try:
        jobs, _ = _plan_latents(dataset, s)
    except NoAudioError:
        raise
    except DatasetError as exc:
        raise _nothing_usable(list(dataset.problems) + [DatasetProblem(None, str(exc))]) from exc
    latent_dir, text_dir = cache_dir / LATENT_DIR, cache_dir / TEXT_DIR
    samples, missing_latents, missing_text = [], [], {}
    damaged_latents, damaged_text = [], {}
    templates: dict[str, None] = {}
    for job in jobs:
        item = job.clip.item
        latent_path = latent_dir / f"{job.key}.safetensors"
        template = template_for(item)
        templates[template] = None
        text_key = _text_key(item.caption, template, encoder_id, layout)
        text_path = text_dir / f"{text_key}.safetensors"
        if not _is_complete(latent_path, s.tensors):
            clip = f"{item.name} (frames {job.clip.indices[0]}..{job.clip.indices[-1]}, bucket {job.bucket})"
            if _exists(latent_path):
                damaged_latents.append(f"{latent_path.name}: {clip}")
            elif not (latent_dir / f"{job.key}{_FAILED_SUFFIX}").is_file():
                missing_latents.append(clip)
            continue
        if not _is_complete(text_path, layout.text_tensors):
            what = f"{item.caption!r} (template {template})"
            if _exists(text_path):
                damaged_text[text_key] = f"{text_path.name}: {what}"
            else:
                missing_text[text_key] = what
        samples.append(CachedSample(
            key=job.key, latent_path=latent_path, text_key=text_key, text_path=text_path, caption=item.caption,
            item_id=item.source_id, bucket=(job.bucket.width, job.bucket.height), frames=len(job.clip.indices),
            kind=item.kind, repeats=item.repeats, template=template, fps=job.fps, audio=s.audio, layout=layout))
    for template in templates:
        path = empty_text_path(cache_dir, encoder_id, template, layout=layout)
        if not _is_complete(path, layout.text_tensors):
            what = f"'' (empty caption for dropout, template {template})"
            if _exists(path):
                damaged_text[path.stem] = f"{path.name}: {what}"
            else:
                missing_text[path.stem] = what
    message = []
    if damaged_latents:
        message.append(f"{len(damaged_latents)} latent entries in {latent_dir} are damaged (truncated or "
                       "unreadable):\n" + _listed(damaged_latents) + "\nrun the latent cacher again (queue the "
                       "workflow again): it re-encodes exactly the damaged entries")
    if missing_latents:
        used = {latent_dir / f"{job.key}.safetensors" for job in jobs}
        others = len(set(latent_dir.glob("*.safetensors")) - used) if latent_dir.is_dir() else 0
        makers = _Manifest(latent_dir, "latent").other_models("vae_id", layout.family, vae_id)
        sound = f", audio {'on (missing audio: ' + missing_audio + ')' if audio else 'off'}"
        message.append(f"{len(missing_latents)} latent entries are missing from {latent_dir} ({others} files there "
                       f"are for other inputs or settings{makers}):\n" + _listed(missing_latents) +
                       "\nrun the latent cacher on this dataset with the same VAE, frame count/mode/fps, "
                       f"resolution {base_resolution}, bucket step {s.bucket_step}, upscaling "
                       f"{'on' if allow_upscale else 'off'} and i2v {'on' if i2v else 'off'}"
                       f"{sound if layout.family is not None or audio else ''}")
    if damaged_text:
        message.append(f"{len(damaged_text)} text entries in {text_dir} are damaged (truncated or unreadable):\n"
                       + _listed(list(damaged_text.values()))
                       + "\nrun the text cacher again (queue the workflow again): it re-encodes exactly the damaged "
                       "entries")
    if missing_text:
        makers = _Manifest(text_dir, "text").other_models("encoder_id", layout.family, encoder_id)
        message.append(f"{len(missing_text)} text entries are missing from {text_dir}"
                       f"{' (' + makers.removeprefix('; ') + ')' if makers else ''}:\n"
                       + _listed(list(missing_text.values()))
                       + "\nrun the text cacher on this dataset with the same text encoder files and dtype")
    if message:
        kind = "damaged" if not (missing_latents or missing_text) else "incomplete"
        raise CacheError(f"the cache is {kind}; " + "\n".join(message))
    if not samples:
        raise DatasetError(f"no usable clip in the dataset for {cache_dir}: every item was left out while caching "
                           "(see the latent cacher's report)")
    return samples


def _load_entry(path: Path, what: str, cacher: str, layout: CacheLayout) -> dict[str, Tensor]:
    """The tensors of an entry file, refused when another model family made it."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{what} cache entry not found: {path}; run the {cacher} again")
    try:
        _, metadata = read_safetensors_header(path)
        tensors = load_state_dict(path)
    except CheckpointError as exc:
        raise CacheError(f"{exc} The cache entry is damaged: run the {cacher} again (queue the workflow again); it "
                         "re-encodes damaged entries.") from exc
    found = metadata.get("family")
    if found != layout.family:
        model = metadata.get("vae_id") or metadata.get("encoder_id") or "unknown"
        raise CacheError(f"{path} was made by {CacheLayout(found).describe()} (model id {model}), not by "
                         f"{layout.describe()}: a cache from another model is never reused. Run the {cacher} of "
                         f"this model on the dataset (a separate cache name keeps both caches apart).")
    return tensors


def read_latent(sample: CachedSample) -> dict[str, Tensor]:
    """Load a sample's latents.

    Returns:
        ``{"latent": [C, F', H', W']}`` plus ``"first"`` and ``"last"`` ``[C, 1, H', W']`` when cached with i2v and
        ``"audio"`` ``[C_a, T, M]`` when cached with sound; float32, CPU, as the VAEs returned them
        (``LatentFormat.to_model`` gives what the DiT works on).

    Raises:
        CacheError: file missing, truncated, without a 4-D "latent" (or the "audio" the sample needs), or made by
            another model family than the sample's layout (the message names it and says which cacher to run).
    """
    tensors = _load_entry(sample.latent_path, "latent", "latent cacher", sample.layout)
    latent = tensors.get("latent")
    if latent is None or latent.ndim != 4:
        raise CacheError(f"{sample.latent_path}: no 4-D 'latent' tensor; delete the file and run the latent cacher "
                         "again")
    audio = tensors.get("audio")
    if sample.audio and (audio is None or audio.ndim != 3):
        raise CacheError(f"{sample.latent_path}: no 3-D 'audio' tensor; delete the file and run the latent cacher "
                         "again with audio on")
    return {name: tensors[name].float() for name in ("latent", "first", "last", "audio") if name in tensors}


def read_text_entry(path: str | os.PathLike, layout: CacheLayout = DEFAULT_LAYOUT) -> dict[str, Tensor]:
    """Load a cached caption entry of any layout.

    Returns:
        The layout's ``text_tensors`` on CPU: ``"text"`` ``[L, D]`` float32, the others as stored (float32, or bool
        masks).

    Raises:
        CacheError: file missing, truncated, without the layout's tensors, with a ``"text"`` that is not 2-D, or made
            by another model family (the message says to run the text cacher).
    """
    tensors = _load_entry(Path(path), "text", "text cacher", layout)
    text = tensors.get("text")
    if any(name not in tensors for name in layout.text_tensors) or text is None or text.ndim != 2:
        raise CacheError(f"{path}: expected {', '.join(layout.text_tensors)} with 'text' [L, D]; delete the file and "
                         "run the text cacher again")
    return {name: tensors[name].float() if tensors[name].is_floating_point() else tensors[name]
            for name in layout.text_tensors}


def read_text(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Load a cached caption embedding of the default layout.

    Returns:
        ``(text [L, D], pooled [D2])``, float32, CPU: the encoder's hidden states of the L valid tokens and its pooled
        vector. For a batch, pad ``text`` on the right and build the mask from the lengths.

    Raises:
        CacheError: file missing, truncated, with wrong tensors, or made for a model family (the message says to run
            the text cacher).
    """
    tensors = read_text_entry(path)
    text, pooled = tensors["text"], tensors["pooled"]
    if pooled.ndim != 1:
        raise CacheError(f"{path}: expected 'text' [L, D] and 'pooled' [D2]; delete the file and run the text "
                         "cacher again")
    return text, pooled
