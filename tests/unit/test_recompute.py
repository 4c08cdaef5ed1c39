"""An activation recomputed in the backward (core.recompute): the same output and gradients bit for bit as the plain
composition, the activation's tokens·F bytes no longer kept, and no change where other saved-tensor hooks own the
saved tensors (per-block checkpointing)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinetune.core.lora import LoRALinear
from cinetune.core.memory import measure_cpu_peak
from cinetune.core.quant import CastLinear
from cinetune.core.recompute import mlp

D, FF, T = 16, 64, 96
GELU_TANH = functools.partial(F.gelu, approximate="tanh")


def feed_forward(*, lora_out: bool = True, dropout: float = 0.0, dtype=torch.float32) -> nn.ModuleDict:
    g = torch.Generator().manual_seed(0)
    mods = {}
    for name, (i, o) in {"in_layer": (D, FF), "out_layer": (FF, D)}.items():
        base = CastLinear(i, o, bias=True)
        with torch.no_grad():
            base.weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
            base.bias.copy_(torch.randn(o, generator=g))
        base.requires_grad_(False)
        layer = base
        if name == "in_layer" or lora_out:
            layer = LoRALinear(base, 4, 4.0, dropout=dropout if name == "out_layer" else 0.0, generator=g)
            with torch.no_grad():
                layer.lora_up.copy_(torch.randn(o, 4, generator=g))
        mods[name] = layer
    return nn.ModuleDict(mods).to(dtype).train()


def run(ff: nn.ModuleDict, x: torch.Tensor, recompute: bool, activation=F.gelu):
    if recompute:
        return mlp(x, ff["in_layer"], activation, ff["out_layer"])
    return ff["out_layer"](activation(ff["in_layer"](x)))


def grads(ff, x, recompute, activation=F.gelu, seed=3):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = run(ff, x, recompute, activation)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    named = {"x": x.grad, **{n: p.grad.clone() for n, p in ff.named_parameters() if p.requires_grad}}
    ff.zero_grad(set_to_none=True)
    return out.detach(), named


@pytest.mark.parametrize("activation", [F.gelu, GELU_TANH], ids=["gelu", "gelu_tanh"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_and_gradients_bit_for_bit(activation, dropout, dtype):
    ff = feed_forward(dropout=dropout, dtype=dtype)
    x = torch.randn(2, T, D).to(dtype)
    out_plain, g_plain = grads(ff, x, False, activation)
    out_re, g_re = grads(ff, x, True, activation)
    assert torch.equal(out_plain, out_re)
    assert g_plain.keys() == g_re.keys() and len(g_plain) == 5
    for name in g_plain:
        assert torch.equal(g_plain[name], g_re[name]), name


def test_activation_is_not_kept_for_the_backward():
    """The forward with autograd keeps T·FF float32 elements less (the GELU output the out_layer adapter saves)."""
    ff = feed_forward()
    x = torch.randn(1, 512, D, requires_grad=True)
    kept = {}
    for recompute in (False, True):
        peak = measure_cpu_peak(lambda: run(ff, x, recompute))
        kept[recompute] = peak.end - peak.result.numel() * 4
        del peak
    assert kept[False] - kept[True] == pytest.approx(512 * FF * 4, rel=0.02)


def test_nothing_replaced_without_an_adapter_on_the_consumer():
    """A frozen consumer saves no copy of its input: both runs keep the same bytes and give the same gradients."""
    ff = feed_forward(lora_out=False)
    x = torch.randn(1, 256, D, requires_grad=True)
    ends = [measure_cpu_peak(lambda: run(ff, x, r)).end for r in (False, True)]
    assert ends[0] == ends[1]
    assert all(torch.equal(a, b) for a, b in zip(grads(ff, x.detach(), False)[1].values(),
                                                    grads(ff, x.detach(), True)[1].values()))


def test_other_hooks_own_the_saved_tensors():
    """Inside an outer saved-tensor hook pair (what checkpointing and offloading install) the activation is saved
    as a tensor and reaches the outer pack hook; under non-reentrant checkpointing the gradients are unchanged."""
    ff = feed_forward()
    x = torch.randn(1, T, D, requires_grad=True)
    seen = []

    def pack(t):
        seen.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(ff, x, True)
    assert (T, FF) in seen  # the out_layer adapter's input, packed by the outer hook

    _, plain = grads(ff, x.detach(), False)
    xc = x.detach().clone().requires_grad_()
    out = checkpoint(lambda t: run(ff, t, True), xc, use_reentrant=False)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    assert torch.equal(xc.grad, plain["x"])
    for n, p in ff.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, plain[n]), n


def test_without_autograd_it_is_the_composition():
    """Same output, and the same peak: the activation's input is released before the second layer runs."""
    ff = feed_forward()
    x = torch.randn(1, 512, D)
    with torch.no_grad():
        assert torch.equal(run(ff, x, True), run(ff, x, False))
        peaks = [measure_cpu_peak(lambda: run(ff, x, r)).peak for r in (False, True)]
    assert peaks[0] == peaks[1]
