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
from ..core.preview import LatentPreview, StepCallback
from . import sampling
from .audio import audio_latent_frames
from .dit import patchify_audio, patchify_video, unpatchify_audio, unpatchify_video
from .family import LTX2_LATENT_FORMAT
from .rope import audio_positions, video_positions

MODES = ("dev", "distilled", "stage 2")


#: Latent previews while sampling: LTX-2 video latent-to-RGB factors on the normalised latent (ComfyUI's LTX-2 latents
#: are normalised by the VAE, no scale). Source: ComfyUI ``comfy/latent_formats.py`` class ``LTXAV`` (the LTX-2
#: audio+video format; Comfy-Org/ComfyUI master, commit 75399d78). ComfyUI 0.3.75 predates LTX-2 and has only the
#: LTX-Video 0.9 table (class ``LTXV``), fitted to another VAE. No tiny approximate decoder is named for it.
LTX2_PREVIEW = LatentPreview(
    LTX2_LATENT_FORMAT,
    rgb_factors=(
        (0.001135, -0.010555, -0.004925), (-0.008019, -0.006231, -0.005564), (0.012637, 0.005605, 0.012713),
        (0.023454, 0.020771, 0.017844), (-0.011940, -0.000932, 0.009292), (0.018602, 0.011018, 0.013969),
        (-0.036369, -0.046631, -0.057898), (-0.031919, 0.000131, 0.015214), (0.014519, 0.021041, 0.015325),
        (0.018889, 0.016149, -0.002836), (-0.003784, -0.006057, -0.008195), (0.013262, 0.030259, 0.029775),
        (0.050465, 0.050366, 0.025255), (0.018628, 0.007691, 0.002893), (-0.015698, -0.008451, -0.000676),
        (-0.013600, -0.012587, -0.004437), (0.012482, 0.021469, 0.027913), (-0.018241, -0.013488, -0.010975),
        (0.013828, 0.012568, 0.021984), (0.017911, 0.006552, 0.005567), (0.026769, 0.006803, -0.009360),
        (-0.006794, -0.008447, -0.013921), (0.029708, 0.018671, 0.022811), (-0.014732, -0.019169, 0.000903),
        (0.019607, 0.032595, 0.053409), (-0.003721, 0.003976, 0.010364), (-0.020193, -0.026076, -0.036068),
        (-0.002328, 0.006527, 0.013052), (0.017171, 0.009224, 0.006548), (0.001104, -0.000591, 0.000147),
        (-0.000217, 0.011834, 0.017945), (-0.015329, -0.012463, -0.006178), (-0.009478, -0.008680, -0.004107),
        (-0.005565, -0.006006, -0.001493), (0.009451, 0.008794, 0.013207), (-0.009989, -0.008027, -0.009568),
        (-0.001505, -0.008805, -0.006828), (0.001105, 0.008999, 0.009079), (0.025935, 0.016426, 0.008036),
        (0.006313, 0.000694, -0.006039), (-0.001893, -0.006951, -0.009560), (-0.007082, -0.002566, -0.007152),
        (-0.005231, 0.004829, 0.008220), (-0.004333, 0.001251, -0.004852), (-0.017024, -0.012730, -0.007457),
        (0.024988, 0.032963, 0.036556), (0.013697, 0.012278, 0.009979), (-0.013751, -0.008369, -0.015446),
        (-0.009348, -0.001047, 0.007622), (-0.003135, -0.003350, -0.003766), (0.007436, 0.004957, 0.010480),
        (0.018315, 0.022066, 0.021104), (-0.005621, -0.006770, -0.008219), (-0.007427, 0.001911, -0.001231),
        (-0.007413, 0.000486, -0.006039), (-0.014698, -0.007160, 0.006509), (0.013775, 0.014185, 0.008203),
        (0.060246, 0.069787, 0.072833), (0.009861, 0.004870, 0.001194), (-0.003660, 0.003251, 0.008015),
        (0.003696, -0.003680, -0.008851), (0.014924, 0.006196, 0.005282), (-0.006740, -0.004319, -0.006729),
        (0.020635, 0.015163, 0.012385), (-0.032623, -0.006105, 0.010436), (-0.058988, -0.030162, -0.037961),
        (-0.035614, -0.021929, -0.011062), (-0.023412, -0.011305, -0.005054), (-0.002716, -0.005184, -0.004084),
        (0.014591, 0.015294, 0.014045), (0.008310, 0.002466, -0.003225), (0.005176, 0.001119, 0.000695),
        (-0.021569, -0.030886, -0.044732), (0.007517, 0.003891, 0.000551), (-0.006793, 0.004059, 0.010184),
        (-0.086481, -0.082033, -0.083414), (0.004192, 0.000762, -0.008658), (0.010970, 0.009002, 0.007384),
        (0.004042, -0.006732, -0.011031), (0.012164, 0.006401, 0.007483), (0.029252, 0.013990, 0.011128),
        (0.048452, 0.034648, 0.016269), (0.024104, 0.012647, 0.011754), (-0.013216, -0.020192, -0.019752),
        (-0.010799, -0.008535, -0.005467), (0.005823, 0.001403, 0.001890), (0.052393, 0.044771, 0.032777),
        (0.007576, -0.008080, -0.012453), (0.009830, 0.004244, 0.001213), (-0.025867, -0.013169, -0.010636),
        (0.008494, 0.003135, 0.000790), (0.003969, -0.002625, -0.010204), (0.006509, 0.008272, 0.020819),
        (-0.004943, -0.013424, -0.015351), (0.005541, 0.009136, -0.003666), (-0.014300, -0.015864, -0.016853),
        (0.002650, 0.028393, 0.014125), (-0.027661, -0.045422, -0.064995), (0.009220, 0.015522, 0.010574),
        (-0.002236, 0.002915, 0.004557), (-0.020269, -0.008212, -0.000532), (0.019294, 0.003655, -0.002809),
        (0.007116, -0.002784, 0.000017), (0.057277, 0.073270, 0.074401), (-0.002616, -0.001696, -0.000498),
        (0.007248, 0.009793, 0.022829), (-0.002590, -0.005601, -0.000436), (-0.007681, 0.003893, -0.004119),
        (-0.057392, -0.045545, -0.025290), (0.045188, 0.047985, 0.054059), (0.000937, -0.008861, -0.038406),
        (-0.010192, -0.008036, -0.005385), (-0.030222, -0.027498, -0.030765), (-0.008359, 0.013247, 0.010918),
        (0.004102, 0.002093, 0.006934), (0.039461, 0.027339, 0.008284), (-0.075747, -0.076340, -0.071625),
        (0.002692, 0.005096, -0.002247), (-0.002453, -0.002785, -0.010483), (0.012265, 0.005481, 0.001729),
        (0.017755, 0.008655, 0.003532), (0.055560, 0.049128, 0.044137), (-0.025861, -0.023798, -0.018815),
        (-0.014876, -0.010770, -0.010713), (-0.017315, -0.012599, -0.008661), (-0.008461, -0.006210, -0.007744),
        (-0.040175, -0.042255, -0.048119), (-0.019355, -0.021055, -0.021919),
    ),
    rgb_bias=(-0.347892, -0.363814, -0.370287),
    taesd_decoder_name=None,
    source="ComfyUI comfy/latent_formats.py, class LTXAV (latent_rgb_factors, latent_rgb_factors_bias)",
)


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
    if audio_latent is None:
        raise ValueError("mode 'stage 2' re-noises and refines the first stage's audio as well: connect its "
                         "audio_latent, or turn 'audio' off.")
    if audio_latent.ndim != 4 or tuple(audio_latent.shape[1:2]) + tuple(audio_latent.shape[3:]) != (8, 16):
        raise ValueError(f"the stage-2 audio_latent is {tuple(audio_latent.shape)}, not an LTX-2 audio latent "
                         "[1, 8, steps, 16]: connect the first LTX-2 Sampler's audio_latent (its second output).")
    if audio_latent.shape[2] == 0:
        raise ValueError("the first stage made no sound (its 'audio' is off): turn 'audio' on in the first LTX-2 "
                         "Sampler, or off in this one.")
    if audio_latent.shape[2] != audio_steps:
        raise ValueError(f"the stage-2 audio latent has {audio_latent.shape[2]} steps but {request.frames} frames at "
                         f"{request.fps:g} fps need {audio_steps}: use the same frames and fps in both stages.")
    return video_clean, patchify_audio(audio_latent.float())


