"""LTX-2 video VAE wrapper: official keys, parity with diffusers, normalisation, timestep branch, tiling, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from cinetune.core.checkpoint import CheckpointError
from cinetune.ltx2.vae import LTX2_19B_VAE_CONFIG, STATISTICS, LTX2VideoVAE, diffusers_config, tiny_config

# A 19B-shaped VAE at 1/16 width (latent 8 → 16 → … → 128; decoder 64 → 8), one res layer per block.
_RES, _DRES = ["res_x", {"num_layers": 1}], ["res_x", {"num_layers": 1, "inject_noise": False}]
_UP = ["compress_all", {"residual": True, "multiplier": 2}]
MICRO = {**LTX2_19B_VAE_CONFIG, "latent_channels": 8,
         "encoder_blocks": [_RES, ["compress_space_res", {"multiplier": 2}], _RES,
                            ["compress_time_res", {"multiplier": 2}], _RES, ["compress_all_res", {"multiplier": 2}],
                            _RES, ["compress_all_res", {"multiplier": 2}], _RES],
         "decoder_blocks": [_DRES, _UP, _DRES, _UP, _DRES, _UP, _DRES]}


def micro_diffusers_kwargs(timestep_conditioning: bool) -> dict:
    """The same network written directly as ``AutoencoderKLLTX2Video`` arguments (diffusers' 2.0 converter values,
    scaled down)."""
    return dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32, 64, 128),
                decoder_block_out_channels=(16, 32, 64), layers_per_block=(1, 1, 1, 1, 1),
                decoder_layers_per_block=(1, 1, 1, 1),
                downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                upsample_type=("spatiotemporal",) * 3, upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2),
                decoder_inject_noise=(False,) * 4, timestep_conditioning=timestep_conditioning, patch_size=4,
                encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode="zeros",
                decoder_spatial_padding_mode="reflect", spatial_compression_ratio=32, temporal_compression_ratio=8)


# huggingface/diffusers scripts/convert_ltx2_to_diffusers.py: LTX_2_0_VIDEO_VAE_RENAME_DICT, applied in order by
# substring replacement, then the statistics that diffusers drops.
_DIFFUSERS_RENAMES = [
    ("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.0.downsamplers.0"),
    ("down_blocks.2", "down_blocks.1"), ("down_blocks.3", "down_blocks.1.downsamplers.0"),
    ("down_blocks.4", "down_blocks.2"), ("down_blocks.5", "down_blocks.2.downsamplers.0"),
    ("down_blocks.6", "down_blocks.3"), ("down_blocks.7", "down_blocks.3.downsamplers.0"),
    ("down_blocks.8", "mid_block"), ("up_blocks.0", "mid_block"), ("up_blocks.1", "up_blocks.0.upsamplers.0"),
    ("up_blocks.2", "up_blocks.0"), ("up_blocks.3", "up_blocks.1.upsamplers.0"), ("up_blocks.4", "up_blocks.1"),
    ("up_blocks.5", "up_blocks.2.upsamplers.0"), ("up_blocks.6", "up_blocks.2"),
    ("last_time_embedder", "time_embedder"), ("last_scale_shift_table", "scale_shift_table"),
    ("res_blocks", "resnets"), ("per_channel_statistics.mean-of-means", "latents_mean"),
    ("per_channel_statistics.std-of-means", "latents_std"),
]


def to_diffusers(official: dict) -> dict:
    out = {}
    for key, value in official.items():
        if "per_channel_statistics.channel" in key or "per_channel_statistics.mean-of-stds" in key:
            continue
        for old, new in _DIFFUSERS_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "timestep"])
def pair(request):
    """(official state dict, our VAE loaded from it, diffusers' model loaded from the converted tensors)."""
    from diffusers import AutoencoderKLLTX2Video

    torch.manual_seed(0)
    sd = LTX2VideoVAE.from_config({**MICRO, "timestep_conditioning": request.param}).official_state_dict()
    ours = LTX2VideoVAE.from_official_state_dict(sd, MICRO, tiling=False)
    ref = AutoencoderKLLTX2Video(**micro_diffusers_kwargs(request.param)).eval()
    ref.load_state_dict(to_diffusers(sd), strict=True)
    return sd, ours, ref


def smooth_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, frames // 4 + 2, height // 16, width // 16, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear") * 1.8 - 0.9


def test_19b_config_gives_the_official_tensors():
    """Tensor names/shapes from ltx2_state_dict_shapes.txt (official ltx-core on the meta device) and diffusers'
    2.0 converter config."""
    from diffusers import AutoencoderKLLTX2Video

    cfg = diffusers_config(LTX2_19B_VAE_CONFIG)
    assert (cfg["block_out_channels"], cfg["decoder_block_out_channels"]) == ((256, 512, 1024, 2048), (256, 512, 1024))
    assert (cfg["layers_per_block"], cfg["decoder_layers_per_block"]) == ((4, 6, 6, 2, 2), (5, 5, 5, 5))
    assert cfg["downsample_type"] == ("spatial", "temporal", "spatiotemporal", "spatiotemporal")
    assert (cfg["upsample_residual"], cfg["upsample_factor"], cfg["decoder_causal"]) == ((True,) * 3, (2, 2, 2), False)
    with torch.device("meta"):
        sd = LTX2VideoVAE(AutoencoderKLLTX2Video(**cfg)).official_state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # the reference counts 97 encoder / 95 decoder tensors, each with the 5 shared statistics
    assert sum(k.startswith("encoder.") for k in shapes) == 97 - 5
    assert sum(k.startswith("decoder.") for k in shapes) == 95 - 5
    assert shapes["encoder.conv_in.conv.weight"] == (128, 48, 3, 3, 3)
    assert shapes["encoder.down_blocks.1.conv.conv.weight"] == (64, 128, 3, 3, 3)
    assert shapes["encoder.down_blocks.3.conv.conv.weight"] == (256, 256, 3, 3, 3)
    assert shapes["encoder.down_blocks.7.conv.conv.weight"] == (256, 1024, 3, 3, 3)
    assert shapes["encoder.down_blocks.8.res_blocks.1.conv2.conv.weight"] == (2048, 2048, 3, 3, 3)
    assert shapes["encoder.conv_out.conv.weight"] == (129, 2048, 3, 3, 3)
    assert shapes["decoder.conv_in.conv.weight"] == (1024, 128, 3, 3, 3)
    assert shapes["decoder.up_blocks.0.res_blocks.4.conv1.conv.weight"] == (1024, 1024, 3, 3, 3)
    assert shapes["decoder.up_blocks.1.conv.conv.weight"] == (4096, 1024, 3, 3, 3)
    assert shapes["decoder.up_blocks.5.conv.conv.weight"] == (1024, 256, 3, 3, 3)
    assert shapes["decoder.conv_out.conv.weight"] == (48, 128, 3, 3, 3)
    assert shapes["per_channel_statistics.mean-of-means"] == (128,)
    assert not any("time_embedder" in k for k in shapes)


def test_official_keys_round_trip(pair):
    sd, ours, _ = pair
    back = ours.official_state_dict()
    assert set(back) == set(sd)
    assert {f"per_channel_statistics.{n}" for n in STATISTICS} <= set(back)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_config_is_read_from_shapes_without_metadata(pair):
    sd, ours, _ = pair
    bare = LTX2VideoVAE.from_official_state_dict(sd, None)
    assert dict(bare.model.config) == dict(ours.model.config)


def test_encode_equals_diffusers(pair):
    sd, ours, ref = pair
    video = smooth_video(17, 64, 96)
    mean = sd["per_channel_statistics.mean-of-means"].view(1, -1, 1, 1, 1)
    std = sd["per_channel_statistics.std-of-means"].view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = (ref.encode(video).latent_dist.mode() - mean) / std
    z = ours.encode(video)
    assert z.shape == (1, 8, 3, 2, 3) and z.dtype == torch.float32
    assert rel(z, expected) < 1e-5


def test_decode_equals_diffusers(pair):
    """Timestep-conditioned decoders: official ``VideoDecoder.forward`` noises the normalised latent
    (0.975·z + 0.025·ε) and decodes at timestep 0.05; diffusers' decoder takes the raw latent and the timestep."""
    sd, ours, ref = pair
    z = torch.randn(1, 8, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    mean = sd["per_channel_statistics.mean-of-means"].view(1, -1, 1, 1, 1)
    std = sd["per_channel_statistics.std-of-means"].view(1, -1, 1, 1, 1)
    temb = None
    z_in = z
    if ours.timestep_conditioning:
        z_in = 0.975 * z + 0.025 * torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
        temb = torch.tensor([0.05])
    with torch.no_grad():
        expected = ref.decode(z_in * std + mean, temb).sample
    video = ours.decode(z, generator=torch.Generator().manual_seed(7))
    assert video.shape == (1, 3, 17, 64, 96)
    assert rel(video, expected) < 1e-5
    if ours.timestep_conditioning:  # the noise is really used: another seed decodes differently
        assert rel(ours.decode(z, generator=torch.Generator().manual_seed(8)), expected) > 1e-4


def test_timestep_conditioning_follows_the_tensors(pair):
    sd, ours, _ = pair
    has_keys = any(k.startswith("decoder.last_time_embedder.") for k in sd)
    assert ours.timestep_conditioning == has_keys
    flipped = LTX2VideoVAE.from_official_state_dict(sd, {**MICRO, "timestep_conditioning": not has_keys})
    assert flipped.timestep_conditioning == has_keys
    if has_keys:
        assert "decoder.timestep_scale_multiplier" in sd and "decoder.last_scale_shift_table" in sd


def test_normalisation_is_the_official_definition(pair):
    sd, ours, _ = pair
    raw = torch.randn(2, 8, 2, 3, 4, generator=torch.Generator().manual_seed(3)) * 3 + 1
    mean, std = sd["per_channel_statistics.mean-of-means"], sd["per_channel_statistics.std-of-means"]
    expected = torch.stack([(raw[:, c] - mean[c]) / std[c] for c in range(8)], dim=1)
    assert rel(ours.normalize(raw), expected) < 1e-6
    assert rel(ours.denormalize(expected), raw) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Tiling


def _one_tap(vae: LTX2VideoVAE) -> LTX2VideoVAE:
    """Keep only the tap of each 3×3×3 kernel that reads the output's own position (the last time tap in the
    causal encoder, the centre in the non-causal decoder): the real network with a one-latent receptive field, where
    tiled and untiled results must agree exactly."""
    with torch.no_grad():
        for side, t_tap in ((vae.model.encoder, 2), (vae.model.decoder, 1)):
            for m in side.modules():
                if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3):
                    keep = m.weight[:, :, t_tap, 1, 1].clone()
                    m.weight.zero_()
                    m.weight[:, :, t_tap, 1, 1] = keep
    return vae


TILES = dict(tile_size=96, tile_overlap=64, tile_frames=24, tile_frames_overlap=16)


def test_tiled_decode_is_exact_for_a_local_network():
    """Placement, blend weights and the temporal alignment of the real decoder. A hook adds 1000 to the first frame
    of every decoder call: a temporal tile's first frame is decoded as a video start, which tiling must weight 0.
    A real network differs from its untiled result near tile seams (within its receptive field, several latents for
    the random tiny one), which is why exactness is asserted on the one-tap network."""
    torch.manual_seed(0)
    vae = _one_tap(LTX2VideoVAE.from_config(MICRO, **TILES))
    z = torch.randn(1, 8, 5, 4, 4, generator=torch.Generator().manual_seed(2))
    calls = []

    def first_frame_artifact(module, args, out):
        calls.append(tuple(args[0].shape))
        out[:, :, 0] += 1000
        return out

    vae.model.decoder.register_forward_hook(first_frame_artifact)
    whole = vae.decode(z, tiling=False)
    tiled = vae.decode(z, tiling=True)
    assert tiled.shape == whole.shape == (1, 3, 33, 128, 128)
    assert rel(tiled, whole) < 1e-6
    # bounded memory: 4 groups / 4 latents in tiles of 3 overlapping by 2; a temporal tile reads one latent more
    assert len(calls) == 1 + 2 * 2 * 2
    assert max(c[2] for c in calls[1:]) == 24 // 8 + 1 and max(max(c[3:]) for c in calls[1:]) == 96 // 32


def test_tiled_encode_is_exact_for_a_local_network():
    """The encoder tiles cut away what a real encoder gets wrong, emulated by a hook: +1000 on the first latent of
    every call (its first frame is encoded alone) and on the latents along every tile border (convolutions there see
    padding)."""
    torch.manual_seed(0)
    vae = _one_tap(LTX2VideoVAE.from_config(MICRO, **TILES))
    video = smooth_video(33, 128, 128, seed=4)

    def artifacts(module, args, out):
        out[:, :, 0] += 1000
        for border in (0, -1):
            out[:, :, :, border] += 1000
            out[:, :, :, :, border] += 1000
        return out

    calls = []
    vae.model.encoder.register_forward_hook(artifacts)
    vae.model.encoder.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    whole = vae.encode(video, tiling=False)
    tiled = vae.encode(video, tiling=True)
    assert tiled.shape == whole.shape == (1, 8, 5, 4, 4)
    assert rel(tiled, whole) < 1e-6
    # bounded memory: tiles of 24 + 1 frames and 96 px
    assert len(calls) == 1 + 2 * 2 * 2
    assert max(c[2] for c in calls[1:]) == 24 + 1 and max(max(c[3:]) for c in calls[1:]) == 96


def test_tile_settings_are_checked():
    vae = LTX2VideoVAE.from_config(MICRO)
    assert (vae.tile_size, vae.tile_overlap, vae.tile_frames, vae.tile_frames_overlap) == (512, 64, 64, 24)
    for bad in (dict(tile_size=500), dict(tile_overlap=32), dict(tile_overlap=512), dict(tile_frames=60),
                dict(tile_frames_overlap=8)):
        with pytest.raises(ValueError, match="multiples"):
            LTX2VideoVAE(vae.model, **bad)


# ---------------------------------------------------------------------------------------------------------------
# Bad input, other layouts


def test_bad_video_shapes_name_the_nearest_valid_values():
    vae = LTX2VideoVAE.from_config(MICRO)
    with pytest.raises(ValueError, match=r"got 10: use 9 or 17 frames"):
        vae.encode(torch.zeros(1, 3, 10, 64, 64))
    with pytest.raises(ValueError, match=r"height must be a multiple of 32 px; got 40: use 32 or 64"):
        vae.encode(torch.zeros(1, 3, 9, 40, 64))
    with pytest.raises(ValueError, match=r"width must be a multiple of 32 px; got 20: use 32\."):
        vae.encode(torch.zeros(1, 3, 9, 64, 20))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        vae.encode(torch.zeros(3, 9, 64, 64))
    with pytest.raises(ValueError, match="colour channels"):
        vae.encode(torch.zeros(1, 4, 9, 64, 64))
    with pytest.raises(ValueError, match="x/127.5 - 1"):
        vae.encode(torch.full((1, 3, 1, 32, 32), 200.0))
    with pytest.raises(ValueError, match=r"\[B, 8, F', H', W'\]"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))


