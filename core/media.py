"""Video and audio file I/O with PyAV: H.264/AAC mp4 writing, decoding to uint8 frames or float waveforms, probing.

Frames are ComfyUI IMAGE layout ``[F, H, W, 3]`` (RGB, channels last); waveforms are ``[C, S]`` float32 in
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

Audio decisions:

- Decoding converts any sample format to float32 with PyAV; channel mixing (:func:`mix_channels`) and
  sample-rate conversion (:func:`resample`) are done in torch so that files and tensors go through the
  same code. Downmix to stereo uses the ITU-R BS.775 coefficients (front 1, centre and surround
  1/√2 ≈ −3 dB, LFE dropped), each output scaled by 1 / (sum of its weights) so that in-phase
  full-scale channels cannot clip (for 5.1: L = (FL + 0.7071·FC + 0.7071·BL) / 2.4142, the scaling the
  Lightricks/LTX-2 trainer uses, packages/ltx-trainer/scripts/process_videos.py). Mono is duplicated.
- :func:`resample` is band-limited interpolation with a Hann-windowed sinc (J. O. Smith, "Digital Audio
  Resampling", ccrma.stanford.edu/~jos/resample), with torchaudio's defaults (6 zero crossings,
  roll-off 0.99), so its output equals ``torchaudio.functional.resample``, which the official LTX-2
  preprocessing calls.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from torch import Tensor
from torch.nn import functional as F

from .checkpoint import atomic_path

__all__ = ["MediaError", "H264_ENCODERS", "AAC_SAMPLE_RATES", "write_video", "read_video", "probe_video",
           "read_audio", "probe_audio", "mix_channels", "resample"]

AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
AAC_BIT_RATE_PER_CHANNEL = 96_000
H264_ENCODERS = ("libx264", "libopenh264", "h264_nvenc", "h264_qsv", "h264_amf", "h264_videotoolbox", "h264_mf")


class MediaError(ValueError):
    """A media file or waveform cannot be read or written; the message names the file and the reason."""


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


# --------------------------------------------------------------------------------------------------- audio

_MIX_LEVEL = 1 / math.sqrt(2)  # ITU-R BS.775 centre and surround level in a stereo downmix (−3 dB)
# Channel order assumed for unlabelled waveforms (FFmpeg's and WAVE's default 5.1 and 7.1 layouts).
_DEFAULT_LAYOUTS = {6: ("FL", "FR", "FC", "LFE", "BL", "BR"), 8: ("FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR")}


def _stereo_weights(name: str) -> tuple[float, float]:
    """(left, right) weight of one FFmpeg channel name in a stereo downmix (ITU-R BS.775)."""
    if name in ("FL", "FR"):
        return (1.0, 0.0) if name == "FL" else (0.0, 1.0)
    if name.startswith("LFE"):
        return 0.0, 0.0
    if name.endswith("L"):  # BL, SL, TFL, WL, ... : left surround and height channels
        return _MIX_LEVEL, 0.0
    if name.endswith("R"):
        return 0.0, _MIX_LEVEL
    return _MIX_LEVEL, _MIX_LEVEL  # FC, BC, TC, FLC/FRC ...: centred


def mix_channels(waveform: Tensor, channels: int, names: Sequence[str] | None = None) -> Tensor:
    """Convert a waveform ``[..., C, S]`` to ``channels`` (1 or 2) channels.

    Mono → stereo duplicates the channel; stereo → mono averages L and R; more than two channels are
    downmixed to stereo with the ITU-R BS.775 coefficients (front 1, centre and surround 1/√2, LFE 0), each output
    divided by the sum of its weights so it cannot clip (then averaged when ``channels`` is 1).

    Args:
        waveform: float tensor ``[..., C, S]``, any device.
        channels: 1 or 2.
        names: FFmpeg channel names of the C input channels (``["FL", "FR", "FC", "LFE", "BL", "BR"]``); when
            None, 6 and 8 channels are taken as the default 5.1 / 7.1 orders and any other count > 2 is mixed
            with equal weights.

    Returns:
        ``[..., channels, S]`` in the input dtype (the input itself when C == channels).

    Raises:
        MediaError: 0 channels, ``channels`` not 1 or 2, or ``names`` of the wrong length.
    """
    if channels not in (1, 2):
        raise MediaError(f"channels must be 1 (mono) or 2 (stereo), got {channels!r}")
    if waveform.ndim < 2 or waveform.shape[-2] == 0:
        raise MediaError(f"audio has no channels: waveform shape {tuple(waveform.shape)}; expected [..., C, S] "
                         "with C ≥ 1")
    count = waveform.shape[-2]
    if names is not None and len(names) != count:
        raise MediaError(f"{len(names)} channel names given for {count} channels")
    if count == channels:
        return waveform
    if count == 1:
        return torch.cat([waveform, waveform], dim=-2)
    if count == 2:
        return waveform.mean(dim=-2, keepdim=True)
    names = names or _DEFAULT_LAYOUTS.get(count)
    if names is None:
        stereo = waveform.mean(dim=-2, keepdim=True).expand(*waveform.shape[:-2], 2, waveform.shape[-1])
    else:
        matrix = torch.tensor([_stereo_weights(n) for n in names], dtype=torch.float64).T  # [2, C]
        matrix = (matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1e-12)).to(waveform.device, waveform.dtype)
        stereo = torch.einsum("oc,...cs->...os", matrix, waveform)
    return stereo if channels == 2 else stereo.mean(dim=-2, keepdim=True)


def _check_rate(rate, what: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise MediaError(f"{what} must be a positive integer number of Hz, got {rate!r}")


@functools.lru_cache(maxsize=16)
def _sinc_kernel(up: int, down: int, zero_crossings: int, rolloff: float, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Polyphase Hann-windowed sinc filters ``[up, 1, K]`` and the input padding for the rate ratio up/down."""
    cutoff = min(up, down) * rolloff  # in units of the reduced rates
    width = math.ceil(zero_crossings * down / cutoff)
    taps = torch.arange(-width, width + down, dtype=dtype) / down
    phase = -torch.arange(up, dtype=dtype)[:, None] / up
    x = ((taps[None, :] + phase) * cutoff).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(x * math.pi / (2 * zero_crossings)) ** 2
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x))
    return (sinc * window * (cutoff / down))[:, None, :], width


