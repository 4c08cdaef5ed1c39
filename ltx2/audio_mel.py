"""LTX-2 audio front end: waveform → log-mel spectrogram, the audio VAE's input.

The parameters of the official ``AudioProcessor`` (Lightricks/LTX-2
``packages/ltx-core/src/ltx_core/model/audio_vae/ops.py``, a ``torchaudio.transforms.MelSpectrogram``), computed in
torch without torchaudio; see :mod:`cinetune.ltx2.audio` for the whole audio pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.media_waveform import mix_channels, resample

#: Log-mel floor: ``log(max(mel, MEL_FLOOR))`` (official ``AudioProcessor.waveform_to_mel``).
MEL_FLOOR = 1e-5


@dataclass(frozen=True)
class MelConfig:
    """Log-mel front end parameters (defaults: LTX-2 19B).

    Attributes:
        sample_rate: Hz the waveform is resampled to before the STFT.
        n_fft: FFT size and Hann window length (samples).
        hop_length: samples between frames.
        n_mels: mel bands.
        f_min, f_max: band range in Hz (f_max None = sample_rate / 2).
        channels: output channels (2 = stereo, as the audio VAE's ``in_channels``).
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None
    channels: int = 2


def _hz_to_slaney_mel(hz: Tensor) -> Tensor:
    # Slaney's Auditory Toolbox scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above (27 mels per ×6.4).
    log_step = math.log(6.4) / 27.0
    return torch.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + torch.log(hz.clamp_min(1e-10) / 1000.0) / log_step)


def _slaney_mel_to_hz(mel: Tensor) -> Tensor:
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * torch.exp((mel - 15.0) * log_step))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None,
                   ) -> Tensor:
    """Triangular mel filters on the Slaney scale with Slaney ("area") normalisation.

    Band ``m`` rises linearly from edge ``m`` to ``m + 1`` and falls to ``m + 2``, where the ``n_mels + 2`` edges are
    equally spaced in Slaney mels between ``f_min`` and ``f_max``; each band is scaled by ``2 / (f[m+2] − f[m])`` so
    its area is constant (M. Slaney, Auditory Toolbox, Interval Research TR 1998-010; librosa ``filters.mel`` with
    ``htk=False, norm="slaney"``; torchaudio ``melscale_fbanks(mel_scale="slaney", norm="slaney")``). STFT bins are
    at ``k · (sample_rate // 2) / (n_fft // 2)`` Hz. Built in float64.

    Returns:
        ``[n_fft // 2 + 1, n_mels]`` float32 (multiply a magnitude spectrum ``[..., frames, bins]`` by it).
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    bins = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1, dtype=torch.float64)
    limits = _hz_to_slaney_mel(torch.tensor([f_min, f_max], dtype=torch.float64))
    edges = _slaney_mel_to_hz(torch.linspace(limits[0].item(), limits[1].item(), n_mels + 2, dtype=torch.float64))
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lo) / (centre - lo)
    falling = (hi - bins[:, None]) / (hi - centre)
    bank = torch.minimum(rising, falling).clamp_min(0.0) * (2.0 / (hi - lo))
    return bank.float()


def mel_spectrogram(waveform: Tensor, sample_rate: int, config: MelConfig = MelConfig()) -> Tensor:
    """Log-mel spectrogram of a waveform, the LTX-2 audio VAE's input.

    Args:
        waveform: ``[B, C, S]`` float (C ≥ 1; mono is duplicated, more than two channels are downmixed with
            :func:`cinetune.core.media.mix_channels`, 6 and 8 channels in the 5.1 / 7.1 order), any device.
        sample_rate: Hz of ``waveform``; other rates than ``config.sample_rate`` are resampled first.
        config: front-end parameters (:class:`MelConfig`; the audio VAE passes its own).

    Returns:
        ``[B, config.channels, T, n_mels]`` float32, ``T = floor(S' / hop) + 1`` with S' the resampled length;
        natural-log magnitudes floored at ``log(1e-5)``.

    Raises:
        ValueError: not ``[B, C, S]``, no channels, not floating point, a bad rate, or fewer than
            ``n_fft // 2 + 1`` samples after resampling (reflect padding needs them; 32 ms at 16 kHz).
    """
    if waveform.ndim != 3:
        raise ValueError(f"waveform must be [batch, channels, samples], got shape {tuple(waveform.shape)}")
    if waveform.shape[1] == 0:
        raise ValueError("waveform has 0 channels; give at least one channel of audio")
    if not waveform.is_floating_point():
        raise ValueError(f"waveform must be float (-1..1), got {waveform.dtype}")
    wave = mix_channels(waveform.float(), config.channels)
    wave = resample(wave, sample_rate, config.sample_rate)
    batch, channels, samples = wave.shape
    if samples <= config.n_fft // 2:
        raise ValueError(f"audio too short for the mel front end: {samples} samples at {config.sample_rate} Hz, "
                         f"need more than {config.n_fft // 2} ({config.n_fft // 2 / config.sample_rate * 1000:.0f} ms)")
    window = torch.hann_window(config.n_fft, periodic=True, device=wave.device)
    spec = torch.stft(wave.reshape(-1, samples), config.n_fft, hop_length=config.hop_length, win_length=config.n_fft,
                      window=window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                      return_complex=True).abs()  # [B·C, bins, T]
    bank = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.f_min, config.f_max).to(wave.device)
    mel = torch.matmul(spec.transpose(-1, -2), bank)  # [B·C, T, n_mels]
    return torch.log(mel.clamp_min(MEL_FLOOR)).reshape(batch, channels, -1, config.n_mels)
