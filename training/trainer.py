"""The Kandinsky 5 LoRA training loop: one call runs (or resumes) a whole run.

::

    samples = samples_from_cache(load_cached_dataset(...))          # or MemorySample(...) objects
    empty = empty_texts_from_cache(samples, cache_dir, encoder_id)    # caption dropout only
    result = train_lora(dit, samples, empty, TrainConfig(rank=16, max_steps=2000), "runs/my_lora",
                        device="cuda", resume=True, on_event=print, check_interrupt=host.check_interrupt)
    result.lora_path   # runs/my_lora/lora.safetensors, loads in ComfyUI's LoraLoaderModelOnly

Objective (reference k5.md §8; kandinskylab/kandinsky-5 LoRA training, kohya-ss/musubi-tuner
``kandinsky5_train_network.py``; Liu et al. 2022, arXiv:2209.03003): per sample one σ, ``x0 = latent ×
SCALING_FACTOR`` (latents are cached raw, as the official trainer does), ε ~ N(0, I),
``x_σ = (1 − σ)·x0 + σ·ε``, target ``v = ε − x0``, ``loss = mean((pred − v)²)`` in float32 over every element of
the batch (all channels and frames). The DiT gets ``timestep = 1000·σ`` (official; musubi-tuner adds 1, not
done here).

σ sampling (``timestep_sampling``), always followed by the flow shift ``σ' = kσ / (1 + (k − 1)σ)`` with
k = ``flow_shift`` (:func:`~cinetune.core.flow.shift_sigmas`):

- ``"shift"`` (musubi-tuner ``--timestep_sampling shift``): ``σ = sigmoid(sigmoid_scale · n)``, n ~ N(0, 1).
- ``"logit_normal"`` (official): ``σ = sigmoid(n)`` (:func:`~cinetune.core.flow.logit_normal_sigmas`); the
  official LoRA example shifts with ``scheduler_scale`` 5.0, the default ``flow_shift`` here.
- ``"uniform"``: σ ~ U[0, 1).

Model input (33 channels, noisy 16 | conditioning 16 | mask 1): text-to-video has conditioning and mask 0.
Image-to-video training follows the official ``add_visual_cond`` (k5.md §8): with probability ``i2v_prob`` per
sample the clean first-frame latent (model space) goes into the conditioning channels of latent frame 0 and the
mask is 1 there; ``"first_last"`` also puts the last-frame latent into frame −1 (mask 1 there, as musubi-tuner's
``first_last`` mode). ``x_σ`` stays noisy at every frame and the loss covers all frames, the conditioned ones
included, as in both trainers. DiTs without conditioning channels (text-to-image) get the noisy latent alone.

Decisions (where the sources leave a choice):

- **Randomness.** Everything random — LoRA init (kaiming-uniform of ``lora_down``), the epoch orders, σ, ε, the
  image-to-video and caption-dropout draws — comes from one CPU ``torch.Generator`` seeded with ``config.seed`` and
  saved in every checkpoint, so a run is reproducible on any device and a resumed run continues exactly. Per
  micro-batch of B samples the draws are, in order: B σ-draws, ε with the latent's shape (float32), B uniforms for
  image-to-video (only when ``i2v`` is not ``"off"``), B uniforms for caption dropout (only when it is > 0). Noise is
  drawn on the CPU and moved to the device. The global torch/NumPy/Python RNG states are saved and restored too,
  but the loop does not use them.
- **Epochs and batches.** An epoch is one pass over the *repeated* sample list (sample i listed ``repeats`` times).
  Its order is a ``torch.randperm`` of that list; walking it, samples go into one pending batch per (bucket,
  frames) and a batch is emitted when it holds ``batch_size`` samples, so a batch never mixes sizes. Leftover partial
  batches are emitted at the end of the epoch (every sample is seen once per repeat per epoch). An optimizer step
  accumulates the next ``grad_accum`` batches of the current epoch; the last step of an epoch may have fewer (the
  window never crosses an epoch). Each micro-batch weighs equally (its mean loss / number of micro-batches in the
  window, as accelerate/kohya). With ``epochs > 0`` the run has ``epochs × ceil(batches per epoch / grad_accum)``
  steps and ``max_steps`` is ignored.
- **Image-to-video details.** ``i2v_prob`` defaults to 1.0 (a dedicated I2V LoRA on an I2V checkpoint); the
  official trainer uses ``visual_cond_prob`` 0.2 to keep a T2V model able to do both. A sample without ``first``
  uses its own latent frame 0, which is the first frame encoded alone (the VAE is causal); ``first_last`` needs a
  ``last`` latent. One-latent-frame samples (images) are never conditioned (their only frame would be the answer).
  Official *inference* puts the image into the noisy channels instead (see docs/decisions.md); training follows
  the official trainer.
- **Caption dropout** replaces text and pooled embedding by the cached *empty caption* (encoded ``""``, per Qwen
  template when a mapping is given), not zeros: the official config points at a precomputed null-text embedding,
  whose exact form is unverified (k5.md §5).
- **Interrupt and errors.** ``check_interrupt()`` runs before every optimizer step. When it — or anything else in
  the loop (validation, an event handler, a non-finite loss, out-of-memory) — raises, the last consistent state is
  saved as a resumable checkpoint (the LoRA and optimizer as after the last finished step, the generator as
  before the failed one) and as ``run_dir/lora.safetensors``; then the caller's exception is re-raised unchanged
  (so ComfyUI's own interrupt exception reaches ComfyUI), with a note naming the checkpoint. An exception inside
  ``optimizer.step()`` itself saves nothing (the parameters may be half-updated); the previous checkpoint stays.
  A non-finite loss or gradient norm raises :class:`TrainingError` before the update.
- **Checkpoints** ``run_dir/checkpoints/step_NNNNNN/``: ``lora.safetensors`` (Cinetune/ComfyUI layout, in
  ``lora_dtype`` so resume is exact, with the run's metadata, usable as a LoRA as is) and ``state.pt`` (optimizer,
  scheduler, step, epoch, position and order of the epoch, generator, global RNG states, loss history, config,
  model/LoRA fingerprint; loaded with ``torch.load(weights_only=True)``). A checkpoint is written into a temporary
  folder and renamed into place, so every ``step_*`` folder is complete. The newest ``keep_checkpoints`` are kept
  (0 keeps all). ``run_dir/run.json`` holds the config and metadata of the latest start. The final LoRA
  ``run_dir/lora.safetensors`` is written in ``save_dtype`` (bf16 by default: half the size of fp32) at the end and
  at an interruption (then with metadata ``cinetune.complete = "false"``).
- **Resume.** ``resume=True`` continues from the newest checkpoint in ``run_dir`` (a fresh start when there is
  none); a path resumes from that checkpoint folder or run folder. ``resume=False`` on a folder that already holds
  checkpoints raises instead of overwriting them. The resumed run takes learning rate, schedule and step count from
  the *current* config (so a run can be extended); rank, alpha, targets, model and optimizer type must match the
  checkpoint (:class:`ResumeError` says which and how to fix it). If the sample list changed, the saved epoch order
  is dropped and a new epoch begins (a warning says so).
- **Gradient checkpointing** wraps each text and visual block call — forward hooks included, so block swap
  reloads weights during the recomputation — in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` by
  giving the block object a subclass whose ``__call__`` does that, for the duration of the run (names, state dict
  and parameters are unchanged). It is the official/musubi granularity (one checkpoint per block).
- **The model is restored** on return, success or not: LoRA layers removed, block classes, ``requires_grad`` flags
  and train/eval mode as before. Training runs with ``torch.inference_mode(False)`` and grad enabled (ComfyUI
  executes nodes in inference mode); the model's weights must not be inference tensors.
- **Events**: ``loss_ema`` is the bias-corrected exponential moving average of the step losses,
  ``m_n = β·m_{n−1} + (1 − β)·loss_n``, ``m_0 = 0``, reported as ``m_n / (1 − βⁿ)`` with β = 0.9 (Kingma & Ba 2015,
  arXiv:1412.6980 §3) over the whole run, resumed runs included (so the first value is the first loss).
  ``steps_per_s`` is the steps of this call over its wall time so far, ``eta_s`` the remaining steps at that rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core.attention import check_backend
from ..core.checkpoint import atomic_path, write_json_atomic
from ..core.flow import add_noise, logit_normal_sigmas, shift_sigmas, velocity_target
from ..core.lora import LoRALinear, guess_model_family, inject_lora, load_lora, remove_lora, save_lora
from ..k5.family import K5_BLOCK_PREFIXES, K5_LORA_TARGETS
from ..k5.nabla import NablaConfig, check_nabla_grid
from ..k5.vae import SCALING_FACTOR
from .schedules import LR_SCHEDULES, OPTIMIZERS, lr_multiplier, make_optimizer, make_scheduler

__all__ = [
    "TrainSample", "MemorySample", "CachedTrainSample", "samples_from_cache", "empty_texts_from_cache",
    "TrainConfig", "TrainEvent", "TrainResult", "TrainingError", "ResumeError",
    "TIMESTEP_SAMPLING", "I2V_MODES", "LOSS_EMA_BETA",
    "sample_sigmas", "plan_epoch", "flow_matching_loss", "gradient_checkpointing", "list_checkpoints", "train_lora",
]

#: σ-sampling methods of :attr:`TrainConfig.timestep_sampling`.
TIMESTEP_SAMPLING: tuple[str, ...] = ("shift", "logit_normal", "uniform")
#: Image-to-video training modes of :attr:`TrainConfig.i2v`.
I2V_MODES: tuple[str, ...] = ("off", "first", "first_last")
#: β of the reported loss EMA.
LOSS_EMA_BETA = 0.9

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
LORA_FILE = "lora.safetensors"
RUN_FILE = "run.json"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


class TrainingError(ValueError):
    """Training cannot start or continue; the message says what is wrong and how to fix it."""


class ResumeError(TrainingError):
    """A checkpoint cannot be resumed by this run (other model, rank, alpha or optimizer, or an unreadable file)."""


# ---------------------------------------------------------------------------------------------------------------
# Samples


class TrainSample(Protocol):
    """What the trainer reads from a sample (duck-typed; :class:`MemorySample` and :class:`CachedTrainSample` fit).

    Attributes:
        latent: ``[16, T, h, w]`` float RAW VAE latent (not multiplied by ``SCALING_FACTOR``); h, w even.
        first, last: optional ``[16, 1, h, w]`` RAW latents of the first / last frame encoded alone (I2V).
        text: ``[L, D]`` float Qwen2.5-VL hidden states of the L valid tokens (L ≥ 1, no padding).
        pooled: ``[D2]`` float CLIP pooled embedding.
        bucket: ``(width, height)`` in pixels. frames: video frames of the clip (1 for images).
        item_id: a name for messages. repeats: how often the sample counts per epoch (≥ 1).
        template: optional Qwen template name (selects the empty caption when ``empty_text`` is a mapping).
    """

    latent: Tensor
    text: Tensor
    pooled: Tensor
    bucket: tuple[int, int]
    frames: int
    item_id: str
    repeats: int


@dataclass
class MemorySample:
    """An in-memory :class:`TrainSample` (tensors as described there)."""

    latent: Tensor
    text: Tensor
    pooled: Tensor
    bucket: tuple[int, int]
    frames: int
    item_id: str = "sample"
    repeats: int = 1
    first: Tensor | None = None
    last: Tensor | None = None
    template: str = "video"


_UNSET = object()


class CachedTrainSample:
    """Adapter from a :class:`cinetune.training.cache.CachedSample` to :class:`TrainSample`, reading on access.

    ``latent`` reads the latent file (``cache.read_latent``) each time and keeps only the small ``first``/``last``
    frames; ``text`` reads the text file (``cache.read_text``) and keeps only ``pooled``. So a dataset never sits in
    memory as a whole.

    Raises (on access):
        CacheError: a cache file is missing or damaged (from the cache module).
    """

    def __init__(self, cached: Any) -> None:
        self.cached = cached
        self.bucket = tuple(int(v) for v in cached.bucket)
        self.frames = int(cached.frames)
        self.item_id = str(cached.item_id)
        self.repeats = int(cached.repeats)
        self.template = str(getattr(cached, "template", "video"))
        self._first: Any = _UNSET
        self._last: Any = _UNSET
        self._pooled: Any = _UNSET

    def _read_latents(self) -> Tensor:
        from .cache import read_latent

        data = read_latent(self.cached)
        self._first, self._last = data.get("first"), data.get("last")
        return data["latent"]

    @property
    def latent(self) -> Tensor:
        return self._read_latents()

    @property
    def first(self) -> Tensor | None:
        if self._first is _UNSET:
            self._read_latents()
        return self._first

    @property
    def last(self) -> Tensor | None:
        if self._last is _UNSET:
            self._read_latents()
        return self._last

    @property
    def text(self) -> Tensor:
        from .cache import read_text

        text, self._pooled = read_text(self.cached.text_path)
        return text

    @property
    def pooled(self) -> Tensor:
        if self._pooled is _UNSET:
            self.text  # noqa: B018 - reads the file and keeps pooled
        return self._pooled

    def __repr__(self) -> str:
        return f"CachedTrainSample({self.item_id!r}, bucket={self.bucket}, frames={self.frames})"


def samples_from_cache(cached_samples: Iterable[Any]) -> list[CachedTrainSample]:
    """Wrap the ``CachedSample`` list of ``cache.load_cached_dataset`` for :func:`train_lora` (order kept)."""
    return [CachedTrainSample(c) for c in cached_samples]


def empty_texts_from_cache(samples: Iterable[Any], cache_dir: str | os.PathLike,
                           encoder_id: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The cached empty-caption embeddings ``{template: (text [L, D], pooled [D2])}`` for the templates the samples
    use (``cache.empty_text_path`` + ``cache.read_text``), for caption dropout.

    Raises:
        CacheError: an empty-caption entry is missing (run the text cacher).
    """
    from .cache import empty_text_path, read_text

    templates = sorted({str(getattr(s, "template", "video")) for s in samples}) or ["video"]
    return {t: read_text(empty_text_path(cache_dir, encoder_id, t)) for t in templates}


