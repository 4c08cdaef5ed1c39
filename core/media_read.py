"""Reading media files with PyAV: video frames as RGB uint8, audio as float waveforms, stream descriptions.

Frames are ComfyUI IMAGE layout ``[F, H, W, 3]`` (RGB, channels last); waveforms are ``[C, S]`` float32 in
-1..1 (channels first, as ComfyUI AUDIO's ``waveform[i]``). Audio is converted to float32 by PyAV, then mixed
and resampled in torch (:mod:`cinetune.core.media_waveform`), so files and tensors go through the same code.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import av
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .media_errors import MediaError
from .media_waveform import _check_rate, _fit_length, mix_channels, resample


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise FileNotFoundError(f"media file not found: {path}")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: not a readable media file (truncated, corrupt or unsupported format): "
                         f"{exc}") from exc


def _video_stream(container, path: Path):
    if not container.streams.video:
        raise MediaError(f"{path}: contains no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _fps(stream, path: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise MediaError(f"{path}: the video stream has no frame rate")
    return float(rate)


def _decoded(container, stream, path: Path):
    """Yield ``(index, av.VideoFrame)`` in decode order, turning FFmpeg failures into :class:`MediaError`."""
    index = -1
    try:
        for index, frame in enumerate(container.decode(stream)):
            yield index, frame
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: decoding failed after {index + 1} frames (corrupt or truncated file): "
                         f"{exc}") from exc


def count_decodable_frames(path: str | os.PathLike) -> int:
    """Decode every frame of the first video stream (no colour conversion) and return how many decode.

    Raises:
        FileNotFoundError, MediaError: as :func:`read_video`.
    """
    path = Path(path)
    with _open(path) as container:
        return sum(1 for _ in _decoded(container, _video_stream(container, path), path))


def decode_frames(path: str | os.PathLike, indices, transform=None) -> dict[int, Tensor]:
    """Decode selected frames of the first video stream, stopping after the largest index.

    Only the wanted frames are converted to RGB (and passed through ``transform``), so memory holds the
    output, not the whole video.

    Args:
        indices: frame indices in decode order (duplicates allowed; each is decoded once).
        transform: optional ``f(frame [H, W, 3] uint8) -> Tensor`` applied to each wanted frame.

    Returns:
        ``{index: frame}``; frames are ``[H, W, 3]`` uint8 (RGB) unless ``transform`` maps them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MediaError: decoding fails, or the file has fewer frames than the largest index needs.
    """
    path = Path(path)
    wanted = set(int(i) for i in indices)
    if not wanted:
        return {}
    last = max(wanted)
    out: dict[int, Tensor] = {}
    decoded = 0
    with _open(path) as container:
        for index, frame in _decoded(container, _video_stream(container, path), path):
            decoded = index + 1
            if index in wanted:
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                out[index] = rgb if transform is None else transform(rgb)
            if index >= last:
                break
    if len(out) < len(wanted):
        raise MediaError(f"{path}: only {decoded} frames decode but frame {last} is needed; the file is "
                         "truncated or was changed after it was scanned")
    return out


def read_video(path: str | os.PathLike, *, max_frames: int | None = None) -> tuple[Tensor, float]:
    """Decode the first video stream of a file into RGB frames.

    Args:
        path: any container/codec the installed FFmpeg can decode (mp4, mkv, webm, ...).
        max_frames: decode at most this many frames from the start (≥ 1); None = all.

    Returns:
        ``(frames, fps)``: frames ``[F, H, W, 3]`` uint8 on CPU (RGB, converted with the colourspace
        stored in the file), fps as a float (the stream's average frame rate).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MediaError: the file is not a video, has no video stream, fails to decode, or is truncated
            (fewer frames decode than the container declares).
    """
    path = Path(path)
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                   or max_frames < 1):
        raise MediaError(f"max_frames must be an integer ≥ 1 or None, got {max_frames!r}")
    with _open(path) as container:
        stream = _video_stream(container, path)
        fps = _fps(stream, path)
        declared = stream.frames
        decoded: list[np.ndarray] = []
        for _, frame in _decoded(container, stream, path):
            decoded.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(decoded) >= max_frames:
                break
    wanted = declared if max_frames is None else min(declared, max_frames)
    if not decoded:
        raise MediaError(f"{path}: no video frames could be decoded (empty, corrupt or truncated file)")
    if declared and len(decoded) < wanted:
        raise MediaError(f"{path}: truncated or corrupt: the container declares {declared} frames but only "
                         f"{len(decoded)} could be decoded")
    return torch.from_numpy(np.stack(decoded)), fps


def probe_video(path: str | os.PathLike) -> dict:
    """Describe the first video stream of a file.

    Returns:
        ``{"frames": int, "width": int, "height": int, "fps": float, "codec": str}``; ``frames`` is
        the container's count, or, when the container does not store one (e.g. Matroska), the
        number of frames decoded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MediaError: not a readable video file or no video stream.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        count = stream.frames
        if not count:
            try:
                count = sum(1 for _ in container.decode(stream))
            except av.error.FFmpegError as exc:
                raise MediaError(f"{path}: decoding failed while counting frames: {exc}") from exc
        ctx = stream.codec_context
        return {"frames": int(count), "width": int(ctx.width), "height": int(ctx.height),
                "fps": _fps(stream, path), "codec": ctx.name}


def _audio_stream(container, path: Path, allow_missing: bool):
    if not container.streams.audio:
        if allow_missing:
            return None
        raise MediaError(f"{path}: contains no audio stream (a silent video?); use a file with sound, or pass "
                         "allow_missing=True to get None")
    stream = container.streams.audio[0]
    if not stream.codec_context.channels:
        raise MediaError(f"{path}: the audio stream has 0 channels; the file is damaged or not a usable audio file")
    if not stream.codec_context.sample_rate:
        raise MediaError(f"{path}: the audio stream has no sample rate; the file is damaged")
    return stream


def _decode_span(container, stream, path: Path, first: int, last: int | None) -> Tensor:
    """Decode samples ``[first, last)`` (native rate, ``last`` None = to the end) as float32 ``[C, n]``.

    Positions come from the packets' time stamps; samples before the stream's first one are silence.
    """
    rate = stream.codec_context.sample_rate
    if first > 0:
        container.seek(int(first / rate / stream.time_base), stream=stream, backward=True)
    to_float = av.AudioResampler(format="fltp")
    chunks: list[np.ndarray] = []
    begin = position = None
    try:
        for frame in container.decode(stream):
            if position is None:
                position = round(frame.pts * frame.time_base * rate) if frame.pts is not None else 0
                begin = position
            for converted in to_float.resample(frame):
                chunks.append(converted.to_ndarray())
                position += converted.samples
            if last is not None and position >= last:
                break
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: audio decoding failed after {0 if position is None else position} samples "
                         f"(corrupt or truncated file): {exc}") from exc
    channels = stream.codec_context.channels
    data = torch.from_numpy(np.concatenate(chunks, axis=1)) if chunks else torch.zeros(channels, 0)
    begin = first if begin is None else begin
    if begin > first:
        data = F.pad(data, (begin - first, 0))
    else:
        data = data[:, first - begin:]
    return data if last is None else data[:, : last - first]


