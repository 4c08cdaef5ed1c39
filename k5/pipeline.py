"""Kandinsky 5 video sampling: size checks, start-image preparation and the flow-matching Euler loop.

Follows official inference, kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py``
(``generate``, ``generate_sample_i2v``, ``normalize_first_frame``, ``resize_video``), with these
deliberate differences and decisions:

- **Latent convention.** :func:`sample` takes and returns *raw* HunyuanVideo VAE latents (ComfyUI's
  ``LATENT`` convention); the model works on ``raw × scaling_factor`` (0.476986, ``K5_LATENT_FORMAT`` in
  ``k5/family.py``).
- **Noise.** Drawn on the CPU from ``torch.Generator("cpu").manual_seed(seed)`` in float32, shape
  ``[1, 16, T, H/8, W/8]``, then moved to the device, so one seed gives the same video on every
  device. Official code draws bf16 noise channels-last on a CUDA generator; the same seed therefore
  does not reproduce official videos bit for bit.
- **Precision.** The model runs in the requested dtype (bf16 on GPUs), but the sample ``x`` is kept
  in float32 between steps: each Euler update moves ``x`` by about 1/steps of the velocity, and in
  bf16 (8-bit mantissa) these small updates are rounded against ``|x|`` and accumulate error
  over 50 steps. Official code keeps ``x`` in bf16.
- **Image-to-video (sources disagree).** Official inference writes the clean start latent
  into the *noisy* channels of latent frame 0 before every model call, leaves the conditioning
  channels at zero and sets the mask channel to 1 at frame 0; after sampling frame 0 is replaced by
  the clean latent and the first four latent frames are re-normalized (:func:`normalize_first_frames`).
  diffusers and musubi-tuner additionally put the image latent into the conditioning channels.
  Default: official behaviour, because it is what the released I2V checkpoints are run with upstream;
  ``i2v_cond_channels=True`` switches on the diffusers/musubi behaviour.
- **Start image resize.** Cover-then-center-crop as official ``resize_video``, with bilinear
  filtering and antialiasing (torchvision ``resize``'s default for tensors, which official uses).
- **Short videos.** :func:`normalize_first_frames` leaves latents with ≤ 4 frames unchanged: there is
  no later frame to take reference statistics from (official code returns NaNs for 2–4 frames).
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ..core.flow import apply_cfg, euler_step, sigma_schedule, x0_from_velocity
from ..core.media import fit_image
from ..core.preview import LatentPreview
from .conditioning import K5TextEmbeds
from .family import K5_LATENT_FORMAT, NABLA_SIZE_MULTIPLE

if TYPE_CHECKING:
    from ..core.preview import StepCallback
    from .nabla import NablaConfig

__all__ = [
    "K5_PREVIEW",
    "SizeError",
    "validate_video_size",
    "latent_shape",
    "prepare_start_image",
    "normalize_first_frames",
    "sample",
]

# Official normalize_first_frame clamps (kandinsky/generation_utils.py, adaptive_mean_std_normalization):
# the reference mean may move the frame's mean by −0.05..+0.10, the reference std its std by −0.10..+0.25.
_MEAN_DOWN, _MEAN_UP = 0.05, 0.10
_STD_DOWN, _STD_UP = 0.10, 0.25

_CFG_OFF_TOLERANCE = 1e-6


#: Latent previews while sampling: HunyuanVideo latent-to-RGB factors on the model-space latent (raw × 0.476986) and
#: the tiny HunyuanVideo decoder ``taehv`` for ComfyUI's TAESD method. Source: ComfyUI ``comfy/latent_formats.py``
#: class ``HunyuanVideo`` (Comfy-Org/ComfyUI master). ComfyUI 0.3.75's copy of the table repeats its sixth row (17
#: rows for 16 channels, which its latent2rgb previewer cannot apply); the current table, used here, has 16.
K5_PREVIEW = LatentPreview(
    K5_LATENT_FORMAT,
    rgb_factors=(
        (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282), (0.0108, -0.0250, -0.0765),
        (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639), (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400),
        (-0.0696, -0.0595, -0.0894), (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
        (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727), (0.0249, -0.0469, -0.1703),
    ),
    rgb_bias=(0.0259, -0.0192, -0.0761),
    taesd_decoder_name="taehv",
    source="ComfyUI comfy/latent_formats.py, class HunyuanVideo (latent_rgb_factors, latent_rgb_factors_bias)",
)


class SizeError(ValueError):
    """A video size or frame count the Kandinsky 5 VAE/DiT cannot produce; the message names valid values."""


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise SizeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise SizeError(f"{name} must be an integer, got {value!r}") from None


def validate_video_size(width: int, height: int, frames: int, *, nabla: bool) -> None:
    """Check a pixel size and frame count for Kandinsky 5 video generation.

    Width and height must be positive multiples of 16 px (8× VAE downsampling, then 2×2 DiT
    patches), or of 128 px with NABLA attention (8×8-token tiles); frames must be ``4k + 1 ≥ 1``
    (the causal VAE compresses time 4× after the first frame).

    Raises:
        SizeError: listing every problem with the nearest valid values, e.g.
            ``"width 500 is not a multiple of 16: use 496 or 512"``.

    Source: kandinskylab/kandinsky-5 ``kandinsky/t2v_pipeline.py`` (resolution sets, all multiples of
    128; ``seconds·24//4 + 1`` latent frames) and ``kandinsky/models/utils.py`` (NABLA 8×8-token tiles).
    """
    nabla_reason = f"NABLA attention needs multiples of {NABLA_SIZE_MULTIPLE}"
    problems = K5_LATENT_FORMAT.size_problems(width, height, frames,
                                              size_multiple=NABLA_SIZE_MULTIPLE if nabla else None,
                                              reason=nabla_reason if nabla else "")
    if problems:
        raise SizeError("; ".join(problems))


def latent_shape(width: int, height: int, frames: int) -> tuple[int, int, int, int]:
    """Latent shape ``(C=16, T=(frames−1)//4+1, H=height//8, W=width//8)`` for a video size.

    Raises:
        SizeError: size not valid for K5 (see :func:`validate_video_size`, checked without NABLA).

    Source: HunyuanVideo causal VAE compression (×8 spatial, ×4 temporal after the first frame),
    diffusers ``AutoencoderKLHunyuanVideo``; kandinskylab/kandinsky-5 ``kandinsky/t2v_pipeline.py``.
    """
    validate_video_size(width, height, frames, nabla=False)
    return K5_LATENT_FORMAT.latent_shape(width, height, frames)


def prepare_start_image(image: Tensor, width: int, height: int) -> Tensor:
    """Turn a ComfyUI IMAGE into the VAE input for image-to-video: scaled to cover ``width × height`` and
    centre-cropped (:func:`cinetune.core.media.fit_image`, as official ``resize_video`` in kandinskylab/kandinsky-5
    ``kandinsky/generation_utils.py``), in [-1, 1].

    Returns:
        ``[1, 3, 1, height, width]`` float32 on CPU (``[B, C, T, H, W]`` VAE layout).

    Raises:
        ValueError: wrong rank, not 3 channels, empty image or bad target size.
    """
    return fit_image(image, width, height)


def normalize_first_frames(latent: Tensor, *, first: int = 4, reference: int = 5) -> Tensor:
    """Match the statistics of the first latent frames to the frames after them (official I2V post-process).

    For each sample and each of the first ``first`` frames f, with per-frame mean m_f and
    (unbiased) std s_f over (C, H, W), and the mean M and std S of all values of the next
    ``reference`` frames::

        M_f = clamp(M, m_f − 0.05, m_f + 0.10)
        S_f = clamp(S, s_f − 0.10, s_f + 0.25)
        frame_f ← (frame_f − m_f) / s_f · S_f + M_f

    A frame with zero std becomes the constant M_f (official code would divide by zero).

    Args:
        latent: ``[B, 16, T, H, W]`` model-space latent (raw × scaling_factor), floating.
        first: number of leading frames to re-normalize (≥ 1).
        reference: number of following frames giving the target statistics (≥ 1); fewer are used
            when the video is shorter.

    Returns:
        A new tensor of the same shape and dtype (statistics computed in float32 or better). With
        ``T ≤ first`` there are no reference frames and the input is returned unchanged.

    Raises:
        ValueError: wrong rank or non-positive ``first``/``reference``.

    Source: kandinskylab/kandinsky-5 ``kandinsky/generation_utils.py`` (``normalize_first_frame``,
    ``adaptive_mean_std_normalization``), applied after sampling in ``generate_sample_i2v``.
    """
    if not isinstance(latent, Tensor) or latent.ndim != 5 or not latent.is_floating_point():
        raise ValueError("latent must be a floating [B, C, T, H, W] tensor, got "
                         f"{tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__}")
    first, reference = int(first), int(reference)
    if first < 1 or reference < 1:
        raise ValueError(f"first and reference must be ≥ 1, got first={first}, reference={reference}")
    if latent.shape[2] <= first:
        return latent
    work = latent.double() if latent.dtype == torch.float64 else latent.float()
    src = work[:, :, :first]
    ref = work[:, :, first:first + reference]
    src_mean = src.mean(dim=(1, 3, 4), keepdim=True)
    src_std = src.std(dim=(1, 3, 4), keepdim=True)
    ref_flat = ref.flatten(1)
    ref_mean = ref_flat.mean(dim=1).view(-1, 1, 1, 1, 1)
    ref_std = ref_flat.std(dim=1).view(-1, 1, 1, 1, 1)
    target_mean = torch.clamp(ref_mean, src_mean - _MEAN_DOWN, src_mean + _MEAN_UP)
    target_std = torch.clamp(ref_std, src_std - _STD_DOWN, src_std + _STD_UP)
    safe_std = torch.where(src_std > 0, src_std, torch.ones_like(src_std))
    normalized = (src - src_mean) / safe_std * target_std + target_mean
    out = latent.clone()
    out[:, :, :first] = normalized.to(latent.dtype)
    return out


def _check_embeds(embeds: K5TextEmbeds, name: str) -> None:
    if not isinstance(embeds, K5TextEmbeds):
        raise ValueError(f"{name} must be K5TextEmbeds (from the K5 text encoder), got {type(embeds).__name__}")
    if embeds.text.ndim != 3 or embeds.pooled.ndim != 2 or embeds.text_mask.shape != embeds.text.shape[:2]:
        raise ValueError(f"{name} embeddings have inconsistent shapes: text {tuple(embeds.text.shape)} "
                         f"(want [1, L, D]), mask {tuple(embeds.text_mask.shape)} (want [1, L]), "
                         f"pooled {tuple(embeds.pooled.shape)} (want [1, 768])")
    if embeds.batch_size != 1 or embeds.pooled.shape[0] != 1:
        raise ValueError(f"{name} must hold exactly one prompt (batch 1), got batch {embeds.batch_size}; "
                         "generate one video per prompt")


def _visual_embed_dim(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "visual_embed_dim", 2 * K5_LATENT_FORMAT.channels + 1))


def sample(
    model,
    positive: K5TextEmbeds,
    negative: K5TextEmbeds | None,
    *,
    width: int,
    height: int,
    frames: int,
    seed: int,
    steps: int,
    guidance: float,
    scheduler_scale: float,
    rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0),
    attention_backend: str = "sdpa",
    nabla: "NablaConfig | None" = None,
    start_latent: Tensor | None = None,
    i2v_cond_channels: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    on_step: "StepCallback | None" = None,
) -> Tensor:
    """Generate one Kandinsky 5 video latent with the official flow-matching Euler sampler.

    σ grid: :func:`~cinetune.core.flow.sigma_schedule` (``linspace(1, 0, steps+1)`` shifted by
    ``scheduler_scale``); at each σ_i the DiT gets ``timestep = 1000·σ_i`` and predicts the velocity
    ``ε − x0``; ``x ← x + (σ_{i+1} − σ_i)·v``. Classifier-free guidance ``v_u + w(v_c − v_u)`` uses
    separate conditional and unconditional forwards and is skipped entirely (one forward per
    step) when ``|guidance − 1| < 1e-6``.

    Model input per step, ``[1, 33, T, h, w]`` in ``dtype``: noisy latent (16) | conditioning
    latent (16) | mask (1). Text-to-video: conditioning and mask are zero. Image-to-video (with
    ``start_latent``): see the module docstring. A model whose ``config.visual_embed_dim`` is 16
    (no conditioning channels) gets the noisy latent only and cannot do image-to-video.

    Args:
        model: callable ``model(x, text, pooled, timestep, *, text_mask, rope_scale,
            attention_backend, nabla) -> velocity [1, 16, T, h, w]``, already on ``device`` in
            ``dtype`` (e.g. ``Kandinsky5DiT``).
        positive: prompt embeddings (batch 1).
        negative: negative-prompt embeddings (batch 1); required unless guidance is 1.
        width, height: pixels, multiples of 16 (128 with NABLA). frames: 4k+1.
        seed: noise seed (any Python int accepted by ``torch.Generator.manual_seed``).
        steps: Euler steps ≥ 1. guidance: CFG scale w. scheduler_scale: flow shift k > 0.
        rope_scale, attention_backend, nabla: passed to the model unchanged.
        start_latent: raw VAE latent of the start image ``[1, 16, ≥1, h, w]`` (first frame used).
        i2v_cond_channels: also put the start latent in the conditioning channels.
        device, dtype: where and in which dtype the model runs.
        callback: ``callback(steps_done, steps)`` after every step.
        check_interrupt: called before every model forward; raise from it to stop.
        on_step: ``on_step(steps_done, steps, x0)`` after every step, with the step's (guided) estimate of the clean
            latent ``x0 = x − σ·v`` as a raw VAE latent ``[1, 16, T, h, w]`` float32 on ``device`` (the return
            value's convention; the start frame of image-to-video is the clean start latent), e.g. for a preview.

    Returns:
        Raw VAE latent ``[1, 16, (frames−1)//4+1, height/8, width/8]`` float32 on CPU
        (= model-space latent / scaling_factor).

    Raises:
        SizeError: invalid size or frame count (message names the nearest valid values).
        ValueError: missing negative with CFG, bad embeddings, bad start latent, bad steps or
            scheduler_scale, model output of the wrong shape.
        Whatever ``check_interrupt`` raises.
    """
    validate_video_size(width, height, frames, nabla=nabla is not None)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
    guidance = float(guidance)
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    use_cfg = abs(guidance - 1.0) >= _CFG_OFF_TOLERANCE
    _check_embeds(positive, "positive")
    if use_cfg:
        if negative is None:
            raise ValueError(f"guidance {guidance} needs a negative prompt for classifier-free guidance; "
                             "pass negative embeddings or set guidance to 1.0")
        _check_embeds(negative, "negative")
    sigmas = sigma_schedule(steps, scheduler_scale).tolist()

    shape = (1, *latent_shape(width, height, frames))
    _, channels, t_lat, h_lat, w_lat = shape
    embed_dim = _visual_embed_dim(model)
    if embed_dim not in (channels, 2 * channels + 1):
        raise ValueError(f"model expects {embed_dim} input channels per voxel; Kandinsky 5 video models "
                         f"take {2 * channels + 1} (latent | conditioning | mask), image models {channels}")

    device = torch.device(device)
    clean = None
    if start_latent is not None:
        if embed_dim != 2 * channels + 1:
            raise ValueError("this model has no conditioning channels (text-to-image variant): "
                             "image-to-video needs a Kandinsky 5 video checkpoint")
        if (not isinstance(start_latent, Tensor) or start_latent.ndim != 5 or start_latent.shape[0] != 1
                or start_latent.shape[1] != channels or start_latent.shape[2] < 1
                or tuple(start_latent.shape[3:]) != (h_lat, w_lat)):
            got = tuple(start_latent.shape) if isinstance(start_latent, Tensor) else type(start_latent).__name__
            raise ValueError(f"start_latent must be a raw VAE latent [1, {channels}, ≥1, {h_lat}, {w_lat}] for a "
                             f"{width}×{height} video, got {got}; encode the start image at the sampler's size")
        clean = K5_LATENT_FORMAT.to_model(start_latent[:, :, :1].to(device=device, dtype=torch.float32))

    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    pos = positive.to(device=device, dtype=dtype)
    neg = negative.to(device=device, dtype=dtype) if use_cfg else None
    cond = mask = None
    if embed_dim == 2 * channels + 1:
        cond = torch.zeros(shape, device=device, dtype=dtype)
        mask = torch.zeros((1, 1, t_lat, h_lat, w_lat), device=device, dtype=dtype)
        if clean is not None:
            mask[:, :, :1] = 1.0
            if i2v_cond_channels:
                cond[:, :, :1] = clean.to(dtype)

    def predict(model_in: Tensor, embeds: K5TextEmbeds, timestep: Tensor) -> Tensor:
        if check_interrupt is not None:
            check_interrupt()
        v = model(model_in, embeds.text, embeds.pooled, timestep, text_mask=embeds.text_mask,
                  rope_scale=rope_scale, attention_backend=attention_backend, nabla=nabla)
        if v.shape != shape:
            raise ValueError(f"model returned shape {tuple(v.shape)}, expected velocity {shape}")
        return v.float()

    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if clean is not None:
            x[:, :, :1] = clean
        noisy = x.to(dtype)
        model_in = noisy if cond is None else torch.cat([noisy, cond, mask], dim=1)
        timestep = torch.full((1,), 1000.0 * sigma, device=device, dtype=torch.float32)
        v = predict(model_in, pos, timestep)
        if use_cfg:
            v = apply_cfg(v, predict(model_in, neg, timestep), guidance)
        if on_step is not None:
            x0 = x0_from_velocity(x, v, sigma)
            if clean is not None:
                x0[:, :, :1] = clean
            on_step(i + 1, steps, K5_LATENT_FORMAT.from_model(x0))
        x = euler_step(x, v, sigma, sigma_next)
        if callback is not None:
            callback(i + 1, steps)

    if clean is not None:
        x[:, :, :1] = clean
        x = normalize_first_frames(x)
    return K5_LATENT_FORMAT.from_model(x).float().cpu()
