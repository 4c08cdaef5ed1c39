"""Projections that read the same input run as one (core.lora_fused): outputs and every gradient equal the layers
called one by one (float32 rounding), with and without LoRA dropouts, under checkpoint recomputation, and the
fallbacks where fusing could change what a layer does (fp8, casts, stacked adapters, hooks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinetune.core.lora import LoRALinear
from cinetune.core.lora_fused import can_fuse, fused_projections
from cinetune.core.quant import CastLinear, FP8Linear

IN, OUTS, RANK = 12, (10, 10, 6), 4


def layers(lora=(True, True, True), *, train_base: bool = False, bias: bool = True, seed: int = 0,
           **dropouts) -> nn.ModuleList:
    """Three CastLinear layers reading IN features (optionally LoRA-wrapped, random non-zero ``lora_up``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for has_lora, width in zip(lora, OUTS):
        base = CastLinear(IN, width, bias=bias)
        with torch.no_grad():
            base.weight.copy_(torch.randn(width, IN, generator=g) / IN ** 0.5)
            if bias:
                base.bias.copy_(torch.randn(width, generator=g))
        base.requires_grad_(train_base)
        if has_lora:
            base = LoRALinear(base, RANK, 3.0, generator=g, **dropouts)
            with torch.no_grad():
                base.lora_up.copy_(torch.randn(width, RANK, generator=g))
        out.append(base)
    return nn.ModuleList(out).train()


def run(mods: nn.ModuleList, x: torch.Tensor, fused: bool, *, seed: int = 7, use: tuple[int, ...] = (0, 1, 2),
        ckpt: bool = False):
    """Outputs, the input gradient and the parameter gradients (None where a parameter got none) under a loss that
    weighs each used output differently."""
    mods.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)

    def forward(x):
        return tuple(fused_projections(x, mods) if fused else [m(x) for m in mods])

    outs = checkpoint(forward, x, use_reentrant=False) if ckpt else forward(x)
    loss = sum(((outs[i] * (i + 1)) ** 2).sum() + outs[i].sum() for i in use)
    loss.backward()
    return ([o.detach() for o in outs], x.grad,
            {n: None if p.grad is None else p.grad.clone() for n, p in mods.named_parameters()})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same(a, b, tol: float = 1e-6) -> None:
    """Outputs and gradients within relative ``tol`` (0: bit for bit)."""
    (outs_a, gx_a, gp_a), (outs_b, gx_b, gp_b) = a, b
    pairs = [*zip(outs_a, outs_b), (gx_a, gx_b)]
    assert gp_a.keys() == gp_b.keys()
    for name in gp_a:
        assert (gp_a[name] is None) == (gp_b[name] is None), name
        if gp_a[name] is not None:
            pairs.append((gp_a[name], gp_b[name]))
    for ta, tb in pairs:
        assert torch.equal(ta, tb) if tol == 0 else rel(ta, tb) < tol


def uses_fused_autograd(mods: nn.ModuleList, x: torch.Tensor) -> bool:
    with torch.enable_grad():
        fn = fused_projections(x.clone().requires_grad_(True), mods)[0].grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":  # the outputs' [..., out] views
        fn = fn.next_functions[0][0]
    return type(fn).__name__ == "_FusedProjectionBackward"


# ---------------------------------------------------------------------------------------------------------------
# Same values as one by one


@pytest.mark.parametrize("shape", [(9, IN), (2, 5, IN)], ids=["2d", "3d"])
@pytest.mark.parametrize("lora,train_base,bias", [
    ((True, True, True), False, True), ((True, False, True), False, True), ((False, True, False), True, True),
    ((True, True, True), True, False), ((False, True, False), False, False)],
    ids=["all-lora", "some-lora", "one-lora-base-trained", "lora-and-base-trained-no-bias", "one-lora-no-bias"])
def test_fused_outputs_and_gradients_equal_one_by_one(shape, lora, train_base, bias):
    mods = layers(lora, train_base=train_base, bias=bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    assert can_fuse(x, mods) and uses_fused_autograd(mods, x)
    fused, separate = run(mods, x, True), run(mods, x, False)
    assert_same(fused, separate)
    assert all(o.shape == (*shape[:-1], w) for o, w in zip(fused[0], OUTS))
    # the gradients are not trivially zero
    assert fused[1].abs().sum() > 0 and any(g is not None and g.abs().sum() > 0 for g in fused[2].values())


def test_an_output_without_gradient_leaves_its_layer_without_gradient():
    mods = layers()
    x = torch.randn(2, 5, IN)
    fused, separate = run(mods, x, True, use=(0, 2)), run(mods, x, False, use=(0, 2))
    assert_same(fused, separate)
    assert fused[2]["1.lora_up"] is None and fused[2]["0.lora_up"] is not None


@pytest.mark.parametrize("dropouts", [dict(dropout=0.3), dict(rank_dropout=0.4), dict(module_dropout=0.5),
                                      dict(dropout=0.2, rank_dropout=0.3, module_dropout=0.3)],
                         ids=["dropout", "rank", "module", "all"])
def test_dropouts_draw_the_same_masks_as_one_by_one(dropouts):
    mods = layers(**dropouts)
    x = torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(4))
    for seed in range(4):  # module dropout: several seeds, so some calls skip adapters and some do not
        fused, separate = run(mods, x, True, seed=seed), run(mods, x, False, seed=seed)
        assert_same(fused, separate)
    # another seed, other masks: the comparison above can fail
    other = run(mods, x, True, seed=99)
    assert any(rel(a, b) > 1e-3 for a, b in zip(other[0], run(mods, x, False, seed=0)[0]))


