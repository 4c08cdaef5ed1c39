"""Block swap: stream the frozen weights of the last N blocks of a stack from CPU memory to the compute device.

A :class:`BlockSwap` is attached to an ordered list of blocks (``nn.Module``; the order is the forward execution
order). The first ``n − N`` blocks are moved to the device and stay there. For each of the last ``N`` blocks
(the kijai / musubi-tuner convention, performance.md §1.1, comfyui.md §9.1) every frozen tensor — weights, biases,
norm scales, buffers such as fp8 scales — is packed into one flat byte buffer in CPU memory (the *master*; pinned
when allowed and possible) and the tensors are re-pointed as typed views into it. The device holds a ring of
``ring_size`` preallocated byte slots, each the size of the largest swapped block, so nothing is allocated per step.

Mechanism (performance.md §1.1 b, §1.5, §1.7):

- **Hooks.** A forward pre-hook on every block runs the schedule, so the model code only has to call its blocks;
  no change to the model's forward is needed.
- **Prefetch.** When block ``i`` starts, the schedule makes sure the next ``ring_size`` swapped blocks in execution
  order (``i`` itself first when it is swapped) are in slots, issuing one copy per missing block — one copy per
  block whatever its dtypes, because the master and slot are byte buffers and each tensor is a typed view at a
  256-byte aligned offset (mixed dtypes such as fp8 weights + fp32 scales, or bf16 + fp32, cost nothing extra;
  this replaces one buffer per dtype, which would need one copy per dtype and a slot per dtype).
  Slots are evicted lazily: a block stays in its slot until the slot is needed for another block, so at the
  forward→backward turn the last ``ring_size`` blocks are already there, and after a backward the first swapped
  blocks are there for the next forward.
- **No device-to-host copy.** The frozen weights are read-only, so evicting a block only re-points its tensors at
  the master again.
- **Streams (CUDA).** :class:`CudaTransfer` issues each copy with ``non_blocking=True`` on a private side stream
  and records a *loaded* event; before block ``i`` runs, the compute stream waits on block ``i``'s event (the host
  is not blocked). When a slot is reused, an event is recorded on the compute stream at that moment — after every
  kernel that used the previous occupant was enqueued — and the copy stream waits on it before overwriting the
  slot. The compute stream is never synchronised by the host.
- **Direction.** Forward runs blocks ``0..n−1`` and the schedule prefetches ascending. Under gradient
  checkpointing, backward recomputes block forwards in *reverse* order; the pre-hook then runs inside the autograd
  engine, which the schedule detects with ``torch._C._current_graph_task_id() != -1`` (the engine's own
  "executing a backward graph" flag, the one ``torch.utils.checkpoint`` keys its recomputation on) and prefetches
  descending. Chosen over module backward hooks (they wrap outputs in extra autograd nodes and do not fire on a
  recompute stopped early by non-reentrant checkpointing) and over a caller-set phase flag (easy to forget).
  In an inference forward (grad disabled, no input requiring grad) the prefetch wraps around, so block ``n−N`` of
  the next step is copied during the last blocks of this one; otherwise it does not wrap, because the backward
  that follows needs the last blocks (a reentrant checkpoint runs its forward under ``no_grad``, but its inputs
  require grad).

Training invariant (why gradient checkpointing is required when ``N > ring_size``):
    a block's weights sit in a slot only between its load and the next load that reuses that slot. Without
    checkpointing, autograd would keep the weights saved in the forward until the backward, long after the slot
    held another block. With per-block checkpointing (``torch.utils.checkpoint``, reentrant or not) the forward
    saves no weights; the backward re-runs each block forward (through the pre-hook, so its weights are loaded
    again, into whichever slot) and consumes what that recompute saved during the same block's backward. In the
    backward, the slot of block ``i+1`` is reused when block ``i``'s recompute starts; by then every backward node
    of block ``i+1`` has run, because the autograd engine runs ready nodes in decreasing creation order (one
    device, blocks chained), so the reuse event orders the copy after their kernels. Two guards make any breach loud rather than silent:
    a swapped block that runs with autograd recording, outside checkpointing, raises ``RuntimeError`` before
    anything is overwritten; and evicting a block bumps the autograd version counter of its tensors, so a saved
    view of them fails autograd's saved-tensor version check instead of reading another block's weights.

Trainable parameters (``requires_grad=True`` when attached, e.g. LoRA) are never swapped: they stay on the device
with their gradients and optimizer state. Which tensors are packed is decided at attach time; a packed tensor
that later requires grad raises an error at its block's next call.

Without CUDA the same schedule runs with :class:`SyncTransfer` (plain synchronous copies into device — or CPU —
slots), so the schedule, the slot contents and the numerics are testable on CPU. A custom :class:`Transfer`
(e.g. one that records the order of events) can be passed in.

Decisions:

- **Maximum** ``blocks_to_swap`` is the number of blocks (every block streamed; the device then holds only the
  ring). musubi-tuner caps at ``n − 2`` because its classic swap exchanges a swapped block with a resident one; a
  ring needs no resident partner, and keeping two resident blocks would only cost memory.
- **K5**: one :class:`BlockSwap` over the combined list ``[*text_transformer_blocks, *visual_transformer_blocks]``
  (the execution order; diffusion-pipe style): one ring, and the big visual blocks are swapped first.
  :func:`split_blocks_to_swap` reproduces musubi-tuner's per-list split (k5.md §8) for callers that want its
  numbers with one BlockSwap per list.
- **Pinned memory**: pinned by default on CUDA (asynchronous copies need it), by registering ordinary memory with
  the driver (``cudaHostRegister``) so each master takes exactly its size and is unregistered when it is freed
  (torch's pinned allocator, ``CachingHostAllocator`` in torch 2.14, rounds each buffer up to a power of two and
  keeps freed buffers cached in the process); if pinning fails (the OS refuses to lock that much memory) or is
  disallowed, masters are pageable and a warning says so. Pageable copies are synchronous for the host; a staged
  copier (musubi-tuner's ``_StagedCopier``) would hide that and is not done.
- **Loaded buffers become masters.** A block whose frozen tensors already lie in one buffer of the master layout
  (each 256-byte aligned, nothing else in it), as loaders make with :func:`host_tensors`, keeps that buffer as its
  master (registered in place when pinning): attaching copies nothing, so swapping every block of a model needs its
  size once in host memory, not twice. Other blocks are packed by copying, tensor by tensor, each old storage freed
  as its tensor moves.
- **Masters outlive the swap.** :meth:`BlockSwap.close` to the CPU leaves each swapped block's tensors as views
  into its master (no copy, still pinned) and remembers the master for that block; the next attach finds the
  tensors where it left them and reuses it without copying or registering again. For a 19B model that saves two
  host copies of tens of GB and a re-registration per sampler or trainer run. A tensor replaced in between (a
  merged LoRA, a new dtype) makes its block pack afresh; the master is freed with its block.
- ``torch.compile`` is not supported on swapped blocks (tensors are re-pointed between calls).

Sources: kohya-ss/musubi-tuner ``modules/custom_offloading_utils.py`` (``LoRAStreamOffloader``: flat per-block
master, ring of slots, free events, checkpointing requirement), Lightricks LTX-2 ``ltx_core/block_streaming``
(event-gated slot pool), kijai ComfyUI-WanVideoWrapper (last N blocks), as summarised in performance.md §1.
"""