# ---------------------------------------------------------------------------------------------------------------
# Config, events, results


def _dtype(value: Any, name: str, allowed: Sequence[torch.dtype]) -> torch.dtype:
    dt = _DTYPES.get(value) if isinstance(value, str) else value
    if dt not in allowed:
        names = ", ".join(str(a).replace("torch.", "") for a in allowed)
        raise TrainingError(f"{name} must be one of {names}; got {value!r}.")
    return dt


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainingError(f"{name} must be an integer ≥ {low}; got {value!r}.")
    return value


def _number(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '≥'} {low:g}" + (f" and ≤ {high:g}" if high is not None else "")
        raise TrainingError(f"{name} must be a finite number {bound}; got {value!r}.")
    return float(value)


def _choice(name: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise TrainingError(f"{name} must be one of {', '.join(options)}; got {value!r}.")
    return value


@dataclass
class TrainConfig:
    """Settings of a LoRA training run (defaults: the official K5 LoRA example where it gives one, k5.md §8).

    Attributes:
        rank, alpha: LoRA rank and alpha (scale alpha/rank). targets: Linear-name suffixes inside the text/visual
            blocks (default :data:`~cinetune.k5.family.K5_LORA_TARGETS`, official/musubi).
        learning_rate, optimizer (``"adamw"``, ``"adamw8bit"``, ``"adafactor"``), weight_decay, betas, eps:
            see :mod:`cinetune.training.schedules`.
        lr_schedule: ``"constant"``, ``"constant_with_warmup"``, ``"cosine"``, ``"linear"``; warmup_steps: W.
        max_steps: optimizer steps of the run; epochs: > 0 runs that many epochs instead (see the module notes).
        batch_size: samples per micro-batch (same bucket and frame count); grad_accum: micro-batches per step.
        max_grad_norm: clip the global gradient L2 norm to this (0 = no clipping).
        timestep_sampling (``"shift"``, ``"logit_normal"``, ``"uniform"``), flow_shift (k), sigmoid_scale: σ
            sampling (module notes).
        gradient_checkpointing: per text/visual block. nabla: NABLA sparse attention or None (full attention).
        rope_scale: RoPE divisors (t, h, w); (1, 2, 2) for SD checkpoints. attention_backend: for dense attention.
        i2v: ``"off"``, ``"first"``, ``"first_last"``; i2v_prob: per-sample probability of conditioning (official
            mixed T2V/I2V training: 0.2). caption_dropout: per-sample probability of the empty caption.
        seed: seeds the trainer's generator. save_every: checkpoint every N steps (0 = only at the end or when
            interrupted). keep_checkpoints: newest checkpoints kept (0 = all).
        compute_dtype: dtype of the model input/activations (bf16; fp32 for exact tests). lora_dtype: dtype of the
            trainable LoRA parameters and of checkpoint LoRAs. save_dtype: dtype of ``run_dir/lora.safetensors``.
        Dtypes may be given as torch dtypes or as "fp32"/"bf16"/"fp16".

    Raises:
        TrainingError: a value out of range or an unknown option (the message lists the valid ones); ``warmup_steps``
            with the ``"constant"`` schedule (use ``"constant_with_warmup"``).
    """

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = K5_LORA_TARGETS
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.001
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_steps: int = 1000
    epochs: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    timestep_sampling: str = "shift"
    flow_shift: float = 5.0
    sigmoid_scale: float = 1.0
    gradient_checkpointing: bool = True
    nabla: NablaConfig | None = None
    rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0)
    attention_backend: str = "sdpa"
    i2v: str = "off"
    i2v_prob: float = 1.0
    caption_dropout: float = 0.0
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 3
    compute_dtype: torch.dtype = torch.bfloat16
    lora_dtype: torch.dtype = torch.float32
    save_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        _int("rank", self.rank, 1)
        self.alpha = _number("alpha", self.alpha, 0.0, low_open=True)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise TrainingError(f"targets must be non-empty module-name suffixes such as {K5_LORA_TARGETS[:2]}; "
                                f"got {self.targets!r}.")
        self.targets = targets
        self.learning_rate = _number("learning_rate", self.learning_rate, 0.0, low_open=True)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        self.weight_decay = _number("weight_decay", self.weight_decay, 0.0)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise TrainingError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.95); got {self.betas!r}.")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _number("eps", self.eps, 0.0, low_open=True)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _int("warmup_steps", self.warmup_steps, 0)
        if self.lr_schedule == "constant" and self.warmup_steps:
            raise TrainingError(f"warmup_steps={self.warmup_steps} has no effect with lr_schedule 'constant'; "
                                "use 'constant_with_warmup' (or 'cosine'/'linear'), or set warmup_steps to 0.")
        _int("max_steps", self.max_steps, 1)
        _int("epochs", self.epochs, 0)
        _int("batch_size", self.batch_size, 1)
        _int("grad_accum", self.grad_accum, 1)
        self.max_grad_norm = _number("max_grad_norm", self.max_grad_norm, 0.0)
        _choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        self.flow_shift = _number("flow_shift", self.flow_shift, 0.0, low_open=True)
        self.sigmoid_scale = _number("sigmoid_scale", self.sigmoid_scale, 0.0, low_open=True)
        self.gradient_checkpointing = bool(self.gradient_checkpointing)
        if self.nabla is not None and not isinstance(self.nabla, NablaConfig):
            raise TrainingError(f"nabla must be a NablaConfig or None; got {type(self.nabla).__name__}.")
        try:
            scale = tuple(float(s) for s in self.rope_scale)
        except (TypeError, ValueError):
            scale = ()
        if len(scale) != 3 or not all(math.isfinite(s) and s > 0 for s in scale):
            raise TrainingError(f"rope_scale must be three positive numbers (t, h, w), e.g. (1, 2, 2); "
                                f"got {self.rope_scale!r}.")
        self.rope_scale = scale
        if not isinstance(self.attention_backend, str):
            raise TrainingError(f"attention_backend must be a name such as 'sdpa'; got {self.attention_backend!r}.")
        _choice("i2v", self.i2v, I2V_MODES)
        self.i2v_prob = _number("i2v_prob", self.i2v_prob, 0.0, 1.0)
        self.caption_dropout = _number("caption_dropout", self.caption_dropout, 0.0, 1.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise TrainingError(f"seed must be an integer in [0, 2^63); got {self.seed!r}.")
        _int("save_every", self.save_every, 0)
        _int("keep_checkpoints", self.keep_checkpoints, 0)
        floats = (torch.float32, torch.bfloat16, torch.float16)
        self.compute_dtype = _dtype(self.compute_dtype, "compute_dtype", floats)
        self.lora_dtype = _dtype(self.lora_dtype, "lora_dtype", (torch.float32, torch.bfloat16))
        self.save_dtype = _dtype(self.save_dtype, "save_dtype", floats)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (dtypes as ``"bfloat16"`` etc., NABLA as a dict or None, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.dtype):
                v = str(v).replace("torch.", "")
            elif isinstance(v, NablaConfig):
                v = {"P": v.P, "window": list(v.window), "sta": v.sta}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


@dataclass
class TrainEvent:
    """Reported after every optimizer step.

    Attributes:
        step: optimizer steps done (1-based number of the step just taken). max_steps: total steps of the run.
        loss: this step's loss (mean over its micro-batches), float. loss_ema: bias-corrected EMA (module notes).
        lr: learning rate used by this step. steps_per_s, eta_s: speed of this call and remaining seconds.
        epoch: 1-based number of the epoch the step's batches came from.
    """

    step: int
    max_steps: int
    loss: float
    loss_ema: float
    lr: float
    steps_per_s: float
    eta_s: float
    epoch: int


@dataclass
class TrainResult:
    """What :func:`train_lora` returns.

    Attributes:
        lora_path: the final LoRA, ``run_dir/lora.safetensors`` (``save_dtype``, ComfyUI layout, with metadata).
        steps: optimizer steps done in the whole run. losses: per-step losses of the whole run (resumed ones too).
        checkpoint_dir: the checkpoint of the final step (``run_dir/checkpoints/step_NNNNNN``).
    """

    lora_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    checkpoint_dir: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the loop


def sample_sigmas(method: str, batch: int, *, flow_shift: float, sigmoid_scale: float = 1.0,
                  generator: torch.Generator) -> Tensor:
    """Training sigmas, one per sample (formulas in the module notes), from ``generator``.

    Args:
        method: one of :data:`TIMESTEP_SAMPLING`. batch: B ≥ 1. flow_shift: k > 0. sigmoid_scale: > 0 ("shift").
        generator: a CPU ``torch.Generator`` (consumed: B normal or uniform draws).

    Returns:
        ``[B]`` float32 on the CPU, in [0, 1).

    Raises:
        TrainingError: unknown method. ValueError: bad batch or shift (from :mod:`cinetune.core.flow`).
    """
    _choice("timestep_sampling", method, TIMESTEP_SAMPLING)
    if method == "logit_normal":
        return logit_normal_sigmas(batch, shift=flow_shift, generator=generator)
    if method == "shift":
        sigma = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator, dtype=torch.float32))
    else:
        sigma = torch.rand(batch, generator=generator, dtype=torch.float32)
    return shift_sigmas(sigma, flow_shift)


