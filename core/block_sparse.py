"""Block-sparse softmax attention in plain PyTorch, without a compiler: the *gathered* path.

Query block i of head (b, h) attends only the key blocks j with ``block_mask[b, h, i, j]``. For each query block the
kept key and value blocks are gathered, in ascending block order, into one contiguous sequence, and the query block
attends that sequence through ``F.scaled_dot_product_attention`` (so the fused kernels still run). Query blocks are
sorted by their number of kept blocks and batched into one kernel call when their counts are similar: the shorter
key lists are padded (repeating their last block) and the padding masked, at most ``_PADDING`` extra work per call.
Query blocks that keep (almost) every key block gather nothing: they attend their head's keys where they are — the
ones that keep every block as one query sequence per head, the others with their dropped blocks masked. Dropped
blocks are otherwise never computed: the work is about the kept fraction of dense attention, plus the gathers.

The result equals dense attention with the scores of dropped blocks at −inf (to float rounding: only the order of
the softmax sums differs); a query block that keeps no key block outputs zeros (FlexAttention's convention, as the
masked dense path). The same construction — a per-query-block list of kept key blocks, attended with a fused kernel
— is what FlexAttention's ``BlockMask`` (``kv_num_blocks``/``kv_indices``) describes; here it is executed by gathers
instead of a generated kernel.

Memory stays bounded: the gathered keys and values of one kernel call hold at most :func:`gather_budget` elements
each (on CPU at least one whole key list per thread), in one workspace reused by every call of the attention.
Under autograd a custom backward keeps only q, k, v, the output and, on CPU, the float32 log-sum-exp of every query
row (``aten::_scaled_dot_product_flash_attention_for_cpu``, the kernel behind SDPA on CPU); its backward regathers
each batch and runs the kernel's own backward (``..._for_cpu_backward``) with the saved output and log-sum-exp, so
nothing is recomputed. Where that kernel is missing (other devices, or a torch without it) each batch's attention is
recomputed in backward through SDPA's autograd instead. The gradients of the gathered keys and values are scattered
back with ``index_add_``.

A sequence whose length S is not a multiple of the block size ends in a short block: q, k and v are zero-padded to
whole blocks, the padded key tokens are masked (the short block is the last of a row's ascending key list), and the
padded query rows are cut from the output.

Ordering and grouping are decided on the host from the mask (one device-to-host copy of the per-row counts per
call). Speed: a query block is 64 rows, so the kernel runs in short query tiles, below its dense-attention rate
(on CPU about 0.6×, torch 2.14), and each kept block pair moves one key and one value block through memory besides
its 4·bs²·D FLOPs; so the speed-up over dense attention stays below 1 / kept fraction. On devices with far more
compute than bandwidth (GPUs) the gathers, not the FLOPs, bound the speed; compiled FlexAttention does not gather.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Elements of the gathered keys (and as many of the values) of one kernel call, per device type: large enough that a
# call batches many query blocks (each call has a fixed cost, and threads left without work wait for the others).
_GATHER_ELEMENTS = {"cpu": 1 << 24}
_DEFAULT_GATHER_ELEMENTS = 1 << 26
# Largest share of extra (masked) key work a call may take on to batch query blocks whose kept counts differ.
_PADDING = 0.125

_lse_kernel_state: dict[torch.dtype, bool] = {}


def gather_budget(device_type: str) -> int:
    """Elements of the gathered keys of one kernel call on ``device_type`` ("cpu", "cuda", ...), and as many of the
    values; a query block's whole key list is gathered at once even when it is longer (on CPU, one per thread)."""
    return _GATHER_ELEMENTS.get(device_type, _DEFAULT_GATHER_ELEMENTS)


