"""LoRA: injection, the file layouts and their round trips, merging (fp32 and fp8), native ComfyUI key mapping —
on the tiny Kandinsky 5 and LTX-2 DiTs, with each family's targets — and the errors for LoRAs that do not fit."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cinetune.core.family as family_module
from cinetune.core.checkpoint import read_safetensors_header
from cinetune.core.lora import (
    LoRAError,
    LoRALinear,
    LoRAWeights,
    apply_lora_unmerged,
    export_lora_state_dict,
    inject_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    peft_config,
    remove_lora,
    save_lora,
)
from cinetune.core.quant import FP8Linear, quantize_fp8, quantize_linear_weights_fp8
from cinetune.k5.config import LITE_CONFIG, PRO_CONFIG, K5Config
from cinetune.k5.dit import Kandinsky5DiT
from cinetune.k5.family import K5_BLOCK_PREFIXES, K5_FAMILY, K5_LORA_TARGETS
from cinetune.k5.tiny import TINY_DIT_DIMS
from cinetune.ltx2.config import LTX2_19B
from cinetune.ltx2.dit import LTX2DiT
from cinetune.ltx2.family import LTX2_FAMILY
from comfy_lora_keys import native_lora_report
from families import FAMILIES, K5, TinyFamily, each_family

ROOT = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 6.0
#: LoRA layers of the tiny DiTs: K5 6 per text block + 10 per visual block (1 + 2 blocks); LTX-2 4 projections of
#: 6 attention modules per block (2 blocks).
LORA_LAYERS = {"k5": 6 * 1 + 10 * 2, "ltx2": 24 * 2}


def family_lora(fam: TinyFamily) -> dict:
    """``inject_lora`` arguments naming the family's targets."""
    return dict(targets=fam.family.lora_targets, within=fam.family.lora_within)


