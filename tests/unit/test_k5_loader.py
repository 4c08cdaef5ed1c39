"""Loading Kandinsky 5 DiT files: official / ComfyUI / diffusers layouts, weight dtypes, fp8, and bad files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import Kandinsky5Transformer3DModel
from safetensors.torch import save_file

from cinetune.core.checkpoint import CheckpointError, save_file_atomic
from cinetune.core.quant import FP8Linear, quantize_fp8, quantize_linear_weights_fp8
from cinetune.k5.config import K5Config, NotK5CheckpointError
from cinetune.k5.dit import Kandinsky5DiT, k5_fp8_keep_high_precision, load_k5_dit

CFG = K5Config(model_dim=64, ff_dim=96, time_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 12, 12),
               in_text_dim=40, in_text_dim2=24)
FP8_REL_ERROR_BOUND = 0.08  # measured 0.035–0.05 on this config (e4m3: 3 mantissa bits, ~3.6 % RMS per weight)


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Kandinsky5DiT(CFG).state_dict().items()}
    return {k: (1.0 if k.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(s, generator=g)
            for k, s in shapes.items()}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return random_state_dict()


@pytest.fixture(scope="module")
def official(tmp_path_factory, weights):
    return save_file_atomic(weights, tmp_path_factory.mktemp("official") / "kandinsky5lite_t2v_sft_5s.safetensors")


def forward(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 2, 4, 4, generator=g)
    text = torch.randn(2, 5, CFG.in_text_dim, generator=g)
    pooled = torch.randn(2, CFG.in_text_dim2, generator=g)
    with torch.no_grad():
        return model(x.to(dtype), text, pooled, torch.tensor([900.0, 40.0]))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def test_official_file_loads_with_its_weights_and_no_meta_tensors(official, weights):
    loaded = load_k5_dit(official)
    assert loaded.layout == "official" and loaded.config == CFG and loaded.path == official
    sd = loaded.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in weights.items())
    assert not any(t.is_meta for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.dtypes == {"F32": len(weights)}


def test_comfyui_prefixed_file_with_other_models_inside(tmp_path, official, weights):
    packed = {f"model.diffusion_model.{k}": v for k, v in weights.items()}
    packed["first_stage_model.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)  # VAE and TE keys of a full checkpoint
    packed["text_encoders.qwen25_7b.transformer.model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 4)
    path = save_file_atomic(packed, tmp_path / "k5_comfy.safetensors")
    loaded = load_k5_dit(path)
    assert loaded.layout == "comfyui"
    assert torch.equal(forward(loaded.model), forward(load_k5_dit(official).model))


def _diffusers_model(weights) -> Kandinsky5Transformer3DModel:
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=16, in_text_dim=CFG.in_text_dim, in_text_dim2=CFG.in_text_dim2, time_dim=CFG.time_dim,
        out_visual_dim=16, model_dim=CFG.model_dim, ff_dim=CFG.ff_dim, num_text_blocks=CFG.num_text_blocks,
        num_visual_blocks=CFG.num_visual_blocks, axes_dims=CFG.axes_dims, visual_cond=True)
    model.load_state_dict(weights, strict=True)  # diffusers' names are the official ones
    return model


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_diffusers_folder_loads_identically(tmp_path, official, weights, shard):
    folder = tmp_path / "Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    kwargs = {"max_shard_size": shard} if shard else {}
    _diffusers_model(weights).save_pretrained(folder / "transformer", **kwargs)
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists() == bool(shard)
    expected = forward(load_k5_dit(official).model)
    for path in (folder, folder / "transformer", index if shard else
                 folder / "transformer" / "diffusion_pytorch_model.safetensors"):
        loaded = load_k5_dit(path)
        assert loaded.layout == "diffusers" and loaded.config == CFG
        assert torch.equal(forward(loaded.model), expected)


def test_diffusers_config_supplies_axes_dims(tmp_path, weights):
    folder = tmp_path / "transformer"
    _diffusers_model(weights).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "axes_dims": [16, 8, 8]}))
    loaded = load_k5_dit(folder)
    assert loaded.config.axes_dims == (16, 8, 8)  # weights alone would give the default split (8, 12, 12)
    model = Kandinsky5DiT(loaded.config)
    model.load_state_dict(weights)
    assert torch.equal(forward(loaded.model), forward(model))


def test_pickle_checkpoint_loads(tmp_path, official, weights):
    path = tmp_path / "k5.pt"
    torch.save({"state_dict": weights}, path)
    assert torch.equal(forward(load_k5_dit(path).model), forward(load_k5_dit(official).model))


# ---------------------------------------------------------------------------------------------------------------
# Weight dtypes


@pytest.mark.parametrize("weight_dtype, dtype, bound", [
    ("bf16", torch.bfloat16, 3e-2), ("fp16", torch.float16, 5e-3), ("fp32", torch.float32, 0.0)])
def test_uniform_weight_dtypes(official, weight_dtype, dtype, bound):
    reference = forward(load_k5_dit(official).model)
    model = load_k5_dit(official, weight_dtype=weight_dtype).model
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = forward(model, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, reference) <= bound


def test_default_keeps_mixed_stored_dtypes(tmp_path, weights):
    mixed = {k: v if "modulation" in k else v.to(torch.bfloat16) for k, v in weights.items()}
    path = save_file_atomic(mixed, tmp_path / "mixed.safetensors")
    loaded = load_k5_dit(path)
    sd = loaded.model.state_dict()
    assert all(sd[k].dtype == v.dtype for k, v in mixed.items())
    n_mod = sum("modulation" in k for k in mixed)
    assert loaded.dtypes == {"F32": n_mod, "BF16": len(mixed) - n_mod}
    for dtype in (torch.bfloat16, torch.float32):
        out = forward(loaded.model, dtype)
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_fp8_quantises_block_linears_only(official, weights):
    reference = forward(load_k5_dit(official).model)
    model = load_k5_dit(official, weight_dtype="fp8_e4m3fn").model
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == CFG.num_text_blocks * 6 + CFG.num_visual_blocks * 10  # q, k, v, out (×2 visual) + 2 FFN
    assert all(n.startswith(("text_transformer_blocks.", "visual_transformer_blocks.")) and "modulation" not in n
               for n in fp8)
    sd = model.state_dict()
    for name in fp8:
        assert sd[f"{name}.weight"].dtype == torch.float8_e4m3fn and sd[f"{name}.scale_weight"].dtype == torch.float32
    assert sd["out_layer.out_layer.weight"].dtype == torch.float32
    assert sd["visual_transformer_blocks.0.visual_modulation.out_layer.weight"].dtype == torch.float32
    assert set(sd) - {f"{n}.scale_weight" for n in fp8} == set(weights)  # official keys kept
    for dtype in (torch.float32, torch.bfloat16):
        assert rel_err(forward(model, dtype), reference) < FP8_REL_ERROR_BOUND


def test_unknown_weight_dtype(official):
    with pytest.raises(ValueError, match="weight_dtype must be one of default, bf16"):
        load_k5_dit(official, weight_dtype="int4")


# ---------------------------------------------------------------------------------------------------------------
# fp8 building blocks


def test_quantize_fp8_error_and_scale():
    w = torch.randn(64, 48) * 0.05
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.ndim == 0
    assert torch.isclose(scale, w.abs().max() / 448)
    deq = q.float() * scale
    normal = w.abs() > scale * 2 ** -6  # e4m3 normals start at 2^-6
    assert ((deq - w).abs()[normal] <= w.abs()[normal] * 2 ** -4 + 1e-12).all()  # half a step of 3 mantissa bits
    assert quantize_fp8(torch.zeros(3, 3))[1] == 1.0
    with pytest.raises(ValueError, match="NaN or infinity"):
        quantize_fp8(torch.tensor([[1.0, float("nan")]]))


def test_fp8_linear_forward_uses_dequantised_weight():
    lin = torch.nn.Linear(16, 8)
    fp8 = FP8Linear.from_linear(lin)
    x = torch.randn(3, 16)
    expected = F.linear(x, fp8.weight.float() * fp8.scale_weight, lin.bias)
    assert torch.allclose(fp8(x), expected, atol=1e-6)
    assert fp8(x.bfloat16()).dtype == torch.bfloat16


def test_quantize_linear_weights_fp8_respects_keep():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    assert quantize_linear_weights_fp8(net, keep=lambda name: name == "2") == 1
    assert isinstance(net[0], FP8Linear) and type(net[2]) is torch.nn.Linear


@pytest.mark.parametrize("name, kept", [
    ("time_embeddings.in_layer", True), ("text_embeddings.in_layer", True), ("pooled_text_embeddings.in_layer", True),
    ("visual_embeddings.in_layer", True), ("out_layer.out_layer", True), ("out_layer.modulation.out_layer", True),
    ("visual_transformer_blocks.3.visual_modulation.out_layer", True),
    ("text_transformer_blocks.0.text_modulation.out_layer", True),
    ("visual_transformer_blocks.3.self_attention.to_query", False),
    ("visual_transformer_blocks.3.cross_attention.out_layer", False),
    ("visual_transformer_blocks.3.feed_forward.out_layer", False),
    ("text_transformer_blocks.1.feed_forward.in_layer", False),
])
def test_k5_fp8_keep_rule(name, kept):
    assert k5_fp8_keep_high_precision(name) is kept


# ---------------------------------------------------------------------------------------------------------------
# Bad files


def _ltx2_like() -> dict[str, torch.Tensor]:
    p = "model.diffusion_model."
    return {f"{p}patchify_proj.weight": torch.zeros(8, 4), f"{p}adaln_single.linear.weight": torch.zeros(8, 8),
            f"{p}audio_adaln_single.linear.weight": torch.zeros(8, 8),
            f"{p}transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8),
            "vae.encoder.conv_in.conv.weight": torch.zeros(4, 3, 1, 1, 1)}


def _vae_like() -> dict[str, torch.Tensor]:
    return {"encoder.conv_in.conv.weight": torch.zeros(4, 3, 1, 1, 1),
            "encoder.down_blocks.0.resnets.0.conv1.conv.weight": torch.zeros(4, 4, 1, 1, 1),
            "decoder.up_blocks.0.resnets.0.conv1.conv.weight": torch.zeros(4, 4, 1, 1, 1)}


@pytest.mark.parametrize("tensors, looks_like", [(_ltx2_like, "an LTX-2 checkpoint"), (_vae_like, "a VAE")],
                         ids=["ltx2", "vae"])
def test_foreign_model_files(tmp_path, tensors, looks_like):
    path = save_file_atomic(tensors(), tmp_path / "other.safetensors")
    with pytest.raises(NotK5CheckpointError) as info:
        load_k5_dit(path)
    msg = str(info.value)
    assert str(path) in msg and looks_like in msg
    assert "Expected a Kandinsky 5 DiT .safetensors" in msg and "models/diffusion_models" in msg


def test_truncated_file(tmp_path, official):
    data = official.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.*fetch the file again.*Expected a Kandinsky 5 DiT"):
        load_k5_dit(path)


def test_missing_tensor(tmp_path, weights):
    partial = {k: v for k, v in weights.items() if k != "visual_transformer_blocks.1.feed_forward.out_layer.weight"}
    path = save_file_atomic(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing tensors: visual_transformer_blocks\.1\.feed_forward\."
                                              r"out_layer\.weight.*Expected a Kandinsky 5 DiT"):
        load_k5_dit(path)


def test_extra_tensors_listed_with_count(tmp_path, weights):
    extra = dict(weights)
    for i in range(12):
        extra[f"visual_transformer_blocks.0.extra_{i:02d}.weight"] = torch.zeros(2)
    path = save_file_atomic(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"12 unexpected tensors: visual_transformer_blocks\.0\.extra_00\.weight"
                                              r".*\(\+2 more\).*Expected a Kandinsky 5 DiT") as info:
        load_k5_dit(path)
    assert "extra_09" in str(info.value) and "extra_10" not in str(info.value)


def test_wrong_shape(tmp_path, weights):
    bad = dict(weights)
    bad["visual_transformer_blocks.1.cross_attention.to_key.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError, match=r"wrong shapes: visual_transformer_blocks\.1\.cross_attention\.to_key"
                                              r"\.weight \[64, 32\] \(expected \[64, 64\]\)"):
        load_k5_dit(save_file_atomic(bad, tmp_path / "bad.safetensors"))


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file that someone renamed\n" * 4)
    with pytest.raises(CheckpointError, match="not a safetensors file.*Expected a Kandinsky 5 DiT"):
        load_k5_dit(path)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="file not found.*Kandinsky 5 DiT"):
        load_k5_dit(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="folder holds neither"):
        load_k5_dit(tmp_path)


def test_shard_index_pointing_at_missing_tensors(tmp_path, weights):
    save_file(weights, str(tmp_path / "part1.safetensors"))
    weight_map = {k: "part1.safetensors" for k in weights}
    weight_map["visual_transformer_blocks.9.feed_forward.in_layer.weight"] = "part1.safetensors"
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="no shard holds: visual_transformer_blocks.9"):
        load_k5_dit(index)
