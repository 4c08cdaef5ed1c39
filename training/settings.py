"""The values of the training settings nodes and the validation prompt chain: optimizer details, LoRA layer
selection and regularisation, σ sampling, checkpoints (:class:`OptimizerSettings`, :class:`LoRASettings`,
:class:`SamplingSettings`, :class:`CheckpointSettings`), each saying which
:class:`~cinetune.training.config.TrainConfig` fields it sets, and :class:`ValidationPrompt` /
:class:`ValidationPrompts`.

::

    config = TrainConfig(**{**widgets, **config_overrides(optimizer, lora, sampling, checkpoint)})

Decisions:

- **Settings carry frozen values**; each says which ``TrainConfig`` fields it sets (``config_overrides()``). The
  trainer node's own widgets are the base and :func:`config_overrides` of the connected settings is laid over them,
  so an unconnected settings node leaves the run as before.
- **One rule for a value**: the settings nodes check their texts and numbers with :func:`checked_settings`, which
  builds a :class:`TrainConfig`, so a value is refused by the node exactly when the config would refuse it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .config import TrainConfig

__all__ = ["SAVE_DTYPES", "checked_settings", "OptimizerSettings", "LoRASettings", "SamplingSettings",
           "CheckpointSettings", "config_overrides", "ValidationPrompt", "ValidationPrompts"]

#: Dtypes a run's final LoRA can be saved in (:attr:`TrainConfig.save_dtype`).
SAVE_DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")


def checked_settings(**fields: Any) -> dict[str, Any]:
    """The given :class:`TrainConfig` fields as the config checks and normalises them, the others at their defaults
    (texts of patterns or σ values become tuples), so the settings nodes and the config share one rule.

    Raises:
        TrainingError: a bad value (the message names the field and the fix).
    """
    config = TrainConfig(**fields)
    return {name: getattr(config, name) for name in fields}


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimizer details beyond the trainer node's widgets (defaults: :class:`TrainConfig`'s, the official
    Kandinsky 5 LoRA example's). ``beta1``/``beta2`` form ``TrainConfig.betas``; ``min_lr_ratio`` is the floor the
    cosine and linear schedules decay to, as a fraction of the learning rate; ``d_coef`` and ``safeguard_warmup``
    apply to Prodigy only."""

    weight_decay: float = TrainConfig.weight_decay
    beta1: float = TrainConfig.betas[0]
    beta2: float = TrainConfig.betas[1]
    eps: float = TrainConfig.eps
    max_grad_norm: float = TrainConfig.max_grad_norm
    min_lr_ratio: float = TrainConfig.min_lr_ratio
    d_coef: float = TrainConfig.d_coef
    safeguard_warmup: bool = TrainConfig.safeguard_warmup

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value."""
        return {"weight_decay": self.weight_decay, "betas": (self.beta1, self.beta2), "eps": self.eps,
                "max_grad_norm": self.max_grad_norm, "min_lr_ratio": self.min_lr_ratio, "d_coef": self.d_coef,
                "safeguard_warmup": self.safeguard_warmup}


@dataclass(frozen=True)
class LoRASettings:
    """Which layers get LoRA and how it is regularised and initialised.

    Attributes:
        include, exclude: regular expressions over module paths (see :func:`cinetune.core.lora.lora_candidates`);
            empty = the family's official targets. dropout, rank_dropout, module_dropout: probabilities in [0, 1).
        init_lora: path of a LoRA file the run starts from, or None.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_lora: str | None = None

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value."""
        return {"lora_include": self.include, "lora_exclude": self.exclude, "lora_dropout": self.dropout,
                "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout, "init_lora": self.init_lora}


@dataclass(frozen=True)
class SamplingSettings:
    """The σ range and loss weighting of training, and the image-to-video probability.

    Attributes:
        sigma_min, sigma_max: the range sampled σ are mapped into (0 ≤ min < max ≤ 1).
        loss_weighting: one of :data:`~cinetune.training.config.LOSS_WEIGHTINGS` (formulas in
            :mod:`cinetune.training.sigmas`).
        i2v_probability: probability that a sample trains image-to-video; None = as the trainer node (its family's
            default). Applied by the trainer node, which knows its family's image-to-video switch.

    Raises:
        TrainingError: ``sigma_min ≥ sigma_max``, or a value the config refuses.
    """

    sigma_min: float = TrainConfig.sigma_min
    sigma_max: float = TrainConfig.sigma_max
    loss_weighting: str = TrainConfig.loss_weighting
    i2v_probability: float | None = None

    def __post_init__(self) -> None:
        checked_settings(**self.config_overrides())

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value (``i2v_probability`` is the trainer node's to apply)."""
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "loss_weighting": self.loss_weighting}


