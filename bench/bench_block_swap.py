"""Block swap cost: step time with 0, N/4, N/2 and all blocks swapped, against no swap and the PCIe bound.

    python bench/bench_block_swap.py --device cuda                       # K5-Lite-sized stack, bf16
    python bench/bench_block_swap.py --device cuda --size pro --mode training
    python bench/bench_block_swap.py                                     # no CUDA: prints a dry schedule

The stack is the reference pre-norm transformer block of ``cinetune.core.memory.transformer_block_activations``
(fused QKV, SDPA, GELU MLP) at Kandinsky 5 widths: ``lite`` = 32 blocks of D 1792 / F 7168 (K5 Lite's visual blocks
carry modulation and cross-attention too, so real blocks are ~1.5x bigger), ``pro`` = 60 blocks of D 4096 /
F 16384. Two token counts per run: one below the point where a block's compute hides its copy (default 1,280 — a
17-frame 256x256 training clip) and one above it (default 16,384), see performance.md §2.5.

For each token count and each number of swapped blocks it prints the median step time, the slowdown against no
swap, the bytes copied per step (from BlockSwap.stats), the transfer time those bytes need at the measured pinned
host-to-device bandwidth, the best time a perfect overlap allows (max(no-swap time, transfer time)) and the time
without any overlap (no-swap + transfer), the peak allocated memory and the estimate of core.memory for it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cinetune.core.memory import describe_module, estimate_peak_memory, transformer_block_activations
from cinetune.core.offload import BlockSwap, SyncTransfer

SIZES = {"lite": (1792, 7168, 28, 32), "pro": (4096, 16384, 32, 60), "small": (1024, 4096, 16, 16)}


class Block(nn.Module):
    """The reference pre-norm block (see core/memory.py)."""

    def __init__(self, d: int, f: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> tuple[float, float]:
    """Median host→device bandwidth in bytes/s, (pinned, pageable)."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = []
    for pinned in (True, False):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out.append(nbytes / statistics.median(times[1:]))
    return out[0], out[1]


def make_step(blocks, x, training: bool):
    def step():
        if training:
            h = x
            for b in blocks:
                h = checkpoint(b, h, use_reentrant=False)
            h.float().square().mean().backward()
        else:
            with torch.no_grad():
                h = x
                for b in blocks:
                    h = b(h)
    return step


def timed_steps(step, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_cuda(args) -> None:
    device = torch.device(args.device)
    d, f, heads, n = SIZES[args.size]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    bw_pinned, bw_pageable = h2d_bandwidth(device)
    print(f"host->device bandwidth: pinned {bw_pinned / 1e9:.1f} GB/s, pageable {bw_pageable / 1e9:.1f} GB/s")
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(d, f, heads) for _ in range(n)).to(dtype).requires_grad_(False)
    desc = describe_module(blocks, list(blocks))
    block_bytes = desc.blocks[0].tensor_bytes
    print(f"stack: {args.size}, {n} blocks of D {d} / F {f} / {heads} heads, {args.dtype}, "
          f"{block_bytes / 1e6:.0f} MB per block, ring {args.ring}")
    acts = transformer_block_activations(d, f, heads, compute_dtype=dtype)
    modes = ["inference", "training"] if args.mode == "both" else [args.mode]
    counts = sorted({0, n // 4, n // 2, n})
    for mode in modes:
        training = mode == "training"
        for tokens in args.tokens:
            x = torch.randn(args.batch, tokens, d, device=device, dtype=dtype, requires_grad=training)
            print(f"\n{mode}, {tokens} tokens x batch {args.batch}")
            print(f"{'swapped':>7} {'step ms':>9} {'vs none':>8} {'MB/step':>9} {'xfer ms':>8} {'ideal ms':>9} "
                  f"{'serial ms':>9} {'on-demand':>9} {'peak GB':>8} {'est GB':>7}")
            base = None
            for N in counts:
                swap = BlockSwap(list(blocks), N, device=device, ring_size=args.ring)
                step = make_step(blocks, x, training)
                step()  # first step: cold ring
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                bytes0, od0 = swap.stats["bytes_copied"], swap.stats["on_demand"]
                t = timed_steps(step, device, args.warmup, args.repeats)
                steps = args.warmup + args.repeats
                per_step = (swap.stats["bytes_copied"] - bytes0) / steps
                on_demand = (swap.stats["on_demand"] - od0) / steps
                peak = torch.cuda.max_memory_allocated(device)
                est = estimate_peak_memory(desc, acts, tokens=tokens, batch=args.batch, blocks_to_swap=N,
                                           ring_size=args.ring, training=training,
                                           extra_activation_bytes=x.numel() * x.element_size())
                swap.close(device="cpu")
                x.grad = None
                torch.cuda.empty_cache()
                base = t if base is None else base
                xfer = per_step / bw_pinned
                print(f"{N:>7} {t * 1e3:>9.1f} {t / base:>7.2f}x {per_step / 1e6:>9.0f} {xfer * 1e3:>8.1f} "
                      f"{max(base, xfer) * 1e3:>9.1f} {(base + xfer) * 1e3:>9.1f} {on_demand:>9.1f} "
                      f"{peak / 1e9:>8.2f} {est.total / 1e9:>7.2f}")


def dry_schedule() -> None:
    """Without CUDA: the copy/wait/release order for 6 tiny blocks, 4 swapped, ring 2."""

    class Recorder(SyncTransfer):
        def __init__(self):
            super().__init__("cpu")
            self.events = []

        def copy_in(self, block, slot, src, dst):
            self.events.append(f"copy {block}->slot{slot}")
            super().copy_in(block, slot, src, dst)

        def wait(self, block):
            self.events.append(f"wait {block}")

        def release(self, slot):
            self.events.append(f"release slot{slot}")

    blocks = nn.ModuleList(Block(32, 64, 2) for _ in range(6)).requires_grad_(False)
    rec = Recorder()
    swap = BlockSwap(list(blocks), 4, device="cpu", transfer=rec)
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        make_step(blocks, x, False)()
    print("inference step:", ", ".join(rec.events))
    rec.events.clear()
    make_step(blocks, x.requires_grad_(True), True)()
    print("training step (checkpointed, forward then backward):", ", ".join(rec.events))
    swap.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="lite")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--mode", choices=["inference", "training", "both"], default="both")
    p.add_argument("--tokens", type=int, nargs="+", default=[1280, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ring", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        print("bench_block_swap measures host-to-device streaming and needs a CUDA device (--device cuda); "
              "showing the schedule on CPU instead.")
        dry_schedule()
        return 0
    run_cuda(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
