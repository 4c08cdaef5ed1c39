"""LTX-2 generation: text/image-to-video with audio, the distilled model, and stage 2 of the two-stage pipeline.

One call of :func:`generate` runs one stage: it builds the video and audio token sequences (noise drawn on the CPU
from the seed, image conditioning written into the video tokens with a per-token denoise mask), their RoPE
positions, and runs :func:`cinetune.ltx2.sampling.sample_av` with the DiT as the denoiser. The two-stage pipeline
(Lightricks/LTX-2 ``packages/ltx-pipelines/src/ltx_pipelines/ti2vid_two_stages.py``) is a graph of nodes: stage 1
at half the width and height in ``dev`` mode, :class:`~cinetune.ltx2.upsampler.LTX2LatentUpsampler`, then
``stage 2`` here (both modalities re-noised at σ = 0.909375, the three stage-2 sigmas, no guidance), usually with
the distilled LoRA applied to the dev model.

Shapes: video latents ``[B, 128, F', H', W']`` with F' = (F − 1)/8 + 1, H' = H/32, W' = W/32, normalised with the
VAE's per-channel statistics (as ComfyUI's LTX-2 latents); audio latents ``[B, 8, T, 16]`` with T = round(F/fps·25)
(Lightricks/LTX-2 ``ltx_core`` ``AudioLatentShape.from_duration``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..core.family import LatentFormat
from . import sampling
from .audio import audio_latent_frames
from .dit import patchify_audio, patchify_video, unpatchify_audio, unpatchify_video
from .family import LTX2_LATENT_FORMAT
from .rope import audio_positions, video_positions

MODES = ("dev", "distilled", "stage 2")


class SizeError(ValueError):
    """A width, height or frame count LTX-2 cannot generate; the message names the nearest valid values."""


@dataclass
class LTX2Prompt:
    """One encoded prompt: the two connectors' outputs (video and audio context), ``[1, L, 3840]`` each."""

    video_context: Tensor
    audio_context: Tensor

    def to(self, device) -> "LTX2Prompt":
        return LTX2Prompt(self.video_context.to(device), self.audio_context.to(device))


@dataclass
class LTX2Conditioning:
    """Encoded prompt and negative prompt (the negative is used by text guidance in ``dev`` mode)."""

    positive: LTX2Prompt
    negative: LTX2Prompt | None


@dataclass
class Keyframe:
    """A conditioning image: its latent ``[1, 128, 1, H', W']``, the latent frame it replaces, its strength
    (1 = kept exactly; the tokens' denoise mask is 1 − strength)."""

    latent: Tensor
    latent_index: int
    strength: float


@dataclass
class SamplingRequest:
    """What one sampler stage generates and how (the sampler node's widgets).

    Attributes:
        width, height: pixels, multiples of 32 (64 for ``stage 2``, whose first stage runs at half size).
        frames: 8k + 1. fps: frames per second (RoPE time positions are seconds; the audio lasts frames/fps).
        seed: noise seed. steps: ``dev`` steps (``distilled`` and ``stage 2`` use fixed sigma lists).
        mode: ``dev`` | ``distilled`` | ``stage 2``.
        video_cfg, audio_cfg, stg, modality, rescale: multimodal guidance (``dev`` only), official 19B defaults
            3, 7, 1, 3, 0.7 (Lightricks/LTX-2 ``ltx_pipelines/utils/constants.py`` ``LTX_2_PARAMS``).
        stg_block: the block whose self-attention the STG pass skips (official 19B: 29, 0-based).
        token_count_shift: shift the schedule by the latent's token count (ComfyUI ``LTXVScheduler`` with a
            latent) instead of the official fixed shift 2.05.
        audio: generate the audio track.
    """

    width: int
    height: int
    frames: int
    fps: float = 24.0
    seed: int = 0
    steps: int = 40
    mode: str = "dev"
    video_cfg: float = 3.0
    audio_cfg: float = 7.0
    stg: float = 1.0
    stg_block: int = 29
    modality: float = 3.0
    rescale: float = 0.7
    token_count_shift: bool = False
    audio: bool = True

    @property
    def num_steps(self) -> int:
        return len(self.sigmas(tokens=1)) - 1

    def check(self, latent_format: LatentFormat = LTX2_LATENT_FORMAT) -> None:
        """Raise :class:`SizeError` / ValueError for sizes, frame counts, modes or settings LTX-2 cannot use."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        try:
            latent_format.check_size(self.width, self.height, self.frames)
        except ValueError as e:
            raise SizeError(str(e)) from None
        if self.mode == "stage 2":
            multiple = 2 * latent_format.size_multiple
            for name, value in (("width", self.width), ("height", self.height)):
                if value % multiple:
                    low, high = value // multiple * multiple, (value // multiple + 1) * multiple
                    raise SizeError(f"stage 2 {name} {value} must be a multiple of {multiple} (its first stage runs "
                                    f"at half size, a multiple of {latent_format.size_multiple}): use "
                                    f"{low or multiple} or {high}.")
        if self.mode == "dev" and self.steps < 2:
            raise ValueError(f"steps must be at least 2 in mode 'dev' (the schedule's last nonzero sigma is "
                             f"stretched to 0.1), got {self.steps}")

    def sigmas(self, tokens: int) -> Tensor:
        """The stage's sigma list ``[S + 1]`` float32, ending in 0."""
        if self.mode == "distilled":
            return torch.tensor(sampling.DISTILLED_SIGMAS, dtype=torch.float32)
        if self.mode == "stage 2":
            return torch.tensor(sampling.STAGE_2_DISTILLED_SIGMAS, dtype=torch.float32)
        return sampling.ltx2_sigmas(self.steps, tokens=tokens if self.token_count_shift else None)

    def guidance(self) -> tuple[sampling.GuidanceParams, sampling.GuidanceParams]:
        """Video and audio guidance for this stage (none for ``distilled`` and ``stage 2``)."""
        if self.mode != "dev":
            return sampling.GuidanceParams.none(), sampling.GuidanceParams.none()
        blocks = (self.stg_block,) if self.stg else ()
        return (sampling.GuidanceParams(cfg=self.video_cfg, stg=self.stg, stg_blocks=blocks, modality=self.modality,
                                        rescale=self.rescale),
                sampling.GuidanceParams(cfg=self.audio_cfg, stg=self.stg, stg_blocks=blocks, modality=self.modality,
                                        rescale=self.rescale))


