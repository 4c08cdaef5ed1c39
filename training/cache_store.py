"""The on-disk format of the training caches: layouts, keys, model ids, manifests, entry files.

:mod:`cinetune.training.cache` describes the cache as a whole; the cachers are in :mod:`cinetune.training.text_cache`
and :mod:`cinetune.training.latent_cache`.

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
- **Manifests** (``manifest.json`` in each sub-folder) list every entry with its inputs, for people. They are
  rewritten atomically at the end of each run, interrupted or not, keeping earlier entries whose files still
  exist. The entry files are the truth; a process killed outright can leave the manifest without its last
  entries, and the next run adds them back.
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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..core.checkpoint import CheckpointError, load_state_dict, read_safetensors_header, write_json_atomic
from .data import counted
from .frames import Bucket
from .items import DatasetError, DatasetItem, DatasetProblem

__all__ = [
    "CACHE_VERSION", "TEXT_DIR", "LATENT_DIR", "MANIFEST", "ProgressFn", "InterruptFn", "TemplateFn", "CacheLayout",
    "DEFAULT_LAYOUT", "CacheError", "CacheReport", "encoder_identity", "weights_identity", "default_template",
    "empty_text_path", "read_text_entry", "read_text",
]


#: Part of every key: bump when the meaning of a cached file changes (decoding, resizing, layout).
CACHE_VERSION = 1

TEXT_DIR, LATENT_DIR, MANIFEST = "text", "latents", "manifest.json"
_FAILED_SUFFIX = ".failed.json"
_LIST_LIMIT = 10

ProgressFn = Callable[[int, int], None]
InterruptFn = Callable[[], None]
TemplateFn = Callable[[DatasetItem], str]


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


@dataclass
class CacheReport:
    """What a cacher did.

    Attributes:
        written: entries encoded and written by this run.
        skipped: entries that were already cached (complete files found) and are reused.
        problems: files left out: the dataset's scan problems followed by those found while caching.
        cache_dir: the cache folder (the root passed in, holding ``text/`` and ``latents/``).
        entries: every complete entry file the dataset uses after this run (written or already cached), in order.
        kind: ``"text"`` or ``"latent"`` (the sub-cache; names the entries in :meth:`summary`), "" if unknown.
    """

    written: int
    skipped: int
    problems: list[DatasetProblem] = field(default_factory=list)
    cache_dir: Path = Path(".")
    entries: list[Path] = field(default_factory=list)
    kind: str = ""

    def summary(self) -> str:
        """Multi-line text for node outputs and logs, e.g. ``"5 clips: 3 encoded, 2 reused from the cache; 1 file
        skipped"``, the cache folder, then one line per file skipped (the file and the fix)."""
        noun, note = _REPORT_NOUNS.get(self.kind, ("entry", ""))
        total = counted(self.written + self.skipped, noun, "entries" if noun == "entry" else None)
        lines = [f"{total}{note}: {self.written} encoded, {self.skipped} reused from the cache; "
                 f"{counted(len(self.problems), 'file')} skipped",
                 f"cache: {self.cache_dir}"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


#: How :meth:`CacheReport.summary` names the entries of each kind.
_REPORT_NOUNS = {"text": ("caption", " (with the empty caption for caption dropout)"), "latent": ("clip", "")}


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

    :func:`~cinetune.training.text_cache.cache_text` writes it for every template its dataset uses. Read it with :func:`read_text` (default
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


def _metadata(kind: str, layout: CacheLayout, **fields: str) -> dict[str, str]:
    """Entry-file metadata: format, version, the family (when the layout has one) and ``fields``."""
    meta = {"format": f"cinetune {kind} cache", "version": str(CACHE_VERSION), **fields}
    if layout.family is not None:
        meta["family"] = layout.family
    return meta


def _shape_of(path: Path, name: str) -> tuple[int, ...]:
    return read_safetensors_header(path)[0][name].shape


# ----------------------------------------------------------------------------------------------------- reading


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
