"""Benchmark: Cinetune's Kandinsky 5 DiT forward vs diffusers' ``Kandinsky5Transformer3DModel``, same weights.

Each implementation runs in its own subprocess (fresh allocator, no shared caches), built and warmed up one after
the other (one forward each: one-time lazy initialisation, not measured), then driven forward by forward in cycles —
one forward of each per cycle, the order reversed every other cycle — so load from other processes on the machine
hits both alike (``_common.run_interleaved``). This is done twice, with fresh subprocesses:

- time (``--runs`` cycles, glibc's default allocator settings, ``_common.TIME_ENV``): the median over cycles of the
  per-cycle ratio ours/diffusers (with its quartiles), the median and best forward time of each, and the same ratio
  of the processes' CPU times, all under ``torch.inference_mode``;
- peak memory (``--memory-runs`` cycles, ``_common.WORKER_ENV``): the extra memory a forward needs at its peak over
  what is resident before it (the model, its weights paged in, the inputs), the largest over the measured forwards.
  CPU: Linux ``VmHWM`` after the forward minus ``VmRSS`` just before it, with the high-water mark reset
  (``/proc/self/clear_refs`` ← 5) before each forward, and glibc's mmap threshold pinned to 64 KiB
  (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the OS at once and RSS follows live tensor memory rather
  than allocator retention; without ``/proc`` (not Linux) the ``ru_maxrss`` growth since the start of the process (an
  upper bound). CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before each forward. The time ratio
  of these forwards is printed too (every large tensor freshly mapped and zero-filled: partly an allocation count).

Prints both, the ratios ours/diffusers, and the relative difference of the two outputs as a sanity check.

    python bench/bench_k5_dit.py [--device cpu|cuda] [--dtype fp32|bf16] [--runs 15] [--memory-runs 3]
                                 [--threads N] [--frames 4 --height 48 --width 64] [--text-len 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from _common import (DIMS, DTYPES, TIME_ENV, WORKER_ENV, add_size_arguments, diffusers_forward, forward_worker,
                     load_diffusers_k5, make_weights, page_in, print_forward_ratios, rel, run_interleaved)


def make_inputs(args, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 33, args.frames, args.height, args.width, generator=g)
    text = torch.randn(1, args.text_len, 3584, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    t = torch.tensor([700.0])
    return [a.to(device=device, dtype=dtype if a is not t else torch.float32) for a in (x, text, pooled, t)]


def build(which: str, weights: Path, dtype, device):
    if which == "ours":
        from cinetune.k5.dit import load_k5_dit

        model = load_k5_dit(weights, weight_dtype=[k for k, v in DTYPES.items() if v == dtype][0], device=device).model
        page_in(model)  # weights that are still backed by the file's memory map

        def call(x, text, pooled, t):
            return model(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0))
    else:
        model = load_diffusers_k5(weights, dtype, device)

        def call(x, text, pooled, t):
            return diffusers_forward(model, x, text, pooled, t, (1.0, 2.0, 2.0))
    return call


def worker(args) -> None:
    """Build one implementation and run :func:`_common.forward_worker` on it."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    call = build(args.worker, Path(args.weights), dtype, device)
    x, text, pooled, t = make_inputs(args, dtype, device)
    forward_worker(lambda: call(x, text, pooled, t), lambda out: torch.save(out.float().cpu(), args.out), device)


def worker_command(which: str, args, weights: Path, out: Path) -> tuple[str, list[str]]:
    """Name and command line of one implementation's worker subprocess."""
    return which, [sys.executable, __file__, "--worker", which, "--weights", str(weights), "--out", str(out),
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                   "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
                   "--text-len", str(args.text_len)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(p, DTYPES)
    p.add_argument("--runs", type=int, default=15, help="timed forwards per implementation (after one warm-up)")
    p.add_argument("--memory-runs", type=int, default=3, help="forwards per implementation measuring the peak memory")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"K5 DiT forward, {DIMS}, {tokens} visual tokens + {args.text_len} text tokens, {args.dtype} on "
          f"{args.device}, {args.threads} threads, {args.runs} timed and {args.memory_runs} memory forwards each "
          f"after 1 warm-up, interleaved")
    names = ("ours", "diffusers")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "k5_bench.safetensors"
        make_weights(weights)
        commands = {n: worker_command(n, args, weights, tmp / f"{n}.pt") for n in names}
        workers = run_interleaved(commands, args.runs, "run", env=TIME_ENV)
        memory_workers = run_interleaved(commands, args.memory_runs, "run", env=WORKER_ENV)
        outs = {n: torch.load(tmp / f"{n}.pt") for n in names}

    print_forward_ratios(workers, memory_workers, names)
    why = ("diffusers rounds rotated q/k to bf16 even in fp32" if args.dtype == "fp32"
           else "bf16 rounding; diffusers keeps fp32 modulation weights, ours were cast to bf16")
    print(f"  output relative difference: {rel(outs['ours'], outs['diffusers']):.2e} ({why})")


if __name__ == "__main__":
    main()
