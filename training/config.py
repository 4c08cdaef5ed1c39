"""Settings, events and results of a LoRA training run (:func:`cinetune.training.trainer.train_lora`), and its
errors.

:class:`TrainConfig` holds every setting of a run, for every model family: the loop's own (optimizer, schedule,
steps, batches, σ sampling, checkpoints, dtypes) and the knobs a family's training adapter reads (LoRA targets,
image-to-video, caption dropout, audio, NABLA, RoPE scale). A family refuses the knobs it has no use for in its
:meth:`~cinetune.training.adapter.TrainingAdapter.check`. Defaults are the official Kandinsky 5 LoRA example's
where it gives one (k5.md §8); other families start from their own defaults (e.g.
:func:`cinetune.ltx2.train.ltx2_train_config`).

Compatibility: :meth:`TrainConfig.to_dict` is written into every checkpoint and LoRA; fields added after the first
release (``targets`` left to the family, ``with_audio``) are written only when set, so an unchanged run of an older
version compares equal.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .schedules import LR_SCHEDULES, OPTIMIZERS

__all__ = ["TrainingError", "ResumeError", "TIMESTEP_SAMPLING", "I2V_MODES", "TrainConfig", "TrainEvent",
           "TrainResult"]

#: σ-sampling methods of :attr:`TrainConfig.timestep_sampling` (formulas in :mod:`cinetune.training.sigmas`).
TIMESTEP_SAMPLING: tuple[str, ...] = ("shift", "logit_normal", "uniform", "shifted_logit_normal")
#: Image-to-video training modes of :attr:`TrainConfig.i2v` (a family may support only some).
I2V_MODES: tuple[str, ...] = ("off", "first", "first_last")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
# Fields added after the first release: written by to_dict only when not None.
_LATER_FIELDS = frozenset({"targets", "with_audio"})


class TrainingError(ValueError):
    """Training cannot start or continue; the message says what is wrong and how to fix it."""


class ResumeError(TrainingError):
    """A checkpoint cannot be resumed by this run (other model, rank, alpha or optimizer, or an unreadable file)."""


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` if it is an int ≥ ``low``. Raises :class:`TrainingError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainingError(f"{name} must be an integer ≥ {low}; got {value!r}.")
    return value


def check_number(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in the range. Raises :class:`TrainingError` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '≥'} {low:g}" + (f" and ≤ {high:g}" if high is not None else "")
        raise TrainingError(f"{name} must be a finite number {bound}; got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options``. Raises :class:`TrainingError` listing them otherwise."""
    if value not in options:
        raise TrainingError(f"{name} must be one of {', '.join(options)}; got {value!r}.")
    return value


