"""Kandinsky 5 configs, variant table and detection from tensor names/shapes (no tensor data)."""

from __future__ import annotations

import pytest
import torch

from cinetune.core.checkpoint import CheckpointError, TensorInfo
from cinetune.k5.config import (
    DEFAULT_NEGATIVE_PROMPT,
    VARIANTS,
    K5Config,
    NotK5CheckpointError,
    detect_config,
    resolve_variant,
)
from cinetune.k5.dit import Kandinsky5DiT


def documented_shapes(D, F, Tm, n_text, n_visual, hd, cin=33, text_dim=3584, pooled_dim=768):
    """State-dict names and shapes of the official checkpoints, written out from the published key list."""
    s = {
        "time_embeddings.in_layer.weight": (Tm, D), "time_embeddings.in_layer.bias": (Tm,),
        "time_embeddings.out_layer.weight": (Tm, Tm), "time_embeddings.out_layer.bias": (Tm,),
        "text_embeddings.in_layer.weight": (D, text_dim), "text_embeddings.in_layer.bias": (D,),
        "text_embeddings.norm.weight": (D,), "text_embeddings.norm.bias": (D,),
        "pooled_text_embeddings.in_layer.weight": (Tm, pooled_dim), "pooled_text_embeddings.in_layer.bias": (Tm,),
        "pooled_text_embeddings.norm.weight": (Tm,), "pooled_text_embeddings.norm.bias": (Tm,),
        "visual_embeddings.in_layer.weight": (D, 4 * cin), "visual_embeddings.in_layer.bias": (D,),
        "out_layer.modulation.out_layer.weight": (2 * D, Tm), "out_layer.modulation.out_layer.bias": (2 * D,),
        "out_layer.out_layer.weight": (64, D), "out_layer.out_layer.bias": (64,),
    }

    def attn(prefix):
        for proj in ("to_query", "to_key", "to_value", "out_layer"):
            s[f"{prefix}.{proj}.weight"] = (D, D)
            s[f"{prefix}.{proj}.bias"] = (D,)
        s[f"{prefix}.query_norm.weight"] = (hd,)
        s[f"{prefix}.key_norm.weight"] = (hd,)

    for i in range(n_text):
        p = f"text_transformer_blocks.{i}"
        s[f"{p}.text_modulation.out_layer.weight"] = (6 * D, Tm)
        s[f"{p}.text_modulation.out_layer.bias"] = (6 * D,)
        attn(f"{p}.self_attention")
        s[f"{p}.feed_forward.in_layer.weight"] = (F, D)
        s[f"{p}.feed_forward.out_layer.weight"] = (D, F)
    for j in range(n_visual):
        p = f"visual_transformer_blocks.{j}"
        s[f"{p}.visual_modulation.out_layer.weight"] = (9 * D, Tm)
        s[f"{p}.visual_modulation.out_layer.bias"] = (9 * D,)
        attn(f"{p}.self_attention")
        attn(f"{p}.cross_attention")
        s[f"{p}.feed_forward.in_layer.weight"] = (F, D)
        s[f"{p}.feed_forward.out_layer.weight"] = (D, F)
    return s


LITE = dict(D=1792, F=7168, Tm=512, n_text=2, n_visual=32, hd=64)
PRO = dict(D=4096, F=16384, Tm=1024, n_text=4, n_visual=60, hd=128)
IMAGE_T2I = dict(D=2560, F=10240, Tm=512, n_text=2, n_visual=50, hd=128, cin=16)


