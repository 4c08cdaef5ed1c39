"""The gathered block-sparse attention path (core/block_sparse.py) against the masked dense path and a float64
softmax reference: outputs and q/k/v gradients over random masks (densities 0.05–1.0), ragged last blocks, batch and
heads > 1, broadcast masks, several kernel calls per group, both backwards (saved log-sum-exp and recompute), the
real NABLA masks of the tiny Kandinsky 5 DiT, and LoRA gradients of a NABLA training step."""

import math

import pytest
import torch

import cinetune.core.attention as att
import cinetune.core.block_sparse as bsp
from cinetune.core.attention import block_sparse_attention
from cinetune.core.lora import inject_lora
from cinetune.k5.config import K5Config
from cinetune.k5.dit import Kandinsky5DiT
from cinetune.k5.family import K5_FAMILY
from cinetune.k5.nabla import NablaConfig
from cinetune.k5.tiny import TINY_DIT_DIMS, seeded_tensor
from cinetune.k5.train import K5_TRAINING, flow_matching_loss
from cinetune.training.trainer import gradient_checkpointing


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference ‖a − b‖ / ‖b‖ (float64)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(q, k, v, block_mask, bs):
    """softmax(q kᵀ/√D) v in float64 with dropped blocks at −inf; rows without any key give zeros."""
    S = q.shape[2]
    allowed = block_mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :S, :S]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v.double()


def qkv(B, H, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).requires_grad_() for _ in range(3)]


def random_mask(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def outputs_and_grads(q, k, v, block_mask, bs, path, seed=0):
    out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path=path)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return out, torch.autograd.grad(out, (q, k, v), grad_out), grad_out


def assert_gathered_matches(q, k, v, block_mask, bs, tol=1e-6):
    """Gathered vs masked dense (fp32, rel < tol) and vs the float64 reference, outputs and q/k/v gradients."""
    out, grads, g = outputs_and_grads(q, k, v, block_mask, bs, "gathered")
    out_d, grads_d, _ = outputs_and_grads(q, k, v, block_mask, bs, "masked dense")
    ref = reference(q, k, v, block_mask, bs)
    grads_r = torch.autograd.grad(ref, (q, k, v), g.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel(out, out_d) < tol and rel(out, ref) < tol
    for a, b, r in zip(grads, grads_d, grads_r):
        assert rel(a, b) < tol and rel(a, r) < tol


@pytest.fixture(params=["saved log-sum-exp", "recompute"])
def backward_kind(request, monkeypatch):
    """Both backwards of the gathered path: the CPU kernel's own backward with the saved log-sum-exp, and the
    recompute through SDPA's autograd that other devices use."""
    if request.param == "recompute":
        monkeypatch.setattr(bsp, "_lse_kernels_work", lambda dtype: False)
    return request.param


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("S", [96, 100], ids=["whole_blocks", "ragged"])
def test_gathered_equals_masked_dense_on_random_masks(density, S, backward_kind):
    bs, B, H = 16, 2, 3
    nb = math.ceil(S / bs)
    q, k, v = qkv(B, H, S, 8, seed=int(density * 100) + S)
    block_mask = random_mask((B, H, nb, nb), density, seed=S)
    assert_gathered_matches(q, k, v, block_mask, bs)


@pytest.mark.parametrize("mask_batch, mask_heads", [(1, 3), (2, 1), (1, 1)])
def test_broadcast_masks(mask_batch, mask_heads):
    q, k, v = qkv(2, 3, 80, 8, seed=3)
    assert_gathered_matches(q, k, v, random_mask((mask_batch, mask_heads, 5, 5), 0.4, seed=4), 16)


def test_full_partial_and_empty_rows_with_a_short_last_block(backward_kind):
    # rows that keep every block (attended in place), rows ending with the short block, rows without it, an empty row
    bs, S = 8, 8 * 4 + 3
    q, k, v = qkv(1, 2, S, 4, seed=5)
    rows = [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]]
    block_mask = torch.tensor([rows, [r[::-1] for r in rows]], dtype=torch.bool)[None]
    assert_gathered_matches(q, k, v, block_mask, bs)
    out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path="gathered")
    assert torch.equal(out[:, 0, bs:2 * bs], torch.zeros_like(out[:, 0, bs:2 * bs]))


