"""Benchmark: one Kandinsky 5 LoRA training step, Cinetune vs diffusers ``Kandinsky5Transformer3DModel`` + PEFT.

A step is what the trainer does per optimizer step with one micro-batch and no gradient clipping: ``zero_grad``,
the flow-matching loss (``x_σ = (1 − σ)·x0 + σ·ε``, target ``ε − x0``, MSE in float32; 33 input channels with
zero conditioning and mask, as text-to-video), backward, ``AdamW.step`` (the ``TrainConfig`` defaults),
``zero_grad``.
Only the LoRA parameters train: rank 16, alpha 16 on the official Kandinsky 5 targets (:data:`K5_LORA_TARGETS`,
6 Linear layers per text block, 10 per visual block).

- ours: ``Kandinsky5DiT`` (``load_k5_dit``) + ``core.lora.inject_lora`` + ``k5.train.flow_matching_loss``,
  with the trainer's per-block ``gradient_checkpointing`` on or off;
- reference: diffusers ``Kandinsky5Transformer3DModel`` on the same state dict (the names are identical) +
  ``peft.inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=<the same 10 suffixes>))``, with
  diffusers' own ``enable_gradient_checkpointing()`` (also per block, non-reentrant) on or off.

Both start from the same adapters: ``lora_down``/``lora_A`` drawn kaiming-uniform (a = √5, PEFT's and our init) with
a generator seeded by the layer name, ``lora_up``/``lora_B`` zero. So the first loss is the base model's on both
sides, and the first gradients and all later losses agree up to diffusers' bf16 rounding of the rotated q/k (it
rounds them even in float32). With ``--dtype bf16`` the base weights and activations are bf16 and the adapters stay
float32 on both sides; PEFT then runs the adapter matmuls in float32 (it casts x to the adapter dtype), ours in bf16
(it casts the adapters to x's dtype), as each library does in training.

Each of the four variants (ours / reference × checkpointing off / on) runs in its own subprocess (fresh allocator,
no shared caches), built and warmed up one after the other (one step each, which also creates the AdamW state; not
measured), then driven step by step in cycles — one step of each variant per cycle, the order reversed every other
cycle — so load from other processes on the machine hits both sides of a comparison alike
(``_common.run_interleaved``, ``_common.train_step_worker``). This is done twice, with fresh subprocesses:

- time (``--runs`` cycles, glibc's default allocator settings, ``_common.TIME_ENV``): the median over cycles of the
  per-cycle ratio ours/reference (with its quartiles), the median and best step time of each variant, and the same
  ratio of the processes' CPU times;
- peak memory (``--memory-runs`` cycles, glibc mmap threshold pinned to 64 KiB, ``_common.WORKER_ENV``): the extra
  memory a step needs at its peak over what is resident before it (weights, inputs, AdamW state), the largest over
  the steps; measured as in ``bench_k5_dit.py`` (CPU: Linux ``VmHWM`` after minus ``VmRSS`` before, high-water mark
  reset per step; CUDA: ``max_memory_allocated``). The time ratio of these steps is printed too: with every large
  tensor freshly mapped and zero-filled it is partly an allocation count (how this benchmark timed before).

    python bench/bench_k5_train_step.py [--device cpu|cuda] [--dtype fp32|bf16] [--runs 9] [--memory-runs 3]
                                        [--threads N] [--frames 4 --height 48 --width 64] [--text-len 128]

Needs ``peft`` (``pip install peft``) besides diffusers.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import (ALPHA, DIMS, DTYPES, RANK, add_size_arguments, diffusers_forward, load_diffusers_k5,
                     lora_down_init, make_weights, page_in, run_train_step_variants, train_step_worker)

ROPE_SCALE = (1.0, 2.0, 2.0)
SIGMA = 0.7
VARIANTS = [(impl, ckpt) for ckpt in (False, True) for impl in ("ours", "diffusers")]
LABEL = {"ours": "ours", "diffusers": "diffusers+peft"}


def make_inputs(args, dtype, device):
    """x0 [1, 16, T, H, W] (model space), ε, σ [1], text [1, L, 3584], pooled [1, 768], zero cond and mask."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 16, args.frames, args.height, args.width, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    text = torch.randn(1, args.text_len, 3584, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    sigma = torch.tensor([SIGMA])
    cond = torch.zeros_like(x0)
    mask = torch.zeros(1, 1, *x0.shape[2:])
    return dict(x0=x0.to(device), noise=noise.to(device), sigma=sigma.to(device), text=text.to(device, dtype),
                pooled=pooled.to(device, dtype), cond=cond.to(device), mask=mask.to(device))