def _stage_2_inputs(request: SamplingRequest, video_latent: Tensor | None, audio_latent: Tensor | None,
                    shape: tuple[int, ...], audio_steps: int) -> tuple[Tensor, Tensor | None]:
    """Clean tokens of stage 2 (the upsampled video latent and stage 1's audio latent), checked against the size."""
    if video_latent is None:
        raise ValueError("mode 'stage 2' refines a first stage: connect the upsampled video latent (LTX-2 Latent "
                         "Upsample) to 'video_latent'.")
    if video_latent.ndim != 5 or tuple(video_latent.shape[1:]) != shape:
        got = tuple(video_latent.shape)
        raise ValueError(f"the stage-2 video latent is {got} but {request.width}×{request.height}×{request.frames} "
                         f"needs [1, {', '.join(map(str, shape))}]: set the stage-2 width and height to twice the "
                         "first stage's and the same frames.")
    video_clean = patchify_video(video_latent.float())
    if not request.audio:
        return video_clean, None
    if audio_latent is None or audio_latent.ndim != 4 or audio_latent.shape[2] == 0:
        raise ValueError("mode 'stage 2' re-noises and refines the first stage's audio as well: connect its "
                         "audio_latent, or turn 'audio' off.")
    if audio_latent.shape[2] != audio_steps:
        raise ValueError(f"the stage-2 audio latent has {audio_latent.shape[2]} steps but {request.frames} frames at "
                         f"{request.fps:g} fps need {audio_steps}: use the same frames and fps in both stages.")
    return video_clean, patchify_audio(audio_latent.float())