@pytest.mark.parametrize("S", [12 * 8, 12 * 8 - 5], ids=["whole_blocks", "ragged"])
def test_padded_batches_and_masked_in_place_rows(S, backward_kind):
    """Rows with different kept counts share a call (padding masked), rows that drop one block of twelve attend
    their head's keys in place (the dropped block masked)."""
    bs, nb = 8, 12
    counts = [11, 11, 8, 8, 9, 12, 0, 9, 1, 2, 11, 12]  # per query block, head 0; head 1 reversed
    g = torch.Generator().manual_seed(11)
    rows = []
    for c in counts:
        row = torch.zeros(nb, dtype=torch.bool)
        row[torch.randperm(nb, generator=g)[:c]] = True
        rows.append(row)
    block_mask = torch.stack([torch.stack(rows), torch.stack(rows[::-1])])[None]
    plan = bsp._plan(block_mask, 1, 2, nb, bs, S, 4)
    assert any(b.keys is None and b.kept is not None for b in plan.batches)  # masked in place
    assert any(b.keys is None and b.kept is None for b in plan.batches)  # full rows in place
    padded = [b for b in plan.batches if b.keys is not None and b.slots * b.rows.numel() > sum(
        int(block_mask.reshape(-1, nb)[r].sum()) for r in b.rows)]
    assert padded  # counts 8, 8, 9, 9 (both heads) in calls of 9 slots
    q, k, v = qkv(1, 2, S, 4, seed=12)
    assert_gathered_matches(q, k, v, block_mask, bs)


