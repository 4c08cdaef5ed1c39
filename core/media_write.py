"""Writing video files with PyAV: H.264 mp4 from RGB frames, with an optional AAC sound track.

Frames are ComfyUI IMAGE layout ``[F, H, W, 3]`` (RGB, channels last); waveforms are ``[C, S]`` float in
-1..1 (channels first, as ComfyUI AUDIO's ``waveform[i]``).

Encoding decisions:

- Codec: H.264, yuv420p, mp4 container with the index at the front (``movflags=+faststart``)
  so browsers can start playing before the download ends. The encoder is ``libx264`` when the
  installed PyAV/FFmpeg build has it (PyPI wheels do); otherwise the first H.264 encoder in
  :data:`H264_ENCODERS` that actually opens on this machine (hardware encoders are listed by
  FFmpeg even without the hardware, so each candidate is test-opened once).
  ``crf`` is honoured by libx264 (and mapped to ``cq`` for NVENC); other encoders use their
  default rate control.
- Colour: RGB → BT.709 limited-range YUV, tagged as BT.709 in the stream, the convention for
  HD video; decoding converts with the colourspace found in the file.
- yuv420p needs even width and height: an odd size is padded by one row/column repeating the
  last one (nothing is cropped away), so the file may be 1 px larger than the frames.
- Audio: FFmpeg's native ``aac`` encoder (LC profile, in every FFmpeg build), 96 kb/s per channel,
  mono or stereo, muxed interleaved with the video. The track is trimmed or padded with silence to
  the video's duration (``round(frames / fps * rate)`` samples), so players show one length.
- Every file is written through :func:`cinetune.core.checkpoint.atomic_path`: it appears complete or not at all.
"""

from __future__ import annotations

import functools
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from torch import Tensor

from .checkpoint import atomic_path
from .media_errors import MediaError
from .media_waveform import _check_rate, _fit_length, mix_channels, resample

AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
AAC_BIT_RATE_PER_CHANNEL = 96_000
H264_ENCODERS = ("libx264", "libopenh264", "h264_nvenc", "h264_qsv", "h264_amf", "h264_videotoolbox", "h264_mf")


@functools.lru_cache(maxsize=None)
def _encoder_works(name: str) -> bool:
    try:
        ctx = av.codec.CodecContext.create(name, "w")
        ctx.width, ctx.height, ctx.pix_fmt = 64, 64, "yuv420p"
        ctx.time_base = Fraction(1, 24)
        ctx.open()
        return True
    except Exception:  # unknown codec or hardware/driver missing: try the next candidate
        return False


def _h264_encoder() -> str:
    for name in H264_ENCODERS:
        if name in av.codecs_available and _encoder_works(name):
            return name
    raise MediaError("no working H.264 encoder in this PyAV/FFmpeg build (tried "
                     f"{', '.join(H264_ENCODERS)}); install the PyPI 'av' wheel, which includes libx264")


def _encoder_options(name: str, crf: int) -> dict[str, str]:
    if name == "libx264":
        return {"crf": str(crf), "preset": "medium"}
    if name == "h264_nvenc":
        return {"rc": "vbr", "cq": str(crf)}
    return {}


