"""Waveform processing in torch: channel mixing and band-limited sample-rate conversion.

Waveforms are ``[..., C, S]`` float tensors (channels, samples), as ComfyUI AUDIO's ``waveform``.

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
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .media_errors import MediaError


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
