"""The items of a training dataset, and the error every dataset problem derives from.

:mod:`cinetune.training.data` builds them (folder scans, in-memory frames), :mod:`cinetune.training.frames` turns
them into clips and :mod:`cinetune.training.clip_audio` gives a clip its sound; see :mod:`cinetune.training.data` for
the decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import Tensor

__all__ = ["DatasetError", "DatasetItem", "DatasetProblem", "Dataset"]


class DatasetError(ValueError):
    """The dataset as a whole cannot be used (no folder, no media, nothing usable); the message says why."""


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
