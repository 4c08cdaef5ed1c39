"""Training data: folder scanning with captions, dataset locations, in-memory frames, fingerprints.

The pieces, in the order a latent cacher uses them (``fmt`` is the model family's
:class:`~cinetune.core.family.LatentFormat`)::

    ds = scan_folder("dataset/", trigger_word="ohwx")                   # items + per-file problems
    ds = combine_datasets([ds, scan_folder("more/", frame_extraction=FrameExtraction("slide", (9, 17), 8))])
    clips, problems = plan_clips(ds, FrameSpec(17, latent_format=fmt))  # frame indices per item
    buckets = make_buckets(512, fmt)                                    # equal-area sizes, sides % size_multiple == 0
    bucket = assign_bucket(item.width, item.height, buckets)
    pixels = load_clip(item, indices, bucket)                           # [3, F, H, W] float in [-1, 1]
    sound = load_clip_audio(item, indices, spec)                        # [2, S] at the format's audio rate

Frame selection, fps resampling, buckets and clip decoding are in :mod:`cinetune.training.frames`, a clip's sound in
:mod:`cinetune.training.clip_audio`, the item types in :mod:`cinetune.training.items`; every public name of those
modules can be imported from here too.

Decisions:

- **Captions** come from a same-name text file next to the media (``clip.mp4`` → ``clip.txt``).
  The file is read as UTF-8 (a BOM is ignored); its non-empty lines, stripped, are joined with one
  space. With a trigger word the caption becomes ``"<trigger>, <caption>"`` (just ``"<trigger>"`` for
  an empty caption); a caption that already starts with the trigger word is left unchanged.
- **Problems instead of failures.** A file without a caption, an unreadable or truncated file, a
  clip shorter than the requested frame count: each becomes a :class:`DatasetProblem` naming the
  file and the fix, and the file is left out. Only a dataset with nothing usable left raises
  :class:`DatasetError`. ``skip_missing_captions=True`` leaves uncaptioned files out silently.
- **Where datasets may be.** :func:`resolve_dataset_folder` takes a relative folder inside ComfyUI's input
  folder (it may not climb out with ``..``) and an absolute folder only inside the input folder or a dataset root
  that the server owner lists in the environment variable ``CINETUNE_DATASET_ROOTS`` (absolute folders separated
  by ``os.pathsep``: ``:`` on Linux and macOS, ``;`` on Windows). The setting is read from the server's
  environment, not from ComfyUI's user settings, because any client of the server can write those. A folder is
  inside a root when its path, normalised (``..`` removed) or with symbolic links resolved, lies in the root's:
  links placed in a root by the owner are followed.
- **A bounded scan.** After ``max_problems`` problems (50 by default) with files still unchecked, the scan stops
  and raises :class:`DatasetError` listing them and counting the files not checked (and how many of those lack a
  caption), so a wrong folder fails fast instead of decoding thousands of unrelated files.
- **Hidden entries** (names starting with ``.``, e.g. macOS ``._clip.mp4`` resource forks) are
  ignored; symlinked files are followed, symlinked folders are not (no loops).
- **Verification.** ``scan_folder`` decodes every video once without colour conversion (about
  0.2 s for 5 s of 720p on two cores) and decodes every image, so a truncated file is reported at
  scan time, not in the middle of caching. The decoded frame count is the item's ``frames``.
- **Frame extraction per dataset.** ``scan_folder(..., frame_extraction=FrameExtraction(...))`` makes every item
  carry musubi-tuner's extraction settings (:class:`~cinetune.training.items.FrameExtraction`); the cachers then cut
  those items by it instead of by their own frame count and selection. Without it a dataset behaves as before:
  same clips, same cache keys, same fingerprint.
- **Combined datasets** (:func:`combine_datasets`) keep each item as its dataset made it (caption with its trigger
  word, repeats, extraction) and prefix its ``source_id`` with its dataset's folder name (``clips/a.mp4``), plus
  ``#<position>`` when two combined datasets have folders of the same name, so ids never collide. Cache entries
  never collide either way: latent keys hold the file's absolute path, text keys the caption.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..core.media import MediaError, count_decodable_frames, probe_video
from .clip_audio import (
    AUDIO_CHANNELS,
    MISSING_AUDIO,
    NoAudioError,
    _has_audio,
    check_clip_audio,
    clip_audio_span,
    clip_fps,
    has_audio_track,
    load_clip_audio,
)
from .frames import (
    Bucket,
    Clip,
    FrameSpec,
    check_extraction,
    NoBucketError,
    TooShortError,
    assign_bucket,
    frame_indices,
    load_clip,
    make_buckets,
    plan_clips,
)
from .items import (
    counted,
    EXTRACTION_MODES,
    Dataset,
    DatasetError,
    DatasetItem,
    DatasetProblem,
    FrameExtraction,
    parse_target_frames,
)

__all__ = [
    "VIDEO_EXTS", "IMAGE_EXTS", "DATASET_ROOTS_ENV", "DatasetError", "DatasetLocationError", "TooShortError",
    "NoBucketError", "DatasetItem", "DatasetProblem", "Dataset", "dataset_roots", "resolve_dataset_folder",
    "scan_folder", "from_tensors", "combine_datasets",
    "EXTRACTION_MODES", "FrameExtraction", "parse_target_frames", "check_extraction",
    "FrameSpec", "frame_indices", "Clip", "plan_clips",
    "Bucket", "make_buckets", "assign_bucket", "load_clip", "dataset_fingerprint",
    "AUDIO_CHANNELS", "MISSING_AUDIO", "NoAudioError", "clip_fps", "clip_audio_span", "has_audio_track",
    "check_clip_audio", "load_clip_audio", "counted", "dataset_summary",
]


VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Environment variable listing the absolute folders (``os.pathsep``-separated) datasets may be taken from, besides
#: ComfyUI's input folder.
DATASET_ROOTS_ENV = "CINETUNE_DATASET_ROOTS"

#: Problems after which :func:`scan_folder` stops (when files remain unchecked).
MAX_PROBLEMS = 50

_FINGERPRINT_VERSION = 1
_COMBINED_LABEL = "dataset"
_EXIF_ORIENTATION = 0x0112


class DatasetLocationError(DatasetError):
    """A dataset folder outside the places this server allows, or a malformed folder setting; the message says
    where datasets may be and how the server owner adds a dataset root."""


# ---------------------------------------------------------------------------------------------- locations


def _has_control_characters(text: str) -> bool:
    return any(ord(c) < 32 or 127 <= ord(c) < 160 or 0xD800 <= ord(c) < 0xE000 for c in text)


def dataset_roots(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The dataset roots the server owner lists in ``CINETUNE_DATASET_ROOTS`` (see the module notes).

    Args:
        environ: the environment to read (default ``os.environ``).
    Returns:
        The listed folders, normalised, in order (empty entries skipped; ``~`` expanded).
    Raises:
        DatasetLocationError: an entry is not an absolute path (the message names it and the variable).
    """
    raw = (os.environ if environ is None else environ).get(DATASET_ROOTS_ENV, "")
    roots = []
    for entry in raw.split(os.pathsep):
        entry = entry.strip()
        if not entry:
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            raise DatasetLocationError(f"{DATASET_ROOTS_ENV} lists '{entry}', which is not an absolute folder; list "
                                       f"absolute folders separated by '{os.pathsep}' and restart ComfyUI")
        roots.append(Path(os.path.abspath(path)))
    return roots


