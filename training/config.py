"""Settings, events and results of a LoRA training run (:func:`cinetune.training.trainer.train_lora`), and its
errors.

:class:`TrainConfig` holds every setting of a run, for every model family: the loop's own (optimizer, schedule,
steps, batches, σ sampling, checkpoints, dtypes) and the knobs a family's training adapter reads (LoRA targets,
image-to-video, caption dropout, audio, NABLA, RoPE scale). A family refuses the knobs it has no use for in its
:meth:`~cinetune.training.adapter.TrainingAdapter.check`. Defaults are the official Kandinsky 5 LoRA example's
where it gives one (k5.md §8); other families start from their own defaults (e.g.
:func:`cinetune.ltx2.train.ltx2_train_config`).

Compatibility: :meth:`TrainConfig.to_dict` is written into every checkpoint and LoRA; fields added after the first
release (``targets`` left to the family, ``with_audio``, and every setting from ``min_lr_ratio`` on) are written only
when they differ from their default, so an unchanged run of an older version compares equal and resumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .schedules import DECAYING_SCHEDULES, LR_SCHEDULES, OPTIMIZERS

__all__ = ["TrainingError", "ResumeError", "TIMESTEP_SAMPLING", "I2V_MODES", "LOSS_WEIGHTINGS", "TrainConfig",
           "TrainEvent", "TrainResult"]

#: σ-sampling methods of :attr:`TrainConfig.timestep_sampling` (formulas in :mod:`cinetune.training.sigmas`).
TIMESTEP_SAMPLING: tuple[str, ...] = ("shift", "logit_normal", "uniform", "shifted_logit_normal")
#: Image-to-video training modes of :attr:`TrainConfig.i2v` (a family may support only some).
I2V_MODES: tuple[str, ...] = ("off", "first", "first_last")
#: Per-sample loss weightings w(σ) of :attr:`TrainConfig.loss_weighting` (formulas in :mod:`cinetune.training.sigmas`).
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "sigma_sqrt", "cosmap")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
# Fields added after the first release: written by to_dict only when not at their default.
_LATER_FIELDS = frozenset({"targets", "with_audio", "min_lr_ratio", "d_coef", "safeguard_warmup", "lora_include",
                           "lora_exclude", "lora_dropout", "rank_dropout", "module_dropout", "init_lora", "sigma_min",
                           "sigma_max", "loss_weighting", "save_every_epochs", "tensorboard", "ema_decay",
                           "validation_loss_every", "validation_loss_sigmas"})


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


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    """Regular expressions as a tuple: a sequence of strings, or one text with one pattern per line."""
    if isinstance(value, str):
        value = [line.strip() for line in value.splitlines()]
    if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
        raise TrainingError(f"{name} must be regular expressions (one per line); got {value!r}.")
    patterns = tuple(p for p in value if p)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise TrainingError(f"{name}: {p!r} is not a regular expression ({e}); escape special characters such as "
                                "'.' as '\\.', or use '.*' for any text.") from e
    return patterns


def _sigma_list(value: Any) -> tuple[float, ...]:
    """Fixed σ values as a tuple of floats in [0, 1]: a sequence of numbers or a text such as ``"0.1, 0.5"``."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        sigmas = tuple(float(v) for v in items) if isinstance(items, (tuple, list)) else ()
    except (TypeError, ValueError):
        sigmas = ()
    if not sigmas or not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in sigmas):
        raise TrainingError(f"validation_loss_sigmas must be one or more σ values in [0, 1], e.g. "
                            f"\"0.1, 0.3, 0.5, 0.7, 0.9\"; got {value!r}.")
    return sigmas


