"""The run folder as a complete recipe: everything needed to rerun or continue a training run without ComfyUI.

The trainer writes ``run_dir/recipe.json`` (:func:`write_recipe`) before the first step; ``python -m
cinetune.training.launch <run folder>`` reads it back (:func:`read_recipe`) and continues the run headless, on one
process or under torchrun. Layout (JSON, sorted keys)::

    {"format": "cinetune.run_recipe", "version": 1,
     "family": "kandinsky-5",                                      # the model family's name
     "models": {"dit": {"path": "/…/model.safetensors", "size": 12345, "fingerprint": "…", "scheme": "…"}},
     "loader": {"weight_dtype": "default", "blocks_to_swap": 0, …},   # the family's loader settings
     "data": {"train": {"cache_dir": "/…/cache/x", "encoder_id": "…", "vae_id": "…", "layout": {…},
                        "samples": [{"key": …, "latent": "latents/….safetensors", "text": "text/….safetensors",
                                     "item_id": …, "bucket": [w, h], "frames": …, "repeats": …, …}, …]}},
     "config": {…},                                                # TrainConfig.to_dict()
     "validation": {…},                                            # validation settings (kept as written)
     "metadata": {…}}                                              # the LoRA file metadata of the run

Decisions:

- **The cached samples are listed**, not re-derived: a cached dataset is found by rescanning the dataset folder and
  recomputing keys (``training.cache.load_cached_dataset``), which needs the media files. The recipe instead keeps
  the resolved sample list (paths relative to the cache folder, in training order), so a run moves to another
  machine with its cache folder alone and keeps the sample order the trainer's resume check hashes.
- **Model fingerprint** (:func:`file_fingerprint`, scheme :data:`FINGERPRINT_SCHEME`): a full SHA-256 of a 40 GB
  checkpoint takes minutes at every start, and no standard quick hash exists (the AutoV2 hash of A1111/Civitai and
  the Hugging Face LFS oid are full-file SHA-256s). The fingerprint is the SHA-256 of the file size, the whole
  safetensors header (every tensor name, dtype, shape, offset, and the metadata), the first and the last MiB of
  the data, and 32 windows of 64 KiB spread evenly over the data (about 4 MiB read in all; a file up to 4 MiB is
  hashed whole). It catches another file, a converted or re-quantised file (header), and a fine-tune or merged
  LoRA (every weight window changes); it would miss an edit confined to bytes between the windows.
  A folder model (a Hugging Face snapshot) or a shard with a ``*.index.json`` beside it is fingerprinted over
  all its files.
- **Moved models** are found again by fingerprint: ``models`` in :func:`read_recipe` names folders to search (by
  file name, recursively) or maps a role / recorded path / file name to a file. A file whose fingerprint changed
  is refused: a run continues on the weights it started with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..core.checkpoint import write_json_atomic
from .cache import CachedSample, CacheLayout
from .config import TrainConfig, TrainingError

__all__ = ["RECIPE_FILE", "RECIPE_FORMAT", "RECIPE_VERSION", "FINGERPRINT_SCHEME", "RecipeError", "ModelFile",
           "CachedData", "RunRecipe", "file_fingerprint", "model_fingerprint", "write_recipe", "read_recipe",
           "train_config_from_dict"]

RECIPE_FILE = "recipe.json"
RECIPE_FORMAT = "cinetune.run_recipe"
RECIPE_VERSION = 1
FINGERPRINT_SCHEME = "sampled-sha256-1"

_MIB = 1 << 20
_WINDOW = 1 << 16
_WINDOWS = 32
_WHOLE = 4 * _MIB
_MAX_HEADER = 100 * _MIB


class RecipeError(TrainingError):
    """A run folder's recipe cannot be read or used; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def _header_length(f, size: int) -> int:
    """8 + N for a safetensors file (u64 little-endian N, then N bytes of JSON), else 0."""
    if size < 10:
        return 0
    f.seek(0)
    head = f.read(9)
    n = int.from_bytes(head[:8], "little")
    return 8 + n if 0 < n <= min(size - 8, _MAX_HEADER) and head[8:9] == b"{" else 0