from __future__ import annotations

import bisect
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .offload_host import (_HOST_COPIES, _HostCopy, _make_resident, _own_buffer, _Packed, _pageable_empty,
                           _pinned_empty, _register, _round_up, _typed_view, _unpin)
from .offload_transfer import Transfer, default_transfer


@dataclass
class _SwappedBlock:
    index: int
    packed: list[_Packed]
    nbytes: int
    master: torch.Tensor | None  # None once closed
    master_views: list[torch.Tensor]
    slot_views: list[list[torch.Tensor]]  # [slot][tensor]
    unpin: Callable[[], None] | None = None  # unregisters a pinned master (also run if the master is collected)


def _any_requires_grad(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return any(_any_requires_grad(o) for o in obj)
    if isinstance(obj, dict):
        return any(_any_requires_grad(o) for o in obj.values())
    return False


def _saved_tensor_hooks_active() -> bool | None:
    """True/False whether saved-tensor hooks (checkpointing, ``save_on_cpu``) are active; None if unknown."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError, TypeError):
        return None


def _in_backward() -> bool:
    """True while the autograd engine executes a backward graph on this thread (checkpoint recomputation).

    Without the engine flag (a torch that lacks it) this is always False: the backward then loads each block on
    demand — slower, still correct.
    """
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


class BlockSwap:
    """Keep the last ``blocks_to_swap`` blocks' frozen weights in CPU memory and stream them to ``device`` on use.

    See the module docstring for the mechanism and the training invariant. Attaching moves the first
    ``n − blocks_to_swap`` blocks (and every trainable parameter) to ``device``, packs the frozen tensors of the
    swapped blocks into one host byte buffer per block, allocates ``min(ring_size, blocks_to_swap)`` device slots of
    :attr:`slot_bytes` bytes each and registers a forward pre-hook on every block. Call the blocks as usual.
    :meth:`close` (or leaving a ``with`` block) restores ordinary modules. The hooks hold a reference to this object,
    so it stays active as long as the blocks live, even if the caller drops it.

    Args:
        blocks: the blocks in forward execution order, e.g. ``[*dit.text_transformer_blocks,
            *dit.visual_transformer_blocks]``. Each block's tensors must be plain dense tensors (no tensor
            subclasses) and no tensor may belong to two blocks.
        blocks_to_swap: N, 0 ≤ N ≤ len(blocks). 0 moves everything to ``device`` and installs nothing.
        device: the compute device.
        ring_size: device slots, ≥ 1. 2 (default) = double buffering: block i+1 is copied while block i runs;
            1 = least memory, no overlap between consecutive swapped blocks.
        pin_memory: True = pin the masters (warning and pageable fallback if refused); False = pageable;
            None (default) = pin when ``device`` is CUDA.
        transfer: a :class:`Transfer` for ``device``; default :func:`default_transfer`.

    Attributes:
        swapped: indices of the swapped blocks (the last N), ascending.
        num_slots: ring slots allocated, ``min(ring_size, N)``.
        slot_bytes: bytes per slot (the largest swapped block's packed size, 256-byte aligned tensors).
        host_bytes: bytes of all masters.
        pinned: whether every master is pinned.
        stats: counters — ``copies`` (blocks copied in), ``bytes_copied``, ``on_demand`` (copies issued at the
            moment of use, i.e. not prefetched: cold start or an unexpected order), ``masters_reused`` (blocks whose
            master a previous close left in place), ``masters_adopted`` (blocks whose frozen tensors already lay in
            one buffer of the master layout, e.g. from :func:`host_tensors`, taken over without a copy).

    Raises:
        TypeError: a block is not an ``nn.Module``; a swapped tensor is a subclass or not strided.
        ValueError: blocks_to_swap or ring_size out of range (the message gives the allowed range); a tensor
            shared by two blocks; a swapped tensor on the meta device; ``transfer.device`` differs from ``device``.
            Nothing is changed when validation fails.
        Any error while moving, packing or allocating (e.g. the device is out of memory) leaves every block as an
        ordinary module on the CPU, then propagates.
        RuntimeError (at a block call): a swapped block runs with autograd recording but without gradient
            checkpointing while ``N > ring_size``; or a packed tensor has been set to require grad since attach.
    """

    def __init__(self, blocks: Iterable[nn.Module], blocks_to_swap: int, *, device: torch.device | str,
                 ring_size: int = 2, pin_memory: bool | None = None, transfer: Transfer | None = None) -> None:
        blocks = list(blocks)
        for i, b in enumerate(blocks):
            if not isinstance(b, nn.Module):
                raise TypeError(f"blocks[{i}] is a {type(b).__name__}; BlockSwap needs nn.Module blocks")
        n = len(blocks)
        if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int):
            raise ValueError(f"blocks_to_swap must be an int, got {blocks_to_swap!r}")
        if not 0 <= blocks_to_swap <= n:
            raise ValueError(f"blocks_to_swap={blocks_to_swap} is out of range for {n} blocks: use 0 (no swap) up to "
                             f"the maximum {n} (every block streamed)")
        if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1:
            raise ValueError(f"ring_size must be an int ≥ 1 (2 = double buffering), got {ring_size!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.blocks = blocks
        self.blocks_to_swap = blocks_to_swap
        self.ring_size = ring_size
        self.swapped: tuple[int, ...] = tuple(range(n - blocks_to_swap, n))
        self.num_slots = min(ring_size, blocks_to_swap)
        self.slot_bytes = 0
        self.host_bytes = 0
        self.pinned = False
        self.stats = {"copies": 0, "bytes_copied": 0, "on_demand": 0, "masters_reused": 0, "masters_adopted": 0}
        self._closed = False
        self._hooks: list = []
        self._swapped: dict[int, _SwappedBlock] = {}
        self._slots: list[torch.Tensor] = []
        self._slot_of: dict[int, int] = {}           # block → slot holding its bytes
        self._occupant: list[int | None] = []        # slot → block
        self._pointed: set[int] = set()              # blocks whose tensors currently point into their slot
        self._last_use: dict[int, int] = {}          # slot → use counter (LRU among evictable slots)
        self._clock = 0
        self._trainable: dict[int, bool] = {}
        if blocks_to_swap == 0:
            for b in blocks:
                _make_resident(b, self.device)
            self.transfer: Transfer | None = None
            return

        transfer = transfer if transfer is not None else default_transfer(self.device)
        if torch.device(transfer.device) != self.device:
            raise ValueError(f"transfer.device {transfer.device} differs from device {self.device}; build the "
                             "Transfer for the same device")
        self.transfer = transfer
        want_pin = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)

        self._check_tensors(blocks)
        try:
            self._attach(blocks, want_pin)
        except BaseException:
            # Typically the device ran out of memory for the resident blocks or the ring: put everything back on
            # the CPU as ordinary modules rather than leave half the model on the device.
            self.close(device="cpu")
            raise

    # -- attach ---------------------------------------------------------------------------------------------

    def _attach(self, blocks: Sequence[nn.Module], want_pin: bool) -> None:
        for i, block in enumerate(blocks):
            if i not in self.swapped:
                _make_resident(block, self.device)
        self.pinned = want_pin
        for i in self.swapped:
            self._pack(i, blocks[i], want_pin)
        self.pinned = all(sb.unpin is not None for sb in self._swapped.values())
        self.host_bytes = sum(s.master.numel() for s in self._swapped.values())
        self.slot_bytes = max(s.nbytes for s in self._swapped.values())
        self._slots = self.transfer.allocate_slots(self.num_slots, max(self.slot_bytes, 1))
        self._occupant = [None] * self.num_slots
        for s in self._swapped.values():
            s.slot_views = [[_typed_view(slot, p) for p in s.packed] for slot in self._slots]
        for i, block in enumerate(blocks):
            self._hooks.append(block.register_forward_pre_hook(self._make_hook(i), with_kwargs=True))

    def _check_tensors(self, blocks: Sequence[nn.Module]) -> None:
        """Validate everything before changing anything, so a refused attach leaves the modules untouched."""
        owner: dict[int, int] = {}
        for i, block in enumerate(blocks):
            for name, t in [*block.named_parameters(), *block.named_buffers()]:
                j = owner.setdefault(id(t), i)
                if j != i:
                    raise ValueError(f"tensor {name!r} belongs to blocks {j} and {i}; BlockSwap needs every tensor "
                                     "in one block only (untie the weights first)")
                if i not in self.swapped:
                    continue
                if type(t.data) is not torch.Tensor or t.layout != torch.strided or t.is_quantized:
                    raise TypeError(f"block {i} tensor {name!r} is a {type(t.data).__name__} ({t.layout}); "
                                    "BlockSwap handles plain dense tensors only (dequantise or convert it first)")
                if t.device.type == "meta":
                    raise ValueError(f"block {i} tensor {name!r} is on the meta device (no data); load the weights "
                                     "before attaching BlockSwap")

    def _pack(self, i: int, block: nn.Module, want_pin: bool) -> None:
        seen: set[int] = set()
        frozen: list[torch.Tensor] = []
        trainable = False
        for t in [*block.parameters(), *block.buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, nn.Parameter) and t.requires_grad:
                trainable = True
                t.data = t.data.to(self.device)
                if t.grad is not None:
                    t.grad = t.grad.to(self.device)
            else:
                frozen.append(t)
        self._trainable[i] = trainable
        packed, offset = [], 0
        for t in frozen:
            nbytes = t.numel() * t.element_size()
            packed.append(_Packed(t, offset, nbytes, t.dtype, t.shape))
            offset = _round_up(offset + nbytes)
        total = max(offset, 1)
        host = _HOST_COPIES.pop(block, None)
        if host is not None and host.fits(packed) and (host.pinned or not want_pin):
            # The last close left these tensors in this master: nothing to copy or register again.
            base = host.master.data_ptr()
            packed = [_Packed(p.tensor, ptr - base, p.nbytes, p.dtype, p.shape)
                      for p, (_, ptr) in zip(packed, host.pointers)]
            views = [_typed_view(host.master, p) for p in packed]
            end = max((p.offset + p.nbytes for p in packed), default=0)
            self._swapped[i] = _SwappedBlock(i, packed, end, host.master, views, [], host.unpin)
            self.stats["masters_reused"] += 1
            return
        own = _own_buffer(frozen)
        if own is not None:
            # The loader already put this block into one buffer of the master layout: take it over, no copy.
            master, offsets = own
            packed = [_Packed(p.tensor, o, p.nbytes, p.dtype, p.shape) for p, o in zip(packed, offsets)]
            unpin = self._try_pin(master) if want_pin and self.pinned else None
            views = [_typed_view(master, p) for p in packed]
            for p, view in zip(packed, views):
                p.tensor.data = view
            self._swapped[i] = _SwappedBlock(i, packed, max(o + p.nbytes for o, p in zip(offsets, packed)), master,
                                             views, [], unpin)
            self.stats["masters_adopted"] += 1
            return
        master = unpin = None
        if want_pin and self.pinned:
            try:
                master = _pinned_empty(total)
                unpin = weakref.finalize(master, _unpin, master.data_ptr())
            except (RuntimeError, AssertionError, OSError) as e:
                self._pin_refused(e)
        if master is None:
            master = _pageable_empty(total)
        views = []
        for p in packed:
            view = _typed_view(master, p)
            view.copy_(p.tensor.detach())
            p.tensor.data = view  # the previous storage (device or file mapping) is released here
            views.append(view)
        self._swapped[i] = _SwappedBlock(i, packed, offset, master, views, [], unpin)

    def _try_pin(self, master: torch.Tensor) -> Callable[[], None] | None:
        """Register an adopted master in place; on refusal warn once and go on pageable."""
        try:
            _register(master)
        except (RuntimeError, AssertionError, OSError) as e:
            self._pin_refused(e)
            return None
        return weakref.finalize(master, _unpin, master.data_ptr())

    def _pin_refused(self, e: BaseException) -> None:
        self.pinned = False
        warnings.warn(f"Block swap: pinning host memory failed ({e}); the swapped weights use pageable memory "
                      "instead, which makes every host-to-device copy synchronous (slower, same results). "
                      "Free host RAM, raise the locked-memory limit, or swap fewer blocks.",
                      RuntimeWarning, stacklevel=4)

    def _make_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._before_block(i, args, kwargs)
        return hook

    # -- schedule ---------------------------------------------------------------------------------------------

    def _check_autograd(self, i: int, args: tuple, kwargs: dict) -> None:
        for p in self._swapped[i].packed:
            if p.tensor.requires_grad:
                raise RuntimeError(f"Block swap: a frozen tensor of swapped block {i} (shape {list(p.shape)}) now "
                                   "requires grad; trainability is fixed when BlockSwap attaches. close() it and "
                                   "attach again after changing requires_grad.")
        if not torch.is_grad_enabled() or len(self.swapped) <= self.num_slots:
            return
        if not (self._trainable[i] or _any_requires_grad(args) or _any_requires_grad(kwargs)):
            return
        if _saved_tensor_hooks_active() is False:
            raise RuntimeError(
                f"Block swap: swapped block {i} runs with autograd recording but without gradient checkpointing. Its "
                f"weights sit in one of {self.num_slots} ring slots that other blocks reuse before the backward, so "
                "autograd would read overwritten weights. Wrap every block call in torch.utils.checkpoint.checkpoint("
                "block, ..., use_reentrant=False), run inference under torch.no_grad(), or set blocks_to_swap ≤ "
                f"ring_size ({self.num_slots}).")

    def _upcoming(self, i: int, backward: bool, wrap: bool) -> list[int]:
        """Swapped blocks in the order they will be needed from block ``i`` on (``i`` first when swapped)."""
        S, k = self.swapped, self.num_slots
        head = [i] if i in self._swapped else []
        if backward:
            lo = bisect.bisect_left(S, i)
            rest = list(reversed(S[max(0, lo - k):lo]))
        else:
            hi = bisect.bisect_right(S, i)
            rest = list(S[hi:hi + k])
            if wrap and len(rest) < k:
                rest += [b for b in S[:k] if b < i]
        return (head + rest)[:k]

    def _pick_slot(self, keep: list[int]) -> int:
        free = [s for s, b in enumerate(self._occupant) if b is None]
        if free:
            return free[0]
        evictable = [s for s, b in enumerate(self._occupant) if b not in keep]
        return min(evictable, key=lambda s: self._last_use.get(s, -1))

    def _evict(self, slot: int) -> None:
        b = self._occupant[slot]
        if b is None:
            return
        self.transfer.release(slot)
        if b in self._pointed:
            sb = self._swapped[b]
            for p, view in zip(sb.packed, sb.master_views):
                p.tensor.data = view
            # A graph that saved these tensors (not checkpointed) now fails its version check instead of reading
            # the next occupant's bytes.
            torch.autograd.graph.increment_version([p.tensor for p in sb.packed])
            self._pointed.discard(b)
        del self._slot_of[b]
        self._occupant[slot] = None

    def _load(self, b: int, slot: int) -> None:
        self._evict(slot)
        sb = self._swapped[b]
        self.transfer.copy_in(b, slot, sb.master[:sb.nbytes], self._slots[slot][:sb.nbytes])
        self._slot_of[b] = slot
        self._occupant[slot] = b
        self.stats["copies"] += 1
        self.stats["bytes_copied"] += sb.nbytes

    def _before_block(self, i: int, args: tuple, kwargs: dict) -> None:
        backward = _in_backward()
        if i in self._swapped and not backward:
            self._check_autograd(i, args, kwargs)
        # Wrap around only in a pure inference forward: an input that requires grad under no_grad means a reentrant
        # checkpoint's forward, and the backward after it needs the last blocks.
        wrap = (not backward and not torch.is_grad_enabled()
                and not _any_requires_grad(args) and not _any_requires_grad(kwargs))
        keep = self._upcoming(i, backward, wrap)
        for b in keep:
            if b not in self._slot_of:
                if b == i:
                    self.stats["on_demand"] += 1
                self._load(b, self._pick_slot(keep))
        if i in self._swapped:
            slot = self._slot_of[i]
            self.transfer.wait(i)
            if i not in self._pointed:
                sb = self._swapped[i]
                for p, view in zip(sb.packed, sb.slot_views[slot]):
                    p.tensor.data = view
                self._pointed.add(i)
            self._clock += 1
            self._last_use[slot] = self._clock

    # -- introspection and teardown ---------------------------------------------------------------------------

    def slot_contents(self) -> list[int | None]:
        """Block index held by each ring slot (None = empty), e.g. ``[30, 31]``."""
        return list(self._occupant)

    @property
    def ring_bytes(self) -> int:
        """Device bytes of the ring: ``num_slots · slot_bytes``."""
        return self.num_slots * self.slot_bytes

    def close(self, device: torch.device | str = "cpu") -> None:
        """Detach: remove the hooks, finish pending copies, free the ring and leave every block as an ordinary
        module on ``device`` (the Parameter and buffer objects keep their identity). On the CPU each swapped
        tensor stays a view into its block's master, which the next attach of the block reuses; on another device
        each gets its own storage and the masters are freed block by block. Idempotent.

        Args:
            device: where all blocks end up, e.g. ``"cpu"`` to unload or the compute device to stop swapping.
        """
        if self._closed:
            return
        self._closed = True
        device = torch.device(device)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.transfer is not None:
            self.transfer.close()
        for sb in self._swapped.values():
            if device.type == "cpu":
                # The master becomes the tensors' storage (no copy; pinned memory stays registered) and is kept
                # for the next attach of this block.
                for p, view in zip(sb.packed, sb.master_views):
                    p.tensor.data = view
                _HOST_COPIES[self.blocks[sb.index]] = _HostCopy(
                    sb.master, [(weakref.ref(p.tensor), p.tensor.data_ptr()) for p in sb.packed],
                    sb.unpin is not None, sb.unpin)
                sb.unpin = None
            else:
                for p in sb.packed:
                    p.tensor.data = p.tensor.data.to(device, copy=True)
            sb.packed.clear()
            sb.master_views.clear()
            sb.slot_views.clear()
            if sb.unpin is not None:
                sb.unpin()
            sb.master = None  # freed block by block: host memory never holds two copies of every swapped block
        self._swapped.clear()
        self._slots.clear()
        self._slot_of.clear()
        self._occupant.clear()
        self._pointed.clear()
        for b in self.blocks:
            b.to(device)
        self.blocks = []
        self.transfer = None

    def __enter__(self) -> "BlockSwap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BlockSwap(blocks={len(self.blocks)}, swapped={len(self.swapped)}, slots={self.num_slots}, "
                f"slot_bytes={self.slot_bytes}, pinned={self.pinned}, device={self.device})")
