"""LoRA settings: the training-mode dropouts of LoRALinear (kohya-ss/musubi-tuner semantics, reproduced under
gradient checkpointing), the fused forward, include/exclude patterns on both tiny families, and starting a run from
a LoRA file in each layout (the adapters then add the file's update), with the errors for files that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, K5, LTX2, TinyFamily, each_family
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinetune.core.lora import (
    LoRAError,
    LoRALinear,
    LoRAWeights,
    init_lora_from_file,
    inject_lora,
    lora_candidates,
    merge_lora,
    remove_lora,
)
from cinetune.core.lora_formats import export_lora_state_dict, load_lora, peft_config, save_lora
from cinetune.k5.config import K5Config
from cinetune.k5.dit import Kandinsky5DiT
from cinetune.k5.tiny import TINY_DIT_DIMS
from cinetune.ltx2.train import save_ltx2_lora

RANK = 4


def adapter(in_f: int = 12, out_f: int = 10, rank: int = RANK, alpha: float = 3.0, seed: int = 0,
            **dropouts) -> LoRALinear:
    """A LoRALinear on a random Linear, with a random (non-zero) up projection."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g))
        base.bias.copy_(torch.randn(out_f, generator=g))
    m = LoRALinear(base, rank, alpha, generator=g, **dropouts)
    with torch.no_grad():
        m.lora_up.copy_(torch.randn(out_f, rank, generator=g))
    return m


def probe(rank: int = RANK, **dropouts) -> LoRALinear:
    """A LoRALinear whose output is ``c·h`` itself: base weights zero, ``lora_up`` the identity (out = rank)."""
    m = LoRALinear(nn.Linear(12, rank, bias=False), rank, 2.0 * rank, generator=torch.Generator().manual_seed(1),
                   **dropouts)
    with torch.no_grad():
        m.base.weight.zero_()
        m.lora_up.copy_(torch.eye(rank))
    return m