def generate(dit: torch.nn.Module, conditioning: LTX2Conditioning, request: SamplingRequest, *,
             keyframes: tuple[Keyframe, ...] | list[Keyframe] = (), video_latent: Tensor | None = None,
             audio_latent: Tensor | None = None, attention_backend: str = "sdpa",
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             progress: Callable[[int, int], None] | None = None,
             check_interrupt: Callable[[], None] | None = None,
             on_step: StepCallback | None = None) -> tuple[Tensor, Tensor | None]:
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
        on_step: ``on_step(done, total, x0)`` after every step with the guided estimate of the clean video latent
            ``[1, 128, F', H', W']`` float32 on ``device`` (normalised, as the returned video; conditioned frames
            hold their clean latent), e.g. for a preview.

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

    def report_video(done: int, total: int, video_x0: Tensor) -> None:
        on_step(done, total, unpatchify_video(video_x0, frames_l, height_l, width_l))

    previous_backend = getattr(dit, "attention_backend", "sdpa")
    dit.attention_backend = attention_backend
    try:
        video_out, audio_out = sampling.sample_av(
            denoise, video_x.to(device), None if audio_x is None else audio_x.to(device), sigmas,
            video_mask=video_mask.to(device), video_clean=video_clean.to(device),
            audio_clean=None if audio_clean is None else audio_clean.to(device),
            video_params=video_params, audio_params=audio_params, progress=progress,
            check_interrupt=check_interrupt, on_step=None if on_step is None else report_video)
    finally:
        dit.attention_backend = previous_backend
    video = unpatchify_video(video_out.float().cpu(), frames_l, height_l, width_l)
    audio = None if audio_out is None else unpatchify_audio(audio_out.float().cpu())
    return video, audio


def encode_keyframe(vaes, image: Tensor, width: int, height: int, *, frame_index: int = 0, strength: float = 1.0,
                    crf: int = 33, device: torch.device | str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> Keyframe:
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
        progress: ``progress(done, total)`` after each VAE tile.

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
    latent = vaes.video.encode(pixels.to(device, vaes.video.dtype), progress=progress)
    return Keyframe(latent.float().cpu(), (int(frame_index) + 7) // 8, float(strength))


def decode_video(vaes, latent: Tensor, *, tiling: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Video latent ``[B, 128, F', H', W']`` → frames ``[B·F, H, W, 3]`` float32 in 0..1 (ComfyUI IMAGE);
    ``progress(done, total)`` after each VAE tile."""
    video = vaes.video.decode(latent.to(vaes.video.dtype), tiling=tiling, progress=progress)  # [B, 3, F, H, W], ±1
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
