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

Configuration: :func:`audio_vae_config` and :func:`vocoder_config` (:mod:`cinetune.ltx2.audio_config`, whose
docstring says which metadata keys and tensor shapes they read); the mel front end is
:mod:`cinetune.ltx2.audio_mel`. This module holds the modules and re-exports the public names of both.

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
from typing import Mapping

import torch
from torch import Tensor, nn

from ..core.checkpoint import CheckpointError, assign_state_dict, check_materialised
from .audio_config import (AUDIO_VAE_PREFIX, DEFAULT_AUDIO_VAE_METADATA, DEFAULT_VOCODER_METADATA, TIME_DOWNSAMPLE,
                           VOCODER_PREFIX, AudioVAEConfig, VocoderConfig, audio_vae_config, vocoder_config)
from .audio_mel import MEL_FLOOR, MelConfig, mel_filterbank, mel_spectrogram

__all__ = ["AUDIO_VAE_PREFIX", "VOCODER_PREFIX", "TIME_DOWNSAMPLE", "MEL_FLOOR", "DEFAULT_AUDIO_VAE_METADATA",
           "DEFAULT_VOCODER_METADATA", "MelConfig", "mel_filterbank", "mel_spectrogram", "audio_latent_frames",
           "AudioVAEConfig", "audio_vae_config", "VocoderConfig", "vocoder_config", "LTX2AudioVAE", "LTX2Vocoder",
           "decode_audio"]


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
