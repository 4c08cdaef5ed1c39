"""LTX-2 spatial latent upsampler: official keys and config, parity with diffusers, loading, refused files."""

from __future__ import annotations

import json

import pytest
import torch

from cinetune.core.checkpoint import CheckpointError, save_file_atomic
from cinetune.ltx2.upsampler import LTX2_19B_UPSAMPLER_CONFIG, LTX2LatentUpsampler, load_ltx2_upsampler, tiny_config
from cinetune.ltx2.vae import LTX2VideoVAE
from cinetune.ltx2.vae import tiny_config as tiny_vae_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(1)
    return LTX2VideoVAE.from_config(tiny_vae_config())


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return LTX2LatentUpsampler.from_config(tiny_config()).official_state_dict()


@pytest.fixture
def latents():
    return torch.randn(1, 128, 2, 3, 4, generator=torch.Generator().manual_seed(2))


def reference(state_dict, rational: bool = True):
    """diffusers' model written out directly; its tensor names are the official file's (diffusers' converter loads
    the file unchanged, strict)."""
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    model = LTX2LatentUpsamplerModel(in_channels=128, mid_channels=32, num_blocks_per_stage=1, dims=3,
                                     spatial_upsample=True, temporal_upsample=False, rational_spatial_scale=2.0,
                                     use_rational_resampler=rational).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def expected_upsample(model, vae_sd, latents):
    """Official ``upsample_video``: un-normalise with the VAE statistics, upsample, normalise."""
    mean = vae_sd["per_channel_statistics.mean-of-means"].view(1, -1, 1, 1, 1)
    std = vae_sd["per_channel_statistics.std-of-means"].view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return (model(latents * std + mean) - mean) / std


def test_19b_config_gives_the_official_tensors():
    """Names and shapes from ltx2_state_dict_shapes.txt (73 tensors, 497,867,929 values with the blur kernel)."""
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    with torch.device("meta"):
        sd = LTX2LatentUpsampler(LTX2LatentUpsamplerModel(
            **{"in_channels": 128, "mid_channels": 1024, "num_blocks_per_stage": 4, "dims": 3,
               "rational_spatial_scale": 2.0, "use_rational_resampler": True})).official_state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(shapes) == 73 and sum(v.numel() for v in sd.values()) == 497_867_929
    assert shapes["initial_conv.weight"] == (1024, 128, 3, 3, 3)
    assert shapes["res_blocks.3.norm2.bias"] == (1024,)
    assert shapes["upsampler.conv.weight"] == (4096, 1024, 3, 3)
    assert shapes["upsampler.blur_down.kernel"] == (1, 1, 5, 5)
    assert shapes["post_upsample_res_blocks.3.conv2.weight"] == (1024, 1024, 3, 3, 3)
    assert shapes["final_conv.weight"] == (128, 1024, 3, 3, 3)
    from cinetune.ltx2.upsampler import config_from_shapes

    assert config_from_shapes(shapes) == LTX2_19B_UPSAMPLER_CONFIG


def test_official_keys_round_trip(official):
    back = LTX2LatentUpsampler.from_official_state_dict(official, tiny_config()).official_state_dict()
    assert set(back) == set(official)
    for k, v in official.items():
        assert torch.equal(back[k], v), k


def test_upsample_equals_diffusers_with_official_normalisation(official, vae, latents):
    ours = LTX2LatentUpsampler.from_official_state_dict(official, tiny_config())
    out = ours(latents, vae)
    assert out.shape == (1, 128, 2, 6, 8) and out.dtype == torch.float32
    assert rel(out, expected_upsample(reference(official), vae.official_state_dict(), latents)) < 1e-5


def test_non_rational_spatial_upsampler_is_read_from_shapes(vae, latents):
    torch.manual_seed(3)
    sd = LTX2LatentUpsampler.from_config({**tiny_config(), "rational_resampler": False}).official_state_dict()
    assert sd["upsampler.0.weight"].shape == (128, 32, 3, 3)
    ours = LTX2LatentUpsampler.from_official_state_dict(sd)  # no metadata
    assert not ours.model.config.use_rational_resampler and ours.scale == 2.0
    expected = expected_upsample(reference(sd, rational=False), vae.official_state_dict(), latents)
    assert rel(ours(latents, vae), expected) < 1e-5


def test_load_file_with_and_without_metadata(official, vae, latents, tmp_path):
    with_meta = save_file_atomic(official, tmp_path / "ltx-2-spatial-upscaler-x2-1.0.safetensors",
                                 {"config": json.dumps(tiny_config())})
    bare = save_file_atomic(official, tmp_path / "bare.safetensors")
    expected = expected_upsample(reference(official), vae.official_state_dict(), latents)
    for path in (with_meta, bare):
        up = load_ltx2_upsampler(path)
        assert up.model.config.mid_channels == 32 and up.scale == 2.0
        assert rel(up(latents, vae), expected) < 1e-5


def test_diffusers_folder(official, vae, latents, tmp_path):
    reference(official).save_pretrained(tmp_path / "latent_upsampler")
    up = load_ltx2_upsampler(tmp_path / "latent_upsampler")
    expected = expected_upsample(reference(official), vae.official_state_dict(), latents)
    assert rel(up(latents, vae), expected) < 1e-5


def test_temporal_upscaler_is_refused_with_its_name(tmp_path):
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    temporal = LTX2LatentUpsamplerModel(in_channels=128, mid_channels=32, num_blocks_per_stage=1,
                                        spatial_upsample=False, temporal_upsample=True).state_dict()
    meta = {"config": json.dumps({**tiny_config(), "spatial_upsample": False, "temporal_upsample": True})}
    for name, metadata in (("with_meta", meta), ("bare", None)):
        path = save_file_atomic(temporal, tmp_path / f"{name}.safetensors", metadata)
        with pytest.raises(CheckpointError, match="temporal ×2 latent upscaler"):
            load_ltx2_upsampler(path)


@pytest.mark.parametrize("keys, what", [
    ({"vae.encoder.conv_in.conv.weight": (8, 48, 3, 3, 3)}, "LTX-2 video VAE"),
    ({"model.diffusion_model.proj_in.weight": (8, 8)}, "LTX-2 model checkpoint"),
    ({"encoder.down_blocks.0.res_blocks.0.conv1.conv.weight": (8, 8, 3, 3, 3)}, "a video VAE"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (4, 4, 3, 3)}, "not a latent upsampler"),
])
def test_other_files_are_named(tmp_path, keys, what):
    path = save_file_atomic({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=what):
        load_ltx2_upsampler(path)


def test_bad_latents(official, vae):
    up = LTX2LatentUpsampler.from_official_state_dict(official)
    with pytest.raises(ValueError, match=r"\[B, 128, F', H', W'\]"):
        up(torch.zeros(1, 64, 2, 3, 4), vae)
    with pytest.raises(ValueError, match=r"\[B, 128, F', H', W'\]"):
        up(torch.zeros(128, 2, 3, 4), vae)
