"""Data-parallel LoRA training under ``torchrun``: the process group, each rank's share of a global batch, the
LoRA gradient reduction, FSDP2 sharding of the frozen base weights and rank-0-only writing.

::

    ctx = init_distributed("cuda")                     # reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*
    shard_frozen_blocks(dit, adapter.blocks(dit), ctx)  # before LoRA injection: base weights 1/N per rank
    mine = ctx.share(global_batch)                     # this rank's samples of the global batch
    ...backward of this rank's share...
    ctx.reduce_gradients(lora_params)                  # float32 all-reduce over ranks
    ctx.run_on_main(lambda: write_checkpoint(...), "writing the checkpoint")
    close_distributed(ctx)

Without torchrun (no ``WORLD_SIZE`` in the environment, or a world of 1) :func:`init_distributed` returns a
single-process context and every collective here is a no-op, so one code path serves 1 and N processes.

Decisions:

- **Shares.** A global batch (the ``batch_size`` samples one process would train on together) is cut into
  ``world_size`` contiguous equal shares in rank order (:func:`rank_share`), so the shares concatenated are the
  single-process batch in its order. A batch that the world size does not divide is refused
  (:class:`DistributedError`) rather than split unevenly: FSDP needs every rank to run the same forwards, and equal
  shares keep the average of the ranks' gradients equal to the gradient of the whole batch.
  :func:`check_world_divides` checks every batch of an epoch before a run starts.
- **Gradients.** The trainable LoRA parameters are replicated on every rank (each rank holds the full, identical
  LoRA and optimizer state, so a checkpoint written by rank 0 is the whole state and resumes on any world size).
  Their gradients are all-reduced in float32 in buckets of :data:`REDUCE_BUCKET_ELEMENTS` and averaged (``"mean"``,
  for losses that are means over the share's samples) or summed (``"sum"``, for losses that are each share's
  contribution to the whole batch's loss), as PyTorch DDP averages them (Li et al. 2020, arXiv:2006.15704 §3).
- **Sharding** (:func:`shard_frozen_blocks`): PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard`` on every
  transformer block and then on the whole model (the root takes the embeddings and output layers), applied to the
  frozen base weights before the LoRA layers are injected: the LoRA parameters injected afterwards are not managed
  by FSDP and stay replicated. FSDP2 runs on the CPU with gloo (checked with torch 2.14.1, bf16, fp32 and fp8
  weights) and on CUDA with NCCL. Block swap streams whole blocks between host and device memory while FSDP keeps
  1/N of each block on every device and all-gathers it itself; both would own where a block's weights live, so
  sharding with ``blocks_to_swap > 0`` is refused (:func:`check_sharding`): use ``"replicate"`` (each rank holds the
  whole model and may swap blocks) or turn block swap off.
- **Backends.** NCCL for CUDA devices, gloo for the CPU (:func:`choose_backend`); asking for NCCL without CUDA is
  an error that says to use the CPU backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainingError

__all__ = ["DistributedError", "TorchrunEnv", "DistributedContext", "SINGLE_PROCESS", "SHARDING", "BACKENDS",
           "REDUCE_BUCKET_ELEMENTS", "torchrun_env", "choose_backend", "init_distributed", "close_distributed",
           "rank_share", "check_world_divides", "all_reduce_gradients", "check_sharding", "check_local_workers",
           "shard_frozen_blocks"]

#: Process-group backends: NCCL for CUDA GPUs, gloo for the CPU.
BACKENDS: tuple[str, ...] = ("nccl", "gloo")
#: How the frozen base weights are placed on N ranks: FSDP2 shards, or a full copy on every rank.
SHARDING: tuple[str, ...] = ("fsdp", "replicate")
#: Gradient elements all-reduced per collective (256 MiB of float32).
REDUCE_BUCKET_ELEMENTS = 1 << 26


class DistributedError(TrainingError):
    """A multi-process run cannot start or continue; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each worker process through its environment.

    Attributes:
        rank: global rank (``RANK``), 0 ≤ rank < world_size. world_size: processes in all (``WORLD_SIZE``).
        local_rank: rank on this machine (``LOCAL_RANK``), the GPU index it uses. local_world_size: processes on
            this machine (``LOCAL_WORLD_SIZE``). master_addr, master_port: the rendezvous of rank 0
            (``MASTER_ADDR``, ``MASTER_PORT``).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _env_int(env: Mapping[str, str], name: str, low: int) -> int:
    raw = env.get(name)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or value < low:
        raise DistributedError(f"the environment variable {name}={raw!r} is not an integer ≥ {low}. Start the "
                               "workers with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                               "MASTER_PORT), or unset WORLD_SIZE to run one process.")
    return value


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun variables of ``environ`` (default ``os.environ``), or None when ``WORLD_SIZE`` is not set (a
    plain single process).

    Raises:
        DistributedError: a variable is missing or out of range (e.g. ``RANK`` ≥ ``WORLD_SIZE``).
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", 1) if "LOCAL_WORLD_SIZE" in env else world
    if rank >= world or local_rank >= local_world:
        raise DistributedError(f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}, "
                               f"LOCAL_WORLD_SIZE={local_world}; start the workers with torchrun.")
    addr = env.get("MASTER_ADDR", "")
    if world > 1 and not addr:
        raise DistributedError("MASTER_ADDR is not set: start the workers with torchrun (on several machines give "
                               "every node the same --rdzv-endpoint or --master-addr).")
    port = _env_int(env, "MASTER_PORT", 1) if world > 1 else int(env.get("MASTER_PORT") or 0)
    return TorchrunEnv(rank, world, local_rank, local_world, addr, port)


