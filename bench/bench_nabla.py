"""NABLA attention vs dense attention: median wall time, ratio, kept-block fraction, and which path ran.

    python bench/bench_nabla.py                       # CPU, 16x32x32 token grid (16,384 tokens)
    python bench/bench_nabla.py --device cuda         # GPU: compiled FlexAttention path
    python bench/bench_nabla.py --size small          # 4x32x32 grid (4,096 tokens), seconds on a CPU

Queries and keys are either iid Gaussian (``--inputs random``: every block looks alike, so top-CDF keeps about a
fraction P of the blocks) or a smooth random field over the token grid plus noise (``--inputs smooth``, default:
nearby tokens are similar, as in video latents, so the block map is peaked). Real sparsity depends on the model's
activations; neither input says what a trained DiT reaches.

The NABLA time includes building the mask (block means, softmax, sort) on every call, as in inference. Runs are
interleaved (dense, NABLA, dense, ...) so drifts in machine speed hit both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cinetune.core.attention import attention, block_sparse_path
from cinetune.k5.nabla import NablaConfig, fractal_permutation, nabla_attention, nabla_block_mask, sta_block_mask

SIZES = {"full": (16, 32, 32), "small": (4, 32, 32)}


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


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def peak_bytes(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--P", type=float, default=0.9)
    parser.add_argument("--inputs", choices=["smooth", "random"], default="smooth")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    grid = SIZES[args.size]
    cfg = NablaConfig(P=args.P)
    q, k, v = make_qkv(grid, args.heads, args.dim, args.inputs, device, dtype)
    S = q.shape[2]

    with torch.no_grad():
        mask = nabla_block_mask(q, k, grid, cfg)
        sta = sta_block_mask(grid[0], grid[1] // 8, grid[2] // 8, cfg.window)

        def dense():
            return attention(q, k, v)

        def nabla():
            return nabla_attention(q, k, v, grid, cfg)

        def mask_only():
            return nabla_block_mask(q, k, grid, cfg)

        for fn in (dense, nabla, mask_only):  # warm-up (and FlexAttention compile on CUDA)
            fn()
        times = {"dense": [], "nabla": [], "mask": []}
        for _ in range(args.repeats):
            times["dense"].append(timed(dense, device))
            times["nabla"].append(timed(nabla, device))
            times["mask"].append(timed(mask_only, device))
        err = ((nabla().float() - dense().float()).abs().max() / dense().float().abs().max()).item()
        peaks = {name: peak_bytes(fn, device) for name, fn in (("dense", dense), ("nabla", nabla))}

    med = {name: statistics.median(ts) for name, ts in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, dtype {str(dtype).replace('torch.', '')}")
    print(f"grid T,Ht,Wt = {grid}, tokens {S}, blocks {S // 64}, heads {args.heads}, D {args.dim}, "
          f"P {args.P}, STA {cfg.window}, inputs {args.inputs}, repeats {args.repeats}")
    print(f"NABLA path: {block_sparse_path(device)}")
    print(f"blocks kept: {mask.float().mean().item():.3f} (STA window alone {sta.float().mean().item():.3f})")
    print(f"dense (sdpa) median {med['dense'] * 1e3:9.1f} ms   [min {min(times['dense']) * 1e3:.1f}, "
          f"max {max(times['dense']) * 1e3:.1f}]")
    print(f"NABLA        median {med['nabla'] * 1e3:9.1f} ms   [min {min(times['nabla']) * 1e3:.1f}, "
          f"max {max(times['nabla']) * 1e3:.1f}]   of which mask {med['mask'] * 1e3:.1f} ms")
    print(f"ratio NABLA / dense: {med['nabla'] / med['dense']:.3f}")
    print(f"max |NABLA - dense| / max |dense|: {err:.3g} (nonzero: dropped blocks change the output)")
    if peaks["dense"] is not None:
        print(f"peak memory: dense {peaks['dense'] / 2**20:.0f} MiB, NABLA {peaks['nabla'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
