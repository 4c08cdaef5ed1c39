"""Flow-matching math shared by every model family, for inference and training.

Conventions (rectified flow, as used by Kandinsky 5 and LTX-2):

- sigma σ ∈ [0, 1], σ = 1 is pure noise, σ = 0 the clean sample;
- noisy sample ``x_σ = (1 − σ)·x0 + σ·ε`` with ε ~ N(0, I);
- the network predicts the velocity ``v = dx_σ/dσ = ε − x0``;
- DiTs receive ``timestep = 1000·σ``.

Sources: Liu et al. 2022, "Flow Straight and Fast" (arXiv 2209.03003) for the straight path and
velocity; Esser et al. 2024, "Scaling Rectified Flow Transformers" (arXiv 2403.03206, §5.3.2) for the
timestep shift (§5.3.2); kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` (``generate``) for the
sampling grid, the Euler update and classifier-free guidance; Lightricks/LTX-2
``packages/ltx-core/src/ltx_core/components/schedulers.py`` (``LTX2Scheduler``) for the token-count
dependent shift and the stretch to a terminal sigma.

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
    "token_count_shift",
    "exponential_time_shift",
    "stretch_to_terminal",
    "token_shift_sigmas",
    "euler_step",
    "x0_from_velocity",
    "velocity_from_x0",
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


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")


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
    _check_steps(steps)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = shift_sigmas(grid, shift).to(torch.float32)
    # Pinned so the guarantee does not rest on rounding of k·1/(1 + (k−1)·1).
    sigmas[0] = 1.0
    sigmas[-1] = 0.0
    return sigmas


def token_count_shift(tokens: int, *, base_tokens: int = 1024, max_tokens: int = 4096,
                      base_shift: float = 0.95, max_shift: float = 2.05) -> float:
    """Shift μ as a linear function of the number of latent tokens.

    ``μ = tokens·m + b`` with the line through ``(base_tokens, base_shift)`` and
    ``(max_tokens, max_shift)``: ``m = (max_shift − base_shift)/(max_tokens − base_tokens)``,
    ``b = base_shift − m·base_tokens``. Token counts outside the two anchors extrapolate the line.
    The defaults are the LTX-2 values; μ is meant for :func:`exponential_time_shift`.

    Args:
        tokens: number of latent tokens (e.g. frames·height·width of the latent), ≥ 1.
        base_tokens, max_tokens: the two anchor token counts (different from each other).
        base_shift, max_shift: μ at the two anchors (finite).

    Returns:
        μ as a Python float.

    Raises:
        ValueError: ``tokens`` not an integer ≥ 1, equal anchors, non-finite shifts.

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/schedulers.py``
    (``LTX2Scheduler.execute``); comfyanonymous/ComfyUI ``comfy_extras/nodes_lt.py`` (``LTXVScheduler``,
    which counts the tokens of a wired latent as the product of its [T, H, W] sizes).
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an integer ≥ 1 (the latent's token count), got {tokens!r}")
    if base_tokens == max_tokens:
        raise ValueError(f"base_tokens and max_tokens must differ to define the shift line, both are {base_tokens}")
    for name, value in (("base_shift", base_shift), ("max_shift", max_shift)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value}")
    slope = (float(max_shift) - float(base_shift)) / (max_tokens - base_tokens)
    return tokens * slope + (float(base_shift) - slope * base_tokens)


def exponential_time_shift(sigmas: Tensor, mu: float) -> Tensor:
    """Exponential time shift ``σ' = e^μ / (e^μ + (1/σ − 1))`` elementwise, with σ = 0 mapped to 0.

    This is :func:`shift_sigmas` with ``k = e^μ`` (multiply numerator and denominator by σ), and is
    computed that way, so 0 needs no special case. ``μ = 0`` is the identity.

    Args:
        sigmas: any shape, floating dtype, values in [0, 1].
        mu: finite shift exponent (e.g. from :func:`token_count_shift`); ``e^μ`` must be finite and > 0.

    Returns:
        Tensor of the same shape and dtype.

    Raises:
        ValueError: ``mu`` not finite or so large that ``e^μ`` overflows / underflows.
        TypeError: ``sigmas`` is not a floating tensor.

    Source: Esser et al. 2024 (arXiv 2403.03206) §5.3.2 (resolution-dependent shift); Lightricks/LTX-2
    ``packages/ltx-core/src/ltx_core/components/schedulers.py`` (``LTX2Scheduler``, ``power = 1``);
    huggingface/diffusers ``schedulers/scheduling_flow_match_euler_discrete.py``
    (``_time_shift_exponential``).
    """
    mu = float(mu)
    k = math.exp(mu) if math.isfinite(mu) and abs(mu) < 700 else math.nan
    if not math.isfinite(k) or k <= 0:
        raise ValueError(f"mu must be a finite number with |mu| < 700 (LTX-2 uses 0.95…2.05), got {mu}")
    return shift_sigmas(sigmas, k)


def stretch_to_terminal(sigmas: Tensor, terminal: float) -> Tensor:
    """Stretch a schedule so that its last nonzero sigma becomes ``terminal``; zeros stay zero.

    Each nonzero σ becomes ``1 − (1 − σ)·(1 − terminal)/(1 − σ_last)`` where ``σ_last`` is the last
    nonzero value: an affine map of ``1 − σ`` that keeps 1 at 1 and the order of the values.

    Args:
        sigmas: 1-D floating tensor in [0, 1], decreasing, with at least one nonzero value below 1.
        terminal: the new last nonzero sigma, 0 < terminal < 1.

    Returns:
        Tensor of the same shape and dtype.

    Raises:
        ValueError: not 1-D, ``terminal`` out of (0, 1), no nonzero sigma, or the last nonzero sigma
            is 1 (nothing to stretch, e.g. a 1-step schedule).
        TypeError: ``sigmas`` is not a floating tensor.

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/schedulers.py``
    (``LTX2Scheduler``, ``stretch``); huggingface/diffusers
    ``schedulers/scheduling_flow_match_euler_discrete.py`` (``stretch_shift_to_terminal``).
    """
    if not isinstance(sigmas, Tensor) or not sigmas.is_floating_point():
        raise TypeError("sigmas must be a floating-point tensor")
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D schedule, got shape {tuple(sigmas.shape)}")
    terminal = float(terminal)
    if not 0.0 < terminal < 1.0:
        raise ValueError(f"terminal must be in (0, 1) (LTX-2 uses 0.1), got {terminal}")
    nonzero = sigmas != 0
    if not bool(nonzero.any()):
        raise ValueError("sigmas has no nonzero value to stretch")
    last = sigmas[nonzero][-1]
    if float(last) >= 1.0:
        raise ValueError("the last nonzero sigma is 1, so the schedule cannot be stretched to a terminal value; "
                         "use at least 2 steps or disable stretching")
    stretched = 1.0 - (1.0 - sigmas) * ((1.0 - terminal) / (1.0 - last))
    return torch.where(nonzero, stretched, sigmas)


def token_shift_sigmas(steps: int, *, tokens: int | None = None, base_shift: float = 0.95,
                       max_shift: float = 2.05, base_tokens: int = 1024, max_tokens: int = 4096,
                       terminal: float = 0.1, stretch: bool = True) -> Tensor:
    """Sampling grid with a token-count dependent exponential shift and a stretch to ``terminal``.

    ``σ = linspace(1, 0, steps + 1)`` → :func:`exponential_time_shift` with
    ``μ = token_count_shift(tokens, …)`` → if ``stretch``, :func:`stretch_to_terminal` (the last
    nonzero sigma becomes ``terminal``) → the final 0 is kept.

    ``tokens=None`` uses ``tokens = max_tokens`` (μ = ``max_shift``, 2.05 with the defaults): this is
    what the official LTX-2 pipelines do, since they call the scheduler without a latent. Pass the
    latent's token count to get ComfyUI's ``LTXVScheduler`` with a latent wired in.

    The same sigmas as diffusers' ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True,
    shift_terminal=terminal)`` given ``sigmas = linspace(1, 1/steps, steps)`` and ``mu`` (diffusers
    appends the 0 itself).

    Args:
        steps: number of Euler steps ≥ 1 (≥ 2 when ``stretch``).
        tokens: latent token count ≥ 1, or None for ``max_tokens``.
        base_shift, max_shift, base_tokens, max_tokens: the shift line (:func:`token_count_shift`).
        terminal: last nonzero sigma after stretching, in (0, 1); unused without ``stretch``.
        stretch: stretch the schedule to ``terminal``.

    Returns:
        ``[steps + 1]`` float32, strictly decreasing, exactly 1.0 first and 0.0 last. Computed in
        float64 and rounded once, so values do not depend on the device.

    Raises:
        ValueError: bad ``steps``, ``tokens``, shift line or ``terminal``; ``steps = 1`` with
            ``stretch`` (the only nonzero sigma is 1).

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/schedulers.py``
    (``LTX2Scheduler.execute``); comfyanonymous/ComfyUI ``comfy_extras/nodes_lt.py`` (``LTXVScheduler``).
    """
    _check_steps(steps)
    mu = token_count_shift(max_tokens if tokens is None else tokens, base_tokens=base_tokens,
                           max_tokens=max_tokens, base_shift=base_shift, max_shift=max_shift)
    sigmas = exponential_time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), mu)
    if stretch:
        sigmas = stretch_to_terminal(sigmas, terminal)
    sigmas = sigmas.to(torch.float32)
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


