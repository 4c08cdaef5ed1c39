"""Step time of a Kandinsky 5 LoRA run on 2 gloo ranks (torchrun, FSDP2) vs 1 process at the same global batch,
on the CPU (report only: the target of data-parallel training is GPUs; on a CPU the two ranks share the cores one
process would use).

Both sides run the same run folder through the headless command (``python -m cinetune.training.launch``): the medium
Kandinsky 5 DiT of the other benchmarks (:data:`_common.DIMS`, random weights in the official layout), 8 cached
clips of one bucket (random latents ``[16, 5, 16, 16]``, 320 tokens each; 16 text tokens), LoRA rank 16 on the
official targets, AdamW, batch 4 (2 clips per rank on 2 ranks), float32. The step time is the interval between
consecutive ``progress`` events of ``events.jsonl`` (the first steps are warm-up), so it holds the whole optimizer
step as the product runs it: forward and backward of the rank's share, FSDP's all-gathers of the sharded base
weights, the gradient all-reduce, the optimizer update. The CPU threads are split fairly: one process gets
``--threads`` threads, each of the 2 ranks half of them. The runs alternate (1, 2, 2, 1, …) so machine load hits
both alike; the printed ratio is the median over pairs. The losses of the two sides are compared as a check.

    python bench/bench_distributed.py [--steps 12] [--warmup 2] [--pairs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DIMS, RANK, ALPHA, make_weights  # noqa: E402

from cinetune.core.checkpoint import save_file_atomic  # noqa: E402
from cinetune.k5.config import K5Config  # noqa: E402
from cinetune.training.cache import DEFAULT_LAYOUT, CachedSample  # noqa: E402
from cinetune.training.checkpointing import list_checkpoints, read_state  # noqa: E402
from cinetune.training.config import TrainConfig  # noqa: E402
from cinetune.training.launch import read_events  # noqa: E402
from cinetune.training.recipe import CachedData, RunRecipe, write_recipe  # noqa: E402

CLIPS = 8
BATCH = 4
LATENT = (16, 5, 16, 16)  # [C, F', H', W']: 17 frames of 128 x 128 px
TEXT_TOKENS = 16


def write_cache(cache_dir: Path) -> CachedData:
    """``CLIPS`` cached clips of one bucket with random latents and caption embeddings (the cachers' layout)."""
    config = K5Config(**DIMS)
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(CLIPS):
        key, text_key = f"{i:064x}", f"{i + 100:064x}"
        latent_path, text_path = cache_dir / "latents" / f"{key}.safetensors", cache_dir / "text" / f"{text_key}.safetensors"
        save_file_atomic({"latent": torch.randn(*LATENT, generator=g)}, latent_path)
        save_file_atomic({"text": torch.randn(TEXT_TOKENS, config.in_text_dim, generator=g),
                          "pooled": torch.randn(config.in_text_dim2, generator=g)}, text_path)
        samples.append(CachedSample(key=key, latent_path=latent_path, text_key=text_key, text_path=text_path,
                                    caption=f"clip {i}", item_id=f"clip{i}.mp4", bucket=(128, 128), frames=17,
                                    kind="video", repeats=1, template="video", fps=24.0, audio=False,
                                    layout=DEFAULT_LAYOUT))
    return CachedData.from_samples(samples, cache_dir=cache_dir, encoder_id="bench-encoder", vae_id="bench-vae")


def run_once(recipe: RunRecipe, run_dir: Path, world: int, threads: int) -> tuple[list[float], list[float]]:
    """Train the recipe in a fresh run folder on ``world`` processes; returns (step intervals in s, losses)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    write_recipe(run_dir, recipe)
    per_rank = max(1, threads // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "MKL_NUM_THREADS": str(per_rank)}
    command = ["-m", "cinetune.training.launch", str(run_dir), "--device", "cpu", "--quiet"]
    if world > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *command]
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run on {world} process(es) failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    times = [e["time"] for e in read_events(run_dir)[0] if e["event"] == "progress"]
    losses = [float(x) for x in read_state(list_checkpoints(run_dir)[-1][1])["losses"]]
    return [b - a for a, b in zip(times, times[1:])], losses


def describe(label: str, intervals: list[float]) -> str:
    q = statistics.quantiles(intervals, n=4)
    return (f"  {label:<26} step time median {1000 * statistics.median(intervals):7.1f} ms "
            f"(quartiles {1000 * q[0]:.1f}-{1000 * q[2]:.1f}, best {1000 * min(intervals):.1f}, "
            f"{len(intervals)} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first step intervals of each run left out")
    parser.add_argument("--pairs", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of one process (split over the ranks)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cinetune_bench_distributed_") as tmp:
        tmp = Path(tmp)
        make_weights(tmp / "dit.safetensors")
        config = TrainConfig(rank=RANK, alpha=ALPHA, learning_rate=1e-4, max_steps=args.steps, batch_size=BATCH,
                             compute_dtype="fp32", lora_dtype="fp32", save_dtype="fp32", save_every=0, seed=0)
        recipe = RunRecipe.create("kandinsky-5", models={"dit": tmp / "dit.safetensors"},
                                  loader={"weight_dtype": "fp32"}, data={"train": write_cache(tmp / "cache")},
                                  config=config, metadata={"cinetune.run": "bench"})
        steps: dict[int, list[float]] = {1: [], 2: []}
        medians: dict[int, list[float]] = {1: [], 2: []}
        losses: dict[int, list[float]] = {}
        for pair in range(args.pairs):
            for world in ((1, 2) if pair % 2 == 0 else (2, 1)):
                intervals, losses[world] = run_once(recipe, tmp / f"run{world}", world, args.threads)
                kept = intervals[args.warmup:]
                steps[world] += kept
                medians[world].append(statistics.median(kept))
        ratios = [b / a for a, b in zip(medians[1], medians[2])]
        worst = max(abs(a - b) / abs(a) for a, b in zip(losses[1], losses[2]))
        print(f"K5 LoRA step, CPU, threads: {args.threads} for 1 process, {max(1, args.threads // 2)} per rank; global "
              f"batch {BATCH} of {CLIPS} clips {list(LATENT)}, rank {RANK}, {args.steps} steps per run, {args.pairs} "
              "runs per side")
        print(describe("1 process", steps[1]))
        print(describe("2 gloo ranks (FSDP2)", steps[2]))
        print(f"  ratio 2 ranks / 1 process: {statistics.median(ratios):.3f}x (median of per-pair ratios "
              f"{', '.join(f'{r:.3f}' for r in ratios)})")
        print(f"  losses, largest relative difference 2 ranks vs 1 process: {worst:.2e}")
        print(json.dumps({"ratio": statistics.median(ratios), "loss_rel_diff": worst}))


if __name__ == "__main__":
    main()
