"""Training σ sampling, one σ per sample, from the run's generator, and the per-sample loss weighting w(σ).

Methods (:data:`~cinetune.training.config.TIMESTEP_SAMPLING`), each followed by the flow shift
``σ' = kσ / (1 + (k − 1)σ)`` with k = ``flow_shift`` (:func:`~cinetune.core.flow.shift_sigmas`; k = 1 leaves σ as
drawn):

- ``"shift"`` (kohya-ss/musubi-tuner ``--timestep_sampling shift``): ``σ = sigmoid(sigmoid_scale · n)``, n ~ N(0, 1).
- ``"logit_normal"`` (official Kandinsky 5; Esser et al. 2024, arXiv:2403.03206 §3.1): ``σ = sigmoid(n)``
  (:func:`~cinetune.core.flow.logit_normal_sigmas`).
- ``"uniform"``: σ ~ U[0, 1).
- ``"shifted_logit_normal"`` (Lightricks/LTX-2 ``packages/ltx-trainer/src/ltx_trainer/timestep_samplers.py``
  ``ShiftedLogitNormalTimestepSampler``, the ltx-trainer default): ``σ = sigmoid(μ + n)`` with μ linear in the
  video token count, ``μ = 0.95 + (2.05 − 0.95)·(tokens − 1024)/(4096 − 1024)``, not clamped
  (:func:`~cinetune.core.flow.token_count_shift`). Use it with k = 1, as ltx-trainer does.

Each method consumes B draws of the generator (normal, or uniform for ``"uniform"``).

**σ range** [σ_min, σ_max] (musubi-tuner ``--min_timestep`` / ``--max_timestep`` divided by 1000, in its default
mode without ``--preserve_distribution_shape``; ``training/trainer_base.py`` ``get_noisy_model_input_and_timesteps``):
the shifted σ is mapped affinely, ``σ'' = σ_min + (σ_max − σ_min)·σ'``. The shape of the distribution is squeezed
into the range rather than cut, and no extra draws are made, so the run's random stream is the same as without a
range. The full range (0, 1) leaves σ untouched.

**Loss weighting** (:data:`~cinetune.training.config.LOSS_WEIGHTINGS`; musubi-tuner ``--weighting_scheme``,
``training/timesteps.py`` ``compute_loss_weighting_for_sd3``, the same as huggingface/diffusers
``src/diffusers/training_utils.py`` ``compute_loss_weighting_for_sd3``; Esser et al. 2024, arXiv:2403.03206 §3.1):
each sample's squared error is multiplied by w(σ) of its σ before the mean,

- ``"none"``: w = 1 (the plain mean; the official Kandinsky 5 and ltx-trainer objective);
- ``"sigma_sqrt"``: ``w = σ⁻²``, with σ clamped to ≥ :data:`SIGMA_WEIGHT_FLOOR` so σ = 0 stays finite (musubi's
  discrete schedule never reaches below σ = 1/1000 either);
- ``"cosmap"``: ``w = 2 / (π·(1 − 2σ + 2σ²))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.flow import logit_normal_sigmas, shift_sigmas, token_count_shift
from .config import LOSS_WEIGHTINGS, TIMESTEP_SAMPLING, TrainingError, check_choice

__all__ = ["SIGMA_WEIGHT_FLOOR", "sample_sigmas", "loss_weights", "weighted_mse"]

#: Smallest σ used in the ``"sigma_sqrt"`` weight (musubi-tuner's smallest discrete σ, 1/1000).
SIGMA_WEIGHT_FLOOR = 1e-3


def sample_sigmas(method: str, batch: int, *, flow_shift: float, sigmoid_scale: float = 1.0,
                  generator: torch.Generator, tokens: int | None = None, sigma_min: float = 0.0,
                  sigma_max: float = 1.0) -> Tensor:
    """Training sigmas, one per sample (formulas in the module notes), from ``generator``.

    Args:
        method: one of :data:`~cinetune.training.config.TIMESTEP_SAMPLING`. batch: B ≥ 1. flow_shift: k > 0.
        sigmoid_scale: > 0 (``"shift"``). generator: a CPU ``torch.Generator`` (consumed: B draws).
        tokens: video tokens per sample after patchifying (``"shifted_logit_normal"`` only).
        sigma_min, sigma_max: the σ range, 0 ≤ σ_min < σ_max ≤ 1 (module notes).

    Returns:
        ``[B]`` float32 on the CPU, in [sigma_min, sigma_max].

    Raises:
        TrainingError: unknown method; ``"shifted_logit_normal"`` without a token count; a bad σ range.
        ValueError: bad batch or shift (from :mod:`cinetune.core.flow`).
    """
    check_choice("timestep_sampling", method, TIMESTEP_SAMPLING)
    if not 0.0 <= sigma_min < sigma_max <= 1.0:
        raise TrainingError(f"The σ range must satisfy 0 ≤ sigma_min < sigma_max ≤ 1; got [{sigma_min}, "
                            f"{sigma_max}].")
    if method == "logit_normal":
        sigma = logit_normal_sigmas(batch, shift=flow_shift, generator=generator)
    elif method == "shifted_logit_normal":
        if tokens is None:
            raise TrainingError("timestep_sampling 'shifted_logit_normal' needs the video token count of the batch; "
                                "this model family does not report one. Choose 'logit_normal' or 'shift'.")
        sigma = logit_normal_sigmas(batch, mean=token_count_shift(tokens), shift=flow_shift, generator=generator)
    else:
        if method == "shift":
            sigma = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator, dtype=torch.float32))
        else:
            sigma = torch.rand(batch, generator=generator, dtype=torch.float32)
        sigma = shift_sigmas(sigma, flow_shift)
    if (sigma_min, sigma_max) != (0.0, 1.0):
        sigma = sigma_min + (sigma_max - sigma_min) * sigma
    return sigma


def loss_weights(weighting: str, sigma: Tensor) -> Tensor | None:
    """The per-sample loss weights w(σ) (formulas in the module notes).

    Args:
        weighting: one of :data:`~cinetune.training.config.LOSS_WEIGHTINGS`.
        sigma: ``[B]`` float σ in [0, 1].

    Returns:
        ``[B]`` float32 on ``sigma``'s device, or None for ``"none"`` (no weighting).

    Raises:
        TrainingError: unknown weighting.
    """
    check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
    if weighting == "none":
        return None
    s = sigma.float()
    if weighting == "sigma_sqrt":
        return s.clamp(min=SIGMA_WEIGHT_FLOOR) ** -2.0
    return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s * s))


def weighted_mse(pred: Tensor, target: Tensor, sigma: Tensor, weighting: str = "none", *,
                 keep: Tensor | None = None) -> Tensor:
    """The flow-matching loss of a micro-batch: the mean squared error, each sample weighted by w(σ), over the kept
    elements.

    ``mean(w_b · m · (pred − target)²) / mean(m)``, in float32, where w_b = :func:`loss_weights` of sample b's σ
    (1 for ``"none"``) and m = ``keep`` (1 everywhere when None). Without weighting and mask this is exactly
    ``F.mse_loss(pred.float(), target.float())``.

    Args:
        pred, target: ``[B, …]`` the model's prediction and the velocity target (any float dtype).
        sigma: ``[B]`` the samples' σ. weighting: one of :data:`~cinetune.training.config.LOSS_WEIGHTINGS`.
        keep: float mask broadcastable to ``pred`` (1 = counts in the loss), or None.

    Returns:
        0-dim float32 tensor.

    Raises:
        TrainingError: unknown weighting. ValueError: ``sigma`` is not ``[B]``.
    """
    weights = loss_weights(weighting, sigma)
    pred, target = pred.float(), target.float()
    if weights is None and keep is None:
        return F.mse_loss(pred, target)
    se = (pred - target).square()
    if weights is not None:
        if weights.shape != (pred.shape[0],):
            raise ValueError(f"sigma must be [B] = [{pred.shape[0]}], one per sample; got {list(sigma.shape)}.")
        se = se * weights.to(se.device).view(-1, *([1] * (se.ndim - 1)))
    if keep is None:
        return se.mean()
    return (se * keep).mean() / keep.mean()