def test_foreign_or_incomplete_tensors_raise_checkpoint_errors(pair):
    sd, _, _ = pair
    with pytest.raises(CheckpointError, match="not an LTX-2 video VAE"):
        LTX2VideoVAE.from_official_state_dict({"encoder.conv_in.weight": torch.zeros(128, 2, 3, 3),
                                                "decoder.conv_out.weight": torch.zeros(2, 128, 3, 3)})
    no_stats = {k: v for k, v in sd.items() if k != "per_channel_statistics.std-of-means"}
    with pytest.raises(CheckpointError, match="std-of-means is missing"):
        LTX2VideoVAE.from_official_state_dict(no_stats)
    truncated = {k: v for k, v in sd.items() if not k.startswith("decoder.up_blocks.2.res_blocks.0.conv2")}
    with pytest.raises(CheckpointError, match="missing"):
        LTX2VideoVAE.from_official_state_dict(truncated)
    with pytest.raises(CheckpointError, match="norm_layer"):
        LTX2VideoVAE.from_official_state_dict(sd, {**MICRO, "norm_layer": "group_norm"})
    prefixed = LTX2VideoVAE.from_official_state_dict({f"vae.{k}": v for k, v in sd.items()})
    assert set(prefixed.official_state_dict()) == set(sd)


