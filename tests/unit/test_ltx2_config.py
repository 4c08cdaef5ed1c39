"""LTX-2 DiT config: metadata parsing (and its traps), refusals of NVFP4 and LTX-2.3+ files, shape inference, variant
detection, the fp8 keep rule and LoRA targets on the real key list, key names official ↔ diffusers."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from cinetune.core.checkpoint import CheckpointError, TensorInfo
from cinetune.ltx2.config import (
    DISTILLED_SIGMAS,
    LTX2_19B,
    LTX2_LORA_TARGETS,
    VARIANTS,
    LTX2TransformerConfig,
    NotLTX2CheckpointError,
    UnsupportedLTX2Error,
    check_supported,
    detect_variant,
    diffusers_to_official,
    dit_shapes,
    ltx2_fp8_keep_high_precision,
    official_to_diffusers,
    parse_model_version,
    tiny_transformer_metadata,
)

SHAPES_FILE = Path(__file__).resolve().parents[3] / "shared/reference/ltx2_state_dict_shapes.txt"

# ``config.transformer`` of ltx-2-19b-dev.safetensors as quoted verbatim in the reference notes (ltx2.md §1.3).
METADATA_19B = {
    "_class_name": "AVTransformer3DModel", "_diffusers_version": "0.25.1", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 128, "attention_type": "default", "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048, "audio_num_attention_heads": 32, "audio_out_channels": 128,
    "audio_positional_embedding_max_pos": [20], "av_ca_timestep_scale_multiplier": 1000.0, "av_cross_ada_norm": True,
    "caption_channels": 3840, "causal_temporal_positioning": True, "connector_attention_head_dim": 128,
    "connector_norm_output": True, "connector_num_attention_heads": 30, "connector_num_layers": 2,
    "connector_num_learnable_registers": 128, "connector_positional_embedding_max_pos": [4096],
    "cross_attention_dim": 4096, "cross_attention_norm": True, "double_self_attention": False, "dropout": 0.0,
    "frequencies_precision": "float64", "in_channels": 128, "norm_elementwise_affine": False, "norm_eps": 1e-06,
    "norm_num_groups": 32, "num_attention_heads": 32, "num_embeds_ada_norm": 1000, "num_layers": 48,
    "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 128,
    "positional_embedding_max_pos": [20, 2048, 2048], "positional_embedding_theta": 10000.0,
    "positional_embedding_type": "rope", "qk_norm": "rms_norm", "rope_type": "split", "share_ff": False,
    "standardization_norm": "rms_norm", "timestep_scale_multiplier": 1000, "upcast_attention": False,
    "use_audio_video_cross_attention": True, "use_embeddings_connector": True, "use_linear_projection": False,
    "use_middle_indices_grid": True,
}

# The official fp8 exclusions, as listed in Lightricks/LTX-2 ltx_core/quantization/fp8_scaled_mm.py
# (EXCLUDED_LAYER_SUBSTRINGS, matched as substrings of the layer name).
OFFICIAL_FP8_EXCLUDED = (
    "patchify_proj", "adaln_single", "av_ca_video_scale_shift_adaln_single", "av_ca_a2v_gate_adaln_single",
    "caption_projection", "proj_out", "audio_patchify_proj", "audio_adaln_single",
    "av_ca_audio_scale_shift_adaln_single", "av_ca_v2a_gate_adaln_single", "audio_caption_projection",
    "audio_proj_out", "transformer_blocks.0.", *[f"transformer_blocks.{i}." for i in range(43, 48)],
)


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the official combined 19B checkpoint (name → shape) from the shared reference listing, with
    ``{a..b}`` block ranges expanded; skips the test when the listing is not there."""
    if not SHAPES_FILE.is_file():
        pytest.skip(f"reference listing {SHAPES_FILE} is not available")
    shapes: dict[str, tuple[int, ...]] = {}
    for line in SHAPES_FILE.read_text().splitlines():
        m = re.match(r"^(\S+)\s+\[([\d, ]*)\]\s*$", line)
        if not m:
            continue
        name, dims = m.group(1), tuple(int(d) for d in m.group(2).split(",") if d.strip())
        r = re.search(r"\{(\d+)\.\.(\d+)\}", name)
        if r is None:
            shapes[name] = dims
        else:
            for i in range(int(r.group(1)), int(r.group(2)) + 1):
                shapes[name[:r.start()] + str(i) + name[r.end():]] = dims
    return shapes


