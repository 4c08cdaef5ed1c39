"""Host memory of block swap (:class:`cinetune.core.block_swap.BlockSwap`): the byte layout of a block's master,
pinned (``cudaHostRegister``) and pageable host buffers, loader buffers laid out as masters (:func:`host_tensors`),
and the masters a closed swap leaves for the next attach of the same block.

Every tensor starts on a :data:`ALIGN_BYTES` boundary inside a master or a slot.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

ALIGN_BYTES = 256  # every tensor starts on a 256-byte boundary inside masters and slots (vectorised kernels, DMA)


def _round_up(n: int, a: int = ALIGN_BYTES) -> int:
    return (n + a - 1) // a * a


def _pinned_empty(nbytes: int) -> torch.Tensor:
    """Page-locked uint8 host buffer of exactly ``nbytes``: ordinary CPU memory registered with the CUDA driver
    (``cudaHostRegister``, as ``torch.cuda._pin_memory_utils`` does). ``torch.empty(pin_memory=True)`` would round
    every buffer up to a power of two (up to 2× host memory for large blocks) and keep it cached after release.

    Raises:
        RuntimeError: no CUDA driver, or the driver/OS refused to lock the memory.
    """
    return _register(torch.empty(nbytes, dtype=torch.uint8))


def _register(buf: torch.Tensor) -> torch.Tensor:
    """Page-lock the memory of an existing uint8 CPU buffer in place (``cudaHostRegister``); returns it.

    Raises:
        RuntimeError: no CUDA driver, or the driver/OS refused to lock the memory.
    """
    nbytes = buf.numel()
    err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 1))  # 1 = cudaHostRegisterPortable
    if err != 0:
        _clear_cuda_error()
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {err}")
    return buf


def _clear_cuda_error() -> None:
    """Consume the CUDA runtime's per-thread *last error* left by a failed runtime call.

    ``torch.cuda.cudart()`` returns the raw status of ``cudaHostRegister``/``cudaHostUnregister`` without resetting
    that error (torch ``c10/cuda/CUDAException.h``: ``C10_CUDA_ERROR_HANDLED``), so the next kernel launch would
    report it as its own failure. A kernel launch here runs torch's launch check (``cudaGetLastError``, which resets
    the error) and the exception it raises is dropped. Never raises.
    """
    try:
        torch.zeros(1, device="cuda").add_(1)
    except Exception:  # noqa: BLE001 - the stale error surfaces here on purpose
        pass


def _unpin(data_ptr: int) -> None:
    """Undo :func:`_pinned_empty`'s registration; a failure is dropped (the memory is being released anyway)."""
    try:
        err = int(torch.cuda.cudart().cudaHostUnregister(data_ptr))
    except Exception:  # noqa: BLE001 - teardown must not raise
        return
    if err != 0:
        _clear_cuda_error()


def _pageable_empty(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def host_tensors(specs: Mapping[str, tuple[Sequence[int], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Uninitialised CPU tensors of the given shapes and dtypes, all views into one byte buffer laid out as a block
    swap master (in the given order, each at a 256-byte aligned offset).

    A loader reads one block's weights into these (``Checkpoint.iter_load(..., allocate=...)``); when the block is
    swapped, :class:`BlockSwap` takes that buffer over as the block's master instead of copying the weights into a
    new one, so swapping every block does not need the model's size twice in host memory.

    Args:
        specs: name → (shape, dtype).
    Returns:
        name → tensor of that shape and dtype.
    Raises:
        RuntimeError: the host is out of memory.
    """
    layout, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        layout[name] = (offset, nbytes, tuple(shape), dtype)
        offset = _round_up(offset + nbytes)
    buf = torch.empty(max(offset, 1), dtype=torch.uint8)
    return {name: buf[o:o + n].view(dtype).view(shape) for name, (o, n, shape, dtype) in layout.items()}


def _own_buffer(frozen: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """The byte buffer that ``frozen`` already live in, when it can serve as their master as it is: one CPU storage
    holding these tensors alone (its size at most their 256-byte aligned sizes plus one alignment), each contiguous
    at a 256-byte aligned offset, none overlapping — the layout :func:`host_tensors` makes. Returns
    ``(uint8 tensor over the whole storage, offset of each tensor)`` or None."""
    if not frozen or any(t.device.type != "cpu" or not t.is_contiguous() for t in frozen):
        return None
    storage = frozen[0].untyped_storage()
    base = storage.data_ptr()
    if base == 0 or any(t.untyped_storage().data_ptr() != base for t in frozen):
        return None
    offsets = [t.data_ptr() - base for t in frozen]
    spans = sorted((o, t.numel() * t.element_size()) for o, t in zip(offsets, frozen))
    end = 0
    for o, n in spans:
        if o % ALIGN_BYTES or o < end:
            return None
        end = o + n
    if storage.nbytes() > sum(_round_up(n) for _, n in spans) + ALIGN_BYTES:
        return None
    master = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
    return master, offsets


@dataclass
class _Packed:
    """One frozen tensor of a swapped block: the object re-pointed and its place in the block's byte layout."""

    tensor: torch.Tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class _HostCopy:
    """A closed swap's master left as the CPU storage of one block's frozen tensors, for the next attach to reuse."""

    master: torch.Tensor
    pointers: list[tuple[weakref.ref, int]]  # (tensor, its data_ptr inside the master) in packing order
    pinned: bool
    unpin: Callable[[], None] | None

    def fits(self, packed: list[_Packed]) -> bool:
        """Whether the tensors to pack still live exactly where this master holds them (same objects, places)."""
        return len(packed) == len(self.pointers) and all(
            ref() is p.tensor and p.tensor.device.type == "cpu" and p.tensor.data_ptr() == ptr
            for (ref, ptr), p in zip(self.pointers, packed))


# Block → its master after a close to the CPU. Weak keys: the entry goes with the block (and the master with it,
# unregistering pinned memory through its finalizer once the tensors are gone too).
_HOST_COPIES: "weakref.WeakKeyDictionary[nn.Module, _HostCopy]" = weakref.WeakKeyDictionary()


def _make_resident(block: nn.Module, device: torch.device) -> None:
    """Move an unswapped block to ``device``; a master a previous close left for it is no longer kept (its tensors
    may still use the storage, which then lives exactly as long as they do)."""
    _HOST_COPIES.pop(block, None)
    block.to(device)


def _typed_view(buf: torch.Tensor, p: _Packed) -> torch.Tensor:
    return buf[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape)
