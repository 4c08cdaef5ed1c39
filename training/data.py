"""Training data: folder scanning with captions, frame selection with fps resampling, aspect buckets.

The pieces, in the order a latent cacher uses them (``fmt`` is the model family's
:class:`~cinetune.core.family.LatentFormat`)::

    ds = scan_folder("dataset/", trigger_word="ohwx")                   # items + per-file problems
    clips, problems = plan_clips(ds, FrameSpec(17, latent_format=fmt))  # frame indices per item
    buckets = make_buckets(512, fmt)                                    # equal-area sizes, sides % size_multiple == 0
    bucket = assign_bucket(item.width, item.height, buckets)
    pixels = load_clip(item, indices, bucket)                           # [3, F, H, W] float in [-1, 1]
    sound = load_clip_audio(item, indices, spec)                        # [2, S] at the format's audio rate

Decisions (the model's facts — frame rule ``temporal_factor·k + 1``, default frame rate, pixel size multiple —
come from its latent format; nothing here is specific to one model):

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
- **fps resampling** maps target time ``t = i / target_fps`` to the nearest source frame,
  ``index = floor(t · source_fps + 1/2)`` computed exactly with rationals (ties round up, no
  banker's rounding), for every ``i`` whose index exists. Downsampling skips frames, upsampling
  repeats them (a 14.3 fps GIF gives each source frame about 1.7 times). Images and items without
  an fps are not resampled.
- **Selection** on the resampled frames: ``head`` = the first ``target_frames``; ``uniform`` = one
  clip of ``target_frames`` spread evenly from the first to the last frame (motion plays faster than
  real time; this is not musubi-tuner's ``uniform``, which takes several consecutive clips);
  ``chunks`` = consecutive clips starting every ``chunk_stride`` frames (default ``target_frames``,
  no overlap); a remainder shorter than a clip is dropped.
- **Buckets** have about the same area as ``base_resolution²``: for each short side ``s`` (a multiple
  of ``step``) the long side is the multiple of ``step`` nearest to ``area / s`` in log-area (ties to
  the smaller), and every landscape bucket has its portrait twin. An item goes to the bucket with the
  nearest aspect ratio in log scale. Without upscaling, an item smaller than that bucket gets the
  largest bucket of (nearly) the same aspect that fits inside it, which is not in the list; an item
  smaller than ``step`` in either side raises :class:`NoBucketError`.
- **Resizing**: crop the centre to the bucket's aspect, then resize to the bucket with antialiased
  bicubic interpolation (torch), clamped to 0..255 — the same as "resize to cover, centre-crop".
- **Audio tracks** (families with sound; the latent format's ``audio`` geometry gives the rate). ``scan_folder``
  records whether each video has an audio stream (``DatasetItem.has_audio``; images and in-memory frames have
  none). :func:`load_clip_audio` decodes a clip's span of the first audio stream with PyAV
  (:func:`~cinetune.core.media.read_audio`): downmixed to stereo (5.1 with the ITU weights, mono duplicated),
  resampled to the format's rate (16 kHz for LTX-2) and trimmed or padded with silence to exactly the clip's
  duration. The span starts at the first selected frame's timestamp (``index / source fps``) and lasts
  ``frames / clip fps``, as ltx-trainer trims the track to the clip's duration. ``uniform`` selection plays the
  motion faster than real time, so no sound track can follow it: audio clips need ``head`` or ``chunks``.
- **Clip frame rate**: :func:`clip_fps` = the frame spec's target rate, or with ``target_fps=None`` the clip's own
  source rate (each clip keeps its own, as ltx-trainer stores each video's fps), and the format's ``default_fps``
  for images and frames without a rate (24 for LTX-2).
- **Video orientation** metadata and non-square pixels are not applied (the same frames
  :func:`~cinetune.core.media.read_video` returns); EXIF orientation of photos is applied; image
  alpha is composited over white.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from ..core.family import LatentFormat
from ..core.media import MediaError, count_decodable_frames, decode_frames, probe_audio, probe_video, read_audio

__all__ = [
    "VIDEO_EXTS", "IMAGE_EXTS", "DATASET_ROOTS_ENV", "DatasetError", "DatasetLocationError", "TooShortError",
    "NoBucketError", "DatasetItem", "DatasetProblem", "Dataset", "dataset_roots", "resolve_dataset_folder",
    "scan_folder", "from_tensors",
    "FrameSpec", "frame_indices", "Clip", "plan_clips",
    "Bucket", "make_buckets", "assign_bucket", "load_clip", "dataset_fingerprint",
    "AUDIO_CHANNELS", "MISSING_AUDIO", "NoAudioError", "clip_fps", "clip_audio_span", "has_audio_track",
    "check_clip_audio", "load_clip_audio",
]

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".mkv", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Environment variable listing the absolute folders (``os.pathsep``-separated) datasets may be taken from, besides
#: ComfyUI's input folder.
DATASET_ROOTS_ENV = "CINETUNE_DATASET_ROOTS"

#: Problems after which :func:`scan_folder` stops (when files remain unchecked).
MAX_PROBLEMS = 50

_FINGERPRINT_VERSION = 1
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """The dataset as a whole cannot be used (no folder, no media, nothing usable); the message says why."""


class DatasetLocationError(DatasetError):
    """A dataset folder outside the places this server allows, or a malformed folder setting; the message says
    where datasets may be and how the server owner adds a dataset root."""


class TooShortError(DatasetError):
    """A video has fewer frames than a clip needs, after fps resampling.

    Attributes:
        needed: frames the clip needs (``FrameSpec.target_frames``).
        available: frames available after resampling to the target fps.
        largest_valid: the largest valid frame count (the latent format's frame rule) ≤ ``available``: the longest
            clip this video can give.
    """

    def __init__(self, message: str, *, needed: int, available: int, largest_valid: int):
        super().__init__(message)
        self.needed, self.available, self.largest_valid = needed, available, largest_valid


class NoBucketError(DatasetError):
    """No bucket fits an item (it is smaller than ``step`` pixels and upscaling is off)."""


class NoAudioError(DatasetError):
    """Clips without an audio track where the training needs sound; the message lists the files and the fixes.

    Attributes:
        files: the names (paths or in-memory ids) of the items without sound.
    """

    def __init__(self, message: str, *, files: list[str]):
        super().__init__(message)
        self.files = files


# ---------------------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class DatasetItem:
    """One training sample source: a video, an image, or frames handed over in memory.

    Attributes:
        path: the media file, or None for in-memory frames (see ``pixels``).
        caption: final caption text, trigger word already applied.
        kind: ``"video"`` or ``"image"``.
        width, height: source size in pixels (images: after EXIF orientation).
        frames: source frame count (decoded count for videos; 1 for images).
        fps: source frames per second; None for images and in-memory frames without a rate.
        repeats: how many times the item counts per epoch (≥ 1).
        source_id: stable identity: the path relative to the scanned folder (POSIX separators), or
            ``tensor-<index>-<content hash>`` for in-memory frames.
        pixels: in-memory frames ``[F, H, W, 3]`` float 0..1 on CPU (ComfyUI IMAGE layout), else None.
            Not part of equality or repr.
        has_audio: the file has an audio stream (found by :func:`scan_folder`); False for images and in-memory
            frames; None = not known (probed when audio is needed).
    """

    path: Path | None
    caption: str
    kind: Literal["video", "image"]
    width: int
    height: int
    frames: int
    fps: float | None
    repeats: int
    source_id: str
    pixels: Tensor | None = field(default=None, compare=False, repr=False)
    has_audio: bool | None = None

    @property
    def name(self) -> str:
        """The file path as text, or the ``source_id`` for in-memory items (for messages)."""
        return str(self.path) if self.path is not None else self.source_id


@dataclass
class DatasetProblem:
    """A file that was left out, and why: ``message`` states the problem and the fix.

    Attributes:
        path: the offending media or caption file (None for in-memory items, named in the message).
        message: what is wrong and what to do about it.
    """

    path: Path | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


@dataclass
class Dataset:
    """Usable items plus the problems found while building them.

    Attributes:
        items: usable items in a stable order (sorted by ``source_id`` for scanned folders).
        problems: files left out, each with the fix.
        trigger_word: the trigger word prepended to the captions ("" if none), recorded in LoRA metadata.
    """

    items: list[DatasetItem]
    problems: list[DatasetProblem] = field(default_factory=list)
    trigger_word: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """Multi-line text: item counts by kind, then one line per problem (for node outputs / logs)."""
        videos = sum(item.kind == "video" for item in self.items)
        sound = sum(bool(item.has_audio) for item in self.items)
        lines = [f"{len(self.items)} items ({videos} videos, {sound} of them with sound, "
                 f"{len(self.items) - videos} images), {len(self.problems)} problems"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


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


def _has_audio(path: Path) -> bool:
    """Whether a file has an audio stream (one whose header is damaged counts: decoding it reports the damage)."""
    try:
        return probe_audio(path) is not None
    except MediaError:
        return True


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
                max_problems: int | None = MAX_PROBLEMS) -> Dataset:
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

    Returns:
        :class:`Dataset` with items sorted by ``source_id`` (path relative to ``folder``) and one
        :class:`DatasetProblem` per media file left out (missing/empty/undecodable caption,
        unreadable, truncated or empty media).

    Raises:
        DatasetError: ``folder`` is missing or not a folder, holds no supported media (the message
            lists the extensions), every media file has a problem (the message lists them), or ``max_problems``
            problems were found before the last file (the message lists them and counts the files not checked).
        ValueError: ``repeats`` < 1, or ``max_problems`` < 1.
    """
    folder = Path(folder)
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
                                 source_id=path.relative_to(folder).as_posix(), has_audio=has_audio))
    if not items:
        listed = "\n".join(f"  - {problem}" for problem in problems) or "  (all uncaptioned and skipped)"
        raise DatasetError(f"no usable training files in {folder}; fix these and scan again:\n{listed}")
    return Dataset(items=items, problems=problems, trigger_word=trigger_word.strip())


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
                 repeats: int = 1, trigger_word: str = "", names: Sequence[str] | None = None) -> Dataset:
    """Build a dataset from frames held in memory (IMAGE batches coming from other ComfyUI nodes).

    Args:
        frames_list: one tensor per item, ``[F, H, W, 3]`` (or ``[H, W, 3]``) float in 0..1. ``F == 1``
            makes an image item, ``F > 1`` a video item at ``fps``. Kept by reference on CPU.
        captions: one caption per item, or one string for all items.
        fps: frame rate of the video items; None = unknown, they are not resampled.
        repeats: times each item counts per epoch, ≥ 1.
        trigger_word: applied as in :func:`scan_folder`.
        names: optional names used in ``source_id`` (``<name>-<content hash>``) and messages.

    Returns:
        :class:`Dataset`; items whose tensor has the wrong type, shape or dtype are problems (values
        outside 0..1 are clipped when loaded).
        ``source_id`` includes a hash of the pixel values, so :func:`dataset_fingerprint` follows content.

    Raises:
        DatasetError: caption/name count differs from the item count, or no item is usable.
        ValueError: bad ``repeats`` or ``fps``.
    """
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
                                 source_id=f"{label}-{_tensor_digest(pixels)}", pixels=pixels, has_audio=False))
    if not items:
        raise DatasetError("no usable frame batches:\n" + "\n".join(f"  - {p}" for p in problems))
    return Dataset(items=items, problems=problems)