def infos(shapes: dict[str, tuple[int, ...]], dtype: str = "BF16", **dtypes: str) -> dict[str, TensorInfo]:
    return {k: TensorInfo(v, dtypes.get(k, dtype)) for k, v in shapes.items()}


TINY_DIT_KEYS = {  # the DiT tensors from_shapes reads, for the tiny config, with the combined-file prefix
    "model.diffusion_model.patchify_proj.weight": (32, 128), "model.diffusion_model.proj_out.weight": (128, 32),
    "model.diffusion_model.caption_projection.linear_1.weight": (32, 24),
    "model.diffusion_model.audio_patchify_proj.weight": (16, 128),
    "model.diffusion_model.audio_proj_out.weight": (128, 16),
    "model.diffusion_model.audio_adaln_single.linear.weight": (96, 16),
    "model.diffusion_model.transformer_blocks.0.attn2.to_k.weight": (32, 32),
    "model.diffusion_model.transformer_blocks.1.attn2.to_k.weight": (32, 32),
    "model.diffusion_model.transformer_blocks.0.audio_attn2.to_k.weight": (16, 16),
    "model.diffusion_model.video_embeddings_connector.learnable_registers": (128, 24),
    "vae.decoder.conv_in.conv.weight": (64, 128, 3, 3, 3),
}


# ---------------------------------------------------------------------------------------------------------------
# Metadata


def test_verbatim_19b_metadata_gives_the_19b_config():
    cfg = LTX2TransformerConfig.from_metadata(METADATA_19B)
    assert cfg == LTX2_19B
    assert (cfg.inner_dim, cfg.audio_inner_dim, cfg.num_layers) == (4096, 2048, 48)
    assert cfg.rope_type == "split" and cfg.double_precision_rope and cfg.av_ca_factor == 1.0
    assert cfg.cross_modal_max_pos == 20


def test_whole_config_dict_is_accepted():
    assert LTX2TransformerConfig.from_metadata({"transformer": METADATA_19B, "vae": {}}) == LTX2_19B


def test_absent_keys_take_the_19b_values_not_the_official_code_defaults():
    # Official LTXModelConfigurator defaults are rope_type "interleaved", av_ca multiplier 1, float32 RoPE grid.
    cfg = LTX2TransformerConfig.from_metadata({})
    assert (cfg.rope_type, cfg.av_ca_timestep_scale_multiplier, cfg.frequencies_precision) == (
        "split", 1000.0, "float64")


def test_present_keys_always_win():
    md = dict(METADATA_19B, rope_type="interleaved", av_ca_timestep_scale_multiplier=1,
              frequencies_precision="float32", positional_embedding_theta=5000.0)
    cfg = LTX2TransformerConfig.from_metadata(md)
    assert cfg.rope_type == "interleaved" and not cfg.double_precision_rope
    assert cfg.av_ca_timestep_scale_multiplier == 1.0 and cfg.av_ca_factor == pytest.approx(1e-3)
    assert cfg.positional_embedding_theta == 5000.0


def test_tiny_metadata_builds():
    cfg = LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())
    assert (cfg.num_layers, cfg.inner_dim, cfg.audio_inner_dim, cfg.caption_channels) == (2, 32, 16, 24)
    assert cfg.connector_num_attention_heads * cfg.connector_attention_head_dim == cfg.caption_channels


@pytest.mark.parametrize("value", ["rope", "yarn", "ntk"])
def test_unknown_rope_type_is_refused(value):
    with pytest.raises(CheckpointError, match="rope_type.*'split'"):
        LTX2TransformerConfig.from_metadata(dict(METADATA_19B, rope_type=value))


@pytest.mark.parametrize("key,value", [("qk_norm", "layer_norm"), ("activation_fn", "gelu"),
                                       ("use_audio_video_cross_attention", False), ("share_ff", True)])
def test_pinned_keys_with_other_values_are_refused(key, value):
    with pytest.raises(CheckpointError, match=key):
        LTX2TransformerConfig.from_metadata(dict(METADATA_19B, **{key: value}))


@pytest.mark.parametrize("key", ["apply_gated_attention", "cross_attention_adaln", "caption_proj_before_connector",
                                 "connector_apply_gated_attention"])
