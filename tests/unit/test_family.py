"""Model-family contracts: the latent format on Kandinsky 5 and on an LTX-2-shaped format, and the family registry
(lookup, family guessing, kohya resolution and the architecture of saved LoRAs through registered grammars)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

import cinetune.core.family as family_module
from cinetune.core.family import (
    AudioLatentFormat,
    LatentFormat,
    LoRAKeyGrammar,
    ModelFamily,
    get_family,
    guess_family,
    guess_model_family,
    register_family,
    registered_families,
)
from cinetune.core.lora import LoRAError, LoRAWeights, load_lora, save_lora
from cinetune.k5.family import K5_BLOCK_PREFIXES, K5_FAMILY, K5_LATENT_FORMAT, K5_LORA_TARGETS

# LTX-2 facts (reference ltx2.md §4-§6): 128 channels, ×32 spatial, ×8 temporal (8k+1 frames), sizes multiple of
# 32 px, 24 fps, per-channel statistics; audio 8 channels × 16 mel bins, 25 latents/s, 16 kHz.
LTX2_SHAPED = LatentFormat(name="ltx-2-shaped", channels=128, spatial_factor=32, temporal_factor=8, size_multiple=32,
                           default_fps=24.0, scaling_factor=None,
                           audio=AudioLatentFormat(channels=8, mel_bins=16, latents_per_second=25.0, sample_rate=16000))
LTX2_GRAMMAR = LoRAKeyGrammar(
    pattern=r"transformer_blocks[._]\d+[._](attn1|attn2|audio_attn\d|ff|audio_ff|audio_to_video_attn)",
    kohya=r"(transformer_blocks)_(\d+)_(attn1|attn2)_(to_q|to_k|to_v|to_out)(?:_(0))?",
    block_index=r"transformer_blocks[._](?P<index>\d+)",
    block_counts="the 19B model has 48 blocks")
LTX2_FAMILY = ModelFamily(name="ltx-2-shaped", display_name="LTX-2 (shaped)", latent_format=LTX2_SHAPED,
                          lora_targets=("attn1.to_q", "attn1.to_k"), lora_within=("transformer_blocks.",),
                          lora_grammar=LTX2_GRAMMAR)


@pytest.fixture
def registry(monkeypatch):
    """A registry of Kandinsky 5 and the LTX-2-shaped family (registered after it), restored after the test."""
    monkeypatch.setattr(family_module, "_FAMILIES", {K5_FAMILY.name: K5_FAMILY})
    register_family(LTX2_FAMILY)
    return family_module._FAMILIES


# ---------------------------------------------------------------------------------------------------- K5 format


def test_k5_is_registered_with_its_facts():
    assert get_family("kandinsky-5") is K5_FAMILY and K5_FAMILY in registered_families()
    assert K5_FAMILY.latent_format is K5_LATENT_FORMAT
    assert (K5_FAMILY.lora_targets, K5_FAMILY.lora_within) == (K5_LORA_TARGETS, K5_BLOCK_PREFIXES)
    fmt = K5_LATENT_FORMAT
    assert (fmt.channels, fmt.spatial_factor, fmt.temporal_factor, fmt.size_multiple, fmt.default_fps) == \
        (16, 8, 4, 16, 24.0)
    assert fmt.frame_rule == "4k+1" and fmt.normalization == "scaling_factor" and fmt.audio is None
    with pytest.raises(ValueError, match="has no audio"):
        fmt.audio_latent_length(5.0)


def test_k5_format_matches_the_hunyuan_video_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    from cinetune.k5.tiny import tiny_vae_config

    with torch.device("meta"):
        assert AutoencoderKLHunyuanVideo().config.scaling_factor == K5_LATENT_FORMAT.scaling_factor
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**tiny_vae_config()).eval()
    for width, height, frames in ((48, 32, 5), (32, 16, 1), (16, 32, 9)):
        with torch.no_grad():
            latent = vae.encode(torch.zeros(1, 3, frames, height, width)).latent_dist.mode()
        assert tuple(latent.shape[1:]) == K5_LATENT_FORMAT.latent_shape(width, height, frames)


def test_k5_frame_rule_and_nearest_counts():
    fmt = K5_LATENT_FORMAT
    assert [n for n in range(0, 22) if fmt.valid_frames(n)] == [1, 5, 9, 13, 17, 21]
    assert not any(fmt.valid_frames(v) for v in (5.0, True, "5", -3))
    assert fmt.nearest_frames(10) == (9, 13) and fmt.nearest_frames(120) == (117, 121)
    assert fmt.nearest_frames(121) == (121, 121) and fmt.nearest_frames(2) == (1, 5)
    with pytest.raises(ValueError, match="integer ≥ 1"):
        fmt.nearest_frames(0)
    assert fmt.latent_frames(121) == 31 and fmt.pixel_frames(31) == 121 and fmt.latent_frames(1) == 1
    with pytest.raises(ValueError, match="use 117 or 121"):
        fmt.latent_frames(120)


def test_k5_sizes_and_latent_shape():
    fmt = K5_LATENT_FORMAT
    assert fmt.latent_shape(768, 512, 121) == (16, 31, 64, 96)  # official 5 s at 24 fps: 31 latent frames
    assert fmt.size_problems(768, 512, 121) == []
    problems = fmt.size_problems(500, 8, 10)
    assert problems == ["width 500 is not a multiple of 16: use 496 or 512", "height 8 is too small: use 16 or more",
                        "frames 10 is not of the form 4k+1: use 9 or 13"]
    with pytest.raises(ValueError, match="width 500 .*; height 8 .*; frames 10"):
        fmt.check_size(500, 8, 10)
    with pytest.raises(ValueError, match=r"width 700 is not a multiple of 128 \(tiles\): use 640 or 768"):
        fmt.check_size(700, 512, 121, size_multiple=128, reason="tiles")
    with pytest.raises(ValueError, match="positive multiple of 16"):
        fmt.check_size(768, 512, 121, size_multiple=24)
    assert fmt.size_problems(768.0, 512, 0) == ["width must be an integer, got 768.0",
                                               "frames 0 is too small: use 1 (an image) or 4k+1 such as 5, 9, 17"]


def test_scaling_factor_normalisation_round_trips():
    raw = torch.randn(1, 16, 2, 4, 4)
    model = K5_LATENT_FORMAT.to_model(raw)
    torch.testing.assert_close(model, raw * 0.476986)  # HunyuanVideo VAE config scaling_factor, no shift
    torch.testing.assert_close(K5_LATENT_FORMAT.from_model(model), raw)


# --------------------------------------------------------------------------------------------- LTX-2-shaped format


def test_ltx2_shaped_format_geometry():
    fmt = LTX2_SHAPED
    assert fmt.frame_rule == "8k+1" and fmt.valid_frames(121) and fmt.valid_frames(97) and not fmt.valid_frames(120)
    assert fmt.nearest_frames(100) == (97, 105)
    # reference: 768×512×121 → F'·H'·W' = 16·16·24 = 6144 video tokens; 960×544×49 → 7·17·30
    assert fmt.latent_shape(768, 512, 121) == (128, 16, 16, 24)
    assert fmt.latent_shape(960, 544, 49) == (128, 7, 17, 30)
    assert fmt.pixel_frames(16) == 121
    with pytest.raises(ValueError, match="width 500 is not a multiple of 32: use 480 or 512.*not of the form 8k\\+1: "
                                         "use 113 or 121"):
        fmt.check_size(500, 512, 120)
    # a two-stage pipeline's coarser grid (stage 1 at half size)
    assert fmt.size_problems(768, 544, 121, size_multiple=64, reason="two-stage") == [
        "height 544 is not a multiple of 64 (two-stage): use 512 or 576"]


def test_ltx2_shaped_normalisation_is_held_by_the_vae():
    latent = torch.randn(1, 128, 2, 2, 2)
    assert LTX2_SHAPED.normalization == "per_channel_statistics"
    assert LTX2_SHAPED.to_model(latent) is latent and LTX2_SHAPED.from_model(latent) is latent


def test_ltx2_shaped_audio_geometry_matches_the_diffusers_pipeline():
    from diffusers import AutoencoderKLLTX2Audio

    with torch.device("meta"):
        vae = AutoencoderKLLTX2Audio()
    cfg = vae.config
    rate = cfg.sample_rate / cfg.mel_hop_length / vae.temporal_compression_ratio
    assert (LTX2_SHAPED.audio.channels, LTX2_SHAPED.audio.mel_bins, LTX2_SHAPED.audio.latents_per_second,
            LTX2_SHAPED.audio.sample_rate) == (cfg.latent_channels, cfg.mel_bins // vae.mel_compression_ratio, rate,
                                               cfg.sample_rate)
    # diffusers pipelines/ltx2/pipeline_ltx2.py: audio_num_frames = round(num_frames / frame_rate · rate)
    for frames, fps in ((121, 24.0), (97, 25.0), (1, 24.0), (241, 24.0), (49, 30.0)):
        assert LTX2_SHAPED.audio_latent_length(frames / fps) == round(frames / fps * rate)
    assert LTX2_SHAPED.audio_latent_length(121 / 24) == 126  # reference: 121 frames at 24 fps → 126
    assert LTX2_SHAPED.audio.latent_shape(2.0) == (8, 50, 16)
    with pytest.raises(ValueError, match="finite number ≥ 0"):
        LTX2_SHAPED.audio_latent_length(-1.0)


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="size_multiple 20 must be a multiple of spatial_factor 8"):
        LatentFormat("x", 16, 8, 4, 20, 24.0)
    with pytest.raises(ValueError, match="scaling_factor must be a finite number > 0"):
        LatentFormat("x", 16, 8, 4, 16, 24.0, scaling_factor=0.0)
    with pytest.raises(ValueError, match="temporal_factor must be an integer ≥ 1"):
        LatentFormat("x", 16, 8, 0, 16, 24.0)
    with pytest.raises(ValueError, match="default_fps"):
        LatentFormat("x", 16, 8, 4, 16, math.nan)
    with pytest.raises(TypeError, match="audio must be an AudioLatentFormat"):
        LatentFormat("x", 16, 8, 4, 16, 24.0, audio=(8, 16, 25, 16000))
    with pytest.raises(ValueError, match="mel_bins must be an integer ≥ 1"):
        AudioLatentFormat(8, 0, 25.0, 16000)
    with pytest.raises(ValueError, match="needs a group named 'index'"):
        LoRAKeyGrammar(pattern="x", block_index=r"blocks\.(\d+)")
    with pytest.raises(ValueError, match="not a regular expression"):
        LoRAKeyGrammar(pattern="(")
    with pytest.raises(ValueError, match="lora_targets"):
        ModelFamily("x", "X", K5_LATENT_FORMAT, (), None, LTX2_GRAMMAR)


# ----------------------------------------------------------------------------------------------------- registry


K5_NAMES = ["text_transformer_blocks.1.self_attention.to_query", "visual_transformer_blocks.31.feed_forward.in_layer"]
LTX_NAMES = [f"transformer_blocks.{i}.attn1.to_q" for i in (0, 7, 47)]


def test_guess_picks_the_registered_family(registry):
    assert guess_family(K5_NAMES) is K5_FAMILY and guess_family(LTX_NAMES) is LTX2_FAMILY
    assert guess_family(["lora_unet_transformer_blocks_3_attn2_to_k"]) is LTX2_FAMILY  # kohya separators
    assert guess_family(LTX_NAMES + K5_NAMES[:1]) is LTX2_FAMILY  # most names win
    assert guess_model_family(LTX_NAMES) == "LTX-2 (shaped) (highest block 47; the 19B model has 48 blocks)"
    assert guess_model_family(K5_NAMES) == ("Kandinsky 5 (highest text block 1, visual block 31; Video Lite has 2 "
                                            "text / 32 visual blocks, Video Pro 4 / 60)")
    wan = ["blocks.0.self_attn.q", "blocks.1.ffn.0"]
    assert guess_family(wan) is None and guess_model_family(wan) == "Wan 2.x"
    assert guess_family(["foo.bar"]) is None and guess_model_family(["foo.bar"]) == "an unknown model"
    assert get_family("ltx-2-shaped") is LTX2_FAMILY
    assert [f.name for f in registered_families()][-1] == "ltx-2-shaped"


def test_registry_lookup_and_replacement(registry):
    with pytest.raises(LookupError, match="no model family 'ltx-3' .*kandinsky-5, ltx-2-shaped"):
        get_family("ltx-3")
    with pytest.raises(TypeError, match="takes a ModelFamily"):
        register_family(LTX2_SHAPED)
    renamed = ModelFamily("ltx-2-shaped", "LTX-2 again", LTX2_SHAPED, ("attn1.to_q",), None, LTX2_GRAMMAR)
    register_family(renamed)
    assert get_family("ltx-2-shaped") is renamed and len(registered_families()) == len(registry)
    assert guess_model_family(LTX_NAMES).startswith("LTX-2 again (highest block 47")


def test_lora_files_use_the_registered_grammars(registry, tmp_path):
    g = torch.Generator().manual_seed(0)
    paths = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.12.attn2.to_out.0"]
    lora = LoRAWeights({p: (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0) for p in paths})
    path = save_lora(tmp_path / "ltx.safetensors", lora, metadata={}, dtype=torch.float32, layout="kohya")
    with safe_open(path, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "ltx-2-shaped"
        assert "lora_unet_transformer_blocks_12_attn2_to_out_0.lora_down.weight" in set(f.keys())
    loaded = load_lora(path)  # kohya names resolved by the registered grammar, no module names needed
    assert sorted(loaded.layers) == sorted(paths) and loaded.format == "kohya"
    for p in paths:
        assert all(torch.equal(a, b) for a, b in zip(loaded.layers[p][:2], lora.layers[p][:2])), p


def test_without_the_family_its_kohya_names_are_not_resolved(monkeypatch, tmp_path):
    """Only Kandinsky 5 registered: the same file needs module names, and saving needs an architecture."""
    monkeypatch.setattr(family_module, "_FAMILIES", {K5_FAMILY.name: K5_FAMILY})
    lora = LoRAWeights({"transformer_blocks.0.attn1.to_q": (torch.zeros(2, 8), torch.zeros(8, 2), 2.0)})
    kohya = {"lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
             "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(LoRAError, match=r"no registered model family \(Kandinsky 5\) resolves.*pass module_names"):
        load_lora(kohya)
    with pytest.raises(LoRAError, match="an unknown model; pass architecture= .*kandinsky-5"):
        save_lora(tmp_path / "x.safetensors", lora, metadata={})
    loaded = load_lora(kohya, module_names=["", "transformer_blocks", "transformer_blocks.0",
                                            "transformer_blocks.0.attn1", "transformer_blocks.0.attn1.to_q"])
    assert list(loaded.layers) == ["transformer_blocks.0.attn1.to_q"]
    saved = save_lora(tmp_path / "y.safetensors", lora, metadata={}, architecture="ltx-2")
    with safe_open(saved, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "ltx-2"


def test_the_ltx2_family_has_the_reference_facts_and_grammar():
    from cinetune.ltx2.family import LTX2_FAMILY as REAL

    fmt = REAL.latent_format
    shaped = {k: v for k, v in vars(LTX2_SHAPED).items() if k != "name"}
    assert {k: v for k, v in vars(fmt).items() if k != "name"} == shaped
    assert get_family("ltx-2") is REAL
    grammar = REAL.lora_grammar
    assert grammar.resolve_kohya("transformer_blocks_7_audio_to_video_attn_to_out_0") == \
        "transformer_blocks.7.audio_to_video_attn.to_out.0"
    assert grammar.resolve_kohya("transformer_blocks_3_audio_ff_net_0_proj") == "transformer_blocks.3.audio_ff.net.0.proj"
    assert grammar.resolve_kohya("visual_transformer_blocks_0_self_attention_to_query") is None
    assert not grammar.matches("visual_transformer_blocks.0.self_attention.to_query")
    assert guess_family(["transformer_blocks.47.video_to_audio_attn.to_q"]) is REAL
    assert guess_family(["visual_transformer_blocks.3.cross_attention.to_key"]) is K5_FAMILY
