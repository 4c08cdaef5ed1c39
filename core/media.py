"""Video file I/O with PyAV: H.264 mp4 writing, decoding to uint8 frames, probing.

Frames are ComfyUI IMAGE layout ``[F, H, W, 3]`` (RGB, channels last).

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
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from torch import Tensor

__all__ = ["MediaError", "H264_ENCODERS", "write_video", "read_video", "probe_video"]

H264_ENCODERS = ("libx264", "libopenh264", "h264_nvenc", "h264_qsv", "h264_amf", "h264_videotoolbox", "h264_mf")


class MediaError(ValueError):
    """A video file cannot be read or written; the message names the file and the reason."""


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


def write_video(frames: Tensor, path: str | os.PathLike, *, fps: float = 24.0, crf: int = 19) -> Path:
    """Write frames as an H.264 (yuv420p) ``.mp4``, atomically.

    Args:
        frames: ``[F, H, W, 3]`` RGB, float in 0..1 (values outside are clipped, NaN becomes 0)
            or uint8; a single ``[H, W, 3]`` frame is accepted.
        path: destination ending in ``.mp4``; parent folders are created.
        fps: frames per second > 0; stored as a rational with denominator ≤ 1001 (24, 25, 30000/1001, ...).
        crf: libx264 constant rate factor 0..51 (lower = better; 19 is visually near-lossless).

    Returns:
        ``path`` as a :class:`~pathlib.Path`. The video is written to a temporary file in the same
        folder and renamed over ``path``, so readers never see a half-written file.

    Raises:
        MediaError: bad frames, fps, crf or extension, no H.264 encoder, or an encoding failure.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise MediaError(f"{path}: video files are written as mp4; use a path ending in .mp4")
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"fps must be a finite number > 0, got {fps}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise MediaError(f"crf must be an integer 0..51 (lower is better quality), got {crf!r}")
    data = _to_uint8_frames(frames)
    _, height, width, _ = data.shape
    pad_h, pad_w = height % 2, width % 2
    rate = Fraction(fps).limit_denominator(1001)
    encoder = _h264_encoder()

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4.tmp", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(encoder, rate=rate, options=_encoder_options(encoder, crf))
            stream.width, stream.height = width + pad_w, height + pad_h
            stream.pix_fmt = "yuv420p"
            ctx = stream.codec_context
            ctx.time_base = 1 / rate
            ctx.colorspace = Colorspace.ITU709
            ctx.color_range = ColorRange.MPEG
            ctx.color_primaries = ColorPrimaries.BT709
            ctx.color_trc = ColorTrc.BT709
            for index in range(data.shape[0]):
                rgb = data[index].numpy()
                if pad_h or pad_w:
                    rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709,
                                       dst_color_range=ColorRange.MPEG)
                frame.pts = index
                frame.time_base = ctx.time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, path)
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: encoding with {encoder} failed: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        return av.open(str(path), mode="r")
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: not a readable video file (truncated, corrupt or unsupported format): "
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
