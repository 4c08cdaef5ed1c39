"""Latent previews (core.preview, the families' factor tables) and VAE tile progress of both families."""

from __future__ import annotations

import re

import pytest
import torch

from cinetune.core.family import LatentFormat
from cinetune.core.preview import LatentPreview
from cinetune.k5.family import K5_LATENT_FORMAT
from cinetune.k5.pipeline import K5_PREVIEW
from cinetune.ltx2.family import LTX2_LATENT_FORMAT
from cinetune.ltx2.pipeline import LTX2_PREVIEW
from cinetune.ltx2.vae import LTX2VideoVAE, tiny_config

TWO_CHANNELS = LatentFormat(name="two", channels=2, spatial_factor=8, temporal_factor=4, size_multiple=8,
                            default_fps=24.0, scaling_factor=0.5)


def _preview(fmt=TWO_CHANNELS, factors=((1.0, 0.0, 2.0), (0.0, -1.0, 0.5)), bias=(0.1, 0.2, 0.3)):
    return LatentPreview(fmt, rgb_factors=factors, rgb_bias=bias, taesd_decoder_name=None, source="test")


def test_to_rgb_maps_the_first_frame_of_the_model_space_latent():
    latent = torch.randn(2, 2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    rgb = _preview().to_rgb(latent)
    a, b = 0.5 * latent[0, 0, 0], 0.5 * latent[0, 1, 0]  # to_model: × scaling_factor 0.5
    expected = torch.stack([a + 0.1, -b + 0.2, 2 * a + 0.5 * b + 0.3], dim=-1)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == torch.float32
    torch.testing.assert_close(rgb, expected)


def test_to_image_is_the_displayed_bytes():
    latent = torch.zeros(1, 2, 1, 2, 2)
    latent[0, 0, 0, 0, 0] = 10.0  # red channel far above 1: clamped to 255
    image = _preview(bias=(0.0, 0.0, -1.0)).to_image(latent)
    assert image.dtype == torch.uint8 and image.shape == (2, 2, 3)
    assert image[0, 0].tolist() == [255, 128, 255]
    assert image[1, 1].tolist() == [128, 128, 0]


@pytest.mark.parametrize("factors, bias, words", [
    (((1.0, 0.0, 0.0),), (0.0, 0.0, 0.0), "one (r, g, b) row per latent channel (2)"),
    (((1.0, 0.0), (0.0, 1.0)), (0.0, 0.0, 0.0), "one (r, g, b) row per latent channel"),
    (((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), (0.0, 0.0), "rgb_bias must be three numbers"),
])
def test_bad_tables_are_refused(factors, bias, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        _preview(factors=factors, bias=bias)


def test_wrong_latent_shape_is_refused():
    with pytest.raises(ValueError, match=r"needs a latent \[B, 2, F', H', W'\]"):
        _preview().to_rgb(torch.zeros(1, 3, 1, 2, 2))


@pytest.mark.parametrize("preview, fmt, taesd", [(K5_PREVIEW, K5_LATENT_FORMAT, "taehv"),
                                                 (LTX2_PREVIEW, LTX2_LATENT_FORMAT, None)])
def test_family_tables_fit_their_latents(preview, fmt, taesd):
    assert preview.latent_format is fmt and len(preview.rgb_factors) == fmt.channels
    assert preview.taesd_decoder_name == taesd and "comfy/latent_formats.py" in preview.source
    latent = torch.randn(1, fmt.channels, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    image = preview.to_image(latent)
    assert image.shape == (3, 4, 3) and image.dtype == torch.uint8
    # the factors are not degenerate: a different latent gives a different picture
    assert not torch.equal(preview.to_rgb(latent), preview.to_rgb(-latent))


def test_k5_preview_applies_the_scaling_factor():
    latent = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    unscaled = LatentPreview(LatentFormat(name="raw", channels=16, spatial_factor=8, temporal_factor=4,
                                          size_multiple=16, default_fps=24.0),
                             K5_PREVIEW.rgb_factors, K5_PREVIEW.rgb_bias, None, "test")
    torch.testing.assert_close(K5_PREVIEW.to_rgb(latent), unscaled.to_rgb(latent * 0.476986))


# ------------------------------------------------------------------------------------------------ VAE tile progress


class FakeCoder(torch.nn.Module):
    """Stands in for a VAE encoder or decoder: the real output shape, zeros, no compute. Tile counting and progress
    do not depend on the network."""

    def __init__(self, channels: int, time: int, space: int, encode: bool):
        super().__init__()
        self.channels, self.time, self.space, self.encode = channels, time, space, encode
        self.calls = 0
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the wrapper reads device and dtype from a parameter

    def forward(self, x, *_):
        self.calls += 1
        b, _, f, h, w = x.shape
        if self.encode:
            shape = (b, self.channels, (f - 1) // self.time + 1, h // self.space, w // self.space)
        else:
            shape = (b, self.channels, self.time * (f - 1) + 1, h * self.space, w * self.space)
        return x.new_zeros(shape)


def _check_progress(reports: list[tuple[int, int]], calls: int, predicted: int) -> None:
    """Every tile reported once, in order, against the tile count predicted before the call."""
    assert calls == predicted
    assert sorted(set(reports)) == [(k, calls) for k in range(1, calls + 1)]
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    assert reports[-1] == (calls, calls)


@pytest.fixture
def k5_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    from cinetune.k5.tiny import tiny_vae_config
    from cinetune.k5.vae import K5VAE

    vae = K5VAE(AutoencoderKLHunyuanVideo(**tiny_vae_config()), tiling=True, tile_size=32, tile_stride=24,
                tile_frames=8, tile_frames_stride=4)
    vae.model.encoder = FakeCoder(32, 4, 8, encode=True)  # mean and log-variance of 16 channels
    vae.model.decoder = FakeCoder(3, 4, 8, encode=False)
    return vae


@pytest.mark.parametrize("frames, height, width, tiling", [(9, 40, 24, True), (5, 24, 24, True), (17, 48, 72, True),
                                                          (9, 40, 24, False)])
def test_k5_vae_reports_every_tile(k5_vae, frames, height, width, tiling):
    video = torch.zeros(1, 3, frames, height, width)
    encoded, decoded = [], []
    latent = k5_vae.encode(video, tiling=tiling, progress=lambda d, t: encoded.append((d, t)))
    k5_vae.decode(latent, tiling=tiling, progress=lambda d, t: decoded.append((d, t)))
    _check_progress(encoded, k5_vae.model.encoder.calls, k5_vae.encode_tiles(video.shape, tiling))
    _check_progress(decoded, k5_vae.model.decoder.calls, k5_vae.decode_tiles(latent.shape, tiling))
    if tiling and frames > 5:
        assert k5_vae.model.encoder.calls > 1 and k5_vae.model.decoder.calls > 1
    if not tiling:
        assert encoded == [(1, 1), (1, 1)] and k5_vae.model.decoder.calls == 1


def test_k5_vae_progress_can_stop_the_decode(k5_vae):
    class Stop(Exception):
        pass

    def stop_at_second(done, total):
        if done == 2:
            raise Stop

    latent = torch.zeros(1, 16, 3, 5, 3)
    with pytest.raises(Stop):
        k5_vae.decode(latent, progress=stop_at_second)
    assert k5_vae.model.decoder.calls == 2 < k5_vae.decode_tiles(latent.shape)
    assert not k5_vae.model.decoder._forward_hooks  # the counting hook is gone


def test_ltx2_vae_reports_every_tile():
    vae = LTX2VideoVAE.from_config(tiny_config(), tile_size=96, tile_overlap=64, tile_frames=24,
                                   tile_frames_overlap=16)
    vae.model.encoder = FakeCoder(256, 8, 32, encode=True)
    vae.model.decoder = FakeCoder(3, 8, 32, encode=False)
    video = torch.zeros(1, 3, 33, 128, 128)
    encoded, decoded, untiled = [], [], []
    latent = vae.encode(video, progress=lambda d, t: encoded.append((d, t)))
    vae.decode(latent, progress=lambda d, t: decoded.append((d, t)))
    vae.decode(latent[:, :, :1], tiling=False, progress=lambda d, t: untiled.append((d, t)))
    # 4 latent groups / 4 latents per side in tiles of 3 overlapping by 2: 2 × 2 × 2 tiles each way
    assert vae.model.encoder.calls == 8 and encoded == [(k, 8) for k in range(1, 9)]
    assert vae.model.decoder.calls == 9 and decoded == [(k, 8) for k in range(1, 9)] and untiled == [(1, 1)]
