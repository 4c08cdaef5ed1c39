"""Scaled fp8: block-wise and per-tensor scales, each family's keep rule on the tiny Kandinsky 5 and LTX-2 DiTs,
reading and writing pre-quantised Kandinsky 5 checkpoints (musubi-tuner and ComfyUI layouts), accuracy, LoRA merge
into block-wise layers, bad files, device fallback."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cinetune.core import quant
from cinetune.core.checkpoint import CheckpointError, save_file_atomic
from cinetune.core.lora import LoRAWeights, apply_lora_unmerged, merge_lora
from cinetune.core.quant import (
    FP8DeviceError,
    FP8Linear,
    dequantize_fp8,
    fp8_scale_problem,
    quantize_fp8,
    quantize_linear_weights_fp8,
    save_fp8_checkpoint,
)
from cinetune.k5.config import K5Config
from cinetune.k5.dit import Kandinsky5DiT, k5_fp8_keep_high_precision, load_k5_dit
from cinetune.k5.tiny import TINY_DIT_DIMS, seeded_tensor
from families import each_family

CFG = K5Config(**TINY_DIT_DIMS)  # model_dim 64, ff_dim 128, time_dim 32: Linear inputs of 32, 64, 128 features
# Relative L2 error of the tiny DiT's velocity with fp8 block weights vs float32, seed 0 (measured: per tensor 0.050,
# block 64 0.038, block 16 0.032; tiny LTX-2 per tensor 0.016, half its blocks kept). e4m3 keeps 3 mantissa bits
# (≤ 2⁻⁴ per weight), averaged over a whole network.
FP8_OUTPUT_REL_ERROR_BOUND = 0.08


def tiny_model() -> Kandinsky5DiT:
    """The tiny DiT with deterministic random weights everywhere (the official init zeroes the modulations, which
    would hide every block)."""
    model = Kandinsky5DiT(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(seeded_tensor(0, name, tuple(p.shape)))
    return model.eval()


def forward(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, CFG.visual_embed_dim, 2, 4, 4, generator=g)
    text = torch.randn(1, 5, CFG.in_text_dim, generator=g)
    pooled = torch.randn(1, CFG.in_text_dim2, generator=g)
    with torch.no_grad():
        return model(x.to(dtype), text, pooled, torch.tensor([700.0]))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def musubi_keep(name: str) -> bool:
    """musubi-tuner's Kandinsky 5 selection: quantise keys under the text/visual blocks or containing 'out_layer',
    never norms (so also every modulation, time_embeddings.out_layer and out_layer.out_layer)."""
    targets = ("text_transformer_blocks", "visual_transformer_blocks", "out_layer")
    return not any(t in name for t in targets) or "norm" in name


def fp8_layers(model: torch.nn.Module) -> dict[str, FP8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}


@pytest.fixture(scope="module")
def reference() -> tuple[Kandinsky5DiT, torch.Tensor]:
    model = tiny_model()
    return model, forward(model)


# ---------------------------------------------------------------------------------------------------------------
# Scales and layouts


def test_blockwise_quantisation_and_dequantisation_follow_the_block_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 48, generator=g) * torch.logspace(-6, 0, 48)  # very different magnitudes along the input
    q, s = quantize_fp8(w, block_size=16)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (6, 3, 1)
    expected = torch.empty(6, 48)
    for o in range(6):  # independent formula: W[o, b·B:(b+1)·B] = q[o, b·B:(b+1)·B] · s[o, b]
        for b in range(3):
            block = slice(16 * b, 16 * (b + 1))
            assert s[o, b, 0] == w[o, block].abs().max() / 448  # amax / 448 per block
            assert q[o, block].float().abs().max() == 448  # each block spans the whole fp8 range
            expected[o, block] = q[o, block].float() * s[o, b, 0]
    assert torch.equal(dequantize_fp8(q, s), expected)
    assert torch.equal(dequantize_fp8(q, s.squeeze(-1)), expected)  # the [out, nb] spelling
    layer = FP8Linear(48, 6, bias=False, block_size=16)
    layer.weight.data.copy_(q)
    layer.scale_weight.copy_(s)
    assert torch.equal(layer.dequantized_weight(torch.float32), expected) and layer.block_size == 16
    x = torch.randn(3, 48, generator=g)
    assert torch.equal(layer(x), F.linear(x, expected))
    # one rounding per element: ≤ 2⁻⁴ relative for normals, ≤ half the subnormal step (2⁻¹⁰·scale) near zero
    scale = s.expand(6, 3, 16).reshape(6, 48)
    assert bool(((expected - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -10).all())
    # per tensor, the smallest block falls into fp8's subnormals (or to zero) and loses its digits; its own scale
    # keeps them
    q1, s1 = quantize_fp8(w)
    assert s1.ndim == 0
    small = w[:, :16]
    median_rel = lambda deq: ((deq[:, :16] - small).abs() / small.abs()).median().item()
    assert median_rel(expected) < 2 ** -5 and median_rel(dequantize_fp8(q1, s1)) > 0.5


@pytest.mark.parametrize("chunk", [7, 48, 1 << 22], ids=["inside-a-row", "one-row", "whole-tensor"])
def test_sliced_quantisation_equals_the_whole_tensor_formula(monkeypatch, chunk):
    """The slices bound the float32 temporaries; the bits must be those of the one-shot formula."""
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(6, 48, generator=g) * torch.logspace(-3, 1, 48)).bfloat16()
    scale = w.float().abs().max() / 448
    q, s = quantize_fp8(w)
    assert torch.equal(s, scale) and same_bits(q, (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn))
    out = torch.empty(6, 48, dtype=torch.float8_e4m3fn)
    assert quantize_fp8(w, out=out)[0] is out and same_bits(out, q)
    qb, sb = quantize_fp8(w, block_size=16)
    blocks = w.float().reshape(6, 3, 16)
    block_scale = blocks.abs().amax(-1, keepdim=True) / 448
    assert torch.equal(sb, block_scale)
    assert same_bits(qb, (blocks / block_scale).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(6, 48))
    into = torch.empty(6, 48, dtype=torch.bfloat16)
    assert dequantize_fp8(qb, sb, torch.float32, out=into) is into
    assert torch.equal(into, (qb.float().reshape(6, 3, 16) * sb).reshape(6, 48).bfloat16())  # one rounding
    with pytest.raises(ValueError, match="out must be a contiguous float8_e4m3fn tensor"):
        quantize_fp8(w, out=torch.empty(6, 48, dtype=torch.bfloat16))


def test_fp8_linear_holds_e5m2_codes():
    w = torch.randn(8, 16)
    q = (w / 0.01).to(torch.float8_e5m2)
    layer = FP8Linear(16, 8, bias=False, device="meta")
    layer.load_state_dict({"weight": q, "scale_weight": torch.tensor(0.01)}, assign=True)
    assert layer.weight.dtype == torch.float8_e5m2 and "float8_e5m2" in repr(layer)
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), F.linear(x, q.float() * torch.tensor(0.01)))


@pytest.mark.parametrize("scale_shape, ok", [
    ((), True), ((1,), True), ((8, 1), True), ((8, 3, 1), True), ((8, 3), True), ((8, 48, 1), True),
    ((8, 5, 1), False), ((4, 3, 1), False), ((8, 3, 2), False), ((2,), False), ((8,), False)])
def test_scale_layouts(scale_shape, ok):
    assert (fp8_scale_problem((8, 48), scale_shape) is None) is ok
    assert "2-D Linear weights" in fp8_scale_problem((8,), ())


def test_fp8_linear_adopts_the_scale_layout_of_a_state_dict():
    lin = torch.nn.Linear(48, 8)
    blockwise = FP8Linear.from_linear(lin, block_size=16)
    per_tensor = FP8Linear(48, 8)  # built with a 0-d scale
    per_tensor.load_state_dict(blockwise.state_dict())
    assert per_tensor.scale_weight.shape == (8, 3, 1) and per_tensor.block_size == 16
    x = torch.randn(2, 48)
    assert torch.equal(per_tensor(x), blockwise(x))
    bf16_scale = {**blockwise.state_dict(), "scale_weight": blockwise.scale_weight.bfloat16()}
    per_tensor.load_state_dict(bf16_scale)  # older musubi files store bf16 scales: converted exactly
    assert per_tensor.scale_weight.dtype == torch.float32
    assert torch.equal(per_tensor.scale_weight, blockwise.scale_weight.bfloat16().float())
    with pytest.raises(RuntimeError, match="needs a float8 weight"):
        per_tensor.load_state_dict({**blockwise.state_dict(), "weight": lin.weight.detach()})
    with pytest.raises(RuntimeError, match=r"scale of shape \[8, 5, 1\] does not fit a weight \[8, 48\]"):
        per_tensor.load_state_dict({**blockwise.state_dict(), "scale_weight": torch.ones(8, 5, 1)})


def test_requantize_keeps_the_block_layout():
    layer = FP8Linear.from_linear(torch.nn.Linear(64, 8), block_size=16)
    w = torch.randn(8, 64)
    layer.requantize_(w)
    q, s = quantize_fp8(w, block_size=16)
    assert same_bits(layer.weight, q) and torch.equal(layer.scale_weight, s)


# ---------------------------------------------------------------------------------------------------------------
# The families' keep rules


@each_family
def test_family_keep_rule_quantises_exactly_the_layers_it_names(fam):
    """Every Linear the rule does not keep becomes fp8 (K5: the attention and feed-forward layers of every block;
    LTX-2: those of blocks 1–42, so block 0 of the tiny model stays high precision); every kept layer is untouched;
    the velocity stays close to the float32 one."""
    model = fam.build()
    linears = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs = fam.inputs()
    with torch.no_grad():
        expected = fam.run(model, inputs)
    assert quantize_linear_weights_fp8(model, keep=fam.keep) == len(fam.fp8_paths(model))
    quantised = fp8_layers(model)
    assert sorted(quantised) == sorted(fam.fp8_paths(model))
    kept = {n for n in linears if n not in quantised}
    assert kept == {n for n in linears if fam.keep(n)} and kept  # the rule's own answer for every Linear
    for name in kept:
        layer = model.get_submodule(name)
        assert not isinstance(layer, FP8Linear) and torch.equal(layer.weight, linears[name]), name
    for name, layer in quantised.items():
        q, scale = quantize_fp8(linears[name])
        assert same_bits(layer.weight, q) and torch.equal(layer.scale_weight, scale), name
    with torch.no_grad():
        assert 0 < rel_err(fam.run(model, inputs), expected) < FP8_OUTPUT_REL_ERROR_BOUND


@each_family
def test_quantise_while_saving_equals_quantise_then_save(tmp_path, fam):
    model = fam.build()
    direct = save_fp8_checkpoint(model, tmp_path / "direct.safetensors", keep=fam.keep)
    assert not fp8_layers(model)  # the model itself is not changed
    quantised = copy.deepcopy(model)
    quantize_linear_weights_fp8(quantised, keep=fam.keep, block_size=64)
    two_step = save_fp8_checkpoint(quantised, tmp_path / "two_step.safetensors")
    a, b = load_file(str(direct)), load_file(str(two_step))
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    assert {k[: -len(".scale_weight")] for k in a if k.endswith(".scale_weight")} == set(fam.fp8_paths(model))


@pytest.mark.parametrize("layout, block_size", [("musubi", 16), ("comfyui", None)])
@each_family
def test_fp8_file_written_here_loads_through_the_family_loader(tmp_path, fam, layout, block_size):
    """A pre-quantised file of either layout, quantised with the family's keep rule: the family's loader keeps the
    stored codes and scales of exactly those layers, and the model computes what the quantised model computes."""
    writer = fam.build()
    quantize_linear_weights_fp8(writer, keep=fam.keep, block_size=block_size)
    path = save_fp8_checkpoint(writer, tmp_path / "fp8.safetensors", layout=layout, block_size=block_size,
                               prefix=fam.dit_file_prefix, metadata=fam.dit_file_metadata)
    loaded = fam.load(path, "default")
    written, got = fp8_layers(writer), fp8_layers(loaded)
    assert sorted(got) == sorted(written) == sorted(fam.fp8_paths(writer))
    for name, layer in got.items():
        assert same_bits(layer.weight, written[name].weight), name
        assert torch.equal(layer.scale_weight, written[name].scale_weight), name
    inputs = fam.inputs()
    with torch.no_grad():  # in memory of the same alignment (see the round trip below)
        assert torch.equal(fam.run(copy.deepcopy(loaded), inputs), fam.run(writer, inputs))


# ---------------------------------------------------------------------------------------------------------------
# Round trips of the two pre-quantised formats


@pytest.mark.parametrize("layout, block_size, prefix", [
    ("musubi", None, ""), ("musubi", 16, ""), ("comfyui", None, ""), ("comfyui", None, "model.diffusion_model.")],
    ids=["musubi-block64", "musubi-block16", "comfyui", "comfyui-full-checkpoint"])
def test_round_trip_keeps_fp8_bits_scales_and_outputs(tmp_path, reference, layout, block_size, prefix):
    writer = copy.deepcopy(reference[0])
    bs = (block_size or 64) if layout == "musubi" else None
    quantize_linear_weights_fp8(writer, keep=k5_fp8_keep_high_precision, block_size=bs)
    path = save_fp8_checkpoint(writer, tmp_path / "k5_fp8.safetensors", layout=layout, block_size=block_size,
                               prefix=prefix)
    stored = load_file(str(path))
    written = fp8_layers(writer)
    assert len(written) == 26  # 6 per text block + 10 per visual block
    for name, layer in written.items():
        assert same_bits(stored[f"{prefix}{name}.weight"], layer.weight)
        scale = stored[f"{prefix}{name}.scale_weight"]
        assert scale.dtype == torch.float32 and torch.equal(scale, layer.scale_weight)
        assert scale.shape == ((layer.out_features, layer.in_features // bs, 1) if bs else ())
    if layout == "comfyui":
        marker = stored[prefix + "scaled_fp8"]
        assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 0
    else:
        assert not any(k.endswith("scaled_fp8") for k in stored)

    expected = forward(writer)
    for weight_dtype in ("default", "fp8_e4m3fn"):  # pre-quantised layers stay as stored either way
        loaded = load_k5_dit(path, weight_dtype=weight_dtype)
        assert loaded.fp8_layout == layout and loaded.layout == ("comfyui" if prefix else "official")
        got = fp8_layers(loaded.model)
        assert got.keys() == written.keys()
        for name, layer in got.items():
            assert same_bits(layer.weight, written[name].weight)
            assert torch.equal(layer.scale_weight, written[name].scale_weight)
            assert layer.scale_weight.shape == written[name].scale_weight.shape
        assert loaded.model.state_dict().keys() == writer.state_dict().keys()  # the file's keys, nothing renamed
        # Same bits, same output. The loader leaves the other tensors memory-mapped at file offsets that are not
        # 64-byte aligned, and CPU matmul kernels sum in an alignment-dependent order (≈ 4e-7 apart); in memory of
        # the same alignment the outputs are bit-identical.
        assert torch.equal(forward(copy.deepcopy(loaded.model)), expected)
        assert rel_err(forward(loaded.model), expected) < 1e-6


def test_musubi_selection_with_per_tensor_fallback_and_bf16_scales(tmp_path, reference):
    """musubi quantises the modulations and out layers too; their 32 input features do not fill a 64 block, so
    they fall back to one scale per tensor. Older musubi versions store the scales in bf16."""
    model, ref = reference
    path = save_fp8_checkpoint(model, tmp_path / "musubi.safetensors", keep=musubi_keep)
    tensors = load_file(str(path))
    assert tensors["visual_transformer_blocks.0.visual_modulation.out_layer.scale_weight"].shape == ()
    assert tensors["time_embeddings.out_layer.scale_weight"].shape == ()
    assert tensors["visual_transformer_blocks.0.feed_forward.out_layer.scale_weight"].shape == (64, 2, 1)
    old = {k: v.bfloat16() if k.endswith(".scale_weight") else v for k, v in tensors.items()}
    old_path = save_file_atomic(old, tmp_path / "musubi_bf16_scales.safetensors")
    loaded = load_k5_dit(old_path)
    layers = fp8_layers(loaded.model)
    assert "visual_transformer_blocks.1.visual_modulation.out_layer" in layers and "out_layer.out_layer" in layers
    assert "time_embeddings.out_layer" in layers and "time_embeddings.in_layer" not in layers
    assert len(layers) == sum(f"{n}.scale_weight" in tensors for n, _ in model.named_modules())
    for name, layer in layers.items():
        assert layer.scale_weight.dtype == torch.float32
        assert torch.equal(layer.scale_weight, old[f"{name}.scale_weight"].float())
    assert rel_err(forward(loaded.model), ref) < FP8_OUTPUT_REL_ERROR_BOUND


def test_two_level_block_scales_are_folded(tmp_path, reference):
    """Newer musubi stores a block scale as scale_weight (divided by its largest value) · scale_weight_tensor."""
    path = save_fp8_checkpoint(reference[0], tmp_path / "one_level.safetensors", block_size=16,
                               keep=k5_fp8_keep_high_precision)
    tensors = load_file(str(path))
    two_level = dict(tensors)
    for key in [k for k in tensors if k.endswith(".scale_weight")]:
        top = tensors[key].max()
        two_level[key] = tensors[key] / top
        two_level[key + "_tensor"] = top.clone()
    loaded = load_k5_dit(save_file_atomic(two_level, tmp_path / "two_level.safetensors"))
    one = load_k5_dit(path)
    for name, layer in fp8_layers(loaded.model).items():
        key = f"{name}.scale_weight"
        assert torch.equal(layer.scale_weight, two_level[key] * two_level[key + "_tensor"])
        torch.testing.assert_close(layer.scale_weight, tensors[key], rtol=2 ** -23, atol=0)
    assert rel_err(forward(loaded.model), forward(one.model)) < 1e-6


@pytest.mark.parametrize("weight_dtype, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_high_precision_weight_dtype_dequantises(tmp_path, reference, weight_dtype, dtype):
    path = save_fp8_checkpoint(reference[0], tmp_path / "k5.safetensors", block_size=16,
                               keep=k5_fp8_keep_high_precision)
    tensors = load_file(str(path))
    loaded = load_k5_dit(path, weight_dtype=weight_dtype)
    assert not fp8_layers(loaded.model) and loaded.fp8_layout == "musubi"
    sd = loaded.model.state_dict()
    assert not any(k.endswith("scale_weight") for k in sd)
    name = "visual_transformer_blocks.1.cross_attention.to_key"
    w = tensors[f"{name}.weight"]
    assert torch.equal(sd[f"{name}.weight"], dequantize_fp8(w, tensors[f"{name}.scale_weight"]).to(dtype))
    fp8 = load_k5_dit(path).model
    assert rel_err(forward(loaded.model, dtype), forward(fp8, dtype)) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_fp8_error_bound_and_block_wise_beats_per_tensor(tmp_path, reference):
    model, ref = reference
    errors = {}
    for layout, block_size in (("comfyui", None), ("musubi", 64), ("musubi", 16)):
        path = save_fp8_checkpoint(model, tmp_path / f"{layout}{block_size}.safetensors", layout=layout,
                                   block_size=block_size, keep=k5_fp8_keep_high_precision)
        errors[block_size] = rel_err(forward(load_k5_dit(path).model), ref)
    assert all(0 < e < FP8_OUTPUT_REL_ERROR_BOUND for e in errors.values()), errors
    assert errors[16] < errors[64] < errors[None], errors


# ---------------------------------------------------------------------------------------------------------------
# LoRA merge into block-wise fp8


def test_lora_merge_into_block_wise_fp8_follows_the_documented_rule(tmp_path, reference):
    path = save_fp8_checkpoint(reference[0], tmp_path / "k5.safetensors", block_size=16,
                               keep=k5_fp8_keep_high_precision)
    model = load_k5_dit(path).model
    g = torch.Generator().manual_seed(2)
    layers = {}
    for name in ("visual_transformer_blocks.0.self_attention.to_value",
                 "text_transformer_blocks.0.feed_forward.out_layer"):
        lin = model.get_submodule(name)
        layers[name] = (torch.randn(4, lin.in_features, generator=g) * 0.3,
                        torch.randn(lin.out_features, 4, generator=g) * 0.3, 4.0)
    lora = LoRAWeights(layers, "modules")
    unmerged = load_k5_dit(path).model
    apply_lora_unmerged(unmerged, lora, 1.0)  # exact: base untouched
    before = {n: model.get_submodule(n).dequantized_weight(torch.float32).clone() for n in layers}
    assert merge_lora(model, lora, 1.0) == 2
    for name, (down, up, alpha) in layers.items():
        layer = model.get_submodule(name)
        exact = before[name] + (alpha / 4) * up @ down  # merge in float32 …
        q, s = quantize_fp8(exact, block_size=16)  # … then quantised in the layer's own block layout
        assert same_bits(layer.weight, q)
        assert layer.scale_weight.shape == (layer.out_features, layer.in_features // 16, 1)  # layout kept
        assert torch.equal(layer.scale_weight, s.reshape(layer.scale_weight.shape))
        per_tensor = dequantize_fp8(*quantize_fp8(exact))  # block scales are closer to exact than one scale
        assert rel_err(layer.dequantized_weight(torch.float32), exact) <= rel_err(per_tensor, exact)
    assert rel_err(forward(model), forward(unmerged)) < 0.05
    merged_file = save_fp8_checkpoint(model, tmp_path / "merged.safetensors")  # the merged model saves and reloads
    assert torch.equal(forward(copy.deepcopy(load_k5_dit(merged_file).model)), forward(copy.deepcopy(model)))


# ---------------------------------------------------------------------------------------------------------------
# Bad files and wrong uses


@pytest.fixture(scope="module")
def musubi_tensors(tmp_path_factory, reference) -> dict[str, torch.Tensor]:
    path = save_fp8_checkpoint(reference[0], tmp_path_factory.mktemp("musubi") / "k5.safetensors",
                               keep=k5_fp8_keep_high_precision)
    return load_file(str(path))


LAYER = "visual_transformer_blocks.1.feed_forward.in_layer"


def _edit(tensors, drop=(), **changes):
    out = {k: v for k, v in tensors.items() if k not in drop}
    out.update({k.replace("__", "."): v for k, v in changes.items()})
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda t: _edit(t, drop={f"{LAYER}.scale_weight"}),
     rf"1 float8 tensors have no scale: {LAYER}\.weight"),
    (lambda t: _edit(t, drop={f"{LAYER}.scale_weight"}, scaled_fp8=torch.empty(0, dtype=torch.float8_e4m3fn)),
     rf"comfyui layout.*float8 tensors have no scale: {LAYER}\.weight"),
    (lambda t: {**t, "visual_transformer_blocks.0.self_attention.to_gate.scale_weight": torch.ones(())},
     r"visual_transformer_blocks\.0\.self_attention\.to_gate\.scale_weight is a scale without a weight"),
    (lambda t: {**t, "out_layer.out_layer.scale_weight": torch.ones(())},
     r"out_layer\.out_layer\.scale_weight scales out_layer\.out_layer\.weight, which is stored as F32, not float8"),
    (lambda t: {**t, f"{LAYER}.scale_weight": torch.ones(128, 3, 1)},
     rf"{LAYER}\.scale_weight: scale of shape \[128, 3, 1\] does not fit a weight \[128, 64\]"),
    (lambda t: {**t, f"{LAYER}.scale_weight_tensor": torch.ones(2)},
     rf"{LAYER}\.scale_weight_tensor must hold one number"),
], ids=["fp8-without-scale", "comfyui-fp8-without-scale", "scale-without-weight", "scale-beside-fp32",
        "scale-shape", "tensor-scale-shape"])
def test_bad_scaled_files_name_the_key(tmp_path, musubi_tensors, edit, message):
    path = save_file_atomic(edit(musubi_tensors), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=message) as info:
        load_k5_dit(path)
    msg = str(info.value)
    assert str(path) in msg and "Re-download or re-convert the file, or use the bf16 file" in msg


def test_nan_scale_is_reported(tmp_path, musubi_tensors):
    bad = {**musubi_tensors, f"{LAYER}.scale_weight": musubi_tensors[f"{LAYER}.scale_weight"].clone()}
    bad[f"{LAYER}.scale_weight"][3, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"{LAYER}\.scale_weight holds NaN or infinity; the checkpoint is "
                                              "damaged"):
        load_k5_dit(save_file_atomic(bad, tmp_path / "nan.safetensors"))


def test_input_scales_are_ignored_and_plain_fp8_needs_no_scale(tmp_path, reference, musubi_tensors):
    with_input = {**musubi_tensors, f"{LAYER}.scale_input": torch.tensor(0.5),
                  "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    loaded = load_k5_dit(save_file_atomic(with_input, tmp_path / "comfy.safetensors"))
    assert loaded.fp8_layout == "comfyui" and not hasattr(loaded.model.get_submodule(LAYER), "scale_input")
    plain = {k: v.to(torch.float8_e4m3fn) if k.endswith("in_layer.weight") and "blocks" in k else v
             for k, v in reference[0].state_dict().items()}  # unscaled fp8 (a plain cast), no marker, no scales
    loaded = load_k5_dit(save_file_atomic(plain, tmp_path / "plain.safetensors"))
    assert loaded.fp8_layout == "unscaled"
    layers = fp8_layers(loaded.model)
    assert set(layers) == {k[: -len(".weight")] for k, v in plain.items() if v.dtype == torch.float8_e4m3fn}
    assert all(same_bits(m.weight, plain[f"{n}.weight"]) and m.scale_weight.item() == 1.0 for n, m in layers.items())
    cast = Kandinsky5DiT(CFG)  # the same file as a plain cast at use (CastLinear holds the fp8 weights)
    cast.load_state_dict(plain)
    assert torch.equal(forward(loaded.model), forward(cast))
    bf16 = load_k5_dit(tmp_path / "plain.safetensors", weight_dtype="bf16").model  # scale 1: a plain cast
    assert not fp8_layers(bf16)
    assert torch.equal(bf16.get_submodule(LAYER).weight, plain[f"{LAYER}.weight"].to(torch.bfloat16))


def test_save_errors(tmp_path, reference):
    model = reference[0]
    with pytest.raises(ValueError, match="layout must be one of musubi, comfyui"):
        save_fp8_checkpoint(model, tmp_path / "x.safetensors", layout="gguf", keep=k5_fp8_keep_high_precision)
    with pytest.raises(ValueError, match="block_size is for the musubi layout only"):
        save_fp8_checkpoint(model, tmp_path / "x.safetensors", layout="comfyui", block_size=16)
    with pytest.raises(ValueError, match="no Linear layer of the model is fp8: pass keep="):
        save_fp8_checkpoint(model, tmp_path / "x.safetensors")
    blockwise = copy.deepcopy(model)
    quantize_linear_weights_fp8(blockwise, keep=k5_fp8_keep_high_precision, block_size=16)
    with pytest.raises(ValueError, match="has block-wise scales .* Save with layout='musubi'"):
        save_fp8_checkpoint(blockwise, tmp_path / "x.safetensors", layout="comfyui")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# Devices


def test_fp8_device_probe_and_fallback(tmp_path, reference, monkeypatch):
    assert quant.fp8_supported("cpu")
    path = save_fp8_checkpoint(reference[0], tmp_path / "k5.safetensors", keep=k5_fp8_keep_high_precision)
    monkeypatch.setattr(quant, "_can_cast_fp8", lambda device: "NotImplementedError: no float8 here")
    assert not quant.fp8_supported("cpu")
    for weight_dtype in ("default", "fp8_e4m3fn"):
        with pytest.raises(FP8DeviceError, match=r"cannot cast float8_e4m3fn there: NotImplementedError: no float8 "
                                                 r"here\)\. Set weight_dtype to 'bf16'"):
            load_k5_dit(path, weight_dtype=weight_dtype)
    loaded = load_k5_dit(path, weight_dtype="bf16")  # the fallback: dequantised on load
    assert not fp8_layers(loaded.model)
    assert rel_err(forward(loaded.model, torch.bfloat16), reference[1]) < FP8_OUTPUT_REL_ERROR_BOUND
