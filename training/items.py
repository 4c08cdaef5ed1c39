"""The items of a training dataset, the frame extraction a dataset may carry, and the error every dataset problem
derives from.

:mod:`cinetune.training.data` builds them (folder scans, in-memory frames, combined datasets),
:mod:`cinetune.training.frames` turns them into clips and :mod:`cinetune.training.clip_audio` gives a clip its sound;
see :mod:`cinetune.training.data` for the decisions.

**Frame extraction per dataset** (:class:`FrameExtraction`) follows musubi-tuner's video dataset settings
(``docs/dataset_config.md`` and ``src/musubi_tuner/dataset/image_video_dataset.py`` in kohya-ss/musubi-tuner):
``frame_extraction`` ``head`` | ``chunk`` | ``slide`` | ``uniform`` | ``full`` with ``target_frames``,
``frame_stride``, ``frame_sample`` and ``max_frames``, same names, same defaults. Each extracted clip is its own
training sample. The clips themselves are computed by :func:`cinetune.training.frames.frame_indices`, which also
checks the frame counts against the model family's rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import Tensor

__all__ = ["DatasetError", "DatasetItem", "DatasetProblem", "Dataset", "EXTRACTION_MODES", "DEFAULT_MAX_FRAMES",
           "FrameExtraction", "parse_target_frames", "counted"]


class DatasetError(ValueError):
    """The dataset as a whole cannot be used (no folder, no media, nothing usable); the message says why."""


# ---------------------------------------------------------------------------------------------- frame extraction


#: musubi-tuner's ``frame_extraction`` values.
EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")

#: musubi-tuner's default ``max_frames`` (``full`` extraction).
DEFAULT_MAX_FRAMES = 129

_SEPARATORS = re.compile(r"[,;\s]+")


def parse_target_frames(text: str) -> tuple[int, ...]:
    """Frame counts written as text, e.g. ``"1, 25, 45"`` (separated by commas, semicolons or spaces; brackets as
    in a musubi-tuner TOML list are allowed).

    Returns:
        The counts, sorted ascending without repeats; ``()`` for empty text.

    Raises:
        ValueError: a part that is not a whole number ≥ 1 (the message names it).
    """
    if not isinstance(text, str):
        raise ValueError(f"target_frames must be text such as '1, 25, 45', got {type(text).__name__}")
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    counts = set()
    for part in _SEPARATORS.split(body.strip()):
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"target_frames: {part!r} is not a whole number of frames ≥ 1; write the counts "
                             "separated by commas, e.g. '1, 25, 45'")
        counts.add(int(part))
    return tuple(sorted(counts))


def _count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number ≥ {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class FrameExtraction:
    """How a dataset cuts its videos into training clips (musubi-tuner's video dataset settings).

    The clips are taken from the video's frames after fps resampling (the cacher's frame rate, as musubi-tuner
    extracts after its ``source_fps`` conversion); ``n`` below is that frame count. For each count ``t`` in
    ``target_frames`` that fits (``t ≤ n``; longer counts are skipped for that video):

    - ``head``: the first ``t`` frames.
    - ``chunk``: consecutive clips of ``t`` frames starting at 0, t, 2t, … while a whole clip fits (no overlap;
      with ``t = 1`` every frame becomes a clip, as musubi-tuner warns).
    - ``slide``: clips of ``t`` frames starting at 0, ``frame_stride``, 2·``frame_stride``, … while a whole clip fits.
    - ``uniform``: ``frame_sample`` clips of ``t`` consecutive frames whose starts are spread evenly from the first
      frame to the last possible start: ``floor(j·(n − t)/(frame_sample − 1))``, j = 0 … frame_sample − 1 (the values
      ``numpy.linspace(0, n − t, frame_sample, dtype=int)`` gives in musubi-tuner; equal starts give one clip;
      ``frame_sample = 1`` is ``head``). Unlike the cachers' own ``uniform`` selection, each clip plays in real time.
    - ``full``: one clip from the start, the whole video up to ``max_frames`` frames, cut down to the longest count
      the model family's frame rule allows (``target_frames`` is not used).

    Images are one-frame clips whatever the extraction.

    Attributes:
        mode: one of :data:`EXTRACTION_MODES`.
        target_frames: frame counts per clip, sorted without repeats (any order and repeats are accepted);
            ``()`` = the cacher's frame count. Each must fit the model family's frame rule (K5 ``4k+1``, LTX-2
            ``8k+1``): a count that does not is refused when caching, naming the nearest valid ones (musubi-tuner
            rounds it down instead; a refusal cannot silently train other clip lengths than the ones asked for).
        frame_stride: ``slide`` only: start-to-start distance in frames (≥ 1).
        frame_sample: ``uniform`` only: clips per video and frame count (≥ 1).
        max_frames: ``full`` only: the longest clip in frames (≥ 1), before the frame rule cuts it down.

    Raises:
        ValueError: an unknown mode, or a count or setting that is not a whole number ≥ 1 (the message names it).
    """

    mode: Literal["head", "chunk", "slide", "uniform", "full"]
    target_frames: tuple[int, ...] = ()
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = DEFAULT_MAX_FRAMES

    def __post_init__(self) -> None:
        if self.mode not in EXTRACTION_MODES:
            raise ValueError(f"frame_extraction must be one of {', '.join(EXTRACTION_MODES)}, got {self.mode!r}")
        frames = (self.target_frames,) if isinstance(self.target_frames, int) else tuple(self.target_frames)
        for n in frames:
            _count("each of target_frames", n)
        object.__setattr__(self, "target_frames", tuple(sorted(set(frames))))
        _count("frame_stride", self.frame_stride)
        _count("frame_sample", self.frame_sample)
        _count("max_frames", self.max_frames)

    def as_dict(self) -> dict:
        """The settings as plain values (musubi-tuner's names), for fingerprints and manifests."""
        return {"frame_extraction": self.mode, "target_frames": list(self.target_frames),
                "frame_stride": self.frame_stride, "frame_sample": self.frame_sample, "max_frames": self.max_frames}

    def describe(self) -> str:
        """The settings that matter for the mode, as text for messages, e.g. ``"slide, target_frames 9, 17,
        frame_stride 10"``."""
        if self.mode == "full":
            return f"full, max_frames {self.max_frames}"
        counts = ", ".join(map(str, self.target_frames)) or "the cacher's frames"
        extra = {"slide": f", frame_stride {self.frame_stride}",
                 "uniform": f", frame_sample {self.frame_sample}"}.get(self.mode, "")
        return f"{self.mode}, target_frames {counts}{extra}"


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
        has_audio: the file has an audio stream (found by :func:`~cinetune.training.data.scan_folder`); False for images and in-memory
            frames; None = not known (probed when audio is needed).
        extraction: the frame extraction of the item's dataset (:class:`FrameExtraction`); None = the cacher's
            frame count and selection.
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
    extraction: FrameExtraction | None = None

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


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number it takes: ``counted(1, "video")`` → ``"1 video"``, ``counted(2, "video")``
    → ``"2 videos"`` (``plural`` when adding "s" is wrong)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


@dataclass
class Dataset:
    """Usable items plus the problems found while building them.

    Attributes:
        items: usable items in a stable order (sorted by ``source_id`` for scanned folders).
        problems: files left out, each with the fix.
        trigger_word: the trigger word prepended to the captions ("" if none), recorded in LoRA metadata; a
            combined dataset lists its datasets' different trigger words separated by ", ".
        root: the scanned folder (None for in-memory and combined datasets); its name labels the items of a
            combined dataset.
    """

    items: list[DatasetItem]
    problems: list[DatasetProblem] = field(default_factory=list)
    trigger_word: str = ""
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """What the dataset holds, as the Dataset Folder node shows it: a first line such as ``"3 items (1 video,
        2 images), 0 problems"`` (``"2 videos, 1 with sound"`` where videos have sound), one line per frame
        extraction the items carry, then one line per problem (the file and the fix)."""
        videos = [item for item in self.items if item.kind == "video"]
        images = len(self.items) - len(videos)
        sound = sum(bool(item.has_audio) for item in videos)
        kinds = [counted(len(videos), "video"), *([f"{sound} with sound"] if sound else []), counted(images, "image")]
        lines = [f"{counted(len(self.items), 'item')} ({', '.join(kinds)}), {counted(len(self.problems), 'problem')}"]
        extractions = dict.fromkeys(item.extraction for item in self.items if item.extraction is not None)
        lines += [f"frame extraction: {extraction.describe()}" for extraction in extractions]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)
