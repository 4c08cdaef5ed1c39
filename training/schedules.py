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
- ``"prodigy"``: ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2024, arXiv:2306.06101): Adam whose step size D is
  estimated on the fly; the learning rate is a multiplier of D and is usually 1.0. Given lr, betas, eps, weight
  decay (decoupled, ``decouple=True``), ``d_coef`` (the package's preferred tuning knob) and ``safeguard_warmup``
  (the package recommends it with a warm-up); everything else at the package's defaults. Optional package:
  ``pip install prodigyopt``.
- ``"adamw_schedulefree"``: ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024, arXiv:2405.15682) with lr,
  betas, eps and weight decay; its own ``warmup_steps`` stays 0 because the warm-up ramp below is the same
  ``(s + 1) / W`` ramp. It needs no decaying schedule (the trainer's config refuses ``"cosine"``/``"linear"``
  with it). The parameters it trains (y) are not the weights it has learnt (x): the package's rule is to call
  ``optimizer.train()`` before training steps and ``optimizer.eval()`` before evaluation and before saving, see
  :func:`evaluation_weights`. Optional package: ``pip install schedulefree``.

Schedules (``torch.optim.lr_scheduler.LambdaLR``; lr = base lr · λ(s), where ``s`` = number of optimizer steps
already taken, so the first step uses λ(0)); W = warmup steps, N = total optimizer steps, r = ``min_lr_ratio``:

- warm-up part, for s < W: ``λ(s) = (s + 1) / W`` — linear ramp reaching the full lr on step W. This is the
  transformers/diffusers ramp ``s / W`` shifted by one step, so no step is spent at lr 0.
- ``"constant"``: λ = 1 (no warm-up; ``warmup_steps > 0`` is rejected by the trainer's config check).
- ``"constant_with_warmup"``: ramp, then 1 (the official K5 LoRA example: constant with 500 warm-up steps).
- ``"linear"``: ramp, then ``r + (1 − r)·max(0, (N − s) / max(1, N − W))`` (transformers
  ``get_linear_schedule_with_warmup``, with the floor below).
- ``"cosine"``: ramp, then ``r + (1 − r)·0.5·(1 + cos(π·p))``, ``p = min(1, (s − W) / max(1, N − W))`` (half a
  cosine period, transformers ``get_cosine_schedule_with_warmup`` with ``num_cycles = 0.5``; Loshchilov & Hutter
  2017, arXiv:1608.03983, without restarts).
- the floor r ∈ [0, 1] (musubi-tuner ``--lr_scheduler_min_lr_ratio``): the decay ends at ``learning_rate · r``
  instead of 0, as transformers ``get_cosine_with_min_lr_schedule_with_warmup`` (``min_lr_rate``) maps the factor
  f to ``r + (1 − r)·f``. r = 0 gives the plain schedules exactly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

#: Optimizer names accepted by :func:`make_optimizer`.
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "adafactor", "prodigy", "adamw_schedulefree")
#: Schedule names accepted by :func:`lr_multiplier` / :func:`make_scheduler`.
LR_SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "cosine", "linear")
#: Schedules that decay after the warm-up (the ones ``min_lr_ratio`` applies to).
DECAYING_SCHEDULES: tuple[str, ...] = ("cosine", "linear")


