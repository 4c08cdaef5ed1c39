"""Flow-matching math shared by every model family, for inference and training.

Conventions (rectified flow, as used by Kandinsky 5 and LTX-2):

- sigma σ ∈ [0, 1], σ = 1 is pure noise, σ = 0 the clean sample;
- noisy sample ``x_σ = (1 − σ)·x0 + σ·ε`` with ε ~ N(0, I);
- the network predicts the velocity ``v = dx_σ/dσ = ε − x0``;
- DiTs receive ``timestep = 1000·σ``.

Sources: Liu et al. 2022, "Flow Straight and Fast" (arXiv 2209.03003) for the straight path and
velocity; Esser et al. 2024, "Scaling Rectified Flow Transformers" (arXiv 2403.03206, §5.3.2) for the
timestep shift (§5.3.2); kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` (``generate``) for the
sampling grid, the Euler update and classifier-free guidance.

Sigmas may be a Python float or a tensor. A 1-D tensor of length B is broadcast per sample over the
remaining dimensions of a ``[B, ...]`` tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "shift_sigmas",
    "sigma_schedule",
    "euler_step",
    "apply_cfg",
    "add_noise",
    "velocity_target",
    "logit_normal_sigmas",
]


def _check_shift(shift: float) -> float:
    shift = float(shift)
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"flow shift must be a finite number > 0 (1 = no shift; K5 uses 5 or 10), got {shift}")
    return shift


def _per_sample(sigma: float | Tensor, like: Tensor, name: str = "sigma") -> float | Tensor:
    """``sigma`` as a float, or as a tensor broadcastable against ``like`` ([B] → [B, 1, 1, ...])."""
    if not isinstance(sigma, Tensor):
        return float(sigma)
    if sigma.ndim == 0:
        return sigma.to(like.device)
    if sigma.ndim == 1:
        if like.ndim == 0 or sigma.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"{name} has {sigma.shape[0]} values but the tensor has batch size "
                f"{like.shape[0] if like.ndim else 'none'}: pass one {name} per sample or a single float"
            )
        return sigma.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))
    if sigma.ndim == like.ndim:
        return sigma.to(like.device)
    raise ValueError(
        f"{name} must be a float, a scalar tensor, a [B] tensor or a tensor with the same number of "
        f"dimensions as the sample ({like.ndim}); got shape {tuple(sigma.shape)}"
    )


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Apply the flow shift ``σ' = k·σ / (1 + (k − 1)·σ)`` elementwise.

    ``k > 1`` moves sigmas towards 1 (more steps spent at high noise), ``k = 1`` is the identity.
    0 and 1 are fixed points. This is K5's ``scheduler_scale`` and ComfyUI's flow ``shift``.

    Args:
        sigmas: any shape, floating dtype, values in [0, 1].
        shift: k > 0.

    Returns:
        Tensor of the same shape and dtype.

    Raises:
        ValueError: ``shift`` not finite and > 0.
        TypeError: ``sigmas`` is not a floating tensor.

    Source: Esser et al. 2024 (arXiv 2403.03206) §5.3.2, shift factor α = k; kandinskylab/kandinsky-5
    ``kandinsky/generation_utils.py`` (``generate``: ``scale·t / (1 + (scale − 1)·t)``).
    """
    k = _check_shift(shift)
    if not isinstance(sigmas, Tensor) or not sigmas.is_floating_point():
        raise TypeError("sigmas must be a floating-point tensor")
    return k * sigmas / (1.0 + (k - 1.0) * sigmas)


