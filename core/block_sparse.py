"""Block-sparse softmax attention in plain PyTorch, without a compiler: the *gathered* path.

Query block i of head (b, h) attends only the key blocks j with ``block_mask[b, h, i, j]``. Forward: for each query
block the kept key and value blocks are gathered, in ascending block order, into one contiguous sequence, and the
query block attends that sequence through ``F.scaled_dot_product_attention`` (so the fused kernels still run). Query
blocks are sorted by their number of kept blocks and batched into one kernel call when their counts are similar: the
shorter key lists are padded (repeating their last block) and the padding masked, at most ``_PADDING`` extra work per
call. Query blocks that keep (almost) every key block gather nothing: they attend their head's keys where they are —
the ones that keep every block as one query sequence per head, the others with their dropped blocks masked. Dropped
blocks are otherwise never computed: the work is about the kept fraction of dense attention, plus the gathers.

The result equals dense attention with the scores of dropped blocks at −inf (to float rounding: only the order of
the softmax sums differs); a query block that keeps no key block outputs zeros (FlexAttention's convention, as the
masked dense path). The same construction — a per-query-block list of kept key blocks, attended with a fused kernel
— is what FlexAttention's ``BlockMask`` (``kv_num_blocks``/``kv_indices``) describes; here it is executed by gathers
instead of a generated kernel.

Backward. Autograd keeps only q, k, v, the output and, on CPU, the float32 log-sum-exp of every query row (from
``aten::_scaled_dot_product_flash_attention_for_cpu``, the kernel behind SDPA on CPU). On CPU the backward runs
*by key block*: for each key block, the query blocks that keep it are gathered (queries, output gradients, outputs,
log-sum-exps) and the kernel's own backward (``..._for_cpu_backward``) runs them against that one key block. With
the row's full log-sum-exp and output this gives exactly that key block's share of the gradients (the softmax
backward of a row splits over its keys: dS = P ∘ (dP − rowsum(dO ∘ O)), FlashAttention-2, arXiv 2307.08691, Alg. 2),
so the key and value gradients come out whole and only the query gradients are scattered back (``index_add_``).
Why by key block: the kernel's backward runs a 64-row query block at ~0.6× its dense rate (its gradient tiles are
updated every 32 query rows), but one 64-token key block against a long list of query rows at ~0.85× (torch 2.14,
measured with one thread). Key blocks are batched by count like the query blocks of the forward; a shorter list is
padded with a sentinel row whose log-sum-exp is +inf, so its probabilities — and every gradient it would add — are
exactly zero, with no mask. Where that kernel is missing (other devices, or a torch without it) each forward call
is differentiated by query block instead: its gathers are repeated and its attention recomputed through SDPA's
autograd. Rows attended in place are differentiated by query block everywhere (on CPU with the kernel's backward and
the saved log-sum-exp). Their key/value gradients are scattered back with ``index_add_``.

Memory stays bounded: the gathered keys and values (forward) or query rows (backward) of one kernel call hold at
most :func:`gather_budget` elements each (or the lists of one block per CPU thread when longer), in one workspace
reused by every call of the attention. On CPU the budget is small (4 MiB of float32): the gathered blocks are read
back by the kernel while still in cache, and the kernel's own per-call temporaries (the gradients of the gathered
blocks) stay below glibc's adaptive mmap threshold, so they are not mapped and zero-filled afresh on every call.

A sequence whose length S is not a multiple of the block size ends in a short block: q, k and v are zero-padded to
whole blocks, the padded key tokens are masked (the short block is the last of a row's ascending key list; in the
backward, a call holding it masks its padded tokens), and the padded query rows are cut from the output.

Ordering and grouping are decided on the host from the mask (one device-to-host copy of the per-row counts per
call). Speed: a query block is 64 rows, so the forward kernel runs in short query tiles, below its dense-attention
rate (on CPU about 0.7×, torch 2.14), and each kept block pair moves one key and one value block through memory
besides its 4·bs²·D FLOPs; so the speed-up over dense attention stays below 1 / kept fraction. On devices with far
more compute than bandwidth (GPUs) the gathers, not the FLOPs, bound the speed; compiled FlexAttention does not
gather.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Elements of the gathered keys (and as many of the values) of one kernel call, per device type. CPU: small enough to
# stay in cache and below glibc's mmap threshold (see the module docstring; 2**20 measured fastest of 2**18–2**24 on
# a 2-core CPU at 16k tokens); elsewhere large enough that a call batches many query blocks.
_GATHER_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_GATHER_ELEMENTS = 1 << 26
# Largest share of extra (masked or zero) work a call may take on to batch lists whose lengths differ.
_PADDING = 0.125
# Block pairs whose backward calls are planned at once (whole heads, at least one): the plan's temporaries take up to
# 24 bytes per kept pair.
_PLAN_PAIRS = 1 << 20

_lse_kernel_state: dict[torch.dtype, bool] = {}


def gather_budget(device_type: str) -> int:
    """Elements of the gathered keys of one kernel call on ``device_type`` ("cpu", "cuda", ...), and as many of the
    values; a query block's whole key list is gathered at once even when it is longer (on CPU, one per thread)."""
    return _GATHER_ELEMENTS.get(device_type, _DEFAULT_GATHER_ELEMENTS)