@dataclass
class TrainConfig:
    """Settings of a LoRA training run.

    Attributes:
        rank, alpha: LoRA rank and alpha (scale alpha/rank). targets: Linear-name suffixes (PEFT-style) that get
            LoRA inside the family's blocks; None = the family's default (Kandinsky 5: the official targets; LTX-2:
            the attention projections, see :func:`cinetune.ltx2.train.ltx2_lora_targets`).
        learning_rate, optimizer (:data:`~cinetune.training.schedules.OPTIMIZERS`: ``"adamw"``, ``"adamw8bit"``,
            ``"adafactor"``, ``"prodigy"``, ``"adamw_schedulefree"``), weight_decay, betas, eps: see
            :mod:`cinetune.training.schedules`. d_coef, safeguard_warmup: Prodigy's (``prodigyopt.Prodigy``).
        lr_schedule: ``"constant"``, ``"constant_with_warmup"``, ``"cosine"``, ``"linear"``; warmup_steps: W.
        min_lr_ratio: r ∈ [0, 1]: ``"cosine"``/``"linear"`` decay to ``learning_rate · r`` instead of 0 (musubi-tuner
            ``--lr_scheduler_min_lr_ratio``; formula in :mod:`cinetune.training.schedules`).
        max_steps: optimizer steps of the run; epochs: > 0 runs that many epochs instead (see the trainer notes).
        batch_size: samples per micro-batch (same bucket and frame count); grad_accum: micro-batches per step.
        max_grad_norm: clip the global gradient L2 norm to this (0 = no clipping; the norm is reported either way).
        timestep_sampling (:data:`TIMESTEP_SAMPLING`), flow_shift (k, 1 = none), sigmoid_scale: σ sampling
            (:func:`cinetune.training.sigmas.sample_sigmas`). sigma_min, sigma_max: the σ range the sampled σ is
            mapped into (musubi-tuner ``--min_timestep``/``--max_timestep`` ÷ 1000). loss_weighting: w(σ) per sample,
            :data:`LOSS_WEIGHTINGS` (musubi-tuner ``--weighting_scheme``; :mod:`cinetune.training.sigmas`).
        lora_include, lora_exclude: regular expressions over module paths (``re.match``, musubi-tuner
            ``include_patterns``/``exclude_patterns``) refining the family's LoRA layers
            (:func:`cinetune.core.lora.lora_candidates`); () = the family's targets as they are.
        lora_dropout, rank_dropout, module_dropout: LoRA dropout probabilities in [0, 1) (PEFT ``lora_dropout``,
            kohya ``rank_dropout``/``module_dropout``; :class:`cinetune.core.lora.LoRALinear`).
        init_lora: path of a LoRA file the new LoRA starts from (same rank and layers; alpha may differ), or None.
        gradient_checkpointing: recompute each of the family's blocks in backward.
        nabla: the family's sparse-attention settings (Kandinsky 5: a ``NablaConfig``) or None (full attention).
        rope_scale: Kandinsky 5 RoPE divisors (t, h, w); (1, 2, 2) for SD checkpoints. attention_backend: for
            dense attention (:mod:`cinetune.core.attention`).
        i2v: image-to-video training, ``"off"``, ``"first"``, ``"first_last"``; i2v_prob: per-sample probability
            of conditioning (Kandinsky 5 official mixed T2V/I2V training: 0.2; LTX-2 ``first_frame_conditioning_p``).
        caption_dropout: per-sample probability of the empty caption.
        with_audio: train the audio stream too (families with audio; LTX-2: None = video only, ltx-trainer's
            ``with_audio`` default).
        seed: seeds the trainer's generator. save_every: checkpoint every N steps; save_every_epochs: every N
            epochs, at the epoch's last step (0 = neither; a checkpoint is always written at the end or when
            interrupted). keep_checkpoints: newest checkpoints kept (0 = all).
        compute_dtype: dtype of the model input/activations (bf16; fp32 for exact tests). lora_dtype: dtype of the
            trainable LoRA parameters and of checkpoint LoRAs. save_dtype: dtype of ``run_dir/lora.safetensors``
            (and ``lora_ema.safetensors``).
        tensorboard: write TensorBoard event files into ``run_dir/tensorboard`` (needs the ``tensorboard``
            package).
        ema_decay: d > 0 keeps an exponential moving average of the LoRA weights, ``ema ← d·ema + (1 − d)·lora``
            after every optimizer step, saved as ``run_dir/lora_ema.safetensors``; 0 = off.
        validation_loss_every: every N steps (and at the last step) the held-out loss over the trainer's
            ``holdout`` samples at the fixed σ of ``validation_loss_sigmas`` (a tuple of σ in [0, 1], or a string
            such as ``"0.1, 0.3, 0.5"``); 0 = only at the last step when held-out samples are given.
        Dtypes may be given as torch dtypes or as "fp32"/"bf16"/"fp16".

    Raises:
        TrainingError: a value out of range or an unknown option (the message lists the valid ones); ``warmup_steps``
            with the ``"constant"`` schedule (use ``"constant_with_warmup"``) or longer than ``max_steps``;
            ``min_lr_ratio`` with a schedule that does not decay; a decaying schedule or EMA with
            ``"adamw_schedulefree"``; a pattern that is not a regular expression; σ_min ≥ σ_max.
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
    min_lr_ratio: float = 0.0
    d_coef: float = 1.0
    safeguard_warmup: bool = False
    lora_include: tuple[str, ...] = ()
    lora_exclude: tuple[str, ...] = ()
    lora_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_lora: str | None = None
    sigma_min: float = 0.0
    sigma_max: float = 1.0
    loss_weighting: str = "none"
    save_every_epochs: int = 0
    tensorboard: bool = False
    ema_decay: float = 0.0
    validation_loss_every: int = 0
    validation_loss_sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)

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
        self._check_later_fields()

    def _check_later_fields(self) -> None:
        if self.epochs == 0 and self.warmup_steps > self.max_steps:
            raise TrainingError(f"warmup_steps={self.warmup_steps} is longer than the run ({self.max_steps} steps): "
                                f"use at most {self.max_steps} warm-up steps, or train longer.")
        self.min_lr_ratio = check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.min_lr_ratio and self.lr_schedule not in DECAYING_SCHEDULES:
            raise TrainingError(f"min_lr_ratio={self.min_lr_ratio:g} is the floor of a decaying schedule; "
                                f"lr_schedule {self.lr_schedule!r} does not decay. Use 'cosine' or 'linear', or set "
                                "min_lr_ratio to 0.")
        if self.optimizer == "adamw_schedulefree" and self.lr_schedule in DECAYING_SCHEDULES:
            raise TrainingError(f"The 'adamw_schedulefree' optimizer replaces the schedule; lr_schedule "
                                f"{self.lr_schedule!r} would decay it too. Use 'constant' or 'constant_with_warmup'.")
        self.d_coef = check_number("d_coef", self.d_coef, 0.0, low_open=True)
        self.safeguard_warmup = bool(self.safeguard_warmup)
        for name in ("lora_include", "lora_exclude"):
            setattr(self, name, _patterns(name, getattr(self, name)))
        for name in ("lora_dropout", "rank_dropout", "module_dropout"):
            setattr(self, name, check_number(name, getattr(self, name), 0.0, 1.0))
            if getattr(self, name) >= 1.0:
                raise TrainingError(f"{name} must be below 1 (1 would drop everything); got {getattr(self, name)}.")
        if self.init_lora is not None:
            if not isinstance(self.init_lora, (str, os.PathLike)) or not str(self.init_lora):
                raise TrainingError(f"init_lora must be None or the path of a LoRA file; got {self.init_lora!r}.")
            self.init_lora = os.fspath(self.init_lora)
        self.sigma_min = check_number("sigma_min", self.sigma_min, 0.0, 1.0)
        self.sigma_max = check_number("sigma_max", self.sigma_max, 0.0, 1.0)
        if self.sigma_min >= self.sigma_max:
            raise TrainingError(f"sigma_min ({self.sigma_min:g}) must be below sigma_max ({self.sigma_max:g}); the "
                                "full range is 0 to 1.")
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_int("save_every_epochs", self.save_every_epochs, 0)
        if not isinstance(self.tensorboard, bool):
            raise TrainingError(f"tensorboard must be True or False; got {self.tensorboard!r}.")
        self.ema_decay = check_number("ema_decay", self.ema_decay, 0.0, 1.0)
        if self.ema_decay >= 1.0:
            raise TrainingError(f"ema_decay must be below 1 (e.g. 0.999; 0 turns EMA off); got {self.ema_decay}.")
        if self.ema_decay and self.optimizer == "adamw_schedulefree":
            raise TrainingError("The 'adamw_schedulefree' optimizer already averages the weights it saves; set "
                                "ema_decay to 0, or choose another optimizer.")
        check_int("validation_loss_every", self.validation_loss_every, 0)
        self.validation_loss_sigmas = _sigma_list(self.validation_loss_sigmas)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (dtypes as ``"bfloat16"`` etc., NABLA as a dict or None, tuples as lists); the
        fields added after the first release only when not at their default (module notes)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.name in _LATER_FIELDS and getattr(self, f.name) == f.default)}


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
        grad_norm: the global L2 norm of the step's LoRA gradients before clipping.
        validation_loss: the held-out loss after this step (``validation_loss_every``), else None.
        checkpoint: the checkpoint folder written at this step, else None.
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
    grad_norm: float | None = None
    validation_loss: float | None = None
    checkpoint: str | None = None


@dataclass
class TrainResult:
    """What :func:`~cinetune.training.trainer.train_lora` returns.

    Attributes:
        lora_path: the final LoRA, ``run_dir/lora.safetensors`` (``save_dtype``, the family's saved layout, with
            metadata).
        steps: optimizer steps done in the whole run. losses: per-step losses of the whole run (resumed ones too).
        checkpoint_dir: the checkpoint of the final step (``run_dir/checkpoints/step_NNNNNN``).
        ema_lora_path: ``run_dir/lora_ema.safetensors`` (the EMA of the LoRA weights, as ``lora_path``) when
            ``ema_decay`` > 0, else None.
    """

    lora_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    ema_lora_path: Path | None = None
