"""Block swap on CPU: schedule order, slot residency, numerics with and without swap, checkpointing, fallbacks,
mixed dtypes, teardown; on the tiny Kandinsky 5 and LTX-2 DiTs: inference, LoRA training, and loading straight into
the swap's host layout. The adversarial transfer backend below delivers bytes only when the schedule waits for them
and poisons a slot the moment it is released, so any schedule error shows up as NaN or a mismatch."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinetune.core import block_swap, offload, offload_host
from cinetune.core.offload import (
    BlockSwap,
    CudaTransfer,
    SyncTransfer,
    Transfer,
    default_transfer,
    model_on_device,
    split_blocks_to_swap,
)
from cinetune.core.lora import inject_lora
from cinetune.core.quant import CastLinear, FP8Linear
from families import each_family

D = 16


class Block(nn.Module):
    """Pre-norm MLP block with a bias, a norm, a buffer and optionally LoRA-like trainable factors."""

    def __init__(self, d: int = D, lora: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.register_buffer("gain", torch.randn(d))
        if lora:
            self.down = nn.Parameter(torch.randn(2, d) * 0.1)
            self.up = nn.Parameter(torch.randn(d, 2) * 0.1)
        else:
            self.down = self.up = None

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.norm(x)
        out = self.fc2(F.gelu(self.fc1(h))) * self.gain
        if self.down is not None:
            out = out + (h @ self.down.t()) @ self.up.t()
        return x + scale * out


def make_stack(n: int = 6, lora: bool = False, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    blocks = nn.ModuleList(Block(lora=lora) for _ in range(n))
    for name, p in blocks.named_parameters():
        p.requires_grad_(lora and (name.endswith("down") or name.endswith("up")))
    return blocks


def run(blocks, x, ckpt: str | None = None) -> torch.Tensor:
    for b in blocks:
        if ckpt is None:
            x = b(x, scale=0.5)
        else:
            x = checkpoint(b, x, 0.5, use_reentrant=(ckpt == "reentrant"))
    return x


class PoisonTransfer(SyncTransfer):
    """Records the event order; copies happen only at ``wait`` (as late as an async copy may land) and a released
    slot is filled with 0xFF bytes (NaN in every float dtype) at once (as early as a reuse may overwrite it)."""

    def __init__(self, device="cpu") -> None:
        super().__init__(device)
        self.events: list[tuple] = []
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def allocate_slots(self, count, nbytes):
        self.slots = [torch.full((nbytes,), 255, dtype=torch.uint8) for _ in range(count)]
        return self.slots

    def copy_in(self, block, slot, src, dst):
        self.events.append(("copy", block, slot))
        self.pending = {b: v for b, v in self.pending.items() if v[2] != slot}
        self.pending[block] = (src, dst, slot)

    def wait(self, block):
        self.events.append(("wait", block))
        if block in self.pending:
            src, dst, _ = self.pending.pop(block)
            dst.copy_(src)

    def release(self, slot):
        self.events.append(("release", slot))
        self.slots[slot].fill_(255)

    def copies(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "copy"]


def in_slot(t: torch.Tensor, slots) -> bool:
    return any(s.data_ptr() <= t.data_ptr() < s.data_ptr() + s.numel() for s in slots)


def install_checker(blocks, reference, swap: BlockSwap, transfer: PoisonTransfer, log: list):
    """A pre-hook registered after BlockSwap's: the block's weights must be in a slot with the right values."""
    ref_state = [{k: v.clone() for k, v in b.state_dict().items()} for b in reference]
    handles = []
    for i, b in enumerate(blocks):
        def check(module, args, i=i):
            log.append(i)
            for name, t in module.state_dict(keep_vars=True).items():
                assert torch.equal(t.detach(), ref_state[i][name]), f"block {i} {name} wrong before its compute"
                if i in swap.swapped and not t.requires_grad:
                    assert in_slot(t, transfer.slots), f"block {i} {name} not in a slot"
            pointing = {j for j in swap.swapped for t in blocks[j].state_dict(keep_vars=True).values()
                        if not t.requires_grad and in_slot(t, transfer.slots)}
            assert len(pointing) <= swap.num_slots
        handles.append(b.register_forward_pre_hook(check))
    return handles


# ---------------------------------------------------------------------------------------------------------------


def test_inference_order_residency_and_bit_identical():
    blocks = make_stack(6)
    reference = copy.deepcopy(blocks)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expected = [run(reference, x), run(reference, x + 1)]
    tr = PoisonTransfer()
    swap = BlockSwap(blocks, 4, device="cpu", transfer=tr)
    assert swap.swapped == (2, 3, 4, 5) and swap.num_slots == 2
    log: list[int] = []
    install_checker(blocks, reference, swap, tr, log)
    with torch.no_grad():
        out = [run(blocks, x), run(blocks, x + 1)]
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert log == list(range(6)) * 2
    # block 0 prefetches 2 and 3; each swapped block prefetches the next; block 5 wraps around to block 2 of the next
    # step; the next step's block 0 brings block 3 back.
    assert tr.copies() == [2, 3, 4, 5, 2, 3, 4, 5, 2]
    assert tr.events[:4] == [("copy", 2, 0), ("copy", 3, 1), ("wait", 2), ("release", 0)]
    assert swap.stats["on_demand"] == 0
    assert swap.stats["bytes_copied"] == 9 * swap.slot_bytes  # identical blocks
    swap.close()


@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant"])
def test_training_with_checkpointing_order_and_bit_identical_gradients(ckpt):
    blocks = make_stack(6, lora=True)
    reference = copy.deepcopy(blocks)
    x = torch.randn(2, 5, D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    def step(bl, inp):
        loss = run(bl, inp, ckpt).square().mean()
        loss.backward()
        return loss.detach()

    ref_losses = [step(reference, x_ref) for _ in range(2)]
    tr = PoisonTransfer()
    swap = BlockSwap(blocks, 4, device="cpu", transfer=tr)
    log: list[int] = []
    install_checker(blocks, reference, swap, tr, log)
    losses = [step(blocks, x) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert torch.equal(x.grad, x_ref.grad)
    for p, q in zip(blocks.parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    # forward 0..5, then the recompute in reverse order 5..0, twice
    assert log == (list(range(6)) + list(range(5, -1, -1))) * 2
    # step 1: forward loads 2,3 (at block 0), 4, 5; backward loads 3 (at 4) and 2 (at 3); the last two swapped blocks
    # are still in the ring at the turn. Step 2 starts with 2 and 3 already in the ring.
    assert tr.copies() == [2, 3, 4, 5, 3, 2] + [4, 5, 3, 2]
    assert swap.stats["on_demand"] == 0  # every copy was issued one block ahead, in both directions
    swap.close()


def test_training_without_checkpointing_is_refused():
    blocks = make_stack(6, lora=True)
    swap = BlockSwap(blocks, 3, device="cpu")
    x = torch.randn(1, 3, D)
    with pytest.raises(RuntimeError, match=r"without gradient checkpointing.*torch\.utils\.checkpoint"):
        run(blocks, x)
    with torch.no_grad():
        run(blocks, x)  # inference is fine
    swap.close()
    # everything fits in the ring: no slot is reused, so no checkpointing is needed
    blocks = make_stack(6, lora=True)
    reference = copy.deepcopy(blocks)
    swap = BlockSwap(blocks, 2, device="cpu")
    run(blocks, x).sum().backward()
    run(reference, x).sum().backward()
    assert torch.equal(blocks[5].down.grad, reference[5].down.grad)
    swap.close()


def test_inference_mode_and_on_demand_order():
    blocks = make_stack(4)
    reference = copy.deepcopy(blocks)
    x = torch.randn(1, 3, D)
    swap = BlockSwap(blocks, 4, device="cpu", ring_size=1)
    with torch.inference_mode():
        # an order the schedule did not predict still gets the right weights, loaded on demand
        y = blocks[3](blocks[1](blocks[2](x)))
        y_ref = reference[3](reference[1](reference[2](x)))
    assert torch.equal(y, y_ref)
    assert swap.stats["on_demand"] >= 2
    swap.close()


def test_blocks_to_swap_zero_is_a_no_op():
    blocks = make_stack(3)
    ptrs = [p.data_ptr() for p in blocks.parameters()]
    swap = BlockSwap(blocks, 0, device="cpu")
    assert swap.num_slots == 0 and swap.ring_bytes == 0 and swap.host_bytes == 0
    assert all(not b._forward_pre_hooks for b in blocks)
    assert [p.data_ptr() for p in blocks.parameters()] == ptrs


def test_blocks_to_swap_limits():
    blocks = make_stack(6)
    reference = copy.deepcopy(blocks)
    x = torch.randn(1, 3, D)
    with pytest.raises(ValueError, match=r"blocks_to_swap=7 is out of range for 6 blocks.*maximum 6"):
        BlockSwap(blocks, 7, device="cpu")
    with pytest.raises(ValueError, match="maximum 6"):
        BlockSwap(blocks, -1, device="cpu")
    with pytest.raises(ValueError, match="ring_size must be an int ≥ 1"):
        BlockSwap(blocks, 2, device="cpu", ring_size=0)
    with pytest.raises(ValueError, match="blocks_to_swap must be an int"):
        BlockSwap(blocks, 2.0, device="cpu")
    swap = BlockSwap(blocks, 6, device="cpu")  # the maximum: every block streamed
    assert swap.swapped == tuple(range(6))
    with torch.no_grad():
        assert torch.equal(run(blocks, x), run(reference, x))
    swap.close()


def test_pin_refused_falls_back_to_pageable(monkeypatch):
    blocks = make_stack(5)
    reference = copy.deepcopy(blocks)

    def refuse(nbytes):
        raise RuntimeError("cannot lock memory")

    monkeypatch.setattr(block_swap, "_pinned_empty", refuse)
    with pytest.warns(RuntimeWarning, match="pinning host memory failed.*pageable"):
        swap = BlockSwap(blocks, 3, device="cpu", pin_memory=True)
    assert not swap.pinned
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        assert torch.equal(run(blocks, x), run(reference, x))
    swap.close()


def test_pin_memory_policy(monkeypatch):
    calls, unpinned = [], []
    monkeypatch.setattr(block_swap, "_pinned_empty", lambda n: calls.append(n) or torch.empty(n, dtype=torch.uint8))
    monkeypatch.setattr(block_swap, "_unpin", unpinned.append)
    BlockSwap(make_stack(4), 2, device="cpu").close()  # default on a CPU device: no pinning
    BlockSwap(make_stack(4), 2, device="cpu", pin_memory=False).close()
    assert calls == []
    blocks = make_stack(4)
    swap = BlockSwap(blocks, 2, device="cpu", pin_memory=True)
    assert len(calls) == 2 and swap.pinned and swap.host_bytes == sum(calls)
    ptrs = sorted(s.master.data_ptr() for s in swap._swapped.values())
    swap.close()
    assert unpinned == []  # the masters stay registered as the blocks' storage
    swap = BlockSwap(blocks, 2, device="cpu", pin_memory=True)
    assert len(calls) == 2 and swap.pinned and swap.stats["masters_reused"] == 2  # no second pinning
    swap.close()
    swap = BlockSwap(blocks, 2, device="cpu", pin_memory=False)  # pinned masters serve pageable requests too
    assert len(calls) == 2 and swap.stats["masters_reused"] == 2
    swap.close()
    del blocks, swap
    gc.collect()
    assert sorted(unpinned) == ptrs  # every registered master is unregistered when it is freed


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works here; the refusal is simulated above")
def test_pin_without_cuda_driver_falls_back():
    blocks = make_stack(3)
    with pytest.warns(RuntimeWarning, match="pageable"):
        swap = BlockSwap(blocks, 2, device="cpu", pin_memory=True)
    assert not swap.pinned
    swap.close()


class MixedBlock(nn.Module):
    """fp8 weight + fp32 scale buffer + fp32 bias, a bf16 Linear, a float64 vector and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.q = FP8Linear.from_linear(nn.Linear(D, D))
        self.h = CastLinear(D, D).to(torch.bfloat16)
        self.register_buffer("offset", torch.randn(D, dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(3, dtype=torch.int64))

    def forward(self, x):
        return x + self.h(self.q(x)) * 0.1 + self.offset.to(x.dtype) * self.shift


def test_mixed_dtypes_in_one_block():
    torch.manual_seed(1)
    blocks = nn.ModuleList(MixedBlock() for _ in range(4)).requires_grad_(False)
    reference = copy.deepcopy(blocks)
    tr = PoisonTransfer()
    swap = BlockSwap(blocks, 3, device="cpu", transfer=tr)
    assert {t.dtype for t in blocks[3].state_dict().values()} == {
        torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.float64, torch.int64}
    log: list[int] = []
    install_checker(blocks, reference, swap, tr, log)
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(run_plain(blocks, x), run_plain(reference, x))
    # one copy per block whatever the dtypes; each tensor on a 256-byte boundary
    assert tr.copies() == [1, 2, 3, 1, 2, 3, 1]
    for t in blocks[3].state_dict().values():
        assert (t.data_ptr() - tr.slots[swap.slot_contents().index(3)].data_ptr()) % offload.ALIGN_BYTES == 0
    swap.close()


def run_plain(blocks, x):
    for b in blocks:
        x = b(x)
    return x


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_close_keeps_masters_as_storage_and_the_next_attach_reuses_them():
    blocks = make_stack(5, lora=True)
    reference = copy.deepcopy(blocks)
    params_before = [id(p) for p in blocks.parameters()]
    swap = BlockSwap(blocks, 3, device="cpu")
    x = torch.randn(1, 3, D)
    with torch.no_grad():
        run(blocks, x)
    masters = {i: s.master for i, s in swap._swapped.items()}
    slot_refs = [weakref.ref(s) for s in swap._slots]
    swap_ref = weakref.ref(swap)
    swap.close()
    swap.close()  # idempotent
    del swap
    gc.collect()
    assert all(r() is None for r in slot_refs), "ring slots still referenced after close()"
    assert swap_ref() is None, "the blocks still reference the BlockSwap"
    assert all(not b._forward_pre_hooks for b in blocks)
    assert [id(p) for p in blocks.parameters()] == params_before
    for i, master in masters.items():  # no copy on close: each frozen tensor lives in its block's master
        for name, t in blocks[i].state_dict(keep_vars=True).items():
            if not t.requires_grad:
                assert _storage_ptr(t) == master.data_ptr(), f"block {i} {name} was copied out of its master"
    with torch.no_grad():
        assert torch.equal(run(blocks, x), run(reference, x))

    # the next attach packs nothing again; a block swapped for the first time is packed
    swap = BlockSwap(blocks, 4, device="cpu")
    assert swap.stats["masters_reused"] == 3
    assert {i: swap._swapped[i].master.data_ptr() for i in masters} == {i: m.data_ptr() for i, m in masters.items()}
    with torch.no_grad():
        assert torch.equal(run(blocks, x), run(reference, x))
    swap.close()

    # a tensor replaced since the close (e.g. a merged LoRA) makes its block pack afresh, with the new values
    with torch.no_grad():
        blocks[4].fc1.weight.data = blocks[4].fc1.weight.data + 1
        reference[4].fc1.weight.data = reference[4].fc1.weight.data + 1
    swap = BlockSwap(blocks, 2, device="cpu")
    assert swap.stats["masters_reused"] == 1
    with torch.no_grad():
        assert torch.equal(run(blocks, x), run(reference, x))
    swap.close()

    # blocks no longer swapped drop their kept master (on a GPU their weights move there; the master would leak)
    assert [i for i in range(5) if blocks[i] in offload_host._HOST_COPIES] == [3, 4]
    BlockSwap(blocks, 1, device="cpu").close()
    assert [i for i in range(5) if blocks[i] in offload_host._HOST_COPIES] == [4]
    BlockSwap(blocks, 0, device="cpu").close()
    assert not any(b in offload_host._HOST_COPIES for b in blocks)

    # the masters go with the blocks: nothing is left behind
    master_refs = [weakref.ref(m) for m in masters.values()]
    del masters, master, blocks
    gc.collect()
    assert all(r() is None for r in master_refs), "a master outlived its blocks"


def test_context_manager_and_shared_tensor_error():
    blocks = make_stack(3)
    with BlockSwap(blocks, 1, device="cpu") as swap:
        assert swap.slot_contents() == [None]
        with torch.no_grad():
            run(blocks, torch.randn(1, 2, D))
        assert swap.slot_contents() == [2]
    assert all(not b._forward_pre_hooks for b in blocks)
    shared = make_stack(2)
    shared[1].fc1 = shared[0].fc1
    with pytest.raises(ValueError, match="belongs to blocks 0 and 1"):
        BlockSwap(shared, 1, device="cpu")
    with torch.device("meta"):
        meta = make_stack(3)
    ptrs = [p.data_ptr() for p in blocks.parameters()]
    with pytest.raises(ValueError, match="meta device"):
        BlockSwap([*blocks, *meta], 2, device="cpu")
    assert [p.data_ptr() for p in blocks.parameters()] == ptrs and not blocks[0]._forward_pre_hooks


def test_requires_grad_changed_after_attach_is_reported():
    blocks = make_stack(4)
    swap = BlockSwap(blocks, 3, device="cpu")
    blocks[2].fc1.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="now requires grad"):
        run(blocks, torch.randn(1, 2, D))
    swap.close()