def test_ltx23_settings_are_refused(key):
    with pytest.raises(UnsupportedLTX2Error, match=r"this is an LTX-2\.3 \(22B\) file; Cinetune supports LTX-2 19B"):
        LTX2TransformerConfig.from_metadata(dict(METADATA_19B, **{key: True}))


@pytest.mark.parametrize("key,value", [("ff_bias", False), ("use_prompt_adaln_single", False),
                                       ("use_keyframes_abs_pos_embedding", True)])
def test_ltx25_settings_are_refused(key, value):
    with pytest.raises(UnsupportedLTX2Error, match=r"this is an LTX-2\.5 file; Cinetune supports LTX-2 19B"):
        LTX2TransformerConfig.from_metadata(dict(METADATA_19B, **{key: value}))


def test_false_23_settings_are_accepted():
    md = dict(METADATA_19B, apply_gated_attention=False, cross_attention_adaln=False,
              caption_proj_before_connector=False)
    assert LTX2TransformerConfig.from_metadata(md) == LTX2_19B


@pytest.mark.parametrize("key,value", [("num_layers", "48"), ("num_layers", 47.5), ("positional_embedding_max_pos", 20),
                                       ("use_middle_indices_grid", 1)])
def test_wrong_types_are_refused(key, value):
    with pytest.raises(CheckpointError, match=key):
        LTX2TransformerConfig.from_metadata(dict(METADATA_19B, **{key: value}))


def test_inconsistent_widths_are_refused():
    with pytest.raises(CheckpointError, match="cross_attention_dim"):
        LTX2TransformerConfig.from_metadata(dict(METADATA_19B, cross_attention_dim=3840))
    with pytest.raises(CheckpointError, match="divisible"):
        LTX2TransformerConfig.from_metadata(dict(METADATA_19B, num_attention_heads=24, attention_head_dim=100,
                                                 cross_attention_dim=2400))


# ---------------------------------------------------------------------------------------------------------------
# Refused files


def test_model_version_parsing():
    assert parse_model_version("2.3.0") == (2, 3, 0)
    assert parse_model_version("2.3.rc1") == (2, 3)
    assert parse_model_version("2.4-rc2") == (2, 4)
    assert parse_model_version(None) == () and parse_model_version("") == ()


@pytest.mark.parametrize("version,what", [("2.3.0", r"an LTX-2\.3 \(22B\) file"), ("2.5.1", r"an LTX-2\.5 file")])
def test_newer_model_version_is_refused(version, what):
    with pytest.raises(UnsupportedLTX2Error, match=what + ".*Cinetune supports LTX-2 19B"):
        check_supported(infos(TINY_DIT_KEYS), {"model_version": version})


def test_19b_file_without_model_version_passes():
    check_supported(infos(TINY_DIT_KEYS), {"config": json.dumps({"transformer": METADATA_19B})})
    check_supported(infos(TINY_DIT_KEYS), {"model_version": "2.0"})


@pytest.mark.parametrize("extra", [
    "model.diffusion_model.transformer_blocks.0.attn1.to_gate_logits.weight",
    "text_embedding_projection.video_aggregate_embed.weight",
    "vocoder.bwe_generator.conv_pre.weight",
])
def test_ltx23_tensors_are_refused(extra):
    with pytest.raises(UnsupportedLTX2Error, match=r"LTX-2\.3 \(22B\)"):
        check_supported(infos({**TINY_DIT_KEYS, extra: (4, 4)}))


def test_ltx23_metadata_in_the_file_is_refused():
    md = {"config": json.dumps({"transformer": dict(METADATA_19B, apply_gated_attention=True)})}
    with pytest.raises(UnsupportedLTX2Error, match="apply_gated_attention"):
        check_supported(infos(TINY_DIT_KEYS), md)


def test_nvfp4_files_are_refused():
    key = "model.diffusion_model.transformer_blocks.1.attn1.to_q"
    packed = {**TINY_DIT_KEYS, key + ".weight": (32, 16), key + ".weight_scale": (32, 2), key + ".weight_scale_2": ()}
    with pytest.raises(UnsupportedLTX2Error, match="NVFP4"):
        check_supported(infos(packed))
    only_packed = {**TINY_DIT_KEYS, key + ".weight": (32, 16)}
    with pytest.raises(UnsupportedLTX2Error, match="NVFP4"):
        check_supported(infos(only_packed, **{key + ".weight": "U8"}))