def resample(waveform: Tensor, from_rate: int, to_rate: int, *, zero_crossings: int = 6,
             rolloff: float = 0.99) -> Tensor:
    """Change the sample rate of ``waveform [..., S]`` by band-limited (windowed-sinc) interpolation.

    The ratio is reduced by the greatest common divisor and each of the ``to/g`` output phases is one strided
    convolution (J. O. Smith, "Digital Audio Resampling"; Hann window, ``zero_crossings`` lobes each side,
    cut-off at ``rolloff`` × the lower Nyquist frequency). The defaults and the output length
    ``ceil(S · to / from)`` are those of ``torchaudio.functional.resample``, which the official LTX-2 audio
    preprocessing uses (Lightricks/LTX-2 packages/ltx-core/src/ltx_core/model/audio_vae/ops.py), so results agree
    with it to float rounding. The signal is zero outside ``[0, S)``.

    Args:
        waveform: float tensor ``[..., S]`` on any device, computed in its dtype. The filters are built in float32
            (float64 for float64 input), as torchaudio builds them, so float32 results match the official
            preprocessing rather than an exact filter (which differs by up to about 1e-5 relative).
        from_rate, to_rate: sample rates in Hz (positive integers).

    Returns:
        ``[..., ceil(S · to_rate / from_rate)]``, same dtype and device; the input itself when the rates are equal.

    Raises:
        MediaError: a rate is not a positive integer or the waveform is not floating point.
    """
    _check_rate(from_rate, "from_rate")
    _check_rate(to_rate, "to_rate")
    if not waveform.is_floating_point():
        raise MediaError(f"waveform must be floating point, got {waveform.dtype}")
    if from_rate == to_rate:
        return waveform
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g
    precision = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    kernel, width = _sinc_kernel(up, down, zero_crossings, float(rolloff), precision)
    length = waveform.shape[-1]
    flat = F.pad(waveform.reshape(-1, 1, length), (width, width + down))
    out = F.conv1d(flat, kernel.to(waveform.device, waveform.dtype), stride=down)  # [N, up, L']
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(up * length / down)]
    return out.reshape(*waveform.shape[:-1], out.shape[-1])


