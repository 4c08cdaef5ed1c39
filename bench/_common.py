"""Helpers shared by the benchmarks.

- the medium Kandinsky 5 config (:data:`DIMS`) and its random weights in the official layout (:func:`make_weights`);
  diffusers' ``Kandinsky5Transformer3DModel`` on the same weights and a call in our latent layout;
- per-process memory measurement: :func:`memory_mark` resets the peak counter and returns the memory in use,
  :func:`memory_peak` returns the peak since the mark. On CPU this is Linux ``VmRSS`` / ``VmHWM`` (high-water mark
  reset through ``/proc/self/clear_refs`` ← 5); without ``/proc`` the ``ru_maxrss`` since the start of the process
  (an upper bound). On CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated``;
- :data:`WORKER_ENV`: the environment of the memory-measuring subprocesses. glibc's mmap threshold is pinned to
  64 KiB so freed tensors go back to the OS at once and RSS follows live tensor memory rather than allocator
  retention. Every tensor above 64 KiB is then freshly mapped and zero-filled by the kernel on first touch, which
  costs time in proportion to the allocations (it made the LTX-2 training step 1.2× slower for ours and 1.6× for
  diffusers + PEFT), so timings taken there measure the allocator as much as the computation; :data:`TIME_ENV`
  (glibc's default, adaptive threshold, as in any training process) is the environment for timing;
- the interleaved subprocess harness: each measured variant runs in its own process (:class:`Worker`, fresh
  allocator, no shared caches), built and warmed up one after the other, then driven one request per variant per
  cycle with the order reversed every other cycle (:func:`run_interleaved`), so load from other processes hits the
  variants of a comparison alike; a worker answers each request with one JSON line (:func:`reply`);
- the DiT forward benchmarks' shared parts: the worker's forward loop (:func:`forward_worker`) and the report
  (:func:`print_forward_ratios`);
- the LoRA training-step benchmarks' shared parts: the adapters both sides start from (:func:`lora_down_init`), the
  worker's step loop (:func:`train_step_worker`) and the report (:func:`print_train_step_ratios`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

DIMS = dict(model_dim=256, ff_dim=1024, time_dim=128, num_text_blocks=1, num_visual_blocks=4, axes_dims=(8, 12, 12))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: LoRA rank and alpha of the training-step benchmarks.
RANK = 16
ALPHA = 16.0
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
TIME_ENV = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}


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


# ---------------------------------------------------------------------------------------------------------------
# Interleaved subprocess workers


def reply(obj: dict) -> None:
    """Worker side: answer one request with one JSON line on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    """One measured variant in its own subprocess, driven request by request.

    The process runs ``cmd`` (a benchmark script in worker mode) with ``env`` (:data:`WORKER_ENV` to measure memory,
    :data:`TIME_ENV` to time); its first JSON line (after building and warming up) is kept as :attr:`info`, and each
    :meth:`request` writes one command line to its stdin and appends the JSON line it answers to :attr:`replies`.
    Any other line ends the worker (:meth:`close`).

    Raises:
        SystemExit: the worker died or exited with an error (its stderr is in the message).
    """

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str] = WORKER_ENV) -> None:
        self.name = name
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=dict(env))
        self.info = self._read()
        self.replies: list[dict] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} failed:\n{self.proc.stderr.read()}")
        return json.loads(line)

    def request(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        self.replies.append(self._read())
        return self.replies[-1]

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise SystemExit(f"worker {self.name} failed:\n{self.proc.stderr.read()}")


def run_interleaved(commands: Mapping[Hashable, tuple[str, Sequence[str]]], runs: int, request: str,
                    env: Mapping[str, str] = WORKER_ENV) -> dict[Hashable, Worker]:
    """Start one :class:`Worker` per variant (``{key: (name, cmd)}``, environment ``env``), one after the other so
    builds and warm-ups never overlap, then ``runs`` cycles of one ``request`` each, the order reversed every other
    cycle; every worker is closed (it saves its outputs on ``quit``). Returns the workers with their replies."""
    keys = list(commands)
    workers: dict[Hashable, Worker] = {}
    try:
        for key in keys:
            workers[key] = Worker(*commands[key], env=env)
        for i in range(runs):
            for key in (keys if i % 2 == 0 else keys[::-1]):
                workers[key].request(request)
    finally:
        for w in workers.values():
            w.close()
    return workers


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method); both the value itself for a single value."""
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference ``‖a − b‖ / ‖b‖``."""
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# DiT forward benchmarks