def sigma_schedule(steps: int, shift: float) -> Tensor:
    """The official Kandinsky 5 sampling grid: ``linspace(1, 0, steps + 1)``, then :func:`shift_sigmas`.

    Args:
        steps: number of Euler steps N ≥ 1 (the model is evaluated at the first N sigmas).
        shift: flow shift k > 0 (K5 ``scheduler_scale``).

    Returns:
        ``[steps + 1]`` float32, strictly decreasing, exactly 1.0 first and 0.0 last. Computed in
        float64 and rounded once, so values do not depend on the device.

    Raises:
        ValueError: ``steps`` < 1 or not an integer; bad ``shift``.

    Source: kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` (``generate``). Note that
    diffusers' ``FlowMatchEulerDiscreteScheduler`` uses a slightly different grid.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = shift_sigmas(grid, shift).to(torch.float32)
    # Pinned so the guarantee does not rest on rounding of k·1/(1 + (k−1)·1).
    sigmas[0] = 1.0
    sigmas[-1] = 0.0
    return sigmas


def euler_step(x: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """One Euler step of the flow ODE ``dx/dσ = v``: ``x + (σ_next − σ)·v``.

    Sampling goes from σ = 1 towards 0, so ``σ_next − σ`` is negative.

    Args:
        x: current sample ``[B, ...]`` (any layout).
        velocity: predicted velocity ``ε − x0``, same shape as ``x``.
        sigma, sigma_next: floats, scalar tensors or ``[B]`` tensors (per sample).

    Returns:
        The sample at ``sigma_next``, same shape as ``x``, dtype from type promotion of the inputs.

    Raises:
        ValueError: shape mismatch between ``x`` and ``velocity`` or between sigmas and batch.

    Source: kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` (``generate``:
    ``img += timestep_diff · pred_velocity``).
    """
    _same_shape(x, velocity, "x and velocity")
    s = _per_sample(sigma, x, "sigma")
    s_next = _per_sample(sigma_next, x, "sigma_next")
    return x + (s_next - s) * velocity


def apply_cfg(v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance: ``v_u + w·(v_c − v_u)``.

    ``w = 1`` returns ``v_cond`` (callers should then skip the unconditional forward entirely).

    Args:
        v_cond, v_uncond: predictions with the positive and the negative prompt, same shape.
        guidance: w, a finite float.

    Returns:
        Tensor of the same shape.

    Raises:
        ValueError: shape mismatch or non-finite ``guidance``.

    Source: Ho & Salimans 2022 (arXiv 2207.12598) §3.2 (their 1 + w is w here), applied to
    velocities as in
    kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` (``get_velocity``).
    """
    _same_shape(v_cond, v_uncond, "v_cond and v_uncond")
    w = float(guidance)
    if not math.isfinite(w):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    return v_uncond + w * (v_cond - v_uncond)


def add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """Point on the straight path: ``x_σ = (1 − σ)·x0 + σ·ε``.

    Args:
        x0: clean sample ``[B, ...]``.
        noise: ε, same shape.
        sigma: float, scalar tensor or ``[B]`` tensor (one σ per sample).

    Returns:
        Tensor of the same shape.

    Raises:
        ValueError: shape mismatch.

    Source: Liu et al. 2022 (arXiv 2209.03003) §2 (linear interpolation) with t = 1 − σ.
    """
    _same_shape(x0, noise, "x0 and noise")
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Training target of the velocity prediction: ``v = ε − x0`` (= d x_σ / dσ).

    Raises:
        ValueError: shape mismatch.

    Source: Liu et al. 2022 (arXiv 2209.03003); kandinsky-5 LoRA training (``noise − latent``).
    """
    _same_shape(x0, noise, "x0 and noise")
    return noise - x0


def logit_normal_sigmas(batch: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                        generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """Training sigmas: ``σ = sigmoid(mean + std·n)``, n ~ N(0, 1), then :func:`shift_sigmas` with ``shift``.

    Args:
        batch: number of sigmas (one per training sample) ≥ 1.
        mean, std: location and scale of the logit-normal distribution (std > 0).
        shift: flow shift k > 0 applied after sampling (1 = none).
        generator: optional generator for reproducible draws (its device must match ``device``).

    Returns:
        ``[batch]`` float32 in (0, 1).

    Raises:
        ValueError: bad ``batch``, ``std`` or ``shift``.

    Source: Esser et al. 2024 (arXiv 2403.03206) §3.1 "logit-normal sampling"; official K5 LoRA
    training draws ``sigmoid(N(0, 1))`` and shifts it with ``scheduler_scale``.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer ≥ 1, got {batch!r}")
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"std must be a finite number > 0, got {std}")
    n = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
    return shift_sigmas(torch.sigmoid(mean + std * n), shift)
