"""Benchmark: Cinetune's Kandinsky 5 DiT forward vs diffusers' ``Kandinsky5Transformer3DModel``, same weights.

Each implementation runs in its own subprocess (fresh allocator, no shared caches):

- time: median wall time of ``--runs`` forwards after one warm-up, under ``torch.inference_mode``. The two
  workers run alternately ``--rounds`` times and the reported time ratio is the median of the per-round ratios, so
  load from other processes on the machine hits both sides alike;
- peak memory (CPU): the extra resident memory a forward needs at its peak, the largest over the timed forwards of
  Linux ``VmHWM`` after the forward minus ``VmRSS`` just before it, with the high-water mark reset
  (``/proc/self/clear_refs`` ← 5) before each forward; the model, its weights (paged in) and the inputs are already
  resident, and the warm-up forward (one-time lazy initialisation) is not measured. glibc's mmap threshold is pinned
  to 64 KiB in the workers (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the OS at once and RSS follows
  live tensor memory rather than allocator retention. Without ``/proc`` (not Linux) the ``ru_maxrss`` growth since
  the start of the process is used (an upper bound). On CUDA: ``torch.cuda.max_memory_allocated`` minus the
  allocation before each forward, peak stats reset per forward.

Prints both and the ratios ours/diffusers, plus the relative difference of the two outputs as a sanity check.

    python bench/bench_k5_dit.py [--device cpu|cuda] [--dtype fp32|bf16] [--runs 5] [--rounds 3]
                                 [--frames 4 --height 48 --width 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import (DIMS, DTYPES, WORKER_ENV, add_size_arguments, diffusers_forward, load_diffusers_k5, make_weights, memory_mark,
                     memory_peak, page_in, synchronize)


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
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    call = build(args.worker, Path(args.weights), dtype, device)
    x, text, pooled, t = make_inputs(args, dtype, device)

    with torch.inference_mode():
        out = call(x, text, pooled, t)  # warm-up: one-time lazy initialisation is not part of the measurement
        synchronize(device)
        times, peaks = [], []
        for _ in range(args.runs):
            base = memory_mark(device)
            start = time.perf_counter()
            out = call(x, text, pooled, t)
            synchronize(device)
            times.append(time.perf_counter() - start)
            peaks.append(memory_peak(device) - base)
    peak = max(peaks)
    torch.save(out.float().cpu(), args.out)
    print(json.dumps({"median_s": statistics.median(times), "best_s": min(times), "peak_bytes": peak}))


def run(which: str, args, weights: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--weights", str(weights), "--out", str(out),
           "--device", args.device, "--dtype", args.dtype, "--runs", str(args.runs), "--threads", str(args.threads),
           "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
           "--text-len", str(args.text_len)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=WORKER_ENV)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(p, DTYPES)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"K5 DiT forward, {DIMS}, {tokens} visual tokens + {args.text_len} text tokens, {args.dtype} on "
          f"{args.device}, {args.threads} threads, median of {args.runs} runs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "k5_bench.safetensors"
        make_weights(weights)
        rounds = [{w: run(w, args, weights, tmp / f"{w}.pt") for w in ("ours", "diffusers")}
                  for _ in range(args.rounds)]
        diff = torch.load(tmp / "ours.pt") - torch.load(tmp / "diffusers.pt")
        rel = (diff.norm() / torch.load(tmp / "diffusers.pt").norm()).item()
    print("  per round: median / best forward time, peak extra memory")
    for i, r in enumerate(rounds):
        print(f"  round {i}: " + "   ".join(
            f"{w} {r[w]['median_s'] * 1000:7.1f} / {r[w]['best_s'] * 1000:7.1f} ms "
            f"{r[w]['peak_bytes'] / 2 ** 20:6.1f} MiB"
            for w in r))
    time_ratio = statistics.median(r["ours"]["median_s"] / r["diffusers"]["median_s"] for r in rounds)
    best = {w: min(r[w]["best_s"] for r in rounds) for w in ("ours", "diffusers")}
    mem = {w: statistics.median(r[w]["peak_bytes"] for r in rounds) for w in ("ours", "diffusers")}
    print(f"  best time: ours {best['ours'] * 1000:.1f} ms, diffusers {best['diffusers'] * 1000:.1f} ms; peak extra "
          f"memory (median): ours {mem['ours'] / 2 ** 20:.1f} MiB, diffusers {mem['diffusers'] / 2 ** 20:.1f} MiB")
    print(f"  ratio ours/diffusers: time {time_ratio:.3f}x (median of per-round median ratios), "
          f"{best['ours'] / best['diffusers']:.3f}x (best)   memory {mem['ours'] / max(mem['diffusers'], 1):.3f}x")
    why = ("diffusers rounds rotated q/k to bf16 even in fp32" if args.dtype == "fp32"
           else "bf16 rounding; diffusers keeps fp32 modulation weights, ours were cast to bf16")
    print(f"  output relative difference: {rel:.2e} ({why})")


if __name__ == "__main__":
    main()
