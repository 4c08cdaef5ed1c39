"""HunyuanVideo VAE wrapper: parity with diffusers, every published file layout, shapes, tiling, bad input."""

from __future__ import annotations

import json
import math
import re

import av
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cinetune.core.checkpoint import CheckpointError, save_file_atomic
from cinetune.k5.tiny import tiny_vae_config, write_tiny_vae
from cinetune.k5.vae import HUNYUAN_VIDEO_VAE_CONFIG, SCALING_FACTOR, K5VAE, load_k5_vae, vae_config_from_shapes


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae.safetensors")


@pytest.fixture(scope="module")
def reference(vae_file):
    from diffusers import AutoencoderKLHunyuanVideo

    model = AutoencoderKLHunyuanVideo(**tiny_vae_config()).eval()
    model.load_state_dict(load_file(vae_file), strict=True)
    return model


@pytest.fixture(scope="module")
def clip(test_data):
    """Big Buck Bunny: first 9 frames, area-resized to 24×32, as [1, 3, 9, 24, 32] in [-1, 1]."""
    with av.open(str(test_data["bbb"])) as c:
        frames = []
        for frame in c.decode(video=0):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(frames) == 9:
                break
    video = torch.stack(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, F, H, W]
    video = F.interpolate(video.permute(1, 0, 2, 3), size=(24, 32), mode="area").permute(1, 0, 2, 3)
    return video.unsqueeze(0).contiguous()


def _diffusers_untiled(model):
    model.use_tiling = model.use_framewise_encoding = model.use_framewise_decoding = False
    return model


def test_scaling_factor_is_hunyuan_videos():
    from diffusers import AutoencoderKLHunyuanVideo

    assert SCALING_FACTOR == 0.476986
    with torch.device("meta"):
        assert AutoencoderKLHunyuanVideo().config.scaling_factor == SCALING_FACTOR


def test_wrapper_equals_diffusers(vae_file, reference, clip):
    vae = load_k5_vae(vae_file, tiling=False)
    ref = _diffusers_untiled(reference)
    with torch.no_grad():
        z_ref = ref.encode(clip).latent_dist.mode()
        x_ref = ref.decode(z_ref).sample
    z = vae.encode(clip)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(vae.decode(z), x_ref, rtol=0, atol=0)