def test_small_budget_splits_groups_into_several_calls(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(bsp.F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(bsp, "_GATHER_ELEMENTS", {"cpu": 1})  # one query block per call ...
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # ... (on CPU at least one per thread)
    bs, nb = 8, 6
    q, k, v = qkv(1, 2, bs * nb, 4, seed=6)
    block_mask = torch.ones(1, 2, nb, nb, dtype=torch.bool).tril()  # counts 1..6; the last row is full
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path="gathered")
    # 5 partial rows per head, one call each; the full rows of both heads, one in-place call per head
    assert len(calls) == 2 * 5 + 2
    assert rel(out, reference(q, k, v, block_mask, bs)) < 1e-6
    assert_gathered_matches(q, k, v, block_mask, bs)


def test_backward_keeps_no_gathered_keys(backward_kind):
    # autograd holds q, k, v, the output and the log-sum-exp — nothing of the size of the gathered keys/values
    B, H, bs, nb, D = 1, 2, 8, 16, 4
    S = bs * nb
    q, k, v = qkv(B, H, S, D, seed=7)
    block_mask = random_mask((B, H, nb, nb), 0.6, seed=8)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_sparse_attention(q, k, v, block_mask, block_size=bs, path="gathered")
    kept_keys = int(block_mask.sum()) * bs * D * 4  # bytes of the gathered keys alone
    # q, k, v, out, and the float32 log-sum-exp of every query row plus one padding row
    assert sum(saved.values()) <= 4 * B * H * S * D * 4 + (B * H * S + bs) * 4 < kept_keys
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def spy_backward_kernel(monkeypatch):
    """Record the key length of every call of the CPU kernel's backward."""
    forward, backward = bsp._lse_kernels()
    key_lengths = []

    def recording(*args, **kwargs):
        key_lengths.append(args[2].shape[2])
        return backward(*args, **kwargs)

    monkeypatch.setattr(bsp, "_lse_kernels", lambda: (forward, recording))
    return key_lengths


def gathered_rows(plan):
    rows = torch.zeros(plan.rows, dtype=torch.bool)
    rows[plan.partial] = True
    return rows


def test_cpu_backward_runs_gathered_rows_by_key_block(monkeypatch):
    """Gathered rows are differentiated one key block per list (the kernel sees bs keys), rows attended in place by
    query block (the kernel sees the head's keys); both exact."""
    assert bsp._lse_kernels_work(torch.float32)
    key_lengths = spy_backward_kernel(monkeypatch)
    bs, nb = 8, 10
    S = bs * nb
    block_mask = random_mask((1, 2, nb, nb), 0.4, seed=13)
    block_mask[0, 0, 3] = True  # one row attended in place
    q, k, v = qkv(1, 2, S, 4, seed=14)
    plan = bsp._plan(block_mask, 1, 2, nb, bs, S, 4)
    columns, _ = bsp._column_plan(plan, gathered_rows(plan), range(2), bs, 4)
    assert_gathered_matches(q, k, v, block_mask, bs)
    assert sorted(key_lengths) == [bs] * len(columns) + [S]


def test_key_block_lists_are_padded_with_a_zero_row_and_the_short_block_masked(monkeypatch):
    """Key blocks kept by different numbers of query blocks share a call: the shorter lists end with the padding row
    (log-sum-exp +inf: it adds nothing), and the short last key block of a ragged sequence masks its padded tokens."""
    bs, nb = 8, 12
    S = bs * nb - 3
    R = 2 * nb
    g = torch.Generator().manual_seed(15)
    columns = []
    for c in [8, 9] * (nb // 2):  # query blocks per key block: 8 and 9 share calls (1/8 padding)
        column = torch.zeros(nb, dtype=torch.bool)
        column[torch.randperm(nb, generator=g)[:c]] = True
        columns.append(column)
    block_mask = torch.stack(columns, dim=1).expand(1, 2, nb, nb)
    plan = bsp._plan(block_mask, 1, 2, nb, bs, S, 4)
    columns, _ = bsp._column_plan(plan, gathered_rows(plan), range(2), bs, 4)
    assert any(bool((c.rows == R).any()) for c in columns)  # padded
    assert any(c.short is not None for c in columns)  # a call holds the short last key block
    kept_by_gathered_rows = {r // nb * nb + j for r in plan.partial.tolist() for j in range(nb) if plan.m[r, j]}
    keys = torch.cat([c.keys for c in columns]).tolist()
    assert sorted(keys) == sorted(kept_by_gathered_rows)  # each once
    q, k, v = qkv(1, 2, S, 4, seed=16)
    assert_gathered_matches(q, k, v, block_mask, bs)


def test_backward_planned_head_by_head(monkeypatch):
    """With the plan bounded to one head at a time the backward runs head by head, with the same gradients."""
    calls = []
    original = bsp._column_plan

    def recording(plan, gathered, heads, bs, D):
        calls.append(heads)
        return original(plan, gathered, heads, bs, D)

    monkeypatch.setattr(bsp, "_column_plan", recording)
    monkeypatch.setattr(bsp, "_PLAN_PAIRS", 1)
    q, k, v = qkv(2, 3, 70, 4, seed=19)
    assert_gathered_matches(q, k, v, random_mask((2, 3, 9, 9), 0.5, seed=20), 8)
    assert calls == [range(h, h + 1) for h in range(6)]


def test_a_kernel_that_leaks_through_the_padding_row_is_not_used(monkeypatch):
    """If the CPU kernel's backward gave the +inf log-sum-exp row any weight, the padding would be wrong: the probe
    then turns the kernel pair off and the gathered path recomputes instead, still exact."""
    forward, backward = bsp._lse_kernels()

    def leaking(grad_out, q, k, v, out, lse, *args, **kwargs):
        return backward(grad_out, q, k, v, out, lse.nan_to_num(posinf=0.0), *args, **kwargs)

    monkeypatch.setattr(bsp, "_lse_kernels", lambda: (forward, leaking))
    monkeypatch.setattr(bsp, "_lse_kernel_state", {})
    assert not bsp._lse_kernels_work(torch.float32)
    q, k, v = qkv(1, 2, 64, 4, seed=17)
    assert_gathered_matches(q, k, v, random_mask((1, 2, 8, 8), 0.5, seed=18), 8)


# ------------------------------------------------------------------------------ the tiny Kandinsky 5 DiT with NABLA


def tiny_dit() -> Kandinsky5DiT:
    model = Kandinsky5DiT(K5Config(**TINY_DIT_DIMS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(seeded_tensor(0, name, tuple(p.shape)))
    return model.eval().requires_grad_(False)


def tiny_inputs():
    """One sample on a 2×24×24 token grid (3×3 NABLA tiles per frame)."""
    g = torch.Generator().manual_seed(1)
    config = K5Config(**TINY_DIT_DIMS)
    x0 = torch.randn(1, config.out_visual_dim, 2, 48, 48, generator=g)
    return dict(x0=x0, noise=torch.randn(x0.shape, generator=g), sigma=torch.tensor([0.6]),
                text=torch.randn(1, 5, config.in_text_dim, generator=g),
                pooled=torch.randn(1, config.in_text_dim2, generator=g),
                cond=torch.zeros_like(x0), mask=torch.zeros(1, 1, *x0.shape[2:]))


NABLA = NablaConfig(P=0.7, window=(1, 3, 1))


def test_real_nabla_masks_of_the_tiny_dit(monkeypatch):
    recorded = []
    original = att.block_sparse_attention

    def record(q, k, v, block_mask, **kwargs):
        recorded.append((q.detach(), k.detach(), v.detach(), block_mask))
        return original(q, k, v, block_mask, **kwargs)

    monkeypatch.setattr("cinetune.k5.nabla.block_sparse_attention", record)
    model, inp = tiny_dit(), tiny_inputs()
    with torch.no_grad():
        flow_matching_loss(model, **inp, nabla=NABLA)
    assert len(recorded) == 2  # one per visual block
    for q, k, v, block_mask in recorded:
        assert 0.2 < block_mask.float().mean() < 0.95  # the masks do drop blocks
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        assert_gathered_matches(q, k, v, block_mask, 64)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_nabla_training_gives_the_lora_gradients_of_masked_dense(monkeypatch, checkpointing):
    assert att.block_sparse_path("cpu") == "gathered"

    def lora_grads(path):
        monkeypatch.setattr(att, "block_sparse_path", lambda device: path)
        model, inp = tiny_dit(), tiny_inputs()
        layers = inject_lora(model, rank=4, alpha=4, targets=K5_FAMILY.lora_targets, within=K5_FAMILY.lora_within)
        with torch.no_grad():
            for name, m in layers.items():  # the same adapters on both sides; nonzero ups, so every one has a gradient
                m.lora_down.copy_(seeded_tensor(2, name + ".down", tuple(m.lora_down.shape)))
                m.lora_up.copy_(0.1 * seeded_tensor(2, name + ".up", tuple(m.lora_up.shape)))
        model.train()
        with gradient_checkpointing(K5_TRAINING.blocks(model), enabled=checkpointing):
            flow_matching_loss(model, **inp, nabla=NABLA).backward()
        return {f"{n}.{p}": getattr(m, p).grad for n, m in layers.items() for p in ("lora_down", "lora_up")}

    gathered, dense = lora_grads("gathered"), lora_grads("masked dense")
    assert gathered.keys() == dense.keys() and len(gathered) == 2 * 26
    for name in gathered:
        assert gathered[name].abs().max() > 0, name
        assert rel(gathered[name], dense[name]) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_masked_dense(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv(1, 2, 100, 16, seed=9))
    block_mask = random_mask((1, 2, 7, 7), 0.5, seed=10)
    out, grads, _ = outputs_and_grads(q, k, v, block_mask, 16, "gathered")
    out_d, grads_d, _ = outputs_and_grads(q, k, v, block_mask, 16, "masked dense")
    assert out.dtype == dtype
    for a, b in zip((out, *grads), (out_d, *grads_d)):
        assert rel(a, b) < 1e-2