def _inside(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or below it, comparing normalised paths or, failing that, paths with links resolved."""
    def below(a: str, b: str) -> bool:
        a, b = os.path.normcase(a), os.path.normcase(b)
        return a == b or a.startswith(b.rstrip(os.sep) + os.sep)

    return (below(os.path.abspath(path), os.path.abspath(root))
            or below(os.path.realpath(path), os.path.realpath(root)))


def resolve_dataset_folder(folder: str | os.PathLike, *, input_dir: str | os.PathLike,
                           roots: Sequence[str | os.PathLike] | None = None) -> Path:
    """Where a dataset folder setting points, if the server allows datasets there (see the module notes).

    Args:
        folder: a folder relative to ``input_dir``, or an absolute folder (``~`` expanded).
        input_dir: ComfyUI's input folder.
        roots: the dataset roots; None reads them from ``CINETUNE_DATASET_ROOTS`` (:func:`dataset_roots`).
    Returns:
        The folder as an absolute, normalised path.
    Raises:
        DatasetLocationError: empty setting, control characters, a relative folder that leaves ``input_dir``, or an
            absolute folder outside ``input_dir`` and every root (the message says how to add a root).
        DatasetError: the folder does not exist or is not a folder.
    """
    text = os.fspath(folder).strip()
    if not text:
        raise DatasetLocationError("no dataset folder given: name a folder inside ComfyUI's input folder, e.g. "
                                   "'my_dataset'")
    if _has_control_characters(text):
        raise DatasetLocationError(f"the dataset folder {text!r} contains control characters; type the folder name "
                                   "again")
    input_dir = Path(os.path.abspath(input_dir))
    path = Path(text).expanduser()
    if not path.is_absolute():
        candidate = Path(os.path.abspath(input_dir / path))
        if not _inside(candidate, input_dir):
            raise DatasetLocationError(f"the dataset folder '{text}' leaves ComfyUI's input folder ({input_dir}); a "
                                       "relative folder must stay inside it (no '..')")
    else:
        candidate = Path(os.path.abspath(path))
        allowed = [input_dir, *(dataset_roots() if roots is None else [Path(os.path.abspath(r)) for r in roots])]
        if not any(_inside(candidate, root) for root in allowed):
            listed = ", ".join(str(r) for r in allowed[1:]) or "none"
            raise DatasetLocationError(
                f"the dataset folder {candidate} is outside the folders this server takes datasets from: ComfyUI's "
                f"input folder ({input_dir}) and the dataset roots ({listed}). Put the dataset inside the input "
                f"folder, or ask the server owner to add a parent folder to the environment variable "
                f"{DATASET_ROOTS_ENV} (absolute folders separated by '{os.pathsep}') and restart ComfyUI")
    if not candidate.exists():
        raise DatasetError(f"dataset folder not found: {candidate}")
    if not candidate.is_dir():
        raise DatasetError(f"{candidate} is not a folder; point the dataset at the folder holding the media and "
                           "caption files")
    return candidate


# ---------------------------------------------------------------------------------------------- scanning


def _apply_trigger(caption: str, trigger_word: str) -> str:
    trigger = trigger_word.strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if caption.startswith(trigger) and (len(caption) == len(trigger) or not caption[len(trigger)].isalnum()):
        return caption
    return f"{trigger}, {caption}"


def _read_caption(path: Path) -> str:
    text = path.read_text(encoding="utf-8-sig")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _walk(folder: Path, recursive: bool) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [Path(root) / f for f in files if not f.startswith(".")]
    return found


def _image_size(path: Path, verify: bool) -> tuple[int, int]:
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90°: sides swap
            width, height = height, width
        if verify:
            img.load()
    return width, height


def _describe_video(path: Path, verify: bool) -> tuple[int, int, int, float]:
    info = probe_video(path)
    frames = info["frames"]
    if verify:
        decoded = count_decodable_frames(path)
        if decoded == 0 or decoded < frames:
            raise MediaError(f"truncated or corrupt: the container declares {frames} frames but only "
                             f"{decoded} decode")
        frames = decoded
    if info["width"] < 1 or info["height"] < 1 or frames < 1:
        raise MediaError(f"no picture ({info['width']}x{info['height']}, {frames} frames)")
    return info["width"], info["height"], frames, info["fps"]


def scan_folder(folder: str | os.PathLike, *, repeats: int = 1, trigger_word: str = "",
                caption_ext: str = ".txt", recursive: bool = True, default_caption: str | None = None,
                skip_missing_captions: bool = False, verify: bool = True,
                max_problems: int | None = MAX_PROBLEMS, frame_extraction: FrameExtraction | None = None) -> Dataset:
    """Find videos and images in a folder and pair them with same-name caption files.

    Args:
        folder: the dataset folder.
        repeats: times each item counts per epoch, ≥ 1.
        trigger_word: prepended as ``"<trigger>, <caption>"`` (see the module notes); "" = none.
        caption_ext: caption file extension (``".txt"``; the dot may be left out).
        recursive: also scan sub-folders (hidden ones excepted).
        default_caption: caption for media without a caption file; None = such media are problems.
        skip_missing_captions: with ``default_caption`` None, leave uncaptioned media out without
            listing them as problems (for folders that mix training media with other files).
        verify: decode every file once so that truncated files are found now (see module notes);
            False only probes headers (fast, but a damaged file fails later in :func:`load_clip`).
        max_problems: stop after this many problems when files remain unchecked (None: never stop).
        frame_extraction: the folder's own frame extraction, carried by every item (see the module notes); None =
            the cacher's frame count and selection.

    Returns:
        :class:`Dataset` (``root`` = ``folder``) with items sorted by ``source_id`` (path relative to ``folder``) and one
        :class:`DatasetProblem` per media file left out (missing/empty/undecodable caption,
        unreadable, truncated or empty media).

    Raises:
        DatasetError: ``folder`` is missing or not a folder, holds no supported media (the message
            lists the extensions), every media file has a problem (the message lists them), or ``max_problems``
            problems were found before the last file (the message lists them and counts the files not checked).
        ValueError: ``repeats`` < 1, or ``max_problems`` < 1.
        TypeError: ``frame_extraction`` is not a FrameExtraction.
    """
    folder = Path(folder)
    _check_extraction_type(frame_extraction)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer ≥ 1, got {repeats!r}")
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be ≥ 1 or None, got {max_problems!r}")
    if not folder.exists():
        raise DatasetError(f"dataset folder not found: {folder}")
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; point the dataset at the folder holding the media "
                           "and caption files")
    caption_ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"
    media = sorted((p for p in _walk(folder, recursive) if p.suffix.lower() in VIDEO_EXTS + IMAGE_EXTS),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not media:
        where = "or its sub-folders " if recursive else ""
        raise DatasetError(f"no videos or images found in {folder} {where}(videos: {', '.join(VIDEO_EXTS)}; "
                           f"images: {', '.join(IMAGE_EXTS)}); put the training files there with a "
                           f"same-name {caption_ext} caption each")

    items: list[DatasetItem] = []
    problems: list[DatasetProblem] = []
    for index, path in enumerate(media):
        if max_problems is not None and len(problems) >= max_problems:
            raise _stopped_scan(folder, problems, media[index:], caption_ext)
        caption_path = path.with_suffix(caption_ext)
        caption = None
        if caption_path.is_file():
            try:
                caption = _read_caption(caption_path) or None
            except UnicodeDecodeError:
                problems.append(DatasetProblem(caption_path, f"caption of {path.name} is not UTF-8 text; "
                                                             "save it with UTF-8 encoding"))
                continue
            except OSError as exc:
                problems.append(DatasetProblem(caption_path, f"caption cannot be read ({exc}); check the "
                                                             "file's permissions"))
                continue
            control = next(((i, c) for i, c in enumerate(caption or "") if c != "\t" and _has_control_characters(c)),
                           None)
            if control is not None:  # e.g. UTF-16 text without a byte-order mark decodes as text with NULs
                problems.append(DatasetProblem(caption_path, f"caption of {path.name} holds the control character "
                                                             f"{control[1]!r} at position {control[0]}; if it was saved "
                                                             "as UTF-16, save it as UTF-8 text"))
                continue
        if caption is None:
            if default_caption is not None:
                caption = default_caption.strip()
            elif skip_missing_captions:
                continue
            else:
                state = "is empty" if caption_path.is_file() else "is missing"
                problems.append(DatasetProblem(path, f"caption file {caption_path.name} {state}; write the "
                                                     f"caption into {caption_path.name} next to it, or set a "
                                                     "default caption"))
                continue
        kind: Literal["video", "image"] = "video" if path.suffix.lower() in VIDEO_EXTS else "image"
        try:
            if kind == "video":
                width, height, frames, fps = _describe_video(path, verify)
                has_audio = _has_audio(path)
            else:
                (width, height), frames, fps, has_audio = _image_size(path, verify), 1, None, False
        except (MediaError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            message = str(exc).removeprefix(f"{path}: ")
            problems.append(DatasetProblem(path, f"cannot be read: {message}; re-export or re-encode the "
                                                 "file (or remove it from the folder)"))
            continue
        items.append(DatasetItem(path=path, caption=_apply_trigger(caption, trigger_word), kind=kind,
                                 width=width, height=height, frames=frames, fps=fps, repeats=repeats,
                                 source_id=path.relative_to(folder).as_posix(), has_audio=has_audio,
                                 extraction=frame_extraction))
    if not items:
        listed = "\n".join(f"  - {problem}" for problem in problems) or "  (all uncaptioned and skipped)"
        raise DatasetError(f"no usable training files in {folder}; fix these and scan again:\n{listed}")
    return Dataset(items=items, problems=problems, trigger_word=trigger_word.strip(), root=folder)


def _stopped_scan(folder: Path, problems: list[DatasetProblem], unchecked: list[Path],
                  caption_ext: str) -> DatasetError:
    uncaptioned = sum(not p.with_suffix(caption_ext).is_file() for p in unchecked)
    listed = "\n".join(f"  - {problem}" for problem in problems)
    return DatasetError(f"stopped scanning {folder} after {len(problems)} problems; {len(unchecked)} more media "
                        f"files were not checked ({uncaptioned} of them have no {caption_ext} caption). Check that "
                        f"this is the dataset folder, fix these files and scan again:\n{listed}")


def _tensor_digest(pixels: Tensor) -> str:
    data = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
    return hashlib.sha256(data.data).hexdigest()[:16]


def from_tensors(frames_list: Sequence[Tensor], captions: str | Sequence[str], *, fps: float | None = None,
                 repeats: int = 1, trigger_word: str = "", names: Sequence[str] | None = None,
                 frame_extraction: FrameExtraction | None = None) -> Dataset:
    """Build a dataset from frames held in memory (IMAGE batches coming from other ComfyUI nodes).

    Args:
        frames_list: one tensor per item, ``[F, H, W, 3]`` (or ``[H, W, 3]``) float in 0..1. ``F == 1``
            makes an image item, ``F > 1`` a video item at ``fps``. Kept by reference on CPU.
        captions: one caption per item, or one string for all items.
        fps: frame rate of the video items; None = unknown, they are not resampled.
        repeats: times each item counts per epoch, ≥ 1.
        trigger_word: applied as in :func:`scan_folder`.
        names: optional names used in ``source_id`` (``<name>-<content hash>``) and messages.
        frame_extraction: the frames' own extraction, carried by every item; None = the cacher's.

    Returns:
        :class:`Dataset`; items whose tensor has the wrong type, shape or dtype are problems (values
        outside 0..1 are clipped when loaded).
        ``source_id`` includes a hash of the pixel values, so :func:`dataset_fingerprint` follows content.

    Raises:
        DatasetError: caption/name count differs from the item count, or no item is usable.
        ValueError: bad ``repeats`` or ``fps``.
        TypeError: ``frame_extraction`` is not a FrameExtraction.
    """
    _check_extraction_type(frame_extraction)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer ≥ 1, got {repeats!r}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0 or None, got {fps!r}")
    frames_list = list(frames_list)
    captions = [captions] * len(frames_list) if isinstance(captions, str) else list(captions)
    if len(captions) != len(frames_list):
        raise DatasetError(f"{len(frames_list)} frame batches but {len(captions)} captions; give one caption "
                           "per batch or a single caption for all")
    if names is not None and len(names) != len(frames_list):
        raise DatasetError(f"{len(frames_list)} frame batches but {len(names)} names")
    if not frames_list:
        raise DatasetError("no frames given; connect at least one IMAGE batch")
    items, problems = [], []
    for index, (pixels, caption) in enumerate(zip(frames_list, captions)):
        label = names[index] if names is not None else f"tensor-{index}"
        if not isinstance(pixels, Tensor):
            problems.append(DatasetProblem(None, f"{label}: expected a tensor [F, H, W, 3], got "
                                                 f"{type(pixels).__name__}"))
            continue
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or 0 in pixels.shape or not pixels.is_floating_point():
            problems.append(DatasetProblem(None, f"{label}: expected float frames [F, H, W, 3] in 0..1 "
                                                 f"(ComfyUI IMAGE), got {pixels.dtype} {tuple(pixels.shape)}; "
                                                 "convert RGBA/greyscale to RGB first"))
            continue
        pixels = pixels.detach().cpu()
        count, height, width, _ = pixels.shape
        kind: Literal["video", "image"] = "video" if count > 1 else "image"
        items.append(DatasetItem(path=None, caption=_apply_trigger(str(caption).strip(), trigger_word),
                                 kind=kind, width=width, height=height, frames=count,
                                 fps=fps if kind == "video" else None, repeats=repeats,
                                 source_id=f"{label}-{_tensor_digest(pixels)}", pixels=pixels, has_audio=False,
                                 extraction=frame_extraction))
    if not items:
        raise DatasetError("no usable frame batches:\n" + "\n".join(f"  - {p}" for p in problems))
    return Dataset(items=items, problems=problems)


def _check_extraction_type(extraction) -> None:
    if extraction is not None and not isinstance(extraction, FrameExtraction):
        raise TypeError(f"frame_extraction must be a FrameExtraction or None, got {type(extraction).__name__}")


def combine_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """One dataset made of several, each item kept as its dataset made it (see the module notes).

    Args:
        datasets: the datasets, in order (scanned folders, in-memory frames or combined datasets).

    Returns:
        :class:`Dataset` with every item of every dataset in input order, each ``source_id`` prefixed with its
        dataset's label (``<folder name>/``; ``<folder name>#<position>/`` when folder names repeat;
        ``dataset#<position>/`` for a dataset without a folder), every problem, and the trigger words (distinct,
        non-empty) joined by ", ".

    Raises:
        DatasetError: no datasets, or something that is not a :class:`Dataset` (the message names its position).
    """
    datasets = list(datasets)
    if not datasets:
        raise DatasetError("no datasets to combine; connect at least one Dataset Folder")
    for position, dataset in enumerate(datasets, start=1):
        if not isinstance(dataset, Dataset):
            raise DatasetError(f"dataset {position} is a {type(dataset).__name__}, not a dataset; connect a Dataset "
                               "Folder (or another Combine Datasets) there")
    names = [d.root.name if d.root is not None and d.root.name else None for d in datasets]
    labels = [name if name is not None and names.count(name) == 1 else f"{name or _COMBINED_LABEL}#{position}"
              for position, name in enumerate(names, start=1)]
    if len(set(labels)) < len(labels):  # a folder named like another's label, e.g. "clips#2"
        labels = [f"{name or _COMBINED_LABEL}#{position}" for position, name in enumerate(names, start=1)]
    items = [replace(item, source_id=f"{label}/{item.source_id}")
             for label, dataset in zip(labels, datasets) for item in dataset.items]
    triggers = dict.fromkeys(t for d in datasets for t in d.trigger_word.split(", ") if t)
    return Dataset(items=items, problems=[p for d in datasets for p in d.problems], trigger_word=", ".join(triggers))


def dataset_fingerprint(items: Dataset | Iterable[DatasetItem]) -> str:
    """Stable hash of a dataset's identity, for cache keys and LoRA metadata.

    Hashes, per item, ``source_id``, file size and ``mtime_ns`` (files only; in-memory items carry a
    content hash in ``source_id``), ``caption``, ``repeats`` and, for items that carry one, the frame extraction
    (items without one hash as before extractions existed), with items sorted by ``source_id``:
    the order of items does not matter; editing, touching or replacing a file, or changing a caption,
    trigger word, repeat count or extraction changes the result.

    Returns:
        64 hex characters (SHA-256).

    Raises:
        FileNotFoundError: an item's file no longer exists.
    """
    items = items.items if isinstance(items, Dataset) else list(items)
    rows = []
    for item in sorted(items, key=lambda it: it.source_id):
        size = mtime = None
        if item.path is not None:
            st = item.path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        row = [item.source_id, size, mtime, item.caption, item.repeats]
        if item.extraction is not None:
            row.append(item.extraction.as_dict())
        rows.append(row)
    payload = json.dumps({"version": _FINGERPRINT_VERSION, "items": rows}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- summaries


def dataset_summary(dataset: Dataset) -> str:
    """What a dataset holds, as the Dataset Folder node shows it: a first line such as ``"3 items (1 video,
    2 images), 0 problems"`` (``"2 videos, 1 with sound"`` where videos have sound), one line per frame
    extraction the items carry, then one line per problem (the file and the fix).

    Args:
        dataset: from :func:`scan_folder`, :func:`from_tensors` or :func:`combine_datasets`.
    Returns:
        Multi-line text.
    """
    return dataset.summary()