def test_tiled_wrapper_equals_diffusers_tiling(vae_file, reference):
    kw = dict(tile_size=32, tile_stride=24, tile_frames=8, tile_frames_stride=4)
    vae = load_k5_vae(vae_file, tiling=True, **kw)
    reference.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_min_num_frames=8,
                            tile_sample_stride_height=24, tile_sample_stride_width=24, tile_sample_stride_num_frames=4)
    reference.use_framewise_encoding = reference.use_framewise_decoding = True
    video = torch.rand(1, 3, 9, 40, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z_ref = reference.encode(video).latent_dist.mode()
        x_ref = reference.decode(z_ref).sample
    z = vae.encode(video)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(vae.decode(z), x_ref, rtol=0, atol=0)


@pytest.mark.parametrize("frames, height, width", [(1, 16, 24), (5, 32, 16), (9, 24, 40)])
def test_latent_and_video_shapes(vae_file, frames, height, width):
    vae = load_k5_vae(vae_file)
    video = torch.rand(2, 3, frames, height, width) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 16, (frames - 1) // 4 + 1, height // 8, width // 8) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 3, frames, height, width)


def test_sampling_uses_the_generator(vae_file, clip):
    vae = load_k5_vae(vae_file)
    a = vae.encode(clip, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(clip, sample=True, generator=torch.Generator().manual_seed(1))
    c = vae.encode(clip, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, vae.encode(clip))


# ---------------------------------------------------------------------------------------------------------------
# File layouts


def _to_comfy_layout(sd):
    """diffusers names → ComfyUI's LDM names, as ComfyUI renames diffusers VAEs (comfy/diffusers_convert.py):
    written out here independently of the loader's inverse so each checks the other."""
    n_up = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[1] == "down_blocks":
            mid = f"block.{parts[4]}" if parts[3] == "resnets" else "downsample"
            k = f"{parts[0]}.down.{parts[2]}.{mid}.{'.'.join(parts[5:])}"
        elif parts[1] == "up_blocks":
            i = n_up - 1 - int(parts[2])
            mid = f"block.{parts[4]}" if parts[3] == "resnets" else "upsample"
            k = f"{parts[0]}.up.{i}.{mid}.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            k = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            name = ".".join(parts[4:-1])
            k = f"{parts[0]}.mid.attn_1.{attn[name]}.{parts[-1]}"
            if name != "group_norm" and parts[-1] == "weight":
                v = v.reshape(*v.shape, 1, 1, 1)  # ComfyUI stores the attention projections as 1×1×1 convs
        elif parts[1] == "conv_norm_out":
            k = f"{parts[0]}.norm_out.{parts[-1]}"
        out[k.replace("conv_shortcut", "nin_shortcut")] = v
    return out


def test_every_layout_gives_identical_outputs(tmp_path, vae_file, clip):
    sd = load_file(vae_file)
    ref = load_k5_vae(vae_file, tiling=False)
    z_ref = ref.encode(clip)
    x_ref = ref.decode(z_ref)

    pt = tmp_path / "pytorch_model.pt"
    torch.save({"state_dict": {"vae." + k: v for k, v in sd.items()}}, pt)
    comfy = save_file_atomic(_to_comfy_layout(sd), tmp_path / "hunyuan_video_vae_tiny.safetensors")
    assert "decoder.up.0.block.0.conv1.conv.weight" in load_file(comfy)
    folder = tmp_path / "vae"
    save_file_atomic(sd, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLHunyuanVideo", **tiny_vae_config()}))

    for path in (pt, comfy, folder, folder / "diffusion_pytorch_model.safetensors"):
        vae = load_k5_vae(path, tiling=False)
        z = vae.encode(clip)
        torch.testing.assert_close(z, z_ref, rtol=0, atol=0, msg=f"encode differs for {path.name}")
        torch.testing.assert_close(vae.decode(z), x_ref, rtol=0, atol=0, msg=f"decode differs for {path.name}")


def test_config_read_from_shapes():
    from diffusers import AutoencoderKLHunyuanVideo

    for config in (tiny_vae_config(), HUNYUAN_VIDEO_VAE_CONFIG):
        with torch.device("meta"):
            model = AutoencoderKLHunyuanVideo(**config)
        got = vae_config_from_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})
        for key, value in config.items():
            assert got[key] == value, key
    with torch.device("meta"):
        real = AutoencoderKLHunyuanVideo(**HUNYUAN_VIDEO_VAE_CONFIG)
    assert round(sum(p.numel() for p in real.parameters()) / 1e6, 1) == 246.5  # k5.md §7: ≈246.5M parameters


def test_bf16_load(vae_file, clip):
    vae = load_k5_vae(vae_file, dtype=torch.bfloat16, tiling=False)
    assert vae.dtype == torch.bfloat16
    ref = load_k5_vae(vae_file, tiling=False).encode(clip)
    z = vae.encode(clip)
    assert z.dtype == torch.float32 and (z - ref).norm() / ref.norm() < 0.05


def test_incomplete_file_names_the_missing_tensor(tmp_path, vae_file):
    sd = load_file(vae_file)
    del sd["decoder.mid_block.resnets.0.conv1.conv.bias"]
    with pytest.raises(CheckpointError, match="missing decoder.mid_block.resnets.0.conv1.conv.bias"):
        load_k5_vae(save_file_atomic(sd, tmp_path / "incomplete.safetensors"))


def test_not_a_vae_says_what_it_is(tmp_path):
    clip = save_file_atomic({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 4),
                             "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 4)},
                            tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match="CLIP text encoder.*HunyuanVideo VAE"):
        load_k5_vae(clip)
    image_vae = save_file_atomic({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
                                  "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3)},
                                 tmp_path / "sd_vae.safetensors")
    with pytest.raises(CheckpointError, match="2D image VAE"):
        load_k5_vae(image_vae)
    hv15 = save_file_atomic({"decoder.conv_in.conv.weight": torch.zeros(8, 32, 3, 3, 3),
                             "decoder.up_blocks.0.resnets.0.conv1.conv.weight": torch.zeros(8, 8, 3, 3, 3)},
                            tmp_path / "hv15.safetensors")
    with pytest.raises(CheckpointError, match="16 latent channels"):
        load_k5_vae(hv15)
    with pytest.raises(CheckpointError, match="not found"):
        load_k5_vae(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 10, 16, 16), "9 or 13 frames"),
    ((1, 3, 4, 16, 16), "1 or 5 frames"),
    ((1, 3, 9, 30, 16), "height .* 24 or 32"),
    ((1, 3, 9, 16, 4), "width .* use 8"),
    ((1, 4, 9, 16, 16), "3 colour channels"),
    ((3, 9, 16, 16), r"\[B, 3, F, H, W\]"),
])
def test_bad_video_shapes_name_the_fix(vae_file, shape, message):
    with pytest.raises(ValueError, match=message):
        load_k5_vae(vae_file).encode(torch.zeros(shape))