def read_audio(path: str | os.PathLike, *, sample_rate: int, channels: int = 2, start: float = 0.0,
               duration: float | None = None, allow_missing: bool = False) -> Tensor | None:
    """Decode the first audio stream of a file into a float waveform at a chosen rate and channel count.

    Any format FFmpeg decodes (mp4/AAC, mkv, wav, flac, mp3, ogg, ...). Channels are converted with
    :func:`mix_channels` using the stream's channel names (5.1 → ITU stereo downmix, mono → duplicated), then
    resampled with :func:`resample`. A span is decoded with margins and cut after resampling, so
    ``read_audio(start=t, duration=d)`` equals the matching slice of the whole file's waveform.

    Args:
        path: the media file.
        sample_rate: output rate in Hz (positive integer).
        channels: 1 (mono) or 2 (stereo).
        start: seconds from the start of the stream's timeline (≥ 0).
        duration: seconds to return (> 0): the result has exactly ``round(duration · sample_rate)`` samples,
            padded with silence past the end of the stream. None = to the end of the stream.
        allow_missing: return None instead of raising when the file has no audio stream.

    Returns:
        ``[channels, S]`` float32 on CPU, clipped to -1..1; or None (no audio stream and ``allow_missing``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MediaError: unreadable file, no audio stream (unless ``allow_missing``), 0 channels, a bad argument,
            ``start`` at or past the end of the stream, or a decoding failure.
    """
    path = Path(path)
    _check_rate(sample_rate, "sample_rate")
    if channels not in (1, 2):
        raise MediaError(f"channels must be 1 (mono) or 2 (stereo), got {channels!r}")
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start >= 0):
        raise MediaError(f"start must be a number of seconds ≥ 0, got {start!r}")
    if duration is not None and not (isinstance(duration, (int, float)) and math.isfinite(duration)
                                     and duration > 0):
        raise MediaError(f"duration must be a number of seconds > 0 or None, got {duration!r}")
    with _open(path) as container:
        stream = _audio_stream(container, path, allow_missing)
        if stream is None:
            return None
        rate = stream.codec_context.sample_rate
        # a layout of unspecified order ("6 channels") names no positions: use the default order
        names = None if stream.layout.name.endswith("channels") else [c.name for c in stream.layout.channels]
        # Margins of a whole number of resampling periods keep the output grid aligned with the full file's.
        period = rate // math.gcd(rate, sample_rate)
        margin = period * math.ceil(2048 / period)
        first = round(start * rate)
        last = None if duration is None else math.ceil((start + duration) * rate) + margin
        data = _decode_span(container, stream, path, first - margin, last)
    if data.shape[1] <= margin:
        raise MediaError(f"{path}: start={start} s is at or past the end of the audio stream")
    wave = resample(mix_channels(data, channels, names if names and len(names) == data.shape[0] else None),
                    rate, sample_rate)
    wave = wave[:, margin * sample_rate // rate:]
    if duration is not None:
        wave = _fit_length(wave, round(duration * sample_rate))
    return wave.clamp(-1.0, 1.0).contiguous()


def probe_audio(path: str | os.PathLike) -> dict | None:
    """Describe the first audio stream of a file.

    Returns:
        ``{"sample_rate": int, "channels": int, "layout": str, "codec": str, "duration": float | None}``
        (duration in seconds from the stream, else the container, else None), or None when the file has no
        audio stream.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MediaError: not a readable media file, or its audio stream has 0 channels or no sample rate.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _audio_stream(container, path, allow_missing=True)
        if stream is None:
            return None
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = None
        ctx = stream.codec_context
        return {"sample_rate": int(ctx.sample_rate), "channels": int(ctx.channels), "layout": stream.layout.name,
                "codec": ctx.name, "duration": duration}
