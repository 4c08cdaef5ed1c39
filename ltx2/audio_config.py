"""LTX-2 audio VAE and vocoder configuration from checkpoint metadata and tensor shapes.

Configuration: :func:`audio_vae_config` and :func:`vocoder_config` read the checkpoint metadata's
``config["audio_vae"]`` (``model.params.ddconfig``, ``model.params.sampling_rate``, ``preprocessing.stft``,
``preprocessing.mel``) and ``config["vocoder"]``, as the official configurators do; the 19B values
(:data:`DEFAULT_AUDIO_VAE_METADATA`, :data:`DEFAULT_VOCODER_METADATA`) fill only missing keys. Given tensor shapes,
every size they show (channel widths, levels, blocks per level, latent channels, kernel sizes) is taken from them,
and metadata that disagrees is refused. As in the official ``AudioProcessor``, the mel range is 0 Hz to half the
sampling rate and the window is ``stft.filter_length`` long (``mel_fmin``/``mel_fmax``/``win_length`` are not read;
they agree in the 19B file).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..core.checkpoint import CheckpointError
from .audio_mel import MelConfig

#: Prefix of the audio VAE in the official combined checkpoint.
AUDIO_VAE_PREFIX = "audio_vae."
#: Prefix of the vocoder in the official combined checkpoint.
VOCODER_PREFIX = "vocoder."
#: Mel frames per latent frame (two stride-2 convolutions along time).
TIME_DOWNSAMPLE = 4

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