def build_ours(weights: Path, dtype, device):
    from cinetune.core.lora import inject_lora
    from cinetune.k5.dit import load_k5_dit
    from cinetune.k5.family import K5_FAMILY
    from cinetune.k5.train import flow_matching_loss

    model = load_k5_dit(weights, weight_dtype=[k for k, v in DTYPES.items() if v == dtype][0], device=device).model
    page_in(model)
    layers = inject_lora(model, rank=RANK, alpha=ALPHA, targets=K5_FAMILY.lora_targets, within=K5_FAMILY.lora_within,
                         dtype=torch.float32)
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_down.copy_(lora_down_init(name, m.in_features))
    model.train()
    ups = {name: m.lora_up for name, m in layers.items()}

    def loss_fn(x0, noise, sigma, text, pooled, cond, mask):
        return flow_matching_loss(model, x0, noise, sigma, text, pooled, cond=cond, mask=mask,
                                  rope_scale=ROPE_SCALE, compute_dtype=dtype)

    return model, loss_fn, ups


def build_diffusers(weights: Path, dtype, device):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from cinetune.k5.family import K5_LORA_TARGETS

    model = load_diffusers_k5(weights, dtype, device)
    page_in(model)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(K5_LORA_TARGETS))
    model = inject_adapter_in_model(config, model)
    model.requires_grad_(False)
    ups = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                a, b = m.lora_A["default"], m.lora_B["default"]
                a.float(), b.float()  # adapters in float32, as ours (lora_dtype)
                a.weight.copy_(lora_down_init(name, a.in_features))
                b.weight.zero_()
                a.weight.requires_grad_(True)
                b.weight.requires_grad_(True)
                ups[name] = b.weight
    model.train()

    def loss_fn(x0, noise, sigma, text, pooled, cond, mask):
        s = sigma.view(-1, 1, 1, 1, 1)
        x_sigma = (1.0 - s) * x0 + s * noise
        target = noise - x0
        x_in = torch.cat([x_sigma, cond, mask], dim=1).to(dtype)
        pred = diffusers_forward(model, x_in, text, pooled, (1000.0 * sigma).float(), ROPE_SCALE)
        return F.mse_loss(pred.float(), target.float())

    return model, loss_fn, ups


def worker(args) -> None:
    """Build one variant and run :func:`_common.train_step_worker` on it."""
    from cinetune.k5.train import K5_TRAINING

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    build = build_ours if args.worker == "ours" else build_diffusers
    model, loss_fn, ups = build(Path(args.weights), dtype, device)
    if args.worker == "diffusers" and args.checkpointing:
        model.enable_gradient_checkpointing()
    inputs = make_inputs(args, dtype, device)
    ours_ckpt = args.worker == "ours" and args.checkpointing
    train_step_worker(model, lambda: loss_fn(**inputs), ups, K5_TRAINING.blocks(model) if ours_ckpt else [], args.out,
                      device)


def worker_command(which: str, checkpointing: bool, weights: Path, out: Path, args) -> tuple[str, list[str]]:
    """Name and command line of one variant's worker subprocess."""
    cmd = [sys.executable, __file__, "--worker", which, "--weights", str(weights), "--out", str(out),
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
           "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
           "--text-len", str(args.text_len)]
    cmd += ["--checkpointing"] if checkpointing else []
    return f"{which} (checkpointing {'on' if checkpointing else 'off'})", cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_arguments(p, DTYPES)
    p.add_argument("--runs", type=int, default=9, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--memory-runs", type=int, default=3, help="steps per variant measuring the peak memory")
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"K5 LoRA training step (forward + backward + AdamW, LoRA rank {RANK} alpha {ALPHA:g} on the official "
          f"targets), {DIMS}, {tokens} visual tokens + {args.text_len} text tokens, {args.dtype} on {args.device}, "
          f"{args.threads} threads, {args.runs} timed and {args.memory_runs} memory steps per variant after 1 warm-up "
          f"step each, interleaved")
    workers = run_train_step_variants(VARIANTS, make_weights, "k5_bench", functools.partial(worker_command, args=args),
                                      args.runs, args.memory_runs, LABEL)
    loss0 = {v: workers[v].info["loss"] for v in VARIANTS}
    last = {v: workers[v].replies[-1]["loss"] for v in VARIANTS}
    rel0 = abs(loss0["ours", False] / loss0["diffusers", False] - 1)
    why = ("diffusers rounds rotated q/k to bf16 even in fp32" if args.dtype == "fp32"
           else "bf16 rounding; diffusers keeps fp32 modulation weights, ours were cast to bf16")
    print(f"  initial loss, relative difference ours vs diffusers+peft: {rel0:.2e} ({why}); checkpointing on vs off: "
          f"ours "
          f"{abs(loss0['ours', True] / loss0['ours', False] - 1):.1e}, diffusers+peft "
          f"{abs(loss0['diffusers', True] / loss0['diffusers', False] - 1):.1e}")
    print(f"  loss after {args.runs} AdamW updates (the last timed step): " + ", ".join(
        f"{LABEL[w]} ckpt {'on' if c else 'off'} {last[w, c]:.7f}" for w, c in VARIANTS))


if __name__ == "__main__":
    main()
