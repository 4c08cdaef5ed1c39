"""LTX-2 validation clips during LoRA training: video with sound, sampled with the LoRA being trained.

The trainer's model carries the LoRA layers of the run (:func:`cinetune.core.lora.inject_lora`), so the current
adapter is applied unmerged, on top of the frozen (possibly fp8, possibly block-swapped) base weights; nothing is
merged into them. :func:`render_validation` runs one :func:`cinetune.ltx2.pipeline.generate` stage (``dev`` mode, or
``distilled`` for a distilled checkpoint) and decodes video and audio with the VAEs
(:func:`~cinetune.ltx2.pipeline.decode_video`, :func:`~cinetune.ltx2.pipeline.decode_audio`).

Decisions (ltx-trainer validates with CFG and STG at block 29 for 30 steps, Lightricks/LTX-2
``packages/ltx-trainer/configs/ltx2_av_lora.yaml`` ``validation``):

- **Guidance** is the official inference defaults (:class:`~cinetune.ltx2.pipeline.SamplingRequest`: video CFG 3,
  audio CFG 7, STG 1 at block 29, modality 3, rescale 0.7), the sampler node's, so a validation clip looks like what
  the sampler makes with the finished LoRA. A model with fewer blocks than the STG block (small test models) samples
  without STG.
- **Size** follows the training data (:func:`validation_size`): the bucket and frame count of the first video clip
  (at most :data:`MAX_VALIDATION_FRAMES` frames), at its frame rate; an image-only dataset gives a 9-frame clip at
  the family's default 24 fps.
- **Sound** is generated and muxed whenever the VAEs hold the audio VAE and vocoder.
- **Image-to-video**: a start image is encoded once before training (:func:`encode_start_image`, the path of the
  LTX-2 Sampler's ``start_image``: cover-resize, centre crop, H.264 round trip, VAE) and conditions the first latent
  frame at strength 1 in every clip of its prompt.
- A validation prompt may set its own size, frame rate, steps, seed and video/audio text guidance
  (:func:`validation_request`); the other guidance terms stay the official ones.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..training.runs import ValidationClip
from . import pipeline
from .family import LTX2_LATENT_FORMAT

__all__ = ["MAX_VALIDATION_FRAMES", "validation_size", "validation_request", "encode_start_image",
           "render_validation"]

#: Longest validation clip in frames (5 s at 24 fps, the official default length).
MAX_VALIDATION_FRAMES = 121


def validation_size(samples: Sequence[Any]) -> tuple[int, int, int, float]:
    """``(width, height, frames, fps)`` of validation clips for these training samples (module notes).

    Args:
        samples: training samples with ``bucket`` (width, height), ``frames`` and, for clips, ``fps``.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("validation needs the training samples to choose its size; the dataset is empty.")
    clips = [s for s in samples if int(s.frames) > 1]
    first = clips[0] if clips else samples[0]
    width, height = (int(v) for v in first.bucket)
    frames = min(int(first.frames), MAX_VALIDATION_FRAMES) if clips else LTX2_LATENT_FORMAT.temporal_factor + 1
    rate = getattr(first, "fps", None) if clips else None
    usable = isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0
    fps = float(rate) if usable else LTX2_LATENT_FORMAT.default_fps
    return width, height, frames, fps