def generate(dit: torch.nn.Module, conditioning: LTX2Conditioning, request: SamplingRequest, *,
             keyframes: tuple[Keyframe, ...] | list[Keyframe] = (), video_latent: Tensor | None = None,
             audio_latent: Tensor | None = None, attention_backend: str = "sdpa",
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             progress: Callable[[int, int], None] | None = None,
             check_interrupt: Callable[[], None] | None = None) -> tuple[Tensor, Tensor | None]:
    """Run one LTX-2 sampling stage and return the clean latents.

    Noise is drawn on the CPU in float32 from ``torch.Generator().manual_seed(seed)``: video tokens ``[1, N, 128]``
    first, then audio tokens ``[1, T, 128]``, so a seed gives the same result on any device. Keyframes replace the
    tokens of their latent frame with denoise mask ``1 − strength`` (Lightricks/LTX-2 ``ltx_core``
    ``VideoConditionByLatentIndex``). In ``stage 2`` both modalities are re-noised from the given latents at the
    first stage-2 sigma (0.909375) as ``ε·σ + x·(1 − σ)`` (``ti2vid_two_stages.py``).

    Args:
        dit: :class:`~cinetune.ltx2.dit.LTX2DiT` (already on ``device``, or under block swap).
        conditioning: positive and negative prompt contexts (negative needed when text guidance is on).
        request: size, frames, fps, seed, mode, guidance (checked here).
        keyframes: conditioning images (latents ``[1, 128, 1, H', W']``).
        video_latent, audio_latent: ``stage 2`` inputs ``[1, 128, F', H', W']`` / ``[1, 8, T, 16]``.
        attention_backend: ``sdpa`` | ``sageattention`` | ``flash-attn`` (see :mod:`cinetune.core.attention`).
        device, dtype: where and in which dtype the DiT computes (the sampler state stays float32).
        progress: ``progress(done, total)`` after every step. check_interrupt: raises to stop (every model call).

    Returns:
        ``(video [1, 128, F', H', W'], audio [1, 8, T, 16] or None)`` float32 on the CPU, normalised latents.

    Raises:
        SizeError / ValueError: bad size, frames, mode, settings, keyframes or stage-2 inputs; the message says how to
            fix them.
    """
    request.check()
    num_blocks = len(dit.blocks) if hasattr(dit, "blocks") else None
    if request.mode == "dev" and request.stg and num_blocks is not None and not 0 <= request.stg_block < num_blocks:
        raise ValueError(f"stg_block {request.stg_block} does not exist: this model has {num_blocks} blocks (0 … "
                         f"{num_blocks - 1}); the 19B's official STG block is 29. Set stg_block in range or stg to 0.")
    fmt = LTX2_LATENT_FORMAT
    channels, frames_l, height_l, width_l = fmt.latent_shape(request.width, request.height, request.frames)
    audio_steps = audio_latent_frames(request.frames, request.fps) if request.audio else 0
    tokens_per_frame = height_l * width_l
    n_video = frames_l * tokens_per_frame
    generator = torch.Generator().manual_seed(int(request.seed))
    video_noise = sampling.initial_noise((1, n_video, channels), generator)
    audio_noise = sampling.initial_noise((1, audio_steps, 128), generator) if request.audio else None

    if request.mode == "stage 2":
        video_clean, audio_clean = _stage_2_inputs(request, video_latent, audio_latent,
                                                   (channels, frames_l, height_l, width_l), audio_steps)
    else:
        if video_latent is not None or audio_latent is not None:
            raise ValueError("video_latent and audio_latent are inputs of mode 'stage 2'; disconnect them or switch "
                             "the mode to 'stage 2'.")
        video_clean = torch.zeros_like(video_noise)
        audio_clean = torch.zeros_like(audio_noise) if request.audio else None
    video_mask = torch.ones(1, n_video)
    for kf in keyframes:
        if not 0 <= kf.latent_index < frames_l:
            raise ValueError(f"keyframe at latent frame {kf.latent_index} is outside the {frames_l} latent frames "
                             f"of {request.frames} frames.")
        if tuple(kf.latent.shape[-2:]) != (height_l, width_l):
            raise ValueError(f"keyframe latent is {tuple(kf.latent.shape[-2:])} latents high/wide but the video is "
                             f"{(height_l, width_l)}: encode the image at the sampler's width and height.")
        video_clean, video_mask = sampling.condition_tokens(video_clean, patchify_video(kf.latent.float()),
                                                            kf.latent_index, tokens_per_frame, kf.strength,
                                                            video_mask)
    sigmas = request.sigmas(tokens=n_video)
    video_x = sampling.noise_tokens(video_clean, video_noise, float(sigmas[0]), video_mask)
    audio_x = None if audio_clean is None else sampling.noise_tokens(audio_clean, audio_noise, float(sigmas[0]))

    device = torch.device(device)
    video_pos = video_positions(frames_l, height_l, width_l, fps=request.fps, device=device)
    audio_pos = audio_positions(audio_steps, device=device) if request.audio else None
    prompts = {"cond": conditioning.positive, "uncond": conditioning.negative}
    video_params, audio_params = request.guidance()
    if prompts["uncond"] is None and (video_params.uses_cfg or audio_params.uses_cfg):
        raise ValueError("text guidance (cfg ≠ 1) needs a negative prompt: encode one with LTX-2 Text Encode.")
    contexts = {k: None if p is None else p.to(device) for k, p in prompts.items()}

    def denoise(video_t, audio_t, video_sigma, audio_sigma, *, context, skip_video_self_attn_blocks,
                skip_audio_self_attn_blocks, skip_cross_modal):
        prompt = contexts[context]
        # The sampler node sets one STG scale for both modalities, so both skip lists are the same blocks.
        skip = tuple(sorted(set(skip_video_self_attn_blocks) | set(skip_audio_self_attn_blocks)))
        video_v, audio_v = dit(
            video_t.to(device, dtype), None if audio_t is None else audio_t.to(device, dtype),
            video_sigma=video_sigma.to(device), audio_sigma=None if audio_t is None else audio_sigma.to(device),
            video_context=prompt.video_context.to(dtype),
            audio_context=None if audio_t is None else prompt.audio_context.to(dtype),
            video_positions=video_pos, audio_positions=audio_pos, skip_self_attn_blocks=skip,
            skip_cross_modal=skip_cross_modal)
        return video_v.float(), None if audio_v is None else audio_v.float()

    previous_backend = getattr(dit, "attention_backend", "sdpa")
    dit.attention_backend = attention_backend
    try:
        video_out, audio_out = sampling.sample_av(
            denoise, video_x.to(device), None if audio_x is None else audio_x.to(device), sigmas,
            video_mask=video_mask.to(device), video_clean=video_clean.to(device),
            audio_clean=None if audio_clean is None else audio_clean.to(device),
            video_params=video_params, audio_params=audio_params, progress=progress,
            check_interrupt=check_interrupt)
    finally:
        dit.attention_backend = previous_backend
    video = unpatchify_video(video_out.float().cpu(), frames_l, height_l, width_l)
    audio = None if audio_out is None else unpatchify_audio(audio_out.float().cpu())
    return video, audio


