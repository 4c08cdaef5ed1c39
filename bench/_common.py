"""Helpers shared by the Kandinsky 5 benchmarks (``bench_k5_dit.py``, ``bench_k5_train_step.py``).

- the medium benchmark config (:data:`DIMS`) and its random weights in the official layout (:func:`make_weights`);
- diffusers' ``Kandinsky5Transformer3DModel`` on the same weights and a call in our latent layout;
- per-process memory measurement: :func:`memory_mark` resets the peak counter and returns the memory in use,
  :func:`memory_peak` returns the peak since the mark. On CPU this is Linux ``VmRSS`` / ``VmHWM`` (high-water mark
  reset through ``/proc/self/clear_refs`` ← 5); without ``/proc`` the ``ru_maxrss`` since the start of the process
  (an upper bound). On CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated``;
- :data:`WORKER_ENV`: the environment of the measuring subprocesses. glibc's mmap threshold is pinned to 64 KiB so
  freed tensors go back to the OS at once and RSS follows live tensor memory rather than allocator retention.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

DIMS = dict(model_dim=256, ff_dim=1024, time_dim=128, num_text_blocks=1, num_visual_blocks=4, axes_dims=(8, 12, 12))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def make_weights(path: Path) -> None:
    """Random weights of the :data:`DIMS` DiT (33 input channels) in the official layout, saved to ``path``."""
    from cinetune.core.checkpoint import save_file_atomic
    from cinetune.k5.config import K5Config
    from cinetune.k5.dit import Kandinsky5DiT

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Kandinsky5DiT(K5Config(**DIMS)).state_dict().items()}
    sd = {k: (1.0 if k.endswith("norm.weight") else 0.0) + torch.randn(s, generator=g) / s[-1] ** 0.5
          for k, s in shapes.items()}
    save_file_atomic(sd, path)


def page_in(model: torch.nn.Module) -> None:
    """Touch every parameter, so weights still backed by the file's memory map are resident before measuring."""
    for p in model.parameters():
        p.float().sum()


def load_diffusers_k5(weights: Path, dtype: torch.dtype, device: torch.device):
    """diffusers ``Kandinsky5Transformer3DModel`` of :data:`DIMS` with the weights of ``weights`` (eval mode)."""
    from diffusers import Kandinsky5Transformer3DModel
    from safetensors.torch import load_file

    model = Kandinsky5Transformer3DModel(in_visual_dim=16, out_visual_dim=16, visual_cond=True, **DIMS)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    for name, module in model.named_modules():  # as from_pretrained(torch_dtype=...) does
        if set(name.split(".")) & set(model._keep_in_fp32_modules):
            module.float()
    return model


def diffusers_forward(model, x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0)):
    """Call the diffusers model with our layout: x ``[B, C, T, H, W]`` → velocity ``[B, 16, T, H, W]``."""
    T, H, W = x.shape[2:]
    out = model(x.permute(0, 2, 3, 4, 1), text, t, pooled,
                visual_rope_pos=[torch.arange(T, device=x.device), torch.arange(H // 2, device=x.device),
                                 torch.arange(W // 2, device=x.device)],
                text_rope_pos=torch.arange(text.shape[1], device=x.device), scale_factor=tuple(rope_scale),
                return_dict=False)
    return out.permute(0, 4, 1, 2, 3)


def _proc_status() -> dict[str, int] | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM") if k in fields}


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op elsewhere. Call around every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mark(device: torch.device) -> int:
    """Reset the peak counter; return the memory in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if _reset_peak_rss() and (status := _proc_status()):
        return status["VmRSS"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no reset possible: peak since start


def memory_peak(device: torch.device) -> int:
    """The peak memory (bytes) since the last :func:`memory_mark`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = _proc_status()
    return status["VmHWM"] if status else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_size_arguments(parser, dtypes) -> None:
    """The command-line options both K5 benchmarks share: device, dtype, threads, latent size, text length, and
    the hidden options of a worker subprocess."""
    import argparse

    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(dtypes), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--height", type=int, default=48, help="latent height (pixels / 8)")
    parser.add_argument("--width", type=int, default=64, help="latent width (pixels / 8)")
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