def file_fingerprint(path: str | os.PathLike) -> str:
    """The quick fingerprint of one file (scheme in the module notes), 64 hex characters.

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(FINGERPRINT_SCHEME.encode())
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        start = _header_length(f, size)
        f.seek(0)
        h.update(f.read(start))
        data = size - start
        if data <= _WHOLE:
            regions = [(start, data)]
        else:
            step = (data - _WINDOW) / (_WINDOWS - 1)
            regions = [(start, _MIB), (size - _MIB, _MIB)]
            regions += [(start + round(i * step), _WINDOW) for i in range(_WINDOWS)]
        for offset, length in sorted(set(regions)):
            f.seek(offset)
            h.update(offset.to_bytes(8, "little"))
            h.update(f.read(length))
    return h.hexdigest()


def _model_files(path: Path) -> list[Path]:
    """The files that make up a model: a folder's files, a shard with its index and siblings, or the file."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for index in sorted(path.parent.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            continue
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        if path.name in shards:
            return sorted([index, *(path.parent / s for s in shards)])
    return [path]


def model_fingerprint(path: str | os.PathLike) -> tuple[int, str]:
    """``(total size in bytes, fingerprint)`` of a model file or folder (module notes).

    Raises:
        FileNotFoundError: ``path`` or one of its shards is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    files = _model_files(path)
    if files == [path]:
        return path.stat().st_size, file_fingerprint(path)
    root = path if path.is_dir() else path.parent
    h = hashlib.sha256(FINGERPRINT_SCHEME.encode())
    total = 0
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard of {path} not found")
        total += p.stat().st_size
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + file_fingerprint(p).encode())
    return total, h.hexdigest()


@dataclass(frozen=True)
class ModelFile:
    """A model file (or folder) a run loads, with what identifies its content.

    Attributes:
        path: where it was (or, after :func:`read_recipe`, where it is now). size: bytes in all.
        fingerprint: :func:`model_fingerprint`. scheme: :data:`FINGERPRINT_SCHEME` of the version that wrote it.
    """

    path: Path
    size: int
    fingerprint: str
    scheme: str = FINGERPRINT_SCHEME

    @classmethod
    def of(cls, path: str | os.PathLike) -> "ModelFile":
        """Fingerprint the file at ``path`` (absolute path recorded).

        Raises:
            FileNotFoundError: it does not exist.
        """
        path = Path(path).absolute()
        size, fingerprint = model_fingerprint(path)
        return cls(path, size, fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "fingerprint": self.fingerprint, "scheme": self.scheme}


# ---------------------------------------------------------------------------------------------------------------
# Cached data


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class CachedData:
    """A cached dataset as a run uses it: the cache folder, the ids its entries were made with, and the samples.

    Attributes:
        cache_dir: the cache folder (``text/`` and ``latents/`` below it). encoder_id, vae_id: the model ids the
            cachers keyed the entries with (the empty-caption entry is found by ``encoder_id``).
        layout: the family's :class:`~cinetune.training.cache.CacheLayout`.
        samples: the :class:`~cinetune.training.cache.CachedSample` list, in training order.
    """

    cache_dir: Path
    encoder_id: str
    vae_id: str | None
    layout: CacheLayout
    samples: tuple[CachedSample, ...]

    @classmethod
    def from_samples(cls, cached: Sequence[CachedSample], *, cache_dir: str | os.PathLike, encoder_id: str,
                     vae_id: str | None = None) -> "CachedData":
        """The record of ``cached`` (what ``load_cached_dataset`` returned for ``cache_dir``).

        Raises:
            RecipeError: no samples, or samples of several layouts.
        """
        cached = tuple(cached)
        if not cached:
            raise RecipeError("a run's cached dataset has no samples: cache the dataset first.")
        layouts = {s.layout for s in cached}
        if len(layouts) != 1:
            raise RecipeError("the cached samples come from caches of several model families; use one family's cache.")
        return cls(Path(cache_dir).absolute(), encoder_id, vae_id, layouts.pop(), cached)

    def to_dict(self) -> dict[str, Any]:
        root = self.cache_dir
        samples = [{"key": s.key, "latent": _relative(s.latent_path, root), "text_key": s.text_key,
                    "text": _relative(s.text_path, root), "caption": s.caption, "item_id": s.item_id,
                    "bucket": list(s.bucket), "frames": s.frames, "kind": s.kind, "repeats": s.repeats,
                    "template": s.template, "fps": s.fps, "audio": s.audio} for s in self.samples]
        return {"cache_dir": str(root), "encoder_id": self.encoder_id, "vae_id": self.vae_id,
                "layout": dataclasses.asdict(self.layout), "samples": samples}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], cache_dir: Path | None = None) -> "CachedData":
        """Read :meth:`to_dict`'s form; ``cache_dir`` replaces the recorded folder (relative sample paths follow it).

        Raises:
            KeyError, TypeError, ValueError: a malformed record (:func:`read_recipe` reports it as damaged).
        """
        root = Path(cache_dir if cache_dir is not None else d["cache_dir"])
        layout = CacheLayout(**d["layout"])
        samples = tuple(CachedSample(
            key=str(s["key"]), latent_path=root / s["latent"], text_key=str(s["text_key"]), text_path=root / s["text"],
            caption=str(s["caption"]), item_id=str(s["item_id"]), bucket=(int(s["bucket"][0]), int(s["bucket"][1])),
            frames=int(s["frames"]), kind=str(s["kind"]), repeats=int(s["repeats"]), template=str(s["template"]),
            fps=None if s["fps"] is None else float(s["fps"]), audio=bool(s["audio"]), layout=layout)
            for s in d["samples"])
        return cls(root, str(d["encoder_id"]), d.get("vae_id"), layout, samples)

    def check_files(self, role: str) -> None:
        """Raise :class:`RecipeError` when sample files are missing (names up to five and the fixes)."""
        missing = sorted({str(p) for s in self.samples for p in (s.latent_path, s.text_path) if not p.is_file()})
        if missing:
            shown = "\n".join(f"  {m}" for m in missing[:5]) + (f"\n  … ({len(missing)} in all)"
                                                                if len(missing) > 5 else "")
            raise RecipeError(f"{len(missing)} cache entries of the run's {role} data are missing from "
                              f"{self.cache_dir}:\n{shown}\nThe cache was moved or deleted: point the run at it with "
                              f"--cache {self.cache_dir}=<new folder>, or run the cache nodes again and queue the "
                              "training workflow.")


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def train_config_from_dict(d: Mapping[str, Any], *, nabla_type: Any = None) -> TrainConfig:
    """The :class:`TrainConfig` that :meth:`TrainConfig.to_dict` gave ``d`` (JSON lists become tuples, dtype names
    stay names, the NABLA dict becomes ``nabla_type(**dict)``).

    Raises:
        RecipeError: unknown fields (a newer version wrote them), NABLA settings without a ``nabla_type``, a value
            the config refuses, or a config that does not give ``d`` back.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RecipeError(f"the run's training settings have fields this version does not know ({', '.join(unknown)})"
                          ": it was written by a newer Cinetune; update Cinetune to continue it.")

    def plain(v: Any) -> Any:
        return tuple(plain(x) for x in v) if isinstance(v, list) else v

    values = {k: plain(v) for k, v in d.items()}
    if values.get("nabla") is not None:
        if nabla_type is None:
            raise RecipeError("the run's settings hold sparse-attention (NABLA) settings, which its model family "
                              "does not take.")
        values["nabla"] = nabla_type(**values["nabla"])
    try:
        config = TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"the run's training settings are invalid: {exc}") from exc
    again = json.loads(json.dumps(config.to_dict()))
    changed = sorted(k for k in set(again) | set(d) if again.get(k) != d.get(k))
    if changed:
        raise RecipeError(f"the run's training settings do not read back as written ({', '.join(changed)}); the "
                          "recipe was edited by hand or by another version: queue the training workflow again.")
    return config