def random_lora(fam: TinyFamily, model: torch.nn.Module, rank: int = RANK, alpha: float = ALPHA,
                seed: int = 2) -> LoRAWeights:
    """A 'trained' LoRA: random down and up for every official target of ``model``."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path in fam.lora_paths(model):
        lin = model.get_submodule(path)
        layers[path] = (torch.randn(rank, lin.in_features, generator=g) * 0.3,
                        torch.randn(lin.out_features, rank, generator=g) * 0.3, alpha)
    return LoRAWeights(layers, "modules")


def assert_same_weights(a: LoRAWeights, b: LoRAWeights) -> None:
    assert sorted(a.layers) == sorted(b.layers)
    for path, (d, u, al) in a.layers.items():
        d2, u2, al2 = b.layers[path]
        assert torch.equal(d, d2.to(d.dtype)) and torch.equal(u, u2.to(u.dtype)), path
        assert al == pytest.approx(al2, rel=1e-6), path


# ---------------------------------------------------------------------------------------------------------------
# Injection


@each_family
def test_inject_targets_exactly_the_official_layers(fam):
    model = fam.build()
    before = {n: type(m) for n, m in model.named_modules()}
    modules = inject_lora(model, rank=RANK, alpha=ALPHA, **family_lora(fam))
    assert list(modules) == fam.lora_paths(model)
    assert len(modules) == LORA_LAYERS[fam.id]
    for name, module in model.named_modules():
        if name in modules:
            assert isinstance(module, LoRALinear) and module.base.__class__ is before[name]
        elif name in before:
            assert type(module) is before[name], name  # nothing else replaced
    # the base parameters keep their official names under ".base"
    base_keys = {k.replace(".base.", ".") for k in model.state_dict() if ".lora_" not in k}
    assert base_keys == set(fam.build().state_dict())


@pytest.mark.parametrize("new, family, expected, layer, dims", [
    (lambda: Kandinsky5DiT(LITE_CONFIG), K5_FAMILY, 332, "visual_transformer_blocks.0.feed_forward.in_layer",
     (LITE_CONFIG.model_dim, LITE_CONFIG.ff_dim)),
    (lambda: Kandinsky5DiT(PRO_CONFIG), K5_FAMILY, 624, "visual_transformer_blocks.0.feed_forward.in_layer",
     (PRO_CONFIG.model_dim, PRO_CONFIG.ff_dim)),
    (lambda: LTX2DiT(LTX2_19B), LTX2_FAMILY, 1152, "transformer_blocks.0.audio_attn1.to_q",
     (LTX2_19B.audio_inner_dim, LTX2_19B.audio_inner_dim)),
], ids=["k5-lite", "k5-pro", "ltx2-19b"])
def test_inject_counts_on_real_sizes(new, family, expected, layer, dims):
    with torch.device("meta"):  # shapes only
        model = new()
    modules = inject_lora(model, rank=8, alpha=8, targets=family.lora_targets, within=family.lora_within)
    # musubi-tuner: Lite 2·6+32·10, Pro 4·6+60·10 (k5.md §8); ltx-trainer: 48 blocks · 6 attentions · 4 projections
    assert len(modules) == expected
    m = modules[layer]
    assert m.lora_down.shape == (8, dims[0]) and m.lora_up.shape == (dims[1], 8)


@each_family
def test_fresh_adapter_changes_nothing_and_only_lora_trains(fam):
    model = fam.build()
    args = fam.inputs()
    with torch.no_grad():
        reference = fam.run(model, args)
    modules = inject_lora(model, rank=RANK, alpha=ALPHA, generator=torch.Generator().manual_seed(0),
                          **family_lora(fam))
    for m in modules.values():  # kaiming-uniform a=√5 → U(-1/√in, 1/√in); up zeros
        bound = 1 / math.sqrt(m.in_features)
        assert m.lora_down.abs().max() <= bound and m.lora_down.std() > 0.3 * bound and not m.lora_up.any()
    with torch.no_grad():
        assert torch.equal(fam.run(model, args), reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{h}" for p in modules for h in ("down", "up")}

    # gradients reach every adapter through the whole DiT; the frozen base gets none
    fam.run(model, args).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    for path, m in modules.items():
        assert m.lora_up.grad is not None and m.lora_up.grad.abs().sum() > 0, path


def test_gradients_reach_the_adapters_of_one_k5_block_layer():
    model = K5.build()
    inject_lora(model, rank=RANK, alpha=ALPHA, **family_lora(K5))
    ff = model.visual_transformer_blocks[1].feed_forward
    ff(torch.randn(2, 3, model.config.model_dim)).square().sum().backward()
    assert ff.in_layer.lora_up.grad.abs().sum() > 0 and ff.out_layer.lora_up.grad.abs().sum() > 0
    assert ff.in_layer.base.weight.grad is None and ff.out_layer.base.weight.grad is None


def test_inject_errors_and_remove():
    model = K5.build()
    originals = {p: model.get_submodule(p) for p in K5.lora_paths(model)}
    with pytest.raises(LoRAError, match=r"No Linear layer .* matches .*visual_transformer_blocks"):
        inject_lora(model, rank=4, alpha=4, targets=("attn1.to_q",), within=K5_BLOCK_PREFIXES)
    inject_lora(model, rank=4, alpha=4, **family_lora(K5))
    with pytest.raises(LoRAError, match="already has 26 LoRA layers.*remove_lora"):
        inject_lora(model, rank=4, alpha=4, **family_lora(K5))
    with pytest.raises(LoRAError, match="rank must be an integer"):
        LoRALinear(torch.nn.Linear(4, 4), 0, 1.0)
    remove_lora(model)
    assert all(model.get_submodule(p) is m for p, m in originals.items())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    # one suffix given as a string, anywhere in the model: the feed-forward input of every block
    assert list(inject_lora(model, rank=4, alpha=4, targets="feed_forward.in_layer", within=None)) == [
        "text_transformer_blocks.0.feed_forward.in_layer", "visual_transformer_blocks.0.feed_forward.in_layer",
        "visual_transformer_blocks.1.feed_forward.in_layer"]
    remove_lora(model)
    with pytest.raises(LoRAError, match="targets must be non-empty"):
        inject_lora(model, rank=4, alpha=4, targets=(), within=None)
    with pytest.raises(LoRAError, match="within must be None or non-empty"):
        inject_lora(model, rank=4, alpha=4, targets=K5_LORA_TARGETS, within=("",))


# ---------------------------------------------------------------------------------------------------------------
# Formats


@each_family
def test_every_layout_round_trips_to_the_same_weights_and_merge(tmp_path, fam):
    model = fam.build()
    names = [n for n, _ in model.named_modules()]
    lora = random_lora(fam, model)
    peft_sd = export_lora_state_dict(lora, layout="peft")
    config = peft_config(lora)
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and not config["alpha_pattern"]

    comfy = save_lora(tmp_path / "comfy.safetensors", lora, metadata={}, dtype=torch.float32)
    kohya = save_lora(tmp_path / "kohya.safetensors", lora, metadata={}, dtype=torch.float32, layout="kohya")
    (tmp_path / "peft").mkdir()
    save_file(peft_sd, tmp_path / "peft" / "lora.safetensors", metadata={"trigger": "dolly-in"})
    (tmp_path / "peft" / "config_lora.json").write_text(json.dumps(config))
    default_sd = {k.replace("base_model.model.", "transformer.").replace(".weight", ".default.weight"): v
                  for k, v in peft_sd.items()}
    save_file(default_sd, tmp_path / "default.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)})
    bare_sd = {k[len("base_model.model."):]: v for k, v in peft_sd.items()}
    bare_sd.update({f"{p}.alpha": torch.tensor(a) for p, (_, _, a) in lora.layers.items()})

    loaded = {
        "comfyui": load_lora(comfy, module_names=names),
        "kohya": load_lora(kohya, module_names=names),
        "kohya-family-grammar": load_lora(kohya),
        "peft": load_lora(tmp_path / "peft" / "lora.safetensors", module_names=names),
        "peft-default": load_lora(tmp_path / "default.safetensors"),
        "bare": load_lora(bare_sd, module_names=names),
    }
    assert {k: w.format for k, w in loaded.items()} == {
        "comfyui": "comfyui", "kohya": "kohya", "kohya-family-grammar": "kohya", "peft": "peft", "peft-default": "peft",
        "bare": "bare"}
    assert loaded["peft"].alpha_source == "config" and loaded["peft"].metadata["trigger"] == "dolly-in"
    assert loaded["comfyui"].alpha_source == "file"
    merged_reference = None
    for name, weights in loaded.items():
        assert_same_weights(lora, weights)
        m = fam.build()
        assert merge_lora(m, weights, 0.7) == len(lora.layers)
        if merged_reference is None:
            merged_reference = m.state_dict()
        else:
            assert all(torch.equal(v, merged_reference[k]) for k, v in m.state_dict().items()), name


@each_family
def test_saved_file_tensors_and_metadata(tmp_path, fam):
    model = fam.build()
    modules = inject_lora(model, rank=RANK, alpha=ALPHA, **family_lora(fam))
    path = save_lora(tmp_path / "out" / f"{fam.id}.safetensors", modules, metadata={"trigger": "x"})
    infos, meta = read_safetensors_header(path)
    last = fam.lora_paths(model)[-1]  # K5 visual_transformer_blocks.1.feed_forward.out_layer
    layer, p = model.get_submodule(last), f"diffusion_model.{last}"
    assert infos[f"{p}.lora_down.weight"].shape == (RANK, layer.in_features)
    assert infos[f"{p}.lora_down.weight"].dtype == "BF16"
    assert infos[f"{p}.lora_up.weight"].shape == (layer.out_features, RANK)
    assert infos[f"{p}.alpha"].shape == () and infos[f"{p}.alpha"].dtype == "F32"
    assert len(infos) == 3 * LORA_LAYERS[fam.id] and set(load_file(path)) == set(lora_state_dict(modules))
    assert meta == {"trigger": "x", "ss_network_dim": "4", "ss_network_alpha": "6", "modelspec.architecture":
                    fam.family.name, "trainer": "cinetune"}
    assert not list(path.parent.glob(".*tmp"))  # atomic write left no temporary file
    with pytest.raises(LoRAError, match="not strings.*str\\(\\)"):
        save_lora(tmp_path / "bad.safetensors", modules, metadata={"steps": 100})


def test_alpha_rules_when_the_file_has_none():
    lora = LoRAWeights({"visual_transformer_blocks.0.self_attention.to_query": (torch.randn(4, 8), torch.randn(8, 4),
                                                                               1.0)})
    peft_sd = export_lora_state_dict(lora, layout="peft")
    no_prefix = {k[len("base_model.model."):]: v for k, v in peft_sd.items()}
    diffusers_sd = {"transformer." + k: v for k, v in no_prefix.items()}
    kohya_sd = {k: v for k, v in export_lora_state_dict(lora, layout="kohya").items() if not k.endswith(".alpha")}

    def alpha(sd, **kw):
        w = load_lora(sd, **kw)
        return next(iter(w.layers.values()))[2], w.alpha_source

    assert alpha(peft_sd) == (8.0, "peft-default")            # PEFT LoraConfig default
    assert alpha(peft_sd, default_alpha=16) == (16.0, "default_alpha")
    assert alpha(peft_sd, metadata={"lora_alpha": "32"}) == (32.0, "config")
    assert alpha(diffusers_sd) == (4.0, "rank") and alpha(no_prefix) == (4.0, "rank")  # as ComfyUI/diffusers
    assert alpha(kohya_sd) == (4.0, "rank")
    rs = alpha(peft_sd, metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True})})
    assert rs == (pytest.approx(16.0), "config")               # scale α/√r = 8/2 = 16/4
    pattern = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"self_attention.to_query": 2}}
    assert alpha(peft_sd, metadata={"lora_adapter_metadata": json.dumps(pattern)}) == (2.0, "config")
    with pytest.raises(LoRAError, match="says rank 16 .* rank 4"):
        load_lora(peft_sd, metadata={"lora_alpha": "8", "r": "16"})
    zero = export_lora_state_dict(lora, layout="comfyui")
    zero["diffusion_model.visual_transformer_blocks.0.self_attention.to_query.alpha"] = torch.tensor(0.0)
    assert alpha(zero) == (4.0, "rank")                       # kohya: alpha 0 means alpha = rank


# ---------------------------------------------------------------------------------------------------------------
# Merge and unmerged application


@each_family
def test_merge_equals_adapter_forward_and_is_linear_in_strength(fam):
    base = fam.build()
    lora = random_lora(fam, base)
    args = fam.inputs()
    with torch.no_grad():
        trained = fam.build()
        modules = inject_lora(trained, rank=RANK, alpha=ALPHA, **family_lora(fam))
        for path, m in modules.items():
            m.lora_down.copy_(lora.layers[path][0])
            m.lora_up.copy_(lora.layers[path][1])
        unmerged = fam.build()
        apply_lora_unmerged(unmerged, lora, strength=1.0)
        merged = fam.build()
        merge_lora(merged, lora, 1.0)
        out_trained, out_unmerged, out_merged = (fam.run(m, args) for m in (trained, unmerged, merged))
        assert (out_merged - fam.run(base, args)).abs().max() > 1e-2  # the LoRA does something
        torch.testing.assert_close(out_unmerged, out_trained, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_merged, out_unmerged, rtol=1e-5, atol=1e-5)

        for m in modules.values():
            m.multiplier = -0.5
        half = fam.build()
        merge_lora(half, lora, -0.5)
        torch.testing.assert_close(fam.run(half, args), fam.run(trained, args), rtol=1e-5, atol=1e-5)

    w0 = base.state_dict()
    deltas = {}
    for s in (1.0, 2.5, -0.5):
        m = fam.build()
        merge_lora(m, lora, s)
        deltas[s] = {k: v - w0[k] for k, v in m.state_dict().items()}
    for p, (down, up, _) in lora.layers.items():
        torch.testing.assert_close(deltas[1.0][p + ".weight"], (ALPHA / RANK) * up @ down, rtol=1e-5, atol=1e-6)
    changed = {p + ".weight" for p in lora.layers}
    assert all(not d.any() for k, d in deltas[1.0].items() if k not in changed)  # nothing else touched
    for s in (2.5, -0.5):
        for k in w0:
            torch.testing.assert_close(deltas[s][k], s * deltas[1.0][k], rtol=1e-4, atol=1e-6)


@each_family
def test_merge_into_fp8_requantises_like_fp32_merge_then_quantise(fam):
    """The family's keep rule decides which LoRA layers are fp8 (K5: all 26; LTX-2: block 1's, block 0 stays high
    precision); fp8 layers requantise the exact merge, the others take it as is."""
    model = fam.build()
    lora = random_lora(fam, model)
    fp8_paths = set(fam.fp8_paths(model))
    assert quantize_linear_weights_fp8(model, keep=fam.keep) == len(fp8_paths)
    assert {n for n, m in model.named_modules() if isinstance(m, FP8Linear)} == fp8_paths
    before = {p: (m.dequantized_weight(torch.float32) if isinstance(m, FP8Linear) else m.weight).detach().clone()
              for p in lora.layers for m in [model.get_submodule(p)]}
    args = fam.inputs()
    with torch.no_grad():
        unmerged = fam.build()
        quantize_linear_weights_fp8(unmerged, keep=fam.keep)
        apply_lora_unmerged(unmerged, lora, 1.0)
        out_unmerged = fam.run(unmerged, args)
    assert merge_lora(model, lora, 1.0) == len(lora.layers)

    for layer_path, (down, up, alpha) in lora.layers.items():
        layer = model.get_submodule(layer_path)
        exact = before[layer_path] + (up @ down) * (alpha / RANK)  # "merge in fp32 …"
        if layer_path not in fp8_paths:
            assert not isinstance(layer, FP8Linear) and torch.equal(layer.weight, exact), layer_path
            continue
        q, scale = quantize_fp8(exact)  # "… then quantise"
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)), layer_path
        assert torch.equal(layer.scale_weight, scale), layer_path
        # One fp8 rounding: ≤ 2⁻⁴ relative for normal values, ≤ half the subnormal step (2⁻¹⁰·scale) near zero.
        err = (layer.dequantized_weight(torch.float32) - exact).abs()
        assert bool((err <= exact.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-7).all()), layer_path
    with torch.no_grad():  # same requantisation error budget in the output: close to the exact unmerged model
        out = fam.run(model, args)
    assert (out - out_unmerged).norm() / out_unmerged.norm() < 0.1


# ---------------------------------------------------------------------------------------------------------------
# Native ComfyUI key mapping (real comfy/lora.py from ComfyUI 0.3.75, in a child process)

def _comfy_host() -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from provision_host import provision_host
        return provision_host()
    except Exception as e:  # no network / no wheel: the mapping cannot be checked here
        pytest.skip(f"ComfyUI 0.3.75 test host could not be provisioned: {e}")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@each_family
def test_native_comfyui_maps_every_saved_key_and_merges_the_same(tmp_path, fam):
    host = _comfy_host()
    model = fam.build()
    lora = random_lora(fam, model)
    base = {f"diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    files = [save_lora(tmp_path / "comfy.safetensors", lora, metadata={}, dtype=torch.float32),
             save_lora(tmp_path / "kohya.safetensors", lora, metadata={}, dtype=torch.float32, layout="kohya")]
    report = native_lora_report(host, tmp_path / "base.safetensors", tmp_path / "merged.safetensors", 0.8, files)
    expected = sorted(f"diffusion_model.{p}.weight" for p in lora.layers)
    for f in files:
        assert report[str(f)]["not_loaded"] == [], f
        assert report[str(f)]["patched"] == expected, f
    merge_lora(model, lora, 0.8)
    ours = model.state_dict()
    comfy = load_file(tmp_path / "merged.safetensors")
    assert len(comfy) == 2 * len(lora.layers)
    for key, value in comfy.items():
        torch.testing.assert_close(value, ours[key.split("/", 1)[1][len("diffusion_model."):]], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def registry(monkeypatch):
    """Exactly the two real families registered (restored afterwards)."""
    monkeypatch.setattr(family_module, "_FAMILIES", {K5_FAMILY.name: K5_FAMILY, LTX2_FAMILY.name: LTX2_FAMILY})


@each_family
def test_foreign_lora_is_rejected_with_the_model_it_was_made_for(registry, fam):
    """A LoRA of the other family: named as that family's in the error, in both file layouts."""
    other = next(f for f in FAMILIES if f is not fam)
    other_model = other.build()
    paths, lora = other.lora_paths(other_model), random_lora(other, other_model)
    names = [n for n, _ in fam.build().named_modules()]
    foreign = export_lora_state_dict(lora, layout="comfyui")
    n, first = len(paths), min(paths).replace(".", r"\.")
    with pytest.raises(LoRAError, match=rf"{n} LoRA layers name no module.*{first}.*\({n} in all\).*seems to be "
                                        rf"for {other.family.display_name}.*the model is {fam.family.display_name}"):
        load_lora(foreign, module_names=names)
    with pytest.raises(LoRAError, match=f"name no module of this model.*for {other.family.display_name}"):
        merge_lora(fam.build(), load_lora(foreign))
    kohya = export_lora_state_dict(lora, layout="kohya")
    assert sorted(load_lora(kohya).layers) == sorted(paths)  # resolved with the other family's grammar
    with pytest.raises(LoRAError, match=f"name no module of this model.*for {other.family.display_name}"):
        load_lora(kohya, module_names=names)