def validation_request(width: int, height: int, frames: int, fps: float, *, seed: int, steps: int,
                       num_blocks: int, distilled: bool = False, audio: bool = True, video_cfg: float | None = None,
                       audio_cfg: float | None = None) -> pipeline.SamplingRequest:
    """The :class:`~cinetune.ltx2.pipeline.SamplingRequest` of a validation clip (module notes).

    Args:
        width, height, frames, fps: the clip (pixels, 8k + 1 frames, frames per second).
        seed: noise seed (the same for every validation of a run, so clips differ only by the LoRA).
        steps: ``dev`` sampling steps (≥ 2). num_blocks: the DiT's block count (STG off when block 29 is missing).
        distilled: the model is a distilled checkpoint: its fixed 8-step schedule without guidance instead.
        audio: generate the sound track.
        video_cfg, audio_cfg: text guidance scales; None = the official 3 and 7.

    Raises:
        SizeError / ValueError: from :meth:`~cinetune.ltx2.pipeline.SamplingRequest.check`.
    """
    guidance = {k: float(v) for k, v in (("video_cfg", video_cfg), ("audio_cfg", audio_cfg)) if v is not None}
    request = pipeline.SamplingRequest(width=width, height=height, frames=frames, fps=fps, seed=seed, steps=steps,
                                       mode="distilled" if distilled else "dev", audio=audio, **guidance)
    if request.stg_block >= num_blocks:
        request.stg = 0.0
    request.check()
    return request


def encode_start_image(vaes, image: torch.Tensor, width: int, height: int, *,
                       device: torch.device | str = "cpu") -> pipeline.Keyframe:
    """The first-frame condition of a ``width × height`` validation clip
    (:func:`cinetune.ltx2.pipeline.encode_keyframe` at frame 0, strength 1; its latent on the CPU).

    Args:
        vaes: :class:`~cinetune.ltx2.loader.LTX2VAEs` on ``device``. image: ComfyUI IMAGE ``[B, H, W, 3]`` float 0..1
            (the first image is used).

    Raises:
        ValueError: a bad image or size.
    """
    with torch.no_grad():
        return pipeline.encode_keyframe(vaes, image[:1], width, height, frame_index=0, strength=1.0, device=device)


def render_validation(dit: torch.nn.Module, conditioning: pipeline.LTX2Conditioning, vaes,
                      request: pipeline.SamplingRequest, *, keyframes: Sequence[pipeline.Keyframe] = (),
                      attention_backend: str = "sdpa",
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      check_interrupt: Callable[[], None] | None = None) -> ValidationClip:
    """Sample one clip with the model as it is (its LoRA layers included) and decode video and sound.

    Args:
        dit: the :class:`~cinetune.ltx2.dit.LTX2DiT` on ``device`` or under block swap (the trainer's model).
        conditioning: encoded prompt and negative prompt (LTX-2 Text Encode).
        vaes: :class:`~cinetune.ltx2.loader.LTX2VAEs` on ``device``; with ``request.audio`` it needs the audio VAE
            and vocoder.
        request: from :func:`validation_request`.
        keyframes: image conditions, e.g. the start image from :func:`encode_start_image` at the request's size.
        attention_backend, device, dtype: as :func:`~cinetune.ltx2.pipeline.generate`.
        check_interrupt: raises to stop (every model call).

    Returns:
        :class:`~cinetune.training.runs.ValidationClip`: frames ``[F, H, W, 3]`` float32 in 0..1 on the CPU at
        ``request.fps``, and with ``request.audio`` the stereo waveform ``[2, S]`` at the vocoder's rate.

    Raises:
        ValueError: bad conditioning or a request the pipeline refuses; sound requested without an audio VAE.
    """
    if request.audio and (getattr(vaes, "audio", None) is None or getattr(vaes, "vocoder", None) is None):
        raise ValueError("validation with sound needs the audio VAE and vocoder: load them with LTX-2 VAE Loader "
                         "(audio_vae_name '(same file)'), or generate validation clips without audio.")
    with torch.no_grad():
        video, audio = pipeline.generate(dit, conditioning, request, keyframes=list(keyframes),
                                         attention_backend=attention_backend, device=device, dtype=dtype,
                                         check_interrupt=check_interrupt)
        frames = pipeline.decode_video(vaes, video.to(device)).cpu()
        sound = pipeline.decode_audio(vaes, audio.to(device)) if audio is not None else None
    if sound is None:
        return ValidationClip(frames, request.fps)
    return ValidationClip(frames, request.fps, sound["waveform"][0], sound["sample_rate"])