@dataclass(frozen=True)
class RunRecipe:
    """Everything needed to rerun or continue a training run headless (layout in the module notes).

    Attributes:
        family: the model family's name (``"kandinsky-5"``, ``"ltx-2"``).
        models: role → :class:`ModelFile` (``"dit"``; LTX-2 also ``"connectors"``, the file its text connectors
            come from).
        loader: the family's loader settings (plain JSON values: weight dtype, block swap, …).
        data: role → :class:`CachedData` (``"train"``; ``"holdout"`` for held-out samples when used).
        config: :meth:`TrainConfig.to_dict` of the run. validation: validation settings, kept as given.
        metadata: the LoRA file metadata the run writes (``cinetune.run``, ``base_model``, ``dataset_hash``, …).
        version: :data:`RECIPE_VERSION` of the writer.
    """

    family: str
    models: Mapping[str, ModelFile]
    loader: Mapping[str, Any]
    data: Mapping[str, CachedData]
    config: Mapping[str, Any]
    validation: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = RECIPE_VERSION

    @classmethod
    def create(cls, family: str, *, models: Mapping[str, str | os.PathLike], loader: Mapping[str, Any],
               data: Mapping[str, CachedData], config: TrainConfig, validation: Mapping[str, Any] | None = None,
               metadata: Mapping[str, Any] | None = None) -> "RunRecipe":
        """A recipe for a run about to start: fingerprints the model files (about 4 MiB read per file).

        Raises:
            RecipeError: no ``"dit"`` model or ``"train"`` data, a model file that does not exist, or settings that
                are not plain JSON.
        """
        if "dit" not in models or "train" not in data:
            raise RecipeError("a run recipe needs the 'dit' model file and the 'train' data.")
        files = {}
        for role, path in models.items():
            try:
                files[role] = ModelFile.of(path)
            except FileNotFoundError as exc:
                raise RecipeError(f"the run's {role} model file {path} does not exist ({exc}).") from exc
        recipe = cls(family, files, dict(loader), dict(data), config.to_dict(), dict(validation or {}),
                     dict(metadata or {}))
        try:
            json.dumps(recipe.to_dict())
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"the run's settings must be plain JSON values: {exc}") from exc
        return recipe

    @property
    def seed(self) -> int:
        """The run's seed (``config["seed"]``)."""
        return int(self.config["seed"])

    def model_path(self, role: str) -> Path:
        """The path of model ``role``.

        Raises:
            RecipeError: the recipe has no such model.
        """
        if role not in self.models:
            raise RecipeError(f"the run's recipe names no {role!r} model (it has {', '.join(self.models)}).")
        return self.models[role].path

    def train_config(self, nabla_type: Any = None) -> TrainConfig:
        """The run's :class:`TrainConfig` (:func:`train_config_from_dict`)."""
        return train_config_from_dict(self.config, nabla_type=nabla_type)

    def with_config(self, config: TrainConfig) -> "RunRecipe":
        """The same recipe with other training settings (e.g. more steps)."""
        return dataclasses.replace(self, config=config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECIPE_FORMAT, "version": self.version, "family": self.family,
                "models": {r: m.to_dict() for r, m in self.models.items()}, "loader": dict(self.loader),
                "data": {r: d.to_dict() for r, d in self.data.items()}, "config": dict(self.config),
                "validation": dict(self.validation), "metadata": dict(self.metadata)}