def plan_epoch(keys: Sequence[Hashable], repeats: Sequence[int], batch_size: int,
               generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches of sample indices (algorithm in the module notes).

    Args:
        keys: per sample, its group (bucket, frames): only equal keys share a batch.
        repeats: per sample, how often it appears in the epoch (≥ 1).
        batch_size: ≥ 1. generator: CPU generator (one ``randperm`` of the repeated list).

    Returns:
        Batches (lists of indices into ``keys``) in training order; full batches in the order they fill up, then the
        partial ones in the order of their first sample.
    """
    repeated = [i for i, r in enumerate(repeats) for _ in range(r)]
    order = torch.randperm(len(repeated), generator=generator).tolist()
    pending: dict[Hashable, list[int]] = {}
    batches: list[list[int]] = []
    for p in order:
        i = repeated[p]
        group = pending.setdefault(keys[i], [])
        group.append(i)
        if len(group) == batch_size:
            batches.append(pending.pop(keys[i]))
    batches.extend(pending.values())
    return batches


def _batches_per_epoch(keys: Sequence[Hashable], repeats: Sequence[int], batch_size: int) -> int:
    counts: dict[Hashable, int] = {}
    for k, r in zip(keys, repeats):
        counts[k] = counts.get(k, 0) + r
    return sum(math.ceil(n / batch_size) for n in counts.values())


def flow_matching_loss(model: nn.Module, x0: Tensor, noise: Tensor, sigma: Tensor, text: Tensor, pooled: Tensor, *,
                       text_mask: Tensor | None = None, cond: Tensor | None = None, mask: Tensor | None = None,
                       rope_scale: Sequence[float] = (1.0, 2.0, 2.0), attention_backend: str = "sdpa",
                       nabla: NablaConfig | None = None, compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """The training loss of one micro-batch: ``mean((model(x_σ) − (ε − x0))²)`` in float32.

    Args:
        model: the Kandinsky 5 DiT (with LoRA layers while training).
        x0: ``[B, 16, T, h, w]`` clean latent in MODEL space (raw × ``SCALING_FACTOR``), float32.
        noise: ε, same shape, float32. sigma: ``[B]`` float32 in [0, 1].
        text: ``[B, L, D]``; pooled ``[B, D2]``; text_mask: bool ``[B, L]`` (True = real token) or None.
        cond, mask: ``[B, 16, T, h, w]`` conditioning latent and ``[B, 1, T, h, w]`` mask for a DiT with
            conditioning channels (both or neither).
        rope_scale, attention_backend, nabla: passed to the DiT. compute_dtype: dtype of the DiT inputs.

    Returns:
        0-dim float32 loss (differentiable w.r.t. the trainable parameters). The DiT gets ``timestep = 1000·σ``.

    Raises:
        ValueError: shape mismatches (from :mod:`cinetune.core.flow` or the DiT); only one of cond/mask given.
    """
    if (cond is None) != (mask is None):
        raise ValueError("cond and mask go together: pass both (DiT with conditioning channels) or neither.")
    x_sigma = add_noise(x0, noise, sigma)
    target = velocity_target(x0, noise)
    x_in = x_sigma if cond is None else torch.cat([x_sigma, cond, mask], dim=1)
    pred = model(x_in.to(compute_dtype), text.to(compute_dtype), pooled.to(compute_dtype),
                 (1000.0 * sigma).float(), text_mask=text_mask, rope_scale=tuple(rope_scale),
                 attention_backend=attention_backend, nabla=nabla)
    return F.mse_loss(pred.float(), target.float())


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """A subclass of ``cls`` whose call (hooks and forward) runs under ``torch.utils.checkpoint``."""
    if cls not in _CHECKPOINTED:
        def __call__(self, *args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(cls.__call__, self, *args, use_reentrant=False, **kwargs)
            return cls.__call__(self, *args, **kwargs)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__,
                                                                           "__module__": __name__})
    return _CHECKPOINTED[cls]


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Checkpoint every block of ``model.text_transformer_blocks`` and ``model.visual_transformer_blocks`` while the
    context is open (activations of a block are recomputed in backward; only block inputs are kept).

    Each block keeps its identity, names and parameters; only its class is swapped for a subclass whose ``__call__``
    runs ``checkpoint(block.__call__, …, use_reentrant=False)`` when grad is enabled (so forward hooks, e.g. block
    swap, run inside the recomputation too), and restored on exit. Gradients equal those without checkpointing.

    Raises:
        TrainingError: the model has no such block lists.
    """
    if not enabled:
        yield
        return
    blocks = [b for name in ("text_transformer_blocks", "visual_transformer_blocks")
              for b in getattr(model, name, ())]
    if not blocks:
        raise TrainingError("gradient checkpointing needs a Kandinsky 5 DiT (text_transformer_blocks / "
                            "visual_transformer_blocks); turn gradient_checkpointing off for other models.")
    swapped = []
    try:
        for block in blocks:
            cls = type(block)
            if cls in _CHECKPOINTED.values():
                continue
            block.__class__ = _checkpointed_class(cls)
            swapped.append((block, cls))
        yield
    finally:
        for block, cls in swapped:
            block.__class__ = cls


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first: ``[(step, run_dir/checkpoints/step_NNNNNN), …]``
    (folders holding both ``state.pt`` and ``lora.safetensors``)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir() and (d / STATE_FILE).is_file() and (d / LORA_FILE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


# ---------------------------------------------------------------------------------------------------------------
# Files


def _global_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    out = {}
    for k, v in dict(metadata or {}).items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return out


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Snapshot:
    """The loop state at a step boundary (with the LoRA and optimizer as they are then)."""

    step: int
    epoch: int
    position: int
    order: list[list[int]] | None
    generator: Tensor
    rng: dict[str, Any]
    n_losses: int


def _tensor(sample: Any, name: str, required: bool) -> Tensor | None:
    t = getattr(sample, name, None)
    if t is None and required:
        raise TrainingError(f"sample {getattr(sample, 'item_id', '?')!r} has no {name!r} tensor.")
    if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
        raise TrainingError(f"sample {getattr(sample, 'item_id', '?')!r}: {name} must be a float tensor, got "
                            f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}.")
    return t


class _Run:
    """State and steps of one :func:`train_lora` call."""

    def __init__(self, model: nn.Module, samples: list, empty_text: Any, config: TrainConfig, run_dir: Path,
                 device: torch.device, metadata: Mapping[str, Any] | None) -> None:
        self.model, self.samples, self.config, self.run_dir, self.device = model, samples, config, run_dir, device
        self.cfg = getattr(model, "config", None)
        for attr in ("out_visual_dim", "in_text_dim", "in_text_dim2", "visual_cond", "patch_size"):
            if not hasattr(self.cfg, attr):
                raise TrainingError(f"train_lora trains a Kandinsky 5 DiT (Kandinsky5DiT with a K5Config); got a "
                                    f"{type(model).__name__} without config.{attr}.")
        self.user_metadata = _metadata_strings(metadata)
        for i, s in enumerate(samples):
            lacking = [a for a in ("latent", "text", "pooled", "bucket", "frames", "item_id")
                       if a not in getattr(s, "__dict__", {}) and not hasattr(type(s), a)]  # no property reads
            if lacking:
                raise TrainingError(f"sample {i} ({type(s).__name__}) lacks {', '.join(lacking)}; pass MemorySample "
                                    "objects or samples_from_cache(...) results.")
        self.keys = [(tuple(int(v) for v in s.bucket), int(s.frames)) for s in samples]
        self.repeats = [_int(f"repeats of sample {s.item_id!r}", getattr(s, "repeats", 1), 1) for s in samples]
        self.dataset_hash = hashlib.sha256(json.dumps(
            [[str(s.item_id), list(k[0]), k[1], r] for s, k, r in zip(samples, self.keys, self.repeats)]
        ).encode()).hexdigest()
        self.batches_per_epoch = _batches_per_epoch(self.keys, self.repeats, config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.max_steps = config.epochs * self.steps_per_epoch if config.epochs else config.max_steps
        self.empty = self._check_empty_text(empty_text)
        if config.i2v != "off" and not self.cfg.visual_cond:
            raise TrainingError(f"i2v={config.i2v!r} needs a DiT with conditioning channels (33 input channels); "
                                "this one is a text-to-image model. Set i2v to 'off'.")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.order: list[list[int]] | None = None
        self.losses: list[float] = []
        self.ema = 0.0
        self.modules: dict[str, LoRALinear] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # ----------------------------------------------------------------------------------------------- inputs

    def _check_empty_text(self, empty_text: Any) -> dict[str, tuple[Tensor, Tensor]] | None:
        if self.config.caption_dropout == 0:
            return None
        fix = ("caption_dropout needs the empty-caption embedding: pass empty_text=(text [L, D], pooled [D2]) of "
               "the encoded empty prompt \"\" (empty_texts_from_cache reads it from a text cache), or set "
               "caption_dropout to 0.")
        if empty_text is None:
            raise TrainingError(fix)
        pairs = dict(empty_text) if isinstance(empty_text, Mapping) else {None: empty_text}
        out = {}
        for template, pair in pairs.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TrainingError(fix)
            who = "empty caption" + ("" if template is None else f" (template {template})")
            out[template] = self._check_text(pair[0], pair[1], who)
        return out

    def _check_text(self, text: Any, pooled: Any, who: str) -> tuple[Tensor, Tensor]:
        D, D2 = self.cfg.in_text_dim, self.cfg.in_text_dim2
        if not isinstance(text, Tensor) or text.ndim != 2 or text.shape[0] < 1 or text.shape[1] != D:
            got = list(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise TrainingError(f"{who}: text embedding must be [L ≥ 1, {D}] (valid tokens of the text encoder this "
                                f"DiT uses), got {got}; re-cache the captions with the model's text encoder.")
        if isinstance(pooled, Tensor) and pooled.ndim == 2 and pooled.shape[0] == 1:
            pooled = pooled[0]
        if not isinstance(pooled, Tensor) or tuple(pooled.shape) != (D2,):
            got = list(pooled.shape) if isinstance(pooled, Tensor) else type(pooled).__name__
            raise TrainingError(f"{who}: pooled embedding must be [{D2}] (CLIP pooled output), got {got}; re-cache "
                                "the captions with the model's text encoder.")
        return text, pooled

    def _load_batch(self, idxs: list[int]) -> dict[str, Any]:
        """Tensors of one micro-batch (raw latents, texts) with shape checks naming the item."""
        C = self.cfg.out_visual_dim
        ph, pw = self.cfg.patch_size[1], self.cfg.patch_size[2]
        latents, firsts, lasts, texts, pooled, templates, ids = [], [], [], [], [], [], []
        for i in idxs:
            s = self.samples[i]
            who = f"sample {s.item_id!r}"
            lat = _tensor(s, "latent", True)
            if lat.ndim != 4 or lat.shape[0] != C or lat.shape[1] < 1:
                raise TrainingError(f"{who}: latent must be [{C}, T, h, w] (raw VAE latent), got {list(lat.shape)}.")
            if lat.shape[2] % ph or lat.shape[3] % pw:
                raise TrainingError(f"{who}: latent size {lat.shape[2]}×{lat.shape[3]} must be a multiple of "
                                    f"{ph}×{pw} (pixel sizes multiples of 16); re-cache with a bucket step of 16.")
            if latents and lat.shape != latents[0].shape:
                raise TrainingError(f"{who} and sample {ids[0]!r} share bucket {self.keys[i][0]} and "
                                    f"{self.keys[i][1]} frames but their latents differ ({list(lat.shape)} vs "
                                    f"{list(latents[0].shape)}); re-cache the dataset.")
            frame = (C, 1, lat.shape[2], lat.shape[3])
            first = last = None
            if self.config.i2v != "off" and lat.shape[1] > 1:
                first = _tensor(s, "first", False)
                if first is None:
                    first = lat[:, :1]
                if self.config.i2v == "first_last":
                    last = _tensor(s, "last", False)
                    if last is None:
                        raise TrainingError(f"{who} has no 'last' frame latent, which i2v='first_last' needs; "
                                            "re-cache the latents with image-to-video on, or set i2v to 'first'.")
                for name, t in (("first", first), ("last", last)):
                    if t is not None and tuple(t.shape) != frame:
                        raise TrainingError(f"{who}: {name} latent must be {list(frame)}, got {list(t.shape)}; "
                                            "re-cache the latents.")
            text, pool = self._check_text(_tensor(s, "text", True), _tensor(s, "pooled", True), who)
            latents.append(lat)
            firsts.append(first)
            lasts.append(last)
            texts.append(text)
            pooled.append(pool)
            templates.append(getattr(s, "template", None))
            ids.append(s.item_id)
        if self.config.nabla is not None:
            T, h, w = latents[0].shape[1:]
            try:
                check_nabla_grid(T, h // ph, w // pw)
            except ValueError as e:
                raise TrainingError(f"sample {ids[0]!r} (bucket {self.keys[idxs[0]][0]}): {e} Use NABLA-compatible "
                                    "buckets or turn NABLA off.") from e
        return {"latent": torch.stack([t.float() for t in latents]), "first": firsts, "last": lasts,
                "text": texts, "pooled": pooled, "template": templates, "ids": ids}

    def _empty_for(self, template: Any) -> tuple[Tensor, Tensor]:
        assert self.empty is not None
        if None in self.empty:
            return self.empty[None]
        if template in self.empty:
            return self.empty[template]
        raise TrainingError(f"no empty-caption embedding for Qwen template {template!r} (have "
                            f"{sorted(map(str, self.empty))}); cache the empty caption for it, or set "
                            "caption_dropout to 0.")

    def _micro_batch_loss(self, idxs: list[int]) -> Tensor:
        cfg, dev = self.config, self.device
        b = self._load_batch(idxs)
        B = len(idxs)
        latent = b["latent"]
        sigma = sample_sigmas(cfg.timestep_sampling, B, flow_shift=cfg.flow_shift, sigmoid_scale=cfg.sigmoid_scale,
                              generator=self.generator)
        noise = torch.randn(latent.shape, generator=self.generator, dtype=torch.float32)
        use_i2v = (torch.rand(B, generator=self.generator) < cfg.i2v_prob).tolist() if cfg.i2v != "off" else [False] * B
        drop = (torch.rand(B, generator=self.generator) < cfg.caption_dropout).tolist() \
            if cfg.caption_dropout > 0 else [False] * B

        x0 = latent * SCALING_FACTOR
        cond = mask = None
        if self.cfg.visual_cond:
            cond = torch.zeros_like(x0)
            mask = torch.zeros((B, 1, *x0.shape[2:]), dtype=torch.float32)
            for j in range(B):
                if use_i2v[j] and b["first"][j] is not None:
                    cond[j, :, :1] = b["first"][j].float() * SCALING_FACTOR
                    mask[j, :, 0] = 1.0
                    if b["last"][j] is not None:
                        cond[j, :, -1:] = b["last"][j].float() * SCALING_FACTOR
                        mask[j, :, -1] = 1.0
            cond, mask = cond.to(dev), mask.to(dev)

        texts, pooled = [], []
        for j in range(B):
            t, p = self._empty_for(b["template"][j]) if drop[j] else (b["text"][j], b["pooled"][j])
            texts.append(t)
            pooled.append(p)
        L, D = max(t.shape[0] for t in texts), texts[0].shape[1]
        text = torch.zeros(B, L, D, dtype=cfg.compute_dtype)
        text_mask = torch.zeros(B, L, dtype=torch.bool)
        for j, t in enumerate(texts):
            text[j, :t.shape[0]] = t.to(cfg.compute_dtype)
            text_mask[j, :t.shape[0]] = True
        text_mask = None if bool(text_mask.all()) else text_mask.to(dev)

        return flow_matching_loss(
            self.model, x0.to(dev), noise.to(dev), sigma.to(dev), text.to(dev),
            torch.stack([p.float() for p in pooled]).to(dev), text_mask=text_mask, cond=cond, mask=mask,
            rope_scale=cfg.rope_scale, attention_backend=cfg.attention_backend, nabla=cfg.nabla,
            compute_dtype=cfg.compute_dtype)

    # ----------------------------------------------------------------------------------------------- setup

    def preflight(self) -> None:
        """Check one sample of every (bucket, frames) group before anything is written."""
        seen: set = set()
        for i, key in enumerate(self.keys):
            if key not in seen:
                seen.add(key)
                self._load_batch([i])

    def setup(self) -> None:
        cfg = self.config
        self.modules = inject_lora(self.model, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                                   within=K5_BLOCK_PREFIXES, dtype=cfg.lora_dtype, generator=self.generator)
        self.params = [p for m in self.modules.values() for p in (m.lora_down, m.lora_up)]
        for p in self.params:  # under block swap a base weight may live in CPU memory; the adapter trains on device
            p.data = p.data.to(self.device)
        self.optimizer = make_optimizer(self.params, cfg.optimizer, lr=cfg.learning_rate,
                                        weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                                        max_steps=self.max_steps)

    def fingerprint(self) -> dict[str, Any]:
        return {"layers": {p: [m.in_features, m.out_features] for p, m in self.modules.items()},
                "rank": self.config.rank, "alpha": self.config.alpha, "optimizer": self.config.optimizer,
                "model": dataclasses.asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else None}

    def _sync_lr(self) -> None:
        """Point the schedule at this config's lr and step (after loading a checkpoint's scheduler state)."""
        s = self.scheduler
        lr = self.config.learning_rate * lr_multiplier(self.config.lr_schedule, s.last_epoch,
                                                       warmup_steps=self.config.warmup_steps,
                                                       max_steps=self.max_steps)
        s.base_lrs = [self.config.learning_rate] * len(self.optimizer.param_groups)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.config.learning_rate
            g["lr"] = lr
        s._last_lr = [lr] * len(self.optimizer.param_groups)

    def _check_fingerprint(self, ckpt: Path, saved: Mapping[str, Any]) -> None:
        cfg = self.config
        if saved.get("rank") != cfg.rank:
            raise ResumeError(f"Cannot resume from {ckpt}: it was trained with LoRA rank {saved.get('rank')}, this "
                              f"run asks for rank {cfg.rank}. Set rank to {saved.get('rank')} to continue it, or "
                              f"start a new run folder to train at rank {cfg.rank}.")
        if not math.isclose(float(saved.get("alpha", -1)), cfg.alpha):
            raise ResumeError(f"Cannot resume from {ckpt}: it was trained with LoRA alpha {saved.get('alpha'):g}, "
                              f"this run asks for {cfg.alpha:g}. Set alpha to {saved.get('alpha'):g} to continue "
                              "it, or start a new run folder.")
        mine, theirs = self.fingerprint()["layers"], dict(saved.get("layers", {}))
        only_ckpt = [p for p in theirs if p not in mine]
        only_here = [p for p in mine if p not in theirs]
        shapes = [f"{p} ({theirs[p][0]}→{theirs[p][1]} in the checkpoint, {mine[p][0]}→{mine[p][1]} here)"
                  for p in theirs if p in mine and list(theirs[p]) != list(mine[p])]
        if only_ckpt or only_here or shapes:
            parts = []
            if shapes:
                parts.append(f"{len(shapes)} LoRA layers have other shapes: {_first(shapes, 2)}")
            if only_ckpt:
                parts.append(f"{len(only_ckpt)} of its layers do not exist here: {_first(only_ckpt)}")
            if only_here:
                parts.append(f"{len(only_here)} layers of this model are not in it: {_first(only_here)}")
            raise ResumeError(f"Cannot resume from {ckpt}: it was trained on another model or with other LoRA "
                              f"targets — " + "; ".join(parts) + f". The checkpoint is for "
                              f"{guess_model_family(list(theirs))}. Load the model (and targets) it was trained "
                              "with, or start a new run folder.")
        if saved.get("optimizer") != cfg.optimizer:
            raise ResumeError(f"Cannot resume from {ckpt}: it was trained with the {saved.get('optimizer')!r} "
                              f"optimizer, this run asks for {cfg.optimizer!r} (optimizer states do not convert). "
                              f"Set optimizer to {saved.get('optimizer')!r}, or start a new run folder.")

    def load(self, ckpt: Path) -> None:
        """Restore everything from a checkpoint folder (after :meth:`setup`)."""
        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for damaged or foreign pickles
            raise ResumeError(f"Cannot read {ckpt / STATE_FILE} ({e}). Delete the folder {ckpt} to resume from the "
                              "checkpoint before it, or start a new run folder.") from e
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ResumeError(f"{ckpt / STATE_FILE} is not a Cinetune training state (format "
                              f"{state.get('format') if isinstance(state, dict) else '?'}); start a new run folder.")
        self._check_fingerprint(ckpt, state["fingerprint"])
        weights = load_lora(ckpt / LORA_FILE, module_names=list(self.modules))
        missing = [p for p in self.modules if p not in weights.layers]
        if missing:
            raise ResumeError(f"{ckpt / LORA_FILE} lacks {len(missing)} LoRA layers ({_first(missing)}); the "
                              "checkpoint is damaged. Delete that folder to resume from the previous checkpoint.")
        with torch.no_grad():
            for path, m in self.modules.items():
                down, up, _ = weights.layers[path]
                m.lora_down.copy_(down)
                m.lora_up.copy_(up)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._sync_lr()
        self.generator.set_state(state["generator"])
        _set_global_rng_state(state["rng"])
        self.step, self.epoch, self.position = int(state["step"]), int(state["epoch"]), int(state["position"])
        self.order = state["order"]
        self.losses = [float(x) for x in state["losses"]]
        self.ema = 0.0
        for loss in self.losses:
            self.ema = LOSS_EMA_BETA * self.ema + (1 - LOSS_EMA_BETA) * loss
        if state.get("dataset") != self.dataset_hash and self.order is not None:
            warnings.warn(f"The samples differ from those of {ckpt} (added, removed or reordered): the rest of "
                          f"epoch {self.epoch + 1} is skipped and a new epoch starts with the current samples.",
                          stacklevel=3)
            self.order, self.position, self.epoch = None, 0, self.epoch + 1

    # ----------------------------------------------------------------------------------------------- saving

    def snapshot(self) -> _Snapshot:
        # The order is replaced, never changed in place, so it needs no copy.
        return _Snapshot(self.step, self.epoch, self.position, self.order, self.generator.get_state(),
                         _global_rng_state(), len(self.losses))

    def lora_metadata(self, step: int, epoch: int, complete: bool) -> dict[str, str]:
        cfg = self.config
        meta = dict(self.user_metadata)
        meta.update({
            "cinetune.steps": str(step), "cinetune.max_steps": str(self.max_steps),
            "cinetune.complete": "true" if complete else "false",
            "cinetune.training": json.dumps(cfg.to_dict(), sort_keys=True),
            "ss_steps": str(step), "ss_epoch": str(epoch + 1), "ss_learning_rate": f"{cfg.learning_rate:g}",
            "ss_lr_scheduler": cfg.lr_schedule, "ss_optimizer": cfg.optimizer, "ss_seed": str(cfg.seed),
        })
        return meta

    def save_checkpoint(self, snap: _Snapshot) -> Path:
        """Write ``checkpoints/step_N`` from ``snap`` plus the current LoRA/optimizer/scheduler; prune old ones."""
        root = self.run_dir / CHECKPOINTS_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{snap.step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
        try:
            save_lora(tmp / LORA_FILE, self.modules, dtype=self.config.lora_dtype,
                      metadata=self.lora_metadata(snap.step, snap.epoch, snap.step >= self.max_steps))
            with atomic_path(tmp / STATE_FILE) as state_tmp:
                torch.save({
                    "format": STATE_FORMAT, "step": snap.step, "epoch": snap.epoch, "position": snap.position,
                    "order": snap.order, "generator": snap.generator, "rng": snap.rng,
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "losses": self.losses[:snap.n_losses], "config": self.config.to_dict(),
                    "fingerprint": self.fingerprint(), "dataset": self.dataset_hash,
                }, state_tmp)
            old = None
            if final.exists():
                old = root / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.config.keep_checkpoints:
            for _, d in list_checkpoints(self.run_dir)[:-self.config.keep_checkpoints]:
                if d != final:
                    shutil.rmtree(d, ignore_errors=True)
        return final

    def save_final_lora(self, snap: _Snapshot) -> Path:
        return save_lora(self.run_dir / LORA_FILE, self.modules, dtype=self.config.save_dtype,
                         metadata=self.lora_metadata(snap.step, snap.epoch, snap.step >= self.max_steps))

    def write_run_json(self, resumed_from: Path | None) -> None:
        write_json_atomic({
            "format": STATE_FORMAT, "config": self.config.to_dict(), "metadata": self.user_metadata,
            "max_steps": self.max_steps, "samples": len(self.samples), "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "dataset_hash": self.dataset_hash,
            "resumed_from": None if resumed_from is None else str(resumed_from), "resumed_at_step": self.step,
        }, self.run_dir / RUN_FILE)

    # ----------------------------------------------------------------------------------------------- stepping

    def next_window(self) -> list[list[int]]:
        if self.order is None or self.position >= len(self.order):
            if self.order is not None:
                self.epoch += 1
            self.order = plan_epoch(self.keys, self.repeats, self.config.batch_size, self.generator)
            self.position = 0
        end = min(self.position + self.config.grad_accum, len(self.order))
        window = self.order[self.position:end]
        self.position = end
        return window

    def forward_backward(self) -> float:
        """Accumulate the gradients of one optimizer step; returns its loss (mean over micro-batches)."""
        self.optimizer.zero_grad(set_to_none=True)
        window = self.next_window()
        losses = []
        for idxs in window:
            loss = self._micro_batch_loss(idxs)
            (loss / len(window)).backward()
            losses.append(float(loss.detach()))
        step_loss = sum(losses) / len(losses)
        if not math.isfinite(step_loss):
            raise TrainingError(f"The loss is {step_loss} at step {self.step + 1}; nothing of this step was applied. "
                                "Lower the learning rate, use compute_dtype bf16 instead of fp16, or check the "
                                "cached latents, then resume from the last checkpoint.")
        if self.config.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
            if not math.isfinite(norm):
                raise TrainingError(f"The gradient norm is {norm} at step {self.step + 1}; nothing of this step was "
                                    "applied. Lower the learning rate or use compute_dtype bf16 instead of fp16, "
                                    "then resume from the last checkpoint.")
        return step_loss


def _resolve_resume(run_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    existing = list_checkpoints(run_dir)
    if resume is False or resume is None:
        if existing:
            raise TrainingError(f"{run_dir} already holds a training run (checkpoints up to step {existing[-1][0]}). "
                                "Turn resume on to continue it, or choose a new, empty run folder.")
        return None
    if resume is True:
        return existing[-1][1] if existing else None
    path = Path(resume)
    if (path / STATE_FILE).is_file() and (path / LORA_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    raise ResumeError(f"Nothing to resume at {path}: expected a run folder with {CHECKPOINTS_DIR}/step_NNNNNN/ "
                      f"or a step_NNNNNN folder holding {STATE_FILE} and {LORA_FILE}.")


def _remove_leftovers(run_dir: Path) -> None:
    """Delete temporary checkpoint folders a killed process left behind (never complete ``step_*`` folders)."""
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(".step_") and (d.name.endswith(".tmp") or ".old-" in d.name):
                shutil.rmtree(d, ignore_errors=True)


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)


def train_lora(model: nn.Module, samples: Sequence[TrainSample], empty_text: Any, config: TrainConfig,
               run_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
               resume: bool | str | os.PathLike = False, on_event: Callable[[TrainEvent], Any] | None = None,
               check_interrupt: Callable[[], Any] | None = None,
               validate: Callable[[int, nn.Module], Any] | None = None, validate_every: int = 0,
               metadata: Mapping[str, Any] | None = None) -> TrainResult:
    """Train (or resume) a LoRA on a Kandinsky 5 DiT; every semantic is described in the module notes.

    Args:
        model: a ``Kandinsky5DiT`` whose weights are on ``device`` (or managed by block swap), without LoRA layers.
            LoRA layers are injected for the run (their parameters on ``device``) and removed before returning; the
            model is otherwise unchanged.
        samples: :class:`TrainSample` objects (:class:`MemorySample`, :func:`samples_from_cache`), ≥ 1. Their
            order matters for resuming (keep it stable).
        empty_text: the empty-caption embedding for caption dropout: ``(text [L, D], pooled [D2])``, or
            ``{template: (text, pooled)}`` (:func:`empty_texts_from_cache`); may be None when
            ``caption_dropout`` is 0.
        config: :class:`TrainConfig`.
        run_dir: the run folder (created): ``checkpoints/``, ``run.json``, ``lora.safetensors``.
        device: where batches go (the model's device).
        resume: False (new run; the folder must hold no checkpoint), True (continue the newest checkpoint of
            ``run_dir``, else start), or a checkpoint/run folder to continue from.
        on_event: called with a :class:`TrainEvent` after every optimizer step.
        check_interrupt: called before every optimizer step; whatever it raises propagates after a checkpoint is
            saved.
        validate: ``validate(step, model)`` every ``validate_every`` steps (model in eval mode with the current
            LoRA, under ``torch.no_grad``).
        metadata: extra LoRA file metadata (base model, variant, dataset hash, ``trigger`` word, …); non-string
            values are JSON-encoded. Keys ``cinetune.*`` and ``ss_*`` written by the trainer take precedence.

    Returns:
        :class:`TrainResult`.

    Raises:
        TrainingError: bad samples/config/empty text (names the sample and the fix), a non-finite loss.
        ResumeError: the checkpoint does not fit this run (other model, rank, alpha, optimizer) or cannot be read.
        ImportError: optimizer package missing (``pip install bitsandbytes`` for adamw8bit).
        LoRAError: the model already holds LoRA layers; no layer matches the targets.
        AttentionBackendError: the attention backend is unknown or not installed.
        Whatever ``check_interrupt``, ``on_event`` or ``validate`` raise, after the checkpoint is saved.
    """
    if not isinstance(config, TrainConfig):
        raise TrainingError(f"config must be a TrainConfig, got {type(config).__name__}.")
    samples = list(samples)
    if not samples:
        raise TrainingError("No training samples: cache a dataset first (at least one video or image).")
    _int("validate_every", validate_every, 0)
    check_backend(config.attention_backend)
    run_dir = Path(run_dir)
    resume_from = _resolve_resume(run_dir, resume)
    run = _Run(model, samples, empty_text, config, run_dir, torch.device(device), metadata)

    run.preflight()
    was_training = model.training
    had_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    with torch.inference_mode(False), torch.enable_grad():
        try:
            run.setup()
            if resume_from is not None:
                run.load(resume_from)
            run_dir.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(run_dir)
            run.write_run_json(resume_from)
            model.train()
            with gradient_checkpointing(model, config.gradient_checkpointing):
                return _loop(run, on_event, check_interrupt, validate, validate_every)
        finally:
            model.train(was_training)
            if not had_lora:  # inject_lora refuses such a model; never strip the caller's own adapters
                remove_lora(model)
            for p, flag in grad_flags:
                p.requires_grad_(flag)


def _loop(run: _Run, on_event, check_interrupt, validate, validate_every: int) -> TrainResult:
    model, cfg = run.model, run.config
    start_step, t0 = run.step, time.perf_counter()
    saved_at: Path | None = None
    snap = run.snapshot()
    updating = False
    try:
        while run.step < run.max_steps:
            if check_interrupt is not None:
                check_interrupt()
            lr = run.optimizer.param_groups[0]["lr"]
            loss = run.forward_backward()
            epoch = run.epoch  # of this step's window (it may have started a new epoch)
            updating = True
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.losses.append(loss)
            updating = False
            snap = run.snapshot()
            saved_at = None

            run.ema = LOSS_EMA_BETA * run.ema + (1 - LOSS_EMA_BETA) * loss
            done = run.step - start_step
            rate = done / max(time.perf_counter() - t0, 1e-9)
            if on_event is not None:
                on_event(TrainEvent(step=run.step, max_steps=run.max_steps, loss=loss,
                                    loss_ema=run.ema / (1 - LOSS_EMA_BETA ** len(run.losses)), lr=float(lr),
                                    steps_per_s=rate, eta_s=(run.max_steps - run.step) / rate, epoch=epoch + 1))
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.max_steps:
                saved_at = run.save_checkpoint(snap)
            if validate is not None and validate_every and run.step % validate_every == 0:
                model.eval()
                try:
                    with torch.no_grad():
                        validate(run.step, model)
                finally:
                    model.train()
        if saved_at is None:
            saved_at = run.save_checkpoint(snap)
        lora_path = run.save_final_lora(snap)
    except BaseException as exc:
        if updating:
            _add_note(exc, f"Training stopped inside the optimizer update of step {run.step + 1}; no checkpoint was "
                           "written for it. Resume continues from the last checkpoint in "
                           f"{run.run_dir / CHECKPOINTS_DIR}.")
            raise
        try:
            ckpt = run.save_checkpoint(snap)
            run.save_final_lora(snap)
        except Exception as save_exc:  # report the original error; the save failure rides along
            _add_note(exc, f"Saving a checkpoint of step {snap.step} failed too: {save_exc!r}.")
            raise exc
        _add_note(exc, f"Training stopped at step {snap.step}; resumable checkpoint saved in {ckpt}, LoRA in "
                       f"{run.run_dir / LORA_FILE}.")
        raise
    return TrainResult(lora_path=Path(lora_path), steps=run.step, losses=list(run.losses), checkpoint_dir=saved_at)