def dataset_fingerprint(items: Dataset | Iterable[DatasetItem]) -> str:
    """Stable hash of a dataset's identity, for cache keys and LoRA metadata.

    Hashes, per item, ``source_id``, file size and ``mtime_ns`` (files only; in-memory items carry a
    content hash in ``source_id``), ``caption`` and ``repeats``, with items sorted by ``source_id``:
    the order of items does not matter; editing, touching or replacing a file, or changing a caption,
    trigger word or repeat count changes the result.

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
        rows.append([item.source_id, size, mtime, item.caption, item.repeats])
    payload = json.dumps({"version": _FINGERPRINT_VERSION, "items": rows}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameSpec:
    """Which frames make a training clip.

    Attributes:
        target_frames: frames per clip, valid for the latent format (``temporal_factor·k + 1``: the VAE packs
            ``temporal_factor`` frames per latent frame after the first).
        mode: ``"head"`` | ``"uniform"`` | ``"chunks"`` (see :func:`frame_indices`).
        target_fps: frame rate the clip plays at; ``"format"`` (default) = the latent format's ``default_fps``
            (stored resolved); None = keep the source rate.
        chunk_stride: ``chunks`` mode only: start-to-start distance in resampled frames (≥ 1);
            None = ``target_frames`` (no overlap).
        latent_format: the model family's :class:`~cinetune.core.family.LatentFormat` (keyword only).

    Raises:
        ValueError: a frame count the format cannot encode (the message names the nearest valid ones), an unknown
            mode, a non-positive fps or stride, or a stride outside ``chunks`` mode.
        TypeError: ``latent_format`` is not a LatentFormat.
    """

    target_frames: int
    mode: Literal["head", "uniform", "chunks"] = "head"
    target_fps: float | None | Literal["format"] = "format"
    chunk_stride: int | None = None
    latent_format: LatentFormat = field(kw_only=True)

    def __post_init__(self):
        fmt = self.latent_format
        if not isinstance(fmt, LatentFormat):
            raise TypeError(f"latent_format must be the model family's LatentFormat, got {type(fmt).__name__}")
        n = self.target_frames
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"target_frames must be an integer {fmt.frame_rule} ≥ 1 "
                             f"({', '.join(str(fmt.pixel_frames(k)) for k in range(1, 5))}, ...), got {n!r}")
        if not fmt.valid_frames(n):
            below, above = fmt.nearest_frames(n)
            raise ValueError(f"target_frames must be {fmt.frame_rule} (the VAE packs {fmt.temporal_factor} frames per "
                             f"latent after the first); {n} is not: use {below} or {above}")
        if self.mode not in ("head", "uniform", "chunks"):
            raise ValueError(f"mode must be 'head', 'uniform' or 'chunks', got {self.mode!r}")
        if isinstance(self.target_fps, str):
            if self.target_fps != "format":
                raise ValueError(f"target_fps must be a number, None or 'format', got {self.target_fps!r}")
            object.__setattr__(self, "target_fps", fmt.default_fps)
        if self.target_fps is not None and not (math.isfinite(self.target_fps) and self.target_fps > 0):
            raise ValueError(f"target_fps must be a finite number > 0 or None, got {self.target_fps!r}")
        if self.chunk_stride is not None:
            if self.mode != "chunks":
                raise ValueError(f"chunk_stride only applies to mode 'chunks' (mode is {self.mode!r}); leave it None")
            if isinstance(self.chunk_stride, bool) or not isinstance(self.chunk_stride, int) or self.chunk_stride < 1:
                raise ValueError(f"chunk_stride must be an integer ≥ 1 or None, got {self.chunk_stride!r}")


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def _resampled(source_frames: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    if source_fps is None or target_fps is None:
        return list(range(source_frames))
    ratio = _rate(source_fps) / _rate(target_fps)  # source frames per target frame
    p, q = ratio.numerator, ratio.denominator
    # index(i) = floor(i·p/q + 1/2) ≤ N−1  ⇔  2·i·p < (2N−1)·q
    count = -(-(2 * source_frames - 1) * q // (2 * p))
    return [(2 * i * p + q) // (2 * q) for i in range(count)]


def frame_indices(source_frames: int, source_fps: float | None, spec: FrameSpec) -> list[list[int]]:
    """Source frame indices of the training clips one video gives.

    First the video is resampled to ``spec.target_fps`` (module notes: nearest source frame to each
    target timestamp; no resampling when either fps is None), then clips are selected:

    - ``head``: one clip, the first ``target_frames`` resampled frames.
    - ``uniform``: one clip whose ``target_frames`` frames are spread evenly over all resampled frames,
      first and last included (position ``floor(j·(n−1)/(T−1) + 1/2)``).
    - ``chunks``: clips starting at 0, stride, 2·stride, … while a whole clip fits.

    Args:
        source_frames: frames in the source (≥ 1).
        source_fps: source frame rate, or None (images, unknown rate).
        spec: the :class:`FrameSpec`.

    Returns:
        A list of clips, each a list of ``target_frames`` indices into the source frames, ascending
        (repeats possible when upsampling).

    Raises:
        TooShortError: fewer resampled frames than ``target_frames``; the message gives the frames
            available and the largest valid count.
        ValueError: ``source_frames`` < 1 or a non-positive ``source_fps``.
    """
    if isinstance(source_frames, bool) or not isinstance(source_frames, int) or source_frames < 1:
        raise ValueError(f"source_frames must be an integer ≥ 1, got {source_frames!r}")
    if source_fps is not None and not (math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"source_fps must be a finite number > 0 or None, got {source_fps!r}")
    timeline = _resampled(source_frames, source_fps, spec.target_fps)
    n, t = len(timeline), spec.target_frames
    if n < t:
        largest = spec.latent_format.nearest_frames(n)[0]
        rate = ""
        if source_fps is not None and spec.target_fps is not None:
            rate = (f" at {spec.target_fps:g} fps ({source_frames} source frames at {source_fps:g} fps, "
                    f"{source_frames / source_fps:.2f} s)")
        raise TooShortError(f"too short: a clip needs {t} frames but only {n} are available{rate}; use "
                            f"target_frames ≤ {largest} or a longer video",
                            needed=t, available=n, largest_valid=largest)
    if spec.mode == "head":
        return [timeline[:t]]
    if spec.mode == "uniform":
        if t == 1:
            return [timeline[:1]]
        return [[timeline[(2 * j * (n - 1) + (t - 1)) // (2 * (t - 1))] for j in range(t)]]
    stride = spec.chunk_stride or t
    return [timeline[start:start + t] for start in range(0, n - t + 1, stride)]


@dataclass(frozen=True)
class Clip:
    """One training clip: an item and the source frame indices to decode (``[0]`` for images)."""

    item: DatasetItem
    indices: list[int]


def plan_clips(dataset: Dataset, spec: FrameSpec) -> tuple[list[Clip], list[DatasetProblem]]:
    """Apply :func:`frame_indices` to every video of a dataset; images give one single-frame clip.

    Returns:
        ``(clips, problems)``: clips in item order (a video in ``chunks`` mode may give several);
        problems for videos too short for ``spec`` (naming the file and the longest clip it allows).
        ``dataset.problems`` is not repeated.

    Raises:
        DatasetError: no clip at all (the message lists the too-short files).
    """
    clips, problems = [], []
    for item in dataset.items:
        if item.kind == "image":
            clips.append(Clip(item, [0]))
            continue
        try:
            clips += [Clip(item, indices) for indices in frame_indices(item.frames, item.fps, spec)]
        except TooShortError as exc:
            problems.append(DatasetProblem(item.path, str(exc) if item.path else f"{item.source_id}: {exc}"))
    if not clips:
        raise DatasetError(f"no video is long enough for {spec.target_frames} frames:\n"
                           + "\n".join(f"  - {p}" for p in problems))
    return clips, problems


# -------------------------------------------------------------------------------------------- buckets


@dataclass(frozen=True, order=True)
class Bucket:
    """A training resolution in pixels (both sides multiples of the bucket step)."""

    width: int
    height: int

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def area(self) -> int:
        """width · height in pixels."""
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


def make_buckets(base_resolution: int | tuple[int, int], latent_format: LatentFormat, *, step: int | None = None,
                 min_side: int | None = None, max_side: int | None = None, max_aspect: float = 4.0) -> list[Bucket]:
    """Equal-area aspect buckets around a base resolution.

    Args:
        base_resolution: ``R`` (target area ``R·R``) or ``(width, height)`` (target area ``width·height``;
            that exact size is a bucket when both sides are multiples of ``step``).
        latent_format: the model family's :class:`~cinetune.core.family.LatentFormat`.
        step: every side is a multiple of this; None = the format's ``size_multiple``. A coarser grid a mode of the
            family needs (e.g. sparse-attention tiles) must be a multiple of ``size_multiple``.
        min_side: shortest allowed side (rounded up to ``step``); None = half the square side.
        max_side: longest allowed side (rounded down to ``step``); None = twice the square side.
        max_aspect: largest long/short side ratio (≥ 1).

    Returns:
        Buckets sorted by aspect ratio (width/height ascending), each landscape bucket with its
        portrait twin, one per aspect, each with the area nearest the target in log scale for its
        short side (within about ``step / short side`` of the target).

    Raises:
        ValueError: non-positive sizes, a ``step`` that is not a multiple of the format's size multiple,
            ``max_aspect`` < 1, or limits that leave no bucket (the message gives the limits).
        TypeError: ``latent_format`` is not a LatentFormat.
    """
    step = _bucket_step(latent_format, step)
    if isinstance(base_resolution, (tuple, list)):
        if len(base_resolution) != 2:
            raise ValueError(f"base_resolution must be an int or (width, height), got {base_resolution!r}")
        area = _positive_int("base width", base_resolution[0]) * _positive_int("base height", base_resolution[1])
    else:
        area = _positive_int("base_resolution", base_resolution) ** 2
    if not max_aspect >= 1:
        raise ValueError(f"max_aspect must be ≥ 1 (long side / short side), got {max_aspect!r}")
    square = math.sqrt(area)
    lo = _positive_int("min_side", min_side if min_side is not None else max(step, int(square / 2)))
    hi = _positive_int("max_side", max_side if max_side is not None else int(square * 2))
    lo, hi = -(-lo // step) * step, hi // step * step

    def nearer(a: int, b: int) -> bool:
        """For areas a ≤ b: is a at least as near the target as b in log scale? (exact, ties → a)"""
        return area * area <= a * b

    pairs: list[tuple[int, int]] = []  # (long side, short side)
    root = max(step, int(square) // step * step)  # the square bucket: side just below or above √area
    pairs.append((root, root) if nearer(root * root, (root + step) ** 2) else (root + step, root + step))
    for short in range(lo, min(hi, int(square)) + 1, step):
        below = (area // short) // step * step
        longs = [long for long in (below, below + step) if long >= short]
        if len(longs) == 2:
            pairs.append((below if nearer(short * below, short * (below + step)) else below + step, short))
        elif longs:
            pairs.append((longs[0], short))
    found: dict[Fraction, Bucket] = {}
    for long, short in pairs:
        if short < lo or long > hi or long > max_aspect * short:
            continue
        for bucket in (Bucket(long, short), Bucket(short, long)):
            key = Fraction(bucket.width, bucket.height)
            old = found.get(key)
            if old is None:
                found[key] = bucket
                continue
            small, large = sorted((old.area, bucket.area))
            if bucket.area == (small if nearer(small, large) else large):
                found[key] = bucket
    if not found:
        raise ValueError(f"no bucket with area ≈ {area} px, sides multiples of {step} in [{lo}, {hi}] and aspect "
                         f"≤ {max_aspect}; widen min_side/max_side or lower step")
    return sorted(found.values(), key=lambda b: (b.aspect, b.area))


def _bucket_step(latent_format: LatentFormat, step: int | None) -> int:
    """``step``, or the format's size multiple when None; checked against the format."""
    if not isinstance(latent_format, LatentFormat):
        raise TypeError(f"latent_format must be the model family's LatentFormat, got {type(latent_format).__name__}")
    if step is None:
        return latent_format.size_multiple
    step = _positive_int("step", step)
    if step % latent_format.size_multiple:
        raise ValueError(f"bucket step {step} px is not a multiple of {latent_format.size_multiple} px, the size "
                         f"multiple of latent format {latent_format.name!r}; use a multiple of it")
    return step