def _check_schedule(schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> None:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {schedule!r}.")
    for name, v, low in (("warmup_steps", warmup_steps, 0), ("max_steps", max_steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer ≥ {low}; got {v!r}.")
    if not (isinstance(min_lr_ratio, (int, float)) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be a number in [0, 1]; got {min_lr_ratio!r}.")


def lr_multiplier(schedule: str, step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The factor λ(s) applied to the base learning rate for the optimizer step with index ``step``.

    Args:
        schedule: one of :data:`LR_SCHEDULES`.
        step: s ≥ 0, the number of optimizer steps already taken (0 for the first step).
        warmup_steps: W ≥ 0 (ignored by ``"constant"``).
        max_steps: N ≥ 1, the total number of optimizer steps of the run.
        min_lr_ratio: r ∈ [0, 1], the floor of the ``"cosine"`` and ``"linear"`` decay (ignored by the others).

    Returns:
        λ(s) in [0, 1] (formulas in the module docstring).

    Raises:
        ValueError: unknown schedule, negative step, bad W, N or r.
    """
    _check_schedule(schedule, warmup_steps, max_steps, min_lr_ratio)
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
        decay = max(0.0, (N - step) / max(1, N - W))
    else:
        progress = min(1.0, (step - W) / max(1, N - W))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, warmup_steps: int,
                   max_steps: int, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`; call ``scheduler.step()`` once after each optimizer step.

    The lambda is a plain closure, so ``scheduler.state_dict()`` stores only counters and base lrs (a resumed run
    rebuilds the lambda from its own config).

    Raises:
        ValueError: as :func:`lr_multiplier`.
    """
    _check_schedule(schedule, warmup_steps, max_steps, min_lr_ratio)

    def factor(step: int) -> float:
        return lr_multiplier(schedule, step, warmup_steps=warmup_steps, max_steps=max_steps,
                             min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optional(module: str, name: str, package: str):
    """``module.name`` from an optional package, or an ImportError with the pip install line."""
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError as e:
        raise ImportError(f"The optimizer needs the {package} package, which is not installed: pip install "
                          f"{package} (into the Python environment ComfyUI runs in), or choose the 'adamw' "
                          "optimizer.") from e


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, *, lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float, d_coef: float = 1.0,
                   safeguard_warmup: bool = False) -> torch.optim.Optimizer:
    """Build one of :data:`OPTIMIZERS` over ``params`` (see the module docstring for the settings).

    Args:
        params: the trainable parameters (LoRA down/up), float32 or bfloat16, on the training device.
        name: one of :data:`OPTIMIZERS`.
        lr: base learning rate > 0 (Prodigy: a multiplier of its estimated step size, usually 1.0).
        weight_decay: ≥ 0 (decoupled). betas, eps: Adam moments and epsilon.
        d_coef, safeguard_warmup: Prodigy only (``prodigyopt.Prodigy`` arguments of the same names).

    Returns:
        The optimizer (one param group).

    Raises:
        ValueError: unknown name or bad hyperparameters.
        ImportError: the optimizer's optional package is missing; the message has the ``pip install`` line
            (bitsandbytes for ``"adamw8bit"``, prodigyopt for ``"prodigy"``, schedulefree for
            ``"adamw_schedulefree"``, transformers for ``"adafactor"``).
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
    if name == "prodigy":
        prodigy = _optional("prodigyopt", "Prodigy", "prodigyopt")
        return prodigy(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decouple=True,
                       d_coef=d_coef, safeguard_warmup=bool(safeguard_warmup))
    if name == "adamw_schedulefree":
        schedule_free = _optional("schedulefree", "AdamWScheduleFree", "schedulefree")
        return schedule_free(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup_steps=0)
    try:
        from transformers.optimization import Adafactor
    except ImportError as e:
        raise ImportError("The 'adafactor' optimizer comes from transformers: pip install transformers, or choose "
                          "'adamw'.") from e
    return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                     weight_decay=weight_decay)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps train-mode and evaluation weights apart (the schedulefree optimizers, which have
    ``train()`` and ``eval()`` methods)."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


@contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer,
                       params: Sequence[torch.nn.Parameter]) -> Iterator[list[torch.Tensor] | None]:
    """Inside the context the parameters hold the weights to evaluate and save; afterwards training continues
    exactly where it was.

    For a schedule-free optimizer this calls ``optimizer.eval()`` (parameters become the averaged weights x, and
    ``optimizer.state_dict()`` is the one to save, as the package documents) and on exit ``optimizer.train()``; the
    train-mode parameters y are copied back bit for bit, because ``train()`` recomputes y from x and z with
    rounding. For every other optimizer it does nothing.

    Yields:
        The train-mode parameters y (copies, in ``params`` order) for a schedule-free optimizer — save them with its
        state and hand them to :func:`restore_train_weights` when resuming — else None.
    """
    if not is_schedule_free(optimizer):
        yield None
        return
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield saved
    finally:
        restore_train_weights(optimizer, params, saved)


def restore_train_weights(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                          weights: Sequence[torch.Tensor] | None) -> None:
    """Put a schedule-free optimizer in train mode with the train-mode parameters ``weights`` (in ``params``
    order; None: as ``optimizer.train()`` computes them). Does nothing for other optimizers.

    Raises:
        ValueError: ``weights`` does not match ``params`` in number or shapes.
    """
    if not is_schedule_free(optimizer):
        return
    optimizer.train()
    if weights is None:
        return
    if len(weights) != len(params) or any(w.shape != p.shape for w, p in zip(weights, params)):
        raise ValueError("The saved train-mode weights do not match the LoRA parameters (another rank or targets).")
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
