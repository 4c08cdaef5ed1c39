"""LTX-2 LoRA training: the family's training adapter for the shared loop
(:func:`cinetune.training.trainer.train_lora`; contract in :mod:`cinetune.training.adapter`), its samples, and the
saved LoRA layout.

::

    adapter = LTX2TrainingAdapter(text_projection)           # frozen connectors, run on every step
    config = ltx2_train_config(max_steps=2000, with_audio=True, compute_dtype="bf16")
    with model_on_device(dit, adapter.blocks(dit), "cuda", blocks_to_swap=20):   # block swap, optional
        result = train_lora(dit, samples, None, config, run_dir, adapter=adapter, device="cuda")

Objective (Lightricks/LTX-2 ``packages/ltx-trainer/src/ltx_trainer/training_strategies/text_to_video.py``,
January/February 2026, the 19B line; reference ltx2.md §9.1):

- one σ per sample (:mod:`cinetune.training.sigmas`; ltx-trainer default ``"shifted_logit_normal"``, μ from the
  video token count), the **same σ for video and audio**;
- tokens: video ``[B, F'·H'·W', 128]`` (:func:`~cinetune.ltx2.dit.patchify_video` of the normalised latent),
  audio ``[B, T, 128]`` (:func:`~cinetune.ltx2.dit.patchify_audio`); ``x_σ = (1 − σ)·x0 + σ·ε``, target
  ``v = ε − x0`` (velocity), the DiT predicts v from per-token σ (it multiplies by 1000 itself);
- **first-frame conditioning** with probability ``i2v_prob`` (ltx-trainer ``first_frame_conditioning_p``) when
  ``i2v == "first"``: the first H'·W' video tokens stay clean, get σ = 0 and are left out of the loss;
- text: the cached projected Gemma features go through the frozen connectors
  (:meth:`~cinetune.ltx2.connectors.LTX2TextProjection.connect`) every step; the DiT attends every context token
  (the connectors' registers fill the padding, so their output mask is all ones);
- positions as at inference (:func:`~cinetune.ltx2.rope.video_positions` with the sample's fps,
  :func:`~cinetune.ltx2.rope.audio_positions`);
- loss: ``se = (pred − v)²`` in float32; video ``mean(se · m) / mean(m)`` with m = 1 on unconditioned tokens (the
  masked mean), audio ``mean(se)``, total = video + audio; both parts are reported (``loss_terms``). With
  ``loss_weighting`` each sample's squared errors (video and audio) are first multiplied by w(σ) of its σ
  (:func:`cinetune.training.sigmas.weighted_mse`; not an ltx-trainer option).

Modes: **video-only** (``with_audio`` None/False: the DiT runs without the audio stream and without the
audio↔video attentions, exactly as at inference without audio; the audio modules get no LoRA by default),
**audio+video** (``with_audio=True``: every sample needs an audio latent), and **image-to-video** LoRAs (``i2v
"first"`` with ``i2v_prob`` 1.0, or a mix with T2V at a lower probability).

LoRA (reference ltx2.md §9.3–9.4): targets ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention of every
block (:func:`ltx2_lora_targets`), optionally the feed-forwards. The final LoRA (:func:`save_ltx2_lora`) is
``diffusion_model.transformer_blocks.N.<module>.lora_A.weight`` / ``.lora_B.weight`` (no ``.alpha``).

Decisions (where the sources leave a choice):

- **Saved layout: lora_A/lora_B with alpha/rank baked into lora_B, no ``.alpha``.** Official ltx-pipelines
  fuses ``W += strength · lora_B @ lora_A`` and reads only ``.lora_A.weight``/``.lora_B.weight`` keys (after
  removing ``diffusion_model.``; ``ltx_core/loader/fuse_loras.py``, ``sd_ops.py`` ``LTXV_LORA_COMFY_RENAMING_MAP``):
  it ignores alpha and would skip ``lora_down``/``lora_up`` keys. ComfyUI reads the same names and, without
  ``.alpha``, applies scale 1; diffusers' ``load_lora_weights`` refuses files with ``.alpha`` keys and also applies
  scale 1. All three therefore add exactly ``(α/r)·B·A``, the trained update (official ltx-trainer files carry no
  ``.alpha`` either). Checkpoint LoRAs (for resuming)
  keep the raw tensors in the Cinetune layout (``lora_down``/``lora_up`` + ``.alpha``), which ComfyUI loads as
  well; use ``run_dir/lora.safetensors`` for ltx-pipelines.
- **Draws.** Per micro-batch of B samples, after the loop's B σ-draws: video ε ``[B, Nv, 128]``, audio ε
  ``[B, T, 128]`` (audio+video only), B uniforms for first-frame conditioning (``i2v`` "first" only), B uniforms
  for caption dropout (only when > 0); all float32 on the CPU.
- **First-frame conditioning per sample** (ltx-trainer draws once per micro-batch: the same at batch size 1, what
  its shipped configs use). One-latent-frame samples (images) are never conditioned, as in ltx-trainer.
- **Caption dropout** (not an ltx-trainer option) replaces a sample's features and mask by the cached empty
  caption's (the encoded ``""``).
- **Texts of different lengths** in a batch are left-padded (the Gemma tokenizer pads on the left) with mask 0.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.checkpoint import save_file_atomic
from ..core.flow import add_noise, velocity_target
from ..core.lora import LoRALinear, LoRAWeights
from ..training.adapter import LossTerms, TrainingAdapter, sample_tensor
from ..training.config import TrainConfig, TrainingError
from ..training.sigmas import weighted_mse
from .config import LTX2_BLOCK_PREFIXES, LTX2_LORA_TARGETS, ltx2_fp8_keep_high_precision
from .connectors import LTX2TextProjection
from .dit import LTX2DiT, patchify_audio, patchify_video
from .family import LTX2_AUDIO_LATENT_FORMAT, LTX2_FAMILY
from .rope import audio_positions, video_positions

__all__ = ["LTX2Sample", "LTX2Batch", "LTX2TrainingAdapter", "LTX2_VIDEO_LORA_TARGETS", "LTX2_FF_LORA_TARGETS",
           "ltx2_lora_targets", "ltx2_train_config", "ltx2_flow_matching_loss", "ltx2_lora_state_dict",
           "save_ltx2_lora"]

#: The attention projections of the video stream only (self- and text cross-attention).
LTX2_VIDEO_LORA_TARGETS: tuple[str, ...] = tuple(f"{a}.{t}" for a in ("attn1", "attn2") for t in LTX2_LORA_TARGETS)
#: ltx-trainer's optional feed-forward targets (video, then audio).
LTX2_FF_LORA_TARGETS: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2")
_PREFIX = "diffusion_model."


def ltx2_lora_targets(*, with_audio: bool, feed_forward: bool = False) -> tuple[str, ...]:
    """LoRA targets for an LTX-2 run.

    Args:
        with_audio: True = every attention of every block (``attn1``, ``attn2``, ``audio_attn1``, ``audio_attn2``,
            ``audio_to_video_attn``, ``video_to_audio_attn``: ltx-trainer's ``to_k, to_q, to_v, to_out.0``);
            False = the video attentions only (the others do not run in a video-only forward).
        feed_forward: add the feed-forwards (``ff.net.0.proj``, ``ff.net.2``, and the ``audio_ff`` ones with audio).

    Returns:
        Module-name suffixes for :func:`cinetune.core.lora.inject_lora` (within ``transformer_blocks.``).
    """
    targets = LTX2_LORA_TARGETS if with_audio else LTX2_VIDEO_LORA_TARGETS
    if feed_forward:
        targets = targets + (LTX2_FF_LORA_TARGETS if with_audio else LTX2_FF_LORA_TARGETS[:2])
    return targets


def ltx2_train_config(**overrides: Any) -> TrainConfig:
    """A :class:`~cinetune.training.config.TrainConfig` with ltx-trainer's LTX-2 LoRA settings
    (``configs/ltx2_av_lora.yaml``: rank 32, alpha 32, lr 1e-4, linear schedule, gradient clipping 1.0,
    ``shifted_logit_normal`` σ without a further shift, first-frame conditioning with probability 0.5), then
    ``overrides``.

    Raises:
        TrainingError: a bad value (from TrainConfig).
    """
    settings: dict[str, Any] = dict(rank=32, alpha=32.0, learning_rate=1e-4, lr_schedule="linear",
                                    max_grad_norm=1.0, timestep_sampling="shifted_logit_normal", flow_shift=1.0,
                                    i2v="first", i2v_prob=0.5)
    settings.update(overrides)
    return TrainConfig(**settings)


@dataclass
class LTX2Sample:
    """An in-memory LTX-2 training sample: what a cached LTX-2 dataset entry holds.

    Attributes:
        latent: ``[128, F', H', W']`` float video latent, normalised with the VAE's per-channel statistics (as
            ltx-trainer's ``latents/*.pt`` and the LTX-2 VAE encoder output).
        text: ``[L, D]`` float projected Gemma features (``aggregate_embed`` output, before the connectors; L = 1024
            and D = 3840 for 19B: ltx-trainer's ``prompt_embeds``), :func:`cinetune.ltx2.text.encode_prompts`.
        text_mask: bool ``[L]``, True = real token (left padding is False); at least one True.
        fps: frame rate of the clip (the RoPE time positions are seconds).
        bucket: ``(width, height)`` in pixels. frames: video frames of the clip (8k + 1; 1 for images).
        item_id: a name for messages. repeats: how often the sample counts per epoch (≥ 1).
        audio: optional ``[8, T, 16]`` float normalised audio latent (25 steps per second), needed with
            ``with_audio``.
    """

    latent: Tensor
    text: Tensor
    text_mask: Tensor
    fps: float
    bucket: tuple[int, int]
    frames: int
    item_id: str = "sample"
    repeats: int = 1
    audio: Tensor | None = None


@dataclass
class LTX2Batch:
    """One checked micro-batch (CPU): ``video [B, 128, F', H', W']`` and ``audio [B, 8, T, 16]`` (or None) float32,
    per sample ``text [L_j, D]``, ``text_mask [L_j]`` bool, ``fps``, ``ids``; ``tokens`` = F'·H'·W'."""

    video: Tensor
    audio: Tensor | None
    text: list[Tensor]
    text_mask: list[Tensor]
    fps: list[float]
    ids: list[str]
    tokens: int

    @property
    def size(self) -> int:
        return self.video.shape[0]


def ltx2_flow_matching_loss(model: nn.Module, video: Tensor, video_noise: Tensor, sigma: Tensor, *,
                            video_context: Tensor, video_positions: Tensor, audio: Tensor | None = None,
                            audio_noise: Tensor | None = None, audio_context: Tensor | None = None,
                            audio_positions: Tensor | None = None, conditioned: Tensor | None = None,
                            compute_dtype: torch.dtype = torch.float32, weighting: str = "none",
                            scales: tuple[float, float] = (1.0, 1.0)) -> LossTerms:
    """The LTX-2 training loss of one micro-batch (objective in the module notes).

    Args:
        model: the :class:`~cinetune.ltx2.dit.LTX2DiT` (with LoRA layers while training).
        video: clean video tokens ``[B, Nv, 128]`` float32; video_noise: ε of the same shape.
        sigma: ``[B]`` float32 in [0, 1], shared by video and audio.
        video_context: video connector output ``[B, L, D]``; video_positions: ``[B or 1, 3, Nv, 2]``.
        audio, audio_noise: clean audio tokens ``[B, Na, 128]`` and ε (both or neither; None = video only).
        audio_context: audio connector output ``[B, L, D]``; audio_positions: ``[B or 1, 1, Na, 2]``.
        conditioned: bool ``[B, Nv]``, True = clean conditioning token (σ 0, not in the loss); None = none.
        compute_dtype: dtype of the DiT inputs.
        weighting: per-sample loss weighting w(σ), one of :data:`cinetune.training.config.LOSS_WEIGHTINGS`.

    Returns:
        :class:`~cinetune.training.adapter.LossTerms` with ``total`` = video + audio loss and ``parts``
        ``{"video"}`` or ``{"video", "audio"}`` (float32).

    Raises:
        ValueError: shape mismatches (from :mod:`cinetune.core.flow` or the DiT); audio arguments given partly; a
            sample with every token conditioned.
    """
    B, Nv, _ = video.shape
    if (audio is None) != (audio_noise is None):
        raise ValueError("audio and audio_noise go together: pass both (audio+video) or neither (video only).")
    video_sigma = sigma.float()[:, None].expand(B, Nv)
    if conditioned is not None:
        if bool(conditioned.all(dim=1).any()):
            raise ValueError("conditioned marks every video token of a sample: at least one token must be denoised.")
        video_sigma = video_sigma.masked_fill(conditioned, 0.0)
    x_video = add_noise(video, video_noise, video_sigma.unsqueeze(-1))
    x_audio = None if audio is None else add_noise(audio, audio_noise, sigma)
    pred_video, pred_audio = model(
        x_video.to(compute_dtype), None if x_audio is None else x_audio.to(compute_dtype),
        video_sigma=video_sigma, audio_sigma=None if audio is None else sigma.float(),
        video_context=video_context.to(compute_dtype),
        audio_context=None if audio is None else audio_context.to(compute_dtype),
        video_positions=video_positions, audio_positions=None if audio is None else audio_positions)
    target = velocity_target(video, video_noise).float()
    keep = None if conditioned is None else (~conditioned).unsqueeze(-1).float()
    video_loss = scales[0] * weighted_mse(pred_video, target, sigma, weighting, keep=keep)
    parts = {"video": video_loss.detach()}
    if audio is None:
        return LossTerms(video_loss, parts)
    audio_loss = scales[1] * weighted_mse(pred_audio, velocity_target(audio, audio_noise), sigma, weighting)
    parts["audio"] = audio_loss.detach()
    return LossTerms(video_loss + audio_loss, parts)


def _left_pad(texts: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack ``[L_j, D]`` features and ``[L_j]`` masks into ``[B, L, D]`` float32 / ``[B, L]`` bool, padded on the
    left."""
    L = max(t.shape[0] for t in texts)
    out = torch.zeros(len(texts), L, texts[0].shape[1], dtype=torch.float32)
    mask = torch.zeros(len(texts), L, dtype=torch.bool)
    for j, (t, m) in enumerate(zip(texts, masks)):
        out[j, L - t.shape[0]:] = t.float()
        mask[j, L - t.shape[0]:] = m
    return out, mask


class LTX2TrainingAdapter(TrainingAdapter):
    """The LTX-2 training adapter (objective, modes and decisions in the module notes).

    Args:
        text_projection: the checkpoint's :class:`~cinetune.ltx2.connectors.LTX2TextProjection` (connectors), held
            frozen: it turns the cached features into the two contexts on every step, on the training device while
            the run lasts (moved back afterwards).

    Raises:
        TypeError: ``text_projection`` is not an ``LTX2TextProjection``.
    """

    name = LTX2_FAMILY.name
    sample_fields = ("latent", "text", "text_mask", "fps")
    lora_within = LTX2_BLOCK_PREFIXES

    def __init__(self, text_projection: LTX2TextProjection) -> None:
        if not isinstance(text_projection, LTX2TextProjection):
            raise TypeError(f"text_projection must be an LTX2TextProjection (ltx2.text.load_text_projection), got "
                            f"{type(text_projection).__name__}")
        self.text_projection = text_projection

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, LTX2DiT)

    def check(self, model: nn.Module, config: TrainConfig) -> None:
        if not isinstance(model, LTX2DiT):
            raise TrainingError(f"The LTX-2 training adapter trains an LTX2DiT; got a {type(model).__name__}.")
        if config.i2v == "first_last":
            raise TrainingError("LTX-2 trains first-frame conditioning only: set i2v to 'first' (image-to-video) or "
                                "'off'.")
        if config.nabla is not None:
            raise TrainingError("NABLA is Kandinsky 5's sparse attention; LTX-2 trains with full attention: set nabla "
                                "to None.")
        dim, width = self.text_projection.config.dim, model.config.caption_channels
        if dim != width:
            raise TrainingError(f"The text projection's connectors are {dim} wide but this DiT's caption projection "
                                f"takes {width}: load the text projection of the same checkpoint as the model.")

    def lora_targets(self, config: TrainConfig) -> tuple[str, ...]:
        return config.targets or ltx2_lora_targets(with_audio=bool(config.with_audio))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer_blocks)

    def fp8_keep(self, name: str) -> bool:
        return ltx2_fp8_keep_high_precision(name)

    # ----------------------------------------------------------------------------------------------- inputs

    def _check_text(self, text: Any, mask: Any, who: str) -> tuple[Tensor, Tensor]:
        D = self.text_projection.config.dim
        if not isinstance(text, Tensor) or not text.is_floating_point() or text.ndim != 2 or text.shape[0] < 1 \
                or text.shape[1] != D:
            got = f"{text.dtype} {list(text.shape)}" if isinstance(text, Tensor) else type(text).__name__
            raise TrainingError(f"{who}: text features must be float [L, {D}] (the projected Gemma features of "
                                f"ltx2.text.encode_prompts), got {got}; re-cache the captions with this checkpoint's "
                                "text encoder.")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (text.shape[0],) \
                or not bool(mask.any()):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise TrainingError(f"{who}: text_mask must be bool [{text.shape[0]}] with at least one True (the "
                                f"tokenizer's attention mask), got {got}; re-cache the captions.")
        return text, mask

    def empty_caption(self, model: nn.Module, empty_text: Any, config: TrainConfig) -> tuple[Tensor, Tensor] | None:
        """``(features [L, D], mask [L])`` of the encoded empty prompt; None when caption dropout is off."""
        if config.caption_dropout == 0:
            return None
        if not isinstance(empty_text, (tuple, list)) or len(empty_text) != 2:
            raise TrainingError("caption_dropout needs the empty-caption embedding: pass empty_text=(features [L, D], "
                                "mask [L]) of the encoded empty prompt \"\" (ltx2.text.encode_prompts), or set "
                                "caption_dropout to 0.")
        return self._check_text(empty_text[0], empty_text[1], "empty caption")

    def load_batch(self, model: nn.Module, samples: Sequence[Any], config: TrainConfig) -> LTX2Batch:
        C = model.config.in_channels
        fmt = LTX2_AUDIO_LATENT_FORMAT
        audio_shape = (fmt.channels, fmt.mel_bins)
        if fmt.channels * fmt.mel_bins != model.config.audio_in_channels:
            raise TrainingError(f"This DiT takes {model.config.audio_in_channels} audio features per token, not the "
                                f"{fmt.channels}×{fmt.mel_bins} of the LTX-2 audio latent.")
        videos, audios, texts, masks, fps, ids = [], [], [], [], [], []
        for s in samples:
            who = f"sample {s.item_id!r}"
            lat = sample_tensor(s, "latent", True)
            if lat.ndim != 4 or lat.shape[0] != C:
                raise TrainingError(f"{who}: latent must be [{C}, F', H', W'] (normalised LTX-2 video latent), got "
                                    f"{list(lat.shape)}; re-cache the latents with the LTX-2 VAE.")
            if videos and lat.shape != videos[0].shape:
                raise TrainingError(f"{who} and sample {ids[0]!r} share bucket {tuple(s.bucket)} and {s.frames} "
                                    f"frames but their latents differ ({list(lat.shape)} vs {list(videos[0].shape)}); "
                                    "re-cache the dataset.")
            if config.with_audio:
                audio = sample_tensor(s, "audio", False)
                if audio is None:
                    raise TrainingError(f"{who} has no audio latent, which with_audio=True needs: cache the dataset "
                                        "with audio (clips with a sound track), or set with_audio off.")
                if audio.ndim != 3 or tuple(audio.shape[::2]) != audio_shape or audio.shape[1] < 1:
                    raise TrainingError(f"{who}: audio latent must be [{audio_shape[0]}, T, {audio_shape[1]}], got "
                                        f"{list(audio.shape)}; re-cache the audio with the LTX-2 audio VAE.")
                if audios and audio.shape != audios[0].shape:
                    raise TrainingError(f"{who} and sample {ids[0]!r} share a batch but their audio latents differ "
                                        f"in length ({audio.shape[1]} vs {audios[0].shape[1]} steps): use batch_size 1 "
                                        "or clips of the same frame rate.")
                audios.append(audio.float())
            rate = getattr(s, "fps", None)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
                raise TrainingError(f"{who}: fps must be a positive number (the clip's frame rate), got {rate!r}.")
            text, mask = self._check_text(sample_tensor(s, "text", True), getattr(s, "text_mask", None), who)
            videos.append(lat.float())
            texts.append(text)
            masks.append(mask)
            fps.append(float(rate))
            ids.append(s.item_id)
        F_, H, W = videos[0].shape[1:]
        return LTX2Batch(torch.stack(videos), torch.stack(audios) if audios else None, texts, masks, fps, ids,
                         tokens=F_ * H * W)

    # ----------------------------------------------------------------------------------------------- loss

    def loss(self, model: nn.Module, batch: LTX2Batch, sigma: Tensor, *, generator: torch.Generator, empty: Any,
             config: TrainConfig, device: torch.device, share: slice | None = None) -> LossTerms:
        cfg, dev, B = config, device, batch.size
        frames, height, width = batch.video.shape[2:]
        video = patchify_video(batch.video)
        video_noise = torch.randn(video.shape, generator=generator, dtype=torch.float32)
        audio = audio_noise = None
        if batch.audio is not None:
            audio = patchify_audio(batch.audio)
            audio_noise = torch.randn(audio.shape, generator=generator, dtype=torch.float32)
        conditioned = None
        if cfg.i2v != "off":
            chosen = torch.rand(B, generator=generator) < cfg.i2v_prob
            if frames > 1 and bool(chosen.any()):
                conditioned = torch.zeros(B, video.shape[1], dtype=torch.bool)
                conditioned[chosen, :height * width] = True
        drop = (torch.rand(B, generator=generator) < cfg.caption_dropout).tolist() \
            if cfg.caption_dropout > 0 else [False] * B
        texts = [empty[0] if drop[j] else batch.text[j] for j in range(B)]
        masks = [empty[1] if drop[j] else batch.text_mask[j] for j in range(B)]
        features, mask = _left_pad(texts, masks)
        scales = (1.0, 1.0)
        fps = list(batch.fps)
        if share is not None:  # this rank's samples; their losses weigh as their part of the whole micro-batch
            kept = None if conditioned is None else (~conditioned).sum()
            video, video_noise, sigma, features, mask = (video[share], video_noise[share], sigma[share],
                                                         features[share], mask[share])
            audio, audio_noise = (None, None) if audio is None else (audio[share], audio_noise[share])
            n = len(range(B)[share])
            scales = (n / B if conditioned is None else float((~conditioned[share]).sum() / kept), n / B)
            conditioned = None if conditioned is None else conditioned[share]
            fps = fps[share]
        with torch.no_grad():
            video_context, audio_context = self.text_projection.connect(features.to(dev), mask.to(dev))

        if len(set(fps)) == 1:
            v_pos = video_positions(frames, height, width, fps=fps[0], device=dev)
        else:
            v_pos = torch.cat([video_positions(frames, height, width, fps=r, device=dev) for r in fps])
        return ltx2_flow_matching_loss(
            model, video.to(dev), video_noise.to(dev), sigma.to(dev), video_context=video_context,
            video_positions=v_pos, audio=None if audio is None else audio.to(dev),
            audio_noise=None if audio_noise is None else audio_noise.to(dev),
            audio_context=None if audio is None else audio_context,
            audio_positions=None if audio is None else audio_positions(audio.shape[1], device=dev),
            conditioned=None if conditioned is None else conditioned.to(dev), compute_dtype=cfg.compute_dtype,
            weighting=cfg.loss_weighting, scales=scales)

    @contextmanager
    def running(self, model: nn.Module, config: TrainConfig, device: torch.device) -> Iterator[None]:
        """The text connectors on ``device`` in eval mode, ``config.attention_backend`` on DiT and projection, and
        the DiT's own ``gradient_checkpointing`` flag off (the loop checkpoints the blocks); all restored on exit.

        The aggregate embedding stays where it is: cached captions already hold its output (:meth:`load_batch`), so
        only the connectors run during training (1.45 GB less on the device for the 19B model in bf16).
        """
        proj = self.text_projection
        connectors = (proj.video_embeddings_connector, proj.audio_embeddings_connector)
        homes = [next(c.parameters()).device for c in connectors]
        saved = (proj.training, proj.attention_backend, model.attention_backend, model.gradient_checkpointing)
        proj.eval()
        for c in connectors:
            c.to(device)
        proj.attention_backend = model.attention_backend = config.attention_backend
        model.gradient_checkpointing = False
        try:
            yield
        finally:
            for c, home in zip(connectors, homes):
                c.to(home)
            proj.train(saved[0])
            proj.attention_backend, model.attention_backend, model.gradient_checkpointing = saved[1:]

    def save_lora(self, path: Path, modules: LoRAWeights | Mapping[str, LoRALinear], *, dtype: torch.dtype,
                  metadata: Mapping[str, str]) -> Path:
        return save_ltx2_lora(path, modules, dtype=dtype, metadata=metadata)


def ltx2_lora_state_dict(weights: LoRAWeights | Mapping[str, LoRALinear], *,
                         dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The LoRA in the layout official ltx-pipelines and native ComfyUI both apply as trained (module notes).

    Keys per layer ``<p>``: ``diffusion_model.<p>.lora_A.weight`` = A ``[r, in]``, ``.lora_B.weight`` =
    ``(α/r)·B`` ``[out, r]`` (computed in float32); no ``.alpha`` (scale 1 wherever it is applied).

    Args:
        weights: :class:`~cinetune.core.lora.LoRAWeights` or the dict of :func:`~cinetune.core.lora.inject_lora`.
        dtype: storage dtype of A and B (None keeps A's).

    Returns:
        New dict of CPU tensors.
    """
    if not isinstance(weights, LoRAWeights):
        weights = LoRAWeights.from_modules(weights)
    out: dict[str, Tensor] = {}
    for path, (down, up, alpha) in weights.layers.items():
        rank = down.shape[0]
        target = dtype or down.dtype
        out[f"{_PREFIX}{path}.lora_A.weight"] = down.detach().to("cpu", target)
        out[f"{_PREFIX}{path}.lora_B.weight"] = (up.detach().float().cpu() * (alpha / rank)).to(target)
    return out


def save_ltx2_lora(path: str | Path, weights: LoRAWeights | Mapping[str, LoRALinear], *, dtype: torch.dtype,
                   metadata: Mapping[str, str]) -> Path:
    """Write :func:`ltx2_lora_state_dict` atomically as safetensors with ``metadata`` plus ``ss_network_dim`` /
    ``ss_network_alpha`` (the rank, or ``"Dynamic"``: alpha equals rank after baking),
    ``modelspec.architecture`` ``"ltx-2"`` and ``trainer`` ``"cinetune"`` (unless given).

    Raises:
        TrainingError: no layers, or metadata that is not str → str.
    """
    tensors = ltx2_lora_state_dict(weights, dtype=dtype)
    if not tensors:
        raise TrainingError("Nothing to save: the LoRA has no layers.")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(metadata).items()):
        raise TrainingError("LoRA metadata must map str to str.")
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    meta = {**dict(metadata), "ss_network_dim": dim, "ss_network_alpha": dim}
    meta.setdefault("modelspec.architecture", LTX2_FAMILY.name)
    meta.setdefault("trainer", "cinetune")
    return save_file_atomic(tensors, Path(path), meta)