def test_lora_of_an_unregistered_family_needs_module_names(registry):
    kohya_wan = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 4),
                 "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(4, 4)}
    with pytest.raises(LoRAError, match=r"no registered model family \(Kandinsky 5, LTX-2\) "
                                        r"resolves.*Wan 2\.x.*pass module_names"):
        load_lora(kohya_wan)


def test_broken_files_give_clear_errors(tmp_path):
    p = "diffusion_model.visual_transformer_blocks.0.self_attention.to_query"
    with pytest.raises(LoRAError, match=r"rank mismatch in layer visual_transformer_blocks\.0\.self_attention"
                                        r"\.to_query.*\[4, 32\].*\[32, 8\]"):
        load_lora({f"{p}.lora_down.weight": torch.zeros(4, 32), f"{p}.lora_up.weight": torch.zeros(32, 8)})
    with pytest.raises(LoRAError, match="has lora_down .* but no lora_up"):
        load_lora({f"{p}.lora_down.weight": torch.zeros(4, 32)})
    with pytest.raises(LoRAError, match="mixed layouts: comfyui .*; kohya"):
        load_lora({f"{p}.lora_down.weight": torch.zeros(4, 32), f"{p}.lora_up.weight": torch.zeros(32, 4),
                   "lora_unet_x_y.lora_down.weight": torch.zeros(4, 32)})
    with pytest.raises(LoRAError, match=r"not plain LoRA weights: .*\.diff .*LoHa"):
        load_lora({f"{p}.lora_down.weight": torch.zeros(4, 32), f"{p}.lora_up.weight": torch.zeros(32, 4),
                   f"{p}.diff": torch.zeros(32, 32)})

    checkpoint = tmp_path / "kandinsky5lite_t2v_sft_5s.safetensors"
    save_file({k: v.contiguous() for k, v in K5.build().state_dict().items()}, checkpoint)
    with pytest.raises(LoRAError, match=r"is not a LoRA: it has no lora_down/lora_up .*Keys seen: .*out_layer"
                                        r".*80 in all"):
        load_lora(checkpoint)

    with torch.device("meta"):
        wide = Kandinsky5DiT(K5Config(**{**TINY_DIT_DIMS, "model_dim": 128}))
    model = K5.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"text_transformer_blocks\.0\.self_attention\.to_query does not fit the "
                                        r"model.*\[128, 128\].*\[64, 64\].*another size"):
        merge_lora(model, random_lora(K5, wide))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-merged