def test_custom_transfer_device_mismatch():
    with pytest.raises(ValueError, match="transfer.device"):
        BlockSwap(make_stack(3), 1, device="cpu", transfer=SyncTransfer("meta"))
    with pytest.raises(NotImplementedError):
        Transfer("cpu").copy_in(0, 0, torch.empty(1), torch.empty(1))
    with pytest.raises(RuntimeError, match="CudaTransfer needs an available CUDA device"):
        CudaTransfer("cpu")
    assert isinstance(default_transfer("cpu"), SyncTransfer)


def test_split_blocks_to_swap_musubi():
    assert split_blocks_to_swap(2, 32, 0) == (0, 0)
    assert split_blocks_to_swap(2, 32, 1) == (0, 1)
    assert split_blocks_to_swap(2, 32, 8) == (1, 7)
    assert split_blocks_to_swap(2, 32, 31) == (1, 30)
    assert split_blocks_to_swap(4, 60, 10) == (2, 8)
    assert split_blocks_to_swap(4, 60, 60) == (2, 58)
    with pytest.raises(ValueError, match="maximum 31"):
        split_blocks_to_swap(2, 32, 32)


@each_family
def test_tiny_dit_inference_with_swap(fam):
    """Every block streamed through a ring one slot smaller than the block count: bit-identical outputs, each block
    in a slot with the right values at its compute, never more blocks in the ring than slots, blocks loaded in
    execution order."""
    model = fam.build()
    reference = copy.deepcopy(model)
    blocks = fam.blocks(model)
    n = len(blocks)
    inputs = [fam.inputs(seed) for seed in (1, 2)]
    with torch.no_grad():
        expected = [fam.run(reference, inp) for inp in inputs]
    tr = PoisonTransfer()
    swap = BlockSwap(blocks, n, device="cpu", transfer=tr, ring_size=n - 1)
    assert swap.swapped == tuple(range(n)) and swap.num_slots == n - 1
    log: list[int] = []
    install_checker(blocks, fam.blocks(reference), swap, tr, log)
    with torch.no_grad():
        for inp, exp in zip(inputs, expected):
            assert torch.equal(fam.run(model, inp), exp)
    assert log == list(range(n)) * 2
    assert tr.copies()[:n] == list(range(n))
    swap.close()