def encode_keyframe(vaes, image: Tensor, width: int, height: int, *, frame_index: int = 0, strength: float = 1.0,
                    crf: int = 33, device: torch.device | str = "cpu") -> Keyframe:
    """Encode a conditioning image for :func:`generate`.

    The image is scaled to cover ``width × height`` and centre-cropped (:func:`cinetune.core.media.fit_image`),
    passed through an H.264 round trip at ``crf`` (official image preprocessing, CRF 33;
    :func:`cinetune.core.media.h264_round_trip`) and encoded by the video VAE as a one-frame video.

    Args:
        vaes: :class:`~cinetune.ltx2.loader.LTX2VAEs` (on ``device``). image: ComfyUI IMAGE ``[B, H, W, 3]`` 0..1.
        width, height: the video's size. frame_index: pixel frame the image shows (0 = first); it conditions the
            latent frame holding that pixel frame (``(frame_index + 7) // 8``: latent frame 0 is pixel frame 0,
            latent frame k ≥ 1 covers pixel frames 8k − 7 … 8k).
        strength: 1 keeps the image exactly; lower values let the model change it (denoise mask 1 − strength).
        crf: H.264 constant rate factor of the round trip; 0 skips it.

    Returns:
        :class:`Keyframe` with the latent ``[1, 128, 1, H/32, W/32]`` float32 on the CPU.

    Raises:
        ValueError: bad image, size, frame index or strength.
    """
    from ..core.media import fit_image, h264_round_trip

    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"image strength must be between 0 and 1, got {strength}")
    if int(frame_index) < 0:
        raise ValueError(f"frame_index must be ≥ 0, got {frame_index}")
    pixels = h264_round_trip(fit_image(image, width, height), crf)
    latent = vaes.video.encode(pixels.to(device, vaes.video.dtype))
    return Keyframe(latent.float().cpu(), (int(frame_index) + 7) // 8, float(strength))


def decode_video(vaes, latent: Tensor, *, tiling: bool = True) -> Tensor:
    """Video latent ``[B, 128, F', H', W']`` → frames ``[B·F, H, W, 3]`` float32 in 0..1 (ComfyUI IMAGE)."""
    video = vaes.video.decode(latent.to(vaes.video.dtype), tiling=tiling)  # [B, 3, F, H, W] in [-1, 1]
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1)


def decode_audio(vaes, latent: Tensor | None) -> dict:
    """Audio latent ``[B, 8, T, 16]`` → ComfyUI AUDIO ``{"waveform": [B, 2, S] float32, "sample_rate": 24000}`` via
    the audio VAE and the vocoder; no latent (or T = 0) gives an empty waveform, which the mp4 saver fills with
    silence.

    Raises:
        ValueError: audio latents but no audio VAE loaded.
    """
    from .audio import decode_audio as vocode

    rate = vaes.vocoder.sample_rate if vaes.vocoder is not None else 24000
    if latent is None or latent.shape[2] == 0:
        return {"waveform": torch.zeros(1 if latent is None else latent.shape[0], 2, 0), "sample_rate": rate}
    if vaes.audio is None or vaes.vocoder is None:
        raise ValueError("decoding audio needs the audio VAE and vocoder: load them with LTX-2 VAE Loader "
                         "(audio_vae_name '(same file)' reads them from the combined checkpoint).")
    waveform, rate = vocode(latent, vaes.audio, vaes.vocoder)
    return {"waveform": waveform.float().cpu(), "sample_rate": int(rate)}