@dataclass(frozen=True)
class CheckpointSettings:
    """Checkpoint cadence and retention, the saved LoRA's dtype, logging, EMA and the held-out loss.

    Attributes:
        save_every_epochs: also checkpoint at the end of every N-th epoch (0 = off). keep_checkpoints: newest kept
            (0 = all). save_dtype: one of :data:`SAVE_DTYPES`. tensorboard: write event files. ema_decay: EMA of the
            LoRA weights (0 = off). validation_loss_every: held-out loss every N steps (0 = off), at the σ values
            ``validation_loss_sigmas``.
    """

    save_every_epochs: int = TrainConfig.save_every_epochs
    keep_checkpoints: int = TrainConfig.keep_checkpoints
    save_dtype: str = "bf16"
    tensorboard: bool = TrainConfig.tensorboard
    ema_decay: float = TrainConfig.ema_decay
    validation_loss_every: int = TrainConfig.validation_loss_every
    validation_loss_sigmas: tuple[float, ...] = TrainConfig.validation_loss_sigmas

    def config_overrides(self) -> dict[str, Any]:
        """TrainConfig field → value."""
        return {"save_every_epochs": self.save_every_epochs, "keep_checkpoints": self.keep_checkpoints,
                "save_dtype": self.save_dtype, "tensorboard": self.tensorboard, "ema_decay": self.ema_decay,
                "validation_loss_every": self.validation_loss_every,
                "validation_loss_sigmas": self.validation_loss_sigmas}


def config_overrides(*settings: Any) -> dict[str, Any]:
    """The TrainConfig fields the given settings set (None entries are skipped; later settings win)."""
    merged: dict[str, Any] = {}
    for item in settings:
        if item is not None:
            merged.update(item.config_overrides())
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Validation prompts


@dataclass(frozen=True)
class ValidationPrompt:
    """One prompt of a validation chain (a Validation Prompt node).

    Attributes:
        conditioning: the family's encoded prompt and negative prompt (its Text Encode output).
        width, height: pixels; frames: video frames. 0 = as the first training clip (the family's validation size
            rule). steps: sampling steps. guidance: text guidance scale. seed: noise seed.
        start_image: optional ComfyUI IMAGE ``[B, H, W, 3]`` float 0..1 (the first image conditions the first
            frame: image-to-video). extra: family sampling settings as ``(name, number)`` pairs (Kandinsky 5:
            ``scheduler_scale``; LTX-2: ``fps``, ``audio_cfg``).
    """

    conditioning: Any
    width: int = 0
    height: int = 0
    frames: int = 0
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    start_image: Tensor | None = None
    extra: tuple[tuple[str, float], ...] = ()

    def option(self, name: str, default: float) -> float:
        """The family setting ``name`` from :attr:`extra`, else ``default``."""
        return dict(self.extra).get(name, default)

    def sized(self, width: int, height: int, frames: int) -> "ValidationPrompt":
        """A copy whose 0 sizes are replaced by the given ones (the training data's)."""
        return dataclasses.replace(self, width=self.width or width, height=self.height or height,
                                   frames=self.frames or frames)

    def settings(self) -> dict[str, Any]:
        """The prompt's settings as plain values (for the run's metadata; the conditioning is not included)."""
        return {"width": self.width, "height": self.height, "frames": self.frames, "steps": self.steps,
                "guidance": self.guidance, "seed": self.seed, "start_image": self.start_image is not None,
                **dict(self.extra)}


@dataclass(frozen=True)
class ValidationPrompts:
    """A chain of validation prompts of one model family (``family``: its name, e.g. ``"kandinsky-5"``), and whether
    clips are also made at step 0 (on when any node of the chain asks for it)."""

    family: str
    prompts: tuple[ValidationPrompt, ...] = ()
    sample_at_start: bool = False

    def then(self, prompt: ValidationPrompt, *, sample_at_start: bool = False) -> "ValidationPrompts":
        """This chain with ``prompt`` appended."""
        return ValidationPrompts(self.family, (*self.prompts, prompt), self.sample_at_start or sample_at_start)

    def settings(self) -> dict[str, Any]:
        """Plain values for the run's metadata."""
        return {"sample_at_start": self.sample_at_start, "prompts": [p.settings() for p in self.prompts]}
