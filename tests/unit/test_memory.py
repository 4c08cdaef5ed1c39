"""Memory estimate: weight/LoRA/optimizer arithmetic, and the estimate against the CPU allocator's measured peak for
a tiny and a medium block stack, inference and training (tolerance 15 %, method: core.memory.measure_cpu_peak);
the description of the tiny Kandinsky 5 and LTX-2 DiTs against their real fp8, LoRA and block-swap bytes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinetune.core.memory import (
    BlockActivations,
    MemoryEstimate,
    describe_module,
    estimate_peak_memory,
    measure_block_activations,
    measure_cpu_peak,
    transformer_block_activations,
)
from cinetune.core.lora import inject_lora
from cinetune.core.offload import ALIGN_BYTES, BlockSwap
from cinetune.core.quant import FP8Linear, quantize_linear_weights_fp8
from families import each_family

TOLERANCE = 0.15


class LoRALinear(nn.Module):
    """``base(x) + up(down(x))`` with a frozen base, as the reference block in core/memory.py assumes."""

    def __init__(self, i: int, o: int, r: int) -> None:
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.in_features, self.out_features = i, o
        self.down = nn.Parameter(torch.randn(r, i) * 0.01) if r else None
        self.up = nn.Parameter(torch.randn(o, r) * 0.01) if r else None

    def forward(self, x):
        y = self.base(x)
        return y + (x @ self.down.t()) @ self.up.t() if self.down is not None else y


class RefBlock(nn.Module):
    """The reference pre-norm block of transformer_block_activations, written as its docstring states."""

    def __init__(self, d: int, f: int, heads: int, r: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = LoRALinear(d, 3 * d, r), LoRALinear(d, d, r)
        self.fc1, self.fc2 = LoRALinear(d, f, r), LoRALinear(f, d, r)
        self.norm1.requires_grad_(False)
        self.norm2.requires_grad_(False)

    def forward(self, x):
        B, N, D = x.shape
        h = self.norm1(x)
        qkv = self.qkv(h)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(B, N, D)
        x = x + self.proj(a)
        h = self.norm2(x)
        return x + self.fc2(F.gelu(self.fc1(h)))


class Stack(nn.Module):
    def __init__(self, d, f, heads, n, r):
        super().__init__()
        torch.manual_seed(0)
        self.config = (d, f, heads, n, r)
        self.embed = nn.Linear(d, d)  # a non-block tensor, unused in the runs (counted as resident weights)
        self.embed.requires_grad_(False)
        self.blocks = nn.ModuleList(RefBlock(d, f, heads, r) for _ in range(n))


CONFIGS = {  # d, ff, heads, blocks, tokens, lora rank
    "tiny": (64, 256, 2, 4, 128, 4),
    "medium": (256, 1024, 4, 8, 1024, 8),
}


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure(model: Stack, x0: torch.Tensor, training: bool, extra=()) -> int:
    """Allocator peak of one step, plus everything allocated before it (weights, optimizer state, input, and the
    ``extra`` tensors, e.g. block-swap buffers that no parameter points into at that moment)."""
    blocks = model.blocks
    if not training:
        def step():
            with torch.no_grad():
                x = x0
                for b in blocks:
                    x = b(x)
        pre = storage_bytes([*model.parameters(), *model.buffers(), x0, *extra])
        return pre + measure_cpu_peak(step).peak
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        x = x0
        for b in blocks:
            x = checkpoint(b, x, use_reentrant=False)
        x.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from the first step on
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    pre = storage_bytes([*model.parameters(), *model.buffers(), *state, x0, *extra])
    return pre + measure_cpu_peak(step).peak


def estimate(model: Stack, acts: BlockActivations, tokens: int, r: int, training: bool, x0: torch.Tensor,
             **kw) -> MemoryEstimate:
    base = Stack(*model.config[:4], 0)  # describe the base model, before LoRA
    desc = describe_module(base, list(base.blocks))
    return estimate_peak_memory(desc, acts, tokens=tokens, training=training, lora_rank=r, lora_dtype="fp32",
                                lora_targets=["qkv.base", "proj.base", "fc1.base", "fc2.base"], optimizer="adamw",
                                extra_activation_bytes=0 if training else x0.numel() * 4, **kw)


_MEASURED: dict[tuple[str, bool], tuple[Stack, torch.Tensor, int]] = {}


def measured_config(name: str, training: bool) -> tuple[Stack, torch.Tensor, int]:
    """(model, input, measured peak bytes) for a config, measured once per test session."""
    if (name, training) not in _MEASURED:
        d, f, heads, n, tokens, r = CONFIGS[name]
        model = Stack(d, f, heads, n, r)
        x0 = torch.randn(1, tokens, d, requires_grad=training)
        _MEASURED[name, training] = (model, x0, measure(model, x0, training))
    return _MEASURED[name, training]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", ["tiny", "medium"])
def test_estimate_matches_measured_cpu_peak(name, training):
    d, f, heads, n, tokens, r = CONFIGS[name]
    model, x0, measured = measured_config(name, training)
    analytic = transformer_block_activations(d, f, heads, compute_dtype="fp32", lora_rank=r)
    est = estimate(model, analytic, tokens, r, training, x0)
    assert abs(est.total - measured) <= TOLERANCE * measured, (name, training, est.total, measured, est.format())
    # the activations are a large share here, so the check is about them, not only about the weights
    assert est.activations > 0.3 * est.total


def test_measured_coefficients_predict_a_longer_sequence():
    d, f, heads, n, tokens, r = CONFIGS["medium"]
    model = Stack(d, f, heads, n, r)
    block = model.blocks[0]

    def inputs(t):
        return (torch.randn(1, t, d, requires_grad=True),), {}

    measured_acts = measure_block_activations(block, inputs, tokens=(128, 256))
    analytic = transformer_block_activations(d, f, heads, compute_dtype="fp32", lora_rank=r)
    assert measured_acts.hidden == analytic.hidden == d * 4
    for field in ("forward", "saved", "backward"):
        a, m = getattr(analytic, field), getattr(measured_acts, field)
        assert abs(a - m) <= 0.05 * a, (field, a, m)
    model, x0, measured = measured_config("medium", True)
    est = estimate(model, measured_acts, tokens, r, True, x0)
    assert abs(est.total - measured) <= TOLERANCE * measured, (est.total, measured)


def test_estimate_with_block_swap_on_cpu():
    """On CPU the masters live in the same memory: measured = device estimate + host bytes."""
    d, f, heads, n, _, r = CONFIGS["medium"]
    tokens = 512
    model = Stack(d, f, heads, n, r)
    swap = BlockSwap(list(model.blocks), 5, device="cpu", ring_size=2)
    x0 = torch.randn(1, tokens, d, requires_grad=True)
    buffers = [*swap._slots, *(s.master for s in swap._swapped.values())]
    measured = measure(model, x0, True, extra=buffers)
    analytic = transformer_block_activations(d, f, heads, compute_dtype="fp32", lora_rank=r)
    swap.close()
    est = estimate(model, analytic, tokens, r, True, x0, blocks_to_swap=5, ring_size=2)
    assert est.swap_ring == 2 * (est.host_bytes // 5)
    assert abs(est.total + est.host_bytes - measured) <= TOLERANCE * measured


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)),
                                     nn.Sequential(FP8Linear.from_linear(nn.Linear(16, 8)))])
        self.blocks[0].to(torch.bfloat16)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))


def test_describe_module_and_weight_terms():
    model = Mixed()
    desc = describe_module(model, list(model.blocks))
    b0, b1 = desc.blocks
    assert b0.tensor_bytes == (8 * 16 + 16 + 16 + 16) * 2 and b0.float_elements == 8 * 16 + 16 + 16 + 16
    assert b1.tensor_bytes == 16 * 8 * 1 + 4 + 8 * 4  # fp8 weight, fp32 scale, fp32 bias
    assert [lin.name for lin in b0.linears] == ["blocks.0.0"] and b1.linears[0].name == "blocks.1.0"
    assert desc.other_bytes == 10 * 8 * 4 + 3 * 8
    acts = BlockActivations(hidden=32, forward=100, saved=50, backward=20)
    est = estimate_peak_memory(desc, acts, tokens=10)
    assert est.resident_weights == desc.other_bytes + b0.tensor_bytes + b1.tensor_bytes
    assert est.activations == (32 + 100) * 10 and est.gradients == est.optimizer_state == 0
    # fp32: every float tensor recast; the int64 buffer stays
    est32 = estimate_peak_memory(desc, acts, tokens=10, weight_dtype="fp32")
    assert est32.resident_weights == 10 * 8 * 4 + 3 * 8 + (8 * 16 + 48) * 4 + (16 * 8 + 1 + 8) * 4
    # fp8: block Linear weights 1 byte + 4-byte scale; a kept layer stays as stored
    est8 = estimate_peak_memory(desc, acts, tokens=10, weight_dtype="fp8", fp8_keep=lambda name: name == "blocks.1.0")
    assert est8.resident_weights == desc.other_bytes + (8 * 16 + 4 + 48 * 2) + b1.tensor_bytes
    # swap: the last block in host memory, one slot of its size
    sw = estimate_peak_memory(desc, acts, tokens=10, blocks_to_swap=1)
    assert sw.swap_ring == sw.host_bytes == b1.tensor_bytes
    assert sw.resident_weights == desc.other_bytes + b0.tensor_bytes


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@each_family
def test_describe_module_on_the_family_dits_matches_fp8_lora_and_swap_bytes(fam):
    model = fam.build()
    blocks = fam.blocks(model)
    desc = describe_module(model, blocks)
    assert len(desc.blocks) == len(blocks)
    for info, block, prefix in zip(desc.blocks, blocks, fam.block_prefixes(model)):
        assert info.tensor_bytes == _bytes([*block.parameters(), *block.buffers()])
        assert [lin.name for lin in info.linears] == [prefix + n for n, m in block.named_modules()
                                                      if isinstance(m, nn.Linear)]
    everything = [*model.parameters(), *model.buffers()]
    assert desc.other_bytes + sum(b.tensor_bytes for b in desc.blocks) == _bytes(everything)
    acts = BlockActivations(hidden=32, forward=100, saved=50, backward=20)

    # fp8 with the family's keep rule: the weights of the model quantised with the same rule
    est8 = estimate_peak_memory(desc, acts, tokens=10, weight_dtype="fp8", fp8_keep=fam.keep)
    quantised = copy.deepcopy(model)
    assert quantize_linear_weights_fp8(quantised, keep=fam.keep) > 0
    assert est8.resident_weights == _bytes([*quantised.parameters(), *quantised.buffers()])

    # LoRA on the family's targets: the adapters inject_lora makes, their gradients and AdamW's two moments
    est = estimate_peak_memory(desc, acts, tokens=10, training=True, lora_rank=4, lora_dtype="fp32",
                               lora_targets=fam.family.lora_targets, optimizer="adamw")
    modules = inject_lora(copy.deepcopy(model), rank=4, alpha=4, targets=fam.family.lora_targets,
                          within=fam.family.lora_within)
    lora_bytes = _bytes(p for m in modules.values() for p in (m.lora_down, m.lora_up))
    assert est.lora == est.gradients == lora_bytes and est.optimizer_state == 2 * lora_bytes

    # block swap of all but the first block: the masters BlockSwap packs (each tensor 256-byte aligned)
    k = len(blocks) - 1
    est_swap = estimate_peak_memory(desc, acts, tokens=10, blocks_to_swap=k, ring_size=1)
    assert est_swap.resident_weights == desc.other_bytes + desc.blocks[0].tensor_bytes
    swap = BlockSwap(blocks, k, device="cpu", ring_size=1)
    packed = sum(len([*b.parameters(), *b.buffers()]) for b in blocks[1:])
    assert est_swap.host_bytes <= swap.host_bytes <= est_swap.host_bytes + ALIGN_BYTES * packed
    assert est_swap.swap_ring <= swap.ring_bytes <= est_swap.swap_ring + ALIGN_BYTES * packed
    swap.close()


def test_lora_optimizer_and_training_activations():
    model = Mixed()
    desc = describe_module(model, list(model.blocks))
    acts = BlockActivations(hidden=32, forward=100, saved=50, backward=20)
    lora_params = 4 * ((8 + 16) + (16 + 8))
    est = estimate_peak_memory(desc, acts, tokens=10, batch=2, training=True, lora_rank=4, optimizer="adamw")
    assert est.lora == est.gradients == lora_params * 4 and est.optimizer_state == lora_params * 8
    # checkpointing: both inputs kept, then the last block's output, gradient, saved tensors and backward
    assert est.activations == 20 * (2 * 32 + 2 * 32 + 50 + 20) and est.peak_block == 1
    est8 = estimate_peak_memory(desc, acts, tokens=10, training=True, lora_rank=4, optimizer="adamw8bit",
                                lora_targets=["0"], lora_dtype="bf16")
    assert est8.lora == 4 * 48 * 2 and est8.optimizer_state == 4 * 48 * 2
    nock = estimate_peak_memory(desc, acts, tokens=10, training=True, gradient_checkpointing=False)
    assert nock.activations == 10 * (2 * (32 + 50) + 2 * 32 + 20)
    # 15 of the 50 saved bytes recomputed in the backward: the first block keeps 15 less until the last block's
    # backward, which holds its own 15 again; with checkpointing the recompute keeps all 50
    part = BlockActivations(hidden=32, forward=100, saved=50, backward=20, recomputed=15)
    nock_part = estimate_peak_memory(desc, part, tokens=10, training=True, gradient_checkpointing=False)
    assert nock_part.activations == 10 * (2 * (32 + 50) + 2 * 32 + 20 - 15)
    assert estimate_peak_memory(desc, part, tokens=10, training=True).activations == est.activations // 2
    math_attn = BlockActivations(hidden=32, forward=100, saved=50, backward=20, quadratic=3)
    est_q = estimate_peak_memory(desc, math_attn, tokens=[5, 10], training=True)
    assert est_q.attention_workspace == 2 * 3 * 100


def test_estimate_errors_and_format():
    model = Mixed()
    desc = describe_module(model, list(model.blocks))
    acts = BlockActivations(hidden=32, forward=100, saved=50, backward=20)
    with pytest.raises(ValueError, match="maximum 2"):
        estimate_peak_memory(desc, acts, tokens=10, blocks_to_swap=3)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        estimate_peak_memory(desc, acts, tokens=10, blocks_to_swap=2, ring_size=1, training=True,
                             gradient_checkpointing=False)
    with pytest.raises(ValueError, match="one per block"):
        estimate_peak_memory(desc, acts, tokens=[10, 10, 10])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_peak_memory(desc, acts, tokens=10, optimizer="lion")
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        estimate_peak_memory(desc, acts, tokens=10, weight_dtype="int4")
    with pytest.raises(ValueError, match="must be a finite number"):
        BlockActivations(hidden=-1, forward=0, saved=0, backward=0)
    with pytest.raises(ValueError, match="cannot exceed"):
        BlockActivations(hidden=1, forward=0, saved=2, backward=0, recomputed=3)
    with pytest.raises(ValueError, match="not a submodule"):
        describe_module(model, [nn.Linear(2, 2)])
    est = MemoryEstimate(resident_weights=12_340_000_000, swap_ring=600_000_000, activations=8_000_000_000,
                         attention_workspace=0, lora=100_000_000, gradients=100_000_000, optimizer_state=200_000_000,
                         overhead=0, host_bytes=17_200_000_000, peak_block=40, training=True)
    text = est.format()
    assert text.splitlines()[0] == "Estimated peak GPU memory (training): 21.3 GB"
    assert "block-swap ring" in text and "   0.6 GB" in text and "attention workspace" not in text
    assert text.splitlines()[-1] == "  swapped block weights in CPU memory: 17.2 GB"
