"""Transfer backends of block swap (:class:`cinetune.core.block_swap.BlockSwap`): how one block's bytes travel
from its host master into a device slot.

:class:`SyncTransfer` copies synchronously on any device (the path without CUDA); :class:`CudaTransfer` copies
asynchronously on a private CUDA stream, ordered against compute with events.
"""

from __future__ import annotations

import torch


class Transfer:
    """How one block's bytes travel from its host master into a device slot; the schedule calls only these.

    Contract (the schedule guarantees the call order):

    - :meth:`allocate_slots` once, at attach.
    - :meth:`copy_in` ``(block, slot, src, dst)``: start copying ``src`` (uint8 master, host) into ``dst`` (uint8 view
      of slot ``slot``, same length). It must not overwrite ``dst`` before the compute recorded by the last
      :meth:`release` of that slot has finished.
    - :meth:`wait` ``(block)``: called right before the block's compute; after it, compute must see the copied bytes.
    - :meth:`release` ``(slot)``: the slot's occupant is being evicted; compute enqueued so far may still read it.
    - :meth:`close`: finish every pending copy.

    Attributes:
        device: the compute device the slots live on.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def allocate_slots(self, count: int, nbytes: int) -> list[torch.Tensor]:
        """``count`` uint8 tensors of ``nbytes`` bytes each on :attr:`device`."""
        return [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(count)]

    def copy_in(self, block: int, slot: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy ``src`` → ``dst`` (both uint8 ``[nbytes]``) for block index ``block`` into ring slot ``slot``."""
        raise NotImplementedError

    def wait(self, block: int) -> None:
        """Make the compute about to run see block ``block``'s copied bytes."""

    def release(self, slot: int) -> None:
        """Mark slot ``slot`` as evicted: the next copy into it must come after the compute enqueued so far."""

    def close(self) -> None:
        """Finish all pending copies; the slots may be freed afterwards."""


class SyncTransfer(Transfer):
    """Synchronous copies (``dst.copy_(src)``) on any device; :meth:`wait` and :meth:`release` have nothing to do.

    The path used without CUDA: same schedule, same slot contents, no streams.
    """

    def copy_in(self, block: int, slot: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)


class CudaTransfer(Transfer):
    """Asynchronous host→device copies on a private CUDA stream, ordered against compute with events.

    - :meth:`copy_in`: the copy stream waits on the slot's *free* event, copies with ``non_blocking=True`` (truly
      asynchronous only from pinned memory) and records the block's *loaded* event.
    - :meth:`wait`: the current (compute) stream waits on the loaded event — a device-side wait, the host goes on.
    - :meth:`release`: records the slot's free event on the current stream.

    Args:
        device: a CUDA device (``"cuda"`` means the current one).

    Raises:
        RuntimeError: CUDA is not available.
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CudaTransfer needs an available CUDA device, got {device} "
                               f"(cuda available: {torch.cuda.is_available()}); use SyncTransfer otherwise.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device)
        self.stream = torch.cuda.Stream(device=device)
        self._loaded: dict[int, torch.cuda.Event] = {}
        self._free: dict[int, torch.cuda.Event] = {}

    def _record_on_compute(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def allocate_slots(self, count: int, nbytes: int) -> list[torch.Tensor]:
        slots = super().allocate_slots(count, nbytes)
        # The allocator may hand out memory that compute kernels still use; the first copy waits for them too.
        for k in range(count):
            self._free[k] = self._record_on_compute()
        return slots

    def copy_in(self, block: int, slot: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        free = self._free.pop(slot, None)
        with torch.cuda.stream(self.stream):
            if free is not None:
                self.stream.wait_event(free)
            dst.copy_(src, non_blocking=True)
            loaded = torch.cuda.Event()
            loaded.record(self.stream)
        self._loaded[block] = loaded

    def wait(self, block: int) -> None:
        event = self._loaded.get(block)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def release(self, slot: int) -> None:
        self._free[slot] = self._record_on_compute()

    def close(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()
        self._loaded.clear()
        self._free.clear()


def default_transfer(device: torch.device | str) -> Transfer:
    """:class:`CudaTransfer` for a CUDA device, :class:`SyncTransfer` for any other."""
    device = torch.device(device)
    return CudaTransfer(device) if device.type == "cuda" else SyncTransfer(device)
