"""The latent cacher: every training clip of a dataset encoded by the VAE (and its sound by the audio VAE) into
``<cache_dir>/latents/``, and the clip planning it shares with :func:`~cinetune.training.cache.load_cached_dataset`.

See :mod:`cinetune.training.cache` for the cache as a whole and :mod:`cinetune.training.cache_store` for keys and
entry files.

- **Latents as the VAE returns them, float32.** A latent format with a scaling factor is stored unscaled (the
  official Kandinsky 5 trainer caches unscaled latents and scales them in the loop; musubi stores scaled ones —
  we do not); the trainer applies ``LatentFormat.to_model``. So entries equal ComfyUI ``LATENT`` samples.
  float32 keeps exactly what the VAE produced whatever dtype it ran in; the cost is small (a 121-frame 512×512
  clip is 8 MB with 16 channels). Every encoded latent is checked against ``LatentFormat.latent_shape``.
- **I2V**: "first" / "last" are the first / last frame of the clip encoded ALONE as one-frame videos, as the
  official I2V pipeline encodes its conditioning image (not latent frames sliced out of the clip, whose last
  latent frame mixes several frames). For a one-frame clip both equal "latent". (musubi's ``latents_image`` also
  holds first and last frame latents.)
- **Problems instead of failures**: too-short videos, items too small for any bucket and files that fail to
  decode are reported in :class:`CacheReport` (with the dataset's own scan problems, so one report lists every
  file left out) and the rest is cached. A clip that failed to decode gets a ``<key>.failed.json`` marker so
  :func:`~cinetune.training.cache.load_cached_dataset` leaves it out instead of reporting it missing; a later successful run removes it.
  Only when nothing at all can be cached is :class:`~cinetune.training.data.DatasetError` raised.
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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from ..core.checkpoint import save_file_atomic, write_json_atomic
from ..core.family import LatentFormat
from ..core.media import MediaError
from .cache_store import (
    _FAILED_SUFFIX,
    DEFAULT_LAYOUT,
    LATENT_DIR,
    CacheLayout,
    CacheReport,
    InterruptFn,
    ProgressFn,
    _is_complete,
    _item_identity,
    _latent_key,
    _listed,
    _Manifest,
    _metadata,
    _shape_of,
    _subfolder,
    _tick,
)
from .clip_audio import (
    AUDIO_CHANNELS,
    NoAudioError,
    check_clip_audio,
    clip_audio_span,
    clip_fps,
    has_audio_track,
    load_clip_audio,
)
from .frames import Bucket, Clip, FrameSpec, NoBucketError, assign_bucket, load_clip, make_buckets, plan_clips
from .items import Dataset, DatasetError, DatasetProblem

__all__ = ["VAELike", "AudioVAELike", "cache_latents"]


class VAELike(Protocol):
    """What :func:`cache_latents` needs: ``encode(video [B, 3, F, H, W] in [-1, 1])`` → latent
    ``[B, C, F', H', W']`` of the frame spec's latent format (the VAE wrapper of a model family)."""

    def encode(self, video: Tensor) -> Tensor: ...


class AudioVAELike(Protocol):
    """What :func:`cache_latents` needs for sound: ``encode(waveform [B, C, S], sample_rate)`` → latent
    ``[B, C_a, T, M]`` of the latent format's ``audio`` geometry (the family's audio VAE wrapper)."""

    def encode(self, waveform: Tensor, sample_rate: int) -> Tensor: ...


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
        vae_id: from :func:`~cinetune.training.cache_store.encoder_identity` or :func:`~cinetune.training.cache_store.weights_identity` for the VAE weights, dtype and any setting
            that changes latents (tiling); with sound, the audio VAE's too.
        frame_spec: frames per clip, selection mode, fps and the latent format (``FrameSpec``).
        base_resolution: bucket area ≈ ``base_resolution²`` pixels (or ``(width, height)``).
        bucket_step: bucket sides are multiples of this; None = the latent format's ``size_multiple`` (a coarser
            grid, e.g. for sparse attention, must be a multiple of it).
        allow_upscale: enlarge items smaller than their bucket (otherwise a smaller bucket of the same aspect).
        i2v: also cache the first/last frame latents for image-to-video training (only in layouts with
            ``i2v_frames``; otherwise ignored).
        progress: called as ``progress(0, total)`` before the first clip and ``progress(done, total)`` after each
            (total = clips with a bucket).
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
    if progress is not None:
        progress(0, len(jobs))
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
    return CacheReport(written, skipped, problems, Path(cache_dir), paths, kind="latent")


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
    if item.extraction is not None:
        info["extraction"] = item.extraction.as_dict()
    if s.audio:
        info["audio_shape"] = list(_shape_of(path, "audio"))
    manifest.add(job.key, info)