def test_diffusers_folder(pair, tmp_path):
    sd, ours, ref = pair
    ref.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    for key in ("decoder_causal", "spatial_compression_ratio", "temporal_compression_ratio"):
        del config[key]  # an older config: diffusers' class defaults (causal decoder, ×64/×16) are wrong for LTX-2
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    loaded = LTX2VideoVAE.from_diffusers_folder(tmp_path / "vae", tiling=False)
    assert (loaded.spatial_ratio, loaded.temporal_ratio, loaded.model.config.decoder_causal) == (32, 8, False)
    video = smooth_video(9, 64, 64, seed=6)
    z = ours.encode(video)
    assert torch.equal(loaded.encode(video), z)
    if not ours.timestep_conditioning:
        assert torch.equal(loaded.decode(z), ours.decode(z))
    back = loaded.official_state_dict()
    assert set(back) == set(sd) - {f"per_channel_statistics.{n}" for n in STATISTICS[2:]}
    with pytest.raises(CheckpointError, match="config.json"):
        LTX2VideoVAE.from_diffusers_folder(tmp_path)


def test_tiny_config_is_128_channels_x32_x8():
    torch.manual_seed(0)
    vae = LTX2VideoVAE.from_config(tiny_config(), tiling=False)
    assert (vae.latent_channels, vae.spatial_ratio, vae.temporal_ratio) == (128, 32, 8)
    assert not vae.timestep_conditioning
    z = vae.encode(torch.zeros(1, 3, 9, 32, 64))
    assert z.shape == (1, 128, 2, 1, 2)
    with pytest.raises(ValueError, match="at least 2 latents"):
        vae.decode(z)
    assert vae.decode(torch.zeros(1, 128, 1, 2, 2)).shape == (1, 3, 1, 64, 64)