def choose_backend(device_type: str, requested: str | None = None, *, cuda_available: bool | None = None,
                   nccl_available: bool | None = None) -> str:
    """The process-group backend for ``device_type`` (``"cuda"`` → NCCL, ``"cpu"`` → gloo) or the ``requested`` one.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``. requested: None (choose) or one of :data:`BACKENDS`.
        cuda_available, nccl_available: what this machine has (None = ask torch).

    Raises:
        DistributedError: NCCL requested without CUDA or for the CPU, NCCL missing from this PyTorch build, gloo
            requested for CUDA, an unknown backend or device type.
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    nccl = dist.is_nccl_available() if nccl_available is None else nccl_available
    if device_type not in ("cuda", "cpu"):
        raise DistributedError(f"multi-process training runs on 'cuda' or 'cpu' devices, not {device_type!r}.")
    if requested is not None and requested not in BACKENDS:
        raise DistributedError(f"backend must be one of {', '.join(BACKENDS)}; got {requested!r}.")
    backend = requested or ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl":
        if not cuda:
            raise DistributedError("the NCCL backend needs CUDA GPUs and none is visible (torch.cuda.is_available() "
                                   "is False): run on GPUs, or on the CPU with the gloo backend (--device cpu).")
        if device_type != "cuda":
            raise DistributedError("the NCCL backend only moves CUDA tensors; on the CPU use gloo (--device cpu "
                                   "chooses it).")
        if not nccl:
            raise DistributedError("this PyTorch build has no NCCL (torch.distributed.is_nccl_available() is False): "
                                   "install a CUDA build of PyTorch, or train on the CPU with gloo.")
    elif device_type == "cuda":
        raise DistributedError("multi-GPU training uses the NCCL backend; gloo is for the CPU (--device cpu).")
    return backend


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a run: its rank, the world, its device; the collectives of the run.

    A context with ``world_size == 1`` (:data:`SINGLE_PROCESS`) makes every collective a no-op.

    Attributes:
        rank, world_size, local_rank: as :class:`TorchrunEnv`. device: this rank's device (``cuda:<local_rank>``
            or ``cpu``). backend: the process group's backend, None without one.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process (collectives communicate)."""
        return self.world_size > 1

    def share(self, batch_indices: Sequence[Any]) -> list[Any]:
        """This rank's share of a global batch (:func:`rank_share`)."""
        return rank_share(batch_indices, self.rank, self.world_size)

    def share_slice(self, batch_size: int) -> slice:
        """This rank's share of a global batch of ``batch_size`` as a slice of the batch dimension.

        Raises:
            DistributedError: ``world_size`` does not divide ``batch_size``.
        """
        size = len(rank_share(range(batch_size), self.rank, self.world_size))
        return slice(self.rank * size, (self.rank + 1) * size)

    def _scalar_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def reduce_gradients(self, params: Iterable[torch.Tensor], op: str = "mean") -> None:
        """All-reduce the gradients of ``params`` over the ranks (:func:`all_reduce_gradients`)."""
        if self.distributed:
            all_reduce_gradients(params, op=op)

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over the ranks (float64); the values themselves on one process."""
        if not self.distributed or not values:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._scalar_device())
        dist.all_reduce(t)
        return t.tolist()

    def any_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (every rank gets the same answer, e.g. to stop together)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._scalar_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._scalar_device())
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank got here."""
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def run_on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn()`` on rank 0 only (writing files), then let every rank know whether it worked.

        Returns:
            ``fn()``'s result on rank 0, None on the other ranks.

        Raises:
            On rank 0, whatever ``fn`` raised. On the others, :class:`DistributedError` naming ``what`` and rank 0's
            error, so no rank waits forever for one that failed.
        """
        result, error, failure = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # reported to the other ranks, then re-raised here
                error, failure = exc, f"{type(exc).__name__}: {exc}"
        failure = self.broadcast_object(failure)
        if error is not None:
            raise error
        if failure is not None:
            raise DistributedError(f"rank 0 failed {what}: {failure}")
        return result


#: The context of a plain single process on the CPU.
SINGLE_PROCESS = DistributedContext()


def _device_for(device: str | torch.device | None, local_rank: int, world_size: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda, but no CUDA GPU is visible: run on a GPU machine or use --device "
                                   "cpu.")
        count = torch.cuda.device_count()
        if world_size > 1 or dev.index is None:
            if local_rank >= count:
                raise DistributedError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but only {count} are visible: "
                                       f"start at most {count} processes per machine (torchrun --nproc_per_node).")
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise DistributedError(f"training runs on 'cuda' or 'cpu', not {device!r}.")
    return dev


def init_distributed(device: str | torch.device | None = None, *, backend: str | None = None,
                     environ: Mapping[str, str] | None = None, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the torchrun process group (or stay one process) and pick this rank's device.

    Args:
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available). Under torchrun a CUDA rank uses GPU
            ``LOCAL_RANK``. backend: None (NCCL on CUDA, gloo on the CPU) or one of :data:`BACKENDS`.
        environ: the environment to read (default ``os.environ``). timeout_s: collective timeout.

    Returns:
        The :class:`DistributedContext` (a single-process one without torchrun or with ``WORLD_SIZE=1``). Close it
        with :func:`close_distributed`.

    Raises:
        DistributedError: bad torchrun variables, a missing backend (NCCL without CUDA), more processes on a
            machine than GPUs, an unknown device.
    """
    env = torchrun_env(environ)
    if env is None or env.world_size == 1:
        dev = _device_for(device, 0 if env is None else env.local_rank, 1)
        if backend is not None:
            choose_backend(dev.type, backend)
        return DistributedContext(device=dev)
    dev = _device_for(device, env.local_rank, env.world_size)
    chosen = choose_backend(dev.type, backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        method = "env://" if environ is None else f"tcp://{env.master_addr}:{env.master_port}"
        dist.init_process_group(chosen, init_method=method, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistributedContext(env.rank, env.world_size, env.local_rank, dev, chosen)


def close_distributed(ctx: DistributedContext, *, wait: bool = True) -> None:
    """Leave the process group ``ctx`` joined (nothing for a single process). With ``wait`` (the ranks all got
    here without an error) every rank first meets at a barrier, so no rank tears the group down while another is
    still in a collective; after an error no rank waits for the others."""
    if ctx.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def rank_share(batch_indices: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s contiguous share of a global batch: ``batch[rank·k : (rank+1)·k]`` with ``k = len / world``.

    The shares of ranks 0…N−1 are disjoint and, concatenated in rank order, give the batch in its order.

    Raises:
        ValueError: ``rank``/``world_size`` out of range.
        DistributedError: ``world_size`` does not divide the batch (the message gives the sizes and the fix).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer ≥ 1; got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}); got {rank!r}")
    n = len(batch_indices)
    if n % world_size:
        raise DistributedError(f"a global batch of {n} samples cannot be split evenly over {world_size} processes. "
                               f"Use a batch_size that is a multiple of {world_size}, or run on a number of "
                               f"processes that divides {n}.")
    k = n // world_size
    return list(batch_indices[rank * k:(rank + 1) * k])


def check_world_divides(keys: Sequence[Hashable], repeats: Sequence[int], batch_size: int, world_size: int) -> None:
    """Check that ``world_size`` divides every batch of an epoch (the trainer's epoch plan: per (bucket, frames)
    group, full batches of ``batch_size`` and one last batch of the rest).

    Args:
        keys: per sample, its group (``(bucket, frames)``). repeats: per sample, its repeats. batch_size: ≥ 1.

    Raises:
        DistributedError: naming the first group whose batches cannot be split, its sample count and the fix.
    """
    if world_size == 1:
        return
    counts: dict[Hashable, int] = {}
    for k, r in zip(keys, repeats):
        counts[k] = counts.get(k, 0) + int(r)
    for key, n in counts.items():
        sizes = ([batch_size] if n >= batch_size else []) + ([n % batch_size] if n % batch_size else [])
        bad = [s for s in sizes if s % world_size]
        if bad:
            raise DistributedError(
                f"{world_size} processes cannot share every global batch of this run: the group {key} has {n} "
                f"samples per epoch (repeats included), so with batch_size {batch_size} it has a batch of {bad[0]}. "
                f"Use a batch_size that is a multiple of {world_size} and dataset sizes (× repeats) per bucket that "
                f"are multiples of the batch size, or run on fewer processes.")


def all_reduce_gradients(params: Iterable[torch.Tensor], *, op: str = "mean",
                         bucket_elements: int = REDUCE_BUCKET_ELEMENTS) -> None:
    """All-reduce ``p.grad`` of every parameter over the ranks, in float32, in place.

    Gradients are flattened into float32 buckets of at most ``bucket_elements`` elements, all-reduced (sum), divided
    by the world size for ``"mean"``, and copied back in each gradient's own dtype. A parameter without a gradient
    on this rank takes part with zeros (and gets the reduced gradient), so every rank issues the same collectives.
    Nothing happens without an initialised process group of more than one rank.

    Raises:
        ValueError: ``op`` is not ``"mean"`` or ``"sum"``.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"op must be 'mean' or 'sum'; got {op!r}")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(params):
        end, count = start, 0
        while end < len(params) and (end == start or count + params[end].numel() <= bucket_elements):
            count += params[end].numel()
            end += 1
        grads = [p.grad for p in params[start:end]]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        if op == "mean":
            flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        start = end


def check_sharding(sharding: str, blocks_to_swap: int) -> None:
    """Refuse a placement of the base weights that cannot work.

    Raises:
        DistributedError: an unknown ``sharding``; FSDP sharding with block swap (module notes; the message gives
            both ways out).
    """
    if sharding not in SHARDING:
        raise DistributedError(f"sharding must be one of {', '.join(SHARDING)}; got {sharding!r}.")
    if sharding == "fsdp" and blocks_to_swap > 0:
        raise DistributedError(
            f"FSDP sharding and block swap (blocks_to_swap={blocks_to_swap}) cannot be combined: FSDP keeps 1/N of "
            "every block on each GPU and gathers it for the block's forward, block swap streams whole blocks from "
            "CPU memory. Set blocks_to_swap to 0 (sharding over N GPUs divides the weights' memory by N), or "
            "replicate the model on every GPU with block swap (--sharding replicate).")


def check_local_workers(processes: int, device_type: str | None = None, *, visible_gpus: int | None = None,
                        blocks_to_swap: int = 0, validation_clips: bool = False) -> None:
    """Refuse a run on ``processes`` local worker processes (torchrun on this machine, FSDP sharding) started from
    a trainer that cannot hand it over; one process is always accepted. The arguments left None are not checked
    (e.g. at queue time, before the device is known).

    Args:
        processes: worker processes (the trainer node's ``gpus``). device_type: the host's compute device type
            (``"cuda"``: one process per GPU, NCCL; ``"cpu"``: gloo). visible_gpus: CUDA devices this process sees.
        blocks_to_swap: the model's block swap (refused with FSDP, :func:`check_sharding`).
        validation_clips: whether the run would render validation clips (the workers load no VAE or text encoder).

    Raises:
        DistributedError: ``processes`` < 1; another device type; more processes than visible GPUs; block swap;
            validation clips. The message says what to change.
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise DistributedError(f"gpus must be an integer ≥ 1; got {processes!r}.")
    if processes == 1:
        return
    if device_type is not None and device_type not in ("cuda", "cpu"):
        raise DistributedError(f"gpus={processes} runs one process per CUDA GPU (or, without GPUs, per CPU process "
                               f"with gloo); this ComfyUI computes on {device_type!r}: set gpus to 1.")
    if device_type == "cuda" and visible_gpus is not None and visible_gpus < processes:
        raise DistributedError(f"gpus={processes}, but only {visible_gpus} CUDA GPU(s) are visible to ComfyUI (see "
                               f"CUDA_VISIBLE_DEVICES): set gpus to at most {visible_gpus}.")
    if blocks_to_swap > 0:
        raise DistributedError(
            f"gpus={processes} shards the model over the GPUs with FSDP, which cannot be combined with block swap "
            f"(blocks_to_swap={blocks_to_swap}): set blocks_to_swap to 0 on the trainer (or its model loader), since "
            "sharding divides the weights' memory by the number of GPUs; or set gpus to 1. To keep block swap on "
            "every GPU, run the run folder headless with --sharding replicate.")
    if validation_clips:
        raise DistributedError(
            f"validation clips are rendered inside ComfyUI, but with gpus={processes} the run trains in worker "
            "processes that load no VAE or text encoder: set validate_every to 0 (and clear validation_steps and "
            "sample_at_start), or set gpus to 1. The held-out validation loss (validation_loss_every) still works.")


def shard_frozen_blocks(model: nn.Module, blocks: Sequence[nn.Module], ctx: DistributedContext) -> nn.Module:
    """Shard the frozen base weights of ``model`` over the ranks with FSDP2 (module notes), in place.

    Call it before the LoRA layers are injected, on a model whose parameters are all frozen. Each block of
    ``blocks`` becomes one FSDP unit (gathered for its forward, resharded after), then the model itself (the
    remaining layers). The parameters move to ``ctx.device``. Nothing is done on a single process.

    Args:
        model: the DiT (frozen). blocks: its transformer blocks (the training adapter's ``blocks(model)``).
        ctx: the run's context.

    Returns:
        ``model`` (its class and those of the blocks become FSDP subclasses; parameters become DTensor shards).

    Raises:
        DistributedError: a parameter requires grad (LoRA already injected, or an unfrozen model); no blocks.
    """
    if not ctx.distributed:
        return model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise DistributedError(f"FSDP sharding takes a frozen model, but {len(trainable)} parameters require grad "
                               f"(e.g. {trainable[0]}): shard the model as loaded, before LoRA layers are added.")
    if not blocks:
        raise DistributedError("FSDP sharding needs the model's transformer blocks (the training adapter's blocks).")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