def write_recipe(run_dir: str | os.PathLike, recipe: RunRecipe) -> Path:
    """Write ``run_dir/recipe.json`` atomically (complete or absent, never half-written); returns its path."""
    return write_json_atomic(recipe.to_dict(), Path(run_dir) / RECIPE_FILE)


# ---------------------------------------------------------------------------------------------------------------
# Reading, with moved models and caches


ModelsOverride = str | os.PathLike | Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None


def _overrides(models: ModelsOverride) -> tuple[list[Path], dict[str, Path]]:
    if models is None:
        return [], {}
    if isinstance(models, Mapping):
        return [], {str(k): Path(v) for k, v in models.items()}
    if isinstance(models, (str, os.PathLike)):
        return [Path(models)], {}
    return [Path(m) for m in models], {}


def _candidates(role: str, recorded: ModelFile, folders: list[Path], files: dict[str, Path]) -> Iterable[Path]:
    for key in (role, str(recorded.path), recorded.path.name):
        if key in files:
            yield files[key]
            return
    yield recorded.path
    name = recorded.path.name
    for folder in folders:
        if (folder / name).exists():
            yield folder / name
        if folder.is_dir():
            yield from sorted(p for p in folder.rglob(name) if p != folder / name)


def _resolve_model(role: str, recorded: ModelFile, folders: list[Path], files: dict[str, Path],
                   source: Path) -> ModelFile:
    changed: list[str] = []
    seen: set[Path] = set()
    for path in _candidates(role, recorded, folders, files):
        if not path.exists() or path.absolute() in seen:
            continue
        seen.add(path.absolute())
        size, fingerprint = model_fingerprint(path)
        if size == recorded.size and fingerprint == recorded.fingerprint:
            return dataclasses.replace(recorded, path=path.absolute())
        changed.append(f"{path} ({size} bytes" + (", other content)" if size == recorded.size else ")"))
    where = f" (searched {', '.join(str(f) for f in folders)})" if folders else ""
    if changed:
        raise RecipeError(
            f"the {role} model of the run in {source.parent} has changed since the run was written: it was "
            f"{recorded.path} ({recorded.size} bytes), found " + "; ".join(changed) + f"{where}. A run continues only "
            f"on the weights it started with: put the original file back, or point to a copy of it with --models "
            f"<folder> or --model {role}=<file>; to train on the new file start a new run.")
    raise RecipeError(f"the {role} model of the run in {source.parent}, {recorded.path}, is not there{where}. "
                      f"Pass the folder that holds it (--models <folder>, searched by file name) or the file itself "
                      f"(--model {role}=<file>).")


