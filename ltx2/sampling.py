"""LTX-2 sampling math: schedules, per-token denoise masks, the multimodal guider and the joint
audio-video Euler loop.

The DiT is reached only through a ``denoise`` callable (see :class:`DenoiseFn`), so this module
knows nothing about the network. Flow conventions are those of :mod:`cinetune.core.flow`
(σ = 1 noise, ``x_σ = (1 − σ)·x0 + σ·ε``, velocity ``ε − x0``).

Layouts:

- video tokens ``[B, N_v, 128]`` (latent frames, rows, columns in ``(f h w)`` order; feature = latent
  channel); audio tokens ``[B, N_a, 128]`` (one per latent time step; feature ``(c f)``);
- denoise masks ``[B, N]`` float in [0, 1]: 1 = denoise, 0 = frozen conditioning token,
  ``1 − strength`` for partial conditioning; the DiT sees the per-token sigma ``σ·mask``.

Noise order: a pipeline draws all its noise on the CPU, in float32, from one ``torch.Generator``
seeded with the user's seed (:func:`initial_noise`), in token layout and in this order: video tokens,
then audio tokens (stage 1), then for a two-stage run the stage-2 video tokens, then the stage-2
audio tokens. The official pipelines draw from one generator in the same order, but on the
accelerator, so their noise differs from ours; a CPU stream makes a seed give the same video on
every device.

Sources: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/`` (``guiders.py``
``MultiModalGuider``, ``diffusion_steps.py`` ``EulerDiffusionStep``, ``noisers.py``
``GaussianNoiser``), ``packages/ltx-core/src/ltx_core/conditioning/types/latent_cond.py``
(``VideoConditionByLatentIndex``), ``packages/ltx-pipelines/src/ltx_pipelines/utils/helpers.py``
(``euler_denoising_loop``, ``multi_modal_guider_denoising_func``, ``post_process_latent``,
``timesteps_from_mask``) and ``.../utils/constants.py`` (sigmas and guidance defaults).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from ..core.flow import add_noise, euler_step, token_shift_sigmas, velocity_from_x0, x0_from_velocity

__all__ = [
    "DISTILLED_SIGMAS",
    "STAGE_2_DISTILLED_SIGMAS",
    "STAGE_2_NOISE_SIGMA",
    "ltx2_sigmas",
    "GuidanceParams",
    "DenoiseFn",
    "multimodal_guidance",
    "sample_av",
    "initial_noise",
    "noise_tokens",
    "renoise_for_stage_2",
    "condition_tokens",
]

DISTILLED_SIGMAS: tuple[float, ...] = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875, 0.0)
"""8-step schedule of the distilled checkpoint (stage 1), ending at 0.
Source: Lightricks/LTX-2 ``packages/ltx-pipelines/src/ltx_pipelines/utils/constants.py``."""

STAGE_2_DISTILLED_SIGMAS: tuple[float, ...] = (0.909375, 0.725, 0.421875, 0.0)
"""3-step refinement schedule of stage 2 (the tail of :data:`DISTILLED_SIGMAS`), ending at 0.
Source: as :data:`DISTILLED_SIGMAS`."""

STAGE_2_NOISE_SIGMA: float = STAGE_2_DISTILLED_SIGMAS[0]
"""Noise level 0.909375 at which stage 2 re-noises the upsampled video and the stage-1 audio."""


def ltx2_sigmas(steps: int, tokens: int | None = None) -> Tensor:
    """The dev-checkpoint schedule: :func:`cinetune.core.flow.token_shift_sigmas` with the LTX-2 values.

    Shift line (1024 tokens → 0.95, 4096 → 2.05), stretched so the last nonzero sigma is 0.1, final 0.
    ``tokens=None`` is the official pipelines' fixed shift 2.05; pass the video latent's token count
    (F'·H'·W') for ComfyUI's ``LTXVScheduler`` with a latent wired in.

    Args:
        steps: Euler steps ≥ 2 (official: 40).
        tokens: video token count, or None.

    Returns:
        ``[steps + 1]`` float32 from 1.0 to 0.0; 40 steps: 1.0, 0.9964, …, 0.2339, 0.1, 0.0.

    Raises:
        ValueError: as :func:`~cinetune.core.flow.token_shift_sigmas` (e.g. ``steps = 1``).

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/schedulers.py`` (``LTX2Scheduler``).
    """
    return token_shift_sigmas(steps, tokens=tokens, base_shift=0.95, max_shift=2.05, base_tokens=1024,
                              max_tokens=4096, terminal=0.1, stretch=True)


def _check_scale(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"guidance {name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GuidanceParams:
    """Multimodal guidance settings for one modality (video or audio).

    The guided clean-sample estimate (see :func:`multimodal_guidance`) is
    ``c + (cfg − 1)(c − u_text) + stg·(c − u_perturbed) + (modality − 1)(c − u_isolated)``, then
    rescaled towards the std of ``c`` by ``rescale``. The field defaults are the official 19B dev
    values for video; :meth:`dev_audio` differs only in ``cfg`` 7; :meth:`none` switches every term
    off (one DiT forward per step: distilled checkpoint, stage 2).

    Attributes:
        cfg: classifier-free guidance scale against the negative prompt (1 = off).
        stg: spatio-temporal guidance scale against a forward with this modality's self-attention
            skipped in ``stg_blocks`` (0 = off).
        stg_blocks: 0-based DiT block indices whose self-attention the STG forward skips; must be
            non-empty when ``stg`` is on. Indices are checked against the model by the caller.
        rescale: 0…1 blend towards rescaling the guided estimate to the conditional one's std (0 = off).
        modality: modality guidance scale against a forward without audio↔video cross-attention
            (1 = off).

    Raises:
        ValueError: non-finite scales, negative or non-integer block indices, ``stg`` on without blocks.

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/guiders.py``
    (``MultiModalGuiderParams``; ``skip_step`` is not supported here, the 19B default is 0) and
    ``packages/ltx-pipelines/src/ltx_pipelines/utils/constants.py`` (``DEFAULT_VIDEO_GUIDER_PARAMS``,
    ``DEFAULT_AUDIO_GUIDER_PARAMS``).
    """

    cfg: float = 3.0
    stg: float = 1.0
    stg_blocks: tuple[int, ...] = (29,)
    rescale: float = 0.7
    modality: float = 3.0

    @classmethod
    def dev_video(cls) -> "GuidanceParams":
        """Official 19B video guidance: cfg 3, stg 1 at block 29, rescale 0.7, modality 3."""
        return cls()

    @classmethod
    def dev_audio(cls) -> "GuidanceParams":
        """Official 19B audio guidance: cfg 7, stg 1 at block 29, rescale 0.7, modality 3."""
        return cls(cfg=7.0)

    @classmethod
    def none(cls) -> "GuidanceParams":
        """No guidance (distilled checkpoint, stage 2): only the conditional forward runs."""
        return cls(cfg=1.0, stg=0.0, stg_blocks=(), rescale=0.0, modality=1.0)

    def __post_init__(self) -> None:
        for name in ("cfg", "stg", "rescale", "modality"):
            object.__setattr__(self, name, _check_scale(name, getattr(self, name)))
        blocks = self.stg_blocks
        if isinstance(blocks, int) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                                              for b in blocks):
            raise ValueError(f"stg_blocks must be a sequence of block indices ≥ 0 (19B: [29]), got {blocks!r}")
        object.__setattr__(self, "stg_blocks", tuple(blocks))
        if self.uses_stg and not self.stg_blocks:
            raise ValueError(f"stg {self.stg} needs at least one block in stg_blocks (19B: [29]); "
                             "set stg to 0 to switch STG off")

    @property
    def uses_cfg(self) -> bool:
        """Whether the negative-prompt forward is needed (``cfg`` ≠ 1)."""
        return not math.isclose(self.cfg, 1.0)

    @property
    def uses_stg(self) -> bool:
        """Whether the perturbed (self-attention skipped) forward is needed (``stg`` ≠ 0)."""
        return not math.isclose(self.stg, 0.0, abs_tol=1e-12)

    @property
    def uses_modality(self) -> bool:
        """Whether the isolated-modality (no cross-attention) forward is needed (``modality`` ≠ 1)."""
        return not math.isclose(self.modality, 1.0)


class DenoiseFn(Protocol):
    """The DiT as the sampler sees it; supplied by the pipeline.

    ``denoise(video_x, audio_x, video_sigma, audio_sigma, *, context, skip_video_self_attn_blocks,
    skip_audio_self_attn_blocks, skip_cross_modal) -> (video_velocity, audio_velocity)``

    - ``video_x`` ``[B, N_v, 128]`` float32 noisy tokens; ``audio_x`` ``[B, N_a, 128]`` or None
      (video only).
    - ``video_sigma`` ``[B, N_v]`` / ``audio_sigma`` ``[B, N_a]`` float32 per-token sigmas ``σ·mask``
      in [0, 1] (the DiT's timestep is ``1000·σ``); ``audio_sigma`` is None without audio.
    - ``context``: ``"cond"`` (prompt) or ``"uncond"`` (negative prompt), for both modalities.
    - ``skip_video_self_attn_blocks`` / ``skip_audio_self_attn_blocks``: block indices whose
      self-attention residual is dropped for that modality (STG); ``()`` = none.
    - ``skip_cross_modal``: drop the audio→video and video→audio cross-attention in every block.

    Returns velocities ``ε − x0`` of the same shapes as the inputs (any floating dtype); the audio
    velocity is None (or ignored) without audio.
    """

    def __call__(self, video_x: Tensor, audio_x: Tensor | None, video_sigma: Tensor, audio_sigma: Tensor | None, *,
                 context: Literal["cond", "uncond"], skip_video_self_attn_blocks: tuple[int, ...],
                 skip_audio_self_attn_blocks: tuple[int, ...],
                 skip_cross_modal: bool) -> tuple[Tensor, Tensor | None]: ...


def _term(name: str, tensor: Tensor | None, cond: Tensor) -> Tensor:
    if tensor is None:
        raise ValueError(f"the guidance uses the {name} prediction but none was given; "
                         f"pass it or switch that term off in GuidanceParams")
    if not isinstance(tensor, Tensor) or tensor.shape != cond.shape:
        got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{name} prediction must have the shape of cond {tuple(cond.shape)}, got {got}")
    return tensor.float()


def multimodal_guidance(cond: Tensor, uncond_text: Tensor | None, perturbed: Tensor | None,
                        isolated: Tensor | None, params: GuidanceParams) -> Tensor:
    """Guided clean-sample estimate of one modality from up to four x0 predictions.

    ``pred = c + (cfg − 1)(c − u_text) + stg·(c − u_perturbed) + (modality − 1)(c − u_isolated)``;
    with ``rescale`` r ≠ 0: ``pred ← pred·(r·std(c)/std(pred) + 1 − r)``, std over the whole tensor
    (all batch entries and tokens, Bessel-corrected, as ``torch.std``). Terms whose scale makes them
    vanish are skipped and their prediction may be None; with no term active ``c`` is returned as is
    (no rescale). Computed in float32.

    Args:
        cond: x0 prediction with the prompt, any shape (e.g. ``[B, N, 128]``).
        uncond_text: x0 prediction with the negative prompt (needed when ``params.uses_cfg``).
        perturbed: x0 prediction with this modality's self-attention skipped in ``params.stg_blocks``
            (needed when ``params.uses_stg``).
        isolated: x0 prediction without audio↔video cross-attention (needed when ``params.uses_modality``).
        params: the modality's :class:`GuidanceParams`.

    Returns:
        float32 tensor of the shape of ``cond``.

    Raises:
        ValueError: a needed prediction is None or has another shape.

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/guiders.py``
    (``MultiModalGuider.calculate``); rescale after Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed" (arXiv 2305.08891) §3.4, with a global std.
    """
    if not isinstance(cond, Tensor):
        raise ValueError(f"cond must be a tensor, got {type(cond).__name__}")
    c = cond.float()
    pred = c
    if params.uses_cfg:
        pred = pred + (params.cfg - 1.0) * (c - _term("uncond_text", uncond_text, cond))
    if params.uses_stg:
        pred = pred + params.stg * (c - _term("perturbed", perturbed, cond))
    if params.uses_modality:
        pred = pred + (params.modality - 1.0) * (c - _term("isolated", isolated, cond))
    if pred is not c and params.rescale != 0.0:
        pred = pred * (params.rescale * (c.std() / pred.std()) + (1.0 - params.rescale))
    return pred


def _check_sigmas(sigmas: Tensor | Sequence[float]) -> list[float]:
    values = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu()
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 values (steps + 1), got shape "
                         f"{tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or float(values.min()) < 0.0 or float(values.max()) > 1.0:
        raise ValueError(f"sigmas must lie in [0, 1], got {values.tolist()}")
    if not bool((values[1:] < values[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {values.tolist()}")
    return values.tolist()


def _check_tokens(name: str, tokens: Tensor) -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 3 or not tokens.is_floating_point():
        got = f"shape {tuple(tokens.shape)}, {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a floating token tensor [B, N, C], got {got}")


def _mask_or_ones(name: str, mask: Tensor | None, tokens: Tensor) -> Tensor:
    """The ``[B, N]`` float32 denoise mask on ``tokens``' device (all ones when None), validated."""
    if mask is None:
        return torch.ones(tokens.shape[:2], device=tokens.device, dtype=torch.float32)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(tokens.shape[:2]):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a per-token denoise mask [B, N] = {tuple(tokens.shape[:2])}, got {got}")
    mask = mask.to(device=tokens.device, dtype=torch.float32)
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError(f"{name} values must lie in [0, 1] (1 = denoise, 0 = frozen, 1 − strength partial)")
    return mask


@dataclass
class _Stream:
    """One modality's sampling state."""

    name: str
    x: Tensor  # [B, N, C] float32
    mask: Tensor  # [B, N] float32
    clean: Tensor | None  # [B, N, C] float32; None when every token is denoised fully
    params: GuidanceParams

    @classmethod
    def build(cls, name: str, tokens: Tensor, mask: Tensor | None, clean: Tensor | None,
              params: GuidanceParams) -> "_Stream":
        _check_tokens(name, tokens)
        mask = _mask_or_ones(f"{name}_mask", mask, tokens)
        if clean is not None:
            if not isinstance(clean, Tensor) or clean.shape != tokens.shape:
                got = tuple(clean.shape) if isinstance(clean, Tensor) else type(clean).__name__
                raise ValueError(f"{name}_clean must have the shape of {name} {tuple(tokens.shape)}, got {got}")
            clean = clean.to(device=tokens.device, dtype=torch.float32)
        elif not bool((mask == 1).all()):
            raise ValueError(f"{name}_mask has conditioned tokens (mask < 1) but {name}_clean is None; pass the "
                             f"clean tokens the conditioning wrote (see condition_tokens)")
        if not isinstance(params, GuidanceParams):
            raise ValueError(f"{name}_params must be a GuidanceParams, got {type(params).__name__}")
        return cls(name, tokens.float(), mask, clean, params)

    def x0(self, velocity: Tensor | None, sigma_tokens: Tensor) -> Tensor:
        if not isinstance(velocity, Tensor) or velocity.shape != self.x.shape:
            got = tuple(velocity.shape) if isinstance(velocity, Tensor) else type(velocity).__name__
            raise ValueError(f"denoise returned a {self.name} velocity of shape {got}, expected "
                             f"{tuple(self.x.shape)}")
        return x0_from_velocity(self.x, velocity.float(), sigma_tokens.unsqueeze(-1))

    def step(self, x0: Tensor, sigma: float, sigma_next: float) -> Tensor:
        """Blend the conditioned tokens into ``x0``, take the Euler step; returns the blended x0."""
        if self.clean is not None:
            x0 = x0 * self.mask.unsqueeze(-1) + self.clean * (1.0 - self.mask.unsqueeze(-1))
        if sigma_next == 0.0:
            self.x = x0
        else:
            self.x = euler_step(self.x, velocity_from_x0(self.x, x0, sigma), sigma, sigma_next)
        return x0


def sample_av(denoise: DenoiseFn, video: Tensor, audio: Tensor | None, sigmas: Tensor | Sequence[float], *,
              video_mask: Tensor | None = None, audio_mask: Tensor | None = None,
              video_clean: Tensor | None = None, audio_clean: Tensor | None = None,
              video_params: GuidanceParams | None = None, audio_params: GuidanceParams | None = None,
              progress: Callable[[int, int], None] | None = None,
              check_interrupt: Callable[[], None] | None = None,
              on_step: Callable[[int, int, Tensor], None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Joint audio-video Euler sampling with per-token denoise masks and multimodal guidance.

    For each step i (σ = sigmas[i] > 0, σ' = sigmas[i + 1]):

    1. per-token sigmas ``σ·mask`` ``[B, N]``;
    2. forwards, each a separate ``denoise`` call: conditional; negative prompt if either modality's
       ``cfg`` ≠ 1; perturbed (each modality's self-attention skipped in its ``stg_blocks``, only for
       a modality with ``stg`` ≠ 0) if either ``stg`` ≠ 0; isolated (no cross-modal attention) if
       there is audio and either ``modality`` ≠ 1. Up to 4 calls per step; 1 without guidance;
    3. per token, in float32: ``x0 = x − (σ·mask)·v`` for every forward;
    4. :func:`multimodal_guidance` per modality on the x0 predictions;
    5. blend ``x0 ← x0·mask + clean·(1 − mask)``;
    6. Euler in float32: ``x ← x + (x − x0)/σ·(σ' − σ)``, or ``x ← x0`` when σ' = 0.

    Without audio the modality-guidance term is dropped (the isolated forward would equal the
    conditional one). A schedule that ends above 0 (e.g. a partial run) returns the latent at its last
    sigma. Tokens with mask 0 stay exactly equal to ``clean``.

    Args:
        denoise: the model, see :class:`DenoiseFn`.
        video: noisy video tokens at ``sigmas[0]`` ``[B, N_v, C]`` (e.g. from :func:`noise_tokens`).
        audio: noisy audio tokens ``[B, N_a, C]``, or None for video only.
        sigmas: ``[steps + 1]`` strictly decreasing in [0, 1] (tensor or floats, used as float32),
            e.g. ``core.flow.token_shift_sigmas(40)``, :data:`DISTILLED_SIGMAS`.
        video_mask, audio_mask: ``[B, N]`` denoise masks in [0, 1]; None = all ones.
        video_clean, audio_clean: ``[B, N, C]`` clean tokens that masked tokens are pulled to; needed
            when the mask has values < 1.
        video_params, audio_params: :class:`GuidanceParams`; None = :meth:`GuidanceParams.none`.
        progress: ``progress(steps_done, steps)`` after every step.
        check_interrupt: called before every ``denoise`` call; raise from it to stop.
        on_step: ``on_step(steps_done, steps, video_x0)`` after every step, with the step's guided and blended
            clean-token estimate of the video ``[B, N_v, C]`` float32 (step 5), e.g. for a preview.

    Returns:
        ``(video, audio)``: float32 tokens at ``sigmas[-1]`` on the inputs' devices; audio None
        without audio.

    Raises:
        ValueError: bad shapes, masks, schedule or params; ``denoise`` returned wrong shapes.
        Whatever ``check_interrupt`` raises.

    Source: Lightricks/LTX-2 ``packages/ltx-pipelines/src/ltx_pipelines/utils/helpers.py``
    (``euler_denoising_loop``, ``multi_modal_guider_denoising_func``, ``post_process_latent``),
    ``packages/ltx-core/src/ltx_core/components/diffusion_steps.py`` (``EulerDiffusionStep``),
    ``packages/ltx-core/src/ltx_core/model/transformer/model.py`` (``X0Model``: x0 per token).
    """
    schedule = _check_sigmas(sigmas)
    video_params = GuidanceParams.none() if video_params is None else video_params
    audio_params = GuidanceParams.none() if audio_params is None else audio_params
    steps = len(schedule) - 1
    streams = [_Stream.build("video", video, video_mask, video_clean, video_params)]
    if audio is not None:
        streams.append(_Stream.build("audio", audio, audio_mask, audio_clean, audio_params))
        if audio.shape[0] != video.shape[0]:
            raise ValueError(f"video and audio batch sizes differ: {video.shape[0]} and {audio.shape[0]}")
    else:
        streams[0].params = dataclasses.replace(video_params, modality=1.0)
    params = [s.params for s in streams]
    run_uncond = any(p.uses_cfg for p in params)
    run_perturbed = any(p.uses_stg for p in params)
    run_isolated = any(p.uses_modality for p in params)
    stg_blocks = [p.stg_blocks if p.uses_stg else () for p in params] + [()]

    for i in range(steps):
        sigma, sigma_next = schedule[i], schedule[i + 1]
        sigma_tokens = [s.mask * sigma for s in streams]

        def forward(context: str, skip_video: tuple[int, ...] = (), skip_audio: tuple[int, ...] = (),
                    skip_cross_modal: bool = False) -> list[Tensor]:
            if check_interrupt is not None:
                check_interrupt()
            out = denoise(streams[0].x, streams[1].x if len(streams) > 1 else None, sigma_tokens[0],
                          sigma_tokens[1] if len(streams) > 1 else None, context=context,
                          skip_video_self_attn_blocks=skip_video, skip_audio_self_attn_blocks=skip_audio,
                          skip_cross_modal=skip_cross_modal)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ValueError("denoise must return a (video_velocity, audio_velocity) pair")
            return [s.x0(v, t) for s, v, t in zip(streams, out, sigma_tokens)]

        cond = forward("cond")
        none = [None] * len(streams)
        uncond = forward("uncond") if run_uncond else none
        perturbed = forward("cond", stg_blocks[0], stg_blocks[1]) if run_perturbed else none
        isolated = forward("cond", skip_cross_modal=True) if run_isolated else none
        x0 = [s.step(multimodal_guidance(cond[k], uncond[k], perturbed[k], isolated[k], s.params), sigma, sigma_next)
              for k, s in enumerate(streams)]
        if on_step is not None:
            on_step(i + 1, steps, x0[0])
        if progress is not None:
            progress(i + 1, steps)

    return streams[0].x, (streams[1].x if len(streams) > 1 else None)


def initial_noise(shape: Sequence[int], seed: int | torch.Generator) -> Tensor:
    """Standard normal noise drawn on the CPU in float32, independent of the target device.

    Pass an int to start a fresh stream (``torch.Generator("cpu").manual_seed(seed)``), or one CPU
    generator shared by successive calls to continue its stream. The pipeline convention (module
    docstring) is one generator per seed, drawn for video tokens first, then audio tokens, then the
    stage-2 video and audio tokens; draw in token layout ``[B, N, C]``.

    Args:
        shape: output shape, e.g. ``[B, N_v, 128]``.
        seed: a non-negative int seed, or a CPU ``torch.Generator``.

    Returns:
        float32 CPU tensor of ``shape``; move it to the device yourself.

    Raises:
        ValueError: negative/non-int seed, a generator not on the CPU, or a bad shape.

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/noisers.py``
    (``GaussianNoiser``: ``randn`` of the token tensor's shape from the pipeline's generator).
    """
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"noise is drawn on the CPU; pass a CPU generator, got one on {seed.device}")
        generator = seed
    elif isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        generator = torch.Generator("cpu").manual_seed(seed)
    else:
        raise ValueError(f"seed must be an integer ≥ 0 or a CPU torch.Generator, got {seed!r}")
    shape = tuple(shape)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"shape must be a sequence of sizes ≥ 0, got {shape!r}")
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def noise_tokens(clean: Tensor, noise: Tensor, sigma: float, mask: Tensor | None = None) -> Tensor:
    """Noise tokens to ``sigma`` honouring a denoise mask: ``x = ε·(mask·σ) + x·(1 − mask·σ)``.

    Tokens with mask 0 are returned exactly clean; mask 1 gives ``add_noise(clean, ε, σ)``.

    Args:
        clean: clean tokens ``[B, N, C]`` (zeros for plain text-to-video; conditioned frames written
            in by :func:`condition_tokens`).
        noise: ε of the same shape (e.g. from :func:`initial_noise`; moved to ``clean``'s device).
        sigma: noise level in [0, 1], normally ``sigmas[0]`` of the schedule.
        mask: ``[B, N]`` denoise mask in [0, 1]; None = all ones.

    Returns:
        float32 tokens ``[B, N, C]`` on ``clean``'s device.

    Raises:
        ValueError: shape mismatch, mask out of range, sigma outside [0, 1].

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/components/noisers.py``
    (``GaussianNoiser``).
    """
    _check_tokens("clean", clean)
    if not isinstance(noise, Tensor) or noise.shape != clean.shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must have the shape of the tokens {tuple(clean.shape)}, got {got}")
    sigma = float(sigma)
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must lie in [0, 1], got {sigma}")
    mask = _mask_or_ones("mask", mask, clean)
    return add_noise(clean.float(), noise.to(device=clean.device, dtype=torch.float32),
                     (mask * sigma).unsqueeze(-1))


def renoise_for_stage_2(latent: Tensor, noise: Tensor, sigma: float = STAGE_2_NOISE_SIGMA,
                        mask: Tensor | None = None) -> Tensor:
    """Re-noise stage-1 output for the stage-2 refinement: ``x = ε·σ + latent·(1 − σ)`` (σ = 0.909375).

    Applied to the upsampled video tokens and to the stage-1 audio tokens alike; with a mask
    (stage-2 image conditioning) conditioned tokens stay clean, as in :func:`noise_tokens`. Then
    sample with :data:`STAGE_2_DISTILLED_SIGMAS`, no guidance.

    Args:
        latent: tokens ``[B, N, C]`` (upsampled video, or stage-1 audio).
        noise: ε of the same shape (fresh draws, see the module docstring for the order).
        sigma: re-noise level, the first stage-2 sigma.
        mask: optional ``[B, N]`` denoise mask.

    Returns:
        float32 tokens ``[B, N, C]``.

    Raises:
        ValueError: as :func:`noise_tokens`.

    Source: Lightricks/LTX-2 ``packages/ltx-pipelines/src/ltx_pipelines/ti2vid_two_stages.py``
    (stage 2 ``noise_scale = distilled_sigmas[0]`` with the stage-1 video and audio as initial latents).
    """
    return noise_tokens(latent, noise, sigma, mask)


def condition_tokens(tokens: Tensor, frame_tokens: Tensor, frame_index: int, tokens_per_frame: int,
                     strength: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Write clean conditioning tokens over latent frames starting at ``frame_index``; set their mask.

    Image-to-video (``frame_index`` 0) and in-place keyframes (any latent frame index): the tokens of
    latent frames ``frame_index … frame_index + k − 1`` are replaced by ``frame_tokens`` and their
    denoise mask becomes ``1 − strength`` (strength 1 = frozen). Positions are unchanged. The
    keyframe mechanism that appends extra tokens (``VideoConditionByKeyframeIndex``) is a different one.

    Typical use: ``clean, mask = condition_tokens(zeros, image_tokens, 0, h·w, 1.0)``, then
    ``x = noise_tokens(clean, ε, sigmas[0], mask)`` and ``sample_av(…, video_mask=mask, video_clean=clean)``.

    Args:
        tokens: clean video tokens ``[B, N, C]`` in ``(f h w)`` order, N a multiple of ``tokens_per_frame``.
        frame_tokens: tokens of k ≥ 1 encoded latent frames ``[B or 1, k·tokens_per_frame, C]``
            (e.g. the VAE latent of one image, patchified).
        frame_index: first latent frame to replace (latent frame 0 holds pixel frame 0, latent frame
            i ≥ 1 pixel frames 8i − 7 … 8i).
        tokens_per_frame: latent height · width.
        strength: 0…1 conditioning strength.
        mask: current ``[B, N]`` denoise mask (None = all ones), for stacking several conditions.

    Returns:
        ``(tokens, mask)``: new tensors (inputs unchanged); tokens keep their dtype, mask float32.

    Raises:
        ValueError: shape mismatches, frames out of range, strength outside [0, 1].

    Source: Lightricks/LTX-2 ``packages/ltx-core/src/ltx_core/conditioning/types/latent_cond.py``
    (``VideoConditionByLatentIndex``).
    """
    _check_tokens("tokens", tokens)
    if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1 \
            or tokens.shape[1] % tokens_per_frame:
        raise ValueError(f"tokens_per_frame must be an integer ≥ 1 dividing the token count {tokens.shape[1]} "
                         f"(latent height · width), got {tokens_per_frame!r}")
    frames = tokens.shape[1] // tokens_per_frame
    if (not isinstance(frame_tokens, Tensor) or frame_tokens.ndim != 3
            or frame_tokens.shape[0] not in (1, tokens.shape[0]) or frame_tokens.shape[2] != tokens.shape[2]
            or frame_tokens.shape[1] == 0 or frame_tokens.shape[1] % tokens_per_frame):
        got = tuple(frame_tokens.shape) if isinstance(frame_tokens, Tensor) else type(frame_tokens).__name__
        raise ValueError(f"frame_tokens must be [{tokens.shape[0]} or 1, k·{tokens_per_frame}, {tokens.shape[2]}] "
                         f"(k whole latent frames at the video's latent size), got {got}")
    k = frame_tokens.shape[1] // tokens_per_frame
    if isinstance(frame_index, bool) or not isinstance(frame_index, int) or not 0 <= frame_index <= frames - k:
        raise ValueError(f"frame_index must be an integer in [0, {frames - k}] so that {k} latent frame(s) fit in "
                         f"{frames}, got {frame_index!r}")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    mask = _mask_or_ones("mask", mask, tokens).clone()
    start, stop = frame_index * tokens_per_frame, (frame_index + k) * tokens_per_frame
    out = tokens.clone()
    out[:, start:stop] = frame_tokens.to(device=tokens.device, dtype=tokens.dtype)
    mask[:, start:stop] = 1.0 - strength
    return out, mask