# ---------------------------------------------------------------------------------------------------------------
# Shapes


def test_from_shapes_of_the_tiny_layout():
    expected = LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())
    cfg = LTX2TransformerConfig.from_shapes(TINY_DIT_KEYS, attention_head_dim=16, audio_attention_head_dim=8,
                                            connector_num_attention_heads=2, connector_attention_head_dim=12)
    assert cfg == expected


def test_from_shapes_of_the_official_listing():
    assert LTX2TransformerConfig.from_shapes(reference_shapes()) == LTX2_19B


def test_dit_shapes_drops_other_components():
    dit = dit_shapes(TINY_DIT_KEYS)
    assert "patchify_proj.weight" in dit and not any(k.startswith(("vae.", "video_embeddings")) for k in dit)


@pytest.mark.parametrize("keys,what", [
    ({"visual_transformer_blocks.0.cross_attention.key_norm.weight": (64,)}, "Kandinsky 5|another model family"),
    ({"patchify_proj.weight": (2048, 128), "adaln_single.linear.weight": (12288, 2048),
      "transformer_blocks.0.attn1.to_q.weight": (2048, 2048)}, "LTX-Video"),
    ({"decoder.conv_in.conv.weight": (512, 128, 3, 3, 3)}, "VAE"),
])
def test_other_files_are_named(keys, what):
    with pytest.raises(NotLTX2CheckpointError, match=what):
        LTX2TransformerConfig.from_shapes(keys)
    with pytest.raises(NotLTX2CheckpointError, match=what):
        detect_variant("model.safetensors", infos(keys))


def test_missing_tensor_is_named():
    keys = {k: v for k, v in TINY_DIT_KEYS.items() if "proj_out" not in k or "audio" in k}
    with pytest.raises(CheckpointError, match="proj_out.weight"):
        LTX2TransformerConfig.from_shapes(keys, attention_head_dim=16, audio_attention_head_dim=8)


# ---------------------------------------------------------------------------------------------------------------
# Variants


@pytest.mark.parametrize("name,fp8,expected", [
    ("ltx-2-19b-dev.safetensors", False, "ltx2_19b_dev"),
    ("ltx-2-19b-dev-fp8.safetensors", True, "ltx2_19b_dev_fp8"),
    ("ltx-2-19b-distilled.safetensors", False, "ltx2_19b_distilled"),
    ("models/checkpoints/LTX-2-19B-Distilled-FP8.safetensors", True, "ltx2_19b_distilled_fp8"),
    ("my_finetune.safetensors", False, "ltx2_19b_dev"),
])
def test_variant_detection(name, fp8, expected):
    quantised = "model.diffusion_model.transformer_blocks.1.attn2.to_k.weight"
    file = infos(TINY_DIT_KEYS, **({quantised: "F8_E4M3"} if fp8 else {}))
    v = detect_variant(name, file)
    assert v.id == expected and v.fp8 == fp8
    assert name.lower().endswith(v.file_names[0]) or name == "my_finetune.safetensors"


def test_only_dit_tensors_decide_fp8():
    file = infos(TINY_DIT_KEYS, **{"vae.decoder.conv_in.conv.weight": "F8_E4M3"})
    assert not detect_variant("ltx-2-19b-dev.safetensors", file).fp8


def test_variant_settings():
    dev, distilled = VARIANTS["ltx2_19b_dev"], VARIANTS["ltx2_19b_distilled"]
    assert dev.steps == 40 and dev.sigmas is None and dev.video_guidance.enabled and dev.audio_guidance.enabled
    assert (dev.video_guidance.cfg, dev.audio_guidance.cfg, dev.video_guidance.stg_blocks) == (3.0, 7.0, (29,))
    assert distilled.sigmas == DISTILLED_SIGMAS and distilled.steps == 8
    assert not distilled.video_guidance.enabled and not distilled.audio_guidance.enabled
    assert {v.file_names[0] for v in VARIANTS.values()} == {
        "ltx-2-19b-dev.safetensors", "ltx-2-19b-dev-fp8.safetensors", "ltx-2-19b-distilled.safetensors",
        "ltx-2-19b-distilled-fp8.safetensors"}


