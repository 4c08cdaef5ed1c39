"""Benchmark: Cinetune's LTX-2 DiT forward (video + audio tokens) vs diffusers' ``LTX2VideoTransformer3DModel``,
same weights.

The network is a medium LTX-2 DiT (:data:`MEDIUM`: 4 dual-stream blocks, video 8 heads × 64, audio 8 heads × 32,
caption channels 384, the 19B numerics: split RoPE, float64 frequency grid, gate multiplier 1000) with random
weights in the official layout; diffusers gets the same state dict through ``official_to_diffusers`` and runs with
``use_cross_timestep=False`` (the 19B behaviour; ``tests/unit/test_ltx2_dit.py`` checks the parity). Inputs as in
text-to-video: one σ per sample (diffusers gets ``timestep = 1000·σ`` of shape ``[B]``, as its pipeline passes
it), video tokens of a ``--frames × --height × --width`` latent grid, the audio tokens of the same clip duration
(25 per second; ``--audio-tokens`` to override), ``--text-len`` context tokens per modality, positions from
:mod:`cinetune.ltx2.rope` for both.

Each implementation runs in its own subprocess (fresh allocator, no shared caches), built and warmed up one after
the other (one forward each, not measured), then driven forward by forward in cycles — one forward of each per
cycle, the order reversed every other cycle — so load from other processes on the machine hits both alike. As in
``bench_k5_dit.py`` this is done twice, with fresh subprocesses: time (``--runs`` cycles, glibc's default allocator
settings, ``_common.TIME_ENV``; median and quartiles of the per-cycle ratio ours/diffusers, best times, CPU-time
ratio) and peak memory (``--memory-runs`` cycles, ``_common.WORKER_ENV``: the extra memory a forward needs at its
peak over what is resident before it, measured as described in ``bench_k5_dit.py``), all under
``torch.inference_mode`` (``_common.forward_worker``).

Prints both, the ratios, and the relative difference of the two outputs as a sanity check.

    python bench/bench_ltx2_dit.py [--device cpu|cuda] [--dtype fp32|bf16] [--runs 15] [--memory-runs 3] [--threads N]
                                   [--frames 4 --height 16 --width 24] [--audio-tokens N] [--text-len 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from _common import (DTYPES, TIME_ENV, WORKER_ENV, forward_worker, page_in, print_forward_ratios, rel,
                     run_interleaved)

#: The medium network, as a checkpoint's ``config.transformer`` metadata (absent keys take the 19B values).
MEDIUM = {
    "num_layers": 4, "num_attention_heads": 8, "attention_head_dim": 64, "cross_attention_dim": 512,
    "audio_num_attention_heads": 8, "audio_attention_head_dim": 32, "audio_cross_attention_dim": 256,
    "caption_channels": 384,
}
SIGMA = 0.7
FPS = 24.0
AUDIO_LATENTS_PER_SECOND = 25


def config():
    from cinetune.ltx2.config import LTX2TransformerConfig

    return LTX2TransformerConfig.from_metadata(MEDIUM)


def make_weights(path: Path) -> None:
    """Random weights of the :data:`MEDIUM` DiT in the official layout (norm weights around 1), saved to ``path``."""
    from cinetune.core.checkpoint import save_file_atomic
    from cinetune.ltx2.dit import LTX2DiT

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LTX2DiT(config()).state_dict().items()}
    sd = {k: (1.0 if k.endswith("norm.weight") else 0.0) + torch.randn(s, generator=g) / s[-1] ** 0.5
          for k, s in shapes.items()}
    save_file_atomic(sd, path)


def audio_tokens(args) -> int:
    """Audio latents of the clip the video grid decodes to: ``8·(F' − 1) + 1`` frames at :data:`FPS`."""
    if args.audio_tokens:
        return args.audio_tokens
    return max(1, round((8 * (args.frames - 1) + 1) / FPS * AUDIO_LATENTS_PER_SECOND))


def make_inputs(args, dtype, device) -> dict:
    from cinetune.ltx2.rope import audio_positions, video_positions

    c = config()
    g = torch.Generator().manual_seed(1)
    B, Nv, Na = args.batch, args.frames * args.height * args.width, audio_tokens(args)
    return dict(
        video=torch.randn(B, Nv, c.in_channels, generator=g).to(device, dtype),
        audio=torch.randn(B, Na, c.audio_in_channels, generator=g).to(device, dtype),
        video_context=torch.randn(B, args.text_len, c.caption_channels, generator=g).to(device, dtype),
        audio_context=torch.randn(B, args.text_len, c.caption_channels, generator=g).to(device, dtype),
        sigma=torch.full((B,), SIGMA, device=device),
        video_positions=video_positions(args.frames, args.height, args.width, fps=FPS, batch_size=B, device=device),
        audio_positions=audio_positions(Na, batch_size=B, device=device),
    )


def build(which: str, weights: Path, dtype, device):
    """The model of ``which`` on ``weights`` (eval mode, weights resident) and a call on :func:`make_inputs`."""
    from safetensors.torch import load_file

    from cinetune.ltx2.config import official_to_diffusers

    state = load_file(str(weights))
    if which == "ours":
        from cinetune.ltx2.dit import LTX2DiT

        model = LTX2DiT(config())
        model.load_state_dict(state, strict=True)
        model = model.to(device=device, dtype=dtype).eval()

        def call(i):
            return model(i["video"], i["audio"], video_sigma=i["sigma"], audio_sigma=i["sigma"],
                         video_context=i["video_context"], audio_context=i["audio_context"],
                         video_positions=i["video_positions"], audio_positions=i["audio_positions"])
    else:
        from diffusers import LTX2VideoTransformer3DModel

        model = LTX2VideoTransformer3DModel(**config().diffusers_kwargs())
        model.load_state_dict(official_to_diffusers(state), strict=True)
        model = model.to(device=device, dtype=dtype).eval()

        def call(i):
            t = i["sigma"] * 1000
            return model(i["video"], i["audio"], i["video_context"], i["audio_context"], timestep=t,
                         audio_timestep=t, sigma=t, audio_sigma=t, video_coords=i["video_positions"],
                         audio_coords=i["audio_positions"], use_cross_timestep=False, return_dict=False)
    del state
    page_in(model)
    return call


def worker(args) -> None:
    """Build one implementation and run :func:`_common.forward_worker` on it."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    call = build(args.worker, Path(args.weights), dtype, device)
    inputs = make_inputs(args, dtype, device)
    forward_worker(lambda: call(inputs), lambda out: torch.save([o.float().cpu() for o in out], args.out), device)


def worker_command(which: str, args, weights: Path, out: Path) -> tuple[str, list[str]]:
    """Name and command line of one implementation's worker subprocess."""
    return which, [sys.executable, __file__, "--worker", which, "--weights", str(weights), "--out", str(out),
                   "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                   "--batch", str(args.batch), "--frames", str(args.frames), "--height", str(args.height),
                   "--width", str(args.width), "--audio-tokens", str(audio_tokens(args)), "--text-len",
                   str(args.text_len)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--runs", type=int, default=15, help="timed forwards per implementation (after one warm-up)")
    p.add_argument("--memory-runs", type=int, default=3, help="forwards per implementation measuring the peak memory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=4, help="latent frames F'")
    p.add_argument("--height", type=int, default=16, help="latent height H' (pixels / 32)")
    p.add_argument("--width", type=int, default=24, help="latent width W' (pixels / 32)")
    p.add_argument("--audio-tokens", type=int, default=0, help="audio latents (0: the clip's duration at 25/s)")
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    video_tokens = args.frames * args.height * args.width
    print(f"LTX-2 DiT forward, {MEDIUM}, batch {args.batch}, {video_tokens} video tokens "
          f"({args.frames}x{args.height}x{args.width}) + {audio_tokens(args)} audio tokens + {args.text_len} text "
          f"tokens per modality, {args.dtype} on {args.device}, {args.threads} threads, {args.runs} timed and "
          f"{args.memory_runs} memory forwards each after 1 warm-up, interleaved")
    names = ("ours", "diffusers")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "ltx2_bench.safetensors"
        make_weights(weights)
        commands = {n: worker_command(n, args, weights, tmp / f"{n}.pt") for n in names}
        workers = run_interleaved(commands, args.runs, "run", env=TIME_ENV)
        memory_workers = run_interleaved(commands, args.memory_runs, "run", env=WORKER_ENV)
        outs = {n: torch.load(tmp / f"{n}.pt") for n in names}

    print_forward_ratios(workers, memory_workers, names)
    print(f"  output relative difference ours vs diffusers: video {rel(outs['ours'][0], outs['diffusers'][0]):.2e}, "
          f"audio {rel(outs['ours'][1], outs['diffusers'][1]):.2e}")


if __name__ == "__main__":
    main()