def _to_uint8_frames(frames) -> Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, Tensor):
        raise MediaError(f"frames must be a tensor [F, H, W, 3], got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"frames must be [F, H, W, 3] (RGB, channels last, ComfyUI IMAGE), got shape "
                         f"{tuple(frames.shape)}")
    if 0 in frames.shape:
        raise MediaError(f"no frames to write: shape {tuple(frames.shape)}")
    frames = frames.detach().cpu()
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise MediaError(f"frames must be float in 0..1 or uint8, got dtype {frames.dtype}")
    return (frames.float().nan_to_num(0.0).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _prepare_track(audio, sample_rate, video_seconds: Fraction) -> tuple[np.ndarray, int]:
    """Check a waveform for muxing; return ``([C, S] float32 in -1..1, rate)``, C ∈ {1, 2}, S = the video's length."""
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(audio)
    if not isinstance(audio, Tensor):
        raise MediaError(f"audio must be a tensor [channels, samples], got {type(audio).__name__}")
    if audio.ndim == 3 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.ndim != 2:
        raise MediaError(f"audio must be [channels, samples] (one clip, channels first), got shape "
                         f"{tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise MediaError(f"audio must be a float waveform in -1..1, got dtype {audio.dtype}")
    _check_rate(sample_rate, "audio_sample_rate")
    audio = audio.detach().cpu().float().nan_to_num(0.0)
    audio = mix_channels(audio, 1 if audio.shape[0] == 1 else 2)
    if sample_rate not in AAC_SAMPLE_RATES:
        # AAC stores only a fixed set of rates; 48 kHz is the usual rate of video sound
        audio, sample_rate = resample(audio, sample_rate, 48000), 48000
    audio = _fit_length(audio, round(video_seconds * sample_rate))
    return np.ascontiguousarray(audio.clamp(-1.0, 1.0).numpy()), sample_rate


def write_video(frames: Tensor, path: str | os.PathLike, *, fps: float = 24.0, crf: int = 19,
                audio: Tensor | None = None, audio_sample_rate: int | None = None) -> Path:
    """Write frames as an H.264 (yuv420p) ``.mp4``, with an optional AAC sound track, atomically.

    Args:
        frames: ``[F, H, W, 3]`` RGB, float in 0..1 (values outside are clipped, NaN becomes 0)
            or uint8; a single ``[H, W, 3]`` frame is accepted.
        path: destination ending in ``.mp4``; parent folders are created.
        fps: frames per second > 0; stored as a rational with denominator ≤ 1001 (24, 25, 30000/1001, ...).
        crf: libx264 constant rate factor 0..51 (lower = better; 19 is visually near-lossless).
        audio: optional waveform ``[C, S]`` (or ``[1, C, S]``), float, nominally -1..1 (clipped; NaN becomes 0).
            One channel is written as mono, two as stereo, more are downmixed to stereo (:func:`mix_channels`).
            The track is trimmed or padded with silence to the video's duration, ``round(F / fps · rate)``
            samples, so both streams end together (the AAC encoder rounds the last packet up to 1024 samples).
        audio_sample_rate: Hz of ``audio``, required with it. A rate AAC cannot store (see
            :data:`AAC_SAMPLE_RATES`) is resampled to 48 kHz.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. The video is written to a temporary file in the same
        folder and renamed over ``path`` (:func:`~cinetune.core.checkpoint.atomic_path`), so readers never see a
        half-written file and a failure leaves any previous file unchanged.

    Raises:
        MediaError: bad frames, audio, rates, fps, crf or extension, no H.264 encoder, or an encoding failure.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise MediaError(f"{path}: video files are written as mp4; use a path ending in .mp4")
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"fps must be a finite number > 0, got {fps}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise MediaError(f"crf must be an integer 0..51 (lower is better quality), got {crf!r}")
    if audio is None and audio_sample_rate is not None:
        raise MediaError("audio_sample_rate was given without audio; pass the waveform as audio=[channels, samples]")
    data = _to_uint8_frames(frames)
    num_frames, height, width, _ = data.shape
    pad_h, pad_w = height % 2, width % 2
    rate = Fraction(fps).limit_denominator(1001)
    track = None if audio is None else _prepare_track(audio, audio_sample_rate, num_frames / rate)
    encoder = _h264_encoder()

    try:
        with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4",
                                               options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(encoder, rate=rate, options=_encoder_options(encoder, crf))
            stream.width, stream.height = width + pad_w, height + pad_h
            stream.pix_fmt = "yuv420p"
            ctx = stream.codec_context
            ctx.time_base = 1 / rate
            ctx.colorspace = Colorspace.ITU709
            ctx.color_range = ColorRange.MPEG
            ctx.color_primaries = ColorPrimaries.BT709
            ctx.color_trc = ColorTrc.BT709
            sound = None if track is None else _AudioTrack(container, *track)
            for index in range(num_frames):
                rgb = data[index].numpy()
                if pad_h or pad_w:
                    rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709,
                                       dst_color_range=ColorRange.MPEG)
                frame.pts = index
                frame.time_base = ctx.time_base
                container.mux(stream.encode(frame))
                if sound is not None:
                    sound.write_until((index + 1) / rate)
            container.mux(stream.encode(None))
            if sound is not None:
                sound.finish()
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: encoding with {encoder} failed: {exc}") from exc
    return path


class _AudioTrack:
    """An AAC stream fed in step with the video, so the muxer can interleave the two."""

    def __init__(self, container, samples: np.ndarray, sample_rate: int):
        self.samples, self.rate, self.written = samples, sample_rate, 0
        self.layout = "mono" if samples.shape[0] == 1 else "stereo"
        self.container = container
        self.stream = container.add_stream("aac", rate=sample_rate, layout=self.layout)
        self.stream.bit_rate = AAC_BIT_RATE_PER_CHANNEL * samples.shape[0]

    def write_until(self, seconds: Fraction) -> None:
        end = min(round(seconds * self.rate), self.samples.shape[1])
        if end <= self.written:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(self.samples[:, self.written:end]), format="fltp",
                                           layout=self.layout)
        frame.sample_rate = self.rate
        frame.pts = self.written
        frame.time_base = Fraction(1, self.rate)
        self.container.mux(self.stream.encode(frame))
        self.written = end

    def finish(self) -> None:
        self.write_until(Fraction(self.samples.shape[1], self.rate))
        self.container.mux(self.stream.encode(None))