def forward_worker(call: Callable[[], Any], save: Callable[[Any], None], device: torch.device) -> None:
    """Worker side of a forward benchmark, under ``torch.inference_mode``: one warm-up forward (one-time lazy
    initialisation, not measured; answered with ``{"ready": true}``), then one measured forward per ``run`` line on
    stdin, answered with its wall time and the process's CPU time in s and its peak extra memory in bytes (over what
    is resident before it: weights, inputs); ``quit`` hands the last output to ``save`` and returns."""
    with torch.inference_mode():
        out = call()
        synchronize(device)
        reply({"ready": True})
        for line in sys.stdin:
            if line.strip() != "run":
                break
            del out
            base = memory_mark(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = call()
            synchronize(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            reply({"s": elapsed, "cpu_s": cpu, "peak_bytes": memory_peak(device) - base})
    save(out)


def print_forward_ratios(time_workers: Mapping[str, Worker], memory_workers: Mapping[str, Worker],
                         names: Sequence[str]) -> None:
    """The report of a forward benchmark of ``names`` = (ours, reference): per side the median, quartiles and best
    forward time (``time_workers``, run with :data:`TIME_ENV`) and the peak extra memory (``memory_workers``, run with
    :data:`WORKER_ENV`); the ratios ours/reference: time as the median and quartiles of the per-cycle ratios and best
    over best, memory as largest peak over largest peak; then the CPU-time ratio and the time ratio of the memory
    workers (see :func:`print_train_step_ratios`)."""
    _print_pair([time_workers[n] for n in names], [memory_workers[n] for n in names], names, "forward", 9, "  ")


def _print_pair(time_workers: Sequence[Worker], memory_workers: Sequence[Worker], labels: Sequence[str], what: str,
                width: int, indent: str) -> None:
    """Per side (ours, reference) the median, quartiles and best time of ``what`` and the peak extra memory, then the
    ratios ours/reference (time: median and quartiles of the per-cycle ratios, best over best; memory: largest peak
    over largest peak) and :func:`_print_other_time_ratios`."""
    t = [[r["s"] for r in w.replies] for w in time_workers]
    peak = [max(r["peak_bytes"] for r in w.replies) for w in memory_workers]
    for times, top, label in zip(t, peak, labels):
        q1, q3 = quartiles(times)
        print(f"{indent}{label:{width}s} {what} time median {statistics.median(times) * 1000:7.1f} ms (quartiles "
              f"{q1 * 1000:.1f}-{q3 * 1000:.1f}, best {min(times) * 1000:.1f}), peak extra memory "
              f"{top / 2 ** 20:6.1f} MiB")
    med, lo, hi = _cycle_ratios(time_workers[0], time_workers[1], "s")
    print(f"{indent}ratio {labels[0]}/{labels[1]}: time {med:.3f}x (median of per-cycle "
          f"ratios, quartiles {lo:.3f}-{hi:.3f}), {min(t[0]) / min(t[1]):.3f}x (best)   memory "
          f"{peak[0] / max(peak[1], 1):.3f}x")
    _print_other_time_ratios(*time_workers, *memory_workers, indent)


# ---------------------------------------------------------------------------------------------------------------
# LoRA training-step benchmarks


def lora_down_init(name: str, in_features: int) -> torch.Tensor:
    """The shared initial ``lora_down`` / ``lora_A`` ``[RANK, in]`` of a layer: kaiming-uniform (a = √5), seeded by
    the layer name, so both sides get the same adapters whatever order they create them in."""
    seed = sum((i + 1) * ord(ch) for i, ch in enumerate(name))
    down = torch.empty(RANK, in_features)
    torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return down


def train_step_worker(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], ups: Mapping[str, torch.Tensor],
                      checkpointed_blocks: Sequence[torch.nn.Module], out: str, device: torch.device) -> None:
    """Worker side of a training-step benchmark: one warm-up step (lazy initialisation and the AdamW state, not
    measured; answered with the loss, the adapter layers and the trainable parameters), then one measured step per
    ``step`` line on stdin (answered with its wall time and the process's CPU time in s, its peak extra memory in
    bytes and its loss); ``quit``
    saves the warm-up step's ``lora_up`` / ``lora_B`` gradients to ``out`` and returns.

    A step is ``zero_grad``, ``loss_fn()``, backward, ``AdamW.step`` with the ``TrainConfig`` defaults,
    ``zero_grad``. ``checkpointed_blocks``: blocks to run under the trainer's ``gradient_checkpointing`` (empty:
    none; the reference enables its own checkpointing before)."""
    from cinetune.training.trainer import TrainConfig, gradient_checkpointing

    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)

    def step(keep_grads: bool = False):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grads = {name: p.grad.detach().clone().cpu() for name, p in ups.items()} if keep_grads else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    ckpt = gradient_checkpointing(list(checkpointed_blocks), enabled=bool(checkpointed_blocks))
    with torch.inference_mode(False), torch.enable_grad(), ckpt:
        loss, grads = step(keep_grads=True)
        synchronize(device)
        reply({"loss": loss, "layers": len(ups), "trainable": sum(p.numel() for p in params)})
        for line in sys.stdin:
            if line.strip() != "step":
                break
            base = memory_mark(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss, _ = step()
            synchronize(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            reply({"s": elapsed, "cpu_s": cpu, "peak_bytes": memory_peak(device) - base, "loss": loss})
    torch.save(grads, out)


def _cycle_ratios(ours: Worker, reference: Worker, key: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-cycle ratios ours/reference of the replies' ``key``."""
    ratios = [a[key] / b[key] for a, b in zip(ours.replies, reference.replies)]  # adjacent steps of one cycle
    return (statistics.median(ratios), *quartiles(ratios))


def print_train_step_ratios(time_workers: Mapping[tuple[str, bool], Worker],
                            memory_workers: Mapping[tuple[str, bool], Worker], label: Mapping[str, str]) -> None:
    """The report of a training-step benchmark, for workers keyed ``(impl, checkpointing)`` with impl ``"ours"`` /
    ``"diffusers"``: per checkpointing setting the median, quartiles and best step time (``time_workers``, run with
    :data:`TIME_ENV`) and the peak extra memory (``memory_workers``, run with :data:`WORKER_ENV`) of each side, and
    the ratios ours/reference: time as the median and quartiles of the per-cycle ratios and best over best, memory
    as largest peak over largest peak. Two more time ratios follow: the processes' CPU times (on a machine shared
    with other jobs a descheduled thread stalls a parallel region's wall time but adds little CPU time, so it is the
    steadier of the two; it also counts the threads' busy-waiting), and the wall times of the memory workers, where
    every large tensor is freshly mapped and zero-filled (allocation-bound; the method of earlier entries)."""
    ref = label["diffusers"]
    for ckpt in (False, True):
        sides = [("ours", ckpt), ("diffusers", ckpt)]
        print(f"  gradient checkpointing {'on ' if ckpt else 'off'}:")
        _print_pair([time_workers[v] for v in sides], [memory_workers[v] for v in sides],
                    [label["ours"], ref], "step", 15, "    ")


def run_train_step_variants(variants: Sequence[tuple[str, bool]], make_weights: Callable[[Path], None], name: str,
                            command: Callable[..., tuple[str, list[str]]], runs: int, memory_runs: int,
                            label: Mapping[str, str]):
    """Run a training-step benchmark's variants ``(impl, checkpointing)`` in worker subprocesses on one weights file
    (``make_weights(path)``, in a temporary folder): ``runs`` interleaved timed steps (:data:`TIME_ENV`), then
    ``memory_runs`` steps in fresh workers (:data:`WORKER_ENV`). ``command(impl, checkpointing, weights, out)``
    gives a worker's name and command line; the worker saves its first-step gradients to ``out``. Prints the
    trainable layer and parameter counts of both sides, :func:`print_train_step_ratios` and
    :func:`print_first_step` (``label``: impl → printed name); returns the time workers, keyed by variant."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / f"{name}.safetensors"
        make_weights(weights)
        outs = {v: tmp / f"{v[0]}_{v[1]}.pt" for v in variants}
        commands = {v: command(*v, weights, outs[v]) for v in variants}
        workers = run_interleaved(commands, runs, "step", env=TIME_ENV)
        grads = {v: torch.load(outs[v]) for v in variants}
        memory_workers = run_interleaved(commands, memory_runs, "step", env=WORKER_ENV)
    ours, ref = workers["ours", False].info, workers["diffusers", False].info
    print(f"  trainable: ours {ours['layers']} layers / {ours['trainable']} parameters, diffusers+peft "
          f"{ref['layers']} layers / {ref['trainable']} parameters")
    print_train_step_ratios(workers, memory_workers, label)
    print_first_step(workers, grads, label)
    return workers


def print_first_step(workers: Mapping[tuple[str, bool], Worker], grads: Mapping[tuple[str, bool], dict],
                     label: Mapping[str, str]) -> None:
    """The initial loss of every variant (zero ``lora_up``: the base model's) and the relative difference of the
    first-step ``lora_up``/``lora_B`` gradients ours vs the reference, with checkpointing off and on."""
    variants = list(workers)
    print("  initial loss (zero lora_up/lora_B, i.e. the base model): " + ", ".join(
        f"{label[w]} ckpt {'on' if c else 'off'} {workers[w, c].info['loss']:.7f}" for w, c in variants))
    flat = {v: torch.cat([grads[v][k].flatten() for k in sorted(grads[v])]) for v in variants}
    print(f"  first-step lora_up/lora_B gradients, relative difference ours vs diffusers+peft: "
          f"{rel(flat['ours', False], flat['diffusers', False]):.2e} (checkpointing off), "
          f"{rel(flat['ours', True], flat['diffusers', True]):.2e} (on)")


def _print_other_time_ratios(ours: Worker, reference: Worker, ours_memory: Worker, reference_memory: Worker,
                             indent: str = "  ") -> None:
    """The CPU-time ratio of the timing workers and the wall-time ratio of the memory workers, one line."""
    med, lo, hi = _cycle_ratios(ours, reference, "cpu_s")
    line = f"{indent}CPU time ratio {med:.3f}x (quartiles {lo:.3f}-{hi:.3f}); "
    med, lo, hi = _cycle_ratios(ours_memory, reference_memory, "s")
    print(line + f"time ratio with the 64 KiB mmap threshold {med:.3f}x (quartiles {lo:.3f}-{hi:.3f})")