def _randomize_lora(modules, seed: int = 3) -> None:
    """Trained-looking adapters: lora_up is zero after injection, which would leave every lora_down gradient 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.1)


@each_family
def test_tiny_dit_lora_training_with_swap_and_checkpointing(fam):
    """LoRA on the family's targets, every block streamed through a ring one slot smaller than the block count:
    losses and every adapter gradient bit-identical to the resident model; blocks run forward then recomputed in
    reverse; without gradient checkpointing the swap refuses to train."""
    model = fam.build()
    modules = inject_lora(model, rank=4, alpha=4, targets=fam.family.lora_targets, within=fam.family.lora_within)
    _randomize_lora(modules)
    reference = copy.deepcopy(model)
    blocks = fam.blocks(model)
    n = len(blocks)
    inputs = [fam.inputs(seed) for seed in (1, 2)]

    def step(m, inp):
        with fam.gradient_checkpointing(m):
            loss = fam.run(m, inp).square().mean()
            loss.backward()
        return loss.detach()

    ref_losses = [step(reference, inp) for inp in inputs]
    tr = PoisonTransfer()
    swap = BlockSwap(blocks, n, device="cpu", transfer=tr, ring_size=n - 1)
    log: list[int] = []
    install_checker(blocks, fam.blocks(reference), swap, tr, log)
    losses = [step(model, inp) for inp in inputs]
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    ref_params = dict(reference.named_parameters())
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(f"{path}.lora_{h}" for path in modules for h in ("down", "up"))
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grad, ref_params[name].grad), name
    assert log == (list(range(n)) + list(range(n - 1, -1, -1))) * 2
    with pytest.raises(RuntimeError, match="without gradient checkpointing"):
        fam.run(model, inputs[0])
    swap.close()


def _host_bytes(tensors) -> int:
    """Sum of the unique CPU storages behind ``tensors`` (what the host holds for them)."""
    storages = {}
    for t in tensors:
        if t.device.type == "cpu":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
@each_family
def test_swapping_every_loaded_block_takes_the_loaded_buffers_over(tiny_file, monkeypatch, fam, weight_dtype):
    """The loader reads each block into one buffer of the master layout; attaching adopts it (registered in place
    when pinning) instead of copying, so host memory stays the model's size, not twice it."""
    path = tiny_file(fam)
    model = fam.load(path, weight_dtype)
    reference = fam.load(path, weight_dtype)
    tensors = [*model.parameters(), *model.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    loaded_host = _host_bytes(tensors)
    blocks = fam.blocks(model)
    in_blocks = sum(len([*b.parameters(), *b.buffers()]) for b in blocks)
    # only the 256-byte alignment of each tensor inside the block buffers
    assert loaded_host <= model_bytes + offload.ALIGN_BYTES * in_blocks
    before = {id(t): t.data_ptr() for b in blocks for t in [*b.parameters(), *b.buffers()]}
    registered, unpinned = [], []
    monkeypatch.setattr(block_swap, "_register", lambda buf: registered.append(buf.data_ptr()) or buf)
    monkeypatch.setattr(block_swap, "_unpin", unpinned.append)
    swap = BlockSwap(blocks, len(blocks), device="cpu", pin_memory=True)
    assert swap.stats["masters_adopted"] == len(blocks) and swap.pinned and len(registered) == len(blocks)
    assert {id(t): t.data_ptr() for b in blocks for t in [*b.parameters(), *b.buffers()]} == before  # no copy
    masters = [sb.master for sb in swap._swapped.values()]
    assert _host_bytes([*tensors, *masters]) == loaded_host  # not ~2× the model
    inputs = fam.inputs()
    with torch.no_grad():
        assert torch.equal(fam.run(model, inputs), fam.run(reference, inputs))
    swap.close()
    swap = BlockSwap(blocks, len(blocks), device="cpu", pin_memory=True)  # the kept masters are reused as they are
    assert swap.stats["masters_reused"] == len(blocks) and len(registered) == len(blocks)
    swap.close()
    copied = BlockSwap([copy.deepcopy(b) for b in blocks], len(blocks), device="cpu")  # separate storages: copied
    assert copied.stats["masters_adopted"] == 0
    copied.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the stream/event path needs CUDA")
def test_cuda_streams_match_resident_weights():
    """Pinned masters, side-stream copies and events: same outputs and gradients as an all-resident model."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(256, lora=True) for _ in range(8))
    for name, p in blocks.named_parameters():
        p.requires_grad_(name.endswith("down") or name.endswith("up"))
    reference = copy.deepcopy(blocks).cuda()
    swap = BlockSwap(blocks, 6, device="cuda")
    assert swap.pinned and isinstance(swap.transfer, CudaTransfer)
    x = torch.randn(4, 512, 256, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(run(blocks, x), run(reference, x))
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        run(blocks, xa, "non_reentrant").square().mean().backward()
        run(reference, xb, "non_reentrant").square().mean().backward()
        assert torch.equal(xa.grad, xb.grad)
    for p, q in zip(blocks.parameters(), reference.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    assert swap.stats["on_demand"] == 0
    swap.close(device="cuda")


@each_family
def test_model_on_device_streams_the_blocks_and_restores(fam):
    model = fam.build()
    blocks = fam.blocks(model)
    inputs = fam.inputs()
    with torch.inference_mode():
        expected = fam.run(model, inputs)
        with model_on_device(model, blocks, "cpu", blocks_to_swap=len(blocks)) as swap:
            got = fam.run(model, inputs)
            assert swap.stats["copies"] >= len(blocks)
    assert torch.equal(got, expected)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(ValueError, match=f"maximum {len(blocks)}"):
        with model_on_device(model, blocks, "cpu", blocks_to_swap=len(blocks) + 1):
            pass


@each_family
def test_model_on_device_under_inference_mode_leaves_trainable_tensors(fam):
    model = fam.new()
    blocks = fam.blocks(model)
    with torch.inference_mode(), model_on_device(model, blocks, "cpu", blocks_to_swap=2):
        pass
    assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))


class OutOfMemoryTransfer(SyncTransfer):
    """The device has no room for the ring (what a too-small blocks_to_swap gives on a GPU)."""

    def allocate_slots(self, count, nbytes):
        raise torch.OutOfMemoryError(f"cannot allocate {count} slots of {nbytes} bytes")


def test_failed_attach_leaves_ordinary_modules_on_the_cpu():
    blocks = make_stack(5, lora=True)
    reference = copy.deepcopy(blocks)
    params_before = [id(p) for p in blocks.parameters()]
    with pytest.raises(torch.OutOfMemoryError, match="cannot allocate"):
        BlockSwap(blocks, 3, device="cpu", transfer=OutOfMemoryTransfer("cpu"))
    assert all(not b._forward_pre_hooks for b in blocks)
    assert [id(p) for p in blocks.parameters()] == params_before
    assert all(t.device.type == "cpu" for t in blocks.state_dict().values())
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        assert torch.equal(run(blocks, x), run(reference, x))
    swap = BlockSwap(blocks, 3, device="cpu")  # the same blocks attach again afterwards
    with torch.no_grad():
        assert torch.equal(run(blocks, x), run(reference, x))
    swap.close()


class FakeCudart:
    """``torch.cuda.cudart()`` of a driver that refuses to lock or unlock host memory (the GPU is simulated)."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.calls: list[str] = []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append("register")
        return self.status

    def cudaHostUnregister(self, ptr):
        self.calls.append("unregister")
        return self.status


def test_refused_pinning_clears_the_cuda_error_it_leaves(monkeypatch):
    # The runtime keeps the failed call's status as its "last error" and torch's binding does not reset it, so the
    # next kernel launch would fail with it; the swap must consume it before going on with pageable memory.
    cudart = FakeCudart(status=2)  # cudaErrorMemoryAllocation
    cleared: list[bool] = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(offload_host, "_clear_cuda_error", lambda: cleared.append(True))
    with pytest.raises(RuntimeError, match="cudaHostRegister of 64 bytes failed with CUDA error 2"):
        offload_host._pinned_empty(64)
    assert cleared == [True]
    offload_host._unpin(1234)
    assert cudart.calls == ["register", "unregister"] and cleared == [True, True]
    cudart.status = 0
    offload_host._pinned_empty(64)
    offload_host._unpin(1234)
    assert cleared == [True, True]


def test_swapped_model_is_left_on_the_cpu_whatever_the_offload_device(monkeypatch):
    # ComfyUI --highvram parks idle models on the GPU; a model that needed block swap must not be moved there whole.
    # Without a GPU the host's offload device is stood in for by "cpu:0" and the device given to close() is recorded.
    closed_to: list[torch.device] = []
    close = BlockSwap.close
    monkeypatch.setattr(BlockSwap, "close", lambda self, device="cpu": closed_to.append(torch.device(device))
                        or close(self, device))
    model = nn.Sequential(nn.Linear(D, D), *make_stack(4))
    blocks = list(model)[1:]
    host_park = torch.device("cpu", 0)
    with torch.no_grad(), model_on_device(model, blocks, "cpu", blocks_to_swap=2, offload_device=host_park):
        model(torch.randn(1, D))
    with torch.no_grad(), model_on_device(model, blocks, "cpu", blocks_to_swap=0, offload_device=host_park):
        model(torch.randn(1, D))
    assert closed_to == [torch.device("cpu"), host_park]