def _fitting_bucket(width: int, height: int, aspect: float, step: int) -> Bucket | None:
    """Largest bucket with sides multiples of ``step``, aspect ≈ ``aspect``, fitting inside width×height."""
    sizes = [(max(step, round(h * aspect / step) * step), h) for h in range(step, height + 1, step)]
    sizes += [(w, max(step, round(w / aspect / step) * step)) for w in range(step, width + 1, step)]
    fitting = [Bucket(w, h) for w, h in sizes if w <= width and h <= height]
    if not fitting:
        return None
    return max(fitting, key=lambda b: (b.area, -abs(math.log(b.aspect / aspect)), b.width))


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket], *, allow_upscale: bool = False,
                  step: int | None = None, name: str | None = None) -> Bucket:
    """Pick the bucket for an item of ``width × height`` pixels.

    The bucket with the nearest aspect ratio (in log scale; the first on ties) is chosen. If the item
    is smaller than it in either side and ``allow_upscale`` is False, the result is instead the largest
    bucket of nearly the same aspect that fits inside the item (sides multiples of ``step``; may be
    smaller than every listed bucket).

    Args:
        width, height: item size in pixels.
        buckets: from :func:`make_buckets`.
        allow_upscale: True = always return the nearest-aspect bucket, upscaling small items.
        step: side multiple for the no-upscale fallback; None = the largest power of two dividing
            every listed side, capped at 128.
        name: item name for error messages (e.g. its file).

    Returns:
        The :class:`Bucket`.

    Raises:
        NoBucketError: no upscaling and the item is narrower or lower than ``step`` pixels; the
            message names the item size and the smallest bucket of that aspect.
        ValueError: empty ``buckets`` or a non-positive size.
    """
    if not buckets:
        raise ValueError("no buckets given; build them with make_buckets()")
    _positive_int("width", width), _positive_int("height", height)
    target = math.log(width / height)
    best = min(buckets, key=lambda b: abs(math.log(b.aspect) - target))
    if allow_upscale or (width >= best.width and height >= best.height):
        return best
    if step is None:
        sides = math.gcd(*(s for b in buckets for s in (b.width, b.height)))
        step = min(128, sides & -sides)
    fitted = _fitting_bucket(width, height, best.aspect, step)
    if fitted is None:
        label = f"{name} ({width}x{height})" if name else f"{width}x{height}"
        smallest = min(buckets, key=lambda b: (b.area, b.width))
        raise NoBucketError(f"{label} is too small: without upscaling both sides must be at least {step} px "
                            f"(the smallest bucket is {smallest}, the nearest in aspect {best}); allow upscaling "
                            "or use a larger file")
    return fitted