def _dtype(value: Any, name: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    dt = _DTYPES.get(value, value) if isinstance(value, str) else value
    if dt not in allowed:
        names = ", ".join(str(a).replace("torch.", "") for a in allowed)
        raise TrainingError(f"{name} must be one of {names}; got {value!r}.")
    return dt


def _plain(value: Any) -> Any:
    """A JSON-friendly copy: dtypes as names, dataclasses as dicts, tuples as lists."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


@dataclass
class TrainConfig:
    """Settings of a LoRA training run.

    Attributes:
        rank, alpha: LoRA rank and alpha (scale alpha/rank). targets: Linear-name suffixes (PEFT-style) that get
            LoRA inside the family's blocks; None = the family's default (Kandinsky 5: the official targets; LTX-2:
            the attention projections, see :func:`cinetune.ltx2.train.ltx2_lora_targets`).
        learning_rate, optimizer (``"adamw"``, ``"adamw8bit"``, ``"adafactor"``), weight_decay, betas, eps:
            see :mod:`cinetune.training.schedules`.
        lr_schedule: ``"constant"``, ``"constant_with_warmup"``, ``"cosine"``, ``"linear"``; warmup_steps: W.
        max_steps: optimizer steps of the run; epochs: > 0 runs that many epochs instead (see the trainer notes).
        batch_size: samples per micro-batch (same bucket and frame count); grad_accum: micro-batches per step.
        max_grad_norm: clip the global gradient L2 norm to this (0 = no clipping).
        timestep_sampling (:data:`TIMESTEP_SAMPLING`), flow_shift (k, 1 = none), sigmoid_scale: σ sampling
            (:func:`cinetune.training.sigmas.sample_sigmas`).
        gradient_checkpointing: recompute each of the family's blocks in backward.
        nabla: the family's sparse-attention settings (Kandinsky 5: a ``NablaConfig``) or None (full attention).
        rope_scale: Kandinsky 5 RoPE divisors (t, h, w); (1, 2, 2) for SD checkpoints. attention_backend: for
            dense attention (:mod:`cinetune.core.attention`).
        i2v: image-to-video training, ``"off"``, ``"first"``, ``"first_last"``; i2v_prob: per-sample probability
            of conditioning (Kandinsky 5 official mixed T2V/I2V training: 0.2; LTX-2 ``first_frame_conditioning_p``).
        caption_dropout: per-sample probability of the empty caption.
        with_audio: train the audio stream too (families with audio; LTX-2: None = video only, ltx-trainer's
            ``with_audio`` default).
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
    targets: tuple[str, ...] | None = None
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
    nabla: Any = None
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
    with_audio: bool | None = None

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        self.alpha = check_number("alpha", self.alpha, 0.0, low_open=True)
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise TrainingError(f"targets must be None (the model family's) or non-empty module-name suffixes "
                                    f"such as ('attn1.to_q', 'attn1.to_k'); got {self.targets!r}.")
            self.targets = targets
        self.learning_rate = check_number("learning_rate", self.learning_rate, 0.0, low_open=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.weight_decay = check_number("weight_decay", self.weight_decay, 0.0)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise TrainingError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.95); got {self.betas!r}.")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = check_number("eps", self.eps, 0.0, low_open=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.lr_schedule == "constant" and self.warmup_steps:
            raise TrainingError(f"warmup_steps={self.warmup_steps} has no effect with lr_schedule 'constant'; "
                                "use 'constant_with_warmup' (or 'cosine'/'linear'), or set warmup_steps to 0.")
        check_int("max_steps", self.max_steps, 1)
        check_int("epochs", self.epochs, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum", self.grad_accum, 1)
        self.max_grad_norm = check_number("max_grad_norm", self.max_grad_norm, 0.0)
        check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        self.flow_shift = check_number("flow_shift", self.flow_shift, 0.0, low_open=True)
        self.sigmoid_scale = check_number("sigmoid_scale", self.sigmoid_scale, 0.0, low_open=True)
        self.gradient_checkpointing = bool(self.gradient_checkpointing)
        if self.nabla is not None and not (dataclasses.is_dataclass(self.nabla) and not isinstance(self.nabla, type)):
            raise TrainingError(f"nabla must be None or the model family's sparse-attention settings (a NablaConfig "
                                f"for Kandinsky 5); got {type(self.nabla).__name__}.")
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
        check_choice("i2v", self.i2v, I2V_MODES)
        self.i2v_prob = check_number("i2v_prob", self.i2v_prob, 0.0, 1.0)
        self.caption_dropout = check_number("caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.with_audio is not None and not isinstance(self.with_audio, bool):
            raise TrainingError(f"with_audio must be True, False or None; got {self.with_audio!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise TrainingError(f"seed must be an integer in [0, 2^63); got {self.seed!r}.")
        check_int("save_every", self.save_every, 0)
        check_int("keep_checkpoints", self.keep_checkpoints, 0)
        floats = (torch.float32, torch.bfloat16, torch.float16)
        self.compute_dtype = _dtype(self.compute_dtype, "compute_dtype", floats)
        self.lora_dtype = _dtype(self.lora_dtype, "lora_dtype", (torch.float32, torch.bfloat16))
        self.save_dtype = _dtype(self.save_dtype, "save_dtype", floats)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (dtypes as ``"bfloat16"`` etc., NABLA as a dict or None, tuples as lists); the
        later fields ``targets`` and ``with_audio`` only when set (module notes)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.name in _LATER_FIELDS and getattr(self, f.name) is None)}


@dataclass
class TrainEvent:
    """Reported after every optimizer step.

    Attributes:
        step: optimizer steps done (1-based number of the step just taken). max_steps: total steps of the run.
        loss: this step's loss (mean over its micro-batches), float. loss_ema: bias-corrected EMA (trainer notes).
        lr: learning rate used by this step. steps_per_s, eta_s: speed of this call and remaining seconds.
        epoch: 1-based number of the epoch the step's batches came from.
        loss_terms: the parts of ``loss`` by name, each the mean over the step's micro-batches (LTX-2:
            ``{"video": …, "audio": …}`` with audio, ``{"video": …}`` without); empty when the loss has one part.
    """

    step: int
    max_steps: int
    loss: float
    loss_ema: float
    lr: float
    steps_per_s: float
    eta_s: float
    epoch: int
    loss_terms: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`~cinetune.training.trainer.train_lora` returns.

    Attributes:
        lora_path: the final LoRA, ``run_dir/lora.safetensors`` (``save_dtype``, the family's saved layout, with
            metadata).
        steps: optimizer steps done in the whole run. losses: per-step losses of the whole run (resumed ones too).
        checkpoint_dir: the checkpoint of the final step (``run_dir/checkpoints/step_NNNNNN``).
    """

    lora_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    checkpoint_dir: Path | None = None
