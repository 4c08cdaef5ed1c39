"""LTX-2 audio: the mel front end against torchaudio, the audio VAE and vocoder against diffusers (fp32, identical
random weights given under the official key names), metadata parsing, the 19B key layout, bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchaudio  # test-only reference (scripts/setup_env.sh installs it); the pack never imports it
from diffusers import AutoencoderKLLTX2Audio
from diffusers.loaders.single_file_utils import convert_ltx2_audio_vae_to_diffusers
from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as DiffusersVocoder

from cinetune.core.checkpoint import CheckpointError
from cinetune.core.media import read_audio
from cinetune.ltx2.audio import (DEFAULT_AUDIO_VAE_METADATA, DEFAULT_VOCODER_METADATA, LTX2AudioVAE, LTX2Vocoder,
                                 MelConfig, audio_latent_frames, audio_vae_config, decode_audio, mel_filterbank,
                                 mel_spectrogram, vocoder_config)

#: The official front end (Lightricks/LTX-2 ltx_core/model/audio_vae/ops.py AudioProcessor, 19B values).
OFFICIAL_MEL = dict(sample_rate=16000, n_fft=1024, win_length=1024, hop_length=160, f_min=0.0, f_max=8000.0, n_mels=64,
                    window_fn=torch.hann_window, center=True, pad_mode="reflect", power=1.0, mel_scale="slaney",
                    norm="slaney")
#: diffusers' names for the official vocoder modules (diffusers scripts/convert_ltx2_to_diffusers.py).
VOCODER_RENAMES = {"ups": "upsamplers", "resblocks": "resnets", "conv_pre": "conv_in", "conv_post": "conv_out"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def official_log_mel(waveform: torch.Tensor, rate: int) -> torch.Tensor:
    """The official AudioProcessor.waveform_to_mel with torchaudio: [B, C, S] → [B, C, T, 64]."""
    if rate != 16000:
        waveform = torchaudio.functional.resample(waveform, rate, 16000)
    mel = torchaudio.transforms.MelSpectrogram(**OFFICIAL_MEL)(waveform)
    return torch.log(torch.clamp(mel, min=1e-5)).permute(0, 1, 3, 2)


def randomise(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values of the same shapes: weights N(0, 1/fan_in), biases N(0, 0.02²) (activations stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sorted(state.items()):
        if value.ndim >= 2:
            transposed = "ups." in key or "upsamplers." in key  # ConvTranspose1d weights are [in, out, k]
            fan_in = value.shape[0] * value.shape[2] if transposed else value[0].numel()
            out[key] = torch.randn(value.shape, generator=gen) / math.sqrt(fan_in)
        else:
            out[key] = torch.randn(value.shape, generator=gen) * 0.02
    return out


def official_audio_vae_state(kwargs: dict, seed: int) -> dict[str, torch.Tensor]:
    """A random audio VAE state dict under the combined file's keys (``audio_vae.*``), for the diffusers model
    ``kwargs``: diffusers' own names with its statistics buffers under their official names."""
    names = {"latents_mean": "per_channel_statistics.mean-of-means",
             "latents_std": "per_channel_statistics.std-of-means"}
    with torch.device("meta"):
        shapes = AutoencoderKLLTX2Audio(**kwargs).state_dict()
    state = randomise({names.get(k, k): v for k, v in shapes.items()}, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    state["per_channel_statistics.mean-of-means"] = torch.randn(kwargs["base_channels"], generator=gen) * 0.5
    state["per_channel_statistics.std-of-means"] = torch.rand(kwargs["base_channels"], generator=gen) * 1.5 + 0.5
    return {"audio_vae." + k: v for k, v in state.items()}


def official_vocoder_state(kwargs: dict, seed: int) -> dict[str, torch.Tensor]:
    """A random vocoder state dict under the combined file's keys (``vocoder.*``)."""
    inverse = {v: k for k, v in VOCODER_RENAMES.items()}
    with torch.device("meta"):
        shapes = DiffusersVocoder(**kwargs).state_dict()
    renamed = {}
    for key, value in shapes.items():
        head, rest = key.split(".", 1)
        renamed[f"{inverse.get(head, head)}.{rest}"] = value
    return {"vocoder." + k: v for k, v in randomise(renamed, seed).items()}


def diffusers_audio_vae_kwargs(ch: int, ch_mult: tuple, blocks: int, z: int) -> dict:
    """AutoencoderKLLTX2Audio arguments written from the 19B metadata by hand (diffusers' own defaults are 19B)."""
    return dict(base_channels=ch, output_channels=2, ch_mult=ch_mult, num_res_blocks=blocks, attn_resolutions=None,
                in_channels=2, resolution=256, latent_channels=z, norm_type="pixel", causality_axis="height",
                dropout=0.0, mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True,
                mel_bins=64, double_z=True)


def audio_vae_metadata(ch: int, ch_mult: list, blocks: int, z: int) -> dict:
    meta = copy.deepcopy(DEFAULT_AUDIO_VAE_METADATA)
    meta["model"]["params"]["ddconfig"].update(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, z_channels=z)
    return meta


@pytest.fixture(scope="module")
def bbb_48k(test_data) -> torch.Tensor:
    """Two seconds of the Big Buck Bunny soundtrack (5.1 AAC downmixed to stereo) at its 48 kHz, [1, 2, S]."""
    return read_audio(test_data["bbb"], sample_rate=48000, start=1.0, duration=2.0)[None]


# ----------------------------------------------------------------------------------------------------------------
# Mel front end


def test_mel_matches_torchaudio_on_real_audio(test_data):
    audio = read_audio(test_data["bbb"], sample_rate=16000)[None]  # 5.312 s, 6 ch AAC → stereo 16 kHz
    ours = mel_spectrogram(audio, 16000)
    reference = official_log_mel(audio, 16000)
    assert ours.shape == reference.shape == (1, 2, audio.shape[-1] // 160 + 1, 64)
    assert rel_err(ours, reference) < 1e-5
    assert ours.min() >= math.log(1e-5) - 1e-6 and ours.std() > 1  # real content, floored
    bank = torchaudio.functional.melscale_fbanks(513, 0.0, 8000.0, 64, 16000, norm="slaney", mel_scale="slaney")
    assert rel_err(mel_filterbank(16000, 1024, 64), bank) < 1e-5


@pytest.mark.parametrize("rate", [48000, 44100])
def test_mel_resamples_other_rates_like_the_official_front_end(bbb_48k, rate):
    audio = bbb_48k if rate == 48000 else torchaudio.functional.resample(bbb_48k, 48000, rate)
    assert rel_err(mel_spectrogram(audio, rate), official_log_mel(audio, rate)) < 1e-5


def test_mel_channel_handling_and_bad_input(bbb_48k):
    stereo = bbb_48k[..., :16000]
    mono = stereo[:, :1]
    from_mono = mel_spectrogram(mono, 48000)
    assert from_mono.shape[1] == 2 and torch.equal(from_mono[:, 0], from_mono[:, 1])
    assert torch.allclose(from_mono, official_log_mel(torch.cat([mono, mono], 1), 48000), atol=1e-4)
    surround = torch.rand(1, 6, 8000, generator=torch.Generator().manual_seed(0)) - 0.5  # FL FR FC LFE BL BR
    g = 0.5 ** 0.5
    left = (surround[:, 0] + g * surround[:, 2] + g * surround[:, 4]) / (1 + 2 * g)
    right = (surround[:, 1] + g * surround[:, 2] + g * surround[:, 5]) / (1 + 2 * g)
    assert torch.allclose(mel_spectrogram(surround, 16000), official_log_mel(torch.stack([left, right], 1), 16000),
                          atol=1e-4)
    with pytest.raises(ValueError, match="0 channels"):
        mel_spectrogram(torch.zeros(1, 0, 16000), 16000)
    with pytest.raises(ValueError, match=r"\[batch, channels, samples\]"):
        mel_spectrogram(torch.zeros(2, 16000), 16000)
    with pytest.raises(ValueError, match="too short"):
        mel_spectrogram(torch.zeros(1, 2, 500), 16000)
    with pytest.raises(ValueError, match="float"):
        mel_spectrogram(torch.zeros(1, 2, 16000, dtype=torch.int16), 16000)


def test_audio_latent_frames_official_rounding():
    assert audio_latent_frames(121, 24.0) == 126  # ComfyUI's ceil gives 127
    assert math.ceil(121 / 24 * 25) == 127
    assert audio_latent_frames(121, 25.0) == 121
    assert audio_latent_frames(97, 24.0) == round(97 / 24 * 25) == 101
    for frames, fps in ((0, 24.0), (121, 0.0), (12.5, 24.0)):
        with pytest.raises(ValueError):
            audio_latent_frames(frames, fps)


# ----------------------------------------------------------------------------------------------------------------
# Audio VAE


@pytest.mark.parametrize("ch, ch_mult, blocks, z", [(128, (1, 1, 1), 1, 8), (64, (1, 2, 2), 1, 4)])
def test_audio_vae_matches_diffusers(bbb_48k, ch, ch_mult, blocks, z):
    kwargs = diffusers_audio_vae_kwargs(ch, ch_mult, blocks, z)
    official = official_audio_vae_state(kwargs, seed=ch)
    ours = LTX2AudioVAE.from_official_state_dict(official, audio_vae_metadata(ch, list(ch_mult), blocks, z))

    reference = AutoencoderKLLTX2Audio(**kwargs).eval()
    reference.load_state_dict(convert_ltx2_audio_vae_to_diffusers(dict(official)), strict=True)
    audio = bbb_48k[..., :12000]  # 0.25 s at 48 kHz
    mel = official_log_mel(audio, 48000)  # [1, 2, 26, 64]
    with torch.no_grad():
        means = reference.encode(mel).latent_dist.mode()
        packed = LTX2Pipeline._pack_audio_latents(means)
        normalised = LTX2Pipeline._normalize_audio_latents(packed, reference.latents_mean, reference.latents_std)
        expected_latents = LTX2Pipeline._unpack_audio_latents(normalised, means.shape[2], means.shape[3])

    latents = ours.encode(audio, 48000)
    assert latents.shape == (1, z, math.ceil(26 / 4), 64 // 4) and latents.dtype == torch.float32
    assert rel_err(latents, expected_latents) < 1e-5
    assert latents.std() > 0.1  # normalisation did not collapse the signal

    noisy = latents + 0.3 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = LTX2Pipeline._denormalize_audio_latents(LTX2Pipeline._pack_audio_latents(noisy), reference.latents_mean,
                                                      reference.latents_std)
        raw = LTX2Pipeline._unpack_audio_latents(raw, noisy.shape[2], noisy.shape[3])
        expected_mel = reference.decode(raw).sample
    decoded = ours.decode(noisy)
    assert decoded.shape == (1, 2, 4 * latents.shape[2] - 3, 64)
    assert rel_err(decoded, expected_mel) < 1e-5


def test_normalisation_is_per_channel_frequency_feature():
    vae = LTX2AudioVAE.from_config(LTX2AudioVAE.tiny_config())
    gen = torch.Generator().manual_seed(0)
    vae.vae.latents_mean.copy_(torch.randn(128, generator=gen))
    vae.vae.latents_std.copy_(torch.rand(128, generator=gen) + 0.5)
    x = torch.randn(2, 8, 5, 16, generator=gen)
    mean = vae.vae.latents_mean.view(8, 16)  # feature index c·16 + f, channel-major as "b c t f -> b t (c f)"
    std = vae.vae.latents_std.view(8, 16)
    expected = (x - mean[None, :, None, :]) / std[None, :, None, :]
    assert torch.allclose(vae.normalize(x), expected, atol=1e-6)
    assert torch.allclose(vae.denormalize(vae.normalize(x)), x, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 8, T, 16\]"):
        vae.decode(torch.zeros(1, 16, 5, 8))


def test_official_state_dict_round_trip_decoder_only_and_dtype(bbb_48k):
    meta = LTX2AudioVAE.tiny_config()
    state = official_audio_vae_state(diffusers_audio_vae_kwargs(128, (1, 1, 1), 1, 8), seed=5)
    vae = LTX2AudioVAE.from_official_state_dict(state, meta)
    saved = vae.official_state_dict()
    assert {"audio_vae." + k for k in saved} == set(state)
    assert all(torch.equal(saved[k[len("audio_vae."):]], v) for k, v in state.items())

    latents = vae.encode(bbb_48k[..., :12000], 48000)
    decoder_only = {k: v for k, v in state.items() if not k.startswith("audio_vae.encoder.")}
    partial = LTX2AudioVAE.from_official_state_dict(decoder_only, meta)
    assert torch.equal(partial.decode(latents), vae.decode(latents))
    with pytest.raises(RuntimeError, match="only decode"):
        partial.encode(bbb_48k[..., :12000], 48000)

    half = LTX2AudioVAE.from_official_state_dict(state, meta, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.vae.latents_std.dtype == torch.float32
    low = half.encode(bbb_48k[..., :12000], 48000)
    assert low.dtype == torch.float32 and rel_err(low, latents) < 0.05


def test_audio_vae_refuses_foreign_or_incomplete_tensors():
    meta = LTX2AudioVAE.tiny_config()
    state = official_audio_vae_state(diffusers_audio_vae_kwargs(128, (1, 1, 1), 1, 8), seed=6)
    with pytest.raises(CheckpointError, match="not an LTX-2 audio VAE"):
        LTX2AudioVAE.from_official_state_dict({"vae.decoder.conv_in.conv.weight": torch.zeros(512, 128, 3, 3, 3)}, meta)
    incomplete = dict(state)
    del incomplete["audio_vae.decoder.mid.block_1.conv1.conv.bias"]
    with pytest.raises(CheckpointError, match="missing audio_vae.decoder.mid.block_1.conv1.conv.bias"):
        LTX2AudioVAE.from_official_state_dict(incomplete, meta)
    with pytest.raises(CheckpointError, match="does not belong"):
        LTX2AudioVAE.from_official_state_dict(state, audio_vae_metadata(128, [1, 2, 4], 2, 8))


# ----------------------------------------------------------------------------------------------------------------
# Vocoder


def test_vocoder_matches_diffusers_and_decode_audio(bbb_48k):
    meta = LTX2Vocoder.tiny_config()
    kwargs = dict(in_channels=128, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[16, 15, 8, 4, 4],
                  upsample_factors=[6, 5, 2, 2, 2], resnet_kernel_sizes=[3, 7, 11],
                  resnet_dilations=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], leaky_relu_negative_slope=0.1,
                  output_sampling_rate=24000)
    official = official_vocoder_state(kwargs, seed=7)
    ours = LTX2Vocoder.from_official_state_dict(official, meta)
    reference = DiffusersVocoder(**kwargs).eval()
    renamed = {}
    for key, value in official.items():
        head, rest = key[len("vocoder."):].split(".", 1)
        renamed[f"{VOCODER_RENAMES.get(head, head)}.{rest}"] = value
    reference.load_state_dict(renamed, strict=True)

    mel = official_log_mel(bbb_48k[..., :24000], 48000)
    with torch.no_grad():
        expected = reference(mel)
    wave = ours(mel)
    assert wave.shape == (1, 2, mel.shape[2] * 240) and wave.dtype == torch.float32
    assert rel_err(wave, expected) < 1e-5
    assert wave.abs().max() <= 1.0 and wave.std() > 1e-4
    assert {"vocoder." + k for k in ours.official_state_dict()} == set(official)

    vae = LTX2AudioVAE.from_official_state_dict(
        official_audio_vae_state(diffusers_audio_vae_kwargs(128, (1, 1, 1), 1, 8), seed=8), LTX2AudioVAE.tiny_config())
    latents = torch.randn(1, 8, 4, 16, generator=torch.Generator().manual_seed(2))
    waveform, rate = decode_audio(latents, vae, ours)
    assert rate == 24000 and waveform.shape == (1, 2, (4 * 4 - 3) * 240)
    assert torch.equal(waveform, ours(vae.decode(latents)))
    with pytest.raises(ValueError, match="channels × bands = 128"):
        ours(torch.zeros(1, 2, 10, 32))


# ----------------------------------------------------------------------------------------------------------------
# Metadata and the 19B layout


def test_19b_metadata_parsing_and_key_layout():
    # config["audio_vae"] / config["vocoder"] as the 19B file's metadata states them (ltx2.md §1.3)
    audio_meta = copy.deepcopy(DEFAULT_AUDIO_VAE_METADATA)
    config = audio_vae_config(audio_meta)
    assert (config.base_channels, config.ch_mult, config.num_res_blocks) == (128, (1, 2, 4), 2)
    assert (config.latent_channels, config.double_z, config.attn_resolutions) == (8, True, ())
    assert config.mel == MelConfig(sample_rate=16000, n_fft=1024, hop_length=160, n_mels=64, channels=2)
    assert config.latents_per_second == 25.0 and config.latent_mel_bins == 16
    assert audio_vae_config({}) == config  # missing keys: the 19B values
    voc = vocoder_config(dict(DEFAULT_VOCODER_METADATA))
    assert (voc.in_channels, voc.upsample_initial_channel, voc.out_channels, voc.output_sample_rate) == (128, 1024, 2,
                                                                                                         24000)
    assert math.prod(voc.upsample_rates) == 240  # 100 mel frames/s → 24 kHz

    # Built on the meta device: the official tensor names and sizes (ltx2_state_dict_shapes.txt).
    vae = LTX2AudioVAE(config, on_meta_device=True)
    vocoder = LTX2Vocoder(voc, on_meta_device=True)
    vae_keys = vae.official_state_dict()
    voc_keys = vocoder.official_state_dict()
    encoder = {k: v for k, v in vae_keys.items() if k.startswith("encoder.")}
    decoder = {k: v for k, v in vae_keys.items() if k.startswith("decoder.")}
    # the official counts include the two statistics tensors in both the encoder and the decoder
    assert (len(encoder) + 2, len(decoder) + 2, len(voc_keys)) == (46, 58, 194)
    assert sum(v.numel() for v in encoder.values()) + 256 == 21_333_264
    assert sum(v.numel() for v in decoder.values()) + 256 == 31_915_394
    assert sum(v.numel() for v in voc_keys.values()) == 55_592_802
    expected_shapes = {"encoder.conv_in.conv.weight": (128, 2, 3, 3), "encoder.down.1.block.0.nin_shortcut.conv.weight":
                       (256, 128, 1, 1), "encoder.conv_out.conv.weight": (16, 512, 3, 3),
                       "decoder.conv_in.conv.weight": (512, 8, 3, 3), "decoder.up.2.upsample.conv.conv.weight":
                       (512, 512, 3, 3), "decoder.conv_out.conv.weight": (2, 128, 3, 3),
                       "per_channel_statistics.mean-of-means": (128,), "per_channel_statistics.std-of-means": (128,)}
    assert {k: tuple(vae_keys[k].shape) for k in expected_shapes} == expected_shapes
    assert tuple(voc_keys["conv_pre.weight"].shape) == (1024, 128, 7)
    assert tuple(voc_keys["ups.4.weight"].shape) == (64, 32, 4)
    assert tuple(voc_keys["resblocks.14.convs2.2.weight"].shape) == (32, 32, 11)
    assert tuple(voc_keys["conv_post.weight"].shape) == (2, 32, 7)

    # Sizes come from the tensors when the metadata lacks them.
    shapes = {"audio_vae." + k: tuple(v.shape) for k, v in vae_keys.items()}
    assert audio_vae_config({}, shapes) == config
    assert vocoder_config({}, {"vocoder." + k: tuple(v.shape) for k, v in voc_keys.items()}) == voc


@pytest.mark.parametrize("section, change, message", [
    ("audio_vae", {"causality_axis": "width"}, "causality_axis"),
    ("audio_vae", {"norm_type": "group"}, "norm_type"),
    ("audio_vae", {"ch": 64}, "statistics"),
    ("audio_vae", {"ch_mult": [1, 2]}, "3"),
    ("audio_vae", {"z_channels": "eight"}, "z_channels"),
    ("vocoder", {"resblock": "2"}, "resblock"),
    ("vocoder", {"vocoder": {"resblock": "AMP1"}, "bwe": {}}, "LTX-2.3"),
    ("vocoder", {"upsample_rates": [6, 5, 2, 2]}, "differ in length"),
])
def test_unsupported_metadata_is_refused(section, change, message):
    with pytest.raises(CheckpointError, match=message):
        if section == "audio_vae":
            meta = copy.deepcopy(DEFAULT_AUDIO_VAE_METADATA)
            meta["model"]["params"]["ddconfig"].update(change)
            audio_vae_config(meta)
        else:
            vocoder_config({**DEFAULT_VOCODER_METADATA, **change})