# ---------------------------------------------------------------------------------------------- pixels


def _crop_box(width: int, height: int, bucket: Bucket) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of the centred region of the bucket's aspect."""
    if width * bucket.height > height * bucket.width:  # source wider than the bucket
        w = max(1, min(width, round(height * bucket.width / bucket.height)))
        return (width - w) // 2, 0, w, height
    h = max(1, min(height, round(width * bucket.height / bucket.width)))
    return 0, (height - h) // 2, width, h


def _fit(frame: Tensor, bucket: Bucket) -> Tensor:
    """``[H, W, 3]`` (uint8 or float 0..255) → ``[3, bh, bw]`` float32 0..255, centre-cropped and resized."""
    x0, y0, w, h = _crop_box(frame.shape[1], frame.shape[0], bucket)
    region = frame[y0:y0 + h, x0:x0 + w].permute(2, 0, 1)[None].float()
    if (h, w) != (bucket.height, bucket.width):
        region = F.interpolate(region, size=(bucket.height, bucket.width), mode="bicubic", antialias=True,
                               align_corners=False).clamp_(0, 255)
    return region[0]


def _load_image(path: Path) -> Tensor:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy())


def load_clip(item: DatasetItem, indices: Sequence[int], bucket: Bucket) -> Tensor:
    """Decode the chosen frames of an item, centre-cropped and resized to a bucket.

    Videos are decoded from the start up to the largest index only, and only the chosen frames are
    converted to RGB and resized, so memory holds the output, not the source video.

    Args:
        item: from :func:`scan_folder` or :func:`from_tensors`.
        indices: source frame indices (from :func:`frame_indices`; repeats allowed). Images: ``[0]``.
        bucket: output size.

    Returns:
        ``[3, F, H, W]`` float32 in [-1, 1] (``F = len(indices)``, ``H, W = bucket.height, bucket.width``),
        RGB, on CPU.

    Raises:
        ValueError: empty indices, an index outside ``0 .. item.frames − 1``, or an image with indices
            other than ``[0]``.
        MediaError: the file cannot be decoded or has fewer frames than needed (names the file).
        FileNotFoundError: the file is gone.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"{item.name}: no frame indices given")
    if min(indices) < 0 or max(indices) >= item.frames:
        raise ValueError(f"{item.name}: frame indices must be in 0..{item.frames - 1}, got {min(indices)}.."
                         f"{max(indices)}")
    if item.kind == "image" and indices != [0]:
        raise ValueError(f"{item.name}: an image gives one frame; use indices [0], got {indices}")
    if item.pixels is not None:
        frames = [_fit(item.pixels[i] * 255.0, bucket) for i in indices]
    elif item.path is None:
        raise ValueError(f"{item.source_id}: item has neither a file nor in-memory pixels")
    elif item.kind == "image":
        if not item.path.is_file():
            raise FileNotFoundError(f"image file not found: {item.path}")
        try:
            frames = [_fit(_load_image(item.path), bucket)]
        except (OSError, ValueError, SyntaxError) as exc:
            raise MediaError(f"{item.path}: image cannot be decoded: {exc}") from exc
    else:
        decoded = decode_frames(item.path, indices, transform=lambda rgb: _fit(rgb, bucket))
        frames = [decoded[i] for i in indices]
    return (torch.stack(frames, dim=1) / 127.5 - 1.0).clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------- audio

#: Waveform channels of a clip's sound: stereo (the LTX-2 audio VAE's mel input is stereo; ltx-trainer downmixes to
#: two channels too).
AUDIO_CHANNELS = 2

#: What a cacher does with a clip without sound where sound is needed: ``"error"`` refuses it (naming the file),
#: ``"silence"`` trains it with a silent track.
MISSING_AUDIO = ("error", "silence")

_AUDIO_FIXES = ("use clips with sound, remove these files from the dataset, set missing audio to 'silence' to train "
                "them with a silent track, or turn audio off")


def clip_fps(item: DatasetItem, spec: FrameSpec) -> float:
    """The frame rate a clip of ``item`` plays at (see the module notes): ``spec.target_fps``; with ``target_fps``
    None the item's own rate; the latent format's ``default_fps`` for items without a rate."""
    if spec.target_fps is not None:
        return float(spec.target_fps)
    if item.fps is not None:
        return float(item.fps)
    return float(spec.latent_format.default_fps)


def clip_audio_span(item: DatasetItem, indices: Sequence[int], spec: FrameSpec) -> tuple[float, float]:
    """``(start, duration)`` in seconds of the sound that goes with a clip: from the first selected source frame's
    timestamp ``indices[0] / item.fps`` (0 for images and items without a rate) for ``len(indices) / clip_fps``
    seconds.

    Raises:
        ValueError: empty ``indices``.
    """
    if not indices:
        raise ValueError(f"{item.name}: no frame indices given")
    start = indices[0] / item.fps if item.kind == "video" and item.fps else 0.0
    return start, len(indices) / clip_fps(item, spec)


def _audio_format(spec: FrameSpec):
    audio = spec.latent_format.audio
    if audio is None:
        raise ValueError(f"latent format {spec.latent_format.name!r} has no audio latents; turn audio off for this "
                         "model family")
    return audio


def _check_missing(missing: str) -> None:
    if missing not in MISSING_AUDIO:
        raise ValueError(f"missing audio must be one of {', '.join(repr(m) for m in MISSING_AUDIO)}, got {missing!r}")


def has_audio_track(item: DatasetItem) -> bool:
    """Whether an item has an audio stream: ``item.has_audio``, probed from the file when that is None."""
    if item.has_audio is not None:
        return item.has_audio
    return item.path is not None and item.kind == "video" and _has_audio(item.path)


def check_clip_audio(clips: Iterable[Clip], spec: FrameSpec, missing: str = "error") -> None:
    """Check, before anything is decoded or written, that clips can get their sound (see the module notes).

    Args:
        clips: from :func:`plan_clips`.
        spec: the frame spec the clips were planned with (its latent format must have audio).
        missing: ``"error"`` or ``"silence"`` (:data:`MISSING_AUDIO`).

    Raises:
        NoAudioError: with ``"error"``, the items without an audio stream (images and in-memory frames included);
            the message lists them (up to 10) and the fixes.
        ValueError: a format without audio, ``uniform`` selection (the sound cannot follow sped-up motion), or an
            unknown ``missing``.
    """
    _audio_format(spec)
    _check_missing(missing)
    if spec.mode == "uniform":
        raise ValueError("frame selection 'uniform' spreads a clip over the whole video, so its motion plays faster "
                         "than its sound; with audio use 'head' or 'chunks'")
    if missing == "silence":
        return
    silent: dict[str, None] = {}
    for clip in clips:
        if clip.item.name not in silent and not has_audio_track(clip.item):
            silent[clip.item.name] = None
    if silent:
        names = list(silent)
        listed = "\n".join(f"  - {name}" for name in names[:10]) + (f"\n  … and {len(names) - 10} more"
                                                                      if len(names) > 10 else "")
        raise NoAudioError(f"{len(names)} training items have no audio track, which audio+video training needs:\n"
                           f"{listed}\n{_AUDIO_FIXES}", files=names)


def load_clip_audio(item: DatasetItem, indices: Sequence[int], spec: FrameSpec, *, missing: str = "error",
                    channels: int = AUDIO_CHANNELS) -> Tensor:
    """Decode the sound of a clip (the span of :func:`clip_audio_span`), as the family's audio VAE takes it.

    Args:
        item: the clip's item. indices: its source frame indices (from :func:`frame_indices`).
        spec: the frame spec; its latent format's ``audio.sample_rate`` is the output rate.
        missing: ``"silence"`` returns zeros for an item without an audio stream; ``"error"`` raises.
        channels: output channels (stereo by default; 5.1 is downmixed with the ITU weights, mono duplicated).

    Returns:
        ``[channels, round(duration · sample_rate)]`` float32 in -1..1 on CPU; past the end of the track, silence.

    Raises:
        NoAudioError: no audio stream and ``missing="error"`` (names the file and the fixes).
        MediaError: the audio track cannot be decoded (corrupt or truncated; the message names the file), or the clip
            starts after the track ends.
        FileNotFoundError: the file is gone.
        ValueError: a format without audio, an unknown ``missing``, empty ``indices``.
    """
    audio = _audio_format(spec)
    _check_missing(missing)
    start, duration = clip_audio_span(item, indices, spec)
    wave = None
    if item.path is not None and item.kind == "video" and item.has_audio is not False:
        wave = read_audio(item.path, sample_rate=audio.sample_rate, channels=channels, start=start,
                          duration=duration, allow_missing=True)
    if wave is None:
        if missing == "error":
            raise NoAudioError(f"{item.name} has no audio track, which audio+video training needs; {_AUDIO_FIXES}",
                               files=[item.name])
        wave = torch.zeros(channels, round(duration * audio.sample_rate))
    return wave
