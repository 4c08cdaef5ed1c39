"""Training clips: frame selection with fps resampling, aspect buckets, and decoding a clip's frames to a bucket.

Decisions (the model's facts — frame rule ``temporal_factor·k + 1``, default frame rate, pixel size multiple —
come from its latent format; nothing here is specific to one model):

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
- **A dataset's own extraction** (:class:`~cinetune.training.items.FrameExtraction`, musubi-tuner's ``head`` /
  ``chunk`` / ``slide`` / ``uniform`` / ``full``), when its items carry one, replaces the frame spec's count and
  selection for those items; the frame spec still gives the fps resampling and the latent format. Its counts must
  fit the format's frame rule: :func:`check_extraction` refuses the others (naming the nearest valid counts) before
  any clip is planned; ``full`` cuts each video down to the longest valid count, as musubi-tuner does.
- **Buckets** have about the same area as ``base_resolution²``: for each short side ``s`` (a multiple
  of ``step``) the long side is the multiple of ``step`` nearest to ``area / s`` in log-area (ties to
  the smaller), and every landscape bucket has its portrait twin. An item goes to the bucket with the
  nearest aspect ratio in log scale. Without upscaling, an item smaller than that bucket gets the
  largest bucket of (nearly) the same aspect that fits inside it, which is not in the list; an item
  smaller than ``step`` in either side raises :class:`NoBucketError`.
- **Resizing**: crop the centre to the bucket's aspect, then resize to the bucket with antialiased
  bicubic interpolation (torch), clamped to 0..255 — the same as "resize to cover, centre-crop".
- **Video orientation** metadata and non-square pixels are not applied (the same frames
  :func:`~cinetune.core.media.read_video` returns); EXIF orientation of photos is applied; image
  alpha is composited over white.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from ..core.family import LatentFormat
from ..core.media import MediaError, decode_frames
from .items import Dataset, DatasetError, DatasetItem, DatasetProblem, FrameExtraction

__all__ = [
    "TooShortError", "NoBucketError", "FrameSpec", "check_extraction", "frame_indices", "Clip", "plan_clips", "Bucket",
    "make_buckets", "assign_bucket", "load_clip",
]


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


def check_extraction(extraction: FrameExtraction, latent_format: LatentFormat) -> None:
    """Check a dataset's frame extraction against a model family's frame rule.

    Raises:
        ValueError: a ``target_frames`` count the format cannot encode; the message names the extraction, the rule
            and the nearest valid counts (``full`` has no counts to check: it cuts each video to a valid count).
        TypeError: ``extraction`` is not a :class:`~cinetune.training.items.FrameExtraction`.
    """
    if not isinstance(extraction, FrameExtraction):
        raise TypeError(f"extraction must be a FrameExtraction, got {type(extraction).__name__}")
    if extraction.mode == "full":
        return
    fmt = latent_format
    bad = [n for n in extraction.target_frames if not fmt.valid_frames(n)]
    if bad:
        fixes = "; ".join("{} → {} or {}".format(n, *fmt.nearest_frames(n)) for n in bad)
        raise ValueError(f"the dataset's frame extraction ({extraction.describe()}) asks for "
                         f"{', '.join(map(str, bad))} frames, but this model family needs {fmt.frame_rule} frames "
                         f"(the VAE packs {fmt.temporal_factor} frames per latent after the first): use {fixes} in "
                         "the Dataset Folder's target_frames")


def _too_short(source_frames: int, source_fps: float | None, available: int, needed: int,
               spec: FrameSpec) -> TooShortError:
    largest = spec.latent_format.nearest_frames(available)[0]
    rate = ""
    if source_fps is not None and spec.target_fps is not None:
        rate = (f" at {spec.target_fps:g} fps ({source_frames} source frames at {source_fps:g} fps, "
                f"{source_frames / source_fps:.2f} s)")
    return TooShortError(f"too short: a clip needs {needed} frames but only {available} are available{rate}; use "
                         f"target_frames ≤ {largest} or a longer video",
                         needed=needed, available=available, largest_valid=largest)


def _extraction_windows(n: int, extraction: FrameExtraction, spec: FrameSpec) -> list[tuple[int, int]]:
    """``(start, length)`` of the clips a dataset's extraction takes from ``n`` resampled frames, in order (by
    length, then start); see :class:`~cinetune.training.items.FrameExtraction`."""
    if extraction.mode == "full":
        return [(0, spec.latent_format.nearest_frames(min(n, extraction.max_frames))[0])]
    windows: list[tuple[int, int]] = []
    for t in extraction.target_frames or (spec.target_frames,):
        if t > n:
            continue
        if extraction.mode == "head":
            starts: Sequence[int] = [0]
        elif extraction.mode == "chunk":
            starts = range(0, n - t + 1, t)
        elif extraction.mode == "slide":
            starts = range(0, n - t + 1, extraction.frame_stride)
        else:
            samples = extraction.frame_sample
            starts = [0] if samples == 1 else sorted({j * (n - t) // (samples - 1) for j in range(samples)})
        windows += [(start, t) for start in starts]
    return windows


def frame_indices(source_frames: int, source_fps: float | None, spec: FrameSpec,
                  extraction: FrameExtraction | None = None) -> list[list[int]]:
    """Source frame indices of the training clips one video gives.

    First the video is resampled to ``spec.target_fps`` (module notes: nearest source frame to each
    target timestamp; no resampling when either fps is None), then clips are selected. Without ``extraction``,
    by ``spec.mode``:

    - ``head``: one clip, the first ``target_frames`` resampled frames.
    - ``uniform``: one clip whose ``target_frames`` frames are spread evenly over all resampled frames,
      first and last included (position ``floor(j·(n−1)/(T−1) + 1/2)``).
    - ``chunks``: clips starting at 0, stride, 2·stride, … while a whole clip fits.

    With ``extraction`` (a dataset's own, musubi-tuner's modes), its clips of consecutive resampled frames
    (:class:`~cinetune.training.items.FrameExtraction`; ``spec.target_frames`` stands in for empty
    ``target_frames``).

    Args:
        source_frames: frames in the source (≥ 1).
        source_fps: source frame rate, or None (images, unknown rate).
        spec: the :class:`FrameSpec`.
        extraction: the item's dataset extraction, or None.

    Returns:
        A list of clips, each a list of source frame indices, ascending (repeats possible when upsampling); each
        clip has ``spec.target_frames`` indices without ``extraction``, a count valid for the latent format with it.

    Raises:
        TooShortError: fewer resampled frames than ``target_frames`` (with ``extraction``: than its shortest
            count); the message gives the frames available and the largest valid count.
        ValueError: ``source_frames`` < 1, a non-positive ``source_fps``, or an extraction count the latent format
            cannot encode (:func:`check_extraction`).
    """
    if isinstance(source_frames, bool) or not isinstance(source_frames, int) or source_frames < 1:
        raise ValueError(f"source_frames must be an integer ≥ 1, got {source_frames!r}")
    if source_fps is not None and not (math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"source_fps must be a finite number > 0 or None, got {source_fps!r}")
    timeline = _resampled(source_frames, source_fps, spec.target_fps)
    n = len(timeline)
    if extraction is not None:
        check_extraction(extraction, spec.latent_format)
        windows = _extraction_windows(n, extraction, spec)
        if not windows:
            shortest = (extraction.target_frames or (spec.target_frames,))[0]
            raise _too_short(source_frames, source_fps, n, shortest, spec)
        return [timeline[start:start + t] for start, t in windows]
    t = spec.target_frames
    if n < t:
        raise _too_short(source_frames, source_fps, n, t, spec)
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
    """Apply :func:`frame_indices` to every video of a dataset (with the item's own extraction where it has one);
    images give one single-frame clip.

    Returns:
        ``(clips, problems)``: clips in item order (a video in ``chunks`` mode, or with an extraction, may give
        several); problems for videos too short for any clip (naming the file and the longest clip it allows).
        ``dataset.problems`` is not repeated.

    Raises:
        ValueError: an item's extraction asks for a frame count the latent format cannot encode (checked before any
            clip is planned; :func:`check_extraction`).
        DatasetError: no clip at all (the message lists the too-short files).
    """
    for extraction in {item.extraction: None for item in dataset.items if item.extraction is not None}:
        check_extraction(extraction, spec.latent_format)
    clips, problems = [], []
    for item in dataset.items:
        if item.kind == "image":
            clips.append(Clip(item, [0]))
            continue
        try:
            clips += [Clip(item, indices) for indices in frame_indices(item.frames, item.fps, spec, item.extraction)]
        except TooShortError as exc:
            problems.append(DatasetProblem(item.path, str(exc) if item.path else f"{item.source_id}: {exc}"))
    if not clips:
        wanted = f"{spec.target_frames} frames"
        if any(item.extraction is not None for item in dataset.items):
            wanted = "the clips its frame extraction asks for"
        raise DatasetError(f"no video is long enough for {wanted}:\n" + "\n".join(f"  - {p}" for p in problems))
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
        item: from :func:`~cinetune.training.data.scan_folder` or :func:`~cinetune.training.data.from_tensors`.
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
