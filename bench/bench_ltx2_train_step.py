"""Benchmark: one LTX-2 LoRA training step, Cinetune vs diffusers ``LTX2VideoTransformer3DModel`` + PEFT.

A step is what the trainer does per optimizer step with one audio+video micro-batch, text-to-video (no first-frame
conditioning) and no gradient clipping: ``zero_grad``, the flow-matching loss (one σ shared by both modalities,
``x_σ = (1 − σ)·x0 + σ·ε``, target ``ε − x0``, video MSE + audio MSE in float32), backward, ``AdamW.step`` (the
``TrainConfig`` defaults), ``zero_grad``. The text connectors are not part of the step: both sides get the same
connector outputs (``--text-len`` tokens per modality; in a real run the frozen connectors add the same no-grad work
to both).

The network is the medium DiT of ``bench_ltx2_dit.py`` (4 dual-stream blocks, video 8 heads × 64, audio 8 heads ×
32, caption channels 384, 19B numerics) with random weights in the official layout; diffusers gets the same state
dict through ``official_to_diffusers`` and runs with ``use_cross_timestep=False`` (the 19B behaviour).
Only the LoRA parameters train: rank 16, alpha 16 on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of all six
attentions of every block (ltx-trainer's default targets, :data:`~cinetune.ltx2.config.LTX2_LORA_TARGETS`; 24 layers
per block, the module names are the same on both sides).

- ours: ``LTX2DiT`` + ``core.lora.inject_lora`` + ``ltx2.train.ltx2_flow_matching_loss``, with the trainer's
  per-block ``gradient_checkpointing`` on or off (the attentions' LoRA projections that read the same tokens train
  through ``core.lora_fused``);
- reference: diffusers ``LTX2VideoTransformer3DModel`` on the same weights +
  ``peft.inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=<the same 4 suffixes>))``, with
  diffusers' own ``enable_gradient_checkpointing()`` (also per block, non-reentrant) on or off.

Both start from the same adapters (``lora_down``/``lora_A`` kaiming-uniform seeded by the layer name,
``_common.lora_down_init``; ``lora_up``/``lora_B`` zero), so the first loss is the base model's on both sides and the
first gradients agree. The adapters are float32 on both sides.

Each of the four variants (ours / reference × checkpointing off / on) runs in its own subprocess, built and warmed up
one after the other (one step each, which also creates the AdamW state; not measured), then driven step by step in
cycles — one step of each variant per cycle, the order reversed every other cycle — so load from other processes
hits both sides of a comparison alike. This is done twice, with fresh subprocesses:

- time (``--runs`` cycles, glibc's default allocator settings, :data:`_common.TIME_ENV`): the median over cycles of
  the per-cycle ratio ours/reference (with its quartiles), the median and best step time of each variant, and the
  same ratio of the processes' CPU times;
- peak memory (``--memory-runs`` cycles, glibc mmap threshold pinned to 64 KiB, :data:`_common.WORKER_ENV`): the
  extra memory a step needs at its peak over what is resident before it (weights, inputs, AdamW state), the largest
  over the steps; measured as in ``bench_ltx2_dit.py`` (CPU: Linux ``VmHWM`` after minus ``VmRSS`` before,
  high-water mark reset per step; CUDA: ``max_memory_allocated``). The time ratio of these steps is printed too:
  with every large tensor freshly mapped and zero-filled it is mostly an allocation count (the method of the
  2026-12-07 entries before the split).

    python bench/bench_ltx2_train_step.py [--device cpu|cuda] [--dtype fp32|bf16] [--runs 9] [--memory-runs 3]
                                          [--threads N] [--frames 4 --height 16 --width 24] [--audio-tokens N]
                                          [--text-len 128]

Needs ``peft`` (``pip install peft``, in the ``bench`` extra) besides diffusers.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import (ALPHA, DTYPES, RANK, lora_down_init, page_in, run_train_step_variants, train_step_worker)
from bench_ltx2_dit import FPS, MEDIUM, SIGMA, audio_tokens, config, make_weights

VARIANTS = [(impl, ckpt) for ckpt in (False, True) for impl in ("ours", "diffusers")]
LABEL = {"ours": "ours", "diffusers": "diffusers+peft"}


def make_inputs(args, device) -> dict:
    """Clean tokens and noise (float32): video ``[1, Nv, 128]``, audio ``[1, Na, 128]``; σ ``[1]``; connector
    outputs ``[1, L, caption_channels]`` (float32); RoPE positions."""
    from cinetune.ltx2.rope import audio_positions, video_positions

    c = config()
    g = torch.Generator().manual_seed(1)
    Nv, Na = args.frames * args.height * args.width, audio_tokens(args)
    return dict(
        video=torch.randn(1, Nv, c.in_channels, generator=g).to(device),
        video_noise=torch.randn(1, Nv, c.in_channels, generator=g).to(device),
        audio=torch.randn(1, Na, c.audio_in_channels, generator=g).to(device),
        audio_noise=torch.randn(1, Na, c.audio_in_channels, generator=g).to(device),
        sigma=torch.full((1,), SIGMA, device=device),
        video_context=torch.randn(1, args.text_len, c.caption_channels, generator=g).to(device),
        audio_context=torch.randn(1, args.text_len, c.caption_channels, generator=g).to(device),
        video_positions=video_positions(args.frames, args.height, args.width, fps=FPS, device=device),
        audio_positions=audio_positions(Na, device=device),
    )


def build_ours(state: dict, dtype, device):
    from cinetune.core.lora import inject_lora
    from cinetune.ltx2.config import LTX2_BLOCK_PREFIXES, LTX2_LORA_TARGETS
    from cinetune.ltx2.dit import LTX2DiT
    from cinetune.ltx2.train import ltx2_flow_matching_loss

    model = LTX2DiT(config())
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype)
    layers = inject_lora(model, rank=RANK, alpha=ALPHA, targets=LTX2_LORA_TARGETS, within=LTX2_BLOCK_PREFIXES,
                         dtype=torch.float32)
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_down.copy_(lora_down_init(name, m.in_features))
    model.train()
    ups = {name: m.lora_up for name, m in layers.items()}

    def loss_fn(i):
        return ltx2_flow_matching_loss(
            model, i["video"], i["video_noise"], i["sigma"], video_context=i["video_context"],
            video_positions=i["video_positions"], audio=i["audio"], audio_noise=i["audio_noise"],
            audio_context=i["audio_context"], audio_positions=i["audio_positions"], compute_dtype=dtype).total

    return model, loss_fn, ups


def build_diffusers(state: dict, dtype, device):
    from diffusers import LTX2VideoTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from cinetune.ltx2.config import LTX2_LORA_TARGETS, official_to_diffusers

    model = LTX2VideoTransformer3DModel(**config().diffusers_kwargs())
    model.load_state_dict(official_to_diffusers(state), strict=True)
    model = model.to(device=device, dtype=dtype)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(LTX2_LORA_TARGETS))
    model = inject_adapter_in_model(lora, model)
    model.requires_grad_(False)
    ups = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                a, b = m.lora_A["default"], m.lora_B["default"]
                a.float(), b.float()
                a.weight.copy_(lora_down_init(name, a.in_features))
                b.weight.zero_()
                a.weight.requires_grad_(True)
                b.weight.requires_grad_(True)
                ups[name] = b.weight
    model.train()

    def loss_fn(i):
        s = i["sigma"].view(-1, 1, 1)
        x_video = (1.0 - s) * i["video"] + s * i["video_noise"]
        x_audio = (1.0 - s) * i["audio"] + s * i["audio_noise"]
        t = i["sigma"] * 1000
        pred_video, pred_audio = model(
            x_video.to(dtype), x_audio.to(dtype), i["video_context"].to(dtype), i["audio_context"].to(dtype),
            timestep=t, audio_timestep=t, sigma=t, audio_sigma=t, video_coords=i["video_positions"],
            audio_coords=i["audio_positions"], use_cross_timestep=False, return_dict=False)
        return (F.mse_loss(pred_video.float(), i["video_noise"] - i["video"])
                + F.mse_loss(pred_audio.float(), i["audio_noise"] - i["audio"]))

    return model, loss_fn, ups


def worker(args) -> None:
    """Build one variant and run :func:`_common.train_step_worker` on it."""
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    build = build_ours if args.worker == "ours" else build_diffusers
    model, loss_fn, ups = build(load_file(args.weights), DTYPES[args.dtype], device)
    page_in(model)
    if args.worker == "diffusers" and args.checkpointing:
        model.enable_gradient_checkpointing()
    inputs = make_inputs(args, device)
    ours_ckpt = args.worker == "ours" and args.checkpointing
    train_step_worker(model, lambda: loss_fn(inputs), ups, model.transformer_blocks if ours_ckpt else [], args.out,
                      device)


def worker_command(which: str, checkpointing: bool, weights: Path, out: Path, args) -> tuple[str, list[str]]:
    """Name and command line of one variant's worker subprocess."""
    cmd = [sys.executable, __file__, "--worker", which, "--weights", str(weights), "--out", str(out),
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
           "--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width),
           "--audio-tokens", str(audio_tokens(args)), "--text-len", str(args.text_len)]
    cmd += ["--checkpointing"] if checkpointing else []
    return f"{which} (checkpointing {'on' if checkpointing else 'off'})", cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--runs", type=int, default=9, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--memory-runs", type=int, default=3, help="steps per variant measuring the peak memory")
    p.add_argument("--frames", type=int, default=4, help="latent frames F'")
    p.add_argument("--height", type=int, default=16, help="latent height H' (pixels / 32)")
    p.add_argument("--width", type=int, default=24, help="latent width W' (pixels / 32)")
    p.add_argument("--audio-tokens", type=int, default=0, help="audio latents (0: the clip's duration at 25/s)")
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    video_tokens = args.frames * args.height * args.width
    print(f"LTX-2 LoRA training step (forward + backward + AdamW, LoRA rank {RANK} alpha {ALPHA:g} on to_q/to_k/"
          f"to_v/to_out.0 of every attention), {MEDIUM}, {video_tokens} video tokens "
          f"({args.frames}x{args.height}x{args.width}) + {audio_tokens(args)} audio tokens + {args.text_len} text "
          f"tokens per modality, {args.dtype} on {args.device}, {args.threads} threads, {args.runs} timed and "
          f"{args.memory_runs} memory steps per variant after 1 warm-up step each, interleaved")
    run_train_step_variants(VARIANTS, make_weights, "ltx2_bench", functools.partial(worker_command, args=args),
                            args.runs, args.memory_runs, LABEL)


if __name__ == "__main__":
    main()