@pytest.mark.parametrize("dims, expected, family, tensors, params", [
    (LITE, (1792, 7168, 512, 2, 32, (16, 24, 24), 33), "lite", 814, 2_007_702_848),
    (PRO, (4096, 16384, 1024, 4, 60, (32, 48, 48), 33), "pro", 1514, 19_311_325_248),
    (IMAGE_T2I, (2560, 10240, 512, 2, 50, (32, 48, 48), 16), "image", 1246, 6_022_080_576),
], ids=["lite", "pro", "image_t2i"])
def test_detect_full_size_configs_from_shapes(dims, expected, family, tensors, params):
    shapes = documented_shapes(**dims)
    assert len(shapes) == tensors  # the documented tensor count
    cfg = detect_config(shapes)
    assert (cfg.model_dim, cfg.ff_dim, cfg.time_dim, cfg.num_text_blocks, cfg.num_visual_blocks, cfg.axes_dims,
            cfg.visual_embed_dim) == expected
    assert cfg.head_dim == dims["hd"] and cfg.num_heads == dims["D"] // dims["hd"] and cfg.family == family
    assert cfg.in_visual_dim == 16 and cfg.out_visual_dim == 16 and cfg.patch_size == (1, 2, 2)
    # The module tree built from the config has exactly the documented names and shapes (and parameter count).
    with torch.device("meta"):
        model = Kandinsky5DiT(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == params


def test_detect_accepts_tensor_infos_and_small_custom_models():
    shapes = documented_shapes(D=64, F=96, Tm=32, n_text=1, n_visual=3, hd=32, text_dim=40, pooled_dim=24)
    cfg = detect_config({k: TensorInfo(v, "BF16") for k, v in shapes.items()})
    assert cfg == K5Config(64, 96, 32, 1, 3, (8, 12, 12), in_text_dim=40, in_text_dim2=24)
    assert cfg.family == "custom"


@pytest.mark.parametrize("keys, says", [
    (["model.diffusion_model.transformer_blocks.0.attn1.to_q.weight",
      "model.diffusion_model.audio_adaln_single.linear.weight", "vae.encoder.conv_in.conv.weight"], "LTX-2"),
    (["encoder.down_blocks.0.resnets.0.conv1.conv.weight", "decoder.up_blocks.0.resnets.0.conv1.conv.weight"], "VAE"),
    (["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"], "text encoder"),
    (["text_model.encoder.layers.0.mlp.fc1.weight"], "text encoder"),
    (["lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight"], "LoRA"),
    (["some.random.weight"], "not a Kandinsky 5 DiT"),
])
def test_detect_names_what_a_foreign_file_looks_like(keys, says):
    with pytest.raises(NotK5CheckpointError, match=says) as info:
        detect_config({k: (4, 4) for k in keys})
    assert isinstance(info.value, CheckpointError)
    assert "Kandinsky 5 DiT .safetensors" in str(info.value) and "diffusion_models" in str(info.value)


def test_detect_reports_a_prefix_and_a_missing_detection_tensor():
    shapes = documented_shapes(D=64, F=96, Tm=32, n_text=1, n_visual=1, hd=32, text_dim=40, pooled_dim=24)
    with pytest.raises(NotK5CheckpointError, match="prefix 'model.diffusion_model.'"):
        detect_config({"model.diffusion_model." + k: v for k, v in shapes.items()})
    del shapes["out_layer.out_layer.weight"]
    with pytest.raises(NotK5CheckpointError, match="out_layer.out_layer.weight"):
        detect_config(shapes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_dim=100), "multiple of head_dim"),
    (dict(axes_dims=(7, 12, 12)), "even"),
    (dict(visual_embed_dim=20), "visual_embed_dim"),
    (dict(ff_dim=0), "ff_dim"),
])
def test_config_validation(kwargs, message):
    base = dict(model_dim=64, ff_dim=96, time_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 12, 12))
    with pytest.raises(ValueError, match=message):
        K5Config(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Variants

RELEASED_FILES = [  # every released video DiT file (kandinskylab/kandinsky-5 README, download_models.py)
    "kandinsky5lite_t2v_sft_5s.safetensors", "kandinsky5lite_t2v_sft_10s.safetensors",
    "kandinsky5lite_t2v_pretrain_5s.safetensors", "kandinsky5lite_t2v_pretrain_10s.safetensors",
    "kandinsky5lite_t2v_nocfg_5s.safetensors", "kandinsky5lite_t2v_nocfg_10s.safetensors",
    "kandinsky5lite_t2v_distilled16steps_5s.safetensors", "kandinsky5lite_t2v_distilled16steps_10s.safetensors",
    "kandinsky5lite_i2v_5s.safetensors", "kandinsky5pro_t2v_sft_5s.safetensors",
    "kandinsky5pro_t2v_sft_10s.safetensors", "kandinsky5pro_i2v_sft_5s.safetensors",
    "kandinsky5pro_t2v_pretrain_5s.safetensors", "kandinsky5pro_t2v_pretrain_10s.safetensors",
]


def _cfg(dims):
    return detect_config(documented_shapes(**dims))


def test_every_released_video_checkpoint_has_a_variant():
    files = {f for v in VARIANTS.values() for f in v.file_names}
    assert set(RELEASED_FILES) <= files
    for pro in ("kandinsky5pro_t2v_sft_5s", "kandinsky5pro_t2v_sft_10s", "kandinsky5pro_i2v_sft_5s"):
        assert {v.id for v in VARIANTS.values() if f"{pro}.safetensors" in v.file_names} == {
            pro.removeprefix("kandinsky5"), pro.removeprefix("kandinsky5") + "_hd"}


@pytest.mark.parametrize("vid, attention, P, rope, steps, guidance, frames", [
    ("lite_t2v_sft_5s", "full", None, (1, 2, 2), 50, 5.0, 121),
    ("lite_t2v_sft_10s", "nabla", 0.9, (1, 2, 2), 50, 5.0, 241),
    ("lite_t2v_nocfg_5s", "full", None, (1, 2, 2), 50, 1.0, 121),
    ("lite_t2v_distilled16steps_5s", "full", None, (1, 2, 2), 16, 1.0, 121),
    ("lite_t2v_distilled16steps_10s", "nabla", 0.9, (1, 2, 2), 16, 1.0, 241),
    ("lite_i2v_5s", "full", None, (1, 2, 2), 50, 5.0, 121),
    ("pro_t2v_sft_5s", "full", None, (1, 2, 2), 50, 5.0, 121),
    ("pro_t2v_sft_5s_hd", "nabla", 0.8, (1, 3.16, 3.16), 50, 5.0, 121),
    ("pro_t2v_sft_10s", "nabla", 0.9, (1, 2, 2), 50, 5.0, 241),
    ("pro_t2v_sft_10s_hd", "nabla", 0.7, (1, 3.16, 3.16), 50, 5.0, 241),
    ("pro_i2v_sft_5s_hd", "nabla", 0.8, (1, 3.16, 3.16), 50, 5.0, 121),
])
def test_variant_settings_match_official_configs(vid, attention, P, rope, steps, guidance, frames):
    v = VARIANTS[vid]
    assert (v.attention, v.rope_scale, v.steps, v.guidance, v.frames, v.fps) == (attention, rope, steps, guidance,
                                                                                 frames, 24)
    assert (v.nabla.P if v.nabla else None) == P
    if v.nabla:
        assert v.nabla.window == (11, 3, 3) and v.nabla.sta


def test_variant_sizes_are_valid():
    for v in VARIANTS.values():
        assert v.default_size in v.sizes and (v.frames - 1) % 4 == 0
        step = 128 if v.attention == "nabla" else 16
        assert all(w % step == 0 and h % step == 0 for w, h in v.sizes), v.id


@pytest.mark.parametrize("filename, expected", [
    ("kandinsky5lite_t2v_sft_5s.safetensors", "lite_t2v_sft_5s"),
    ("kandinsky5lite_t2v_nocfg_10s.safetensors", "lite_t2v_nocfg_10s"),
    ("Kandinsky5Lite_T2V_Distilled16Steps_10s.safetensors", "lite_t2v_distilled16steps_10s"),
    ("kandinsky5lite_i2v_5s.safetensors", "lite_i2v_5s"),
    ("kandinsky5lite_i2v_sft_5s.safetensors", "lite_i2v_5s"),
    ("my_lite_10s_finetune.safetensors", "lite_t2v_sft_10s"),
    ("lite_finetune.safetensors", "lite_t2v_sft_5s"),
])
def test_resolve_lite_by_file_name(filename, expected):
    assert resolve_variant(_cfg(LITE), filename).id == expected


@pytest.mark.parametrize("filename, expected", [
    ("kandinsky5pro_t2v_sft_5s.safetensors", "pro_t2v_sft_5s"),
    ("kandinsky5pro_t2v_sft_5s_hd.safetensors", "pro_t2v_sft_5s_hd"),
    ("models/kandinsky5pro_t2v_sft_10s.safetensors", "pro_t2v_sft_10s"),
    ("kandinsky5pro_i2v_sft_5s-HD-fp8.safetensors", "pro_i2v_sft_5s_hd"),
    ("kandinsky5pro_t2v_pretrain_10s.safetensors", "pro_t2v_pretrain_10s"),
    ("pro_i2v_custom.safetensors", "pro_i2v_sft_5s"),
])
def test_resolve_pro_by_file_name(filename, expected):
    assert resolve_variant(_cfg(PRO), filename).id == expected


def test_resolve_uses_dims_over_a_misleading_name():
    assert resolve_variant(_cfg(PRO), "kandinsky5lite_t2v_sft_5s.safetensors").family == "pro"


def test_resolve_custom_dims_gets_sensible_defaults():
    tiny = K5Config(64, 96, 32, 1, 2, (8, 12, 12))
    assert resolve_variant(tiny, "tiny.safetensors").id == "lite_t2v_sft_5s"
    assert resolve_variant(tiny, "tiny_i2v.safetensors").id == "lite_i2v_5s"
    assert resolve_variant(tiny, "x.safetensors", "pro_t2v_sft_10s").id == "pro_t2v_sft_10s"


def test_resolve_requested_errors():
    with pytest.raises(ValueError, match="unknown Kandinsky 5 variant 'nope'.*lite_t2v_sft_5s"):
        resolve_variant(_cfg(LITE), "a.safetensors", "nope")
    with pytest.raises(ValueError, match="pro checkpoints.*lite dims"):
        resolve_variant(_cfg(LITE), "a.safetensors", "pro_t2v_sft_5s")
    assert resolve_variant(_cfg(LITE), "a.safetensors", "lite_t2v_sft_10s").id == "lite_t2v_sft_10s"


def test_image_models_resolve_to_image_variants():
    assert resolve_variant(_cfg(IMAGE_T2I), "kandinsky5lite_t2i.safetensors").id == "lite_t2i"
    assert VARIANTS["lite_t2i"].rope_scale == (1, 1, 1)


def test_default_negative_prompt_is_the_official_one():
    assert DEFAULT_NEGATIVE_PROMPT.startswith("Static, 2D cartoon")
    assert DEFAULT_NEGATIVE_PROMPT.endswith("deformed, walking backwards")
