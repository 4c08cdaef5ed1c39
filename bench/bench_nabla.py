"""NABLA block-sparse attention vs dense attention: median wall time per path, speed-up, kept-block fraction.

    python bench/bench_nabla.py                        # CPU, 16x32x32 token grid (16,384 tokens), forward + backward
    python bench/bench_nabla.py --size small           # 4x32x32 grid (4,096 tokens), seconds on a CPU
    python bench/bench_nabla.py --device cuda --size k5-10s --dim 128 --heads 8   # 61x32x48 = 93,696 tokens
    python bench/bench_nabla.py --paths gathered "masked dense" --no-backward
    python bench/bench_nabla.py --threads 1 --repeats 9                 # one thread: CPU time tracks the work

For each block-sparse path (``core.attention.BLOCK_SPARSE_PATHS``; default: the one the device selects, plus the
gathered path on CUDA) and for dense SDPA it times the forward and, unless ``--no-backward``, the forward +
backward (q, k, v gradients), on the same q, k, v and one NABLA mask built beforehand; the mask's own cost (block
means, softmax, sort) is timed separately. Runs are interleaved (dense, path 1, path 2, ..., the order reversed every
other cycle) so drifts in machine speed hit every variant alike. Each variant's wall time is printed as median and
quartiles; the speed-up is the median (and quartiles) of the per-cycle ratios dense / path, on wall time and on the
process's CPU time (on a machine shared with other jobs a descheduled thread stalls a parallel region's wall time
but adds little CPU time; with one thread, ``--threads 1``, the CPU time is the steadier measure of the work). The
target printed beside it is 0.8 / kept fraction (issue 14), judged on the median wall-time ratio.

Queries and keys are either iid Gaussian (``--inputs random``: every block looks alike, so top-CDF keeps about a
fraction P of the blocks) or a smooth random field over the token grid plus noise (``--inputs smooth``, default:
nearby tokens are similar, as in video latents, so the block map is peaked). Real sparsity depends on the model's
activations; neither input says what a trained DiT reaches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _common import quartiles
from cinetune.core.attention import BLOCK_SPARSE_PATHS, block_sparse_attention, block_sparse_path
from cinetune.k5.nabla import NablaConfig, fractal_permutation, nabla_block_mask, sta_block_mask

SIZES = {"full": (16, 32, 32), "small": (4, 32, 32), "k5-10s": (61, 32, 48)}


def make_qkv(grid, heads, dim, inputs, device, dtype, seed=0):
    """q, k, v [1, heads, S, dim] in fractal order."""
    T, Ht, Wt = grid
    g = torch.Generator().manual_seed(seed)
    perm, _ = fractal_permutation(T, Ht, Wt)

    def one():
        noise = torch.randn(1, heads, dim, T, Ht, Wt, generator=g)
        if inputs == "smooth":
            coarse = torch.randn(heads, dim, T // 4 + 2, Ht // 8 + 2, Wt // 8 + 2, generator=g)
            field = F.interpolate(coarse, size=(T, Ht, Wt), mode="trilinear", align_corners=True)
            noise = 3.0 * field[None] + 0.5 * noise
        x = noise.flatten(3).transpose(-1, -2)[:, :, perm]  # [1, heads, S, dim] row-major -> fractal
        return x.to(device=device, dtype=dtype).contiguous()

    return one(), one(), one()


def timed(fn, device) -> tuple[float, float]:
    """Wall time and process CPU time (s) of one call of ``fn``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def peak_bytes(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dim (K5: 128)")
    parser.add_argument("--P", type=float, default=0.9)
    parser.add_argument("--inputs", choices=["smooth", "random"], default="smooth")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--paths", nargs="+", choices=BLOCK_SPARSE_PATHS, default=None)
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    grid = SIZES[args.size]
    cfg = NablaConfig(P=args.P)
    paths = args.paths or list(dict.fromkeys([block_sparse_path(device), "gathered"]))
    q, k, v = make_qkv(grid, args.heads, args.dim, args.inputs, device, dtype)
    S = q.shape[2]
    with torch.no_grad():
        mask = nabla_block_mask(q, k, grid, cfg)
    kept = mask.float().mean().item()
    sta = sta_block_mask(grid[0], grid[1] // 8, grid[2] // 8, cfg.window)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def forward(path):
        def run():
            with torch.no_grad():
                if path == "dense":
                    return F.scaled_dot_product_attention(q, k, v)
                return block_sparse_attention(q, k, v, mask, path=path)
        return run

    def forward_backward(path):
        def run():
            if path == "dense":
                out = F.scaled_dot_product_attention(*leaves)
            else:
                out = block_sparse_attention(*leaves, mask, path=path)
            torch.autograd.grad(out, leaves, grad_out)
        return run

    def mask_only():
        with torch.no_grad():
            nabla_block_mask(q, k, grid, cfg)

    variants = {("forward", p): forward(p) for p in ["dense", *paths]}
    if not args.no_backward:
        variants.update({("forward+backward", p): forward_backward(p) for p in ["dense", *paths]})
    variants[("mask", "")] = mask_only
    for fn in variants.values():  # warm-up (and FlexAttention's compile on CUDA)
        fn()
    times = {key: [] for key in variants}
    cpu = {key: [] for key in variants}
    keys = list(variants)
    for i in range(args.repeats):
        for key in keys if i % 2 == 0 else keys[::-1]:
            wall, cpu_s = timed(variants[key], device)
            times[key].append(wall)
            cpu[key].append(cpu_s)
    with torch.no_grad():
        dense = F.scaled_dot_product_attention(q, k, v)
        masked = block_sparse_attention(q, k, v, mask, path="masked dense")
        errs = {p: _rel(block_sparse_attention(q, k, v, mask, path=p), masked) for p in paths}
    peaks = {key: peak_bytes(fn, device) for key, fn in variants.items() if key[0] != "mask"}

    med = {key: statistics.median(ts) for key, ts in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, dtype {str(dtype).replace('torch.', '')}")
    print(f"grid T,Ht,Wt = {grid}, tokens {S}, blocks {S // 64}, heads {args.heads}, D {args.dim}, P {args.P}, "
          f"STA {cfg.window}, inputs {args.inputs}, repeats {args.repeats} (interleaved)")
    print(f"path the device selects: {block_sparse_path(device)}")
    print(f"blocks kept: {kept:.3f} (STA window alone {sta.float().mean().item():.3f}); "
          f"target speed-up 0.8 / kept = {0.8 / kept:.2f}x")
    print(f"NABLA mask (block means, softmax, sort): median {med['mask', ''] * 1e3:.1f} ms")
    for phase in ("forward", "forward+backward"):
        if (phase, "dense") not in med:
            continue
        print(f"{phase}:")
        for p in ["dense", *paths]:
            ts = times[phase, p]
            q1, q3 = quartiles(ts)
            line = (f"  {p:14s} median {med[phase, p] * 1e3:9.1f} ms (quartiles {q1 * 1e3:.1f}-{q3 * 1e3:.1f}, CPU "
                    f"{statistics.median(cpu[phase, p]) * 1e3:.1f} ms)")
            if p != "dense":
                ratios = [d / t for d, t in zip(times[phase, "dense"], ts)]  # adjacent runs of one cycle
                cpu_ratios = [d / t for d, t in zip(cpu[phase, "dense"], cpu[phase, p])]
                speedup, (lo, hi) = statistics.median(ratios), quartiles(ratios)
                line += (f"   speed-up vs dense {speedup:.2f}x (quartiles {lo:.2f}-{hi:.2f}; CPU time "
                         f"{statistics.median(cpu_ratios):.2f}x) ({'meets' if speedup >= 0.8 / kept else 'below'} "
                         f"target)")
            if peaks.get((phase, p)) is not None:
                line += f"   peak {peaks[phase, p] / 2**20:.0f} MiB"
            print(line)
    print("‖path − masked dense‖ / ‖masked dense‖: " + ", ".join(f"{p} {e:.2e}" for p, e in errs.items())
          + f"; vs dense attention {_rel(masked, dense):.2e} (dropped blocks change the output)")


if __name__ == "__main__":
    main()