def test_checkpoint_recomputes_the_same_masks():
    mods = layers(dropout=0.3, rank_dropout=0.3, module_dropout=0.2)
    x = torch.randn(3, 7, IN)
    for seed in range(3):
        assert_same(run(mods, x, True, seed=seed, ckpt=True), run(mods, x, True, seed=seed), tol=0.0)


def test_eval_mode_and_multiplier_zero_draw_nothing():
    mods = layers(dropout=0.3, rank_dropout=0.3, module_dropout=0.5).eval()
    x = torch.randn(4, IN)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = fused_projections(x, mods)
    assert torch.equal(torch.get_rng_state(), state)
    for o, m in zip(out, mods):
        assert rel(o, m(x)) < 1e-6
    mods.train()
    for m in mods:
        m.multiplier = 0.0
    out = fused_projections(x, mods)
    assert torch.equal(torch.get_rng_state(), state)
    for o, m in zip(out, mods):
        assert torch.allclose(o, m.base(x), rtol=1e-6, atol=1e-6)


def test_frozen_adapters_pass_the_input_gradient_only():
    mods = layers()
    for m in mods:
        m.requires_grad_(False)
    x = torch.randn(2, 5, IN)
    fused, separate = run(mods, x, True, use=(1, 2)), run(mods, x, False, use=(1, 2))
    assert_same(fused, separate)
    assert all(g is None for g in fused[2].values()) and fused[1].abs().sum() > 0


def test_module_dropout_of_every_adapter_gives_the_base_outputs():
    mods = layers(module_dropout=1.0)
    x = torch.randn(2, 5, IN)
    fused, separate = run(mods, x, True), run(mods, x, False)
    assert_same(fused, separate)
    assert all(g is None for name, g in fused[2].items() if "lora" in name)


def test_without_autograd_or_adapters_the_layers_run_one_by_one():
    x = torch.randn(2, 5, IN)
    mods = layers()
    with torch.no_grad():
        out = fused_projections(x, mods)
        for o, m in zip(out, mods):
            assert torch.equal(o, m(x))
    plain = layers((False, False, False), train_base=True)
    assert not can_fuse(x, plain) and not uses_fused_autograd(plain, x)
    assert_same(run(plain, x, True), run(plain, x, False), tol=0.0)


def test_bf16_compute():
    mods = layers().to(torch.bfloat16)
    for m in mods:
        m.lora_down.data = m.lora_down.data.float()
        m.lora_up.data = m.lora_up.data.float()
    x = torch.randn(2, 5, IN).to(torch.bfloat16)
    assert can_fuse(x, mods)
    fused, separate = run(mods, x, True), run(mods, x, False)
    assert all(o.dtype == torch.bfloat16 for o in fused[0])
    assert_same(fused, separate, tol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# Fallbacks


def _fp8(mods):
    mods[1] = LoRALinear(FP8Linear.from_linear(mods[1].base), RANK, 3.0)
    return mods


def _stacked(mods):
    mods[0] = LoRALinear(mods[0], 2, 2.0)
    return mods


def _cast(mods):
    mods[2].base.to(torch.bfloat16)
    return mods


def _plain_subclass(mods):
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    s = Scaled(IN, OUTS[1])
    s.load_state_dict(mods[1].base.state_dict())
    mods[1] = s
    return mods


def _module_hook(mods):
    mods[1].base.register_forward_hook(lambda m, i, o: o * 0.5)
    return mods


@pytest.mark.parametrize("change", [_fp8, _stacked, _cast, _plain_subclass, _module_hook],
                         ids=["fp8", "stacked-lora", "weight-cast-at-use", "linear-subclass", "forward-hook"])
def test_layers_that_cannot_be_fused_run_one_by_one(change):
    mods = change(layers())
    x = torch.randn(2, 5, IN)
    assert not can_fuse(x, mods) and not uses_fused_autograd(mods, x)
    assert_same(run(mods, x, True), run(mods, x, False), tol=0.0)


def test_a_global_hook_or_a_single_layer_is_not_fused():
    mods = layers()
    x = torch.randn(2, 5, IN)
    assert not can_fuse(x, mods[:1])
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not can_fuse(x, mods)
    finally:
        handle.remove()
    assert can_fuse(x, mods)


def test_wrong_input_width_fails_as_the_layers_do():
    mods = layers()
    x = torch.randn(2, IN + 1)
    assert not can_fuse(x, mods)
    with pytest.raises(RuntimeError, match="LoRALinear takes inputs"):
        fused_projections(x, mods)