def _field(d: Mapping[str, Any], key: str, kind: type, source: Path) -> Any:
    value = d.get(key)
    if not isinstance(value, kind):
        raise RecipeError(f"{source} is damaged: {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}. "
                          "Queue the training workflow again (resume on) to rewrite it.")
    return value


def read_recipe(run_dir: str | os.PathLike, *, models: ModelsOverride = None,
                caches: Mapping[str | os.PathLike, str | os.PathLike] | None = None,
                check_models: bool = True) -> RunRecipe:
    """Read ``run_dir/recipe.json`` and find its model files and caches.

    Args:
        run_dir: the run folder.
        models: where moved model files are: a folder or a list of folders (searched by file name, recursively,
            the file whose fingerprint matches wins), or a mapping from role (``"dit"``), recorded path or file
            name to the file. Files still at their recorded paths need nothing.
        caches: recorded cache folder → where it is now.
        check_models: fingerprint the model files (about 4 MiB read each); False trusts the recorded paths.

    Returns:
        The :class:`RunRecipe` with the model and cache paths as found.

    Raises:
        RecipeError: the folder does not exist or is not a run folder, the recipe is unreadable, of another format
            or of a newer version, a model file is missing or changed (names it and the fix), cache entries are
            missing (names them and the fix).
    """
    run_dir = Path(run_dir)
    source = run_dir / RECIPE_FILE
    if not run_dir.is_dir():
        raise RecipeError(f"{run_dir} is not a folder: give the run folder (output/cinetune/runs/<name>).")
    if not source.is_file():
        hint = ("it holds a run started before run folders kept their recipe: queue its training workflow once "
                "more (resume on) to write it" if (run_dir / "run.json").is_file() else
                "it is not a Cinetune training run folder (they are in output/cinetune/runs/<name>)")
        raise RecipeError(f"{run_dir} has no {RECIPE_FILE}: {hint}.")
    try:
        d = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecipeError(f"{source} cannot be read ({exc}). Queue the training workflow again (resume on) to "
                          "rewrite it.") from exc
    if not isinstance(d, dict) or d.get("format") != RECIPE_FORMAT:
        raise RecipeError(f"{source} is not a Cinetune run recipe (format "
                          f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}).")
    version = d.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RecipeError(f"{source} is damaged: version {version!r}.")
    if version > RECIPE_VERSION:
        raise RecipeError(f"{source} was written by a newer Cinetune (recipe version {version}, this one reads up "
                          f"to {RECIPE_VERSION}): update Cinetune to continue the run.")
    family = _field(d, "family", str, source)
    models_d = _field(d, "models", dict, source)
    data_d = _field(d, "data", dict, source)
    config = _field(d, "config", dict, source)
    moved = {str(Path(k)): Path(v) for k, v in (caches or {}).items()}
    try:
        recorded = {role: ModelFile(Path(m["path"]), int(m["size"]), str(m["fingerprint"]),
                                    str(m.get("scheme", FINGERPRINT_SCHEME))) for role, m in models_d.items()}
        data = {role: CachedData.from_dict(v, moved.get(str(Path(v["cache_dir"])))) for role, v in data_d.items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RecipeError(f"{source} is damaged ({type(exc).__name__}: {exc}). Queue the training workflow again "
                          "(resume on) to rewrite it.") from exc
    if "dit" not in recorded or "train" not in data:
        raise RecipeError(f"{source} is damaged: it names no 'dit' model or no 'train' data.")
    unknown_scheme = [r for r, m in recorded.items() if m.scheme != FINGERPRINT_SCHEME]
    if check_models and unknown_scheme:
        raise RecipeError(f"{source} identifies its {unknown_scheme[0]} model by the fingerprint scheme "
                          f"{recorded[unknown_scheme[0]].scheme!r}, which this version does not know: update "
                          "Cinetune.")
    if check_models:
        folders, files = _overrides(models)
        recorded = {role: _resolve_model(role, m, folders, files, source) for role, m in recorded.items()}
    for role, cached in data.items():
        cached.check_files(role)
    return RunRecipe(family, recorded, dict(_field(d, "loader", dict, source)), data, config,
                     dict(d.get("validation") or {}), dict(d.get("metadata") or {}), version)
