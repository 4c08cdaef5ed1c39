"""LTX-2 LoRAs across tools: a LoRA written by the LTX-2 trainer loads into diffusers' LTX2VideoTransformer3DModel
through diffusers' own LoRA loader and changes its output exactly as our unmerged application changes ours; the LoRA
loader reads the official ltx-trainer (PEFT lora_A/lora_B), ComfyUI, kohya, PEFT and diffusers-named layouts of the
same LoRA into the same weights, including a LoRA with the key set of the official distilled LoRA-384."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from diffusers import LTX2Pipeline
from diffusers.loaders.lora_pipeline import LTX2LoraLoaderMixin
from safetensors.torch import save_file
from test_ltx2_dit import TINY, make_inputs, reference, rel, run, run_reference, tiny_model

from cinetune.core.family import LoRAKeyGrammar
from cinetune.core.lora import (
    LoRAError,
    LoRAWeights,
    apply_lora_unmerged,
    check_lora_fits,
    inject_lora,
    remove_lora,
)
from cinetune.core.lora_formats import export_lora_state_dict, load_lora, peft_config
from cinetune.ltx2.config import LTX2_BLOCK_PREFIXES, LTX2_LORA_TARGETS, official_to_diffusers_key
from cinetune.ltx2.family import LTX2_LORA_GRAMMAR
from cinetune.ltx2.train import save_ltx2_lora

# diffusers applies LoRAs through PEFT (the project's "bench" extra).
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="diffusers' LoRA loading needs the peft package")

RANK, ALPHA = 4, 2.0  # scale 1/2: exact in binary, so baked and unbaked layouts compare bit for bit


def linear_names(model: torch.nn.Module) -> list[str]:
    """Every Linear of the DiT: block attentions and feed-forwards, embeddings, projections."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def module_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()]


def random_lora(model: torch.nn.Module, *, rank: int = RANK, alpha: float = ALPHA, seed: int = 0,
                up_scale: float = 0.3) -> LoRAWeights:
    """A LoRA on every Linear with random A and B (the update is about ``up_scale`` of a unit weight)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in linear_names(model):
        m = model.get_submodule(name)
        down = torch.randn(rank, m.in_features, generator=g) / math.sqrt(m.in_features)
        up = torch.randn(m.out_features, rank, generator=g) * up_scale * math.sqrt(rank) / alpha
        layers[name] = (down, up, alpha)
    return LoRAWeights(layers)


def official_state_dict(weights: LoRAWeights, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The ltx-trainer layout (reference ltx2.md §9.4): ``diffusion_model.<p>.lora_A.weight`` / ``.lora_B.weight``,
    no alpha, so the scale α/r is part of B."""
    out = {}
    for path, (down, up, alpha) in weights.layers.items():
        out[f"diffusion_model.{path}.lora_A.weight"] = down.to(dtype)
        out[f"diffusion_model.{path}.lora_B.weight"] = (up * (alpha / down.shape[0])).to(dtype)
    return out


