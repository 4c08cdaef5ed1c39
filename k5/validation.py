"""Kandinsky 5 validation clips during LoRA training, sampled with the LoRA being trained.

The trainer's model carries the run's LoRA layers (:func:`cinetune.core.lora.inject_lora`), so the current adapter is
applied unmerged on top of the frozen (possibly fp8, possibly block-swapped) base weights. :func:`render_validation`
runs the sampler of the K5 Sampler node (:func:`cinetune.k5.pipeline.sample`) and decodes with the VAE; the two halves
(:func:`sample_validation`, :func:`decode_validation`) let a caller hold the VAE on the device only while it decodes.

Decisions:

- **Default size** (a validation prompt with width, height or frames 0) follows the training data
  (:func:`validation_size`): the bucket and frame count of the first cached sample, at most
  :data:`MAX_VALIDATION_FRAMES` frames, so a default clip costs about as much as a few training steps.
- **Defaults of a request** (:class:`K5ValidationRequest`): 20 steps, guidance 5 (the official CFG scale), flow shift
  5 (official for 5 s text-to-video; image-to-video prompts may want 10). Fewer steps than the official 50 keep
  validation cheap; the clip shows the trend of the LoRA, not final quality.
- **Image-to-video**: a start image is resized to cover the clip and centre-cropped, then encoded by the VAE once
  before training (:func:`encode_start_image`, the K5 VAE Encode Start Image node's path) and passed to the sampler
  as its start latent; the model needs conditioning channels (a video checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..training.runs import ValidationClip
from .family import K5_LATENT_FORMAT
from .pipeline import prepare_start_image, sample, validate_video_size

__all__ = ["MAX_VALIDATION_FRAMES", "K5ValidationRequest", "validation_size", "encode_start_image",
           "sample_validation", "decode_validation", "render_validation"]

#: Longest default validation clip in frames (the first cached clip's length is capped to this).
MAX_VALIDATION_FRAMES = 17


def validation_size(samples: Sequence[Any]) -> tuple[int, int, int]:
    """``(width, height, frames)`` of a default validation clip for these training samples (module notes).

    Args:
        samples: training samples with ``bucket`` (width, height) and ``frames``.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("validation needs the training samples to choose its size; the dataset is empty.")
    first = samples[0]
    width, height = (int(v) for v in first.bucket)
    return width, height, min(int(first.frames), MAX_VALIDATION_FRAMES)


@dataclass(frozen=True)
class K5ValidationRequest:
    """One Kandinsky 5 validation clip: pixels, frames (4k + 1), Euler steps, CFG scale, flow shift k and noise seed
    (the K5 Sampler node's widgets)."""

    width: int
    height: int
    frames: int
    steps: int = 20
    guidance: float = 5.0
    scheduler_scale: float = 5.0
    seed: int = 0

    def check(self, *, nabla: bool) -> None:
        """Raise :class:`~cinetune.k5.pipeline.SizeError` for a size or frame count the model cannot sample (128 px
        sides with NABLA attention), naming the nearest valid values."""
        validate_video_size(self.width, self.height, self.frames, nabla=nabla)


def encode_start_image(vae, image: Tensor, width: int, height: int, *, device: torch.device | str) -> Tensor:
    """The raw VAE latent of a start image for a ``width × height`` clip.

    Args:
        vae: :class:`~cinetune.k5.vae.K5VAE` on ``device``. image: ComfyUI IMAGE ``[B, H, W, 3]`` float 0..1 (the
            first image is used). width, height: the clip's size in pixels.

    Returns:
        ``[1, 16, 1, height/8, width/8]`` float32 on the CPU.

    Raises:
        ValueError: a bad image or size (:func:`cinetune.k5.pipeline.prepare_start_image`).
    """
    pixels = prepare_start_image(image, width, height)
    with torch.no_grad():
        return vae.encode(pixels.to(device)).float().cpu()


def sample_validation(dit: torch.nn.Module, conditioning: dict, request: K5ValidationRequest, *,
                      start_latent: Tensor | None = None, rope_scale: tuple[float, float, float] = (1.0, 2.0, 2.0),
                      attention_backend: str = "sdpa", nabla=None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32,
                      check_interrupt: Callable[[], None] | None = None) -> Tensor:
    """Sample one clip's latent with the model as it is (its LoRA layers included).

    Args:
        dit: the :class:`~cinetune.k5.dit.Kandinsky5DiT` on ``device`` or under block swap (the trainer's model).
        conditioning: ``{"positive": K5TextEmbeds, "negative": K5TextEmbeds}`` (K5 Text Encode).
        request: the clip. start_latent: from :func:`encode_start_image` at the request's size (image-to-video).
        rope_scale, attention_backend, nabla, device, dtype: as :func:`cinetune.k5.pipeline.sample`.
        check_interrupt: raises to stop (every model call).

    Returns:
        Raw VAE latent ``[1, 16, (frames − 1)/4 + 1, height/8, width/8]`` float32 on the CPU.

    Raises:
        SizeError / ValueError: from :func:`cinetune.k5.pipeline.sample`.
    """
    with torch.no_grad():
        return sample(dit, conditioning["positive"], conditioning["negative"], width=request.width,
                      height=request.height, frames=request.frames, seed=request.seed, steps=request.steps,
                      guidance=request.guidance, scheduler_scale=request.scheduler_scale, rope_scale=rope_scale,
                      attention_backend=attention_backend, nabla=nabla, start_latent=start_latent, device=device,
                      dtype=dtype, check_interrupt=check_interrupt)


def decode_validation(vae, latent: Tensor, *, device: torch.device | str = "cpu") -> ValidationClip:
    """Decode a latent from :func:`sample_validation` with the VAE (on ``device``).

    Returns:
        :class:`~cinetune.training.runs.ValidationClip`: frames ``[F, H, W, 3]`` float32 in 0..1 on the CPU at the
        family's 24 fps.
    """
    with torch.no_grad():
        video = vae.decode(latent.to(device))
    frames = ((video.float().clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0).cpu()
    return ValidationClip(frames, K5_LATENT_FORMAT.default_fps)


def render_validation(dit: torch.nn.Module, conditioning: dict, vae, request: K5ValidationRequest, *,
                      device: torch.device | str = "cpu", **sampling: Any) -> ValidationClip:
    """:func:`sample_validation` then :func:`decode_validation`, both on ``device`` (``sampling``: the keyword
    arguments of :func:`sample_validation`)."""
    latent = sample_validation(dit, conditioning, request, device=device, **sampling)
    return decode_validation(vae, latent, device=device)