def test_pixel_range_and_latent_channels_are_checked(vae_file):
    vae = load_k5_vae(vae_file)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae.encode(torch.full((1, 3, 1, 16, 16), 200.0))
    with pytest.raises(ValueError, match="16"):
        vae.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match="multiples of 8"):
        K5VAE(vae.model, tile_size=30)


# ---------------------------------------------------------------------------------------------------------------
# Tiling


def _smooth_video(frames, height, width):
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    ch = [torch.sin(2 * math.pi * (x + 0.5 * y) + t), torch.cos(1.4 * math.pi * (y - x) + 2 * t),
          torch.sin(3 * x * y + t)]
    return 0.8 * torch.stack(ch).unsqueeze(0)


def _local_copy(vae_file, **tiles) -> K5VAE:
    """The tiny VAE with its GroupNorms replaced by identities and mid-block attention outputs zeroed.

    With random weights, per-tile GroupNorm statistics and whole-frame attention make every tile differ from the
    whole picture by O(1) (a trained VAE is far less sensitive); without them the network is local, and what is
    left of the tiled/untiled difference comes from the seams only — which is what tiling must get right.
    """
    vae = load_k5_vae(vae_file, **tiles)
    for module in list(vae.model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    for block in (vae.model.encoder.mid_block, vae.model.decoder.mid_block):
        for attn in block.attentions:
            attn.to_out[0].weight.data.zero_()
            attn.to_out[0].bias.data.zero_()
    return vae


def _relative(a, b):
    return ((a - b).abs().mean() / a.abs().mean()).item()


def test_spatial_tiling_stays_close(vae_file):
    vae = _local_copy(vae_file, tile_size=64, tile_stride=48)
    video = _smooth_video(1, 96, 96)
    z = vae.encode(video, tiling=False)
    assert _relative(z, vae.encode(video, tiling=True)) < 0.1  # measured 0.059
    assert _relative(vae.decode(z, tiling=False), vae.decode(z, tiling=True)) < 0.1  # measured 0.067


def test_temporal_tiling_stays_close(vae_file):
    # Causal convolutions restart at every temporal tile (replicate padding instead of the previous frames), so
    # the temporal seams differ more than the spatial ones; a misplaced tile would differ by ~100 %.
    vae = _local_copy(vae_file, tile_frames=8, tile_frames_stride=4)
    video = _smooth_video(17, 16, 16)
    z = vae.encode(video, tiling=False)
    assert _relative(z, vae.encode(video, tiling=True)) < 0.25  # measured 0.137
    assert _relative(vae.decode(z, tiling=False), vae.decode(z, tiling=True)) < 0.35  # measured 0.211


def test_tiling_is_exact_below_the_tile_size(vae_file, clip):
    vae = load_k5_vae(vae_file)
    z = vae.encode(clip, tiling=True)
    torch.testing.assert_close(z, vae.encode(clip, tiling=False), rtol=0, atol=0)
    torch.testing.assert_close(vae.decode(z, tiling=True), vae.decode(z, tiling=False), rtol=0, atol=0)