def _fit_length(waveform: Tensor, samples: int) -> Tensor:
    """Trim ``[..., S]`` to ``samples`` or pad it with silence."""
    if waveform.shape[-1] >= samples:
        return waveform[..., :samples]
    return F.pad(waveform, (0, samples - waveform.shape[-1]))


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


def fit_image(image: Tensor, width: int, height: int) -> Tensor:
    """Scale an image to cover ``width × height`` (aspect ratio kept) and centre-crop it: the conditioning image of
    image-to-video.

    Scaling is bilinear (antialiased when shrinking) to the smallest size that covers the target, then the centre
    ``width × height`` is kept — as kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` ``resize_video`` and
    Lightricks/LTX-2 ``ltx_pipelines/utils/media_io.py`` (resize to cover, centre crop) prepare start images.

    Args:
        image: ``[H, W, 3]`` or ``[B, H, W, 3]`` (the first image is used), float 0..1 (ComfyUI IMAGE) or uint8.
        width, height: target size in pixels, positive.

    Returns:
        ``[1, 3, 1, height, width]`` float32 on the CPU in [−1, 1] (``x/127.5 − 1``; the VAE's ``[B, C, T, H, W]``).

    Raises:
        ValueError: not a tensor, wrong rank, not 3 channels, empty image or a bad target size.
    """
    if not isinstance(image, Tensor):
        raise ValueError(f"the image must be a torch tensor (ComfyUI IMAGE), got {type(image).__name__}")
    if isinstance(width, bool) or isinstance(height, bool) or int(width) != width or int(height) != height \
            or width < 1 or height < 1:
        raise ValueError(f"target size must be positive whole pixels, got {width}×{height}")
    width, height = int(width), int(height)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"the image must be [H, W, 3] or [B, H, W, 3] (RGB, channels last), got shape "
                         f"{tuple(image.shape)}; drop an alpha channel with image[..., :3]")
    if 0 in image.shape:
        raise ValueError(f"the image is empty: shape {tuple(image.shape)}")
    pixels = image[:1].detach().cpu()
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    pixels = pixels.permute(0, 3, 1, 2)
    src_h, src_w = pixels.shape[-2:]
    scale = max(height / src_h, width / src_w)
    # max() guards against float rounding making the covering size one pixel short.
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    pixels = pixels[..., top:top + height, left:left + width].clamp(0.0, 1.0)
    return (pixels * 2.0 - 1.0)[:, :, None].contiguous()


def h264_round_trip(pixels: Tensor, crf: int) -> Tensor:
    """Encode one frame as H.264 at ``crf`` and decode it again: the compression artefacts a video frame has.

    LTX-2 conditions image-to-video on images passed through this round trip (CRF 33 in the official pipelines),
    so a sharp still looks like the first frame of a video the model was trained on (Lightricks/LTX-2
    ``ltx_pipelines/utils/media_io.py`` ``preprocess``; ComfyUI ``LTXVPreprocess``).

    Args:
        pixels: ``[1, 3, 1, H, W]`` float in [−1, 1] (as :func:`fit_image` returns), H and W even.
        crf: constant rate factor 0..51; 0 returns the input unchanged.

    Returns:
        The decoded frame, same shape, float32 in [−1, 1].

    Raises:
        MediaError: wrong shape, odd size, a CRF outside 0..51, or no H.264 encoder.
    """
    if not isinstance(pixels, Tensor) or pixels.ndim != 5 or pixels.shape[:3] != (1, 3, 1):
        raise MediaError(f"pixels must be [1, 3, 1, H, W], got {tuple(getattr(pixels, 'shape', ()))}")
    if isinstance(crf, bool) or int(crf) != crf or not 0 <= crf <= 51:
        raise MediaError(f"crf must be a whole number 0..51, got {crf!r}")
    if crf == 0:
        return pixels.float()
    height, width = pixels.shape[-2:]
    if height % 2 or width % 2:
        raise MediaError(f"H.264 (yuv420p) needs an even width and height, got {width}×{height}")
    frame = ((pixels[0, :, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    buffer = io.BytesIO()
    name = _h264_encoder()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=1, options=_encoder_options(name, int(crf)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")))
        container.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    out = torch.from_numpy(decoded).permute(2, 0, 1).float() / 127.5 - 1.0
    return out[None, :, None].contiguous()