def effective(weights: LoRAWeights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``path → (A, (α/r)·B)``: what a layer adds, independent of how the alpha is stored."""
    return {p: (d.float(), u.float() * (a / d.shape[0])) for p, (d, u, a) in weights.layers.items()}


def assert_same_lora(got: LoRAWeights, want: LoRAWeights) -> None:
    assert sorted(got.layers) == sorted(want.layers)
    for path, (down, up) in effective(want).items():
        got_down, got_up = effective(got)[path]
        assert torch.equal(got_down, down), path
        assert torch.equal(got_up, up), path


def ltx2_pipeline(transformer) -> LTX2Pipeline:
    """An LTX2Pipeline holding only the transformer: enough for its LoRA loader."""
    return LTX2Pipeline(scheduler=None, vae=None, audio_vae=None, text_encoder=None, tokenizer=None, connectors=None,
                        transformer=transformer, vocoder=None)


def peft_layer_count(model: torch.nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def trained_lora_file(tmp_path):
    """(model without LoRA, diffusers copy of it, the file the LTX-2 trainer writes for a LoRA with α ≠ r on its
    default targets)."""
    model = tiny_model()
    ref = reference(model)
    adapters = inject_lora(model, rank=RANK, alpha=ALPHA, targets=LTX2_LORA_TARGETS, within=LTX2_BLOCK_PREFIXES,
                           generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in adapters.values():  # B starts at zero; make the adapter do something
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.3)
    path = save_ltx2_lora(tmp_path / "trained.safetensors", adapters, dtype=torch.float32, metadata={})
    remove_lora(model)
    return model, ref, path


def assert_parity(ours, theirs, base) -> None:
    assert rel(ours[0], base[0]) > 1e-2 and rel(ours[1], base[1]) > 1e-2  # the LoRA changes both outputs
    assert rel(ours[0], theirs[0]) < 1e-5 and rel(ours[1], theirs[1]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# A LoRA trained here, in diffusers


@needs_peft
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_trained_lora_in_diffusers_matches_unmerged(tmp_path, strength):
    model, ref, path = trained_lora_file(tmp_path)
    inp = make_inputs(TINY)
    base = run(model, inp)
    loaded = load_lora(path, module_names=module_names(model))
    apply_lora_unmerged(model, loaded, strength)
    ours = run(model, inp)

    # diffusers' loader: the pipeline's key conversion, then the transformer's PEFT adapter.
    state = LTX2LoraLoaderMixin.lora_state_dict(str(path))
    ref.load_lora_adapter(state, adapter_name="trained", prefix="transformer")
    ref.set_adapters("trained", weights=strength)
    assert peft_layer_count(ref) == len(loaded.layers)
    assert_parity(ours, run_reference(ref, inp), base)


@needs_peft
def test_trained_lora_loads_with_pipeline_load_lora_weights(tmp_path):
    model, ref, path = trained_lora_file(tmp_path)
    inp = make_inputs(TINY)
    base = run(model, inp)
    apply_lora_unmerged(model, load_lora(path, module_names=module_names(model)))
    ltx2_pipeline(ref).load_lora_weights(str(path), adapter_name="trained")
    assert_parity(run(model, inp), run_reference(ref, inp), base)


@needs_peft
def test_distilled_lora_layout_in_diffusers_matches_unmerged(tmp_path):
    """The official distilled LoRA's layout (ltx-trainer keys, bf16, no alpha, rank 384) on every Linear of the
    DiT, so that diffusers' renames of the embeddings and projections are exercised too; at the two-stage
    pipeline's strength 0.6."""
    model = tiny_model()
    ref = reference(model)
    weights = random_lora(model, rank=384, alpha=384.0, up_scale=0.1)
    path = tmp_path / "distilled-lora-384.safetensors"
    save_file(official_state_dict(weights, torch.bfloat16), str(path))
    inp = make_inputs(TINY)
    base = run(model, inp)

    loaded = load_lora(path, module_names=module_names(model))
    assert (loaded.format, loaded.alpha_source, loaded.ranks()) == ("comfyui", "rank", {384})
    assert sorted(loaded.layers) == sorted(linear_names(model))
    check_lora_fits(model, loaded, path.name)
    apply_lora_unmerged(model, loaded, 0.6)
    ours = run(model, inp)

    ltx2_pipeline(ref).load_lora_weights(str(path), adapter_name="distilled")
    ref.set_adapters("distilled", weights=0.6)
    assert peft_layer_count(ref) == len(linear_names(model))
    assert_parity(ours, run_reference(ref, inp), base)


@needs_peft
def test_diffusers_saved_lora_with_alpha_matches_diffusers(tmp_path):
    """A LoRA saved by diffusers (``transformer.`` + diffusers module names, the PEFT config with α ≠ r in the
    ``lora_adapter_metadata`` with each field prefixed ``transformer.``, an ``alpha_pattern`` in diffusers names)
    reads into the same weights and the same output as diffusers gets from it."""
    model = tiny_model()
    ref = reference(model)
    weights = random_lora(model)
    down, up, _ = weights.layers["patchify_proj"]
    weights.layers["patchify_proj"] = (down, up, 4.0)
    unbaked = {f"diffusion_model.{p}.lora_{half}.weight": t for p, (d, u, _) in weights.layers.items()
               for half, t in (("A", d), ("B", u))}
    diffusers_named = LTX2LoraLoaderMixin.lora_state_dict(unbaked)
    layers = {k.removeprefix("transformer."): v for k, v in diffusers_named.items()}
    config = {"r": RANK, "lora_alpha": ALPHA, "alpha_pattern": {"proj_in": 4.0},
              "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in layers})}
    LTX2Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=config)
    path = tmp_path / "pytorch_lora_weights.safetensors"

    loaded = load_lora(path, module_names=module_names(model))
    assert (loaded.format, loaded.alpha_source) == ("peft", "config")
    assert_same_lora(loaded, weights)

    inp = make_inputs(TINY)
    base = run(model, inp)
    apply_lora_unmerged(model, loaded)
    ours = run(model, inp)
    ltx2_pipeline(ref).load_lora_weights(str(path), adapter_name="saved")
    assert_parity(ours, run_reference(ref, inp), base)


# ---------------------------------------------------------------------------------------------------------------
# One LoRA, every layout


def _official(weights, tmp_path):
    return official_state_dict(weights), {}, ("comfyui", "rank")


def _trainer_file(weights, tmp_path):
    return save_ltx2_lora(tmp_path / "trainer.safetensors", weights, dtype=torch.float32, metadata={}), {}, \
        ("comfyui", "rank")


def _comfyui(weights, tmp_path):
    return export_lora_state_dict(weights, layout="comfyui"), {}, ("comfyui", "file")


def _kohya(weights, tmp_path):
    return export_lora_state_dict(weights, layout="kohya"), {}, ("kohya", "file")


def _peft(weights, tmp_path):
    return export_lora_state_dict(weights, layout="peft"), peft_config(weights), ("peft", "config")


def _diffusers(weights, tmp_path):
    # diffusers' own conversion of the official file (its LTX-2 LoRA loader).
    return LTX2LoraLoaderMixin.lora_state_dict(official_state_dict(weights)), {}, ("diffusers", "rank")


def _diffusers_bare(weights, tmp_path):
    # what PEFT's get_peft_model_state_dict returns for the diffusers transformer: diffusers names, no prefix.
    state = LTX2LoraLoaderMixin.lora_state_dict(official_state_dict(weights))
    return {k.removeprefix("transformer."): v for k, v in state.items()}, {}, ("bare", "rank")


LAYOUTS = {"official": _official, "trainer_file": _trainer_file, "comfyui": _comfyui, "kohya": _kohya,
           "peft": _peft, "diffusers": _diffusers, "diffusers_bare": _diffusers_bare}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_reads_into_the_same_lora(layout, tmp_path):
    model = tiny_model()
    weights = random_lora(model)
    source, metadata, (fmt, alpha_source) = LAYOUTS[layout](weights, tmp_path)
    loaded = load_lora(source, module_names=module_names(model), metadata=metadata)
    assert (loaded.format, loaded.alpha_source) == (fmt, alpha_source)
    assert_same_lora(loaded, weights)


def test_diffusers_names_are_converted_without_module_names():
    """The LoRA's own block names tell the family, so renamed top-level layers convert without the model."""
    model = tiny_model()
    weights = random_lora(model)
    loaded = load_lora(LTX2LoraLoaderMixin.lora_state_dict(official_state_dict(weights)))
    assert_same_lora(loaded, weights)


def test_diffusers_names_outside_the_blocks_use_the_model_family():
    """Only renamed top-level layers: the family comes from the model's module names."""
    model = tiny_model()
    weights = random_lora(model)
    top = LoRAWeights({p: weights.layers[p] for p in ("adaln_single.linear", "patchify_proj")})
    state = LTX2LoraLoaderMixin.lora_state_dict(official_state_dict(top))
    assert sorted(state) == ["transformer.proj_in.lora_A.weight", "transformer.proj_in.lora_B.weight",
                             "transformer.time_embed.linear.lora_A.weight",
                             "transformer.time_embed.linear.lora_B.weight"]
    loaded = load_lora(state, module_names=module_names(model))
    assert_same_lora(loaded, top)
    check_lora_fits(model, loaded, "lora")


def test_the_official_names_are_left_unchanged():
    model = tiny_model()
    for name in module_names(model):
        assert LTX2_LORA_GRAMMAR.official_path(name) == name
        assert LTX2_LORA_GRAMMAR.official_path(official_to_diffusers_key(name)) == name


def test_a_layer_under_both_names_is_refused():
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in ("proj_in", "patchify_proj", "transformer_blocks.0.attn1.to_q"):
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(2, 32, generator=g)
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(32, 2, generator=g)
    with pytest.raises(LoRAError, match="patchify_proj.*own module names and once in its diffusers names"):
        load_lora(state)


def test_a_diffusers_name_the_model_lacks_is_named():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    state = {"transformer.transformer_blocks.7.attn1.to_q.lora_A.weight": torch.randn(2, 32, generator=g),
             "transformer.transformer_blocks.7.attn1.to_q.lora_B.weight": torch.randn(32, 2, generator=g)}
    with pytest.raises(LoRAError, match=r"transformer_blocks\.7\.attn1\.to_q"):
        load_lora(state, module_names=module_names(model))


def test_grammar_converter_must_be_callable():
    with pytest.raises(TypeError, match="diffusers_to_official"):
        LoRAKeyGrammar(pattern="x", diffusers_to_official="proj_in")
    assert LoRAKeyGrammar(pattern="x").official_path("proj_in") == "proj_in"
