"""A training clip's sound: which items have an audio track, a clip's frame rate and sound span, decoding it.

- **Audio tracks** (families with sound; the latent format's ``audio`` geometry gives the rate). ``scan_folder``
  records whether each video has an audio stream (``DatasetItem.has_audio``; images and in-memory frames have
  none). :func:`load_clip_audio` decodes a clip's span of the first audio stream with PyAV
  (:func:`~cinetune.core.media.read_audio`): downmixed to stereo (5.1 with the ITU weights, mono duplicated),
  resampled to the format's rate (16 kHz for LTX-2) and trimmed or padded with silence to exactly the clip's
  duration. The span starts at the first selected frame's timestamp (``index / source fps``) and lasts
  ``frames / clip fps``, as ltx-trainer trims the track to the clip's duration. The cachers' ``uniform`` selection
  plays the motion faster than real time, so no sound track can follow it: audio clips need ``head`` or ``chunks``
  (or a dataset's own frame extraction, whose clips are all consecutive frames).
- **Clip frame rate**: :func:`clip_fps` = the frame spec's target rate, or with ``target_fps=None`` the clip's own
  source rate (each clip keeps its own, as ltx-trainer stores each video's fps), and the format's ``default_fps``
  for images and frames without a rate (24 for LTX-2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..core.media import MediaError, probe_audio, read_audio
from .frames import Clip, FrameSpec
from .items import DatasetError, DatasetItem

__all__ = [
    "AUDIO_CHANNELS", "MISSING_AUDIO", "NoAudioError", "clip_fps", "clip_audio_span", "has_audio_track",
    "check_clip_audio", "load_clip_audio",
]


class NoAudioError(DatasetError):
    """Clips without an audio track where the training needs sound; the message lists the files and the fixes.

    Attributes:
        files: the names (paths or in-memory ids) of the items without sound.
    """

    def __init__(self, message: str, *, files: list[str]):
        super().__init__(message)
        self.files = files


#: Waveform channels of a clip's sound: stereo (the LTX-2 audio VAE's mel input is stereo; ltx-trainer downmixes to
#: two channels too).
AUDIO_CHANNELS = 2

#: What a cacher does with a clip without sound where sound is needed: ``"error"`` refuses it (naming the file),
#: ``"silence"`` trains it with a silent track.
MISSING_AUDIO = ("error", "silence")

_AUDIO_FIXES = ("use clips with sound, remove these files from the dataset, set missing audio to 'silence' to train "
                "them with a silent track, or turn audio off")


def _has_audio(path: Path) -> bool:
    """Whether a file has an audio stream (one whose header is damaged counts: decoding it reports the damage)."""
    try:
        return probe_audio(path) is not None
    except MediaError:
        return True


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
        clips: from :func:`~cinetune.training.frames.plan_clips`.
        spec: the frame spec the clips were planned with (its latent format must have audio).
        missing: ``"error"`` or ``"silence"`` (:data:`MISSING_AUDIO`).

    Raises:
        NoAudioError: with ``"error"``, the items without an audio stream (images and in-memory frames included);
            the message lists them (up to 10) and the fixes.
        ValueError: a format without audio, ``uniform`` selection of clips whose items carry no extraction of their
            own (the sound cannot follow sped-up motion), or an unknown ``missing``.
    """
    _audio_format(spec)
    _check_missing(missing)
    clips = list(clips)
    if spec.mode == "uniform" and any(clip.item.extraction is None for clip in clips):
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
        item: the clip's item. indices: its source frame indices (from :func:`~cinetune.training.frames.frame_indices`).
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
