"""LTX-2 audio: the log-mel front end, the audio VAE and the vocoder (19B, LTX-2.0).

Pipeline (ltx2.md §5; Lightricks/LTX-2 at 2026-02-09, ``packages/ltx-core/src/ltx_core/model/audio_vae/``):

1. :func:`mel_spectrogram`: waveform ``[B, C, S]`` at any rate → stereo (mono duplicated, more channels downmixed,
   :func:`cinetune.core.media.mix_channels`) → resampled to 16 kHz (:func:`cinetune.core.media.resample`, equal to
   ``torchaudio.functional.resample``) → magnitude STFT (n_fft = window = 1024, periodic Hann, hop 160, centred with
   reflect padding) → 64 mel bands 0–8000 Hz, Slaney scale and Slaney area normalisation →
   ``log(max(mel, 1e-5))``, laid out ``[B, 2, T_mel, 64]`` with ``T_mel = floor(S₁₆ / 160) + 1`` (100 frames per
   second). These are the parameters of the official ``AudioProcessor`` (``ops.py``, a
   ``torchaudio.transforms.MelSpectrogram``); torchaudio is not needed here. The metadata's ``stft.causal: true``
   does not make the STFT causal: the official front end ignores it (centred frames), and so does this one.
2. :class:`LTX2AudioVAE` encoder (diffusers ``AutoencoderKLLTX2Audio``, the port of the official ``AudioEncoder``):
   causal along time, two stride-2 downsamplings → mean latents ``[B, 8, T_lat, 16]`` with
   ``T_lat = ceil(T_mel / 4)`` (the posterior mean; nothing is sampled), normalised with the per-channel statistics in
   patched space: ``[B, C, T, F] → [B, T, C·F]`` (channel-major), ``(x − mean-of-means) / std-of-means``, back.
   This is the official ``AudioEncoder._normalize_latents`` and exactly what diffusers' ``LTX2Pipeline`` does
   (``_pack_audio_latents`` then ``_normalize_audio_latents``; the diffusers model itself only stores the statistics).
3. Decoder: de-normalise the same way, decode → mel ``[B, 2, 4·T_lat − 3, 64]`` (causal: the first latent frame
   covers one mel frame, each later one four).
4. :class:`LTX2Vocoder` (diffusers ``LTX2Vocoder``, the port of the official HiFi-GAN ``Vocoder``): the two mel
   channels are stacked channel-major into 128 input channels, upsampled ×240 → waveform ``[B, 2, 240·T_mel]`` at
   24 kHz, tanh-bounded to -1..1.

Latent rate: 16000 / 160 / 4 = 25 latent frames per second. The latent length generated for a video is
:func:`audio_latent_frames` = ``round(frames / fps · 25)`` (official ``AudioLatentShape.from_duration``); ComfyUI
uses ``ceil`` instead, one more frame whenever the product is not whole (121 frames at 24 fps: 126 here, 127 in
ComfyUI). Encoding a waveform gives ``ceil((floor(S₁₆ / 160) + 1) / 4)`` frames, one more than ``duration · 25``
for whole seconds (16000 samples → 101 mel frames → 26 latents).

Configuration: :func:`audio_vae_config` and :func:`vocoder_config` read the checkpoint metadata's
``config["audio_vae"]`` (``model.params.ddconfig``, ``model.params.sampling_rate``, ``preprocessing.stft``,
``preprocessing.mel``) and ``config["vocoder"]``, as the official configurators do; the 19B values
(:data:`DEFAULT_AUDIO_VAE_METADATA`, :data:`DEFAULT_VOCODER_METADATA`) fill only missing keys. Given tensor shapes,
every size they show (channel widths, levels, blocks per level, latent channels, kernel sizes) is taken from them,
and metadata that disagrees is refused. As in the official ``AudioProcessor``, the mel range is 0 Hz to half the
sampling rate and the window is ``stft.filter_length`` long (``mel_fmin``/``mel_fmax``/``win_length`` are not read;
they agree in the 19B file).

Keys (the combined file's ``audio_vae.`` / ``vocoder.`` prefixes removed; :data:`AUDIO_VAE_PREFIX`,
:data:`VOCODER_PREFIX`): the audio VAE's ``encoder.*``/``decoder.*`` are the diffusers names unchanged and the
statistics ``per_channel_statistics.{mean-of-means,std-of-means}`` are diffusers' ``latents_mean``/``latents_std``
(diffusers ``loaders/single_file_utils.py`` ``convert_ltx2_audio_vae_to_diffusers``); the vocoder's ``ups``,
``resblocks``, ``conv_pre``, ``conv_post`` are diffusers' ``upsamplers``, ``resnets``, ``conv_in``, ``conv_out``
(diffusers ``scripts/convert_ltx2_to_diffusers.py`` ``LTX_2_0_VOCODER_RENAME_DICT``).

Refused: the LTX-2.3 vocoder (BigVGAN with bandwidth extension to 48 kHz, nested ``vocoder.vocoder``/``vocoder.bwe``
metadata), HiFi-GAN "resblock 2", and audio VAEs that are not causal along time with pixel norm (no released file).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.checkpoint import CheckpointError, assign_state_dict, check_materialised
from ..core.media import mix_channels, resample

#: Prefix of the audio VAE in the official combined checkpoint.
AUDIO_VAE_PREFIX = "audio_vae."
#: Prefix of the vocoder in the official combined checkpoint.
VOCODER_PREFIX = "vocoder."
#: Mel frames per latent frame (two stride-2 convolutions along time).
TIME_DOWNSAMPLE = 4
#: Log-mel floor: ``log(max(mel, MEL_FLOOR))`` (official ``AudioProcessor.waveform_to_mel``).
MEL_FLOOR = 1e-5

#: ``config["audio_vae"]`` of the 19B checkpoint (ltx2.md §1.3, verbatim dump); fills missing keys only.
DEFAULT_AUDIO_VAE_METADATA: dict = {
    "model": {"params": {
        "ddconfig": {"double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False,
                     "in_channels": 2, "out_ch": 2, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                     "attn_resolutions": [], "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel",
                     "causality_axis": "height"},
        "sampling_rate": 16000}},
    "preprocessing": {"audio": {"sampling_rate": 16000, "max_wav_value": 32768.0, "duration": 5.12, "stereo": True,
                                "causal_padding": 3},
                      "stft": {"filter_length": 1024, "hop_length": 160, "win_length": 1024, "causal": True},
                      "mel": {"n_mel_channels": 64, "mel_fmin": 0, "mel_fmax": 8000}},
}

#: ``config["vocoder"]`` of the 19B checkpoint (ltx2.md §1.3; official ``VocoderConfigurator`` defaults).
DEFAULT_VOCODER_METADATA: dict = {
    "resblock_kernel_sizes": [3, 7, 11], "upsample_rates": [6, 5, 2, 2, 2], "upsample_kernel_sizes": [16, 15, 8, 4, 4],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "upsample_initial_channel": 1024, "stereo": True,
    "resblock": "1", "output_sample_rate": 24000,
}


# ----------------------------------------------------------------------------------------------------------------
# Mel front end


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


def audio_latent_frames(num_frames: int, fps: float, latents_per_second: float = 25.0) -> int:
    """Audio latent length that goes with a video: ``round(num_frames / fps · latents_per_second)``.

    The official rule (``ltx_core.types.AudioLatentShape.from_duration``, Python's round, half to even); ComfyUI
    uses ``ceil`` (one frame more unless the product is whole): 121 frames at 24 fps → 126 here, 127 in ComfyUI.

    Raises:
        ValueError: ``num_frames`` < 1 or ``fps`` ≤ 0.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer ≥ 1, got {num_frames!r}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    return round(num_frames / fps * latents_per_second)


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def _merged(defaults: Mapping, given: Mapping | None) -> dict:
    """Deep merge of metadata dicts: keys of ``given`` win, nested dicts are merged."""
    out = copy.deepcopy(dict(defaults))
    for key, value in dict(given or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise CheckpointError(f"audio metadata {name} must be a non-negative integer, got {value!r}")
    return int(value)


def _as_ints(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"audio metadata {name} must be a list of integers, got {value!r}")
    return tuple(_as_int(name, v) for v in value)


def _index_count(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(found) + 1 if found else 0


def _check_agrees(what: str, given: Mapping[str, Any], from_shapes: Mapping[str, Any]) -> None:
    differing = [f"{k}: metadata {given[k]!r}, tensors {v!r}" for k, v in from_shapes.items()
                 if k in given and given[k] != v]
    if differing:
        raise CheckpointError(f"The {what} metadata does not belong to its tensors ({'; '.join(differing)}); "
                              "use the metadata of the file the tensors come from.")


@dataclass(frozen=True)
class AudioVAEConfig:
    """Architecture of :class:`LTX2AudioVAE` (the ``AutoencoderKLLTX2Audio`` arguments) and its mel front end.

    Attributes:
        base_channels: ``ddconfig.ch`` (also the length of the latent statistics, as officially).
        ch_mult: width multiplier per level; 3 levels (two stride-2 downsamplings along time and frequency).
        num_res_blocks: ResNet blocks per encoder level (the decoder has one more).
        attn_resolutions: resolutions with attention blocks (none in 19B).
        in_channels, out_channels: mel channels in and out (2 = stereo).
        latent_channels: ``z_channels`` (8).
        double_z: the encoder also predicts a log-variance (the second half, unused).
        mid_block_add_attention: attention in the middle blocks.
        resolution: nominal resolution (only decides where attention goes).
        dropout: unused at inference.
        mel: the front end (:class:`MelConfig`).
    """

    base_channels: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 2
    out_channels: int = 2
    latent_channels: int = 8
    double_z: bool = True
    mid_block_add_attention: bool = False
    resolution: int = 256
    dropout: float = 0.0
    mel: MelConfig = field(default_factory=MelConfig)

    @property
    def latent_mel_bins(self) -> int:
        """Frequency bins of a latent (``n_mels / 4``)."""
        return self.mel.n_mels // 4

    @property
    def latents_per_second(self) -> float:
        """Latent frames per second (25 for 19B)."""
        return self.mel.sample_rate / self.mel.hop_length / TIME_DOWNSAMPLE

    def diffusers_kwargs(self) -> dict:
        """Arguments of ``diffusers.AutoencoderKLLTX2Audio`` for this config."""
        return dict(base_channels=self.base_channels, output_channels=self.out_channels, ch_mult=self.ch_mult,
                    num_res_blocks=self.num_res_blocks, attn_resolutions=self.attn_resolutions or None,
                    in_channels=self.in_channels, resolution=self.resolution, latent_channels=self.latent_channels,
                    norm_type="pixel", causality_axis="height", dropout=self.dropout,
                    mid_block_add_attention=self.mid_block_add_attention, sample_rate=self.mel.sample_rate,
                    mel_hop_length=self.mel.hop_length, is_causal=True, mel_bins=self.mel.n_mels,
                    double_z=self.double_z)


def _audio_vae_sizes(shapes: Mapping[str, Sequence[int]]) -> dict:
    shapes = {k[len(AUDIO_VAE_PREFIX):] if k.startswith(AUDIO_VAE_PREFIX) else k: tuple(v) for k, v in shapes.items()}
    need = ("decoder.conv_in.conv.weight", "decoder.conv_out.conv.weight", "per_channel_statistics.mean-of-means")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"audio VAE tensors missing: {', '.join(AUDIO_VAE_PREFIX + k for k in missing)}; this "
                              "is not an LTX-2 audio VAE (expected audio_vae.* in the LTX-2 checkpoint)")
    levels = _index_count(shapes, "decoder.up.")
    widths = [shapes[f"decoder.up.{i}.block.0.conv1.conv.weight"][0] for i in range(levels)]
    sizes = {"z_channels": shapes["decoder.conv_in.conv.weight"][1],
             "out_ch": shapes["decoder.conv_out.conv.weight"][0],
             "num_res_blocks": _index_count(shapes, "decoder.up.0.block.") - 1,
             "mid_block_add_attention": "decoder.mid.attn_1.q.weight" in shapes}
    if "encoder.conv_in.conv.weight" in shapes:
        ch = shapes["encoder.conv_in.conv.weight"][0]
        sizes["in_channels"] = shapes["encoder.conv_in.conv.weight"][1]
        sizes["double_z"] = shapes["encoder.conv_out.conv.weight"][0] == 2 * sizes["z_channels"]
    else:
        ch = shapes["per_channel_statistics.mean-of-means"][0]
    if any(w % ch for w in widths):
        raise CheckpointError(f"audio VAE decoder widths {widths} are not multiples of the base width {ch}")
    sizes["ch"] = ch
    sizes["ch_mult"] = [w // ch for w in widths]
    return sizes


def audio_vae_config(audio_vae: Mapping | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
                     ) -> AudioVAEConfig:
    """Build an :class:`AudioVAEConfig` from the metadata's ``config["audio_vae"]`` and optional tensor shapes.

    Keys are read as by the official ``AudioEncoderConfigurator``/``AudioDecoderConfigurator``: ``ddconfig`` for the
    architecture, ``model.params.sampling_rate`` (else ``preprocessing.audio.sampling_rate``), ``stft.filter_length``
    and ``stft.hop_length``, ``ddconfig.mel_bins`` (else ``mel.n_mel_channels``). Missing keys take
    :data:`DEFAULT_AUDIO_VAE_METADATA`.

    Args:
        audio_vae: the metadata sub-config (None = the 19B values).
        shapes: optional key → shape of the audio VAE tensors (with or without the ``audio_vae.`` prefix); the
            sizes they show replace missing metadata and must agree with present metadata.

    Raises:
        CheckpointError: malformed values, a non-causal or group-norm VAE, a latent size that does not match the
            statistics, shapes that disagree with the metadata, or missing decoder tensors.
    """
    given = dict(audio_vae or {})
    given_dd = dict(((given.get("model") or {}).get("params") or {}).get("ddconfig") or {})
    meta = _merged(DEFAULT_AUDIO_VAE_METADATA, given)
    params = meta["model"]["params"]
    dd = dict(params["ddconfig"])
    if shapes is not None:
        sizes = _audio_vae_sizes(shapes)
        _check_agrees("audio_vae", given_dd, sizes)
        dd.update(sizes)
    if dd.get("causality_axis", "height") != "height":
        raise CheckpointError(f"audio VAE causality_axis {dd['causality_axis']!r} is not supported; LTX-2 uses "
                              "'height' (causal along time)")
    if dd.get("norm_type", "pixel") != "pixel":
        raise CheckpointError(f"audio VAE norm_type {dd['norm_type']!r} is not supported; LTX-2 uses 'pixel'")
    pre = meta["preprocessing"]
    given_pre_audio = (given.get("preprocessing") or {}).get("audio") or {}
    given_params = (given.get("model") or {}).get("params") or {}
    rate = given_params.get("sampling_rate", given_pre_audio.get("sampling_rate", params["sampling_rate"]))
    mel_bins = dd.get("mel_bins") or pre["mel"].get("n_mel_channels")
    mel = MelConfig(sample_rate=_as_int("sampling_rate", rate), n_fft=_as_int("filter_length",
                                                                             pre["stft"]["filter_length"]),
                    hop_length=_as_int("hop_length", pre["stft"]["hop_length"]), n_mels=_as_int("mel_bins", mel_bins),
                    channels=_as_int("in_channels", dd["in_channels"]))
    config = AudioVAEConfig(
        base_channels=_as_int("ch", dd["ch"]), ch_mult=_as_ints("ch_mult", dd["ch_mult"]),
        num_res_blocks=_as_int("num_res_blocks", dd["num_res_blocks"]),
        attn_resolutions=_as_ints("attn_resolutions", dd.get("attn_resolutions") or []),
        in_channels=mel.channels, out_channels=_as_int("out_ch", dd["out_ch"]),
        latent_channels=_as_int("z_channels", dd["z_channels"]), double_z=bool(dd.get("double_z", True)),
        mid_block_add_attention=bool(dd.get("mid_block_add_attention", False)),
        resolution=_as_int("resolution", dd.get("resolution", 256)), dropout=float(dd.get("dropout", 0.0)), mel=mel)
    if mel.channels not in (1, 2) or config.out_channels not in (1, 2):
        raise CheckpointError(f"audio VAE in/out channels must be 1 or 2 (mono/stereo mel), got {mel.channels}/"
                              f"{config.out_channels}")
    if len(config.ch_mult) != 3:
        raise CheckpointError(f"audio VAE ch_mult {list(config.ch_mult)} has {len(config.ch_mult)} levels; LTX-2's "
                              "decoder assumes 3 (time downsampled ×4)")
    if mel.n_mels % 4:
        raise CheckpointError(f"{mel.n_mels} mel bins cannot be halved twice; use a multiple of 4")
    if config.latent_channels * config.latent_mel_bins != config.base_channels:
        raise CheckpointError(
            f"audio VAE latents have {config.latent_channels} × {config.latent_mel_bins} = "
            f"{config.latent_channels * config.latent_mel_bins} features per frame but the statistics are sized by "
            f"ch = {config.base_channels} (the official layout needs them equal)")
    return config


@dataclass(frozen=True)
class VocoderConfig:
    """Architecture of :class:`LTX2Vocoder` (HiFi-GAN, "resblock 1").

    Attributes:
        in_channels: mel channels × bands (128 = 2 × 64 for stereo).
        upsample_initial_channel: width after ``conv_pre``, halved by every upsampling.
        upsample_rates, upsample_kernel_sizes: transposed-convolution strides and kernels (product of rates = hop of
            the output rate per mel frame: 240).
        resblock_kernel_sizes, resblock_dilation_sizes: the parallel residual blocks after each upsampling.
        out_channels: 2 for stereo, 1 for mono.
        output_sample_rate: Hz of the waveform (24000).
    """

    in_channels: int = 128
    upsample_initial_channel: int = 1024
    upsample_rates: tuple[int, ...] = (6, 5, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 15, 8, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    out_channels: int = 2
    output_sample_rate: int = 24000

    def diffusers_kwargs(self) -> dict:
        """Arguments of ``diffusers.pipelines.ltx2.vocoder.LTX2Vocoder`` for this config."""
        return dict(in_channels=self.in_channels, hidden_channels=self.upsample_initial_channel,
                    out_channels=self.out_channels, upsample_kernel_sizes=list(self.upsample_kernel_sizes),
                    upsample_factors=list(self.upsample_rates), resnet_kernel_sizes=list(self.resblock_kernel_sizes),
                    resnet_dilations=[list(d) for d in self.resblock_dilation_sizes], act_fn="leaky_relu",
                    leaky_relu_negative_slope=0.1, antialias=False, final_act_fn="tanh", final_bias=True,
                    output_sampling_rate=self.output_sample_rate)


def _vocoder_sizes(shapes: Mapping[str, Sequence[int]]) -> dict:
    shapes = {k[len(VOCODER_PREFIX):] if k.startswith(VOCODER_PREFIX) else k: tuple(v) for k, v in shapes.items()}
    if "conv_pre.weight" not in shapes or "conv_post.weight" not in shapes:
        raise CheckpointError("vocoder.conv_pre.weight / vocoder.conv_post.weight are missing; this is not an LTX-2 "
                              "19B vocoder (expected vocoder.* in the LTX-2 checkpoint)")
    ups = _index_count(shapes, "ups.")
    kernels = _index_count(shapes, "resblocks.") // max(ups, 1)
    return {"upsample_initial_channel": shapes["conv_pre.weight"][0], "in_channels": shapes["conv_pre.weight"][1],
            "stereo": shapes["conv_post.weight"][0] == 2,
            "upsample_kernel_sizes": [shapes[f"ups.{i}.weight"][2] for i in range(ups)],
            "resblock_kernel_sizes": [shapes[f"resblocks.{j}.convs1.0.weight"][2] for j in range(kernels)]}


def vocoder_config(vocoder: Mapping | None = None, shapes: Mapping[str, Sequence[int]] | None = None) -> VocoderConfig:
    """Build a :class:`VocoderConfig` from the metadata's ``config["vocoder"]`` and optional tensor shapes.

    Keys as read by the official ``VocoderConfigurator``; missing ones take :data:`DEFAULT_VOCODER_METADATA`. The
    input width is ``128 if stereo else 64`` as officially, unless shapes (or an ``in_channels`` key) say otherwise.

    Raises:
        CheckpointError: an LTX-2.3 vocoder (nested ``vocoder``/``bwe`` sections), "resblock 2", malformed values,
            inconsistent list lengths, or shapes that disagree with the metadata.
    """
    given = dict(vocoder or {})
    if "vocoder" in given or "bwe" in given:
        raise CheckpointError("This is an LTX-2.3 vocoder (BigVGAN with bandwidth extension to 48 kHz); Cinetune "
                              "supports the LTX-2 19B HiFi-GAN vocoder")
    meta = {**DEFAULT_VOCODER_METADATA, **given}
    if shapes is not None:
        sizes = _vocoder_sizes(shapes)
        _check_agrees("vocoder", given, {k: v for k, v in sizes.items() if k != "in_channels"})
        meta.update(sizes)
    if str(meta["resblock"]) != "1":
        raise CheckpointError(f"vocoder resblock type {meta['resblock']!r} is not supported; LTX-2 uses '1'")
    stereo = bool(meta["stereo"])
    dilations = meta["resblock_dilation_sizes"]
    if not isinstance(dilations, (list, tuple)):
        raise CheckpointError(f"vocoder resblock_dilation_sizes must be a list of lists, got {dilations!r}")
    config = VocoderConfig(
        in_channels=_as_int("in_channels", meta.get("in_channels", 128 if stereo else 64)),
        upsample_initial_channel=_as_int("upsample_initial_channel", meta["upsample_initial_channel"]),
        upsample_rates=_as_ints("upsample_rates", meta["upsample_rates"]),
        upsample_kernel_sizes=_as_ints("upsample_kernel_sizes", meta["upsample_kernel_sizes"]),
        resblock_kernel_sizes=_as_ints("resblock_kernel_sizes", meta["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(_as_ints("resblock_dilation_sizes", d) for d in dilations),
        out_channels=2 if stereo else 1,
        output_sample_rate=_as_int("output_sample_rate", meta.get("output_sample_rate", 24000)))
    if len(config.upsample_rates) != len(config.upsample_kernel_sizes) or \
            len(config.resblock_kernel_sizes) != len(config.resblock_dilation_sizes):
        raise CheckpointError("vocoder metadata lists differ in length (upsample_rates vs upsample_kernel_sizes, or "
                              "resblock_kernel_sizes vs resblock_dilation_sizes)")
    return config


# ----------------------------------------------------------------------------------------------------------------
# Modules


def _check_official_tensors(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], prefix: str,
                            path: str) -> None:
    """Compare tensor names and shapes under the official keys, so errors name what the file contains."""
    def names(keys):
        keys = sorted(prefix + k for k in keys)
        return ", ".join(keys[:5]) + (" …" if len(keys) > 5 else "") if keys else "none"

    missing, unexpected = set(expected) - set(given), set(given) - set(expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the tensors do not match the model its config describes: missing "
                              f"{names(missing)}; unexpected {names(unexpected)}. The file is incomplete or not an "
                              "LTX-2 19B file.")
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: tensor {prefix}{key} has shape {tuple(value.shape)}, the config expects "
                                  f"{tuple(expected[key].shape)}")


def _build(factory, meta_device: bool):
    if not meta_device:
        return factory()
    with torch.device("meta"):
        return factory()


class LTX2AudioVAE(nn.Module):
    """The LTX-2 audio VAE with its mel front end and latent statistics (diffusers ``AutoencoderKLLTX2Audio`` inside).

    Args:
        config: an :class:`AudioVAEConfig` (:func:`audio_vae_config`).
        encoder: build the encoder (a decoder-only file has none).
        on_meta_device: build without memory (shapes only, e.g. to list the official keys); weights come later from
            :meth:`from_official_state_dict`. Otherwise weights are diffusers' random initialisation and the
            statistics are the identity (mean 0, std 1).

    Attributes:
        vae: the diffusers model; its ``latents_mean``/``latents_std`` buffers hold the official
            ``per_channel_statistics.mean-of-means``/``std-of-means``.
    """

    def __init__(self, config: AudioVAEConfig, *, encoder: bool = True, on_meta_device: bool = False) -> None:
        from diffusers import AutoencoderKLLTX2Audio  # imported on use: diffusers takes seconds to import

        super().__init__()
        self.config = config
        self.vae = _build(lambda: AutoencoderKLLTX2Audio(**config.diffusers_kwargs()), on_meta_device)
        if not encoder:
            del self.vae.encoder
            self.vae.encoder = None

    # -- construction -------------------------------------------------------------------------------------------

    @staticmethod
    def tiny_config() -> dict:
        """Metadata-style ``config["audio_vae"]`` of a tiny audio VAE (tests, the embedded tiny model).

        Latents keep the 19B layout ``[B, 8, T, 16]`` (128 features per frame, the DiT's audio input) and 64 mel bands
        at 16 kHz, so the statistics length ``ch`` stays 128; the VAE is one block per level with no width growth
        (about 4.5 M parameters).
        """
        meta = copy.deepcopy(DEFAULT_AUDIO_VAE_METADATA)
        meta["model"]["params"]["ddconfig"].update(ch=128, ch_mult=[1, 1, 1], num_res_blocks=1)
        return meta

    @classmethod
    def from_config(cls, audio_vae: Mapping | None = None) -> "LTX2AudioVAE":
        """Random-initialised audio VAE from a metadata ``config["audio_vae"]`` (identity statistics)."""
        return cls(audio_vae_config(audio_vae))

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, Tensor], audio_vae: Mapping | None = None, *,
                                 dtype: torch.dtype | None = None, path: str = "audio VAE") -> "LTX2AudioVAE":
        """Build and load from official tensors (keys with or without the ``audio_vae.`` prefix).

        Args:
            state_dict: ``encoder.*`` (optional), ``decoder.*``,
                ``per_channel_statistics.{mean-of-means,std-of-means}``.
            audio_vae: the metadata ``config["audio_vae"]`` (None = 19B values); sizes come from the tensors.
            dtype: cast the weights to this dtype (None = as stored); the statistics stay float32.
            path: file name for error messages.

        Raises:
            CheckpointError: foreign, incomplete or mis-shaped tensors, or metadata that does not fit them.
        """
        sd = {k[len(AUDIO_VAE_PREFIX):] if k.startswith(AUDIO_VAE_PREFIX) else k: v for k, v in state_dict.items()}
        config = audio_vae_config(audio_vae, {k: tuple(v.shape) for k, v in sd.items()})
        model = cls(config, encoder=any(k.startswith("encoder.") for k in sd), on_meta_device=True)
        _check_official_tensors(model.official_state_dict(), sd, AUDIO_VAE_PREFIX, path)
        ours = {}
        for key, value in sd.items():
            name = _STATS_TO_DIFFUSERS.get(key, key)
            is_stat = key in _STATS_TO_DIFFUSERS
            ours["vae." + name] = value.float() if is_stat else (value if dtype is None else value.to(dtype))
        assign_state_dict(model, ours, path)
        check_materialised(model)
        return model.eval()

    def official_state_dict(self) -> dict[str, Tensor]:
        """State dict under the official keys without the ``audio_vae.`` prefix."""
        out = {}
        for key, value in self.state_dict().items():
            name = key[len("vae."):]
            out[_STATS_FROM_DIFFUSERS.get(name, name)] = value
        return out

    # -- properties ---------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.decoder.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.decoder.conv_in.conv.weight.device

    @property
    def latents_per_second(self) -> float:
        """Latent frames per second (25)."""
        return self.config.latents_per_second

    # -- statistics ---------------------------------------------------------------------------------------------

    def _patched_stats(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        expected = (self.config.latent_channels, self.config.latent_mel_bins)
        if latents.ndim != 4 or tuple(latents.shape[1:2]) + tuple(latents.shape[3:]) != expected:
            raise ValueError(f"audio latents must be [B, {expected[0]}, T, {expected[1]}], got "
                             f"{tuple(latents.shape)}")
        return self.vae.latents_mean.float().to(latents.device), self.vae.latents_std.float().to(latents.device)

    def normalize(self, latents: Tensor) -> Tensor:
        """Raw encoder means ``[B, C, T, F]`` → normalised latents, statistics applied per ``(c f)`` feature."""
        mean, std = self._patched_stats(latents)
        b, c, t, f = latents.shape
        patched = latents.float().permute(0, 2, 1, 3).reshape(b, t, c * f)
        return ((patched - mean) / std).reshape(b, t, c, f).permute(0, 2, 1, 3)

    def denormalize(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        mean, std = self._patched_stats(latents)
        b, c, t, f = latents.shape
        patched = latents.float().permute(0, 2, 1, 3).reshape(b, t, c * f)
        return (patched * std + mean).reshape(b, t, c, f).permute(0, 2, 1, 3)

    # -- encode / decode ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_mel(self, mel: Tensor) -> Tensor:
        """Log-mel ``[B, in_channels, T_mel, n_mels]`` → normalised latents ``[B, 8, ceil(T_mel / 4), 16]`` float32.

        Raises:
            ValueError: a wrong mel shape. RuntimeError: the file had no encoder.
        """
        if self.vae.encoder is None:
            raise RuntimeError("this audio VAE was loaded without encoder tensors (audio_vae.encoder.*), so it can "
                               "only decode; load an LTX-2 checkpoint that includes the audio encoder")
        cfg = self.config
        if mel.ndim != 4 or mel.shape[1] != cfg.in_channels or mel.shape[3] != cfg.mel.n_mels or mel.shape[2] < 1:
            raise ValueError(f"mel must be [B, {cfg.in_channels}, T, {cfg.mel.n_mels}], got {tuple(mel.shape)}")
        moments = self.vae.encoder(mel.to(self.device, self.dtype))
        means = moments[:, : cfg.latent_channels] if cfg.double_z else moments
        return self.normalize(means)

    def encode(self, waveform: Tensor, sample_rate: int) -> Tensor:
        """Waveform ``[B, C, S]`` (any rate and channel count) → normalised latents ``[B, 8, T_lat, 16]`` float32.

        ``T_lat = ceil(T_mel / 4)`` with ``T_mel = floor(S₁₆ / 160) + 1`` (S₁₆ = samples at 16 kHz): about
        ``duration · 25 + 1``. See :func:`mel_spectrogram` for the front end and its errors.
        """
        return self.encode_mel(mel_spectrogram(waveform.to(self.device), sample_rate, self.config.mel))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, 8, T, 16]`` → log-mel ``[B, out_channels, 4·T − 3, n_mels]`` float32.

        Raises:
            ValueError: a wrong latent shape.
        """
        raw = self.denormalize(latents.to(self.device))
        return self.vae.decoder(raw.to(self.dtype)).float()


_STATS_TO_DIFFUSERS = {"per_channel_statistics.mean-of-means": "latents_mean",
                       "per_channel_statistics.std-of-means": "latents_std"}
_STATS_FROM_DIFFUSERS = {v: k for k, v in _STATS_TO_DIFFUSERS.items()}
_VOCODER_TO_DIFFUSERS = {"conv_pre": "conv_in", "conv_post": "conv_out", "ups": "upsamplers", "resblocks": "resnets"}
_VOCODER_FROM_DIFFUSERS = {v: k for k, v in _VOCODER_TO_DIFFUSERS.items()}


def _rename_first(key: str, table: Mapping[str, str]) -> str:
    head, _, rest = key.partition(".")
    return f"{table.get(head, head)}.{rest}" if rest else table.get(head, head)


class LTX2Vocoder(nn.Module):
    """The LTX-2 19B HiFi-GAN vocoder: log-mel → waveform (diffusers ``LTX2Vocoder`` inside).

    Args:
        config: a :class:`VocoderConfig` (:func:`vocoder_config`).
        on_meta_device: build without memory (shapes only); otherwise diffusers' random initialisation.
    """

    def __init__(self, config: VocoderConfig, *, on_meta_device: bool = False) -> None:
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as DiffusersVocoder

        super().__init__()
        self.config = config
        self.vocoder = _build(lambda: DiffusersVocoder(**config.diffusers_kwargs()), on_meta_device)

    @staticmethod
    def tiny_config() -> dict:
        """Metadata-style ``config["vocoder"]`` of a tiny vocoder: the 19B layout (×240, 24 kHz stereo, 128 input
        channels for 2 × 64 mel bands) with 32 channels after ``conv_pre`` instead of 1024."""
        return {**copy.deepcopy(DEFAULT_VOCODER_METADATA), "upsample_initial_channel": 32}

    @classmethod
    def from_config(cls, vocoder: Mapping | None = None) -> "LTX2Vocoder":
        """Random-initialised vocoder from a metadata ``config["vocoder"]``."""
        return cls(vocoder_config(vocoder))

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, Tensor], vocoder: Mapping | None = None, *,
                                 dtype: torch.dtype | None = None, path: str = "vocoder") -> "LTX2Vocoder":
        """Build and load from official tensors (keys with or without the ``vocoder.`` prefix).

        Raises:
            CheckpointError: foreign, incomplete or mis-shaped tensors, or metadata that does not fit them.
        """
        sd = {k[len(VOCODER_PREFIX):] if k.startswith(VOCODER_PREFIX) else k: v for k, v in state_dict.items()}
        config = vocoder_config(vocoder, {k: tuple(v.shape) for k, v in sd.items()})
        model = cls(config, on_meta_device=True)
        _check_official_tensors(model.official_state_dict(), sd, VOCODER_PREFIX, path)
        ours = {"vocoder." + _rename_first(k, _VOCODER_TO_DIFFUSERS): v if dtype is None else v.to(dtype)
                for k, v in sd.items()}
        assign_state_dict(model, ours, path)
        check_materialised(model)
        return model.eval()

    def official_state_dict(self) -> dict[str, Tensor]:
        """State dict under the official keys without the ``vocoder.`` prefix."""
        return {_rename_first(k[len("vocoder."):], _VOCODER_FROM_DIFFUSERS): v for k, v in self.state_dict().items()}

    @property
    def dtype(self) -> torch.dtype:
        return self.vocoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vocoder.conv_in.weight.device

    @property
    def sample_rate(self) -> int:
        """Hz of the output waveform (24000)."""
        return self.config.output_sample_rate

    @torch.no_grad()
    def forward(self, mel: Tensor) -> Tensor:
        """Log-mel ``[B, C, T, M]`` (C · M = ``in_channels``: 2 × 64) → waveform ``[B, out_channels, T · 240]``
        float32 in -1..1 at :attr:`sample_rate`.

        Raises:
            ValueError: a wrong mel shape.
        """
        if mel.ndim != 4 or mel.shape[1] * mel.shape[3] != self.config.in_channels or mel.shape[2] < 1:
            raise ValueError(f"mel must be [B, channels, T, bands] with channels × bands = {self.config.in_channels} "
                             f"(2 × 64 for LTX-2), got {tuple(mel.shape)}")
        return self.vocoder(mel.to(self.device, self.dtype)).float()


def decode_audio(latents: Tensor, vae: LTX2AudioVAE, vocoder: LTX2Vocoder) -> tuple[Tensor, int]:
    """Normalised audio latents ``[B, 8, T, 16]`` → ``(waveform [B, 2, (4T − 3) · 240] float32, 24000)``.

    The official ``decode_audio`` (audio decoder then vocoder, ``audio_vae.py``).
    """
    return vocoder(vae.decode(latents)), vocoder.sample_rate
