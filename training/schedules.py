"""Optimizers and learning-rate schedules for LoRA training.

Optimizers (over the LoRA parameters only; the trainer passes them in):

- ``"adamw"``: ``torch.optim.AdamW`` (Loshchilov & Hutter 2019, arXiv:1711.05101) with the given lr, betas, eps
  and decoupled weight decay. Official Kandinsky 5 LoRA example: lr 1e-4, wd 0.001, betas (0.9, 0.95), eps 1e-8
  (k5.md §8).
- ``"adamw8bit"``: ``bitsandbytes.optim.AdamW8bit`` (Dettmers et al. 2022, arXiv:2110.02861; musubi-tuner's
  documented choice), same hyperparameters. bitsandbytes is optional: without it an ``ImportError`` says how to
  install it.
- ``"adafactor"``: ``transformers.optimization.Adafactor`` (Shazeer & Stern 2018, arXiv:1804.04235) with an
  external learning rate: ``relative_step=False``, ``scale_parameter=False``, ``warmup_init=False`` (the settings
  the transformers documentation gives for "use Adafactor with a fixed learning rate", so the schedule below is the
  only thing that changes the step size), ``weight_decay`` as given. ``betas`` and ``eps`` do not apply (Adafactor
  keeps its own ``eps=(1e-30, 1e-3)``, ``decay_rate=-0.8``, ``clip_threshold=1.0`` and no first moment).

Schedules (``torch.optim.lr_scheduler.LambdaLR``; lr = base lr · λ(s), where ``s`` = number of optimizer steps
already taken, so the first step uses λ(0)); W = warmup steps, N = total optimizer steps:

- warm-up part, for s < W: ``λ(s) = (s + 1) / W`` — linear ramp reaching the full lr on step W. This is the
  transformers/diffusers ramp ``s / W`` shifted by one step, so no step is spent at lr 0.
- ``"constant"``: λ = 1 (no warm-up; ``warmup_steps > 0`` is rejected by the trainer's config check).
- ``"constant_with_warmup"``: ramp, then 1 (the official K5 LoRA example: constant with 500 warm-up steps).
- ``"linear"``: ramp, then ``max(0, (N − s) / max(1, N − W))`` (transformers ``get_linear_schedule_with_warmup``).
- ``"cosine"``: ramp, then ``0.5·(1 + cos(π·p))``, ``p = min(1, (s − W) / max(1, N − W))`` (half a cosine
  period, transformers ``get_cosine_schedule_with_warmup`` with ``num_cycles = 0.5``; Loshchilov & Hutter 2017,
  arXiv:1608.03983, without restarts).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

#: Optimizer names accepted by :func:`make_optimizer`.
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "adafactor")
#: Schedule names accepted by :func:`lr_multiplier` / :func:`make_scheduler`.
LR_SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "cosine", "linear")


def _check_schedule(schedule: str, warmup_steps: int, max_steps: int) -> None:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {schedule!r}.")
    for name, v, low in (("warmup_steps", warmup_steps, 0), ("max_steps", max_steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer ≥ {low}; got {v!r}.")


def lr_multiplier(schedule: str, step: int, *, warmup_steps: int, max_steps: int) -> float:
    """The factor λ(s) applied to the base learning rate for the optimizer step with index ``step``.

    Args:
        schedule: one of :data:`LR_SCHEDULES`.
        step: s ≥ 0, the number of optimizer steps already taken (0 for the first step).
        warmup_steps: W ≥ 0 (ignored by ``"constant"``).
        max_steps: N ≥ 1, the total number of optimizer steps of the run.

    Returns:
        λ(s) in [0, 1] (formulas in the module docstring).

    Raises:
        ValueError: unknown schedule, negative step, bad W or N.
    """
    _check_schedule(schedule, warmup_steps, max_steps)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer ≥ 0; got {step!r}.")
    if schedule == "constant":
        return 1.0
    W, N = warmup_steps, max_steps
    if step < W:
        return (step + 1) / W
    if schedule == "constant_with_warmup":
        return 1.0
    if schedule == "linear":
        return max(0.0, (N - step) / max(1, N - W))
    progress = min(1.0, (step - W) / max(1, N - W))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, warmup_steps: int,
                   max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`; call ``scheduler.step()`` once after each optimizer step.

    The lambda is a plain closure, so ``scheduler.state_dict()`` stores only counters and base lrs (a resumed run
    rebuilds the lambda from its own config).

    Raises:
        ValueError: as :func:`lr_multiplier`.
    """
    _check_schedule(schedule, warmup_steps, max_steps)

    def factor(step: int) -> float:
        return lr_multiplier(schedule, step, warmup_steps=warmup_steps, max_steps=max_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """Build one of :data:`OPTIMIZERS` over ``params`` (see the module docstring for the settings).

    Args:
        params: the trainable parameters (LoRA down/up), float32 or bfloat16, on the training device.
        name: ``"adamw"``, ``"adamw8bit"`` or ``"adafactor"``.
        lr: base learning rate > 0. weight_decay: ≥ 0 (decoupled). betas, eps: Adam moments and epsilon.

    Returns:
        The optimizer (one param group).

    Raises:
        ValueError: unknown name or bad hyperparameters.
        ImportError: ``"adamw8bit"`` without bitsandbytes (message: ``pip install bitsandbytes``), or
            ``"adafactor"`` without transformers.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning_rate must be a finite number > 0 (e.g. 1e-4); got {lr!r}.")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number ≥ 0; got {weight_decay!r}.")
    params = list(params)
    if not params:
        raise ValueError("No trainable parameters were given to the optimizer.")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("The 'adamw8bit' optimizer needs bitsandbytes, which is not installed: "
                              "pip install bitsandbytes (needs a CUDA GPU), or choose the 'adamw' or 'adafactor' "
                              "optimizer.") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    try:
        from transformers.optimization import Adafactor
    except ImportError as e:
        raise ImportError("The 'adafactor' optimizer comes from transformers: pip install transformers, or choose "
                          "'adamw'.") from e
    return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                     weight_decay=weight_decay)