def x0_from_velocity(x: Tensor, velocity: Tensor, sigma: float | Tensor) -> Tensor:
    """Clean-sample estimate from a velocity prediction: ``x0 = x_σ − σ·v``.

    Args:
        x: noisy sample ``[B, ...]``.
        velocity: predicted ``ε − x0``, same shape.
        sigma: float, scalar tensor, ``[B]`` tensor, or a tensor with the same number of dimensions
            as ``x`` that broadcasts against it (per-token sigmas, e.g. ``[B, N, 1]`` for tokens
            ``[B, N, C]``).

    Returns:
        Tensor of the same shape, dtype from type promotion of the inputs.

    Raises:
        ValueError: shape mismatch.

    Source: follows from ``x_σ = (1 − σ)·x0 + σ·ε`` and ``v = ε − x0``; Lightricks/LTX-2
    ``packages/ltx-core/src/ltx_core/utils.py`` (``to_denoised``).
    """
    _same_shape(x, velocity, "x and velocity")
    return x - _per_sample(sigma, x) * velocity


def velocity_from_x0(x: Tensor, x0: Tensor, sigma: float | Tensor) -> Tensor:
    """Velocity implied by a clean-sample estimate: ``v = (x_σ − x0)/σ`` (inverse of :func:`x0_from_velocity`).

    Args:
        x: noisy sample ``[B, ...]``.
        x0: clean-sample estimate, same shape.
        sigma: as in :func:`x0_from_velocity`; must be nonzero.

    Returns:
        Tensor of the same shape.

    Raises:
        ValueError: shape mismatch or a float ``sigma`` of 0 (the velocity is undefined there).

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/utils.py`` (``to_velocity``).
    """
    _same_shape(x, x0, "x and x0")
    s = _per_sample(sigma, x)
    if not isinstance(s, Tensor) and s == 0.0:
        raise ValueError("sigma must be nonzero to recover a velocity from x0 (at σ = 0, x already is x0)")
    return (x - x0) / s


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