@dataclass
class _Batch:
    """One kernel call over the query rows ``rows`` (int64 [n], indices into the R = B·H·nb query blocks).

    Gathered (``keys`` not None): ``keys`` int32 [n·slots] are the key blocks of each row (indices into the B·H·nb
    key blocks) in ascending order, padded to ``slots`` by repeating the row's last kept block; ``lengths`` (int64
    [n]) the real key tokens of each row when some slots are padding or end with the short last block, else None.
    In place (``keys`` None): the rows attend the keys of head ``head`` (index b·H + h) where they are;
    ``kept`` (bool [n, nb]) are the rows' block masks when some row drops a block, else None."""

    rows: torch.Tensor
    keys: torch.Tensor | None = None
    slots: int = 0
    lengths: torch.Tensor | None = None
    head: int = -1
    kept: torch.Tensor | None = None


@dataclass
class _Plan:
    batches: list[_Batch]
    rows: int  # R = B·H·nb
    S: int  # real tokens
    max_keys: int  # largest n·slots·bs of a gathered batch, or n·S of a masked in-place one (elements / D)
    max_queries: int  # largest n·bs (query rows of one call)


def _plan(block_mask: torch.Tensor, B: int, H: int, nb: int, bs: int, S: int, D: int) -> _Plan:
    """Group the query blocks of ``block_mask`` (bool [B or 1, H or 1, nb, nb]) into kernel calls.

    Rows (query blocks) are sorted by their number of kept key blocks. Rows that keep at least nb / (1 + _PADDING)
    blocks attend their head's keys in place (the dropped blocks masked): per head one call for the rows that keep
    every block, and calls for the others; the other rows are cut into
    runs whose padded work stays within _PADDING of their kept work and whose gathered keys fit the budget (at
    least one row per CPU thread).
    """
    R = B * H * nb
    m = block_mask.expand(B, H, nb, nb).reshape(R, nb)
    counts = m.sum(dim=-1)
    order = torch.argsort(counts, stable=True)
    sorted_counts = counts[order].tolist()
    tail = S - (nb - 1) * bs  # tokens in the last block
    budget = max(1, gather_budget(block_mask.device.type) // D)  # key tokens per call
    min_rows = torch.get_num_threads() if block_mask.device.type == "cpu" else 1
    first = bisect.bisect_left(sorted_counts, 1)
    in_place = bisect.bisect_left(sorted_counts, math.ceil(nb / (1.0 + _PADDING)))

    batches: list[_Batch] = []
    max_keys = max_queries = 0
    if in_place < R:
        # rows of one head that keep every block: one call, the rows as one query sequence (the kernel's long tiles);
        # the head's other in-place rows: calls of rows with their own key masks
        rows = order[in_place:]
        group = rows // nb * 2 + (counts.index_select(0, rows) < nb)
        rows = rows[torch.argsort(group, stable=True)]
        groups, sizes = torch.unique_consecutive(group.sort(stable=True).values, return_counts=True)
        start = 0
        for value, size in zip(groups.tolist(), sizes.tolist()):
            head, masked = divmod(value, 2)
            head_rows = rows[start:start + size]
            start += size
            if not masked:
                batches.append(_Batch(head_rows, head=head))
                max_queries = max(max_queries, size * bs)
                continue
            per_call = max(min_rows, budget // S)  # the kernel returns key gradients per row: [n, S, D]
            for r0 in range(0, size, per_call):
                part = head_rows[r0:r0 + per_call]
                batches.append(_Batch(part, head=head, kept=m.index_select(0, part)))
                max_keys, max_queries = max(max_keys, part.numel() * S), max(max_queries, part.numel() * bs)

    if first < in_place:
        part_rows = order[first:in_place]
        part_counts = counts.index_select(0, part_rows)
        # kept (row, key block) pairs in row-major order, so each row's keys ascend; 24 bytes per pair at most here
        flat = m.index_select(0, part_rows).reshape(-1).nonzero().squeeze(1)
        keys = (part_rows // nb * nb).index_select(0, torch.div(flat, nb, rounding_mode="floor"))
        keys += flat.remainder_(nb)
        del flat
        keys = keys.to(torch.int32)
        ends = torch.cumsum(part_counts, 0)
        real = part_counts * bs
        if tail < bs:
            real -= (bs - tail) * m.index_select(0, part_rows)[:, -1]
        i, n_part = 0, in_place - first
        while i < n_part:
            j, total = i, 0
            while j < n_part:
                c, n = sorted_counts[first + j], j - i + 1
                if n > 1 and ((n * c * bs > budget and n > min_rows) or n * c > (1.0 + _PADDING) * (total + c)):
                    break
                total += c
                j += 1
            slots = sorted_counts[first + j - 1]
            slot = torch.arange(slots, device=m.device)
            end = ends[i:j, None]
            idx = torch.minimum(end - part_counts[i:j, None] + slot, end - 1)  # pad with the last kept block
            lengths = real[i:j]
            batches.append(_Batch(part_rows[i:j], keys=keys[idx.reshape(-1)], slots=slots,
                                  lengths=None if bool((lengths == slots * bs).all()) else lengths))
            max_keys, max_queries = max(max_keys, (j - i) * slots * bs), max(max_queries, (j - i) * bs)
            i = j
    return _Plan(batches, R, S, max_keys, max_queries)


class _Workspace:
    """Buffers the gathered q, k, v (and, in backward, output-gradient and output) rows are copied into, reused by
    every call; views of it are only valid until the next call's gathers."""

    def __init__(self, plan: _Plan, like: torch.Tensor, D: int, extra: int = 0) -> None:
        kw = dict(dtype=like.dtype, device=like.device)
        self.k = torch.empty(plan.max_keys * D, **kw)
        self.v = torch.empty(plan.max_keys * D, **kw)
        self.q = [torch.empty(plan.max_queries * D, **kw) for _ in range(1 + extra)]


def _key_mask(batch: _Batch, bs: int, S: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key mask [n, 1, 1, L] (0 or −inf) of a batch whose rows do not all attend every key it holds."""
    if batch.keys is not None and batch.lengths is not None:
        valid = torch.arange(batch.slots * bs, device=batch.rows.device) < batch.lengths[:, None]
    elif batch.keys is None and batch.kept is not None:
        valid = batch.kept.repeat_interleave(bs, dim=1)[:, :S]
    else:
        return None
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
    return mask[:, None, None]


def _gather(batch: _Batch, bs: int, D: int, S: int, ws: _Workspace, q3, k3, v3, head_keys, head_values, *rows_from):
    """Inputs of one call: the query rows and the same rows of each tensor in ``rows_from`` (each [R, bs, D]) as
    [n, 1, bs, D] ([1, 1, n·bs, D] for an unmasked in-place head), keys and values [n or 1, 1, L, D] (an in-place
    head's: its first S tokens, expanded over the rows when masked), and the key mask or None."""
    n = batch.rows.numel()
    mask = _key_mask(batch, bs, S, q3.dtype)
    shape = (1, 1, n * bs, D) if batch.keys is None and mask is None else (n, 1, bs, D)
    qs = [torch.index_select(src, 0, batch.rows, out=buf[: n * bs * D].view(n, bs, D)).view(shape)
          for src, buf in zip((q3, *rows_from), ws.q)]
    if batch.keys is None:
        k, v = head_keys[batch.head, :S].view(1, 1, S, D), head_values[batch.head, :S].view(1, 1, S, D)
        if mask is not None:
            k, v = k.expand(n, 1, S, D), v.expand(n, 1, S, D)
    else:
        size = n * batch.slots
        k = torch.index_select(k3, 0, batch.keys, out=ws.k[: size * bs * D].view(size, bs, D))
        v = torch.index_select(v3, 0, batch.keys, out=ws.v[: size * bs * D].view(size, bs, D))
        k, v = k.view(n, 1, batch.slots * bs, D), v.view(n, 1, batch.slots * bs, D)
    return (*qs, k, v, mask)


def _lse_kernels():
    """The CPU flash-attention kernel pair that returns / takes the log-sum-exp, or None where torch lacks it."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    except (AttributeError, RuntimeError):
        return None


def _lse_kernels_work(dtype: torch.dtype) -> bool:
    """Whether the private CPU kernel pair exists and runs for ``dtype`` with the call signature used here (probed
    once per dtype on a tiny input: the operators are not public API, so another torch may differ)."""
    if dtype not in _lse_kernel_state:
        kernels = _lse_kernels()
        ok = False
        if kernels is not None:
            t = torch.ones(1, 1, 2, 8, dtype=dtype)
            try:
                o, lse = kernels[0](t, t, t)
                grads = kernels[1](t, t, t, t, o, lse, 0.0, False)
                ok = lse.dtype == torch.float32 and tuple(lse.shape) == (1, 1, 2) and len(grads) == 3
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _lse_kernel_state[dtype] = ok
    return _lse_kernel_state[dtype]


def _views(t: torch.Tensor, nb: int, bs: int):
    """[B, H, nb·bs, D] → ([B·H·nb, bs, D] blocks, [B·H, nb·bs, D] heads), both views."""
    B, H, Sp, D = t.shape
    return t.reshape(B * H * nb, bs, D), t.reshape(B * H, Sp, D)


def _run_forward(q, k, v, plan: _Plan, bs: int, lse: torch.Tensor | None) -> torch.Tensor:
    """Forward over padded q, k, v [B, H, nb·bs, D]; fills ``lse`` [R, bs] (float32) when given."""
    B, H, Sp, D = q.shape
    nb = Sp // bs
    (q3, _), (k3, kh), (v3, vh) = _views(q, nb, bs), _views(k, nb, bs), _views(v, nb, bs)
    out = q.new_zeros(q.shape)
    out3 = out.view(plan.rows, bs, D)
    ws = _Workspace(plan, q, D)
    kernel = _lse_kernels()[0] if lse is not None else None
    for batch in plan.batches:
        qg, kg, vg, mask = _gather(batch, bs, D, plan.S, ws, q3, k3, v3, kh, vh)
        n = batch.rows.numel()
        if kernel is None:
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)
        else:
            o, l = kernel(qg, kg, vg, attn_mask=mask)
            lse.index_copy_(0, batch.rows, l.reshape(n, bs))
        out3.index_copy_(0, batch.rows, o.reshape(n, bs, D))
        del o, qg, kg, vg, mask  # before the next call's kernel output is allocated
    return out


def _scatter(batch: _Batch, bs: int, D: int, S: int, grads, gq, gk, gv) -> None:
    """Add one call's input gradients into the [R, bs, D] / [B·H, nb·bs, D] views ``grads`` = (dq3, dk3, dkh, dv3,
    dvh); the gradients of masked keys are zeros."""
    dq3, dk3, dkh, dv3, dvh = grads
    n = batch.rows.numel()
    dq3.index_copy_(0, batch.rows, gq.reshape(n, bs, D))
    if batch.keys is None:  # [n or 1, 1, S, D]: the rows share the head's keys
        dkh[batch.head, :S] += gk.reshape(-1, S, D).sum(0)
        dvh[batch.head, :S] += gv.reshape(-1, S, D).sum(0)
    else:
        dk3.index_add_(0, batch.keys, gk.reshape(n * batch.slots, bs, D))
        dv3.index_add_(0, batch.keys, gv.reshape(n * batch.slots, bs, D))


def _backward_batch(batch: _Batch, bs: int, D: int, S: int, ws: _Workspace, views, lse, lse_backward,
                    grads) -> None:
    """Input gradients of one call, added into ``grads``; its temporaries (the kernel's key/value gradients, as
    large as the gathered keys) are freed on return, before the next call allocates its own."""
    q3, k3, v3, kh, vh, dout3, out3 = views
    if lse_backward is not None:
        qg, dog, og, kg, vg, mask = _gather(batch, bs, D, S, ws, q3, k3, v3, kh, vh, dout3, out3)
        lg = lse.index_select(0, batch.rows).view(og.shape[:-1])
        gq, gk, gv = lse_backward(dog, qg, kg, vg, og, lg, 0.0, False, attn_mask=mask)
    else:
        qg, dog, kg, vg, mask = _gather(batch, bs, D, S, ws, q3, k3, v3, kh, vh, dout3)
        with torch.enable_grad():
            # an in-place head's keys enter expanded over the rows: differentiate the unexpanded tensor
            leaves = [t.detach().requires_grad_() for t in (qg, kg[:1], vg[:1])] if batch.keys is None else \
                [t.detach().requires_grad_() for t in (qg, kg, vg)]
            k_in, v_in = (t.expand(kg.shape) for t in leaves[1:])
            out = F.scaled_dot_product_attention(leaves[0], k_in, v_in, attn_mask=mask)
            gq, gk, gv = torch.autograd.grad(out, leaves, dog)
    _scatter(batch, bs, D, S, grads, gq, gk, gv)


class _GatheredAttention(torch.autograd.Function):
    """Differentiable gathered attention over padded q, k, v [B, H, nb·bs, D]."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, bs: int):
        lse = None
        if q.device.type == "cpu" and _lse_kernels_work(q.dtype):
            lse = torch.empty(plan.rows, bs, dtype=torch.float32, device=q.device)
        out = _run_forward(q, k, v, plan, bs, lse)
        ctx.plan, ctx.bs = plan, bs
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, bs = ctx.plan, ctx.bs
        B, H, Sp, D = q.shape
        nb = Sp // bs
        (q3, _), (k3, kh), (v3, vh) = _views(q, nb, bs), _views(k, nb, bs), _views(v, nb, bs)
        dout = dout.contiguous()
        dout3, out3 = dout.view(plan.rows, bs, D), out.view(plan.rows, bs, D)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grads = (dq.view(plan.rows, bs, D), *_views(dk, nb, bs), *_views(dv, nb, bs))
        ws = _Workspace(plan, q, D, extra=2)
        lse_backward = _lse_kernels()[1] if lse is not None else None
        for batch in plan.batches:
            _backward_batch(batch, bs, D, plan.S, ws, (q3, k3, v3, kh, vh, dout3, out3), lse, lse_backward, grads)
        return dq, dk, dv, None, None


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                       block_size: int) -> torch.Tensor:
    """Block-sparse self-attention by gathering each query block's kept key/value blocks (module docstring).

    ``out[b, h, t] = softmax_j(q[b,h,t]·k[b,h,j] / sqrt(D) over keys j whose block is kept) · v`` — dense attention
    with the scores of dropped blocks at −inf (NABLA, arXiv 2507.13546 §3; block lists as FlexAttention's
    ``BlockMask``, PyTorch ``torch/nn/attention/flex_attention.py``). A query block with no kept key block gives
    zeros.

    Args:
        q, k, v: [B, H, S, D], one floating dtype and device (validated by
            :func:`cinetune.core.attention.block_sparse_attention`, the entry point to use).
        block_mask: bool [B or 1, H or 1, nb, nb], nb = ceil(S / block_size); True = the query block attends the key
            block. The last block holds S − (nb − 1)·block_size tokens.
        block_size: tokens per block.

    Returns:
        [B, H, S, D] in the dtype of q; differentiable in q, k and v (first order).
    """
    B, H, S, D = q.shape
    nb = math.ceil(S / block_size)
    plan = _plan(block_mask, B, H, nb, block_size, S, D)
    pad = nb * block_size - S
    # the gathers need [B·H·nb, bs, D] views: pad to whole blocks, or make contiguous (K5's q, k, v are transposes)
    q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous() for t in (q, k, v))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = _GatheredAttention.apply(q, k, v, plan, block_size)
    else:
        out = _run_forward(q, k, v, plan, block_size, None)
    return out[:, :, :S] if pad else out