def test_requested_variant():
    file = infos(TINY_DIT_KEYS)
    assert detect_variant("x.safetensors", file, requested="ltx2_19b_distilled").distilled
    with pytest.raises(ValueError, match="ltx2_19b_dev'"):
        detect_variant("x.safetensors", file, requested="ltx2_19b_dev_fp8")
    with pytest.raises(ValueError, match="valid: auto, ltx2_19b_dev"):
        detect_variant("x.safetensors", file, requested="pro")


def test_variant_detection_refuses_unsupported_files():
    with pytest.raises(UnsupportedLTX2Error):
        detect_variant("ltx-2.3-22b-dev.safetensors", infos(TINY_DIT_KEYS), {"model_version": "2.3.0"})


# ---------------------------------------------------------------------------------------------------------------
# fp8 rule and LoRA targets on the real key list


def _dit_linear_layers(shapes) -> list[str]:
    dit = dit_shapes(shapes)
    return sorted(k[: -len(".weight")] for k, v in dit.items() if k.endswith(".weight") and len(v) == 2)


def test_fp8_rule_matches_the_official_exclusions():
    layers = _dit_linear_layers(reference_shapes())
    assert len(layers) == 26 + 48 * 28  # 26 Linear layers outside the blocks (6 AdaLNs × 3, 4 projections, 2×2
    # caption projection layers), 28 per block
    for name in layers:
        official_keep = any(s in name for s in OFFICIAL_FP8_EXCLUDED)
        assert ltx2_fp8_keep_high_precision(name) == official_keep, name
    quantised = [n for n in layers if not ltx2_fp8_keep_high_precision(n)]
    assert len(quantised) == 42 * 28


def test_fp8_rule_keeps_norms_and_tables():
    for name in ("transformer_blocks.7.attn1.q_norm", "transformer_blocks.7.scale_shift_table",
                 "transformer_blocks.7.scale_shift_table_a2v_ca_audio", "norm_out", "scale_shift_table"):
        assert ltx2_fp8_keep_high_precision(name)
    assert not ltx2_fp8_keep_high_precision("transformer_blocks.10.ff.net.0.proj")
    assert ltx2_fp8_keep_high_precision("transformer_blocks.0.ff.net.0.proj")


def test_lora_targets_select_every_attention_projection():
    layers = _dit_linear_layers(reference_shapes())
    chosen = [n for n in layers if n.startswith("transformer_blocks.")
              and any(n.endswith("." + t) for t in LTX2_LORA_TARGETS)]
    assert len(chosen) == 48 * 6 * 4
    modules = {n.split(".")[2] for n in chosen}
    assert modules == {"attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"}


# ---------------------------------------------------------------------------------------------------------------
# diffusers names and config


def test_key_conversion_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    shapes = reference_shapes()
    official = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    theirs = convert_ltx2_transformer_to_diffusers(dict(official))
    ours = official_to_diffusers(dit_shapes(official))
    assert set(ours) == set(theirs)
    assert set(diffusers_to_official(ours)) == set(dit_shapes(official))


def test_diffusers_config_round_trip():
    cfg = LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())
    assert LTX2TransformerConfig.from_diffusers_config(cfg.diffusers_kwargs()) == dataclass_without_connectors(cfg)
    with pytest.raises(UnsupportedLTX2Error, match="gated_attn"):
        LTX2TransformerConfig.from_diffusers_config(dict(cfg.diffusers_kwargs(), gated_attn=True))


def test_published_diffusers_config_gives_the_19b_config():
    import inspect

    from diffusers import LTX2VideoTransformer3DModel

    params = inspect.signature(LTX2VideoTransformer3DModel.__init__).parameters
    config = {k: p.default for k, p in params.items() if k != "self"}
    config["rope_type"] = "split"  # Lightricks/LTX-2 transformer/config.json (the class default is "interleaved")
    assert LTX2TransformerConfig.from_diffusers_config(config) == LTX2_19B
    with pytest.raises(CheckpointError, match="vae_scale_factors"):
        LTX2TransformerConfig.from_diffusers_config(dict(config, vae_scale_factors=[8, 16, 16]))


def dataclass_without_connectors(cfg: LTX2TransformerConfig) -> LTX2TransformerConfig:
    """The config with 19B connector settings (a diffusers transformer config has none)."""
    fields = {f.name: f.default for f in dataclasses.fields(cfg) if f.name.startswith("connector_")}
    return dataclasses.replace(cfg, **fields)
