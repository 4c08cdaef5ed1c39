"""Training σ sampling, one σ per sample, from the run's generator.

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.flow import logit_normal_sigmas, shift_sigmas, token_count_shift
from .config import TIMESTEP_SAMPLING, TrainingError, check_choice

__all__ = ["sample_sigmas"]


def sample_sigmas(method: str, batch: int, *, flow_shift: float, sigmoid_scale: float = 1.0,
                  generator: torch.Generator, tokens: int | None = None) -> Tensor:
    """Training sigmas, one per sample (formulas in the module notes), from ``generator``.

    Args:
        method: one of :data:`~cinetune.training.config.TIMESTEP_SAMPLING`. batch: B ≥ 1. flow_shift: k > 0.
        sigmoid_scale: > 0 (``"shift"``). generator: a CPU ``torch.Generator`` (consumed: B draws).
        tokens: video tokens per sample after patchifying (``"shifted_logit_normal"`` only).

    Returns:
        ``[B]`` float32 on the CPU, in [0, 1].

    Raises:
        TrainingError: unknown method; ``"shifted_logit_normal"`` without a token count.
        ValueError: bad batch or shift (from :mod:`cinetune.core.flow`).
    """
    check_choice("timestep_sampling", method, TIMESTEP_SAMPLING)
    if method == "logit_normal":
        return logit_normal_sigmas(batch, shift=flow_shift, generator=generator)
    if method == "shifted_logit_normal":
        if tokens is None:
            raise TrainingError("timestep_sampling 'shifted_logit_normal' needs the video token count of the batch; "
                                "this model family does not report one. Choose 'logit_normal' or 'shift'.")
        return logit_normal_sigmas(batch, mean=token_count_shift(tokens), shift=flow_shift, generator=generator)
    if method == "shift":
        sigma = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator, dtype=torch.float32))
    else:
        sigma = torch.rand(batch, generator=generator, dtype=torch.float32)
    return shift_sigmas(sigma, flow_shift)