def _min_lists(device_type: str) -> int:
    """The fewest lists per call: on CPU one per thread (the kernels parallelise over them)."""
    return torch.get_num_threads() if device_type == "cpu" else 1


@dataclass
class _Batch:
    """One forward kernel call over the query rows ``rows`` (int64 [n], indices into the R = B·H·nb query blocks).

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
class _ColumnBatch:
    """One backward kernel call over the key blocks ``keys`` (int32 [n]): ``rows`` int32 [n·slots] are the query
    blocks that keep each key block, ascending, padded to ``slots`` with the sentinel row R; ``short`` (bool [n]) marks
    the short last key block of a head when the sequence ends in one, else None."""

    keys: torch.Tensor
    rows: torch.Tensor
    slots: int
    short: torch.Tensor | None = None


@dataclass
class _Plan:
    batches: list[_Batch]
    rows: int  # R = B·H·nb
    nb: int
    S: int  # real tokens
    max_keys: int  # largest n·slots·bs of a gathered batch, or n·S of a masked in-place one (elements / D)
    max_queries: int  # largest n·bs (query rows of one call)
    m: torch.Tensor  # bool [R, nb], the block mask per query block (a view of the caller's mask where possible)
    partial: torch.Tensor  # int64: the gathered query blocks (those keeping some but not almost all key blocks)


def _cut(counts: list[int], bs: int, budget: int, min_lists: int):
    """Cut lists sorted by length (``counts``, in blocks) into calls: yields (start, stop, slots) such that a call's
    padded work stays within _PADDING of its real work and its gathered tokens fit ``budget`` (at least
    ``min_lists`` lists per call)."""
    i, n_lists = 0, len(counts)
    while i < n_lists:
        j, total = i, 0
        while j < n_lists:
            c, n = counts[j], j - i + 1
            if n > 1 and ((n * c * bs > budget and n > min_lists) or n * c > (1.0 + _PADDING) * (total + c)):
                break
            total += c
            j += 1
        yield i, j, counts[j - 1]
        i = j


def _index_lists(lists: torch.Tensor, owners: torch.Tensor, counts: torch.Tensor, nb: int, bs: int, budget: int,
                 min_lists: int, sentinel: int | None, first: int = 0):
    """Padded index lists of ``owners`` (int64 [n], ascending ``counts``) in ``lists`` (bool [rows, nb]: row r is list
    ``first + r``, which holds the items (list // nb)·nb + j where ``lists[r, j]``; ``first`` a multiple of nb), batched
    by :func:`_cut`. Yields (start, stop, slots, items int32 [(stop − start)·slots]); a short list is padded with its
    last item, or with ``sentinel`` when given."""
    # kept (owner, j) pairs in row-major order, so each list ascends; 24 bytes per pair at most here
    flat = lists.index_select(0, owners - first if first else owners).reshape(-1).nonzero().squeeze(1)
    items = (owners // nb * nb).index_select(0, torch.div(flat, nb, rounding_mode="floor"))
    items += flat.remainder_(nb)
    del flat
    items = items.to(torch.int32)
    if sentinel is not None:
        items = torch.cat([items, items.new_full((1,), sentinel)])
    ends = torch.cumsum(counts, 0)
    for i, j, slots in _cut(counts.tolist(), bs, budget, min_lists):
        end = ends[i:j, None]
        idx = end - counts[i:j, None] + torch.arange(slots, device=lists.device)
        idx = torch.minimum(idx, end - 1) if sentinel is None else torch.where(idx < end, idx, items.numel() - 1)
        yield i, j, slots, items[idx.reshape(-1)]


def _plan(block_mask: torch.Tensor, B: int, H: int, nb: int, bs: int, S: int, D: int) -> _Plan:
    """Group the query blocks of ``block_mask`` (bool [B or 1, H or 1, nb, nb]) into forward kernel calls.

    Rows (query blocks) are sorted by their number of kept key blocks. Rows that keep at least nb / (1 + _PADDING)
    blocks attend their head's keys in place (the dropped blocks masked): per head one call for the rows that keep
    every block, and calls for the others; the other rows are gathered, cut by :func:`_cut`.
    """
    R = B * H * nb
    m = block_mask.expand(B, H, nb, nb).reshape(R, nb)
    counts = m.sum(dim=-1)
    order = torch.argsort(counts, stable=True)
    sorted_counts = counts[order].tolist()
    tail = S - (nb - 1) * bs  # tokens in the last block
    budget = max(1, gather_budget(block_mask.device.type) // D)  # key tokens per call
    min_rows = _min_lists(block_mask.device.type)
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

    part_rows = order[first:in_place]
    if first < in_place:
        part_counts = counts.index_select(0, part_rows)
        real = part_counts * bs
        if tail < bs:
            real -= (bs - tail) * m.index_select(0, part_rows)[:, -1]
        for i, j, slots, keys in _index_lists(m, part_rows, part_counts, nb, bs, budget, min_rows, None):
            lengths = real[i:j]
            batches.append(_Batch(part_rows[i:j], keys=keys, slots=slots,
                                  lengths=None if bool((lengths == slots * bs).all()) else lengths))
            max_keys, max_queries = max(max_keys, (j - i) * slots * bs), max(max_queries, (j - i) * bs)
    return _Plan(batches, R, nb, S, max_keys, max_queries, m, part_rows)


def _column_plan(plan: _Plan, gathered: torch.Tensor, heads: range, bs: int,
                 D: int) -> tuple[list[_ColumnBatch], int]:
    """The backward calls, by key block (module docstring), of the key blocks of ``heads`` (indices b·H + h) for the
    query blocks marked in ``gathered`` (bool [R]), and the largest n·slots·bs of a call (query tokens gathered at
    once)."""
    R, nb = plan.rows, plan.nb
    span = slice(heads.start * nb, heads.stop * nb)
    # list of key block K = the gathered query blocks of its head that keep it: the transposed mask, per head
    lists = (plan.m[span] & gathered[span, None]).view(-1, nb, nb).transpose(1, 2).reshape(-1, nb)
    counts = lists.sum(dim=-1)
    order = torch.argsort(counts, stable=True)
    keys = order[bisect.bisect_left(counts[order].tolist(), 1):]
    counts = counts.index_select(0, keys)
    keys += span.start
    short_tail = plan.S < nb * bs
    budget = max(1, gather_budget(lists.device.type) // D)
    batches, most = [], 0
    for i, j, slots, rows in _index_lists(lists, keys, counts, nb, bs, budget, _min_lists(lists.device.type), R,
                                          first=span.start):
        short = keys[i:j] % nb == nb - 1 if short_tail else None
        # int32: index_add_ with an int64 index takes a far slower scatter_add_ path on CPU (torch 2.14)
        batches.append(_ColumnBatch(keys[i:j].to(torch.int32), rows, slots,
                                    short if short is not None and bool(short.any()) else None))
        most = max(most, (j - i) * slots * bs)
    return batches, most


class _Workspace:
    """Buffers the gathered rows are copied into, reused by every call; views of it are only valid until the next
    call's gathers. ``k`` and ``v``: ``keys`` tokens each; ``q``: ``count`` buffers of ``queries`` tokens."""

    def __init__(self, keys: int, queries: int, count: int, like: torch.Tensor, D: int) -> None:
        kw = dict(dtype=like.dtype, device=like.device)
        self.k = torch.empty(keys * D, **kw)
        self.v = torch.empty(keys * D, **kw)
        self.q = [torch.empty(queries * D, **kw) for _ in range(count)]


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
    """Whether the private CPU kernel pair exists and runs for ``dtype`` with the call signature used here, and a
    row whose log-sum-exp is +inf adds exactly nothing to the key/value gradients (the backward's padding). Probed
    once per dtype on a tiny input: the operators are not public API, so another torch may differ."""
    if dtype not in _lse_kernel_state:
        kernels = _lse_kernels()
        ok = False
        if kernels is not None:
            t = torch.ones(1, 1, 2, 8, dtype=dtype)
            try:
                o, lse = kernels[0](t, t, t)
                grads = kernels[1](t, t, t, t, o, lse, 0.0, False)
                ok = lse.dtype == torch.float32 and tuple(lse.shape) == (1, 1, 2) and len(grads) == 3
                if ok:
                    sentinel = kernels[1](t, t, t, t, o, torch.full_like(lse, float("inf")), 0.0, False)
                    ok = all(bool((g == 0).all()) for g in sentinel)
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _lse_kernel_state[dtype] = ok
    return _lse_kernel_state[dtype]


def _views(t: torch.Tensor, nb: int, bs: int):
    """[B, H, nb·bs, D] → ([B·H·nb, bs, D] blocks, [B·H, nb·bs, D] heads), both views."""
    B, H, Sp, D = t.shape
    return t.reshape(B * H * nb, bs, D), t.reshape(B * H, Sp, D)


def _run_forward(q, k, v, plan: _Plan, bs: int, lse: torch.Tensor | None) -> torch.Tensor:
    """Forward over padded q, k, v [B, H, nb·bs, D]; fills the first R rows of ``lse`` [R + 1, bs] (float32) when
    given."""
    B, H, Sp, D = q.shape
    nb = Sp // bs
    (q3, _), (k3, kh), (v3, vh) = _views(q, nb, bs), _views(k, nb, bs), _views(v, nb, bs)
    out = q.new_zeros(q.shape)
    out3 = out.view(plan.rows, bs, D)
    ws = _Workspace(plan.max_keys, plan.max_queries, 1, q, D)
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
    """Input gradients of one forward call, by query block, added into ``grads``; its temporaries (the kernel's
    key/value gradients, as large as the gathered keys) are freed on return, before the next call allocates its
    own."""
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


def _backward_columns(batches: list[_ColumnBatch], bs: int, D: int, S: int, ws: _Workspace, views, lse,
                      lse_backward, dq_rows, dk3, dv3) -> None:
    """Gradients of the gathered rows by key block (module docstring): per call the query-side rows of the listed
    query blocks against one key block each; key/value gradients added into ``dk3``/``dv3`` [R, bs, D], query
    gradients into ``dq_rows`` [R + 1, bs, D] (row R takes the padding's zeros)."""
    q3, k3, v3, dout3, out3 = views
    R = q3.shape[0]
    tail = S - (S - 1) // bs * bs  # tokens of the last key block
    for batch in batches:
        n, L = batch.keys.numel(), batch.slots * bs
        rows = batch.rows
        real = rows.clamp(max=R - 1)  # the padding reads any real row; its log-sum-exp is +inf
        qg, dog, og = (torch.index_select(src, 0, real, out=buf[: L * n * D].view(-1, bs, D)).view(n, 1, L, D)
                       for src, buf in zip((q3, dout3, out3), ws.q))
        lg = lse.index_select(0, rows).view(n, 1, L)
        kg = torch.index_select(k3, 0, batch.keys, out=ws.k[: n * bs * D].view(n, bs, D)).view(n, 1, bs, D)
        vg = torch.index_select(v3, 0, batch.keys, out=ws.v[: n * bs * D].view(n, bs, D)).view(n, 1, bs, D)
        mask = None
        if batch.short is not None:  # the short last key block: its padded tokens are masked
            mask = torch.zeros(n, 1, 1, bs, dtype=q3.dtype, device=q3.device)
            mask[batch.short, :, :, tail:] = float("-inf")
        gq, gk, gv = lse_backward(dog, qg, kg, vg, og, lg, 0.0, False, attn_mask=mask)
        dq_rows.index_add_(0, rows, gq.view(n * batch.slots, bs, D))
        dk3.index_add_(0, batch.keys, gk.view(n, bs, D))
        dv3.index_add_(0, batch.keys, gv.view(n, bs, D))
        del qg, dog, og, kg, vg, gq, gk, gv  # before the next call's kernel allocates its gradients


class _GatheredAttention(torch.autograd.Function):
    """Differentiable gathered attention over padded q, k, v [B, H, nb·bs, D]."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, bs: int):
        lse = None
        if q.device.type == "cpu" and _lse_kernels_work(q.dtype):
            lse = torch.empty(plan.rows + 1, bs, dtype=torch.float32, device=q.device)
            lse[-1] = float("inf")  # the backward's padding row
        out = _run_forward(q, k, v, plan, bs, lse)
        if lse is not None:  # the gathered rows are differentiated by key block: their key lists are not needed
            plan = dataclasses.replace(plan, batches=[b for b in plan.batches if b.keys is None])
        ctx.plan, ctx.bs = plan, bs
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, bs = ctx.plan, ctx.bs
        B, H, Sp, D = q.shape
        nb, R = Sp // bs, plan.rows
        (q3, _), (k3, kh), (v3, vh) = _views(q, nb, bs), _views(k, nb, bs), _views(v, nb, bs)
        dout = dout.contiguous()
        dout3, out3 = dout.view(R, bs, D), out.view(R, bs, D)
        dq_rows = q.new_zeros(R + 1, bs, D)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        (dk3, dkh), (dv3, dvh) = _views(dk, nb, bs), _views(dv, nb, bs)
        grads = (dq_rows[:R], dk3, dkh, dv3, dvh)
        lse_backward = _lse_kernels()[1] if lse is not None else None
        if plan.batches:
            keys = plan.max_keys if lse is None else 0  # rows attended in place gather no keys
            ws = _Workspace(keys, plan.max_queries, 3, q, D)
            for batch in plan.batches:
                _backward_batch(batch, bs, D, plan.S, ws, (q3, k3, v3, kh, vh, dout3, out3), lse, lse_backward,
                                grads)
            del ws
        if lse is not None and plan.partial.numel():
            gathered = torch.zeros(R, dtype=torch.bool, device=q.device)
            gathered[plan.partial] = True
            per_chunk = max(1, _PLAN_PAIRS // (nb * nb))  # heads planned at once: bounds the plan's temporaries
            for h0 in range(0, B * H, per_chunk):
                columns, most = _column_plan(plan, gathered, range(h0, min(B * H, h0 + per_chunk)), bs, D)
                if not columns:
                    continue
                ws = _Workspace(max(c.keys.numel() for c in columns) * bs, most, 3, q, D)
                _backward_columns(columns, bs, D, plan.S, ws, (q3, k3, v3, dout3, out3), lse, lse_backward,
                                  dq_rows, dk3, dv3)
                del columns, ws
        return dq_rows[:R].view(q.shape), dk, dv, None, None


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