def reference(m: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + multiplier·(α/r)·x Aᵀ Bᵀ`` in float64."""
    b = m.innermost_base()
    y = nn.functional.linear(x.double(), b.weight.double(), None if b.bias is None else b.bias.double())
    return y + m.multiplier * m.alpha / m.rank * (x.double() @ m.lora_down.double().T) @ m.lora_up.double().T


# ---------------------------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12), (2, 3, 4, 12), (12,)], ids=["2d", "3d", "4d", "1d"])
def test_forward_and_gradients_match_the_formula(shape):
    m = adapter()
    m.multiplier = 0.6
    x = torch.randn(shape, requires_grad=True)
    out = m(x)
    assert out.shape == (*shape[:-1], 10)
    torch.testing.assert_close(out.double(), reference(m, x), rtol=1e-5, atol=1e-5)

    g = torch.randn(out.shape)
    out.backward(g)
    got = [t.grad.clone() for t in (x, m.lora_down, m.lora_up)]
    x2 = x.detach().double().requires_grad_()
    down, up = m.lora_down.detach().double().requires_grad_(), m.lora_up.detach().double().requires_grad_()
    w = m.base.weight.detach().double()
    expected = x2 @ w.T + 0.6 * 3.0 / RANK * (x2 @ down.T) @ up.T
    expected.backward(g.double())
    for a, b in zip(got, (x2.grad, down.grad, up.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert m.base.weight.grad is None
    with pytest.raises(RuntimeError, match=r"takes inputs \[\.\.\., 12\], got \[3, 24\]"):
        m(torch.randn(3, 24))  # as many elements as [6, 12]: must not be folded into more tokens


def test_bf16_compute_and_stacked_adapters_match_the_formula():
    inner = adapter(seed=0)
    outer = LoRALinear(inner, 2, 5.0, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outer.lora_up.normal_(generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 6, 12)
    want = reference(inner, x) + outer.scale * (x.double() @ outer.lora_down.double().T) @ outer.lora_up.double().T
    torch.testing.assert_close(outer(x).double(), want, rtol=1e-5, atol=1e-4)
    outer.to(torch.bfloat16)  # base and adapters in bf16: one rounding of the accumulated sum
    out = outer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert ((out.double() - want).norm() / want.norm()) < 2e-2


def test_zero_dropouts_draw_nothing_and_fuse_the_update():
    """With every dropout 0 (or in eval mode) no random number is drawn and the update is one GEMM into the base
    output: no separate scale or add over the output, forward or backward."""
    x = torch.randn(2, 5, 12)
    layers = {"plain": adapter(), "eval": adapter(dropout=0.5, rank_dropout=0.5, module_dropout=0.5).eval()}
    for name, m in layers.items():
        state = torch.get_rng_state()
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = m(x)
        ops = {e.name for e in prof.events()}
        assert torch.equal(torch.get_rng_state(), state), name
        assert "aten::addmm_" in ops, name
        assert not ops & {"aten::mul", "aten::add", "aten::rand", "aten::dropout", "aten::bernoulli_"}, (name, ops)
        torch.testing.assert_close(out.double(), reference(m, x), rtol=1e-5, atol=1e-5)
    m = layers["plain"]
    with torch.profiler.profile() as prof:  # nor does the backward scale or copy an output-sized gradient
        m(x.requires_grad_()).sum().backward()
    nodes = {e.name.rpartition(": ")[2] for e in prof.events() if e.name.startswith("autograd::engine")}
    assert "AddmmBackward0" in nodes and not nodes & {"MulBackward0", "AddBackward0", "CopySlices"}, nodes


# ---------------------------------------------------------------------------------------------------------------
# Dropouts


def test_module_dropout_one_returns_the_base_output_and_eval_mode_ignores_it():
    m = adapter(module_dropout=1.0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(m(x), m.base(x), rtol=0, atol=0)
    m.eval()
    assert (m(x) - m.base(x)).abs().max() > 1e-2
    torch.testing.assert_close(m(x).double(), reference(m, x), rtol=1e-5, atol=1e-5)


def test_module_dropout_skips_whole_calls_at_its_rate():
    m = adapter(module_dropout=0.3)
    x = torch.randn(3, 12)
    torch.manual_seed(0)
    skipped = sum(bool(torch.equal(m(x), m.base(x))) for _ in range(2000))
    assert abs(skipped / 2000 - 0.3) < 0.04


def test_dropout_acts_on_the_down_projection_output():
    """Each element of h = x Aᵀ is zeroed with probability p or scaled by 1/(1−p), independently per token."""
    p = 0.25
    m = probe(dropout=p)
    x = torch.randn(200, 12)
    h = m.scale * (x @ m.lora_down.T).detach()
    torch.manual_seed(0)
    with torch.no_grad():
        ratio = m(x) / h
    dropped = ratio.abs() < 1e-6
    sure = ~dropped & (h.abs() > 1e-3)
    assert torch.allclose(ratio[sure], torch.full_like(ratio[sure], 1 / (1 - p)), rtol=1e-3)
    assert abs(dropped.float().mean().item() - p) < 0.04
    assert 0 < dropped.sum(0).min() and dropped.sum(0).max() < 200  # not whole ranks


def test_rank_dropout_masks_ranks_per_sample_and_rescales():
    """A rank is dropped for all tokens of a sample at once, and kept ranks are scaled by 1/(1−p)."""
    p = 0.5
    m = probe(rank=8, rank_dropout=p)
    x = torch.randn(64, 10, 12)  # 64 samples of 10 tokens
    h = m.scale * (x @ m.lora_down.T).detach()
    torch.manual_seed(1)
    with torch.no_grad():
        ratio = m(x) / h
    kept = ratio.abs() > 1e-6
    assert torch.equal(kept, kept[:, :1, :].expand_as(kept))  # the same for every token of a sample
    sure = kept & (h.abs() > 1e-3)
    assert torch.allclose(ratio[sure], torch.full_like(ratio[sure], 1 / (1 - p)), rtol=1e-3)
    assert abs(kept[:, 0, :].float().mean().item() - (1 - p)) < 0.08
    # unbiased: the mean over draws approaches the undropped update
    torch.manual_seed(2)
    with torch.no_grad():
        mean = sum(m(x[:2]) for _ in range(3000)) / 3000
    torch.testing.assert_close(mean, h[:2], rtol=0.1, atol=0.1 * h[:2].abs().mean().item())


def test_dropout_masks_are_reproduced_by_checkpoint_recomputation():
    """A checkpointed forward recomputes the same masks (the RNG states are restored), so its gradients equal the
    non-checkpointed ones — while other masks (another seed) give other gradients."""
    torch.manual_seed(5)
    net = nn.Sequential(LoRALinear(nn.Linear(12, 16), RANK, 4.0, dropout=0.3, rank_dropout=0.3, module_dropout=0.2),
                        nn.GELU(), LoRALinear(nn.Linear(16, 8), RANK, 4.0, dropout=0.3, rank_dropout=0.3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRALinear):
                m.lora_up.normal_()
    x = torch.randn(3, 7, 12)

    def grads(run, seed=11):
        net.zero_grad()
        torch.manual_seed(seed)
        run().square().sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters() if p.requires_grad]

    plain = grads(lambda: net(x))
    recomputed = grads(lambda: checkpoint(net, x, use_reentrant=False))
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    assert not all(torch.equal(a, b) for a, b in zip(plain, grads(lambda: net(x), seed=12)))


def test_bad_dropout_values_are_rejected():
    for kw, text in ((dict(dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
                     (dict(rank_dropout=-0.1), r"rank_dropout must be a probability in \[0, 1\)"),
                     (dict(module_dropout=1.5), r"module_dropout must be a probability in \[0, 1\]"),
                     (dict(dropout="x"), "dropout must be a probability")):
        with pytest.raises(LoRAError, match=text):
            LoRALinear(nn.Linear(4, 4), 2, 2.0, **kw)
    model = K5.build()
    with pytest.raises(LoRAError, match="module_dropout"):
        inject_lora(model, rank=4, alpha=4, targets=K5.family.lora_targets, within=K5.family.lora_within,
                    module_dropout=2.0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    m = inject_lora(model, rank=4, alpha=4, targets=K5.family.lora_targets, within=K5.family.lora_within,
                    dropout=0.1, rank_dropout=0.2, module_dropout=0.3)
    assert {(a.dropout, a.rank_dropout, a.module_dropout) for a in m.values()} == {(0.1, 0.2, 0.3)}


# ---------------------------------------------------------------------------------------------------------------
# Include / exclude patterns

#: Per family: an include pattern for every Linear of the second block, the prefix it means, and one target suffix.
BLOCK_1 = {"k5": (r"visual_transformer_blocks\.1\.", "visual_transformer_blocks.1."),
           "ltx2": (r"transformer_blocks\.1\.", "transformer_blocks.1.")}
KEY_SUFFIX = {"k5": "self_attention.to_key", "ltx2": ".to_k"}


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def select(fam: TinyFamily, model: nn.Module, **kw) -> dict[str, LoRALinear]:
    return inject_lora(model, rank=RANK, alpha=RANK, targets=fam.family.lora_targets,
                       within=fam.family.lora_within, **kw)


@each_family
def test_patterns_select_exactly_the_matching_layers(fam):
    model = fam.build()
    pattern, prefix = BLOCK_1[fam.id]
    block = [n for n in linears(model) if n.startswith(prefix)]
    default = fam.lora_paths(model)
    assert set(block) - set(default)  # include patterns reach layers that are not family targets

    assert lora_candidates(model, targets=fam.family.lora_targets, within=fam.family.lora_within) == default
    assert lora_candidates(model, targets=fam.family.lora_targets, within=fam.family.lora_within,
                           include=[pattern]) == block
    no_keys = [n for n in default if not n.endswith(KEY_SUFFIX[fam.id])]
    assert len(no_keys) < len(default)
    assert lora_candidates(model, targets=fam.family.lora_targets, within=fam.family.lora_within,
                           exclude=[".*" + KEY_SUFFIX[fam.id].lstrip(".").replace(".", r"\.")]) == no_keys
    both = [n for n in block if not n.endswith(KEY_SUFFIX[fam.id])]
    modules = select(fam, model, include=pattern, exclude=[".*" + KEY_SUFFIX[fam.id].lstrip(".") + "$"])
    assert list(modules) == both
    assert {n for n, m in model.named_modules() if isinstance(m, LoRALinear)} == set(both)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{h}" for p in both for h in ("down", "up")}
    # on a model that holds adapters, a wrapped layer counts once, under its own path (not as ".base")
    assert lora_candidates(model, targets=fam.family.lora_targets, within=fam.family.lora_within) == default


@each_family
def test_patterns_that_match_nothing_are_errors_and_change_nothing(fam):
    model = fam.build()
    flags = [p.requires_grad for p in model.parameters()]
    pattern, _ = BLOCK_1[fam.id]
    kw = dict(targets=fam.family.lora_targets, within=fam.family.lora_within)
    with pytest.raises(LoRAError, match=r"include 'attn9.to_q' matches no Linear layer under .*re\.match.*"
                                        r"Some layer paths: .*\(\d+ in all\)"):
        select(fam, model, include=[pattern, "attn9.to_q"])
    with pytest.raises(LoRAError, match=r"patterns include 'nothing', exclude 'typo' match no Linear"):
        lora_candidates(model, include=["nothing"], exclude=["typo"], **kw)
    with pytest.raises(LoRAError, match=r"include pattern '\(' is not a valid regular expression"):
        select(fam, model, include=["("])
    with pytest.raises(LoRAError, match="non-empty regular expressions.*remove blank entries"):
        select(fam, model, exclude=[""])
    with pytest.raises(LoRAError, match=r"exclude patterns \['\.\*'\] remove all .* include patterns alone"):
        select(fam, model, exclude=[".*"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags  # not even frozen


# ---------------------------------------------------------------------------------------------------------------
# Starting from a LoRA file


def trained(fam: TinyFamily, model: nn.Module, rank: int = RANK, alpha: float = 6.0, seed: int = 3,
            **kw) -> LoRAWeights:
    """A 'trained' LoRA (random down and up) on the family's targets of ``model``."""
    g = torch.Generator().manual_seed(seed)
    paths = lora_candidates(model, targets=fam.family.lora_targets, within=fam.family.lora_within, **kw)
    layers = {}
    for p in paths:
        lin = model.get_submodule(p)
        layers[p] = (torch.randn(rank, lin.in_features, generator=g) * 0.3,
                     torch.randn(lin.out_features, rank, generator=g) * 0.3, alpha)
    return LoRAWeights(layers)


def delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    return (alpha / down.shape[0]) * up.double() @ down.double()


def write(fmt: str, lora: LoRAWeights, folder) -> str:
    """The LoRA as a file in layout ``fmt``."""
    if fmt in ("comfyui", "kohya"):
        return save_lora(folder / f"{fmt}.safetensors", lora, metadata={}, dtype=torch.float32, layout=fmt)
    if fmt == "peft":
        (folder / "peft").mkdir()
        save_file(export_lora_state_dict(lora, layout="peft"), folder / "peft" / "adapter_model.safetensors")
        (folder / "peft" / "adapter_config.json").write_text(json.dumps(peft_config(lora)))
        return folder / "peft" / "adapter_model.safetensors"
    if fmt == "ltx2-baked":
        return save_ltx2_lora(folder / "baked.safetensors", lora, dtype=torch.float32, metadata={})
    if fmt == "diffusers":  # no alpha: the update α/r·B is stored in lora_B
        sd = {}
        for p, (down, up, alpha) in lora.layers.items():
            sd[f"transformer.{p}.lora_A.weight"] = down
            sd[f"transformer.{p}.lora_B.weight"] = up * (alpha / down.shape[0])
        save_file(sd, folder / "diffusers.safetensors")
        return folder / "diffusers.safetensors"
    raise AssertionError(fmt)


FORMATS = [("k5", "comfyui"), ("k5", "kohya"), ("k5", "peft"), ("ltx2", "comfyui"), ("ltx2", "kohya"),
           ("ltx2", "peft"), ("ltx2", "ltx2-baked"), ("ltx2", "diffusers")]


@pytest.mark.parametrize("fam_id, fmt", FORMATS, ids=[f"{a}-{b}" for a, b in FORMATS])
def test_init_from_each_layout_starts_at_the_files_update(tmp_path, fam_id, fmt):
    fam = next(f for f in FAMILIES if f.id == fam_id)
    model = fam.build()
    lora = trained(fam, model)
    path = write(fmt, lora, tmp_path)
    modules = select(fam, model)  # alpha = rank = 4, the file's alpha is 6: the up projection is rescaled
    init_lora_from_file(modules, path, family_grammar=fam.family.lora_grammar)
    for p, m in modules.items():
        down, up, alpha = lora.layers[p]
        torch.testing.assert_close(delta(m.lora_down, m.lora_up, m.alpha), delta(down, up, alpha), rtol=1e-6,
                                   atol=1e-7)
    args = fam.inputs()
    merged = fam.build()
    merge_lora(merged, load_lora(path))
    with torch.no_grad():
        torch.testing.assert_close(fam.run(model, args), fam.run(merged, args), rtol=1e-4, atol=1e-5)


@each_family
def test_init_errors_name_what_differs_and_change_nothing(tmp_path, fam):
    model = fam.build()
    modules = select(fam, model)
    before = {p: (m.lora_down.clone(), m.lora_up.clone()) for p, m in modules.items()}
    pattern, _ = BLOCK_1[fam.id]
    n = len(modules)

    rank8 = save_lora(tmp_path / "rank8.safetensors", trained(fam, fam.build(), rank=8), metadata={})
    with pytest.raises(LoRAError, match=r"rank8\.safetensors has rank 8, this run trains rank 4 .*set the rank to 8"):
        init_lora_from_file(modules, rank8)

    subset = trained(fam, fam.build(), include=[pattern])
    missing = [p for p in modules if p not in subset.layers]
    fewer = save_lora(tmp_path / "fewer.safetensors", subset, metadata={})
    with pytest.raises(LoRAError, match=rf"{len(missing)} layers trained here are not in the file: "
                                        rf"{missing[0]}.*include/exclude"):
        init_lora_from_file(modules, fewer)
    more = trained(fam, fam.build())
    extra_path = next(p for p in linears(model) if p.startswith(BLOCK_1[fam.id][1]) and p not in modules)
    lin = model.get_submodule(extra_path)
    more.layers[extra_path] = (torch.zeros(RANK, lin.in_features), torch.zeros(lin.out_features, RANK), 4.0)
    with pytest.raises(LoRAError, match=rf"1 layers of the file are not trained here: {extra_path}"):
        init_lora_from_file(modules, save_lora(tmp_path / "more.safetensors", more, metadata={}))

    other = next(f for f in FAMILIES if f is not fam)
    foreign = save_lora(tmp_path / "foreign.safetensors", trained(other, other.build()), metadata={})
    with pytest.raises(LoRAError, match=rf"none of its \d+ layers is trained in this run.*seems to be a LoRA for "
                                        rf"{other.family.display_name}.*the model is {fam.family.display_name}"):
        init_lora_from_file(modules, foreign, family_grammar=fam.family.lora_grammar)

    mixed = trained(fam, fam.build())
    p0 = next(iter(mixed.layers))
    d, u, a = mixed.layers[p0]
    mixed.layers[p0] = (torch.cat([d, d]), torch.cat([u, u], 1), a)
    with pytest.raises(LoRAError, match=r"different ranks \[4, 8\]"):
        init_lora_from_file(modules, save_lora(tmp_path / "mixed.safetensors", mixed, metadata={}))

    for p, m in modules.items():
        assert torch.equal(m.lora_down, before[p][0]) and torch.equal(m.lora_up, before[p][1]), p
    assert len(modules) == n


def test_init_from_a_lora_of_another_model_size_is_rejected(tmp_path):
    with torch.device("meta"):
        wide = Kandinsky5DiT(K5Config(**{**TINY_DIT_DIMS, "model_dim": 128}))
    g = torch.Generator().manual_seed(0)
    layers = {}
    for p in K5.lora_paths(wide):
        lin = wide.get_submodule(p)
        layers[p] = (torch.randn(RANK, lin.in_features, generator=g), torch.randn(lin.out_features, RANK,
                                                                                 generator=g), 4.0)
    path = save_lora(tmp_path / "wide.safetensors", LoRAWeights(layers), metadata={})
    modules = select(K5, K5.build())
    with pytest.raises(LoRAError, match=r"layer text_transformer_blocks\.0\.self_attention\.to_query is \[out, in\] "
                                        r"= \[128, 128\] in the file but \[64, 64\] in the model.*another model size"):
        init_lora_from_file(modules, path)
    assert not any(m.lora_up.any() for m in modules.values())
    with pytest.raises(LoRAError, match="no LoRA layers"):
        init_lora_from_file({}, path)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_init_without_a_grammar_reads_names_with_the_registered_families(tmp_path, fmt):
    model = LTX2.build()
    lora = trained(LTX2, model)
    modules = select(LTX2, model)
    init_lora_from_file(modules, write(fmt, lora, tmp_path))
    for p, m in modules.items():
        torch.testing.assert_close(delta(m.lora_down, m.lora_up, m.alpha), delta(*lora.layers[p]), rtol=1e-6,
                                   atol=1e-7)
    remove_lora(model)
