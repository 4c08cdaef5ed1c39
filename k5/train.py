"""Kandinsky 5 LoRA training: the family's training adapter for the shared loop
(:func:`cinetune.training.trainer.train_lora`; contract in :mod:`cinetune.training.adapter`).

Importing this module registers :data:`K5_TRAINING`, so ``train_lora`` finds it for a ``Kandinsky5DiT``.

Objective (reference k5.md §8; kandinskylab/kandinsky-5 LoRA training, kohya-ss/musubi-tuner
``kandinsky5_train_network.py``; Liu et al. 2022, arXiv:2209.03003): per sample one σ, ``x0 = latent ×
SCALING_FACTOR`` (latents are cached raw, as the official trainer does), ε ~ N(0, I),
``x_σ = (1 − σ)·x0 + σ·ε``, target ``v = ε − x0``, ``loss = mean((pred − v)²)`` in float32 over every element of
the batch (all channels and frames); with ``loss_weighting`` each sample's squared error is first multiplied by
w(σ) (:func:`cinetune.training.sigmas.weighted_mse`). The DiT gets ``timestep = 1000·σ`` (official; musubi-tuner adds 1, not
done here). The official LoRA example samples ``"logit_normal"`` σ and shifts it with ``scheduler_scale`` 5.0, the
default ``flow_shift``.

Model input (33 channels, noisy 16 | conditioning 16 | mask 1): text-to-video has conditioning and mask 0.
Image-to-video training follows the official ``add_visual_cond`` (k5.md §8): with probability ``i2v_prob`` per
sample the clean first-frame latent (model space) goes into the conditioning channels of latent frame 0 and the
mask is 1 there; ``"first_last"`` also puts the last-frame latent into frame −1 (mask 1 there, as musubi-tuner's
``first_last`` mode). ``x_σ`` stays noisy at every frame and the loss covers all frames, the conditioned ones
included, as in both trainers. DiTs without conditioning channels (text-to-image) get the noisy latent alone.

Decisions (where the sources leave a choice):

- **Draws.** Per micro-batch of B samples, after the loop's B σ-draws: ε with the latent's shape (float32), B
  uniforms for image-to-video (only when ``i2v`` is not ``"off"``), B uniforms for caption dropout (only when it is
  > 0). Noise is drawn on the CPU and moved to the device.
- **Image-to-video details.** ``i2v_prob`` defaults to 1.0 (a dedicated I2V LoRA on an I2V checkpoint); the
  official trainer uses ``visual_cond_prob`` 0.2 to keep a T2V model able to do both. A sample without ``first``
  uses its own latent frame 0, which is the first frame encoded alone (the VAE is causal); ``first_last`` needs a
  ``last`` latent. One-latent-frame samples (images) are never conditioned (their only frame would be the answer).
  Official *inference* puts the image into the noisy channels instead (see docs/decisions.md); training follows
  the official trainer.
- **Caption dropout** replaces text and pooled embedding by the cached *empty caption* (encoded ``""``, per Qwen
  template when a mapping is given), not zeros: the official config points at a precomputed null-text embedding,
  whose exact form is unverified (k5.md §5).
- **Texts** of a batch are zero-padded to the longest with a key mask (None when none is padded).
- **Blocks**: the text blocks then the visual blocks (the execution order), checkpointed one by one (the
  official/musubi granularity) and swapped as one list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.flow import add_noise, velocity_target
from ..training.adapter import LossTerms, TrainingAdapter, register_training_adapter, sample_tensor
from ..training.config import TrainConfig, TrainingError
from ..training.sigmas import weighted_mse
from .dit import k5_fp8_keep_high_precision
from .family import K5_BLOCK_PREFIXES, K5_FAMILY, K5_LORA_TARGETS
from .nabla import NablaConfig, check_nabla_grid
from .vae import SCALING_FACTOR

__all__ = ["K5Sample", "K5Batch", "K5TrainingAdapter", "K5_TRAINING", "flow_matching_loss"]


@dataclass
class K5Sample:
    """An in-memory Kandinsky 5 training sample (the cache gives the same fields through
    :func:`cinetune.training.samples.samples_from_cache`).

    Attributes:
        latent: ``[16, T, h, w]`` float RAW VAE latent (not multiplied by ``SCALING_FACTOR``); h, w even.
        text: ``[L, D]`` float Qwen2.5-VL hidden states of the L valid tokens (L ≥ 1, no padding).
        pooled: ``[D2]`` float CLIP pooled embedding.
        bucket: ``(width, height)`` in pixels. frames: video frames of the clip (1 for images).
        item_id: a name for messages. repeats: how often the sample counts per epoch (≥ 1).
        first, last: optional ``[16, 1, h, w]`` RAW latents of the first / last frame encoded alone (I2V).
        template: Qwen template name (selects the empty caption when ``empty_text`` is a mapping).
    """

    latent: Tensor
    text: Tensor
    pooled: Tensor
    bucket: tuple[int, int]
    frames: int
    item_id: str = "sample"
    repeats: int = 1
    first: Tensor | None = None
    last: Tensor | None = None
    template: str = "video"


@dataclass
class K5Batch:
    """One checked micro-batch (CPU): ``latent [B, 16, T, h, w]`` raw float32, per sample ``first``/``last``
    (``[16, 1, h, w]`` or None), ``text`` ``[L_j, D]``, ``pooled`` ``[D2]``, ``template``, ``ids``; ``tokens`` =
    T·(h/2)·(w/2) visual tokens per sample."""

    latent: Tensor
    first: list[Tensor | None]
    last: list[Tensor | None]
    text: list[Tensor]
    pooled: list[Tensor]
    template: list[Any]
    ids: list[str]
    tokens: int

    @property
    def size(self) -> int:
        return self.latent.shape[0]


def flow_matching_loss(model: nn.Module, x0: Tensor, noise: Tensor, sigma: Tensor, text: Tensor, pooled: Tensor, *,
                       text_mask: Tensor | None = None, cond: Tensor | None = None, mask: Tensor | None = None,
                       rope_scale: Sequence[float] = (1.0, 2.0, 2.0), attention_backend: str = "sdpa",
                       nabla: NablaConfig | None = None, compute_dtype: torch.dtype = torch.float32,
                       weighting: str = "none") -> Tensor:
    """The training loss of one micro-batch: ``mean((model(x_σ) − (ε − x0))²)`` in float32, each sample weighted by
    w(σ) when ``weighting`` is not ``"none"``.

    Args:
        model: the Kandinsky 5 DiT (with LoRA layers while training).
        x0: ``[B, 16, T, h, w]`` clean latent in MODEL space (raw × ``SCALING_FACTOR``), float32.
        noise: ε, same shape, float32. sigma: ``[B]`` float32 in [0, 1].
        text: ``[B, L, D]``; pooled ``[B, D2]``; text_mask: bool ``[B, L]`` (True = real token) or None.
        cond, mask: ``[B, 16, T, h, w]`` conditioning latent and ``[B, 1, T, h, w]`` mask for a DiT with
            conditioning channels (both or neither).
        rope_scale, attention_backend, nabla: passed to the DiT. compute_dtype: dtype of the DiT inputs.
        weighting: one of :data:`cinetune.training.config.LOSS_WEIGHTINGS` (:mod:`cinetune.training.sigmas`).

    Returns:
        0-dim float32 loss (differentiable w.r.t. the trainable parameters). The DiT gets ``timestep = 1000·σ``.

    Raises:
        ValueError: shape mismatches (from :mod:`cinetune.core.flow` or the DiT); only one of cond/mask given.
    """
    if (cond is None) != (mask is None):
        raise ValueError("cond and mask go together: pass both (DiT with conditioning channels) or neither.")
    x_sigma = add_noise(x0, noise, sigma)
    target = velocity_target(x0, noise)
    x_in = x_sigma if cond is None else torch.cat([x_sigma, cond, mask], dim=1)
    pred = model(x_in.to(compute_dtype), text.to(compute_dtype), pooled.to(compute_dtype),
                 (1000.0 * sigma).float(), text_mask=text_mask, rope_scale=tuple(rope_scale),
                 attention_backend=attention_backend, nabla=nabla)
    return weighted_mse(pred, target, sigma, weighting)


class K5TrainingAdapter(TrainingAdapter):
    """The Kandinsky 5 training adapter (objective and decisions in the module notes)."""

    name = K5_FAMILY.name
    sample_fields = ("latent", "text", "pooled")
    lora_within = K5_BLOCK_PREFIXES

    def accepts(self, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("text_transformer_blocks", "visual_transformer_blocks")) and \
            all(hasattr(getattr(model, "config", None), a) for a in ("visual_cond", "in_text_dim2"))

    def check(self, model: nn.Module, config: TrainConfig) -> None:
        cfg = getattr(model, "config", None)
        for attr in ("out_visual_dim", "in_text_dim", "in_text_dim2", "visual_cond", "patch_size"):
            if not hasattr(cfg, attr):
                raise TrainingError(f"The Kandinsky 5 training adapter trains a Kandinsky5DiT (with a K5Config); got "
                                    f"a {type(model).__name__} without config.{attr}.")
        if config.i2v != "off" and not cfg.visual_cond:
            raise TrainingError(f"i2v={config.i2v!r} needs a DiT with conditioning channels (33 input channels); "
                                "this one is a text-to-image model. Set i2v to 'off'.")
        if config.nabla is not None and not isinstance(config.nabla, NablaConfig):
            raise TrainingError(f"nabla must be a NablaConfig or None; got {type(config.nabla).__name__}.")
        if config.with_audio:
            raise TrainingError("Kandinsky 5 makes no sound: set with_audio to None or False.")

    def lora_targets(self, config: TrainConfig) -> tuple[str, ...]:
        return config.targets or K5_LORA_TARGETS

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [*model.text_transformer_blocks, *model.visual_transformer_blocks]

    def fp8_keep(self, name: str) -> bool:
        return k5_fp8_keep_high_precision(name)

    # ----------------------------------------------------------------------------------------------- inputs

    def empty_caption(self, model: nn.Module, empty_text: Any,
                      config: TrainConfig) -> dict[Any, tuple[Tensor, Tensor]] | None:
        """``{template or None: (text [L, D], pooled [D2])}``; None when caption dropout is off."""
        if config.caption_dropout == 0:
            return None
        fix = ("caption_dropout needs the empty-caption embedding: pass empty_text=(text [L, D], pooled [D2]) of "
               "the encoded empty prompt \"\" (empty_texts_from_cache reads it from a text cache), or set "
               "caption_dropout to 0.")
        if empty_text is None:
            raise TrainingError(fix)
        pairs = dict(empty_text) if isinstance(empty_text, Mapping) else {None: empty_text}
        out = {}
        for template, pair in pairs.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TrainingError(fix)
            who = "empty caption" + ("" if template is None else f" (template {template})")
            out[template] = self._check_text(model, pair[0], pair[1], who)
        return out

    @staticmethod
    def _check_text(model: nn.Module, text: Any, pooled: Any, who: str) -> tuple[Tensor, Tensor]:
        D, D2 = model.config.in_text_dim, model.config.in_text_dim2
        if not isinstance(text, Tensor) or text.ndim != 2 or text.shape[0] < 1 or text.shape[1] != D:
            got = list(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise TrainingError(f"{who}: text embedding must be [L ≥ 1, {D}] (valid tokens of the text encoder this "
                                f"DiT uses), got {got}; re-cache the captions with the model's text encoder.")
        if isinstance(pooled, Tensor) and pooled.ndim == 2 and pooled.shape[0] == 1:
            pooled = pooled[0]
        if not isinstance(pooled, Tensor) or tuple(pooled.shape) != (D2,):
            got = list(pooled.shape) if isinstance(pooled, Tensor) else type(pooled).__name__
            raise TrainingError(f"{who}: pooled embedding must be [{D2}] (CLIP pooled output), got {got}; re-cache "
                                "the captions with the model's text encoder.")
        return text, pooled

    def load_batch(self, model: nn.Module, samples: Sequence[Any], config: TrainConfig) -> K5Batch:
        cfg = model.config
        C, ph, pw = cfg.out_visual_dim, cfg.patch_size[1], cfg.patch_size[2]
        latents, firsts, lasts, texts, pooled, templates, ids = [], [], [], [], [], [], []
        for s in samples:
            who = f"sample {s.item_id!r}"
            lat = sample_tensor(s, "latent", True)
            if lat.ndim != 4 or lat.shape[0] != C or lat.shape[1] < 1:
                raise TrainingError(f"{who}: latent must be [{C}, T, h, w] (raw VAE latent), got {list(lat.shape)}.")
            if lat.shape[2] % ph or lat.shape[3] % pw:
                raise TrainingError(f"{who}: latent size {lat.shape[2]}×{lat.shape[3]} must be a multiple of "
                                    f"{ph}×{pw} (pixel sizes multiples of 16); re-cache with a bucket step of 16.")
            if latents and lat.shape != latents[0].shape:
                raise TrainingError(f"{who} and sample {ids[0]!r} share bucket {tuple(s.bucket)} and "
                                    f"{s.frames} frames but their latents differ ({list(lat.shape)} vs "
                                    f"{list(latents[0].shape)}); re-cache the dataset.")
            frame = (C, 1, lat.shape[2], lat.shape[3])
            first = last = None
            if config.i2v != "off" and lat.shape[1] > 1:
                first = sample_tensor(s, "first", False)
                if first is None:
                    first = lat[:, :1]
                if config.i2v == "first_last":
                    last = sample_tensor(s, "last", False)
                    if last is None:
                        raise TrainingError(f"{who} has no 'last' frame latent, which i2v='first_last' needs; "
                                            "re-cache the latents with image-to-video on, or set i2v to 'first'.")
                for name, t in (("first", first), ("last", last)):
                    if t is not None and tuple(t.shape) != frame:
                        raise TrainingError(f"{who}: {name} latent must be {list(frame)}, got {list(t.shape)}; "
                                            "re-cache the latents.")
            text, pool = self._check_text(model, sample_tensor(s, "text", True), sample_tensor(s, "pooled", True),
                                          who)
            latents.append(lat)
            firsts.append(first)
            lasts.append(last)
            texts.append(text)
            pooled.append(pool)
            templates.append(getattr(s, "template", None))
            ids.append(s.item_id)
        T, h, w = latents[0].shape[1:]
        if config.nabla is not None:
            try:
                check_nabla_grid(T, h // ph, w // pw)
            except ValueError as e:
                raise TrainingError(f"sample {ids[0]!r} (bucket {tuple(samples[0].bucket)}): {e} Use NABLA-compatible "
                                    "buckets or turn NABLA off.") from e
        return K5Batch(torch.stack([t.float() for t in latents]), firsts, lasts, texts, pooled, templates, ids,
                       tokens=T * (h // ph) * (w // pw))

    # ----------------------------------------------------------------------------------------------- loss

    @staticmethod
    def _empty_for(empty: Mapping[Any, tuple[Tensor, Tensor]], template: Any) -> tuple[Tensor, Tensor]:
        if None in empty:
            return empty[None]
        if template in empty:
            return empty[template]
        raise TrainingError(f"no empty-caption embedding for Qwen template {template!r} (have "
                            f"{sorted(map(str, empty))}); cache the empty caption for it, or set "
                            "caption_dropout to 0.")

    def loss(self, model: nn.Module, batch: K5Batch, sigma: Tensor, *, generator: torch.Generator, empty: Any,
             config: TrainConfig, device: torch.device, share: slice | None = None) -> LossTerms:
        cfg, dev, B = config, device, batch.size
        latent = batch.latent
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32)
        use_i2v = (torch.rand(B, generator=generator) < cfg.i2v_prob).tolist() if cfg.i2v != "off" else [False] * B
        drop = (torch.rand(B, generator=generator) < cfg.caption_dropout).tolist() \
            if cfg.caption_dropout > 0 else [False] * B

        x0 = latent * SCALING_FACTOR
        cond = mask = None
        if model.config.visual_cond:
            cond = torch.zeros_like(x0)
            mask = torch.zeros((B, 1, *x0.shape[2:]), dtype=torch.float32)
            for j in range(B):
                if use_i2v[j] and batch.first[j] is not None:
                    cond[j, :, :1] = batch.first[j].float() * SCALING_FACTOR
                    mask[j, :, 0] = 1.0
                    if batch.last[j] is not None:
                        cond[j, :, -1:] = batch.last[j].float() * SCALING_FACTOR
                        mask[j, :, -1] = 1.0
            cond, mask = cond.to(dev), mask.to(dev)

        texts, pooled = [], []
        for j in range(B):
            t, p = self._empty_for(empty, batch.template[j]) if drop[j] else (batch.text[j], batch.pooled[j])
            texts.append(t)
            pooled.append(p)
        L, D = max(t.shape[0] for t in texts), texts[0].shape[1]
        text = torch.zeros(B, L, D, dtype=cfg.compute_dtype)
        text_mask = torch.zeros(B, L, dtype=torch.bool)
        for j, t in enumerate(texts):
            text[j, :t.shape[0]] = t.to(cfg.compute_dtype)
            text_mask[j, :t.shape[0]] = True
        text_mask = None if bool(text_mask.all()) else text_mask.to(dev)
        pooled = torch.stack([p.float() for p in pooled])
        factor = 1.0
        if share is not None:  # this rank's samples; their loss weighs as their part of the whole micro-batch
            x0, noise, sigma, text, pooled = x0[share], noise[share], sigma[share], text[share], pooled[share]
            cond, mask = (None, None) if cond is None else (cond[share], mask[share])
            text_mask = None if text_mask is None else text_mask[share]
            factor = len(range(B)[share]) / B

        return LossTerms(factor * flow_matching_loss(
            model, x0.to(dev), noise.to(dev), sigma.to(dev), text.to(dev), pooled.to(dev), text_mask=text_mask,
            cond=cond, mask=mask, rope_scale=cfg.rope_scale, attention_backend=cfg.attention_backend, nabla=cfg.nabla,
            compute_dtype=cfg.compute_dtype, weighting=cfg.loss_weighting))


#: The Kandinsky 5 adapter, registered on import.
K5_TRAINING = register_training_adapter(K5TrainingAdapter())
